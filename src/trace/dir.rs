//! The recording directory: the one place that names a recording's files
//! and knows where they go (docs/recording-format.md). record, replay,
//! verify, inspect and migrate reach the files through [`Dir`]; no module
//! outside trace/ spells a file name (tests/architecture.rs checks).

use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// File names, public for tests and tools that build or damage recordings
/// on purpose; code in src/ outside trace/ uses [`Dir`].
pub const META: &str = "meta.json";
pub const IMAGE: &str = "image.elf";
pub const DISK: &str = "disk.img";
pub const EVENTS: &str = "events.log";
/// The seek index (format version 3; trace::index).
pub const INDEX: &str = "events.idx";
pub const CHECKPOINTS: &str = "checkpoints";
pub const CONSOLE: &str = "console.log";

/// Checkpoint `id`'s file in recording `dir` (tests and tools; see [`Dir::checkpoint`]).
pub fn checkpoint_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(CHECKPOINTS).join(format!("{id:06}.ckpt"))
}

/// A recording directory (which need not exist yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dir {
    root: PathBuf,
}

/// How a file grows while a recording is under way (what a migration
/// copies again, and up to where).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// Written once (meta, image, disk) or replaced whole (a checkpoint
    /// the retention policy rewrote).
    Fixed,
    /// The event log: appended to; its length at a stop is the log head's.
    Log,
    /// The console: appended to; its length at a stop is the output length.
    Console,
}

/// A file of the recording as a migration copies it: its name relative to
/// the directory (what goes on the wire), its path here, how it grows.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub name: String,
    pub path: PathBuf,
    pub growth: Growth,
}

impl Dir {
    pub fn new(root: impl Into<PathBuf>) -> Dir {
        Dir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn meta(&self) -> PathBuf {
        self.root.join(META)
    }

    pub fn image(&self) -> PathBuf {
        self.root.join(IMAGE)
    }

    /// The recording's own copy of the disk (meta.json's `config.disk` names it relatively).
    pub fn disk(&self) -> PathBuf {
        self.root.join(DISK)
    }

    /// The disk's name inside the recording, as meta.json's config holds it.
    pub fn disk_name() -> PathBuf {
        PathBuf::from(DISK)
    }

    pub fn events(&self) -> PathBuf {
        self.root.join(EVENTS)
    }

    /// The seek index beside the log (trace::index).
    pub fn index(&self) -> PathBuf {
        self.root.join(INDEX)
    }

    pub fn console(&self) -> PathBuf {
        self.root.join(CONSOLE)
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.root.join(CHECKPOINTS)
    }

    pub fn checkpoint(&self, id: u32) -> PathBuf {
        checkpoint_path(&self.root, id)
    }

    /// Where the retention policy writes checkpoint `id` merged with the
    /// ones it drops, until the log holds the drops ([`Dir::commit_thinned`]).
    pub fn thinned(&self, id: u32) -> PathBuf {
        self.checkpoint(id).with_extension("thin")
    }

    /// There is a recording here (its meta.json).
    pub fn is_recording(&self) -> bool {
        self.meta().exists()
    }

    /// The directory exists and holds something (a new recording goes
    /// only into an absent or empty one).
    pub fn is_occupied(&self) -> bool {
        self.root.exists() && std::fs::read_dir(&self.root).map(|mut d| d.next().is_some()).unwrap_or(true)
    }

    /// Creates the directory and its checkpoints/.
    pub fn create(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(self.checkpoints())
    }

    pub fn has_checkpoint(&self, id: u32) -> bool {
        self.checkpoint(id).exists()
    }

    /// Bytes of the checkpoint files on disk.
    pub fn checkpoint_bytes(&self) -> u64 {
        std::fs::read_dir(self.checkpoints())
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "ckpt"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Puts checkpoint `id`'s thinned file in place of the old one.
    pub fn commit_thinned(&self, id: u32) -> std::io::Result<()> {
        std::fs::rename(self.thinned(id), self.checkpoint(id))
    }

    /// Deletes checkpoint `id`'s file (already gone is fine).
    pub fn remove_checkpoint(&self, id: u32) -> std::io::Result<()> {
        match std::fs::remove_file(self.checkpoint(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The files a migration copies, in the order it sends them: meta,
    /// image, disk, the checkpoints (sorted), then the growing log and
    /// console. Files not (yet) there are left out.
    pub fn transfers(&self) -> Vec<Transfer> {
        let mut out: Vec<Transfer> = [META, IMAGE, DISK]
            .iter()
            .map(|n| Transfer { name: n.to_string(), path: self.root.join(n), growth: Growth::Fixed })
            .collect();
        if let Ok(rd) = std::fs::read_dir(self.checkpoints()) {
            let mut v: Vec<String> = rd
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.ends_with(".ckpt"))
                .map(|n| format!("{CHECKPOINTS}/{n}"))
                .collect();
            v.sort();
            out.extend(v.into_iter().map(|n| Transfer { path: self.root.join(&n), name: n, growth: Growth::Fixed }));
        }
        out.push(Transfer { name: EVENTS.into(), path: self.events(), growth: Growth::Log });
        out.push(Transfer { name: CONSOLE.into(), path: self.console(), growth: Growth::Console });
        out.retain(|t| t.path.exists());
        out
    }

    /// Where a file a migration source names (a [`Transfer::name`]) goes
    /// here: one of the recording's own files (`checkpoints/NNNNNN.ckpt`
    /// for checkpoints), never anything else, absolute or with `..`.
    pub fn receive_path(&self, name: &str) -> Option<PathBuf> {
        let p = Path::new(name);
        let plain = !name.is_empty() && p.components().count() <= 2 && p.components().all(|c| matches!(c, Component::Normal(_)));
        let known = [META, IMAGE, DISK, EVENTS, CONSOLE].contains(&name)
            || name
                .strip_prefix(CHECKPOINTS)
                .and_then(|n| n.strip_prefix('/'))
                .and_then(|n| n.strip_suffix(".ckpt"))
                .is_some_and(|id| id.len() == 6 && id.bytes().all(|b| b.is_ascii_digit()));
        (plain && known).then(|| self.root.join(p))
    }

}

impl AsRef<Path> for Dir {
    fn as_ref(&self) -> &Path {
        &self.root
    }
}

/// Writes `bytes` to `path` by way of `tmp` and a rename, so a reader (or a
/// recorder killed half-way) never sees a half file under the real name.
/// `sync`: make the bytes durable before the rename.
pub fn write_atomic(path: &Path, tmp: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    let mut f = std::fs::File::create(tmp)?;
    f.write_all(bytes)?;
    if sync {
        f.sync_all()?;
    }
    drop(f);
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_names_only_the_recordings_own_files() {
        let d = Dir::new("/r");
        assert_eq!(d.receive_path("meta.json"), Some(PathBuf::from("/r/meta.json")));
        assert_eq!(d.receive_path("checkpoints/000012.ckpt"), Some(PathBuf::from("/r/checkpoints/000012.ckpt")));
        for bad in ["", "/etc/passwd", "../x", "checkpoints/../meta.json", "checkpoints/12.ckpt", "checkpoints/00001a.ckpt", "x.json", "checkpoints/000001.thin"] {
            assert_eq!(d.receive_path(bad), None, "{bad}");
        }
    }
}
