//! Going forward: one step, and continue (natively when it can, else by
//! single-stepping: the oracle), or a free run when nothing is watched.

use super::*;
use super::native::watched_code;

impl Session {
    pub fn step(&mut self) -> R<StopWhy> {
        let old = self.watched_bytes();
        let touched = self.touched();
        let why = self.step1()?;
        if let (StopWhy::Step, Some((addr, kind))) = (&why, touched) {
            return Ok(StopWhy::Watch { addr, kind });
        }
        if why == StopWhy::Step {
            if let Some((addr, kind)) = self.changed(&old, &self.watched_bytes()) {
                return Ok(StopWhy::Watch { addr, kind });
            }
        }
        Ok(why)
    }

    /// Runs forward until a breakpoint, a watchpoint, the end, or Ctrl-C.
    pub fn cont(&mut self) -> R<StopWhy> {
        if self.pos.end {
            return Ok(StopWhy::End);
        }
        if self.breakpoints.is_empty() && self.watches.is_empty() {
            return self.run_free();
        }
        if self.native_ok() {
            let here = self.pos;
            match self.cont_native() {
                Err(e) if watched_code(&e) => self.after_watched_code(here)?,
                Err(e) => match self.patched_divergence(&e) {
                    Some(why) => self.after_patched_divergence(here, why)?,
                    None => return Err(e),
                },
                r => return r,
            }
        }
        let mut old = self.watched_bytes();
        let mut n = 0u64;
        loop {
            let touched = self.touched();
            let why = self.step1()?;
            if why != StopWhy::Step {
                return Ok(why);
            }
            if let Some((addr, kind)) = touched {
                return Ok(StopWhy::Watch { addr, kind });
            }
            if !self.watches.is_empty() {
                let new = self.watched_bytes();
                if let Some((addr, kind)) = self.changed(&old, &new) {
                    return Ok(StopWhy::Watch { addr, kind });
                }
                old = new;
            }
            if self.breakpoints.contains(&self.pos.point.rip) {
                return Ok(StopWhy::Breakpoint(self.pos.point.rip));
            }
            n += 1;
            if n.is_multiple_of(POLL_EVERY) && self.interrupted() {
                return Ok(StopWhy::Interrupted);
            }
        }
    }

    /// Nothing to watch for: run at full speed, a chunk of exits at a time
    /// (a Ctrl-C is noticed between chunks, or kicks the run inside one).
    pub(super) fn run_free(&mut self) -> R<StopWhy> {
        let start = self.pos;
        loop {
            let to = self.tl.exits() + 64;
            match self.kickable(|s| Ok(s.tl.run(Some(to))?))? {
                Err(exits) => return self.after_kick(start, exits),
                Ok(Outcome::Reached) => self.refresh((to, None, 0))?,
                Ok(other) => return self.ended(other),
            }
            if self.interrupted() {
                return Ok(StopWhy::Interrupted);
            }
        }
    }
}
