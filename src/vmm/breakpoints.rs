//! Execution breakpoints at native speed: the guest runs free between hits.
//!
//! Measured on kvm_pvm (docs/host-support.md): KVM's hardware breakpoints
//! and the guest's debug registers never fire in ring 3, and
//! `KVM_GUESTDBG_USE_SW_BP` does not intercept a ring-3 `int3` either: the
//! #BP goes through the guest's IDT. So a breakpoint is an `int3` patched
//! into guest memory at the site, and a KVM hardware breakpoint on the
//! first instruction of the guest's vector-3 handler (ring 0, where they
//! work) catches its delivery: the exit comes with the interrupt frame on
//! the ring-0 stack (RIP = site + 1, CS, RFLAGS, RSP, SS), which is the
//! exact ring-3 state. We unwind it the way the step clock unwinds its #DB
//! (registers from the frame, the 48 stack bytes below TSS.rsp0 put back).
//! A DPL-0 vector-3 gate turns the `int3` into #GP (error code 0x1a), so the
//! vector-13 handler is watched too; the #PF handler as well, because a
//! fault handled in ring 0 during a free run would leave the saved stack
//! bytes stale: at a page fault the loop falls back to stepping until ring
//! 3 again. In ring 0 here `int3` cannot be emulated: KVM stops with an
//! emulation failure at the site, before anything happened, which is a hit
//! too. On ordinary VMX/SVM hosts `USE_SW_BP` turns every `int3` into a
//! debug exit at the site, and the same code takes that path.
//!
//! The patched bytes exist only while the vCPU runs: [`Breakpoints::unpatch`]
//! runs after every `KVM_RUN`, so memory reads, hashes, checkpoints and
//! snapshots never see them. A guest that wrote over a patched byte is
//! noticed there (the byte is no longer `int3`) and reported, so callers can
//! fall back to stepping instead of missing hits.

use std::collections::BTreeSet;

use kvm_bindings::{
    kvm_debug_exit_arch, kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP,
    KVM_GUESTDBG_USE_SW_BP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::vcpu::{Vcpu, VcpuError};
use crate::vmm::step::segment_from_gdt;

const INT3: u8 = 0xCC;
/// Bytes below the (16-aligned) TSS.rsp0 an exception frame with an error
/// code overwrites: error code, rip, cs, rflags, rsp, ss.
const FRAME: usize = 48;
/// The #GP error code of an `int3` through a DPL-0 IDT gate: IDT entry 3.
const GP_INT3: u64 = (3 << 3) | 2;

#[derive(Debug, thiserror::Error)]
pub enum BreakpointError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("KVM_SET_GUEST_DEBUG failed: {0}")]
    GuestDebug(kvm_ioctls::Error),
    #[error("guest memory at {addr:#x} ({what}) cannot be read or written")]
    Memory { addr: u64, what: &'static str },
    #[error("the guest executed an int3 of its own at {rip:#x} while native breakpoints were armed")]
    ForeignInt3 { rip: u64 },
}

/// What a debug exit or emulation failure meant for the breakpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trap {
    /// The guest stands at breakpoint site `rip`, before executing it
    /// (state unwound: exactly as if it had arrived there by stepping).
    Hit { rip: u64 },
    /// The guest took a page fault in ring 0's hands: it stands at the
    /// guest's #PF handler; step until ring 3 before running free again.
    RingZero,
}

/// The breakpoint sites and their patching state.
#[derive(Debug, Default)]
pub struct Breakpoints {
    /// Guest virtual addresses (linear: the platform runs with flat segments).
    sites: BTreeSet<u64>,
    /// Patched while the vCPU runs: (virtual, physical, original byte).
    patched: Vec<(u64, u64, u8)>,
    /// Linear addresses of the IDT handlers for vectors 3, 13, 14.
    handlers: [Option<u64>; 3],
    /// The bytes below TSS.rsp0 before this free run (address, bytes).
    saved: Option<(u64, [u8; FRAME])>,
    /// KVM guest debug is programmed for breakpoints.
    programmed: bool,
    /// Sites found overwritten by the guest since the last [`Breakpoints::take_overwritten`].
    overwritten: Vec<u64>,
    pub hits: u64,
}

