/*
 * Ring 0 of an SDK program: make the main task and drop to ring 3, where
 * __rv_start (libc/start.c) sets up the C library and calls main().
 * Ring 0 is emulated on hosts without VMX/SVM, so it does nothing else.
 */
#include "rt.h"

struct revirt_boot_info *__rv_boot_info;
void __rv_start(u64 boot_info);

/* The thread pointer (FS base): the C library (musl, built with the stack
 * protector) reads its canary at %fs:0x28, and %fs:0 must point to the block
 * itself. One block for all tasks: the library has no threads. */
static u64 tls_block[32] __attribute__((aligned(64)));
#define MSR_FS_BASE 0xC0000100u
#define STACK_CANARY 0x00726976745f7276ull /* "rv_tvir\0": NUL first byte, as glibc's */

NORETURN void kmain(struct revirt_boot_info *bi)
{
    __rv_boot_info = bi;
    tls_block[0] = (u64)tls_block;
    tls_block[5] = STACK_CANARY; /* %fs:0x28 */
    u64 tp = (u64)tls_block;
    asm volatile("wrmsr" : : "c"(MSR_FS_BASE), "a"((u32)tp), "d"((u32)(tp >> 32)));
    struct task *t = task_spawn(__rv_start, (u64)bi);
    cur_task = t;
    *(volatile u64 *)TSS_RSP0_ADDR = t->ktop;
    task_enter(t->ksp); /* iretq to ring 3: CS=0x33 SS=0x2B RFLAGS=0x3202 */
}
