//! The native-speed search engine (replay::search, vmm::breakpoints)
//! against the single-stepping path kept as the oracle: the same hits in
//! the same order (exit, RIP, arrival number, register fingerprint), the
//! same state at every stop (position, fingerprint, full state hash), on
//! real KVM, for recordings made with the exit, step and pmu-sim clocks.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use common::*;
use revirt::replay::session::{Session, StopWhy};
use revirt::replay::search::{Scan, ScanStop};
use revirt::replay::{Outcome, Recording, Sink, Timeline};

use common::demo_symbol as symbol;

/// The first instruction after the loop head of race_loop: runs once per iteration in ring 3.
fn race_loop_body() -> u64 {
    let out = std::process::Command::new("objdump").args(["-d", "--no-show-raw-insn"]).arg(demo_image()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("<race_loop>:").expect("race_loop");
    // The load of the shared counter (mov race_counter(%rip), ...).
    text[start..]
        .lines()
        .find(|l| l.contains("race_counter"))
        .and_then(|l| u64::from_str_radix(l.trim().split(':').next().unwrap(), 16).ok())
        .expect("the counter load in race_loop")
}

/// The second instruction of the timer handler: the step that delivers an
/// interrupt from ring 3 also executes the handler's first instruction
/// (docs/host-support.md), so the first one is never an arrival.
fn irq_timer_body() -> u64 {
    symbol("irq_timer") + 2 // after `push %r15` (41 57)
}

fn sites() -> BTreeSet<u64> {
    // More sites than debug registers; ring 3 (the racy loop, task exit,
    // power-off) and ring 0 (the timer handler, entered from ring 3).
    [irq_timer_body(), race_loop_body(), symbol("task_exit"), symbol("power_off"), symbol("con_puts")].into()
}

/// Every hit of a whole replay, stepping one boundary at a time (the
/// exiting instructions by running to their exit, as the debugger does).
fn oracle_hits(rec: &Arc<Recording>, sites: &BTreeSet<u64>) -> (Vec<(u64, u64, u64, u64)>, Outcome) {
    let mut tl = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    let mut scan = Scan::new(sites.clone(), ScanStop::Never, 0, &[]);
    loop {
        let r = tl.regs().unwrap();
        let mut code = [0u8; 15];
        tl.read_phys(r.rip, &mut code).unwrap();
        let ins = iced_x86::Decoder::with_ip(64, &code, r.rip, 0).decode();
        let exiting = revirt::replay::search::exits_to_vmm(ins.mnemonic()) && !tl.interrupt_pending();
        let o = if exiting {
            let to = tl.exits() + 1;
            tl.run(Some(to)).unwrap()
        } else {
            tl.step(1).unwrap()
        };
        if o != Outcome::Reached {
            return (key(&scan), o);
        }
        let p = tl.position().unwrap();
        scan.at_poll(p, revirt::clock::fingerprint(&tl.regs().unwrap()), None);
    }
}

fn key(s: &Scan) -> Vec<(u64, u64, u64, u64)> {
    s.hits.iter().map(|h| (h.point.exits, h.point.rip, h.n, h.fp)).collect()
}

fn record_race(dir: &Path, name: &str, clock: &str) -> Arc<Recording> {
    let out = dir.join(name);
    // Stepped recordings slow the guest down: a slower timer keeps them short.
    let cmdline = match clock {
        "exit" => "workload=race iters=2000 exits=4 hz=2000",
        _ => "workload=race iters=300 exits=4 hz=2000",
    };
    record_demo_ok(&out, cmdline, &["--clock", clock, "--checkpoint-every", "50ms"], b"");
    Arc::new(Recording::open(&out).unwrap())
}


/// A native session and the stepping one stopped alike: the same reason,
/// position, fingerprint, next event and full state hash.
fn same_stop(a: &mut Session, b: &mut Session, wa: &StopWhy, wb: &StopWhy, what: &str) {
    assert_eq!(wa, wb, "{what}");
    let (pa, pb) = (a.pos(), b.pos());
    assert_eq!((pa.point.exits, pa.point.rip, pa.fp, pa.end), (pb.point.exits, pb.point.rip, pb.fp, pb.end), "{what}");
    assert_eq!(a.event_index(), b.event_index(), "{what}");
    assert_eq!(a.tl.state_hash().unwrap(), b.tl.state_hash().unwrap(), "{what}");
}

/// Two sessions on `rec` at its start: `a` on the search engine (native
/// runs), `b` on the single-step path kept as its oracle.
fn native_and_stepping(rec: &Arc<Recording>) -> (Session, Session) {
    let mut a = Session::open(rec.clone(), 0).unwrap();
    let mut b = Session::open(rec.clone(), 0).unwrap();
    a.native = true;
    b.native = false;
    (a, b)
}

#[test]
fn native_hits_equal_the_stepping_oracle_for_every_clock() {
    let d = tempfile::tempdir().unwrap();
    let sites = sites();
    for clock in ["exit", "step", "pmu-sim"] {
        let rec = record_race(d.path(), clock, clock);
        let mut tl = Timeline::open(rec.clone(), Sink::Discard).unwrap();
        let (o, scan) = tl.run_scan(Scan::new(sites.clone(), ScanStop::Never, 0, &[]), None).unwrap();
        let (want, want_o) = oracle_hits(&rec, &sites);
        assert_eq!(key(&scan), want, "{clock}: native hits = stepped hits");
        assert!(want.len() > 20, "{clock}: the race runs the loop many times: {}", want.len());
        assert!(want.iter().any(|h| h.1 == irq_timer_body()), "{clock}: a timer handler entered from ring 3 was hit");
        // Both ran to the end and matched the recording's final state hash.
        match (&o, &want_o) {
            (Outcome::Finished { state_hash: a, problems: pa, .. }, Outcome::Finished { state_hash: b, problems: pb, .. }) => {
                assert!(pa.is_empty() && pb.is_empty(), "{clock}: {pa:?} {pb:?}");
                assert_eq!(a, b, "{clock}");
            }
            other => panic!("{clock}: {other:?}"),
        }
        assert!(tl.breakpoint_traps() > 0, "{clock}: hits came from int3 traps, not only from stepping");
    }
}

/// Runs the same gdb-level moves on a native session and a stepping one:
/// same stop reasons, positions, fingerprints and full state hashes.
#[test]
fn continue_and_reverse_continue_equal_the_stepping_path() {
    let d = tempfile::tempdir().unwrap();
    for clock in ["exit", "step"] {
        let rec = record_race(d.path(), clock, clock);
        let (mut a, mut b) = native_and_stepping(&rec);
        let bps: BTreeSet<u64> = [symbol("task_exit"), race_loop_body(), irq_timer_body()].into();
        a.breakpoints = bps.clone();
        b.breakpoints = bps.clone();
        let same = |a: &mut Session, b: &mut Session, wa: &StopWhy, wb: &StopWhy, what: &str| same_stop(a, b, wa, wb, &format!("{clock}: {what}"));
        for i in 0..6 {
            let (wa, wb) = (a.cont().unwrap(), b.cont().unwrap());
            same(&mut a, &mut b, &wa, &wb, &format!("continue {i}"));
        }
        // Standing on a breakpoint: reverse-continue does not report it again.
        for i in 0..4 {
            let here = a.pos();
            let (wa, wb) = (a.reverse_cont().unwrap(), b.reverse_cont().unwrap());
            same(&mut a, &mut b, &wa, &wb, &format!("reverse-continue {i}"));
            assert_ne!((a.pos().point, a.pos().fp), (here.point, here.fp), "{clock}: reverse-continue moved");
        }
        for i in 0..3 {
            let (wa, wb) = (a.reverse_step().unwrap(), b.reverse_step().unwrap());
            same(&mut a, &mut b, &wa, &wb, &format!("reverse-stepi {i} from a native stop"));
        }
        assert!(a.native_runs > 0 && b.native_runs == 0, "{clock}: {} {}", a.native_runs, b.native_runs);
        // Past the last hit: both reach the end; back from the end to the last hit.
        a.breakpoints = [symbol("task_exit")].into();
        b.breakpoints = a.breakpoints.clone();
        loop {
            let (wa, wb) = (a.cont().unwrap(), b.cont().unwrap());
            same(&mut a, &mut b, &wa, &wb, "continue to the end");
            if wa == StopWhy::End {
                break;
            }
        }
        let (wa, wb) = (a.reverse_cont().unwrap(), b.reverse_cont().unwrap());
        same(&mut a, &mut b, &wa, &wb, "reverse-continue from the end");
        assert_eq!(wa, StopWhy::Breakpoint(symbol("task_exit")), "{clock}");
    }
}

/// `make_exact` on a native stop (the n-th arrival at a breakpoint, reached
/// running free) steps to it once, counting: the same exact point (branch
/// count), step count since the exit and state as the stepping path's stop.
#[test]
fn make_exact_at_a_native_stop_equals_the_stepping_paths_point() {
    let d = tempfile::tempdir().unwrap();
    for clock in ["exit", "step"] {
        let rec = record_race(d.path(), clock, clock);
        let (mut a, mut b) = native_and_stepping(&rec);
        let bps: BTreeSet<u64> = [race_loop_body(), irq_timer_body()].into();
        a.breakpoints = bps.clone();
        b.breakpoints = bps;
        let mut anchored = 0;
        for i in 0..8 {
            let what = format!("{clock}: stop {i}");
            let (wa, wb) = if i < 5 { (a.cont().unwrap(), b.cont().unwrap()) } else { (a.reverse_cont().unwrap(), b.reverse_cont().unwrap()) };
            anchored += u64::from(a.pos().anchor.is_some());
            a.make_exact().unwrap();
            same_stop(&mut a, &mut b, &wa, &wb, &what);
            let (pa, pb) = (a.pos(), b.pos());
            assert_eq!((pa.at(), pa.point), (pb.at(), pb.point), "{what}: exit, steps and branch count");
            assert!(pa.anchor.is_none(), "{what}: an exact position counts steps from its exit");
        }
        assert!(anchored >= 5, "{clock}: the stops were native arrivals ({anchored})");
    }
}

#[test]
fn write_watchpoints_at_native_speed_equal_the_stepping_path() {
    use revirt::replay::session::{Watch, WatchKind};
    let d = tempfile::tempdir().unwrap();
    let rec = record_race(d.path(), "exit", "exit");
    let (mut a, mut b) = native_and_stepping(&rec);
    // The shared counter, written by both tasks on every iteration.
    let w = Watch { addr: symbol("race_counter"), len: 8, kind: WatchKind::Write };
    a.watches.push(w.clone());
    b.watches.push(w);
    let same = same_stop;
    for i in 0..5 {
        let (wa, wb) = (a.cont().unwrap(), b.cont().unwrap());
        same(&mut a, &mut b, &wa, &wb, &format!("continue {i}"));
    }
    for i in 0..3 {
        let (wa, wb) = (a.reverse_cont().unwrap(), b.reverse_cont().unwrap());
        same(&mut a, &mut b, &wa, &wb, &format!("reverse-continue {i}"));
    }
    assert!(a.native_runs > 0, "the native session ran natively");
}

/// Read and access watchpoints at native speed (the watched page has no
/// memory slot, so reads exit too) against the stepping path: the same
/// stops, positions, fingerprints and state hashes, forward and reverse.
#[test]
fn read_and_access_watchpoints_at_native_speed_equal_the_stepping_path() {
    use revirt::replay::session::{Watch, WatchKind};
    let d = tempfile::tempdir().unwrap();
    let rec = record_race(d.path(), "exit", "exit");
    for kind in [WatchKind::Read, WatchKind::Access] {
        let (mut a, mut b) = native_and_stepping(&rec);
        let w = Watch { addr: symbol("race_counter"), len: 8, kind };
        a.watches.push(w.clone());
        b.watches.push(w);
        let same = |a: &mut Session, b: &mut Session, wa: &StopWhy, wb: &StopWhy, what: &str| same_stop(a, b, wa, wb, &format!("{kind:?} {what}"));
        for i in 0..5 {
            let (wa, wb) = (a.cont().unwrap(), b.cont().unwrap());
            assert!(matches!(wa, StopWhy::Watch { kind: k, .. } if k == kind), "{kind:?}: {wa:?}");
            same(&mut a, &mut b, &wa, &wb, &format!("continue {i}"));
        }
        for i in 0..3 {
            let steps = a.steps_taken;
            let (wa, wb) = (a.reverse_cont().unwrap(), b.reverse_cont().unwrap());
            same(&mut a, &mut b, &wa, &wb, &format!("reverse-continue {i}"));
            // Back over the accessing instruction at native speed: one
            // step checks it (not the loop iteration stepped since the hit before).
            assert!(a.steps_taken - steps <= 2, "{kind:?} reverse-continue {i}: {} steps", a.steps_taken - steps);
        }
        assert!(a.native_runs > 0 && !a.watched_code, "{kind:?}: the native session ran natively");
        assert!(a.tl.watched_accesses() > 0, "{kind:?}: reads exited to the VMM");
    }
}

/// A read watchpoint on a page of code that runs cannot be watched without
/// a memory slot: the session notices and steps instead (never a silent miss).
#[test]
fn a_read_watchpoint_on_running_code_falls_back_to_stepping() {
    use revirt::replay::session::{Watch, WatchKind};
    let d = tempfile::tempdir().unwrap();
    let rec = record_race(d.path(), "exit", "exit");
    let (mut a, mut b) = native_and_stepping(&rec);
    // Code bytes of the racy loop (never read as data) and a breakpoint.
    let w = Watch { addr: race_loop_body(), len: 1, kind: WatchKind::Read };
    for s in [&mut a, &mut b] {
        s.watches.push(w.clone());
        s.breakpoints = [symbol("task_exit")].into();
    }
    let (wa, wb) = (a.cont().unwrap(), b.cont().unwrap());
    assert_eq!(wa, wb);
    assert_eq!(wa, StopWhy::Breakpoint(symbol("task_exit")));
    assert_eq!((a.pos().point.exits, a.pos().point.rip, a.pos().fp), (b.pos().point.exits, b.pos().point.rip, b.pos().fp));
    assert!(a.watched_code, "the code on the watched page was noticed");
}

/// The block device's DMA writes guest memory without an exit the guest
/// makes: a write watchpoint on the DMA buffer still stops there (just
/// after the `out` that started it; in reverse, just before it), natively
/// as on the stepping path.
#[test]
fn a_dma_write_into_a_watched_range_is_a_hit() {
    use revirt::replay::session::{Watch, WatchKind};
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let data: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 1).collect();
    std::fs::write(&img, &data).unwrap();
    let out = d.path().join("disk");
    record_demo_ok(&out, "workload=disk", &["--disk", img.to_str().unwrap()], b"");
    let rec = Arc::new(Recording::open(&out).unwrap());
    let (mut a, mut b) = native_and_stepping(&rec);
    // Sector 4 of the 8 the workload reads into disk_buf (nothing else writes there).
    let w = Watch { addr: symbol("disk_buf") + 0x800, len: 8, kind: WatchKind::Write };
    a.watches.push(w.clone());
    b.watches.push(w);
    let same = same_stop;
    let (wa, wb) = (a.cont().unwrap(), b.cont().unwrap());
    same(&mut a, &mut b, &wa, &wb, "continue to the DMA");
    assert!(matches!(wa, StopWhy::Watch { .. }), "{wa:?}");
    let mut buf = [0u8; 8];
    a.read_virt(symbol("disk_buf") + 0x800, &mut buf);
    assert_eq!(buf[..], data[0x800..0x808], "the sector's bytes arrived");
    let (wa, wb) = (a.cont().unwrap(), b.cont().unwrap());
    same(&mut a, &mut b, &wa, &wb, "continue to the end");
    assert_eq!(wa, StopWhy::End);
    let (wa, wb) = (a.reverse_cont().unwrap(), b.reverse_cont().unwrap());
    same(&mut a, &mut b, &wa, &wb, "reverse-continue to the DMA");
    assert!(matches!(wa, StopWhy::Watch { .. }), "{wa:?}");
    a.read_virt(symbol("disk_buf") + 0x800, &mut buf);
    assert_ne!(buf[..], data[0x800..0x808], "before the out that started the DMA");
    assert!(a.native_runs > 0);
}

