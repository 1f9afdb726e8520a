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
//! [`BranchCounter`]:
//! - [`PerfCounter`]: perf_event_open on the vCPU thread, guest-only
//!   (`exclude_host`), raw "retired conditional branches" event per CPU
//!   family, overflow delivered as a signal so KVM_RUN returns
//!   ([`RealCounter`]);
//! - the simulated counter for hosts without a PMU (ours): it counts exactly
//!   by single-stepping and reports the overflow late by a random skid
//!   (`vmm::counter::SimCounter`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ExecPoint;
use crate::vmm::counter::{
    install_overflow_handler, overflow_signal, take_overflow_flag, Armed, BranchCounter, CounterOpener, PmuError,
};

/// The CPU as /proc/cpuinfo describes it (`cpu family` and `model` are the
/// displayed values: base plus extended family, extended model << 4 | model).
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

/// What a CPU's counter counts, as rr classifies it (`PMU_TICKS_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Retired conditional branches: revirt's (and ReVirt's) unit of time.
    ConditionalBranches,
    /// Retired taken branches (rr's `PMU_TICKS_TAKEN_BRANCHES`): a different
    /// unit; the step clock's timestamps cannot be compared with it.
    TakenBranches,
    /// rr knows the CPU but has no deterministic counter for it.
    Nothing,
}

/// One row of the table: a microarchitecture as rr's src/PerfCounters.cc
/// (`pmu_configs`) and src/PerfCounters_x86.h (`compute_cpu_microarch`)
/// name it, with rr's event and skid figures. docs/pmu-clock.md cites each.
#[derive(Debug, Clone, Copy)]
pub struct Uarch {
    pub name: &'static str,
    vendor: &'static str,
    /// Displayed family and the displayed models of that family.
    family: u32,
    models: &'static [u32],
    /// rr's `rcb_cntr_event` (PERF_TYPE_RAW config).
    pub event: u64,
    /// rr's `skid_size`.
    pub skid: u64,
    pub unit: Unit,
    /// rr's `PMU_SKID_UNBOUNDED`: the skid may exceed `skid` in rare cases.
    pub skid_unbounded: bool,
}

const fn intel(name: &'static str, models: &'static [u32], event: u64, skid: u64) -> Uarch {
    let unit = if event == 0 { Unit::Nothing } else { Unit::ConditionalBranches };
    Uarch { name, vendor: "GenuineIntel", family: 6, models, event, skid, unit, skid_unbounded: false }
}

const fn zen(name: &'static str, family: u32, models: &'static [u32]) -> Uarch {
    Uarch {
        name,
        vendor: "AuthenticAMD",
        family,
        models,
        event: 0x5100d1,
        skid: 10000,
        unit: Unit::ConditionalBranches,
        skid_unbounded: true,
    }
}

