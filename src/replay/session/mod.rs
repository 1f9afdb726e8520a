//! Time travel over a [`Timeline`] for every front end (gdb, inspect):
//! positions, breakpoints and watchpoints, forward and reverse stepping and
//! continuing (rr's ReplayTimeline; gdb/ only speaks the protocol).
//!
//! Exactness first: every stop is an instruction boundary reached by
//! single-stepping (or a guest-caused exit reached by running free), and a
//! position is remembered as "exit boundary `e`, then `k` single steps", so
//! going back to it is: restore the latest in-memory snapshot (see
//! `snapshots`) or recording checkpoint before it, replay to exit `e`, step
//! to `k`. See docs/debugging.md.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::clock::{fingerprint, ExecPoint};
use crate::replay::{Outcome, Recording, ReplayError, Sink, Timeline};

use super::snapshots::{leads_to, rank, At, Snapshots};
use crate::replay::search::{Scan, ScanStop, WATCH};

mod forward;
mod memory;
mod native;
mod prev;
mod reverse;

/// Something went wrong below the debugger (KVM, a damaged recording, a divergence).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("replay diverged: {0}")]
    Diverged(String),
    #[error("{0}")]
    Lost(String),
}

type R<T> = Result<T, SessionError>;

/// What a watchpoint watches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    Write,
    Read,
    Access,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub addr: u64,
    pub len: u64,
    pub kind: WatchKind,
}

/// Why a run stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopWhy {
    /// One instruction was executed (or undone).
    Step,
    /// A breakpoint address was reached.
    Breakpoint(u64),
    /// A watched range was written (forward: just after the writing
    /// instruction; reverse: just before it).
    Watch { addr: u64, kind: WatchKind },
    /// The end of the recording (the guest stopped or the log ends).
    End,
    /// The start of the recording.
    Begin,
    /// The client asked to stop (Ctrl-C).
    Interrupted,
}

/// Where the session is: a guest-caused exit count `exits` (the machine as
/// it is right after that exit), then optionally the `n`-th arrival at RIP
/// `r` (`anchor`: reached at native speed with one counting breakpoint,
/// `replay::search`), then `steps` single steps; plus the execution point
/// and register fingerprint found there (a check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub exits: u64,
    pub anchor: Option<(u64, u64)>,
    pub steps: u64,
    pub point: ExecPoint,
    pub fp: u64,
    /// The guest stopped (powered off, panicked) or the log ended here.
    pub end: bool,
}

impl Pos {
    /// The position's key: (exit, anchor, steps).
    pub fn at(&self) -> At {
        (self.exits, self.anchor, self.steps)
    }

    /// The same machine state as far as a position can tell: exit count,
    /// RIP and register fingerprint.
    pub fn same_state(&self, o: &Pos) -> bool {
        same_point(&self.point, &o.point) && self.fp == o.fp
    }
}

/// Exit count and RIP agree. (The branch count is known only where the
/// guest was stepped: a native-speed run does not count branches.)
pub fn same_point(a: &ExecPoint, b: &ExecPoint) -> bool {
    a.exits == b.exits && a.rip == b.rip
}

pub struct Session {
    pub rec: Arc<Recording>,
    pub tl: Timeline,
    pos: Pos,
    /// Why the timeline cannot go forward from here (the end of the recording).
    pub end_note: Option<String>,
    pub breakpoints: BTreeSet<u64>,
    pub watches: Vec<Watch>,
    /// Polled every `POLL_EVERY` steps during long runs; true = stop now.
    pub interrupted: Option<Box<dyn FnMut() -> bool>>,
    /// A front end's Ctrl-C from another thread: also stops a native run
    /// inside an exit interval (see `replay::interrupt`).
    pub interrupter: Option<Arc<crate::replay::interrupt::Interrupter>>,
    /// Steps taken since the session began (for `monitor stats`).
    pub steps_taken: u64,
    /// In-memory snapshots taken while going back (see `snapshots`).
    pub snaps: Snapshots,
    /// For a position at an exit boundary or an anchor: the boundary just
    /// before it, once a reverse step has counted it.
    prev_boundary: HashMap<At, Pos>,
    /// Breakpoint arrivals counted since the current exit boundary, for
    /// these sites, valid at this position (a forward continue goes on
    /// counting from them instead of recounting the interval).
    arrivals: Option<Arrivals>,
    /// Native-speed runs (breakpoints without single-stepping) so far.
    pub native_runs: u64,
    /// Data watchpoints run natively: physical start -> (length, the
    /// virtual address gdb set it at).
    watch_phys: HashMap<u64, (u64, u64, WatchKind)>,
    /// Continue and reverse-continue with breakpoints only run the guest
    /// free between hits (default; `REVIRT_GDB_NATIVE=0` turns it off: the
    /// single-stepping path, kept as the oracle).
    pub native: bool,
    /// A page watched for reads turned out to hold running code (or tables
    /// the CPU reads): read/access watchpoints are stepped from then on.
    pub watched_code: bool,
    /// A native run with breakpoints patched in diverged from the recording
    /// (the guest read its own code under an `int3`): breakpoints are
    /// single-stepped from then on, and `note` says so once.
    pub patched_diverged: bool,
    /// Something the user should be told once (printed on stderr as well).
    pub note: Option<String>,
}

