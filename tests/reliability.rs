//! Reliability: damaged, tampered, cut-short recordings; a killed recorder;
//! a full disk. Nothing panics, nothing hangs, nothing damaged passes as whole.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use revirt::vmm::counter::Skid;
use revirt::replay::{Outcome, Recording, Sink, Timeline};
use revirt::trace::{self, verify::verify};

/// A small recording with several chunks and checkpoints.
fn sample(dir: &Path) {
    let mut input = Vec::new();
    for i in 0..12 {
        input.extend_from_slice(format!("line number {i}\n").as_bytes());
    }
    input.extend_from_slice(b"quit\n");
    record_demo_ok(dir, "workload=echo", &["--mem", "4M", "--checkpoint-every", "5ms"], &input);
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
    v.extend(std::fs::read_dir(dir.join(trace::CHECKPOINTS)).unwrap().flatten().map(|e| e.path()));
    v.sort();
    v
}

#[test]
fn any_single_byte_change_is_detected_by_verify() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    sample(&dir);
    assert!(verify(&dir).intact);
    let mut checked = 0;
    for f in files(&dir) {
        let orig = std::fs::read(&f).unwrap();
        // Every byte of meta.json, a spread of positions elsewhere.
        let is_meta = f.ends_with(trace::META);
        let stride = if is_meta { 1 } else { (orig.len() / 60).max(1) };
        for i in (0..orig.len()).step_by(stride) {
            let mut b = orig.clone();
            b[i] ^= 0x20;
            std::fs::write(&f, &b).unwrap();
            let r = verify(&dir);
            assert!(!r.intact, "changing byte {i} of {} went unnoticed", f.display());
            checked += 1;
        }
        std::fs::write(&f, &orig).unwrap();
    }
    assert!(verify(&dir).intact);
    eprintln!("{checked} single-byte changes, all detected");
}

/// Rewrites a checkpoint file with its memory changed and its CRC-32
/// recomputed, as someone who knows the format would.
fn reseal_checkpoint_with_changed_memory(path: &Path) {
    let b = std::fs::read(path).unwrap();
    let mut ck = revirt::trace::Checkpoint::parse(&b, None).unwrap();
    let i = ck.data.len() / 2;
    ck.data[i] ^= 0xff;
    ck.write(path).unwrap();
    // Only the CRC-32 protected it before: the file is well-formed again.
    revirt::trace::Checkpoint::read(path).unwrap();
}

#[test]
fn a_resealed_checkpoint_fails_verify_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    sample(&dir);
    assert!(verify(&dir).intact);
    // Checkpoint 0 and the first incremental one the retention policy kept.
    let kept = (1u32..).find(|&k| trace::checkpoint_path(&dir, k).exists()).unwrap();
    for id in [0u32, kept] {
        let p = trace::checkpoint_path(&dir, id);
        let orig = std::fs::read(&p).unwrap();
        reseal_checkpoint_with_changed_memory(&p);
        let o = run_with_input(&["verify", dir.to_str().unwrap()], b"");
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(1), "{out}");
        let line = out.lines().find(|l| l.starts_with("FAIL")).unwrap_or_else(|| panic!("no FAIL line: {out}"));
        assert!(line.contains(&format!("checkpoint {id}")) && line.contains("SHA-256"), "{out}");
        assert!(out.contains("recording DAMAGED"), "{out}");
        std::fs::write(&p, &orig).unwrap();
    }
    assert!(verify(&dir).intact);
}

