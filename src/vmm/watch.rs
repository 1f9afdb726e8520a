//! Data watchpoints at native speed: which guest-physical ranges are
//! watched, for what, and which accesses the run loop reports as hits.
//!
//! Measured on kvm_pvm: a guest write to a page in a read-only memory slot
//! exits as `KVM_EXIT_MMIO` (~40 us) with RIP already past the instruction;
//! with no memory slot at all, reads exit too (~43 us). So a range watched
//! for writes only puts its page in a read-only slot, one watched for reads
//! leaves its page without a slot; the run loop (`Machine`) performs every
//! access to such a page on guest RAM and asks [`Watches`] whether it hits.
//! An instruction fetch from a page without a slot cannot be emulated: the
//! run loop reports it as [`crate::vmm::MachineError::WatchedCode`] and the
//! caller falls back to stepping (never a silent miss).

use std::collections::BTreeSet;

/// Marks a hit made by the block device's DMA (the VMM wrote guest memory
/// at a guest-caused exit, no instruction of the guest did): the hit
/// stands at that exit's boundary. Physical addresses stay below it.
pub const DMA: u64 = 1 << 62;

/// Which writes to a watched range are hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteReport {
    /// None (a read watchpoint).
    Never,
    /// Writes that change the range's bytes (gdb's `watch`: gdb watches values).
    Change,
    /// Every write that overlaps the range (`awatch`, `history`).
    Any,
}

/// One watched guest-physical range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchSpec {
    pub start: u64,
    pub len: u64,
    /// Reads that overlap the range are hits (the page then has no slot).
    pub reads: bool,
    pub writes: WriteReport,
}

impl WatchSpec {
    /// A write watchpoint in gdb's sense: changes of the bytes.
    pub fn changes(start: u64, len: u64) -> WatchSpec {
        WatchSpec {
            start,
            len,
            reads: false,
            writes: WriteReport::Change,
        }
    }

    fn overlaps(&self, addr: u64, n: u64) -> bool {
        addr < self.start + self.len && self.start < addr + n.max(1)
    }

    fn pages(&self) -> impl Iterator<Item = u64> {
        (self.start >> 12)..=((self.start + self.len.max(1) - 1) >> 12)
    }
}

/// The watched ranges, the pages held read-only or slot-less for them, and
/// a hit not yet reported.
#[derive(Debug, Default)]
pub struct Watches {
    pub specs: Vec<WatchSpec>,
    /// Pages in a read-only slot of their own (writes exit).
    pub ro: BTreeSet<u64>,
    /// Pages without a slot (reads and writes exit).
    pub none: BTreeSet<u64>,
    /// Pages that held a native breakpoint site: read-only too, so a guest
    /// write over a site is performed by the run loop, between runs, while
    /// the `int3` is out (the next run patches the new code). Kept for the
    /// machine's life (a later write there only costs an exit).
    pub code: BTreeSet<u64>,
    /// The start of the range hit since the last precise poll (with [`DMA`]
    /// set for a DMA hit).
    pub hit: Option<u64>,
    /// Accesses performed by the run loop (MMIO exits on watched pages).
    pub accesses: u64,
}

impl Watches {
    /// The pages each kind of slot needs for `specs` and the breakpoint
    /// `code` pages, below page `total`: (read-only, none). (A code page
    /// watched for reads has no slot: running it is `WatchedCode`.)
    pub fn layout(
        specs: &[WatchSpec],
        code: &BTreeSet<u64>,
        total: u64,
    ) -> (BTreeSet<u64>, BTreeSet<u64>) {
        let none: BTreeSet<u64> = specs
            .iter()
            .filter(|s| s.reads)
            .flat_map(|s| s.pages())
            .filter(|&p| p < total)
            .collect();
        let ro = specs
            .iter()
            .flat_map(|s| s.pages())
            .chain(code.iter().copied())
            .filter(|&p| p < total && !none.contains(&p))
            .collect();
        (ro, none)
    }

