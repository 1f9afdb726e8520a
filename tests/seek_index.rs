//! Seeks check what they read, not the whole recording (issue 17): a
//! `replay --to` reads the seek index (`events.idx`) and the log from its
//! checkpoint's segment to past the target. Damage there is refused as
//! before; damage after the window is not seen by the seek but is by
//! `verify` and by a replay to the end; a recording without a usable index
//! (format version 2, an index cut short) is checked whole.

mod common;
use common::*;

use std::path::Path;

use revirt::replay::Recording;
use revirt::trace::{self, verify::verify};

/// An idle guest's 2 s with a checkpoint every 100 ms: ~20 checkpoints,
/// several log chunks between each.
fn sample(dir: &Path) {
    record_demo_ok(dir, "workload=idle iters=2 hz=100 pages=4", &["--checkpoint-every", "100ms", "--keep-checkpoints", "0"], b"");
}

use trace::log::chunk_spans;

/// Runs `replay -q DIR --to T [extra]`: (exit code, stderr).
fn seek(dir: &Path, t: u64, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec!["replay", "-q", dir.to_str().unwrap(), "--to"];
    let ts = t.to_string();
    args.push(&ts);
    args.extend_from_slice(extra);
    let o = run_with_input(&args, b"");
    (o.status.code(), stderr(&o))
}

/// The chunks a seek read: "events.log chunks A..B of N".
fn window(err: &str) -> (usize, usize, usize) {
    let s = err.split("events.log chunks ").nth(1).unwrap_or_else(|| panic!("no seek window in: {err}"));
    let nums: Vec<usize> = s.split(|c: char| !c.is_ascii_digit()).filter(|x| !x.is_empty()).take(3).map(|x| x.parse().unwrap()).collect();
    (nums[0], nums[1], nums[2])
}

fn reached(err: &str) -> String {
    err.lines().find(|l| l.contains("reached")).unwrap_or_else(|| panic!("not reached: {err}")).to_string()
}

fn flip_chunk(log_path: &Path, seq: usize) -> Vec<u8> {
    let orig = std::fs::read(log_path).unwrap();
    let (o, l) = chunk_spans(&orig)[seq];
    let mut b = orig.clone();
    b[o + l / 2] ^= 0x08;
    std::fs::write(log_path, &b).unwrap();
    orig
}

#[test]
fn a_seek_reads_a_window_and_damage_after_it_is_found_by_verify_and_a_full_replay() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    sample(&dir);
    assert!(verify(&dir).intact);
    let exits = Recording::open(&dir).unwrap().last_exits();
    // The seek lands where the full check's replay lands, reading a few chunks of many.
    for t in [exits / 10, exits / 3, exits - 20] {
        let (code, err) = seek(&dir, t, &[]);
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("integrity (seek)") && err.contains("events.idx"), "{err}");
        let (a, b, n) = window(&err);
        assert!(b - a < n / 2, "a seek to {t} read chunks {a}..{b} of {n}");
        let (fcode, ferr) = seek(&dir, t, &["--force"]);
        assert_eq!(fcode, Some(0), "{ferr}");
        assert!(ferr.contains("integrity: checked"), "--force checks everything: {ferr}");
        assert_eq!(reached(&err), reached(&ferr), "seek to {t}");
    }
    // Damage a chunk well after an early seek's window.
    let t = exits / 10;
    let (_, b, n) = window(&seek(&dir, t, &[]).1);
    let bad = (b + n) / 2;
    assert!(bad > b && bad < n);
    let log_path = dir.join(trace::EVENTS);
    let orig = flip_chunk(&log_path, bad);
    let (code, err) = seek(&dir, t, &[]);
    assert_eq!(code, Some(0), "the seek does not read chunk {bad}: {err}");
    assert!(err.contains("integrity (seek)"), "{err}");
    let o = run_with_input(&["verify", dir.to_str().unwrap()], b"");
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let fail = stdout(&o).lines().find(|l| l.starts_with("FAIL") && l.contains("events.log")).map(str::to_string);
    assert!(fail.as_deref().is_some_and(|l| l.contains(&format!("chunk {bad} ")) && l.contains("fails its checksum")), "{}", stdout(&o));
    let o = run_with_input(&["replay", "-q", dir.to_str().unwrap()], b"");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("is damaged") && stderr(&o).contains("fails its checksum"), "{}", stderr(&o));
    std::fs::write(&log_path, &orig).unwrap();
    assert!(verify(&dir).intact);
}

