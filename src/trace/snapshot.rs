//! A single-file snapshot of a paused machine (state + zstd-compressed RAM),
//! checksummed so a damaged file is refused rather than half-restored.
//!
//! Layout: `b"RVSNAP01"`, u32 version, u64 state length, state (JSON),
//! u64 memory length, memory (zstd), u32 CRC-32 of everything before it.

use std::path::Path;

use crate::vmm::MachineState;

const MAGIC: &[u8; 8] = b"RVSNAP01";
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("snapshot {0}: not a revirt snapshot (bad magic)")]
    Magic(String),
    #[error("snapshot {path}: format version {found}, this revirt reads version {VERSION}")]
    Version { path: String, found: u32 },
    #[error("snapshot {0}: truncated or damaged (checksum mismatch)")]
    Damaged(String),
    #[error("snapshot {path}: {msg}")]
    Decode { path: String, msg: String },
}

/// A snapshot file's bytes from a state (JSON, taken as given) and raw
/// memory: what [`Snapshot::write`] writes; for tools and tests.
pub fn encode(state_json: &[u8], memory: &[u8]) -> std::io::Result<Vec<u8>> {
    let mem = zstd::bulk::compress(memory, 1)?;
    let mut buf = Vec::with_capacity(state_json.len() + mem.len() + 40);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(state_json.len() as u64).to_le_bytes());
    buf.extend_from_slice(state_json);
    buf.extend_from_slice(&(mem.len() as u64).to_le_bytes());
    buf.extend_from_slice(&mem);
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

/// Decodes a snapshot file's bytes (see [`Snapshot::read`]).
pub fn parse(b: &[u8], path: &str) -> Result<Snapshot, SnapshotError> {
    let p = path.to_string();
    Snapshot::parse_bytes(b, p)
}

pub struct Snapshot {
    pub state: MachineState,
    pub memory: Vec<u8>,
}

impl Snapshot {
    pub fn write(&self, path: &Path) -> Result<(), SnapshotError> {
        let p = path.display().to_string();
        let io = |source| SnapshotError::Io { path: p.clone(), source };
        let state = serde_json::to_vec(&self.state).map_err(|e| SnapshotError::Decode {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        let buf = encode(&state, &self.memory).map_err(io)?;
        // Write to a temporary name and rename: never leave a half file under the real name.
        super::dir::write_atomic(path, &path.with_extension("partial"), &buf, true).map_err(io)
    }

    pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
        let p = path.display().to_string();
        let b = std::fs::read(path).map_err(|source| SnapshotError::Io { path: p.clone(), source })?;
        Self::parse_bytes(&b, p)
    }

    fn parse_bytes(b: &[u8], p: String) -> Result<Snapshot, SnapshotError> {
        if b.len() < 8 || &b[..8] != MAGIC {
            return Err(SnapshotError::Magic(p));
        }
        if b.len() < 12 + 8 + 8 + 4 {
            return Err(SnapshotError::Damaged(p));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(SnapshotError::Version { path: p, found: version });
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err(SnapshotError::Damaged(p));
        }
        let decode = |msg: String| SnapshotError::Decode { path: p.clone(), msg };
        let mut at = 12usize;
        let mut take = |n: usize| -> Result<&[u8], SnapshotError> {
            let s = body.get(at..at.checked_add(n).ok_or_else(|| decode("length overflow".into()))?)
                .ok_or_else(|| decode("section runs past the end".into()))?;
            at += n;
            Ok(s)
        };
        let slen = u64::from_le_bytes(take(8)?.try_into().unwrap()) as usize;
        let state: MachineState =
            serde_json::from_slice(take(slen)?).map_err(|e| decode(format!("state: {e}")))?;
        let mem = state.config.mem_size;
        // Checked before anything is allocated for it.
        if !(crate::vmm::layout::MIN_MEM..=crate::vmm::layout::MAX_MEM).contains(&mem) || !mem.is_multiple_of(crate::vmm::layout::MIB) {
            return Err(decode(format!(
                "memory size {mem} is not a whole number of MiB from {} to {} MiB",
                crate::vmm::layout::MIN_MEM >> 20,
                crate::vmm::layout::MAX_MEM >> 20
            )));
        }
        let mlen = u64::from_le_bytes(take(8)?.try_into().unwrap()) as usize;
        let memory = super::decompress_exact(take(mlen)?, mem as usize).map_err(|e| decode(format!("memory {e}")))?;
        Ok(Snapshot { state, memory })
    }
}
