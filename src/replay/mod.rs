//! The replayer: restore a checkpoint, run the guest, answer every
//! non-deterministic input from the log at the recorded point, and check
//! that the guest arrives where the recording says it did.

pub mod checkpoints;
pub mod history;
pub mod interrupt;
pub mod live;
pub mod provenance;
pub mod search;
pub mod session;
pub mod snapshots;
pub mod symbols;
pub mod timeline;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::clock::ExecPoint;
use crate::trace::{self, Event, LogReader, LogStatus, Meta};
use crate::vmm::{Async, Control, Host, HostError, PollCtx};

/// The register files of the replay API: KVM's layouts, named here so that
/// front ends (gdb, inspect) need nothing from the KVM crates.
pub use kvm_bindings::{kvm_dtable as DTable, kvm_fpu as Fpu, kvm_regs as Regs, kvm_segment as Segment, kvm_sregs as Sregs};
pub use timeline::{CounterKind, LandingConfig, Outcome, Timeline};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0} is not a recording directory (no meta.json)")]
    NotARecording(String),
    #[error(transparent)]
    Meta(#[from] trace::MetaError),
    #[error(transparent)]
    Log(#[from] trace::LogError),
    #[error(transparent)]
    Checkpoint(#[from] trace::CheckpointError),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("recording {0}: {1}")]
    Damaged(String, String),
    #[error("no checkpoint {0} in this recording")]
    NoCheckpoint(u32),
    #[error(transparent)]
    Image(#[from] crate::vmm::image::ImageError),
    #[error(transparent)]
    Machine(#[from] crate::vmm::MachineError),
    #[error("recording {dir} is damaged, so nothing in it is trusted (give --force to work on damaged evidence anyway):\n  {}", problems.join("\n  "))]
    Integrity { dir: String, problems: Vec<String> },
    #[error("guest memory {addr:#x}+{len} lies beyond the guest's {mem:#x} bytes of RAM")]
    Beyond { addr: u64, len: u64, mem: u64 },
    #[error("clock 'pmu' unavailable for replay: {0}. Use --clock pmu-sim (the same landing over the simulated counter) or step")]
    NoPmu(#[source] crate::vmm::counter::PmuError),
    #[error("interrupted inside the exit interval after exit {exits} (a point there has no name)")]
    Interrupted { exits: u64 },
}

/// Why a replay stopped short of its target, raised from inside the run
/// loop (through [`HostError::Host`]) and turned into an [`timeline::Outcome`].
#[derive(Debug, thiserror::Error)]
pub enum ReplayStop {
    /// Replay no longer matches the recording.
    #[error("replay diverged from the recording: {0}")]
    Divergence(String),
    /// Replay needs an input the (cut-short) recording does not have.
    #[error("the recording ends here: {0}")]
    EndOfRecording(String),
    /// A requested stopping point does not exist on this execution path.
    #[error("{0}")]
    NotReached(String),
}

impl From<ReplayStop> for HostError {
    fn from(s: ReplayStop) -> HostError {
        HostError::Host(Box::new(s))
    }
}

/// A recording opened for replay: metadata, the verified event log, the
/// recorded console output. Never modified. Each small file (meta.json,
/// events.log, console.log, image.elf) is read once, and the bytes checked
/// are the bytes decoded; checkpoints (through `seals`) and the disk copy
/// (`disk_sha`) are checked on the bytes read when they are used.
pub struct Recording {
    pub dir: PathBuf,
    pub meta: Meta,
    /// The events from `events_base` on: all of them, except for a seek
    /// window ([`Recording::open_for_seek`]), which holds those from the
    /// segment of the checkpoint it starts at to past its target. Index
    /// them with [`Recording::event`] where a window may be open.
    pub events: Vec<Event>,
    pub events_base: usize,
    /// A seek window that stops before the log's end: the events in the
    /// log (more than `events_base + events.len()`).
    pub window_of: Option<usize>,
    /// Opened by [`Recording::open_for_seek`]'s own check (not the full one).
    pub seek_checked: bool,
    pub status: LogStatus,
    pub chunks: u32,
    /// console.log as read; from a checked open of a cut-short recording,
    /// only the part the chain vouches for.
    pub console: Vec<u8>,
    /// (checkpoint id, exits, index of its Checkpoint event), in order.
    pub checkpoints: Vec<(u32, u64, usize)>,
    /// What each checkpoint file must match before it is decoded.
    pub seals: trace::checkpoint::Seals,
    /// image.elf as read (checked against meta.json by a checked open).
    pub image: Vec<u8>,
    /// The SHA-256 the disk copy must have as it is copied for use (None:
    /// not checked: `--force`, or library use).
    pub disk_sha: Option<String>,
    /// What [`Recording::open_checked`] checked (one line), if it did.
    pub integrity: Option<String>,
}

impl Recording {
    /// The one place readers (replay, gdb, inspect, live) open a recording:
    /// every file it uses or vouches for is checked first ([`trace::verify`]:
    /// the image and disk copies against meta.json, the log's hash chain,
    /// each checkpoint against the SHA-256 the chain holds, the console
    /// against the chain), and the bytes checked are the ones used. Damage
    /// is an error unless `force`; a log that is merely cut short is not
    /// damage. Without `force` only checkpoints bound into the chain are
    /// used (and, in a cut-short recording, those it stops before binding,
    /// on their CRC-32, said in the summary).
    pub fn open_checked(dir: &Path, force: bool) -> Result<Recording, ReplayError> {
        if !trace::Dir::new(dir).is_recording() {
            return Err(ReplayError::NotARecording(dir.display().to_string()));
        }
        let (report, loaded) = trace::verify::check(dir);
        let problems = || report.problems().iter().map(|s| s.to_string()).collect::<Vec<_>>();
        if report.damaged() && !force {
            return Err(ReplayError::Integrity { dir: dir.display().to_string(), problems: problems() });
        }
        let Some(loaded) = loaded else {
            // meta.json or events.log cannot be read at all: nothing to force.
            return Err(ReplayError::Damaged(dir.display().to_string(), problems().join("; ")));
        };
        let vouched = loaded.console_vouched as usize;
        let mut rec = Recording::from_loaded(dir, loaded);
        let mut line = report.summary.clone();
        if !force {
            // Bound checkpoints are checked against the chain when read. A
            // log that is merely cut short may stop before a checkpoint's
            // binding (the file is written by another thread): those are
            // used on their CRC-32 alone, and the user is told.
            let cut_short = report.incomplete;
            use trace::checkpoint::{Expect, Seals};
            rec.seals = Seals::from_events(&rec.events, if cut_short { Expect::CrcOnly } else { Expect::Unbound });
            let unbound: Vec<u32> = rec.checkpoints.iter().map(|c| c.0).filter(|id| !rec.seals.is_bound(*id)).collect();
            let seals = rec.seals.clone();
            rec.checkpoints.retain(|c| matches!(seals.expect(c.0), Expect::Bound(_) | Expect::CrcOnly));
            if cut_short && !unbound.is_empty() {
                line += &format!(
                    "; checkpoint{} {} landed after the log was cut, so {} not bound into the chain: used on {} CRC-32 alone",
                    if unbound.len() == 1 { "" } else { "s" },
                    unbound.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", "),
                    if unbound.len() == 1 { "it is" } else { "they are" },
                    if unbound.len() == 1 { "its" } else { "their" },
                );
            }
            // Console bytes past the last binding are not compared against.
            rec.console.truncate(vouched);
            rec.disk_sha = rec.meta.disk.as_ref().map(|d| d.sha256.clone());
        }
        if report.damaged() {
            line += &format!("; --force: going on despite {}", report.problems().join("; "));
        }
        rec.integrity = Some(line);
        Ok(rec)
    }

    /// Opens without the integrity check (library use; the CLI readers use
    /// [`Recording::open_checked`]). Checkpoints are used on their CRC-32.
    pub fn open(dir: &Path) -> Result<Recording, ReplayError> {
        let files = trace::Dir::new(dir);
        let meta_path = files.meta();
        if !meta_path.exists() {
            return Err(ReplayError::NotARecording(dir.display().to_string()));
        }
        let meta_bytes = std::fs::read(&meta_path)
            .map_err(|source| ReplayError::Io { what: "reading", path: meta_path.display().to_string(), source })?;
        let meta = Meta::parse(&meta_bytes, &meta_path)?;
        let log = LogReader::read(&files.events(), trace::log::genesis(&meta_bytes))?;
        let console = std::fs::read(files.console()).unwrap_or_default();
        let image = std::fs::read(files.image()).unwrap_or_default();
        let console_vouched = console.len() as u64;
        Ok(Recording::from_loaded(
            dir,
            trace::verify::Loaded { meta, log, console, console_vouched, image, image_ok: false },
        ))
    }

    fn from_loaded(dir: &Path, l: trace::verify::Loaded) -> Recording {
        // A checkpoint the retention policy dropped is gone even where a
        // stale copy of its file is left (a migrated recording's).
        let dropped = trace::checkpoint::Seals::from_events(&l.log.events, trace::checkpoint::Expect::CrcOnly);
        let files = trace::Dir::new(dir);
        let checkpoints = l
            .log
            .events
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                Event::Checkpoint { id, exits, .. } => Some((*id, *exits, i)),
                _ => None,
            })
            .filter(|(id, _, _)| dropped.expect(*id) != trace::checkpoint::Expect::Dropped && files.has_checkpoint(*id))
            .collect();
        Recording {
            dir: dir.to_path_buf(),
            meta: l.meta,
            events: l.log.events,
            events_base: 0,
            window_of: None,
            seek_checked: false,
            status: l.log.status,
            chunks: l.log.chunks,
            console: l.console,
            checkpoints,
            // Knows the drops, so rebuilding skips them (files checked on CRC-32 unless bound).
            seals: dropped,
            image: l.image,
            disk_sha: None,
            integrity: None,
        }
    }

    /// Opens for a seek to exit `to` (from checkpoint `from` if given),
    /// checking only what that seek uses (`trace::seek`: the seek index,
    /// the log from the starting checkpoint's segment to past `to`, the
    /// checkpoints as they are restored, the console so far). Falls back
    /// to [`Recording::open_checked`] (everything checked) where the
    /// recording cannot be opened that way or any of it fails a check, and
    /// with `force`.
    pub fn open_for_seek(dir: &Path, force: bool, from: Option<u32>, to: u64) -> Result<Recording, ReplayError> {
        let Some(w) = (!force).then(|| trace::seek::open(dir, from, to)).flatten() else {
            return Recording::open_checked(dir, force);
        };
        use trace::checkpoint::{Expect, Seals};
        let seals = Seals::from_bindings(w.bindings, w.covers, Expect::Unbound);
        let files = trace::Dir::new(dir);
        let checkpoints = w
            .checkpoints
            .into_iter()
            .filter(|(id, _, _)| matches!(seals.expect(*id), Expect::Bound(_)) && files.has_checkpoint(*id))
            .collect();
        let window_of = (w.base + w.events.len() < w.total).then_some(w.total);
        Ok(Recording {
            dir: dir.to_path_buf(),
            disk_sha: w.meta.disk.as_ref().map(|d| d.sha256.clone()),
            meta: w.meta,
            events: w.events,
            events_base: w.base,
            window_of,
            seek_checked: true,
            status: LogStatus::Complete,
            chunks: 0,
            console: w.console,
            checkpoints,
            seals,
            image: w.image,
            integrity: Some(w.summary),
        })
    }

    /// Event `i` of the log (None past the end, or outside a seek window).
    pub fn event(&self, i: usize) -> Option<&Event> {
        self.events.get(i.checked_sub(self.events_base)?)
    }

    /// The events from `i` on (as far as they were read).
    pub fn events_from(&self, i: usize) -> &[Event] {
        &self.events[i.saturating_sub(self.events_base).min(self.events.len())..]
    }

    pub fn is_complete(&self) -> bool {
        self.status == LogStatus::Complete
    }

    /// The last exit count the log vouches for.
    pub fn last_exits(&self) -> u64 {
        self.events.iter().map(Event::exits).max().unwrap_or(0)
    }

    pub fn end(&self) -> Option<&Event> {
        self.events.last().filter(|e| matches!(e, Event::End { .. }))
    }

    /// The recording's files.
    pub fn files(&self) -> trace::Dir {
        trace::Dir::new(&self.dir)
    }
}

/// Where replay output goes.
pub enum Sink {
    Discard,
    Stdout,
    Buffer(Vec<u8>),
}

/// Answers the guest from the log, and checks it arrives where it should.
pub struct ReplayHost {
    pub rec: Arc<Recording>,
    /// Index of the next event to consume.
    pub next: usize,
    /// Console bytes produced so far (compared with the recording's).
    pub output_len: u64,
    pub sink: Sink,
    last_clock: u64,
    /// Async events handed out at the last poll, awaiting `delivered`.
    expect: Vec<(ExecPoint, u64, usize)>,
    /// While set, single-step and pause at the first boundary that satisfies it.
    pub stop_at: Option<StopAt>,
    /// The last exact boundary seen while stepping.
    pub last_boundary: Option<ExecPoint>,
    /// Set when `stop_at` was satisfied.
    pub reached: bool,
    /// How this replay reaches precise events: step straight to them, or
    /// land with the PMU algorithm over the machine's branch counter.
    pub landing: Option<Landing>,
    /// Set from another thread (e.g. a Ctrl-C handler) to pause the replay
    /// at the next deterministic point; cleared when honoured.
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Breakpoint arrivals being counted (the search engine, `search`).
    pub scan: Option<search::Scan>,
    /// While set, a request on it kicks the run out of the guest and
    /// pauses it wherever it is (`interrupt`); `kicked` says it did.
    pub kick: Option<Arc<interrupt::Interrupter>>,
    pub kicked: bool,
}

/// Replaying precise events with the PMU clock's landing algorithm over the
/// branch counter installed in the machine (`Machine::set_counter`: the
/// hardware one, or the simulated one): the host sees nothing until the
/// counter overflows (programmed `margin` branches before the target), then
/// the `Lander` judges every arrival at the target RIP (hardware breakpoint
/// or single-stepping) until it arrives or reports an overshoot.
#[derive(Debug, Clone)]
pub struct Landing {
    pub margin: u64,
    /// One lander per target being approached, and whether its overflow
    /// has been programmed yet.
    landers: Vec<(LandKey, crate::clock::pmu::Lander, bool)>,
    /// Targets landed on, overflow stops seen, stops judged after them.
    pub landed: u64,
    pub overflows: u64,
    pub steps: u64,
}

/// What a landing heads for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LandKey {
    /// The async event with this index in the log.
    Event(usize),
    /// `StopAt::Land`.
    Stop,
}

impl Landing {
    pub fn new(margin: u64) -> Landing {
        Landing { margin, landers: Vec::new(), landed: 0, overflows: 0, steps: 0 }
    }

    /// The lander for `key` (made on first use); landers of events already
    /// consumed (`next`) are dropped.
    fn lander(&mut self, key: LandKey, t: crate::clock::pmu::Target, next: usize) -> (&mut crate::clock::pmu::Lander, &mut bool) {
        self.landers.retain(|(k, l, _)| !matches!(k, LandKey::Event(i) if *i < next) && (*k != key || l.target == t));
        let i = match self.landers.iter().position(|(k, _, _)| *k == key) {
            Some(i) => i,
            None => {
                self.landers.push((key, crate::clock::pmu::Lander::new(t, self.margin), false));
                self.landers.len() - 1
            }
        };
        let (_, l, armed) = &mut self.landers[i];
        (l, armed)
    }

    fn done(&mut self, key: LandKey) {
        self.landers.retain(|(k, _, _)| *k != key);
        self.landed += 1;
    }
}

/// A fine-grained stop the Timeline asks the replay host for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAt {
    /// After this many more instruction boundaries.
    Steps(u64),
    /// At this exact point.
    Point(ExecPoint),
    /// At this exact point, reached with the landing algorithm over the
    /// machine's branch counter (needs `landing`).
    Land(crate::clock::pmu::Target),
}

