//! The branch counter the run loop talks to: one trait, two implementations.
//!
//! A counter counts the guest's retired conditional branches since the last
//! guest-caused exit (the run loop resets it there) and can be armed to
//! *overflow* `n` branches ahead. An overflow is a stop of the guest at an
//! instruction boundary some branches late (the skid); the run loop learns
//! of it through [`BranchCounter::take_overflow`] and reports the stop to the
//! host, which hands the position to the landing algorithm
//! (`clock::pmu::Lander`).
//!
//! - `clock::pmu::PerfCounter` (hosts with a PMU): the hardware counts at
//!   full speed; the overflow is a signal to the vCPU thread whose handler
//!   sets `kvm_run.immediate_exit`, so `KVM_RUN` returns `EINTR` (the same
//!   exit a kick produces). The handler also notes *that* it was an
//!   overflow ([`overflow_signal`]).
//! - [`SimCounter`] (hosts without one, ours): counts exactly while the run
//!   loop single-steps ([`BranchCounter::needs_stepping`]) and reports the
//!   overflow late by a random skid from [`Skid`].
//!
//! Everything the run loop decides from a counter (reset at exits, where a
//! stop is, what the count is there, how far ahead to arm) is in the small
//! pure helpers below, unit-tested with a fake counter.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;


#[derive(Debug, thiserror::Error)]
pub enum PmuError {
    #[error("no hardware PMU: {0}")]
    Unavailable(String),
    #[error("unsupported CPU for the PMU clock: {0}")]
    UnsupportedCpu(String),
    #[error("kernel {0} is too old for the PMU clock: re-arming the overflow period (PERF_EVENT_IOC_PERIOD on a disabled counter) needs Linux >= 4.17")]
    OldKernel(String),
    #[error(
        "AMD Zen with the SpecLockMap optimization enabled: locked instructions make the \
         conditional-branch counter miscount (rr issue #2034); disable it as \
         https://github.com/rr-debugger/rr/wiki/Zen describes"
    )]
    SpecLockMap,
    #[error("perf_event_open ({what}): {source}")]
    Open { what: String, source: std::io::Error },
    #[error("perf counter {op}: {source}")]
    Io { op: &'static str, source: std::io::Error },
    #[error("pinning the vCPU thread to CPUs {cpus}: {source}")]
    Pin { cpus: String, source: std::io::Error },
    #[error("{path}: {msg}")]
    Sysfs { path: String, msg: String },
    #[error(
        "the {counter} miscounts the start-up probe guest: expected {expected} retired conditional \
         branches (the step clock's count), counted {counted} ({diff:+}){detail}"
    )]
    Miscount { counter: String, expected: u64, counted: u64, diff: i64, detail: String },
    #[error(
        "the {counter} counted the start-up probe guest's {expected} retired conditional branches \
         exactly, but {detail}"
    )]
    ProbeOverflow { counter: String, expected: u64, detail: String },
    #[error("the start-up probe guest did not run: {0}")]
    Probe(String),
}

/// A small deterministic PRNG (xorshift64*) for skids; tests print the seed.
#[derive(Debug, Clone)]
pub struct Skid(u64);

impl Skid {
    pub fn new(seed: u64) -> Skid {
        Skid(seed.max(1))
    }
    pub fn next(&mut self, max: u64) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D) % (max + 1)
    }
}

/// A guest branch counter as the run loop sees it.
pub trait BranchCounter {
    /// Restart the count at zero (at every guest-caused exit). Disarms.
    fn reset(&mut self) -> Result<(), PmuError>;
    /// Branches since the last reset.
    fn read(&mut self) -> Result<u64, PmuError>;
    /// Overflow (a stop) once `n` more branches have retired, or some later.
    fn arm(&mut self, n: u64) -> Result<(), PmuError>;
    /// No overflow stop from now on (counting goes on).
    fn disarm(&mut self) -> Result<(), PmuError>;
    /// Whether an overflow fired since the last call; clears it.
    fn take_overflow(&mut self) -> bool;
    /// The counter only counts while the run loop single-steps (simulated).
    fn needs_stepping(&self) -> bool {
        false
    }
    /// One single-step retired (simulated counter: this is how it counts).
    fn on_step(&mut self, _branch_retired: bool) {}
    /// Whether the counter counts while the guest runs free, so the host
    /// may reach a target RIP with a hardware breakpoint instead of
    /// single-stepping and read the count at any stop (a counter that
    /// counts by stepping cannot).
    fn breakpoints_ok(&self) -> bool {
        true
    }
    /// A name for messages.
    fn name(&self) -> &'static str;
    /// A longer description (which event, which PMU) for doctor and errors.
    fn describe(&self) -> String {
        self.name().to_string()
    }
    /// How many branches late an overflow may be reported (the landing
    /// margin it needs; the start-up probe holds it to this).
    fn margin(&self) -> u64 {
        0
    }
}

