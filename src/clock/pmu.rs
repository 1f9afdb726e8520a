//! The PMU clock: time async events by the guest's retired conditional
//! branches, counted by a hardware PMU at full speed, and land on the exact
//! instruction afterwards (ReVirt's design, refined by rr).
//!
//! Landing (rr's `emulate_async_signal`): program the counter to overflow a
//! safety margin *before* the target count (PMU interrupts skid: they arrive
//! some branches late), run at full speed until it fires, then single-step
//! (or breakpoint the target RIP) comparing branch count, RIP and the register
//! fingerprint at every stop; a position past the target is an overshoot and
//! is reported, never silently accepted.
//!
//! Two counters implement the same behaviour, behind the run loop's
//! [`super::counter::BranchCounter`]:
//! - [`PerfCounter`]: perf_event_open on the vCPU thread, guest-only
//!   (`exclude_host`), raw "retired conditional branches" event per CPU
//!   family, overflow delivered as a signal so KVM_RUN returns
//!   ([`super::counter::RealCounter`]);
//! - the simulated counter for hosts without a PMU (ours): it counts exactly
//!   by single-stepping and reports the overflow late by a random skid
//!   ([`super::counter::SimCounter`]).

use serde::{Deserialize, Serialize};

use super::ExecPoint;

#[derive(Debug, thiserror::Error)]
pub enum PmuError {
    #[error("no hardware PMU: {0}")]
    Unavailable(String),
    #[error("unsupported CPU for the PMU clock: {0}")]
    UnsupportedCpu(String),
    #[error("perf_event_open: {0}")]
    Open(std::io::Error),
    #[error("perf counter {op}: {source}")]
    Io { op: &'static str, source: std::io::Error },
}

/// The CPU as /proc/cpuinfo describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuModel {
    pub vendor: String,
    pub family: u32,
    pub model: u32,
}

impl CpuModel {
    pub fn parse(cpuinfo: &str) -> Option<CpuModel> {
        let field = |k: &str| {
            cpuinfo
                .lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(k))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        };
        Some(CpuModel {
            vendor: field("vendor_id")?,
            family: field("cpu family")?.parse().ok()?,
            model: field("model")?.parse().ok()?,
        })
    }

    pub fn host() -> Option<CpuModel> {
        CpuModel::parse(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
    }
}

/// How to count retired conditional branches on a CPU, and how late the
/// overflow interrupt may arrive (rr's measured skid margins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerfConfig {
    /// PERF_TYPE_RAW event code.
    pub raw_event: u64,
    /// Branches of skid to allow for while replaying.
    pub replay_margin: u64,
}

impl PerfConfig {
    /// While recording the margin is larger (rr uses 5x).
    pub fn record_margin(&self) -> u64 {
        self.replay_margin * 5
    }

    pub fn for_cpu(cpu: &CpuModel) -> Result<PerfConfig, PmuError> {
        match (cpu.vendor.as_str(), cpu.family) {
            ("GenuineIntel", 6) => {
                // BR_INST_RETIRED.CONDITIONAL; Ice Lake and later moved the umask.
                let ice_lake_or_later = matches!(
                    cpu.model,
                    0x6A | 0x6C | 0x7D | 0x7E | 0x8C | 0x8D | 0x8F | 0x97 | 0x9A | 0xA7 | 0xAA | 0xAC | 0xB7 | 0xBA | 0xBD | 0xBE | 0xBF | 0xC5 | 0xC6 | 0xCF
                );
                let alder_lake_or_later =
                    matches!(cpu.model, 0x97 | 0x9A | 0xAA | 0xAC | 0xB7 | 0xBA | 0xBD | 0xBE | 0xBF | 0xC5 | 0xC6 | 0xCF | 0x8F);
                Ok(PerfConfig {
                    raw_event: if ice_lake_or_later { 0x5111c4 } else { 0x5101c4 },
                    replay_margin: if alder_lake_or_later { 125 } else { 100 },
                })
            }
            ("AuthenticAMD", 0x15) => Ok(PerfConfig { raw_event: 0x5100d1, replay_margin: 250 }),
            // Zen: RETIRED_CONDITIONAL_BRANCH_INSTRUCTIONS; skid is effectively unbounded.
            ("AuthenticAMD", 0x17 | 0x19 | 0x1A) | ("HygonGenuine", 0x18) => {
                Ok(PerfConfig { raw_event: 0x5100d1, replay_margin: 10000 })
            }
            _ => Err(PmuError::UnsupportedCpu(format!(
                "{} family {:#x} model {:#x} has no known conditional-branch event",
                cpu.vendor, cpu.family, cpu.model
            ))),
        }
    }
}

