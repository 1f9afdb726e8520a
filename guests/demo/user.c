/* Ring 3: the main task. Prints the banner and runs the selected workload. */
#include "demo.h"
#include "workloads.h"

static u64 iters_or(u64 dflt)
{
    return cfg.iters_set ? cfg.iters : dflt;
}

static int wl_exit(void)
{
    con_printf("exit: status=%lu\n", cfg.status);
    return (int)(cfg.status & 0xFF);
}

static int wl_demo(void)
{
    int st = wl_compute(iters_or(DEMO_COMPUTE_ITERS));
    if (!st)
        st = wl_race(iters_or(RACE_ITERS), cfg.hz, cfg.exits);
    if (!st)
        st = wl_clock(iters_or(CLOCK_ITERS));
    if (!st)
        con_puts("demo: done\n");
    return st;
}

static int run_workload(const char *w)
{
    if (str_eq(w, "demo"))
        return wl_demo();
    if (str_eq(w, "compute"))
        return wl_compute(iters_or(COMPUTE_ITERS));
    if (str_eq(w, "race"))
        return wl_race(iters_or(RACE_ITERS), cfg.hz, cfg.exits);
    if (str_eq(w, "echo"))
        return wl_echo();
    if (str_eq(w, "disk"))
        return wl_disk();
    if (str_eq(w, "vuln"))
        return wl_vuln();
    if (str_eq(w, "clock"))
        return wl_clock(iters_or(CLOCK_ITERS));
    if (str_eq(w, "exit"))
        return wl_exit();
    if (str_eq(w, "churn"))
        return wl_churn(iters_or(CHURN_ROUNDS), cfg.pages, cfg.hz);
    if (str_eq(w, "dirty"))
        return wl_dirty(iters_or(DIRTY_ROUNDS), cfg.pages);
    if (str_eq(w, "mem"))
        return wl_mem(iters_or(MEM_ITERS), cfg.pages);
    if (str_eq(w, "branchy"))
        return wl_branchy(iters_or(BRANCHY_ITERS));
    if (str_eq(w, "fpu"))
        return wl_fpu(iters_or(FPU_ITERS));
    if (str_eq(w, "idle"))
        return wl_idle(iters_or(IDLE_SECONDS), cfg.pages_set ? cfg.pages : 4, cfg.hz);
    if (str_eq(w, "selfmod"))
        return wl_selfmod(iters_or(SELFMOD_ITERS));
    con_printf("revirt-demo: unknown workload '%s'\n", w);
    return 2;
}

void user_main(u64 boot_info)
{
    (void)boot_info;
    con_printf("revirt-demo: workload=%s\n", cfg.workload);
    power_off((u32)run_workload(cfg.workload));
}
