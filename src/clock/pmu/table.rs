//! Which raw event counts retired conditional branches on which CPU, and
//! how late its overflow may arrive: rr's table (src/PerfCounters.cc).

use serde::{Deserialize, Serialize};

use crate::vmm::counter::PmuError;

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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::clock::pmu) fn cpu(vendor: &str, family: u32, model: u32) -> CpuModel {
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

}
