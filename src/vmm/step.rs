//! The step clock's mechanics: run the guest exactly one instruction at a
//! time, in ring 0 and ring 3, and say after each one whether it was a
//! retired conditional branch.
//!
//! The step clock is the exact (slow) oracle of record/replay: the recorder
//! single-steps, counts retired conditional branches itself and can inject an
//! interrupt at any instruction boundary; replay steps to the same branch
//! count + RIP. This module only knows how to take one step and what it
//! retired; deciding where to stop is the caller's business.
//!
//! # How a step is taken (measured on kvm_pvm, docs/host-support.md)
//!
//! * **Ring 0**: `KVM_GUESTDBG_SINGLESTEP` makes KVM exit with
//!   `KVM_EXIT_DEBUG` after every instruction (KVM emulates ring 0 here).
//! * **Ring 3**: KVM does not exit. With the guest-debug flag set while the
//!   vCPU sits in ring 3, KVM sets TF in the hardware RFLAGS; the instruction
//!   runs natively and the #DB it raises is delivered to the *guest's* IDT
//!   vector 1. The guest's #DB handler must begin with a one-byte `nop`:
//!   KVM emulates that ring-0 `nop` and exits with `KVM_EXIT_DEBUG` at
//!   handler+1. The stepper recognises that stop, reads the interrupt frame
//!   (`rip, cs, rflags, rsp, ss`) from the ring-0 stack and *unwinds* the
//!   delivery itself (RIP, RSP, RFLAGS without TF/RF, CS/SS rebuilt from the
//!   guest's GDT, the 40 stack bytes the frame overwrote put back), so the
//!   guest never sees the #DB and the vCPU stands after exactly one ring-3
//!   instruction.
//! * **`iretq` from ring 0 to ring 3**: KVM would run it and then let ring 3
//!   run freely (no TF is set on the way), so the stepper executes that one
//!   instruction itself ([`Stepper::before_run`] returns its stop).
//! * **Port I/O** ends a step with `KVM_EXIT_IO` instead of a debug exit;
//!   [`Stepper::on_other_exit`] says whether the instruction has already
//!   retired (then that exit is the boundary) or retires on the next
//!   `KVM_RUN` (then a debug exit follows).
//!
//! On hosts where KVM single-steps every ring itself, debug exits simply
//! arrive at every boundary and the #DB path is never taken.
//!
//! # Telling our #DB from the guest's own
//!
//! A stop at handler+1 is ours when the previous boundary was in ring 3, the
//! frame's CS is a ring-3 selector, the guest has no enabled hardware
//! breakpoint in DR7, the stepped instruction was not `int1`, and the guest
//! has not set TF itself (tracked through `popf`). Anything else is reported
//! as [`StepStop::GuestDebug`] and left to the guest's handler (the demo
//! guest reports it on the panic port).
//!
//! # Usage
//! ```text
//! stepper.arm(&vcpu, &mem)?;
//! loop {
//!     if let Some(stop) = stepper.before_run(&vcpu, &mem)? { handle(stop); continue; }
//!     match vcpu.fd.run()? {
//!         VcpuExit::Debug(d) => handle(stepper.on_debug_exit(&vcpu, &mem, &d)?),
//!         other => { let b = stepper.on_other_exit(&vcpu, &mem)?; /* device work */ }
//!     }
//! }
//! ```

use iced_x86::{Code, Decoder, DecoderOptions, Instruction};
use kvm_bindings::{
    kvm_debug_exit_arch, kvm_guest_debug, kvm_regs, kvm_segment, kvm_sregs, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vmm::vcpu::{Vcpu, VcpuError};

const TF: u64 = 1 << 8;
const RF: u64 = 1 << 16;
/// Bytes of a 64-bit interrupt frame without error code: rip, cs, rflags, rsp, ss.
const FRAME: usize = 40;
/// The longest x86 instruction.
const MAX_INSN: usize = 15;
/// `nop`: the first instruction the guest's #DB handler must have.
const NOP: u8 = 0x90;

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("KVM_SET_GUEST_DEBUG failed: {0}")]
    GuestDebug(kvm_ioctls::Error),
    #[error("cannot read guest memory at {addr:#x} ({what})")]
    Memory { addr: u64, what: &'static str },
    #[error(
        "cannot single-step ring 3: the guest's #DB handler (IDT vector 1) at {handler:#x} \
         does not begin with a one-byte nop (found {first:#04x}); see docs/platform.md"
    )]
    BadHandler { handler: u64, first: u8 },
    #[error("the stepper is not armed")]
    NotArmed,
}

