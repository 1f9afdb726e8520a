//! Checkpoint retention (record::retain): a long recording keeps a bounded,
//! log-spaced set of checkpoints; every drop is in the hash chain, so
//! `verify` accepts the thinned recording, while a checkpoint deleted by
//! hand is still damage. Replay and seeks work from every kept checkpoint.

mod common;
use common::*;

use std::path::Path;

use revirt::trace::{self, Event};

/// What `workload=idle` prints last: the host's own computation.
fn idle_line(seconds: u64, hz: u64, pages: u64) -> String {
    const MUL: u64 = 6364136223846793005;
    let mut w = [0u64; 256];
    let total = seconds * hz;
    for t in 0..total {
        for i in 0..pages {
            let p = ((t * pages + i) % 256) as usize;
            w[p] = w[p].wrapping_mul(MUL).wrapping_add(t + i);
        }
    }
    let check = w.iter().fold(0u64, |a, &x| a.wrapping_add(x));
    format!("idle: seconds={seconds} ticks={total} check={check:#018x}")
}

fn events(dir: &Path) -> Vec<Event> {
    let g = trace::log::genesis_of(dir).unwrap();
    trace::LogReader::read(&dir.join(trace::EVENTS), g)
        .unwrap()
        .events
}

fn kept_files(dir: &Path) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(dir.join(trace::CHECKPOINTS))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".ckpt")?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// 5 s of the idle guest with a checkpoint every 25 ms (~200) and
/// `--keep-checkpoints 4`.
fn thinned(dir: &Path) {
    let o = record_demo(
        dir,
        "workload=idle iters=5 hz=100",
        &["--checkpoint-every", "25ms", "--keep-checkpoints", "4"],
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&idle_line(5, 100, 4)), "{}", stdout(&o));
    assert!(stderr(&o).contains("retention kept"), "{}", stderr(&o));
}

