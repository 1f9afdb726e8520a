//! The offline inspector (`revirt inspect`): examine the machine at any
//! point of a recording without trusting the guest's OS — registers, memory
//! through the guest's own page tables, disassembly, events, diffs between
//! points, where a value was last written — and go live from there.
//!
//! A [`Session`] is positioned at one point. At a checkpoint the state is
//! read from the checkpoint files alone (no KVM: [`view::Frozen`]);
//! anywhere else a [`Timeline`] replays to it through KVM. The recording is
//! only ever read.

pub mod commands;
pub mod format;
mod lastwrite;
pub mod live;
mod memory;
mod state;
pub mod mmu;
pub mod parse;
pub mod provenance;
pub mod view;

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::ExecPoint;
use crate::replay::{Outcome, Recording, ReplayError, Sink, Timeline};
use crate::trace::Event;

pub use parse::Point;
pub use crate::replay::symbols::Symbols;
pub use view::{Frozen, View};
use crate::replay::checkpoints::Checkpoints;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad command line (unknown command, bad argument).
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Msg(String),
    /// Ctrl-C stopped a long operation.
    #[error("interrupted at exit {at}")]
    Interrupted { at: u64 },
    #[error("replay diverged from the recording at exit {at}: {why}")]
    Diverged { at: u64, why: String },
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Checkpoint(#[from] crate::trace::CheckpointError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Ctrl-C handling: a SIGINT handler that only sets a flag, which long
/// operations poll between steps (so Ctrl-C stops a seek, not the REPL).
pub mod interrupt {
    use std::sync::atomic::{AtomicBool, Ordering};

    static FLAG: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_sigint(_: libc::c_int) {
        FLAG.store(true, Ordering::SeqCst);
    }

    fn set_handler(handler: libc::sighandler_t) {
        // SAFETY: the handler only stores to an atomic (async-signal-safe);
        // the sigaction struct is fully initialised before the call.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        }
    }

    /// Installs the handler. Without it, Ctrl-C kills the process as usual.
    pub fn install() {
        set_handler(on_sigint as *const () as libc::sighandler_t);
    }

    /// Puts back the default action (Ctrl-C terminates the process).
    pub fn restore_default() {
        set_handler(libc::SIG_DFL);
    }

    /// Whether Ctrl-C was pressed since the last `take`/`clear`; clears it.
    pub fn take() -> bool {
        FLAG.swap(false, Ordering::SeqCst)
    }

    pub fn is_set() -> bool {
        FLAG.load(Ordering::SeqCst)
    }

    pub fn clear() {
        FLAG.store(false, Ordering::SeqCst);
    }

    /// Sets the flag as Ctrl-C would (tests, other front ends).
    pub fn raise() {
        FLAG.store(true, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Never replay: only checkpoint states can be inspected (works without KVM).
    pub no_kvm: bool,
    /// Show a progress bar on stderr for long replays (when it is a terminal).
    pub progress: bool,
    /// Work on a recording that fails its integrity check.
    pub force: bool,
}

/// A resolved point: an exit count, the checkpoint that is exactly there,
/// or an exact instruction inside the exit interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub exits: u64,
    pub ckpt: Option<u32>,
    pub exact: Option<ExecPoint>,
}

/// Where the session stands.
#[derive(Clone)]
enum Here {
    /// At checkpoint `id`, state from its files.
    Checkpoint(u32, Arc<Frozen>),
    /// At this exit count (or exactly at this point inside the interval
    /// after it), state in the replay timeline (re-created on demand).
    Replay(u64, Option<ExecPoint>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TlState {
    Running,
    /// The guest reached the recording's end (powered off / crashed).
    Finished,
    /// Diverged or failed: cannot run on.
    Broken,
}

/// How a forward replay ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ran {
    Reached,
    /// The end of the recording; problems found by the final check (empty = all matched).
    Finished(Vec<String>),
}

pub struct Session {
    pub rec: Arc<Recording>,
    pub syms: Symbols,
    pub ckpts: Checkpoints,
    here: Here,
    tl: Option<Timeline>,
    tl_state: TlState,
    pub opts: Options,
    /// Intel syntax for `disas` (default AT&T, as gdb).
    pub intel: bool,
    /// Whether this session has used KVM (replayed) at all.
    pub kvm_used: bool,
    /// The final-check problems when the replay reached the end.
    end_problems: Option<Vec<String>>,
}

impl Session {
    /// Opens a recording, positioned at checkpoint 0 (read from its file).
    pub fn open(dir: &Path, opts: Options) -> Result<Session, Error> {
        let rec = Arc::new(Recording::open_checked(dir, opts.force)?);
        if let Some(line) = &rec.integrity {
            eprintln!("revirt: {line}");
        }
        if rec.checkpoints.is_empty() {
            let why = match &rec.status {
                crate::trace::LogStatus::Incomplete { reason, .. } if rec.events.is_empty() => format!(": its event log is unusable: {reason}"),
                _ => String::new(),
            };
            return Err(Error::Msg(format!("{}: the recording has no usable checkpoint (not even checkpoint 0){why}", dir.display())));
        }
        let syms = Symbols::from_elf(&rec.image);
        let mut ckpts = Checkpoints::new(dir.to_path_buf(), rec.seals.clone());
        let first = rec.checkpoints[0].0;
        let st = ckpts.state(first)?;
        Ok(Session {
            rec,
            syms,
            ckpts,
            here: Here::Checkpoint(first, Arc::new(st)),
            tl: None,
            tl_state: TlState::Running,
            opts,
            intel: false,
            kvm_used: false,
            end_problems: None,
        })
    }

    /// The exit count of the recording's end (the last one a cut-short log vouches for).
    pub fn end_exits(&self) -> u64 {
        match self.rec.end() {
            Some(Event::End { exits, .. }) => *exits,
            _ => self.rec.last_exits(),
        }
    }

    /// Exit count of the current point.
    pub fn exits(&self) -> u64 {
        match &self.here {
            Here::Checkpoint(_, f) => f.exits,
            Here::Replay(x, _) => *x,
        }
    }

    /// The exact point when the session stands inside an exit interval (after `stepi`).
    pub fn exact(&self) -> Option<ExecPoint> {
        match &self.here {
            Here::Replay(_, p) => *p,
            Here::Checkpoint(..) => None,
        }
    }

    /// Short form of the current point for prompts: `E` or `E:B:RIP`.
    pub fn label(&self) -> String {
        match self.exact() {
            Some(p) => format!("{}:{}:{:#x}", p.exits, p.branches, p.rip),
            None => self.exits().to_string(),
        }
    }

    /// The checkpoint the session stands exactly at, if any.
    pub fn at_checkpoint(&self) -> Option<u32> {
        match &self.here {
            Here::Checkpoint(id, _) => Some(*id),
            Here::Replay(..) => None,
        }
    }

    fn ckpt_exits(&self, id: u32) -> Option<u64> {
        self.rec.checkpoints.iter().find(|c| c.0 == id).map(|c| c.1)
    }

    fn ckpt_at(&self, exits: u64) -> Option<u32> {
        self.rec.checkpoints.iter().find(|c| c.1 == exits).map(|c| c.0)
    }

    /// Turns a point into an exit count (and the checkpoint exactly there).
    pub fn resolve(&self, p: Point) -> Result<Target, Error> {
        let end = self.end_exits();
        let exits = match p {
            Point::Start => 0,
            Point::End => end,
            Point::Exit(n) => n,
            Point::Rel(d) => {
                let here = self.exits() as i128 + d as i128;
                if here < 0 {
                    return Err(Error::Usage(format!("{d} exits from exit {} is before the start", self.exits())));
                }
                here as u64
            }
            Point::Checkpoint(k) => {
                let exits = self.ckpt_exits(k).ok_or_else(|| {
                    let have: Vec<String> = self.rec.checkpoints.iter().map(|c| c.0.to_string()).collect();
                    Error::Usage(format!("no checkpoint {k} in this recording (it has {})", have.join(", ")))
                })?;
                return Ok(Target { exits, ckpt: Some(k), exact: None });
            }
            Point::Event(i) => {
                let e = self.rec.events.get(i).ok_or_else(|| {
                    Error::Usage(format!("no event #{i}: the recording has events #0..#{}", self.rec.events.len().saturating_sub(1)))
                })?;
                event_point(e)
            }
            Point::Exec(p) => {
                let t = self.resolve(Point::Exit(p.exits))?;
                return Ok(Target { exact: Some(p), ckpt: None, ..t });
            }
        };
        if exits > end {
            return Err(Error::Usage(format!("exit {exits} is beyond the end of the recording (exit {end})")));
        }
        let start = self.rec.checkpoints[0].1;
        if exits < start {
            return Err(Error::Usage(format!("exit {exits} is before the recording's first checkpoint (exit {start})")));
        }
        Ok(Target { exits, ckpt: self.ckpt_at(exits), exact: None })
    }

    /// Moves to a point: from the checkpoint files when it is a checkpoint,
    /// else by replaying (through KVM). On Ctrl-C the session stays where
    /// the replay got to.
    pub fn seek(&mut self, p: Point) -> Result<Target, Error> {
        let t = self.resolve(p)?;
        self.goto(t)?;
        Ok(t)
    }

    pub fn goto(&mut self, t: Target) -> Result<(), Error> {
        if let Some(p) = t.exact {
            self.replay_to(t.exits)?;
            self.here = Here::Replay(t.exits, None);
            self.step_to(p)?;
            return Ok(());
        }
        match t.ckpt {
            Some(id) => {
                let st = self.ckpts.state(id)?;
                self.here = Here::Checkpoint(id, Arc::new(st));
            }
            None => {
                self.replay_to(t.exits)?;
                self.here = Here::Replay(t.exits, None);
            }
        }
        Ok(())
    }

    /// From an exit-level position in `p`'s interval, single-steps to `p`.
    fn step_to(&mut self, p: ExecPoint) -> Result<(), Error> {
        let tl = self.tl.as_mut().expect("positioned by replay_to");
        let r = tl.seek_point(p);
        let outcome = self.stepped(r)?;
        if outcome != Ran::Reached {
            return Err(Error::Msg(format!("the recording ended before reaching {}", point_str(&p))));
        }
        Ok(())
    }

    /// Bookkeeping after a single-stepping Timeline call: the new position, or why not.
    fn stepped(&mut self, r: Result<Outcome, ReplayError>) -> Result<Ran, Error> {
        let tl = self.tl.as_mut().expect("a timeline");
        let ran = match r {
            Ok(Outcome::Reached) => Ran::Reached,
            Ok(Outcome::Finished { problems, .. }) => {
                self.tl_state = TlState::Finished;
                self.end_problems = Some(problems.clone());
                Ran::Finished(problems)
            }
            Ok(Outcome::Diverged(why)) => {
                self.tl_state = TlState::Broken;
                return Err(Error::Diverged { at: tl.exits(), why });
            }
            Ok(Outcome::EndOfRecording(d)) | Ok(Outcome::NotReached(d)) => {
                self.tl_state = TlState::Broken;
                return Err(Error::Msg(d));
            }
            Err(e) => {
                self.tl_state = TlState::Broken;
                return Err(e.into());
            }
        };
        let p = tl.position()?;
        self.here = Here::Replay(p.exits, if ran == Ran::Reached { Some(p) } else { None });
        Ok(ran)
    }

    /// Executes `n` instructions forward from the current point (single-stepping through KVM).
    pub fn stepi(&mut self, n: u64) -> Result<Ran, Error> {
        if self.opts.no_kvm {
            return Err(Error::Msg("stepping needs KVM (disabled by --no-kvm)".into()));
        }
        if self.exits() == self.end_exits() && self.rec.end().is_some() {
            return Err(Error::Msg("this is the end of the recording: the guest has stopped".into()));
        }
        let tl = self.take_timeline()?;
        self.tl = Some(tl);
        self.tl_state = TlState::Running;
        let r = self.tl.as_mut().expect("just set").step(n);
        self.stepped(r)
    }

    fn no_kvm_error(&self, exits: u64) -> Error {
        let have: Vec<String> = self.rec.checkpoints.iter().map(|c| format!("ckpt:{} = exit {}", c.0, c.1)).collect();
        Error::Msg(format!(
            "exit {exits} is not at a checkpoint, and replaying to it needs KVM (disabled by --no-kvm); checkpoints: {}",
            have.join(", ")
        ))
    }

    /// Positions the session's timeline at `target`, reusing it when it can
    /// run forward to it and no checkpoint in between is closer.
    fn replay_to(&mut self, target: u64) -> Result<(), Error> {
        if self.opts.no_kvm {
            return Err(self.no_kvm_error(target));
        }
        let ck = Timeline::nearest_checkpoint(&self.rec, target);
        let ck_exits = self.ckpt_exits(ck).unwrap_or(0);
        let reusable = match &self.tl {
            Some(tl) => {
                let stepped = tl.position().map(|p| p.branches > 0).unwrap_or(true);
                let behind = tl.exits() < target || (tl.exits() == target && !stepped);
                (self.tl_state == TlState::Running && behind && tl.exits() >= ck_exits)
                    || (self.tl_state == TlState::Finished && tl.exits() == target)
            }
            None => false,
        };
        if !reusable {
            self.tl = None;
            self.tl = Some(Timeline::at_checkpoint(self.rec.clone(), ck, Sink::Discard)?);
            self.tl_state = TlState::Running;
            self.kvm_used = true;
        }
        let tl = self.tl.as_mut().expect("set above");
        match run_to(tl, target, self.opts.progress) {
            Ok(Ran::Reached) => Ok(()),
            Ok(Ran::Finished(problems)) => {
                self.tl_state = TlState::Finished;
                self.end_problems = Some(problems);
                if tl.exits() != target {
                    return Err(Error::Msg(format!("the guest stopped at exit {} before reaching exit {target}", tl.exits())));
                }
                Ok(())
            }
            Err(Error::Interrupted { at }) => {
                self.here = match self.ckpt_at(at) {
                    Some(id) => Here::Checkpoint(id, Arc::new(self.ckpts.state(id)?)),
                    None => Here::Replay(at, None),
                };
                Err(Error::Interrupted { at })
            }
            Err(e) => {
                self.tl_state = TlState::Broken;
                Err(e)
            }
        }
    }

    /// The state at the current point (replaying to it if the timeline was
    /// dropped or moved, e.g. after `live`).
    pub fn view(&mut self) -> Result<&dyn View, Error> {
        if let Here::Replay(x, exact) = self.here {
            let pos = self.tl.as_ref().and_then(|tl| tl.position().ok());
            let ready = self.tl_state != TlState::Broken
                && match (pos, exact) {
                    (Some(p), Some(e)) => p == e,
                    (Some(p), None) => p.exits == x && p.branches == 0,
                    (None, _) => false,
                };
            if !ready {
                let prev = self.here.clone();
                let r = self.replay_to(x).and_then(|_| match exact {
                    Some(p) => self.step_to(p),
                    None => Ok(()),
                });
                self.here = prev;
                r?;
            }
        }
        match &self.here {
            Here::Checkpoint(_, f) => Ok(&**f),
            Here::Replay(..) => Ok(self.tl.as_ref().expect("positioned above")),
        }
    }

    /// The state at `t` as a frozen copy, without moving the session
    /// (a scratch replay when it is not a checkpoint).
    pub fn frozen_at(&mut self, t: Target) -> Result<Frozen, Error> {
        if let Some(id) = t.ckpt {
            return Ok(self.ckpts.state(id)?);
        }
        if t.exits == self.exits() && t.exact == self.exact() {
            return view::freeze(self.view()?);
        }
        let mut tl = self.scratch_timeline(t.exits)?;
        run_to(&mut tl, t.exits, self.opts.progress)?;
        if let Some(p) = t.exact {
            match tl.seek_point(p)? {
                Outcome::Reached => {}
                Outcome::Diverged(why) => return Err(Error::Diverged { at: tl.exits(), why }),
                _ => return Err(Error::Msg(format!("cannot reach {}", point_str(&p)))),
            }
        }
        view::freeze(&tl)
    }

    /// A new replay timeline at the nearest checkpoint at or before `exits`.
    pub fn scratch_timeline(&mut self, exits: u64) -> Result<Timeline, Error> {
        if self.opts.no_kvm {
            return Err(self.no_kvm_error(exits));
        }
        let ck = Timeline::nearest_checkpoint(&self.rec, exits);
        self.kvm_used = true;
        Ok(Timeline::at_checkpoint(self.rec.clone(), ck, Sink::Discard)?)
    }

    /// Gives the session's timeline away (positioned at the current point),
    /// e.g. to go live with its machine. The session re-creates one on demand.
    pub fn take_timeline(&mut self) -> Result<Timeline, Error> {
        if self.opts.no_kvm {
            return Err(Error::Msg("going live needs KVM (disabled by --no-kvm)".into()));
        }
        let x = self.exits();
        match self.here {
            Here::Checkpoint(id, _) => {
                let usable = self.tl.as_ref().is_some_and(|tl| tl.exits() == x) && self.tl_state == TlState::Running;
                if !usable {
                    self.kvm_used = true;
                    self.tl = Some(Timeline::at_checkpoint(self.rec.clone(), id, Sink::Discard)?);
                    self.tl_state = TlState::Running;
                }
            }
            Here::Replay(..) => {
                self.view()?;
            }
        }
        Ok(self.tl.take().expect("positioned above"))
    }

    /// Final-check problems if the replay ran to the recording's end here.
    pub fn end_problems(&self) -> Option<&[String]> {
        match &self.end_problems {
            Some(p) if self.exits() == self.end_exits() => Some(p),
            _ => None,
        }
    }

    /// Index of the next event that takes effect after the current point
    /// (marks and checkpoints already behind are skipped).
    pub fn next_event(&mut self) -> Result<usize, Error> {
        let x = self.exits();
        let raw = self.view()?.next_event();
        Ok(normalize_next(&self.rec.events, raw, x))
    }

    /// The guest clock (ns) at the current point: the last value the log
    /// handed the guest, or the checkpoint's clock if later.
    pub fn clock_ns(&mut self) -> Result<u64, Error> {
        let next = self.next_event()?;
        let x = self.exits();
        let ck = Timeline::nearest_checkpoint(&self.rec, x);
        let ck_clock = self.ckpts.header(ck).map(|h| h.clock_ns()).unwrap_or(0);
        let logged = self.rec.events[..next.min(self.rec.events.len())]
            .iter()
            .rev()
            .find_map(|e| match e {
                Event::Clock { value, .. } => Some(*value),
                Event::Timer { now_ns, .. } => Some(*now_ns),
                _ => None,
            })
            .unwrap_or(0);
        Ok(logged.max(ck_clock))
    }

    /// A one-line description of where the session stands.
    pub fn describe_here(&self) -> String {
        match &self.here {
            Here::Checkpoint(id, f) => format!("exit {} = checkpoint {id} (state read from the checkpoint files, no KVM)", f.exits),
            Here::Replay(x, exact) => {
                let from = Timeline::nearest_checkpoint(&self.rec, *x);
                match exact {
                    Some(p) => format!("{} (state replayed through KVM from checkpoint {from}, then single-stepped)", point_str(p)),
                    None => format!("exit {x} (state replayed through KVM from checkpoint {from})"),
                }
            }
        }
    }
}

/// An exact point the way `seek` takes it back: `exit E + B branches @ rip R (E:B:RIP)`.
pub fn point_str(p: &ExecPoint) -> String {
    format!("exit {} + {} branches @ rip {:#x} ({}:{}:{:#x})", p.exits, p.branches, p.rip, p.exits, p.branches, p.rip)
}

/// The point just before `e` takes effect. Clock reads happen during their
/// exit and async events are delivered right after it, so that is the exit
/// before; marks, checkpoints and the end are points themselves.
pub fn event_point(e: &Event) -> u64 {
    match e {
        Event::Clock { exits, .. } => exits.saturating_sub(1),
        // Delivered right after exit E (branches 0), or inside the interval after it.
        Event::Timer { at, .. } | Event::Serial { at, .. } if at.branches > 0 => at.exits,
        Event::Timer { at, .. } | Event::Serial { at, .. } => at.exits.saturating_sub(1),
        Event::Mark { exits }
        | Event::Checkpoint { exits, .. }
        | Event::End { exits, .. }
        | Event::Migrated { exits, .. }
        | Event::CheckpointFile { exits, .. }
        | Event::ConsoleFile { exits, .. }
        | Event::CheckpointCovered { exits, .. } => *exits,
    }
}

/// Skips marks, checkpoints and the end at or before `exits` (replay
/// consumes them lazily or never).
pub fn normalize_next(events: &[Event], mut next: usize, exits: u64) -> usize {
    while let Some(e) = events.get(next).filter(|e| e.is_mark() || matches!(e, Event::End { .. })) {
        if e.exits() > exits {
            break;
        }
        next += 1;
    }
    next
}

/// Runs a timeline forward to exit `target` in slices, so Ctrl-C
/// ([`interrupt`]) can stop it between slices, with a progress bar on
/// stderr for long runs.
pub fn run_to(tl: &mut Timeline, target: u64, progress: bool) -> Result<Ran, Error> {
    let start = tl.exits();
    if start > target {
        return Err(Error::Msg(format!("cannot run backwards from exit {start} to {target}")));
    }
    let bar = (progress && target - start >= 5000 && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::with_draw_target(
            Some(target - start),
            indicatif::ProgressDrawTarget::stderr_with_hz(8),
        );
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} exits, {eta} left")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b.set_message(format!("replaying to exit {target} (Ctrl-C stops)"));
        b
    });
    let mut slice = 256u64;
    let result = loop {
        if tl.exits() >= target {
            break Ok(Ran::Reached);
        }
        if interrupt::take() {
            break Err(Error::Interrupted { at: tl.exits() });
        }
        let to = tl.exits().saturating_add(slice).min(target);
        let t0 = Instant::now();
        match tl.run(Some(to)) {
            Ok(Outcome::Reached) => {}
            Ok(Outcome::Finished { problems, .. }) => break Ok(Ran::Finished(problems)),
            Ok(Outcome::EndOfRecording(d)) => {
                break Err(Error::Msg(format!("cannot replay to exit {target}: the recording ends first: {d}")))
            }
            Ok(Outcome::Diverged(why)) => break Err(Error::Diverged { at: tl.exits(), why }),
            Ok(Outcome::NotReached(why)) => break Err(Error::Msg(why)),
            Err(e) => break Err(e.into()),
        }
        let took = t0.elapsed();
        if took < Duration::from_millis(20) {
            slice = (slice * 2).min(1 << 20);
        } else if took > Duration::from_millis(100) {
            slice = (slice / 2).max(1);
        }
        if let Some(b) = &bar {
            b.set_position(tl.exits() - start);
        }
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result
}
