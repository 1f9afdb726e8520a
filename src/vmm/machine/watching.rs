//! Data watchpoints at native speed: watched pages get memory slots of
//! their own (read-only, or none for reads) and the VMM performs the
//! accesses that exit.

use std::collections::BTreeSet;

use kvm_bindings::kvm_userspace_memory_region;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::vmm::host::Host;
use crate::vmm::watch::{WatchSpec, Watches};
use crate::vmm::step::StepStop;
use super::*;

impl Machine {
    /// Data watchpoints at native speed (measured on kvm_pvm: a write to a
    /// page in a read-only memory slot exits as KVM_EXIT_MMIO, ~40 us, with
    /// RIP already past the writing instruction). Each page holding one of
    /// the physical `ranges` gets a read-only slot of its own; the run loop
    /// performs every write to it, keeps the dirty log right, and reports a
    /// change of a watched range as a precise poll (`PollCtx::watch`). The
    /// guest sees the same memory; the rest of RAM runs natively. Empty:
    /// one slot for all RAM again.
    pub fn set_watches(&mut self, ranges: Vec<(u64, u64)>) -> Result<(), MachineError> {
        self.set_watch_specs(ranges.into_iter().map(|(a, l)| WatchSpec::changes(a, l)).collect())
    }

    /// [`Machine::set_watches`] with reads and every write (`vmm::watch`):
    /// a page watched for reads gets no memory slot at all, so reads exit
    /// too (~43 us each); the run loop performs them from guest RAM.
    pub fn set_watch_specs(&mut self, specs: Vec<WatchSpec>) -> Result<(), MachineError> {
        let total = self.config.mem_size / 4096;
        let (ro, none) = Watches::layout(&specs, &self.watch.code, total);
        self.watch.specs = specs;
        self.watch.hit = None;
        if ro == self.watch.ro && none == self.watch.none {
            return Ok(());
        }
        // Re-creating a slot clears its dirty bitmap: take what it holds first.
        self.dirty.sync_now()?;
        let base = self.mem.iter().next().map(|r| r.as_ptr() as u64).unwrap_or(0);
        let region = |slot: u32, first: u64, n: u64, flags: u32| kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: first * 4096,
            memory_size: n * 4096,
            userspace_addr: base + first * 4096,
        };
        for &slot in &self.slot_ids {
            // SAFETY: deleting a slot (size 0) touches no memory.
            setup("KVM_SET_USER_MEMORY_REGION", unsafe { self.vm.set_user_memory_region(region(slot, 0, 0, 0)) })?;
        }
        let (mut ids, mut logged, mut at) = (Vec::new(), Vec::new(), 0u64);
        let mut add = |first: u64, n: u64, ro: bool| -> Result<(), MachineError> {
            let slot = ids.len() as u32;
            let flags = if ro { kvm_bindings::KVM_MEM_READONLY } else { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES };
            // SAFETY: the range lies inside the live mmap owned by `mem`,
            // which the Machine keeps for as long as the VM fd.
            setup("KVM_SET_USER_MEMORY_REGION", unsafe { self.vm.set_user_memory_region(region(slot, first, n, flags)) })?;
            if !ro {
                logged.push((slot, first, n));
            }
            ids.push(slot);
            Ok(())
        };
        for &p in ro.union(&none) {
            if p > at {
                add(at, p - at, false)?;
            }
            if ro.contains(&p) {
                add(p, 1, true)?;
            }
            at = p + 1;
        }
        if at < total {
            add(at, total - at, false)?;
        }
        self.dirty.set_slots(logged);
        self.slot_ids = ids;
        self.watch.ro = ro;
        self.watch.none = none;
        Ok(())
    }

    /// Accesses to watched pages the run loop performed so far.
    pub fn watched_accesses(&self) -> u64 {
        self.watch.accesses
    }

    /// The watched ranges' bytes now (before a write or DMA).
    pub(super) fn watched_bytes(watch: &Watches, mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
        watch
            .specs
            .iter()
            .map(|s| {
                let mut b = vec![0u8; s.len as usize];
                let _ = mem.read_slice(&mut b, GuestAddress(s.start));
                b
            })
            .collect()
    }

    /// A guest write to a watched page (it exited as MMIO): performed here.
    pub(super) fn watched_write(&mut self, addr: u64, data: &[u8]) -> Result<(), MachineError> {
        let before = if self.watch.wants_before() {
            Self::watched_bytes(&self.watch, &self.mem)
        } else {
            vec![Vec::new(); self.watch.specs.len()]
        };
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| MachineError::MemoryAccess { what: "performing a watched write", source: e.into() })?;
        let pages = (addr >> 12..=(addr + data.len().max(1) as u64 - 1) >> 12).collect();
        self.dirty.note(&pages, &BTreeSet::new());
        let mem = &self.mem;
        self.watch.on_write(addr, data.len() as u64, &before, |a, l| {
            let mut b = vec![0u8; l as usize];
            let _ = mem.read_slice(&mut b, GuestAddress(a));
            b
        });
        self.watch.accesses += 1;
        // KVM finishes the access on the next entry (as for an IN).
        self.io_pending = true;
        Ok(())
    }

    /// A guest read of a page watched for reads (no slot: it exited as
    /// MMIO and the data was filled in from guest RAM).
    pub(super) fn watched_read(&mut self, addr: u64, n: usize) {
        self.watch.on_read(addr, n as u64);
        self.watch.accesses += 1;
        self.io_pending = true;
    }

    /// After the VMM performed a watched access: where the boundary after
    /// it is reported.
    pub(super) fn after_watched_access(&mut self, write: bool, stepping: bool, host: &mut dyn Host) -> Result<(), MachineError> {
        if stepping && write {
            // KVM emulated the write with RIP already past it and drops the
            // single-step trap of an instruction that needed an MMIO write
            // (as for OUT): this exit is the step's boundary.
            if let Some(b) = self.stepper.on_other_exit(&self.vcpu, &self.mem)? {
                self.complete_pending_io()?;
                self.at_boundary(StepStop::Boundary(b), host)?;
            }
        } else if !stepping && self.watch.hit.is_some() {
            // Free-running: the boundary after the access is here.
            self.complete_pending_io()?;
            let mut ctx = self.precise_ctx(None)?;
            ctx.guest_caused = false;
            self.poll_and_deliver(&ctx, host)?;
        }
        // Stepping through a read: the step's own boundary reports it.
        Ok(())
    }
}
