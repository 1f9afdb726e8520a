//! Checkpoint files. The start checkpoint holds all of memory and the disk
//! is the recording's `disk.img`; later checkpoints are incremental: the
//! machine state, the pages dirtied and the disk sectors written since the
//! previous checkpoint. Restoring checkpoint k applies 0..=k in order.
//!
//! Layout: `b"RVCKPT01"`, u64 header length, header (JSON), u64 data
//! length, data (zstd: the listed pages then the listed sectors, in order),
//! u32 CRC-32 of everything before it.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::vmm::MachineState;

const MAGIC: &[u8; 8] = b"RVCKPT01";
pub const PAGE: u64 = 4096;
pub const SECTOR: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("checkpoint {path}: {msg}")]
    Bad { path: String, msg: String },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CheckpointHeader {
    pub id: u32,
    /// Guest-caused exits at the checkpoint.
    pub exits: u64,
    /// Index of the first event not yet consumed at the checkpoint.
    pub next_event: u64,
    /// Console bytes the guest had printed.
    pub output_len: u64,
    pub machine: MachineState,
    /// (first page frame, count) runs of 4 KiB pages whose contents follow.
    pub pages: Vec<(u64, u64)>,
    /// (first sector, count) runs of disk sectors whose contents follow.
    pub sectors: Vec<(u64, u64)>,
}

pub struct Checkpoint {
    pub header: CheckpointHeader,
    pub data: Vec<u8>,
}

/// Turns a sorted list of numbers into (start, count) runs.
pub fn runs(sorted: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for n in sorted {
        match out.last_mut() {
            Some((s, c)) if *s + *c == n => *c += 1,
            _ => out.push((n, 1)),
        }
    }
    out
}

impl Checkpoint {
    pub fn write(&self, path: &Path) -> Result<u64, CheckpointError> {
        let p = path.display().to_string();
        let io = |source| CheckpointError::Io { path: p.clone(), source };
        let header = serde_json::to_vec(&self.header).expect("checkpoint header serializes");
        let data = zstd::bulk::compress(&self.data, 1).map_err(io)?;
        let mut buf = Vec::with_capacity(header.len() + data.len() + 32);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(header.len() as u64).to_le_bytes());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(&(data.len() as u64).to_le_bytes());
        buf.extend_from_slice(&data);
        let crc = crc32fast::hash(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        let tmp = path.with_extension("partial");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&buf).map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(buf.len() as u64)
    }

    pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let p = path.display().to_string();
        let bad = |msg: &str| CheckpointError::Bad { path: p.clone(), msg: msg.to_string() };
        let b = std::fs::read(path).map_err(|source| CheckpointError::Io { path: p.clone(), source })?;
        if b.len() < 8 + 8 + 8 + 4 || &b[..8] != MAGIC {
            return Err(bad("not a revirt checkpoint (bad magic or too short)"));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err(bad("damaged (checksum mismatch)"));
        }
        let hlen = u64::from_le_bytes(body[8..16].try_into().unwrap()) as usize;
        let hend = 16usize.checked_add(hlen).filter(|&e| e + 8 <= body.len()).ok_or_else(|| bad("header length out of range"))?;
        let header: CheckpointHeader =
            serde_json::from_slice(&body[16..hend]).map_err(|e| bad(&format!("header: {e}")))?;
        let dlen = u64::from_le_bytes(body[hend..hend + 8].try_into().unwrap()) as usize;
        let dstart = hend + 8;
        if dstart.checked_add(dlen) != Some(body.len()) {
            return Err(bad("data length does not match the file"));
        }
        let expect: u64 = header.pages.iter().map(|r| r.1 * PAGE).sum::<u64>()
            + header.sectors.iter().map(|r| r.1 * SECTOR).sum::<u64>();
        let data = zstd::bulk::decompress(&body[dstart..], expect as usize).map_err(|e| bad(&format!("data: {e}")))?;
        if data.len() as u64 != expect {
            return Err(bad("data is shorter than its page and sector lists"));
        }
        Ok(Checkpoint { header, data })
    }
}

/// Memory (and disk) at checkpoint `to` of the recording in `dir`: applies
/// checkpoints `from..=to` in order, one file at a time, handing every page
/// to `page(frame, bytes)` and every run of disk sectors to
/// `sectors(first, bytes)`. With `from == 0` the target must start all zero
/// (fresh guest RAM, a zeroed buffer): checkpoint 0 holds only the pages
/// that were not zero, and any all-zero page in it is not passed on.
/// Returns checkpoint `to`'s header. The one reader of checkpoint contents
/// for replay (`Timeline::at_checkpoint`) and inspection (`Checkpoints::memory`).
pub fn rebuild(
    dir: &Path,
    from: u32,
    to: u32,
    mut page: impl FnMut(u64, &[u8]) -> Result<(), String>,
    mut sectors: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<CheckpointHeader, CheckpointError> {
    let mut last = None;
    for k in from..=to {
        let path = super::checkpoint_path(dir, k);
        let bad = |msg: String| CheckpointError::Bad { path: path.display().to_string(), msg };
        let ck = Checkpoint::read(&path)?;
        if ck.header.id != k {
            return Err(bad(format!("file {k} says it is checkpoint {} (damaged recording)", ck.header.id)));
        }
        let mem = ck.header.machine.config.mem_size;
        let mut at = 0usize;
        for &(first, count) in &ck.header.pages {
            if first.checked_add(count).and_then(|e| e.checked_mul(PAGE)).is_none_or(|e| e > mem) {
                return Err(bad("has pages beyond guest memory (damaged recording)".into()));
            }
            for p in first..first + count {
                let bytes = ck.data.get(at..at + PAGE as usize).ok_or_else(|| bad("data is shorter than its page list".into()))?;
                at += PAGE as usize;
                if k == 0 && bytes.iter().all(|&b| b == 0) {
                    continue;
                }
                page(p, bytes).map_err(&bad)?;
            }
        }
        for &(first, count) in &ck.header.sectors {
            let len = count.checked_mul(SECTOR).ok_or_else(|| bad("sector run out of range".into()))? as usize;
            let bytes = ck.data.get(at..at.saturating_add(len)).ok_or_else(|| bad("data is shorter than its sector list".into()))?;
            at += len;
            sectors(first, bytes).map_err(&bad)?;
        }
        last = Some(ck.header);
    }
    last.ok_or_else(|| CheckpointError::Bad { path: dir.display().to_string(), msg: format!("no checkpoints {from}..={to}") })
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_merge_neighbours() {
        assert_eq!(runs([1, 2, 3, 7, 8, 10]), vec![(1, 3), (7, 2), (10, 1)]);
        assert_eq!(runs(Vec::<u64>::new()), vec![]);
    }
}