#[test]
fn a_seek_refuses_damage_in_what_it_reads() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    sample(&dir);
    let exits = Recording::open(&dir).unwrap().last_exits();
    let t = exits / 2;
    let (code, err) = seek(&dir, t, &[]);
    assert_eq!(code, Some(0), "{err}");
    let (a, b, _) = window(&err);
    let refused = |what: &str| {
        let (code, err) = seek(&dir, t, &[]);
        assert_eq!(code, Some(2), "{what}: {err}");
        assert!(err.contains("is damaged") && err.contains("--force") && !err.contains("integrity (seek)"), "{what}: {err}");
        err
    };
    // A chunk inside the window: the seek's check fails, the full check names it.
    let log_path = dir.join(trace::EVENTS);
    let orig = flip_chunk(&log_path, (a + b) / 2);
    assert!(refused("a chunk in the window").contains("fails its checksum"));
    std::fs::write(&log_path, &orig).unwrap();
    // The index: one byte of a record.
    let ix_path = dir.join(trace::INDEX);
    let ix = std::fs::read(&ix_path).unwrap();
    let mut b2 = ix.clone();
    b2[8 + trace::index::RECORD * 3 + 20] ^= 0x01;
    std::fs::write(&ix_path, &b2).unwrap();
    assert!(refused("an index record").contains("events.idx: damaged"));
    // A checkpoint the seek restores (checkpoint 0), resealed with its CRC.
    std::fs::write(&ix_path, &ix).unwrap();
    let ck0 = trace::checkpoint_path(&dir, 0);
    let ck = std::fs::read(&ck0).unwrap();
    let c = trace::Checkpoint::parse(&ck, None).unwrap();
    let mut data = c.data.clone();
    data[100] ^= 0x01;
    std::fs::write(&ck0, trace::checkpoint::encode(&serde_json::to_vec(&c.header).unwrap(), &data).unwrap()).unwrap();
    let (code, err) = seek(&dir, t, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("checkpoint") && err.contains("SHA-256"), "{err}");
    std::fs::write(&ck0, &ck).unwrap();
    // The index cut at a record boundary (a killed recorder): truncation;
    // the seek checks the whole recording instead.
    std::fs::write(&ix_path, &ix[..8 + trace::index::RECORD * 5]).unwrap();
    let (code, err) = seek(&dir, t, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("integrity: checked") && !err.contains("integrity (seek)"), "{err}");
    let v = verify(&dir);
    assert!(v.incomplete && v.problems().iter().any(|p| p.contains("events.idx: cut short")), "{:?}", v.problems());
    std::fs::write(&ix_path, &ix).unwrap();
    assert!(verify(&dir).intact);
}

/// Format version 2 (no index) is still read: every reader, seeks
/// included, checks the whole log.
#[test]
fn version_2_recordings_without_an_index_are_checked_whole() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    sample(&dir);
    let rec = Recording::open(&dir).unwrap();
    let exits = rec.last_exits();
    let meta_path = dir.join(trace::META);
    let meta = String::from_utf8(std::fs::read(&meta_path).unwrap()).unwrap();
    let now = format!("\"version\": {}", trace::meta::VERSION);
    assert!(meta.contains(&now), "{meta}");
    let meta = meta.replace(&now, "\"version\": 2");
    std::fs::write(&meta_path, &meta).unwrap();
    // The log re-sealed from the new meta.json, as a version-2 revirt wrote it.
    let w = trace::LogWriter::create(&dir.join(trace::EVENTS), trace::log::genesis(meta.as_bytes())).unwrap();
    for e in &rec.events {
        w.push(e.clone());
    }
    w.finish().unwrap();
    std::fs::remove_file(dir.join(trace::INDEX)).unwrap();
    let v = verify(&dir);
    assert!(v.intact, "{:?}", v.problems());
    assert!(v.findings.iter().any(|f| f.ok && f.what.contains("events.idx: none (format version 2)")), "{:?}", v.findings);
    let (code, err) = seek(&dir, exits / 2, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("integrity: checked") && !err.contains("integrity (seek)"), "{err}");
    let o = run_with_input(&["replay", "-q", dir.to_str().unwrap()], b"");
    assert!(o.status.success() && stderr(&o).contains("replay matches the recording"), "{}", stderr(&o));
    // Version 1 is refused by name.
    std::fs::write(&meta_path, meta.replace("\"version\": 2", "\"version\": 1")).unwrap();
    let (code, err) = seek(&dir, exits / 2, &[]);
    assert_ne!(code, Some(0));
    assert!(err.contains("format version 1 is not supported"), "{err}");
}

