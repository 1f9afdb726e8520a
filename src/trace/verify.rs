//! `revirt verify`: check every integrity mechanism of a recording without
//! replaying it, say precisely where damage is, and compute a digest a user
//! can publish so that even a host attacker who rewrites the whole hash chain
//! is caught later.
//!
//! What this protects against: accidental damage and truncation anywhere;
//! tampering with any single byte of the log, a checkpoint, the console, the
//! image or disk copies (the chain catches the log; each checkpoint file's
//! SHA-256 is logged in the chain when it lands; meta.json holds the image
//! and disk hashes and starts the chain; the End event holds the console's). What it does not: an attacker with write access to the recording
//! can recompute the whole chain consistently; only comparing the published
//! digest (`--digest`) against a copy kept elsewhere catches that. An
//! attacker *inside the guest* cannot touch the log at all: the VMM writes it.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::{checkpoint_path, log, Checkpoint, Event, LogReader, LogStatus, Meta};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub ok: bool,
    pub what: String,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// Complete and undamaged.
    pub intact: bool,
    /// Cut short but every byte present verifies (a recorder that was killed).
    pub incomplete: bool,
    /// SHA-256 over the manifest of every file's hash (and the chain head).
    pub digest: Option<String>,
    pub manifest: Vec<(String, String)>,
    /// One line: what was checked, and how it came out.
    pub summary: String,
}

impl Report {
    /// Some byte present fails its check (as opposed to a recording that
    /// is merely cut short).
    pub fn damaged(&self) -> bool {
        !self.intact && !self.incomplete
    }

    /// The findings that failed, one per line.
    pub fn problems(&self) -> Vec<&str> {
        self.findings.iter().filter(|f| !f.ok).map(|f| f.what.as_str()).collect()
    }
}

/// What [`verify`] looked at, for the one-line summary.
#[derive(Default)]
struct Checked {
    files: Vec<&'static str>,
    chunks: u32,
    checkpoints: usize,
    /// Checkpoints the retention policy dropped (recorded in the chain).
    dropped: usize,
}

fn summary(c: &Checked, intact: bool, incomplete: bool) -> String {
    format!(
        "integrity: checked {}, events.log ({} chunks, SHA-256 chain), {} checkpoint{} (SHA-256 bound in the chain{}), console.log (End digest): {}",
        c.files.join(", "),
        c.chunks,
        c.checkpoints,
        if c.checkpoints == 1 { "" } else { "s" },
        if c.dropped > 0 { format!("; {} more dropped by the retention policy, as the chain records", c.dropped) } else { String::new() },
        if intact {
            "intact"
        } else if incomplete {
            "cut short (what is there verifies)"
        } else {
            "DAMAGED"
        }
    )
}

fn file_sha(path: &Path) -> Option<String> {
    std::fs::read(path).ok().map(|b| hex::encode(Sha256::digest(b)))
}

/// The SHA-256 the log holds for each checkpoint file (see
/// [`Event::CheckpointFile`]): the latest one, as the retention policy
/// rewrites the checkpoint it merges a dropped one into
/// ([`Event::CheckpointDropped`]).
pub fn bound_checkpoints(events: &[Event]) -> std::collections::HashMap<u32, String> {
    bindings(events).into_iter().filter_map(|(id, mut v)| v.pop().map(|s| (id, s))).collect()
}

/// Every SHA-256 the log held for each checkpoint file, oldest first.
fn bindings(events: &[Event]) -> std::collections::HashMap<u32, Vec<String>> {
    let mut m: std::collections::HashMap<u32, Vec<String>> = Default::default();
    for e in events {
        match e {
            Event::CheckpointFile { id, sha256, .. } | Event::CheckpointDropped { into: id, sha256, .. } => {
                m.entry(*id).or_default().push(sha256.clone())
            }
            _ => {}
        }
    }
    m
}

/// Checkpoints the retention policy dropped: id -> the one it was merged into.
pub fn dropped_checkpoints(events: &[Event]) -> std::collections::HashMap<u32, u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::CheckpointDropped { id, into, .. } => Some((*id, *into)),
            _ => None,
        })
        .collect()
}

