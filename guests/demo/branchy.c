/* branchy: an interpreter's dispatch loop. A 64-op bytecode program (61 random
 * ops from a table of 8, chosen by xorshift64, then END) is run `iters` times
 * through a computed-goto table, so every op ends in an indirect jump as in a
 * threaded interpreter (a load for the QEMU comparison, scripts/bench.sh:
 * TCG ends a translation block at every indirect jump). Checked against the
 * same interpreter on the host (tests/run.rs). */
#include "demo.h"
#include "workloads.h"

#define BRANCHY_LEN 64

int wl_branchy(u64 iters)
{
    static const void *ops[9] = {&&op0, &&op1, &&op2, &&op3, &&op4, &&op5, &&op6, &&op7, &&end};
    u8 prog[BRANCHY_LEN];
    u64 x = 0x2545F4914F6CDD1DULL;
    for (int i = 0; i < BRANCHY_LEN - 3; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        prog[i] = (u8)(x >> 61);
    }
    /* Padding that cannot be reached (END comes first) keeps the length even. */
    prog[BRANCHY_LEN - 3] = 8;
    prog[BRANCHY_LEN - 2] = 8;
    prog[BRANCHY_LEN - 1] = 8;
    u64 a = 1, b = 2, n = 0;
    const u8 *pc = prog;
    if (iters == 0)
        goto done;
#define NEXT goto *ops[*pc++]
    NEXT;
op0: a += b; NEXT;
op1: b ^= a << 7; NEXT;
op2: a ^= a >> 9; NEXT;
op3: b += 0x9E3779B97F4A7C15ULL; NEXT;
op4: a += a << 1; NEXT;
op5: b ^= b << 13; NEXT;
op6: { u64 t = a; a = b; b = t; } NEXT;
op7: a -= b; NEXT;
end:
    if (++n < iters) {
        pc = prog;
        NEXT;
    }
#undef NEXT
done:
    con_printf("branchy: iters=%lu result=0x%016lx\n", iters, a ^ b);
    return 0;
}
