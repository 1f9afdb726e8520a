//! The step clock's mechanics on real KVM with the real demo guest: every
//! instruction of a run is taken one at a time (ring 0 by KVM, ring 3 through
//! the guest's #DB handler and the stepper's unwinding), the run still does
//! what a normal run does, and the per-step reports are exact and
//! deterministic. The test drives KVM_RUN itself with a minimal device model
//! (serial, clock, timer/PIC, power, debug port) so it sees every exit.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl};
use kvm_ioctls::VcpuExit;
use revirt::vmm::step::{Boundary, StepStop, Stepper};
use revirt::vmm::{Image, Machine, VmConfig};
use vm_memory::{Bytes, GuestAddress};

const TF: u64 = 0x100;
const IF: u64 = 0x200;
const TSS_RSP0: u64 = 0x1084;
const TIMER_VECTOR: u8 = 0x20;

/// Address of symbol `name` in the demo image and of the symbol after it.
fn symbol_range(name: &str) -> (u64, u64) {
    let out = Command::new("nm")
        .arg("-n")
        .arg(common::demo_image())
        .output()
        .expect("run nm");
    let text = String::from_utf8_lossy(&out.stdout);
    let syms: Vec<(u64, String)> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let a = u64::from_str_radix(w.next()?, 16).ok()?;
            let _kind = w.next()?;
            Some((a, w.next()?.to_string()))
        })
        .collect();
    let i = syms
        .iter()
        .position(|(_, n)| n == name)
        .unwrap_or_else(|| panic!("no symbol {name}"));
    let start = syms[i].0;
    let end = syms[i + 1..]
        .iter()
        .map(|s| s.0)
        .find(|&a| a > start)
        .expect("a symbol after it");
    (start, end)
}

/// What one call of the single-loop function at `lo..hi` (compute_run, or
/// its copy inlined into wl_compute) retires for `iters` iterations, found
/// by decoding the image statically: its instructions up to the first `ret`
/// run once, except the body of its one backward Jcc, which runs `iters`
/// times. Returns (instructions, conditional branches).
fn static_counts(lo: u64, hi: u64, iters: u64) -> (u64, u64) {
    let img = Image::load_file(&common::demo_image()).unwrap();
    let seg = img
        .segments
        .iter()
        .find(|s| (s.paddr..s.paddr + s.data.len() as u64).contains(&lo))
        .unwrap();
    let off = (lo - seg.paddr) as usize;
    let bytes = &seg.data[off..off + (hi - lo) as usize];
    let mut insns = Vec::new();
    for i in Decoder::with_ip(64, bytes, lo, DecoderOptions::NONE) {
        insns.push(i);
        if i.flow_control() == FlowControl::Return {
            break;
        }
    }
    let back = insns
        .iter()
        .find(|i| {
            i.flow_control() == FlowControl::ConditionalBranch && i.near_branch_target() < i.ip()
        })
        .expect("a loop");
    let in_loop =
        |i: &&iced_x86::Instruction| (back.near_branch_target()..=back.ip()).contains(&i.ip());
    let body = insns.iter().filter(in_loop).count() as u64;
    let cond = |i: &&iced_x86::Instruction| i.flow_control() == FlowControl::ConditionalBranch;
    let body_branches = insns.iter().filter(in_loop).filter(cond).count() as u64;
    let once = insns.len() as u64 - body;
    let once_branches = insns.iter().filter(cond).count() as u64 - body_branches;
    (once + iters * body, once_branches + iters * body_branches)
}

#[derive(Default, Clone)]
struct Opts {
    /// Inject a timer tick every this many ring-3 boundaries (0 = never);
    /// an idle (port 0x528) makes the next possible boundary inject.
    inject_every: u64,
    /// Check every step against an independent decode (costs a KVM_GET_REGS).
    check: bool,
    /// Disarm after this many steps and run the rest freely.
    disarm_after: Option<u64>,
    /// Write this byte at this address after boot (int3 / int1 probes).
    patch: Option<(u64, u8)>,
    /// Count retired instructions and branches whose RIP lies in this range.
    range: Option<(u64, u64)>,
}

