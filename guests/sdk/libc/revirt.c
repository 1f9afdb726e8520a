/* The SDK's platform API (include/revirt.h) over the runtime (rt/). */
#include <string.h>
#include "revirt.h"
#include "rt.h"

extern struct revirt_boot_info *__rv_boot_info;

_Static_assert(sizeof(struct rv_boot_info) == sizeof(struct revirt_boot_info), "boot info layout");

const struct rv_boot_info *rv_boot_info(void)
{
    return (const struct rv_boot_info *)__rv_boot_info;
}

const char *rv_cmdline(void)
{
    struct revirt_boot_info *bi = __rv_boot_info;
    return bi && bi->magic == RVBI_MAGIC && bi->cmdline_addr ? (const char *)bi->cmdline_addr : "";
}

uint64_t rv_clock_ns(void)
{
    return clock_ns();
}

uint32_t rv_disk_sectors(void)
{
    return inl(PORT_BLK_CAPACITY);
}

static int blk_io(u32 cmd, u32 lba, const void *buf, u32 count)
{
    if ((u64)buf >> 32)
        return RV_DISK_BADBUF;
    outl(PORT_BLK_LBA, lba);
    outl(PORT_BLK_ADDR, (u32)(u64)buf);
    outl(PORT_BLK_COUNT, count);
    outl(PORT_BLK_CMD, cmd);
    return (int)inl(PORT_BLK_CMD);
}

int rv_disk_read(uint32_t lba, void *buf, uint32_t count)
{
    return blk_io(BLK_CMD_READ, lba, buf, count);
}

int rv_disk_write(uint32_t lba, const void *buf, uint32_t count)
{
    return blk_io(BLK_CMD_WRITE, lba, buf, count);
}

int rv_disk_pread(void *buf, size_t len, uint64_t off)
{
    static u8 sec[RV_SECTOR] __attribute__((aligned(16)));
    u8 *out = buf;
    while (len) {
        u32 lba = (u32)(off / RV_SECTOR);
        size_t in = off % RV_SECTOR;
        size_t n = RV_SECTOR - in < len ? RV_SECTOR - in : len;
        int st = rv_disk_read(lba, sec, 1);
        if (st)
            return st;
        memcpy(out, sec + in, n);
        out += n;
        off += n;
        len -= n;
    }
    return 0;
}

void rv_putc(char c)
{
    con_putc(c);
}

int rv_getc(void)
{
    return con_getc();
}

int rv_input_ready(void)
{
    return inb(COM1_LSR) & LSR_DATA_READY;
}

static uint32_t timer_hz;

void rv_timer_hz(uint32_t hz)
{
    timer_hz = hz;
    if (!hz) {
        outl(PORT_TIMER, 0);
        outl(PORT_PIC_MASK, 0xFFFF);
        return;
    }
    u32 period = 1000000 / hz;
    outl(PORT_TIMER, period ? period : 1);
    outl(PORT_PIC_MASK, ~(1u << IRQ_TIMER) & 0xFFFF);
}

uint64_t rv_ticks(void)
{
    return ticks;
}

void rv_idle(void)
{
    idle();
}

rv_task *rv_task_spawn(void (*fn)(uint64_t arg), uint64_t arg)
{
    if (!timer_hz)
        rv_timer_hz(100);
    return (rv_task *)task_spawn(fn, arg);
}

void rv_task_wait(rv_task *t)
{
    task_wait((struct task *)t);
}

_Noreturn void rv_task_exit(void)
{
    task_exit();
}

_Noreturn void rv_poweroff(int status)
{
    power_off((u32)status & 0xff);
}
