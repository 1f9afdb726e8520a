//! Going live from the middle of a recording (`revirt live`, and `live` in
//! the inspector): the exploited vuln service, restored to before the
//! malicious input arrived, gets a benign name and behaves benignly; the
//! recording is never changed and still replays; a recorded continuation
//! replays too; the disk is copy-on-write.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Output;

use revirt::replay::Recording;
use revirt::trace::Event;

fn payload() -> Vec<u8> {
    let mut p = vec![b'0'; 56];
    p.extend_from_slice(&0x200000u64.to_le_bytes());
    p.push(b'\n');
    p
}

fn replays(dir: &Path) -> Output {
    let o = run_with_input(&["replay", dir.to_str().unwrap()], b"");
    assert_eq!(o.status.code(), Some(0), "replay of {} did not match:\n{}", dir.display(), stderr(&o));
    assert!(stderr(&o).contains("replay matches the recording"), "{}", stderr(&o));
    o
}

/// The exploited recording, checked: PWNED, status 66.
fn exploited(d: &Path) -> PathBuf {
    let rec = d.join("vuln");
    let o = record_vuln_after_prompt(&rec, &payload());
    assert_eq!(o.status.code(), Some(66), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("vuln: PWNED - backdoor reached"));
    rec
}

fn first_serial(rec: &Path) -> usize {
    let r = Recording::open(rec).unwrap();
    r.events.iter().position(|e| matches!(e, Event::Serial { .. })).expect("a serial event")
}

#[test]
fn going_live_before_the_malicious_input_behaves_benignly() {
    let d = tempfile::tempdir().unwrap();
    let rec = exploited(d.path());
    let before = tree_hash(&rec);
    let serial = first_serial(&rec);
    let r = Recording::open(&rec).unwrap();
    let serial_exits = r.events[serial].exits();
    // The payload arrived after the prompt (not at a checkpoint), so this replays through KVM.
    assert!(serial_exits > 2, "input at exit {serial_exits}");

    let o = run_with_input(&["live", rec.to_str().unwrap(), "--at", &format!("event:{serial}")], b"alice\n");
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    // What the guest had printed before the point, then the live continuation.
    assert!(out.starts_with("revirt-demo: workload=vuln\nvuln: name?\n"), "{out}");
    assert!(out.contains("vuln: hello, alice\n"), "{out}");
    assert!(out.contains("vuln: bye\n"), "{out}");
    assert!(!out.contains("PWNED"), "{out}");
    assert_eq!(out.matches("vuln: name?").count(), 1, "{out}");
    assert!(stderr(&o).contains(&format!("live from exit {}", serial_exits - 1)), "{}", stderr(&o));

    // Going live from a checkpoint (no replay) and by exit count work the same.
    let o = run_with_input(&["live", rec.to_str().unwrap(), "--at", "ckpt:0", "-q"], b"bob\n");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "revirt-demo: workload=vuln\nvuln: name?\nvuln: hello, bob\nvuln: bye\n");

    // Going live after the payload arrived: the exploit still happens (it is in the UART already).
    let last_input = r.events.iter().rposition(|e| matches!(e, Event::Serial { .. })).unwrap();
    let o = run_with_input(&["live", rec.to_str().unwrap(), "--at", &format!("exit:{}", r.events[last_input].exits())], b"");
    assert_eq!(o.status.code(), Some(66), "{}", stderr(&o));
    assert!(stdout(&o).contains("PWNED"));

    // The recording is untouched and still replays exactly.
    assert_eq!(before, tree_hash(&rec), "going live changed the recording");
    let o = replays(&rec);
    assert!(stdout(&o).contains("PWNED"));
}

#[test]
fn a_recorded_live_continuation_replays() {
    let d = tempfile::tempdir().unwrap();
    let rec = exploited(d.path());
    let before = tree_hash(&rec);
    let serial = first_serial(&rec);
    let new = d.path().join("continued");
    let o = run_with_input(
        &["live", rec.to_str().unwrap(), "--at", &format!("event:{serial}"), "--record", new.to_str().unwrap(), "-q"],
        b"carol\n",
    );
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stdout(&o), stderr(&o));
    assert_eq!(stdout(&o), "vuln: hello, carol\nvuln: bye\n");
    assert!(stderr(&o).contains("recorded the live run"), "{}", stderr(&o));
    // The new recording starts where the old one was, and replays to the benign end.
    let n = Recording::open(&new).unwrap();
    let r = Recording::open(&rec).unwrap();
    assert_eq!(n.checkpoints[0].1, r.events[serial].exits() - 1);
    let p = replays(&new);
    assert_eq!(stdout(&p), "vuln: hello, carol\nvuln: bye\n");
    // And it can be inspected like any other.
    let o = run_with_input(&["inspect", new.to_str().unwrap(), "-c", "summary"], b"");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("the guest powered off with status 0"), "{}", stdout(&o));
    assert_eq!(before, tree_hash(&rec));
    replays(&rec);
    // An existing directory is refused.
    let o = run_with_input(&["live", rec.to_str().unwrap(), "--at", "ckpt:0", "--record", new.to_str().unwrap()], b"x\n");
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
}

#[test]
fn live_from_the_inspector_then_back_to_the_recording() {
    let d = tempfile::tempdir().unwrap();
    let rec = exploited(d.path());
    let serial = first_serial(&rec);
    let here = Recording::open(&rec).unwrap().events[serial].exits() - 1;
    let o = run_with_input(&["inspect", rec.to_str().unwrap(), "--at", &format!("event:{serial}"), "-c", "live; where; console 1"], b"dave\n");
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    assert!(out.contains(&format!("going live at exit {here}")), "{out}");
    assert!(out.contains("vuln: hello, dave\nvuln: bye\n"), "{out}");
    assert!(out.contains("live: the guest powered off with status 0"), "{out}");
    // Back in the recording, at the same point, with the recorded past.
    assert!(out.contains(&format!("back in the recording at exit {here}")), "{out}");
    assert!(out.contains(&format!("next event: #{serial} serial input")), "{out}");
    assert!(out.contains("vuln: name?\n("), "{out}");
}

#[test]
fn the_disk_is_copy_on_write() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let rec = d.path().join("disk");
    let o = record_demo(&rec, "workload=disk", &["--disk", disk.to_str().unwrap()], b"");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("counter=1 "), "{}", stdout(&o));
    let before = tree_hash(&rec);
    // Twice from the start: each live run sees the disk as recorded (counter 0 -> 1), not the previous run's write.
    for _ in 0..2 {
        let o = run_with_input(&["live", rec.to_str().unwrap(), "--at", "start", "-q"], b"");
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(stdout(&o).contains("disk: sectors=64 counter=1 checksum=0x2ac39ec911abdc42"), "{}", stdout(&o));
    }
    assert_eq!(before, tree_hash(&rec), "the recording's disk.img was written");
    replays(&rec);
    // The end is not a place to go live from.
    let o = run_with_input(&["live", rec.to_str().unwrap(), "--at", "end"], b"");
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("end of the recording"), "{}", stderr(&o));
}
