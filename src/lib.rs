//! revirt: a forensic record/replay debugger for KVM virtual machines.
//!
//! Layers, in the direction data flows: [`vmm`] runs the guest and turns
//! exits into device operations; the host side of the run loop ([`vmm::Host`])
//! supplies time and input. [`doctor`] probes what this host's KVM can do.

pub mod clock;
pub mod doctor;
pub mod gdb;
pub mod inspect;
pub mod migrate;
pub mod record;
pub mod replay;
pub mod trace;
pub mod vmm;
