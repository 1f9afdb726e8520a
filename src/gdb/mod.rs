//! `revirt gdb`: a GDB remote-protocol server over a replay, with real
//! reverse execution (reverse-stepi, reverse-continue) built on
//! [`crate::replay::session::Session`]. The protocol itself is the `gdbstub` crate; the
//! target is x86-64 with SSE, segment bases and system registers ([`arch`]).

pub mod arch;

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use gdbstub::common::Signal;
use gdbstub::conn::ConnectionExt;
use gdbstub::outputln;
use gdbstub::stub::{run_blocking, DisconnectReason, GdbStub, SingleThreadStopReason};
use gdbstub::target::ext::base::reverse_exec::{
    ReplayLogPosition, ReverseCont, ReverseContOps, ReverseStep, ReverseStepOps,
};
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep,
    SingleThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind as GdbWatchKind,
};
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use arch::{RevirtRegs, X86_64Revirt};

use crate::replay::interrupt::Interrupter;
use crate::replay::session::{Session, SessionError, StopWhy, Watch, WatchKind};

/// What the client asked for at the last resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    Cont,
    Step,
    ReverseCont,
    ReverseStep,
}

/// The gdbstub target: a session plus the pending resume request.
pub struct Target64 {
    pub s: Session,
    resume: Option<Resume>,
    /// The last fatal problem, told to the user by `monitor where`.
    pub last_error: Option<String>,
    /// What the session said the user should know about the last stop (`monitor where`).
    pub last_note: Option<String>,
}

impl Target64 {
    pub fn new(s: Session) -> Target64 {
        Target64 {
            s,
            resume: None,
            last_error: None,
            last_note: None,
        }
    }

    /// Carries out the pending resume; returns the stop to report.
    fn execute(&mut self) -> SingleThreadStopReason<u64> {
        let r = match self.resume.take() {
            Some(Resume::Cont) => self.s.cont(),
            Some(Resume::Step) => self.s.step(),
            Some(Resume::ReverseCont) => self.s.reverse_cont(),
            Some(Resume::ReverseStep) => self.s.reverse_step(),
            None => Ok(StopWhy::Step),
        };
        // What the session said about this stop (shown until the next one).
        self.last_note = self.s.note.take();
        match r {
            Ok(why) => stop_reason(why),
            Err(e) => {
                eprintln!("revirt gdb: {e}");
                self.last_error = Some(e.to_string());
                SingleThreadStopReason::Signal(Signal::SIGABRT)
            }
        }
    }
}

fn stop_reason(why: StopWhy) -> SingleThreadStopReason<u64> {
    match why {
        StopWhy::Step => SingleThreadStopReason::DoneStep,
        StopWhy::Breakpoint(_) => SingleThreadStopReason::SwBreak(()),
        StopWhy::Watch { addr, kind } => SingleThreadStopReason::Watch {
            tid: (),
            kind: match kind {
                WatchKind::Write => GdbWatchKind::Write,
                WatchKind::Read => GdbWatchKind::Read,
                WatchKind::Access => GdbWatchKind::ReadWrite,
            },
            addr,
        },
        StopWhy::End => SingleThreadStopReason::ReplayLog {
            tid: None,
            pos: ReplayLogPosition::End,
        },
        StopWhy::Begin => SingleThreadStopReason::ReplayLog {
            tid: None,
            pos: ReplayLogPosition::Begin,
        },
        StopWhy::Interrupted => SingleThreadStopReason::Signal(Signal::SIGINT),
    }
}

/// Replay is read-only: writing would change what the recording says happened.
const EROFS: u8 = 30;

impl Target for Target64 {
    type Arch = X86_64Revirt;
    type Error = SessionError;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::SingleThread(self)
    }
    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }
}