/// Arrivals (key, count) at these keys since the exit boundary, valid at a position.
type Arrivals = (At, BTreeSet<u64>, Vec<(u64, u64)>);

/// Fewer steps than this to a target: no snapshot halfway.
const SNAP_HALFWAY_MIN: u64 = 16;
/// While a reverse step counts the previous exit interval: a snapshot every
/// this many steps, so going to its last boundary afterwards is short.
const SCAN_SNAP_EVERY: u64 = 64;

const POLL_EVERY: u64 = 512;

/// A reverse step at the n-th arrival at a RIP first tries stepping from
/// the arrival before it, for at most this many steps (a loop's body).
const LOOP_STEPS: u64 = 4096;

impl Session {
    /// Opens a session at exit `at` (0 = the start of the recording).
    /// In-memory snapshots are on unless `REVIRT_GDB_SNAPSHOTS=0`.
    pub fn open(rec: Arc<Recording>, at: u64) -> R<Session> {
        let on = !std::env::var("REVIRT_GDB_SNAPSHOTS").is_ok_and(|v| v == "0" || v == "off");
        Session::open_with(rec, at, on)
    }

    /// Like [`Session::open`], with in-memory snapshots on or off (off: every
    /// move back restores a recording checkpoint and replays, as before).
    pub fn open_with(rec: Arc<Recording>, at: u64, snapshots: bool) -> R<Session> {
        let tl = Timeline::open(rec.clone(), Sink::Discard)?;
        let mut s = Session::around(rec, tl, snapshots);
        s.refresh((0, None, 0))?;
        if at > 0 {
            s.goto_exit(at)?;
        }
        Ok(s)
    }

    /// A session over a timeline a front end already replayed to an exit
    /// boundary (so a query from there does not replay to it again); `end`:
    /// the recording ends there, and why. Snapshots as [`Session::open`].
    pub fn from_timeline(rec: Arc<Recording>, tl: Timeline, end: Option<String>) -> R<Session> {
        let on = !std::env::var("REVIRT_GDB_SNAPSHOTS").is_ok_and(|v| v == "0" || v == "off");
        let mut s = Session::around(rec, tl, on);
        let e = s.tl.exits();
        s.refresh((e, None, 0))?;
        s.pos.end = end.is_some();
        s.end_note = end;
        Ok(s)
    }

    fn around(rec: Arc<Recording>, tl: Timeline, snapshots: bool) -> Session {
        // Snapshots keep copies of the disk too: only for small ones.
        let disk_bytes = tl.machine.devices.block.capacity() * 512;
        let big_disk = disk_bytes > super::snapshots::MAX_DISK_BYTES;
        let pos = Pos {
            exits: 0,
            anchor: None,
            steps: 0,
            point: ExecPoint::default(),
            fp: 0,
            end: false,
        };
        Session {
            rec,
            tl,
            pos,
            end_note: None,
            breakpoints: BTreeSet::new(),
            watches: Vec::new(),
            interrupted: None,
            interrupter: None,
            steps_taken: 0,
            snaps: Snapshots::new(snapshots && !big_disk),
            prev_boundary: HashMap::new(),
            arrivals: None,
            native_runs: 0,
            watch_phys: HashMap::new(),
            watched_code: false,
            patched_diverged: false,
            note: None,
            native: !std::env::var("REVIRT_GDB_NATIVE").is_ok_and(|v| v == "0" || v == "off"),
        }
    }

