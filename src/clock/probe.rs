//! The PMU clock's start-up probe: a tiny ring-0 guest that retires a known
//! number of conditional branches ([`EXPECTED`]), run under a branch counter
//! before `record --clock pmu` / `replay --clock pmu` trust it (rr runs a
//! sanity loop at start for the same reason).
//!
//! The number is known from the step clock: [`step_clock_trace`] single-steps
//! the probe and asks the stepper which instructions retired a conditional
//! branch; a test checks that count equals [`EXPECTED`] and that exactly the
//! conditional branches (Jcc short/near taken and not taken, JRCXZ, LOOP,
//! LOOPE, LOOPNE) counted and the other control transfers (jmp short/near,
//! call, ret, indirect call and jmp, ret used as a jump) did not. The
//! counter under test must count the same number, and an overflow armed at
//! [`ARM_AT`] must fire within the counter's margin (this exercises
//! re-arming the period, PERF_EVENT_IOC_PERIOD on a disabled counter).

use kvm_ioctls::VcpuExit;

use crate::vmm::counter::{BranchCounter, CounterOpener, PmuError};
use crate::vmm::step::{StepError, StepStop, Stepper};
use crate::vmm::image::{Image, Segment};
use crate::vmm::{Machine, VmConfig};

/// Where the probe's code is loaded and starts (ring 0, 64-bit).
pub const BASE: u64 = 0x100000;
const SIZE: usize = 0x10000;
const STACK_TOP: u32 = 0x10F000;
const POWER_OFF: u16 = 0x550;
/// Iterations of the `dec; jnz` loop, the `loop` loop and each `loopcc` loop.
const N_JCC: u32 = 500;
const N_LOOP: u32 = 100;
const N_LOOPCC: u32 = 50;
/// Conditional branches the probe retires: the loops, four near/short Jcc,
/// two JRCXZ, one LOOPE that exits on ZF=0, and one Jcc in the subroutine
/// that is called twice.
pub const EXPECTED: u64 = (N_JCC + N_LOOP + 2 * N_LOOPCC + 4 + 2 + 1 + 2) as u64;
/// The probe arms an overflow this many branches after its start.
pub const ARM_AT: u64 = 300;

/// The probe as built: its code and which instruction addresses are
/// conditional branches or other control transfers.
pub struct Probe {
    pub code: Vec<u8>,
    pub cond: Vec<u64>,
    pub other_branches: Vec<u64>,
}

struct Asm {
    code: Vec<u8>,
    cond: Vec<u64>,
    other: Vec<u64>,
}

impl Asm {
    fn here(&self) -> u64 {
        BASE + self.code.len() as u64
    }
    fn emit(&mut self, b: &[u8]) {
        self.code.extend_from_slice(b);
    }
    fn cond(&mut self, b: &[u8]) {
        self.cond.push(self.here());
        self.emit(b);
    }
    fn other(&mut self, b: &[u8]) {
        self.other.push(self.here());
        self.emit(b);
    }
    fn mov_ecx(&mut self, v: u32) {
        self.emit(&[0xB9]);
        self.emit(&v.to_le_bytes());
    }
    /// A rel32 from the end of an instruction of `len` bytes starting here to `target`.
    fn rel32(&self, len: u64, target: u64) -> [u8; 4] {
        ((target as i64 - (self.here() + len) as i64) as i32).to_le_bytes()
    }
}

const UD2: [u8; 2] = [0x0F, 0x0B];

