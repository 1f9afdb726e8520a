//! The PMU clock without a PMU: the landing algorithm over the simulated
//! counter on a real KVM guest, checked against the step clock's oracle.

mod common;
use common::*;

use std::path::Path;
use std::sync::Arc;

use revirt::clock::pmu::{Skid, Target, Verdict};
use revirt::clock::{fingerprint, ExecPoint};
use revirt::replay::{Outcome, Recording, Sink, Timeline};

fn record(dir: &Path, cmdline: &str, extra: &[&str], stdin: &[u8]) {
    let img = demo_image();
    let mut args = vec!["record", img.to_str().unwrap(), "--cmdline", cmdline, "-o", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = run_with_input(&args, stdin);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn replay(dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["replay", "-q", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_with_input(&args, b"")
}

#[test]
fn landing_over_the_simulated_counter_hits_the_step_clock_oracle() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    // The ring-0 compute loop: thousands of branches without an exit.
    record(&dir, "workload=ring0 iters=400", &[], b"");
    let rec = Arc::new(Recording::open(&dir).unwrap());

    // Find the long exit interval (the loop) and take the oracle by stepping.
    let mut t = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    let mut interval = None;
    for e in 1..rec.last_exits() {
        assert_eq!(t.seek(e).unwrap(), Outcome::Reached);
        assert_eq!(t.step(300).unwrap(), Outcome::Reached);
        if t.position().unwrap().exits == e {
            interval = Some(e);
            break;
        }
    }
    let e = interval.expect("no long exit interval in the ring0 workload");
    assert_eq!(t.seek(e).unwrap(), Outcome::Reached);
    let mut oracle: Vec<(ExecPoint, kvm_bindings::kvm_regs)> = Vec::new();
    for _ in 0..2500 {
        assert_eq!(t.step(1).unwrap(), Outcome::Reached);
        let p = t.position().unwrap();
        if p.exits != e {
            break;
        }
        oracle.push((p, t.machine.vcpu.regs().unwrap()));
    }
    let max_branches = oracle.last().unwrap().0.branches;
    assert!(max_branches > 200, "interval too short: {max_branches} branches");

    let seed = 0x5eed_u64 ^ std::process::id() as u64;
    eprintln!("landing property test seed {seed:#x}");
    let mut rng = Skid::new(seed);
    let margin = 60;
    let (mut exact, mut overshoots) = (0, 0);
    for case in 0..24 {
        let i = rng.next(oracle.len() as u64 - 1) as usize;
        // Skids up to a large bound, beyond the margin a third of the time.
        let skid = if case % 3 == 0 { margin + 1 + rng.next(300) } else { rng.next(margin) };
        let (at, regs) = &oracle[i];
        let target = Target { at: *at, fp: fingerprint(regs) };
        let mut t = Timeline::open(rec.clone(), Sink::Discard).unwrap();
        assert_eq!(t.seek(e).unwrap(), Outcome::Reached);
        match t.land_simulated(target, margin, skid).unwrap() {
            Verdict::Arrived => {
                assert_eq!(t.position().unwrap(), *at, "case {case}: wrong point");
                let got = t.machine.vcpu.regs().unwrap();
                assert_eq!(format!("{got:?}"), format!("{regs:?}"), "case {case}: registers differ from the step clock's");
                exact += 1;
            }
            Verdict::Overshoot(why) => {
                // Only when the skid could carry the counter past the target.
                let overflow_at = at.branches.saturating_sub(margin);
                assert!(
                    at.branches > margin && overflow_at + skid > at.branches,
                    "case {case}: overshoot without cause (target {at}, skid {skid}): {why}"
                );
                overshoots += 1;
            }
            Verdict::KeepStepping => unreachable!(),
        }
        // Never a silent overshoot: any skid within the margin must land.
        if skid <= margin {
            assert_eq!(t.position().unwrap(), *at, "case {case}");
        }
    }
    eprintln!("{exact} exact landings, {overshoots} reported overshoots");
    assert!(exact > 0);
}

#[test]
fn pmu_sim_recording_replays_with_step_and_step_recording_with_pmu_sim() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("pmu");
    record(&a, "workload=race iters=100 hz=1000", &["--clock", "pmu-sim"], b"");
    let want = std::fs::read_to_string(a.join("console.log")).unwrap();
    for clock in ["pmu-sim", "step"] {
        let o = replay(&a, &["--clock", clock]);
        assert_eq!(o.status.code(), Some(0), "{clock}: {}", stderr(&o));
        assert!(stderr(&o).contains("replay matches the recording"), "{}", stderr(&o));
    }
    assert!(want.contains("race: counter="));

    let b = d.path().join("step");
    record(&b, "workload=echo", &["--clock", "step"], b"hello pmu\nquit\n");
    let o = replay(&b, &["--clock", "pmu-sim", "--skid", "40", "--margin", "50"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn pmu_clock_on_a_host_without_pmu_explains_itself() {
    let has_pmu = Path::new("/sys/bus/event_source/devices/cpu").exists();
    let d = tempfile::tempdir().unwrap();
    let img = demo_image();
    let o = run_with_input(
        &["record", img.to_str().unwrap(), "--cmdline", "workload=exit status=0", "-o", d.path().join("r").to_str().unwrap(), "--clock", "pmu"],
        b"",
    );
    if has_pmu {
        eprintln!("this host has a PMU; the no-PMU message is not checked here");
        return;
    }
    assert!(!o.status.success());
    assert!(stderr(&o).contains("clock 'pmu' unavailable") && stderr(&o).contains("pmu-sim"), "{}", stderr(&o));
}

#[test]
fn clock_auto_chooses_and_explains() {
    let has_pmu = Path::new("/sys/bus/event_source/devices/cpu").exists();
    let d = tempfile::tempdir().unwrap();
    let img = demo_image();
    let o = run_with_input(
        &["record", img.to_str().unwrap(), "--cmdline", "workload=exit status=0", "-o", d.path().join("r").to_str().unwrap(), "--clock", "auto"],
        b"",
    );
    let e = stderr(&o);
    if has_pmu {
        assert!(e.contains("--clock auto: pmu"), "{e}");
    } else {
        assert!(o.status.success(), "{e}");
        assert!(e.contains("--clock auto: exit: no PMU"), "{e}");
        let meta = std::fs::read_to_string(d.path().join("r/meta.json")).unwrap();
        assert!(meta.contains("\"clock\": \"exit\""), "{meta}");
    }
    let doc = run_with_input(&["doctor"], b"");
    assert!(stdout(&doc).contains(&format!("--clock auto picks: {}", if has_pmu { "pmu" } else { "exit" })));
}
