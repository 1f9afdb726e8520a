/*
 * race: two ring-3 tasks increment a shared counter without atomics. The
 * timer preempts them anywhere; a preemption between a task's load and its
 * store makes that store overwrite everything the other task added meanwhile.
 *
 * exits=K (K > 0): every K-th iteration also reads the clock port between the
 * load and the store. That port read exits to the VMM inside the racy window,
 * so a VMM that delivers interrupts only at exits (the "exit clock") can
 * still preempt there and lose updates.
 */
#include "demo.h"
#include "workloads.h"

/* Work per iteration, in (imul, add) pairs of a private LCG: RACE_WORK_IN
 * between the load and the store (the window), RACE_WORK_OUT after it.
 * About 25 ns per iteration natively: 2 x 2M iterations take ~100 ms. */
#define RACE_WORK_IN 3
#define RACE_WORK_OUT 12
#define LCG_MUL 6364136223846793005ULL

static volatile u64 race_counter;

static u64 race_exits; /* exits=K; 0 = never */

static NOINLINE void race_loop(u64 iters, u64 seed)
{
    u64 s = seed;
    u64 k = 0;
    for (u64 i = 0; i < iters; i++) {
        int port_read = race_exits && ++k == race_exits;
        if (port_read)
            k = 0;
        u64 v = race_counter; /* load */
        asm volatile(".rept %c[n]\n\t"
                     "imul %[m], %[s]\n\t"
                     "add %[v], %[s]\n\t"
                     ".endr"
                     : [s] "+r"(s), [v] "+r"(v)
                     : [m] "r"(LCG_MUL), [n] "i"(RACE_WORK_IN));
        if (port_read) {
            /* An exit inside the window; "memory" keeps it between the
             * load and the store. */
            u32 t;
            asm volatile("inl %w1, %0" : "=a"(t) : "Nd"(PORT_CLOCK_LO) : "memory");
            s += t;
        }
        race_counter = v + 1; /* store */
        asm volatile(".rept %c[n]\n\t"
                     "imul %[m], %[s]\n\t"
                     "add %[m], %[s]\n\t"
                     ".endr"
                     : [s] "+r"(s)
                     : [m] "r"(LCG_MUL), [n] "i"(RACE_WORK_OUT));
    }
}

static void race_task_b(u64 iters)
{
    race_loop(iters, 0xB0B);
}

int wl_race(u64 iters, u64 hz, u64 exits)
{
    race_exits = exits;
    if (hz == 0)
        hz = 1000;
    u64 period_us = 1000000 / hz;
    if (period_us == 0)
        period_us = 1;

    race_counter = 0;
    outl(PORT_TIMER, (u32)period_us);
    outl(PORT_PIC_MASK, ~(1u << IRQ_TIMER) & 0xFFFF);

    struct task *b = task_spawn(race_task_b, iters);
    if (!b) {
        con_puts("race: no free task slot\n");
        return 1;
    }
    race_loop(iters, 0xA11CE);
    task_wait(b);

    outl(PORT_TIMER, 0);
    outl(PORT_PIC_MASK, 0xFFFF);

    u64 c = race_counter, e = 2 * iters;
    con_printf("race: counter=%lu expected=%lu lost=%lu ticks=%lu\n", c, e, e - c, ticks);
    return 0;
}
