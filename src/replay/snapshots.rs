//! In-memory session snapshots (as rr keeps checkpoints while debugging):
//! full machine states taken at positions the session passes through when
//! it goes back, so the next move back restores the nearest one in the
//! same VM instead of rebuilding a VM from a recording checkpoint and
//! replaying up to thousands of exits.
//!
//! Guest RAM is kept page by page and shared between snapshots: the first
//! snapshot after a VM is built copies the pages that hold data (the
//! machine's page digest knows them; all-zero pages share one copy); later ones copy only the pages KVM's dirty log (plus the block
//! device's DMA notes) reports changed since the snapshot or restore the
//! machine's memory last equalled (the *base*). Restoring writes only the
//! pages dirtied since the base plus those where the base and the target
//! snapshot differ. See docs/debugging.md ("Snapshots").
//!
//! The replay's private disk copy is kept the same way, in 4 KiB chunks
//! (the block device's written sectors tell what changed); disks over 64 MiB
//! turn snapshots off (every move back restores a recording checkpoint).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::replay::{ReplayHost, Sink, Timeline};
use crate::trace::state::Sealed;
use crate::vmm::MachineError;

const PAGE: usize = 4096;
const SECTOR: u64 = 512;
/// Sectors per disk chunk (a chunk is a `Page` of the disk image).
const CHUNK: u64 = PAGE as u64 / SECTOR;
/// Larger disks: no snapshots.
pub const MAX_DISK_BYTES: u64 = 64 << 20;

/// One page of guest RAM (or 4 KiB of disk) held by snapshots; counts its
/// bytes in `live`.
pub struct Page {
    data: Box<[u8]>,
    live: Arc<AtomicI64>,
}

impl Drop for Page {
    fn drop(&mut self) {
        self.live
            .fetch_sub(self.data.len() as i64, Ordering::Relaxed);
    }
}

type Pages = Arc<Vec<Arc<Page>>>;

/// Guest RAM and the disk, as shared pages.
#[derive(Clone)]
struct Image {
    mem: Pages,
    disk: Pages,
}

/// A position in the session's terms: exit boundary, then (optionally)
/// the n-th arrival at a RIP, then single steps (`session::Pos`).
pub type At = (u64, Option<(u64, u64)>, u64);

/// Whether the session can get from `a` to `t` by running forward (the
/// arrivals at an anchor's RIP are counted from the exit boundary, so an
/// anchored position leads on only to later arrivals at the same RIP).
pub fn leads_to(a: At, t: At) -> bool {
    if a.0 != t.0 {
        return a.0 < t.0;
    }
    match (a.1, t.1) {
        _ if a.1.is_none() && a.2 == 0 => true,
        (x, y) if x == y => a.2 <= t.2,
        (Some((r, m)), Some((q, n))) => r == q && m < n && a.2 == 0,
        _ => false,
    }
}

/// Order among positions that lead to the same target: later is better.
pub fn rank(a: At) -> (u64, u64, u64) {
    (a.0, a.1.map_or(0, |(_, n)| n), a.2)
}

pub struct Snap {
    pub at: At,
    pub pos: super::session::Pos,
    /// The machine state in the versioned container (`trace::state`).
    state: Sealed,
    image: Image,
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
    /// The pages the machine's RAM and disk equal, except for pages dirtied
    /// since (None: unknown, e.g. right after a VM was built from a checkpoint).
    base: Option<Image>,
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
        let live = Arc::new(AtomicI64::new(PAGE as i64));
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

    /// Bytes held: guest pages and disk chunks (shared ones once) plus each
    /// snapshot's page tables.
    pub fn bytes(&self) -> u64 {
        let pages = self.live.load(Ordering::Relaxed).max(0) as u64;
        let tables: usize = self
            .list
            .iter()
            .map(|s| (s.image.mem.len() + s.image.disk.len()) * std::mem::size_of::<usize>())
            .sum();
        pages + tables as u64
    }

    /// The machine was rebuilt (or its memory changed behind our back).
    pub fn forget_base(&mut self) {
        self.base = None;
    }

    /// The latest snapshot from which `at` can be reached.
    pub fn best(&self, at: At) -> Option<At> {
        self.list.iter().map(|s| s.at).filter(|&a| leads_to(a, at)).max_by_key(|&a| rank(a))
    }