impl ReplayHost {
    pub fn set_clock(&mut self, ns: u64) {
        self.last_clock = ns;
    }

    /// The last clock value the guest was given (or the checkpoint's clock).
    pub fn clock_ns(&self) -> u64 {
        self.last_clock
    }

    pub fn new(rec: Arc<Recording>, next: usize, output_len: u64, sink: Sink) -> ReplayHost {
        ReplayHost { rec, next, output_len, sink, last_clock: 0, expect: Vec::new(), stop_at: None, last_boundary: None, reached: false, landing: None, interrupt: None, scan: None, kick: None, kicked: false }
    }

    fn next_desc(&self) -> String {
        match self.rec.event(self.next) {
            Some(e) => format!("event #{} is {e}", self.next),
            None if self.rec.window_of.is_some() => {
                format!("the events read for this seek end before event #{} (replay without --to reads them all)", self.next)
            }
            None => "the log has no more events".into(),
        }
    }

    fn out_of_log(&self, what: String) -> HostError {
        if self.rec.is_complete() {
            ReplayStop::Divergence(format!("{what}, but {}", self.next_desc())).into()
        } else {
            let why = if self.rec.status.is_damaged() { "the event log is damaged from there on" } else { "the recording was cut short before that" };
            ReplayStop::EndOfRecording(format!("{what}, and {why} (event #{})", self.next)).into()
        }
    }

