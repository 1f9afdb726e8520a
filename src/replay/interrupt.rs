//! Stopping a native-speed run between two exits: a front end's Ctrl-C
//! from another thread. Without a branch counter a point inside an exit
//! interval has no name, so the run is kicked out of KVM_RUN (the vCPU
//! thread's kick signal) and the session goes back to the exit boundary the
//! interval started at: the last exact point before the interrupt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::vmm::vcpu::Kicker;

/// One request to stop; shared by the front end's watcher thread (which
/// calls [`Interrupter::interrupt`]) and the replay host (which attaches
/// the running vCPU's kicker and sees the request at the kicked exit).
#[derive(Default)]
pub struct Interrupter {
    requested: AtomicBool,
    /// The vCPU thread's kicker while a run is on (none between runs: the
    /// request is then seen before the next run starts).
    kicker: Mutex<Option<Kicker>>,
}

impl Interrupter {
    /// Asks the run to stop; kicks the vCPU out of the guest if one runs.
    pub fn interrupt(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Some(k) = *self.kicker.lock().unwrap_or_else(|e| e.into_inner()) {
            k.kick();
        }
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    pub(crate) fn attach(&self, kicker: Option<Kicker>) {
        *self.kicker.lock().unwrap_or_else(|e| e.into_inner()) = kicker;
        // A request that came before the run started: the kick handler
        // sets immediate_exit, so the first KVM_RUN returns at once.
        if let (Some(k), true) = (kicker, self.requested()) {
            k.kick();
        }
    }
}
