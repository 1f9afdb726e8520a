//! Structure-aware fuzzing of every decoder behind the checksums: the
//! event log, meta.json, checkpoints and snapshots are mutated *as
//! structures* (event fields, JSON leaves, chunk header fields, page and
//! sector runs, lengths) and then re-sealed — log chunks re-hashed from the
//! (possibly new) genesis, checkpoint CRCs recomputed and their SHA-256
//! re-bound in the log, snapshot CRCs recomputed — so the checks pass and
//! the decoders, `verify`, `Recording::open` and replay itself meet hostile
//! but well-sealed input. Whatever happens must be an answer or a clear
//! error: no panic, no abort, no hang (a watchdog aborts the run with the
//! case if one takes over 60 s).
//!
//! `REVIRT_FUZZ_CASES` (default 10000) sets the number of cases; one in 5
//! goes through the files (verify, Recording::open), the rest straight to
//! the decoders; `REVIRT_FUZZ_REPLAY_EVERY` (default 2): one in that many
//! file cases that open is also replayed. docs/reliability.md has figures.

mod common;
use common::*;

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

use revirt::vmm::counter::Skid;
use revirt::replay::{Recording, Sink, Timeline};
use revirt::trace::{self, checkpoint, log, verify::verify, Event};

fn sample(dir: &Path) {
    let mut input = Vec::new();
    for i in 0..12 {
        input.extend_from_slice(format!("line number {i}\n").as_bytes());
    }
    input.extend_from_slice(b"quit\n");
    record_demo_ok(dir, "workload=echo", &["--mem", "4M", "--checkpoint-every", "5ms"], &input);
}

/// A small random generator driven by the proptest-chosen seed.
struct Rng(Skid);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        if n <= 1 {
            0
        } else {
            self.0.next(n - 1)
        }
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    /// Numbers a decoder must survive: small, edge and huge.
    fn number(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => u64::MAX,
            2 => u32::MAX as u64,
            3 => 1 << self.below(64),
            4 => self.below(16),
            5 => i64::MAX as u64,
            _ => self.0.next(u64::MAX - 1),
        }
    }
}

/// Every leaf of a JSON value, as JSON pointers.
fn leaves(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                leaves(x, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
            out.push(at);
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                leaves(x, format!("{at}/{i}"), out);
            }
            out.push(at);
        }
        _ => out.push(at),
    }
}

/// Replaces one node of `v` with something hostile: numbers at the edges,
/// wrong types, long strings, host paths, big arrays, or removes it.
fn mutate_json(v: &mut Value, rng: &mut Rng) -> String {
    let mut all = Vec::new();
    leaves(v, String::new(), &mut all);
    let path = all[rng.below(all.len() as u64) as usize].clone();
    let new = match rng.below(10) {
        0..=2 => Value::from(rng.number()),
        3 => Value::from(-(rng.below(1000) as i64) - 1),
        4 => Value::Null,
        5 => Value::from("/etc/passwd"),
        6 => Value::from("x".repeat(rng.below(5000) as usize)),
        7 => Value::Array((0..rng.below(3000)).map(|i| Value::from(i * 4096)).collect()),
        8 => Value::from(1e300),
        _ => {
            // Remove the node from its parent.
            if let Some((parent, key)) = path.rsplit_once('/') {
                if let Some(p) = v.pointer_mut(parent) {
                    match p {
                        Value::Object(m) => {
                            m.remove(&key.replace("~1", "/").replace("~0", "~"));
                        }
                        Value::Array(a) if !a.is_empty() => {
                            a.remove(key.parse::<usize>().unwrap_or(0).min(a.len() - 1));
                        }
                        _ => {}
                    }
                }
            }
            return format!("remove {path}");
        }
    };
    let desc = format!("{path} = {}", short(&new));
    if let Some(slot) = v.pointer_mut(&path) {
        *slot = new;
    }
    desc
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}... ({} chars)", &s[..40], s.len())
    } else {
        s
    }
}

