/* idle: a mostly idle, timer-driven guest, like an interactive system
 * waiting for its user: a timer at hz=N (the command line's default, 1000;
 * 100 is a typical idle kernel's) wakes it; each tick it
 * reads the clock (its timekeeping), rewrites one word in each of `pages`
 * pages (default 4) out of a 256-page working set (its state), echoes any
 * serial input that arrived, and idles again; once a second of ticks it
 * prints "idle: second S". Runs iters=N seconds of ticks (default 10),
 * then prints "idle: seconds=N ticks=T check=0x..."; the check is the sum of
 * the working set's words, which depends only on N, hz and pages (the host
 * recomputes it). */
#include "demo.h"
#include "workloads.h"

#define IDLE_BASE 0x1000000ULL
#define IDLE_SET 256ULL
#define IDLE_MUL 6364136223846793005ULL

int wl_idle(u64 seconds, u64 pages, u64 hz)
{
    if (hz == 0)
        hz = 100;
    if (seconds == 0)
        seconds = 1;
    if (pages > IDLE_SET)
        pages = IDLE_SET;
    volatile u64 *base = (volatile u64 *)IDLE_BASE;
    outl(PORT_TIMER, (u32)(1000000 / hz));
    outl(PORT_PIC_MASK, ~(1u << IRQ_TIMER) & 0xFFFF);
    u64 total = seconds * hz, done = 0, last_ns = 0;
    while (done < total) {
        u64 t = ticks;
        while (ticks == t)
            idle(); /* returns on the tick, or when a byte arrives */
        last_ns = clock_ns();
        for (u64 i = 0; i < pages; i++) {
            u64 p = (done * pages + i) % IDLE_SET;
            base[p * 512] = base[p * 512] * IDLE_MUL + done + i;
        }
        while (inb(COM1_LSR) & LSR_DATA_READY)
            con_putc((char)inb(COM1_DATA));
        done++;
        if (done % hz == 0)
            con_printf("idle: second %lu\n", done / hz);
    }
    outl(PORT_TIMER, 0);
    (void)last_ns;
    u64 check = 0;
    for (u64 p = 0; p < IDLE_SET; p++)
        check += base[p * 512];
    con_printf("idle: seconds=%lu ticks=%lu check=0x%016lx\n", seconds, total, check);
    return 0;
}