/// Where the vCPU stands after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boundary {
    /// The next instruction to execute.
    pub rip: u64,
    /// The privilege level that instruction runs at.
    pub cpl: u8,
    /// The instruction that just retired was a conditional branch (Jcc,
    /// JRCXZ/JECXZ, LOOP, LOOPcc), taken or not.
    pub branch_retired: bool,
}

/// What a debug exit (or a stepper-executed instruction) meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStop {
    /// Exactly one instruction retired since the previous boundary (or an
    /// event was delivered and the handler's first instruction retired).
    Boundary(Boundary),
    /// An exit inside the stepping machinery; run again. (No host measured
    /// so far produces one: the #DB path ends in a single exit that the
    /// stepper turns into a boundary. Callers handle it all the same.)
    Internal,
    /// The guest raised a #DB of its own (hardware breakpoint, `int1`, its
    /// own TF). It is left to the guest: the vCPU stands in the guest's #DB
    /// handler, after its first instruction, and stepping goes on there.
    GuestDebug(Boundary),
}

/// The decoded instruction at a boundary, as much as the stepper needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Jcc, JrCXZ, LOOP, LOOPcc: retires to `target` or falls through.
    CondBranch { target: u64 },
    /// `iretq`: may change the privilege level.
    Iretq,
    /// Another instruction that may change CPL (sysret, sysexit, far return/jump/call, int n).
    PrivChange,
    /// `popf`: may set the guest's own TF.
    Popf,
    /// `pushf`: would store our TF into guest memory.
    Pushf,
    /// Loads a segment register (ring 3 may change DS/ES/FS/GS).
    SegLoad,
    /// `int1` (icebp): raises a #DB of the guest's own.
    Int1,
    /// `mov dr, r`: may enable a guest hardware breakpoint.
    MovToDr,
    /// Anything else.
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Insn {
    len: u64,
    kind: Kind,
}

#[derive(Debug, Clone, Copy)]
struct Cursor {
    rip: u64,
    cpl: u8,
    insn: Insn,
}

/// Counters for the cost report.
#[derive(Debug, Default, Clone, Copy)]
pub struct StepStats {
    pub ring0_steps: u64,
    pub ring3_steps: u64,
    /// #DB deliveries to the guest that the stepper undid.
    pub unwinds: u64,
    /// `iretq`s to ring 3 the stepper executed itself.
    pub iretqs: u64,
    pub guest_debugs: u64,
}

/// Single-steps one vCPU. See the module documentation.
#[derive(Debug, Default)]
pub struct Stepper {
    armed: bool,
    /// Linear address of the guest's #DB handler, once its IDT is loaded.
    handler: Option<u64>,
    /// The boundary the vCPU stands at, with the instruction found there.
    cur: Option<Cursor>,
    /// TF must be set again (KVM_SET_GUEST_DEBUG) before the next KVM_RUN.
    rearm: bool,
    /// Base of the TSS (TR), whose rsp0 tells where ring-3 events land.
    tss_base: u64,
    /// The 40 bytes below TSS.rsp0 before a ring-3 step, restored when the
    /// #DB delivery that overwrote them is unwound.
    saved_stack: Option<(u64, [u8; FRAME])>,
    /// The segment registers of the ring-3 context the stepper last loaded.
    /// Ring 3 cannot change them except by loading a segment register, so
    /// this saves a KVM_GET_SREGS per ring-3 step.
    r3_sregs: Option<kvm_sregs>,
    /// The guest set TF itself (seen through `popf`): its #DBs are its own.
    guest_tf: bool,
    /// The guest enabled a hardware breakpoint in DR7 (read at arm time and
    /// after every `mov dr, r`).
    guest_dr7_active: bool,
    pub stats: StepStats,
}

/// Is the instruction encoded at the start of `bytes` (64-bit mode) a
/// conditional branch: Jcc, JrCXZ/JeCXZ, LOOP or LOOPcc? These are what a
/// PMU's "retired conditional branches" event counts (taken or not), so they
/// are the step clock's unit of time.
pub fn is_conditional_branch(bytes: &[u8]) -> bool {
    matches!(decode(bytes, 0).kind, Kind::CondBranch { .. })
}