/// Builds the probe guest. Any misstep lands on a `ud2`; with no IDT that
/// is a triple fault, which the runners report.
pub fn build() -> Probe {
    let mut a = Asm { code: Vec::new(), cond: Vec::new(), other: Vec::new() };
    // The subroutine sits at a fixed offset so calls can name it up front.
    let sub = BASE + 0x800;
    a.emit(&[0x48, 0xC7, 0xC4]); // mov rsp, STACK_TOP
    a.emit(&STACK_TOP.to_le_bytes());
    // dec ecx; jnz back: N_JCC Jcc (taken N_JCC-1 times, then not taken).
    a.mov_ecx(N_JCC);
    a.emit(&[0xFF, 0xC9]); // dec ecx
    a.cond(&[0x75, 0xFC]); // jnz -4
    // Near and short Jcc, taken and not taken.
    a.emit(&[0x31, 0xC0]); // xor eax, eax (ZF=1)
    a.cond(&[0x0F, 0x85, 0, 0, 0, 0]); // jnz near +0: not taken
    a.cond(&[0x0F, 0x84, 2, 0, 0, 0]); // jz near +2: taken, over the ud2
    a.emit(&UD2);
    a.cond(&[0x74, 0x02]); // jz +2: taken
    a.emit(&UD2);
    a.cond(&[0x75, 0x00]); // jnz +0: not taken
    // JRCXZ taken and not taken.
    a.emit(&[0x31, 0xC9]); // xor ecx, ecx
    a.cond(&[0xE3, 0x02]); // jrcxz +2: taken
    a.emit(&UD2);
    a.emit(&[0xFF, 0xC1]); // inc ecx
    a.cond(&[0xE3, 0x00]); // jrcxz +0: not taken
    // LOOP N_LOOP times.
    a.mov_ecx(N_LOOP);
    a.cond(&[0xE2, 0xFE]); // loop self
    // LOOPE with ZF=1 until RCX=0, LOOPNE with ZF=0 until RCX=0.
    a.emit(&[0x31, 0xC0]); // xor eax, eax (ZF=1)
    a.mov_ecx(N_LOOPCC);
    a.cond(&[0xE1, 0xFE]); // loope self
    a.emit(&[0x83, 0xC8, 0x01]); // or eax, 1 (ZF=0)
    a.mov_ecx(N_LOOPCC);
    a.cond(&[0xE0, 0xFE]); // loopne self
    // LOOPE leaving at once on ZF=0 with RCX != 0.
    a.mov_ecx(5);
    a.cond(&[0xE1, 0x00]); // loope +0
    // Control transfers that are not conditional branches: none may count.
    a.other(&[0xEB, 0x02]); // jmp +2
    a.emit(&UD2);
    a.other(&[0xE9, 2, 0, 0, 0]); // jmp near +2
    a.emit(&UD2);
    let r = a.rel32(5, sub);
    a.other(&[0xE8, r[0], r[1], r[2], r[3]]); // call sub
    let r = a.rel32(7, sub);
    a.emit(&[0x48, 0x8D, 0x05, r[0], r[1], r[2], r[3]]); // lea rax, [rip+sub]
    a.other(&[0xFF, 0xD0]); // call rax
    // lea rax, [rip+g]; jmp rax; ud2; g:
    let g = a.here() + 7 + 2 + 2;
    let r = a.rel32(7, g);
    a.emit(&[0x48, 0x8D, 0x05, r[0], r[1], r[2], r[3]]);
    a.other(&[0xFF, 0xE0]); // jmp rax
    a.emit(&UD2);
    // push h; ret (a return used as a jump); ud2; h:
    let h = (a.here() + 5 + 1 + 2) as u32;
    a.emit(&[0x68]);
    a.emit(&h.to_le_bytes());
    a.other(&[0xC3]); // ret
    a.emit(&UD2);
    // setcc / cmovcc: conditional, but not branches.
    a.emit(&[0x0F, 0x94, 0xC0]); // sete al
    a.emit(&[0x0F, 0x44, 0xC1]); // cmove eax, ecx
    // Power off: mov dx, 0x550; out dx, al; hlt.
    a.emit(&[0x66, 0xBA]);
    a.emit(&POWER_OFF.to_le_bytes());
    a.emit(&[0xEE, 0xF4]);
    assert!(a.here() < sub, "the probe's main line overlaps its subroutine");
    a.code.resize((sub - BASE) as usize, 0xF4);
    // sub: xor edx, edx; jnz +0 (not taken); ret
    a.emit(&[0x31, 0xD2]);
    a.cond(&[0x75, 0x00]);
    a.other(&[0xC3]);
    Probe { code: a.code, cond: a.cond, other_branches: a.other }
}

fn boot() -> Result<Machine, PmuError> {
    let p = build();
    let mut data = p.code;
    data.resize(SIZE, 0);
    let image = Image { entry: BASE, segments: vec![Segment { paddr: BASE, memsz: SIZE as u64, data }] };
    let cfg = VmConfig { mem_size: 4 << 20, ..Default::default() };
    Machine::boot(&cfg, &image).map_err(|e| PmuError::Probe(format!("booting the probe guest: {e}")))
}

