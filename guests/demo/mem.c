/* mem: memory-bound. Builds one random cycle through `pages` 4 KiB pages of u64
 * slots from 16 MiB up (Sattolo's shuffle driven by xorshift64), then follows it
 * for `iters` loads: every load depends on the previous one and lands on a
 * random cache line, so the loop waits on the cache and TLB rather than the ALU
 * (a load for the QEMU comparison, scripts/bench.sh). Checked against the same
 * computation on the host (tests/run.rs). */
#include "demo.h"
#include "workloads.h"

#define MEM_BASE 0x1000000ULL
#define MEM_MAX_PAGES 12288ULL /* 16..64 MiB: fits the default --mem 64M */

int wl_mem(u64 iters, u64 pages)
{
    if (pages > MEM_MAX_PAGES)
        pages = MEM_MAX_PAGES;
    if (pages == 0)
        pages = 1;
    u64 *a = (u64 *)MEM_BASE;
    u64 n = pages * 512;
    for (u64 i = 0; i < n; i++)
        a[i] = i;
    u64 x = 0x9E3779B97F4A7C15ULL;
    for (u64 i = n - 1; i > 0; i--) { /* Sattolo: one cycle through all n slots */
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        u64 j = ((x >> 32) * i) >> 32; /* 0 <= j < i */
        u64 t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
    u64 p = 0, acc = 0;
    for (u64 k = 0; k < iters; k++) {
        p = a[p];
        acc += p ^ k;
    }
    con_printf("mem: pages=%lu iters=%lu result=0x%016lx\n", pages, iters, acc);
    return 0;
}
