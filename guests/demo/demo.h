/* Shared declarations of the revirt demo guest. */
#ifndef REVIRT_DEMO_H
#define REVIRT_DEMO_H

#include "rt.h" /* the runtime: guests/sdk/rt */

/* ---- configuration parsed from the command line by kmain (ring 0) ---- */
#define WORKLOAD_NAME_MAX 64

struct config {
    char workload[WORKLOAD_NAME_MAX]; /* workload=NAME, default "demo" */
    u64 iters;                        /* iters=N, valid when iters_set */
    int iters_set;
    u64 hz;                           /* hz=N, timer frequency for race */
    u64 exits;                        /* exits=K, race: a port read in every K-th racy window */
    u64 status;                       /* status=N, for the exit workload */
    u64 pages;                        /* pages=N, for the dirty workload */
    int pages_set;
};
extern struct config cfg;

/* ---- workloads ---- */
u64 compute_run(u64 iters); /* the xorshift sum, shared by compute, ring0, clock */
NORETURN void user_main(u64 boot_info);
NORETURN void ring0_main(void);

#endif
