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

use vm_memory::{Bytes, GuestAddress};

use crate::clock::{fingerprint, ExecPoint};
use crate::replay::{Outcome, Recording, ReplayError, Sink, Timeline};

use super::snapshots::{leads_to, rank, At, Snapshots};
use crate::replay::search::{Hit, Scan, ScanStop, WATCH};
use crate::vmm::watch::{WatchSpec, WriteReport};

/// Whether a native run stopped because code runs on a page watched for reads.
fn watched_code(e: &SessionError) -> bool {
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

/// About how long a native `continue` runs before it looks for a Ctrl-C
/// from the client (it can only stop at an exit boundary).
const CONT_SLICE: std::time::Duration = std::time::Duration::from_millis(100);

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
}

/// Arrivals (key, count) at these keys since the exit boundary, valid at a position.
type Arrivals = (At, BTreeSet<u64>, Vec<(u64, u64)>);

/// Fewer steps than this to a target: no snapshot halfway.
const SNAP_HALFWAY_MIN: u64 = 16;
/// While a reverse step counts the previous exit interval: a snapshot every
/// this many steps, so going to its last boundary afterwards is short.
const SCAN_SNAP_EVERY: u64 = 64;

const POLL_EVERY: u64 = 512;

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
        let mut s = Session {
            rec,
            tl,
            pos,
            end_note: None,
            breakpoints: BTreeSet::new(),
            watches: Vec::new(),
            interrupted: None,
            steps_taken: 0,
            snaps: Snapshots::new(snapshots && !big_disk),
            prev_boundary: HashMap::new(),
            arrivals: None,
            native_runs: 0,
            watch_phys: HashMap::new(),
            watched_code: false,
            native: !std::env::var("REVIRT_GDB_NATIVE").is_ok_and(|v| v == "0" || v == "off"),
        };
        s.refresh((0, None, 0))?;
        if at > 0 {
            s.goto_exit(at)?;
        }
        Ok(s)
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
    pub fn make_exact(&mut self) -> R<()> {
        let here = self.pos;
        if here.anchor.is_none() || here.end {
            return Ok(());
        }
        self.scan((here.exits, None, 0), here, SCAN_SNAP_EVERY, |_, _| {})?;
        Ok(())
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

    // ---- memory ----

    /// Translates a guest virtual address through the current page tables
    /// (4-level paging: 4 KiB, 2 MiB and 1 GiB pages).
    pub fn translate(&self, va: u64) -> Option<u64> {
        let s = self.tl.machine.vcpu.sregs().ok()?;
        crate::vmm::paging::translate(&self.tl.machine.mem, &s, va)
    }

    fn read_phys(&self, pa: u64, len: u64) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        let _ = self.tl.machine.mem.read_slice(&mut b, GuestAddress(pa));
        b
    }

    /// Reads guest virtual memory; returns how many bytes could be read.
    pub fn read_virt(&self, va: u64, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let a = va.wrapping_add(done as u64);
            let Some(pa) = self.translate(a) else { break };
            let n = ((0x1000 - (a & 0xfff)) as usize).min(buf.len() - done);
            if self
                .tl
                .machine
                .mem
                .read_slice(&mut buf[done..done + n], GuestAddress(pa))
                .is_err()
            {
                break;
            }
            done += n;
        }
        done
    }

    fn watched_bytes(&self) -> Vec<Vec<u8>> {
        self.watches
            .iter()
            .map(|w| {
                let mut b = vec![0u8; w.len as usize];
                let n = self.read_virt(w.addr, &mut b);
                b.truncate(n);
                b
            })
            .collect()
    }

    /// Watches whose bytes changed between `old` and now.
    /// (An access watchpoint reports itself as such: gdb matches the kind.)
    fn changed(&self, old: &[Vec<u8>], new: &[Vec<u8>]) -> Option<(u64, WatchKind)> {
        self.watches
            .iter()
            .zip(old.iter().zip(new))
            .find(|(w, (a, b))| w.kind != WatchKind::Read && a != b)
            .map(|(w, _)| (w.addr, w.kind))
    }

    /// Read and access watchpoints that the instruction at RIP touches
    /// (decoded with iced-x86: explicit operands and implicit stack
    /// accesses, addresses computed from the current registers).
    fn touched(&self) -> Option<(u64, WatchKind)> {
        use iced_x86::{Decoder, DecoderOptions, InstructionInfoFactory, OpAccess, Register};
        if !self.watches.iter().any(|w| w.kind != WatchKind::Write) {
            return None;
        }
        let v = &self.tl.machine.vcpu;
        let (r, sr) = (v.regs().ok()?, v.sregs().ok()?);
        let mut code = [0u8; 15];
        let n = self.read_virt(r.rip, &mut code);
        let bits = if sr.cs.l != 0 {
            64
        } else if sr.cs.db != 0 {
            32
        } else {
            16
        };
        let mut dec = Decoder::with_ip(bits, &code[..n], r.rip, DecoderOptions::NONE);
        let ins = dec.decode();
        if ins.is_invalid() {
            return None;
        }
        let mut f = InstructionInfoFactory::new();
        let info = f.info(&ins);
        let value = |reg: Register, _: usize, _: usize| -> Option<u64> {
            let full = match reg.full_register() {
                Register::RAX => r.rax,
                Register::RBX => r.rbx,
                Register::RCX => r.rcx,
                Register::RDX => r.rdx,
                Register::RSI => r.rsi,
                Register::RDI => r.rdi,
                Register::RSP => r.rsp,
                Register::RBP => r.rbp,
                Register::R8 => r.r8,
                Register::R9 => r.r9,
                Register::R10 => r.r10,
                Register::R11 => r.r11,
                Register::R12 => r.r12,
                Register::R13 => r.r13,
                Register::R14 => r.r14,
                Register::R15 => r.r15,
                Register::RIP => r.rip,
                Register::FS => sr.fs.base,
                Register::GS => sr.gs.base,
                Register::ES | Register::CS | Register::SS | Register::DS => 0,
                _ => return None,
            };
            Some(match reg.size() {
                1 => full & 0xff,
                2 => full & 0xffff,
                4 => full & 0xffff_ffff,
                _ => full,
            })
        };
        for m in info.used_memory() {
            let Some(addr) = m.virtual_address(0, value) else {
                continue;
            };
            let size = m.memory_size().size().max(1) as u64;
            let reads = matches!(
                m.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::ReadWrite | OpAccess::ReadCondWrite
            );
            let writes = matches!(
                m.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            );
            for w in &self.watches {
                let overlaps = addr < w.addr + w.len && w.addr < addr + size;
                let hit = match w.kind {
                    WatchKind::Read => reads,
                    WatchKind::Access => reads || writes,
                    WatchKind::Write => false,
                };
                if overlaps && hit {
                    return Some((w.addr, w.kind));
                }
            }
        }
        None
    }

    // ---- forward ----

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
    /// (so Ctrl-C is noticed between chunks).
    fn run_free(&mut self) -> R<StopWhy> {
        loop {
            let to = self.tl.exits() + 64;
            match self.tl.run(Some(to))? {
                Outcome::Reached => self.refresh((to, None, 0))?,
                other => return self.ended(other),
            }
            if self.interrupted() {
                return Ok(StopWhy::Interrupted);
            }
        }
    }

    // ---- native speed (replay::search) ----


    /// Whether continuing can run at native speed: breakpoints only (data
    /// watchpoints are still checked by stepping). `REVIRT_GDB_NATIVE=0`
    /// turns it off (the stepping path, kept as the oracle).
    fn native_ok(&mut self) -> bool {
        if !self.native || (self.breakpoints.is_empty() && self.watches.is_empty()) {
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
    fn native_keys(&self) -> BTreeSet<u64> {
        let mut k = self.breakpoints.clone();
        for w in &self.watches {
            if let Some(pa) = self.translate(w.addr) {
                k.insert(WATCH | pa);
            }
        }
        k
    }

    /// The machine's watch for each `WATCH` key of a scan.
    fn watch_specs(&self, scan: &Scan) -> Vec<WatchSpec> {
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
    fn run_scan(&mut self, scan: Scan, limit: Option<u64>) -> R<(Outcome, Scan)> {
        let specs = self.watch_specs(&scan);
        self.native_runs += 1;
        Ok(self.tl.run_scan_specs(scan, specs, limit)?)
    }

    /// The stop a hit of `key` means.
    fn hit_why(&self, key: u64) -> StopWhy {
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

    /// A native run found code on a page watched for reads: back to where
    /// the command started (the machine is restored, not trusted), and step.
    fn after_watched_code(&mut self, here: Pos) -> R<()> {
        self.watched_code = true;
        self.pos.end = true; // forces a restore: the machine stopped mid-way
        self.goto(here)
    }

    /// The watch key (physical) of the watchpoint gdb set at `va`.
    fn watch_key(&self, va: u64) -> Option<u64> {
        self.watch_phys.iter().find(|(_, &(_, v, _))| v == va).map(|(&pa, _)| WATCH | pa)
    }

    /// Forward to the next breakpoint hit, the guest running free between hits.
    fn cont_native(&mut self) -> R<StopWhy> {
        let bps = self.native_keys();
        let arrivals = self.arrivals_here(&bps)?;
        let mut scan = Scan::new(bps.clone(), ScanStop::First, self.pos.exits, &arrivals);
        // In chunks of exits sized to take about CONT_SLICE each: between
        // them, at an exit boundary (an exact position), a Ctrl-C is noticed.
        let mut chunk = 1u64;
        loop {
            let t0 = std::time::Instant::now();
            let to = self.tl.exits().saturating_add(chunk);
            let (o, mut sc) = self.run_scan(scan, Some(to))?;
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

    /// Arrivals at `bps` since the current exit boundary, up to here.
    fn arrivals_here(&mut self, bps: &BTreeSet<u64>) -> R<Vec<(u64, u64)>> {
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
    fn scan_native(&mut self, x: u64, until: Pos, bps: &BTreeSet<u64>) -> R<(Vec<(At, u64)>, Vec<(u64, u64)>)> {
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
        let watched: Vec<(u64, u64)> = scan
            .watches()
            .filter_map(|a| self.watch_phys.get(&a).filter(|w| w.2 != WatchKind::Read).map(|&(l, _, _)| (a, l)))
            .collect();
        for _ in 0..if until.end { 0 } else { until.steps } {
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
        if !self.pos.same_state(&until) {
            return Err(SessionError::Lost(format!(
                "replaying from exit {x} arrived at {} (fp {:#x}), not at {} (fp {:#x})",
                self.pos.point, self.pos.fp, until.point, until.fp
            )));
        }
        // The position itself is not a breakpoint hit before it (gdb's semantics).
        let found = hits
            .into_iter()
            // A write that led to here is still behind us: going back, it is
            // undone first (its stop is the state before it).
            .filter(|(_, h)| {
                bps.contains(&h.key)
                    && (h.key & WATCH != 0 || !(h.point.exits == e && h.point.rip == until.point.rip && h.fp == until.fp))
            })
            .map(|(at, h)| (at, h.key))
            .collect();
        let arr = bps.iter().map(|&b| (b, scan.arrivals(b))).collect();
        Ok((found, arr))
    }

    /// A counting scan that starts at the exit boundary the session stands
    /// on, which is itself an arrival when a site is there.
    fn boundary_scan(&self, sites: &BTreeSet<u64>, hits: &mut Vec<(At, Hit)>) -> Scan {
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
    fn window_start(&self, until: Pos) -> Option<u64> {
        let inside = until.anchor.is_some() || until.steps > 0 || until.end;
        let ok = |x: u64| x < until.exits || (inside && x == until.exits);
        let cks = self.rec.checkpoints.iter().map(|c| c.1);
        let snaps = self.snaps.ats().filter(|a| a.1.is_none() && a.2 == 0).map(|a| a.0);
        cks.chain(snaps).filter(|&x| ok(x)).max()
    }

    /// Back to the last breakpoint hit before here, the guest running free:
    /// from the latest checkpoint or snapshot before here, replay forward
    /// counting hits up to here; none: the window before that (rr's way).
    fn reverse_cont_native(&mut self) -> R<StopWhy> {
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

    // ---- backward ----

    /// Scans forward from exit boundary `from` up to `until` (a position
    /// with a later or equal exit count), calling `visit(pos, hit)` for
    /// each boundary before `until`, where `hit` says whether the step
    /// from it hit something. Returns the number of steps taken.
    fn scan(
        &mut self,
        from: At,
        until: Pos,
        snap_every: u64,
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
            if k > 0 && k.is_multiple_of(POLL_EVERY) && self.interrupted() {
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
            // At an arrival (a native-speed stop): step from the arrival
            // before it, or from its exit boundary.
            let mut prev = None;
            if let Some((r, n)) = here.anchor.filter(|_| !here.end) {
                let start = if n >= 2 { (here.exits, Some((r, n - 1)), 0) } else { (here.exits, None, 0) };
                self.scan(start, here, SCAN_SNAP_EVERY, |p, _| prev = Some(p))?;
                if prev.is_none() && here.exits == 0 {
                    self.goto(here)?;
                    return Ok(StopWhy::Begin);
                }
            }
            // At an exit boundary (or the end): the previous boundary lies in an earlier interval.
            let mut e = if here.end { here.exits } else { here.exits.saturating_sub(1) };
            let prev = loop {
                if let Some(p) = prev {
                    break p;
                }
                let mut last = None;
                self.scan((e, None, 0), here, SCAN_SNAP_EVERY, |p, _| last = Some(p))?;
                if let Some(p) = last {
                    break p;
                }
                if e == 0 {
                    self.goto(here)?;
                    return Ok(StopWhy::Begin);
                }
                e -= 1;
            };
            if !here.end {
                if self.prev_boundary.len() >= 1 << 16 {
                    self.prev_boundary.clear();
                }
                self.prev_boundary.insert(here.at(), prev);
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
            let scanned = self.scan((lo, None, 0), until, 0, |p, hit| {
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

    fn pos_at_exit(&mut self, e: u64) -> R<Pos> {
        self.goto_exit(e)?;
        Ok(self.pos)
    }

    /// Event index in the log of the next event to be consumed.
    pub fn event_index(&self) -> usize {
        self.tl.host.next
    }
}
