//! This host's PMUs (sysfs), the choice of counter for the CPU and kernel,
//! and pinning the vCPU thread on hybrid parts.

use std::path::{Path, PathBuf};

use super::table::{CpuModel, PerfConfig, Uarch};
use crate::vmm::counter::PmuError;

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

#[cfg(test)]
mod tests {
    use super::super::perf::perf_attr;
    use super::super::table::tests::cpu;
    use super::*;

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

}
