//! The stepping engine: executes one instruction at a time and records what
//! it did, with the machine state read before and after, because an
//! instruction's effects (which bytes, from which input) cannot be read back
//! from the state after it alone.

use iced_x86::{
    Decoder, DecoderOptions, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind,
    Register,
};
use kvm_bindings::{kvm_regs, kvm_sregs};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use super::input::{port_input, serial_delivered, Input};
use super::location::{gpr, regs_array};
use super::{ProvError, Timeline, R};
use crate::clock::ExecPoint;
use crate::replay::Outcome;
use crate::vmm::layout::ports;

/// One memory operand of one instruction.
#[derive(Debug, Clone, Serialize)]
pub struct Access {
    pub va: u64,
    pub pa: u64,
    pub write: bool,
    pub read: bool,
    /// The bytes before and after the instruction.
    pub before: Vec<u8>,
    pub after: Vec<u8>,
}

/// A DMA read command: `count` sectors from `lba` into physical `addr`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Dma {
    pub lba: u64,
    pub addr: u64,
    pub count: u64,
}

/// One executed instruction and what it did.
#[derive(Debug, Clone)]
pub struct Step {
    /// The point just before it (`seek` there stands before the instruction).
    pub at: ExecPoint,
    pub insn: Instruction,
    pub bytes: Vec<u8>,
    pub ring: u8,
    pub before: [u64; 16],
    pub after: [u64; 16],
    pub mem: Vec<Access>,
    /// A port read, with where its value came from.
    pub input: Option<Input>,
    pub dma: Option<Dma>,
    /// RIP after the instruction is not where it leads: an interrupt (or
    /// exception) was taken within this step.
    pub irregular: bool,
    /// An interrupt was delivered within this step: `insn` is the handler's
    /// first instruction (a push), `mem` its stack slot and then the frame.
    pub interrupt: bool,
}

/// Guest virtual → physical through the page tables of `s` (4-level, 4K/2M/1G).
pub(super) fn translate(tl: &Timeline, s: &kvm_sregs, va: u64) -> Option<u64> {
    crate::vmm::paging::translate(&tl.machine.mem, s, va)
}

/// `len` bytes of guest physical memory; empty when they are not all in it.
pub(super) fn read_phys(tl: &Timeline, pa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    if tl.machine.mem.read_slice(&mut b, GuestAddress(pa)).is_err() {
        b.clear();
    }
    b
}

/// Up to `len` bytes at virtual `va`, page by page, stopping at the first
/// one that cannot be read (for code and operands that cross a page).
fn read_virt(tl: &Timeline, s: &kvm_sregs, va: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    for k in 0..len as u64 {
        match translate(tl, s, va + k).map(|pa| read_phys(tl, pa, 1)) {
            Some(b) if b.len() == 1 => v.push(b[0]),
            _ => break,
        }
    }
    v
}

/// The low `size` bytes of `v`.
fn low_bytes(v: u64, size: usize) -> u64 {
    if size >= 8 {
        v
    } else {
        v & ((1u64 << (8 * size)) - 1)
    }
}

/// The port of an `in`/`out`: its immediate, or `dx`.
fn port_of(insn: &Instruction, rdx: u64) -> Option<u16> {
    match insn.op_kind(if insn.mnemonic() == Mnemonic::In { 1 } else { 0 }) {
        OpKind::Immediate8 => Some(insn.immediate8() as u16),
        OpKind::Register => Some(rdx as u16),
        _ => None,
    }
}

/// The instruction at RIP and its bytes, decoded in the mode CS says.
fn decode_at(tl: &Timeline, r: &kvm_regs, s: &kvm_sregs) -> (Instruction, Vec<u8>) {
    let bits = if s.cs.l != 0 {
        64
    } else if s.cs.db != 0 {
        32
    } else {
        16
    };
    let code = read_virt(tl, s, r.rip, 15);
    let insn = Decoder::with_ip(bits, &code, r.rip, DecoderOptions::NONE).decode();
    let bytes = code[..insn.len().min(code.len())].to_vec();
    (insn, bytes)
}

