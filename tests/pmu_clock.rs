//! The PMU clock without a PMU: the landing algorithm over the simulated
//! counter on a real KVM guest, checked against the step clock's oracle.

mod common;
use common::*;

use std::path::Path;
use std::sync::Arc;

use revirt::vmm::counter::{BranchCounter, CounterOpener, SimCounter};
use revirt::clock::pmu::{Target, Verdict};
use revirt::vmm::counter::{PmuError, Skid};
use revirt::clock::probe;
use revirt::clock::{fingerprint, ExecPoint};
use revirt::replay::{Outcome, Recording, Sink, Timeline};

/// The first exit interval of at least 300 instructions (the ring-0 loop).
fn long_interval(t: &mut Timeline, rec: &Recording) -> u64 {
    for e in 1..rec.last_exits() {
        assert_eq!(t.seek(e).unwrap(), Outcome::Reached);
        assert_eq!(t.step(300).unwrap(), Outcome::Reached);
        if t.position().unwrap().exits == e {
            return e;
        }
    }
    panic!("no long exit interval in the ring0 workload");
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
    record_demo_ok(&dir, "workload=ring0 iters=400", &[], b"");
    let rec = Arc::new(Recording::open(&dir).unwrap());

    // Find the long exit interval (the loop) and take the oracle by stepping.
    let mut t = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    let e = long_interval(&mut t, &rec);
    assert_eq!(t.seek(e).unwrap(), Outcome::Reached);
    let mut oracle: Vec<(ExecPoint, kvm_bindings::kvm_regs)> = Vec::new();
    for _ in 0..2500 {
        assert_eq!(t.step(1).unwrap(), Outcome::Reached);
        let p = t.position().unwrap();
        if p.exits != e {
            break;
        }
        oracle.push((p, t.regs().unwrap()));
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
                let got = t.regs().unwrap();
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
    record_demo_ok(&a, "workload=race iters=100 hz=1000", &["--clock", "pmu-sim"], b"");
    let want = std::fs::read_to_string(a.join("console.log")).unwrap();
    for clock in ["pmu-sim", "step"] {
        let o = replay(&a, &["--clock", clock]);
        assert_eq!(o.status.code(), Some(0), "{clock}: {}", stderr(&o));
        assert!(stderr(&o).contains("replay matches the recording"), "{}", stderr(&o));
    }
    assert!(want.contains("race: counter="));

    let b = d.path().join("step");
    record_demo_ok(&b, "workload=echo", &["--clock", "step"], b"hello pmu\nquit\n");
    let o = replay(&b, &["--clock", "pmu-sim", "--skid", "40", "--margin", "50"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// Whether this host has a core PMU event source (cpu, cpu_core or
/// cpu_atom): the only condition under which a PMU test may skip.
fn has_pmu() -> bool {
    let d = Path::new("/sys/bus/event_source/devices");
    ["cpu", "cpu_core", "cpu_atom"].iter().any(|p| d.join(p).exists())
}

#[test]
fn pmu_clock_on_a_host_without_pmu_explains_itself() {
    let has_pmu = has_pmu();
    let d = tempfile::tempdir().unwrap();
    let o = record_demo(&d.path().join("r"), "workload=exit status=0", &["--clock", "pmu"], b"");
    if has_pmu {
        eprintln!("this host has a PMU; the no-PMU message is not checked here");
        return;
    }
    assert!(!o.status.success());
    assert!(stderr(&o).contains("clock 'pmu' unavailable") && stderr(&o).contains("pmu-sim"), "{}", stderr(&o));
    assert!(!d.path().join("r").join("meta.json").exists(), "nothing written");
    // Replaying with the hardware counter says the same.
    let r = d.path().join("sim");
    record_demo_ok(&r, "workload=exit status=0", &["--clock", "pmu-sim"], b"");
    let o = replay(&r, &["--clock", "pmu"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("clock 'pmu' unavailable for replay") && stderr(&o).contains("pmu-sim"), "{}", stderr(&o));
}

#[test]
fn clock_auto_chooses_and_explains() {
    let has_pmu = has_pmu();
    let d = tempfile::tempdir().unwrap();
    let o = record_demo(&d.path().join("r"), "workload=exit status=0", &["--clock", "auto"], b"");
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

/// The hash the replay reports ("final state hash H").
fn final_hash(err: &str) -> Option<String> {
    err.split("final state hash ").nth(1).map(|s| s.split_whitespace().next().unwrap_or("").to_string())
}

#[test]
fn race_recorded_with_pmu_sim_replays_through_the_counter_with_random_skids() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("race");
    record_demo_ok(&dir, "workload=race iters=100 hz=1000", &["--clock", "pmu-sim"], b"");
    let console = std::fs::read(dir.join("console.log")).unwrap();
    let rec = Arc::new(Recording::open(&dir).unwrap());
    // The race's ring-3 loop retires few branches between exits (a timer
    // tick is ~80): a small margin makes most events wait for an overflow.
    let margin = 8;
    let seed = 0xace_u64 ^ std::process::id() as u64;
    eprintln!("race replay skid seed {seed:#x}");

    // Through the library: the landing must have gone through the counter's
    // overflow stops (not a side path), and the state must match.
    let mut t = Timeline::open(rec.clone(), Sink::Buffer(Vec::new())).unwrap();
    t.use_simulated_pmu(margin, margin, seed).unwrap();
    let hash = match t.run(None).unwrap() {
        Outcome::Finished { problems, state_hash, .. } => {
            assert!(problems.is_empty(), "{problems:?}");
            state_hash
        }
        other => panic!("replay did not finish: {other:?}"),
    };
    let out = t.buffered_output().unwrap();
    assert_eq!(out, &console[..], "console output differs");
    let l = t.landing_stats().unwrap();
    let far: usize = rec
        .events
        .iter()
        .filter(|e| matches!(e, revirt::trace::Event::Timer { at, .. } | revirt::trace::Event::Serial { at, .. } if at.branches > margin))
        .count();
    eprintln!("landed {} events: {} overflow stops, {} stops judged after them; {far} events past the margin", l.landed, l.overflows, l.steps);
    assert!(l.landed > 0);
    assert!(far > 0, "no event past the margin: nothing went through an overflow");
    assert!(l.overflows as usize >= far, "every event past the margin is reached through an overflow stop");

    // Through the CLI, with another random seed, against the step clock.
    let s = (seed % 1000 + 2).to_string();
    let o = replay(&dir, &["--clock", "pmu-sim", "--margin", "8", "--skid", "8", "--seed", &s]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let st = replay(&dir, &["--clock", "step"]);
    assert_eq!(st.status.code(), Some(0), "{}", stderr(&st));
    assert_eq!(final_hash(&stderr(&o)), Some(hash.clone()));
    assert_eq!(final_hash(&stderr(&st)), Some(hash));
}

#[test]
fn skids_past_the_margin_are_reported_never_silent() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("race");
    record_demo_ok(&dir, "workload=race iters=100 hz=1000", &["--clock", "pmu-sim"], b"");
    let rec = Arc::new(Recording::open(&dir).unwrap());
    // A tiny margin and large skids: the replay either matches exactly or
    // says where it overshot; it never finishes with a different state.
    for seed in 1..4u64 {
        let mut t = Timeline::open(rec.clone(), Sink::Discard).unwrap();
        t.use_simulated_pmu(2, 300, seed).unwrap();
        match t.run(None).unwrap() {
            Outcome::Finished { problems, .. } => assert!(problems.is_empty(), "seed {seed}: {problems:?}"),
            Outcome::Diverged(why) => assert!(why.contains("overshot"), "seed {seed}: {why}"),
            other => panic!("seed {seed}: {other:?}"),
        }
    }
}

#[test]
fn real_pmu_record_and_replay_where_present() {
    if !has_pmu() {
        eprintln!("skipping: this host has no PMU (no cpu, cpu_core or cpu_atom event source)");
        return;
    }
    // A PMU exists: the counter must open, pass the start-up probe, record
    // and replay. Any refusal is a failure, shown with its reason.
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("r");
    let o = record_demo(&dir, "workload=race iters=100 hz=1000", &["--clock", "pmu"], b"");
    assert!(o.status.success(), "this host has a PMU, but: {}", stderr(&o));
    for clock in ["pmu", "step", "pmu-sim"] {
        let o = replay(&dir, &["--clock", clock]);
        assert_eq!(o.status.code(), Some(0), "{clock}: {}", stderr(&o));
        assert!(stderr(&o).contains("replay matches the recording"), "{}", stderr(&o));
    }
}

/// A counter that counts while the guest runs free (so the run loop uses a
/// hardware breakpoint for the landing) but cannot tell visits apart: it
/// always reads 0. Only the register fingerprint then tells the target's
/// visit of its RIP from the others.
struct BlindCounter;

impl BranchCounter for BlindCounter {
    fn reset(&mut self) -> Result<(), revirt::vmm::counter::PmuError> {
        Ok(())
    }
    fn read(&mut self) -> Result<u64, revirt::vmm::counter::PmuError> {
        Ok(0)
    }
    fn arm(&mut self, _: u64) -> Result<(), revirt::vmm::counter::PmuError> {
        Ok(())
    }
    fn disarm(&mut self) -> Result<(), revirt::vmm::counter::PmuError> {
        Ok(())
    }
    fn take_overflow(&mut self) -> bool {
        false
    }
    fn name(&self) -> &'static str {
        "blind"
    }
}

#[test]
fn landing_by_hardware_breakpoint_steps_past_false_hits_in_ring_0() {
    // The real counter's landing realisation (KVM_GUESTDBG_USE_HW_BP on the
    // target RIP, step off each false hit, re-arm) on the ring-0 loop, where
    // KVM hardware breakpoints work on this host.
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("rec");
    record_demo_ok(&dir, "workload=ring0 iters=400", &[], b"");
    let rec = Arc::new(Recording::open(&dir).unwrap());
    let mut t = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    let e = long_interval(&mut t, &rec);
    // From the start of the interval (a fresh timeline: seeking to the exit
    // we stand in would not go back).
    let mut t = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    assert_eq!(t.seek(e).unwrap(), Outcome::Reached);
    let mut oracle = Vec::new();
    for _ in 0..600 {
        assert_eq!(t.step(1).unwrap(), Outcome::Reached);
        oracle.push((t.position().unwrap(), t.regs().unwrap()));
    }
    // A RIP the loop visits several times; land on its third visit.
    let rip = oracle[oracle.len() / 2].0.rip;
    let visits: Vec<usize> = (0..oracle.len()).filter(|&i| oracle[i].0.rip == rip).collect();
    assert!(visits.len() >= 3, "the loop does not come back to {rip:#x}");
    let (at, regs) = &oracle[visits[2]];
    assert_eq!(t.sregs().unwrap().cs.selector & 3, 0, "the loop runs in ring 0");
    let target = Target { at: ExecPoint { exits: e, branches: 0, rip }, fp: fingerprint(regs) };

    let mut t = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    assert_eq!(t.seek(e).unwrap(), Outcome::Reached);
    match t.land_with(Box::new(BlindCounter), target, 50).unwrap() {
        Verdict::Arrived => {}
        other => panic!("did not land: {other:?}"),
    }
    assert_eq!(t.position().unwrap().rip, at.rip);
    let got = t.regs().unwrap();
    assert_eq!(format!("{got:?}"), format!("{regs:?}"), "registers differ from the step clock's");
    eprintln!("landed on the third visit of {rip:#x} after {} hardware breakpoint hits", t.landing_hits());
    assert_eq!(t.landing_hits(), 3, "two false hits stepped past, then the target");
}

// ---- the start-up probe ----------------------------------------------------


#[test]
fn probe_guest_step_clock_counts_exactly_the_conditional_branches() {
    // The step clock's branch definition measured on a known instruction
    // mix: Jcc short and near, taken and not taken; JRCXZ taken and not;
    // LOOP, LOOPE, LOOPNE (looping and leaving); and jmp short/near, call,
    // ret, call/jmp through a register, push+ret, which must not count.
    let p = probe::build();
    let trace = probe::step_clock_trace().unwrap();
    let count = trace.iter().filter(|s| s.branch).count() as u64;
    eprintln!("probe guest: {} instructions stepped, {count} conditional branches", trace.len());
    assert_eq!(count, probe::EXPECTED);
    for s in &trace {
        assert_eq!(s.branch, p.cond.contains(&s.rip), "instruction at {:#x} counted wrongly", s.rip);
    }
    let runs = |a: u64| trace.iter().filter(|s| s.rip == a).count();
    for &a in p.cond.iter().chain(&p.other_branches) {
        assert!(runs(a) > 0, "{a:#x} never ran: the probe does not test it");
    }
    // The loops ran as built: dec/jnz 500 times, loop 100, loope/loopne 50 each.
    let loops: Vec<usize> = p.cond.iter().map(|&a| runs(a)).collect();
    assert_eq!(loops, vec![500, 1, 1, 1, 1, 1, 1, 100, 50, 50, 1, 2]);
    // jmp, jmp near, call, call rax, jmp rax, push+ret once each; the subroutine's ret twice.
    let other: Vec<usize> = p.other_branches.iter().map(|&a| runs(a)).collect();
    assert_eq!(other, vec![1, 1, 1, 1, 1, 1, 2]);
}

fn sim_opener(skid: u64) -> CounterOpener {
    std::sync::Arc::new(move || Ok(Box::new(SimCounter::new(skid, 7, true)) as Box<dyn BranchCounter + Send>))
}

#[test]
fn probe_passes_the_simulated_counter() {
    // The same probe logic record and replay run against the hardware
    // counter, on the counter that exists here.
    let v = probe::check(&sim_opener(40)).unwrap();
    eprintln!("{v}");
    assert_eq!((v.expected, v.counted), (probe::EXPECTED, probe::EXPECTED));
    assert!((probe::ARM_AT..=probe::ARM_AT + 40).contains(&v.overflow_at), "{v}");
}

/// A counter that gets everything right but the count: `extra` more per read.
struct Miscounting {
    inner: SimCounter,
    extra: i64,
    /// Never report the overflow (a kernel where re-arming the period fails).
    no_overflow: bool,
}

impl BranchCounter for Miscounting {
    fn reset(&mut self) -> Result<(), PmuError> {
        self.inner.reset()
    }
    fn read(&mut self) -> Result<u64, PmuError> {
        Ok((self.inner.read()? as i64 + self.extra) as u64)
    }
    fn arm(&mut self, n: u64) -> Result<(), PmuError> {
        self.inner.arm(n)
    }
    fn disarm(&mut self) -> Result<(), PmuError> {
        self.inner.disarm()
    }
    fn take_overflow(&mut self) -> bool {
        self.inner.take_overflow() && !self.no_overflow
    }
    fn needs_stepping(&self) -> bool {
        self.inner.needs_stepping()
    }
    fn on_step(&mut self, b: bool) {
        self.inner.on_step(b)
    }
    fn breakpoints_ok(&self) -> bool {
        false
    }
    fn name(&self) -> &'static str {
        "miscounting test counter"
    }
    fn margin(&self) -> u64 {
        20
    }
}

fn miscounting(extra: i64, no_overflow: bool) -> CounterOpener {
    std::sync::Arc::new(move || {
        Ok(Box::new(Miscounting { inner: SimCounter::new(10, 3, true), extra, no_overflow }) as Box<dyn BranchCounter + Send>)
    })
}

fn record_with(dir: &Path, counter: CounterOpener) -> Result<revirt::record::RecordSummary, revirt::record::RecordError> {
    let opts = revirt::record::RecordOptions {
        image: demo_image(),
        config: revirt::vmm::VmConfig { cmdline: "workload=exit status=0".into(), ..Default::default() },
        out: dir.to_path_buf(),
        clock: revirt::clock::ClockKind::Pmu,
        checkpoint_every: std::time::Duration::ZERO,
        keep_checkpoints: 0,
        parent: None,
        control: None,
        pmu_counter: Some(counter),
    };
    let console = revirt::vmm::Console::Capture { buf: Default::default(), echo: false };
    revirt::record::record(&opts, Box::new(std::io::empty()), console)
}

#[test]
fn a_counter_off_by_one_makes_record_refuse_with_the_discrepancy_and_write_nothing() {
    let d = tempfile::tempdir().unwrap();
    for (extra, want) in [(1i64, "counted 710 (+1)"), (-1, "counted 708 (-1)")] {
        let dir = d.path().join(format!("r{extra}"));
        let e = record_with(&dir, miscounting(extra, false)).unwrap_err().to_string();
        eprintln!("{e}");
        assert!(e.contains("clock 'pmu' unavailable"), "{e}");
        assert!(e.contains("expected 709 retired conditional branches") && e.contains(want), "{e}");
        assert!(e.contains("miscounting test counter") && e.contains("pmu-sim"), "{e}");
        assert!(!dir.exists(), "nothing may be written");
    }
    // Counting right but never overflowing (re-arming the period broken): refused too.
    let dir = d.path().join("noov");
    let e = record_with(&dir, miscounting(0, true)).unwrap_err().to_string();
    assert!(e.contains("clock 'pmu' unavailable") && e.contains("exactly, but the overflow armed at 300 never fired"), "{e}");
    assert!(!dir.exists());
}

#[test]
fn a_counter_that_passes_the_probe_records_and_the_recording_replays() {
    // The other side of the gate: a counter that counts exactly is let
    // through, and record uses that very counter for the recording.
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("r");
    let s = record_with(&dir, sim_opener(8)).unwrap();
    assert!(matches!(s.stop, revirt::trace::EndReason::PowerOff(0)), "{:?}", s.stop);
    let meta = std::fs::read_to_string(dir.join("meta.json")).unwrap();
    assert!(meta.contains("\"clock\": \"pmu\""), "{meta}");
    let o = replay(&dir, &["--clock", "step"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn replay_with_the_hardware_counter_reports_the_probe_or_the_missing_pmu() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path().join("sim");
    record_demo_ok(&r, "workload=exit status=0", &["--clock", "pmu-sim"], b"");
    let o = replay(&r, &["--clock", "pmu"]);
    let e = stderr(&o);
    if !has_pmu() {
        assert!(!o.status.success());
        assert!(e.contains("clock 'pmu' unavailable for replay: no hardware PMU"), "{e}");
        return;
    }
    // A PMU exists: the probe must pass and the replay match.
    assert_eq!(o.status.code(), Some(0), "this host has a PMU, but: {e}");
}
