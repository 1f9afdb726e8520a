/* dirty: writes one word in each of `pages` 4 KiB pages from 16 MiB up, `rounds`
 * times over, so every page is dirty again in every checkpoint interval (a load
 * for the checkpoint benchmark, scripts/bench.sh). One exit per round. */
#include "demo.h"
#include "workloads.h"

#define DIRTY_BASE 0x1000000ULL
#define DIRTY_MAX_PAGES 12288ULL

int wl_dirty(u64 rounds, u64 pages)
{
    if (pages > DIRTY_MAX_PAGES) /* 16..64 MiB: fits the default --mem 64M */
        pages = DIRTY_MAX_PAGES;
    volatile u64 *base = (volatile u64 *)DIRTY_BASE;
    u64 sum = 0;
    for (u64 r = 0; r < rounds; r++) {
        for (u64 p = 0; p < pages; p++) {
            u64 v = base[p * 512] + r + p;
            base[p * 512] = v;
            sum += v;
        }
        /* One exit per round (a clock read, value unused): with the exit
         * clock, checkpoints are taken at exits. */
        u64 t = clock_ns();
        asm volatile("" : : "r"(t));
    }
    con_printf("dirty: rounds=%lu pages=%lu sum=0x%016lx\n", rounds, pages, sum);
    return 0;
}