/// The memory operands of `insn` with their bytes before it runs; addresses
/// come from the registers before, as the CPU computes them.
fn memory_operands(
    factory: &mut InstructionInfoFactory,
    tl: &Timeline,
    insn: &Instruction,
    r: &kvm_regs,
    s: &kvm_sregs,
) -> Vec<Access> {
    let mut mem = Vec::new();
    if insn.is_invalid() {
        return mem;
    }
    let before = regs_array(r);
    let value = |reg: Register, _: usize, _: usize| -> Option<u64> {
        Some(match reg {
            Register::RIP => r.rip,
            Register::FS => s.fs.base,
            Register::GS => s.gs.base,
            Register::ES | Register::CS | Register::SS | Register::DS => 0,
            _ => {
                let (i, first, size) = gpr(reg)?;
                low_bytes(before[i] >> (8 * first), size)
            }
        })
    };
    for m in factory.info(insn).used_memory() {
        let (read, write) = match m.access() {
            OpAccess::Read | OpAccess::CondRead => (true, false),
            OpAccess::Write | OpAccess::CondWrite => (false, true),
            OpAccess::ReadWrite | OpAccess::ReadCondWrite => (true, true),
            _ => continue,
        };
        let Some(va) = m.virtual_address(0, value) else {
            continue;
        };
        let size = m.memory_size().size().max(1);
        let Some(pa) = translate(tl, s, va) else {
            continue;
        };
        // Accesses crossing a page boundary: read through the second page too.
        let before = if (pa & 0xfff) as usize + size <= 4096 {
            read_phys(tl, pa, size)
        } else {
            read_virt(tl, s, va, size)
        };
        mem.push(Access {
            va,
            pa,
            write,
            read,
            before,
            after: Vec::new(),
        });
    }
    mem
}

/// What a port instruction is about to do, read from the devices before it
/// runs: afterwards the UART's FIFO head has moved and the block device's
/// registers describe the next command.
struct PortIo {
    port: Option<u16>,
    /// Position in the whole serial stream of the byte an `in` from the UART reads.
    serial_head: Option<u64>,
    dma: Option<Dma>,
    /// The DMA buffer before the command.
    dma_before: Vec<u8>,
}

impl PortIo {
    fn before(tl: &Timeline, insn: &Instruction, r: &kvm_regs) -> PortIo {
        let m = insn.mnemonic();
        let port = matches!(m, Mnemonic::In | Mnemonic::Out)
            .then(|| port_of(insn, r.rdx))
            .flatten();
        let mut io = PortIo {
            port,
            serial_head: None,
            dma: None,
            dma_before: Vec::new(),
        };
        let devices = &tl.machine.devices;
        match m {
            Mnemonic::In if port == Some(ports::SERIAL_BASE) => {
                let st = devices.serial.state();
                if st.line_control & 0x80 == 0 && !st.in_buffer.is_empty() {
                    let delivered = serial_delivered(&tl.rec, tl.host.next);
                    io.serial_head = Some(delivered.saturating_sub(st.in_buffer.len() as u64));
                }
            }
            // (A command larger than guest memory fails in the device; not a DMA.)
            Mnemonic::Out
                if port == Some(ports::BLK_CMD)
                    && r.rax as u32 == 1
                    && (devices.block.regs.count as u64) * 512 <= tl.machine.config.mem_size =>
            {
                let b = devices.block.regs;
                let d = Dma {
                    lba: b.lba as u64,
                    addr: b.addr as u64,
                    count: b.count as u64,
                };
                io.dma_before = read_phys(tl, d.addr, (d.count * 512) as usize);
                io.dma = Some(d);
            }
            _ => {}
        }
        io
    }

    /// The DMA the command did (its buffer written as one access), if the
    /// device accepted it.
    fn dma_done(self, tl: &Timeline, mem: &mut Vec<Access>) -> Option<Dma> {
        let d = self.dma?;
        if tl.machine.devices.block.regs.status != 0 {
            return None;
        }
        mem.push(Access {
            va: d.addr,
            pa: d.addr,
            write: true,
            read: false,
            before: self.dma_before,
            after: read_phys(tl, d.addr, (d.count * 512) as usize),
        });
        Some(d)
    }
}

