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

pub mod pmu;
pub mod probe;

pub use crate::vmm::point::{fingerprint, ExecPoint};

use serde::{Deserialize, Serialize};

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