/// An event with one field changed (through its JSON form), or a random one.
fn mutate_event(e: &Event, rng: &mut Rng) -> Event {
    for _ in 0..8 {
        let mut v = serde_json::to_value(e).unwrap();
        mutate_json(&mut v, rng);
        if let Ok(x) = serde_json::from_value::<Event>(v) {
            return x;
        }
    }
    let at = revirt::clock::ExecPoint { exits: rng.number(), branches: rng.number(), rip: rng.number() };
    match rng.below(7) {
        0 => Event::Clock { exits: rng.number(), value: rng.number() },
        1 => Event::Timer { at, fp: rng.number(), now_ns: rng.number() },
        2 => Event::Serial { at, fp: rng.number(), bytes: vec![b'A'; rng.below(100_000) as usize] },
        3 => Event::Checkpoint { id: rng.number() as u32, exits: rng.number(), fp: rng.number() },
        4 => Event::CheckpointFile { id: rng.number() as u32, exits: rng.number(), sha256: "00".repeat(32) },
        5 => Event::ConsoleFile { exits: rng.number(), len: rng.number(), sha256: "00".repeat(32) },
        _ => Event::Mark { exits: rng.number() },
    }
}

/// Writes `events` as a sealed log from `meta`'s genesis, in chunks of
/// random size; some chunk headers may lie (`lie`), always re-sealed.
fn seal_log(meta: &[u8], events: &[Event], rng: &mut Rng, lie: bool) -> Vec<u8> {
    let mut out = log::FILE_MAGIC.to_vec();
    let mut prev = log::genesis(meta);
    let (mut at, mut seq) = (0usize, 0u32);
    let per = 1 + rng.below(64) as usize;
    while at < events.len() {
        let n = per.min(events.len() - at);
        let mut raw = Vec::new();
        for e in &events[at..at + n] {
            postcard::to_io(e, &mut raw).unwrap();
        }
        let (mut fseq, mut first, mut fn_, mut raw_len) = (seq, at as u64, n as u32, raw.len() as u32);
        if lie && rng.chance(3) {
            match rng.below(5) {
                0 => fseq = rng.number() as u32,
                1 => first = rng.number(),
                2 => fn_ = rng.number() as u32,
                3 => raw_len = rng.number() as u32,
                _ => raw = (0..rng.below(2000)).map(|_| rng.below(256) as u8).collect(),
            }
        }
        let comp = if lie && rng.chance(20) {
            (0..rng.below(300)).map(|_| rng.below(256) as u8).collect()
        } else {
            zstd::bulk::compress(&raw, 1).unwrap()
        };
        let (b, h) = log::encode_chunk(&prev, fseq, first, fn_, raw_len, &comp);
        out.extend_from_slice(&b);
        prev = h;
        at += n;
        seq += 1;
    }
    out
}

/// The recording's original files, kept to restore after each case.
struct Fixture {
    dir: PathBuf,
    meta: Vec<u8>,
    events: Vec<Event>,
    ckpts: Vec<(u32, PathBuf, Vec<u8>)>,
    snapshot: (Value, Vec<u8>),
    originals: Vec<(PathBuf, Vec<u8>)>,
    limit: u64,
}

#[derive(Default, Debug)]
struct Stats {
    cases: [u64; 4],
    in_memory: u64,
    /// This case wrote files (the originals must be put back).
    written: bool,
    log_refused: u64,
    meta_refused: u64,
    ckpt_refused: u64,
    verify_flagged: u64,
    opened: u64,
    open_rejected: u64,
    replays: u64,
    distinct_replays: HashSet<String>,
    replay_errors: u64,
    replay_ran: u64,
    snap_decoded: u64,
    snap_restored: u64,
    snap_rejected: u64,
}

/// One case in this many is written out and read back through the files.
const FULL_EVERY: u64 = 5;

static CASE_STARTED: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn bind_checkpoint(events: &mut [Event], id: u32, sha: &str) {
    for e in events.iter_mut() {
        if let Event::CheckpointFile { id: i, sha256, .. } = e {
            if *i == id {
                *sha256 = sha.to_string();
            }
        }
    }
}