/// Memory and disk at checkpoint `to` as `rebuild` hands them on with `seals`.
type Restored = (std::collections::BTreeMap<u64, Vec<u8>>, std::collections::BTreeMap<u64, Vec<u8>>);
fn restore(dir: &Path, seals: &trace::checkpoint::Seals, to: u32) -> Result<Restored, String> {
    let (mut pages, mut sectors) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
    let page = |p, b: &[u8]| {
        pages.insert(p, b.to_vec());
        Ok(())
    };
    let sector = |s, b: &[u8]| {
        sectors.insert(s, b.to_vec());
        Ok(())
    };
    trace::checkpoint::rebuild(dir, seals, 0, to, page, sector).map_err(|e| e.to_string())?;
    Ok((pages, sectors))
}

/// Format version 4: the recorder logs which kept checkpoint files later
/// ones hold entirely (`CheckpointCovered`), so a restore opens only the
/// files it needs, however long the recording: it restores the same memory
/// without them, a seek works with such a file gone (it never opens it),
/// `verify` still checks every file and every claim, and a false claim
/// sealed into the chain is found.
#[test]
fn restores_skip_files_later_ones_hold_and_verify_checks_the_claims() {
    use trace::checkpoint::{Covers, Expect, Seals};
    use trace::Event;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    sample(&dir);
    let rec = Recording::open(&dir).unwrap();
    let seals = Seals::from_events(&rec.events, Expect::Unbound);
    let claims = seals.claims();
    let last = rec.checkpoints.last().unwrap().0;
    assert!(claims.len() >= 3, "an idle guest rewriting its working set covers old files: {claims:?}");
    let bound: std::collections::HashMap<u32, String> = rec
        .events
        .iter()
        .filter_map(|e| match e {
            Event::CheckpointFile { id, sha256, .. } => Some((*id, sha256.clone())),
            _ => None,
        })
        .collect();
    let unclaimed = Seals::from_bindings(bound.clone(), Covers::new(), Expect::Unbound);
    let full = restore(&dir, &unclaimed, last).unwrap();
    assert!(!full.0.is_empty());
    assert_eq!(restore(&dir, &seals, last).unwrap(), full, "skipping covered files restores the same memory");
    // A claimed file gone: restores from its `by` on never open it.
    let &(k, by) = claims.iter().find(|c| c.1 < last).expect("a claim older than the last checkpoint");
    let path = trace::checkpoint_path(&dir, k);
    let kept = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(restore(&dir, &seals, last).unwrap(), full);
    assert!(restore(&dir, &unclaimed, last).is_err(), "without the claims the restore needs checkpoint {k}");
    assert!(restore(&dir, &seals, by.max(k + 1)).is_ok());
    let to = rec.checkpoints.iter().find(|c| c.0 == last).unwrap().1 + 5;
    let (code, err) = seek(&dir, to, &[]);
    assert_eq!(code, Some(0), "the seek does not open checkpoint {k}: {err}");
    assert!(err.contains("integrity (seek)") && err.contains(&format!("starting from checkpoint {last}")), "{err}");
    let v = verify(&dir);
    assert!(!v.intact && v.problems().iter().any(|p| p.contains(&format!("checkpoint {k}:"))), "verify checks every file: {:?}", v.problems());
    std::fs::write(&path, &kept).unwrap();
    let v = verify(&dir);
    assert!(v.intact && v.findings.iter().any(|f| f.ok && f.what.contains(&format!("{} coverage claims hold", claims.len()))), "{:?}", v.findings);
    // A false claim, sealed into the chain as a recorder would log it.
    let (bad, _) = bound.iter().filter(|(id, s)| !s.is_empty() && **id < last && !claims.iter().any(|c| c.0 == **id)).max().expect("a kept file later ones do not hold");
    let mut events = rec.events.clone();
    let end = events.pop().unwrap();
    events.push(Event::CheckpointCovered { id: *bad, by: last, exits: end.exits(), sha256: bound[bad].clone() });
    events.push(end);
    let meta = std::fs::read(dir.join(trace::META)).unwrap();
    let w = trace::LogWriter::create(&dir.join(trace::EVENTS), trace::log::genesis(&meta)).unwrap();
    for e in events {
        w.push(e);
    }
    w.finish().unwrap();
    let v = verify(&dir);
    let why = format!("checkpoint {bad}: the chain says later files hold all of it by checkpoint {last}, but they do not");
    assert!(!v.intact && v.problems().iter().any(|p| p.contains(&why)), "{:?}", v.problems());
}
