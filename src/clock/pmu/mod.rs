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

mod host;
mod landing;
mod perf;
mod table;

pub use host::*;
pub use landing::*;
pub use perf::*;
pub use table::*;
