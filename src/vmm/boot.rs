//! Puts a guest image into memory and builds everything the platform promises
//! at entry (docs/platform.md): GDT, TSS, identity page tables, boot info and
//! the long-mode register state.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::image::{Image, ImageError};
use super::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("command line is {0} bytes; the platform allows at most {CMDLINE_MAX}")]
    CmdlineTooLong(usize),
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing guest memory at {addr:#x}: {msg}")]
    Memory { addr: u64, msg: String },
}

/// Guest memory as boot writes it, noting the 4 KiB frames written: fresh
/// RAM is zero, so these are the only pages a recording's checkpoint 0 and
/// the memory digest need to look at.
struct Writer<'a> {
    mem: &'a GuestMemoryMmap,
    frames: std::collections::BTreeSet<u64>,
}

impl Writer<'_> {
    fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
        self.mem.write_slice(bytes, GuestAddress(addr)).map_err(|e| BootError::Memory {
            addr,
            msg: e.to_string(),
        })?;
        if !bytes.is_empty() {
            self.frames.extend(addr / 4096..(addr + bytes.len() as u64).div_ceil(4096));
        }
        Ok(())
    }
}

/// Boot-info block as the guest sees it (docs/platform.md).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BootInfo {
    pub magic: u32,
    pub version: u32,
    pub mem_size: u64,
    pub cmdline_addr: u64,
    pub cmdline_len: u32,
    pub flags: u32,
    pub gdt_addr: u64,
    pub tss_addr: u64,
    pub pml4_addr: u64,
    pub image_end: u64,
}

impl BootInfo {
    fn to_bytes(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&self.magic.to_le_bytes());
        v.extend_from_slice(&self.version.to_le_bytes());
        v.extend_from_slice(&self.mem_size.to_le_bytes());
        v.extend_from_slice(&self.cmdline_addr.to_le_bytes());
        v.extend_from_slice(&self.cmdline_len.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.gdt_addr.to_le_bytes());
        v.extend_from_slice(&self.tss_addr.to_le_bytes());
        v.extend_from_slice(&self.pml4_addr.to_le_bytes());
        v.extend_from_slice(&self.image_end.to_le_bytes());
        v
    }
}

pub const BOOT_FLAG_DISK: u32 = 1;

const GDT: [u64; 8] = [
    0,
    0,
    0x00AF_9A00_0000_FFFF, // 0x10 kernel code64
    0x00CF_9200_0000_FFFF, // 0x18 kernel data
    0,
    0x00CF_F200_0000_FFFF, // 0x28 user data (0x2B)
    0x00AF_FA00_0000_FFFF, // 0x30 user code64 (0x33)
    0,
];

fn tss_descriptor() -> [u64; 2] {
    let base = TSS_ADDR;
    let limit = TSS_SIZE - 1;
    // 0x8B: present, 64-bit TSS, busy (it is loaded in TR at entry).
    let low = (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x8B << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    [low, base >> 32]
}

/// Loads `image` and the boot structures into `mem`. Returns what was told
/// to the guest and the 4 KiB frames written (in order).
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    image: &Image,
    cmdline: &str,
    has_disk: bool,
) -> Result<(BootInfo, Vec<u64>), BootError> {
    let mut w = Writer { mem, frames: Default::default() };
    image.check_fits(mem_size)?;
    if cmdline.len() > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    for s in &image.segments {
        w.write(s.paddr, &s.data)?;
        // Fresh guest memory is zero already; bss needs no explicit clearing.
    }

    let mut gdt = Vec::with_capacity(80);
    for d in GDT.iter().chain(tss_descriptor().iter()) {
        gdt.extend_from_slice(&d.to_le_bytes());
    }
    w.write(GDT_ADDR, &gdt)?;

    let mut tss = vec![0u8; TSS_SIZE as usize];
    tss[4..12].copy_from_slice(&BOOT_STACK_TOP.to_le_bytes()); // rsp0
    // I/O bitmap right after the TSS: all zero = every port below
    // IO_BITMAP_PORTS is allowed in ring 3 even when IOPL is 0.
    tss[102..104].copy_from_slice(&104u16.to_le_bytes());
    tss[TSS_SIZE as usize - 1] = 0xFF;
    w.write(TSS_ADDR, &tss)?;

    // Identity map all of RAM with 2 MiB pages, user-accessible at every level.
    let pages_2m = mem_size.div_ceil(2 * MIB);
    let gbs = pages_2m.div_ceil(512);
    w.write(PML4_ADDR, &(PDPT_ADDR | 0x7).to_le_bytes())?;
    for g in 0..gbs {
        w.write(PDPT_ADDR + g * 8, &((PD_ADDR + g * 0x1000) | 0x7).to_le_bytes())?;
    }
    let mut pd = Vec::with_capacity(pages_2m as usize * 8);
    for p in 0..pages_2m {
        pd.extend_from_slice(&((p * 2 * MIB) | 0x87).to_le_bytes()); // P|RW|US|PS
    }
    w.write(PD_ADDR, &pd)?;

    let mut cl = cmdline.as_bytes().to_vec();
    cl.push(0);
    w.write(CMDLINE_ADDR, &cl)?;

    let info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        version: BOOT_INFO_VERSION,
        mem_size,
        cmdline_addr: CMDLINE_ADDR,
        cmdline_len: cmdline.len() as u32,
        flags: if has_disk { BOOT_FLAG_DISK } else { 0 },
        gdt_addr: GDT_ADDR,
        tss_addr: TSS_ADDR,
        pml4_addr: PML4_ADDR,
        image_end: image.end(),
    };
    w.write(BOOT_INFO_ADDR, &info.to_bytes())?;
    Ok((info, w.frames.into_iter().collect()))
}

fn segment(selector: u16, type_: u8, dpl: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_,
        present: 1,
        dpl,
        db: if long { 0 } else { 1 },
        s: 1,
        l: if long { 1 } else { 0 },
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long-mode system registers at entry, starting from the vCPU's reset state.
pub fn entry_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = segment(KERNEL_CS, 0xB, 0, true);
    let data = segment(KERNEL_DS, 0x3, 0, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.ss = data;
    let mut null = data;
    null.selector = 0;
    null.present = 0;
    null.unusable = 1;
    sregs.fs = null;
    sregs.gs = null;
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: (TSS_SIZE - 1) as u32,
        selector: TSS_SEL,
        type_: 0xB,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() as u16 + 2) * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x8005_0033; // PE|MP|ET|NE|WP|AM|PG
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 0x620; // PAE|OSFXSR|OSXMMEXCPT
    sregs.efer = 0x500; // LME|LMA
    sregs
}

pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_TOP,
        rdi: BOOT_INFO_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let [lo, hi] = tss_descriptor();
        assert_eq!(lo & 0xFFFF, TSS_SIZE - 1);
        assert_eq!((lo >> 16) & 0xFF_FFFF, TSS_ADDR);
        assert_eq!((lo >> 40) & 0xFF, 0x8B);
        assert_eq!(hi, 0);
    }

    #[test]
    fn boot_info_layout_matches_the_c_struct() {
        // 4+4+8+8+4+4+8+8+8+8 = 64 bytes, same as the guest's struct.
        assert_eq!(BootInfo::default().to_bytes().len(), 64);
        assert_eq!(std::mem::size_of::<BootInfo>(), 64);
    }
}
