//! The host side of the machine: where time, input and output come from and
//! go to. `revirt run` uses [`LiveHost`] (real clock, stdin, stdout); the
//! recorder wraps a live host and logs what it answers; the replayer answers
//! from the log. The run loop only ever talks to this trait.

use std::io::{Read, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::vcpu::Kicker;

/// An asynchronous input: something the guest did not ask for at this instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Async {
    /// The timer fires; `now_ns` is the guest clock it fires at.
    Timer { now_ns: u64 },
    SerialInput(Vec<u8>),
}

/// What the host wants the run loop to do after a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Return `Stop::Paused` at this (deterministic) point, e.g. for a checkpoint.
    Pause,
}

/// What the run loop tells the host at a poll point.
#[derive(Debug, Clone, Copy)]
pub struct PollCtx {
    /// Guest-caused exits so far (the exit clock's coarse time).
    pub exits: u64,
    /// Whether this poll follows a guest-caused exit (a deterministic point).
    pub guest_caused: bool,
    pub timer_deadline_ns: Option<u64>,
    /// Bytes the serial receive FIFO can take now.
    pub serial_room: usize,
    /// Conditional branches retired since the last guest-caused exit (step clock).
    pub branches: u64,
    /// Set when this poll is at an exact instruction boundary (stepping, or
    /// an exit the host asked to be precise about): RIP and register fingerprint.
    pub rip: Option<u64>,
    pub fp: Option<u64>,
    /// Counter clocks: this stop is the branch counter's overflow (some skid
    /// after the point it was programmed for), not an exit or a kick.
    pub overflow: bool,
    /// Instructions single-stepped so far (0 when never stepping): how far
    /// a stepped guest has got, for hosts that must not starve it.
    pub steps: u64,
    /// A watched physical range (its start) whose bytes the instruction
    /// that just retired changed (data watchpoints, `Machine::set_watches`).
    pub watch: Option<u64>,
}

impl PollCtx {
    /// The execution point of this poll, if it is an exact boundary.
    pub fn point(&self) -> Option<super::point::ExecPoint> {
        self.rip.map(|rip| super::point::ExecPoint { exits: self.exits, branches: self.branches, rip })
    }
}

/// Why a host stopped the run loop. The run loop knows only the first two;
/// a host's own reasons (a replayer's divergence, the end of a recording)
/// travel boxed to whoever drove the run, which downcasts them.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("the guest is idle waiting for input, but no timer is running and the input is closed (it would wait forever)")]
    WouldWaitForever,
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error(transparent)]
    Host(Box<dyn std::error::Error + Send + Sync>),
}

pub trait Host {
    /// Host time on the guest clock's scale (ns since VM start). Used for
    /// timer deadlines; never shown to the guest directly.
    fn now_ns(&mut self) -> u64;
    /// The guest (or the timer on its behalf) reads the clock.
    fn clock_read(&mut self, ctx: &PollCtx) -> Result<u64, HostError>;
    /// Guest output on the serial console.
    fn output(&mut self, bytes: &[u8]) -> Result<(), HostError>;
    /// Async inputs to deliver now, before the guest runs again.
    fn poll(&mut self, ctx: &PollCtx, out: &mut Vec<Async>) -> Result<Control, HostError>;
    /// The guest is idle: block until there is something to deliver.
    fn wait(&mut self, ctx: &PollCtx, out: &mut Vec<Async>) -> Result<(), HostError>;
    /// `events` (from poll or wait) were delivered at `at`, where the
    /// registers had fingerprint `fp`. The recorder logs; the replayer checks.
    fn delivered(&mut self, _at: &super::point::ExecPoint, _fp: u64, _events: &[Async]) -> Result<(), HostError> {
        Ok(())
    }
    /// Whether the run loop should single-step from here (step clock) and
    /// report exact boundaries: asked before every entry into the guest.
    fn precise(&mut self, _exits: u64) -> bool {
        false
    }
    /// With a branch counter installed (`Machine::set_counter`): where to
    /// stop next, asked before every entry into the guest. `branches` is the
    /// count since the last guest-caused exit as of now.
    fn counter_plan(&mut self, _exits: u64, _branches: u64) -> crate::vmm::counter::CounterPlan {
        crate::vmm::counter::CounterPlan::default()
    }
    /// The vCPU thread is about to run the guest; `kicker` makes KVM_RUN return.
    fn attach(&mut self, _kicker: Kicker) {}
    /// The run loop stopped; no more kicks may be sent.
    fn detach(&mut self) {}
}

