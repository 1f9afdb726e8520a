/* The revirt guest runtime (guests/sdk/rt): tasks, console and devices.
 * Shared by the demo guest and by SDK programs; see docs/guest-sdk.md. */
#ifndef REVIRT_RT_H
#define REVIRT_RT_H

#include <stdarg.h>
#include "platform.h"

#define NORETURN __attribute__((noreturn))
#define NOINLINE __attribute__((noinline))

/* ---- tasks (sched.c, entry.S) ---- */
#define NTASKS 4
#define KSTACK_SIZE 4096
#ifndef USTACK_SIZE /* SDK programs get bigger stacks (sdk.mk) */
#define USTACK_SIZE 16384
#endif

enum task_state { TASK_FREE = 0, TASK_RUNNABLE = 1, TASK_DEAD = 2 };

/* Layout is shared with entry.S (offsets checked in sched.c). */
struct task {
    u64 ksp;           /* 0: saved kernel RSP, points at a struct int_frame */
    u64 ktop;          /* 8: top of the kernel stack, loaded into TSS.rsp0 */
    struct task *next; /* 16: circular run ring */
    volatile u64 state;/* 24: enum task_state */
    u64 fpu;           /* 32: FXSAVE area (RT_SAVE_FPU builds), else 0 */
};

/* What the kernel stack of a switched-out task holds (see entry.S). */
struct int_frame {
    u64 rax, rbx, rcx, rdx, rsi, rdi, rbp;
    u64 r8, r9, r10, r11, r12, r13, r14, r15;
    u64 rip, cs, rflags, rsp, ss; /* pushed by the CPU */
};

extern struct task tasks[NTASKS];
extern struct task *volatile cur_task;
extern volatile u64 ticks; /* incremented by the timer handler */

typedef void (*task_fn)(u64 arg);
struct task *task_spawn(task_fn fn, u64 arg); /* ring 0 or ring 3 */
NORETURN void task_exit(void);                /* ring 3 */
void task_wait(struct task *t);               /* ring 3 */

/* entry.S */
NORETURN void task_enter(u64 ksp);
void task_trampoline(void);

/* ---- console, devices (console.c) ---- */
void con_putc(char c);
void con_puts(const char *s);
void con_printf(const char *fmt, ...);
void con_vprintf(const char *fmt, va_list ap);
int con_getc(void); /* blocks, idling between polls */
void idle(void);
NORETURN void power_off(u32 status);
u64 clock_ns(void);

/* ---- freestanding.c (programs without a C library) ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int str_eq(const char *a, const char *b);

#endif
