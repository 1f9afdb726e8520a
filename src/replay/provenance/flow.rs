//! What each instruction reads and writes as values (not as addresses), and
//! a window's dependence graph: which earlier step wrote each byte a step
//! read. Addresses are left out on purpose: `movb %al, (%rbx)` stores what
//! `al` held, and following `rbx` would lead every path into pointer
//! arithmetic.

use std::collections::HashMap;

use iced_x86::{Instruction, InstructionInfo, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register};
use serde::Serialize;

use super::input::Input;
use super::location::{gpr, reg_key, Key};
use super::tracer::{Access, Dma, Step};
use crate::clock::ExecPoint;

/// A value an instruction produced without reading one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Constant {
    /// An immediate operand of the instruction.
    Immediate { value: u64 },
    /// The return address a `call` pushed.
    ReturnAddress { value: u64 },
    /// A result that depends on no value (`xor %eax,%eax`, `setcc`, ...).
    NoInputs,
    /// The interrupt frame the CPU pushed when delivering an interrupt.
    InterruptFrame,
}

/// The value flow of one step: the bytes it wrote, the bytes it read to
/// compute them, and the constants or input it used.
#[derive(Debug, Clone, Default)]
pub(super) struct Flow {
    pub(super) sources: Vec<Key>,
    pub(super) dests: Vec<Key>,
    pub(super) consts: Vec<Constant>,
    pub(super) input: Option<Input>,
}

impl Flow {
    /// A result with neither sources, constants nor input came from no
    /// value at all; keys sorted for the graph's lookups.
    fn finish(mut self) -> Flow {
        if self.sources.is_empty() && self.consts.is_empty() && self.input.is_none() && !self.dests.is_empty() {
            self.consts.push(Constant::NoInputs);
        }
        self.sources.sort_unstable();
        self.sources.dedup();
        self.dests.sort_unstable();
        self.dests.dedup();
        self
    }
}

/// A plain copy (folded onto one line in the display).
pub(super) fn is_copy(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Mov
            | Mnemonic::Movzx
            | Mnemonic::Movsx
            | Mnemonic::Movsxd
            | Mnemonic::Push
            | Mnemonic::Pop
            | Mnemonic::Movsb
            | Mnemonic::Movsw
            | Mnemonic::Movsd
            | Mnemonic::Movsq
            | Mnemonic::Cdqe
            | Mnemonic::Cwde
            | Mnemonic::Cbw
            | Mnemonic::Xchg
    )
}

/// Instructions whose write to `rsp` is stack bookkeeping, not a value.
fn stack_op(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Push
            | Mnemonic::Pop
            | Mnemonic::Call
            | Mnemonic::Ret
            | Mnemonic::Enter
            | Mnemonic::Leave
            | Mnemonic::Iretq
            | Mnemonic::Pushfq
            | Mnemonic::Popfq
            | Mnemonic::Pushf
            | Mnemonic::Popf
    )
}

fn access_keys(a: &Access) -> impl Iterator<Item = Key> {
    a.pa..a.pa + a.before.len().max(a.after.len()) as u64
}

fn reads(a: OpAccess) -> bool {
    matches!(a, OpAccess::Read | OpAccess::CondRead | OpAccess::ReadWrite | OpAccess::ReadCondWrite)
}

fn writes(a: OpAccess) -> bool {
    matches!(a, OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite)
}

/// An interrupt's entry: the handler's push of a register into its slot
/// (`mem[0]`), and the frame the CPU wrote (`mem[1]`).
fn interrupt_flow(step: &Step) -> Flow {
    let mut f = Flow::default();
    if let (Some(slot), Some((r, _, _))) = (step.mem.first(), gpr(step.insn.op0_register())) {
        f.dests.extend(access_keys(slot));
        f.sources.extend((0..8).map(|b| reg_key(r, b)));
    }
    if let Some(frame) = step.mem.get(1) {
        f.dests.extend(access_keys(frame));
        f.consts.push(Constant::InterruptFrame);
    }
    f
}

/// Something the decoder cannot explain: the register bytes that changed,
/// from no value.
fn changed_registers(step: &Step) -> Flow {
    let mut f = Flow::default();
    for (i, (a, b)) in step.before.iter().zip(step.after.iter()).enumerate() {
        for byte in 0..8 {
            if (a >> (8 * byte)) & 0xff != (b >> (8 * byte)) & 0xff {
                f.dests.push(reg_key(i, byte));
            }
        }
    }
    f.consts.push(Constant::InterruptFrame);
    f
}

/// A DMA read: its whole buffer, from the disk.
fn dma_flow(d: Dma) -> Flow {
    Flow {
        dests: (d.addr..d.addr + d.count * 512).collect(),
        input: Some(Input::Disk {
            sector: d.lba,
            offset: 0,
            len: d.count * 512,
        }),
        ..Flow::default()
    }
}

/// `xor %eax,%eax` and its kin: the result does not depend on the register.
fn zero_idiom(insn: &Instruction) -> bool {
    matches!(
        insn.mnemonic(),
        Mnemonic::Xor | Mnemonic::Sub | Mnemonic::Pxor | Mnemonic::Xorps | Mnemonic::Sbb
    ) && insn.op_count() == 2
        && insn.op0_kind() == OpKind::Register
        && insn.op1_kind() == OpKind::Register
        && insn.op0_register() == insn.op1_register()
}

