//! Going backward by single-stepping: reverse-stepi (counting the previous
//! interval once), and reverse-continue by stepping through windows of exits
//! growing backwards (the oracle; the native path is in `native`).

use super::*;
use super::native::watched_code;
use super::prev::Prev;

impl Session {

    /// Scans forward from exit boundary `from` up to `until` (a position
    /// with a later or equal exit count), calling `visit(pos, hit)` for
    /// each boundary before `until`, where `hit` says whether the step
    /// from it hit something. Returns the number of steps taken; `None`
    /// when interrupted or after `budget` steps.
    pub(super) fn scan(
        &mut self,
        from: At,
        until: Pos,
        snap_every: u64,
        budget: u64,
        mut visit: impl FnMut(Pos, Option<StopWhy>),
    ) -> R<Option<u64>> {
        self.reach(from)?;
        let mut k = 0u64;
        let mut old = self.watched_bytes();
        loop {
            if self.pos.same_state(&until) && self.pos.end == until.end
            {
                return Ok(Some(k));
            }
            if !until.end && (self.pos.exits > until.exits || self.pos.end) {
                return Err(SessionError::Lost(format!(
                    "replaying forward from {from:?} passed {} without reaching it (now at {})",
                    until.point, self.pos.point
                )));
            }
            if k >= budget || (k > 0 && k.is_multiple_of(POLL_EVERY) && self.interrupted()) {
                return Ok(None);
            }
            let at = self.pos;
            let rip = at.point.rip;
            let touched = self.touched();
            let why = self.step1()?;
            let mut hit = touched.map(|(addr, kind)| StopWhy::Watch { addr, kind });
            if self.breakpoints.contains(&rip) {
                hit = Some(StopWhy::Breakpoint(rip));
            }
            if !self.watches.is_empty() {
                let new = self.watched_bytes();
                if let Some((addr, kind)) = self.changed(&old, &new) {
                    hit = Some(StopWhy::Watch { addr, kind });
                }
                old = new;
            }
            visit(at, hit);
            k += 1;
            if why == StopWhy::End && !until.end {
                return Err(SessionError::Lost(format!(
                    "the replay ended before reaching {}",
                    until.point
                )));
            }
            if snap_every > 0 && k.is_multiple_of(snap_every) && !self.pos.end {
                self.snap_here()?;
            }
        }
    }

    /// The boundary just before the current one.
    pub fn reverse_step(&mut self) -> R<StopWhy> {
        let here = self.pos;
        if here.exits == 0 && here.anchor.is_none() && here.steps == 0 && !here.end {
            return Ok(StopWhy::Begin);
        }
        let old_watch = self.watched_bytes();
        if here.steps > 0 && !here.end {
            // Inside an exit interval: the same exit boundary, one step fewer
            // (no exit can lie in between: an exiting instruction ends its interval).
            let k = here.steps - 1;
            if self.reach((here.exits, here.anchor, k))? != StopWhy::Step || self.pos.end {
                return Err(SessionError::Lost(format!(
                    "could not step back to exit {} + {k} steps",
                    here.exits
                )));
            }
        } else if let Some(prev) = self
            .prev_boundary
            .get(&here.at())
            .copied()
            .filter(|_| !here.end)
        {
            // Counted before: go straight there.
            self.goto(prev)?;
        } else {
            // Guessed from the code and stack here, before anything moves the machine.
            let guesses = if here.end || !self.native { Vec::new() } else { self.predecessor_guesses(here.point.rip) };
            // Here's full state: a position found through a guess must
            // reproduce it, memory included (a wrong guess patched inside an
            // instruction could change only memory).
            let truth = if here.end || !self.native { None } else { Some(self.tl.state_hash()?) };
            // Found at native speed: the instruction that made the exit, or
            // the write, that led here; else the cheapest other way.
            let found = match self.native_prev(here, truth.as_deref())? {
                Some(p) => Some(p),
                None => self.prev_of(here, guesses, truth)?,
            };
            let Some(prev) = found else {
                self.goto(here)?;
                return Ok(StopWhy::Begin);
            };
            if !here.end {
                self.remember_prev(here, prev);
            }
            self.goto(prev)?;
        }
        if let Some((addr, kind)) = self.touched() {
            return Ok(StopWhy::Watch { addr, kind });
        }
        if let Some((addr, kind)) = self.changed(&self.watched_bytes(), &old_watch) {
            return Ok(StopWhy::Watch { addr, kind });
        }
        if self.breakpoints.contains(&self.pos.point.rip) {
            return Ok(StopWhy::Breakpoint(self.pos.point.rip));
        }
        Ok(StopWhy::Step)
    }