/// replay, gdb, inspect and live check every file before trusting it, say
/// what they checked, refuse damage (exit 2, what and where) unless
/// --force, and tell damage from truncation.
#[test]
fn readers_check_every_file_and_refuse_damage_without_force() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    sample(&dir);
    let r = dir.to_str().unwrap();
    let o = run_with_input(&["replay", r, "-q"], b"");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let line = stderr(&o).lines().find(|l| l.contains("integrity: checked")).map(str::to_string).unwrap_or_else(|| panic!("no summary: {}", stderr(&o)));
    assert!(line.contains("image.elf") && line.contains("events.log") && line.contains("checkpoints") && line.contains("console.log") && line.ends_with("intact"), "{line}");
    let readers: [Vec<&str>; 5] = [
        vec!["replay", r, "-q"],
        vec!["inspect", r, "-c", "events 0"],
        vec!["live", r, "--at", "start", "-q"],
        vec!["gdb", r, "--port", "0"],
        vec!["debug", r, "--gdb", "/bin/false"],
    ];
    let o = run_with_input(&readers[1], b"");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("integrity: checked"), "inspect says what it checked: {}", stderr(&o));
    // One changed byte in the image copy, a checkpoint resealed, a byte
    // mid events.log: every reader refuses, naming the file.
    let image = dir.join(trace::IMAGE);
    let ck = trace::checkpoint_path(&dir, 1);
    let log = dir.join(trace::EVENTS);
    for (file, what) in [(&image, "image.elf: damaged"), (&ck, "checkpoint 1"), (&log, "fails its checksum")] {
        let orig = std::fs::read(file).unwrap();
        if file == &ck {
            reseal_checkpoint_with_changed_memory(file);
        } else {
            let mut b = orig.clone();
            let i = b.len() / 2;
            b[i] ^= 0x04;
            std::fs::write(file, &b).unwrap();
        }
        for args in &readers {
            let o = run_with_input(args, b"");
            let e = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{} on a damaged {}: {e}", args[0], file.display());
            assert!(e.contains("is damaged") && e.contains(what) && e.contains("--force"), "{}: {e}", args[0]);
            assert!(!e.contains("cut short") && !e.contains("incomplete"), "damage told as truncation by {}: {e}", args[0]);
        }
        // --force: the replay goes on, saying what is damaged.
        let o = run_with_input(&["replay", r, "-q", "--force"], b"");
        assert!(stderr(&o).contains("--force: going on despite") && stderr(&o).contains(what), "{}", stderr(&o));
        std::fs::write(file, &orig).unwrap();
    }
    assert!(verify(&dir).intact);
}

fn verify_cli(dir: &Path) -> (Option<i32>, String) {
    let o = run_with_input(&["verify", dir.to_str().unwrap()], b"");
    (o.status.code(), stdout(&o))
}