/// The point `last-write` prints for its writer ("at exit .. (E:B:RIP)").
fn last_write_point(rec: &Path, what: &str, native: bool) -> String {
    let o = revirt()
        .env("REVIRT_LASTWRITE_NATIVE", if native { "1" } else { "0" })
        .args(["inspect", rec.to_str().unwrap(), "--at", "end", "-c", &format!("last-write {what} 8")])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    let line = out.lines().find(|l| l.trim_start().starts_with("at ") && l.contains("`seek`")).unwrap_or_else(|| panic!("{out}"));
    line.split('(').nth(1).and_then(|x| x.split(')').next()).unwrap_or_else(|| panic!("{line}")).to_string()
}

/// inspect `last-write` runs on the search engine: from the end of the
/// recording it lands on the instruction gdb's `watch -l` + `reverse-continue`
/// stops before (the same exact point), for a location written once early
/// in a long compute run and for the race counter written all the time.
#[test]
fn last_write_lands_where_gdb_reverse_watch_lands() {
    use revirt::replay::session::{Watch, WatchKind};
    let d = tempfile::tempdir().unwrap();
    let compute = d.path().join("compute");
    record_demo_ok(&compute, "workload=compute iters=2000000", &[], b"");
    let race = d.path().join("race");
    record_demo_ok(&race, "workload=race iters=2000 exits=4 hz=2000", &["--checkpoint-every", "50ms"], b"");
    for (dir, sym) in [(&compute, "cur_task"), (&race, "race_counter")] {
        let rec = Arc::new(Recording::open(dir).unwrap());
        let mut s = Session::open(rec, 0).unwrap();
        assert_eq!(s.cont().unwrap(), StopWhy::End);
        s.watches.push(Watch { addr: symbol(sym), len: 8, kind: WatchKind::Write });
        assert!(matches!(s.reverse_cont().unwrap(), StopWhy::Watch { .. }), "{sym}");
        s.make_exact().unwrap();
        let p = s.pos().point;
        let want = format!("{}:{}:{:#x}", p.exits, p.branches, p.rip);
        assert_eq!(last_write_point(dir, sym, true), want, "{sym}: last-write = gdb");
        if sym == "cur_task" {
            // Written once: the older path (exit by exit, then stepping) agrees.
            assert_eq!(last_write_point(dir, sym, false), want, "{sym}: the older path");
        }
    }
}