#[derive(Debug, Default)]
struct Outcome {
    output: String,
    /// Power-off status, or `Err(vector)` for a guest panic report.
    end: Option<Result<u32, u32>>,
    steps: u64,
    branches: u64,
    ring0: u64,
    ring3: u64,
    time_ring0: Duration,
    time_ring3: Duration,
    /// Hash of the (rip, cpl, branch) sequence.
    hash: u64,
    injections: u64,
    in_range: u64,
    branches_in_range: u64,
    bad: Vec<String>,
    guest_debugs: u64,
    /// (eax, frame) of each report on the debug port 0x560.
    debug_reports: Vec<(u64, [u64; 5])>,
    /// IN/OUT exits seen while stepping (the first 64), and how each resolved.
    io_log: Vec<String>,
    /// Reads of the clock port 0x500.
    clock_reads: u64,
}

struct Devices {
    timer_on: bool,
    mask: u32,
    in_service: bool,
    force_tick: bool,
}

fn le(d: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    b[..d.len().min(4)].copy_from_slice(&d[..d.len().min(4)]);
    u32::from_le_bytes(b)
}

enum Io {
    Continue,
    End(Result<u32, u32>),
    DebugReport,
}

fn io_in(dev: &Devices, port: u16, data: &mut [u8], clock: u64) {
    let v: u32 = match port {
        0x3FD => 0x60, // LSR: transmitter empty, no input
        0x3F8..=0x3FF => 0,
        0x500 => clock as u32,
        0x504 => (clock >> 32) as u32,
        0x524 => dev.mask,
        _ => 0xFFFF_FFFF,
    };
    let b = v.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&b[..n]);
}

fn io_out(dev: &mut Devices, out: &mut String, port: u16, data: &[u8], rax: u64) -> Io {
    let v = le(data);
    match port {
        0x3F8 => out.push(data[0] as char),
        0x510 => dev.timer_on = v != 0,
        0x520 => dev.in_service = false,
        0x524 => dev.mask = v & 0xFFFF,
        0x528 => dev.force_tick = true,
        0x550 => return Io::End(Ok(v & 0xFF)),
        0x554 => return Io::End(Err(rax as u32)),
        0x560 => return Io::DebugReport,
        _ => {}
    }
    Io::Continue
}

fn read_frame(m: &Machine, at: u64) -> [u64; 5] {
    let mut f = [0u64; 5];
    for (i, w) in f.iter_mut().enumerate() {
        *w = m.mem.read_obj(GuestAddress(at + 8 * i as u64)).unwrap();
    }
    f
}

/// A guest #BP report on port 0x560: record it, put the original byte back
/// and rewind the frame's RIP onto it (what a GDB stub does).
fn handle_debug_report(m: &Machine, o: &mut Outcome, opts: &Opts, original: Option<u8>) {
    let r = m.vcpu.regs().unwrap();
    let f = read_frame(m, r.rdi);
    o.debug_reports.push((r.rax, f));
    if let (Some((addr, _)), Some(b)) = (opts.patch, original) {
        m.mem.write_obj(b, GuestAddress(addr)).unwrap();
        m.mem.write_obj(f[0] - 1, GuestAddress(r.rdi)).unwrap();
    }
}