/// The perf_event_attr the real counter uses: raw event, guest only,
/// starts disabled, overflow after `period` events, one wakeup per overflow.
pub fn perf_attr(cfg: &PerfConfig, period: u64) -> perf_event_open_sys::bindings::perf_event_attr {
    use perf_event_open_sys::bindings as b;
    let mut attr = b::perf_event_attr {
        type_: b::PERF_TYPE_RAW,
        size: std::mem::size_of::<b::perf_event_attr>() as u32,
        config: cfg.raw_event,
        ..Default::default()
    };
    attr.__bindgen_anon_1.sample_period = period;
    attr.__bindgen_anon_2.wakeup_events = 1;
    attr.set_disabled(1);
    attr.set_exclude_host(1); // count the guest only (both guest rings)
    attr.set_exclude_guest(0);
    attr.set_pinned(1);
    attr
}

// fcntl commands and struct from <fcntl.h> that the libc crate lacks.
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;
#[repr(C)]
struct FOwnerEx {
    type_: libc::c_int,
    pid: libc::pid_t,
}

/// Makes overflows of perf fd `fd` deliver signal `sig` to thread `tid`
/// (O_ASYNC + F_SETSIG + F_SETOWN_EX), so KVM_RUN returns with EINTR.
pub fn route_overflow_signal(fd: i32, tid: i32, sig: i32) -> Result<(), PmuError> {
    let err = |op| PmuError::Io { op, source: std::io::Error::last_os_error() };
    let owner = FOwnerEx { type_: F_OWNER_TID, pid: tid };
    // SAFETY: plain fcntl calls on an fd we own; `owner` outlives the call.
    unsafe {
        if libc::fcntl(fd, F_SETOWN_EX, &owner as *const FOwnerEx) != 0 {
            return Err(err("F_SETOWN_EX"));
        }
        if libc::fcntl(fd, F_SETSIG, sig) != 0 {
            return Err(err("F_SETSIG"));
        }
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_ASYNC) != 0 {
            return Err(err("F_SETFL O_ASYNC"));
        }
    }
    Ok(())
}

/// A guest-only hardware branch counter on the calling (vCPU) thread.
pub struct PerfCounter {
    fd: i32,
    pub config: PerfConfig,
}

// perf ioctls (include/uapi/linux/perf_event.h).
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;
const PERF_EVENT_IOC_RESET: libc::c_ulong = 0x2403;
const PERF_EVENT_IOC_PERIOD: libc::c_ulong = 0x40082404;

