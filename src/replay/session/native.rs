//! Continue and reverse-continue at native speed (`replay::search`): the
//! guest runs free between breakpoint and watchpoint hits, counted per exit
//! interval; a hit is a position "n-th arrival at a RIP after exit e".

use super::*;
use crate::replay::search::Hit;
use crate::vmm::watch::{WatchSpec, WriteReport};

/// Whether a native run stopped because code runs on a page watched for reads.
pub(super) fn watched_code(e: &SessionError) -> bool {
    matches!(e, SessionError::Replay(ReplayError::Machine(crate::vmm::MachineError::WatchedCode { .. })))
}

/// The position of a native hit: the `n`-th arrival after its exit, or,
/// for a change the block device's DMA made, that exit's boundary.
fn hit_at(h: &Hit) -> At {
    if h.dma {
        (h.point.exits, None, 0)
    } else {
        (h.point.exits, Some((h.key, h.n)), 0)
    }
}

/// About how long a native `continue` runs before it looks for a Ctrl-C
/// from the client (it can only stop at an exit boundary).
const CONT_SLICE: std::time::Duration = std::time::Duration::from_millis(100);

impl Session {
    /// Whether continuing can run at native speed: breakpoints only (data
    /// watchpoints are still checked by stepping). `REVIRT_GDB_NATIVE=0`
    /// turns it off (the stepping path, kept as the oracle).
    pub(super) fn native_ok(&mut self) -> bool {
        if !self.native || (self.breakpoints.is_empty() && self.watches.is_empty()) {
            return false;
        }
        if self.patched_diverged && !self.breakpoints.is_empty() {
            return false;
        }
        // Ranges inside one page (memory slots watch whole pages), one
        // watchpoint per physical start; not after code was found on a
        // page watched for reads (then stepped).
        let mut phys = HashMap::new();
        for w in &self.watches {
            let (Some(pa), Some(last)) = (self.translate(w.addr), self.translate(w.addr + w.len - 1)) else { return false };
            if last != pa + w.len - 1 || pa >> 12 != last >> 12 || phys.contains_key(&pa) {
                return false;
            }
            if w.kind != WatchKind::Write && self.watched_code {
                return false;
            }
            phys.insert(pa, (w.len, w.addr, w.kind));
        }
        self.watch_phys.extend(phys);
        true
    }

    /// What a native scan counts: breakpoint RIPs and `WATCH | start` of
    /// every data watchpoint (physical, as set up by `native_ok`).
    pub(super) fn native_keys(&self) -> BTreeSet<u64> {
        let mut k = self.breakpoints.clone();
        for w in &self.watches {
            if let Some(pa) = self.translate(w.addr) {
                k.insert(WATCH | pa);
            }
        }
        k
    }

    /// The machine's watch for each `WATCH` key of a scan.
    pub(super) fn watch_specs(&self, scan: &Scan) -> Vec<WatchSpec> {
        scan.watches()
            .filter_map(|a| {
                self.watch_phys.get(&a).map(|&(len, _, kind)| match kind {
                    WatchKind::Write => WatchSpec::changes(a, len),
                    WatchKind::Read => WatchSpec { start: a, len, reads: true, writes: WriteReport::Never },
                    WatchKind::Access => WatchSpec { start: a, len, reads: true, writes: WriteReport::Any },
                })
            })
            .collect()
    }

    /// Runs a scan natively, with the data watchpoints its keys name.
    pub(super) fn run_scan(&mut self, scan: Scan, limit: Option<u64>) -> R<(Outcome, Scan)> {
        let specs = self.watch_specs(&scan);
        self.native_runs += 1;
        Ok(self.tl.run_scan_specs(scan, specs, limit)?)
    }

    /// The stop a hit of `key` means.
    pub(super) fn hit_why(&self, key: u64) -> StopWhy {
        if key & WATCH != 0 {
            let (addr, kind) = self
                .watch_phys
                .get(&(key & !WATCH))
                .map_or((key & !WATCH, WatchKind::Write), |&(_, va, kind)| (va, kind));
            StopWhy::Watch { addr, kind }
        } else {
            StopWhy::Breakpoint(key)
        }
    }

    /// A native run diverged with breakpoints patched in (see
    /// [`Session::patched_divergence`]): back to where the command started
    /// (the machine restored, not trusted), breakpoints stepped from now on.
    pub(super) fn after_patched_divergence(&mut self, here: Pos, why: String) -> R<()> {
        self.patched_diverged = true;
        let note = format!(
            "the replay diverged from the recording while breakpoints were patched in as int3 ({why}): \
             the guest reads its own code; breakpoints are single-stepped from now on (exact, slower)"
        );
        eprintln!("revirt: {note}");
        self.note = Some(note);
        self.pos.end = true; // forces a restore: the machine is not trusted
        self.end_note = None;
        self.goto(here)
    }

