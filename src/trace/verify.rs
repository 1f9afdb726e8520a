//! `revirt verify`: check every integrity mechanism of a recording without
//! replaying it, say precisely where damage is, and compute a digest a user
//! can publish so that even a host attacker who rewrites the whole hash chain
//! is caught later.
//!
//! Every file of a recording is bound into the event log's SHA-256 chain
//! (which starts from meta.json's exact bytes): meta.json holds the image
//! and disk hashes; each checkpoint file's SHA-256 is logged when it lands
//! (`CheckpointFile`); console.log's length and SHA-256 are logged as it
//! grows (`ConsoleFile`) and at the end (`End`). Any other file in the
//! directory is reported. A recording cut short (a killed recorder) has
//! files, or a console tail, written after its last sealed chunk: those are
//! named as "not vouched for" — truncation, not damage.
//!
//! What it does not: an attacker with write access to the recording can
//! recompute the whole chain consistently; only comparing the published
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
    /// Dropped by the retention policy, as the chain records.
    dropped: usize,
    console: String,
    unvouched: Vec<String>,
}

fn summary(c: &Checked, intact: bool, incomplete: bool) -> String {
    let mut s = format!(
        "integrity: checked {}, events.log ({} chunks, SHA-256 chain), {} checkpoint{} (SHA-256 bound in the chain{}), console.log ({}): {}",
        c.files.join(", "),
        c.chunks,
        c.checkpoints,
        if c.checkpoints == 1 { "" } else { "s" },
        if c.dropped > 0 { format!("; {} more dropped by the retention policy, as the chain records", c.dropped) } else { String::new() },
        if c.console.is_empty() { "not checked" } else { &c.console },
        if intact {
            "intact"
        } else if incomplete {
            "cut short (what is there verifies)"
        } else {
            "DAMAGED"
        }
    );
    if !c.unvouched.is_empty() {
        s += &format!("; not vouched for: {}", c.unvouched.join(", "));
    }
    s
}

/// SHA-256 of a file, streamed (image and disk copies can be large).
fn file_sha(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf).ok()? {
            0 => return Some(hex::encode(h.finalize())),
            n => h.update(&buf[..n]),
        }
    }
}

/// The SHA-256 the log holds for each checkpoint file (see
/// [`Event::CheckpointFile`]; the latest event for an id wins).
pub fn bound_checkpoints(events: &[Event]) -> std::collections::HashMap<u32, String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::CheckpointFile { id, sha256, .. } => Some((*id, sha256.clone())),
            _ => None,
        })
        .collect()
}

/// The recording's small files as [`check`] read them, once: a reader
/// decodes exactly these bytes, never a second read of the same file (no
/// window between the check and the use). Large files are checked where
/// they are used, while they are read: checkpoints through
/// [`super::checkpoint::Seals`], the disk copy by [`super::copy_checked`].
pub struct Loaded {
    pub meta: Meta,
    pub log: LogReader,
    /// console.log as read (all of it; `console_vouched` says how much of
    /// it the chain vouches for).
    pub console: Vec<u8>,
    pub console_vouched: u64,
    /// image.elf as read; it matched meta.json's SHA-256 if `image_ok`.
    pub image: Vec<u8>,
    pub image_ok: bool,
}

/// How much of `console` the log vouches for, and the finding: the End
/// event (a complete log) or the last `ConsoleFile` binding (a log cut
/// short, whose tail may be unbound). `Err` is damage.
fn check_console(console: &[u8], log: &LogReader) -> (Result<u64, String>, Option<String>) {
    if let Some(Event::End { output_len, output_sha256, reason, exits, .. }) = log.events.last() {
        let sha = hex::encode(Sha256::digest(console));
        return if sha == *output_sha256 && console.len() as u64 == *output_len {
            (Ok(*output_len), Some(format!("{output_len} bytes, matches the End event; ended {reason:?} at exit {exits}")))
        } else {
            (Err("console.log: damaged or tampered: does not match the End event's digest (edited or cut)".into()), None)
        };
    }
    let last = log.events.iter().rev().find_map(|e| match e {
        Event::ConsoleFile { len, sha256, .. } => Some((*len, sha256)),
        _ => None,
    });
    let Some((len, sha)) = last else { return (Ok(0), None) };
    let Some(prefix) = usize::try_from(len).ok().and_then(|l| console.get(..l)) else {
        return (
            Err(format!(
                "console.log: damaged: holds {} bytes, fewer than the {len} the log's hash chain vouches for (cut after recording)",
                console.len()
            )),
            None,
        );
    };
    if hex::encode(Sha256::digest(prefix)) != *sha {
        return (
            Err(format!("console.log: damaged or tampered: its first {len} bytes do not match the SHA-256 in the log's hash chain")),
            None,
        );
    }
    (Ok(len), Some(format!("first {len} bytes match the hash chain")))
}

pub fn verify(dir: &Path) -> Report {
    check(dir).0
}