/// The general-register bytes `insn` reads as values and writes. A register
/// that only forms a memory address is not a value source unless it is also
/// an explicit operand (`add (%rax), %rax`); `dx` of `in` is a port number.
fn register_flow(f: &mut Flow, insn: &Instruction, info: &InstructionInfo) {
    let m = insn.mnemonic();
    let mut addr_regs: Vec<Register> = Vec::new();
    for um in info.used_memory() {
        if um.access() != OpAccess::NoMemAccess {
            for r in [um.base(), um.index()] {
                if r != Register::None {
                    addr_regs.push(r.full_register());
                }
            }
        }
    }
    let explicit_read: Vec<Register> = (0..insn.op_count())
        .filter(|&i| insn.op_kind(i) == OpKind::Register && reads(info.op_access(i)))
        .map(|i| insn.op_register(i).full_register())
        .collect();
    let zero = zero_idiom(insn);
    for ur in info.used_registers() {
        let Some((idx, first, size)) = gpr(ur.register()) else {
            continue;
        };
        let full = ur.register().full_register();
        if reads(ur.access())
            && !zero
            && (!addr_regs.contains(&full) || explicit_read.contains(&full))
            && !(m == Mnemonic::In && idx == 2)
        {
            f.sources.extend((first..first + size).map(|b| reg_key(idx, b)));
        }
        if writes(ur.access()) && !(idx == 4 && stack_op(m)) {
            // A 32-bit write zero-extends into the whole register.
            let bytes = if size == 4 { 0..8 } else { first..first + size };
            f.dests.extend(bytes.map(|b| reg_key(idx, b)));
        }
    }
}

/// The immediate operands of `insn` (not the port number of `in`/`out`).
fn immediates(insn: &Instruction) -> impl Iterator<Item = Constant> + '_ {
    let m = insn.mnemonic();
    (0..insn.op_count())
        .filter(move |&i| {
            matches!(
                insn.op_kind(i),
                OpKind::Immediate8
                    | OpKind::Immediate16
                    | OpKind::Immediate32
                    | OpKind::Immediate64
                    | OpKind::Immediate8to16
                    | OpKind::Immediate8to32
                    | OpKind::Immediate8to64
                    | OpKind::Immediate32to64
            ) && m != Mnemonic::In
                && m != Mnemonic::Out
        })
        .map(|i| Constant::Immediate {
            value: insn.immediate(i),
        })
}

/// The value flow of one step (see the module doc).
pub(super) fn flow(step: &Step, factory: &mut InstructionInfoFactory) -> Flow {
    if step.interrupt {
        return interrupt_flow(step);
    }
    if step.irregular || step.insn.is_invalid() {
        return changed_registers(step);
    }
    if let Some(d) = step.dma {
        return dma_flow(d);
    }
    let insn = &step.insn;
    let mut f = Flow::default();
    register_flow(&mut f, insn, factory.info(insn));
    for a in &step.mem {
        if a.read {
            f.sources.extend(access_keys(a));
        }
        if a.write {
            f.dests.extend(access_keys(a));
        }
    }
    f.consts.extend(immediates(insn));
    if insn.mnemonic() == Mnemonic::Call {
        f.consts.push(Constant::ReturnAddress {
            value: insn.next_ip(),
        });
    }
    if let Some(inp) = &step.input {
        // A port read's value comes from the log, whatever registers it named.
        f.sources.clear();
        f.input = Some(inp.clone());
    }
    f.finish()
}

/// A stretch of execution stepped instruction by instruction.
pub struct Window {
    /// Exit boundary it starts at.
    pub from: u64,
    /// The point it ends at (the query point, or the next window's start).
    pub to: ExecPoint,
    pub steps: Vec<Step>,
    /// Each step's value flow.
    pub(super) flows: Vec<Flow>,
    /// For each source byte of each step (parallel to `flows[i].sources`):
    /// the step in this window that last wrote it (None: before the window).
    pub(super) deps: Vec<Vec<Option<u32>>>,
    /// The last writer in this window of every byte written in it.
    pub(super) last: HashMap<Key, u32>,
}

impl Window {
    /// Builds the dependence graph of `steps` (forward: every source byte's
    /// last writer within the window).
    pub(super) fn new(from: u64, to: ExecPoint, steps: Vec<Step>) -> Window {
        let mut factory = InstructionInfoFactory::new();
        let mut last: HashMap<Key, u32> = HashMap::new();
        let mut deps = Vec::with_capacity(steps.len());
        let mut flows = Vec::with_capacity(steps.len());
        for (i, s) in steps.iter().enumerate() {
            let f = flow(s, &mut factory);
            deps.push(f.sources.iter().map(|k| last.get(k).copied()).collect());
            for k in &f.dests {
                last.insert(*k, i as u32);
            }
            flows.push(f);
        }
        Window {
            from,
            to,
            steps,
            flows,
            deps,
            last,
        }
    }
}
