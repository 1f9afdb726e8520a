//! Provenance over a recording: where did a byte come from, and who touched
//! it when. Two primitives, both built on [`Timeline`] single-stepping:
//!
//! - [`history`]: every write (optionally read) of a guest-physical byte
//!   range between two points, with the instruction, the point and the old
//!   and new bytes (TTD's `Memory(begin, end, "rw")`).
//! - [`origin`]: the data flow of a location walked backwards: its last
//!   writer, that instruction's value sources (registers, memory, decoded
//!   with iced-x86), recursively, down to the inputs the log holds (serial
//!   byte N of event E, a clock reading, disk sector S offset O), constants
//!   in the code, or bytes of the boot image never written since.
//!
//! Both step a window of the execution one instruction at a time and record
//! each instruction's effects ([`Step`]): registers before and after, every
//! memory operand (virtual and physical address, bytes before and after),
//! and what a port read returned and which log entry it came from. A
//! forward pass over a window gives every source byte its last writer
//! (a dynamic dependence graph); the backward walk is then a graph search.
//! Windows are exit ranges ending at the query point, extended backwards
//! (and skipping checkpoint intervals whose dirty-page lists show the
//! wanted memory untouched) until every path ends.
//!
//! Instructions that exit to the VMM (port I/O, `hlt`) are not
//! single-stepped but run to their exit, as the gdb stub does, so inputs
//! are delivered exactly as recorded. The native-speed search engine
//! (hardware watchpoints, breakpoints) can later replace the stepping of
//! long stretches: [`Window`] is the unit it would produce.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iced_x86::{
    Decoder, DecoderOptions, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind,
    Register,
};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use super::{Outcome, Recording, ReplayError, Sink, Timeline};
use crate::clock::ExecPoint;
use super::symbols::Symbols;
use crate::trace::Event;
use crate::vmm::layout::ports;

#[derive(Debug, thiserror::Error)]
pub enum ProvError {
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Machine(#[from] crate::vmm::MachineError),
    #[error("replay diverged from the recording at exit {at}: {why}")]
    Diverged { at: u64, why: String },
    #[error("{0}")]
    Msg(String),
    /// Ctrl-C (or the caller's interrupt check) stopped the query.
    #[error("interrupted at exit {at}")]
    Interrupted { at: u64 },
}

type R<T> = Result<T, ProvError>;

impl From<crate::vmm::vcpu::VcpuError> for ProvError {
    fn from(e: crate::vmm::vcpu::VcpuError) -> Self {
        ProvError::Machine(e.into())
    }
}

// ---------------------------------------------------------------------------
// Locations

/// General registers in iced-x86's order (RAX RCX RDX RBX RSP RBP RSI RDI R8..R15).
pub const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

/// A location one byte wide, as a map key: guest physical memory byte
/// `pa`, or byte `b` of general register `r` (`REG_BIT | r * 8 + b`).
type Key = u64;
const REG_BIT: u64 = 1 << 62;

fn reg_key(r: usize, b: usize) -> Key {
    REG_BIT | (r * 8 + b) as u64
}

/// The register index, first byte and byte count of an iced register,
/// when it is a general register (AH..BH are byte 1).
fn gpr(reg: Register) -> Option<(usize, usize, usize)> {
    let full = reg.full_register();
    let idx = (full as u32).checked_sub(Register::RAX as u32)? as usize;
    if idx >= 16 {
        return None;
    }
    let first = usize::from(matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    ));
    Some((idx, first, reg.size()))
}

fn regs_array(r: &kvm_bindings::kvm_regs) -> [u64; 16] {
    [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ]
}

/// A location a query asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Location {
    /// `len` bytes of guest physical memory.
    Memory { phys: u64, len: u64 },
    /// A general register (index into [`GPR_NAMES`]), all 8 bytes.
    Register { reg: usize },
}

impl Location {
    fn keys(&self) -> Vec<Key> {
        match *self {
            Location::Memory { phys, len } => (phys..phys + len).collect(),
            Location::Register { reg } => (0..8).map(|b| reg_key(reg, b)).collect(),
        }
    }
}

/// A register by name (rax..r15, eax, ax, al ...), as a [`Location`] index.
pub fn register_index(name: &str) -> Option<usize> {
    let n = name.trim_start_matches('$').to_ascii_lowercase();
    if let Some(i) = GPR_NAMES.iter().position(|g| *g == n) {
        return Some(i);
    }
    let alias = match n.as_str() {
        "sp" => "rsp",
        "fp" => "rbp",
        "eax" | "ax" | "al" => "rax",
        "ebx" | "bx" | "bl" => "rbx",
        "ecx" | "cx" | "cl" => "rcx",
        "edx" | "dx" | "dl" => "rdx",
        "esi" | "si" => "rsi",
        "edi" | "di" => "rdi",
        "ebp" | "bp" => "rbp",
        "esp" => "rsp",
        _ => return None,
    };
    GPR_NAMES.iter().position(|g| *g == alias)
}

// ---------------------------------------------------------------------------
// Inputs

/// Where the log delivered a value from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Input {
    /// Byte `offset` of the serial input of log event `event` (read from the UART's FIFO).
    Serial {
        event: usize,
        offset: usize,
        byte: u8,
    },
    /// The clock reading of log event `event` (`high`: the latched upper half).
    Clock {
        event: usize,
        value: u64,
        high: bool,
    },
    /// Bytes `offset..offset+len` of disk sector `sector`, copied into memory by DMA.
    Disk { sector: u64, offset: u64, len: u64 },
    /// A device register read on `port` (state the replay recomputes, not an input).
    Device { port: u16, value: u64 },
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Serial {
                event,
                offset,
                byte,
            } => {
                write!(
                    f,
                    "serial input byte {offset} of event #{event} ({})",
                    show_byte(*byte)
                )
            }
            Input::Clock { event, value, high } => {
                write!(
                    f,
                    "clock reading of event #{event} ({value} ns{})",
                    if *high { ", latched high half" } else { "" }
                )
            }
            Input::Disk {
                sector,
                offset,
                len,
            } if *len == 1 => write!(f, "disk sector {sector} offset {offset}"),
            Input::Disk {
                sector,
                offset,
                len,
            } => write!(f, "disk sector {sector} offsets {offset}..{}", offset + len),
            Input::Device { port, value } => {
                write!(f, "device register at port {port:#x} (value {value:#x})")
            }
        }
    }
}

fn show_byte(b: u8) -> String {
    match b {
        0x20..=0x7e => format!("{:?} = {b:#04x}", b as char),
        _ => format!("{b:#04x}"),
    }
}

// ---------------------------------------------------------------------------
// Steps

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

/// A stretch of execution stepped instruction by instruction.
pub struct Window {
    /// Exit boundary it starts at.
    pub from: u64,
    /// The point it ends at (the query point, or the next window's start).
    pub to: ExecPoint,
    pub steps: Vec<Step>,
    /// Each step's value flow.
    flows: Vec<Flow>,
    /// For each source byte of each step (parallel to `flows[i].sources`):
    /// the step in this window that last wrote it (None: before the window).
    deps: Vec<Vec<Option<u32>>>,
    /// The last writer in this window of every byte written in it.
    last: HashMap<Key, u32>,
}

/// Default depth limit, in instructions along a path (a loop that folds
/// every byte of a buffer into one value is two or three per byte).
pub const DEFAULT_DEPTH: usize = 100_000;

/// Limits and hooks of a query.
pub struct Limits<'a> {
    /// Most instructions to single-step in all.
    pub max_steps: u64,
    pub max_depth: usize,
    pub max_time: Duration,
    /// Polled every few hundred steps; true stops the query.
    pub interrupted: &'a dyn Fn() -> bool,
    /// Show a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

impl Default for Limits<'_> {
    fn default() -> Self {
        Limits {
            max_steps: 5_000_000,
            max_depth: DEFAULT_DEPTH,
            max_time: Duration::from_secs(600),
            interrupted: &|| false,
            progress: false,
        }
    }
}

/// Guest virtual → physical through the current page tables (4-level, 4K/2M/1G).
fn translate(tl: &Timeline, cr0: u64, cr3: u64, va: u64) -> Option<u64> {
    let s = kvm_bindings::kvm_sregs { cr0, cr3, ..Default::default() };
    crate::vmm::paging::translate(&tl.machine.mem, &s, va)
}

fn read_phys(tl: &Timeline, pa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    if tl.machine.mem.read_slice(&mut b, GuestAddress(pa)).is_err() {
        b.clear();
    }
    b
}

/// The (event index, offset in its bytes, byte) of byte `n` of the whole
/// serial input stream (all `Serial` events in log order).
fn serial_byte(rec: &Recording, n: u64) -> Option<(usize, usize, u8)> {
    let mut seen = 0u64;
    for (i, e) in rec.events.iter().enumerate() {
        if let Event::Serial { bytes, .. } = e {
            let len = bytes.len() as u64;
            if n < seen + len {
                let off = (n - seen) as usize;
                return Some((i, off, bytes[off]));
            }
            seen += len;
        }
    }
    None
}