/// Independent check of one step: is `to` a possible successor of the
/// instruction at `from` (decoded here, not by the stepper), and is the
/// stepper's branch flag right?
fn check_step(
    m: &Machine,
    from: &kvm_bindings::kvm_regs,
    from_cpl: u8,
    injected: bool,
    b: &Boundary,
) -> Option<String> {
    let mut bytes = [0u8; 15];
    m.mem
        .read_slice(&mut bytes, GuestAddress(from.rip))
        .unwrap();
    let ins = Decoder::with_ip(64, &bytes, from.rip, DecoderOptions::NONE).decode();
    let next = from.rip + ins.len() as u64;
    let is_rep = ins.has_rep_prefix() || ins.has_repe_prefix() || ins.has_repne_prefix();
    let top = |a: u64| m.mem.read_obj::<u64>(GuestAddress(a)).unwrap();
    let ok = if injected {
        b.cpl == 0 // delivery + the handler's first instruction
    } else {
        match ins.flow_control() {
            // A string instruction with REP stops after every iteration.
            FlowControl::Next => b.rip == next || (is_rep && b.rip == from.rip),
            FlowControl::UnconditionalBranch | FlowControl::Call => {
                b.rip == ins.near_branch_target()
            }
            FlowControl::ConditionalBranch => b.rip == next || b.rip == ins.near_branch_target(),
            FlowControl::Return => b.rip == top(from.rsp),
            FlowControl::Interrupt if ins.code() == Code::Iretq => b.rip == top(from.rsp),
            // int3/int1: delivered to ring 0, the handler's first instruction ran.
            FlowControl::Interrupt => b.cpl == 0,
            _ => true,
        }
    };
    let want_branch =
        !injected && ins.flow_control() == FlowControl::ConditionalBranch && b.cpl == from_cpl;
    if !ok || want_branch != b.branch_retired {
        return Some(format!(
            "step from {:#x} ({:?}, cpl {from_cpl}, injected {injected}) to {:#x} cpl {} branch {}",
            from.rip,
            ins.code(),
            b.rip,
            b.cpl,
            b.branch_retired
        ));
    }
    None
}

/// Boots the demo guest with `cmdline` and single-steps it to its end.
fn step_run(cmdline: &str, opts: &Opts) -> Outcome {
    let img = Image::load_file(&common::demo_image()).unwrap();
    let cfg = VmConfig {
        cmdline: cmdline.to_string(),
        ..Default::default()
    };
    let mut m = Machine::boot(&cfg, &img).unwrap();
    let original = opts.patch.map(|(addr, byte)| {
        let old: u8 = m.mem.read_obj(GuestAddress(addr)).unwrap();
        m.mem.write_obj(byte, GuestAddress(addr)).unwrap();
        old
    });
    let mut o = Outcome {
        hash: 0xcbf2_9ce4_8422_2325,
        ..Default::default()
    };
    let mut dev = Devices {
        timer_on: false,
        mask: 0xFFFF,
        in_service: false,
        force_tick: false,
    };
    let mut st = Stepper::new();
    st.arm(&m.vcpu, &m.mem).unwrap();
    let mut prev = m.vcpu.regs().unwrap();
    let mut prev_cpl = 0u8;
    let mut injected = false;
    let mut check_frame_tf = false;
    let mut t = Instant::now();
    while o.end.is_none() && o.steps < 5_000_000 {
        if opts.disarm_after == Some(o.steps) {
            st.disarm(&m.vcpu).unwrap();
            free_run(&mut m, &mut dev, &mut o, opts, original);
            break;
        }
        let mut stop: Option<Boundary> = None;
        if let Some(s) = st.before_run(&m.vcpu, &m.mem).unwrap() {
            let StepStop::Boundary(b) = s else {
                panic!("before_run returned {s:?}")
            };
            stop = Some(b);
        } else {
            match m.vcpu.fd.run() {
                Ok(VcpuExit::Debug(d)) => match st.on_debug_exit(&m.vcpu, &m.mem, &d).unwrap() {
                    StepStop::Boundary(b) => stop = Some(b),
                    StepStop::Internal => {}
                    StepStop::GuestDebug(b) => {
                        o.guest_debugs += 1;
                        stop = Some(b);
                    }
                },
                Ok(VcpuExit::IoIn(port, data)) => {
                    io_in(&dev, port, data, o.steps);
                    o.clock_reads += (port == 0x500) as u64;
                    let b = st.on_other_exit(&m.vcpu, &m.mem).unwrap();
                    if o.io_log.len() < 64 {
                        o.io_log.push(format!(
                            "IN {port:#x} from {:#x}: retired at the exit: {}",
                            prev.rip,
                            b.is_some()
                        ));
                    }
                    stop = b;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    let data = data.to_vec();
                    let rax = m.vcpu.regs().unwrap().rax;
                    match io_out(&mut dev, &mut o.output, port, &data, rax) {
                        Io::End(e) => o.end = Some(e),
                        Io::DebugReport => handle_debug_report(&m, &mut o, opts, original),
                        Io::Continue => {}
                    }
                    let b = st.on_other_exit(&m.vcpu, &m.mem).unwrap();
                    if o.io_log.len() < 64 {
                        o.io_log.push(format!(
                            "OUT {port:#x} from {:#x}: retired at the exit: {}",
                            prev.rip,
                            b.is_some()
                        ));
                    }
                    stop = b;
                }
                Ok(e) => panic!("unexpected exit {e:?} after {} steps", o.steps),
                Err(e) => panic!("KVM_RUN: {e} after {} steps", o.steps),
            }
        }
        let Some(b) = stop else { continue };
        let dt = t.elapsed();
        if prev_cpl == 3 {
            o.time_ring3 += dt
        } else {
            o.time_ring0 += dt
        }
        o.steps += 1;
        if b.cpl == 3 {
            o.ring3 += 1
        } else {
            o.ring0 += 1
        }
        o.branches += b.branch_retired as u64;
        o.hash = (o.hash ^ b.rip ^ ((b.cpl as u64) << 48) ^ ((b.branch_retired as u64) << 63))
            .wrapping_mul(0x100_0000_01b3);
        if let Some((lo, hi)) = opts.range {
            if (lo..hi).contains(&prev.rip) && !injected {
                o.in_range += 1;
                o.branches_in_range += b.branch_retired as u64;
            }
        }
        if opts.check {
            let r = m.vcpu.regs().unwrap();
            if r.rip != b.rip {
                o.bad.push(format!(
                    "boundary says rip {:#x}, the vCPU is at {:#x}",
                    b.rip, r.rip
                ));
            }
            if let Some(e) = check_step(&m, &prev, prev_cpl, injected, &b) {
                o.bad.push(e);
            }
            if check_frame_tf {
                // The tick's frame on the ring-0 stack must not carry our TF.
                let rsp0: u64 = m.mem.read_obj(GuestAddress(TSS_RSP0)).unwrap();
                let f = read_frame(&m, (rsp0 & !0xf) - 40);
                if f[2] & TF != 0 {
                    o.bad
                        .push(format!("interrupt frame rflags {:#x} carries TF", f[2]));
                }
                check_frame_tf = false;
            }
        }
        prev = if opts.check || opts.range.is_some() || b.cpl == 3 {
            m.vcpu.regs().unwrap()
        } else {
            prev
        };
        prev.rip = b.rip;
        prev_cpl = b.cpl;
        injected = false;
        // Timer ticks land at ring-3 boundaries, the step clock's natural instants.
        let tick_due = dev.timer_on
            && dev.mask & 1 == 0
            && !dev.in_service
            && (dev.force_tick
                || (opts.inject_every > 0 && o.ring3.is_multiple_of(opts.inject_every)));
        if b.cpl == 3 && tick_due && prev.rflags & IF != 0 {
            m.vcpu.inject_interrupt(TIMER_VECTOR).unwrap();
            dev.in_service = true;
            dev.force_tick = false;
            injected = true;
            check_frame_tf = true;
            o.injections += 1;
        }
        t = Instant::now();
    }
    o
}