/// rr's table. The model lists are rr's `cpu_type` cases (CPUID.1:EAX &
/// 0xF0FF0) turned into displayed models; Granite Rapids is not in rr's
/// table (see docs/pmu-clock.md) and is grouped with its Sapphire/Emerald
/// Rapids predecessors.
pub const UARCHES: &[Uarch] = &[
    intel("Intel Merom", &[0x0F, 0x16], 0, 100),
    intel("Intel Penryn", &[0x17, 0x1D], 0, 100),
    intel("Intel Nehalem", &[0x1A, 0x1E, 0x2E], 0x5101c4, 100),
    intel("Intel Westmere", &[0x25, 0x2C, 0x2F], 0x5101c4, 100),
    intel("Intel Sandy Bridge", &[0x2A, 0x2D, 0x3E], 0x5101c4, 100),
    intel("Intel Ivy Bridge", &[0x3A], 0x5101c4, 100),
    intel("Intel Haswell", &[0x3C, 0x3F, 0x45, 0x46], 0x5101c4, 100),
    intel("Intel Broadwell", &[0x3D, 0x47, 0x4F, 0x56], 0x5101c4, 100),
    intel("Intel Skylake", &[0x4E, 0x55, 0x5E], 0x5101c4, 100),
    intel("Intel Silvermont", &[0x37, 0x4C, 0x57], 0x517ec4, 100),
    intel("Intel Goldmont", &[0x5C, 0x5F, 0x7A], 0x517ec4, 100),
    intel("Intel Tremont", &[0x9C], 0x517ec4, 100),
    intel("Intel Kabylake", &[0x8E, 0x9E], 0x5101c4, 100),
    intel("Intel Cometlake", &[0xA5, 0xA6], 0x5101c4, 100),
    intel("Intel Icelake", &[0x6A, 0x7E, 0x86], 0x5111c4, 100),
    intel("Intel Tigerlake", &[0x8C, 0x8D], 0x5111c4, 100),
    intel("Intel Rocketlake", &[0xA7], 0x5111c4, 100),
    intel("Intel Alderlake", &[0x97, 0x9A], 0x5111c4, 125),
    intel("Intel Raptorlake", &[0xB7, 0xBA, 0xBF], 0x5111c4, 125),
    intel("Intel SapphireRapid", &[0x8F], 0x5111c4, 125),
    intel("Intel EmeraldRapid", &[0xCF], 0x5111c4, 125),
    intel("Intel GraniteRapids", &[0xAD, 0xAE], 0x5111c4, 125),
    intel("Intel Meteorlake", &[0xAA], 0x5111c4, 125),
    intel("Intel Lunarlake", &[0xBD], 0x100005111c4, 125),
    intel("Intel Arrowlake", &[0xC5, 0xC6], 0x100005111c4, 125),
    // rr: { AMDF15, 0xc4, minus 0xc6, 250, PMU_TICKS_TAKEN_BRANCHES }; rr
    // also maps cpu_type 0xf10 with extended family 3 (family 0x12) here.
    Uarch {
        name: "AMD Family 15h",
        vendor: "AuthenticAMD",
        family: 0x15,
        models: &[0x02, 0x30],
        event: 0xc4,
        skid: 250,
        unit: Unit::TakenBranches,
        skid_unbounded: false,
    },
    Uarch {
        name: "AMD Family 15h",
        vendor: "AuthenticAMD",
        family: 0x12,
        models: &[0x01],
        event: 0xc4,
        skid: 250,
        unit: Unit::TakenBranches,
        skid_unbounded: false,
    },
    zen("AMD Zen", 0x17, &[0x01, 0x08, 0x11, 0x18, 0x20]),
    zen("AMD Zen 2", 0x17, &[0x31, 0x60, 0x68, 0x71, 0x90]),
    // rr maps cpu_type 0x10f10/0x10f80/0x20f00 with extended family 0xa to Zen 2.
    zen("AMD Zen 2", 0x19, &[0x11, 0x18, 0x20]),
    zen("AMD Zen 3", 0x19, &[0x01, 0x08, 0x21, 0x44, 0x50]),
    zen("AMD Zen 4", 0x19, &[0x61, 0x74, 0x75]),
    zen("AMD Zen 5", 0x1A, &[0x24]),
];

impl Uarch {
    pub fn find(cpu: &CpuModel) -> Option<&'static Uarch> {
        UARCHES.iter().find(|u| u.vendor == cpu.vendor && u.family == cpu.family && u.models.contains(&cpu.model))
    }

    pub fn is_zen(&self) -> bool {
        self.name.starts_with("AMD Zen")
    }
}

/// How to count retired conditional branches on a CPU, and how late the
/// overflow interrupt may arrive (rr's measured skid margins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerfConfig {
    /// The raw event code (perf `config`).
    pub raw_event: u64,
    /// Branches of skid to allow for while replaying (rr's `skid_size`).
    /// Recording needs none: an event is delivered wherever the guest
    /// stopped and logged there (rr's 5x `recording_skid_size` only bounds
    /// an assertion of its own).
    pub replay_margin: u64,
}

impl PerfConfig {
    pub fn for_cpu(cpu: &CpuModel) -> Result<PerfConfig, PmuError> {
        let Some(u) = Uarch::find(cpu) else {
            return Err(PmuError::UnsupportedCpu(format!(
                "{} family {:#x} model {:#x} is not in the table (rr's PerfCounters.cc; see docs/pmu-clock.md)",
                cpu.vendor, cpu.family, cpu.model
            )));
        };
        match u.unit {
            Unit::ConditionalBranches => Ok(PerfConfig { raw_event: u.event, replay_margin: u.skid }),
            Unit::TakenBranches => Err(PmuError::UnsupportedCpu(format!(
                "{}: its counter (rr: event {:#x}) counts retired taken branches, not the retired \
                 conditional branches revirt's timestamps are made of",
                u.name, u.event
            ))),
            Unit::Nothing => Err(PmuError::UnsupportedCpu(format!(
                "{}: no deterministic conditional-branch counter (rr does not support it either)",
                u.name
            ))),
        }
    }
}

