//! KVM mechanics: memory, the vCPU, devices, boot, the run loop. This module
//! decides nothing about recording or replay; it asks a [`host::Host`].

pub mod boot;
pub mod counter;
pub mod dirty;
pub mod breakpoints;
pub mod devices;
pub mod host;
pub mod image;
pub mod layout;
pub mod machine;
pub mod pagehash;
pub mod paging;
pub mod pausable;
pub mod point;
pub mod step;
pub mod vcpu;
pub mod watch;

pub use host::{Async, Console, Control, Host, HostError, LiveHost, PollCtx, Waker};
pub use image::Image;
pub use dirty::DirtyLog;
pub use machine::{GuestPanic, Machine, MachineError, MachineState, Stop, VmConfig};
