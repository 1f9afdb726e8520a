//! The Timeline API on a real recording: seeking forwards and backwards,
//! through checkpoints, lands on identical machine states.

mod common;
use common::*;

use std::sync::Arc;

use revirt::replay::{Outcome, Recording, Sink, Timeline};

#[test]
fn seek_gives_the_same_state_from_any_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    let o = record_demo(&dir, "workload=echo", &["--checkpoint-every", "30ms"], b"alpha\nbeta\ngamma\ndelta\nquit\n");
    assert!(o.status.success(), "{}", stderr(&o));
    let rec = Arc::new(Recording::open(&dir).unwrap());
    assert!(rec.is_complete());
    let last = rec.last_exits();
    let target = last * 2 / 3;

    // Straight from the start.
    let mut a = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    assert_eq!(a.run(Some(target)).unwrap(), Outcome::Reached);
    let ha = a.state_hash().unwrap();

    // Via seek (may restore a later checkpoint).
    let mut b = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    assert_eq!(b.seek(target).unwrap(), Outcome::Reached);
    assert_eq!(b.exits(), target);
    assert_eq!(b.state_hash().unwrap(), ha);

    // Backwards: go past, then seek back.
    assert_eq!(b.seek(last - 1).unwrap(), Outcome::Reached);
    assert_eq!(b.seek(target).unwrap(), Outcome::Reached);
    assert_eq!(b.state_hash().unwrap(), ha);

    // And on to the end, which verifies against the recording.
    match b.run(None).unwrap() {
        Outcome::Finished { problems, .. } => assert!(problems.is_empty(), "{problems:?}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn step_and_seek_to_exact_points() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    let o = record_demo(&dir, "workload=compute iters=300", &[], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let rec = Arc::new(Recording::open(&dir).unwrap());
    let mut t = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    // Into the ring-3 compute loop: run to a mid exit, then step.
    assert_eq!(t.run(Some(40)).unwrap(), Outcome::Reached);
    let start = t.position().unwrap();
    assert_eq!(t.step(1).unwrap(), Outcome::Reached);
    let one = t.position().unwrap();
    assert_ne!(one, start, "a step must move");
    assert_eq!(t.step(500).unwrap(), Outcome::Reached);
    let far = t.position().unwrap();
    let far_hash = t.state_hash().unwrap();
    assert!(far.exits > one.exits || far.branches > one.branches, "{far} vs {one}");

    // Going back to an exact point (restore + replay + step) gives the same state.
    let mut u = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    assert_eq!(u.seek_point(far).unwrap(), Outcome::Reached);
    assert_eq!(u.position().unwrap(), far);
    assert_eq!(u.state_hash().unwrap(), far_hash);
    // And backwards from there to the single-step point.
    assert_eq!(u.seek_point(one).unwrap(), Outcome::Reached);
    assert_eq!(u.position().unwrap(), one);
}