impl PerfCounter {
    /// Opens the counter for this thread; overflows send `signal` to it.
    pub fn open(signal: i32) -> Result<PerfCounter, PmuError> {
        let cpu = CpuModel::host().ok_or_else(|| PmuError::UnsupportedCpu("cannot read /proc/cpuinfo".into()))?;
        let config = PerfConfig::for_cpu(&cpu)?;
        let mut attr = perf_attr(&config, 1 << 62);
        // SAFETY: attr is fully initialized; pid 0 / cpu -1 = this thread.
        let fd = unsafe { perf_event_open_sys::perf_event_open(&mut attr, 0, -1, -1, perf_event_open_sys::bindings::PERF_FLAG_FD_CLOEXEC as libc::c_ulong) };
        if fd < 0 {
            return Err(PmuError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        let c = PerfCounter { fd, config };
        route_overflow_signal(fd, tid, signal)?;
        c.ioctl("enable", PERF_EVENT_IOC_ENABLE, 0)?;
        Ok(c)
    }

    fn ioctl(&self, op: &'static str, req: libc::c_ulong, arg: u64) -> Result<(), PmuError> {
        // SAFETY: perf ioctls on our own perf fd; PERIOD reads a u64 through the pointer.
        let r = unsafe {
            if req == PERF_EVENT_IOC_PERIOD {
                libc::ioctl(self.fd, req, &arg as *const u64)
            } else {
                libc::ioctl(self.fd, req, arg)
            }
        };
        if r < 0 {
            return Err(PmuError::Io { op, source: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    pub fn read(&self) -> Result<u64, PmuError> {
        let mut v = 0u64;
        // SAFETY: reading 8 bytes into a u64 from our perf fd.
        let n = unsafe { libc::read(self.fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
        if n != 8 {
            return Err(PmuError::Io { op: "read", source: std::io::Error::last_os_error() });
        }
        Ok(v)
    }

    pub fn reset(&self) -> Result<(), PmuError> {
        self.ioctl("reset", PERF_EVENT_IOC_RESET, 0)
    }

    /// Overflow (and signal) after `n` more branches.
    pub fn arm(&self, n: u64) -> Result<(), PmuError> {
        self.ioctl("disable", PERF_EVENT_IOC_DISABLE, 0)?;
        self.ioctl("period", PERF_EVENT_IOC_PERIOD, n.max(1))?;
        self.ioctl("enable", PERF_EVENT_IOC_ENABLE, 0)
    }
}

impl Drop for PerfCounter {
    fn drop(&mut self) {
        // SAFETY: closing our own fd once.
        unsafe { libc::close(self.fd) };
    }
}

/// Where to land: an execution point plus the register fingerprint there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub at: ExecPoint,
    pub fp: u64,
}

/// Where the guest stands (exact: read after a step or an overflow stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub at: ExecPoint,
    pub fp: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Arrived,
    KeepStepping,
    Overshoot(String),
}

/// The landing algorithm as a state machine, so the same code runs against
/// a real PMU, the simulated counter and a synthetic trace in tests.
#[derive(Debug, Clone)]
pub struct Lander {
    pub target: Target,
    /// The counter is programmed to overflow at this branch count (None:
    /// the target is within the margin of the interval start — step all the way).
    pub overflow_at: Option<u64>,
    stepping: bool,
    pub steps: u64,
}

impl Lander {
    pub fn new(target: Target, margin: u64) -> Lander {
        let overflow_at = (target.at.branches > margin).then(|| target.at.branches - margin);
        Lander { target, overflow_at, stepping: overflow_at.is_none(), steps: 0 }
    }

    /// Whether the counter is still running free (no stop seen yet).
    pub fn free_running(&self) -> bool {
        !self.stepping
    }

    fn judge(&self, p: &Pos) -> Verdict {
        let t = &self.target.at;
        let (pa, ta) = ((p.at.exits, p.at.branches), (t.exits, t.branches));
        if pa > ta {
            return Verdict::Overshoot(format!(
                "overshot {t}: the guest is already at {} (the counter's skid exceeded the margin?)",
                p.at
            ));
        }
        if p.at == *t && p.fp == self.target.fp {
            Verdict::Arrived
        } else {
            Verdict::KeepStepping
        }
    }

    /// The overflow will not come (the count is already past where it was
    /// programmed): go on by stepping/breakpoints from here.
    pub fn start_stepping(&mut self) {
        self.stepping = true;
    }

    /// The counter overflowed and the guest stopped at `p` (some skid late).
    pub fn on_overflow(&mut self, p: Pos) -> Verdict {
        self.stepping = true;
        self.judge(&p)
    }

    /// A stop while single-stepping (or at a breakpoint on the target RIP).
    pub fn on_step(&mut self, p: Pos) -> Verdict {
        self.steps += 1;
        self.judge(&p)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn event_codes_per_cpu_family() {
        let intel = |model| CpuModel { vendor: "GenuineIntel".into(), family: 6, model };
        assert_eq!(PerfConfig::for_cpu(&intel(0x55)).unwrap(), PerfConfig { raw_event: 0x5101c4, replay_margin: 100 }); // Skylake-X
        assert_eq!(PerfConfig::for_cpu(&intel(0x6A)).unwrap().raw_event, 0x5111c4); // Ice Lake-SP
        assert_eq!(PerfConfig::for_cpu(&intel(0x97)).unwrap(), PerfConfig { raw_event: 0x5111c4, replay_margin: 125 }); // Alder Lake
        let amd = |family| CpuModel { vendor: "AuthenticAMD".into(), family, model: 1 };
        assert_eq!(PerfConfig::for_cpu(&amd(0x19)).unwrap(), PerfConfig { raw_event: 0x5100d1, replay_margin: 10000 });
        assert_eq!(PerfConfig::for_cpu(&amd(0x15)).unwrap().replay_margin, 250);
        assert_eq!(PerfConfig::for_cpu(&amd(0x19)).unwrap().record_margin(), 50000);
        assert!(PerfConfig::for_cpu(&CpuModel { vendor: "Weird".into(), family: 1, model: 1 }).is_err());
    }

    #[test]
    fn cpuinfo_parsing() {
        let s = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\nmodel name\t: Xeon\n";
        assert_eq!(CpuModel::parse(s), Some(CpuModel { vendor: "GenuineIntel".into(), family: 6, model: 85 }));
        assert_eq!(CpuModel::parse("nothing"), None);
    }

    #[test]
    fn perf_attr_counts_guest_branches_and_overflows() {
        let cfg = PerfConfig { raw_event: 0x5101c4, replay_margin: 100 };
        let a = perf_attr(&cfg, 12345);
        assert_eq!(a.type_, perf_event_open_sys::bindings::PERF_TYPE_RAW);
        assert_eq!(a.config, 0x5101c4);
        // SAFETY: reading plain integer union fields we just wrote.
        unsafe {
            assert_eq!(a.__bindgen_anon_1.sample_period, 12345);
            assert_eq!(a.__bindgen_anon_2.wakeup_events, 1);
        }
        assert_eq!(a.exclude_host(), 1, "must count the guest only");
        assert_eq!(a.exclude_guest(), 0);
        assert_eq!(a.disabled(), 1);
        assert_eq!(a.exclude_kernel(), 0, "guest ring 0 counts too");
    }

    #[test]
    fn overflow_signal_reaches_the_thread() {
        // The PMU event does not exist here, but the same fcntl routing works
        // for a software event: prove the signal lands on this thread.
        use perf_event_open_sys::bindings as b;
        use std::sync::atomic::{AtomicU32, Ordering};
        static HITS: AtomicU32 = AtomicU32::new(0);
        extern "C" fn on(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
            HITS.fetch_add(1, Ordering::SeqCst);
        }
        let sig = libc::SIGRTMIN() + 3;
        vmm_sys_util::signal::register_signal_handler(sig, on).unwrap();
        let mut attr = b::perf_event_attr {
            type_: b::PERF_TYPE_SOFTWARE,
            size: std::mem::size_of::<b::perf_event_attr>() as u32,
            config: b::PERF_COUNT_SW_TASK_CLOCK as u64,
            ..Default::default()
        };
        attr.__bindgen_anon_1.sample_period = 1_000_000; // 1 ms of this thread's CPU time
        attr.__bindgen_anon_2.wakeup_events = 1;
        attr.set_disabled(1);
        // SAFETY: valid attr, this thread.
        let fd = unsafe { perf_event_open_sys::perf_event_open(&mut attr, 0, -1, -1, 0) };
        if fd < 0 {
            eprintln!("skipping: perf software events unavailable: {}", std::io::Error::last_os_error());
            return;
        }
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        route_overflow_signal(fd, tid, sig).unwrap();
        // SAFETY: enable our own counter.
        unsafe { libc::ioctl(fd, PERF_EVENT_IOC_ENABLE, 0) };
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while HITS.load(Ordering::SeqCst) == 0 && t.elapsed() < std::time::Duration::from_secs(5) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
        assert!(HITS.load(Ordering::SeqCst) > 0, "the overflow signal never arrived");
    }

    #[test]
    fn real_pmu_counter_where_present() {
        match PerfCounter::open(libc::SIGRTMIN() + 4) {
            Ok(c) => {
                c.reset().unwrap();
                assert_eq!(c.read().unwrap(), 0, "no guest runs on this thread: the guest-only count stays 0");
                c.arm(1000).unwrap();
            }
            Err(e) => eprintln!("skipping the real PMU test: {e} (this host has no usable PMU; see `revirt doctor`)"),
        }
    }

    /// A synthetic instruction trace: positions within one exit interval;
    /// some steps retire a branch; a loop without branches repeats RIPs.
    fn trace(branches: &[bool]) -> Vec<Pos> {
        let mut v = Vec::new();
        let mut b = 0;
        for (i, br) in branches.iter().enumerate() {
            if *br {
                b += 1;
            }
            v.push(Pos { at: ExecPoint { exits: 7, branches: b, rip: 0x1000 + (i as u64 % 5) }, fp: i as u64 });
        }
        v
    }

    /// Drives the lander over `t` like a counter with `skid` would.
    fn land(t: &[Pos], target: usize, margin: u64, skid: u64) -> Result<usize, String> {
        let mut l = Lander::new(Target { at: t[target].at, fp: t[target].fp }, margin);
        let mut i = match l.overflow_at {
            Some(at) => {
                // Run free until the counter reaches `at`, then `skid` branches more.
                let first = t.iter().position(|p| p.at.branches >= at).unwrap();
                let goal = t[first].at.branches + skid;
                match t.iter().position(|p| p.at.branches >= goal) {
                    Some(j) => j,
                    None => return Err("ran off the trace".into()),
                }
            }
            None => 0,
        };
        let mut v = if l.overflow_at.is_some() { l.on_overflow(t[i]) } else { l.on_step(t[0]) };
        loop {
            match v {
                Verdict::Arrived => return Ok(i),
                Verdict::Overshoot(why) => return Err(why),
                Verdict::KeepStepping => {
                    i += 1;
                    if i >= t.len() {
                        return Err("ran off the trace".into());
                    }
                    v = l.on_step(t[i]);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn lands_exactly_or_reports_overshoot(
            branches in proptest::collection::vec(proptest::bool::weighted(0.3), 50..400),
            target_frac in 0.0f64..1.0,
            margin in 0u64..40,
            skid in 0u64..80,
        ) {
            let t = trace(&branches);
            let target = ((t.len() - 1) as f64 * target_frac) as usize;
            match land(&t, target, margin, skid) {
                Ok(i) => prop_assert_eq!(i, target, "landed on the wrong instruction"),
                Err(why) => {
                    // Only allowed when the skid carried us past the target.
                    prop_assert!(skid > margin || why.contains("ran off"), "unexpected failure: {}", why);
                }
            }
            if skid <= margin {
                prop_assert_eq!(land(&t, target, margin, skid), Ok(target));
            }
        }
    }
}