    /// Skips bookkeeping events (marks, checkpoints) at or before `exits`.
    fn skip_marks(&mut self, exits: u64) {
        while let Some(e) = self.rec.event(self.next).filter(|e| e.is_mark()) {
            if e.exits() > exits {
                break;
            }
            self.next += 1;
        }
    }

    fn stepped(&self) -> bool {
        self.rec.meta.clock.is_precise()
    }

    /// The point the landing heads for in exit interval `exits`: the next
    /// async event (precise recordings) or a `StopAt::Land` target, whichever
    /// comes first.
    fn landing_target(&self, exits: u64) -> Option<(LandKey, crate::clock::pmu::Target)> {
        use crate::clock::pmu::Target;
        let ev = self.next_async_idx().filter(|_| self.stepped()).and_then(|i| match self.rec.event(i)? {
            Event::Timer { at, fp, .. } | Event::Serial { at, fp, .. } => Some((LandKey::Event(i), Target { at: *at, fp: *fp })),
            _ => None,
        });
        let stop = match self.stop_at {
            Some(StopAt::Land(t)) => Some((LandKey::Stop, t)),
            _ => None,
        };
        let key = |t: &Target| (t.at.exits, t.at.branches);
        let first = match (ev, stop) {
            (Some(e), Some(s)) => Some(if key(&e.1) <= key(&s.1) { e } else { s }),
            (a, b) => a.or(b),
        };
        first.filter(|(_, t)| t.at.exits == exits)
    }

