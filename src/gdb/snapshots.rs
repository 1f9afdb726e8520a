//! In-memory session snapshots (as rr keeps checkpoints while debugging):
//! full machine states taken at positions the session passes through when
//! it goes back, so the next move back restores the nearest one in the
//! same VM instead of rebuilding a VM from a recording checkpoint and
//! replaying up to thousands of exits.
//!
//! Guest RAM is kept page by page and shared between snapshots: the first
//! snapshot after a VM is built copies every page (all-zero pages share one
//! copy); later ones copy only the pages KVM's dirty log (plus the block
//! device's DMA notes) reports changed since the snapshot or restore the
//! machine's memory last equalled (the *base*). Restoring writes only the
//! pages dirtied since the base plus those where the base and the target
//! snapshot differ. See docs/debugging.md ("Snapshots").
//!
//! Recordings with a disk keep the old path (no snapshots): the disk copy
//! would need the same treatment.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::replay::{ReplayHost, Sink, Timeline};
use crate::vmm::{MachineError, MachineState};

const PAGE: usize = 4096;

/// One page of guest RAM held by snapshots; counts itself in `live`.
pub struct Page {
    data: Box<[u8]>,
    live: Arc<AtomicI64>,
}

impl Drop for Page {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

type Pages = Arc<Vec<Arc<Page>>>;

/// A position in the session's terms: exit boundary, then steps.
pub type At = (u64, u64);

pub struct Snap {
    pub at: At,
    pub pos: super::session::Pos,
    state: MachineState,
    pages: Pages,
    next_event: usize,
    output_len: u64,
    clock_ns: u64,
    used: u64,
}

/// Counters for `monitor stats`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SnapStats {
    pub taken: u64,
    pub restored: u64,
    pub evicted: u64,
    pub pages_copied: u64,
    pub pages_written: u64,
}

pub struct Snapshots {
    pub enabled: bool,
    list: Vec<Snap>,
    /// The pages the machine's RAM equals, except for pages dirtied since
    /// (None: unknown, e.g. right after a VM was built from a checkpoint).
    base: Option<Pages>,
    zero: Arc<Page>,
    live: Arc<AtomicI64>,
    pub max_snaps: usize,
    pub max_bytes: u64,
    tick: u64,
    pub stats: SnapStats,
}