/// Every file of a recording is bound into the hash chain: console.log
/// edited (same length) and a file that is none of the recording's fail
/// `verify`, naming the file. A recording cut short (its log stops before
/// the last checkpoint files and console bytes were bound, as a killed
/// recorder leaves it) names exactly those as not vouched for — truncation,
/// not damage — and an edit of anything it does vouch for is still damage.
#[test]
fn every_file_is_bound_and_a_cut_short_recording_names_what_is_unvouched() {
    use revirt::trace::Event;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    record_demo_ok(&dir, "workload=churn iters=80 pages=20 hz=100", &["--checkpoint-every", "40ms"], b"");
    assert!(verify(&dir).intact);
    let fail_line = |out: &str, what: &str| -> String {
        out.lines().find(|l| l.starts_with("FAIL") && l.contains(what)).map(str::to_string).unwrap_or_else(|| panic!("no FAIL line naming {what}:\n{out}"))
    };

    // Complete recording: console.log with one byte changed (length kept).
    let console = dir.join(trace::CONSOLE);
    let orig_console = std::fs::read(&console).unwrap();
    assert!(orig_console.len() > 200, "the workload prints steadily: {} bytes", orig_console.len());
    let mut b = orig_console.clone();
    b[orig_console.len() / 2] ^= 0x01;
    std::fs::write(&console, &b).unwrap();
    let (code, out) = verify_cli(&dir);
    assert_eq!(code, Some(1), "{out}");
    assert!(fail_line(&out, "console.log").contains("damaged"), "{out}");
    std::fs::write(&console, &orig_console).unwrap();
    // A file that is not the recording's (a checkpoint the log never names).
    let stray = trace::checkpoint_path(&dir, 999);
    std::fs::copy(trace::checkpoint_path(&dir, 1), &stray).unwrap();
    let (code, out) = verify_cli(&dir);
    assert_eq!(code, Some(1), "{out}");
    assert!(fail_line(&out, "checkpoints/000999.ckpt").contains("not part of the recording"), "{out}");
    std::fs::remove_file(&stray).unwrap();
    assert!(verify(&dir).intact);

    // Cut short: keep the log up to a chunk boundary where a checkpoint has
    // been taken but its file not yet bound, and console output printed
    // after the last console binding — what a SIGKILL leaves.
    let log_path = dir.join(trace::EVENTS);
    let log = std::fs::read(&log_path).unwrap();
    let genesis = trace::log::genesis(&std::fs::read(dir.join(trace::META)).unwrap());
    let spans = chunk_spans(&log).spans;
    let mut cut = None;
    for k in (1..spans.len()).rev() {
        let end = spans[k - 1].0 + spans[k - 1].1;
        let lr = trace::LogReader::parse(&log[8..end], genesis);
        let bound = trace::verify::bound_checkpoints(&lr.events);
        let late: Vec<u32> = lr
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Checkpoint { id, .. } if !bound.contains_key(id) => Some(*id),
                _ => None,
            })
            .collect();
        let vouched = lr.events.iter().rev().find_map(|e| match e {
            Event::ConsoleFile { len, .. } => Some(*len),
            _ => None,
        });
        if let (Some(&last), Some(v)) = (late.last(), vouched) {
            // ... and checkpoints taken after the cut (their files on disk).
            if v > 0 && v < orig_console.len() as u64 && trace::checkpoint_path(&dir, last + 1).exists() {
                let first_bound = *bound.keys().min().expect("some checkpoint bound before the cut");
                cut = Some((end, late, v, first_bound));
                break;
            }
        }
    }
    let (end, late, vouched, bound_id) = cut.expect("a chunk boundary with a checkpoint not yet bound and console bytes not yet bound");
    std::fs::write(&log_path, &log[..end]).unwrap();
    let (code, out) = verify_cli(&dir);
    assert_eq!(code, Some(2), "cut short is incomplete, not damaged:\n{out}");
    assert!(out.contains("recording incomplete") && !out.contains("DAMAGED") && !out.contains("damaged"), "{out}");
    for id in &late {
        let l = fail_line(&out, &format!("checkpoints/{id:06}.ckpt"));
        assert!(l.contains("not vouched for") && l.contains("truncation, not damage"), "{l}");
    }
    let l = fail_line(&out, "console.log");
    let tail = orig_console.len() as u64 - vouched;
    assert!(l.contains(&format!("its last {tail} bytes (from byte {vouched}) are not vouched for")) && l.contains("truncation"), "{l}");
    // Checkpoint files the kept log never names (taken after the cut) are named too.
    let last_in_log = *late.last().unwrap();
    let later: Vec<u32> = (last_in_log + 1..).take_while(|id| trace::checkpoint_path(&dir, *id).exists()).collect();
    assert!(!later.is_empty(), "checkpoints after the cut exist on disk");
    for id in &later {
        assert!(fail_line(&out, &format!("checkpoints/{id:06}.ckpt")).contains("not vouched for"), "{out}");
    }
    // A reader says what it could not vouch for in its summary line, and
    // replays the cut-short recording as incomplete (exit 2).
    let o = run_with_input(&["replay", dir.to_str().unwrap(), "-q"], b"");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    let line = e.lines().find(|l| l.contains("integrity: checked")).unwrap_or_else(|| panic!("no summary: {e}"));
    assert!(line.contains("cut short") && line.contains("not vouched for:") && line.contains(&format!("console.log bytes {vouched}..")), "{line}");
    assert!(!e.contains("is damaged"), "{e}");
    // What the cut-short recording vouches for is still protected.
    let mut b = orig_console.clone();
    b[(vouched / 2) as usize] ^= 0x01;
    std::fs::write(&console, &b).unwrap();
    let (code, out) = verify_cli(&dir);
    assert_eq!(code, Some(1), "{out}");
    assert!(fail_line(&out, "console.log").contains("do not match the SHA-256 in the log's hash chain"), "{out}");
    std::fs::write(&console, &orig_console).unwrap();
    reseal_checkpoint_with_changed_memory(&trace::checkpoint_path(&dir, bound_id));
    let (code, out) = verify_cli(&dir);
    assert_eq!(code, Some(1), "{out}");
    assert!(fail_line(&out, &format!("checkpoint {bound_id}:")).contains("SHA-256"), "{out}");
}