/// Opens the counter `--clock pmu` uses, on the calling thread (which then
/// runs the guest). Record takes one in its options so tests can put a
/// counter that miscounts in the hardware counter's place.
pub type CounterOpener = std::sync::Arc<dyn Fn() -> Result<Box<dyn BranchCounter + Send>, PmuError> + Send + Sync>;

/// The overflow armed in a counter: the count at which it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Armed {
    pub at: u64,
}

/// How far ahead to arm so that the counter overflows when the count since
/// the last exit reaches `overflow_at`, given it is `now`: `None` when that
/// count is already reached (the stop is due now).
pub fn arm_distance(overflow_at: u64, now: u64) -> Option<u64> {
    overflow_at.checked_sub(now).filter(|n| *n > 0)
}

/// Where a landing overflow should be programmed: `margin` branches before
/// the target count (None: the target is within the margin of the exit,
/// step from the exit). The same arithmetic as [`super::pmu::Lander::new`].
pub fn overflow_point(target_branches: u64, margin: u64) -> Option<u64> {
    (target_branches > margin).then(|| target_branches - margin)
}

/// What the host wants from the counter before the guest runs again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CounterPlan {
    /// Stop the guest (an overflow) when the branch count since the last
    /// guest-caused exit reaches this.
    pub overflow_at: Option<u64>,
    /// Report every arrival at this RIP (a hardware breakpoint where the
    /// counter allows, else single-stepping that reports only this RIP).
    pub breakpoint: Option<u64>,
}

/// What a run-loop stop means for the counter clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterStop {
    /// Nothing for the host: keep running (an invisible step of the
    /// simulated counter).
    None,
    /// Something asked the vCPU to stop (a kick: a timer or input is due).
    Kick,
    /// The armed overflow fired.
    Overflow,
}

/// Classifies a stop where `KVM_RUN` returned `EINTR` (real counter) or a
/// single-step boundary (simulated counter, `eintr` = a kick arrived since
/// the last boundary): an overflow takes precedence, as it is what the
/// landing waits for; a kick also stops.
pub fn classify(overflowed: bool, kicked: bool) -> CounterStop {
    if overflowed {
        CounterStop::Overflow
    } else if kicked {
        CounterStop::Kick
    } else {
        CounterStop::None
    }
}

/// The run loop's side of a counter: what it programmed, what it owes the
/// host. `vmm::Machine` drives the guest and calls these at each kind of
/// stop; all the decisions are here, so they are unit-tested with a fake.
pub struct RunCounter {
    counter: Box<dyn BranchCounter + Send>,
    /// The count when the counter was installed mid-interval (a checkpoint
    /// taken between exits carries its branch count).
    base: u64,
    /// The overflow point programmed for this exit interval.
    programmed: Option<u64>,
    /// A kick arrived while stepping: the next boundary is the stop.
    kicked: bool,
    /// The overflow fired in the interval an exit just ended: reported with
    /// that exit's poll.
    exit_overflow: bool,
}

impl RunCounter {
    /// Starts counting from `branches_now` (the count since the last exit).
    pub fn new(mut counter: Box<dyn BranchCounter + Send>, branches_now: u64) -> Result<RunCounter, PmuError> {
        counter.reset()?;
        counter.take_overflow();
        Ok(RunCounter { counter, base: branches_now, programmed: None, kicked: false, exit_overflow: false })
    }

    pub fn into_inner(self) -> Box<dyn BranchCounter + Send> {
        self.counter
    }

    pub fn counter(&self) -> &dyn BranchCounter {
        &*self.counter
    }

    /// Branches since the last guest-caused exit.
    pub fn count(&mut self) -> Result<u64, PmuError> {
        Ok(self.base + self.counter.read()?)
    }

