/*
 * disk: bump a counter in sector 0 and checksum the first sectors.
 * Sector 0 = "RVDISK01" + little-endian u64 counter (+ zeros when created).
 */
#include "demo.h"
#include "workloads.h"

#define DISK_MAX_SECTORS 64
#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static const char disk_magic[8] = "RVDISK01";
static u8 disk_buf[DISK_MAX_SECTORS * BLK_SECTOR_SIZE] __attribute__((aligned(4096)));

/* One synchronous DMA command; returns the device status (0 = ok). */
static u32 blk_io(u32 cmd, u32 lba, void *buf, u32 count)
{
    outl(PORT_BLK_LBA, lba);
    outl(PORT_BLK_ADDR, (u32)(u64)buf);
    outl(PORT_BLK_COUNT, count);
    outl(PORT_BLK_CMD, cmd);
    return inl(PORT_BLK_CMD);
}

static int disk_error(u32 status)
{
    con_printf("disk: error status=%u\n", status);
    return 4;
}

int wl_disk(void)
{
    u32 cap = inl(PORT_BLK_CAPACITY);
    if (cap == 0) {
        con_puts("disk: no disk\n");
        return 3;
    }

    u32 st = blk_io(BLK_CMD_READ, 0, disk_buf, 1);
    if (st)
        return disk_error(st);
    if (memcmp(disk_buf, disk_magic, 8) != 0) {
        memset(disk_buf, 0, BLK_SECTOR_SIZE);
        memcpy(disk_buf, disk_magic, 8);
    }
    u64 counter;
    memcpy(&counter, disk_buf + 8, 8);
    counter++;
    memcpy(disk_buf + 8, &counter, 8);
    st = blk_io(BLK_CMD_WRITE, 0, disk_buf, 1);
    if (st)
        return disk_error(st);

    u32 s = cap < DISK_MAX_SECTORS ? cap : DISK_MAX_SECTORS;
    st = blk_io(BLK_CMD_READ, 0, disk_buf, s);
    if (st)
        return disk_error(st);
    u64 h = FNV_OFFSET;
    for (u64 i = 0; i < (u64)s * BLK_SECTOR_SIZE; i++) {
        h ^= disk_buf[i];
        h *= FNV_PRIME;
    }
    con_printf("disk: sectors=%u counter=%lu checksum=0x%016lx\n", s, counter, h);
    return 0;
}