/// Where the kernel lists its PMUs (`cpu`; `cpu_core` + `cpu_atom` on hybrid Intel).
pub const EVENT_SOURCE: &str = "/sys/bus/event_source/devices";

/// A core PMU from sysfs: its name, its perf `type`, and (hybrid) its CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorePmu {
    pub name: String,
    pub perf_type: u32,
    pub cpus: Option<Vec<usize>>,
}

/// The core PMUs the kernel exposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PmuLayout {
    /// No `cpu`, `cpu_core` or `cpu_atom` event source (e.g. a VM without a virtual PMU).
    None,
    /// One core PMU for every CPU (`cpu`).
    Single(CorePmu),
    /// Hybrid Intel: a raw event of one PMU counts only on that core type.
    Hybrid { core: Option<CorePmu>, atom: Option<CorePmu> },
}

/// Parses a sysfs CPU list ("0-7,16,18-19").
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut v = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a || b - a > 65536 {
                    return None;
                }
                v.extend(a..=b);
            }
            None => v.push(part.trim().parse().ok()?),
        }
    }
    (!v.is_empty()).then_some(v)
}

/// "0-3,8" for messages.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    out.join(",")
}

impl PmuLayout {
    /// Reads the PMUs under `root` (normally [`EVENT_SOURCE`]; tests pass a fake tree).
    pub fn detect_in(root: &Path) -> Result<PmuLayout, PmuError> {
        let read = |name: &str, cpus: bool| -> Result<Option<CorePmu>, PmuError> {
            let dir = root.join(name);
            if !dir.exists() {
                return Ok(None);
            }
            let bad = |p: PathBuf, msg: String| PmuError::Sysfs { path: p.display().to_string(), msg };
            let tp = dir.join("type");
            let perf_type = match std::fs::read_to_string(&tp) {
                Ok(s) => s.trim().parse().map_err(|_| bad(tp.clone(), format!("not a perf type: {:?}", s.trim())))?,
                // Older kernels may lack `type` for the core PMU: it is PERF_TYPE_RAW.
                Err(_) if name == "cpu" => perf_event_open_sys::bindings::PERF_TYPE_RAW,
                Err(e) => return Err(bad(tp, e.to_string())),
            };
            let cpus = if cpus {
                let cp = dir.join("cpus");
                let s = std::fs::read_to_string(&cp).map_err(|e| bad(cp.clone(), e.to_string()))?;
                Some(parse_cpu_list(&s).ok_or_else(|| bad(cp, format!("not a CPU list: {:?}", s.trim())))?)
            } else {
                None
            };
            Ok(Some(CorePmu { name: name.into(), perf_type, cpus }))
        };
        let core = read("cpu_core", true)?;
        let atom = read("cpu_atom", true)?;
        if core.is_some() || atom.is_some() {
            return Ok(PmuLayout::Hybrid { core, atom });
        }
        Ok(match read("cpu", false)? {
            Some(c) => PmuLayout::Single(c),
            None => PmuLayout::None,
        })
    }

    pub fn detect() -> Result<PmuLayout, PmuError> {
        PmuLayout::detect_in(Path::new(EVENT_SOURCE))
    }

    /// Whether any core PMU event source exists (the only reason a PMU test may skip).
    pub fn has_pmu(&self) -> bool {
        !matches!(self, PmuLayout::None)
    }

    /// Whether the host has a PMU, read from sysfs (false when unreadable).
    pub fn host_has_pmu() -> bool {
        PmuLayout::detect().map(|l| l.has_pmu()).unwrap_or_else(|_| Path::new(EVENT_SOURCE).join("cpu").exists())
    }
}

