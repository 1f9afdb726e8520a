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

/// What [`check`] has found so far.
struct Ctx {
    findings: Vec<Finding>,
    manifest: Vec<(String, String)>,
    damaged: bool,
    incomplete: bool,
    checked: Checked,
}

impl Ctx {
    fn push(&mut self, ok: bool, what: String) {
        self.findings.push(Finding { ok, what });
    }

    fn damage(&mut self, what: String) {
        self.damaged = true;
        self.push(false, what);
    }

    fn report(self, digest: Option<String>) -> Report {
        let (intact, incomplete) = if digest.is_some() { (!self.damaged && !self.incomplete, self.incomplete && !self.damaged) } else { (false, false) };
        Report { summary: summary(&self.checked, intact, incomplete), findings: self.findings, intact, incomplete, digest, manifest: self.manifest }
    }
}

/// How a log that is not complete is to be told: truncation or damage.
struct LogCut {
    cut_short: bool,
    /// Why a file is not vouched for: truncation (the log stops before its
    /// binding) or the damaged log.
    why_unbound: &'static str,
}

/// [`verify`], also handing back the bytes it checked (meta.json, the log,
/// console.log, image.elf) for a reader to decode: each read once.
pub fn check(dir: &Path) -> (Report, Option<Loaded>) {
    let mut cx = Ctx { findings: Vec::new(), manifest: Vec::new(), damaged: false, incomplete: false, checked: Checked { files: vec!["meta.json"], ..Checked::default() } };
    let Some((meta, meta_bytes)) = check_meta(dir, &mut cx) else { return (cx.report(None), None) };
    let (image, image_ok) = check_copies(dir, &meta, &mut cx);
    let log = match LogReader::read(&dir.join(super::EVENTS), log::genesis(&meta_bytes)) {
        Ok(l) => l,
        Err(e) => {
            cx.push(false, format!("events.log: {e}"));
            return (cx.report(None), None);
        }
    };
    let cut = check_log(&log, &mut cx);
    check_index(dir, &meta, &log, &log::genesis(&meta_bytes), &cut, &mut cx);
    let in_log = check_checkpoints(dir, &log, &cut, &mut cx);
    let (console, console_vouched) = check_console_file(dir, &log, &cut, &mut cx);
    check_strays(dir, &in_log, meta.disk.is_some(), &cut, &mut cx);
    let mut h = Sha256::new();
    for (name, sha) in &cx.manifest {
        h.update(format!("{name} {sha}\n"));
    }
    let report = cx.report(Some(hex::encode(h.finalize())));
    let loaded = Loaded { meta, log, console, console_vouched, image: image.unwrap_or_default(), image_ok };
    (report, Some(loaded))
}

/// meta.json, read once: its bytes start the log's chain.
fn check_meta(dir: &Path, cx: &mut Ctx) -> Option<(Meta, Vec<u8>)> {
    let meta_path = dir.join(super::META);
    let parsed = std::fs::read(&meta_path)
        .map_err(|source| super::MetaError::Io { path: meta_path.display().to_string(), source })
        .and_then(|b| Meta::parse(&b, &meta_path).map(|m| (m, b)));
    match parsed {
        Ok((m, b)) => {
            cx.push(true, format!("meta.json: {} version {}, clock {}, id {}", m.format, m.version, m.clock, m.id));
            cx.manifest.push(("meta.json".to_string(), hex::encode(Sha256::digest(&b))));
            Some((m, b))
        }
        Err(e) => {
            cx.push(false, format!("meta.json: {e} (damaged or not a recording)"));
            None
        }
    }
}

