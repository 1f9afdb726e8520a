//! Where guest execution stands: the run loop counts exits (and, with a
//! counting clock, branches) and reports positions as [`ExecPoint`]s; the
//! clock model (`crate::clock`) decides what they mean for a recording.

use serde::{Deserialize, Serialize};

/// An instant of guest execution: guest-caused exits so far, conditional
/// branches retired since the last of them, and RIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct ExecPoint {
    pub exits: u64,
    pub branches: u64,
    pub rip: u64,
}

impl std::fmt::Display for ExecPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {} + {} branches @ rip {:#x}", self.exits, self.branches, self.rip)
    }
}

/// A cheap fingerprint of the general registers, checked when replay
/// arrives at a recorded point (rr compares the whole register file).
pub fn fingerprint(r: &kvm_bindings::kvm_regs) -> u64 {
    let words = [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags & !0x10100, // ignore TF and RF: debugging artifacts
    ];
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in words {
        h ^= w;
        h = h.wrapping_mul(0x100_0000_01b3);
        h ^= h >> 29;
    }
    h
}
