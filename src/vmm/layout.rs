//! Fixed guest-physical layout of the revirt platform; docs/platform.md is the
//! human-readable version of this file and must agree with it.

/// Guest pages are 4 KiB everywhere: dirty log, page hashes, checkpoints.
pub const PAGE: u64 = 4096;
pub const GDT_ADDR: u64 = 0x1000;
pub const TSS_ADDR: u64 = 0x1080;
/// The 104-byte TSS plus an I/O permission bitmap that allows ports
/// 0..IO_BITMAP_PORTS from ring 3 (and a terminating 0xFF byte).
pub const TSS_SIZE: u64 = 104 + IO_BITMAP_PORTS / 8 + 1;
pub const IO_BITMAP_PORTS: u64 = 0x800;
pub const BOOT_INFO_ADDR: u64 = 0x3000;
pub const CMDLINE_ADDR: u64 = 0x4000;
pub const CMDLINE_MAX: usize = 4095;
pub const PML4_ADDR: u64 = 0x8000;
pub const PDPT_ADDR: u64 = 0x9000;
pub const PD_ADDR: u64 = 0xA000;
pub const BOOT_STACK_TOP: u64 = 0x80000;
/// Images may not load below this address: everything under it is the VMM's.
pub const IMAGE_MIN_ADDR: u64 = 0x100000;

pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
pub const USER_DS: u16 = 0x2B;
pub const USER_CS: u16 = 0x33;
pub const TSS_SEL: u16 = 0x40;

pub const BOOT_INFO_MAGIC: u32 = 0x4942_5652; // "RVBI"
pub const BOOT_INFO_VERSION: u32 = 1;

pub const MIB: u64 = 1 << 20;
/// RAM is mapped with 2 MiB pages; one page-directory page covers 1 GiB.
pub const MIN_MEM: u64 = 4 * MIB;
pub const MAX_MEM: u64 = 16 << 30;

/// I/O ports of the platform devices.
pub mod ports {
    pub const SERIAL_BASE: u16 = 0x3F8;
    pub const SERIAL_END: u16 = 0x3FF;
    pub const CLOCK_LO: u16 = 0x500;
    pub const CLOCK_HI: u16 = 0x504;
    pub const TIMER_PERIOD: u16 = 0x510;
    pub const PIC_EOI: u16 = 0x520;
    pub const PIC_MASK: u16 = 0x524;
    pub const IDLE: u16 = 0x528;
    pub const BLK_LBA: u16 = 0x530;
    pub const BLK_ADDR: u16 = 0x534;
    pub const BLK_COUNT: u16 = 0x538;
    pub const BLK_CMD: u16 = 0x53C;
    pub const BLK_CAPACITY: u16 = 0x540;
    pub const POWER_OFF: u16 = 0x550;
    pub const PANIC: u16 = 0x554;
    pub const DEBUG_REPORT: u16 = 0x560;
}

/// IRQ lines of the interrupt controller; vector = IRQ_VECTOR_BASE + line.
pub const IRQ_VECTOR_BASE: u8 = 0x20;
pub const IRQ_TIMER: u8 = 0;
pub const IRQ_SERIAL: u8 = 4;
