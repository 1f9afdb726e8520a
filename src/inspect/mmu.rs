//! Guest virtual memory: the x86-64 4-level page walk (4 KiB, 2 MiB and
//! 1 GiB pages) over whatever state a [`View`] shows, the way the CPU does
//! it, reading the tables from guest physical memory.

use super::view::View;
use super::Error;

/// Physical-address bits of a paging-structure entry (bits 12..51).
pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// Entry flag bits and their names, in display order.
pub const FLAGS: &[(u64, &str)] = &[
    (1 << 0, "P"),
    (1 << 1, "RW"),
    (1 << 2, "US"),
    (1 << 3, "PWT"),
    (1 << 4, "PCD"),
    (1 << 5, "A"),
    (1 << 6, "D"),
    (1 << 7, "PS"),
    (1 << 8, "G"),
    (1 << 63, "NX"),
];

pub fn flag_names(entry: u64, level: usize) -> Vec<&'static str> {
    FLAGS
        .iter()
        .filter(|(bit, name)| {
            // Bit 7 means PS only above the PT level (in a PTE it is PAT); D only matters in leaves.
            entry & bit != 0 && !(*name == "PS" && level == 0)
        })
        .map(|(_, n)| *n)
        .collect()
}

/// One level of a walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    /// 3 = PML4, 2 = PDPT, 1 = PD, 0 = PT.
    pub level: usize,
    pub index: u64,
    /// Physical address of the entry.
    pub entry_addr: u64,
    pub entry: u64,
}

impl Level {
    pub fn name(&self) -> &'static str {
        ["PT", "PD", "PDPT", "PML4"][self.level]
    }
    pub fn present(&self) -> bool {
        self.entry & 1 != 0
    }
    /// A leaf above the PT level maps a large page.
    pub fn large(&self) -> bool {
        self.level > 0 && self.level < 3 && self.entry & (1 << 7) != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalkEnd {
    /// Paging is off: virtual = physical.
    NoPaging,
    /// Mapped: the physical address and the page size.
    Mapped { phys: u64, page_size: u64 },
    /// The entry at this level (index into `levels`) is not present.
    NotPresent { at: usize },
    /// A reserved bit is set (e.g. PS in a PML4 entry).
    Reserved { at: usize, why: &'static str },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walk {
    pub vaddr: u64,
    pub cr3: u64,
    pub levels: Vec<Level>,
    pub end: WalkEnd,
}

impl Walk {
    pub fn phys(&self) -> Option<u64> {
        match self.end {
            WalkEnd::NoPaging => Some(self.vaddr),
            WalkEnd::Mapped { phys, .. } => Some(phys),
            _ => None,
        }
    }
    /// Whether every level allows user-mode access / writes, and none forbids execution.
    pub fn effective(&self) -> (bool, bool, bool) {
        let all = |bit: u64| self.levels.iter().all(|l| l.entry & bit != 0);
        let nx = self.levels.iter().any(|l| l.entry & (1 << 63) != 0);
        (all(1 << 2), all(1 << 1), !nx)
    }
}

fn canonical(v: u64) -> bool {
    let top = v >> 47;
    top == 0 || top == 0x1FFFF
}

/// Walks the page tables of `view` for `vaddr`.
pub fn walk(view: &dyn View, vaddr: u64) -> Result<Walk, Error> {
    let s = view.sregs()?;
    if s.cr0 & CR0_PG == 0 {
        return Ok(Walk { vaddr, cr3: s.cr3, levels: vec![], end: WalkEnd::NoPaging });
    }
    if s.cr4 & CR4_PAE == 0 || s.efer & EFER_LMA == 0 {
        return Err(Error::Msg(format!(
            "the guest uses 32-bit paging (cr4 {:#x}, efer {:#x}); only 4-level long-mode paging is supported",
            s.cr4, s.efer
        )));
    }
    if s.cr4 & CR4_LA57 != 0 {
        return Err(Error::Msg("the guest uses 5-level paging (CR4.LA57); only 4-level paging is supported".into()));
    }
    if !canonical(vaddr) {
        return Err(Error::Msg(format!("{vaddr:#x} is not a canonical address (bits 63..47 must all be equal)")));
    }
    let mut table = s.cr3 & ADDR_MASK;
    let mut levels = Vec::with_capacity(4);
    for level in (0..4).rev() {
        let index = (vaddr >> (12 + 9 * level)) & 0x1FF;
        let entry_addr = table + index * 8;
        let mut b = [0u8; 8];
        view.read_phys(entry_addr, &mut b).map_err(|e| {
            Error::Msg(format!("the {} table at {table:#x} is outside guest memory: {e}", ["PT", "PD", "PDPT", "PML4"][level]))
        })?;
        let entry = u64::from_le_bytes(b);
        let l = Level { level, index, entry_addr, entry };
        let (present, large) = (l.present(), l.large());
        levels.push(l);
        let at = levels.len() - 1;
        if !present {
            return Ok(Walk { vaddr, cr3: s.cr3, levels, end: WalkEnd::NotPresent { at } });
        }
        if level == 3 && entry & (1 << 7) != 0 {
            return Ok(Walk { vaddr, cr3: s.cr3, levels, end: WalkEnd::Reserved { at, why: "PS is reserved in a PML4 entry" } });
        }
        if level == 0 || large {
            let page_size = 1u64 << (12 + 9 * level);
            let base = entry & ADDR_MASK & !(page_size - 1);
            let phys = base | (vaddr & (page_size - 1));
            return Ok(Walk { vaddr, cr3: s.cr3, levels, end: WalkEnd::Mapped { phys, page_size } });
        }
        table = entry & ADDR_MASK;
    }
    unreachable!("level 0 always ends the walk")
}

/// Translates a virtual address, with a clear error when it is not mapped.
pub fn translate(view: &dyn View, vaddr: u64) -> Result<u64, Error> {
    let w = walk(view, vaddr)?;
    match (&w.end, w.phys()) {
        (_, Some(p)) => Ok(p),
        (WalkEnd::NotPresent { at }, _) => Err(Error::Msg(format!(
            "cannot access memory at {vaddr:#x}: not mapped ({} entry {} not present)",
            w.levels[*at].name(),
            w.levels[*at].index
        ))),
        (WalkEnd::Reserved { why, .. }, _) => Err(Error::Msg(format!("cannot access memory at {vaddr:#x}: {why}"))),
        _ => unreachable!(),
    }
}

/// Reads guest virtual memory, page by page.
pub fn read_virt(view: &dyn View, vaddr: u64, buf: &mut [u8]) -> Result<(), Error> {
    let mut done = 0usize;
    while done < buf.len() {
        let va = vaddr.wrapping_add(done as u64);
        let pa = translate(view, va)?;
        let in_page = (4096 - (va & 0xFFF)) as usize;
        let n = in_page.min(buf.len() - done);
        view.read_phys(pa, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}

/// Reads as much as is readable from `vaddr` (up to `len`), stopping at
/// the first unmapped page; returns the bytes and the error that stopped it.
pub fn read_virt_partial(view: &dyn View, vaddr: u64, len: usize) -> (Vec<u8>, Option<Error>) {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let va = vaddr.wrapping_add(out.len() as u64);
        let n = ((4096 - (va & 0xFFF)) as usize).min(len - out.len());
        let mut b = vec![0u8; n];
        let r = translate(view, va).and_then(|pa| view.read_phys(pa, &mut b));
        match r {
            Ok(()) => out.extend_from_slice(&b),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}