    /// Whether a native run failed in a way a patched `int3` read by the
    /// guest explains: a divergence while breakpoints were patched in.
    pub(super) fn patched_divergence(&self, e: &SessionError) -> Option<String> {
        match e {
            SessionError::Diverged(why) if !self.breakpoints.is_empty() && !self.patched_diverged => Some(why.clone()),
            _ => None,
        }
    }

    /// A native run found code on a page watched for reads: back to where
    /// the command started (the machine is restored, not trusted), and step.
    pub(super) fn after_watched_code(&mut self, here: Pos) -> R<()> {
        self.watched_code = true;
        self.pos.end = true; // forces a restore: the machine stopped mid-way
        self.goto(here)
    }

    /// The watch key (physical) of the watchpoint gdb set at `va`.
    pub(super) fn watch_key(&self, va: u64) -> Option<u64> {
        self.watch_phys.iter().find(|(_, &(_, v, _))| v == va).map(|(&pa, _)| WATCH | pa)
    }

    /// Forward to the next breakpoint hit, the guest running free between hits.
    pub(super) fn cont_native(&mut self) -> R<StopWhy> {
        let bps = self.native_keys();
        let arrivals = self.arrivals_here(&bps)?;
        let mut scan = Scan::new(bps.clone(), ScanStop::First, self.pos.exits, &arrivals);
        // In chunks of exits sized to take about CONT_SLICE each: between
        // them, at an exit boundary (an exact position), a Ctrl-C is noticed.
        let mut chunk = 1u64;
        let start = self.pos;
        loop {
            let t0 = std::time::Instant::now();
            let to = self.tl.exits().saturating_add(chunk);
            let (o, mut sc) = match self.kickable(|s| s.run_scan(scan, Some(to)))? {
                Ok(r) => r,
                Err(exits) => return self.after_kick(start, exits),
            };
            match o {
                Outcome::Reached => {}
                other => return self.ended(other),
            }
            if sc.hits.is_empty() {
                if self.tl.exits() != to {
                    return Err(SessionError::Lost(format!("a scan paused at exit {} before its limit {to} without a hit", self.tl.exits())));
                }
                self.refresh((to, None, 0))?;
                // The boundary the run paused at is an arrival if a site is there.
                let (p, fp) = (self.pos.point, self.pos.fp);
                sc.at_poll(p, fp, None);
            }
            scan = sc;
            if !scan.hits.is_empty() {
                break;
            }
            if self.interrupted() {
                return Ok(StopWhy::Interrupted);
            }
            chunk = if t0.elapsed() < CONT_SLICE / 2 { chunk.saturating_mul(2) } else if t0.elapsed() > CONT_SLICE * 2 { (chunk / 2).max(1) } else { chunk };
        }
        let hit = *scan.hits.last().expect("a scan stops at a hit");
        self.refresh(hit_at(&hit))?;
        let arr = bps.iter().map(|&b| (b, scan.arrivals(b))).collect();
        self.arrivals = Some((self.pos.at(), bps, arr));
        Ok(self.hit_why(hit.key))
    }

    /// Runs `f` so that a Ctrl-C can kick it out of the guest (see
    /// `replay::interrupt`): `Err(x)` when it was kicked inside the exit
    /// interval after exit `x` (then [`Session::after_kick`]).
    pub(super) fn kickable<T>(&mut self, f: impl FnOnce(&mut Self) -> R<T>) -> R<Result<T, u64>> {
        self.tl.set_kick(self.interrupter.clone());
        let r = f(self);
        self.tl.set_kick(None);
        match r {
            Err(SessionError::Replay(ReplayError::Interrupted { exits })) => Ok(Err(exits)),
            r => r.map(Ok),
        }
    }

    /// A native run was kicked at an unnamed point after exit `x`: back to
    /// the last exact point before it (that exit's boundary, or where the
    /// continue started if that lies in the same interval).
    pub(super) fn after_kick(&mut self, start: Pos, x: u64) -> R<StopWhy> {
        self.pos.end = true; // the machine is not at a named position
        self.arrivals = None;
        let to = if start.exits == x && !start.end { start.at() } else { (x, None, 0) };
        self.reach(to)?;
        let note = format!(
            "interrupted inside an exit-free stretch: stopped at exit {x}{}, the last exact point before the interrupt",
            if to.1.is_some() || to.2 > 0 { " (where the continue started)" } else { "" }
        );
        eprintln!("revirt: {note}");
        self.note = Some(note);
        Ok(StopWhy::Interrupted)
    }