impl Breakpoints {
    pub fn sites(&self) -> &BTreeSet<u64> {
        &self.sites
    }

    pub fn set_sites(&mut self, sites: BTreeSet<u64>) {
        self.sites = sites;
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Whether guest debug is currently programmed for breakpoints (the
    /// stepper or the landing breakpoint must reprogram it).
    pub fn programmed(&self) -> bool {
        self.programmed
    }

    /// Sites the guest wrote over while they were patched.
    pub fn take_overwritten(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.overwritten)
    }

    /// Prepares a free run from ring 3: finds the IDT handlers, saves the
    /// stack bytes an exception from ring 3 overwrites, patches every site
    /// and programs the hardware breakpoints. Returns false when it cannot
    /// (no IDT yet): the caller steps instead.
    pub fn arm(&mut self, vcpu: &Vcpu, mem: &GuestMemoryMmap) -> Result<bool, BreakpointError> {
        let s = vcpu.sregs()?;
        for (i, v) in [3u64, 13, 14].into_iter().enumerate() {
            self.handlers[i] = idt_handler(mem, s.idt.base, s.idt.limit, v);
        }
        if self.handlers[0].is_none() && self.handlers[1].is_none() {
            return Ok(false);
        }
        let rsp0: u64 = read(mem, s.tr.base + 4, "TSS.rsp0")?;
        let at = (rsp0 & !0xf).wrapping_sub(FRAME as u64);
        let mut b = [0u8; FRAME];
        mem.read_slice(&mut b, GuestAddress(at))
            .map_err(|_| BreakpointError::Memory { addr: at, what: "ring-0 stack" })?;
        self.saved = Some((at, b));
        self.patch(mem, &s)?;
        let mut dbg = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP | KVM_GUESTDBG_USE_HW_BP,
            ..Default::default()
        };
        let mut dr7 = 0u64;
        for (i, h) in self.handlers.iter().enumerate() {
            if let Some(h) = h {
                dbg.arch.debugreg[i] = *h;
                dr7 |= 1 << (2 * i); // Li: local enable, execute, 1 byte
            }
        }
        dbg.arch.debugreg[7] = dr7;
        vcpu.fd.set_guest_debug(&dbg).map_err(BreakpointError::GuestDebug)?;
        self.programmed = true;
        Ok(true)
    }

    /// Turns breakpoint guest debug off (the caller then programs what it needs).
    pub fn disarm_debug(&mut self, vcpu: &Vcpu) -> Result<(), BreakpointError> {
        if self.programmed {
            vcpu.fd
                .set_guest_debug(&kvm_guest_debug::default())
                .map_err(BreakpointError::GuestDebug)?;
            self.programmed = false;
        }
        Ok(())
    }

    fn patch(&mut self, mem: &GuestMemoryMmap, s: &kvm_bindings::kvm_sregs) -> Result<(), BreakpointError> {
        debug_assert!(self.patched.is_empty());
        for &va in &self.sites {
            let Some(pa) = super::paging::translate(mem, s, va) else { continue };
            let mut b = [0u8; 1];
            if mem.read_slice(&mut b, GuestAddress(pa)).is_err() {
                continue;
            }
            mem.write_slice(&[INT3], GuestAddress(pa))
                .map_err(|_| BreakpointError::Memory { addr: pa, what: "breakpoint site" })?;
            self.patched.push((va, pa, b[0]));
        }
        Ok(())
    }

    /// Puts the original bytes back (after every KVM_RUN). A site whose byte
    /// is no longer `int3` was overwritten by the guest: its new byte stays,
    /// and the site is reported by [`Breakpoints::take_overwritten`].
    pub fn unpatch(&mut self, mem: &GuestMemoryMmap) {
        for (va, pa, orig) in self.patched.drain(..) {
            let mut b = [0u8; 1];
            let _ = mem.read_slice(&mut b, GuestAddress(pa));
            if b[0] == INT3 {
                let _ = mem.write_slice(&[orig], GuestAddress(pa));
            } else {
                self.overwritten.push(va);
            }
        }
    }