    /// The positions snapshots are held at.
    pub fn ats(&self) -> impl Iterator<Item = At> + '_ {
        self.list.iter().map(|s| s.at)
    }

    pub fn has(&self, at: At) -> bool {
        self.list.iter().any(|s| s.at == at)
    }

    fn new_page(&self, data: &[u8]) -> Arc<Page> {
        self.live.fetch_add(data.len() as i64, Ordering::Relaxed);
        Arc::new(Page {
            data: data.into(),
            live: self.live.clone(),
        })
    }

    /// `n` units as shared pages: from `base` with the `dirty` units read
    /// again, or (no base) all read. `read(i)` gives unit `i`'s bytes.
    fn capture(
        &mut self,
        base: Option<&Pages>,
        dirty: &BTreeSet<u64>,
        n: usize,
        mut read: impl FnMut(usize) -> Result<Vec<u8>, MachineError>,
    ) -> Result<Pages, MachineError> {
        let mut one = |this: &mut Snapshots, i: usize| -> Result<Arc<Page>, MachineError> {
            let buf = read(i)?;
            if buf.len() == PAGE && buf.iter().all(|&b| b == 0) {
                return Ok(this.zero.clone());
            }
            this.stats.pages_copied += 1;
            Ok(this.new_page(&buf))
        };
        let v = match base {
            Some(base) if base.len() == n => {
                let mut v: Vec<Arc<Page>> = base.as_ref().clone();
                for &i in dirty.iter().filter(|&&i| (i as usize) < n) {
                    v[i as usize] = one(self, i as usize)?;
                }
                v
            }
            _ => (0..n).map(|i| one(self, i)).collect::<Result<_, _>>()?,
        };
        Ok(Arc::new(v))
    }

    /// Units to write so that storage now holding `base` + `dirty` holds `target`.
    fn to_write(base: Option<&Pages>, target: &Pages, dirty: &BTreeSet<u64>) -> Vec<usize> {
        match base {
            Some(base) if base.len() == target.len() => (0..target.len())
                .filter(|&i| dirty.contains(&(i as u64)) || !Arc::ptr_eq(&base[i], &target[i]))
                .collect(),
            _ => (0..target.len()).collect(),
        }
    }

    /// Guest pages and disk chunks changed since the last drain.
    fn drain(m: &mut crate::vmm::Machine) -> Result<(BTreeSet<u64>, BTreeSet<u64>), MachineError> {
        let (pages, sectors) = m.take_dirty()?;
        Ok((
            pages.into_iter().collect(),
            sectors.into_iter().map(|s| s / CHUNK).collect(),
        ))
    }

    /// Takes a snapshot of the timeline as it stands, at session position
    /// `pos` (which must be right after a run: no pending I/O).
    pub fn take(
        &mut self,
        tl: &mut Timeline,
        pos: super::session::Pos,
    ) -> Result<(), MachineError> {
        let at = pos.at();
        if !self.enabled || pos.end || self.has(at) {
            return Ok(());
        }
        let m = &mut tl.machine;
        // Drain the dirty log first: it then tells what changes after this snapshot.
        let (mut dirty_mem, dirty_disk) = Self::drain(m)?;
        let base = self.base.clone();
        let mem_pages = (m.config.mem_size as usize) / PAGE;
        // No base (a VM just built): RAM is zero but for the frames the
        // page digest knows hold data, so only those are read (reading
        // all of it faults in every untouched page: ~40 ms for 64 MiB).
        let zeros = match &base {
            Some(_) => None,
            None => {
                dirty_mem.extend(m.nonzero_pages()?);
                Some(Arc::new(vec![self.zero.clone(); mem_pages]))
            }
        };
        let mem_base = base.as_ref().map(|b| &b.mem).or(zeros.as_ref());
        let mem = &m.mem;
        let mem = self.capture(mem_base, &dirty_mem, mem_pages, |p| {
            let mut buf = vec![0u8; PAGE];
            mem.read_slice(&mut buf, GuestAddress((p * PAGE) as u64))
                .map_err(|e| MachineError::Memory(e.to_string()))?;
            Ok(buf)
        })?;
        let cap = m.devices.block.capacity();
        let block = &m.devices.block;
        let disk = self.capture(
            base.as_ref().map(|b| &b.disk),
            &dirty_disk,
            cap.div_ceil(CHUNK) as usize,
            |c| {
                let first = c as u64 * CHUNK;
                block
                    .read_sectors(first, CHUNK.min(cap - first))
                    .map_err(|e| {
                        MachineError::State(format!("reading the disk for a snapshot: {e}"))
                    })
            },
        )?;
        let image = Image { mem, disk };
        let state = Sealed::of(&m.save_state(tl.host.clock_ns())?);
        self.tick += 1;
        self.list.push(Snap {
            at,
            pos,
            state,
            image: image.clone(),
            next_event: tl.host.next,
            output_len: tl.host.output_len,
            clock_ns: tl.host.clock_ns(),
            used: self.tick,
        });
        self.base = Some(image);
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
        let (dirty_mem, dirty_disk) = Self::drain(m)?;
        let mut written = 0u64;
        for p in Self::to_write(self.base.as_ref().map(|b| &b.mem), &s.image.mem, &dirty_mem) {
            m.write_pages(p as u64, &s.image.mem[p].data)?;
            written += 1;
        }
        for c in Self::to_write(
            self.base.as_ref().map(|b| &b.disk),
            &s.image.disk,
            &dirty_disk,
        ) {
            m.devices
                .block
                .write_sectors(c as u64 * CHUNK, &s.image.disk[c].data)
                .map_err(|e| {
                    MachineError::State(format!("restoring the disk from a snapshot: {e}"))
                })?;
            written += 1;
        }
        // Sealed here a moment ago: an error would be a bug, said as one.
        let state = s.state.open().map_err(|e| MachineError::State(format!("a session snapshot's machine state: {e}")))?;
        m.load_state(&state)?;
        // A fresh stepper, as a VM built from a checkpoint has (the run
        // that brought us here left it disarmed).
        let stats = std::mem::take(&mut m.stepper.stats);
        m.stepper = crate::vmm::step::Stepper::new();
        m.stepper.stats = stats;
        let mut host = ReplayHost::new(tl.rec.clone(), s.next_event, s.output_len, Sink::Discard);
        host.set_clock(s.clock_ns);
        host.interrupt = tl.host.interrupt.take();
        tl.host = host;
        self.base = Some(s.image.clone());
        self.stats.restored += 1;
        self.stats.pages_written += written;
        Ok(s.pos)
    }
}
