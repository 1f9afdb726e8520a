/* Two preemptive tasks with floating point (the timer switches x87/SSE
 * state too), setjmp/longjmp and assert. */
#include <assert.h>
#include <setjmp.h>
#include <stdio.h>
#include <revirt.h>

static volatile double sums[2];

static void work(uint64_t which)
{
    double s = 0;
    for (int i = 1; i <= 2000000; i++)
        s += 1.0 / ((double)i * (double)i + (double)which);
    sums[which] = s;
}

static jmp_buf jb;

static void fail_deep(int n)
{
    if (n == 0)
        longjmp(jb, 42);
    fail_deep(n - 1);
}

int main(void)
{
    rv_timer_hz(1000);
    rv_task *t = rv_task_spawn(work, 1);
    work(0);
    rv_task_wait(t);
    printf("tasks: sum0=%.12f sum1=%.12f ticks>0=%d\n", sums[0], sums[1], rv_ticks() > 0);
    int v = setjmp(jb);
    if (!v)
        fail_deep(10);
    assert(v == 42);
    printf("tasks: longjmp returned %d\n", v);
    return 0;
}