/// Where a live guest's console output goes.
#[derive(Clone)]
pub enum Console {
    Stdout,
    /// Captured in memory (tests, tools); optionally echoed to stdout too.
    Capture { buf: Arc<Mutex<Vec<u8>>>, echo: bool },
    /// A connected socket (`--serial tcp:...`), the other end of the serial
    /// line; optionally echoed to stdout too. A peer that went away is ignored.
    Socket { stream: Arc<Mutex<std::net::TcpStream>>, echo: bool },
}

enum Input {
    Bytes(Vec<u8>),
    Closed,
    /// Stop waiting (someone wants the run loop back, e.g. to pause it).
    Wake,
}

/// Wakes a [`LiveHost`] that waits for the idle guest; callable from any thread.
#[derive(Clone)]
pub struct Waker(mpsc::Sender<Input>);

impl Waker {
    pub fn wake(&self) {
        let _ = self.0.send(Input::Wake);
    }
}

struct TimerShared {
    deadline: Option<Instant>,
    kicker: Option<Kicker>,
    quit: bool,
}

/// Real time, real input, real output.
pub struct LiveHost {
    start: Instant,
    clock_offset_ns: u64,
    console: Console,
    rx: Receiver<Input>,
    input_closed: bool,
    pending_input: Vec<u8>,
    delivered_input: usize,
    input_kicker: Arc<Mutex<Option<Kicker>>>,
    timer: Arc<(Mutex<TimerShared>, Condvar)>,
    timer_thread: Option<JoinHandle<()>>,
    last_deadline_ns: Option<u64>,
    wake_tx: mpsc::Sender<Input>,
    woken: bool,
}

impl LiveHost {
    /// A live host reading guest input from `input` (stdin, a pipe, a byte slice).
    /// `clock_start_ns` continues the guest clock after a restore (0 at boot).
    pub fn new(input: Box<dyn Read + Send>, console: Console, clock_start_ns: u64) -> LiveHost {
        let (tx, rx) = mpsc::channel();
        let wake_tx = tx.clone();
        let input_kicker: Arc<Mutex<Option<Kicker>>> = Arc::new(Mutex::new(None));
        let ik = input_kicker.clone();
        std::thread::Builder::new()
            .name("revirt-input".into())
            .spawn(move || {
                let mut input = input;
                let mut buf = [0u8; 4096];
                loop {
                    let msg = match input.read(&mut buf) {
                        Ok(0) | Err(_) => Input::Closed,
                        Ok(n) => Input::Bytes(buf[..n].to_vec()),
                    };
                    let closed = matches!(msg, Input::Closed);
                    if tx.send(msg).is_err() {
                        return;
                    }
                    if let Some(k) = *ik.lock().unwrap() {
                        k.kick();
                    }
                    if closed {
                        return;
                    }
                }
            })
            .expect("spawn input thread");

        let timer = Arc::new((
            Mutex::new(TimerShared { deadline: None, kicker: None, quit: false }),
            Condvar::new(),
        ));
        let t = timer.clone();
        let timer_thread = std::thread::Builder::new()
            .name("revirt-timer".into())
            .spawn(move || timer_thread(t))
            .expect("spawn timer thread");

        LiveHost {
            start: Instant::now(),
            clock_offset_ns: clock_start_ns,
            console,
            rx,
            input_closed: false,
            pending_input: Vec::new(),
            delivered_input: 0,
            input_kicker,
            timer,
            timer_thread: Some(timer_thread),
            last_deadline_ns: None,
            wake_tx,
            woken: false,
        }
    }

    /// A handle that makes a blocked [`Host::wait`] return with nothing.
    pub fn waker(&self) -> Waker {
        Waker(self.wake_tx.clone())
    }

    /// Input read from the user but not yet handed to the guest (a
    /// migrating VM takes it along).
    pub fn take_pending_input(&mut self) -> Vec<u8> {
        self.drain_input();
        std::mem::take(&mut self.pending_input)
    }

    /// Queues input for the guest ahead of anything read later.
    pub fn push_input(&mut self, bytes: &[u8]) {
        self.pending_input.splice(0..0, bytes.iter().copied());
    }

    /// How many input bytes have been handed to the guest's UART so far.
    pub fn input_delivered(&self) -> usize {
        self.delivered_input
    }

    fn instant_of(&self, ns: u64) -> Instant {
        self.start + Duration::from_nanos(ns.saturating_sub(self.clock_offset_ns))
    }

