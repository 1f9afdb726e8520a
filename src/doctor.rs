//! `revirt doctor`: what this host's KVM can do, found by running tiny probe
//! guests rather than by reading version strings, and which replay clocks
//! that allows (design-notes §3).

use std::fmt::Write as _;

use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::{Kvm, VcpuExit};
use serde::Serialize;

use crate::vmm::image::{Image, Segment};
use crate::vmm::{Machine, VmConfig};

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub ok: bool,
    pub detail: String,
}

impl Check {
    fn yes(d: impl Into<String>) -> Check {
        Check { ok: true, detail: d.into() }
    }
    fn no(d: impl Into<String>) -> Check {
        Check { ok: false, detail: d.into() }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ClockSupport {
    pub name: &'static str,
    pub available: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub kvm: Check,
    pub pmu: Check,
    /// The start-up probe guest under that counter (what `record`/`replay
    /// --clock pmu` demand before trusting it).
    pub pmu_probe: Check,
    pub singlestep_ring0: Check,
    pub singlestep_ring3: Check,
    pub hw_breakpoint_ring0: Check,
    pub hw_breakpoint_ring3: Check,
    pub interrupt_injection_ring0: Check,
    pub interrupt_injection_ring3: Check,
    pub clocks: Vec<ClockSupport>,
}

const RING0: u64 = 0x100000;
const RING3: u64 = 0x101000;
const HANDLER: u64 = 0x102000;
const IDTR: u64 = 0x102100;
const IDT: u64 = 0x103000;
const USER_STACK: u64 = 0x180000;

/// Ring-0 prologue that drops to ring 3 at RING3 with IF clear (no interrupts
/// in the step/breakpoint probes) or set (the injection probe).
fn to_ring3(rflags: u32) -> Vec<u8> {
    let mut c = vec![0x6A, 0x2B]; // push ss
    c.push(0x68); // push rsp
    c.extend_from_slice(&(USER_STACK as u32).to_le_bytes());
    c.push(0x68); // push rflags
    c.extend_from_slice(&rflags.to_le_bytes());
    c.extend_from_slice(&[0x6A, 0x33]); // push cs
    c.push(0x68); // push rip
    c.extend_from_slice(&(RING3 as u32).to_le_bytes());
    c.extend_from_slice(&[0x48, 0xCF]); // iretq
    c
}

/// nop; nop; nop; mov dx, 0x550; out dx, al  (power off)
const NOPS_THEN_OFF: &[u8] = &[0x90, 0x90, 0x90, 0x66, 0xBA, 0x50, 0x05, 0xEE];

fn probe_image(ring0: Vec<u8>, ring3: Vec<u8>, with_idt: bool) -> Image {
    let mut mem = vec![0u8; 0x4000];
    mem[..ring0.len()].copy_from_slice(&ring0);
    mem[0x1000..0x1000 + ring3.len()].copy_from_slice(&ring3);
    // Interrupt handler: mov al, 0x42; mov dx, 0x550; out dx, al
    // Vector 0x20 powers off with 0x42; every other vector (a fault) with 0x99,
    // so a probe that faulted is never mistaken for a delivered interrupt.
    let handler = [0xB0, 0x42, 0x66, 0xBA, 0x50, 0x05, 0xEE];
    mem[0x2000..0x2000 + handler.len()].copy_from_slice(&handler);
    let fault = [0xB0, 0x99, 0x66, 0xBA, 0x50, 0x05, 0xEE];
    mem[0x2040..0x2040 + fault.len()].copy_from_slice(&fault);
    if with_idt {
        let idtr = 0x2100;
        mem[idtr..idtr + 2].copy_from_slice(&(256u16 * 16 - 1).to_le_bytes());
        mem[idtr + 2..idtr + 10].copy_from_slice(&IDT.to_le_bytes());
        for v in 0..256usize {
            let g = 0x3000 + v * 16;
            let h = if v == 0x20 { HANDLER } else { HANDLER + 0x40 };
            mem[g..g + 2].copy_from_slice(&(h as u16).to_le_bytes());
            mem[g + 2..g + 4].copy_from_slice(&0x10u16.to_le_bytes());
            mem[g + 5] = 0x8E; // present, DPL 0, interrupt gate
            mem[g + 6..g + 8].copy_from_slice(&((h >> 16) as u16).to_le_bytes());
        }
    }
    Image { entry: RING0, segments: vec![Segment { paddr: RING0, memsz: 0x4000, data: mem }] }
}

fn lidt() -> Vec<u8> {
    let mut c = vec![0x0F, 0x01, 0x1C, 0x25]; // lidt [disp32]
    c.extend_from_slice(&(IDTR as u32).to_le_bytes());
    c
}

fn boot(image: &Image) -> Result<Machine, String> {
    let cfg = VmConfig { mem_size: 4 << 20, ..Default::default() };
    Machine::boot(&cfg, image).map_err(|e| e.to_string())
}

#[derive(Debug)]
enum Outcome {
    Debug(u64),
    PowerOff,
    Other(String),
}

/// Runs the probe with the given guest-debug flags and DR0/DR7, collecting up
/// to `max` debug-exit RIPs before power-off or anything else stops it.
fn run_debug_probe(image: &Image, control: u32, dr0: u64) -> Result<Vec<Outcome>, String> {
    let mut m = boot(image)?;
    let mut dbg = kvm_guest_debug { control, ..Default::default() };
    dbg.arch.debugreg[0] = dr0;
    dbg.arch.debugreg[7] = if control & KVM_GUESTDBG_USE_HW_BP != 0 { 0x1 } else { 0 };
    m.vcpu.fd.set_guest_debug(&dbg).map_err(|e| format!("KVM_SET_GUEST_DEBUG: {e}"))?;
    let mut out = Vec::new();
    for _ in 0..64 {
        let o = match m.vcpu.fd.run() {
            Ok(VcpuExit::Debug(a)) => Outcome::Debug(a.pc),
            Ok(VcpuExit::IoOut(0x550, _)) => Outcome::PowerOff,
            Ok(e) => Outcome::Other(format!("{e:?}")),
            Err(e) => Outcome::Other(format!("KVM_RUN: {e}")),
        };
        let stop = !matches!(o, Outcome::Debug(_));
        if let Outcome::Debug(_) = o {
            if control & KVM_GUESTDBG_USE_HW_BP != 0 {
                // Step over the breakpoint: disarm, it was reported once.
                dbg.arch.debugreg[7] = 0;
                m.vcpu.fd.set_guest_debug(&dbg).map_err(|e| e.to_string())?;
            }
        }
        out.push(o);
        if stop {
            break;
        }
    }
    Ok(out)
}

fn debug_check(image: &Image, control: u32, dr0: u64, want: std::ops::Range<u64>, what: &str) -> Check {
    match run_debug_probe(image, control, dr0) {
        Err(e) => Check::no(format!("probe failed: {e}")),
        Ok(outs) => {
            let hits: Vec<u64> = outs
                .iter()
                .filter_map(|o| match o {
                    Outcome::Debug(pc) if want.contains(pc) => Some(*pc),
                    _ => None,
                })
                .collect();
            if !hits.is_empty() {
                Check::yes(format!("{what}: KVM reported {} debug exit(s) in the probe code", hits.len()))
            } else {
                let ending = match outs.last() {
                    Some(Outcome::Other(e)) if e == "Shutdown" => {
                        "the debug trap went to the guest's own IDT instead (the probe triple-faulted)".to_string()
                    }
                    Some(Outcome::PowerOff) => "the probe ran to its end without a trap".to_string(),
                    Some(o) => format!("the probe ended with {o:?}"),
                    None => "no exit".to_string(),
                };
                Check::no(format!("{what}: no debug exit reached the VMM; {ending}"))
            }
        }
    }
}

fn injection_check(ring3: bool) -> Check {
    // ring 0: lidt; sti; hlt; jmp hlt.  ring 3: lidt; iretq to `out 0x600; jmp` loop with IF=1.
    let mut r0 = lidt();
    let mut r3 = Vec::new();
    if ring3 {
        r0.extend(to_ring3(0x3202));
        r3.extend_from_slice(&[0x66, 0xBA, 0x00, 0x06, 0xEE, 0xEB, 0xFB]); // mov dx,0x600; out; jmp -5
    } else {
        r0.extend_from_slice(&[0xFB, 0xF4, 0xEB, 0xFD]); // sti; hlt; jmp -3
    }
    let img = probe_image(r0, r3, true);
    let mut m = match boot(&img) {
        Ok(m) => m,
        Err(e) => return Check::no(format!("probe failed: {e}")),
    };
    let mut injected = false;
    for _ in 0..10_000 {
        let run = m.vcpu.fd.get_kvm_run();
        let ready = run.ready_for_interrupt_injection != 0 && run.if_flag != 0;
        if !injected {
            if ready {
                if let Err(e) = m.vcpu.inject_interrupt(0x20) {
                    return Check::no(format!("KVM_INTERRUPT failed: {e}"));
                }
                injected = true;
            } else {
                run.request_interrupt_window = 1;
            }
        } else {
            run.request_interrupt_window = 0;
        }
        match m.vcpu.fd.run() {
            Ok(VcpuExit::IoOut(0x550, d)) if d.first() == Some(&0x42) => {
                return Check::yes("an injected interrupt reached the guest's handler");
            }
            Ok(VcpuExit::IoOut(0x550, _)) => {
                return Check::no("the probe faulted before the interrupt was delivered");
            }
            Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) => {}
            Ok(e) => return Check::no(format!("probe stopped with {e:?}")),
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Check::no(format!("KVM_RUN: {e}")),
        }
    }
    Check::no("the injected interrupt never reached the guest's handler")
}

/// The PMU clock on this host: the counter `--clock pmu` opens (the same
/// raw event on the same PMU, the thread pinned the same way on hybrid
/// hosts) and the start-up probe's verdict on it, exactly as `record` and
/// `replay` check it. Without a usable counter the probe guest still runs
/// under the step clock, which says what the counter would have to count.
pub fn pmu_status(kvm_ok: bool) -> (Check, Check) {
    use crate::clock::pmu::PmuChoice;
    use crate::vmm::counter::PmuError;
    use crate::clock::probe;
    let paranoid = || {
        std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid").map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
    };
    let step_clock = || -> String {
        if !kvm_ok {
            return "the probe guest needs KVM".into();
        }
        match probe::step_clock_count() {
            Ok(n) if n == probe::EXPECTED => {
                format!("the step clock counts {n} conditional branches in the probe guest, as expected")
            }
            Ok(n) => format!("the step clock counts {n} conditional branches in the probe guest, NOT the expected {}", probe::EXPECTED),
            Err(e) => format!("the probe guest did not run under the step clock: {e}"),
        }
    };
    let choice = match PmuChoice::host() {
        Ok(c) => c,
        Err(e) => {
            return (Check::no(e.to_string()), Check::no(format!("not run on a hardware counter (none here); {}", step_clock())));
        }
    };
    if !kvm_ok {
        return (Check::yes(choice.describe()), Check::no("not run: the probe guest needs KVM"));
    }
    match probe::check(&crate::clock::pmu::hardware_opener()) {
        Ok(v) => (Check::yes(choice.describe()), Check::yes(v.to_string())),
        Err(e @ (PmuError::Miscount { .. } | PmuError::ProbeOverflow { .. } | PmuError::Probe(_))) => {
            (Check::yes(choice.describe()), Check::no(format!("{e}; {}", step_clock())))
        }
        Err(e) => {
            let hint = match &e {
                PmuError::Open { source, .. } if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
                    format!(" (permission denied, perf_event_paranoid = {}: run as root or lower it)", paranoid())
                }
                _ => String::new(),
            };
            (
                Check::no(format!("{}: {e}{hint}", choice.describe())),
                Check::no(format!("not run: the counter did not open; {}", step_clock())),
            )
        }
    }
}

