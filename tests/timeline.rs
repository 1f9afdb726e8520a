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
    let img = demo_image();
    let o = run_with_input(
        &["record", img.to_str().unwrap(), "--cmdline", "workload=echo", "-o", dir.to_str().unwrap(), "--checkpoint-every", "30ms"],
        b"alpha\nbeta\ngamma\ndelta\nquit\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rec = Arc::new(Recording::open(&dir).unwrap());
    assert!(rec.is_complete());
    let last = rec.last_exits();
    let target = last * 2 / 3;

    // Straight from the start.
    let mut a = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    assert_eq!(a.run(Some(target)).unwrap(), Outcome::Reached);
    let ha = a.machine.state_hash().unwrap();

    // Via seek (may restore a later checkpoint).
    let mut b = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    assert_eq!(b.seek(target).unwrap(), Outcome::Reached);
    assert_eq!(b.exits(), target);
    assert_eq!(b.machine.state_hash().unwrap(), ha);

    // Backwards: go past, then seek back.
    assert_eq!(b.seek(last - 1).unwrap(), Outcome::Reached);
    assert_eq!(b.seek(target).unwrap(), Outcome::Reached);
    assert_eq!(b.machine.state_hash().unwrap(), ha);

    // And on to the end, which verifies against the recording.
    match b.run(None).unwrap() {
        Outcome::Finished { problems, .. } => assert!(problems.is_empty(), "{problems:?}"),
        other => panic!("{other:?}"),
    }
}
