//! revirt: a forensic record/replay debugger for KVM virtual machines.
//!
//! Layers, bottom up (docs/architecture.md; tests/architecture.rs keeps
//! them): [`vmm`] runs the guest on KVM (memory, vCPU, devices, the run loop
//! with its step and counter mechanics) and asks a [`vmm::Host`] for time and
//! input; [`clock`] is the model of time in a recording; [`trace`] owns the
//! recording's bytes; [`record`] and [`replay`] drive the machine; [`migrate`],
//! [`gdb`] and [`inspect`] are front ends over them. [`doctor`] probes what
//! this host's KVM can do.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod clock;
pub mod doctor;
pub mod gdb;
pub mod inspect;
pub mod migrate;
pub mod record;
pub mod replay;
pub mod trace;
pub mod vmm;