    /// With PMU landing: whether target `t` is reached at this poll. The
    /// lander is blind until the counter's overflow stop (or until the
    /// count is past the point the overflow was due, then it judges every
    /// stop it is shown). Errors on overshoot.
    fn land(&mut self, key: LandKey, t: crate::clock::pmu::Target, ctx: &PollCtx) -> Result<bool, HostError> {
        use crate::clock::pmu::{Pos, Verdict};
        let next = self.next;
        let Some(l) = self.landing.as_mut() else { return Ok(false) };
        let (Some(p), Some(pfp)) = (ctx.point(), ctx.fp) else { return Ok(false) };
        let (lander, _) = l.lander(key, t, next);
        let pos = Pos { at: p, fp: pfp };
        let (verdict, overflowed) = if lander.free_running() {
            if ctx.overflow {
                (lander.on_overflow(pos), true)
            } else if p.exits == t.at.exits && lander.overflow_at.is_none_or(|o| o <= p.branches) {
                lander.start_stepping();
                (lander.on_step(pos), false)
            } else {
                return Ok(false); // the counter has not overflowed: we see nothing
            }
        } else {
            (lander.on_step(pos), false)
        };
        if overflowed {
            l.overflows += 1;
        } else {
            l.steps += 1;
        }
        match verdict {
            Verdict::Arrived => {
                l.done(key);
                Ok(true)
            }
            Verdict::KeepStepping => Ok(false),
            Verdict::Overshoot(why) => Err(ReplayStop::Divergence(match key {
                LandKey::Event(idx) => format!("event #{idx}: {why}"),
                LandKey::Stop => format!("landing target: {why}"),
            }).into()),
        }
    }

