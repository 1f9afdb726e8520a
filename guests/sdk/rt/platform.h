/* The revirt virtual platform as seen by the demo guest (docs/platform.md). */
#ifndef REVIRT_DEMO_PLATFORM_H
#define REVIRT_DEMO_PLATFORM_H

#include <stdint.h>
#include <stddef.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* GDT selectors set up by the VMM. */
#define SEL_KERNEL_CS 0x10
#define SEL_KERNEL_DS 0x18
#define SEL_USER_DS 0x2B
#define SEL_USER_CS 0x33
#define SEL_TSS 0x40

#define GDT_ADDR 0x1000

/* 64-bit TSS at 0x1080; rsp0 at offset 4 (unaligned). */
#define TSS_ADDR 0x1080
#define TSS_RSP0_ADDR (TSS_ADDR + 4)

/* RFLAGS for ring-3 tasks: IF | IOPL=3 | reserved bit 1. IOPL=3 is what lets
 * ring 3 use in/out on ordinary hosts; on kvm_pvm IOPL is forced to 0 and the
 * VMM's TSS I/O bitmap (ports < 0x800, docs/platform.md) allows them instead. */
#define USER_RFLAGS 0x3202

/* Serial 16550 (COM1). */
#define COM1_DATA 0x3F8 /* THR (write) / RBR (read) */
#define COM1_LSR 0x3FD
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY 0x20

/* Everything below is 32-bit (in/out eax). */
#define PORT_CLOCK_LO 0x500   /* in: ns since VM start, low half; latches high */
#define PORT_CLOCK_HI 0x504   /* in: latched high half */
#define PORT_TIMER 0x510      /* out: period in us, 0 stops; IRQ 0 */
#define PORT_PIC_EOI 0x520    /* out: end of interrupt */
#define PORT_PIC_MASK 0x524   /* out/in: bit n = 1 masks IRQ n */
#define PORT_IDLE 0x528       /* out: sleep until IRQ pending or serial input */
#define PORT_BLK_LBA 0x530
#define PORT_BLK_ADDR 0x534
#define PORT_BLK_COUNT 0x538
#define PORT_BLK_CMD 0x53C    /* out: 1 read, 2 write; in: status */
#define PORT_BLK_CAPACITY 0x540
#define PORT_POWER_OFF 0x550  /* out: low 8 bits = exit status */
#define PORT_PANIC 0x554      /* out: eax=vector, rdi=frame, rsi=has error code */
#define PORT_DEBUG 0x560      /* out: eax=3 (#BP from ring-3 int3), rdi=frame */

#define BLK_CMD_READ 1
#define BLK_CMD_WRITE 2
#define BLK_SECTOR_SIZE 512

#define IRQ_TIMER 0
#define IRQ_SERIAL 4

#define RVBI_MAGIC 0x49425652u /* "RVBI" */

struct revirt_boot_info {
    u32 magic;
    u32 version;
    u64 mem_size;
    u64 cmdline_addr;
    u32 cmdline_len;
    u32 flags; /* bit 0: a block device is attached */
    u64 gdt_addr;
    u64 tss_addr;
    u64 pml4_addr;
    u64 image_end;
};

static inline void outb(u16 port, u8 v)
{
    asm volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
    u8 v;
    asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void outl(u16 port, u32 v)
{
    asm volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline u32 inl(u16 port)
{
    u32 v;
    asm volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* Compiler barrier: the timer handler may run between any two ring-3 instructions. */
#define barrier() asm volatile("" : : : "memory")

#endif
