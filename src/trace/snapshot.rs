//! A single-file snapshot of a paused machine (`revirt run --pause-at
//! --save` / `--restore`): the machine state in the versioned container
//! (`trace::state`) and zstd-compressed RAM, checksummed so a damaged file
//! is refused rather than half-restored.
//!
//! Layout: `b"RVSNAP01"`, u32 version (2), the machine-state container,
//! u64 memory length, memory (zstd), u32 CRC-32 of everything before it.
//! Version 1 files (the state as bare JSON, before 2026-11-30) are refused:
//! "snapshot format version 1 is not supported".

use std::path::Path;

use crate::vmm::MachineState;

const MAGIC: &[u8; 8] = b"RVSNAP01";
const VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("snapshot {0}: not a revirt snapshot (bad magic)")]
    Magic(String),
    #[error("snapshot {path}: snapshot format version {found} is not supported; this revirt reads version {VERSION}")]
    Version { path: String, found: u32 },
    #[error("snapshot {0}: truncated or damaged (checksum mismatch)")]
    Damaged(String),
    #[error("snapshot {path}: {source}")]
    State { path: String, source: super::state::StateError },
    #[error("snapshot {path}: {msg}")]
    Decode { path: String, msg: String },
}

/// A snapshot file's bytes from a state payload (JSON of the container's
/// version-1 payload, taken as given) and raw memory: what
/// [`Snapshot::write`] writes; for tools and tests.
pub fn encode(state_json: &[u8], memory: &[u8]) -> std::io::Result<Vec<u8>> {
    assemble(&super::state::seal(state_json), memory)
}

fn assemble(state: &[u8], memory: &[u8]) -> std::io::Result<Vec<u8>> {
    let mem = zstd::bulk::compress(memory, 1)?;
    let mut buf = Vec::with_capacity(state.len() + mem.len() + 40);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(state);
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
        let io = |source| SnapshotError::Io { path: path.display().to_string(), source };
        let buf = assemble(&super::state::encode(&self.state), &self.memory).map_err(io)?;
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
        if b.len() < 12 + 8 + 4 {
            return Err(SnapshotError::Damaged(p));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(SnapshotError::Version { path: p, found: version });
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(SnapshotError::Damaged(p));
        }
        let (payload, n) = super::state::open(&body[12..]).map_err(|source| SnapshotError::State { path: p.clone(), source })?;
        let state = super::state::decode_payload(payload).map_err(|source| SnapshotError::State { path: p.clone(), source })?;
        let decode = |msg: String| SnapshotError::Decode { path: p.clone(), msg };
        let rest = &body[12 + n..];
        let mem = state.config.mem_size;
        // Checked before anything is allocated for it.
        if !(crate::vmm::layout::MIN_MEM..=crate::vmm::layout::MAX_MEM).contains(&mem) || !mem.is_multiple_of(crate::vmm::layout::MIB) {
            return Err(decode(format!(
                "memory size {mem} is not a whole number of MiB from {} to {} MiB",
                crate::vmm::layout::MIN_MEM >> 20,
                crate::vmm::layout::MAX_MEM >> 20
            )));
        }
        let mlen = rest.get(..8).map(|l| u64::from_le_bytes(l.try_into().expect("8 bytes"))).ok_or_else(|| decode("memory length cut short".into()))?;
        if mlen != rest.len() as u64 - 8 {
            return Err(decode("memory section does not match the file".into()));
        }
        let memory = super::decompress_exact(&rest[8..], mem as usize).map_err(|e| decode(format!("memory {e}")))?;
        Ok(Snapshot { state, memory })
    }
}