/// image.elf (small, read whole: readers use these bytes) and disk.img
/// (hashed as a stream here and again while it is copied for use) against
/// meta.json. Returns the image as read and whether it matched.
fn check_copies(dir: &Path, meta: &Meta, cx: &mut Ctx) -> (Option<Vec<u8>>, bool) {
    let image = std::fs::read(dir.join(super::IMAGE)).ok();
    let image_sha = image.as_ref().map(|b| hex::encode(Sha256::digest(b)));
    let mut image_ok = false;
    for (name, want) in [(super::IMAGE, Some(&meta.image)), (super::DISK, meta.disk.as_ref())] {
        let Some(want) = want else { continue };
        cx.checked.files.push(if name == super::IMAGE { "image.elf (SHA-256 in meta.json)" } else { "disk.img (SHA-256 in meta.json)" });
        let have = if name == super::IMAGE { image_sha.clone() } else { file_sha(&dir.join(name)) };
        match &have {
            Some(h) if *h == want.sha256 => {
                image_ok |= name == super::IMAGE;
                cx.push(true, format!("{name}: matches meta.json's SHA-256"))
            }
            Some(_) => cx.damage(format!("{name}: damaged: does not match meta.json's SHA-256 (changed after recording)")),
            None => cx.damage(format!("{name}: missing")),
        }
        cx.manifest.push((name.to_string(), have.unwrap_or_default()));
    }
    (image, image_ok)
}

fn check_log(log: &LogReader, cx: &mut Ctx) -> LogCut {
    match &log.status {
        LogStatus::Complete => cx.push(true, format!("events.log: {} chunks, {} events, hash chain verified, ends with End", log.chunks, log.events.len())),
        LogStatus::Incomplete { reason, damaged: d } => {
            if *d {
                cx.damaged = true;
            } else {
                cx.incomplete = true;
            }
            cx.push(false, format!("events.log: {} chunks ({} events) verify; then {reason}", log.chunks, log.events.len()));
        }
    }
    cx.manifest.push(("events.log chain head".to_string(), log.head.clone()));
    cx.checked.chunks = log.chunks;
    let cut_short = !log.status.is_damaged() && log.status != LogStatus::Complete;
    let why_unbound = if cut_short {
        "the log was cut short before it was bound (truncation, not damage)"
    } else {
        "the log is damaged before its binding"
    };
    LogCut { cut_short, why_unbound }
}

/// events.idx (version 3) against the records derived from the log: the
/// same records in the same order, its own chain intact. An index that
/// stops early is truncation (a killed recorder; seeks then check the
/// whole log); one that runs past a cut-short log holds records for chunks
/// the log lost (not vouched for, not used).
fn check_index(dir: &Path, meta: &Meta, log: &LogReader, genesis: &[u8; 32], cut: &LogCut, cx: &mut Ctx) {
    use super::index::{Index, Stop};
    let path = dir.join(super::INDEX);
    let ix = match Index::read(&path, genesis) {
        Ok(ix) => ix,
        Err(_) if meta.version < 3 => {
            cx.push(true, format!("events.idx: none (format version {}): seeks check the whole log", meta.version));
            return;
        }
        Err(e) => return cx.damage(format!("events.idx: {e} (the seek index of a version-{} recording)", meta.version)),
    };
    cx.checked.files.push("events.idx (SHA-256 chain, matches the log)");
    cx.manifest.push(("events.idx chain head".to_string(), ix.head.clone()));
    let want = &log.index;
    let same = ix.records.iter().zip(want).take_while(|(a, b)| a == b).count();
    let n = ix.records.len();
    if same < n.min(want.len()) {
        return cx.damage(format!("events.idx: damaged: record {same} does not match the event log"));
    }
    if let Some(Stop::Damaged(why)) = &ix.stop {
        return cx.damage(format!("events.idx: damaged: {why}"));
    }
    if n > want.len() {
        if cut.cut_short {
            cx.incomplete = true;
            cx.push(false, format!("events.idx: its last {} records are for chunks past the end of the cut-short log: not vouched for (not used)", n - want.len()));
        } else if !log.status.is_damaged() {
            cx.damage(format!("events.idx: damaged: {} records more than the event log holds", n - want.len()));
        }
        return;
    }
    if let (Some(Stop::Cut(why)), true) = (&ix.stop, n == want.len()) {
        // The log's last chunk is there with all its records: a recorder
        // killed while writing a record would have left fewer.
        return cx.damage(format!("events.idx: damaged: bytes after its last record ({why})"));
    }
    if n < want.len() {
        cx.incomplete = true;
        let why = match &ix.stop {
            Some(Stop::Cut(w)) => format!(" ({w})"),
            _ => String::new(),
        };
        return cx.push(false, format!("events.idx: cut short after {n} of {} records{why} (truncation, not damage): seeks check the whole log", want.len()));
    }
    cx.push(true, format!("events.idx: {n} records, chain verified, match the event log"));
}