/// No window between the check and the use: a reader that opened (and
/// checked) a recording, whose checkpoint or disk copy is then changed on
/// disk, fails where it reads the file, naming it — it never decodes bytes
/// it did not check.
#[test]
fn a_file_changed_after_the_check_is_caught_where_it_is_used() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    let disk = d.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 * 512]).unwrap();
    record_demo_ok(&dir, "workload=disk", &["--disk", disk.to_str().unwrap(), "--checkpoint-every", "5ms"], b"");
    let rec = Arc::new(Recording::open_checked(&dir, false).unwrap());
    assert!(rec.integrity.as_deref().unwrap().ends_with("intact"), "{:?}", rec.integrity);
    assert!(rec.checkpoints.len() >= 2, "{:?}", rec.checkpoints);
    // Unchanged: both open.
    Timeline::at_checkpoint(rec.clone(), 1, Sink::Discard).unwrap();
    // Checkpoint 1 resealed after the check.
    let ck = trace::checkpoint_path(&dir, 1);
    let orig = std::fs::read(&ck).unwrap();
    reseal_checkpoint_with_changed_memory(&ck);
    let e = Timeline::at_checkpoint(rec.clone(), 1, Sink::Discard).err().expect("a resealed checkpoint is refused at use").to_string();
    assert!(e.contains("000001.ckpt") && e.contains("SHA-256"), "{e}");
    std::fs::write(&ck, &orig).unwrap();
    // The disk copy changed after the check: refused while it is copied.
    let dimg = dir.join(trace::DISK);
    let mut b = std::fs::read(&dimg).unwrap();
    b[100] ^= 1;
    std::fs::write(&dimg, &b).unwrap();
    let e = Timeline::at_checkpoint(rec.clone(), 0, Sink::Discard).err().expect("a changed disk copy is refused at use").to_string();
    assert!(e.contains("disk.img") && e.contains("SHA-256"), "{e}");
}

#[test]
fn digest_catches_a_consistently_rewritten_recording() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    sample(&dir);
    let digest = verify(&dir).digest.unwrap();
    // A host attacker rewrites console.log *and* re-seals everything that
    // covers it: only the published digest can tell.
    let o = run_with_input(&["verify", dir.to_str().unwrap(), "--expect", &digest], b"");
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let c = dir.join(trace::CONSOLE);
    let mut b = std::fs::read(&c).unwrap();
    b[0] ^= 1;
    std::fs::write(&c, &b).unwrap();
    let o = run_with_input(&["verify", dir.to_str().unwrap(), "--expect", &digest], b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("digest differs"), "{}", stdout(&o));
}

struct Chunks {
    /// (offset, length) of each chunk in events.log.
    spans: Vec<(usize, usize)>,
}

fn chunk_spans(log: &[u8]) -> Chunks {
    Chunks { spans: trace::log::chunk_spans(log) }
}

/// What a replay of a (possibly damaged) recording did.
#[derive(Debug, Clone)]
enum Result_ {
    Rejected(String),
    Ran { outcome: String, output: Vec<u8>, matched: bool },
}

fn replay_in_process(dir: &Path, limit: u64) -> Result_ {
    let rec = match Recording::open(dir) {
        Ok(r) => Arc::new(r),
        Err(e) => return Result_::Rejected(e.to_string()),
    };
    let mut t = match Timeline::open(rec.clone(), Sink::Buffer(Vec::new())) {
        Ok(t) => t,
        Err(e) => return Result_::Rejected(e.to_string()),
    };
    let out = t.run(Some(limit));
    let output = t.buffered_output().unwrap().to_vec();
    match out {
        Err(e) => Result_::Rejected(e.to_string()),
        Ok(o) => {
            let matched = matches!(&o, Outcome::Finished { problems, .. } if problems.is_empty());
            Result_::Ran { outcome: format!("{o:?}"), output, matched }
        }
    }
}