    /// Back to the last breakpoint or watchpoint hit before here, or the start.
    pub fn reverse_cont(&mut self) -> R<StopWhy> {
        let here = self.pos;
        if here.exits == 0 && here.anchor.is_none() && here.steps == 0 && !here.end {
            return Ok(StopWhy::Begin);
        }
        if self.native_ok() {
            match self.reverse_cont_native() {
                Err(e) if watched_code(&e) => self.after_watched_code(here)?,
                Err(e) => match self.patched_divergence(&e) {
                    Some(why) => self.after_patched_divergence(here, why)?,
                    None => return Err(e),
                },
                r => return r,
            }
        }
        // Windows of exits going back, growing: [lo, hi) then earlier.
        let mut until = here;
        let mut hi = here.exits;
        let mut width = 1u64;
        let checkpoints: Vec<u64> = self.rec.checkpoints.iter().map(|c| c.1).collect();
        loop {
            if hi == 0 && until.steps == 0 && !until.end {
                // At the very first boundary: nothing earlier.
                self.goto_exit(0)?;
                return Ok(StopWhy::Begin);
            }
            // Within the current exit interval first, then earlier ones.
            let mut lo = if until.steps > 0 {
                hi
            } else {
                hi.saturating_sub(width)
            };
            // Prefer a checkpoint boundary when one lies in the window (cheap restore).
            if let Some(&c) = checkpoints.iter().rev().find(|&&c| c >= lo && c < hi) {
                lo = c;
            }
            let mut last: Option<(Pos, StopWhy)> = None;
            let scanned = self.scan((lo, None, 0), until, 0, u64::MAX, |p, hit| {
                if let Some(h) = hit {
                    last = Some((p, h));
                }
            })?;
            if scanned.is_none() {
                return Ok(StopWhy::Interrupted);
            }
            if let Some((p, why)) = last {
                self.goto(p)?;
                return Ok(why);
            }
            if lo == 0 {
                self.goto_exit(0)?;
                return Ok(StopWhy::Begin);
            }
            if self.interrupted() {
                return Ok(StopWhy::Interrupted);
            }
            hi = lo;
            until = Pos {
                exits: lo,
                steps: 0,
                ..self.pos_at_exit(lo)?
            };
            width = (width * 2).min(1 << 16);
        }
    }

    /// The boundary just before `here` (an arrival or an exit boundary
    /// not counted before), the cheapest way that works: in a loop, a short
    /// step run from the arrival before this one; else guessed at native
    /// speed (module `prev`); else stepped from the latest known point
    /// before here. `None`: here is the first boundary of the recording.
    /// `guesses`: [`Session::predecessor_guesses`] made at here; `truth`:
    /// here's state hash, which what the guesses found must reproduce.
    fn prev_of(&mut self, here: Pos, guesses: Vec<Vec<u64>>, truth: Option<String>) -> R<Option<Pos>> {
        let mut prev = None;
        // Where a step run from the previous arrival stopped short (its budget).
        let mut stepped_to = None;
        if let Some((r, n)) = here.anchor.filter(|&(_, n)| !here.end && n >= 2) {
            let mut last = None;
            if self.scan((here.exits, Some((r, n - 1)), 0), here, SCAN_SNAP_EVERY, LOOP_STEPS, |p, _| last = Some(p))?.is_some() {
                prev = last;
            } else {
                stepped_to = last;
            }
        }
        if prev.is_none() {
            match self.native_prev_guess(here, guesses, truth.as_deref())? {
                Prev::Found(p) => prev = Some(p),
                Prev::StepFrom(a) => {
                    let mut last = None;
                    self.scan(a, here, SCAN_SNAP_EVERY, u64::MAX, |p, _| last = Some(p))?;
                    if self.reproduces(truth.as_deref())? {
                        prev = last;
                    }
                }
                Prev::Unknown => {}
            }
        }
        // At an arrival (a native-speed stop): step from the arrival
        // before it (or where the bounded run from it stopped), or from its
        // exit boundary.
        if let Some((r, n)) = here.anchor.filter(|_| !here.end && prev.is_none()) {
            let start = match stepped_to {
                // Go on from where the bounded run stopped (not its steps again).
                Some(p) => p.at(),
                None if n >= 2 => (here.exits, Some((r, n - 1)), 0),
                None => (here.exits, None, 0),
            };
            self.scan(start, here, SCAN_SNAP_EVERY, u64::MAX, |p, _| prev = Some(p))?;
            if prev.is_none() && here.exits == 0 {
                return Ok(None);
            }
        }
        // At an exit boundary (or the end): the previous boundary lies in an earlier interval.
        let mut e = if here.end { here.exits } else { here.exits.saturating_sub(1) };
        loop {
            if let Some(p) = prev {
                return Ok(Some(p));
            }
            self.scan((e, None, 0), here, SCAN_SNAP_EVERY, u64::MAX, |p, _| prev = Some(p))?;
            if prev.is_none() && e == 0 {
                return Ok(None);
            }
            e = e.saturating_sub(1);
        }
    }

    /// Whether the machine, reached through guessed breakpoints, has the
    /// state hash `truth` (none: nothing to check). If not, it is not
    /// trusted: the next move restores.
    pub(super) fn reproduces(&mut self, truth: Option<&str>) -> R<bool> {
        let Some(t) = truth else { return Ok(true) };
        if self.tl.state_hash()? == t {
            return Ok(true);
        }
        self.pos.end = true;
        Ok(false)
    }

    /// Notes the boundary just before `here` (a reverse step found it).
    fn remember_prev(&mut self, here: Pos, prev: Pos) {
        if self.prev_boundary.len() >= 1 << 16 {
            self.prev_boundary.clear();
        }
        self.prev_boundary.insert(here.at(), prev);
    }
}