    /// Programs the overflow the host wants at count `want` (once per
    /// change; `None` disarms). A point already reached is armed one branch
    /// on, the soonest a counter can stop (hosts step from there instead).
    pub fn program(&mut self, want: Option<u64>) -> Result<(), PmuError> {
        if want == self.programmed {
            return Ok(());
        }
        match want {
            Some(at) => {
                let now = self.count()?;
                self.counter.arm(arm_distance(at, now).unwrap_or(1))?
            }
            None => self.counter.disarm()?,
        }
        self.programmed = want;
        Ok(())
    }

    /// A guest-caused exit ended the interval: note an overflow that fired
    /// in it, restart the count at zero, forget what was programmed.
    pub fn at_exit(&mut self) -> Result<(), PmuError> {
        // Fired before the exit, or (simulated) due but skidding past it.
        self.exit_overflow |= self.counter.take_overflow();
        self.counter.reset()?;
        self.exit_overflow |= self.counter.take_overflow();
        self.base = 0;
        self.programmed = None;
        Ok(())
    }

    /// The overflow owed to the exit's poll (taken once).
    pub fn take_exit_overflow(&mut self) -> bool {
        std::mem::take(&mut self.exit_overflow)
    }

    /// `KVM_RUN` returned `EINTR` (a kick, or the real counter's overflow
    /// signal). Free-running with a counter that counts so: this is the
    /// stop, at an instruction boundary: `Some((overflowed, count))`.
    /// While stepping the vCPU may be mid-step: the next boundary is the
    /// stop (noted, `None`). A counter that counts by stepping and is not
    /// stepped is not counting: nothing to say (a spurious EINTR).
    pub fn at_eintr(&mut self, stepping: bool) -> Result<Option<(bool, u64)>, PmuError> {
        if stepping {
            self.kicked = true;
            return Ok(None);
        }
        if !self.counter.breakpoints_ok() {
            return Ok(None);
        }
        let overflow = self.counter.take_overflow();
        Ok(Some((overflow, self.count()?)))
    }

    /// A single-step boundary: the counter counts it (if it counts by
    /// stepping) and says whether it is a counter stop.
    pub fn at_step(&mut self, branch_retired: bool) -> CounterStop {
        self.counter.on_step(branch_retired);
        let overflow = self.counter.take_overflow() | std::mem::take(&mut self.exit_overflow);
        classify(overflow, std::mem::take(&mut self.kicked))
    }

    /// The hardware breakpoint at the landing RIP fired: the count there.
    pub fn at_breakpoint(&mut self) -> Result<(bool, u64), PmuError> {
        let overflow = self.counter.take_overflow();
        Ok((overflow, self.count()?))
    }

    pub fn needs_stepping(&self) -> bool {
        self.counter.needs_stepping()
    }

    pub fn breakpoints_ok(&self) -> bool {
        self.counter.breakpoints_ok()
    }
}

// ---- the real counter's overflow signal -----------------------------------

thread_local! {
    /// Set by the overflow signal handler on the vCPU thread it lands on.
    static OVERFLOWED: Cell<bool> = const { Cell::new(false) };
}

static HANDLER: Once = Once::new();
static HANDLER_OK: AtomicBool = AtomicBool::new(false);

/// The signal a perf counter overflow sends to the vCPU thread (not the
/// kick signal: the run loop must tell an overflow from a kick).
pub fn overflow_signal() -> i32 {
    libc::SIGRTMIN() + 2
}

extern "C" fn on_overflow(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    OVERFLOWED.with(|c| c.set(true));
    // Then act as a kick: immediate_exit, so KVM_RUN returns EINTR.
    super::vcpu::on_kick_signal(sig, info, ctx);
}

/// Registers the overflow handler once per process.
pub fn install_overflow_handler() -> bool {
    HANDLER.call_once(|| {
        let ok = vmm_sys_util::signal::register_signal_handler(overflow_signal(), on_overflow).is_ok();
        HANDLER_OK.store(ok, Ordering::SeqCst);
    });
    HANDLER_OK.load(Ordering::SeqCst)
}

/// Takes the calling thread's overflow flag.
pub fn take_overflow_flag() -> bool {
    OVERFLOWED.with(|c| c.replace(false))
}