/// Serial bytes the `Serial` events before log index `next` delivered.
fn serial_delivered(rec: &Recording, next: usize) -> u64 {
    rec.events[..next.min(rec.events.len())]
        .iter()
        .map(|e| {
            if let Event::Serial { bytes, .. } = e {
                bytes.len() as u64
            } else {
                0
            }
        })
        .sum()
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

    /// Executes one instruction and returns what it did.
    pub fn step(&mut self) -> R<Step> {
        let tl = &*self.tl;
        let at = tl.position()?;
        let r = tl.machine.vcpu.regs()?;
        let s = tl.machine.vcpu.sregs()?;
        let before = regs_array(&r);
        let ring = (s.cs.selector & 3) as u8;
        let bits = if s.cs.l != 0 {
            64
        } else if s.cs.db != 0 {
            32
        } else {
            16
        };
        let mut code = Vec::with_capacity(15);
        for i in 0..15u64 {
            match translate(tl, s.cr0, s.cr3, r.rip + i).map(|pa| read_phys(tl, pa, 1)) {
                Some(b) if b.len() == 1 => code.push(b[0]),
                _ => break,
            }
        }
        let insn = Decoder::with_ip(bits, &code, r.rip, DecoderOptions::NONE).decode();
        let bytes = code[..insn.len().min(code.len())].to_vec();
        // Memory operands, with addresses from the registers before.
        let value = |reg: Register, _: usize, _: usize| -> Option<u64> {
            let v = match reg {
                Register::RIP => r.rip,
                Register::FS => s.fs.base,
                Register::GS => s.gs.base,
                Register::ES | Register::CS | Register::SS | Register::DS => 0,
                _ => {
                    let (i, first, size) = gpr(reg)?;
                    let full = before[i] >> (8 * first);
                    if size >= 8 {
                        full
                    } else {
                        full & ((1u64 << (8 * size)) - 1)
                    }
                }
            };
            Some(v)
        };
        let mut mem = Vec::new();
        let rep = insn.has_rep_prefix() || insn.has_repne_prefix();
        if !insn.is_invalid() {
            let info = self.factory.info(&insn);
            for m in info.used_memory() {
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
                let Some(pa) = translate(tl, s.cr0, s.cr3, va) else {
                    continue;
                };
                // Accesses crossing a page boundary: read through the second page too.
                let b = if (pa & 0xfff) as usize + size <= 4096 {
                    read_phys(tl, pa, size)
                } else {
                    let mut v = Vec::with_capacity(size);
                    for k in 0..size as u64 {
                        match translate(tl, s.cr0, s.cr3, va + k) {
                            Some(p) => v.extend(read_phys(tl, p, 1)),
                            None => break,
                        }
                    }
                    v
                };
                mem.push(Access {
                    va,
                    pa,
                    write,
                    read,
                    before: b,
                    after: Vec::new(),
                });
            }
        }
        // Port input attribution needs the device state before the access.
        let mut input = None;
        let mut dma = None;
        let port = |ins: &Instruction| -> Option<u16> {
            match ins.op_kind(if ins.mnemonic() == Mnemonic::In { 1 } else { 0 }) {
                OpKind::Immediate8 => Some(ins.immediate8() as u16),
                OpKind::Register => Some(r.rdx as u16),
                _ => None,
            }
        };
        let mut serial_head: Option<(u64, usize)> = None;
        match insn.mnemonic() {
            Mnemonic::In if port(&insn) == Some(ports::SERIAL_BASE) => {
                let st = tl.machine.devices.serial.state();
                if st.line_control & 0x80 == 0 && !st.in_buffer.is_empty() {
                    let delivered = serial_delivered(&tl.rec, tl.host.next);
                    serial_head = Some((
                        delivered.saturating_sub(st.in_buffer.len() as u64),
                        st.in_buffer.len(),
                    ));
                }
            }
            // (A command larger than guest memory fails in the device; not a DMA.)
            Mnemonic::Out
                if port(&insn) == Some(ports::BLK_CMD)
                    && r.rax as u32 == 1
                    && (tl.machine.devices.block.regs.count as u64) * 512
                        <= tl.machine.config.mem_size =>
            {
                let b = tl.machine.devices.block.regs;
                dma = Some(Dma {
                    lba: b.lba as u64,
                    addr: b.addr as u64,
                    count: b.count as u64,
                });
            }
            _ => {}
        }
        let mut dma_before = None;
        if let Some(d) = dma {
            dma_before = Some(read_phys(tl, d.addr, (d.count * 512) as usize));
        }
        // Execute it.
        let exits_next =
            super::search::exits_to_vmm(insn.mnemonic()) && tl.machine.devices.pic.next_vector().is_none();
        let o = if exits_next {
            let to = self.tl.exits() + 1;
            self.tl.run(Some(to))?
        } else {
            self.tl.step(1)?
        };
        self.outcome(o)?;
        self.steps += 1;
        let tl = &*self.tl;
        let ra = tl.machine.vcpu.regs()?;
        let after = regs_array(&ra);
        for a in &mut mem {
            if a.write {
                a.after = read_phys(tl, a.pa, a.before.len());
            }
        }
        if let Some(d) = dma {
            let new = read_phys(tl, d.addr, (d.count * 512) as usize);
            if tl.machine.devices.block.regs.status == 0 {
                mem.push(Access {
                    va: d.addr,
                    pa: d.addr,
                    write: true,
                    read: false,
                    before: dma_before.unwrap_or_default(),
                    after: new,
                });
            } else {
                dma = None;
            }
        }
        if insn.mnemonic() == Mnemonic::In {
            let size = insn.op0_register().size().max(1);
            let v = if size >= 8 {
                ra.rax
            } else {
                ra.rax & ((1u64 << (8 * size)) - 1)
            };
            input = match port(&insn) {
                Some(ports::SERIAL_BASE) => {
                    match serial_head.and_then(|(n, _)| serial_byte(&tl.rec, n)) {
                        Some((event, offset, byte)) => Some(Input::Serial {
                            event,
                            offset,
                            byte,
                        }),
                        None => Some(Input::Device {
                            port: ports::SERIAL_BASE,
                            value: v,
                        }),
                    }
                }
                Some(ports::CLOCK_LO) => tl
                    .rec
                    .events
                    .iter()
                    .position(|e| matches!(e, Event::Clock { exits, .. } if *exits == tl.exits()))
                    .map(|event| Input::Clock {
                        event,
                        value: clock_value(&tl.rec, event),
                        high: false,
                    }),
                Some(ports::CLOCK_HI) => tl
                    .rec
                    .events
                    .iter()
                    .rposition(|e| matches!(e, Event::Clock { exits, .. } if *exits <= tl.exits()))
                    .map(|event| Input::Clock {
                        event,
                        value: clock_value(&tl.rec, event),
                        high: true,
                    }),
                Some(p) => Some(Input::Device { port: p, value: v }),
                None => None,
            };
        }
        let mut irregular = unexpected_rip(&insn, &mem, ra.rip);
        let mut insn = insn;
        let mut bytes = bytes;
        if irregular {
            // An interrupt was delivered before the instruction ran: from
            // ring 3 the step stops after the handler's first instruction
            // (src/clock/step.rs). The instruction at RIP did not run; what
            // did is the event delivery (the frame on the ring-0 stack) and
            // that first instruction, recorded as such when it is a push.
            let sa = tl.machine.vcpu.sregs()?;
            mem.clear();
            input = None;
            dma = None;
            if sa.cs.selector & 3 == 0 && ring == 3 {
                for k in 1..=3u64 {
                    let Some(pa) = translate(tl, sa.cr0, sa.cr3, ra.rip.wrapping_sub(k)) else {
                        continue;
                    };
                    let code = read_phys(tl, pa, k as usize);
                    let h =
                        Decoder::with_ip(64, &code, ra.rip.wrapping_sub(k), DecoderOptions::NONE)
                            .decode();
                    if !h.is_invalid()
                        && h.len() as u64 == k
                        && h.mnemonic() == Mnemonic::Push
                        && h.op0_kind() == OpKind::Register
                    {
                        let slot = translate(tl, sa.cr0, sa.cr3, ra.rsp).unwrap_or(ra.rsp);
                        let frame = read_phys(tl, slot, 48);
                        if frame.len() == 48 {
                            mem.push(Access {
                                va: ra.rsp,
                                pa: slot,
                                write: true,
                                read: false,
                                before: vec![0; 8],
                                after: frame[..8].to_vec(),
                            });
                            mem.push(Access {
                                va: ra.rsp + 8,
                                pa: slot + 8,
                                write: true,
                                read: false,
                                before: vec![0; 40],
                                after: frame[8..].to_vec(),
                            });
                        }
                        insn = h;
                        bytes = code;
                        irregular = false;
                        return Ok(Step {
                            at,
                            insn,
                            bytes,
                            ring,
                            before,
                            after,
                            mem,
                            input,
                            dma,
                            irregular,
                            interrupt: true,
                        });
                    }
                }
            }
        }
        // Rep string steps that ran several iterations: widen the accesses.
        if rep && !insn.is_invalid() {
            let n = before[1].saturating_sub(after[1]);
            if n > 1 {
                let df = r.rflags & (1 << 10) != 0;
                let tl = &*self.tl;
                for a in &mut mem {
                    let size = a.before.len() as u64;
                    let total = size * n;
                    let start = if df { a.pa + size - total } else { a.pa };
                    if (start & 0xfff) + total <= 4096 {
                        a.pa = start;
                        a.va = if df { a.va + size - total } else { a.va };
                        // The "before" bytes are lost for the other iterations: use the after bytes for reads.
                        a.after = read_phys(tl, a.pa, total as usize);
                        if a.read {
                            a.before = a.after.clone();
                        } else {
                            a.before = vec![0; total as usize];
                        }
                    }
                }
            }
        }
        Ok(Step {
            at,
            insn,
            bytes,
            ring,
            before,
            after,
            mem,
            input,
            dma,
            irregular,
            interrupt: false,
        })
    }
}

