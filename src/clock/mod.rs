//! Time in a replay: execution points and the clocks that reach them.
//!
//! An [`ExecPoint`] pins an instant of guest execution: the number of
//! guest-caused exits so far, the conditional branches retired since the last
//! of those exits, and RIP (branch count + IP is ReVirt's timestamp; count +
//! IP alone can repeat in a loop without branches, so events also carry a
//! register fingerprint checked on arrival).
//!
//! Clock backends decide where asynchronous events may land:
//! - `exit`: only at guest-caused exits (`branches == 0`); native speed.
//! - `step`: anywhere; the VMM single-steps and counts branches itself.
//! - `pmu`: anywhere; a hardware branch counter overflows near the target
//!   (hosts with a PMU; its own module).

pub mod counter;
pub mod pmu;
pub mod probe;
pub mod step;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct ExecPoint {
    pub exits: u64,
    pub branches: u64,
    pub rip: u64,
}

impl std::fmt::Display for ExecPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {} + {} branches @ rip {:#x}", self.exits, self.branches, self.rip)
    }
}

/// Which clock a recording was made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClockKind {
    Exit,
    Step,
    /// A hardware branch counter (hosts with a PMU).
    Pmu,
    /// The PMU clock's behaviour without a PMU: exact counts by
    /// single-stepping, overflows reported late by a random skid.
    #[serde(rename = "pmu-sim")]
    #[value(name = "pmu-sim")]
    PmuSim,
}

impl ClockKind {
    /// Whether async events sit at exact instruction boundaries
    /// (branch count + RIP) rather than at exits.
    pub fn is_precise(self) -> bool {
        !matches!(self, ClockKind::Exit)
    }
}

impl std::fmt::Display for ClockKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClockKind::Exit => "exit",
            ClockKind::Step => "step",
            ClockKind::Pmu => "pmu",
            ClockKind::PmuSim => "pmu-sim",
        })
    }
}

/// A cheap fingerprint of the general registers, checked when replay
/// arrives at a recorded point (rr compares the whole register file).
pub fn fingerprint(r: &kvm_bindings::kvm_regs) -> u64 {
    let words = [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags & !0x10100, // ignore TF and RF: debugging artifacts
    ];
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in words {
        h ^= w;
        h = h.wrapping_mul(0x100_0000_01b3);
        h ^= h >> 29;
    }
    h
}