/// The target of the first backward jump in `func`: its loop head.
fn loop_head(func: &str) -> u64 {
    let d = demo_disasm(func);
    d.iter()
        .find_map(|(a, t)| {
            let target = t.split_whitespace().nth(1).and_then(|x| u64::from_str_radix(x, 16).ok())?;
            (t.starts_with('j') && target < *a).then_some(target)
        })
        .unwrap_or_else(|| panic!("no loop in {func}"))
}

/// Native hits of a whole replay against the oracle's, and the same end.
fn same_as_oracle(rec: &Arc<Recording>, sites: &BTreeSet<u64>, what: &str) -> (Vec<(u64, u64, u64, u64)>, Timeline) {
    let mut tl = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    let (o, scan) = tl.run_scan(Scan::new(sites.clone(), ScanStop::Never, 0, &[]), None).unwrap();
    let (want, want_o) = oracle_hits(rec, sites);
    assert_eq!(key(&scan), want, "{what}: native hits = stepped hits");
    match (&o, &want_o) {
        (Outcome::Finished { state_hash: a, problems: pa, .. }, Outcome::Finished { state_hash: b, problems: pb, .. }) => {
            assert!(pa.is_empty() && pb.is_empty(), "{what}: {pa:?} {pb:?}");
            assert_eq!(a, b, "{what}");
        }
        other => panic!("{what}: {other:?}"),
    }
    (want, tl)
}