    pub fn pos(&self) -> Pos {
        self.pos
    }

    fn refresh(&mut self, (exits, anchor, steps): At) -> R<()> {
        let regs = self
            .tl
            .machine
            .vcpu
            .regs()
            .map_err(|e| SessionError::Lost(e.to_string()))?;
        let m = &self.tl.machine;
        self.pos = Pos {
            exits,
            anchor,
            steps,
            point: ExecPoint {
                exits: m.exits,
                branches: m.branches,
                rip: regs.rip,
            },
            fp: fingerprint(&regs),
            end: false,
        };
        Ok(())
    }

    fn interrupted(&mut self) -> bool {
        if self.interrupter.as_ref().is_some_and(|i| i.requested()) {
            return true;
        }
        match &mut self.interrupted {
            Some(f) => f(),
            None => false,
        }
    }

    /// Goes to the machine state right after guest-caused exit `e` (restoring
    /// a snapshot or checkpoint when `e` lies behind us).
    pub fn goto_exit(&mut self, e: u64) -> R<StopWhy> {
        self.reach((e, None, 0))
    }

    /// Takes a snapshot here (when snapshots are on).
    fn snap_here(&mut self) -> R<()> {
        let pos = self.pos;
        self.snaps
            .take(&mut self.tl, pos)
            .map_err(|e| SessionError::Lost(format!("taking a snapshot: {e}")))
    }

    /// Goes to position `t` (exit boundary, anchor, steps): from here when
    /// that lies on the way, else from the nearest in-memory snapshot or
    /// recording checkpoint before it; leaves snapshots on the way (at
    /// `e - 1`, `e`, at an anchor reached by a long run, halfway through long
    /// step runs and at the target) so the next move back is short.
    /// Returns `End` if the recording ends first.
    fn reach(&mut self, t: At) -> R<StopWhy> {
        let (e, anchor, k) = t;
        let here = self.pos.at();
        if here == t && !self.pos.end {
            return Ok(StopWhy::Step);
        }
        // Where to start: here, a snapshot, or a checkpoint (latest wins).
        // (The machine must really be where `pos` says: an error may have
        // left it elsewhere.)
        let from_here = !self.pos.end
            && leads_to(here, t)
            && self.tl.exits() == self.pos.exits
            && self.tl.position().is_ok_and(|p| same_point(&p, &self.pos.point));
        let snap = if self.snaps.enabled { self.snaps.best(t) } else { None };
        let ck = Timeline::nearest_checkpoint(&self.rec, e);
        let ck_exits = self.rec.checkpoints.iter().find(|c| c.0 == ck).map(|c| c.1).unwrap_or(0);
        let mut fresh = false;
        match snap {
            Some(s) if !(from_here && rank(here) >= rank(s)) && s.0 >= ck_exits => {
                self.pos = self
                    .snaps
                    .restore(&mut self.tl, s)
                    .map_err(|e| SessionError::Lost(format!("restoring a snapshot: {e}")))?;
                self.end_note = None;
            }
            _ if from_here && (here.0 >= ck_exits || here.0 == e) => {}
            _ => {
                self.tl = Timeline::at_checkpoint(self.rec.clone(), ck, Sink::Discard)?;
                self.snaps.forget_base();
                self.end_note = None;
                self.pos.end = false;
                self.pos.exits = self.tl.exits();
                self.pos.anchor = None;
                self.pos.steps = 0;
                fresh = true;
            }
        }
        if fresh || self.tl.exits() < e {
            let start = self.tl.exits();
            // A snapshot at the boundary before `e` (where stepping back from
            // `e` will go), when the run is long enough to be worth saving.
            if self.snaps.enabled && e >= 1 && start + 1 < e {
                match self.tl.run(Some(e - 1))? {
                    Outcome::Reached => {
                        self.refresh((e - 1, None, 0))?;
                        self.snap_here()?;
                    }
                    other => return self.ended(other),
                }
            }
            if self.tl.exits() < e {
                match self.tl.run(Some(e))? {
                    Outcome::Reached => {}
                    other => return self.ended(other),
                }
            }
            self.refresh((e, None, 0))?;
            if start < e || fresh {
                self.snap_here()?;
            }
        }
        if let Some((r, n)) = anchor {
            if self.pos.anchor != anchor {
                self.run_to_arrival(r, n)?;
            }
        }
        let j = self.pos.steps;
        if k > j {
            let n = k - j;
            self.steps_taken += n;
            if self.snaps.enabled && n >= SNAP_HALFWAY_MIN {
                let half = n / 2;
                match self.tl.step(half)? {
                    Outcome::Reached => self.refresh((e, anchor, j + half))?,
                    other => return self.ended(other),
                }
                self.snap_here()?;
                match self.tl.step(n - half)? {
                    Outcome::Reached => self.refresh((e, anchor, k))?,
                    other => return self.ended(other),
                }
            } else {
                match self.tl.step(n)? {
                    Outcome::Reached => self.refresh((e, anchor, k))?,
                    other => return self.ended(other),
                }
            }
            if n >= 2 {
                self.snap_here()?;
            }
        }
        Ok(StopWhy::Step)
    }