/// The simulated counter: exact counts by single-stepping, overflows
/// reported late by a random skid (0..=max_skid branches, or a fixed one).
#[derive(Debug, Clone)]
pub struct SimCounter {
    count: u64,
    armed: Option<Armed>,
    /// The skid of the armed overflow.
    skid: u64,
    fired: bool,
    max_skid: u64,
    fixed_skid: Option<u64>,
    rng: Skid,
    /// Count all the time (recording: a kick may come anywhere), not only
    /// while armed (replay: only the target's exit interval matters).
    always: bool,
    /// Overflows reported so far.
    pub overflows: u64,
}

impl SimCounter {
    pub fn new(max_skid: u64, seed: u64, always: bool) -> SimCounter {
        SimCounter { count: 0, armed: None, skid: 0, fired: false, max_skid, fixed_skid: None, rng: Skid::new(seed), always, overflows: 0 }
    }
    /// Every overflow arrives exactly `skid` branches late.
    pub fn with_fixed_skid(skid: u64) -> SimCounter {
        let mut c = SimCounter::new(skid, 1, false);
        c.fixed_skid = Some(skid);
        c
    }
    /// The skid of the overflow armed last.
    pub fn skid(&self) -> u64 {
        self.skid
    }
    fn check(&mut self) {
        if let Some(a) = self.armed {
            if self.count >= a.at + self.skid {
                self.fired = true;
                self.armed = None;
                self.overflows += 1;
            }
        }
    }
}