/// What the real counter opens on this host: which event, on which PMU,
/// and which CPUs the vCPU thread must stay on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PmuChoice {
    pub uarch: &'static str,
    pub config: PerfConfig,
    pub pmu: CorePmu,
    /// Hybrid hosts: the vCPU thread is pinned here (the CPUs of `pmu`).
    pub pin: Option<Vec<usize>>,
    /// rr's SpecLockMap check applies (AMD Zen).
    pub zen: bool,
}

impl PmuChoice {
    /// Decides from the sysfs layout, the CPU model and the kernel release.
    pub fn choose(layout: &PmuLayout, cpu: Option<&CpuModel>, kernel: &str) -> Result<PmuChoice, PmuError> {
        let pmu = match layout {
            PmuLayout::None => {
                return Err(PmuError::Unavailable(format!(
                    "the kernel exposes no core PMU (no cpu, cpu_core or cpu_atom in {EVENT_SOURCE}): \
                     typical of a VM whose hypervisor gives it no virtual PMU"
                )))
            }
            PmuLayout::Single(p) => p.clone(),
            PmuLayout::Hybrid { core: Some(p), .. } => p.clone(),
            PmuLayout::Hybrid { core: None, .. } => {
                return Err(PmuError::UnsupportedCpu(
                    "a hybrid PMU layout with only cpu_atom: the table has no E-core event for hybrid parts".into(),
                ))
            }
        };
        let cpu = cpu.ok_or_else(|| PmuError::UnsupportedCpu("cannot read the CPU model from /proc/cpuinfo".into()))?;
        let config = PerfConfig::for_cpu(cpu)?;
        if !kernel_at_least(kernel, 4, 17) {
            return Err(PmuError::OldKernel(kernel.into()));
        }
        let u = Uarch::find(cpu).expect("for_cpu found it");
        let pin = pmu.cpus.clone();
        Ok(PmuChoice { uarch: u.name, config, pmu, pin, zen: u.is_zen() })
    }

    /// This host's choice.
    pub fn host() -> Result<PmuChoice, PmuError> {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        PmuChoice::choose(&PmuLayout::detect()?, CpuModel::host().as_ref(), kernel.trim())
    }

    /// One line for doctor and error messages.
    pub fn describe(&self) -> String {
        let pin = match &self.pin {
            Some(c) => format!(
                "; hybrid CPU: the vCPU thread is pinned to CPUs {} ({}: the {} cores)",
                format_cpu_list(c),
                self.pmu.name,
                if self.pmu.name == "cpu_core" { "performance" } else { "efficiency" }
            ),
            None => String::new(),
        };
        format!(
            "{}: raw event {:#x} on PMU {} (perf type {}), replay margin {} branches{pin}",
            self.uarch, self.config.raw_event, self.pmu.name, self.pmu.perf_type, self.config.replay_margin
        )
    }
}

/// Whether a kernel release string ("6.1.0-13-amd64") is at least major.minor.
pub fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let ma = it.next().and_then(|s| s.parse::<u32>().ok());
    let mi = it.next().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    match ma {
        Some(ma) => (ma, mi) >= (major, minor),
        None => false,
    }
}

/// Pins the calling thread to `cpus` (hybrid hosts: the core type whose
/// PMU counts, or a raw event stops counting whenever the scheduler moves
/// the vCPU to the other core type).
pub fn pin_current_thread(cpus: &[usize]) -> Result<(), PmuError> {
    // SAFETY: cpu_set_t is plain data; zeroed is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c < libc::CPU_SETSIZE as usize {
            // SAFETY: c is within the set's size.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
    }
    // SAFETY: pid 0 = the calling thread; `set` is a valid cpu_set_t.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(PmuError::Pin { cpus: format_cpu_list(cpus), source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// The CPUs the calling thread may run on.
