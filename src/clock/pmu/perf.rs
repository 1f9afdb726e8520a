//! The hardware counter: perf_event_open on the vCPU thread, overflow as a
//! signal that makes KVM_RUN return, behind the run loop's `BranchCounter`.

use super::host::{pin_current_thread, PmuChoice};
use super::table::PerfConfig;
use crate::vmm::counter::{
    install_overflow_handler, overflow_signal, take_overflow_flag, Armed, BranchCounter, CounterOpener, PmuError,
};

/// The perf_event_attr the real counter uses: the raw event on the chosen
/// PMU's perf type, guest only, starts disabled, overflow after `period`
/// events, one wakeup per overflow.
pub fn perf_attr(cfg: &PerfConfig, perf_type: u32, period: u64) -> perf_event_open_sys::bindings::perf_event_attr {
    use perf_event_open_sys::bindings as b;
    let mut attr = b::perf_event_attr {
        type_: perf_type,
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

fn open_attr(attr: &mut perf_event_open_sys::bindings::perf_event_attr, what: &str) -> Result<i32, PmuError> {
    // SAFETY: attr is fully initialized; pid 0 / cpu -1 = this thread.
    let fd = unsafe {
        perf_event_open_sys::perf_event_open(attr, 0, -1, -1, perf_event_open_sys::bindings::PERF_FLAG_FD_CLOEXEC as libc::c_ulong)
    };
    if fd < 0 {
        return Err(PmuError::Open { what: what.into(), source: std::io::Error::last_os_error() });
    }
    Ok(fd)
}

/// rr's `check_for_zen_speclockmap`: with SpecLockMap disabled, a locked
/// instruction leaves RETIRED_LOCK_INSTRUCTIONS.SPECLOCKMAPCOMMIT (raw
/// 0x510825) unchanged. `before`/`after` are its counts around one `lock add`.
pub fn speclockmap_enabled(before: u64, after: u64) -> bool {
    after != before
}

/// Runs rr's SpecLockMap check on this thread (AMD Zen only).
fn check_zen_speclockmap(perf_type: u32) -> Result<(), PmuError> {
    use perf_event_open_sys::bindings as b;
    let mut attr = b::perf_event_attr {
        type_: perf_type,
        size: std::mem::size_of::<b::perf_event_attr>() as u32,
        config: 0x510825,
        ..Default::default()
    };
    attr.set_exclude_kernel(1);
    attr.set_exclude_guest(1);
    // rr ignores a failure to open this event; so do we.
    let Ok(fd) = open_attr(&mut attr, "SpecLockMap check event 0x510825") else { return Ok(()) };
    let read = || {
        let mut v = 0u64;
        // SAFETY: reading 8 bytes into a u64 from our perf fd.
        unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
        v
    };
    let before = read();
    let atomic = std::sync::atomic::AtomicU32::new(0);
    atomic.fetch_add(1, std::sync::atomic::Ordering::SeqCst); // a `lock xadd`
    let after = read();
    // SAFETY: closing our own fd once.
    unsafe { libc::close(fd) };
    if speclockmap_enabled(before, after) {
        return Err(PmuError::SpecLockMap);
    }
    Ok(())
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
    pub choice: PmuChoice,
}

// perf ioctls (include/uapi/linux/perf_event.h).
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;
const PERF_EVENT_IOC_RESET: libc::c_ulong = 0x2403;
const PERF_EVENT_IOC_PERIOD: libc::c_ulong = 0x40082404;

impl PerfCounter {
    /// Opens the counter for this thread as [`PmuChoice::host`] says
    /// (pinning the thread on hybrid hosts); overflows send `signal` to it.
    pub fn open(signal: i32) -> Result<PerfCounter, PmuError> {
        PerfCounter::open_with(PmuChoice::host()?, signal)
    }

    pub fn open_with(choice: PmuChoice, signal: i32) -> Result<PerfCounter, PmuError> {
        if let Some(cpus) = &choice.pin {
            pin_current_thread(cpus)?;
        }
        if choice.zen {
            check_zen_speclockmap(choice.pmu.perf_type)?;
        }
        let config = choice.config;
        let mut attr = perf_attr(&config, choice.pmu.perf_type, 1 << 62);
        let fd = open_attr(&mut attr, &format!("raw event {:#x} on {}", config.raw_event, choice.pmu.name))?;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        let c = PerfCounter { fd, config, choice };
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

    /// Overflow (and signal) after `n` more branches. The period is changed
    /// while the counter is disabled; since Linux 4.17 the kernel then
    /// starts the new period from the current count (checked in
    /// [`PmuChoice::choose`]; the start-up probe's overflow check tests it).
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

/// The real counter, with what the run loop needs around [`PerfCounter`].
pub struct RealCounter {
    pub perf: PerfCounter,
    armed: Option<Armed>,
}

impl RealCounter {
    /// Opens the hardware counter on the calling (vCPU) thread; overflows
    /// signal this thread with [`overflow_signal`].
    pub fn open() -> Result<RealCounter, PmuError> {
        if !install_overflow_handler() {
            return Err(PmuError::Unavailable("cannot install the overflow signal handler".into()));
        }
        crate::vmm::vcpu::install_kick_handler();
        let perf = PerfCounter::open(overflow_signal())?;
        take_overflow_flag();
        Ok(RealCounter { perf, armed: None })
    }
}

impl BranchCounter for RealCounter {
    fn reset(&mut self) -> Result<(), PmuError> {
        self.armed = None;
        self.perf.arm(1 << 62)?; // far away: no overflow until armed again
        self.perf.reset()
    }
    fn read(&mut self) -> Result<u64, PmuError> {
        self.perf.read()
    }
    fn arm(&mut self, n: u64) -> Result<(), PmuError> {
        let now = self.perf.read()?;
        self.armed = Some(Armed { at: now + n });
        self.perf.arm(n)
    }
    fn disarm(&mut self) -> Result<(), PmuError> {
        self.armed = None;
        self.perf.arm(1 << 62)
    }
    fn take_overflow(&mut self) -> bool {
        // The signal says so; the count says so too if the signal is still
        // in flight (it arrives some instructions after the overflow). A
        // signal while nothing is armed is stale (an earlier arm).
        let sig = take_overflow_flag();
        let counted = match self.armed {
            Some(a) => self.perf.read().map(|c| c >= a.at).unwrap_or(false),
            None => false,
        };
        let fired = counted || (sig && self.armed.is_some());
        if fired {
            self.armed = None;
        }
        fired
    }
    fn name(&self) -> &'static str {
        "hardware PMU counter"
    }
    fn describe(&self) -> String {
        format!("hardware PMU counter ({})", self.perf.choice.describe())
    }
    fn margin(&self) -> u64 {
        self.perf.config.replay_margin
    }
}

/// The hardware counter ([`RealCounter::open`]).
pub fn hardware_opener() -> CounterOpener {
    std::sync::Arc::new(|| Ok(Box::new(RealCounter::open()?) as Box<dyn BranchCounter + Send>))
}

#[cfg(test)]
mod tests {
    use super::super::host::PmuLayout;
    use super::*;

    #[test]
    fn speclockmap_verdict() {
        assert!(!speclockmap_enabled(5, 5), "count unchanged by a locked add: disabled");
        assert!(speclockmap_enabled(5, 6));
    }


    #[test]
    fn perf_attr_counts_guest_branches_and_overflows() {
        let cfg = PerfConfig { raw_event: 0x5101c4, replay_margin: 100 };
        let a = perf_attr(&cfg, perf_event_open_sys::bindings::PERF_TYPE_RAW, 12345);
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
        if !PmuLayout::host_has_pmu() {
            eprintln!("skipping: this host has no PMU (no cpu, cpu_core or cpu_atom event source)");
            return;
        }
        // A PMU exists: a bad attribute, an unsupported CPU, a refused
        // open are failures, not skips.
        let c = PerfCounter::open(libc::SIGRTMIN() + 4).unwrap_or_else(|e| panic!("this host has a PMU, but: {e}"));
        c.reset().unwrap();
        assert_eq!(c.read().unwrap(), 0, "no guest runs on this thread: the guest-only count stays 0");
        c.arm(1000).unwrap();
    }

    /// A synthetic instruction trace: positions within one exit interval;
    /// some steps retire a branch; a loop without branches repeats RIPs.
    #[test]
    fn real_counter_in_the_run_loop_where_present() {
        if !PmuLayout::host_has_pmu() {
            eprintln!("skipping: this host has no PMU (no cpu, cpu_core or cpu_atom event source)");
            return;
        }
        // A PMU exists: any failure to open or drive the counter is a failure.
        let mut c = RealCounter::open().unwrap_or_else(|e| panic!("this host has a PMU, but: {e}"));
        c.reset().unwrap();
        assert_eq!(c.read().unwrap(), 0);
        c.arm(100).unwrap();
        assert!(!c.take_overflow(), "no guest runs here: nothing counted");
        c.disarm().unwrap();
    }

}