/// One case: returns a description of what was done (for failures).
fn case(fx: &Fixture, st: &mut Stats, target: u8, seed: u64, replay_every: u64) -> String {
    let mut rng = Rng(Skid::new(seed | 1));
    let dir = &fx.dir;
    let mut what;
    let mut replay_from: u32 = 0;
    // The files this case changes (written only for a full case).
    let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let mut meta_now = fx.meta.clone();
    let mut bound: Option<String> = None;
    match target % 10 {
        // The event log: events changed, removed, duplicated, swapped,
        // inserted or cut; chunk headers that lie. Re-sealed.
        0..=3 => {
            st.cases[0] += 1;
            let mut ev = fx.events.clone();
            what = String::from("log:");
            for _ in 0..=rng.below(3) {
                let i = rng.below(ev.len() as u64) as usize;
                match rng.below(7) {
                    0 | 1 => {
                        ev[i] = mutate_event(&ev[i], &mut rng);
                        what += &format!(" change #{i}");
                    }
                    2 => {
                        ev.remove(i);
                        what += &format!(" remove #{i}");
                    }
                    3 => {
                        let e = ev[i].clone();
                        ev.insert(rng.below(ev.len() as u64) as usize, e);
                        what += &format!(" duplicate #{i}");
                    }
                    4 => {
                        let j = rng.below(ev.len() as u64) as usize;
                        ev.swap(i, j);
                        what += &format!(" swap #{i} #{j}");
                    }
                    5 => {
                        let e = mutate_event(&ev[i], &mut rng);
                        ev.insert(i, e);
                        what += &format!(" insert at #{i}");
                    }
                    _ => {
                        ev.truncate(i);
                        what += &format!(" cut at #{i}");
                    }
                }
                if ev.is_empty() {
                    break;
                }
            }
            let lie = rng.chance(2);
            if lie {
                what += " (lying chunk headers)";
            }
            files.push((dir.join(trace::EVENTS), seal_log(&fx.meta, &ev, &mut rng, lie)));
        }
        // meta.json: any leaf changed; the log re-sealed from its new genesis.
        4 | 5 => {
            st.cases[1] += 1;
            let mut v: Value = serde_json::from_slice(&fx.meta).unwrap();
            what = format!("meta: {}", mutate_json(&mut v, &mut rng));
            let meta = serde_json::to_vec_pretty(&v).unwrap();
            files.push((dir.join(trace::META), meta.clone()));
            files.push((dir.join(trace::EVENTS), seal_log(&meta, &fx.events, &mut rng, false)));
            meta_now = meta;
        }
        // A checkpoint: its header (any leaf: page and sector runs, memory
        // size, registers, counts) or its data changed, CRC recomputed,
        // SHA-256 re-bound in the log, the log re-sealed.
        6..=8 => {
            st.cases[2] += 1;
            let (id, path, bytes) = &fx.ckpts[rng.below(fx.ckpts.len() as u64) as usize];
            replay_from = *id;
            let ck = checkpoint::Checkpoint::parse(bytes, None).unwrap();
            let mut header = serde_json::to_value(&ck.header).unwrap();
            let mut data = ck.data.clone();
            what = format!("checkpoint {id}:");
            for _ in 0..=rng.below(2) {
                match rng.below(4) {
                    0 if !data.is_empty() => {
                        let at = rng.below(data.len() as u64) as usize;
                        data[at] ^= 1 + rng.below(255) as u8;
                        what += &format!(" data byte {at}");
                    }
                    1 => {
                        data.truncate(rng.below(data.len() as u64 + 1) as usize);
                        what += " data cut";
                    }
                    _ => what += &format!(" {}", mutate_json(&mut header, &mut rng)),
                }
            }
            let file = checkpoint::encode(&serde_json::to_vec(&header).unwrap(), &data).unwrap();
            let sha = trace::sha256_hex(&file);
            let mut ev = fx.events.clone();
            bind_checkpoint(&mut ev, *id, &sha);
            files.push((path.clone(), file));
            files.push((dir.join(trace::EVENTS), seal_log(&fx.meta, &ev, &mut rng, false)));
            bound = Some(sha);
        }
        // A snapshot: state leaf or memory changed, CRC recomputed; decoded,
        // and now and then restored into a real VM.
        _ => {
            st.cases[3] += 1;
            let mut state = fx.snapshot.0.clone();
            let mut mem = fx.snapshot.1.clone();
            what = String::from("snapshot:");
            match rng.below(3) {
                0 => {
                    mem.truncate(rng.below(mem.len() as u64 + 1) as usize);
                    what += " memory cut";
                }
                _ => what += &format!(" {}", mutate_json(&mut state, &mut rng)),
            }
            let file = revirt::trace::snapshot::encode(&serde_json::to_vec(&state).unwrap(), &mem).unwrap();
            match revirt::trace::snapshot::parse(&file, "snap") {
                Ok(s) => {
                    st.snap_decoded += 1;
                    if rng.chance(replay_every / 2 + 1) {
                        match revirt::vmm::Machine::restore(&s.state, &s.memory) {
                            Ok(_) => st.snap_restored += 1,
                            Err(e) => assert!(!e.to_string().is_empty()),
                        }
                    }
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    st.snap_rejected += 1;
                }
            }
            return what;
        }
    }
    // Most cases go straight to the decoders, in memory; one in
    // `full_every` is written out for verify, Recording::open and (one in
    // `replay_every` of those) a replay.
    if !rng.chance(FULL_EVERY) {
        st.in_memory += 1;
        for (p, b) in &files {
            if p.ends_with(trace::EVENTS) {
                let r = trace::LogReader::parse(&b[8..], log::genesis(&meta_now));
                if let trace::LogStatus::Incomplete { reason, .. } = &r.status {
                    assert!(!reason.is_empty());
                    st.log_refused += 1;
                }
            } else if p.ends_with(trace::META) {
                if serde_json::from_slice::<trace::Meta>(b).is_err() {
                    st.meta_refused += 1;
                }
            } else {
                match checkpoint::Checkpoint::parse(b, bound.as_deref()) {
                    Ok(_) => {}
                    Err(e) => {
                        assert!(!e.is_empty());
                        st.ckpt_refused += 1;
                    }
                }
            }
        }
        return what;
    }
    st.written = true;
    for (p, b) in &files {
        std::fs::write(p, b).unwrap();
    }
    // Readers: verify, open, and now and then a replay.
    let v = verify(dir);
    if !v.intact {
        st.verify_flagged += 1;
    }
    for f in &v.findings {
        assert!(!f.what.is_empty());
    }
    match Recording::open(dir) {
        Err(e) => {
            assert!(!e.to_string().is_empty(), "{what}: rejected without a message");
            st.open_rejected += 1;
        }
        Ok(rec) => {
            st.opened += 1;
            if rng.chance(replay_every) {
                let mut key = String::new();
                for f in [trace::META, trace::EVENTS, trace::CONSOLE] {
                    key += &std::fs::read(dir.join(f)).map(|b| trace::sha256_hex(&b)).unwrap_or_default();
                }
                for (_, p, _) in &fx.ckpts {
                    key += &std::fs::read(p).map(|b| trace::sha256_hex(&b)).unwrap_or_default();
                }
                key += &replay_from.to_string();
                st.replays += 1;
                st.distinct_replays.insert(key);
                let rec = Arc::new(rec);
                let from = if rec.checkpoints.iter().any(|c| c.0 == replay_from) { replay_from } else { 0 };
                match Timeline::at_checkpoint(rec, from, Sink::Buffer(Vec::new())) {
                    Err(e) => {
                        assert!(!e.to_string().is_empty());
                        st.replay_errors += 1;
                    }
                    Ok(mut t) => match t.run(Some(fx.limit)) {
                        Ok(_) => st.replay_ran += 1,
                        Err(e) => {
                            assert!(!e.to_string().is_empty());
                            st.replay_errors += 1;
                        }
                    },
                }
            }
        }
    }
    what
}