/// Whether RIP after the step is not where the instruction leads (an
/// interrupt or exception was taken inside the step).
fn unexpected_rip(insn: &Instruction, mem: &[Access], rip: u64) -> bool {
    if insn.is_invalid() {
        return true;
    }
    let next = insn.next_ip();
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
                match insn.op0_kind() {
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                        rip == insn.near_branch_target()
                    }
                    _ => true,
                }
            }
            iced_x86::FlowControl::ConditionalBranch => {
                rip == next
                    || matches!(
                        insn.op0_kind(),
                        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
                    ) && rip == insn.near_branch_target()
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

fn clock_value(rec: &Recording, event: usize) -> u64 {
    match rec.events.get(event) {
        Some(Event::Clock { value, .. }) => *value,
        _ => 0,
    }
}

// ---------------------------------------------------------------------------
// What each instruction reads and writes (value flow, not addresses)

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
struct Flow {
    sources: Vec<Key>,
    dests: Vec<Key>,
    consts: Vec<Constant>,
    input: Option<Input>,
}

fn is_copy(m: Mnemonic) -> bool {
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

fn flow(step: &Step, factory: &mut InstructionInfoFactory) -> Flow {
    let mut f = Flow::default();
    let mem_keys =
        |a: &Access| (a.pa..a.pa + a.before.len().max(a.after.len()) as u64).collect::<Vec<_>>();
    if step.interrupt {
        // [0] the handler's push of a register, [1] the frame.
        if let (Some(slot), Some((r, _, _))) = (step.mem.first(), gpr(step.insn.op0_register())) {
            f.dests.extend(mem_keys(slot));
            f.sources.extend((0..8).map(|b| reg_key(r, b)));
        }
        if let Some(frame) = step.mem.get(1) {
            f.dests.extend(mem_keys(frame));
            f.consts.push(Constant::InterruptFrame);
        }
        return f;
    }
    if step.irregular || step.insn.is_invalid() {
        // Something the decoder cannot explain: the registers that changed.
        for (i, (a, b)) in step.before.iter().zip(step.after.iter()).enumerate() {
            for byte in 0..8 {
                if (a >> (8 * byte)) & 0xff != (b >> (8 * byte)) & 0xff {
                    f.dests.push(reg_key(i, byte));
                }
            }
        }
        f.consts.push(Constant::InterruptFrame);
        return f;
    }
    let insn = &step.insn;
    let m = insn.mnemonic();
    if let Some(d) = step.dma {
        f.dests.extend(d.addr..d.addr + d.count * 512);
        f.input = Some(Input::Disk {
            sector: d.lba,
            offset: 0,
            len: d.count * 512,
        });
        return f;
    }
    let info = factory.info(insn);
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
    let mut explicit_read: Vec<Register> = Vec::new();
    for i in 0..insn.op_count() {
        if insn.op_kind(i) == OpKind::Register
            && matches!(
                info.op_access(i),
                OpAccess::Read | OpAccess::ReadWrite | OpAccess::CondRead | OpAccess::ReadCondWrite
            )
        {
            explicit_read.push(insn.op_register(i).full_register());
        }
    }
    let zero_idiom = matches!(
        m,
        Mnemonic::Xor | Mnemonic::Sub | Mnemonic::Pxor | Mnemonic::Xorps | Mnemonic::Sbb
    ) && insn.op_count() == 2
        && insn.op0_kind() == OpKind::Register
        && insn.op1_kind() == OpKind::Register
        && insn.op0_register() == insn.op1_register();
    for ur in info.used_registers() {
        let Some((idx, first, size)) = gpr(ur.register()) else {
            continue;
        };
        let full = ur.register().full_register();
        let reads = matches!(
            ur.access(),
            OpAccess::Read | OpAccess::CondRead | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        );
        let writes = matches!(
            ur.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        );
        if reads
            && !zero_idiom
            && (!addr_regs.contains(&full) || explicit_read.contains(&full))
            && !(m == Mnemonic::In && idx == 2)
        {
            f.sources
                .extend((first..first + size).map(|b| reg_key(idx, b)));
        }
        if writes && !(idx == 4 && stack_op(m)) {
            let bytes = if size == 4 { 0..8 } else { first..first + size };
            f.dests.extend(bytes.map(|b| reg_key(idx, b)));
        }
    }
    for a in &step.mem {
        if a.read {
            f.sources.extend(mem_keys(a));
        }
        if a.write {
            f.dests.extend(mem_keys(a));
        }
    }
    for i in 0..insn.op_count() {
        if matches!(
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
        {
            f.consts.push(Constant::Immediate {
                value: insn.immediate(i),
            });
        }
    }
    if m == Mnemonic::Call {
        f.consts.push(Constant::ReturnAddress {
            value: insn.next_ip(),
        });
    }
    if let Some(inp) = &step.input {
        f.sources.clear();
        f.input = Some(inp.clone());
    }
    if f.sources.is_empty() && f.consts.is_empty() && f.input.is_none() && !f.dests.is_empty() {
        f.consts.push(Constant::NoInputs);
    }
    f.sources.sort_unstable();
    f.sources.dedup();
    f.dests.sort_unstable();
    f.dests.dedup();
    f
}

impl Window {
    /// Builds the dependence graph of `steps` (forward: every source byte's
    /// last writer within the window).
    fn new(from: u64, to: ExecPoint, steps: Vec<Step>) -> Window {
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

// ---------------------------------------------------------------------------
// Driving the replay

/// Counts steps and time across a query, polls for interrupts, draws progress.
pub(crate) struct Budget<'a> {
    limits: &'a Limits<'a>,
    start: Instant,
    pub(crate) steps: u64,
    bar: Option<indicatif::ProgressBar>,
}

impl<'a> Budget<'a> {
    pub(crate) fn new(limits: &'a Limits<'a>) -> Budget<'a> {
        Budget {
            limits,
            start: Instant::now(),
            steps: 0,
            bar: None,
        }
    }

    /// Why the query must stop now, if it must.
    pub(crate) fn exhausted(&self) -> Option<String> {
        if self.steps >= self.limits.max_steps {
            return Some(format!(
                "the step limit ({} instructions single-stepped)",
                self.limits.max_steps
            ));
        }
        if self.start.elapsed() >= self.limits.max_time {
            return Some(format!(
                "the time limit ({:.0} s)",
                self.limits.max_time.as_secs_f64()
            ));
        }
        None
    }

    pub(crate) fn tick(&mut self, at: u64) -> R<()> {
        self.steps += 1;
        if self.steps.is_multiple_of(256) {
            if (self.limits.interrupted)() {
                self.done();
                return Err(ProvError::Interrupted { at });
            }
            if self.bar.is_none()
                && self.limits.progress
                && self.start.elapsed() > Duration::from_millis(500)
            {
                use std::io::IsTerminal;
                if std::io::stderr().is_terminal() {
                    let b = indicatif::ProgressBar::with_draw_target(
                        None,
                        indicatif::ProgressDrawTarget::stderr_with_hz(8),
                    );
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{spinner} {msg} {pos} instructions stepped, {elapsed} (Ctrl-C stops)",
                        )
                        .expect("valid template"),
                    );
                    self.bar = Some(b);
                }
            }
            if let Some(b) = &self.bar {
                b.set_position(self.steps);
                b.set_message(format!("tracing at exit {at}:"));
            }
        }
        Ok(())
    }

    pub(crate) fn done(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Replays from exit boundary `from` to point `to`, single-stepping every
/// instruction in between and handing each to `each`. Stops early (returns
/// the reason) on a limit.
fn trace_span(
    rec: &Arc<Recording>,
    from: u64,
    to: ExecPoint,
    budget: &mut Budget,
    each: &mut dyn FnMut(Step),
    at_end: &mut dyn FnMut(&Timeline) -> R<()>,
) -> R<Option<String>> {
    let ck = Timeline::nearest_checkpoint(rec, from);
    let mut tl = Timeline::at_checkpoint(rec.clone(), ck, Sink::Discard)?;
    if tl.exits() < from {
        match tl.run(Some(from))? {
            Outcome::Reached => {}
            Outcome::Diverged(why) => {
                return Err(ProvError::Diverged {
                    at: tl.exits(),
                    why,
                })
            }
            o => {
                return Err(ProvError::Msg(format!(
                    "cannot replay to exit {from}: {o:?}"
                )))
            }
        }
    }
    let mut t = Tracer::new(&mut tl);
    loop {
        let here = t.tl.position()?;
        if here == to || t.finished {
            at_end(t.tl)?;
            return Ok(None);
        }
        if (here.exits, here.branches) > (to.exits, to.branches) {
            return Err(ProvError::Msg(format!(
                "the execution does not stop at {to}: it went on to {here}"
            )));
        }
        if let Some(why) = budget.exhausted() {
            return Ok(Some(why));
        }
        let s = t.step()?;
        budget.tick(s.at.exits)?;
        each(s);
    }
}

/// The point reached by replaying to exit `exits` (its RIP).
pub fn exit_point(rec: &Arc<Recording>, exits: u64) -> R<ExecPoint> {
    let ck = Timeline::nearest_checkpoint(rec, exits);
    let mut tl = Timeline::at_checkpoint(rec.clone(), ck, Sink::Discard)?;
    if tl.exits() < exits {
        match tl.run(Some(exits))? {
            Outcome::Reached | Outcome::Finished { .. } => {}
            Outcome::Diverged(why) => {
                return Err(ProvError::Diverged {
                    at: tl.exits(),
                    why,
                })
            }
            o => {
                return Err(ProvError::Msg(format!(
                    "cannot replay to exit {exits}: {o:?}"
                )))
            }
        }
    }
    Ok(tl.position()?)
}

/// The first point in exits `from..to` where RIP is `rip` (single-stepping).
pub fn find_rip(
    rec: &Arc<Recording>,
    rip: u64,
    from: u64,
    to: u64,
    limits: &Limits,
) -> R<Option<ExecPoint>> {
    let end = exit_point(rec, to)?;
    let ck = Timeline::nearest_checkpoint(rec, from);
    let mut tl = Timeline::at_checkpoint(rec.clone(), ck, Sink::Discard)?;
    if tl.exits() < from {
        tl.run(Some(from))?;
    }
    let mut budget = Budget::new(limits);
    let mut t = Tracer::new(&mut tl);
    loop {
        let here = t.tl.position()?;
        if here.rip == rip {
            return Ok(Some(here));
        }
        if here == end || t.finished || here.exits > end.exits || budget.exhausted().is_some() {
            return Ok(None);
        }
        t.step()?;
        budget.tick(here.exits)?;
    }
}

// ---------------------------------------------------------------------------
// The boot image

/// The recorded guest image: where loaded bytes came from in the ELF file.
pub struct Image {
    /// (physical start, file offset, size in the file, virtual start).
    segments: Vec<(u64, u64, u64, u64)>,
    pub symbols: Symbols,
}

impl Image {
    pub fn open(rec: &Recording) -> Image {
        let b = &rec.image;
        Image {
            segments: load_segments(b).unwrap_or_default(),
            symbols: Symbols::from_elf(b),
        }
    }

    /// The ELF file offset and virtual address of physical byte `pa`, when the loader put it there from the file.
    pub fn file_offset(&self, pa: u64) -> Option<(u64, u64)> {
        self.segments
            .iter()
            .find(|(p, _, n, _)| pa >= *p && pa - p < *n)
            .and_then(|(p, off, _, va)| Some((off.checked_add(pa - p)?, va.checked_add(pa - p)?)))
    }
}

fn load_segments(b: &[u8]) -> Option<Vec<(u64, u64, u64, u64)>> {
    let u16_at = |o: usize| {
        Some(u16::from_le_bytes(
            b.get(o..o.checked_add(2)?)?.try_into().ok()?,
        ))
    };
    let u32_at = |o: usize| {
        Some(u32::from_le_bytes(
            b.get(o..o.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    let u64_at = |o: usize| {
        Some(u64::from_le_bytes(
            b.get(o..o.checked_add(8)?)?.try_into().ok()?,
        ))
    };
    if b.get(..4)? != b"\x7fELF" || *b.get(4)? != 2 {
        return None;
    }
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    let mut v = Vec::new();
    for i in 0..phnum {
        let h = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(h)? != 1 {
            continue; // PT_LOAD only
        }
        let (off, va, pa, filesz) = (
            u64_at(h + 8)?,
            u64_at(h + 16)?,
            u64_at(h + 24)?,
            u64_at(h + 32)?,
        );
        v.push((pa, off, filesz, va));
    }
    Some(v)
}

// ---------------------------------------------------------------------------
// origin

/// Where a group of source bytes came from.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// Written by node `id`.
    Node { id: usize },
    /// Memory never written since the recording started; from the image
    /// file at `elf_offset` when the loader put it there.
    Image {
        elf_offset: Option<u64>,
        symbol: String,
    },
    /// A register as it was when the recording started.
    Initial,
    /// Not followed: a limit stopped the walk.
    NotFollowed { why: String },
}

/// Some bytes an instruction read (or the query's bytes) and where they came from.
#[derive(Debug, Clone, Serialize)]
pub struct Edge {
    /// "rax[0..8]" or "mem 0x109068..0x109070".
    pub what: String,
    pub reg: Option<usize>,
    pub phys: Option<u64>,
    pub len: u64,
    /// The value of those bytes (little-endian order as in memory).
    pub value: Vec<u8>,
    pub from: Source,
    #[serde(skip)]
    keys: Vec<Key>,
    /// Window of the reader (where resolution continues).
    #[serde(skip)]
    window: usize,
    /// The writer (window, step) before it becomes a node.
    #[serde(skip)]
    wr: Option<(usize, u32)>,
}

/// One instruction on a data-flow path.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub id: usize,
    pub at: ExecPoint,
    pub ring: u8,
    pub insn: String,
    pub bytes: Vec<u8>,
    /// A plain copy (mov, movzx, push, pop ...): folded in the display.
    pub copy: bool,
    pub interrupt: bool,
    pub constants: Vec<Constant>,
    pub input: Option<Input>,
    pub sources: Vec<Edge>,
    /// Shortest distance from the query, in instructions.
    pub depth: usize,
    /// Its stack pointer (tells tasks apart).
    pub rsp: u64,
    /// A DMA read: the physical buffer it filled.
    pub dma_addr: Option<u64>,
}

/// Inputs, constants and image bytes the walk reached, summed up.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ends {
    /// Serial input: (event, offsets) in order.
    pub serial: BTreeMap<usize, Vec<usize>>,
    pub clock: Vec<usize>,
    /// Disk bytes: sector -> offsets.
    pub disk: BTreeMap<u64, Vec<u64>>,
    pub devices: Vec<u16>,
    /// (value, instruction RIP) of immediates.
    pub immediates: Vec<(u64, u64)>,
    pub return_addresses: Vec<(u64, u64)>,
    pub no_inputs: Vec<u64>,
    pub interrupt_frames: usize,
    /// Image bytes: (physical address, ELF offset).
    pub image: Vec<(u64, Option<u64>)>,
    pub initial_registers: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Origin {
    pub location: Location,
    pub at: ExecPoint,
    pub value: Vec<u8>,
    pub roots: Vec<Edge>,
    pub nodes: Vec<Node>,
    pub ends: Ends,
    /// Set when a limit stopped the walk ("stopped at depth N ...").
    pub stopped: Option<String>,
    pub steps: u64,
    pub windows: usize,
    pub traced_from: u64,
    pub millis: u64,
}

/// One capstone line for an instruction ("movb %al, -0x31(%rbp, %rbx)").
pub fn insn_text(bytes: &[u8], rip: u64) -> String {
    use capstone::prelude::*;
    let Ok(cs) = Capstone::new()
        .x86()
        .mode(arch::x86::ArchMode::Mode64)
        .syntax(arch::x86::ArchSyntax::Att)
        .build()
    else {
        return String::from("?");
    };
    let text = match cs.disasm_count(bytes, rip, 1) {
        Ok(insns) => match insns.iter().next() {
            Some(i) => format!(
                "{} {}",
                i.mnemonic().unwrap_or("?"),
                i.op_str().unwrap_or("")
            )
            .trim_end()
            .to_string(),
            None => "(undecodable)".into(),
        },
        Err(_) => "(undecodable)".into(),
    };
    text
}

struct Walk {
    /// Newest first: windows[0] ends at the query point.
    windows: Vec<Window>,
    ids: HashMap<(usize, u32), usize>,
    /// (window, step) of each node.
    pos: Vec<(usize, u32)>,
    nodes: Vec<Node>,
    work: std::collections::VecDeque<usize>,
    first_exit: u64,
}

impl Walk {
    /// The writer of `key` as seen just before window `w`'s start.
    fn before(&self, w: usize, key: Key) -> Option<(usize, u32)> {
        (w + 1..self.windows.len()).find_map(|v| self.windows[v].last.get(&key).map(|i| (v, *i)))
    }

    /// Whether window `w`'s start is the start of the recording (nothing before it).
    fn oldest_is_start(&self) -> bool {
        self.windows
            .last()
            .is_none_or(|w| w.from <= self.first_exit)
    }

    fn node(&mut self, w: usize, i: u32, depth: usize) -> usize {
        if let Some(id) = self.ids.get(&(w, i)) {
            let id = *id;
            if depth < self.nodes[id].depth {
                self.nodes[id].depth = depth;
            }
            return id;
        }
        let s = &self.windows[w].steps[i as usize];
        let f = &self.windows[w].flows[i as usize];
        let id = self.nodes.len();
        self.nodes.push(Node {
            id,
            at: s.at,
            ring: s.ring,
            insn: insn_text(&s.bytes, s.at.rip),
            bytes: s.bytes.clone(),
            copy: is_copy(s.insn.mnemonic())
                && f.consts.is_empty()
                && f.input.is_none()
                && !s.interrupt,
            interrupt: s.interrupt,
            constants: f.consts.clone(),
            input: f.input.clone(),
            sources: Vec::new(),
            depth,
            rsp: s.before[4],
            dma_addr: s.dma.map(|d| d.addr),
        });
        self.ids.insert((w, i), id);
        self.pos.push((w, i));
        self.work.push_back(id);
        id
    }

    /// Groups source bytes `keys` (read by window `w`'s step `reader`, or
    /// the query when None) by location and by writer, as edges.
    fn edges(
        &mut self,
        w: usize,
        keys: &[(Key, Option<u32>)],
        values: &dyn Fn(Key) -> u8,
        depth: usize,
    ) -> Vec<Edge> {
        // Resolve each byte's writer.
        let mut resolved: Vec<(Key, Option<(usize, u32)>)> = Vec::with_capacity(keys.len());
        for &(k, inw) in keys {
            let wr = match inw {
                Some(i) => Some((w, i)),
                None => self.before(w, k),
            };
            resolved.push((k, wr));
        }
        resolved.sort_by_key(|(k, _)| *k);
        let mut out: Vec<Edge> = Vec::new();
        for (k, wr) in resolved {
            let extend = out.last().is_some_and(|e| {
                let last = *e.keys.last().expect("non-empty");
                let same_place = if k & REG_BIT != 0 {
                    last & REG_BIT != 0 && (last & !REG_BIT) / 8 == (k & !REG_BIT) / 8
                } else {
                    last & REG_BIT == 0
                };
                same_place && k == last + 1 && e.wr == wr
            });
            if extend {
                let e = out.last_mut().expect("checked");
                e.keys.push(k);
                e.value.push(values(k));
                e.len += 1;
            } else {
                out.push(Edge {
                    what: String::new(),
                    reg: None,
                    phys: None,
                    len: 1,
                    value: vec![values(k)],
                    from: Source::Initial,
                    keys: vec![k],
                    window: w,
                    wr,
                });
            }
        }
        for e in &mut out {
            e.describe();
            if let Some((v, i)) = e.wr {
                let id = self.node(v, i, depth + 1);
                e.from = Source::Node { id };
            }
        }
        out
    }
}

impl Edge {
    fn describe(&mut self) {
        let k = self.keys[0];
        if k & REG_BIT != 0 {
            let r = ((k & !REG_BIT) / 8) as usize;
            let b = (k & !REG_BIT) % 8;
            self.reg = Some(r);
            self.what = if b == 0 && self.len == 8 {
                format!("%{}", GPR_NAMES[r])
            } else {
                format!("%{}[{}..{}]", GPR_NAMES[r], b, b + self.len)
            };
        } else {
            self.phys = Some(k);
            self.what = format!("mem {:#x}..{:#x}", k, k + self.len);
        }
    }
}

/// Walks the data flow of `loc` at point `at` backwards (see the module doc).
pub fn origin(rec: &Arc<Recording>, loc: Location, at: ExecPoint, limits: &Limits) -> R<Origin> {
    let started = Instant::now();
    let image = Image::open(rec);
    let first_exit = rec.checkpoints.first().map(|c| c.1).unwrap_or(0);
    let mut budget = Budget::new(limits);
    let mut walk = Walk {
        windows: Vec::new(),
        ids: HashMap::new(),
        pos: Vec::new(),
        nodes: Vec::new(),
        work: Default::default(),
        first_exit,
    };
    let mut span = 32u64;
    let mut stopped: Option<String> = None;
    // The value now, and the first window.
    let mut from = at.exits.saturating_sub(span).max(first_exit);
    let mut steps = Vec::new();
    let mut value_now = Vec::new();
    let mut read_value = |tl: &Timeline| -> R<()> {
        value_now = match loc {
            Location::Register { reg } => regs_array(&tl.machine.vcpu.regs()?)[reg]
                .to_le_bytes()
                .to_vec(),
            Location::Memory { phys, len } => {
                let b = read_phys(tl, phys, len as usize);
                if b.len() != len as usize {
                    return Err(ProvError::Msg(format!(
                        "physical {phys:#x}..{:#x} is outside guest memory",
                        phys + len
                    )));
                }
                b
            }
        };
        Ok(())
    };
    if let Some(why) = trace_span(
        rec,
        from,
        at,
        &mut budget,
        &mut |s| steps.push(s),
        &mut read_value,
    )? {
        budget.done();
        return Err(ProvError::Msg(format!(
            "stopped by {why} before reaching the query point"
        )));
    }
    walk.windows.push(Window::new(from, at, steps));

    let query_keys: Vec<(Key, Option<u32>)> = loc
        .keys()
        .into_iter()
        .map(|k| (k, walk.windows[0].last.get(&k).copied()))
        .collect();
    let qvals: HashMap<Key, u8> = loc
        .keys()
        .into_iter()
        .zip(value_now.iter().copied())
        .collect();
    let mut roots = walk.edges(0, &query_keys, &|k| qvals.get(&k).copied().unwrap_or(0), 0);
    let max_nodes = 400_000usize;
    loop {
        // Expand every node found so far.
        while let Some(id) = walk.work.pop_front() {
            let depth = walk.nodes[id].depth;
            if depth >= limits.max_depth {
                stopped.get_or_insert(format!(
                    "stopped at depth {depth} (the depth limit; raise it with --depth)"
                ));
                continue;
            }
            if walk.nodes.len() >= max_nodes {
                stopped.get_or_insert(format!(
                    "stopped at depth {depth}: {max_nodes} instructions on the paths already"
                ));
                continue;
            }
            let (w, i) = walk.pos[id];
            let win = &walk.windows[w];
            let f = &win.flows[i as usize];
            let st = &win.steps[i as usize];
            let keys: Vec<(Key, Option<u32>)> = f
                .sources
                .iter()
                .copied()
                .zip(win.deps[i as usize].iter().copied())
                .collect();
            let vals: HashMap<Key, u8> = source_values(st, &f.sources);
            let e = walk.edges(w, &keys, &|k| vals.get(&k).copied().unwrap_or(0), depth);
            walk.nodes[id].sources = e;
        }
        // Edges still unresolved at the oldest window's start.
        let pending: Vec<(Option<usize>, usize)> = unresolved(&walk.nodes, &roots);
        if pending.is_empty() {
            break;
        }
        if walk.oldest_is_start() {
            break;
        }
        if let Some(why) = budget.exhausted() {
            stopped.get_or_insert(format!(
                "stopped at depth {}: {why}",
                walk.nodes.iter().map(|n| n.depth).max().unwrap_or(0)
            ));
            break;
        }
        // Trace the stretch before the oldest window, then resolve again.
        let oldest = walk.windows.last().expect("one window").from;
        span *= 4;
        let from2 = oldest.saturating_sub(span).max(first_exit);
        // The oldest window's first step stands at its first exit boundary.
        let to2 = match walk.windows.last().and_then(|w| w.steps.first()) {
            Some(st) if st.at.exits == oldest && st.at.branches == 0 => st.at,
            _ => exit_point(rec, oldest)?,
        };
        let mut steps = Vec::new();
        let r = trace_span(
            rec,
            from2,
            to2,
            &mut budget,
            &mut |s| steps.push(s),
            &mut |_| Ok(()),
        )?;
        if let Some(why) = r {
            stopped.get_or_insert(format!(
                "stopped at depth {}: {why}",
                walk.nodes.iter().map(|n| n.depth).max().unwrap_or(0)
            ));
            break;
        }
        from = from2;
        walk.windows.push(Window::new(from2, to2, steps));
        for (owner, ei) in pending {
            let edge = match owner {
                Some(id) => walk.nodes[id].sources[ei].clone(),
                None => roots[ei].clone(),
            };
            let depth = owner.map(|id| walk.nodes[id].depth).unwrap_or(0);
            let keys: Vec<(Key, Option<u32>)> = edge.keys.iter().map(|k| (*k, None)).collect();
            let vals: HashMap<Key, u8> = edge
                .keys
                .iter()
                .copied()
                .zip(edge.value.iter().copied())
                .collect();
            let new = walk.edges(
                edge.window,
                &keys,
                &|k| vals.get(&k).copied().unwrap_or(0),
                depth,
            );
            match owner {
                Some(id) => {
                    walk.nodes[id].sources.splice(ei..ei + 1, new);
                }
                None => {
                    roots.splice(ei..ei + 1, new);
                }
            }
        }
    }
    budget.done();
    // Whatever is still unresolved: image bytes, initial registers, or cut short.
    let at_start = walk.oldest_is_start();
    let fix = |e: &mut Edge| {
        if matches!(e.from, Source::Initial) {
            if !at_start {
                e.from = Source::NotFollowed {
                    why: stopped
                        .clone()
                        .unwrap_or_else(|| "not traced further back".into()),
                };
            } else if let Some(pa) = e.phys {
                let (off, va) = match image.file_offset(pa) {
                    Some((o, va)) => (Some(o), va),
                    None => (None, pa),
                };
                e.from = Source::Image {
                    elf_offset: off,
                    symbol: image.symbols.describe(va),
                };
            }
        }
    };
    for r in &mut roots {
        fix(r);
    }
    for n in &mut walk.nodes {
        for e in &mut n.sources {
            fix(e);
        }
    }
    let ends = summarize(&walk.nodes, &roots);
    let steps = budget.steps;
    let windows = walk.windows.len();
    Ok(Origin {
        location: loc,
        at,
        value: value_now,
        roots,
        nodes: walk.nodes,
        ends,
        stopped,
        steps,
        windows,
        traced_from: from,
        millis: started.elapsed().as_millis() as u64,
    })
}

/// Edges (owner node or root, index) still waiting for an older window.
fn unresolved(nodes: &[Node], roots: &[Edge]) -> Vec<(Option<usize>, usize)> {
    let mut v = Vec::new();
    for (i, e) in roots.iter().enumerate() {
        if matches!(e.from, Source::Initial) {
            v.push((None, i));
        }
    }
    for n in nodes {
        for (i, e) in n.sources.iter().enumerate() {
            if matches!(e.from, Source::Initial) {
                v.push((Some(n.id), i));
            }
        }
    }
    // Splicing replaces one edge by several: do the later ones first.
    v.sort_by(|a, b| b.cmp(a));
    v
}

/// The values of an instruction's source bytes before it ran.
fn source_values(s: &Step, keys: &[Key]) -> HashMap<Key, u8> {
    let mut m = HashMap::new();
    for &k in keys {
        let v = if k & REG_BIT != 0 {
            let r = ((k & !REG_BIT) / 8) as usize;
            let b = (k & !REG_BIT) % 8;
            (s.before[r] >> (8 * b)) as u8
        } else {
            s.mem
                .iter()
                .filter(|a| a.read && k >= a.pa && k < a.pa + a.before.len() as u64)
                .map(|a| a.before[(k - a.pa) as usize])
                .next()
                .unwrap_or(0)
        };
        m.insert(k, v);
    }
    m
}

fn summarize(nodes: &[Node], roots: &[Edge]) -> Ends {
    let mut e = Ends::default();
    let mut seen_imm: HashSet<(u64, u64)> = HashSet::new();
    for n in nodes {
        match &n.input {
            Some(Input::Serial { event, offset, .. }) => {
                e.serial.entry(*event).or_default().push(*offset)
            }
            Some(Input::Clock { event, .. }) => e.clock.push(*event),
            Some(Input::Device { port, .. }) => e.devices.push(*port),
            Some(Input::Disk { .. }) | None => {}
        }
        for c in &n.constants {
            match c {
                Constant::Immediate { value } => {
                    if seen_imm.insert((*value, n.at.rip)) {
                        e.immediates.push((*value, n.at.rip));
                    }
                }
                Constant::ReturnAddress { value } => e.return_addresses.push((*value, n.at.rip)),
                Constant::NoInputs => e.no_inputs.push(n.at.rip),
                Constant::InterruptFrame => e.interrupt_frames += 1,
            }
        }
    }
    // Disk bytes: the edges that lead to a DMA node carry the addresses read.
    let all_edges = roots
        .iter()
        .chain(nodes.iter().flat_map(|n| n.sources.iter()));
    for ed in all_edges {
        match &ed.from {
            Source::Node { id } => {
                if let Some(Input::Disk { sector, .. }) = &nodes[*id].input {
                    // The DMA node's write started at its buffer: offsets from the edge's address.
                    if let (Some(pa), Some(base)) = (ed.phys, dma_base(&nodes[*id])) {
                        for k in 0..ed.len {
                            let off = pa + k - base;
                            e.disk
                                .entry(sector + off / 512)
                                .or_default()
                                .push(off % 512);
                        }
                    }
                }
            }
            Source::Image { elf_offset, .. } => {
                if let Some(pa) = ed.phys {
                    for k in 0..ed.len {
                        e.image.push((pa + k, elf_offset.map(|o| o + k)));
                    }
                }
            }
            Source::Initial => {
                if let Some(r) = ed.reg {
                    e.initial_registers.push(r);
                }
            }
            Source::NotFollowed { .. } => {}
        }
    }
    for v in e.serial.values_mut() {
        v.sort_unstable();
        v.dedup();
    }
    for v in e.disk.values_mut() {
        v.sort_unstable();
        v.dedup();
    }
    e.clock.sort_unstable();
    e.clock.dedup();
    e.devices.sort_unstable();
    e.devices.dedup();
    e.image.sort_unstable();
    e.image.dedup();
    e.initial_registers.sort_unstable();
    e.initial_registers.dedup();
    e.no_inputs.sort_unstable();
    e.no_inputs.dedup();
    e
}

/// The physical buffer address a DMA node wrote to (kept in its constants-free input).
fn dma_base(n: &Node) -> Option<u64> {
    n.dma_addr
}

// ---------------------------------------------------------------------------
// Display

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `E:B:RIP`, the form `seek` takes.
pub fn point_short(p: &ExecPoint) -> String {
    format!("{}:{}:{:#x}", p.exits, p.branches, p.rip)
}

/// Ranges of sorted numbers as "0..3, 7, 9..12" (half-open).
fn ranges(v: &[u64]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}..{}", v[i], v[j] + 1)
        });
        i = j + 1;
    }
    out.join(", ")
}

impl Origin {
    /// The tree as text: each path from the location back to where its
    /// bytes came from, plain copies folded onto one line, loops folded at
    /// the second visit of an instruction, then the ends summed up.
    pub fn render(&self, syms: &Symbols, max_lines: usize) -> String {
        let mut r = Render {
            o: self,
            syms,
            out: Vec::new(),
            shown: HashSet::new(),
            max_lines,
            cut: 0,
        };
        let what = match self.location {
            Location::Memory { phys, len } => {
                format!("{len} bytes at physical {phys:#x} {}", syms.describe(phys))
            }
            Location::Register { reg } => format!("%{}", GPR_NAMES[reg]),
        };
        r.line(format!(
            "origin of {what} at {} (exit {} + {} branches @ rip {:#x} {}):",
            point_short(&self.at),
            self.at.exits,
            self.at.branches,
            self.at.rip,
            syms.describe(self.at.rip)
        ));
        r.line(format!("  value: {}", hex(&self.value)));
        for e in &self.roots {
            r.edge(e, 1, &mut Vec::new(), None);
        }
        let mut s = r.out.join("\n");
        if r.cut > 0 {
            s.push_str(&format!(
                "\n  ... {} more lines (limit {max_lines}; --json gives the whole graph)",
                r.cut
            ));
        }
        s.push('\n');
        s.push_str(&self.render_ends(syms));
        s
    }

    /// The ends reached, summed up.
    pub fn render_ends(&self, syms: &Symbols) -> String {
        let e = &self.ends;
        let mut s = String::from("ends:\n");
        for (ev, offs) in &e.serial {
            let o: Vec<u64> = offs.iter().map(|x| *x as u64).collect();
            s.push_str(&format!(
                "  serial input: event #{ev} bytes {}\n",
                ranges(&o)
            ));
        }
        for ev in &e.clock {
            s.push_str(&format!("  clock reading: event #{ev}\n"));
        }
        if !e.disk.is_empty() {
            let total: usize = e.disk.values().map(Vec::len).sum();
            s.push_str(&format!(
                "  disk: {total} bytes of {} sectors (DMA reads)\n",
                e.disk.len()
            ));
            for (sec, offs) in e.disk.iter().take(16) {
                s.push_str(&format!("    sector {sec} offsets {}\n", ranges(offs)));
            }
            if e.disk.len() > 16 {
                s.push_str(&format!("    ... {} more sectors\n", e.disk.len() - 16));
            }
        }
        for p in &e.devices {
            s.push_str(&format!("  device register read: port {p:#x}\n"));
        }
        for (v, rip) in &e.immediates {
            s.push_str(&format!(
                "  constant {v:#x} (immediate of the instruction at {rip:#x} {})\n",
                syms.describe(*rip)
            ));
        }
        for (v, rip) in &e.return_addresses {
            s.push_str(&format!(
                "  constant {v:#x} (return address pushed by the call at {rip:#x} {})\n",
                syms.describe(*rip)
            ));
        }
        for rip in &e.no_inputs {
            s.push_str(&format!(
                "  a value computed from no input at {rip:#x} {}\n",
                syms.describe(*rip)
            ));
        }
        if e.interrupt_frames > 0 {
            s.push_str(&format!(
                "  {} interrupt frame(s) pushed by the CPU\n",
                e.interrupt_frames
            ));
        }
        if !e.image.is_empty() {
            let pas: Vec<u64> = e.image.iter().map(|x| x.0).collect();
            let offs: Vec<u64> = e.image.iter().filter_map(|x| x.1).collect();
            let first = pas[0];
            s.push_str(&format!(
                "  boot image bytes (never written since the recording started): physical {} {}{}\n",
                ranges(&pas),
                syms.describe(first),
                if offs.is_empty() { " (not from the ELF file: zero or set up by the loader)".to_string() } else { format!(", ELF file offsets {}", ranges(&offs)) }
            ));
        }
        for r in &e.initial_registers {
            s.push_str(&format!(
                "  %{} as it was when the recording started\n",
                GPR_NAMES[*r]
            ));
        }
        match &self.stopped {
            Some(why) => s.push_str(&format!("  {why}\n")),
            None => s.push_str("  (every path ended)\n"),
        }
        s.push_str(&format!(
            "({} instructions on the paths; {} single-stepped from exit {} in {} window(s), {} ms)\n",
            self.nodes.len(),
            self.steps,
            self.traced_from,
            self.windows,
            self.millis
        ));
        s
    }
}

struct Render<'a> {
    o: &'a Origin,
    syms: &'a Symbols,
    out: Vec<String>,
    shown: HashSet<usize>,
    max_lines: usize,
    cut: usize,
}

