//! Periodic timer on IRQ 0. Its time base is the guest clock (ns since VM
//! start), so whoever owns time (live host or replay log) decides when it fires.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    pub period_us: u32,
    /// Guest-clock instant of the next tick; None when stopped.
    pub deadline_ns: Option<u64>,
    pub fired: u64,
}

impl Timer {
    pub fn program(&mut self, period_us: u32, now_ns: u64) {
        self.period_us = period_us;
        self.deadline_ns = (period_us != 0).then(|| now_ns + period_us as u64 * 1000);
    }

    /// Advances past `now_ns` after a tick; missed ticks coalesce into one.
    pub fn fire(&mut self, now_ns: u64) {
        self.fired += 1;
        if let Some(d) = self.deadline_ns {
            let period = self.period_us as u64 * 1000;
            let mut next = d + period;
            if next <= now_ns {
                next = now_ns + period;
            }
            self.deadline_ns = Some(next);
        }
    }

    pub fn due(&self, now_ns: u64) -> bool {
        matches!(self.deadline_ns, Some(d) if now_ns >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_and_coalescing() {
        let mut t = Timer::default();
        assert!(!t.due(u64::MAX));
        t.program(1000, 0);
        assert!(!t.due(999_999));
        assert!(t.due(1_000_000));
        t.fire(1_000_000);
        assert_eq!(t.deadline_ns, Some(2_000_000));
        t.fire(10_500_000); // late by many periods: one tick, next a period later
        assert_eq!(t.deadline_ns, Some(11_500_000));
        t.program(0, 0);
        assert!(!t.due(u64::MAX));
    }
}