    fn next_async_idx(&self) -> Option<usize> {
        let start = self.next.max(self.rec.events_base);
        self.rec
            .events_from(start)
            .iter()
            .take_while(|e| !matches!(e, Event::End { .. }))
            .position(|e| matches!(e, Event::Timer { .. } | Event::Serial { .. }))
            .map(|i| start + i)
    }

    /// The next asynchronous event (timer, serial) at or after `self.next`.
    fn next_async(&self) -> Option<&Event> {
        self.rec
            .events_from(self.next)
            .iter()
            .take_while(|e| !matches!(e, Event::End { .. }))
            .find(|e| matches!(e, Event::Timer { .. } | Event::Serial { .. }))
    }

    /// Hands out the async events recorded at this poll's point. With the
    /// exit clock that is the exit count; with the step clock the exact
    /// boundary (exits, branches, RIP, fingerprint), or — while the guest
    /// waits idle at an exit — that exit.
    fn collect(&mut self, ctx: &PollCtx, out: &mut Vec<Async>, waiting: bool) -> Result<(), HostError> {
        self.skip_marks(ctx.exits);
        loop {
            let (at, fp, a) = match self.rec.event(self.next) {
                Some(Event::Timer { at, fp, now_ns }) => (*at, *fp, Async::Timer { now_ns: *now_ns }),
                Some(Event::Serial { at, fp, bytes }) => (*at, *fp, Async::SerialInput(bytes.clone())),
                _ => return Ok(()),
            };
            if self.landing.is_some() && self.stepped() && ctx.overflow && at.exits < ctx.exits {
                // The overflow for this event skidded past the end of its
                // interval (reported here, at the exit): the lander's verdict.
                self.land(LandKey::Event(self.next), crate::clock::pmu::Target { at, fp }, ctx)?;
            }
            let landing = self.landing.is_some() && self.stepped() && !waiting;
            if landing {
                // The landing algorithm judges overshoot itself, with what a PMU lets it see.
                if self.land(LandKey::Event(self.next), crate::clock::pmu::Target { at, fp }, ctx)? {
                    self.expect.push((at, fp, self.next));
                    self.next += 1;
                    out.push(a);
                    continue;
                }
                if at.exits < ctx.exits {
                    return Err(ReplayStop::Divergence(format!(
                        "event #{} ({}) was due at {at}, but the guest is already at exit {}",
                        self.next, self.rec.events[self.next - self.rec.events_base], ctx.exits
                    )).into());
                }
                return Ok(());
            }
            let passed = at.exits < ctx.exits
                || (self.stepped() && ctx.rip.is_some() && at.exits == ctx.exits && at.branches < ctx.branches);
            if passed {
                let here = match ctx.point() {
                    Some(p) => p.to_string(),
                    None => format!("exit {}", ctx.exits),
                };
                return Err(ReplayStop::Divergence(format!(
                    "event #{} ({}) was due at {at}, but the guest is already at {here}",
                    self.next, self.rec.events[self.next - self.rec.events_base]
                )).into());
            }
            let now = if !self.stepped() {
                at.exits == ctx.exits
            } else if waiting {
                at.exits == ctx.exits && at.branches == 0 && ctx.rip.is_none_or(|r| r == at.rip)
            } else {
                ctx.point() == Some(at) && ctx.fp == Some(fp)
            };
            if !now {
                if ctx.point() == Some(at) {
                    tracing::debug!("at {at} but fingerprint {:?} != recorded {fp:#x}: a branch-free loop, or divergence", ctx.fp);
                }
                return Ok(());
            }
            self.expect.push((at, fp, self.next));
            self.next += 1;
            out.push(a);
        }
    }
}