impl Render<'_> {
    fn line(&mut self, l: String) {
        if self.out.len() < self.max_lines {
            self.out.push(l);
        } else {
            self.cut += 1;
        }
    }

    /// An instruction; its stack page when it differs from the previous
    /// one shown on the path (the stack tells tasks apart).
    fn node_text(&self, n: &Node, stack: &mut Option<u64>) -> String {
        let page = n.rsp & !0xfff;
        let ring = if n.ring == 0 {
            " [ring 0]".to_string()
        } else if *stack != Some(page) {
            format!(" [stack {}]", self.syms.describe(page))
        } else {
            String::new()
        };
        *stack = Some(page);
        format!(
            "{} at {} {}{ring}",
            n.insn,
            point_short(&n.at),
            self.syms.describe(n.at.rip)
        )
    }

    /// What a folded loop hides: along its first source chain, how often
    /// the instruction at `from`'s RIP ran on each stack (task), and the
    /// nearest one on a stack other than `from`'s.
    fn loop_summary(&self, from: usize) -> String {
        let rip = self.o.nodes[from].at.rip;
        let page = self.o.nodes[from].rsp >> 12;
        let mut per: BTreeMap<u64, usize> = BTreeMap::new();
        let mut other = None;
        let mut cur = Some(from);
        let mut seen = HashSet::new();
        while let Some(c) = cur {
            if !seen.insert(c) {
                break;
            }
            let n = &self.o.nodes[c];
            if n.at.rip == rip {
                *per.entry(n.rsp >> 12).or_default() += 1;
                if other.is_none() && n.rsp >> 12 != page {
                    other = Some(c);
                }
            }
            // Follow the first source that leads to an instruction.
            cur = n.sources.iter().find_map(|e| match e.from {
                Source::Node { id } => Some(id),
                _ => None,
            });
        }
        let stacks: Vec<String> = per
            .iter()
            .map(|(p, k)| format!("{k} on stack {}", self.syms.describe(p << 12)))
            .collect();
        let mut s = format!(
            "(the folded chain runs it {} more times: {})",
            per.values().sum::<usize>(),
            stacks.join(", ")
        );
        if let Some(o) = other {
            let n = &self.o.nodes[o];
            s.push_str(&format!(
                "; nearest on another stack (another task): {} at {} [stack {}]",
                n.insn,
                point_short(&n.at),
                self.syms.describe(n.rsp & !0xfff)
            ));
        }
        s
    }

    /// One edge and, below it, the chain of instructions it came from.
    fn edge(&mut self, e: &Edge, depth: usize, path: &mut Vec<(u64, u64)>, stack: Option<u64>) {
        let mut stack = stack;
        if self.out.len() >= self.max_lines {
            self.cut += 1;
            return;
        }
        let pad = "  ".repeat(depth);
        let head = format!("{pad}{} = {}", e.what, hex(&e.value));
        match &e.from {
            Source::Image { elf_offset, symbol } => {
                let off = match elf_offset {
                    Some(o) => format!("ELF file offset {o:#x}"),
                    None => "not from the ELF file".into(),
                };
                self.line(format!(
                    "{head}  <- boot image bytes {symbol} ({off}), never written since"
                ));
            }
            Source::Initial => {
                self.line(format!("{head}  <- as it was when the recording started"))
            }
            Source::NotFollowed { why } => self.line(format!("{head}  <- (not followed: {why})")),
            Source::Node { id } => {
                // Fold plain copies: follow single-source copies on one line.
                let mut chain = Vec::new();
                let mut cur = *id;
                let mut looped = None;
                // The bytes read from the last node of the chain (for DMA offsets).
                let mut into = (e.phys, e.len);
                loop {
                    let n = &self.o.nodes[cur];
                    if path.contains(&(n.at.rip, n.rsp >> 12)) {
                        looped = Some(cur);
                        break;
                    }
                    chain.push(cur);
                    if n.copy && n.sources.len() == 1 && !self.shown.contains(&cur) {
                        if let Source::Node { id } = n.sources[0].from {
                            self.shown.insert(cur);
                            into = (n.sources[0].phys, n.sources[0].len);
                            cur = id;
                            continue;
                        }
                    }
                    break;
                }
                let mut text = head;
                for (k, c) in chain.iter().enumerate() {
                    let n = &self.o.nodes[*c];
                    text.push_str(if k == 0 { "  <- " } else { " <- " });
                    text.push_str(&self.node_text(n, &mut stack));
                }
                if let Some(l) = looped {
                    let n = &self.o.nodes[l];
                    text.push_str(&format!(
                        "  <- (loop: {} again, an earlier iteration at {}; folded)",
                        n.insn,
                        point_short(&n.at)
                    ));
                    self.line(text);
                    let summary = self.loop_summary(l);
                    self.line(format!("{pad}    {summary}"));
                    return;
                }
                let Some(&last) = chain.last() else {
                    self.line(text);
                    return;
                };
                let n = &self.o.nodes[last];
                let mut tail = Vec::new();
                if let Some(i) = &n.input {
                    let i = match (i, into.0, n.dma_addr) {
                        (Input::Disk { sector, .. }, Some(pa), Some(base)) if pa >= base => {
                            let off = pa - base;
                            Input::Disk {
                                sector: sector + off / 512,
                                offset: off % 512,
                                len: into.1,
                            }
                        }
                        (i, ..) => i.clone(),
                    };
                    tail.push(format!("= {i}"));
                }
                for c in &n.constants {
                    tail.push(match c {
                        Constant::Immediate { value } => format!("constant {value:#x}"),
                        Constant::ReturnAddress { value } => format!("return address {value:#x}"),
                        Constant::NoInputs => "computed from no input".into(),
                        Constant::InterruptFrame => "interrupt frame".into(),
                    });
                }
                if !tail.is_empty() {
                    text.push_str(&format!("  [{}]", tail.join("; ")));
                }
                let seen = !self.shown.insert(last);
                if seen && !n.sources.is_empty() {
                    text.push_str("  (its sources are shown above)");
                    self.line(text);
                    return;
                }
                self.line(text);
                let rips: Vec<(u64, u64)> = chain
                    .iter()
                    .map(|c| (self.o.nodes[*c].at.rip, self.o.nodes[*c].rsp >> 12))
                    .collect();
                path.extend(&rips);
                let srcs = n.sources.clone();
                for s in &srcs {
                    self.edge(s, depth + 1, path, stack);
                }
                path.truncate(path.len() - rips.len());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// history

/// One access to the watched range.
#[derive(Debug, Clone, Serialize)]
pub struct Touch {
    /// The point just before the instruction.
    pub at: ExecPoint,
    pub insn: String,
    pub ring: u8,
    pub rsp: u64,
    pub write: bool,
    pub read: bool,
    /// The part of the range it touched (physical) and the bytes there before and after.
    pub phys: u64,
    pub before: Vec<u8>,
    pub after: Vec<u8>,
    /// A DMA write or port read: where the bytes came from.
    pub input: Option<Input>,
}

#[derive(Debug, Clone, Serialize)]
pub struct History {
    pub phys: u64,
    pub len: u64,
    pub from: u64,
    pub to: ExecPoint,
    pub touches: Vec<Touch>,
    /// Exit ranges skipped because the checkpoints' dirty-page lists show the range untouched there.
    pub skipped: Vec<(u64, u64)>,
    pub steps: u64,
    pub stopped: Option<String>,
    pub millis: u64,
    /// Found natively: the accesses the engine counted and in how many
    /// exit intervals (each then single-stepped from its start to its last hit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native: Option<(u64, u64)>,
}

/// The accesses of one executed instruction to physical `phys..phys+len`
/// (writes, and reads when `reads`), appended to `out`.
pub(crate) fn touches_of(st: &Step, phys: u64, len: u64, reads: bool, out: &mut Vec<Touch>) {
    for a in &st.mem {
        if !(a.write || reads && a.read) {
            continue;
        }
        let n = a.before.len().max(a.after.len()) as u64;
        let lo = a.pa.max(phys);
        let hi = (a.pa + n).min(phys + len);
        if lo >= hi {
            continue;
        }
        let (i, j) = ((lo - a.pa) as usize, (hi - a.pa) as usize);
        let input = match (&st.dma, &st.input) {
            (Some(d), _) => {
                let off = lo - d.addr;
                Some(Input::Disk {
                    sector: d.lba + off / 512,
                    offset: off % 512,
                    len: hi - lo,
                })
            }
            (None, i) => i.clone(),
        };
        out.push(Touch {
            at: st.at,
            insn: insn_text(&st.bytes, st.at.rip),
            ring: st.ring,
            rsp: st.before[4],
            write: a.write,
            read: a.read,
            phys: lo,
            before: a.before.get(i..j).map(<[u8]>::to_vec).unwrap_or_default(),
            after: if a.write {
                a.after.get(i..j).map(<[u8]>::to_vec).unwrap_or_default()
            } else {
                Vec::new()
            },
            input,
        });
    }
}

/// Every write (and with `reads` every read) of physical `phys..phys+len`
/// between exit `from` and point `to`, found at native speed by the search
/// engine (`replay::history`); by single-stepping ([`history_stepping`],
/// the oracle) when `REVIRT_HISTORY_NATIVE=0` or when the watched page
/// turns out to hold running code.
pub fn history(
    rec: &Arc<Recording>,
    phys: u64,
    len: u64,
    from: u64,
    to: ExecPoint,
    reads: bool,
    limits: &Limits,
) -> R<History> {
    if std::env::var("REVIRT_HISTORY_NATIVE").is_ok_and(|v| v == "0" || v == "off") {
        return history_stepping(rec, phys, len, from, to, reads, limits);
    }
    match super::history::history_native(rec, phys, len, from, to, reads, limits) {
        Err(ProvError::Replay(ReplayError::Machine(crate::vmm::MachineError::WatchedCode { .. })))
        | Err(ProvError::Machine(crate::vmm::MachineError::WatchedCode { .. })) => {
            history_stepping(rec, phys, len, from, to, reads, limits)
        }
        r => r,
    }
}

/// [`history`] by single-stepping every instruction of the span (the
/// oracle the native path is tested against). Checkpoint intervals whose
/// dirty page lists leave out the range's pages are skipped when only
/// writes are wanted (DMA pages are in those lists too).
pub fn history_stepping(
    rec: &Arc<Recording>,
    phys: u64,
    len: u64,
    from: u64,
    to: ExecPoint,
    reads: bool,
    limits: &Limits,
) -> R<History> {
    let started = Instant::now();
    let first = phys / 4096;
    let last = (phys + len.max(1) - 1) / 4096;
    // Spans to trace: [from, to] minus the skippable checkpoint intervals.
    let mut spans: Vec<(u64, u64)> = vec![(from, to.exits)];
    let mut skipped = Vec::new();
    if !reads {
        let cks = &rec.checkpoints;
        for win in cks.windows(2) {
            let (a, b) = (win[0].1, win[1].1);
            if a < from || b > to.exits {
                continue;
            }
            let ck = rec.seals.read(&rec.dir, win[1].0).map_err(ReplayError::from)?;
            let touched = ck
                .header
                .pages
                .iter()
                .any(|&(f, n)| first < f + n && last >= f);
            if !touched {
                skipped.push((a, b));
            }
        }
        for &(a, b) in &skipped {
            let mut next = Vec::new();
            for (s, e) in spans {
                if b <= s || a >= e {
                    next.push((s, e));
                    continue;
                }
                if s < a {
                    next.push((s, a));
                }
                if b < e {
                    next.push((b, e));
                }
            }
            spans = next;
        }
    }
    let mut budget = Budget::new(limits);
    let mut touches = Vec::new();
    let mut stopped = None;
    let nspans = spans.len();
    for (k, (s, e)) in spans.into_iter().enumerate() {
        let end = if k + 1 == nspans && e == to.exits {
            to
        } else {
            exit_point(rec, e)?
        };
        let mut each = |st: Step| touches_of(&st, phys, len, reads, &mut touches);
        if let Some(why) = trace_span(rec, s, end, &mut budget, &mut each, &mut |_| Ok(()))? {
            stopped = Some(format!("stopped at exit {}: {why}", s));
            break;
        }
    }
    budget.done();
    Ok(History {
        phys,
        len,
        from,
        to,
        touches,
        skipped,
        steps: budget.steps,
        stopped,
        millis: started.elapsed().as_millis() as u64,
        native: None,
    })
}

impl History {
    pub fn render(&self, syms: &Symbols) -> String {
        let mut s = format!(
            "history of {} bytes at physical {:#x} {} from exit {} to {}: {} access(es)\n",
            self.len,
            self.phys,
            syms.describe(self.phys),
            self.from,
            point_short(&self.to),
            self.touches.len()
        );
        for t in &self.touches {
            let kind = match (t.read, t.write) {
                (true, true) => "rw",
                (false, true) => "w ",
                _ => "r ",
            };
            let stack = if t.ring == 0 {
                "ring 0".to_string()
            } else {
                format!("stack {}", syms.describe(t.rsp & !0xfff))
            };
            let vals = if t.write {
                format!("{} -> {}", hex(&t.before), hex(&t.after))
            } else {
                hex(&t.before)
            };
            s.push_str(&format!(
                "  {kind} {:<16} +{:<3} {vals:<28} {} {} [{stack}]{}\n",
                point_short(&t.at),
                t.phys - self.phys,
                t.insn,
                syms.describe(t.at.rip),
                t.input
                    .as_ref()
                    .map(|i| format!(" = {i}"))
                    .unwrap_or_default()
            ));
        }
        for (a, b) in &self.skipped {
            s.push_str(&format!("  (exits {a}..{b} skipped: the checkpoint's dirty-page list leaves the range out)\n"));
        }
        if let Some(w) = &self.stopped {
            s.push_str(&format!("  {w}\n"));
        }
        match self.native {
            Some((hits, intervals)) => s.push_str(&format!(
                "(native speed: {hits} access(es) to the range found in {intervals} exit interval(s); {} instructions single-stepped to pin them down, {} ms)\n",
                self.steps, self.millis
            )),
            None => s.push_str(&format!(
                "({} instructions single-stepped, {} ms)\n",
                self.steps, self.millis
            )),
        }
        s
    }
}

// ---------------------------------------------------------------------------
// gdb: `monitor origin LOCATION [--depth N]`

/// Evaluates `$reg`, numbers and `+`/`-` between them, with the registers of `tl`.
fn eval_addr(tl: &Timeline, s: &str) -> Result<u64, String> {
    let r = tl.machine.vcpu.regs().map_err(|e| e.to_string())?;
    let regs = regs_array(&r);
    let mut total: i128 = 0;
    let mut sign = 1i128;
    let mut term = String::new();
    let flush = |term: &mut String, sign: i128, total: &mut i128| -> Result<(), String> {
        let t = term.trim();
        if t.is_empty() {
            return Err(format!("bad address expression '{s}'"));
        }
        let v = if let Some(name) = t.strip_prefix('$') {
            if name == "rip" || name == "pc" {
                r.rip
            } else {
                regs[register_index(name).ok_or_else(|| format!("unknown register ${name}"))?]
            }
        } else if let Some(h) = t.strip_prefix("0x") {
            u64::from_str_radix(h, 16).map_err(|_| format!("'{t}' is not a number"))?
        } else {
            t.parse::<u64>()
                .map_err(|_| format!("'{t}' is not a number (0x hex or decimal, $reg)"))?
        };
        *total += sign * v as i128;
        term.clear();
        Ok(())
    };
    for c in s.chars() {
        match c {
            '+' | '-' => {
                flush(&mut term, sign, &mut total)?;
                sign = if c == '+' { 1 } else { -1 };
            }
            c => term.push(c),
        }
    }
    flush(&mut term, sign, &mut total)?;
    Ok(total as u64)
}

/// `monitor origin LOCATION [--depth N] [--json]` at the stub's current point:
/// LOCATION is `$reg` or `ADDR[:LEN]` (ADDR: numbers and `$reg` with + and -,
/// virtual, through the current page tables). Returns the text to print.
pub fn monitor_origin(rec: &Arc<Recording>, tl: &Timeline, args: &[&str]) -> String {
    let usage = "usage: monitor origin LOCATION [--depth N] [--json]   (LOCATION: $reg, or ADDR[:LEN], e.g. $rsp:8)";
    let mut depth = DEFAULT_DEPTH;
    let mut json = false;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--json" => json = true,
            "--depth" => match it.next().and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => depth = n,
                _ => return usage.into(),
            },
            other => rest.push(other),
        }
    }
    let [loc_s] = rest.as_slice() else {
        return usage.into();
    };
    let at = match tl.position() {
        Ok(p) => p,
        Err(e) => return format!("error: {e}"),
    };
    let loc = if loc_s.starts_with('$') && !loc_s.contains([':', '+', '-']) {
        match register_index(loc_s) {
            Some(reg) => Location::Register { reg },
            None => {
                return format!("origin follows the general registers ($rax..$r15), not {loc_s}")
            }
        }
    } else {
        let (a, len) = match loc_s.rsplit_once(':') {
            Some((a, l)) => (a, l.parse::<u64>().unwrap_or(0)),
            None => (*loc_s, 8),
        };
        if len == 0 || len > 4096 {
            return "LEN must be 1..4096".into();
        }
        let va = match eval_addr(tl, a) {
            Ok(v) => v,
            Err(e) => return e,
        };
        let Ok(s) = tl.machine.vcpu.sregs() else {
            return "error: cannot read the registers".into();
        };
        match translate(tl, s.cr0, s.cr3, va) {
            Some(phys) if (phys & 0xfff) + len <= 4096 => Location::Memory { phys, len },
            Some(_) => return "the range must not cross a 4 KiB page".into(),
            None => return format!("cannot access memory at {va:#x}: not mapped"),
        }
    };
    let limits = Limits {
        max_depth: depth,
        max_time: Duration::from_secs(300),
        ..Limits::default()
    };
    match origin(rec, loc, at, &limits) {
        Ok(o) if json => serde_json::to_string_pretty(&o).unwrap_or_else(|e| format!("error: {e}")),
        Ok(o) => o.render(&Image::open(rec).symbols, 400),
        Err(e) => format!("error: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step of `code` at 0x1000 with rax..r15 = 0x100 * (i + 1) and the given memory accesses.
    fn step(code: &[u8], mem: Vec<Access>) -> Step {
        let insn = Decoder::with_ip(64, code, 0x1000, DecoderOptions::NONE).decode();
        assert!(!insn.is_invalid());
        let regs: [u64; 16] = std::array::from_fn(|i| 0x100 * (i as u64 + 1));
        Step {
            at: ExecPoint {
                exits: 1,
                branches: 0,
                rip: 0x1000,
            },
            insn,
            bytes: code.to_vec(),
            ring: 3,
            before: regs,
            after: regs,
            mem,
            input: None,
            dma: None,
            irregular: false,
            interrupt: false,
        }
    }

    fn acc(pa: u64, n: usize, read: bool, write: bool) -> Access {
        Access {
            va: pa,
            pa,
            write,
            read,
            before: vec![0; n],
            after: vec![0; n],
        }
    }

    fn regs(keys: &[Key]) -> Vec<(usize, usize)> {
        keys.iter()
            .filter(|k| *k & REG_BIT != 0)
            .map(|k| (((k & !REG_BIT) / 8) as usize, ((k & !REG_BIT) % 8) as usize))
            .collect()
    }

    #[test]
    fn a_byte_store_reads_al_not_its_address_registers() {
        // movb %al, -0x31(%rbp,%rbx)
        let f = flow(
            &step(&[0x88, 0x44, 0x1d, 0xcf], vec![acc(0x5000, 1, false, true)]),
            &mut InstructionInfoFactory::new(),
        );
        assert_eq!(regs(&f.sources), vec![(0, 0)]);
        assert_eq!(f.dests, vec![0x5000]);
        assert!(f.consts.is_empty());
    }

    #[test]
    fn zeroing_idiom_and_immediates_are_constants() {
        // xor %eax,%eax: writes all of rax (zero extension) from nothing.
        let f = flow(
            &step(&[0x31, 0xc0], vec![]),
            &mut InstructionInfoFactory::new(),
        );
        assert!(f.sources.is_empty());
        assert_eq!(regs(&f.dests), (0..8).map(|b| (0, b)).collect::<Vec<_>>());
        assert_eq!(f.consts, vec![Constant::NoInputs]);
        // movabs $0x100000001b3, %r9
        let f = flow(
            &step(&[0x49, 0xb9, 0xb3, 0x01, 0, 0, 0, 0x01, 0, 0], vec![]),
            &mut InstructionInfoFactory::new(),
        );
        assert_eq!(
            f.consts,
            vec![Constant::Immediate {
                value: 0x100000001b3
            }]
        );
        assert_eq!(regs(&f.dests).len(), 8);
    }

    #[test]
    fn explicit_register_operands_count_even_when_they_address_memory() {
        // add (%rax), %rax: the memory and rax's value.
        let f = flow(
            &step(&[0x48, 0x03, 0x00], vec![acc(0x6000, 8, true, false)]),
            &mut InstructionInfoFactory::new(),
        );
        assert_eq!(regs(&f.sources), (0..8).map(|b| (0, b)).collect::<Vec<_>>());
        assert_eq!(f.sources.iter().filter(|k| *k & REG_BIT == 0).count(), 8);
        // lea 8(%rbx), %rax: rbx is the value.
        let f = flow(
            &step(&[0x48, 0x8d, 0x43, 0x08], vec![]),
            &mut InstructionInfoFactory::new(),
        );
        assert_eq!(regs(&f.sources), (0..8).map(|b| (3, b)).collect::<Vec<_>>());
        // push %rbx: the slot from rbx; rsp is an address, not a value or a tracked write.
        let f = flow(
            &step(&[0x53], vec![acc(0x7000, 8, false, true)]),
            &mut InstructionInfoFactory::new(),
        );
        assert_eq!(regs(&f.sources), (0..8).map(|b| (3, b)).collect::<Vec<_>>());
        assert!(regs(&f.dests).is_empty());
        assert_eq!(f.dests.len(), 8);
    }

    #[test]
    fn port_reads_and_dma_are_inputs() {
        // in (%dx), %al
        let mut s = step(&[0xec], vec![]);
        s.input = Some(Input::Serial {
            event: 2,
            offset: 56,
            byte: 0,
        });
        let f = flow(&s, &mut InstructionInfoFactory::new());
        assert!(f.sources.is_empty(), "dx is the port, not a value");
        assert_eq!(regs(&f.dests), vec![(0, 0)]);
        assert_eq!(
            f.input,
            Some(Input::Serial {
                event: 2,
                offset: 56,
                byte: 0
            })
        );
        // out %eax, (%dx) starting a DMA read of 2 sectors into 0x8000.
        let mut s = step(&[0xef], vec![]);
        s.dma = Some(Dma {
            lba: 5,
            addr: 0x8000,
            count: 2,
        });
        let f = flow(&s, &mut InstructionInfoFactory::new());
        assert_eq!(f.dests.len(), 1024);
        assert_eq!(f.dests[0], 0x8000);
    }

    #[test]
    fn ranges_and_registers() {
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0..3, 5, 7..9");
        assert_eq!(register_index("$rsp"), Some(4));
        assert_eq!(register_index("eax"), Some(0));
        assert_eq!(register_index("$xmm0"), None);
        assert_eq!(gpr(Register::AH), Some((0, 1, 1)));
        assert_eq!(gpr(Register::R9D), Some((9, 0, 4)));
    }
}
