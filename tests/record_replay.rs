//! Record then replay, end to end: the real binary, the real demo guest,
//! real KVM. Each replay must reproduce its recording's console output and
//! final state hash exactly.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Output;

use revirt::trace::{self, Event, LogReader, LogWriter};

fn record(dir: &Path, cmdline: &str, extra: &[&str], stdin: &[u8]) -> Output {
    let o = record_demo(dir, cmdline, extra, stdin);
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    o
}

fn replay(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["replay", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = run_with_input(&args, b"");
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    o
}

/// Records, replays, and checks the replay matched (output and final state).
fn round_trip(dir: &Path, cmdline: &str, extra: &[&str], stdin: &[u8]) -> (Output, Output) {
    let r = record(dir, cmdline, extra, stdin);
    assert!(r.status.code().is_some(), "{}", stderr(&r));
    let p = replay(dir, &[]);
    assert_eq!(p.status.code(), Some(0), "replay did not match:\n{}", stderr(&p));
    assert_eq!(stdout(&p), stdout(&r), "replayed console differs from the recorded one");
    assert!(stderr(&p).contains("replay matches the recording"), "{}", stderr(&p));
    let recorded_hash = final_hash(dir);
    assert!(stderr(&p).contains(&recorded_hash), "final state hash differs\n{}", stderr(&p));
    (r, p)
}

fn final_hash(dir: &Path) -> String {
    let log = LogReader::read(&dir.join(trace::EVENTS), trace::log::genesis_of(dir).unwrap()).unwrap();
    match log.events.last() {
        Some(Event::End { state_hash, .. }) => state_hash.clone(),
        other => panic!("no End event: {other:?}"),
    }
}

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("rec");
    (d, p)
}

#[test]
fn race_plain_runs_differ_but_every_replay_matches_its_recording() {
    // Plain runs: the result depends on where the timer preempts.
    let mut plain = Vec::new();
    for _ in 0..6 {
        let o = run_demo("workload=race", &[], b"");
        let out = stdout(&o);
        let line = out.lines().find(|l| l.starts_with("race:")).unwrap().to_string();
        plain.push(field(&line, "counter").unwrap());
        plain.sort();
        plain.dedup();
        if plain.len() > 1 {
            break;
        }
    }
    assert!(plain.len() > 1, "six plain runs of the race gave the same result: {plain:?}");

    // Recorded with the exit clock (exits=16 puts a port read inside every
    // 16th racy window, so interrupts at exits preempt there): each replay
    // reproduces its own recording's result, whatever it was.
    let cmd = "workload=race iters=20000 exits=16 hz=2000";
    let mut recorded = Vec::new();
    for _ in 0..3 {
        let (_d, dir) = tmp();
        let (r, p) = round_trip(&dir, cmd, &["--checkpoint-every", "20ms"], b"");
        let line = stdout(&r).lines().find(|l| l.starts_with("race:")).unwrap().to_string();
        assert!(field(&line, "ticks").unwrap().parse::<u64>().unwrap() > 0, "{line}");
        assert!(stdout(&p).contains(&line));
        recorded.push(line);
    }
    eprintln!("recorded race results: {recorded:?}");
}

#[test]
fn exit_clock_serial_input_is_replayed_without_input() {
    let (_d, dir) = tmp();
    let (r, p) = round_trip(&dir, "workload=echo", &[], b"first line\nsecond\nquit\n");
    assert!(stdout(&r).contains("echo: second"));
    assert!(stdout(&p).contains("echo: second"), "replay got no input from the log");
}

