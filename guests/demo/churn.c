/* churn: a guest that keeps dirtying memory and printing, for live migration.
 * Each round rewrites each of `pages` 4 KiB pages from 16 MiB up: word 0's
 * new value depends on its old one (so a page lost or stale after a move
 * changes the result), the rest is incompressible filler derived from it; prints "churn: round R", and waits for the next timer
 * tick (hz=N, default 100): `pages` x hz pages per second are dirtied.
 * The final line's check is the sum of the last values; the host recomputes it. */
#include "demo.h"
#include "workloads.h"

#define CHURN_BASE 0x1000000ULL
#define CHURN_MAX_PAGES 12288ULL
#define CHURN_MUL 6364136223846793005ULL

int wl_churn(u64 rounds, u64 pages, u64 hz)
{
    if (pages > CHURN_MAX_PAGES) /* 16..64 MiB: fits the default --mem 64M */
        pages = CHURN_MAX_PAGES;
    if (hz == 0)
        hz = 100;
    volatile u64 *base = (volatile u64 *)CHURN_BASE;
    outl(PORT_TIMER, (u32)(1000000 / hz));
    outl(PORT_PIC_MASK, ~(1u << IRQ_TIMER) & 0xFFFF);
    for (u64 r = 0; r < rounds; r++) {
        for (u64 p = 0; p < pages; p++) {
            u64 v = base[p * 512] * CHURN_MUL + r + p;
            base[p * 512] = v;
            /* The rest of the page: incompressible filler derived from v. */
            for (u64 i = 1; i < 512; i++) {
                v ^= v << 13;
                v ^= v >> 7;
                v ^= v << 17;
                base[p * 512 + i] = v;
            }
        }
        con_printf("churn: round %lu\n", r);
        u64 t = ticks;
        while (ticks == t)
            idle();
    }
    outl(PORT_TIMER, 0);
    u64 check = 0;
    for (u64 p = 0; p < pages; p++)
        check += base[p * 512];
    con_printf("churn: rounds=%lu pages=%lu check=0x%016lx\n", rounds, pages, check);
    return 0;
}