/// Every checkpoint the log names, against its binding in the chain, and
/// the coverage claims against the files. Returns the ids the log names.
fn check_checkpoints(dir: &Path, log: &LogReader, cut: &LogCut, cx: &mut Ctx) -> std::collections::HashSet<u32> {
    use super::checkpoint::Expect;
    let seals = super::checkpoint::Seals::from_events(&log.events, Expect::Unbound);
    let mut in_log = std::collections::HashSet::new();
    let mut held = Held::new();
    let mut all_held = true;
    for e in &log.events {
        let Event::Checkpoint { id, exits, .. } = e else { continue };
        in_log.insert(*id);
        match seals.expect(*id) {
            Expect::Dropped => {
                cx.checked.dropped += 1;
                cx.push(true, format!("checkpoint {id}: dropped (thinned); its removal is in the hash chain"));
            }
            Expect::Bound(sha) => match check_bound_checkpoint(dir, log, *id, *exits, sha, cut, cx) {
                Some(runs) => {
                    held.insert(*id, runs);
                }
                None => all_held = false,
            },
            _ => check_unbound_checkpoint(dir, log, *id, *exits, cut, cx),
        }
    }
    // With a bound file not read intact (reported above) the claims cannot
    // all be checked; restores refuse that file anyway.
    let claims = if all_held { seals.claims() } else { Vec::new() };
    match false_claims(&held, &claims) {
        Ok(0) => {}
        Ok(n) => cx.push(true, format!("checkpoints: {n} coverage claims hold (later files hold every page and sector of the file named)")),
        Err(e) => cx.damage(e),
    }
    in_log
}

/// A file's (page runs, sector runs).
type Runs = (Vec<(u64, u64)>, Vec<(u64, u64)>);
/// The kept files read intact: id -> their runs.
type Held = std::collections::BTreeMap<u32, Runs>;

/// Checks each claim (id, by) of `Event::CheckpointCovered` about a file
/// as bound now: restoring any kept checkpoint from `by` on finds every
/// page and sector of `id` in kept files after it. For each file, the
/// newest files are scanned first, remembering the nearest later holder of
/// each page; a file is covered from the farthest of those. Claims about
/// files not read intact are left to the damage already reported.
fn false_claims(held: &Held, claims: &[(u32, u32)]) -> Result<usize, String> {
    use std::collections::HashMap;
    let (mut next_page, mut next_sector) = (HashMap::<u64, u32>::new(), HashMap::<u64, u32>::new());
    // id -> the first checkpoint from which all its units are in later files.
    let mut from: HashMap<u32, Option<u32>> = HashMap::new();
    for (&id, (pages, sectors)) in held.iter().rev() {
        let mut need = Some(id);
        for (map, runs) in [(&mut next_page, pages), (&mut next_sector, sectors)] {
            for &(first, count) in runs {
                for u in first..first.saturating_add(count) {
                    need = need.zip(map.get(&u).copied()).map(|(a, b)| a.max(b));
                    map.insert(u, id);
                }
            }
        }
        from.insert(id, need);
    }
    let mut n = 0;
    for &(id, by) in claims {
        let Some(need) = from.get(&id) else { continue };
        // The first kept checkpoint a claim lets skip `id`.
        let Some((&t, _)) = held.range(by.max(id + 1)..).next() else { continue };
        match need {
            Some(need) if *need <= t => n += 1,
            _ => return Err(format!("checkpoint {id}: the chain says later files hold all of it by checkpoint {by}, but they do not (damaged recording: a restore would miss pages)")),
        }
    }
    Ok(n)
}

