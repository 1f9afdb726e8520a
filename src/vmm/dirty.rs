//! The dirty log: which pages and disk sectors changed, fanned out to
//! everyone who needs to know (checkpoints, a live migration, the memory
//! digest). KVM's log is read-and-clear, so only this type reads it.
//!
//! Each read write-protects the pages it reports, so a page the guest
//! rewrites every interval takes a write fault every interval (under nested
//! shadow paging, ~20 µs each: most of a checkpoint's cost). Where KVM has
//! manual protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), reading does not
//! protect; this type then re-protects (KVM_CLEAR_DIRTY_LOG) only what it
//! read, except pages that were dirty again at the very next read: those
//! stay writable, and so stay reported dirty at every read (every consumer
//! treats them as changed, which is safe: a checkpoint copies them again).
//! Every [`COOL`] reads, and while a migration tracks changes, every page
//! is re-protected, so a page that went quiet leaves the hot set.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;

use super::machine::MachineError;

/// Pages and disk sectors the guest (or a device on its behalf) changed,
/// kept for each consumer: checkpoints always, a live migration while one
/// runs. KVM's dirty log is read-and-clear, so it is read here only and
/// fanned out; the migration thread calls [`DirtyLog::take_tracked`] while
/// the vCPU keeps running (KVM_GET_DIRTY_LOG is safe alongside KVM_RUN).
pub struct DirtyLog {
    vm: Arc<VmFd>,
    /// KVM leaves re-protection to us (see the module doc).
    manual: bool,
    /// The dirty-logged memory slots: (slot, first page, pages). One slot
    /// for all RAM, except while data watchpoints split it (`set_watches`).
    slots: Mutex<Vec<(u32, u64, u64)>>,
    sets: Mutex<DirtySets>,
}

#[derive(Default)]
struct DirtySets {
    ckpt_pages: BTreeSet<u64>,
    ckpt_sectors: BTreeSet<u64>,
    migration: Option<(BTreeSet<u64>, BTreeSet<u64>)>,
    /// Pages changed since the memory digest last looked (see `pagehash`).
    hash_pages: BTreeSet<u64>,
    /// Manual protection, per slot: the bits re-protected at the last read
    /// and the pages left writable (bitmaps like KVM's), and reads so far.
    cleared: Vec<Vec<u64>>,
    hot: Vec<Vec<u64>>,
    reads: u64,
}

/// With manual protection, every this many reads all hot pages are
/// re-protected (a page that went quiet stops being copied).
pub const COOL: u64 = 16;

vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, kvm_bindings::KVMIO, 0xc0, kvm_bindings::kvm_clear_dirty_log);

impl DirtyLog {
    /// A log over one dirty-logged slot (slot 0) holding all `pages` of RAM.
    /// `manual`: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is enabled on `vm`.
    pub(super) fn new(vm: Arc<VmFd>, pages: u64, manual: bool) -> DirtyLog {
        DirtyLog { vm, manual, slots: Mutex::new(vec![(0, 0, pages)]), sets: Mutex::default() }
    }

    /// Takes what KVM's bitmaps hold now (before a slot is re-created,
    /// which clears its bitmap).
    pub(super) fn sync_now(&self) -> Result<(), MachineError> {
        let mut s = self.sets.lock().unwrap();
        self.sync(&mut s)
    }

    /// The dirty-logged slots after the memory layout changed.
    pub(super) fn set_slots(&self, slots: Vec<(u32, u64, u64)>) {
        *self.slots.lock().unwrap() = slots;
        // New slots start all protected, with empty bitmaps.
        let mut s = self.sets.lock().unwrap();
        s.cleared.clear();
        s.hot.clear();
    }

    fn sync(&self, s: &mut DirtySets) -> Result<(), MachineError> {
        s.reads += 1;
        for (si, &(slot, first, pages)) in self.slots.lock().unwrap().iter().enumerate() {
            let bitmap = self
                .vm
                .get_dirty_log(slot, (pages * 4096) as usize)
                .map_err(|source| MachineError::Setup { op: "KVM_GET_DIRTY_LOG", source })?;
            if self.manual {
                self.reprotect(s, si, slot, pages, &bitmap)?;
            }
            for (i, word) in bitmap.iter().enumerate() {
                let mut w = *word;
                while w != 0 {
                    let page = first + i as u64 * 64 + w.trailing_zeros() as u64;
                    s.ckpt_pages.insert(page);
                    s.hash_pages.insert(page);
                    if let Some((p, _)) = &mut s.migration {
                        p.insert(page);
                    }
                    w &= w - 1;
                }
            }
        }
        Ok(())
    }