#[test]
fn ten_thousand_mutations_no_panic_no_hang_nothing_damaged_passes() {
    let n: usize = std::env::var("REVIRT_MUTATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    sample(&dir);
    let rec = Recording::open(&dir).unwrap();
    let limit = rec.last_exits() + 10_000;
    let console = rec.console.clone();
    drop(rec);
    let log_path = dir.join(trace::EVENTS);
    let log = std::fs::read(&log_path).unwrap();
    let chunks = chunk_spans(&log);
    assert!(chunks.spans.len() >= 3, "want several chunks, got {}", chunks.spans.len());
    let all = files(&dir);
    let ckpts: Vec<PathBuf> = all.iter().filter(|p| p.extension().map(|e| e == "ckpt").unwrap_or(false)).cloned().collect();
    let meta_path = dir.join(trace::META);
    let meta = std::fs::read(&meta_path).unwrap();

    let seed = 0xC0FFEE ^ std::process::id() as u64;
    eprintln!("mutation seed {seed:#x}, {n} mutations");
    let mut rng = Skid::new(seed);
    let mut cache: std::collections::HashMap<String, Result_> = std::collections::HashMap::new();
    let (mut rejected, mut partial, mut replays, mut panics) = (0, 0, 0, 0);
    for i in 0..n {
        // Apply one mutation to one file; remember how to undo it.
        let kind = rng.next(99);
        let (path, orig) = if kind < 55 { (log_path.clone(), log.clone()) } else if kind < 70 {
            (meta_path.clone(), meta.clone())
        } else if kind < 90 {
            let p = ckpts[rng.next(ckpts.len() as u64 - 1) as usize].clone();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        } else {
            let p = all[rng.next(all.len() as u64 - 1) as usize].clone();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        };
        let mut b = orig.clone();
        let what = match rng.next(6) {
            0 | 1 => {
                for _ in 0..=rng.next(7) {
                    let at = rng.next(b.len() as u64 - 1) as usize;
                    b[at] ^= 1 << rng.next(7);
                }
                // Two flips of the same bit cancel out: a mutation must mutate.
                if b == orig {
                    let at = rng.next(b.len() as u64 - 1) as usize;
                    b[at] ^= 1;
                }
                "flip"
            }
            2 => {
                b.truncate(rng.next(b.len() as u64 - 1) as usize);
                "truncate"
            }
            3 if path == log_path => {
                let (o, l) = chunks.spans[rng.next(chunks.spans.len() as u64 - 1) as usize];
                let dup = b[o..o + l].to_vec();
                let at = chunks.spans[rng.next(chunks.spans.len() as u64 - 1) as usize].0;
                b.splice(at..at, dup);
                "duplicate chunk"
            }
            4 if path == log_path => {
                let x = rng.next(chunks.spans.len() as u64 - 2) as usize;
                let ((o1, l1), (o2, l2)) = (chunks.spans[x], chunks.spans[x + 1]);
                let mut v = b[..o1].to_vec();
                v.extend_from_slice(&b[o2..o2 + l2]);
                v.extend_from_slice(&b[o1..o1 + l1]);
                v.extend_from_slice(&b[o2 + l2..]);
                b = v;
                "swap chunks"
            }
            5 => {
                b.clear();
                "delete"
            }
            _ => {
                b.extend_from_slice(b"garbage after the end");
                "append garbage"
            }
        };
        if what == "delete" {
            std::fs::remove_file(&path).unwrap();
        } else {
            std::fs::write(&path, &b).unwrap();
        }

        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let v = verify(&dir);
            assert!(!v.intact, "mutation {i} ({what} of {}) passed verify as intact", path.display());
            // A replay depends on meta, the log's *verified prefix*, checkpoint
            // 0 and the console: mutations that leave those equal replay alike.
            let mut key: String = [trace::META, trace::CONSOLE, "checkpoints/000000.ckpt"]
                .iter()
                .map(|f| std::fs::read(dir.join(f)).map(|b| trace::sha256_hex(&b)).unwrap_or_else(|_| "missing".into()))
                .collect::<Vec<_>>()
                .join(",");
            match trace::log::genesis_of(&dir).and_then(|g| trace::LogReader::read(&log_path, g)) {
                Ok(l) => key.push_str(&format!(",{} events, {:?}", l.events.len(), l.status == trace::LogStatus::Complete)),
                Err(e) => key.push_str(&format!(",{e}")),
            }
            let fresh = !cache.contains_key(&key);
            let res = cache.entry(key).or_insert_with(|| replay_in_process(&dir, limit)).clone();
            (res, fresh)
        }));
        std::fs::write(&path, &orig).unwrap();
        match r {
            Err(_) => panics += 1,
            Ok((res, fresh)) => {
                replays += fresh as u32;
                match res {
                    Result_::Rejected(msg) => {
                        assert!(!msg.is_empty(), "mutation {i}: rejected without a message");
                        rejected += 1;
                    }
                    Result_::Ran { outcome, output, matched } => {
                        // Whatever ran must agree with the real recording as far as it went.
                        assert!(console.starts_with(&output), "mutation {i} ({what} of {}): replay printed something the recording did not: {outcome}", path.display());
                        if !matched {
                            partial += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(verify(&dir).intact, "the original was restored");
    eprintln!("{n} mutations: {rejected} rejected with an error, {partial} replayed partially with a reason, {} replayed fully (damage elsewhere, caught by verify), {replays} distinct replays, {panics} panics", n - rejected - partial - panics);
    assert_eq!(panics, 0);
}

#[test]
fn sigkill_at_twenty_random_moments_leaves_replayable_prefixes() {
    use std::io::Write;
    use std::process::Stdio;
    let img = demo_image();
    let mut rng = Skid::new(0xDEAD ^ std::process::id() as u64);
    let (mut incomplete, mut complete) = (0, 0);
    for k in 0..20 {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("rec");
        let mut child = revirt()
            .args(["record", img.to_str().unwrap(), "--cmdline", "workload=echo", "-o", dir.to_str().unwrap(), "--checkpoint-every", "50ms"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let kill_after = std::time::Duration::from_millis(20 + rng.next(700));
        let t = std::time::Instant::now();
        let mut i = 0;
        while t.elapsed() < kill_after {
            let _ = writeln!(stdin, "kill test {k} line {i}");
            let _ = stdin.flush();
            i += 1;
            std::thread::sleep(std::time::Duration::from_millis(15));
        }
        if rng.next(3) == 0 {
            let _ = writeln!(stdin, "quit"); // sometimes it finishes first
            std::thread::sleep(std::time::Duration::from_millis(rng.next(50)));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let recorded = String::from_utf8_lossy(&out.stdout).into_owned();
        if !dir.join(trace::META).exists() {
            continue; // killed before it wrote anything: nothing to present as a recording
        }
        let o = run_with_input(&["replay", dir.to_str().unwrap()], b"");
        let code = o.status.code();
        assert!(code == Some(0) || code == Some(2) || (code == Some(125) && stderr(&o).contains("checkpoint")),
            "kill {k} after {kill_after:?}: replay said {code:?}: {}", stderr(&o));
        assert!(recorded.starts_with(&stdout(&o)), "kill {k}: replay is not a prefix of what was recorded");
        match code {
            Some(0) => complete += 1,
            _ => incomplete += 1,
        }
    }
    eprintln!("20 kills: {incomplete} incomplete recordings replayed to their last chunk, {complete} had finished");
}

#[test]
fn disk_full_gives_a_clear_error_and_a_valid_partial_recording() {
    let mnt = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=160k", "tmpfs", mnt.path().to_str().unwrap()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "cannot mount a tmpfs (the test needs root, as CI has)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.path().to_path_buf());
    let dir = mnt.path().join("rec");
    let mut input = Vec::new();
    for i in 0..4000 {
        input.extend_from_slice(format!("filling the disk with line {i:05} of the echo workload\n").as_bytes());
    }
    input.extend_from_slice(b"quit\n");
    let o = record_demo(&dir, "workload=echo", &["--mem", "4M"], &input);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(stderr(&o).contains("No space left on device"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
    let v = verify(&dir);
    assert!(!v.intact, "a recording cut short by a full disk must not pass as whole");
    let r = run_with_input(&["replay", dir.to_str().unwrap()], b"");
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(stderr(&r).contains("incomplete"));
    assert!(stdout(&o).starts_with(&stdout(&r)));
}