/// Returns the file's page and sector runs when it is intact.
fn check_bound_checkpoint(dir: &Path, log: &LogReader, id: u32, exits: u64, sha: String, cut: &LogCut, cx: &mut Ctx) -> Option<Runs> {
    let p = checkpoint_path(dir, id);
    cx.checked.checkpoints += 1;
    let mut runs = None;
    match Checkpoint::read_expect(&p, &super::checkpoint::Expect::Bound(sha.clone())) {
        Ok((c, _)) if c.header.id == id && c.header.exits == exits => {
            cx.push(true, format!("checkpoint {id} (exit {exits}): SHA-256 matches the hash chain"));
            runs = Some((c.header.pages, c.header.sectors));
        }
        Ok(_) => cx.damage(format!("checkpoint {id}: does not match its log entry (damaged)")),
        // The retention policy (record::retain) logs a merged checkpoint's
        // new SHA-256 before it replaces the file: a recorder killed in
        // between leaves the version the chain bound before (still right,
        // with the dropped one's file beside it).
        Err(_) if cut.cut_short && earlier_binding(&log.events, id, &sha).any(|s| Checkpoint::read_bound(&p, s).is_ok()) => {
            cx.incomplete = true;
            cx.push(false, format!("checkpoint {id}: the recorder stopped while thinning rewrote it: the file is the version the chain bound before (truncation, not damage)"));
        }
        Err(e) => cx.damage(format!("checkpoint {id}: {e}")),
    }
    cx.manifest.push((format!("checkpoints/{id:06}.ckpt"), sha));
    runs
}

/// Taken, but the log stops before its file was bound: the recorder was
/// killed while writing it.
fn check_unbound_checkpoint(dir: &Path, log: &LogReader, id: u32, exits: u64, cut: &LogCut, cx: &mut Ctx) {
    let p = checkpoint_path(dir, id);
    let name = format!("checkpoints/{id:06}.ckpt");
    if log.status == LogStatus::Complete {
        return cx.damage(format!("checkpoint {id}: not bound into the log's hash chain (no SHA-256 logged for it)"));
    }
    if !p.exists() {
        return cx.push(false, format!("checkpoint {id}: no file (the recorder stopped before writing it); not used"));
    }
    cx.checked.unvouched.push(name.clone());
    let why_unbound = cut.why_unbound;
    match Checkpoint::read(&p) {
        Ok(c) if c.header.id == id && c.header.exits == exits => cx.push(false, format!("{name}: not vouched for: {why_unbound} (CRC-32 ok)")),
        Ok(_) => cx.damage(format!("checkpoint {id}: does not match its log entry (damaged)")),
        Err(e) => cx.push(false, format!("{name}: not vouched for: {why_unbound}; and {e}")),
    }
    if cut.cut_short {
        cx.incomplete = true;
    }
}

/// console.log against the chain; returns it as read and how much of it
/// the chain vouches for.
fn check_console_file(dir: &Path, log: &LogReader, cut: &LogCut, cx: &mut Ctx) -> (Vec<u8>, u64) {
    let console = std::fs::read(dir.join(super::CONSOLE)).unwrap_or_default();
    let (vouched, ok) = check_console(&console, log);
    let console_vouched = match vouched {
        Ok(n) => {
            if let Some(ok) = ok {
                cx.push(true, format!("console.log: {ok}"));
            }
            cx.checked.console = if log.status == LogStatus::Complete { "End digest".into() } else { format!("{n} bytes bound in the chain") };
            if (console.len() as u64) > n {
                let tail = console.len() as u64 - n;
                cx.checked.unvouched.push(format!("console.log bytes {n}..{}", console.len()));
                cx.push(false, format!("console.log: its last {tail} bytes (from byte {n}) are not vouched for: {}", cut.why_unbound));
                if cut.cut_short {
                    cx.incomplete = true;
                }
            }
            n
        }
        Err(e) => {
            cx.checked.console = "DAMAGED".into();
            cx.damage(e);
            0
        }
    };
    cx.manifest.push(("console.log".to_string(), hex::encode(Sha256::digest(&console))));
    (console, console_vouched)
}

/// Every other file in the directory: nothing the recording does not vouch for.
fn check_strays(dir: &Path, in_log: &std::collections::HashSet<u32>, disk: bool, cut: &LogCut, cx: &mut Ctx) {
    for name in stray_files(dir, in_log, disk) {
        cx.checked.unvouched.push(name.clone());
        if cut.cut_short {
            cx.incomplete = true;
            cx.push(false, format!("{name}: not vouched for: {} (not used)", cut.why_unbound));
        } else {
            cx.damage(format!("{name}: not part of the recording (no event in the log's hash chain vouches for it); not used"));
        }
    }
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
    let own = [super::META, super::IMAGE, super::EVENTS, super::INDEX, super::CONSOLE, super::CHECKPOINTS, if disk { super::DISK } else { super::META }];
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