/// The handler's first instruction (a push), its bytes, and its slot and
/// the interrupt frame as written memory.
type HandlerEntry = (Instruction, Vec<u8>, Vec<Access>);

/// When a step from ring 3 landed in ring 0 on the instruction after a
/// handler's first `push` (an interrupt delivered before the instruction at
/// RIP ran; src/vmm/step.rs), that push and the frame the CPU wrote below
/// it, as what the step did.
fn interrupt_entry(
    tl: &Timeline,
    ra: &kvm_regs,
    ring: u8,
) -> R<Option<HandlerEntry>> {
    let sa = tl.machine.vcpu.sregs()?;
    if sa.cs.selector & 3 != 0 || ring != 3 {
        return Ok(None);
    }
    for k in 1..=3u64 {
        let ip = ra.rip.wrapping_sub(k);
        let Some(pa) = translate(tl, &sa, ip) else {
            continue;
        };
        let code = read_phys(tl, pa, k as usize);
        let h = Decoder::with_ip(64, &code, ip, DecoderOptions::NONE).decode();
        if h.is_invalid()
            || h.len() as u64 != k
            || h.mnemonic() != Mnemonic::Push
            || h.op0_kind() != OpKind::Register
        {
            continue;
        }
        let mut mem = Vec::new();
        let slot = translate(tl, &sa, ra.rsp).unwrap_or(ra.rsp);
        let frame = read_phys(tl, slot, 48);
        if frame.len() == 48 {
            let (pushed, cpu) = frame.split_at(8);
            for (off, bytes) in [(0, pushed), (8, cpu)] {
                mem.push(Access {
                    va: ra.rsp + off,
                    pa: slot + off,
                    write: true,
                    read: false,
                    before: vec![0; bytes.len()],
                    after: bytes.to_vec(),
                });
            }
        }
        return Ok(Some((h, code, mem)));
    }
    Ok(None)
}

/// A rep string step that ran `n` > 1 iterations touched `n` times each
/// operand's size: widen the accesses (backwards when DF is set). The bytes
/// before the other iterations are lost, so reads use the bytes after.
fn widen_rep(tl: &Timeline, mem: &mut [Access], n: u64, df: bool) {
    for a in mem {
        let size = a.before.len() as u64;
        let total = size * n;
        let start = if df { a.pa + size - total } else { a.pa };
        if (start & 0xfff) + total <= 4096 {
            a.pa = start;
            a.va = if df { a.va + size - total } else { a.va };
            a.after = read_phys(tl, a.pa, total as usize);
            if a.read {
                a.before = a.after.clone();
            } else {
                a.before = vec![0; total as usize];
            }
        }
    }
}

/// Steps a timeline and records each instruction's effects.
pub struct Tracer<'t> {
    pub tl: &'t mut Timeline,
    factory: InstructionInfoFactory,
    /// Steps taken by this tracer.
    pub steps: u64,
    /// Set once the recording's end was reached.
    pub finished: bool,
}