    fn drain_input(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.take(m);
        }
    }

    fn take(&mut self, m: Input) {
        match m {
            Input::Bytes(b) => self.pending_input.extend_from_slice(&b),
            Input::Closed => self.input_closed = true,
            Input::Wake => self.woken = true,
        }
    }

    fn set_deadline(&mut self, deadline_ns: Option<u64>) {
        if deadline_ns == self.last_deadline_ns {
            return;
        }
        self.last_deadline_ns = deadline_ns;
        let at = deadline_ns.map(|d| self.instant_of(d));
        let (m, cv) = &*self.timer;
        m.lock().unwrap().deadline = at;
        cv.notify_one();
    }
}

fn timer_thread(t: Arc<(Mutex<TimerShared>, Condvar)>) {
    let (m, cv) = &*t;
    let mut s = m.lock().unwrap();
    loop {
        if s.quit {
            return;
        }
        match (s.deadline, s.kicker) {
            (Some(d), Some(k)) => {
                let now = Instant::now();
                if now >= d {
                    k.kick();
                    // One kick per deadline; the run loop sets the next one.
                    s.deadline = None;
                } else {
                    s = cv.wait_timeout(s, d - now).unwrap().0;
                }
            }
            _ => s = cv.wait(s).unwrap(),
        }
    }
}

impl Drop for LiveHost {
    fn drop(&mut self) {
        self.detach();
        {
            let (m, cv) = &*self.timer;
            m.lock().unwrap().quit = true;
            cv.notify_one();
        }
        if let Some(h) = self.timer_thread.take() {
            let _ = h.join();
        }
        let _ = std::io::stdout().flush();
    }
}

impl Host for LiveHost {
    fn now_ns(&mut self) -> u64 {
        self.clock_offset_ns + self.start.elapsed().as_nanos() as u64
    }

    fn clock_read(&mut self, _ctx: &PollCtx) -> Result<u64, HostError> {
        Ok(self.now_ns())
    }

    fn output(&mut self, bytes: &[u8]) -> Result<(), HostError> {
        match &self.console {
            Console::Stdout => {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(bytes);
                let _ = o.flush();
            }
            Console::Socket { stream, echo } => {
                let _ = stream.lock().unwrap().write_all(bytes);
                if *echo {
                    let mut o = std::io::stdout().lock();
                    let _ = o.write_all(bytes);
                    let _ = o.flush();
                }
            }
            Console::Capture { buf, echo } => {
                buf.lock().unwrap().extend_from_slice(bytes);
                if *echo {
                    let mut o = std::io::stdout().lock();
                    let _ = o.write_all(bytes);
                    let _ = o.flush();
                }
            }
        }
        Ok(())
    }

    fn poll(&mut self, ctx: &PollCtx, out: &mut Vec<Async>) -> Result<Control, HostError> {
        self.drain_input();
        if ctx.serial_room > 0 && !self.pending_input.is_empty() {
            let n = ctx.serial_room.min(self.pending_input.len());
            self.delivered_input += n;
            out.push(Async::SerialInput(self.pending_input.drain(..n).collect()));
        }
        let now = self.now_ns();
        if matches!(ctx.timer_deadline_ns, Some(d) if now >= d) {
            out.push(Async::Timer { now_ns: now });
        }
        self.set_deadline(ctx.timer_deadline_ns);
        Ok(Control::Continue)
    }

    fn wait(&mut self, ctx: &PollCtx, out: &mut Vec<Async>) -> Result<(), HostError> {
        loop {
            self.poll(ctx, out)?;
            if !out.is_empty() || std::mem::take(&mut self.woken) {
                return Ok(());
            }
            let timeout = ctx
                .timer_deadline_ns
                .map(|d| Duration::from_nanos(d.saturating_sub(self.now_ns())));
            if timeout.is_none() && self.input_closed && self.pending_input.is_empty() {
                return Err(HostError::WouldWaitForever);
            }
            let msg = match timeout {
                Some(t) => match self.rx.recv_timeout(t) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => Input::Closed,
                },
                None => self.rx.recv().unwrap_or(Input::Closed),
            };
            self.take(msg);
        }
    }

    fn attach(&mut self, kicker: Kicker) {
        *self.input_kicker.lock().unwrap() = Some(kicker);
        self.timer.0.lock().unwrap().kicker = Some(kicker);
        self.timer.1.notify_one();
    }

    fn detach(&mut self) {
        *self.input_kicker.lock().unwrap() = None;
        self.timer.0.lock().unwrap().kicker = None;
    }
}