/// Runs the rest of the guest without stepping; ticks are injected when the
/// guest idles (port 0x528), at the next point it can take one.
fn free_run(
    m: &mut Machine,
    dev: &mut Devices,
    o: &mut Outcome,
    opts: &Opts,
    original: Option<u8>,
) {
    let mut pending = false;
    for _ in 0..10_000_000u64 {
        let run = m.vcpu.fd.get_kvm_run();
        if pending && !dev.in_service {
            if run.ready_for_interrupt_injection != 0 && run.if_flag != 0 {
                run.request_interrupt_window = 0;
                m.vcpu.inject_interrupt(TIMER_VECTOR).unwrap();
                dev.in_service = true;
                pending = false;
            } else {
                run.request_interrupt_window = 1;
            }
        }
        match m.vcpu.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                io_in(dev, port, data, o.steps);
                o.clock_reads += (port == 0x500) as u64;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let data = data.to_vec();
                let rax = m.vcpu.regs().unwrap().rax;
                match io_out(dev, &mut o.output, port, &data, rax) {
                    Io::End(e) => {
                        o.end = Some(e);
                        return;
                    }
                    Io::DebugReport => handle_debug_report(m, o, opts, original),
                    Io::Continue => {}
                }
                if dev.force_tick && dev.timer_on {
                    dev.force_tick = false;
                    pending = true;
                }
            }
            Ok(VcpuExit::IrqWindowOpen) => {}
            Ok(e) => panic!("unexpected exit {e:?} in the free run"),
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    }
    panic!("the free run did not end");
}

