/* fpu: floating point on SSE2 (this file alone is built without
 * -mgeneral-regs-only). A Mandelbrot scan of a 256x256 grid over
 * [-2, 0.5] x [-1.25, 1.25], at most 64 iterations per pixel, `iters` pixels
 * (wrapping around the grid), summing the iteration counts and the final
 * |z|^2 of every pixel, plus one sqrt per pixel. Only +, -, *, / and sqrt,
 * which IEEE 754 rounds exactly, so the host computes the same bits
 * (tests/run.rs). A load for the QEMU comparison (scripts/bench.sh). Runs in
 * one task with the timer off: the kernel does not save SSE registers. */
#include "demo.h"
#include "workloads.h"

#define FPU_SIDE 256
#define FPU_MAXIT 64

int wl_fpu(u64 iters)
{
    u64 count = 0;
    double sum = 0.0;
    for (u64 k = 0; k < iters; k++) {
        u64 px = k % FPU_SIDE, py = (k / FPU_SIDE) % FPU_SIDE;
        double cr = -2.0 + (double)px * (2.5 / FPU_SIDE);
        double ci = -1.25 + (double)py * (2.5 / FPU_SIDE);
        double zr = 0.0, zi = 0.0, m = 0.0;
        u64 it = 0;
        while (it < FPU_MAXIT) {
            double zr2 = zr * zr, zi2 = zi * zi;
            m = zr2 + zi2;
            if (m > 4.0)
                break;
            zi = 2.0 * zr * zi + ci;
            zr = zr2 - zi2 + cr;
            it++;
        }
        double s;
        asm("sqrtsd %1, %0" : "=x"(s) : "x"(m)); /* no libm here */
        count += it;
        sum += s;
    }
    u64 bits;
    memcpy(&bits, &sum, sizeof bits);
    con_printf("fpu: iters=%lu count=%lu sum=0x%016lx\n", iters, count, bits);
    return 0;
}
