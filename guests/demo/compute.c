/* compute, clock: the xorshift64 sum (also used by the ring0 workload). */
#include "demo.h"
#include "workloads.h"

u64 compute_run(u64 iters)
{
    u64 x = 0x2545F4914F6CDD1DULL, acc = 0;
    for (u64 i = 0; i < iters; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc += x ^ i;
    }
    return acc;
}

int wl_compute(u64 iters)
{
    u64 r = compute_run(iters);
    con_printf("compute: iters=%lu result=0x%016lx\n", iters, r);
    return 0;
}

int wl_clock(u64 iters)
{
    u64 t0 = clock_ns();
    asm volatile("" : "+r"(iters) : : "memory"); /* keep the loop between the reads */
    u64 r = compute_run(iters);
    asm volatile("" : : "r"(r) : "memory");
    u64 t1 = clock_ns();
    con_printf("clock: t0=%lu t1=%lu elapsed_ns=%lu\n", t0, t1, t1 - t0);
    return 0;
}