impl SingleThreadBase for Target64 {
    fn read_registers(&mut self, all: &mut RevirtRegs) -> TargetResult<(), Self> {
        let tl = &self.s.tl;
        let r = tl.regs().map_err(|e| TargetError::Fatal(SessionError::Lost(e.to_string())))?;
        let s = tl.sregs().map_err(|e| TargetError::Fatal(SessionError::Lost(e.to_string())))?;
        all.fs_base = s.fs.base;
        all.gs_base = s.gs.base;
        all.cr0 = s.cr0;
        all.cr2 = s.cr2;
        all.cr3 = s.cr3;
        all.cr4 = s.cr4;
        all.cr8 = s.cr8;
        all.efer = s.efer;
        let regs = &mut all.core;
        // GDB's order: rax rbx rcx rdx rsi rdi rbp rsp r8..r15.
        regs.regs = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        regs.rip = r.rip;
        // Hide the stepper's artifacts (TF, RF), as the guest would see them.
        regs.eflags = (r.rflags & !0x10100) as u32;
        regs.segments.cs = s.cs.selector as u32;
        regs.segments.ss = s.ss.selector as u32;
        regs.segments.ds = s.ds.selector as u32;
        regs.segments.es = s.es.selector as u32;
        regs.segments.fs = s.fs.selector as u32;
        regs.segments.gs = s.gs.selector as u32;
        if let Ok(f) = tl.fpu() {
            for (i, st) in regs.st.iter_mut().enumerate() {
                st.copy_from_slice(&f.fpr[i][..10]);
            }
            regs.fpu.fctrl = f.fcw as u32;
            regs.fpu.fstat = f.fsw as u32;
            regs.fpu.ftag = f.ftwx as u32;
            regs.fpu.fop = f.last_opcode as u32;
            regs.fpu.fioff = f.last_ip as u32;
            regs.fpu.fooff = f.last_dp as u32;
            for (i, x) in regs.xmm.iter_mut().enumerate() {
                *x = u128::from_le_bytes(f.xmm[i]);
            }
            regs.mxcsr = f.mxcsr;
        }
        Ok(())
    }

    fn write_registers(&mut self, _regs: &RevirtRegs) -> TargetResult<(), Self> {
        eprintln!("revirt gdb: refused a register write: a replay is read-only (it would no longer match the recording)");
        Err(TargetError::Errno(EROFS))
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        let n = self.s.read_virt(start, data);
        if n == 0 && !data.is_empty() {
            return Err(TargetError::NonFatal);
        }
        Ok(n)
    }

    fn write_addrs(&mut self, start: u64, _data: &[u8]) -> TargetResult<(), Self> {
        eprintln!("revirt gdb: refused a memory write at {start:#x}: a replay is read-only (it would no longer match the recording)");
        Err(TargetError::Errno(EROFS))
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadResume for Target64 {
    fn resume(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.resume = Some(Resume::Cont);
        Ok(())
    }
    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
    fn support_reverse_step(&mut self) -> Option<ReverseStepOps<'_, (), Self>> {
        Some(self)
    }
    fn support_reverse_cont(&mut self) -> Option<ReverseContOps<'_, (), Self>> {
        Some(self)
    }
}

impl SingleThreadSingleStep for Target64 {
    fn step(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.resume = Some(Resume::Step);
        Ok(())
    }
}

impl ReverseStep<()> for Target64 {
    fn reverse_step(&mut self, _tid: ()) -> Result<(), Self::Error> {
        self.resume = Some(Resume::ReverseStep);
        Ok(())
    }
}

impl ReverseCont<()> for Target64 {
    fn reverse_cont(&mut self) -> Result<(), Self::Error> {
        self.resume = Some(Resume::ReverseCont);
        Ok(())
    }
}

impl Breakpoints for Target64 {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }
    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

// Software and hardware breakpoints are the same thing here: the session
// compares RIP at every instruction boundary while any is set, so nothing
// is ever written into guest memory.
impl SwBreakpoint for Target64 {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.s.breakpoints.insert(addr);
        Ok(true)
    }
    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.s.breakpoints.remove(&addr))
    }
}

impl HwBreakpoint for Target64 {
    fn add_hw_breakpoint(&mut self, addr: u64, kind: usize) -> TargetResult<bool, Self> {
        self.add_sw_breakpoint(addr, kind)
    }
    fn remove_hw_breakpoint(&mut self, addr: u64, kind: usize) -> TargetResult<bool, Self> {
        self.remove_sw_breakpoint(addr, kind)
    }
}

fn watch_kind(k: GdbWatchKind) -> WatchKind {
    match k {
        GdbWatchKind::Write => WatchKind::Write,
        GdbWatchKind::Read => WatchKind::Read,
        GdbWatchKind::ReadWrite => WatchKind::Access,
    }
}

