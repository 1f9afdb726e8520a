//! meta.json: what was recorded, with what, where. Written once, atomically,
//! before the guest starts; the event log's hash chain is bound to its `id`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::clock::ClockKind;
use crate::vmm::VmConfig;

pub const FORMAT: &str = "revirt-recording";
/// 2: checkpoint 0 holds only non-zero pages, and the End event's state
/// hash covers memory by per-page hashes (vmm::pagehash) instead of every
/// byte. Version 1 recordings are refused: their state hash cannot be
/// checked without reading all of memory the old way.
/// 3: the seek index `events.idx` (trace::index) beside the log. Version 2
/// recordings (no index) are read as before: every reader checks the whole
/// log, seeks included.
/// 4: the log may hold `CheckpointCovered` events (and the index their
/// records), which a version-3 reader cannot decode. Versions 2 and 3 are
/// read as before (no claims: a restore opens every kept checkpoint file).
pub const VERSION: u32 = 4;
/// The versions this revirt reads.
pub const READS: [u32; 3] = [2, 3, 4];

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is not a revirt recording's meta.json: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("{path}: {found} format version {version} is not supported; this revirt reads {FORMAT} versions 2, 3 and 4 (record it again with this revirt, or replay it with the revirt that made it)")]
    Version { path: String, found: String, version: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Where the file was when recording started (for the record only).
    pub original_path: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub kernel: String,
    pub cpu: String,
    pub kvm_pvm: bool,
    pub pmu: bool,
}

impl HostInfo {
    pub fn probe() -> HostInfo {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_default();
        HostInfo {
            kernel,
            cpu,
            kvm_pvm: Path::new("/sys/module/kvm_pvm").exists(),
            // cpu, or cpu_core/cpu_atom on hybrid Intel.
            pmu: crate::clock::pmu::PmuLayout::host_has_pmu(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub format: String,
    pub version: u32,
    /// Random identity; the event log's hash chain starts from it.
    pub id: String,
    pub revirt_version: String,
    pub created_unix: u64,
    pub clock: ClockKind,
    /// The VM as built; `disk` names the recording's own copy (`disk.img`).
    pub config: VmConfig,
    pub image: FileInfo,
    pub disk: Option<FileInfo>,
    pub host: HostInfo,
    pub checkpoint_every_ms: u64,
    /// The retention policy's K (`--keep-checkpoints`, docs/recording-format.md
    /// "Retention"); absent: every checkpoint is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_keep: Option<u32>,
    /// When this recording continues another one (going live from a
    /// replay): that recording's id and the exit count it branched at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parent {
    pub id: String,
    pub exits: u64,
}

impl Meta {
    pub fn write(&self, path: &Path) -> Result<(), MetaError> {
        let io = |source| MetaError::Io { path: path.display().to_string(), source };
        let json = serde_json::to_vec_pretty(self).expect("meta serializes");
        super::dir::write_atomic(path, &path.with_extension("json.partial"), &json, false).map_err(io)
    }

    pub fn read(path: &Path) -> Result<Meta, MetaError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| MetaError::Io { path: p.clone(), source })?;
        Self::parse(&bytes, path)
    }

    /// Decodes meta.json's bytes (`path` names it in errors): a reader that
    /// also hashes them (the chain's genesis) decodes the bytes it hashed.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Meta, MetaError> {
        let p = path.display().to_string();
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|source| MetaError::Parse { path: p.clone(), source })?;
        let found = v.get("format").and_then(|f| f.as_str()).unwrap_or("?").to_string();
        let version = v.get("version").and_then(|f| f.as_u64()).unwrap_or(0) as u32;
        if found != FORMAT || !READS.contains(&version) {
            return Err(MetaError::Version { path: p, found, version });
        }
        serde_json::from_value(v).map_err(|source| MetaError::Parse { path: p, source })
    }
}

/// A random 128-bit id, hex (from the kernel's RNG; no extra crate needed).
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    hex::encode(b)
}

/// This host's name (for HostInfo and the Migrated event).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]
        /// The meta parser answers any file with a Meta or an error, never a panic.
        #[test]
        fn meta_parser_survives_anything(s in ".{0,300}", flip in any::<usize>()) {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("meta.json");
            let mut b = format!(r#"{{"format":"revirt-recording","version":1,"id":"ab",{s}}}"#).into_bytes();
            let i = flip % b.len();
            b[i] ^= 0x55;
            std::fs::write(&p, &b).unwrap();
            let _ = Meta::read(&p);
            std::fs::write(&p, s.as_bytes()).unwrap();
            let _ = Meta::read(&p);
        }
    }

    #[test]
    fn older_format_versions_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("meta.json");
        std::fs::write(&p, br#"{"format":"revirt-recording","version":1,"id":"ab"}"#).unwrap();
        let e = Meta::read(&p).unwrap_err().to_string();
        assert!(e.contains("format version 1 is not supported"), "{e}");
    }
}
