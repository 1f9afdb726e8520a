/*
 * Ring 0: parse the command line, create the main task, drop to ring 3.
 * Everything here is emulated on hosts without VMX/SVM, so it stays short
 * (a few hundred instructions for a typical command line).
 */
#include "demo.h"

struct config cfg = {
    .workload = "demo",
    .hz = 1000,
    .status = 7,
    .pages = 1024,
};

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Decimal, or hex with a 0x prefix; stops at the first non-digit. */
static u64 parse_u64(const char *s, const char *end)
{
    u64 v = 0;
    if (end - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        for (s += 2; s < end; s++) {
            char c = *s;
            unsigned d;
            if (c >= '0' && c <= '9')
                d = c - '0';
            else if (c >= 'a' && c <= 'f')
                d = c - 'a' + 10;
            else if (c >= 'A' && c <= 'F')
                d = c - 'A' + 10;
            else
                break;
            v = v * 16 + d;
        }
        return v;
    }
    for (; s < end && *s >= '0' && *s <= '9'; s++)
        v = v * 10 + (*s - '0');
    return v;
}

static int key_is(const char *k, const char *kend, const char *want)
{
    while (k < kend && *want && *k == *want)
        k++, want++;
    return k == kend && !*want;
}

/* Space separated key=value words; unknown keys are ignored. */
static void parse_cmdline(const char *s)
{
    for (;;) {
        while (is_space(*s))
            s++;
        if (!*s)
            return;
        const char *k = s, *eq = 0;
        while (*s && !is_space(*s)) {
            if (*s == '=' && !eq)
                eq = s;
            s++;
        }
        if (!eq)
            continue;
        const char *v = eq + 1;
        if (key_is(k, eq, "workload")) {
            size_t n = 0;
            while (v + n < s && n < WORKLOAD_NAME_MAX - 1) {
                cfg.workload[n] = v[n];
                n++;
            }
            cfg.workload[n] = 0;
        } else if (key_is(k, eq, "iters")) {
            cfg.iters = parse_u64(v, s);
            cfg.iters_set = 1;
        } else if (key_is(k, eq, "hz")) {
            cfg.hz = parse_u64(v, s);
        } else if (key_is(k, eq, "exits")) {
            cfg.exits = parse_u64(v, s);
        } else if (key_is(k, eq, "status")) {
            cfg.status = parse_u64(v, s);
        } else if (key_is(k, eq, "pages")) {
            cfg.pages = parse_u64(v, s);
            cfg.pages_set = 1;
        }
    }
}

NORETURN void kmain(struct revirt_boot_info *bi)
{
    if (bi && bi->magic == RVBI_MAGIC && bi->cmdline_addr)
        parse_cmdline((const char *)bi->cmdline_addr);

    if (str_eq(cfg.workload, "ring0"))
        ring0_main();

    struct task *t = task_spawn(user_main, (u64)bi);
    cur_task = t;
    *(volatile u64 *)TSS_RSP0_ADDR = t->ktop;
    task_enter(t->ksp); /* iretq to ring 3: CS=0x33 SS=0x2B RFLAGS=0x3202 */
}

/* The ring0 workload: the compute loop with interrupts off, never in ring 3.
 * About 10 emulated instructions per iteration, hence the small default. */
NORETURN void ring0_main(void)
{
    u64 iters = cfg.iters_set ? cfg.iters : 10000;
    con_puts("revirt-demo: workload=ring0\n");
    u64 r = compute_run(iters);
    con_printf("ring0: iters=%lu result=0x%016lx\n", iters, r);
    power_off(0);
}