/// Ring 0 runs free with breakpoints set (the ring0 workload never leaves
/// it): breakpoints in its loop, in the console code and at power-off are
/// hit exactly where stepping hits them, by `int3` traps.
#[test]
fn ring0_breakpoints_equal_the_stepping_oracle() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("r0");
    record_demo_ok(&out, "workload=ring0 iters=300", &["--checkpoint-every", "50ms"], b"");
    let rec = Arc::new(Recording::open(&out).unwrap());
    let body = loop_head("compute_run");
    let sites: BTreeSet<u64> = [body, symbol("con_puts"), symbol("power_off"), symbol("ring0_main")].into();
    let (want, tl) = same_as_oracle(&rec, &sites, "ring0");
    assert_eq!(want.iter().filter(|h| h.1 == body).count(), 300, "every iteration of the ring-0 loop");
    assert!(tl.breakpoint_traps() >= 300, "the hits came from int3 traps: {}", tl.breakpoint_traps());
}

/// A breakpoint in code the guest overwrites (selfmod copies sm_v2 over
/// sm_v1 half-way): the write lands while the int3 is out, the next run
/// patches the new code, and every later call is still a hit; the state
/// matches the stepping oracle (which never patches anything).
#[test]
fn a_breakpoint_in_code_the_guest_overwrites_is_hit_before_and_after() {
    let d = tempfile::tempdir().unwrap();
    for clock in ["exit", "step"] {
        let out = d.path().join(clock);
        record_demo_ok(&out, "workload=selfmod iters=40", &["--clock", clock], b"");
        let rec = Arc::new(Recording::open(&out).unwrap());
        let sites: BTreeSet<u64> = [symbol("sm_v1"), symbol("power_off")].into();
        let (want, _) = same_as_oracle(&rec, &sites, clock);
        assert_eq!(want.iter().filter(|h| h.1 == symbol("sm_v1")).count(), 40, "{clock}: sm_v1 called every round");
    }
}