pub fn probe() -> Report {
    let kvm = match Kvm::new() {
        Ok(k) => Check::yes(format!(
            "/dev/kvm opened, KVM API version {}",
            k.get_api_version()
        )),
        Err(e) => Check::no(format!("cannot open /dev/kvm: {e}")),
    };
    let (pmu, pmu_probe) = pmu_status(kvm.ok);
    let skip = || Check::no("not probed: KVM is unavailable");
    let (ss0, ss3, bp0, bp3, inj0, inj3) = if !kvm.ok {
        (skip(), skip(), skip(), skip(), skip(), skip())
    } else {
        let mut r0 = vec![0x90; 3];
        r0.extend_from_slice(NOPS_THEN_OFF);
        let ring0_img = probe_image(r0, vec![], false);
        let ring3_img = probe_image(to_ring3(0x3002), NOPS_THEN_OFF.to_vec(), false);
        let step = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        let hw = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
        (
            debug_check(&ring0_img, step, 0, RING0 + 1..RING0 + 12, "ring 0 single-step"),
            debug_check(&ring3_img, step, 0, RING3 + 1..RING3 + 8, "ring 3 single-step"),
            debug_check(&ring0_img, hw, RING0 + 4, RING0 + 4..RING0 + 5, "ring 0 hardware breakpoint"),
            debug_check(&ring3_img, hw, RING3 + 2, RING3 + 2..RING3 + 3, "ring 3 hardware breakpoint"),
            injection_check(false),
            injection_check(true),
        )
    };
    let mut clocks = Vec::new();
    let inj = inj0.ok && inj3.ok;
    clocks.push(ClockSupport {
        name: "exit",
        available: kvm.ok && inj,
        detail: if kvm.ok && inj {
            "interrupts delivered at guest-caused exits; native speed between exits".into()
        } else {
            "needs KVM with working interrupt injection".into()
        },
    });
    let step_ok = kvm.ok && ss0.ok;
    clocks.push(ClockSupport {
        name: "step",
        available: step_ok,
        detail: match (ss0.ok, ss3.ok) {
            (true, true) => "KVM single-steps every ring; slow but exact".into(),
            (true, false) => "KVM single-steps ring 0 only; ring 3 needs the guest's own #DB handler (the demo guest has one); slow but exact".into(),
            _ => "needs KVM single-step, which does not work here".into(),
        },
    });
    clocks.push(ClockSupport {
        name: "pmu",
        available: kvm.ok && pmu.ok && pmu_probe.ok,
        detail: if pmu.ok && pmu_probe.ok {
            "branch-counter overflow near the target, then breakpoint/step onto it".into()
        } else if pmu.ok {
            format!("the counter failed the start-up probe: {}", pmu_probe.detail)
        } else {
            format!("no usable PMU: {}", pmu.detail)
        },
    });
    Report {
        kvm,
        pmu,
        pmu_probe,
        singlestep_ring0: ss0,
        singlestep_ring3: ss3,
        hw_breakpoint_ring0: bp0,
        hw_breakpoint_ring3: bp3,
        interrupt_injection_ring0: inj0,
        interrupt_injection_ring3: inj3,
        clocks,
    }
}