fn fail(what: &str, m: &Machine) -> PmuError {
    let rip = m.vcpu.regs().map(|r| r.rip).unwrap_or(0);
    PmuError::Probe(format!("{what} at rip {rip:#x}"))
}

/// One single-step of the probe: the instruction at `rip` retired, and the
/// stepper says whether it was a conditional branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub rip: u64,
    pub branch: bool,
}

/// Single-steps the probe to its power-off with the step clock's stepper,
/// calling `each` at every boundary. Returns the steps.
fn step_probe(m: &mut Machine, mut each: impl FnMut(&Step)) -> Result<Vec<Step>, PmuError> {
    let err = |e: StepError| PmuError::Probe(format!("stepping the probe: {e}"));
    let mut st = Stepper::new();
    st.arm(&m.vcpu, &m.mem).map_err(err)?;
    let mut steps = Vec::new();
    let mut at = m.vcpu.regs().map_err(|e| PmuError::Probe(e.to_string()))?.rip;
    let mut record = |stop: StepStop, at: &mut u64, steps: &mut Vec<Step>| -> Result<(), PmuError> {
        match stop {
            StepStop::Boundary(b) => {
                let s = Step { rip: *at, branch: b.branch_retired };
                each(&s);
                steps.push(s);
                *at = b.rip;
                Ok(())
            }
            StepStop::Internal => Ok(()),
            StepStop::GuestDebug(_) => Err(PmuError::Probe("an unexpected guest #DB".into())),
        }
    };
    for _ in 0..100_000 {
        if let Some(stop) = st.before_run(&m.vcpu, &m.mem).map_err(err)? {
            record(stop, &mut at, &mut steps)?;
            continue;
        }
        match m.vcpu.fd.run() {
            Ok(VcpuExit::Debug(d)) => {
                let stop = st.on_debug_exit(&m.vcpu, &m.mem, &d).map_err(err)?;
                record(stop, &mut at, &mut steps)?;
            }
            Ok(VcpuExit::IoOut(POWER_OFF, _)) => {
                st.disarm(&m.vcpu).map_err(err)?;
                return Ok(steps);
            }
            Ok(VcpuExit::Shutdown) => return Err(fail("the probe triple-faulted", m)),
            Ok(e) => {
                let e = format!("{e:?}");
                return Err(fail(&format!("unexpected exit {e}"), m));
            }
            Err(e) if e.errno() == libc::EINTR => m.vcpu.fd.set_kvm_immediate_exit(0),
            Err(e) => return Err(PmuError::Probe(format!("KVM_RUN: {e}"))),
        }
    }
    Err(fail("the probe did not finish in 100000 steps", m))
}

/// The step clock's view of the probe: every instruction it retired, and
/// whether the stepper counted it as a conditional branch.
pub fn step_clock_trace() -> Result<Vec<Step>, PmuError> {
    let mut m = boot()?;
    step_probe(&mut m, |_| {})
}

/// The step clock's count of the probe's conditional branches.
pub fn step_clock_count() -> Result<u64, PmuError> {
    Ok(step_clock_trace()?.iter().filter(|s| s.branch).count() as u64)
}

/// What a counter counted on the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterRun {
    pub counted: u64,
    /// The count read at the overflow stop armed [`ARM_AT`] branches on.
    pub overflow_at: Option<u64>,
}