    /// From the exit boundary (or an earlier arrival at `r`) of the current
    /// interval, runs at native speed to the `n`-th arrival at `r`.
    fn run_to_arrival(&mut self, r: u64, n: u64) -> R<()> {
        let e = self.pos.exits;
        let seen = match self.pos.anchor {
            Some((q, m)) if q == r && self.pos.steps == 0 => m,
            None if self.pos.steps == 0 => u64::from(self.pos.point.rip == r && r & WATCH == 0),
            _ => return Err(SessionError::Lost(format!("cannot count arrivals at {r:#x} from {:?}", self.pos.at()))),
        };
        if seen < n {
            let scan = Scan::new([r].into(), ScanStop::Nth { exits: e, rip: r, n }, e, &[(r, seen)]);
            let (o, sc) = self.run_scan(scan, Some(e + 1))?;
            let p = self.tl.position()?;
            match o {
                Outcome::Reached if p.exits == e && sc.arrivals(r) == n => {}
                Outcome::Reached => {
                    return Err(SessionError::Lost(format!(
                        "arrival {n} at {r:#x} after exit {e} does not exist: the interval ended first"
                    )))
                }
                other => return self.ended(other).map(|_| ()),
            }
        } else if seen > n {
            return Err(SessionError::Lost(format!("arrival {n} at {r:#x} lies behind arrival {seen}")));
        }
        self.refresh((e, Some((r, n)), 0))?;
        self.snap_here()
    }

    /// Records that the timeline ran into the end.
    fn ended(&mut self, o: Outcome) -> R<StopWhy> {
        let note = match o {
            Outcome::Finished { stop, problems, .. } if problems.is_empty() => {
                format!("the guest stopped: {stop:?}")
            }
            Outcome::Finished { stop, problems, .. } => {
                format!("the guest stopped: {stop:?} ({})", problems.join("; "))
            }
            Outcome::EndOfRecording(s) => s,
            Outcome::Diverged(d) => return Err(SessionError::Diverged(d)),
            Outcome::NotReached(d) => return Err(SessionError::Lost(d)),
            Outcome::Reached => unreachable!("not an end"),
        };
        let exits = self.tl.exits();
        let at = if exits == self.pos.exits {
            (exits, self.pos.anchor, self.pos.steps + 1)
        } else {
            (exits, None, 0)
        };
        self.refresh(at)?;
        self.pos.end = true;
        self.end_note = Some(note);
        Ok(StopWhy::End)
    }

    /// True when the instruction at RIP makes a guest-caused exit (port
    /// I/O, `hlt`) and no interrupt can come first: such an instruction
    /// ends its exit interval, and is executed by running to that exit
    /// rather than by single-stepping, so the exit (and any input the
    /// recording delivers there) is handled exactly as when recording.
    fn exits_next(&self) -> bool {
        use iced_x86::{Decoder, DecoderOptions};
        if self.tl.machine.devices.pic.next_vector().is_some() {
            return false;
        }
        let Ok(r) = self.tl.machine.vcpu.regs() else {
            return false;
        };
        let mut code = [0u8; 15];
        let n = self.read_virt(r.rip, &mut code);
        let ins = Decoder::with_ip(64, &code[..n], r.rip, DecoderOptions::NONE).decode();
        crate::replay::search::exits_to_vmm(ins.mnemonic())
    }