impl Report {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mark = |c: &Check| if c.ok { "yes" } else { "NO " };
        let _ = writeln!(s, "revirt doctor: what this host can do\n");
        for (name, c) in [
            ("KVM", &self.kvm),
            ("hardware PMU (branch counter)", &self.pmu),
            ("PMU start-up probe", &self.pmu_probe),
            ("single-step, ring 0", &self.singlestep_ring0),
            ("single-step, ring 3", &self.singlestep_ring3),
            ("hardware breakpoints, ring 0", &self.hw_breakpoint_ring0),
            ("hardware breakpoints, ring 3", &self.hw_breakpoint_ring3),
            ("interrupt injection, ring 0", &self.interrupt_injection_ring0),
            ("interrupt injection, ring 3", &self.interrupt_injection_ring3),
        ] {
            let _ = writeln!(s, "  [{}] {name:<31} {}", mark(c), c.detail);
        }
        let _ = writeln!(s, "\nreplay clocks:");
        let _ = writeln!(s, "  (--clock auto picks: {})", choose_auto(&self.pmu, &self.pmu_probe).0);
        for c in &self.clocks {
            let _ = writeln!(
                s,
                "  {:<5} {}  {}",
                c.name,
                if c.available { "available  " } else { "unavailable" },
                c.detail
            );
        }
        s
    }
}