fn decode(bytes: &[u8], rip: u64) -> Insn {
    let mut d = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
    let mut i = Instruction::default();
    d.decode_out(&mut i);
    if i.is_invalid() {
        return Insn {
            len: i.len().max(1) as u64,
            kind: Kind::Other,
        };
    }
    let kind = if i.is_jcc_short_or_near() || i.is_jcx_short() || i.is_loopcc() || i.is_loop() {
        Kind::CondBranch {
            target: i.near_branch_target(),
        }
    } else {
        match i.code() {
            Code::Iretq => Kind::Iretq,
            Code::Popfq | Code::Popfw => Kind::Popf,
            Code::Pushfq | Code::Pushfw => Kind::Pushf,
            Code::Mov_Sreg_rm16
            | Code::Mov_Sreg_r32m16
            | Code::Mov_Sreg_r64m16
            | Code::Popw_FS
            | Code::Popq_FS
            | Code::Popw_GS
            | Code::Popq_GS
            | Code::Lss_r16_m1616
            | Code::Lss_r32_m1632
            | Code::Lss_r64_m1664
            | Code::Lfs_r16_m1616
            | Code::Lfs_r32_m1632
            | Code::Lfs_r64_m1664
            | Code::Lgs_r16_m1616
            | Code::Lgs_r32_m1632
            | Code::Lgs_r64_m1664 => Kind::SegLoad,
            Code::Int1 => Kind::Int1,
            Code::Mov_dr_r64 | Code::Mov_dr_r32 => Kind::MovToDr,
            Code::Iretd
            | Code::Iretw
            | Code::Sysretq
            | Code::Sysretd
            | Code::Sysexitq
            | Code::Sysexitd
            | Code::Retfq
            | Code::Retfw
            | Code::Retfd
            | Code::Retfq_imm16
            | Code::Retfw_imm16
            | Code::Retfd_imm16
            | Code::Int_imm8
            | Code::Int3
            | Code::Into
            | Code::Syscall
            | Code::Sysenter => Kind::PrivChange,
            c if c.is_jmp_far()
                || c.is_jmp_far_indirect()
                || c.is_call_far()
                || c.is_call_far_indirect() =>
            {
                Kind::PrivChange
            }
            _ => Kind::Other,
        }
    };
    Insn {
        len: i.len() as u64,
        kind,
    }
}

fn read_u64(mem: &GuestMemoryMmap, addr: u64, what: &'static str) -> Result<u64, StepError> {
    mem.read_obj(GuestAddress(addr))
        .map_err(|_| StepError::Memory { addr, what })
}

/// Reads and decodes the instruction at `rip` (the guest is identity-mapped,
/// docs/platform.md, so its linear addresses are physical ones).
fn insn_at(mem: &GuestMemoryMmap, rip: u64) -> Insn {
    let mut buf = [0u8; MAX_INSN];
    let mut n = 0;
    // Near the end of RAM fewer bytes exist; read byte by byte there.
    if mem.read_slice(&mut buf, GuestAddress(rip)).is_ok() {
        n = MAX_INSN;
    } else {
        while n < MAX_INSN
            && mem
                .read_slice(&mut buf[n..n + 1], GuestAddress(rip + n as u64))
                .is_ok()
        {
            n += 1;
        }
    }
    decode(&buf[..n], rip)
}

