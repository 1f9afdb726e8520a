//! Locations one byte wide: the unit the dependence graph tracks, so that a
//! value assembled from parts (a byte store into a word, `al` into `rax`)
//! keeps each part's own writer.

use iced_x86::Register;
use serde::Serialize;

/// General registers in iced-x86's order (RAX RCX RDX RBX RSP RBP RSI RDI R8..R15).
pub const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

/// A location one byte wide, as a map key: guest physical memory byte
/// `pa`, or byte `b` of general register `r` (`REG_BIT | r * 8 + b`).
pub(super) type Key = u64;
pub(super) const REG_BIT: u64 = 1 << 62;

pub(super) fn reg_key(r: usize, b: usize) -> Key {
    REG_BIT | (r * 8 + b) as u64
}

/// The (register, byte) a key names, or None for a memory byte.
pub(super) fn reg_of(k: Key) -> Option<(usize, u64)> {
    (k & REG_BIT != 0).then_some((((k & !REG_BIT) / 8) as usize, (k & !REG_BIT) % 8))
}

/// The register index, first byte and byte count of an iced register,
/// when it is a general register (AH..BH are byte 1).
pub(super) fn gpr(reg: Register) -> Option<(usize, usize, usize)> {
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

pub(super) fn regs_array(r: &kvm_bindings::kvm_regs) -> [u64; 16] {
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
    pub(super) fn keys(&self) -> Vec<Key> {
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