impl Host for ReplayHost {
    fn now_ns(&mut self) -> u64 {
        self.last_clock
    }


    fn clock_read(&mut self, ctx: &PollCtx) -> Result<u64, HostError> {
        self.skip_marks(ctx.exits.saturating_sub(1));
        match self.rec.event(self.next) {
            Some(Event::Clock { exits, value }) if *exits == ctx.exits => {
                self.next += 1;
                self.last_clock = *value;
                Ok(*value)
            }
            Some(_) => Err(ReplayStop::Divergence(format!(
                "the guest read the clock at exit {}, but {}",
                ctx.exits,
                self.next_desc()
            )).into()),
            None => Err(self.out_of_log(format!("the guest read the clock at exit {}", ctx.exits))),
        }
    }

    fn output(&mut self, bytes: &[u8]) -> Result<(), HostError> {
        let start = self.output_len as usize;
        let rec = &self.rec.console;
        for (i, b) in bytes.iter().enumerate() {
            match rec.get(start + i) {
                Some(r) if r == b => {}
                Some(r) => {
                    return Err(ReplayStop::Divergence(format!(
                        "console output differs at byte {}: the recording has {:?}, the replay printed {:?}",
                        start + i,
                        *r as char,
                        *b as char
                    )).into())
                }
                None if self.rec.is_complete() => {
                    return Err(ReplayStop::Divergence(format!(
                        "the replay printed more than the recording's {} console bytes",
                        rec.len()
                    )).into())
                }
                None => {}
            }
        }
        self.output_len += bytes.len() as u64;
        match &mut self.sink {
            Sink::Discard => {}
            Sink::Stdout => {
                use std::io::Write;
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(bytes);
                let _ = o.flush();
            }
            Sink::Buffer(b) => b.extend_from_slice(bytes),
        }
        Ok(())
    }