impl BranchCounter for SimCounter {
    fn reset(&mut self) -> Result<(), PmuError> {
        // An overflow that had fired (count past the armed point) but whose
        // skid ran past the exit is reported at the exit, as late as it is.
        if let Some(a) = self.armed {
            if self.count >= a.at {
                self.fired = true;
                self.overflows += 1;
            }
        }
        self.armed = None;
        self.count = 0;
        Ok(())
    }
    fn read(&mut self) -> Result<u64, PmuError> {
        Ok(self.count)
    }
    fn arm(&mut self, n: u64) -> Result<(), PmuError> {
        self.skid = self.fixed_skid.unwrap_or_else(|| self.rng.next(self.max_skid));
        self.armed = Some(Armed { at: self.count + n.max(1) });
        self.check();
        Ok(())
    }
    fn disarm(&mut self) -> Result<(), PmuError> {
        self.armed = None;
        Ok(())
    }
    fn take_overflow(&mut self) -> bool {
        std::mem::take(&mut self.fired)
    }
    fn needs_stepping(&self) -> bool {
        self.always || self.armed.is_some()
    }
    fn breakpoints_ok(&self) -> bool {
        false // it counts only what it is stepped through
    }
    fn on_step(&mut self, branch_retired: bool) {
        if branch_retired {
            self.count += 1;
        }
        self.check();
    }
    fn name(&self) -> &'static str {
        "simulated counter"
    }
    fn margin(&self) -> u64 {
        self.max_skid
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A fake hardware counter: the test plays the guest (adds branches)
    /// and the PMU (raises the overflow signal when the count passes the
    /// armed point, `late` branches late).
    #[derive(Debug, Default)]
    pub struct FakeCounter {
        pub count: u64,
        pub armed_at: Option<u64>,
        pub signalled: bool,
        pub resets: u32,
        pub late: u64,
    }

    impl FakeCounter {
        pub fn retire(&mut self, branches: u64) {
            self.count += branches;
            if let Some(a) = self.armed_at {
                if self.count >= a + self.late {
                    self.signalled = true;
                }
            }
        }
    }

    impl BranchCounter for FakeCounter {
        fn reset(&mut self) -> Result<(), PmuError> {
            self.count = 0;
            self.armed_at = None;
            self.resets += 1;
            Ok(())
        }
        fn read(&mut self) -> Result<u64, PmuError> {
            Ok(self.count)
        }
        fn arm(&mut self, n: u64) -> Result<(), PmuError> {
            self.armed_at = Some(self.count + n);
            Ok(())
        }
        fn disarm(&mut self) -> Result<(), PmuError> {
            self.armed_at = None;
            Ok(())
        }
        fn take_overflow(&mut self) -> bool {
            if std::mem::take(&mut self.signalled) {
                self.armed_at = None;
                true
            } else {
                false
            }
        }
        fn name(&self) -> &'static str {
            "fake"
        }
    }

    #[test]
    fn arm_arithmetic_is_target_minus_margin() {
        assert_eq!(overflow_point(1000, 100), Some(900));
        assert_eq!(overflow_point(100, 100), None, "within the margin: step from the exit");
        assert_eq!(overflow_point(5, 100), None);
        // Armed from a stop part-way through the interval: only the rest.
        assert_eq!(arm_distance(900, 0), Some(900));
        assert_eq!(arm_distance(900, 850), Some(50));
        assert_eq!(arm_distance(900, 900), None, "already there: stop now");
        assert_eq!(arm_distance(900, 950), None);
    }

    #[test]
    fn stops_are_classified_overflow_first() {
        assert_eq!(classify(true, true), CounterStop::Overflow);
        assert_eq!(classify(true, false), CounterStop::Overflow);
        assert_eq!(classify(false, true), CounterStop::Kick);
        assert_eq!(classify(false, false), CounterStop::None);
    }

    #[test]
    fn fake_counter_overflows_late_and_resets_at_exits() {
        let mut c = FakeCounter { late: 7, ..Default::default() };
        c.retire(10);
        let n = arm_distance(100, c.read().unwrap()).unwrap();
        c.arm(n).unwrap();
        assert_eq!(c.armed_at, Some(100));
        c.retire(95);
        assert!(!c.take_overflow(), "not yet: 105 < 100 + 7");
        c.retire(2);
        assert!(c.take_overflow());
        assert_eq!(c.read().unwrap(), 107, "the stop is read where it happened");
        assert!(!c.take_overflow(), "reported once");
        c.reset().unwrap();
        assert_eq!((c.read().unwrap(), c.armed_at, c.resets), (0, None, 1));
    }

    /// A `FakeCounter` shared with the test while the `RunCounter` owns it.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<FakeCounter>>);

    impl BranchCounter for Shared {
        fn reset(&mut self) -> Result<(), PmuError> {
            self.0.lock().unwrap().reset()
        }
        fn read(&mut self) -> Result<u64, PmuError> {
            self.0.lock().unwrap().read()
        }
        fn arm(&mut self, n: u64) -> Result<(), PmuError> {
            self.0.lock().unwrap().arm(n)
        }
        fn disarm(&mut self) -> Result<(), PmuError> {
            self.0.lock().unwrap().disarm()
        }
        fn take_overflow(&mut self) -> bool {
            self.0.lock().unwrap().take_overflow()
        }
        fn name(&self) -> &'static str {
            "fake"
        }
    }

    fn glue(late: u64, branches_now: u64) -> (RunCounter, Shared) {
        let f = Shared::default();
        f.0.lock().unwrap().late = late;
        (RunCounter::new(Box::new(f.clone()), branches_now).unwrap(), f)
    }

    #[test]
    fn run_loop_arms_target_minus_margin_and_reads_the_overflow_stop() {
        let (mut rc, f) = glue(5, 0);
        // The host asks for the overflow 100 before a target at 1000.
        rc.program(overflow_point(1000, 100)).unwrap();
        assert_eq!(f.0.lock().unwrap().armed_at, Some(900));
        rc.program(Some(900)).unwrap(); // asked again before the next entry: unchanged
        assert_eq!(f.0.lock().unwrap().armed_at, Some(900));
        f.0.lock().unwrap().retire(904);
        // KVM_RUN returns EINTR for another reason (a spurious one): a stop, no overflow.
        assert_eq!(rc.at_eintr(false).unwrap(), Some((false, 904)));
        f.0.lock().unwrap().retire(1);
        // The overflow signal: EINTR, and the count read there (5 late).
        assert_eq!(rc.at_eintr(false).unwrap(), Some((true, 905)));
        assert_eq!(rc.at_eintr(false).unwrap(), Some((false, 905)), "one overflow, one report");
    }

    #[test]
    fn run_loop_reads_the_count_at_a_kick_stop_and_resets_at_exits() {
        let (mut rc, f) = glue(0, 0);
        f.0.lock().unwrap().retire(37);
        assert_eq!(rc.at_eintr(false).unwrap(), Some((false, 37)), "a kick: deliver at 37 branches");
        rc.program(Some(50)).unwrap();
        rc.at_exit().unwrap();
        let fc = f.0.lock().unwrap();
        assert_eq!((fc.count, fc.armed_at), (0, None), "reset and disarmed at the exit");
        assert_eq!(fc.resets, 2, "once when installed, once at the exit");
        drop(fc);
        assert_eq!(rc.count().unwrap(), 0);
        // The next interval's request is programmed afresh, even if equal.
        rc.program(Some(50)).unwrap();
        assert_eq!(f.0.lock().unwrap().armed_at, Some(50));
    }

    #[test]
    fn run_loop_reports_an_overflow_that_an_exit_overtook() {
        let (mut rc, f) = glue(30, 0);
        rc.program(Some(10)).unwrap();
        f.0.lock().unwrap().retire(45); // past 10 + 30: signalled, but an exit came first
        rc.at_exit().unwrap();
        assert!(rc.take_exit_overflow(), "reported with the exit's poll");
        assert!(!rc.take_exit_overflow());
    }

    #[test]
    fn run_loop_counts_from_a_mid_interval_start_and_arms_the_rest() {
        // Restored from a checkpoint 300 branches past the last exit.
        let (mut rc, f) = glue(0, 300);
        f.0.lock().unwrap().retire(20);
        assert_eq!(rc.count().unwrap(), 320);
        rc.program(Some(400)).unwrap();
        assert_eq!(f.0.lock().unwrap().armed_at, Some(20 + 80), "80 more branches");
        // Already past: the soonest stop, one branch on.
        let (mut rc, f) = glue(0, 500);
        rc.program(Some(400)).unwrap();
        assert_eq!(f.0.lock().unwrap().armed_at, Some(1));
    }

    #[test]
    fn a_kick_while_stepping_stops_at_the_next_boundary() {
        let (mut rc, _f) = glue(0, 0);
        assert_eq!(rc.at_eintr(true).unwrap(), None, "mid-step: not a boundary");
        assert_eq!(rc.at_step(false), CounterStop::Kick);
        assert_eq!(rc.at_step(false), CounterStop::None);
    }

    #[test]
    fn the_simulated_counter_through_the_run_loop_glue() {
        let mut rc = RunCounter::new(Box::new(SimCounter::with_fixed_skid(2)), 0).unwrap();
        assert_eq!(rc.at_eintr(false).unwrap(), None, "not stepped, not counting: a spurious EINTR");
        rc.program(Some(3)).unwrap();
        assert!(rc.needs_stepping() && !rc.breakpoints_ok());
        let stops: Vec<CounterStop> = (0..8).map(|_| rc.at_step(true)).collect();
        assert_eq!(stops.iter().position(|s| *s == CounterStop::Overflow), Some(4), "at 5 = 3 + skid 2");
        assert_eq!(rc.count().unwrap(), 8);
    }

    #[test]
    fn sim_counter_counts_steps_and_skids() {
        let mut c = SimCounter::with_fixed_skid(3);
        assert!(!c.needs_stepping(), "replay: counts only while armed");
        c.arm(5).unwrap();
        assert!(c.needs_stepping());
        for i in 0..20 {
            c.on_step(i % 2 == 0); // a branch every other instruction
            if c.take_overflow() {
                assert_eq!(c.read().unwrap(), 8, "overflow at 5, reported 3 branches late");
                assert_eq!(i, 14);
                assert!(!c.needs_stepping());
                return;
            }
        }
        panic!("never overflowed");
    }

    #[test]
    fn sim_counter_reports_an_overflow_carried_past_an_exit() {
        let mut c = SimCounter::with_fixed_skid(10);
        c.arm(2).unwrap();
        c.on_step(true);
        c.on_step(true);
        c.on_step(true);
        assert!(!c.take_overflow(), "skid pending");
        c.reset().unwrap();
        assert!(c.take_overflow(), "reported at the exit, past the interval");
        assert_eq!(c.read().unwrap(), 0);
    }

    #[test]
    fn sim_counter_random_skids_stay_in_bounds() {
        let mut c = SimCounter::new(40, 9, true);
        assert!(c.needs_stepping(), "recording: counts everywhere");
        for _ in 0..200 {
            c.reset().unwrap();
            c.arm(1).unwrap();
            assert!(c.skid() <= 40);
            let mut n = 0;
            while !c.take_overflow() {
                c.on_step(true);
                n += 1;
            }
            assert_eq!(n, 1 + c.skid());
        }
    }

    #[test]
    fn overflow_signal_sets_the_flag_on_this_thread() {
        assert!(install_overflow_handler());
        take_overflow_flag();
        // SAFETY: sending a signal with an installed handler to this thread.
        unsafe { libc::pthread_kill(libc::pthread_self(), overflow_signal()) };
        assert!(take_overflow_flag(), "the handler ran on this thread");
        assert!(!take_overflow_flag(), "taken once");
    }

}