impl HwWatchpoint for Target64 {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        let kind = watch_kind(kind);
        if len == 0 || len > 4096 {
            return Ok(false);
        }
        self.s.watches.push(Watch { addr, len, kind });
        Ok(true)
    }
    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        let kind = watch_kind(kind);
        let w = Watch { addr, len, kind };
        match self.s.watches.iter().position(|x| *x == w) {
            Some(i) => {
                self.s.watches.remove(i);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl Target64 {
    /// `monitor where`: the point, the session's position, the next event.
    fn monitor_where(&self, out: &mut ConsoleOutput<'_>) {
        let p = self.s.pos();
        let anchor = match p.anchor {
            Some((r, n)) => format!(", arrival {n} at {r:#x}"),
            None => String::new(),
        };
        outputln!(
            out,
            "{} (exit {}{anchor} + {} steps); next event #{} of {}",
            p.point,
            p.exits,
            p.steps,
            self.s.event_index(),
            self.s.rec.events.len()
        );
        if let Some(n) = &self.s.end_note {
            outputln!(out, "at the end of the recording: {n}");
        }
        if let Some(n) = &self.last_note {
            outputln!(out, "note: {n}");
        }
        if let Some(e) = &self.last_error {
            outputln!(out, "last error: {e}");
        }
    }

    /// `monitor goto-event N`: the exit at which log event N happened.
    fn monitor_goto_event(&mut self, n: &str, out: &mut ConsoleOutput<'_>) {
        match n.parse::<usize>() {
            Ok(i) if i < self.s.rec.events.len() => {
                let e = self.s.rec.events[i].exits();
                match self.s.goto_exit(e) {
                    Ok(_) => outputln!(
                        out,
                        "event #{i} is at exit {e}; now at {}",
                        self.s.pos().point
                    ),
                    Err(err) => outputln!(out, "error: {err}"),
                }
            }
            _ => outputln!(
                out,
                "usage: monitor goto-event N (0..{})",
                self.s.rec.events.len()
            ),
        }
    }

    /// `monitor stats`: what the session cost so far.
    fn monitor_stats(&self, out: &mut ConsoleOutput<'_>) {
        outputln!(
            out,
            "instructions single-stepped this session: {}; native-speed breakpoint runs: {}",
            self.s.steps_taken,
            self.s.native_runs
        );
        let n = &self.s.snaps;
        let st = n.stats;
        if n.enabled {
            outputln!(
                out,
                "snapshots: {} held ({} KiB: pages, disk chunks, page tables), {} taken, {} restored, {} evicted; pages copied {}, written back {}",
                n.len(),
                n.bytes() >> 10,
                st.taken,
                st.restored,
                st.evicted,
                st.pages_copied,
                st.pages_written
            );
        } else {
            outputln!(out, "snapshots: off");
        }
    }
}

/// The help text of `monitor` (any command it does not know).
fn monitor_help(out: &mut ConsoleOutput<'_>) {
    outputln!(out, "revirt monitor commands:");
    outputln!(out, "  where | when        current execution point, exit/step position, event index");
    outputln!(out, "  checkpoints         the recording's checkpoints");
    outputln!(
        out,
        "  goto-exit N         go to the state right after guest-caused exit N"
    );
    outputln!(
        out,
        "  goto-event N        go to the exit at which log event N happened"
    );
    outputln!(
        out,
        "  stats               instructions single-stepped so far"
    );
    outputln!(out, "  origin LOCATION     where a value came from ($reg or ADDR[:LEN]; --depth N, --json)");
    outputln!(out, "  exact               count the steps from the exit boundary to here (a native-speed stop is");
    outputln!(out, "                      an arrival count): `where` then shows exit + steps, reachable by stepi");
}

impl MonitorCmd for Target64 {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), Self::Error> {
        let cmd = String::from_utf8_lossy(cmd);
        let words: Vec<&str> = cmd.split_whitespace().collect();
        match words.as_slice() {
            ["where"] | ["when"] => self.monitor_where(&mut out),
            ["checkpoints"] => {
                for (id, exits, ev) in &self.s.rec.checkpoints {
                    outputln!(out, "checkpoint {id}: exit {exits} (event #{ev})");
                }
            }
            ["goto-exit", n] | ["goto", n] => match n.parse::<u64>() {
                Ok(e) => match self.s.goto_exit(e) {
                    Ok(_) => {
                        let p = self.s.pos();
                        outputln!(out, "now at {}; run `maintenance flush register-cache` (or rv-goto) to refresh gdb's view", p.point)
                    }
                    Err(e) => outputln!(out, "error: {e}"),
                },
                Err(_) => outputln!(out, "usage: monitor goto-exit N"),
            },
            ["goto-event", n] => self.monitor_goto_event(n, &mut out),
            ["origin", args @ ..] => {
                if let Err(e) = self.s.make_exact() {
                    outputln!(out, "error: {e}");
                    return Ok(());
                }
                let text = crate::replay::provenance::monitor_origin(&self.s.rec, &self.s.tl, args);
                for l in text.lines() {
                    outputln!(out, "{l}");
                }
            }
            ["stats"] => self.monitor_stats(&mut out),
            ["exact"] => match self.s.make_exact() {
                Ok(()) => {
                    let p = self.s.pos();
                    outputln!(out, "{}: exit {} + {} steps", p.point, p.exits, p.steps)
                }
                Err(e) => outputln!(out, "error: {e}"),
            },
            _ => monitor_help(&mut out),
        }
        Ok(())
    }
}

/// The gdbstub event loop: runs the pending resume, then reports the stop.
/// Ctrl-C (0x03) is noticed between chunks of work by peeking at the socket.
pub enum EventLoop {}

impl run_blocking::BlockingEventLoop for EventLoop {
    type Target = Target64;
    type Connection = TcpStream;
    type StopReason = SingleThreadStopReason<u64>;

    #[allow(clippy::type_complexity)]
    fn wait_for_stop_reason(
        target: &mut Target64,
        conn: &mut TcpStream,
    ) -> Result<
        run_blocking::Event<Self::StopReason>,
        run_blocking::WaitForStopReasonError<SessionError, std::io::Error>,
    > {
        // A thread watches the socket while the target runs: a Ctrl-C (any
        // byte) kicks even a native run out of a long exit interval.
        let intr = Arc::new(Interrupter::default());
        let done = Arc::new(AtomicBool::new(false));
        target.s.interrupter = Some(intr.clone());
        watch_for_interrupt(conn, intr, done.clone()).map_err(run_blocking::WaitForStopReasonError::Connection)?;
        let stop = target.execute();
        done.store(true, Ordering::SeqCst);
        target.s.interrupter = None;
        if stop == SingleThreadStopReason::Signal(Signal::SIGINT) {
            // Hand gdbstub the byte that interrupted us (normally 0x03).
            if let Ok(Some(_)) = conn.peek() {
                let byte = ConnectionExt::read(conn)
                    .map_err(run_blocking::WaitForStopReasonError::Connection)?;
                if byte == 0x03 {
                    return Ok(run_blocking::Event::IncomingData(byte));
                }
            }
        }
        Ok(run_blocking::Event::TargetStopped(stop))
    }

    fn on_interrupt(_target: &mut Target64) -> Result<Option<Self::StopReason>, SessionError> {
        Ok(Some(SingleThreadStopReason::Signal(Signal::SIGINT)))
    }
}

/// Until `done`, polls `conn` for incoming bytes (without reading them:
/// gdbstub reads the Ctrl-C itself) and interrupts on the first, or when
/// the client goes away. Polling (not a read timeout) leaves the socket's
/// settings alone for gdbstub.
fn watch_for_interrupt(conn: &TcpStream, intr: Arc<Interrupter>, done: Arc<AtomicBool>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let sock = conn.try_clone()?;
    std::thread::spawn(move || {
        let mut p = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        while !done.load(Ordering::SeqCst) {
            // SAFETY: one valid pollfd for the duration of the call; the fd
            // stays open (this thread owns a clone of the socket).
            let n = unsafe { libc::poll(&mut p, 1, 20) };
            if done.load(Ordering::SeqCst) {
                return;
            }
            if n > 0 || (n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted) {
                intr.interrupt();
                return;
            }
        }
    });
    Ok(())
}

/// Serves clients one after another on `listener` until `max_clients`
/// have come and gone (forever when None).
pub fn serve(
    target: &mut Target64,
    listener: &TcpListener,
    max_clients: Option<u64>,
) -> std::io::Result<()> {
    let mut served = 0u64;
    loop {
        if max_clients.is_some_and(|m| served >= m) {
            return Ok(());
        }
        let (stream, addr) = listener.accept()?;
        served += 1;
        eprintln!("revirt gdb: client {addr} connected");
        let _ = stream.set_nodelay(true);
        let gdb = GdbStub::new(stream);
        match gdb.run_blocking::<EventLoop>(target) {
            Ok(DisconnectReason::Disconnect) => eprintln!("revirt gdb: client detached"),
            Ok(DisconnectReason::Kill) => eprintln!(
                "revirt gdb: client sent kill; the replay stays, waiting for the next client"
            ),
            Ok(r) => eprintln!("revirt gdb: session ended: {r:?}"),
            Err(e) => eprintln!("revirt gdb: client session ended with an error: {e}"),
        }
    }
}
