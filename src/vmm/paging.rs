//! Virtual-to-physical translation through the guest's own 4-level page
//! tables (4 KiB, 2 MiB and 1 GiB pages), for the run loop's mechanics
//! (patching breakpoint sites). The inspector's walker (inspect::mmu)
//! shows every level; this one only answers.

use kvm_bindings::kvm_sregs;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// The physical address of `va`, or None when it is not mapped.
pub fn translate(mem: &GuestMemoryMmap, s: &kvm_sregs, va: u64) -> Option<u64> {
    if s.cr0 & (1 << 31) == 0 {
        return Some(va);
    }
    let mut table = s.cr3 & ADDR_MASK;
    for level in (0..4).rev() {
        let idx = (va >> (12 + 9 * level)) & 0x1ff;
        let e: u64 = mem.read_obj(GuestAddress(table + idx * 8)).ok()?;
        if e & 1 == 0 {
            return None;
        }
        let base = e & ADDR_MASK;
        if level == 0 {
            return Some(base | (va & 0xfff));
        }
        if (level == 1 || level == 2) && e & 0x80 != 0 {
            let size = 1u64 << (12 + 9 * level);
            return Some((base & !(size - 1)) | (va & (size - 1)));
        }
        table = base;
    }
    None
}
