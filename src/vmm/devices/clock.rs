//! The clock device: the guest reads time here instead of rdtsc, so every
//! reading passes through the VMM (and can be logged and replayed).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clock {
    pub latched_hi: u32,
}

impl Clock {
    /// A read of the low port: returns the low half and latches the high half.
    pub fn read_lo(&mut self, now_ns: u64) -> u32 {
        self.latched_hi = (now_ns >> 32) as u32;
        now_ns as u32
    }
    pub fn read_hi(&self) -> u32 {
        self.latched_hi
    }
}
