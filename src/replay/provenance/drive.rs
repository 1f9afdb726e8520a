//! Driving the replay for a query: replaying to a span's start, stepping
//! it under the query's budget (steps, time, Ctrl-C, a progress bar).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tracer::{Step, Tracer};
use super::{Limits, ProvError, Recording, Timeline, R};
use crate::clock::ExecPoint;
use crate::replay::{Outcome, Sink};

/// Counts steps and time across a query, polls for interrupts, draws progress.
pub(crate) struct Budget<'a> {
    limits: &'a Limits<'a>,
    start: Instant,
    pub(crate) steps: u64,
    bar: Option<indicatif::ProgressBar>,
}

impl<'a> Budget<'a> {
    pub(crate) fn new(limits: &'a Limits<'a>) -> Budget<'a> {
        Budget {
            limits,
            start: Instant::now(),
            steps: 0,
            bar: None,
        }
    }

    /// Why the query must stop now, if it must.
    pub(crate) fn exhausted(&self) -> Option<String> {
        if self.steps >= self.limits.max_steps {
            return Some(format!(
                "the step limit ({} instructions single-stepped)",
                self.limits.max_steps
            ));
        }
        if self.start.elapsed() >= self.limits.max_time {
            return Some(format!(
                "the time limit ({:.0} s)",
                self.limits.max_time.as_secs_f64()
            ));
        }
        None
    }

    pub(crate) fn tick(&mut self, at: u64) -> R<()> {
        self.steps += 1;
        if self.steps.is_multiple_of(256) {
            if (self.limits.interrupted)() {
                self.done();
                return Err(ProvError::Interrupted { at });
            }
            if self.bar.is_none()
                && self.limits.progress
                && self.start.elapsed() > Duration::from_millis(500)
            {
                self.bar = progress_bar();
            }
            if let Some(b) = &self.bar {
                b.set_position(self.steps);
                b.set_message(format!("tracing at exit {at}:"));
            }
        }
        Ok(())
    }

    pub(crate) fn done(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// A progress bar on stderr when it is a terminal (a query that takes more
/// than half a second says it is working and that Ctrl-C stops it).
fn progress_bar() -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::with_draw_target(
        None,
        indicatif::ProgressDrawTarget::stderr_with_hz(8),
    );
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} {pos} instructions stepped, {elapsed} (Ctrl-C stops)",
        )
        .expect("valid template"),
    );
    Some(b)
}

/// Replays `tl` forward at full speed to exit boundary `exits` (if behind
/// it); with `end_ok`, reaching the recording's end first is no error.
pub(crate) fn run_to_exit(tl: &mut Timeline, exits: u64, end_ok: bool) -> R<()> {
    if tl.exits() < exits {
        match tl.run(Some(exits))? {
            Outcome::Reached => {}
            Outcome::Finished { .. } if end_ok => {}
            Outcome::Diverged(why) => {
                return Err(ProvError::Diverged {
                    at: tl.exits(),
                    why,
                })
            }
            o => {
                return Err(ProvError::Msg(format!(
                    "cannot replay to exit {exits}: {o:?}"
                )))
            }
        }
    }
    Ok(())
}

/// A timeline at exit boundary `exits`: the nearest checkpoint, then full
/// speed (see [`run_to_exit`] for `end_ok`).
pub(crate) fn timeline_at(rec: &Arc<Recording>, exits: u64, end_ok: bool) -> R<Timeline> {
    let ck = Timeline::nearest_checkpoint(rec, exits);
    let mut tl = Timeline::at_checkpoint(rec.clone(), ck, Sink::Discard)?;
    run_to_exit(&mut tl, exits, end_ok)?;
    Ok(tl)
}

/// Replays from exit boundary `from` to point `to`, single-stepping every
/// instruction in between and handing each to `each`. Stops early (returns
/// the reason) on a limit.
pub(super) fn trace_span(
    rec: &Arc<Recording>,
    from: u64,
    to: ExecPoint,
    budget: &mut Budget,
    each: &mut dyn FnMut(Step),
    at_end: &mut dyn FnMut(&Timeline) -> R<()>,
) -> R<Option<String>> {
    let mut tl = timeline_at(rec, from, false)?;
    let mut t = Tracer::new(&mut tl);
    loop {
        let here = t.tl.position()?;
        if here == to || t.finished {
            at_end(t.tl)?;
            return Ok(None);
        }
        if (here.exits, here.branches) > (to.exits, to.branches) {
            return Err(ProvError::Msg(format!(
                "the execution does not stop at {to}: it went on to {here}"
            )));
        }
        if let Some(why) = budget.exhausted() {
            return Ok(Some(why));
        }
        let s = t.step()?;
        budget.tick(s.at.exits)?;
        each(s);
    }
}

/// The point reached by replaying to exit `exits` (its RIP).
pub fn exit_point(rec: &Arc<Recording>, exits: u64) -> R<ExecPoint> {
    Ok(timeline_at(rec, exits, true)?.position()?)
}

/// The first point in exits `from..to` where RIP is `rip` (single-stepping).
pub fn find_rip(
    rec: &Arc<Recording>,
    rip: u64,
    from: u64,
    to: u64,
    limits: &Limits,
) -> R<Option<ExecPoint>> {
    let end = exit_point(rec, to)?;
    let mut tl = timeline_at(rec, from, true)?;
    let mut budget = Budget::new(limits);
    let mut t = Tracer::new(&mut tl);
    loop {
        let here = t.tl.position()?;
        if here.rip == rip {
            return Ok(Some(here));
        }
        if here == end || t.finished || here.exits > end.exits || budget.exhausted().is_some() {
            return Ok(None);
        }
        t.step()?;
        budget.tick(here.exits)?;
    }
}