#[test]
fn exit_clock_disk_workload_replays_and_leaves_recording_untouched() {
    let (_d, dir) = tmp();
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 * 512]).unwrap();
    round_trip(&dir, "workload=disk", &["--disk", disk.to_str().unwrap()], b"");
    // The recording keeps the disk as it was at the start, and replay must not change it.
    let kept = std::fs::read(dir.join(trace::DISK)).unwrap();
    assert!(kept.iter().all(|&b| b == 0));
    let live = std::fs::read(&disk).unwrap();
    assert_eq!(&live[..8], b"RVDISK01", "the live run wrote the user's disk");
    let again = replay(&dir, &["-q"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
}

#[test]
fn exit_clock_clock_workload_replays_recorded_time() {
    let (_d, dir) = tmp();
    let (r, p) = round_trip(&dir, "workload=clock", &[], b"");
    let line = |o: &Output| stdout(o).lines().find(|l| l.starts_with("clock:")).unwrap().to_string();
    assert_eq!(line(&r), line(&p));
}

#[test]
fn replay_from_a_later_checkpoint_reaches_the_same_final_state() {
    let (_d, dir) = tmp();
    let cmd = "workload=race iters=20000 exits=16 hz=2000";
    round_trip(&dir, cmd, &["--checkpoint-every", "10ms"], b"");
    let n = std::fs::read_dir(dir.join(trace::CHECKPOINTS)).unwrap().count();
    assert!(n >= 3, "expected several checkpoints, got {n}");
    let last = (n - 1).to_string();
    let p = replay(&dir, &["-q", "--from-checkpoint", &last]);
    assert_eq!(p.status.code(), Some(0), "{}", stderr(&p));
    assert!(stderr(&p).contains(&final_hash(&dir)), "{}", stderr(&p));
    assert!(stderr(&p).contains(&format!("starting from checkpoint {last}")));
}

/// Rewrites the event log with `edit` applied, re-sealing the hash chain,
/// as a careful forger (or a bug) would.
fn rewrite_log(dir: &Path, edit: impl Fn(&mut Vec<Event>)) {
    let g = trace::log::genesis_of(dir).unwrap();
    let mut events = LogReader::read(&dir.join(trace::EVENTS), g).unwrap().events;
    edit(&mut events);
    let w = LogWriter::create(&dir.join(trace::EVENTS), g).unwrap();
    for e in events {
        w.push(e);
    }
    w.finish().unwrap();
}

#[test]
fn divergence_is_reported_at_the_first_differing_event() {
    let (_d, dir) = tmp();
    round_trip(&dir, "workload=echo", &[], b"abc\nquit\n");
    // Tamper with one logged input: the serial bytes.
    rewrite_log(&dir, |events| {
        for e in events.iter_mut() {
            if let Event::Serial { bytes, .. } = e {
                if bytes.contains(&b'b') {
                    *bytes = bytes.iter().map(|&b| if b == b'b' { b'X' } else { b }).collect();
                    return;
                }
            }
        }
        panic!("no serial event with 'b'");
    });
    let p = replay(&dir, &["-q"]);
    assert_eq!(p.status.code(), Some(1), "{}", stderr(&p));
    let e = stderr(&p);
    assert!(e.contains("DIVERGED"), "{e}");
    assert!(e.contains("console output differs"), "{e}");

    // Timing tampering: move a timer interrupt to another exit.
    let (_d2, dir2) = tmp();
    round_trip(&dir2, "workload=race iters=20000 exits=16 hz=2000", &[], b"");
    rewrite_log(&dir2, |events| {
        let i = events.iter().position(|e| matches!(e, Event::Timer { .. })).expect("a timer event");
        if let Event::Timer { at, .. } = &mut events[i] {
            at.exits += 1;
        }
    });
    let p = replay(&dir2, &["-q"]);
    assert_eq!(p.status.code(), Some(1), "{}", stderr(&p));
    let e = stderr(&p);
    assert!(e.contains("DIVERGED") || e.contains("MISMATCH"), "{e}");
}

#[test]
fn a_damaged_log_is_detected_and_replayed_up_to_the_damage() {
    let (_d, dir) = tmp();
    round_trip(&dir, "workload=echo", &[], b"one\ntwo\nquit\n");
    let p = dir.join(trace::EVENTS);
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n - 40] ^= 0xFF;
    std::fs::write(&p, &b).unwrap();
    // Damage is refused (exit 2), named as damage, not as a cut-short recording.
    let o = replay(&dir, &["-q"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("is damaged") && e.contains("checksum") && e.contains("--force") && !e.contains("cut short"), "{e}");
    // --force works on the damaged evidence: replayed up to the damage.
    let o = replay(&dir, &["-q", "--force"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
    let e = stderr(&o);
    assert!(e.contains("DAMAGED (not cut short)") && e.contains("checksum") && !e.contains("cut-short"), "{e}");
}

#[test]
fn bad_recordings_give_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let o = replay(d.path(), &[]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("not a recording directory"), "{}", stderr(&o));

    let (_d, dir) = tmp();
    round_trip(&dir, "workload=exit status=0", &[], b"");
    let meta = dir.join(trace::META);
    let text = std::fs::read_to_string(&meta).unwrap();
    for v in [1, 99] {
        let now = format!("\"version\": {}", trace::meta::VERSION);
        assert!(text.contains(&now), "{text}");
        std::fs::write(&meta, text.replace(&now, &format!("\"version\": {v}"))).unwrap();
        let o = replay(&dir, &[]);
        assert!(stderr(&o).contains(&format!("format version {v} is not supported")), "{}", stderr(&o));
    }
    std::fs::write(&meta, &text).unwrap();

    std::fs::remove_file(trace::checkpoint_path(&dir, 0)).unwrap();
    let o = replay(&dir, &[]);
    assert_eq!(o.status.code(), Some(2), "a missing checkpoint is damage: {}", stderr(&o));
    assert!(stderr(&o).contains("checkpoint 0"), "{}", stderr(&o));

    let o = record(&dir, "workload=exit", &[], b"");
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
}

#[test]
fn killed_recorder_leaves_a_replayable_prefix() {
    use std::io::Write;
    use std::process::Stdio;
    let (_d, dir) = tmp();
    let img = demo_image();
    let mut child = revirt()
        .args(["record", img.to_str().unwrap(), "--cmdline", "workload=echo", "-o", dir.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for i in 0..8 {
        writeln!(stdin, "line {i}").unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(120));
    }
    child.kill().unwrap(); // SIGKILL
    let out = child.wait_with_output().unwrap();
    let recorded = stdout(&out);
    assert!(recorded.contains("echo: line 3"), "{recorded}");

    let o = replay(&dir, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("incomplete"), "{}", stderr(&o));
    let replayed = stdout(&o);
    assert!(replayed.contains("echo: line 2"), "replayed too little: {replayed}");
    assert!(recorded.starts_with(&replayed), "replay is not a prefix of the recording:\n{replayed}\nvs\n{recorded}");
}

// ---- the step clock: interrupts at their natural instant --------------------

fn symbol_range(name: &str) -> (u64, u64) {
    let out = std::process::Command::new("nm").args(["-S", demo_image().to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 4 && f[3] == name {
            let start = u64::from_str_radix(f[0], 16).unwrap();
            let size = u64::from_str_radix(f[1], 16).unwrap();
            return (start, start + size);
        }
    }
    panic!("symbol {name} not found");
}

fn events(dir: &Path) -> Vec<Event> {
    revirt::replay::Recording::open(dir).unwrap().events
}

#[test]
fn step_clock_race_interrupts_land_mid_block_and_replay_exactly() {
    let (_d, dir) = tmp();
    let (r, _) = round_trip(&dir, "workload=race iters=150 hz=1000", &["--clock", "step", "--checkpoint-every", "100ms"], b"");
    let line = stdout(&r).lines().find(|l| l.starts_with("race:")).unwrap().to_string();
    assert!(field(&line, "ticks").unwrap().parse::<u64>().unwrap() > 0, "{line}");
    // Timer interrupts recorded between exits, inside the ring-3 racing loop.
    let (lo, hi) = symbol_range("race_loop");
    let mid_block: Vec<_> = events(&dir)
        .into_iter()
        .filter_map(|e| match e {
            Event::Timer { at, .. } if at.branches > 0 && (lo..hi).contains(&at.rip) => Some(at),
            _ => None,
        })
        .collect();
    assert!(!mid_block.is_empty(), "no timer interrupt landed inside race_loop between exits");
    // Checkpoints of a stepped recording sit mid-interval: replay from the last one.
    let n = std::fs::read_dir(dir.join(trace::CHECKPOINTS)).unwrap().count();
    assert!(n >= 2, "want a later checkpoint, got {n}");
    let last = (n - 1).to_string();
    let p = replay(&dir, &["-q", "--from-checkpoint", &last]);
    assert_eq!(p.status.code(), Some(0), "{}", stderr(&p));
    assert!(stderr(&p).contains(&final_hash(&dir)), "{}", stderr(&p));
}

#[test]
fn step_clock_serial_disk_and_clock_workloads_replay() {
    let (_d, dir) = tmp();
    let (_, p) = round_trip(&dir, "workload=echo", &["--clock", "step"], b"step by step\nquit\n");
    assert!(stdout(&p).contains("echo: step by step"));

    let (_d2, dir2) = tmp();
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.img");
    std::fs::write(&disk, vec![7u8; 8 * 512]).unwrap();
    round_trip(&dir2, "workload=disk", &["--clock", "step", "--disk", disk.to_str().unwrap()], b"");

    let (_d3, dir3) = tmp();
    round_trip(&dir3, "workload=clock iters=2000", &["--clock", "step"], b"");
}

#[test]
fn step_clock_tampered_timing_is_a_divergence() {
    let (_d, dir) = tmp();
    round_trip(&dir, "workload=race iters=100 hz=1000", &["--clock", "step"], b"");
    rewrite_log(&dir, |events| {
        let i = events
            .iter()
            .position(|e| matches!(e, Event::Timer { at, .. } if at.branches > 2))
            .expect("a mid-block timer event");
        if let Event::Timer { at, .. } = &mut events[i] {
            at.branches -= 1;
        }
    });
    let p = replay(&dir, &["-q"]);
    assert_eq!(p.status.code(), Some(1), "{}", stderr(&p));
    assert!(stderr(&p).contains("DIVERGED"), "{}", stderr(&p));
}

/// A guest that rewrites a thousand pages every checkpoint interval: the
/// dirty log leaves such pages writable under KVM's manual protection and
/// re-protects them every 16 reads (vmm::dirty). Replay from checkpoints
/// on both sides of those reads reaches the recorded end state (the End
/// hash covers all of memory, so a change a checkpoint missed would show).
#[test]
fn checkpoints_of_a_guest_rewriting_its_pages_every_interval_restore_exactly() {
    let (_d, hot) = tmp();
    let r = record(&hot, "workload=dirty iters=200 pages=1024", &["--checkpoint-every", "2ms", "--keep-checkpoints", "0"], b"");
    assert!(r.status.success() && stdout(&r).contains("dirty:"), "{}", stderr(&r));
    let log = LogReader::read(&hot.join(trace::EVENTS), trace::log::genesis_of(&hot).unwrap()).unwrap();
    let ids: Vec<u32> = log.events.iter().filter_map(|e| if let Event::Checkpoint { id, .. } = e { Some(*id) } else { None }).collect();
    assert!(ids.len() > 20, "{} checkpoints: too few to cross a re-protection", ids.len());
    let hash = final_hash(&hot);
    for k in ids.iter().step_by(3) {
        let p = replay(&hot, &["-q", "--from-checkpoint", &k.to_string()]);
        assert!(p.status.success() && stderr(&p).contains(&hash), "from checkpoint {k}: {}", stderr(&p));
    }
}
