//! The on-disk recording format, and the only code that knows it
//! (docs/recording-format.md is the byte-level description).
//!
//! A recording is a directory:
//! - `meta.json`: what was recorded, how, on what host (written once, at start);
//! - `image.elf`, `disk.img`: copies of the guest image and the disk at start;
//! - `events.log`: the event log, zstd chunks chained by SHA-256;
//! - `checkpoints/NNNNNN.ckpt`: the start checkpoint (full) and incremental ones;
//! - `console.log`: what the guest printed (checked against the log's End event).

pub mod checkpoint;
pub mod event;
pub mod log;
pub mod meta;
pub mod verify;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use event::{EndReason, Event};
pub use log::{LogError, LogReader, LogStatus, LogWriter};
pub use meta::{FileInfo, HostInfo, Meta, MetaError};

use std::path::Path;

pub const META: &str = "meta.json";
pub const IMAGE: &str = "image.elf";
pub const DISK: &str = "disk.img";
pub const EVENTS: &str = "events.log";
pub const CHECKPOINTS: &str = "checkpoints";
pub const CONSOLE: &str = "console.log";

pub fn checkpoint_path(dir: &Path, id: u32) -> std::path::PathBuf {
    dir.join(CHECKPOINTS).join(format!("{id:06}.ckpt"))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