/// [`verify`], also handing back the bytes it checked (meta.json, the log,
/// console.log, image.elf) for a reader to decode: each read once.
pub fn check(dir: &Path) -> (Report, Option<Loaded>) {
    let mut f = Vec::new();
    let mut manifest = Vec::new();
    let mut push = |ok: bool, what: String| f.push(Finding { ok, what });
    let meta_path = dir.join(super::META);
    let parsed = std::fs::read(&meta_path)
        .map_err(|source| super::MetaError::Io { path: meta_path.display().to_string(), source })
        .and_then(|b| Meta::parse(&b, &meta_path).map(|m| (m, b)));
    let (meta, meta_bytes) = match parsed {
        Ok((m, b)) => {
            push(true, format!("meta.json: {} version {}, clock {}, id {}", m.format, m.version, m.clock, m.id));
            (m, b)
        }
        Err(e) => {
            push(false, format!("meta.json: {e} (damaged or not a recording)"));
            let summary = summary(&Checked { files: vec!["meta.json"], ..Checked::default() }, false, false);
            return (Report { findings: f, intact: false, incomplete: false, digest: None, manifest, summary }, None);
        }
    };
    manifest.push(("meta.json".to_string(), hex::encode(Sha256::digest(&meta_bytes))));
    let mut damaged = false;
    let mut incomplete = false;
    let mut checked = Checked { files: vec!["meta.json"], ..Checked::default() };

    // image.elf is small and read whole (readers use these bytes); disk.img
    // is hashed as a stream here and again while it is copied for use.
    let image = std::fs::read(dir.join(super::IMAGE));
    let image_sha = image.as_ref().ok().map(|b| hex::encode(Sha256::digest(b)));
    let mut image_ok = false;
    for (name, want) in [(super::IMAGE, Some(&meta.image)), (super::DISK, meta.disk.as_ref())] {
        let Some(want) = want else { continue };
        checked.files.push(if name == super::IMAGE { "image.elf (SHA-256 in meta.json)" } else { "disk.img (SHA-256 in meta.json)" });
        let have = if name == super::IMAGE { image_sha.clone() } else { file_sha(&dir.join(name)) };
        match &have {
            Some(h) if *h == want.sha256 => {
                image_ok |= name == super::IMAGE;
                push(true, format!("{name}: matches meta.json's SHA-256"))
            }
            Some(_) => {
                damaged = true;
                push(false, format!("{name}: damaged: does not match meta.json's SHA-256 (changed after recording)"));
            }
            None => {
                damaged = true;
                push(false, format!("{name}: missing"));
            }
        }
        manifest.push((name.to_string(), have.unwrap_or_default()));
    }

    let log = match LogReader::read(&dir.join(super::EVENTS), log::genesis(&meta_bytes)) {
        Ok(l) => l,
        Err(e) => {
            push(false, format!("events.log: {e}"));
            let summary = summary(&checked, false, false);
            return (Report { findings: f, intact: false, incomplete: false, digest: None, manifest, summary }, None);
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
    let cut_short = !log.status.is_damaged() && log.status != LogStatus::Complete;
    // Why a file is not vouched for: truncation (the log stops before its
    // binding) or the damaged log.
    let why_unbound = if cut_short {
        "the log was cut short before it was bound (truncation, not damage)"
    } else {
        "the log is damaged before its binding"
    };

    checked.chunks = log.chunks;
    let seals = super::checkpoint::Seals::from_events(&log.events, super::checkpoint::Expect::Unbound);
    let mut in_log = std::collections::HashSet::new();
    for e in &log.events {
        if let Event::Checkpoint { id, exits, .. } = e {
            in_log.insert(*id);
            let p = checkpoint_path(dir, *id);
            let name = format!("checkpoints/{id:06}.ckpt");
            match seals.expect(*id) {
                super::checkpoint::Expect::Dropped => {
                    checked.dropped += 1;
                    push(true, format!("checkpoint {id}: dropped (thinned); its removal is in the hash chain"));
                    continue;
                }
                super::checkpoint::Expect::Bound(sha) => {
                    checked.checkpoints += 1;
                    match Checkpoint::read_expect(&p, &super::checkpoint::Expect::Bound(sha.clone())) {
                        Ok((c, _)) if c.header.id == *id && c.header.exits == *exits => {
                            push(true, format!("checkpoint {id} (exit {exits}): SHA-256 matches the hash chain"))
                        }
                        Ok(_) => {
                            damaged = true;
                            push(false, format!("checkpoint {id}: does not match its log entry (damaged)"));
                        }
                        // The retention policy (record::retain) logs a merged
                        // checkpoint's new SHA-256 before it replaces the file:
                        // a recorder killed in between leaves the version the
                        // chain bound before (still right, with the dropped
                        // one's file beside it).
                        Err(_) if cut_short && earlier_binding(&log.events, *id, &sha).any(|s| Checkpoint::read_bound(&p, s).is_ok()) => {
                            incomplete = true;
                            push(false, format!("checkpoint {id}: the recorder stopped while thinning rewrote it: the file is the version the chain bound before (truncation, not damage)"));
                        }
                        Err(e) => {
                            damaged = true;
                            push(false, format!("checkpoint {id}: {e}"));
                        }
                    }
                    manifest.push((name, sha));
                }
                _ => {
                    // Taken, but the log stops before its file was bound:
                    // the recorder was killed while writing it.
                    if log.status == LogStatus::Complete {
                        damaged = true;
                        push(false, format!("checkpoint {id}: not bound into the log's hash chain (no SHA-256 logged for it)"));
                        continue;
                    }
                    if !p.exists() {
                        push(false, format!("checkpoint {id}: no file (the recorder stopped before writing it); not used"));
                        continue;
                    }
                    checked.unvouched.push(name.clone());
                    match Checkpoint::read(&p) {
                        Ok(c) if c.header.id == *id && c.header.exits == *exits => {
                            push(false, format!("{name}: not vouched for: {why_unbound} (CRC-32 ok)"))
                        }
                        Ok(_) => {
                            damaged = true;
                            push(false, format!("checkpoint {id}: does not match its log entry (damaged)"));
                        }
                        Err(e) => push(false, format!("{name}: not vouched for: {why_unbound}; and {e}")),
                    }
                    if cut_short {
                        incomplete = true;
                    }
                }
            }
        }
    }

    let console = std::fs::read(dir.join(super::CONSOLE)).unwrap_or_default();
    let (vouched, ok) = check_console(&console, &log);
    let console_vouched = match vouched {
        Ok(n) => {
            if let Some(ok) = ok {
                push(true, format!("console.log: {ok}"));
            }
            checked.console = if log.status == LogStatus::Complete { "End digest".into() } else { format!("{n} bytes bound in the chain") };
            if (console.len() as u64) > n {
                let tail = console.len() as u64 - n;
                checked.unvouched.push(format!("console.log bytes {n}..{}", console.len()));
                push(false, format!("console.log: its last {tail} bytes (from byte {n}) are not vouched for: {why_unbound}"));
                if cut_short {
                    incomplete = true;
                }
            }
            n
        }
        Err(e) => {
            damaged = true;
            checked.console = "DAMAGED".into();
            push(false, e);
            0
        }
    };
    manifest.push(("console.log".to_string(), hex::encode(Sha256::digest(&console))));

    // Every other file in the directory: nothing the recording does not vouch for.
    for name in stray_files(dir, &in_log, meta.disk.is_some()) {
        checked.unvouched.push(name.clone());
        if cut_short {
            incomplete = true;
            push(false, format!("{name}: not vouched for: {why_unbound} (not used)"));
        } else {
            damaged = true;
            push(false, format!("{name}: not part of the recording (no event in the log's hash chain vouches for it); not used"));
        }
    }

    let mut h = Sha256::new();
    for (name, sha) in &manifest {
        h.update(format!("{name} {sha}\n"));
    }
    let (intact, incomplete) = (!damaged && !incomplete, incomplete && !damaged);
    let report = Report {
        findings: f,
        intact,
        incomplete,
        digest: Some(hex::encode(h.finalize())),
        manifest,
        summary: summary(&checked, intact, incomplete),
    };
    let loaded = Loaded { meta, log, console, console_vouched, image: image.unwrap_or_default(), image_ok };
    (report, Some(loaded))
}

/// The SHA-256s the log bound checkpoint `id` to before its latest, `latest`.
fn earlier_binding<'a>(events: &'a [Event], id: u32, latest: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    events.iter().filter_map(move |e| match e {
        Event::CheckpointFile { id: i, sha256, .. } if *i == id && !sha256.is_empty() && sha256 != latest => Some(sha256.as_str()),
        _ => None,
    })
}

/// Files in the recording directory that are none of its own: anything
/// besides meta.json, image.elf, disk.img, events.log, console.log and
/// the checkpoint files the log names (a `.partial` left by a killed
/// recorder, a checkpoint file the log never got to, anything added).
fn stray_files(dir: &Path, in_log: &std::collections::HashSet<u32>, disk: bool) -> Vec<String> {
    let own = [super::META, super::IMAGE, super::EVENTS, super::CONSOLE, super::CHECKPOINTS, if disk { super::DISK } else { super::META }];
    let mut out = Vec::new();
    let Ok(top) = std::fs::read_dir(dir) else { return out };
    for e in top.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !own.contains(&name.as_str()) {
            out.push(name);
        }
    }
    if let Ok(cks) = std::fs::read_dir(dir.join(super::CHECKPOINTS)) {
        for e in cks.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".ckpt").filter(|n| n.len() == 6).and_then(|n| n.parse::<u32>().ok());
            if !id.is_some_and(|id| in_log.contains(&id)) {
                out.push(format!("{}/{name}", super::CHECKPOINTS));
            }
        }
    }
    out.sort();
    out
}
