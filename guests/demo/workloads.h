/* The ring-3 workloads; each returns the exit status (see README.md). */
#ifndef REVIRT_DEMO_WORKLOADS_H
#define REVIRT_DEMO_WORKLOADS_H

#include "demo.h"

#define COMPUTE_ITERS 50000000ULL
#define DEMO_COMPUTE_ITERS 20000000ULL
#define RACE_ITERS 2000000ULL
#define CLOCK_ITERS 10000000ULL
#define DIRTY_ROUNDS 1000ULL
#define CHURN_ROUNDS 500ULL
#define MEM_ITERS 10000000ULL
#define BRANCHY_ITERS 1000000ULL
#define FPU_ITERS 65536ULL
#define IDLE_SECONDS 10ULL
#define SELFMOD_ITERS 1000ULL

int wl_compute(u64 iters);
int wl_clock(u64 iters);
int wl_race(u64 iters, u64 hz, u64 exits);
int wl_echo(void);
int wl_disk(void);
int wl_vuln(void);
int wl_dirty(u64 rounds, u64 pages);
int wl_churn(u64 rounds, u64 pages, u64 hz);
int wl_mem(u64 iters, u64 pages);
int wl_branchy(u64 iters);
int wl_fpu(u64 iters);
int wl_idle(u64 seconds, u64 pages, u64 hz);
int wl_selfmod(u64 iters);

#endif
