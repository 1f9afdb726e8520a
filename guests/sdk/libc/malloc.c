/*
 * malloc and friends: power-of-two size classes with one free list each,
 * carved from the RAM between the image's end and the end of memory. Simple
 * and deterministic (same calls, same addresses: replays and diffs of two
 * runs line up). Freed blocks are reused for their class only.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "rt.h"
#include "libc.h"

#define HDR 16 /* keeps 16-byte alignment */
#define MIN_CLASS 5
#define MAX_CLASS 40
#define MAGIC 0x52564d41u /* "RVMA" */

struct hdr {
    u32 cls;
    u32 magic;
    u64 size; /* requested size */
};

extern char __image_end[];
static uintptr_t heap_cur, heap_end;
static void *free_list[MAX_CLASS + 1];

void __rv_heap_init(struct revirt_boot_info *bi)
{
    u64 mem = 64ull << 20;
    if (bi && bi->magic == RVBI_MAGIC && bi->mem_size)
        mem = bi->mem_size;
    heap_cur = ((uintptr_t)__image_end + 15) & ~(uintptr_t)15;
    heap_end = mem;
}

static void fail_oom(void)
{
    errno = ENOMEM;
}

void *malloc(size_t n)
{
    if (n > (1ull << MAX_CLASS) - HDR) {
        fail_oom();
        return 0;
    }
    unsigned c = MIN_CLASS;
    while ((1ull << c) < n + HDR)
        c++;
    struct hdr *h = free_list[c];
    if (h) {
        free_list[c] = *(void **)(h + 1);
    } else {
        u64 sz = 1ull << c;
        if (heap_end - heap_cur < sz) {
            fail_oom();
            return 0;
        }
        h = (struct hdr *)heap_cur;
        heap_cur += sz;
    }
    h->cls = c;
    h->magic = MAGIC;
    h->size = n;
    return h + 1;
}

static struct hdr *header(void *p)
{
    struct hdr *h = (struct hdr *)p - 1;
    if (h->magic != MAGIC || h->cls < MIN_CLASS || h->cls > MAX_CLASS) {
        con_printf("revirt sdk: free/realloc of a bad pointer %p\n", p);
        abort();
    }
    return h;
}

void free(void *p)
{
    if (!p)
        return;
    struct hdr *h = header(p);
    h->magic = 0; /* a second free of p is caught */
    *(void **)(h + 1) = free_list[h->cls];
    free_list[h->cls] = h;
}

void *calloc(size_t n, size_t size)
{
    if (size && n > SIZE_MAX / size) {
        fail_oom();
        return 0;
    }
    void *p = malloc(n * size);
    if (p)
        memset(p, 0, n * size);
    return p;
}

void *realloc(void *p, size_t n)
{
    if (!p)
        return malloc(n);
    if (!n) {
        free(p);
        return 0;
    }
    struct hdr *h = header(p);
    if (n + HDR <= (1ull << h->cls)) {
        h->size = n;
        return p;
    }
    void *q = malloc(n);
    if (!q)
        return 0;
    memcpy(q, p, h->size < n ? h->size : n);
    free(p);
    return q;
}

size_t malloc_usable_size(void *p)
{
    return p ? (1ull << header(p)->cls) - HDR : 0;
}

/* Blocks are 16-byte aligned; larger alignments are not supported. */
int posix_memalign(void **out, size_t align, size_t n)
{
    if (align > HDR || (align & (align - 1)))
        return EINVAL;
    void *p = malloc(n);
    if (!p)
        return ENOMEM;
    *out = p;
    return 0;
}

void *aligned_alloc(size_t align, size_t n)
{
    void *p = 0;
    int e = posix_memalign(&p, align, n);
    if (e)
        errno = e;
    return p;
}

/* musl's internal names, so that none of its own allocator (mmap, brk) is linked. */
void *__libc_malloc(size_t n) __attribute__((alias("malloc")));
void *__libc_malloc_impl(size_t n) __attribute__((alias("malloc")));
void __libc_free(void *p) __attribute__((alias("free")));
void *__libc_calloc(size_t n, size_t size) __attribute__((alias("calloc")));
void *__libc_realloc(void *p, size_t n) __attribute__((alias("realloc")));