    /// Arrivals at `bps` since the current exit boundary, up to here.
    pub(super) fn arrivals_here(&mut self, bps: &BTreeSet<u64>) -> R<Vec<(u64, u64)>> {
        let here = self.pos;
        if let Some((at, sites, arr)) = &self.arrivals {
            if *at == here.at() && bps.is_subset(sites) {
                return Ok(arr.iter().filter(|(b, _)| bps.contains(b)).copied().collect());
            }
        }
        if here.anchor.is_none() && here.steps == 0 {
            let rip = here.point.rip;
            return Ok(if bps.contains(&rip) { vec![(rip, 1)] } else { Vec::new() });
        }
        // Inside an interval, reached another way: count its start again.
        let (_, arr) = self.scan_native(here.exits, here, bps)?;
        Ok(arr)
    }

    /// Replays from exit boundary `x` to `until` with breakpoints at `bps`
    /// (native speed up to `until`'s anchor, then its single steps): every
    /// hit before `until` as (position, RIP), and the arrivals at `bps`
    /// counted in `until`'s interval up to it.
    #[allow(clippy::type_complexity)]
    pub(super) fn scan_native(&mut self, x: u64, until: Pos, bps: &BTreeSet<u64>) -> R<(Vec<(At, u64)>, Vec<(u64, u64)>)> {
        let mut sites = bps.clone();
        if let Some((r, _)) = until.anchor {
            sites.insert(r);
        }
        let mut hits: Vec<(At, Hit)> = Vec::new();
        self.goto_exit(x)?;
        let mut scan = self.boundary_scan(&sites, &mut hits);
        let e = until.exits;
        if until.end {
            // Up to the end of the recording: run until it stops.
            let (o, sc) = self.run_scan(scan, None)?;
            hits.extend(sc.hits.iter().map(|h| (hit_at(h), *h)));
            scan = sc;
            if o == Outcome::Reached {
                return Err(SessionError::Lost("a counting scan stopped before the end".into()));
            }
            self.ended(o)?;
        } else {
            // In chunks of 1, 2, 4, ... exits, with a snapshot at each chunk's
            // end: going to the hit afterwards starts close to it instead of
            // replaying the window again.
            let (mut at, mut chunk) = (x, 1u64);
            while at < e {
                let to = at.saturating_add(chunk).min(e);
                let (o, mut sc) = self.run_scan(scan, Some(to))?;
                if o != Outcome::Reached || self.tl.exits() != to {
                    self.ended(o)?;
                    return Err(SessionError::Lost(format!("the replay ended before reaching {}", until.point)));
                }
                hits.extend(sc.hits.drain(..).map(|h| (hit_at(&h), h)));
                self.refresh((to, None, 0))?;
                if to < e {
                    self.snap_here()?;
                }
                // The boundary the run paused at is an arrival if a site is there.
                let (p, fp) = (self.pos.point, self.pos.fp);
                sc.at_poll(p, fp, None);
                hits.extend(sc.hits.drain(..).map(|h| (hit_at(&h), h)));
                scan = sc;
                at = to;
                chunk = chunk.saturating_mul(2);
            }
        }
        if let Some((r, n)) = until.anchor.filter(|_| !until.end) {
            if scan.arrivals(r) < n {
                scan.stop = ScanStop::Nth { exits: e, rip: r, n };
                let (o, sc) = self.run_scan(scan, Some(e + 1))?;
                let p = self.tl.position()?;
                if o != Outcome::Reached || p.exits != e || sc.arrivals(r) != n {
                    return Err(SessionError::Lost(format!("replaying from exit {x} did not reach {}", until.point)));
                }
                hits.extend(sc.hits.iter().map(|h| (hit_at(h), *h)));
                scan = sc;
            }
            self.refresh((e, Some((r, n)), 0))?;
        }
        if !until.end {
            self.step_counting(until, &mut scan, &mut hits)?;
        }
        if !self.pos.same_state(&until) {
            return Err(SessionError::Lost(format!(
                "replaying from exit {x} arrived at {} (fp {:#x}), not at {} (fp {:#x})",
                self.pos.point, self.pos.fp, until.point, until.fp
            )));
        }
        // The position itself is not a breakpoint hit before it (gdb's semantics).
        // The arrival that is `until` itself: by its number where `until`
        // is a breakpoint arrival (an earlier pass of a loop may have the
        // same registers), else by its point and registers (at a watch
        // stop, also the arrival at its RIP there).
        let is_until = |h: &Hit| {
            h.point.exits == e
                && match until.anchor {
                    Some(a) if until.steps == 0 && a.0 & WATCH == 0 => (h.key, h.n) == a,
                    _ => h.point.rip == until.point.rip && h.fp == until.fp,
                }
        };
        let found = hits
            .into_iter()
            // A write that led to here is still behind us: going back, it is
            // undone first (its stop is the state before it).
            .filter(|(_, h)| bps.contains(&h.key) && (h.key & WATCH != 0 || !is_until(h)))
            .map(|(at, h)| (at, h.key))
            .collect();
        let arr = bps.iter().map(|&b| (b, scan.arrivals(b))).collect();
        Ok((found, arr))
    }