    /// Manual protection: re-protects what `bitmap` (slot number `si` of
    /// the slot list) reports, except the pages to leave writable.
    fn reprotect(&self, s: &mut DirtySets, si: usize, slot: u32, pages: u64, bitmap: &[u64]) -> Result<(), MachineError> {
        for v in [&mut s.cleared, &mut s.hot] {
            if v.len() <= si {
                v.resize(si + 1, Vec::new());
            }
            v[si].resize(bitmap.len(), 0);
        }
        let cool = s.reads.is_multiple_of(COOL) || s.migration.is_some();
        let mut clear = vec![0u64; bitmap.len()];
        for (i, &bits) in bitmap.iter().enumerate() {
            let (hot, cleared) = (s.hot[si][i], s.cleared[si][i]);
            // Dirty again right after being re-protected: leave it writable.
            let hot = if cool { 0 } else { hot | (bits & cleared & !hot) };
            clear[i] = bits & !hot;
            s.hot[si][i] = hot;
            s.cleared[si][i] = clear[i];
        }
        if clear.iter().all(|&w| w == 0) {
            return Ok(());
        }
        let arg = kvm_bindings::kvm_clear_dirty_log {
            slot,
            num_pages: pages as u32,
            first_page: 0,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 { dirty_bitmap: clear.as_mut_ptr().cast() },
        };
        // SAFETY: KVM reads `num_pages` bits from `dirty_bitmap`, which
        // points at `clear`: one bit per page of the slot, as KVM's own
        // bitmap for it (`bitmap` has that length); `arg` and `clear` live
        // across the call.
        let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&*self.vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
        if r < 0 {
            return Err(MachineError::Setup { op: "KVM_CLEAR_DIRTY_LOG", source: kvm_ioctls::Error::last() });
        }
        Ok(())
    }

    /// Device writes (DMA into RAM, sectors onto the disk): KVM does not see them.
    pub(super) fn note(&self, pages: &BTreeSet<u64>, sectors: &BTreeSet<u64>) {
        let mut s = self.sets.lock().unwrap();
        s.ckpt_pages.extend(pages);
        s.hash_pages.extend(pages);
        s.ckpt_sectors.extend(sectors);
        if let Some((p, d)) = &mut s.migration {
            p.extend(pages);
            d.extend(sectors);
        }
    }

    /// Pages the VMM wrote itself (boot, restoring a checkpoint or snapshot,
    /// receiving a migration): KVM's dirty log does not see those either.
    pub fn note_pages(&self, pages: impl IntoIterator<Item = u64>) {
        let mut s = self.sets.lock().unwrap();
        let s = &mut *s;
        for p in pages {
            s.ckpt_pages.insert(p);
            s.hash_pages.insert(p);
            if let Some((m, _)) = &mut s.migration {
                m.insert(p);
            }
        }
    }

    /// Pages changed since the last call (for the memory digest).
    pub(super) fn take_hash_pages(&self) -> Result<BTreeSet<u64>, MachineError> {
        let mut s = self.sets.lock().unwrap();
        self.sync(&mut s)?;
        Ok(std::mem::take(&mut s.hash_pages))
    }

    /// Everything changed since the last checkpoint.
    pub fn take_checkpoint(&self) -> Result<(Vec<u64>, Vec<u64>), MachineError> {
        let mut s = self.sets.lock().unwrap();
        self.sync(&mut s)?;
        let pages = std::mem::take(&mut s.ckpt_pages).into_iter().collect();
        let sectors = std::mem::take(&mut s.ckpt_sectors).into_iter().collect();
        Ok((pages, sectors))
    }

    /// What the next checkpoint would hold so far, without taking it (a
    /// migrating recording hands it to the destination's next checkpoint).
    pub fn checkpoint_pending(&self) -> Result<(Vec<u64>, Vec<u64>), MachineError> {
        let mut s = self.sets.lock().unwrap();
        self.sync(&mut s)?;
        Ok((s.ckpt_pages.iter().copied().collect(), s.ckpt_sectors.iter().copied().collect()))
    }

    /// Adds changes made elsewhere (the source of a migration) to the next checkpoint.
    pub fn seed_checkpoint(&self, pages: &[u64], sectors: &[u64]) {
        let mut s = self.sets.lock().unwrap();
        s.ckpt_pages.extend(pages);
        s.ckpt_sectors.extend(sectors);
    }

    /// Starts a migration's tracking: from now on every change is also kept for it.
    pub fn start_tracking(&self) -> Result<(), MachineError> {
        let mut s = self.sets.lock().unwrap();
        self.sync(&mut s)?;
        s.migration = Some(Default::default());
        Ok(())
    }

    /// Pages and sectors changed since the last call (or since tracking started).
    pub fn take_tracked(&self) -> Result<(Vec<u64>, Vec<u64>), MachineError> {
        let mut s = self.sets.lock().unwrap();
        self.sync(&mut s)?;
        let (p, d) = s.migration.get_or_insert_with(Default::default);
        Ok((std::mem::take(p).into_iter().collect(), std::mem::take(d).into_iter().collect()))
    }

    /// How many pages and sectors the next [`DirtyLog::take_tracked`] would return.
    pub fn peek_tracked(&self) -> Result<(u64, u64), MachineError> {
        let mut s = self.sets.lock().unwrap();
        self.sync(&mut s)?;
        Ok(s.migration.as_ref().map(|(p, d)| (p.len() as u64, d.len() as u64)).unwrap_or((0, 0)))
    }

    pub fn stop_tracking(&self) {
        self.sets.lock().unwrap().migration = None;
    }
}