pub fn current_affinity() -> Vec<usize> {
    // SAFETY: as above; sched_getaffinity fills `set`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 = the calling thread; `set` is a valid cpu_set_t.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Vec::new();
    }
    // SAFETY: reading bits of an initialised set.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

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
    use super::*;
    use proptest::prelude::*;

    fn cpu(vendor: &str, family: u32, model: u32) -> CpuModel {
        CpuModel { vendor: vendor.into(), family, model }
    }

    /// rr's src/PerfCounters.cc `pmu_configs` and src/PerfCounters_x86.h
    /// `compute_cpu_microarch`: (rr cpu_type, rr name, event, skid). Each
    /// cpu_type is CPUID.1:EAX & 0xF0FF0 = ext model, family, model.
    const RR_INTEL: &[(u32, &str, u64, u64)] = &[
        (0x006F0, "Intel Merom", 0, 100),
        (0x10660, "Intel Merom", 0, 100),
        (0x10670, "Intel Penryn", 0, 100),
        (0x106D0, "Intel Penryn", 0, 100),
        (0x106A0, "Intel Nehalem", 0x5101c4, 100),
        (0x106E0, "Intel Nehalem", 0x5101c4, 100),
        (0x206E0, "Intel Nehalem", 0x5101c4, 100),
        (0x20650, "Intel Westmere", 0x5101c4, 100),
        (0x206C0, "Intel Westmere", 0x5101c4, 100),
        (0x206F0, "Intel Westmere", 0x5101c4, 100),
        (0x206A0, "Intel Sandy Bridge", 0x5101c4, 100),
        (0x206D0, "Intel Sandy Bridge", 0x5101c4, 100),
        (0x306E0, "Intel Sandy Bridge", 0x5101c4, 100),
        (0x306A0, "Intel Ivy Bridge", 0x5101c4, 100),
        (0x306C0, "Intel Haswell", 0x5101c4, 100),
        (0x306F0, "Intel Haswell", 0x5101c4, 100),
        (0x40650, "Intel Haswell", 0x5101c4, 100),
        (0x40660, "Intel Haswell", 0x5101c4, 100),
        (0x306D0, "Intel Broadwell", 0x5101c4, 100),
        (0x40670, "Intel Broadwell", 0x5101c4, 100),
        (0x406F0, "Intel Broadwell", 0x5101c4, 100),
        (0x50660, "Intel Broadwell", 0x5101c4, 100),
        (0x406E0, "Intel Skylake", 0x5101c4, 100),
        (0x50650, "Intel Skylake", 0x5101c4, 100),
        (0x506E0, "Intel Skylake", 0x5101c4, 100),
        (0x30670, "Intel Silvermont", 0x517ec4, 100),
        (0x406C0, "Intel Silvermont", 0x517ec4, 100),
        (0x50670, "Intel Silvermont", 0x517ec4, 100),
        (0x506F0, "Intel Goldmont", 0x517ec4, 100),
        (0x706A0, "Intel Goldmont", 0x517ec4, 100),
        (0x506C0, "Intel Goldmont", 0x517ec4, 100),
        (0x906C0, "Intel Tremont", 0x517ec4, 100),
        (0x706E0, "Intel Icelake", 0x5111c4, 100),
        (0x606A0, "Intel Icelake", 0x5111c4, 100),
        (0x80660, "Intel Icelake", 0x5111c4, 100),
        (0x806C0, "Intel Tigerlake", 0x5111c4, 100),
        (0x806D0, "Intel Tigerlake", 0x5111c4, 100),
        (0x806E0, "Intel Kabylake", 0x5101c4, 100),
        (0x906E0, "Intel Kabylake", 0x5101c4, 100),
        (0xA0650, "Intel Cometlake", 0x5101c4, 100),
        (0xA0660, "Intel Cometlake", 0x5101c4, 100),
        (0xA0670, "Intel Rocketlake", 0x5111c4, 100),
        (0x90670, "Intel Alderlake", 0x5111c4, 125),
        (0x906A0, "Intel Alderlake", 0x5111c4, 125),
        (0xB0670, "Intel Raptorlake", 0x5111c4, 125),
        (0xB06A0, "Intel Raptorlake", 0x5111c4, 125),
        (0xB06F0, "Intel Raptorlake", 0x5111c4, 125),
        (0x806F0, "Intel SapphireRapid", 0x5111c4, 125),
        (0xC06F0, "Intel EmeraldRapid", 0x5111c4, 125),
        (0xA06A0, "Intel Meteorlake", 0x5111c4, 125),
        (0xB06D0, "Intel Lunarlake", 0x100005111c4, 125),
        (0xC0660, "Intel Arrowlake", 0x100005111c4, 125),
        // Not in the rr snapshot read (commit 01ae9d25): rr PR #4028 adds
        // 0xc0650 as Arrow Lake; Granite Rapids (0xa06d0, 0xa06e0) is
        // grouped with Sapphire/Emerald Rapids (issue 20).
        (0xC0650, "Intel Arrowlake", 0x100005111c4, 125),
        (0xA06D0, "Intel GraniteRapids", 0x5111c4, 125),
        (0xA06E0, "Intel GraniteRapids", 0x5111c4, 125),
    ];

    /// rr's cpu_type -> the displayed (family, model) /proc/cpuinfo shows.
    fn displayed(cpu_type: u32, ext_family: u32) -> (u32, u32) {
        let family = (cpu_type >> 8) & 0xF;
        let model = ((cpu_type >> 4) & 0xF) | ((cpu_type >> 12) & 0xF0);
        (if family == 0xF { family + ext_family } else { family }, model)
    }

    #[test]
    fn every_intel_model_matches_rr() {
        for &(ty, name, event, skid) in RR_INTEL {
            let (family, model) = displayed(ty, 0);
            let c = cpu("GenuineIntel", family, model);
            let u = Uarch::find(&c).unwrap_or_else(|| panic!("{ty:#x} ({name}) missing"));
            assert_eq!((u.name, u.event, u.skid), (name, event, skid), "cpu_type {ty:#x}");
            match PerfConfig::for_cpu(&c) {
                Ok(cfg) => assert_eq!(cfg, PerfConfig { raw_event: event, replay_margin: skid }, "{name}"),
                Err(e) => {
                    assert_eq!(event, 0, "{name}: {e}");
                    assert!(e.to_string().contains("no deterministic"), "{e}");
                }
            }
        }
        // And nothing else: every table model is one of rr's cpu_types.
        let n: usize = UARCHES.iter().filter(|u| u.vendor == "GenuineIntel").map(|u| u.models.len()).sum();
        assert_eq!(n, RR_INTEL.len());
    }

    #[test]
    fn atoms_use_the_jcc_umask_and_ice_lake_on_the_new_umask() {
        let ev = |m| PerfConfig::for_cpu(&cpu("GenuineIntel", 6, m)).unwrap().raw_event;
        for m in [0x37, 0x4C, 0x57, 0x5C, 0x5F, 0x7A, 0x9C] {
            assert_eq!(ev(m), 0x517ec4, "Atom model {m:#x}");
        }
        for m in [0x6A, 0x7E, 0x86, 0x8C, 0x8D, 0xA7, 0x97, 0x9A, 0xB7, 0xBA, 0xBF, 0x8F, 0xCF, 0xAA, 0xAD, 0xAE] {
            assert_eq!(ev(m), 0x5111c4, "Ice Lake+ model {m:#x}");
        }
        assert_eq!(ev(0x55), 0x5101c4, "Skylake-X");
        let unknown = PerfConfig::for_cpu(&cpu("GenuineIntel", 6, 0xBE)).unwrap_err();
        assert!(unknown.to_string().contains("not in the table"), "{unknown}");
    }

    /// rr's AMD cases: (cpu_type, ext family, name).
    const RR_AMD: &[(u32, u32, &str)] = &[
        (0x00F20, 6, "AMD Family 15h"),
        (0x30F00, 6, "AMD Family 15h"),
        (0x00F10, 3, "AMD Family 15h"),
        (0x00F10, 8, "AMD Zen"),
        (0x00F80, 8, "AMD Zen"),
        (0x10F10, 8, "AMD Zen"),
        (0x10F80, 8, "AMD Zen"),
        (0x20F00, 8, "AMD Zen"),
        (0x10F10, 0xA, "AMD Zen 2"),
        (0x10F80, 0xA, "AMD Zen 2"),
        (0x20F00, 0xA, "AMD Zen 2"),
        (0x30F10, 8, "AMD Zen 2"),
        (0x60F00, 8, "AMD Zen 2"),
        (0x70F10, 8, "AMD Zen 2"),
        (0x60F80, 8, "AMD Zen 2"),
        (0x90F00, 8, "AMD Zen 2"),
        (0x00F10, 0xA, "AMD Zen 3"),
        (0x00F80, 0xA, "AMD Zen 3"),
        (0x20F10, 0xA, "AMD Zen 3"),
        (0x50F00, 0xA, "AMD Zen 3"),
        (0x40F40, 0xA, "AMD Zen 3"),
        (0x60F10, 0xA, "AMD Zen 4"),
        (0x70F40, 0xA, "AMD Zen 4"),
        (0x70F50, 0xA, "AMD Zen 4"),
        (0x20F40, 0xB, "AMD Zen 5"),
    ];

    #[test]
    fn every_amd_model_matches_rr() {
        for &(ty, ext, name) in RR_AMD {
            let (family, model) = displayed(ty, ext);
            let c = cpu("AuthenticAMD", family, model);
            let u = Uarch::find(&c).unwrap_or_else(|| panic!("{ty:#x}/{ext:#x} ({name}) missing"));
            assert_eq!(u.name, name, "{ty:#x}/{ext:#x}");
            if name.starts_with("AMD Zen") {
                assert_eq!((u.event, u.skid, u.skid_unbounded), (0x5100d1, 10000, true));
                assert!(u.is_zen());
                assert_eq!(PerfConfig::for_cpu(&c).unwrap(), PerfConfig { raw_event: 0x5100d1, replay_margin: 10000 });
            } else {
                // rr counts taken branches here (0xc4 minus 0xc6): another unit, refused.
                assert_eq!((u.event, u.skid, u.unit), (0xc4, 250, Unit::TakenBranches));
                let e = PerfConfig::for_cpu(&c).unwrap_err().to_string();
                assert!(e.contains("taken branches"), "{e}");
            }
        }
        let n: usize = UARCHES.iter().filter(|u| u.vendor == "AuthenticAMD").map(|u| u.models.len()).sum();
        assert_eq!(n, RR_AMD.len());
        // rr refuses other vendors (Hygon, ...).
        assert!(PerfConfig::for_cpu(&cpu("HygonGenuine", 0x18, 1)).is_err());
        assert!(PerfConfig::for_cpu(&cpu("Weird", 1, 1)).is_err());
    }

    #[test]
    fn speclockmap_verdict() {
        assert!(!speclockmap_enabled(5, 5), "count unchanged by a locked add: disabled");
        assert!(speclockmap_enabled(5, 6));
    }

    #[test]
    fn kernel_versions() {
        assert!(kernel_at_least("6.1.0-13-amd64", 4, 17));
        assert!(kernel_at_least("4.17.0", 4, 17));
        assert!(kernel_at_least("5.0", 4, 17));
        assert!(!kernel_at_least("4.16.18-generic", 4, 17));
        assert!(!kernel_at_least("3.10.0-1160.el7.x86_64", 4, 17));
        assert!(!kernel_at_least("", 4, 17));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    }

    /// A fake /sys/bus/event_source/devices.
    fn fake_sysfs(pmus: &[(&str, &str, Option<&str>)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, ty, cpus) in pmus {
            let p = d.path().join(name);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("type"), format!("{ty}\n")).unwrap();
            if let Some(c) = cpus {
                std::fs::write(p.join("cpus"), format!("{c}\n")).unwrap();
            }
        }
        // Other event sources a host has in any case.
        std::fs::create_dir_all(d.path().join("software")).unwrap();
        std::fs::write(d.path().join("software/type"), "1\n").unwrap();
        d
    }

    #[test]
    fn no_pmu_layout() {
        let d = fake_sysfs(&[("breakpoint", "5", None)]);
        let l = PmuLayout::detect_in(d.path()).unwrap();
        assert_eq!(l, PmuLayout::None);
        assert!(!l.has_pmu());
        let e = PmuChoice::choose(&l, Some(&cpu("GenuineIntel", 6, 0x55)), "6.1.0").unwrap_err();
        assert!(matches!(e, PmuError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("no core PMU"), "{e}");
    }

    #[test]
    fn single_pmu_layout() {
        let d = fake_sysfs(&[("cpu", "4", None)]);
        let l = PmuLayout::detect_in(d.path()).unwrap();
        assert_eq!(l, PmuLayout::Single(CorePmu { name: "cpu".into(), perf_type: 4, cpus: None }));
        let c = PmuChoice::choose(&l, Some(&cpu("GenuineIntel", 6, 0x55)), "6.1.0").unwrap();
        assert_eq!((c.uarch, c.config.raw_event, c.pmu.perf_type, c.pin.clone()), ("Intel Skylake", 0x5101c4, 4, None));
        assert!(!c.describe().contains("pinned"), "{}", c.describe());
        // An old kernel is refused, with the reason.
        let e = PmuChoice::choose(&l, Some(&cpu("GenuineIntel", 6, 0x55)), "4.15.0-20-generic").unwrap_err();
        assert!(e.to_string().contains(">= 4.17"), "{e}");
        // A corrupt type file is an error naming the file, not a guess.
        std::fs::write(d.path().join("cpu/type"), "four").unwrap();
        let e = PmuLayout::detect_in(d.path()).unwrap_err().to_string();
        assert!(e.contains("cpu/type") && e.contains("four"), "{e}");
    }

    #[test]
    fn hybrid_layout_opens_cpu_core_and_pins_to_its_cpus() {
        let d = fake_sysfs(&[("cpu_core", "4", Some("0-15")), ("cpu_atom", "10", Some("16-23"))]);
        let l = PmuLayout::detect_in(d.path()).unwrap();
        let core = CorePmu { name: "cpu_core".into(), perf_type: 4, cpus: Some((0..16).collect()) };
        let atom = CorePmu { name: "cpu_atom".into(), perf_type: 10, cpus: Some((16..24).collect()) };
        assert_eq!(l, PmuLayout::Hybrid { core: Some(core.clone()), atom: Some(atom) });
        assert!(l.has_pmu());
        let c = PmuChoice::choose(&l, Some(&cpu("GenuineIntel", 6, 0x97)), "6.5.0").unwrap();
        assert_eq!(c.uarch, "Intel Alderlake");
        assert_eq!(c.pmu, core);
        assert_eq!(c.pin, Some((0..16).collect()));
        let a = perf_attr(&c.config, c.pmu.perf_type, 100);
        assert_eq!((a.type_, a.config), (4, 0x5111c4));
        let s = c.describe();
        assert!(s.contains("pinned to CPUs 0-15") && s.contains("cpu_core") && s.contains("performance"), "{s}");
        // The cpu_core PMU's type is whatever sysfs says.
        let d = fake_sysfs(&[("cpu_core", "8", Some("0-3")), ("cpu_atom", "9", Some("4-7"))]);
        let c = PmuChoice::choose(&PmuLayout::detect_in(d.path()).unwrap(), Some(&cpu("GenuineIntel", 6, 0xB7)), "6.5.0").unwrap();
        assert_eq!((c.pmu.perf_type, perf_attr(&c.config, 8, 1).type_), (8, 8));
        // Only an E-core PMU: refused.
        let d = fake_sysfs(&[("cpu_atom", "10", Some("0-3"))]);
        let e = PmuChoice::choose(&PmuLayout::detect_in(d.path()).unwrap(), Some(&cpu("GenuineIntel", 6, 0x97)), "6.5.0");
        assert!(e.unwrap_err().to_string().contains("only cpu_atom"));
        // A hybrid PMU without a readable CPU list is an error.
        let d = fake_sysfs(&[("cpu_core", "4", None)]);
        assert!(PmuLayout::detect_in(d.path()).unwrap_err().to_string().contains("cpus"));
    }

    #[test]
    fn pinning_a_thread_really_pins_it() {
        // sched_setaffinity for real, on a thread of its own: pin to one
        // CPU this process may use, read it back.
        let allowed = current_affinity();
        assert!(!allowed.is_empty());
        let one = *allowed.last().unwrap();
        let got = std::thread::spawn(move || {
            pin_current_thread(&[one]).unwrap();
            current_affinity()
        })
        .join()
        .unwrap();
        assert_eq!(got, vec![one]);
        let e = std::thread::spawn(|| pin_current_thread(&[libc::CPU_SETSIZE as usize + 5])).join().unwrap();
        assert!(matches!(e, Err(PmuError::Pin { .. })), "an empty set is refused by the kernel");
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

    #[test]
    fn lander_arms_where_the_run_loop_does() {
        let l = Lander::new(Target { at: ExecPoint { exits: 3, branches: 1000, rip: 0 }, fp: 0 }, 100);
        assert_eq!(l.overflow_at, crate::vmm::counter::overflow_point(1000, 100));
    }
}