#[test]
fn a_thinned_recording_verifies_and_replays_from_every_kept_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    thinned(&dir);
    let ev = events(&dir);
    let taken: Vec<u32> = ev
        .iter()
        .filter_map(|e| {
            if let Event::Checkpoint { id, .. } = e {
                Some(*id)
            } else {
                None
            }
        })
        .collect();
    let dropped: Vec<u32> = ev
        .iter()
        .filter_map(|e| {
            // Thinning logs a drop as the checkpoint's binding to an empty SHA-256.
            if let Event::CheckpointFile { id, sha256, .. } = e {
                sha256.is_empty().then_some(*id)
            } else {
                None
            }
        })
        .collect();
    let kept = kept_files(&dir);
    assert!(taken.len() > 60, "only {} checkpoints taken", taken.len());
    // Every checkpoint is either on disk or recorded as dropped, not both.
    for id in &taken {
        assert!(
            kept.contains(id) != dropped.contains(id),
            "checkpoint {id}: kept {kept:?}, dropped {dropped:?}"
        );
    }
    // Bounded and log-spaced: 4 per doubling of age, plus checkpoint 0.
    let n = *taken.last().unwrap() as f64;
    assert!(
        (kept.len() as f64) <= 4.0 * ((n / 4.0).log2() + 2.0) + 1.0,
        "{} kept of {}: {kept:?}",
        kept.len(),
        taken.len()
    );
    for w in kept.windows(2).skip(1) {
        assert!(
            w[1] - w[0] <= ((n as u32 - w[0]) / 4).max(1),
            "gap {w:?} in {kept:?}"
        );
    }
    // The chain binds every kept file to its latest SHA-256 and every dropped one as dropped.
    let seals = trace::checkpoint::Seals::from_events(&ev, trace::checkpoint::Expect::Unbound);
    for id in &taken {
        let e = seals.expect(*id);
        assert_eq!(dropped.contains(id), e == trace::checkpoint::Expect::Dropped, "checkpoint {id}: {e:?}");
        if let trace::checkpoint::Expect::Bound(sha) = e {
            trace::Checkpoint::read_bound(&trace::checkpoint_path(&dir, *id), &sha).unwrap();
        }
    }
    let newest = *kept.last().unwrap();
    // No merge left half done.
    assert!(std::fs::read_dir(dir.join(trace::CHECKPOINTS))
        .unwrap()
        .flatten()
        .all(|e| e.path().extension().is_some_and(|x| x == "ckpt")));

    let o = revirt()
        .args(["verify", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "verify of a thinned recording: {}{}",
        stdout(&o),
        stderr(&o)
    );
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert_eq!(
        all.matches(": dropped (thinned); its removal is in the hash chain")
            .count(),
        dropped.len(),
        "{all}"
    );
    let o = revirt()
        .args(["replay", "-q", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        stderr(&o).contains(&format!(
            "{} more dropped by the retention policy",
            dropped.len()
        )),
        "{}",
        stderr(&o)
    );

    // Replaying from each kept checkpoint reaches the recorded end: the
    // End event's state hash covers all of memory, so a page lost or stale
    // in a merged checkpoint would show.
    for &k in kept.iter().step_by(3).chain(std::iter::once(&newest)) {
        let o = revirt()
            .args([
                "replay",
                "-q",
                dir.to_str().unwrap(),
                "--from-checkpoint",
                &k.to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success() && stderr(&o).contains("replay matches the recording"),
            "from checkpoint {k}: {}",
            stderr(&o)
        );
    }
    let o = revirt()
        .args([
            "replay",
            "-q",
            "--from-checkpoint",
            &dropped[dropped.len() / 2].to_string(),
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        !o.status.success() && stderr(&o).contains("no checkpoint"),
        "a dropped checkpoint is not offered: {}",
        stderr(&o)
    );
    // Seeks to early, middle and late points land (from the nearest kept checkpoint).
    let exits = ev.iter().map(Event::exits).max().unwrap();
    for t in [exits / 10, exits / 2, exits - 50] {
        let o = revirt()
            .args([
                "replay",
                "-q",
                dir.to_str().unwrap(),
                "--to",
                &t.to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success() && stderr(&o).contains(&format!("reached exit {t}")),
            "--to {t}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn a_checkpoint_deleted_by_hand_is_still_damage() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    thinned(&dir);
    let kept = kept_files(&dir);
    let victim = kept[kept.len() / 2];
    std::fs::remove_file(trace::checkpoint_path(&dir, victim)).unwrap();
    let o = revirt()
        .args(["verify", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        !o.status.success(),
        "verify accepted a missing checkpoint {victim}: {all}"
    );
    assert!(
        all.contains(&format!("checkpoint {victim}:")) && all.contains("DAMAGED"),
        "{all}"
    );
    // Readers refuse it; with --force, a restore that needs it names it.
    let o = revirt()
        .args(["replay", "-q", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let after = kept[kept.iter().position(|&k| k == victim).unwrap() + 1];
    let o = revirt()
        .args([
            "replay",
            "-q",
            "--force",
            dir.to_str().unwrap(),
            "--from-checkpoint",
            &after.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        !o.status.success() && stderr(&o).contains(&format!("{victim:06}.ckpt")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn keep_zero_keeps_every_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    let o = record_demo(
        &dir,
        "workload=idle iters=2 hz=100",
        &["--checkpoint-every", "50ms", "--keep-checkpoints", "0"],
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let taken = events(&dir)
        .iter()
        .filter(|e| matches!(e, Event::Checkpoint { .. }))
        .count();
    assert!(taken > 10);
    assert_eq!(kept_files(&dir).len(), taken);
    assert!(!events(&dir)
        .iter()
        .any(|e| matches!(e, Event::CheckpointFile { sha256, .. } if sha256.is_empty())));
}

/// The crash windows of a thinning pass (record::retain): the merged file
/// is written as `.thin` (by way of `.partial`), the drop and the new
/// binding are logged, then the `.thin` replaces the old file and the
/// dropped one is deleted. A recorder killed between any two steps leaves
/// a recording that `verify` names as cut short (truncation), never as
/// damaged and never as whole; a replay says it is incomplete. Each state
/// is built from a recording that kept every checkpoint, by the policy's
/// own functions (`retain::thin`, `Dir::commit_thinned`, `retain::commit`)
/// and a log re-sealed the way the recorder writes it.
#[test]
fn a_recorder_killed_between_the_steps_of_a_thinning_pass_leaves_a_cut_short_recording() {
    use revirt::record::retain;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    record_demo_ok(&dir, "workload=idle iters=1 hz=100", &["--checkpoint-every", "50ms", "--keep-checkpoints", "0"], b"");
    let all = events(&dir);
    let (end, body) = all.split_last().unwrap();
    assert!(matches!(end, Event::End { .. }));
    let exits = end.exits();
    let mut kept: std::collections::BTreeSet<u32> = kept_files(&dir).into_iter().collect();
    let newest = *kept.iter().last().unwrap();
    assert!(newest >= 8, "{newest} checkpoints");
    let meta = std::fs::read(dir.join(trace::META)).unwrap();
    let write_log = |evs: &[Event]| {
        let w = trace::LogWriter::create(&dir.join(trace::EVENTS), trace::log::genesis(&meta)).unwrap();
        for e in evs {
            w.push(e.clone());
        }
        w.finish().unwrap();
    };
    let cut_short = |state: &str| {
        let v = revirt::trace::verify::verify(&dir);
        assert!(!v.intact && v.incomplete && !v.damaged(), "{state}: {:?}", v.problems());
        for p in v.problems() {
            assert!(!p.contains("damaged") || p.contains("not damage"), "{state}: {p}");
        }
        let o = run_with_input(&["replay", "-q", dir.to_str().unwrap()], b"");
        // Never whole: incomplete (2), or run out of log at the guest's
        // end with no End to compare with (1; the log here lacks only End).
        assert!(matches!(o.status.code(), Some(1 | 2)), "{state}: {}", stderr(&o));
        assert!(stderr(&o).contains("recording is incomplete") && !stderr(&o).contains("replay matches"), "{state}: {}", stderr(&o));
        v
    };
    // Killed while writing the merged file: the log has nothing of the pass.
    write_log(body);
    let t = retain::thin(&dir, &mut kept, newest, 2).unwrap();
    assert!(!t.dropped.is_empty() && !t.rewritten.is_empty(), "{t:?}");
    let (j, _) = &t.rewritten[0];
    let files = trace::Dir::new(&dir);
    let thin = std::fs::read(files.thinned(*j)).unwrap();
    let partial = files.checkpoint(*j).with_extension("partial");
    std::fs::rename(files.thinned(*j), &partial).unwrap();
    std::fs::write(&partial, &thin[..thin.len() / 2]).unwrap();
    let v = cut_short("half a merged file");
    assert!(v.problems().iter().any(|p| p.contains(".partial") && p.contains("not vouched for")), "{:?}", v.problems());
    std::fs::remove_file(&partial).unwrap();
    std::fs::write(files.thinned(*j), &thin).unwrap();
    // The merged file written, the log without the pass.
    let v = cut_short("merged file written, nothing logged");
    assert!(v.problems().iter().any(|p| p.contains(".thin") && p.contains("not vouched for")), "{:?}", v.problems());
    // The drops and new bindings logged, nothing renamed yet.
    let mut logged = body.to_vec();
    for (i, _) in &t.dropped {
        logged.push(Event::CheckpointFile { id: *i, exits, sha256: String::new() });
    }
    for (id, w) in &t.rewritten {
        logged.push(Event::CheckpointFile { id: *id, exits, sha256: w.sha256.clone() });
    }
    write_log(&logged);
    let v = cut_short("logged, not renamed");
    assert!(v.problems().iter().any(|p| p.contains(&format!("checkpoint {j}:")) && p.contains("truncation, not damage")), "{:?}", v.problems());
    // The merged files in place, the dropped ones not yet deleted.
    for (id, _) in &t.rewritten {
        files.commit_thinned(*id).unwrap();
    }
    cut_short("renamed, dropped files not deleted");
    // The pass done.
    let dropped: Vec<u32> = t.dropped.iter().map(|d| d.0).collect();
    retain::commit(&dir, &[], &dropped).unwrap();
    cut_short("pass done, log cut short");
    // And with the log's end after the pass: whole, and it replays.
    logged.push(end.clone());
    write_log(&logged);
    let v = revirt::trace::verify::verify(&dir);
    assert!(v.intact, "{:?}", v.problems());
    let o = run_with_input(&["replay", "-q", dir.to_str().unwrap()], b"");
    assert!(o.status.success() && stderr(&o).contains("replay matches the recording"), "{}", stderr(&o));
}