fn normal_output(cmdline: &str) -> String {
    let o = common::run_demo(cmdline, &[], b"");
    assert!(
        o.status.success(),
        "normal run of {cmdline} failed: {}",
        common::stderr(&o)
    );
    common::stdout(&o)
}

fn per_step(d: Duration, n: u64) -> f64 {
    d.as_secs_f64() * 1e6 / n.max(1) as f64
}

fn report(name: &str, o: &Outcome) {
    eprintln!(
        "step clock [{name}]: {} steps ({} ring 0, {} ring 3), {} branches; ring 0 {:.1} us/step, ring 3 {:.1} us/step",
        o.steps,
        o.ring0,
        o.ring3,
        o.branches,
        per_step(o.time_ring0, o.ring0),
        per_step(o.time_ring3, o.ring3),
    );
}

#[test]
fn ring3_compute_single_stepped_to_the_end() {
    let cmdline = "workload=compute iters=200";
    // compute.c's loop is inlined into wl_compute.
    let (lo, hi) = symbol_range("wl_compute");
    let opts = Opts {
        check: true,
        range: Some((lo, hi)),
        ..Default::default()
    };
    let a = step_run(cmdline, &opts);
    assert!(
        a.bad.is_empty(),
        "inexact steps: {:#?}",
        &a.bad[..a.bad.len().min(10)]
    );
    assert_eq!(a.end, Some(Ok(0)), "output: {}", a.output);
    assert_eq!(a.output, normal_output(cmdline));
    assert!(a
        .output
        .contains(&format!("result=0x{:016x}", common::compute_result(200))));
    // Exactly the instructions and branches the code holds, no step skipped
    // or taken twice.
    assert_eq!(
        (a.in_range, a.branches_in_range),
        static_counts(lo, hi, 200),
        "retired in wl_compute"
    );
    assert!(a.ring3 > a.in_range && a.ring0 > 0 && a.branches > 201);
    // Deterministic: the same run, unchecked and timed, steps identically.
    let b = step_run(cmdline, &Opts::default());
    assert_eq!((a.steps, a.branches, a.hash), (b.steps, b.branches, b.hash));
    assert_eq!(a.output, b.output);
    report("compute, ring 3", &b);
    for l in a.io_log.iter().take(6) {
        eprintln!("  {l}");
    }
}

#[test]
fn ring0_compute_single_stepped_to_the_end() {
    let cmdline = "workload=ring0 iters=50";
    let (lo, hi) = symbol_range("compute_run");
    let opts = Opts {
        check: true,
        range: Some((lo, hi)),
        ..Default::default()
    };
    let a = step_run(cmdline, &opts);
    assert!(
        a.bad.is_empty(),
        "inexact steps: {:#?}",
        &a.bad[..a.bad.len().min(10)]
    );
    assert_eq!(a.end, Some(Ok(0)), "output: {}", a.output);
    assert_eq!(a.output, normal_output(cmdline));
    assert_eq!(a.ring3, 0, "the ring0 workload never enters ring 3");
    assert_eq!(
        (a.in_range, a.branches_in_range),
        static_counts(lo, hi, 50),
        "retired in compute_run"
    );
    let b = step_run(cmdline, &Opts::default());
    assert_eq!((a.steps, a.branches, a.hash), (b.steps, b.branches, b.hash));
    report("ring0", &b);
    for l in a.io_log.iter().take(4) {
        eprintln!("  {l}");
    }
}

