//! The dirty log: which pages and disk sectors changed, fanned out to
//! everyone who needs to know (checkpoints, a live migration, the memory
//! digest). KVM's log is read-and-clear, so only this type reads it.

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
}

impl DirtyLog {
    /// A log over one dirty-logged slot (slot 0) holding all `pages` of RAM.
    pub(super) fn new(vm: Arc<VmFd>, pages: u64) -> DirtyLog {
        DirtyLog { vm, slots: Mutex::new(vec![(0, 0, pages)]), sets: Mutex::default() }
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
    }

    fn sync(&self, s: &mut DirtySets) -> Result<(), MachineError> {
        for &(slot, first, pages) in self.slots.lock().unwrap().iter() {
            let bitmap = self
                .vm
                .get_dirty_log(slot, (pages * 4096) as usize)
                .map_err(|source| MachineError::Setup { op: "KVM_GET_DIRTY_LOG", source })?;
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