/// A guest reading code bytes under a patched `int3` (selfmod hashes
/// sm_read's code every round; a breakpoint sits on sm_read): what it reads
/// differs from the recording, and the replay says so (its console output
/// is checked as it goes, like every event); it never ends as a clean,
/// matching replay with hits that might be wrong.
#[test]
fn a_guest_reading_code_under_a_patched_int3_is_detected() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("r");
    record_demo_ok(&out, "workload=selfmod iters=40", &[], b"");
    let rec = Arc::new(Recording::open(&out).unwrap());
    let mut tl = Timeline::open(rec.clone(), Sink::Discard).unwrap();
    let sites: BTreeSet<u64> = [symbol("sm_read")].into();
    let (o, _) = tl.run_scan(Scan::new(sites, ScanStop::Never, 0, &[]), None).unwrap();
    match o {
        Outcome::Diverged(why) => assert!(why.contains("console output differs"), "{why}"),
        other => panic!("a read of a patched byte went unnoticed: {other:?}"),
    }
}

/// The automatic fallback for a guest reading code bytes under a patched
/// `int3` (selfmod hashes sm_read's code every round; a breakpoint sits on
/// sm_read): the native run diverges from the recording, the session
/// notices, goes back to where the command started and single-steps its
/// breakpoints from then on, telling the user once. reverse-continue from
/// the end, and continue after it, reach the same stops (reason, registers'
/// fingerprint, next event, state hash) as the stepping oracle, and the
/// replay still matches the recording at its end.
#[test]
fn reading_code_under_a_patched_int3_falls_back_to_the_stepping_path() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("r");
    record_demo_ok(&out, "workload=selfmod iters=40", &[], b"");
    let rec = Arc::new(Recording::open(&out).unwrap());
    let (mut a, mut b) = native_and_stepping(&rec);
    // To the end with nothing set (a free run), then a breakpoint on sm_read.
    for s in [&mut a, &mut b] {
        assert_eq!(s.cont().unwrap(), StopWhy::End);
        s.breakpoints = [symbol("sm_read")].into();
    }
    for i in 0..3 {
        let (wa, wb) = (a.reverse_cont().unwrap(), b.reverse_cont().unwrap());
        same_stop(&mut a, &mut b, &wa, &wb, &format!("reverse-continue {i}"));
        assert_eq!(wa, StopWhy::Breakpoint(symbol("sm_read")), "{i}");
    }
    assert!(a.patched_diverged, "the divergence under patched int3s was noticed");
    assert!(a.note.as_deref().is_some_and(|n| n.contains("reads its own code")), "{:?}", a.note);
    for i in 0..2 {
        let (wa, wb) = (a.cont().unwrap(), b.cont().unwrap());
        same_stop(&mut a, &mut b, &wa, &wb, &format!("continue {i}"));
    }
    a.breakpoints.clear();
    b.breakpoints.clear();
    let (wa, wb) = (a.cont().unwrap(), b.cont().unwrap());
    same_stop(&mut a, &mut b, &wa, &wb, "continue to the end");
    assert_eq!(wa, StopWhy::End);
    assert_eq!(a.end_note, b.end_note);
    let note = a.end_note.clone().unwrap_or_default();
    assert!(note.starts_with("the guest stopped: PowerOff") && !note.contains(" ("), "the replay matches at the end: {note}");
}

