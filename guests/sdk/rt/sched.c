/*
 * Tasks: a fixed table, a circular run ring, one kernel and one user stack
 * per task. The switching itself happens in the timer handler (entry.S).
 *
 * All memory is user-accessible, so ring-3 code creates tasks directly by
 * writing an initial interrupt frame on the new task's kernel stack; the
 * timer handler then switches to it like to any preempted task.
 */
#include "rt.h"

_Static_assert(offsetof(struct task, ksp) == 0, "entry.S TASK_KSP");
_Static_assert(offsetof(struct task, ktop) == 8, "entry.S TASK_KTOP");
_Static_assert(offsetof(struct task, next) == 16, "entry.S TASK_NEXT");
_Static_assert(offsetof(struct task, state) == 24, "entry.S TASK_STATE");
_Static_assert(offsetof(struct task, fpu) == 32, "entry.S TASK_FPU");
_Static_assert(TASK_RUNNABLE == 1, "entry.S TASK_RUNNABLE");
_Static_assert(sizeof(struct int_frame) == 20 * 8, "entry.S push order");

struct task tasks[NTASKS];
struct task *volatile cur_task;
volatile u64 ticks;

static u8 kstacks[NTASKS][KSTACK_SIZE] __attribute__((aligned(16)));
static u8 ustacks[NTASKS][USTACK_SIZE] __attribute__((aligned(16)));
#ifdef RT_SAVE_FPU
/* x87/SSE state of switched-out tasks (FXSAVE format), see entry.S. */
static u8 fpu_areas[NTASKS][512] __attribute__((aligned(16)));
#endif

struct task *task_spawn(task_fn fn, u64 arg)
{
    int i;
    for (i = 0; i < NTASKS; i++)
        if (tasks[i].state != TASK_RUNNABLE)
            break;
    if (i == NTASKS)
        return 0;

    struct task *t = &tasks[i];
    u64 ktop = (u64)&kstacks[i][KSTACK_SIZE];
    struct int_frame *f = (struct int_frame *)(ktop - sizeof(*f));
    *f = (struct int_frame){
        .rdi = arg,
        .rsi = (u64)fn,
        .rip = (u64)task_trampoline,
        .cs = SEL_USER_CS,
        .rflags = USER_RFLAGS,
        .rsp = (u64)&ustacks[i][USTACK_SIZE],
        .ss = SEL_USER_DS,
    };
    t->ksp = (u64)f;
    t->ktop = ktop;
#ifdef RT_SAVE_FPU
    u8 *fx = fpu_areas[i];
    for (int b = 0; b < 512; b++) /* no memset: ring 0 must not run SSE code */
        fx[b] = 0;
    *(u16 *)fx = 0x037F;        /* FCW: the power-on default */
    *(u32 *)(fx + 24) = 0x1F80; /* MXCSR: all exceptions masked */
    t->fpu = (u64)fx;
#endif

    /* Publish: the timer handler may run between any two of these stores. */
    int in_ring = t->state == TASK_DEAD; /* a dead task is still linked */
    barrier();
    t->state = TASK_RUNNABLE;
    barrier();
    if (!in_ring) {
        struct task *cur = cur_task;
        if (!cur) {
            t->next = t; /* the first task, created by kmain */
        } else {
            t->next = cur->next;
            barrier();
            cur->next = t;
        }
    }
    return t;
}

void task_exit(void)
{
    struct task *t = cur_task;
    if (t == &tasks[0])
        power_off(0); /* the main task never exits; do not leave a VM without runnable tasks */
    t->state = TASK_DEAD; /* skipped by the scheduler from now on */
    for (;;)
        idle(); /* until the next tick switches away for good */
}

void task_wait(struct task *t)
{
    while (t->state != TASK_DEAD)
        idle(); /* wakes at the next tick, which runs the other task */
}
