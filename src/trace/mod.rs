//! The on-disk recording format, and the only code that knows it
//! (docs/recording-format.md is the byte-level description).
//!
//! A recording is a directory ([`Dir`] names its files):
//! - `meta.json`: what was recorded, how, on what host (written once, at start);
//! - `image.elf`, `disk.img`: copies of the guest image and the disk at start;
//! - `events.log`: the event log, zstd chunks chained by SHA-256;
//! - `events.idx`: the seek index (version 3): what a seek needs from the whole log;
//! - `checkpoints/NNNNNN.ckpt`: the start checkpoint (full) and incremental ones;
//! - `console.log`: what the guest printed (checked against the log's End event).

pub mod checkpoint;
pub mod dir;
pub mod event;
pub mod index;
pub mod log;
pub mod meta;
pub mod seek;
pub mod snapshot;
pub mod state;
pub mod verify;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use dir::{checkpoint_path, Dir, CHECKPOINTS, CONSOLE, DISK, EVENTS, IMAGE, INDEX, META};
pub use event::{EndReason, Event};
pub use log::{LogError, LogReader, LogStatus, LogWriter};
pub use meta::{FileInfo, HostInfo, Meta, MetaError};
pub use snapshot::Snapshot;

use std::path::Path;

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Decompresses a zstd frame that must hold exactly `expect` bytes. The
/// buffer is reserved fallibly, so a crafted length that passed its bound
/// but cannot be allocated is an error, never an abort.
pub fn decompress_exact(src: &[u8], expect: usize) -> Result<Vec<u8>, String> {
    // A frame that says how much it holds is checked before allocating.
    if let Ok(Some(n)) = zstd::zstd_safe::get_frame_content_size(src) {
        if n != expect as u64 {
            return Err(format!("holds {n} bytes, its header says {expect}"));
        }
    }
    let mut out: Vec<u8> = Vec::new();
    out.try_reserve_exact(expect)
        .map_err(|_| format!("cannot allocate {expect} bytes to decompress into"))?;
    // One context per thread, reused: creating one per frame (a log has a
    // chunk per 200 ms of recording) was most of the time of reading a long log.
    thread_local! {
        static DCTX: std::cell::RefCell<zstd::zstd_safe::DCtx<'static>> = std::cell::RefCell::new(zstd::zstd_safe::DCtx::create());
    }
    let n = DCTX
        .with(|d| d.borrow_mut().decompress(&mut out, src))
        .map_err(|c| format!("does not decompress ({})", zstd::zstd_safe::get_error_name(c)))?;
    if n != expect || out.len() != expect {
        return Err(format!("decompresses to {n} bytes, its header says {expect}"));
    }
    Ok(out)
}

/// Copies file `src` into `dst` and, when `expect` is given, checks that
/// the bytes copied have that SHA-256 (hex): the copy a reader then uses is
/// exactly what was checked, whatever happens to `src` meanwhile.
pub fn copy_checked(src: &Path, dst: &mut impl std::io::Write, expect: Option<&str>) -> Result<u64, String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| format!("reading {}: {e}", src.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        dst.write_all(&buf[..k]).map_err(|e| format!("writing a copy of {}: {e}", src.display()))?;
        n += k as u64;
    }
    dst.flush().map_err(|e| format!("writing a copy of {}: {e}", src.display()))?;
    match expect {
        Some(want) if hex::encode(h.finalize()) != want => Err(format!(
            "{}: damaged or tampered: the bytes read do not match meta.json's SHA-256",
            src.display()
        )),
        _ => Ok(n),
    }
}