    /// The single steps of `until` (from its exit boundary or anchor),
    /// counting what each step hits: breakpoint arrivals, and accesses to
    /// the scan's watched ranges (reads as the instruction decodes, writes
    /// as changed bytes).
    fn step_counting(&mut self, until: Pos, scan: &mut Scan, hits: &mut Vec<(At, Hit)>) -> R<()> {
        let watched: Vec<(u64, u64)> = scan
            .watches()
            .filter_map(|a| self.watch_phys.get(&a).filter(|w| w.2 != WatchKind::Read).map(|&(l, _, _)| (a, l)))
            .collect();
        let e = until.exits;
        for _ in 0..until.steps {
            let before: Vec<Vec<u8>> = watched.iter().map(|&(a, l)| self.read_phys(a, l)).collect();
            // Reads (and any access) the instruction makes, as the machine reports them.
            let touched = self.touched().and_then(|(va, _)| self.watch_key(va)).filter(|k| scan.sites.contains(k));
            if self.step1()? != StopWhy::Step {
                return Err(SessionError::Lost(format!("the replay ended before reaching {}", until.point)));
            }
            let p = self.pos;
            if p.exits != e {
                return Err(SessionError::Lost(format!("stepping passed exit {e} before reaching {}", until.point)));
            }
            let changed = touched
                .map(|k| k & !WATCH)
                .or_else(|| watched.iter().zip(&before).find(|((a, l), b)| self.read_phys(*a, *l) != **b).map(|((a, _), _)| *a));
            let before_hits = scan.total;
            if scan.at_poll(p.point, p.fp, changed) {
                unreachable!("a counting scan never stops");
            }
            let new = (scan.total - before_hits) as usize;
            for h in &scan.hits[scan.hits.len() - new..] {
                hits.push((p.at(), *h));
            }
        }
        Ok(())
    }

    /// A counting scan that starts at the exit boundary the session stands
    /// on, which is itself an arrival when a site is there.
    pub(super) fn boundary_scan(&self, sites: &BTreeSet<u64>, hits: &mut Vec<(At, Hit)>) -> Scan {
        let (e, p, fp) = (self.pos.exits, self.pos.point, self.pos.fp);
        let mut first = Vec::new();
        if sites.contains(&p.rip) {
            first.push((p.rip, 1));
            hits.push(((e, Some((p.rip, 1)), 0), Hit { point: p, key: p.rip, n: 1, fp, dma: false }));
        }
        Scan::new(sites.clone(), ScanStop::Never, e, &first)
    }

    /// The latest exit boundary before `until` where a replay can start
    /// cheaply (a recording checkpoint or an in-memory snapshot).
    pub(super) fn window_start(&self, until: Pos) -> Option<u64> {
        let inside = until.anchor.is_some() || until.steps > 0 || until.end;
        let ok = |x: u64| x < until.exits || (inside && x == until.exits);
        let cks = self.rec.checkpoints.iter().map(|c| c.1);
        let snaps = self.snaps.ats().filter(|a| a.1.is_none() && a.2 == 0).map(|a| a.0);
        cks.chain(snaps).filter(|&x| ok(x)).max()
    }

    /// Back to the last breakpoint hit before here, the guest running free:
    /// from the latest checkpoint or snapshot before here, replay forward
    /// counting hits up to here; none: the window before that (rr's way).
    pub(super) fn reverse_cont_native(&mut self) -> R<StopWhy> {
        let bps = self.native_keys();
        let mut until = self.pos;
        loop {
            let Some(x) = self.window_start(until) else {
                self.goto_exit(0)?;
                return Ok(StopWhy::Begin);
            };
            let (hits, _) = self.scan_native(x, until, &bps)?;
            if let Some(&(at, key)) = hits.last() {
                self.reach(at)?;
                if key & WATCH != 0 {
                    // Just after the write: back over the writing instruction.
                    self.reverse_step()?;
                }
                return Ok(self.hit_why(key));
            }
            if x == 0 || self.interrupted() {
                self.goto_exit(x)?;
                return Ok(if x == 0 { StopWhy::Begin } else { StopWhy::Interrupted });
            }
            until = self.pos_at_exit(x)?;
        }
    }