    /// Interprets a debug exit taken while armed. `None`: not ours.
    pub fn on_debug_exit(
        &mut self,
        vcpu: &Vcpu,
        mem: &GuestMemoryMmap,
        exit: &kvm_debug_exit_arch,
    ) -> Result<Option<Trap>, BreakpointError> {
        let pc = exit.pc;
        // USE_SW_BP intercepted the int3 (VMX/SVM hosts): RIP is the site.
        if exit.exception == 3 && self.sites.contains(&pc) {
            self.hits += 1;
            return Ok(Some(Trap::Hit { rip: pc }));
        }
        if Some(pc) == self.handlers[2] && self.handlers[2] != self.handlers[0] {
            return Ok(Some(Trap::RingZero));
        }
        let (vec3, vec13) = (Some(pc) == self.handlers[0], Some(pc) == self.handlers[1]);
        if !vec3 && !vec13 {
            return Ok(None);
        }
        let mut regs = vcpu.regs()?;
        let mut f = [0u64; 6];
        for (i, w) in f.iter_mut().enumerate() {
            *w = read(mem, regs.rsp + 8 * i as u64, "exception frame")?;
        }
        // Vector 3: [rip after int3, cs, rflags, rsp, ss]; vector 13 (DPL-0
        // gate): [error code, rip of the int3, cs, rflags, rsp, ss].
        let (site, fr) = if vec3 && f[1] & 3 == 3 && self.sites.contains(&f[0].wrapping_sub(1)) {
            (f[0] - 1, [f[0] - 1, f[1], f[2], f[3], f[4]])
        } else if vec13 && f[0] == GP_INT3 && f[2] & 3 == 3 && self.sites.contains(&f[1]) {
            (f[1], [f[1], f[2], f[3], f[4], f[5]])
        } else if vec3 {
            return Err(BreakpointError::ForeignInt3 { rip: f[0].wrapping_sub(1) });
        } else {
            return Ok(Some(Trap::RingZero)); // a #GP of the guest's own
        };
        if let Some((at, bytes)) = self.saved.take() {
            mem.write_slice(&bytes, GuestAddress(at))
                .map_err(|_| BreakpointError::Memory { addr: at, what: "ring-0 stack" })?;
        }
        let mut s = vcpu.sregs()?;
        let seg = |sel: u64| {
            segment_from_gdt(mem, s.gdt.base, sel as u16)
                .map_err(|_| BreakpointError::Memory { addr: s.gdt.base + (sel & !7), what: "GDT" })
        };
        let (cs, ss) = (seg(fr[1])?, seg(fr[4])?);
        s.cs = cs;
        s.ss = ss;
        regs.rip = fr[0];
        regs.rflags = fr[2] & !(1 << 16); // RF is a delivery artifact
        regs.rsp = fr[3];
        vcpu.set_sregs(&s)?;
        vcpu.set_regs(&regs)?;
        self.hits += 1;
        Ok(Some(Trap::Hit { rip: site }))
    }

    /// An emulation failure at a patched site in ring 0 (kvm_pvm cannot
    /// emulate `int3`): the guest stands at the site, nothing executed.
    pub fn on_emulation_failure(&mut self, rip: u64, cpl: u16) -> Option<Trap> {
        (cpl == 0 && self.patched.iter().any(|p| p.0 == rip)).then(|| {
            self.hits += 1;
            Trap::Hit { rip }
        })
    }
}

fn read(mem: &GuestMemoryMmap, addr: u64, what: &'static str) -> Result<u64, BreakpointError> {
    mem.read_obj(GuestAddress(addr)).map_err(|_| BreakpointError::Memory { addr, what })
}

/// The handler of IDT `vector` (64-bit gates), if present.
fn idt_handler(mem: &GuestMemoryMmap, base: u64, limit: u16, vector: u64) -> Option<u64> {
    let gate = base + 16 * vector;
    if gate + 15 > base + limit as u64 {
        return None;
    }
    let lo: u64 = mem.read_obj(GuestAddress(gate)).ok()?;
    let hi: u64 = mem.read_obj(GuestAddress(gate + 8)).ok()?;
    if lo & (1 << 47) == 0 {
        return None;
    }
    Some((lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32))
}
