/* selfmod: code that reads its own bytes and code that rewrites a function,
 * for breakpoints at native speed (issue 14): a patched int3 must neither
 * show in what the guest reads nor be lost when the guest writes over it.
 * Each of `iters` rounds (default 1,000) calls sm_read and sm_v1, hashes
 * sm_read's code bytes (reading code as data), and at the middle round
 * copies sm_v2's code over sm_v1 (same size, position independent), so
 * later calls of sm_v1 run sm_v2's code at sm_v1's address. */
#include "demo.h"
#include "workloads.h"

#define SM_SLOT 64

/* Each in a 64-byte slot of its own (aligned, and no function is longer). */
__attribute__((noinline, aligned(SM_SLOT), section(".text.selfmod"))) u64 sm_v1(u64 x)
{
    return x * 3 + 1;
}

__attribute__((noinline, aligned(SM_SLOT), section(".text.selfmod"))) u64 sm_v2(u64 x)
{
    return x * 5 + 7;
}

__attribute__((noinline, aligned(SM_SLOT), section(".text.selfmod"))) u64 sm_read(u64 x)
{
    return x ^ (x >> 3);
}

/* Called through volatile pointers: the compiler must not inline them. */
static u64 (*volatile call_v1)(u64) = sm_v1;
static u64 (*volatile call_read)(u64) = sm_read;

static u64 code_hash(const volatile u8 *p)
{
    u64 h = 0xcbf29ce484222325ULL;
    for (int i = 0; i < SM_SLOT; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

int wl_selfmod(u64 iters)
{
    u64 acc = 0;
    for (u64 i = 0; i < iters; i++) {
        acc += call_read(i);
        acc ^= code_hash((const volatile u8 *)sm_read);
        if (i == iters / 2) {
            volatile u8 *dst = (volatile u8 *)sm_v1;
            const volatile u8 *src = (const volatile u8 *)sm_v2;
            for (int j = 0; j < SM_SLOT; j++)
                dst[j] = src[j];
        }
        acc = acc * 7 + call_v1(i);
    }
    con_printf("selfmod: iters=%lu acc=0x%016lx\n", iters, acc);
    return 0;
}
