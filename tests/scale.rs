//! Recorder memory follows what the guest touched, not the size of its RAM:
//! a 4 GiB guest that touches a few pages records and replays in about the
//! memory of a 64 MiB one. Peak resident memory of each child is the
//! kernel's (wait4's ru_maxrss, the child's VmHWM), not a timing.

mod common;
use common::*;

use std::path::Path;
use std::process::Stdio;

/// Runs `revirt args`, returns (success, stderr, peak RSS in KiB).
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which also reads its rusage
fn peak_rss(args: &[&str]) -> (bool, String, i64) {
    let err = tempfile::NamedTempFile::new().unwrap();
    let child = revirt()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err.reopen().unwrap())
        .spawn()
        .expect("spawn revirt");
    let mut status = 0i32;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child's pid with valid out-pointers; the
    // Child handle is not waited on afterwards.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(
        r,
        child.id() as i32,
        "wait4: {}",
        std::io::Error::last_os_error()
    );
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    (
        ok,
        std::fs::read_to_string(err.path()).unwrap(),
        ru.ru_maxrss,
    )
}

fn record_and_replay(dir: &Path, mem: &str) -> (i64, i64) {
    let img = demo_image();
    let (ok, err, rec) = peak_rss(&[
        "record",
        img.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--mem",
        mem,
        "--cmdline",
        "workload=compute iters=1000",
    ]);
    assert!(ok, "record --mem {mem}: {err}");
    let (ok, err, rep) = peak_rss(&["replay", "-q", dir.to_str().unwrap()]);
    assert!(ok, "replay --mem {mem}: {err}");
    assert!(err.contains("replay matches the recording"), "{err}");
    (rec, rep)
}

#[test]
fn a_4g_guest_records_and_replays_in_the_memory_of_what_it_touched() {
    let d = tempfile::tempdir().unwrap();
    let (rec_small, rep_small) = record_and_replay(&d.path().join("small"), "64M");
    let (rec_big, rep_big) = record_and_replay(&d.path().join("big"), "4G");
    eprintln!(
        "peak RSS KiB: record 64M {rec_small}, 4G {rec_big}; replay 64M {rep_small}, 4G {rep_big}"
    );
    // Before, recording the 4 GiB guest copied all of RAM for checkpoint 0
    // and hashed it at the end: 4.2 GB resident.
    for (what, small, big) in [
        ("record", rec_small, rec_big),
        ("replay", rep_small, rep_big),
    ] {
        assert!(
            big < 64 * 1024,
            "{what} of a 4 GiB guest peaked at {big} KiB"
        );
        assert!(
            big < small + 16 * 1024,
            "{what}: 4 GiB guest {big} KiB vs 64 MiB guest {small} KiB"
        );
    }
    // The 4 GiB recording's checkpoint 0 holds only what boot wrote (image,
    // page tables, boot info), not 4 GiB of zeros.
    let ck0 = std::fs::metadata(d.path().join("big/checkpoints/000000.ckpt"))
        .unwrap()
        .len();
    assert!(
        ck0 < 1 << 20,
        "checkpoint 0 of the 4 GiB guest is {ck0} bytes"
    );
}
