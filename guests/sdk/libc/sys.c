/*
 * What musl would get from the Linux kernel, on the revirt platform instead:
 * exit and abort power the VM off, the clocks read the clock device, errno
 * is one global (no thread pointer is set up), and the few functions that
 * would read the thread pointer for their locale are replaced.
 */
#define _GNU_SOURCE /* timegm */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include "rt.h"

static int errno_value;

int *__errno_location(void)
{
    return &errno_value;
}
int *___errno_location(void) __attribute__((alias("__errno_location"), const));

#define MAX_ATEXIT 32
static void (*atexit_fns[MAX_ATEXIT])(void);
static int n_atexit;

int atexit(void (*fn)(void))
{
    if (n_atexit == MAX_ATEXIT)
        return -1;
    atexit_fns[n_atexit++] = fn;
    return 0;
}

_Noreturn void _Exit(int status)
{
    power_off((u32)status & 0xff);
}

_Noreturn void _exit(int status)
{
    power_off((u32)status & 0xff);
}

_Noreturn void exit(int status)
{
    while (n_atexit)
        atexit_fns[--n_atexit]();
    fflush(0);
    _Exit(status);
}

_Noreturn void abort(void)
{
    fflush(0);
    con_puts("revirt sdk: abort()\n");
    power_off(134); /* 128 + SIGABRT, as a shell reports it */
}

int raise(int sig)
{
    con_printf("revirt sdk: raise(%d)\n", sig);
    power_off(128 + (u32)sig);
}

/* Wall time starts at 0 (1970-01-01) at boot: the clock is the VM's. */
int clock_gettime(clockid_t clk, struct timespec *ts)
{
    (void)clk;
    u64 ns = clock_ns();
    ts->tv_sec = (time_t)(ns / 1000000000u);
    ts->tv_nsec = (long)(ns % 1000000000u);
    return 0;
}

int __clock_gettime(clockid_t clk, struct timespec *ts) __attribute__((alias("clock_gettime")));

int gettimeofday(struct timeval *restrict tv, void *restrict tz)
{
    (void)tz;
    u64 ns = clock_ns();
    if (tv) {
        tv->tv_sec = (time_t)(ns / 1000000000u);
        tv->tv_usec = (suseconds_t)(ns / 1000u % 1000000u);
    }
    return 0;
}

time_t time(time_t *t)
{
    time_t s = (time_t)(clock_ns() / 1000000000u);
    if (t)
        *t = s;
    return s;
}

clock_t clock(void)
{
    return (clock_t)(clock_ns() / 1000u); /* CLOCKS_PER_SEC = 1000000 */
}

char *getenv(const char *name)
{
    (void)name;
    return 0;
}

int system(const char *cmd)
{
    return cmd ? -1 : 0; /* no shell */
}

/* The C locale only: musl's versions read the locale through the thread pointer. */
int strcoll(const char *a, const char *b)
{
    return strcmp(a, b);
}

char *setlocale(int cat, const char *name)
{
    (void)cat;
    static char c[] = "C";
    if (!name || !*name || !strcmp(name, "C") || !strcmp(name, "POSIX"))
        return c;
    return 0;
}

char *strerror(int e)
{
    switch (e) {
    case 0: return "Success";
    case ENOENT: return "No such file or directory";
    case ENOMEM: return "Out of memory";
    case EINVAL: return "Invalid argument";
    case ERANGE: return "Result not representable";
    case EDOM: return "Domain error";
    case ENOSYS: return "Function not implemented";
    case EIO: return "I/O error";
    case EBADF: return "Bad file descriptor";
    default: return "Unknown error";
    }
}

/* Time zones: UTC only (musl's would read /etc/localtime). */
struct tm *localtime_r(const time_t *restrict t, struct tm *restrict tm)
{
    return gmtime_r(t, tm);
}

struct tm *localtime(const time_t *t)
{
    return gmtime(t);
}

time_t mktime(struct tm *tm)
{
    return timegm(tm);
}

const char __utc[] = "UTC"; /* gmtime's tm_zone */

const char *__tm_to_tzname(const struct tm *tm)
{
    (void)tm;
    return "UTC";
}

void tzset(void)
{
}
