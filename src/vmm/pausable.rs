//! A host decorator that can pause the run loop from another thread and
//! throttle the guest: live migration's stop-and-copy and auto-converge, and
//! Ctrl-C in `revirt live`. Invisible to the guest and to a recording.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::host::{Async, Control, Host, HostError, PollCtx, Waker};
use super::vcpu::Kicker;

/// What the migration thread and the run loop share.
#[derive(Default)]
pub struct Shared {
    /// Pause the guest at the next poll point for stop-and-copy.
    stop: AtomicBool,
    /// Percent of wall time the guest must sleep (auto-converge).
    throttle: AtomicU32,
    kicker: Mutex<Option<Kicker>>,
    waker: Mutex<Option<Waker>>,
}

impl Shared {
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Makes the vCPU thread come back to the run loop soon: out of KVM_RUN
    /// (a kick) or out of an idle wait (a wake).
    pub fn nudge(&self) {
        if let Some(k) = *self.kicker.lock().unwrap() {
            k.kick();
        }
        if let Some(w) = &*self.waker.lock().unwrap() {
            w.wake();
        }
    }

    /// Pause at the next poll point (stop-and-copy).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.nudge();
    }

    /// Run freely again, unthrottled.
    pub fn clear(&self) {
        self.stop.store(false, Ordering::SeqCst);
        self.throttle.store(0, Ordering::SeqCst);
    }

    /// Make the guest sleep `pct` percent of wall time (auto-converge).
    pub fn set_throttle(&self, pct: u32) {
        self.throttle.store(pct, Ordering::SeqCst);
    }

    pub fn set_waker(&self, w: Waker) {
        *self.waker.lock().unwrap() = Some(w);
    }
}

/// Wraps the VM's host: pauses the run loop when the migration asks for
/// stop-and-copy, and throttles the guest while auto-converge says so.
/// Both are invisible to the guest and to a recording (a pause is not an
/// input; sleeping only delays host time, which the recorder logs anyway).
pub struct Pausable<'a> {
    pub inner: &'a mut dyn Host,
    shared: Arc<Shared>,
    ran_since: Instant,
    /// Another reason to pause (e.g. Ctrl-C in `revirt live`).
    also: Option<fn() -> bool>,
}

/// Throttling works in slices of this much wall time.
const THROTTLE_SLICE: Duration = Duration::from_millis(10);

impl<'a> Pausable<'a> {
    pub fn new(inner: &'a mut dyn Host, shared: Arc<Shared>) -> Pausable<'a> {
        Pausable { inner, shared, ran_since: Instant::now(), also: None }
    }

    /// Also pauses whenever `f` says so.
    pub fn or_when(mut self, f: fn() -> bool) -> Self {
        self.also = Some(f);
        self
    }

    fn pausing(&self) -> bool {
        self.shared.stop_requested() || self.also.is_some_and(|f| f())
    }

    fn throttle(&mut self) {
        let pct = self.shared.throttle.load(Ordering::Relaxed).min(99);
        if pct == 0 {
            return;
        }
        let run = THROTTLE_SLICE * (100 - pct) / 100;
        if self.ran_since.elapsed() >= run {
            std::thread::sleep(THROTTLE_SLICE * pct / 100);
            self.ran_since = Instant::now();
        }
    }
}

impl Host for Pausable<'_> {
    fn now_ns(&mut self) -> u64 {
        self.inner.now_ns()
    }
    fn clock_read(&mut self, ctx: &PollCtx) -> Result<u64, HostError> {
        self.inner.clock_read(ctx)
    }
    fn output(&mut self, bytes: &[u8]) -> Result<(), HostError> {
        self.inner.output(bytes)
    }
    fn poll(&mut self, ctx: &PollCtx, out: &mut Vec<Async>) -> Result<Control, HostError> {
        let c = self.inner.poll(ctx, out)?;
        self.throttle();
        Ok(if self.pausing() { Control::Pause } else { c })
    }
    fn wait(&mut self, ctx: &PollCtx, out: &mut Vec<Async>) -> Result<(), HostError> {
        if self.pausing() {
            return Ok(());
        }
        self.inner.wait(ctx, out)
    }
    fn delivered(&mut self, at: &super::point::ExecPoint, fp: u64, events: &[Async]) -> Result<(), HostError> {
        self.inner.delivered(at, fp, events)
    }
    fn precise(&mut self, exits: u64) -> bool {
        self.inner.precise(exits)
    }
    fn counter_plan(&mut self, exits: u64, branches: u64) -> super::counter::CounterPlan {
        self.inner.counter_plan(exits, branches)
    }
    fn attach(&mut self, kicker: Kicker) {
        *self.shared.kicker.lock().unwrap() = Some(kicker);
        self.inner.attach(kicker)
    }
    fn detach(&mut self) {
        *self.shared.kicker.lock().unwrap() = None;
        self.inner.detach()
    }
}