#[test]
fn resealed_mutations_of_logs_meta_checkpoints_and_snapshots_never_panic_abort_or_hang() {
    let cases: u32 = std::env::var("REVIRT_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let replay_every: u64 = std::env::var("REVIRT_FUZZ_REPLAY_EVERY").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    sample(&dir);
    assert!(verify(&dir).intact);
    let meta = std::fs::read(dir.join(trace::META)).unwrap();
    let lr = trace::LogReader::read(&dir.join(trace::EVENTS), log::genesis(&meta)).unwrap();
    assert_eq!(lr.status, trace::LogStatus::Complete);
    let mut ckpts = Vec::new();
    for e in &lr.events {
        if let Event::Checkpoint { id, .. } = e {
            let p = trace::checkpoint_path(&dir, *id);
            ckpts.push((*id, p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    assert!(ckpts.len() >= 3, "several checkpoints: {}", ckpts.len());
    // A snapshot of the machine at checkpoint 0 (all of memory: checkpoint 0
    // holds the non-zero pages, laid out here over zeros).
    let ck0 = checkpoint::Checkpoint::parse(&ckpts[0].2, None).unwrap();
    let mut memory = vec![0u8; ck0.header.machine.config.mem_size as usize];
    checkpoint::rebuild(
        &dir,
        &checkpoint::Seals::crc_only(),
        0,
        0,
        |frame, bytes| {
            memory[(frame * checkpoint::PAGE) as usize..][..bytes.len()].copy_from_slice(bytes);
            Ok(())
        },
        |_, _| Ok(()),
    )
    .unwrap();
    let snapshot = revirt::trace::snapshot::encode(&serde_json::to_vec(&ck0.header.machine).unwrap(), &memory).unwrap();
    let snap = revirt::trace::snapshot::parse(&snapshot, "snap").unwrap();
    let snapshot = (serde_json::to_value(&snap.state).unwrap(), snap.memory);
    let mut originals = Vec::new();
    for f in [trace::META, trace::EVENTS] {
        originals.push((dir.join(f), std::fs::read(dir.join(f)).unwrap()));
    }
    for (_, p, b) in &ckpts {
        originals.push((p.clone(), b.clone()));
    }
    let limit = lr.events.iter().map(Event::exits).max().unwrap_or(0) + 10_000;
    let fx = Fixture { dir: dir.clone(), meta, events: lr.events, ckpts, snapshot, originals, limit };

    // Watchdog: a case that runs over 60 s is a hang.
    let last_what = Arc::new(std::sync::Mutex::new(String::new()));
    {
        let last_what = last_what.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            let s = CASE_STARTED.load(Ordering::SeqCst);
            if s != 0 && now_ms().saturating_sub(s) > 60_000 {
                eprintln!("HANG: a fuzz case ran over 60 s (seed/target in: {})", last_what.lock().unwrap());
                std::process::abort();
            }
        });
    }

    let stats = RefCell::new(Stats::default());
    let t = Instant::now();
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let result = runner.run(&(any::<u8>(), any::<u64>()), |(target, seed)| {
        *last_what.lock().unwrap() = format!("target {target} seed {seed:#x}");
        CASE_STARTED.store(now_ms(), Ordering::SeqCst);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&fx, &mut stats.borrow_mut(), target, seed, replay_every)));
        CASE_STARTED.store(0, Ordering::SeqCst);
        if std::mem::take(&mut stats.borrow_mut().written) {
            for (p, b) in &fx.originals {
                std::fs::write(p, b).unwrap();
            }
        }
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
                Err(TestCaseError::fail(format!("panic in target {target} seed {seed:#x}: {msg:?}")))
            }
        }
    });
    let st = stats.into_inner();
    assert!(verify(&dir).intact, "the original was restored");
    let total: u64 = st.cases.iter().sum();
    eprintln!(
        "{total} re-sealed cases in {:.0} s: {} event-log, {} meta.json, {} checkpoint, {} snapshot; \
         {} decoded in memory (log refused {}, meta refused {}, checkpoint refused {}); \
         through the files: verify flagged {} of {}; Recording::open rejected {} and opened {}; {} replays run ({} distinct): {} ended with a clear error, {} ran to their end or limit; \
         snapshots: {} decoded ({} restored into a VM), {} rejected; 0 panics, 0 aborts, 0 hangs",
        t.elapsed().as_secs_f64(),
        st.cases[0],
        st.cases[1],
        st.cases[2],
        st.cases[3],
        st.in_memory,
        st.log_refused,
        st.meta_refused,
        st.ckpt_refused,
        st.verify_flagged,
        st.cases[0] + st.cases[1] + st.cases[2] - st.in_memory,
        st.open_rejected,
        st.opened,
        st.replays,
        st.distinct_replays.len(),
        st.replay_errors,
        st.replay_ran,
        st.snap_decoded,
        st.snap_restored,
        st.snap_rejected,
    );
    result.unwrap();
    assert!(total >= cases as u64);
}