    fn precise(&mut self, exits: u64) -> bool {
        match self.stop_at {
            Some(StopAt::Steps(_)) => return true,
            Some(StopAt::Point(p)) if p.exits <= exits => return true,
            _ => {}
        }
        if self.landing.is_some() {
            // The counter and the landing algorithm drive (counter_plan).
            return false;
        }
        // Step only across the exit interval that holds the next event.
        self.stepped() && matches!(self.next_async(), Some(e) if e.exits() <= exits)
    }

    fn counter_plan(&mut self, exits: u64, branches: u64) -> crate::vmm::counter::CounterPlan {
        use crate::vmm::counter::CounterPlan;
        let next = self.next;
        let Some((key, t)) = self.landing_target(exits) else { return CounterPlan::default() };
        let Some(l) = self.landing.as_mut() else { return CounterPlan::default() };
        let (lander, armed) = l.lander(key, t, next);
        if lander.free_running() {
            match lander.overflow_at {
                // Once programmed, it stays until the overflow stop (which
                // comes some skid after the count passed it).
                Some(o) if *armed || o > branches => {
                    *armed = true;
                    return CounterPlan { overflow_at: Some(o), breakpoint: None };
                }
                // Within the margin of where we stand: no overflow to wait for.
                _ => lander.start_stepping(),
            }
        }
        CounterPlan { overflow_at: None, breakpoint: Some(t.at.rip) }
    }

    fn attach(&mut self, kicker: crate::vmm::vcpu::Kicker) {
        if let Some(k) = &self.kick {
            k.attach(Some(kicker));
        }
    }

    fn detach(&mut self) {
        if let Some(k) = &self.kick {
            k.attach(None);
        }
    }

    fn poll(&mut self, ctx: &PollCtx, out: &mut Vec<Async>) -> Result<Control, HostError> {
        if !ctx.guest_caused && ctx.rip.is_none() && self.kick.as_ref().is_some_and(|k| k.requested()) {
            // Kicked out of the guest somewhere inside an exit interval.
            self.kicked = true;
            return Ok(Control::Pause);
        }
        if ctx.guest_caused {
            self.collect(ctx, out, false)?;
            if let Some(StopAt::Land(t)) = self.stop_at {
                if self.land(LandKey::Stop, t, ctx)? {
                    self.stop_at = None;
                    self.reached = true;
                    return Ok(Control::Pause);
                }
            }
            if let Some(flag) = &self.interrupt {
                if flag.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    return Ok(Control::Pause);
                }
            }
        }
        if let Some(p) = ctx.point() {
            self.last_boundary = Some(p);
            if let Some(scan) = &mut self.scan {
                if scan.at_poll(p, ctx.fp.unwrap_or(0), ctx.watch) {
                    self.reached = true;
                    return Ok(Control::Pause);
                }
            }
            match &mut self.stop_at {
                Some(StopAt::Steps(n)) => {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.stop_at = None;
                        self.reached = true;
                        return Ok(Control::Pause);
                    }
                }
                Some(StopAt::Point(t)) if *t == p => {
                    self.stop_at = None;
                    self.reached = true;
                    return Ok(Control::Pause);
                }
                Some(StopAt::Point(t)) if (t.exits, t.branches) < (p.exits, p.branches) => {
                    return Err(ReplayStop::NotReached(format!(
                        "the execution never stops at {t}: it goes on to {p} (is the RIP an instruction boundary at that branch count?)"
                    )).into());
                }
                _ => {}
            }
        }
        Ok(Control::Continue)
    }

    fn wait(&mut self, ctx: &PollCtx, out: &mut Vec<Async>) -> Result<(), HostError> {
        self.collect(ctx, out, true)?;
        if out.is_empty() {
            return Err(self.out_of_log(format!("the guest went idle at exit {} waiting for input", ctx.exits)));
        }
        Ok(())
    }

    fn delivered(&mut self, at: &ExecPoint, fp: u64, _events: &[Async]) -> Result<(), HostError> {
        for (want, want_fp, idx) in self.expect.drain(..) {
            if want != *at || want_fp != fp {
                return Err(ReplayStop::Divergence(format!(
                    "event #{idx} ({}): recorded at {want} with register fingerprint {want_fp:#x}, replay is at {at} with fingerprint {fp:#x}",
                    self.rec.events[idx - self.rec.events_base]
                )).into());
            }
        }
        Ok(())
    }
}