#[test]
fn race_with_ticks_injected_at_step_boundaries() {
    // Ticks at ring-3 boundaries: into ring 0, through the timer handler's
    // task switch, and back through the VMM-executed iretq.
    let cmdline = "workload=race iters=300";
    let opts = Opts {
        check: true,
        inject_every: 499,
        ..Default::default()
    };
    let a = step_run(cmdline, &opts);
    assert!(
        a.bad.is_empty(),
        "inexact steps: {:#?}",
        &a.bad[..a.bad.len().min(10)]
    );
    assert_eq!(a.end, Some(Ok(0)), "output: {}", a.output);
    let line = a
        .output
        .lines()
        .find(|l| l.starts_with("race:"))
        .expect("race line");
    assert_eq!(common::field(line, "expected").as_deref(), Some("600"));
    assert_eq!(common::field(line, "ticks"), Some(a.injections.to_string()));
    assert!(a.injections > 10, "{} ticks", a.injections);
    // The same ticks at the same boundaries give the same run.
    let b = step_run(
        cmdline,
        &Opts {
            inject_every: 499,
            ..Default::default()
        },
    );
    assert_eq!(
        (a.steps, a.branches, a.hash, &a.output),
        (b.steps, b.branches, b.hash, &b.output)
    );
    report("race with ticks", &b);
}

#[test]
fn disarming_mid_run_leaves_no_trace() {
    // Step through several ticks, then let the guest run freely: no TF left
    // in a saved interrupt frame, no stray #DB, the workload completes.
    let cmdline = "workload=race iters=2000";
    let o = step_run(
        cmdline,
        &Opts {
            inject_every: 499,
            disarm_after: Some(6000),
            ..Default::default()
        },
    );
    assert!(o.injections >= 5, "{} ticks while stepping", o.injections);
    assert_eq!(o.end, Some(Ok(0)), "output: {}", o.output);
    assert!(o.output.contains("race: counter="), "{}", o.output);
}

#[test]
fn race_exits_option_reads_the_clock_inside_the_window() {
    let a = step_run("workload=race iters=20 exits=4", &Opts::default());
    let b = step_run("workload=race iters=20", &Opts::default());
    assert_eq!(a.end, Some(Ok(0)), "{}", a.output);
    assert_eq!(b.end, Some(Ok(0)), "{}", b.output);
    assert_eq!(
        a.clock_reads - b.clock_reads,
        2 * 20 / 4,
        "one clock read per 4 iterations per task"
    );
}

#[test]
fn int3_in_ring3_reports_on_the_debug_port() {
    let (lo, _) = symbol_range("wl_compute");
    let iters = 1000;
    let cmdline = format!("workload=compute iters={iters}");
    let want = format!("result=0x{:016x}", common::compute_result(iters));
    for stepped in [false, true] {
        // Armed from boot or disarmed at once: the same harness either way.
        let opts = Opts {
            patch: Some((lo, 0xCC)),
            check: stepped,
            disarm_after: if stepped { None } else { Some(0) },
            ..Default::default()
        };
        let o = step_run(&cmdline, &opts);
        assert!(o.bad.is_empty(), "stepped={stepped}: {:#?}", o.bad);
        assert_eq!(o.end, Some(Ok(0)), "stepped={stepped}: {}", o.output);
        assert!(o.output.contains(&want), "stepped={stepped}: {}", o.output);
        assert_eq!(o.debug_reports.len(), 1, "stepped={stepped}");
        let (eax, f) = o.debug_reports[0];
        assert_eq!(eax, 3, "#BP");
        assert_eq!(f[0], lo + 1, "frame rip is after the int3");
        assert_eq!(f[1], 0x33, "from ring 3");
        assert_eq!(f[4], 0x2B);
    }
}

#[test]
fn a_guest_debug_trap_of_its_own_goes_to_the_guest() {
    // `int1` (icebp) in ring 3 raises a #DB that is the guest's, not ours:
    // the stepper reports it and leaves it to the guest's handler, which
    // reports vector 1 on the panic port, as it does without stepping.
    let (lo, _) = symbol_range("wl_compute");
    for stepped in [false, true] {
        let opts = Opts {
            patch: Some((lo, 0xF1)),
            disarm_after: if stepped { None } else { Some(0) },
            ..Default::default()
        };
        let o = step_run("workload=compute iters=10", &opts);
        assert_eq!(o.end, Some(Err(1)), "stepped={stepped}: {}", o.output);
        assert_eq!(o.guest_debugs, stepped as u64);
    }
}