    /// Whether `addr` lies on a page the run loop must emulate accesses to.
    pub fn watched_page(&self, addr: u64) -> bool {
        let p = addr >> 12;
        self.ro.contains(&p) || self.none.contains(&p)
    }

    /// A guest write of `n` bytes at `addr`; `before` holds each range's
    /// bytes before it, `now` reads them after. Notes the first hit.
    pub fn on_write(
        &mut self,
        addr: u64,
        n: u64,
        before: &[Vec<u8>],
        now: impl Fn(u64, u64) -> Vec<u8>,
    ) {
        if self.hit.is_some() {
            return;
        }
        self.hit = self
            .specs
            .iter()
            .zip(before)
            .find(|(s, b)| match s.writes {
                WriteReport::Never => false,
                WriteReport::Change => now(s.start, s.len) != **b,
                WriteReport::Any => s.overlaps(addr, n),
            })
            .map(|(s, _)| s.start);
    }

    /// A guest read of `n` bytes at `addr`.
    pub fn on_read(&mut self, addr: u64, n: u64) {
        if self.hit.is_none() {
            self.hit = self
                .specs
                .iter()
                .find(|s| s.reads && s.overlaps(addr, n))
                .map(|s| s.start);
        }
    }

    /// A DMA write of `n` bytes at `addr` by the block device.
    pub fn on_dma(
        &mut self,
        addr: u64,
        n: u64,
        before: &[Vec<u8>],
        now: impl Fn(u64, u64) -> Vec<u8>,
    ) {
        let hit = self.specs.iter().zip(before).find(|(s, b)| match s.writes {
            WriteReport::Never => false,
            WriteReport::Change => now(s.start, s.len) != **b,
            WriteReport::Any => s.overlaps(addr, n),
        });
        if let Some((s, _)) = hit {
            self.hit = Some(DMA | s.start);
        }
    }

    /// Whether writes need the bytes before them (a `Change` range).
    pub fn wants_before(&self) -> bool {
        self.specs.iter().any(|s| s.writes == WriteReport::Change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_gives_read_watches_no_slot() {
        let specs = [
            WatchSpec::changes(0x1008, 8),
            WatchSpec {
                start: 0x3ffc,
                len: 8,
                reads: true,
                writes: WriteReport::Any,
            },
            WatchSpec::changes(0x3000, 4),
        ];
        let (ro, none) = Watches::layout(&specs, &[9, 4].into(), 16);
        assert_eq!(ro.into_iter().collect::<Vec<_>>(), [1, 9]);
        assert_eq!(none.into_iter().collect::<Vec<_>>(), [3, 4]);
    }

    #[test]
    fn hits_follow_the_report_kind() {
        let mut w = Watches {
            specs: vec![
                WatchSpec::changes(0x100, 8),
                WatchSpec {
                    start: 0x200,
                    len: 8,
                    reads: true,
                    writes: WriteReport::Never,
                },
            ],
            ..Default::default()
        };
        let before = vec![vec![0u8; 8], vec![0u8; 8]];
        // Same bytes written again: not a change.
        w.on_write(0x100, 8, &before, |_, l| vec![0; l as usize]);
        assert_eq!(w.hit, None);
        w.on_write(0x104, 1, &before, |a, l| {
            if a == 0x100 {
                vec![1; l as usize]
            } else {
                vec![0; l as usize]
            }
        });
        assert_eq!(w.hit.take(), Some(0x100));
        w.on_read(0x100, 8);
        assert_eq!(w.hit, None, "a write watch ignores reads");
        w.on_read(0x1ff, 2);
        assert_eq!(w.hit.take(), Some(0x200));
        w.specs[0].writes = WriteReport::Any;
        w.on_write(0x107, 4, &before, |_, l| vec![0; l as usize]);
        assert_eq!(w.hit.take(), Some(0x100), "any write overlapping");
        w.on_dma(0x0, 0x1000, &before, |_, l| vec![0; l as usize]);
        assert_eq!(w.hit.take(), Some(DMA | 0x100));
    }
}