/// Runs the probe under `counter` from reset to power-off, arming an
/// overflow at `arm_at`. A counter that counts while the guest runs free
/// (a PMU) runs it at full speed; one that counts by being stepped (the
/// simulated counter) is stepped all the way. Call on the thread the
/// counter belongs to.
pub fn run_counter(counter: &mut dyn BranchCounter, arm_at: u64) -> Result<CounterRun, PmuError> {
    let mut m = boot()?;
    counter.reset()?;
    counter.take_overflow();
    counter.arm(arm_at)?;
    let mut overflow_at = None;
    if !counter.breakpoints_ok() {
        let mut err = None;
        step_probe(&mut m, |s| {
            counter.on_step(s.branch);
            if overflow_at.is_none() && counter.take_overflow() {
                match counter.read() {
                    Ok(c) => overflow_at = Some(c),
                    Err(e) => err = Some(e),
                }
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
    } else {
        let _guard = crate::vmm::vcpu::KickGuard::register(&mut m.vcpu.fd);
        loop {
            match m.vcpu.fd.run() {
                Ok(VcpuExit::IoOut(POWER_OFF, _)) => break,
                Ok(VcpuExit::Shutdown) => return Err(fail("the probe triple-faulted", &m)),
                Ok(e) => {
                    let e = format!("{e:?}");
                    return Err(fail(&format!("unexpected exit {e}"), &m));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    m.vcpu.fd.set_kvm_immediate_exit(0);
                    if overflow_at.is_none() && counter.take_overflow() {
                        overflow_at = Some(counter.read()?);
                    }
                }
                Err(e) => return Err(PmuError::Probe(format!("KVM_RUN: {e}"))),
            }
        }
        if overflow_at.is_none() && counter.take_overflow() {
            // Signalled after the last stop: the count shows it fired, not where.
            overflow_at = Some(u64::MAX);
        }
    }
    Ok(CounterRun { counted: counter.read()?, overflow_at })
}

/// The probe's verdict on a counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub counter: String,
    pub expected: u64,
    pub counted: u64,
    pub overflow_at: u64,
    pub margin: u64,
}

impl std::fmt::Display for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} counted {} of the probe guest's {} retired conditional branches; the overflow \
             armed at {ARM_AT} stopped the guest at {} (margin {})",
            self.counter, self.counted, self.expected, self.overflow_at, self.margin
        )
    }
}

/// Runs the probe under `counter` and demands the exact count and an
/// overflow within the counter's margin.
pub fn verify(counter: &mut dyn BranchCounter) -> Result<Verified, PmuError> {
    let run = run_counter(counter, ARM_AT)?;
    let margin = counter.margin();
    let name = counter.describe();
    if run.counted != EXPECTED {
        return Err(PmuError::Miscount {
            counter: name,
            expected: EXPECTED,
            counted: run.counted,
            diff: run.counted as i64 - EXPECTED as i64,
            detail: String::new(),
        });
    }
    let overflow = |detail: String| PmuError::ProbeOverflow { counter: name.clone(), expected: EXPECTED, detail };
    match run.overflow_at {
        None => Err(overflow(format!(
            "the overflow armed at {ARM_AT} never fired (re-arming the period with PERF_EVENT_IOC_PERIOD does not work here?)"
        ))),
        Some(at) if at < ARM_AT || at > ARM_AT + margin => Err(overflow(format!(
            "the overflow armed at {ARM_AT} stopped the guest at {}, outside its margin of {margin}",
            if at == u64::MAX { "an unknown count".to_string() } else { at.to_string() }
        ))),
        Some(at) => Ok(Verified { counter: name, expected: EXPECTED, counted: run.counted, overflow_at: at, margin }),
    }
}

/// Opens a counter with `open` on a fresh thread (a hardware counter pins
/// that thread on hybrid hosts, as it will pin the vCPU thread) and
/// verifies it with the probe there.
pub fn check(open: &CounterOpener) -> Result<Verified, PmuError> {
    let open = open.clone();
    std::thread::Builder::new()
        .name("pmu-probe".into())
        .spawn(move || {
            let mut c = open()?;
            verify(&mut *c)
        })
        .map_err(|e| PmuError::Probe(format!("spawning the probe thread: {e}")))?
        .join()
        .unwrap_or_else(|_| Err(PmuError::Probe("the probe thread panicked".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_decodes_as_built() {
        // Every address listed as a conditional branch is one by the step
        // clock's decoder, and no other control transfer is.
        let p = build();
        let at = |a: u64| &p.code[(a - BASE) as usize..];
        for &a in &p.cond {
            assert!(crate::vmm::step::is_conditional_branch(at(a)), "{a:#x}");
        }
        for &a in &p.other_branches {
            assert!(!crate::vmm::step::is_conditional_branch(at(a)), "{a:#x}");
        }
        assert_eq!(p.cond.len(), 12);
        assert_eq!(EXPECTED, 709);
    }
}