    /// One instruction forward. Keeps `pos` as (exit, steps since it).
    fn step1(&mut self) -> R<StopWhy> {
        if self.pos.end {
            return Ok(StopWhy::End);
        }
        self.steps_taken += 1;
        let before = self.pos;
        let outcome = if self.exits_next() {
            let to = self.tl.exits() + 1;
            self.tl.run(Some(to))?
        } else {
            self.tl.step(1)?
        };
        match outcome {
            Outcome::Reached => {}
            other => return self.ended(other),
        }
        let exits = self.tl.exits();
        let at = if exits == before.exits {
            (exits, before.anchor, before.steps + 1)
        } else {
            (exits, None, 0)
        };
        self.refresh(at)?;
        Ok(StopWhy::Step)
    }

    /// Makes the current position's execution point exact: a native-speed
    /// stop knows its exit, RIP and registers but not the branch count (the
    /// guest ran free), which the step clock's points and provenance need;
    /// this steps from the exit boundary to here once and counts it.
    /// An arrival at a breakpoint site (not a watch hit) is stepped to in
    /// one run of the machine that counts arrivals at every boundary
    /// (`Timeline::step_scan`; 723 steps in ring 0: 13 ms, 68 through `scan`).
    pub fn make_exact(&mut self) -> R<()> {
        let here = self.pos;
        match here.anchor {
            _ if here.end => Ok(()),
            None => Ok(()),
            Some((r, n)) if r & WATCH == 0 => self.step_to_arrival(here, r, n),
            Some(_) => {
                self.scan((here.exits, None, 0), here, SCAN_SNAP_EVERY, u64::MAX, |_, _| {})?;
                Ok(())
            }
        }
    }

    /// [`Session::make_exact`] for `here`, the `n`-th arrival at `r` (then
    /// `here.steps` steps): from its exit boundary, stepped and counted.
    fn step_to_arrival(&mut self, here: Pos, r: u64, n: u64) -> R<()> {
        let e = here.exits;
        self.reach((e, None, 0))?;
        let seen = u64::from(self.pos.point.rip == r);
        let mut k = 0;
        if seen < n {
            let scan = Scan::new([r].into(), ScanStop::Nth { exits: e, rip: r, n }, e, &[(r, seen)]);
            let (o, sc, steps) = self.tl.step_scan(scan, Some(e + 1))?;
            self.steps_taken += steps;
            if o != Outcome::Reached || self.tl.exits() != e || sc.arrivals(r) != n {
                self.pos.end = true; // not where `pos` says: restore next time
                return Err(SessionError::Lost(format!("stepping from exit {e} did not reach arrival {n} at {r:#x}")));
            }
            k = steps;
            self.refresh((e, None, k))?;
        }
        if here.steps > 0 {
            self.reach((e, None, k + here.steps))?;
        }
        if !self.pos.same_state(&here) {
            return Err(SessionError::Lost(format!(
                "stepping to {} found {} (fp {:#x}, expected {:#x})",
                here.point, self.pos.point, self.pos.fp, here.fp
            )));
        }
        self.snap_here()
    }

    /// Goes to a position remembered earlier (exit, then steps), and checks
    /// that it is the same state.
    pub fn goto(&mut self, p: Pos) -> R<()> {
        if self.pos == p {
            return Ok(());
        }
        self.reach(p.at())?;
        if !self.pos.same_state(&p) || self.pos.end != p.end {
            return Err(SessionError::Lost(format!(
                "went back to exit {} + {} steps expecting {} (fp {:#x}), found {} (fp {:#x})",
                p.exits, p.steps, p.point, p.fp, self.pos.point, self.pos.fp
            )));
        }
        Ok(())
    }


    fn pos_at_exit(&mut self, e: u64) -> R<Pos> {
        self.goto_exit(e)?;
        Ok(self.pos)
    }

    /// Event index in the log of the next event to be consumed.
    pub fn event_index(&self) -> usize {
        self.tl.host.next
    }
}