    /// The boundary just before `here` found at native speed, when `here`
    /// is an exit boundary (the exiting instruction before it) or a data
    /// watchpoint's stop (the accessing instruction before it): the
    /// candidate instructions ending at here's RIP are decoded backwards,
    /// the last arrival at one of them before here is counted natively, and
    /// it must lead to here in one step (same RIP and register fingerprint;
    /// for a write, the watched bytes changed; for a read or access, the
    /// instruction touches the range). At a watch stop here's RIP is counted
    /// too, so no arrival there lies between the candidate and here: the
    /// step from it is the one to here; given `truth` (here's state hash),
    /// the whole state must be reproduced too. `None`: not such a position,
    /// or no candidate checked out (the caller single-steps the interval).
    pub(super) fn native_prev(&mut self, here: Pos, truth: Option<&str>) -> R<Option<Pos>> {
        if !self.native || here.end || here.steps > 0 {
            return Ok(None);
        }
        let kind = match here.anchor {
            None if here.exits > 0 => None,
            Some((k, _)) if k & WATCH != 0 => match self.watch_phys.get(&(k & !WATCH)) {
                Some(w) => Some(w.2),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        let e0 = if kind.is_some() { here.exits } else { here.exits - 1 };
        let r = here.point.rip;
        for w in self.ending_at(r, kind) {
            // A wrong candidate (bytes inside another instruction) patched
            // with int3 changes what runs: that run fails or ends elsewhere,
            // and the machine is restored before the next try.
            let sites = if kind.is_some() { [w, r].into() } else { [w].into() };
            let Ok((hits, _)) = self.scan_native(e0, here, &sites) else {
                self.pos.end = true;
                continue;
            };
            let Some(&(at, k)) = hits.iter().rev().find(|(at, _)| at.0 == e0) else { continue };
            if k != w || at.2 != 0 {
                continue;
            }
            self.reach(at)?;
            let p = self.pos;
            let old = self.watched_bytes();
            let touches = self.touched().is_some();
            if self.step1()? != StopWhy::Step || !self.pos.same_state(&here) {
                continue;
            }
            match kind {
                Some(WatchKind::Write) if self.changed(&old, &self.watched_bytes()).is_none() => continue,
                Some(WatchKind::Read | WatchKind::Access) if !touches => continue,
                _ => {}
            }
            // A candidate from inside another instruction that changed only memory.
            if !self.reproduces(truth)? {
                continue;
            }
            return Ok(Some(p));
        }
        Ok(None)
    }

    /// Instructions that end at `rip` (decoded backwards, longest first, at most 4): ones
    /// that exit to the VMM, or (`watch`) ones that fall through and make
    /// that kind of access to a watched range (addresses from the registers
    /// now). Bytes decoded from inside another instruction may pass too: the caller checks.
    fn ending_at(&self, rip: u64, watch: Option<WatchKind>) -> Vec<u64> {
        use iced_x86::{Decoder, DecoderOptions, FlowControl};
        let mut code = [0u8; 15];
        let start = rip.saturating_sub(15);
        if self.read_virt(start, &mut code) < 15 {
            return Vec::new();
        }
        // Longest first: a shorter one is often the tail of the real one.
        (1..=15u64)
            .rev()
            .filter_map(|k| {
                let at = rip - k;
                let ins = Decoder::with_ip(64, &code[(15 - k) as usize..], at, DecoderOptions::NONE).decode();
                if ins.is_invalid() || ins.len() as u64 != k {
                    return None;
                }
                let ok = if let Some(kind) = watch {
                    let makes = |reads: bool, writes: bool| match kind {
                        WatchKind::Write => writes,
                        WatchKind::Read => reads,
                        WatchKind::Access => reads || writes,
                    };
                    ins.flow_control() == FlowControl::Next
                        && self.mem_ops(&ins).iter().any(|&(a, n, reads, writes)| {
                            makes(reads, writes) && self.watches.iter().any(|w| w.kind == kind && a < w.addr + w.len && w.addr < a + n)
                        })
                } else {
                    crate::replay::search::exits_to_vmm(ins.mnemonic())
                };
                ok.then_some(at)
            })
            .take(4)
            .collect()
    }
}