impl Snapshots {
    /// `REVIRT_GDB_SNAPSHOT_MIB` sets the memory budget (default 512 MiB).
    pub fn new(enabled: bool) -> Snapshots {
        let live = Arc::new(AtomicI64::new(1));
        let zero = Arc::new(Page {
            data: vec![0u8; PAGE].into_boxed_slice(),
            live: live.clone(),
        });
        let max_mib: u64 = std::env::var("REVIRT_GDB_SNAPSHOT_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512);
        Snapshots {
            enabled,
            list: Vec::new(),
            base: None,
            zero,
            live,
            max_snaps: 64,
            max_bytes: max_mib << 20,
            tick: 0,
            stats: SnapStats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Bytes held: guest pages (shared pages once) plus each snapshot's page table.
    pub fn bytes(&self) -> u64 {
        let pages = self.live.load(Ordering::Relaxed).max(0) as u64 * PAGE as u64;
        let tables: usize = self
            .list
            .iter()
            .map(|s| s.pages.len() * std::mem::size_of::<usize>())
            .sum();
        pages + tables as u64
    }

    /// The machine was rebuilt (or its memory changed behind our back).
    pub fn forget_base(&mut self) {
        self.base = None;
    }

    /// The latest snapshot at or before `at`.
    pub fn best(&self, at: At) -> Option<At> {
        self.list.iter().map(|s| s.at).filter(|&a| a <= at).max()
    }

    pub fn has(&self, at: At) -> bool {
        self.list.iter().any(|s| s.at == at)
    }

    fn new_page(&self, data: &[u8]) -> Arc<Page> {
        self.live.fetch_add(1, Ordering::Relaxed);
        Arc::new(Page {
            data: data.into(),
            live: self.live.clone(),
        })
    }

    /// Takes a snapshot of the timeline as it stands, at session position
    /// `pos` (which must be right after a run: no pending I/O).
    pub fn take(
        &mut self,
        tl: &mut Timeline,
        pos: super::session::Pos,
    ) -> Result<(), MachineError> {
        let at = (pos.exits, pos.steps);
        if !self.enabled || pos.end || self.has(at) {
            return Ok(());
        }
        let m = &mut tl.machine;
        // Drain the dirty log first: it then tells what changes after this snapshot.
        let (dirty, _sectors) = m.take_dirty()?;
        let mut buf = vec![0u8; PAGE];
        let pages: Vec<Arc<Page>> = match &self.base {
            Some(base) => {
                let mut v: Vec<Arc<Page>> = base.as_ref().clone();
                for &p in &dirty {
                    let Some(slot) = v.get_mut(p as usize) else {
                        continue;
                    };
                    m.mem
                        .read_slice(&mut buf, GuestAddress(p * PAGE as u64))
                        .map_err(|e| MachineError::Memory(e.to_string()))?;
                    *slot = if buf.iter().all(|&b| b == 0) {
                        self.zero.clone()
                    } else {
                        self.new_page(&buf)
                    };
                    self.stats.pages_copied += 1;
                }
                v
            }
            None => {
                let n = (m.config.mem_size as usize) / PAGE;
                let mut v = Vec::with_capacity(n);
                for p in 0..n {
                    m.mem
                        .read_slice(&mut buf, GuestAddress((p * PAGE) as u64))
                        .map_err(|e| MachineError::Memory(e.to_string()))?;
                    if buf.iter().all(|&b| b == 0) {
                        v.push(self.zero.clone());
                    } else {
                        v.push(self.new_page(&buf));
                        self.stats.pages_copied += 1;
                    }
                }
                v
            }
        };
        let pages = Arc::new(pages);
        let state = m.save_state(tl.host.clock_ns())?;
        self.tick += 1;
        self.list.push(Snap {
            at,
            pos,
            state,
            pages: pages.clone(),
            next_event: tl.host.next,
            output_len: tl.host.output_len,
            clock_ns: tl.host.clock_ns(),
            used: self.tick,
        });
        self.base = Some(pages);
        self.stats.taken += 1;
        self.evict();
        Ok(())
    }

    /// Drops least recently used snapshots beyond the count or memory budget.
    fn evict(&mut self) {
        while self.list.len() > 1
            && (self.list.len() > self.max_snaps || self.bytes() > self.max_bytes)
        {
            let i = self
                .list
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.used)
                .map(|(i, _)| i)
                .unwrap();
            self.list.swap_remove(i);
            self.stats.evicted += 1;
        }
    }

    /// Puts the machine (in place: same VM) and the replay host into the
    /// state of the snapshot at `at`. Returns the session position there.
    pub fn restore(
        &mut self,
        tl: &mut Timeline,
        at: At,
    ) -> Result<super::session::Pos, MachineError> {
        let i = self
            .list
            .iter()
            .position(|s| s.at == at)
            .expect("restore a snapshot that exists");
        self.tick += 1;
        self.list[i].used = self.tick;
        let s = &self.list[i];
        let m = &mut tl.machine;
        if m.stepper.is_armed() {
            m.stepper
                .disarm(&m.vcpu)
                .map_err(|e| MachineError::State(e.to_string()))?;
        }
        let (dirty, _) = m.take_dirty()?;
        let write = |p: usize| -> Result<(), MachineError> {
            m.mem
                .write_slice(&s.pages[p].data, GuestAddress((p * PAGE) as u64))
                .map_err(|e| MachineError::Memory(e.to_string()))
        };
        let mut written = 0u64;
        match &self.base {
            Some(base) if base.len() == s.pages.len() => {
                let mut marks = vec![false; s.pages.len()];
                for &p in &dirty {
                    if let Some(f) = marks.get_mut(p as usize) {
                        *f = true;
                    }
                }
                for (p, mark) in marks.iter_mut().enumerate() {
                    if *mark || !Arc::ptr_eq(&base[p], &s.pages[p]) {
                        write(p)?;
                        written += 1;
                    }
                }
            }
            _ => {
                for p in 0..s.pages.len() {
                    write(p)?;
                    written += 1;
                }
            }
        }
        m.load_state(&s.state)?;
        // A fresh stepper, as a VM built from a checkpoint has (the run
        // that brought us here left it disarmed).
        let stats = std::mem::take(&mut m.stepper.stats);
        m.stepper = crate::clock::step::Stepper::new();
        m.stepper.stats = stats;
        let mut host = ReplayHost::new(tl.rec.clone(), s.next_event, s.output_len, Sink::Discard);
        host.set_clock(s.clock_ns);
        host.interrupt = tl.host.interrupt.take();
        tl.host = host;
        self.base = Some(s.pages.clone());
        self.stats.restored += 1;
        self.stats.pages_written += written;
        Ok(s.pos)
    }
}