/// What `--clock auto` picks on this host, and why: `pmu` only when the
/// counter `--clock pmu` would use opens and passes the start-up probe.
pub fn auto_clock() -> (crate::clock::ClockKind, String) {
    let kvm_ok = Kvm::new().is_ok();
    let (pmu, probe) = pmu_status(kvm_ok);
    choose_auto(&pmu, &probe)
}

fn choose_auto(pmu: &Check, probe: &Check) -> (crate::clock::ClockKind, String) {
    use crate::clock::ClockKind;
    const SLOW: &str = "For interrupts at their natural instant use --clock step or pmu-sim (single-stepping, slow)";
    if pmu.ok && probe.ok {
        (ClockKind::Pmu, format!("a hardware PMU counts exactly ({}): interrupts at their natural instant at full speed", pmu.detail))
    } else if pmu.ok {
        (
            ClockKind::Exit,
            format!(
                "the PMU counter failed the start-up probe ({}); using the exit clock: full speed, \
                 interrupts only at guest-caused exits. {SLOW}",
                probe.detail
            ),
        )
    } else {
        (
            ClockKind::Exit,
            format!(
                "no PMU ({}); using the exit clock: full speed, interrupts only at guest-caused exits. {SLOW}",
                pmu.detail
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ClockKind;

    #[test]
    fn auto_picks_pmu_only_when_the_counter_passes_the_probe() {
        let (c, why) = choose_auto(&Check::yes("Intel Skylake: raw event 0x5101c4"), &Check::yes("counted 709 of 709"));
        assert_eq!(c, ClockKind::Pmu);
        assert!(why.contains("0x5101c4"), "{why}");
        let (c, why) = choose_auto(&Check::yes("Intel Skylake"), &Check::no("counted 710 (+1)"));
        assert_eq!(c, ClockKind::Exit);
        assert!(why.contains("failed the start-up probe (counted 710 (+1))"), "{why}");
        let (c, why) = choose_auto(&Check::no("no hardware PMU: none"), &Check::no("not run"));
        assert_eq!(c, ClockKind::Exit);
        assert!(why.starts_with("no PMU (no hardware PMU: none)"), "{why}");
    }
}
