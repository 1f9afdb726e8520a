//! The search engine's replay side: execution breakpoints reached at
//! native speed (`vmm::breakpoints` does the trapping), counted as
//! *arrivals*, so that any hit is a position that can be reached again
//! without a PMU: "after exit `e`, the `n`-th arrival at RIP `r`" is
//! deterministic in replay and is reached again by running free with one
//! breakpoint that counts (docs/debugging.md, "Breakpoints at native speed").
//!
//! An arrival is every instruction boundary at a watched RIP that the
//! execution reaches, whether the vCPU got there by running free (an `int3`
//! trap, or the boundary right after a guest-caused exit) or by stepping:
//! both report it as a precise poll, which [`Scan::at_poll`] counts. The
//! count restarts at every guest-caused exit.

use std::collections::{BTreeSet, HashMap};

use crate::clock::ExecPoint;
use crate::vmm::watch::DMA;

/// The key of a data watchpoint's changes: the watched range's physical
/// start with this bit set (breakpoint keys are RIPs, below it).
pub const WATCH: u64 = 1 << 63;

/// One hit: the `n`-th arrival at `key` after exit `point.exits`, where
/// `key` is a breakpoint's RIP, or `WATCH | start` for the `n`-th hit of a
/// watched range (the point is then just after the accessing instruction;
/// for a DMA hit, `n` is 0 and the point is the exit boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub point: ExecPoint,
    pub key: u64,
    pub n: u64,
    /// Register fingerprint at the hit.
    pub fp: u64,
    /// A change made by the block device's DMA at exit `point.exits`: the
    /// hit stands at that exit boundary (not counted as an arrival).
    pub dma: bool,
}

/// Whether an instruction always exits to the VMM (port I/O, `hlt`): it
/// ends its exit interval, so the debugger and the provenance tracer run to
/// that exit instead of single-stepping it (single-stepping across such an
/// exit in an exit-clock recording would see the delivery at RIP+len instead
/// of the recorded RIP).
pub fn exits_to_vmm(m: iced_x86::Mnemonic) -> bool {
    use iced_x86::Mnemonic::*;
    matches!(m, In | Out | Hlt | Insb | Insw | Insd | Outsb | Outsw | Outsd)
}

/// When a scan stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanStop {
    /// At the first hit (forward continue).
    First,
    /// At the `n`-th arrival at `rip` (a key) after exit `exits`.
    Nth { exits: u64, rip: u64, n: u64 },
    /// Never: only count (the run ends at its exit limit).
    Never,
}

/// Hit bookkeeping for a run with breakpoints (held by the replay host).
#[derive(Debug, Clone)]
pub struct Scan {
    pub sites: BTreeSet<u64>,
    pub stop: ScanStop,
    exits: u64,
    arrivals: HashMap<u64, u64>,
    /// Hits seen, oldest first (the last `keep` of them).
    pub hits: Vec<Hit>,
    keep: usize,
    /// Hits seen in all.
    pub total: u64,
}

impl Scan {
    /// A scan starting at exit boundary `exits` (or later inside its
    /// interval, having already seen `arrivals` there).
    pub fn new(sites: BTreeSet<u64>, stop: ScanStop, exits: u64, arrivals: &[(u64, u64)]) -> Scan {
        Scan {
            sites,
            stop,
            exits,
            arrivals: arrivals.iter().copied().collect(),
            hits: Vec::new(),
            keep: 1 << 16,
            total: 0,
        }
    }

    /// Keep only the last `n` hits (a reverse scan needs the last one).
    pub fn keep_last(mut self, n: usize) -> Scan {
        self.keep = n.max(1);
        self
    }

    /// Counts an arrival if `p` is at a site, and a change of a watched
    /// range (`watch`: its start); true when the scan must stop here.
    /// (`vmm::watch::DMA` set in `watch`: a DMA change at this exit boundary.)
    pub fn at_poll(&mut self, p: ExecPoint, fp: u64, watch: Option<u64>) -> bool {
        let w = watch.map(|a| self.count(p, fp, WATCH | (a & !DMA), a & DMA != 0)).unwrap_or(false);
        let b = self.count(p, fp, p.rip, false);
        w || b
    }

