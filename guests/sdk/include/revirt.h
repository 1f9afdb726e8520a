/*
 * revirt guest SDK: the platform beyond the C library (docs/guest-sdk.md).
 * Everything here is plain port I/O from ring 3: no system calls.
 */
#ifndef REVIRT_SDK_H
#define REVIRT_SDK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The boot-info block the VMM wrote at 0x3000 (docs/platform.md). */
struct rv_boot_info {
    uint32_t magic; /* 0x49425652, "RVBI" */
    uint32_t version;
    uint64_t mem_size;
    uint64_t cmdline_addr;
    uint32_t cmdline_len;
    uint32_t flags; /* bit 0: a block device is attached */
    uint64_t gdt_addr;
    uint64_t tss_addr;
    uint64_t pml4_addr;
    uint64_t image_end;
};
const struct rv_boot_info *rv_boot_info(void);
/* The whole kernel command line (`--cmdline`); main() gets it split at spaces. */
const char *rv_cmdline(void);

/* ---- clock: nanoseconds since the VM started (recorded, replayed exactly) ---- */
uint64_t rv_clock_ns(void);

/* ---- disk: 512-byte sectors, synchronous; 0 = ok, else the device status ---- */
#define RV_SECTOR 512
enum {
    RV_DISK_OK = 0,
    RV_DISK_NONE = 1,
    RV_DISK_RANGE = 2,
    RV_DISK_IO = 3,
    RV_DISK_BADBUF = 4,
    RV_DISK_BADCMD = 5,
};
uint32_t rv_disk_sectors(void); /* capacity; 0 = no disk attached */
int rv_disk_read(uint32_t lba, void *buf, uint32_t count);
int rv_disk_write(uint32_t lba, const void *buf, uint32_t count);
/* Reads `len` bytes from byte offset `off` of the disk (any alignment). */
int rv_disk_pread(void *buf, size_t len, uint64_t off);

/* ---- serial console (COM1) ---- */
void rv_putc(char c);
int rv_getc(void);       /* blocks (idling); never EOF */
int rv_input_ready(void);

/* ---- timer, idle, tasks ---- */
void rv_timer_hz(uint32_t hz); /* 0 stops the timer; IRQ 0 then preempts tasks */
uint64_t rv_ticks(void);       /* timer ticks since boot */
void rv_idle(void);            /* sleep until an interrupt or serial input */
typedef struct rv_task rv_task;
/* Starts fn(arg) as a ring-3 task (at most 3 besides main). Tasks switch at
 * timer ticks only; the timer is started at 100 Hz if it is off. */
rv_task *rv_task_spawn(void (*fn)(uint64_t arg), uint64_t arg);
void rv_task_wait(rv_task *t);        /* until t returned or called rv_task_exit */
_Noreturn void rv_task_exit(void);    /* in a spawned task */

/* ---- power ---- */
_Noreturn void rv_poweroff(int status); /* revirt exits with status & 0xff */

#ifdef __cplusplus
}
#endif
#endif
