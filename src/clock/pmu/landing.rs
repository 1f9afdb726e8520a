//! Landing on a target after a skidding overflow: every stop is judged
//! against branch count, RIP and register fingerprint; past it is an
//! overshoot, reported, never accepted.

use crate::clock::ExecPoint;

/// Where to land: an execution point plus the register fingerprint there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub at: ExecPoint,
    pub fp: u64,
}

/// Where the guest stands (exact: read after a step or an overflow stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub at: ExecPoint,
    pub fp: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Arrived,
    KeepStepping,
    Overshoot(String),
}

/// The landing algorithm as a state machine, so the same code runs against
/// a real PMU, the simulated counter and a synthetic trace in tests.
#[derive(Debug, Clone)]
pub struct Lander {
    pub target: Target,
    /// The counter is programmed to overflow at this branch count (None:
    /// the target is within the margin of the interval start — step all the way).
    pub overflow_at: Option<u64>,
    stepping: bool,
    pub steps: u64,
}

impl Lander {
    pub fn new(target: Target, margin: u64) -> Lander {
        let overflow_at = (target.at.branches > margin).then(|| target.at.branches - margin);
        Lander { target, overflow_at, stepping: overflow_at.is_none(), steps: 0 }
    }

    /// Whether the counter is still running free (no stop seen yet).
    pub fn free_running(&self) -> bool {
        !self.stepping
    }

    fn judge(&self, p: &Pos) -> Verdict {
        let t = &self.target.at;
        let (pa, ta) = ((p.at.exits, p.at.branches), (t.exits, t.branches));
        if pa > ta {
            return Verdict::Overshoot(format!(
                "overshot {t}: the guest is already at {} (the counter's skid exceeded the margin?)",
                p.at
            ));
        }
        if p.at == *t && p.fp == self.target.fp {
            Verdict::Arrived
        } else {
            Verdict::KeepStepping
        }
    }

    /// The overflow will not come (the count is already past where it was
    /// programmed): go on by stepping/breakpoints from here.
    pub fn start_stepping(&mut self) {
        self.stepping = true;
    }

    /// The counter overflowed and the guest stopped at `p` (some skid late).
    pub fn on_overflow(&mut self, p: Pos) -> Verdict {
        self.stepping = true;
        self.judge(&p)
    }

    /// A stop while single-stepping (or at a breakpoint on the target RIP).
    pub fn on_step(&mut self, p: Pos) -> Verdict {
        self.steps += 1;
        self.judge(&p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn trace(branches: &[bool]) -> Vec<Pos> {
        let mut v = Vec::new();
        let mut b = 0;
        for (i, br) in branches.iter().enumerate() {
            if *br {
                b += 1;
            }
            v.push(Pos { at: ExecPoint { exits: 7, branches: b, rip: 0x1000 + (i as u64 % 5) }, fp: i as u64 });
        }
        v
    }

    /// Drives the lander over `t` like a counter with `skid` would.
    fn land(t: &[Pos], target: usize, margin: u64, skid: u64) -> Result<usize, String> {
        let mut l = Lander::new(Target { at: t[target].at, fp: t[target].fp }, margin);
        let mut i = match l.overflow_at {
            Some(at) => {
                // Run free until the counter reaches `at`, then `skid` branches more.
                let first = t.iter().position(|p| p.at.branches >= at).unwrap();
                let goal = t[first].at.branches + skid;
                match t.iter().position(|p| p.at.branches >= goal) {
                    Some(j) => j,
                    None => return Err("ran off the trace".into()),
                }
            }
            None => 0,
        };
        let mut v = if l.overflow_at.is_some() { l.on_overflow(t[i]) } else { l.on_step(t[0]) };
        loop {
            match v {
                Verdict::Arrived => return Ok(i),
                Verdict::Overshoot(why) => return Err(why),
                Verdict::KeepStepping => {
                    i += 1;
                    if i >= t.len() {
                        return Err("ran off the trace".into());
                    }
                    v = l.on_step(t[i]);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn lands_exactly_or_reports_overshoot(
            branches in proptest::collection::vec(proptest::bool::weighted(0.3), 50..400),
            target_frac in 0.0f64..1.0,
            margin in 0u64..40,
            skid in 0u64..80,
        ) {
            let t = trace(&branches);
            let target = ((t.len() - 1) as f64 * target_frac) as usize;
            match land(&t, target, margin, skid) {
                Ok(i) => prop_assert_eq!(i, target, "landed on the wrong instruction"),
                Err(why) => {
                    // Only allowed when the skid carried us past the target.
                    prop_assert!(skid > margin || why.contains("ran off"), "unexpected failure: {}", why);
                }
            }
            if skid <= margin {
                prop_assert_eq!(land(&t, target, margin, skid), Ok(target));
            }
        }
    }

    #[test]
    fn lander_arms_where_the_run_loop_does() {
        let l = Lander::new(Target { at: ExecPoint { exits: 3, branches: 1000, rip: 0 }, fp: 0 }, 100);
        assert_eq!(l.overflow_at, crate::vmm::counter::overflow_point(1000, 100));
    }
}