    fn count(&mut self, p: ExecPoint, fp: u64, key: u64, dma: bool) -> bool {
        if p.exits != self.exits {
            self.exits = p.exits;
            self.arrivals.clear();
        }
        if !self.sites.contains(&key) {
            return false;
        }
        let n = if dma {
            0
        } else {
            let n = self.arrivals.entry(key).or_insert(0);
            *n += 1;
            *n
        };
        let hit = Hit { point: p, key, n, fp, dma };
        self.total += 1;
        if self.hits.len() >= self.keep {
            self.hits.remove(0);
        }
        self.hits.push(hit);
        match self.stop {
            ScanStop::First => true,
            ScanStop::Nth { exits, rip, n } => !dma && p.exits == exits && key == rip && hit.n == n,
            ScanStop::Never => false,
        }
    }

    /// Watched ranges (physical start, length) among the keys.
    pub fn watches(&self) -> impl Iterator<Item = u64> + '_ {
        self.sites.iter().filter(|&&k| k & WATCH != 0).map(|&k| k & !WATCH)
    }

    /// Breakpoint sites among the keys.
    pub fn breakpoints(&self) -> BTreeSet<u64> {
        self.sites.iter().copied().filter(|&k| k & WATCH == 0).collect()
    }

    /// Arrivals counted so far in the current interval at `rip`.
    pub fn arrivals(&self, rip: u64) -> u64 {
        self.arrivals.get(&rip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(exits: u64, rip: u64) -> ExecPoint {
        ExecPoint { exits, branches: 0, rip }
    }

    #[test]
    fn arrivals_restart_at_every_exit() {
        let mut s = Scan::new([0x10, 0x20].into(), ScanStop::Never, 0, &[]);
        assert!(!s.at_poll(p(0, 0x10), 1, None));
        assert!(!s.at_poll(p(0, 0x30), 1, None));
        assert!(!s.at_poll(p(0, 0x10), 2, None));
        assert!(!s.at_poll(p(1, 0x10), 3, None));
        let ns: Vec<(u64, u64)> = s.hits.iter().map(|h| (h.point.exits, h.n)).collect();
        assert_eq!(ns, [(0, 1), (0, 2), (1, 1)]);
        assert_eq!(s.total, 3);
    }

    #[test]
    fn stops_at_the_nth_arrival_of_its_interval() {
        let stop = ScanStop::Nth { exits: 2, rip: 0x10, n: 2 };
        let mut s = Scan::new([0x10].into(), stop, 2, &[(0x10, 0)]);
        assert!(!s.at_poll(p(2, 0x10), 0, None));
        assert!(s.at_poll(p(2, 0x10), 0, None));
        // A scan that starts after the first arrival continues its count.
        let mut s = Scan::new([0x10].into(), stop, 2, &[(0x10, 1)]);
        assert!(s.at_poll(p(2, 0x10), 0, None));
    }

    #[test]
    fn watch_changes_are_counted_apart_from_arrivals() {
        let mut s = Scan::new([0x10, WATCH | 0x2000].into(), ScanStop::Nth { exits: 0, rip: WATCH | 0x2000, n: 2 }, 0, &[]);
        assert!(!s.at_poll(p(0, 0x10), 0, Some(0x2000)));
        assert!(!s.at_poll(p(0, 0x20), 0, Some(0x3000)), "an unwatched range");
        assert!(s.at_poll(p(0, 0x30), 0, Some(0x2000)));
        let keys: Vec<(u64, u64)> = s.hits.iter().map(|h| (h.key, h.n)).collect();
        assert_eq!(keys, [(WATCH | 0x2000, 1), (0x10, 1), (WATCH | 0x2000, 2)]);
    }

    #[test]
    fn keeps_only_the_last_hits() {
        let mut s = Scan::new([0x10].into(), ScanStop::Never, 0, &[]).keep_last(2);
        for e in 0..5 {
            s.at_poll(p(e, 0x10), e, None);
        }
        assert_eq!(s.hits.iter().map(|h| h.point.exits).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(s.total, 5);
    }
}
