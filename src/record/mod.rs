//! The recorder: runs the guest live and turns every non-deterministic input
//! into an event (the live host answers; we log what it answered and where).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

mod ckpt;
pub mod cover;
pub mod mover;
pub mod retain;
use ckpt::CheckpointWriter;
use crate::clock::{fingerprint, ClockKind, ExecPoint};
use crate::trace::{self, EndReason, Event, FileInfo, HostInfo, LogWriter, Meta};
use crate::vmm::{
    Async, Console, Control, Host, HostError, Image, LiveHost, Machine, MachineError, PollCtx, Stop,
    VmConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{0} already exists and is not empty; choose another -o or remove it")]
    Exists(String),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("clock 'pmu' unavailable: {0}. Use --clock pmu-sim (same timestamps, counted by single-stepping), step or exit; `revirt doctor` explains")]
    NoPmu(#[source] crate::vmm::counter::PmuError),
    #[error(transparent)]
    Image(#[from] crate::vmm::image::ImageError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Meta(#[from] trace::MetaError),
    #[error(transparent)]
    Log(#[from] trace::LogError),
    #[error(transparent)]
    Checkpoint(#[from] trace::CheckpointError),
    #[error("writing a checkpoint: {0}")]
    CheckpointWriter(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> RecordError + 'a {
    move |source| RecordError::Io { what, path: path.display().to_string(), source }
}

/// `--keep-checkpoints`' default: the newest 16 checkpoints (16 s at the
/// default interval) at full density, then 16 per doubling of age.
pub const DEFAULT_KEEP_CHECKPOINTS: u32 = 16;

pub struct RecordOptions {
    pub image: PathBuf,
    pub config: VmConfig,
    pub out: PathBuf,
    pub clock: ClockKind,
    /// Host time between incremental checkpoints; zero disables them.
    pub checkpoint_every: Duration,
    /// Retention: keep the newest this many checkpoints, thinning older
    /// ones log-spaced (record::retain); 0 keeps every checkpoint.
    pub keep_checkpoints: u32,
    /// The recording this one continues, if any (written to meta.json).
    pub parent: Option<trace::meta::Parent>,
    /// A control socket through which `revirt migrate` may move the VM.
    pub control: Option<std::sync::Arc<dyn mover::Mover>>,
    /// The counter `--clock pmu` uses (None: the hardware PMU's).
    pub pmu_counter: Option<crate::vmm::counter::CounterOpener>,
}

impl RecordOptions {
    fn pmu_opener(&self) -> crate::vmm::counter::CounterOpener {
        self.pmu_counter.clone().unwrap_or_else(crate::clock::pmu::hardware_opener)
    }
}

#[derive(Debug)]
pub struct RecordSummary {
    pub dir: PathBuf,
    pub stop: EndReason,
    pub exits: u64,
    pub events: u64,
    pub log_bytes: u64,
    pub checkpoints: u32,
    pub checkpoint_bytes: u64,
    /// Checkpoints the retention policy dropped, and the bytes of the
    /// checkpoint files left on disk.
    pub checkpoints_dropped: u32,
    pub checkpoint_bytes_kept: u64,
    pub wall: Duration,
    /// Longest a due timer interrupt waited for a guest-caused exit (exit clock).
    pub max_irq_delay: Duration,
    /// Empty when the VM migrated away (the recording goes on at the destination).
    pub state_hash: String,
    /// The guest's pause for each incremental checkpoint (median, max) and
    /// the median pages copied, when there were any.
    pub checkpoint_pauses: Option<(Duration, Duration, u64)>,
    /// Checkpoints that first waited for the writer to catch up: (how many, median wait).
    pub checkpoint_waits: (usize, Duration),
    /// Median CPU time of the vCPU thread in a checkpoint pause.
    pub checkpoint_pause_cpu: Duration,
    /// Where the recorder's CPU went: (the vCPU thread in all, the vCPU
    /// thread in checkpoint pauses, the checkpoint thread). The benchmark
    /// splits a checkpoint's cost with it (scripts/bench.sh).
    pub thread_cpu: (Duration, Duration, Duration),
    /// The VM moved to another host mid-recording; this end holds the
    /// recording up to the move and no End event.
    pub migrated: Option<mover::MoveSummary>,
}

fn file_info(path: &Path, bytes: &[u8]) -> FileInfo {
    FileInfo {
        original_path: path.display().to_string(),
        sha256: trace::sha256_hex(bytes),
        size: bytes.len() as u64,
    }
}

/// The live host, plus a log of everything it told the guest.
struct RecordHost {
    inner: LiveHost,
    log: LogWriter,
    clock: ClockKind,
    events: u64,
    console: BufWriter<File>,
    output: Sha256,
    output_len: u64,
    /// console.log's length at its last `ConsoleFile` binding, and when.
    console_bound: u64,
    console_bound_at: Instant,
    last_event: Instant,
    checkpoint_every: Duration,
    last_checkpoint: Instant,
    starving_since: Option<Instant>,
    max_irq_delay: Duration,
    warned_starving: bool,
    /// Instruction boundaries seen since the last timer interrupt (step clock).
    steps_since_tick: u64,
    /// Simulated PMU clock: the machine's step count at the last timer
    /// interrupt, and at the last poll.
    steps_at_tick: u64,
    last_poll_steps: u64,
    /// A due timer was held back (the stepped guest must get on first):
    /// stop again at this branch count of this exit interval.
    slice: Option<(u64, u64)>,
}

const MARK_EVERY: Duration = Duration::from_millis(100);
/// While single-stepping, the guest runs ~10^4 times slower than real time,
/// so a host-time timer could fire again before its handler returns and
/// starve the guest forever. Stepped recordings therefore let at least this
/// many instructions pass between two timer interrupts.
const MIN_STEPS_PER_TICK: u64 = 500;
const STARVE_WARN: Duration = Duration::from_millis(100);
/// Simulated PMU clock: a held-back timer is looked at again this many
/// branches later (the counter's overflow, as rr time-slices with it).
const SLICE_BRANCHES: u64 = 4;
/// Largest skid of the simulated counter while recording.
const SIM_RECORD_SKID: u64 = 16;

impl RecordHost {
    fn log(&mut self, e: Event) {
        self.log.push(e);
        self.events += 1;
        self.last_event = Instant::now();
    }

    /// Binds console.log as it stands into the chain (`ConsoleFile`) if it
    /// grew since the last binding: the bytes go to the kernel first, so
    /// the file holds at least what the event vouches for.
    fn bind_console(&mut self, exits: u64) -> std::io::Result<()> {
        if self.output_len == self.console_bound {
            return Ok(());
        }
        self.console.flush()?;
        let sha256 = hex::encode(self.output.clone().finalize());
        self.log(Event::ConsoleFile { exits, len: self.output_len, sha256 });
        self.console_bound = self.output_len;
        self.console_bound_at = Instant::now();
        Ok(())
    }
}

impl Host for RecordHost {
    fn now_ns(&mut self) -> u64 {
        self.inner.now_ns()
    }

    fn clock_read(&mut self, ctx: &PollCtx) -> Result<u64, HostError> {
        let value = self.inner.clock_read(ctx)?;
        self.log(Event::Clock { exits: ctx.exits, value });
        Ok(value)
    }

    fn output(&mut self, bytes: &[u8]) -> Result<(), HostError> {
        self.inner.output(bytes)?;
        self.output.update(bytes);
        self.output_len += bytes.len() as u64;
        self.console
            .write_all(bytes)
            .map_err(|source| HostError::Io { what: "writing console.log", source })
    }

    fn precise(&mut self, _exits: u64) -> bool {
        // The step clock delivers at any instruction boundary: step
        // everything. The PMU clocks run on their counter (which steps by
        // itself when simulated) and stop when kicked.
        matches!(self.clock, ClockKind::Step)
    }

    fn counter_plan(&mut self, exits: u64, _branches: u64) -> crate::vmm::counter::CounterPlan {
        match self.slice {
            // Until the overflow stop comes (skid late) and a poll renews or clears it.
            Some((e, at)) if e == exits => {
                crate::vmm::counter::CounterPlan { overflow_at: Some(at), breakpoint: None }
            }
            _ => crate::vmm::counter::CounterPlan::default(),
        }
    }

    fn poll(&mut self, ctx: &PollCtx, out: &mut Vec<Async>) -> Result<Control, HostError> {
        let deterministic = match self.clock {
            // Exact points: every step, or the counter's stops (exits,
            // kicks, overflows) where the count and registers were read.
            ClockKind::Step | ClockKind::PmuSim | ClockKind::Pmu => ctx.rip.is_some(),
            ClockKind::Exit => ctx.guest_caused,
        };
        if !deterministic {
            // Not a deterministic point: whatever is due waits for the next
            // guest-caused exit. Note how long a due timer waits.
            // (The exit clock's concern: the counter clocks are kicked and stop
            // at once; a held-back timer there is the stepped guest's pacing.)
            let due = self.clock == ClockKind::Exit
                && matches!(ctx.timer_deadline_ns, Some(d) if self.inner.now_ns() >= d);
            if due && self.starving_since.is_none() {
                self.starving_since = Some(Instant::now());
            }
            return Ok(Control::Continue);
        }
        self.inner.poll(ctx, out)?;
        self.last_poll_steps = ctx.steps;
        match self.clock {
            ClockKind::Step => {
                self.steps_since_tick += 1;
                if self.steps_since_tick < MIN_STEPS_PER_TICK {
                    // Not yet: the timer stays due (its deadline did not move) and comes back.
                    out.retain(|a| !matches!(a, Async::Timer { .. }));
                }
            }
            ClockKind::PmuSim if ctx.steps.saturating_sub(self.steps_at_tick) < MIN_STEPS_PER_TICK => {
                let n = out.len();
                out.retain(|a| !matches!(a, Async::Timer { .. }));
                if out.len() != n && !matches!(self.slice, Some((e, at)) if e == ctx.exits && at > ctx.branches) {
                    // Held back: have the counter stop us again a little later.
                    self.slice = Some((ctx.exits, ctx.branches + SLICE_BRANCHES));
                }
            }
            _ => {}
        }
        if self.output_len != self.console_bound && self.console_bound_at.elapsed() >= MARK_EVERY {
            self.bind_console(ctx.exits).map_err(|source| HostError::Io { what: "writing console.log", source })?;
        }
        if self.last_event.elapsed() >= MARK_EVERY {
            self.log(Event::Mark { exits: ctx.exits });
        }
        if !self.checkpoint_every.is_zero() && self.last_checkpoint.elapsed() >= self.checkpoint_every {
            return Ok(Control::Pause);
        }
        Ok(Control::Continue)
    }

    fn wait(&mut self, ctx: &PollCtx, out: &mut Vec<Async>) -> Result<(), HostError> {
        self.inner.wait(ctx, out)
    }

    fn delivered(&mut self, at: &ExecPoint, fp: u64, events: &[Async]) -> Result<(), HostError> {
        for e in events {
            match e {
                Async::Timer { now_ns } => {
                    self.steps_since_tick = 0;
                    self.steps_at_tick = self.last_poll_steps;
                    self.slice = None;
                    if let Some(since) = self.starving_since.take() {
                        let d = since.elapsed();
                        self.max_irq_delay = self.max_irq_delay.max(d);
                        if d > STARVE_WARN && !self.warned_starving {
                            self.warned_starving = true;
                            tracing::warn!(
                                "the guest ran {} ms without a guest-caused exit, so a timer interrupt waited that long \
                                 (exit clock delivers interrupts only at exits; --clock step delivers them at their natural instant)",
                                d.as_millis()
                            );
                        }
                    }
                    self.log(Event::Timer { at: *at, fp, now_ns: *now_ns });
                }
                Async::SerialInput(bytes) => self.log(Event::Serial { at: *at, fp, bytes: bytes.clone() }),
            }
        }
        Ok(())
    }

    fn attach(&mut self, k: crate::vmm::vcpu::Kicker) {
        // Stepping returns to us after every instruction: no kicks needed, and
        // a kick landing mid-step would make the step's outcome depend on timing.
        // The PMU clocks are kicked when something is due, like the exit
        // clock; the simulated counter turns a kick that lands mid-step into
        // a stop at the next boundary.
        if self.clock != ClockKind::Step {
            self.inner.attach(k)
        }
    }
    fn detach(&mut self) {
        self.inner.detach()
    }
}

/// Creates the recording directory and writes everything known before the
/// guest runs: meta.json, the image copy, the disk copy (from `disk_now`,
/// the disk's current contents, which may differ from `opts.config.disk`'s
/// original when continuing from a replay).
fn prepare(opts: &RecordOptions, image_bytes: &[u8], disk_now: Option<&Path>) -> Result<Meta, RecordError> {
    if opts.clock == ClockKind::Pmu {
        // The counter must open and count the start-up probe guest exactly
        // (clock::probe); say why not before anything is written. The
        // session opens its own on the thread that runs the guest.
        crate::clock::probe::check(&opts.pmu_opener()).map_err(RecordError::NoPmu)?;
    }
    let files = trace::Dir::new(&opts.out);
    let dir = files.root();
    if files.is_occupied() {
        return Err(RecordError::Exists(dir.display().to_string()));
    }
    files.create().map_err(io("creating", dir))?;
    std::fs::write(files.image(), image_bytes).map_err(io("writing", dir))?;
    let disk = match disk_now {
        Some(d) => {
            let bytes = std::fs::read(d).map_err(io("reading disk", d))?;
            std::fs::write(files.disk(), &bytes).map_err(io("writing", dir))?;
            Some(file_info(opts.config.disk.as_deref().unwrap_or(d), &bytes))
        }
        None => None,
    };
    let meta = Meta {
        format: trace::meta::FORMAT.into(),
        version: trace::meta::VERSION,
        id: trace::meta::new_id(),
        revirt_version: env!("CARGO_PKG_VERSION").into(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        clock: opts.clock,
        config: VmConfig {
            disk: disk_now.map(|_| trace::Dir::disk_name()),
            ..opts.config.clone()
        },
        image: file_info(&opts.image, image_bytes),
        disk,
        host: HostInfo::probe(),
        checkpoint_every_ms: opts.checkpoint_every.as_millis() as u64,
        checkpoint_keep: (opts.keep_checkpoints > 0).then_some(opts.keep_checkpoints),
        parent: opts.parent.clone(),
    };
    meta.write(&files.meta())?;
    // An empty log right away: a recorder killed before its first event
    // leaves a recording that says it is empty, not one without a log.
    trace::log::create_empty(&files.events())?;
    Ok(meta)
}

/// Boots `opts.image` and records it until it powers off.
pub fn record(opts: &RecordOptions, input: Box<dyn Read + Send>, console: Console) -> Result<RecordSummary, RecordError> {
    let image_bytes = std::fs::read(&opts.image).map_err(io("reading image", &opts.image))?;
    let image = Image::parse(&image_bytes)?;
    image.check_fits(opts.config.mem_size)?;
    prepare(opts, &image_bytes, opts.config.disk.as_deref())?;
    let m = Machine::boot(&opts.config, &image)?;
    session(opts, m, input, console, 0)
}

/// Records an already running machine (e.g. one restored from a replay and
/// going live): the new recording starts with a full checkpoint of it.
/// `image` is the image it was booted from; its disk is copied as it is now;
/// the guest clock continues from `clock_ns`.
pub fn record_from(
    opts: &RecordOptions,
    image_bytes: &[u8],
    m: Machine,
    input: Box<dyn Read + Send>,
    console: Console,
    clock_ns: u64,
) -> Result<RecordSummary, RecordError> {
    let disk_now = m.devices.block.path().map(Path::to_path_buf);
    prepare(opts, image_bytes, disk_now.as_deref())?;
    session(opts, m, input, console, clock_ns)
}

fn session(
    opts: &RecordOptions,
    mut m: Machine,
    input: Box<dyn Read + Send>,
    console: Console,
    clock_ns: u64,
) -> Result<RecordSummary, RecordError> {
    let dir = &opts.out;
    let files = trace::Dir::new(dir);
    let log = LogWriter::create(&files.events(), trace::log::genesis_of(dir)?)?;
    let console_path = files.console();
    let console_file = File::create(&console_path).map_err(io("creating", &console_path))?;
    let mut s = Session {
        dir: dir.clone(),
        host: RecordHost::new(LiveHost::new(input, console, clock_ns), log, opts.clock, console_file, opts.checkpoint_every),
        checkpoints: 0,
        ckpt: CheckpointWriter::start(dir, opts.keep_checkpoints, Vec::new(), true)?,
        start: Instant::now(),
        control: opts.control.clone(),
        pmu_counter: opts.pmu_opener(),
    };
    let regs = m.vcpu.regs().map_err(MachineError::from)?;
    s.host.log(Event::Checkpoint { id: 0, exits: m.exits, fp: fingerprint(&regs) });
    s.ckpt.take(dir, &mut m, 0, s.host.events, 0, clock_ns)?;
    s.checkpoints = 1;
    s.bind_checkpoints(m.exits)?;
    s.run(m)
}

impl RecordHost {
    fn new(inner: LiveHost, log: LogWriter, clock: ClockKind, console: File, checkpoint_every: Duration) -> RecordHost {
        RecordHost {
            inner,
            log,
            clock,
            events: 0,
            console: BufWriter::new(console),
            output: Sha256::new(),
            output_len: 0,
            console_bound: 0,
            console_bound_at: Instant::now(),
            last_event: Instant::now(),
            checkpoint_every,
            last_checkpoint: Instant::now(),
            starving_since: None,
            max_irq_delay: Duration::ZERO,
            warned_starving: false,
            steps_since_tick: 0,
            steps_at_tick: 0,
            last_poll_steps: 0,
            slice: None,
        }
    }
}

/// The PMU clocks: the run loop drives a branch counter (reset at every
/// exit, read at every stop where the host delivers).
fn install_counter(m: &mut Machine, clock: ClockKind, opener: &crate::vmm::counter::CounterOpener) -> Result<(), RecordError> {
    match clock {
        ClockKind::Pmu => {
            // The very counter that will time this recording, on this
            // (vCPU) thread, passes the start-up probe first (also where
            // no `prepare` ran: a migration's destination).
            let mut c = opener().map_err(RecordError::NoPmu)?;
            crate::clock::probe::verify(&mut *c).map_err(RecordError::NoPmu)?;
            m.set_counter(Some(c))?;
        }
        ClockKind::PmuSim => {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as u64)
                .unwrap_or(1);
            m.set_counter(Some(Box::new(crate::vmm::counter::SimCounter::new(SIM_RECORD_SKID, seed, true))))?;
        }
        _ => {}
    }
    Ok(())
}

/// A recording in progress: the recorder host, the checkpoint series, and
/// (optionally) a migration controller that may move the VM elsewhere.
pub struct Session {
    dir: PathBuf,
    host: RecordHost,
    checkpoints: u32,
    ckpt: CheckpointWriter,
    start: Instant,
    control: Option<std::sync::Arc<dyn mover::Mover>>,
    /// The counter `--clock pmu` uses.
    pmu_counter: crate::vmm::counter::CounterOpener,
}

impl Session {
    /// Continues a recording whose files (meta, image, disk, checkpoints,
    /// the log up to `rs.log`, the console up to `rs.output_len`) were
    /// copied into `dir` by a migration; `m` is the migrated machine.
    pub fn resume(
        dir: &Path,
        m: &Machine,
        rs: &mover::RecorderState,
        live: LiveHost,
        from_host: &str,
        control: Option<std::sync::Arc<dyn mover::Mover>>,
    ) -> Result<Session, RecordError> {
        let files = trace::Dir::new(dir);
        let meta = Meta::read(&files.meta())?;
        let log = LogWriter::append(&files.events(), &rs.log)?;
        let console_path = files.console();
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&console_path)
            .map_err(io("opening", &console_path))?;
        f.set_len(rs.output_len).map_err(io("truncating", &console_path))?;
        let mut before = Vec::new();
        f.read_to_end(&mut before).map_err(io("reading", &console_path))?;
        let mut host = RecordHost::new(live, log, meta.clock, f, Duration::from_millis(meta.checkpoint_every_ms));
        host.output.update(&before);
        host.output_len = rs.output_len;
        // The source bound it this far before the move.
        host.console_bound = rs.output_len;
        host.events = rs.events;
        m.dirty_log().seed_checkpoint(&rs.ckpt_pages, &rs.ckpt_sectors);
        // The checkpoints the retention policy kept at the source.
        let kept = if rs.kept_checkpoints.is_empty() {
            (0..rs.checkpoints).filter(|&id| files.has_checkpoint(id)).collect()
        } else {
            rs.kept_checkpoints.clone()
        };
        host.log(Event::Migrated { exits: m.exits, from: from_host.to_string(), to: crate::trace::meta::hostname() });
        Ok(Session {
            dir: dir.to_path_buf(),
            host,
            checkpoints: rs.checkpoints,
            // A recording older than format version 4 gets no claims (its readers could not decode them).
            ckpt: CheckpointWriter::start(dir, meta.checkpoint_keep.unwrap_or(0), kept, meta.version >= 4)?,
            start: Instant::now(),
            control,
            pmu_counter: crate::clock::pmu::hardware_opener(),
        })
    }

    /// Binds the checkpoint files that have landed since the last call into
    /// the log's hash chain (`CheckpointFile`, logged at exit `exits`: the
    /// file is written by another thread, so this comes after its
    /// `Checkpoint` event, at the latest before `End`).
    fn bind_checkpoints(&mut self, exits: u64) -> Result<(), RecordError> {
        self.ckpt.poll()?;
        for (id, sha256) in std::mem::take(&mut self.ckpt.landed) {
            self.host.log(Event::CheckpointFile { id, exits, sha256 });
        }
        // Retention: the drops (an empty SHA-256) and the merged files' new
        // SHA-256 go into the chain first (checkpoint::Seals: the latest
        // binding wins); the files change once the log holds them.
        for t in std::mem::take(&mut self.ckpt.thinned) {
            for &(id, _) in &t.dropped {
                self.host.log(Event::CheckpointFile { id, exits, sha256: String::new() });
            }
            for (id, w) in &t.rewritten {
                self.host.log(Event::CheckpointFile { id: *id, exits, sha256: w.sha256.clone() });
            }
            let logged = self.host.log.head_later()?;
            self.ckpt.commit(logged, &t)?;
        }
        // After the bindings they are about (a claim names its file's SHA-256).
        for (id, by, sha256) in std::mem::take(&mut self.ckpt.covered) {
            self.host.log(Event::CheckpointCovered { id, by, exits, sha256 });
        }
        Ok(())
    }

    /// Waits until every checkpoint is written, bound into the chain and
    /// thinned as the policy says.
    fn settle_checkpoints(&mut self, exits: u64) -> Result<(), RecordError> {
        loop {
            self.ckpt.wait()?;
            self.bind_checkpoints(exits)?;
            if self.ckpt.idle() {
                return Ok(());
            }
        }
    }

    /// Input that arrived before the move, handed to the guest first.
    pub fn push_input(&mut self, bytes: &[u8]) {
        self.host.inner.push_input(bytes);
    }

    /// Records until the guest stops, or until it migrates away.
    pub fn run(mut self, mut m: Machine) -> Result<RecordSummary, RecordError> {
        install_counter(&mut m, self.host.clock, &self.pmu_counter)?;
        let dir = self.dir.clone();
        let files = trace::Dir::new(&dir);
        let console_path = files.console();
        if let Some(c) = &self.control {
            c.attach(&m, Some(mover::RecordingInfo {
                dir: dir.clone(),
                id: Meta::read(&files.meta())?.id,
                clock: self.host.clock,
            }));
            c.shared().set_waker(self.host.inner.waker());
        }
        let mut migrated = None;
        let end = loop {
            let r = match &self.control {
                Some(c) => m.run(&mut crate::vmm::pausable::Pausable::new(&mut self.host, c.shared().clone()), None),
                None => m.run(&mut self.host, None),
            };
            match r {
                Ok(Stop::Paused) if self.control.as_ref().is_some_and(|c| c.shared().stop_requested()) => {
                    migrated = self.hand_over(&mut m, &console_path)?;
                    if migrated.is_some() {
                        break EndReason::Stopped;
                    }
                    // Not committed: record on here.
                }
                Ok(Stop::Paused) => self.checkpoint(&mut m, &console_path)?,
                Ok(Stop::PowerOff(s)) => break EndReason::PowerOff(s),
                Ok(Stop::Panic(p)) => {
                    tracing::warn!("recorded guest crashed: {p}");
                    break EndReason::Panic(p.vector);
                }
                Err(e) => {
                    // Keep what was recorded; the log ends without End and says so.
                    let _ = self.ckpt.finish();
                    let RecordHost { log, .. } = self.host;
                    let _ = log.finish();
                    return Err(e.into());
                }
            }
        };
        if let (Some(c), None) = (&self.control, &migrated) {
            c.ended(&match &end {
                EndReason::PowerOff(s) => format!("powered off (status {s})"),
                EndReason::Panic(v) => format!("crashed (exception vector {v})"),
                EndReason::Stopped => "stopped".into(),
            });
        }
        self.finish(m, end, migrated)
    }

    /// A requested move: everything the recorder holds goes to the mover,
    /// which commits it (Some: the VM left) or not (record on here). The
    /// downtime starts here: finishing the checkpoint in flight, the log
    /// flush and the dirty-log sync are in it.
    fn hand_over(&mut self, m: &mut Machine, console_path: &Path) -> Result<Option<mover::MoveSummary>, RecordError> {
        let stopped = Instant::now();
        let c = self.control.clone().expect("a move needs a mover");
        self.settle_checkpoints(m.exits)?;
        self.host.bind_console(m.exits).map_err(io("writing", console_path))?;
        let head = self.host.log.head()?;
        let (ckpt_pages, ckpt_sectors) = m.dirty_log().checkpoint_pending()?;
        let rs = mover::RecorderState {
            events: self.host.events,
            log: head,
            checkpoints: self.checkpoints,
            output_len: self.host.output_len,
            ckpt_pages,
            ckpt_sectors,
            kept_checkpoints: self.ckpt.kept.iter().copied().collect(),
        };
        let clock = self.host.inner.now_ns();
        Ok(c.finish(m, &mut self.host.inner, clock, rs, stopped))
    }

    /// A periodic checkpoint: logged at this exit, taken (the vCPU pauses
    /// only for the copy), and bound into the log's chain.
    fn checkpoint(&mut self, m: &mut Machine, console_path: &Path) -> Result<(), RecordError> {
        let fp = fingerprint(&m.vcpu.regs().map_err(MachineError::from)?);
        let id = self.checkpoints;
        self.host.bind_console(m.exits).map_err(io("writing", console_path))?;
        self.host.log(Event::Checkpoint { id, exits: m.exits, fp });
        let now = self.host.inner.now_ns();
        self.bind_checkpoints(m.exits)?;
        self.ckpt.take(&self.dir, m, id, self.host.events, self.host.output_len, now)?;
        self.bind_checkpoints(m.exits)?;
        self.checkpoints += 1;
        self.host.last_checkpoint = Instant::now();
        self.host.log.cut();
        Ok(())
    }

    /// Ends the recording: the final state hash, every checkpoint settled
    /// and bound, the console flushed, End logged (unless the VM moved
    /// away: the recording goes on at the destination), the log sealed.
    fn finish(mut self, mut m: Machine, end: EndReason, migrated: Option<mover::MoveSummary>) -> Result<RecordSummary, RecordError> {
        let files = trace::Dir::new(&self.dir);
        let console_path = files.console();
        let state_hash = if migrated.is_some() { String::new() } else { m.state_hash()? };
        // Every checkpoint file on disk, thinned and bound into the chain before End.
        self.settle_checkpoints(m.exits)?;
        let checkpoint_bytes = self.ckpt.finish()?;
        let checkpoint_bytes_kept = files.checkpoint_bytes();
        self.host.console.flush().map_err(io("writing", &console_path))?;
        let output_sha256 = hex::encode(self.host.output.clone().finalize());
        let (mut events, output_len, max_irq_delay) = (self.host.events, self.host.output_len, self.host.max_irq_delay);
        if migrated.is_none() {
            events += 1;
            self.host.log(Event::End { exits: m.exits, reason: end.clone(), state_hash: state_hash.clone(), output_len, output_sha256 });
        }
        let in_pauses: Duration = self.ckpt.pause_cpu.iter().sum();
        let thread_cpu = (ckpt::thread_cpu(), in_pauses, self.ckpt.thread_cpu);
        let (checkpoint_pauses, checkpoint_pause_cpu, checkpoint_waits) = pause_figures(&mut self.ckpt);
        let RecordHost { log, .. } = self.host;
        let stats = log.finish()?;
        Ok(RecordSummary {
            dir: self.dir,
            stop: end,
            exits: m.exits,
            events,
            log_bytes: stats.compressed_bytes,
            checkpoints: self.checkpoints,
            checkpoint_bytes,
            checkpoints_dropped: self.ckpt.dropped,
            checkpoint_bytes_kept,
            checkpoint_pauses,
            checkpoint_waits,
            checkpoint_pause_cpu,
            thread_cpu,
            wall: self.start.elapsed(),
            max_irq_delay,
            state_hash,
            migrated,
        })
    }
}

/// The checkpoint pauses for the summary: (median, max, median pages
/// copied), the median CPU of a pause, and (how many waited for the writer,
/// the median wait).
#[allow(clippy::type_complexity)]
fn pause_figures(ck: &mut CheckpointWriter) -> (Option<(Duration, Duration, u64)>, Duration, (usize, Duration)) {
    let p = &mut ck.pauses;
    let mut pages: Vec<u64> = p.iter().map(|x| x.1).collect();
    p.sort();
    pages.sort_unstable();
    let pauses = p.last().map(|max| (p[p.len() / 2].0, max.0, pages[pages.len() / 2]));
    let c = &mut ck.pause_cpu;
    c.sort();
    let cpu = c.get(c.len() / 2).copied().unwrap_or_default();
    let w = &mut ck.waits;
    w.sort();
    (pauses, cpu, (w.len(), w.get(w.len() / 2).copied().unwrap_or_default()))
}