pub fn verify(dir: &Path) -> Report {
    let mut f = Vec::new();
    let mut manifest = Vec::new();
    let mut push = |ok: bool, what: String| f.push(Finding { ok, what });
    let meta = match Meta::read(&dir.join(super::META)) {
        Ok(m) => {
            push(true, format!("meta.json: {} version {}, clock {}, id {}", m.format, m.version, m.clock, m.id));
            m
        }
        Err(e) => {
            push(false, format!("meta.json: {e} (damaged or not a recording)"));
            let summary = summary(&Checked { files: vec!["meta.json"], ..Checked::default() }, false, false);
            return Report { findings: f, intact: false, incomplete: false, digest: None, manifest, summary };
        }
    };
    manifest.push(("meta.json".to_string(), file_sha(&dir.join(super::META)).unwrap_or_default()));
    let mut damaged = false;
    let mut incomplete = false;
    let mut checked = Checked { files: vec!["meta.json"], ..Checked::default() };

    for (name, want) in [(super::IMAGE, Some(&meta.image)), (super::DISK, meta.disk.as_ref())] {
        let Some(want) = want else { continue };
        checked.files.push(if name == super::IMAGE { "image.elf (SHA-256 in meta.json)" } else { "disk.img (SHA-256 in meta.json)" });
        match file_sha(&dir.join(name)) {
            Some(h) if h == want.sha256 => push(true, format!("{name}: matches meta.json's SHA-256")),
            Some(_) => {
                damaged = true;
                push(false, format!("{name}: damaged: does not match meta.json's SHA-256 (changed after recording)"));
            }
            None => {
                damaged = true;
                push(false, format!("{name}: missing"));
            }
        }
        manifest.push((name.to_string(), file_sha(&dir.join(name)).unwrap_or_default()));
    }

    let log = match log::genesis_of(dir).and_then(|g| LogReader::read(&dir.join(super::EVENTS), g)) {
        Ok(l) => l,
        Err(e) => {
            push(false, format!("events.log: {e}"));
            let summary = summary(&checked, false, false);
            return Report { findings: f, intact: false, incomplete: false, digest: None, manifest, summary };
        }
    };
    match &log.status {
        LogStatus::Complete => push(true, format!("events.log: {} chunks, {} events, hash chain verified, ends with End", log.chunks, log.events.len())),
        LogStatus::Incomplete { reason, damaged: d } => {
            if *d {
                damaged = true;
            } else {
                incomplete = true;
            }
            push(false, format!("events.log: {} chunks ({} events) verify; then {reason}", log.chunks, log.events.len()));
        }
    }
    manifest.push(("events.log chain head".to_string(), log.head.clone()));

    checked.chunks = log.chunks;
    let bound = bound_checkpoints(&log.events);
    let all_bound = bindings(&log.events);
    let dropped = dropped_checkpoints(&log.events);
    for e in &log.events {
        if let Event::Checkpoint { id, exits, .. } = e {
            let p = checkpoint_path(dir, *id);
            if let Some(into) = dropped.get(id) {
                checked.dropped += 1;
                let what = format!("checkpoint {id} (exit {exits}): dropped by the retention policy, merged into checkpoint {into} (recorded in the hash chain)");
                if !p.exists() {
                    push(true, what);
                    continue;
                }
                // The recorder logs the drop first and deletes the file
                // after: one killed in between leaves it (a migration's
                // destination may hold an older copy). Unused, but it must
                // still be a version the chain bound.
                if all_bound.get(id).is_some_and(|v| v.iter().any(|s| Checkpoint::read_bound(&p, s).is_ok())) {
                    push(true, format!("{what}; its file is still there and matches the chain"));
                } else {
                    damaged = true;
                    push(false, format!("checkpoint {id}: dropped by the retention policy, but a file is there that the chain never bound (damaged)"));
                }
                continue;
            }
            let Some(sha) = bound.get(id) else {
                // Taken, but the log stops before its file was bound: the
                // recorder was killed while writing it.
                if log.status == LogStatus::Complete {
                    damaged = true;
                    push(false, format!("checkpoint {id}: not bound into the log's hash chain (no SHA-256 logged for it)"));
                } else if log.status.is_damaged() {
                    push(false, format!("checkpoint {id}: its SHA-256 is not in the verified part of the damaged log; not trusted"));
                } else {
                    incomplete = true;
                    match Checkpoint::read(&p) {
                        Ok(c) if c.header.id == *id && c.header.exits == *exits => push(
                            false,
                            format!("checkpoint {id}: the log is cut short before its file's SHA-256 (not bound; CRC-32 ok)"),
                        ),
                        Ok(_) => {
                            damaged = true;
                            push(false, format!("checkpoint {id}: does not match its log entry (damaged)"));
                        }
                        Err(e) => push(false, format!("checkpoint {id}: not bound (the log is cut short before it) and {e}")),
                    }
                }
                continue;
            };
            checked.checkpoints += 1;
            match Checkpoint::read_bound(&p, sha) {
                Ok(c) if c.header.id == *id && c.header.exits == *exits => {
                    push(true, format!("checkpoint {id} (exit {exits}): SHA-256 matches the hash chain"))
                }
                Ok(_) => {
                    damaged = true;
                    push(false, format!("checkpoint {id}: does not match its log entry (damaged)"));
                }
                // The retention policy rewrites a checkpoint after logging
                // its new SHA-256; a recorder killed in between leaves the
                // version before (which the chain bound earlier, and which
                // still restores correctly with the dropped one beside it).
                Err(_) if log.status != LogStatus::Complete
                    && all_bound.get(id).is_some_and(|v| v[..v.len() - 1].iter().any(|s| Checkpoint::read_bound(&p, s).is_ok())) =>
                {
                    incomplete = true;
                    push(false, format!("checkpoint {id}: the recording stopped while the retention policy rewrote it: the file is its earlier version, which the chain bound before"));
                }
                Err(e) => {
                    damaged = true;
                    push(false, format!("checkpoint {id}: {e}"));
                }
            }
            manifest.push((format!("checkpoints/{id:06}.ckpt"), file_sha(&p).unwrap_or_default()));
        }
    }

    let console = std::fs::read(dir.join(super::CONSOLE)).unwrap_or_default();
    if let Some(Event::End { output_len, output_sha256, reason, exits, .. }) = log.events.last() {
        let sha = hex::encode(Sha256::digest(&console));
        if sha == *output_sha256 && console.len() as u64 == *output_len {
            push(true, format!("console.log: {output_len} bytes, matches the End event; ended {reason:?} at exit {exits}"));
        } else {
            damaged = true;
            push(false, "console.log: damaged: does not match the End event's digest (edited or cut)".into());
        }
    }
    manifest.push(("console.log".to_string(), hex::encode(Sha256::digest(&console))));

    let mut h = Sha256::new();
    for (name, sha) in &manifest {
        h.update(format!("{name} {sha}\n"));
    }
    let (intact, incomplete) = (!damaged && !incomplete, incomplete && !damaged);
    Report { findings: f, intact, incomplete, digest: Some(hex::encode(h.finalize())), manifest, summary: summary(&checked, intact, incomplete) }
}
