//! Provenance over a recording: where did a byte come from, and who touched
//! it when. Two primitives, both built on [`Timeline`] single-stepping:
//!
//! - [`history`]: every write (optionally read) of a guest-physical byte
//!   range between two points, with the instruction, the point and the old
//!   and new bytes (TTD's `Memory(begin, end, "rw")`).
//! - [`origin`]: the data flow of a location walked backwards: its last
//!   writer, that instruction's value sources (registers, memory, decoded
//!   with iced-x86), recursively, down to the inputs the log holds (serial
//!   byte N of event E, a clock reading, disk sector S offset O), constants
//!   in the code, or bytes of the boot image never written since.
//!
//! Both step a window of the execution one instruction at a time and record
//! each instruction's effects ([`Step`]): registers before and after, every
//! memory operand (virtual and physical address, bytes before and after),
//! and what a port read returned and which log entry it came from. A
//! forward pass over a window gives every source byte its last writer
//! (a dynamic dependence graph); the backward walk is then a graph search.
//! Windows are exit ranges ending at the query point, extended backwards
//! (and skipping checkpoint intervals whose dirty-page lists show the
//! wanted memory untouched) until every path ends.
//!
//! Instructions that exit to the VMM (port I/O, `hlt`) are not
//! single-stepped but run to their exit, as the gdb stub does, so inputs
//! are delivered exactly as recorded. The native-speed search engine
//! (hardware watchpoints, breakpoints) can later replace the stepping of
//! long stretches: [`Window`] is the unit it would produce.
//!
//! The parts, in the order data goes through them:
//! - `location`: byte-wide keys for registers and memory, [`Location`].
//! - `input`: the log's inputs ([`Input`]: serial, clock, disk, device) and
//!   the boot [`Image`], the ends a path can reach.
//! - `tracer`: the stepping engine ([`Tracer`], [`Step`]).
//! - `flow`: what each step read and wrote ([`Constant`], the value flow)
//!   and a window's dependence graph ([`Window`]).
//! - `drive`: replaying spans under a [`Limits`] budget.
//! - `origin`: the backward walk ([`origin`], [`Origin`]); `render`: its text.
//! - `touches`: [`history`] by stepping; `monitor`: gdb's `monitor origin`.

use std::time::Duration;

use super::{Recording, ReplayError, Timeline};

mod drive;
mod flow;
mod input;
mod location;
mod monitor;
mod origin;
mod render;
#[cfg(test)]
mod tests;
mod touches;
mod tracer;

pub(crate) use drive::{run_to_exit, timeline_at, Budget};
pub use drive::{exit_point, find_rip};
pub use flow::{Constant, Window};
pub use input::{Image, Input};
pub use location::{register_index, Location, GPR_NAMES};
pub use monitor::monitor_origin;
pub use origin::{origin, Edge, Ends, Node, Origin, Source};
pub use render::{insn_text, point_short};
pub(crate) use touches::touches_of;
pub use touches::{history, history_stepping, History, Touch, Watched};
pub use tracer::{Access, Dma, Step, Tracer};

#[derive(Debug, thiserror::Error)]
pub enum ProvError {
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Machine(#[from] crate::vmm::MachineError),
    #[error("replay diverged from the recording at exit {at}: {why}")]
    Diverged { at: u64, why: String },
    #[error("{0}")]
    Msg(String),
    /// Ctrl-C (or the caller's interrupt check) stopped the query.
    #[error("interrupted at exit {at}")]
    Interrupted { at: u64 },
}

type R<T> = Result<T, ProvError>;

impl From<crate::vmm::vcpu::VcpuError> for ProvError {
    fn from(e: crate::vmm::vcpu::VcpuError) -> Self {
        ProvError::Machine(e.into())
    }
}

/// Default depth limit, in instructions along a path (a loop that folds
/// every byte of a buffer into one value is two or three per byte).
pub const DEFAULT_DEPTH: usize = 100_000;

/// Limits and hooks of a query.
pub struct Limits<'a> {
    /// Most instructions to single-step in all.
    pub max_steps: u64,
    pub max_depth: usize,
    pub max_time: Duration,
    /// Polled every few hundred steps; true stops the query.
    pub interrupted: &'a dyn Fn() -> bool,
    /// Show a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

impl Default for Limits<'_> {
    fn default() -> Self {
        Limits {
            max_steps: 5_000_000,
            max_depth: DEFAULT_DEPTH,
            max_time: Duration::from_secs(600),
            interrupted: &|| false,
            progress: false,
        }
    }
}