/// reverse-stepi from the exit boundary after `compute`'s long exit-free
/// loop, and on back through the function calls before that exit (a
/// function's entry, returns, a loop head, falling through): every step
/// equals the single-stepping oracle's, and the native session found each
/// previous instruction at native speed instead of stepping the interval.
#[test]
fn reverse_stepi_back_from_a_long_interval_equals_the_stepping_path() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("compute");
    record_demo_ok(&dir, "workload=compute iters=3000", &[], b"");
    let rec = Arc::new(Recording::open(&dir).unwrap());
    let (mut a, mut b) = native_and_stepping(&rec);
    // The loop runs in the exit interval that starts at wl_compute.
    a.breakpoints = [symbol("wl_compute")].into();
    assert_eq!(a.cont().unwrap(), StopWhy::Breakpoint(symbol("wl_compute")));
    a.breakpoints.clear();
    let after_loop = a.pos().exits + 1;
    a.goto_exit(after_loop).unwrap();
    b.goto_exit(after_loop).unwrap();
    let stepped = a.steps_taken;
    let mut rips = BTreeSet::new();
    for i in 0..60 {
        let (wa, wb) = (a.reverse_step().unwrap(), b.reverse_step().unwrap());
        same_stop(&mut a, &mut b, &wa, &wb, &format!("reverse-stepi {i}"));
        rips.insert(a.pos().point.rip);
    }
    assert_eq!(a.pos().point.exits, after_loop - 1, "all 60 steps back lie in the long interval");
    // The oracle stepped the whole interval (~45,000 instructions) once;
    // the native session stepped only to check its guesses.
    assert!(b.steps_taken > 20_000, "oracle: {}", b.steps_taken);
    assert!(a.steps_taken - stepped < 1_000, "native: {} steps", a.steps_taken - stepped);
    // The path back left a function through its entry (to the call) and
    // went on into the loop (its head reached by a backward jump).
    let funcs: BTreeSet<String> = rips.iter().map(|&r| demo_function_at(r)).collect();
    assert!(funcs.contains("con_vprintf") && funcs.contains("con_printf") && funcs.contains("wl_compute"), "{funcs:?}");
    assert!(rips.contains(&loop_head("wl_compute")), "the loop's head: {rips:x?}");
    // Back from a return address: the instruction before is the callee's `ret`.
    let call = demo_disasm("wl_compute").into_iter().find(|(_, t)| t.starts_with("call")).unwrap().0;
    let after_call = demo_disasm("wl_compute").into_iter().find(|(a, _)| *a > call).unwrap().0;
    a.breakpoints = [after_call].into();
    b.breakpoints = a.breakpoints.clone();
    let (wa, wb) = (a.cont().unwrap(), b.cont().unwrap());
    same_stop(&mut a, &mut b, &wa, &wb, "continue to the return address");
    a.breakpoints.clear();
    b.breakpoints.clear();
    let stepped = a.steps_taken;
    let mut path = Vec::new();
    for i in 0..3 {
        let (wa, wb) = (a.reverse_step().unwrap(), b.reverse_step().unwrap());
        same_stop(&mut a, &mut b, &wa, &wb, &format!("reverse-stepi {i} from the return address"));
        path.push(demo_function_at(a.pos().point.rip));
    }
    // con_printf's `ret`, its `leave`, then con_vprintf's `ret`.
    assert_eq!(path, ["con_printf", "con_printf", "con_vprintf"], "back into the callees");
    assert!(a.steps_taken - stepped < 100, "native: {} steps", a.steps_taken - stepped);
}