impl<'t> Tracer<'t> {
    pub fn new(tl: &'t mut Timeline) -> Tracer<'t> {
        Tracer {
            tl,
            factory: InstructionInfoFactory::new(),
            steps: 0,
            finished: false,
        }
    }

    fn outcome(&mut self, o: Outcome) -> R<()> {
        match o {
            Outcome::Reached => Ok(()),
            Outcome::Finished { .. } => {
                self.finished = true;
                Ok(())
            }
            Outcome::Diverged(why) => Err(ProvError::Diverged {
                at: self.tl.exits(),
                why,
            }),
            Outcome::EndOfRecording(d) | Outcome::NotReached(d) => Err(ProvError::Msg(d)),
        }
    }

    /// Runs `insn`: instructions that exit to the VMM run to their exit (so
    /// inputs are delivered exactly as recorded), the rest single-step.
    fn execute(&mut self, insn: &Instruction) -> R<()> {
        let exits_next = crate::replay::search::exits_to_vmm(insn.mnemonic())
            && self.tl.machine.devices.pic.next_vector().is_none();
        let o = if exits_next {
            let to = self.tl.exits() + 1;
            self.tl.run(Some(to))?
        } else {
            self.tl.step(1)?
        };
        self.outcome(o)?;
        self.steps += 1;
        Ok(())
    }

    /// Executes one instruction and returns what it did.
    pub fn step(&mut self) -> R<Step> {
        let tl = &*self.tl;
        let at = tl.position()?;
        let r = tl.machine.vcpu.regs()?;
        let s = tl.machine.vcpu.sregs()?;
        let ring = (s.cs.selector & 3) as u8;
        let (insn, bytes) = decode_at(tl, &r, &s);
        let mut mem = memory_operands(&mut self.factory, tl, &insn, &r, &s);
        let io = PortIo::before(tl, &insn, &r);
        self.execute(&insn)?;
        let tl = &*self.tl;
        let ra = tl.machine.vcpu.regs()?;
        let (before, after) = (regs_array(&r), regs_array(&ra));
        for a in &mut mem {
            if a.write {
                a.after = read_phys(tl, a.pa, a.before.len());
            }
        }
        let port = io.port;
        let serial_head = io.serial_head;
        let dma = io.dma_done(tl, &mut mem);
        let input = if insn.mnemonic() == Mnemonic::In {
            let size = insn.op0_register().size().max(1);
            port_input(&tl.rec, tl.exits(), port, low_bytes(ra.rax, size), serial_head)
        } else {
            None
        };
        let mut step = Step {
            at,
            insn,
            bytes,
            ring,
            before,
            after,
            mem,
            input,
            dma,
            irregular: false,
            interrupt: false,
        };
        if unexpected_rip(&step.insn, &step.mem, ra.rip) {
            // The instruction at RIP did not run: an interrupt was delivered
            // first. What ran is the delivery and, from ring 3, the handler's
            // first instruction, recorded as such when it is a push.
            step.mem.clear();
            step.input = None;
            step.dma = None;
            match interrupt_entry(tl, &ra, ring)? {
                Some((insn, bytes, mem)) => {
                    step.insn = insn;
                    step.bytes = bytes;
                    step.mem = mem;
                    step.interrupt = true;
                }
                None => step.irregular = true,
            }
            return Ok(step);
        }
        let rep = step.insn.has_rep_prefix() || step.insn.has_repne_prefix();
        let n = before[1].saturating_sub(after[1]);
        if rep && !step.insn.is_invalid() && n > 1 {
            widen_rep(tl, &mut step.mem, n, r.rflags & (1 << 10) != 0);
        }
        Ok(step)
    }
}

/// Whether RIP after the step is not where the instruction leads (an
/// interrupt or exception was taken inside the step).
fn unexpected_rip(insn: &Instruction, mem: &[Access], rip: u64) -> bool {
    if insn.is_invalid() {
        return true;
    }
    let next = insn.next_ip();
    let near_target = || {
        matches!(
            insn.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        )
        .then(|| insn.near_branch_target())
    };
    let ok = match insn.mnemonic() {
        Mnemonic::Ret => mem
            .iter()
            .find(|a| a.read)
            .map(|a| le(&a.before) == rip)
            .unwrap_or(true),
        Mnemonic::Iretq
        | Mnemonic::Iretd
        | Mnemonic::Iret
        | Mnemonic::Sysret
        | Mnemonic::Sysretq
        | Mnemonic::Syscall => true,
        Mnemonic::Int | Mnemonic::Int3 | Mnemonic::Int1 | Mnemonic::Into | Mnemonic::Ud2 => true,
        Mnemonic::Hlt => true,
        _ if insn.is_string_instruction() && (insn.has_rep_prefix() || insn.has_repne_prefix()) => {
            rip == next || rip == insn.ip()
        }
        _ => match insn.flow_control() {
            iced_x86::FlowControl::Next => rip == next,
            iced_x86::FlowControl::UnconditionalBranch | iced_x86::FlowControl::Call => {
                near_target().is_none_or(|t| rip == t)
            }
            iced_x86::FlowControl::ConditionalBranch => {
                rip == next || near_target() == Some(rip)
            }
            _ => true,
        },
    };
    !ok
}

fn le(b: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    let n = b.len().min(8);
    v[..n].copy_from_slice(&b[..n]);
    u64::from_le_bytes(v)
}