/// The cached descriptor a segment register gets when `sel` is loaded from
/// the GDT at `gdt_base` (64-bit mode; LDT selectors are not supported).
pub(crate) fn segment_from_gdt(
    mem: &GuestMemoryMmap,
    gdt_base: u64,
    sel: u16,
) -> Result<kvm_segment, StepError> {
    let d = read_u64(mem, gdt_base + (sel as u64 & !7), "GDT descriptor")?;
    let g = ((d >> 55) & 1) as u8;
    let raw_limit = (d & 0xffff) | ((d >> 32) & 0xf_0000);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    Ok(kvm_segment {
        base: ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24),
        limit: limit as u32,
        selector: sel,
        type_: ((d >> 40) & 0xf) as u8,
        present: ((d >> 47) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g,
        avl: ((d >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    })
}

impl Stepper {
    pub fn new() -> Stepper {
        Stepper::default()
    }

    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// The guest's #DB handler address, if its IDT is loaded yet.
    pub fn handler(&self) -> Option<u64> {
        self.handler
    }

    fn set_debug(vcpu: &Vcpu, on: bool) -> Result<(), StepError> {
        let dbg = kvm_guest_debug {
            control: if on {
                KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
            } else {
                0
            },
            ..Default::default()
        };
        vcpu.fd.set_guest_debug(&dbg).map_err(StepError::GuestDebug)
    }

    fn sregs(&mut self, vcpu: &Vcpu) -> Result<kvm_sregs, StepError> {
        let s = vcpu.sregs()?;
        self.tss_base = s.tr.base;
        Ok(s)
    }

    /// Reads IDT vector 1 (the IDT may be loaded after boot, so this is
    /// retried until it succeeds) and checks the handler begins with `nop`.
    fn resolve_handler(
        &mut self,
        mem: &GuestMemoryMmap,
        sregs: &kvm_sregs,
    ) -> Result<(), StepError> {
        if self.handler.is_some() || sregs.idt.limit < 31 {
            return Ok(());
        }
        let gate = sregs.idt.base + 16;
        let lo = read_u64(mem, gate, "IDT vector 1")?;
        let hi = read_u64(mem, gate + 8, "IDT vector 1")?;
        if lo & (1 << 47) == 0 {
            return Ok(()); // not present (yet)
        }
        let h = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32);
        let mut first = [0u8; 1];
        mem.read_slice(&mut first, GuestAddress(h))
            .map_err(|_| StepError::Memory {
                addr: h,
                what: "#DB handler",
            })?;
        if first[0] != NOP {
            return Err(StepError::BadHandler {
                handler: h,
                first: first[0],
            });
        }
        self.handler = Some(h);
        Ok(())
    }

    fn read_dr7(&mut self, vcpu: &Vcpu) -> Result<(), StepError> {
        let dr = vcpu.fd.get_debug_regs().map_err(|source| VcpuError::Kvm {
            op: "KVM_GET_DEBUGREGS",
            source,
        })?;
        self.guest_dr7_active = dr.dr7 & 0xff != 0;
        Ok(())
    }

    /// Starts single-stepping from the vCPU's current state, which must be
    /// an instruction boundary (complete a pending IN first). Call it again
    /// after changing the vCPU's registers yourself.
    pub fn arm(&mut self, vcpu: &Vcpu, mem: &GuestMemoryMmap) -> Result<(), StepError> {
        let regs = vcpu.regs()?;
        let sregs = self.sregs(vcpu)?;
        self.resolve_handler(mem, &sregs)?;
        self.read_dr7(vcpu)?;
        self.armed = true;
        self.saved_stack = None;
        self.r3_sregs = None;
        self.guest_tf = false;
        let cpl = (sregs.cs.selector & 3) as u8;
        self.cur = Some(Cursor {
            rip: regs.rip,
            cpl,
            insn: insn_at(mem, regs.rip),
        });
        // KVM_SET_GUEST_DEBUG sets TF when the vCPU is in ring 3.
        self.rearm = cpl == 3;
        if cpl != 3 {
            Self::set_debug(vcpu, true)?;
        }
        Ok(())
    }

    /// Stops single-stepping; the guest runs freely from the next KVM_RUN.
    /// Call it at a boundary (after a stop), never between an IN exit and
    /// the debug exit that completes it.
    pub fn disarm(&mut self, vcpu: &Vcpu) -> Result<(), StepError> {
        Self::set_debug(vcpu, false)?;
        self.armed = false;
        self.cur = None;
        self.saved_stack = None;
        self.r3_sregs = None;
        Ok(())
    }

    /// Did the instruction at `from` retire as a conditional branch, given
    /// that the next boundary is `to`?
    fn branch_retired(from: &Cursor, to: u64) -> bool {
        match from.insn.kind {
            Kind::CondBranch { target } => to == target || to == from.rip + from.insn.len,
            _ => false,
        }
    }

    /// Moves the cursor to a new boundary and builds its report. A change of
    /// privilege level means an event was delivered (or an `iretq`/`sysret`
    /// ran), so no conditional branch retired.
    fn arrive(&mut self, mem: &GuestMemoryMmap, rip: u64, cpl: u8) -> Boundary {
        let branch_retired = match self.cur {
            Some(from) if from.cpl == cpl => Self::branch_retired(&from, rip),
            _ => false,
        };
        if cpl == 3 {
            self.stats.ring3_steps += 1;
        } else {
            self.stats.ring0_steps += 1;
            self.r3_sregs = None; // ring 0 may change anything
        }
        self.cur = Some(Cursor {
            rip,
            cpl,
            insn: insn_at(mem, rip),
        });
        Boundary {
            rip,
            cpl,
            branch_retired,
        }
    }

    /// Call right before every KVM_RUN while armed. Returns a stop when the
    /// stepper executed the next instruction itself (an `iretq` from ring 0
    /// to ring 3, which KVM here would let run on freely): handle it like a
    /// stop returned by [`Stepper::on_debug_exit`] and do not run.
    pub fn before_run(
        &mut self,
        vcpu: &Vcpu,
        mem: &GuestMemoryMmap,
    ) -> Result<Option<StepStop>, StepError> {
        if !self.armed {
            return Err(StepError::NotArmed);
        }
        let Some(cur) = self.cur else { return Ok(None) };
        if cur.cpl == 0 && cur.insn.kind == Kind::Iretq {
            let mut regs = vcpu.regs()?;
            let f = frame(mem, regs.rsp)?;
            if f[1] & 3 == 3 {
                let mut sregs = self.sregs(vcpu)?;
                self.enter_ring3(vcpu, mem, &mut regs, &mut sregs, &f, f[2])?;
                self.stats.iretqs += 1;
                return Ok(Some(StepStop::Boundary(self.arrive(mem, f[0], 3))));
            }
        }
        if cur.cpl == 3 {
            if cur.insn.kind == Kind::Popf {
                let regs = vcpu.regs()?;
                self.guest_tf = read_u64(mem, regs.rsp, "popf operand")? & TF != 0;
            }
            if self.rearm {
                self.save_stack(mem)?;
                Self::set_debug(vcpu, true)?;
                self.rearm = false;
            }
        }
        Ok(None)
    }

    /// Saves the stack bytes a #DB from ring 3 is about to overwrite.
    fn save_stack(&mut self, mem: &GuestMemoryMmap) -> Result<(), StepError> {
        let rsp0 = read_u64(mem, self.tss_base + 4, "TSS.rsp0")?;
        let at = (rsp0 & !0xf) - FRAME as u64;
        let mut buf = [0u8; FRAME];
        mem.read_slice(&mut buf, GuestAddress(at))
            .map_err(|_| StepError::Memory {
                addr: at,
                what: "ring-0 stack",
            })?;
        self.saved_stack = Some((at, buf));
        Ok(())
    }

    /// Loads the ring-3 context of interrupt frame `f` into the vCPU, as
    /// `iretq` would, with `rflags` (the caller strips artifacts) plus our
    /// TF, which arms the next ring-3 step in the same KVM_SET_REGS.
    fn enter_ring3(
        &mut self,
        vcpu: &Vcpu,
        mem: &GuestMemoryMmap,
        regs: &mut kvm_regs,
        sregs: &mut kvm_sregs,
        f: &[u64; 5],
        rflags: u64,
    ) -> Result<(), StepError> {
        regs.rip = f[0];
        regs.rflags = rflags | 2 | TF;
        regs.rsp = f[3];
        if sregs.cs.selector != f[1] as u16 || sregs.cs.dpl != 3 {
            sregs.cs = segment_from_gdt(mem, sregs.gdt.base, f[1] as u16)?;
        }
        if sregs.ss.selector != f[4] as u16 || sregs.ss.dpl != 3 {
            sregs.ss = segment_from_gdt(mem, sregs.gdt.base, f[4] as u16)?;
        }
        vcpu.set_regs(regs)?;
        vcpu.set_sregs(sregs)?;
        sregs.interrupt_bitmap = [0; 4];
        self.r3_sregs = Some(*sregs);
        self.rearm = false;
        self.save_stack(mem)
    }

    /// After a ring-3 `pushf` stepped with our TF, the pushed image has TF.
    fn fix_pushf(
        &self,
        mem: &GuestMemoryMmap,
        prev: Option<Cursor>,
        rsp: u64,
    ) -> Result<(), StepError> {
        if self.guest_tf
            || !matches!(
                prev,
                Some(Cursor {
                    cpl: 3,
                    insn: Insn {
                        kind: Kind::Pushf,
                        ..
                    },
                    ..
                })
            )
        {
            return Ok(());
        }
        let v = read_u64(mem, rsp, "pushf image")?;
        mem.write_obj(v & !TF, GuestAddress(rsp))
            .map_err(|_| StepError::Memory {
                addr: rsp,
                what: "pushf image",
            })
    }

    /// An event (interrupt, exception) was delivered from ring 3 while our
    /// TF was set: its frame on the ring-0 stack carries TF. Strip it, or
    /// the guest's `iretq` would single-step the task after we disarm.
    fn strip_event_tf(&self, mem: &GuestMemoryMmap) -> Result<(), StepError> {
        if self.guest_tf {
            return Ok(());
        }
        let rsp0 = read_u64(mem, self.tss_base + 4, "TSS.rsp0")?;
        let at = (rsp0 & !0xf) - FRAME as u64;
        let f = frame(mem, at)?;
        if f[1] & 3 == 3 && f[4] & 3 == 3 && f[2] & TF != 0 {
            mem.write_obj(f[2] & !TF, GuestAddress(at + 16))
                .map_err(|_| StepError::Memory {
                    addr: at + 16,
                    what: "interrupt frame",
                })?;
        }
        Ok(())
    }

    /// Call for every KVM_EXIT_DEBUG while armed, with the exit's data
    /// (`VcpuExit::Debug`): its `pc` is the RIP, which spares a
    /// KVM_GET_REGS on every ring-0 step.
    pub fn on_debug_exit(
        &mut self,
        vcpu: &Vcpu,
        mem: &GuestMemoryMmap,
        exit: &kvm_debug_exit_arch,
    ) -> Result<StepStop, StepError> {
        if !self.armed {
            return Err(StepError::NotArmed);
        }
        let rip = exit.pc;
        let prev = self.cur;
        let prev_kind = prev.map(|c| c.insn.kind);
        if prev_kind == Some(Kind::MovToDr) {
            self.read_dr7(vcpu)?;
        }
        let from_ring3 = prev.map(|c| c.cpl == 3).unwrap_or(true);
        if self.handler.is_none() && from_ring3 {
            let sregs = self.sregs(vcpu)?;
            self.resolve_handler(mem, &sregs)?;
        }
        if from_ring3 && self.handler.map(|h| rip == h + 1).unwrap_or(false) {
            // In the guest's #DB handler after its nop: the frame is at RSP.
            let mut regs = vcpu.regs()?;
            let f = frame(mem, regs.rsp)?;
            if f[1] & 3 == 3 {
                let foreign =
                    self.guest_tf || self.guest_dr7_active || prev_kind == Some(Kind::Int1);
                if !foreign {
                    // Our single-step trap: undo the delivery.
                    if let Some((at, bytes)) = self.saved_stack.take() {
                        if at == regs.rsp {
                            mem.write_slice(&bytes, GuestAddress(at)).map_err(|_| {
                                StepError::Memory {
                                    addr: at,
                                    what: "ring-0 stack",
                                }
                            })?;
                        }
                    }
                    let cached = match (self.r3_sregs, prev_kind) {
                        (Some(_), Some(Kind::SegLoad | Kind::PrivChange)) | (None, _) => None,
                        (s, _) => s,
                    };
                    let mut sregs = match cached {
                        Some(s) => s,
                        None => self.sregs(vcpu)?,
                    };
                    self.enter_ring3(vcpu, mem, &mut regs, &mut sregs, &f, f[2] & !(TF | RF))?;
                    self.fix_pushf(mem, prev, f[3])?;
                    self.stats.unwinds += 1;
                    return Ok(StepStop::Boundary(self.arrive(mem, f[0], 3)));
                }
                // The guest's own #DB: leave it delivered, minus our TF.
                if !self.guest_tf {
                    mem.write_obj(f[2] & !TF, GuestAddress(regs.rsp + 16))
                        .map_err(|_| StepError::Memory {
                            addr: regs.rsp + 16,
                            what: "interrupt frame",
                        })?;
                }
                self.stats.guest_debugs += 1;
                let retired = prev
                    .map(|c| Self::branch_retired(&c, f[0]))
                    .unwrap_or(false);
                let mut b = self.arrive(mem, regs.rip, 0);
                b.branch_retired = retired;
                return Ok(StepStop::GuestDebug(b));
            }
        }
        // An ordinary KVM debug exit: a ring-0 step, the completion of an
        // emulated ring-3 instruction (IN), an event delivered from ring 3
        // (the exit comes after the handler's first instruction), or any
        // step on a host where KVM single-steps every ring.
        let cpl = match prev {
            Some(c) if c.cpl == 0 && !matches!(c.insn.kind, Kind::PrivChange | Kind::Iretq) => 0,
            _ => (self.sregs(vcpu)?.cs.selector & 3) as u8,
        };
        if from_ring3 && cpl == 0 {
            self.strip_event_tf(mem)?;
        }
        if cpl == 3 {
            if prev_kind == Some(Kind::Pushf) {
                self.fix_pushf(mem, prev, vcpu.regs()?.rsp)?;
            }
            self.rearm = true;
        }
        Ok(StepStop::Boundary(self.arrive(mem, rip, cpl)))
    }

    /// Call for every other exit while armed (port I/O, MMIO, HLT). Returns
    /// the boundary when the exiting instruction has already retired (RIP
    /// is past it: OUT on kvm_pvm), `None` when it retires on the next
    /// KVM_RUN (IN; a debug exit then reports the boundary).
    pub fn on_other_exit(
        &mut self,
        vcpu: &Vcpu,
        mem: &GuestMemoryMmap,
    ) -> Result<Option<Boundary>, StepError> {
        if !self.armed {
            return Err(StepError::NotArmed);
        }
        let regs = vcpu.regs()?;
        let Some(cur) = self.cur else { return Ok(None) };
        if regs.rip == cur.rip {
            return Ok(None);
        }
        let cpl = if cur.insn.kind == Kind::PrivChange {
            (self.sregs(vcpu)?.cs.selector & 3) as u8
        } else {
            cur.cpl
        };
        if cpl == 3 {
            self.rearm = true;
        }
        Ok(Some(self.arrive(mem, regs.rip, cpl)))
    }
}

fn frame(mem: &GuestMemoryMmap, rsp: u64) -> Result<[u64; 5], StepError> {
    let mut f = [0u64; 5];
    for (i, w) in f.iter_mut().enumerate() {
        *w = read_u64(mem, rsp + 8 * i as u64, "interrupt frame")?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditional_branches() {
        assert!(is_conditional_branch(&[0x74, 0xf8])); // je
        assert!(is_conditional_branch(&[0x0f, 0x85, 0, 0, 0, 0])); // jne near
        assert!(is_conditional_branch(&[0xe3, 0x00])); // jrcxz
        assert!(is_conditional_branch(&[0xe2, 0xfe])); // loop
        assert!(is_conditional_branch(&[0xe0, 0xfe])); // loopne
        assert!(!is_conditional_branch(&[0xeb, 0xfe])); // jmp
        assert!(!is_conditional_branch(&[0xe8, 0, 0, 0, 0])); // call
        assert!(!is_conditional_branch(&[0xc3])); // ret
        assert!(!is_conditional_branch(&[0x90])); // nop
        assert!(!is_conditional_branch(&[])); // nothing
    }

    #[test]
    fn user_segments_from_the_platform_gdt() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        mem.write_obj(0x00AF_FA00_0000_FFFFu64, GuestAddress(0x1030))
            .unwrap();
        mem.write_obj(0x00CF_F200_0000_FFFFu64, GuestAddress(0x1028))
            .unwrap();
        let cs = segment_from_gdt(&mem, 0x1000, 0x33).unwrap();
        assert_eq!(
            (cs.selector, cs.type_, cs.dpl, cs.l, cs.db, cs.s, cs.present),
            (0x33, 0xA, 3, 1, 0, 1, 1)
        );
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xffff_ffff, 1));
        let ss = segment_from_gdt(&mem, 0x1000, 0x2B).unwrap();
        assert_eq!(
            (ss.selector, ss.type_, ss.dpl, ss.l, ss.db),
            (0x2B, 0x2, 3, 0, 1)
        );
    }
}
