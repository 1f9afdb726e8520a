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
//! Architecturally a DPL-0 vector-3 gate turns the `int3` into #GP (error
//! code 0x1a), so the vector-13 handler is watched too then (kvm_pvm
//! delivers vector 3 all the same, measured with the demo guest's DPL-0
//! gate). In ring 0 here `int3` cannot
//! be emulated: KVM stops with an emulation failure at the site, before
//! anything happened, which is a hit too. On ordinary VMX/SVM hosts
//! `USE_SW_BP` turns every `int3` into a debug exit at the site, and the
//! same code takes that path.
//!
//! Ring 0 runs free too. The one thing a free run must not lose is the
//! truth of the 48 bytes below TSS.rsp0 that a ring-3 `int3` overwrites:
//! ring 0 writes them (every interrupt frame lands there), so the copy
//! taken before a run is only good while ring 3 runs. Every return from
//! ring 0 to ring 3 is therefore a stop: the other debug registers hold the
//! guest's *return sites* (the `iretq`/`sysret` instructions), found by a
//! static walk of the IDT handlers' code and learned whenever a step goes
//! from ring 0 to ring 3. At such a stop the caller steps the return (the
//! stepper executes an `iretq` itself) and the next free run starts in ring
//! 3 with a fresh copy. A run that starts in ring 0 and meets a ring-3
//! `int3` without passing a watched return would have a stale copy: that
//! is reported ([`BreakpointError::UnseenReturn`]), never unwound silently;
//! with no return site known, or more than the debug registers hold, ring
//! 0 is stepped instead.
//!
//! The patched bytes exist only while the vCPU runs: [`Breakpoints::unpatch`]
//! runs after every `KVM_RUN`, so memory reads, hashes, checkpoints and
//! snapshots never see them. The machine keeps the pages they sit on in
//! read-only memory slots ([`Breakpoints::patched_pages`]), so a guest write
//! over a site exits and lands between runs, and the next run patches the
//! new code; should a patched byte change all the same, that is noticed here
//! (no longer `int3`) and reported, never a silent miss. A guest *reading*
//! its code under a patched byte reads 0xCC; that cannot be trapped here
//! and shows as a divergence of the replay (docs/debugging.md).

use std::collections::BTreeSet;

use kvm_bindings::{
    kvm_debug_exit_arch, kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP,
    KVM_GUESTDBG_USE_SW_BP,
};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::vcpu::{Vcpu, VcpuError};
use crate::vmm::step::segment_from_gdt;

const INT3: u8 = 0xCC;
/// Bytes below the (16-aligned) TSS.rsp0 an exception frame with an error
/// code overwrites: error code, rip, cs, rflags, rsp, ss.
const FRAME: usize = 48;
/// The #GP error code of an `int3` through a DPL-0 IDT gate: IDT entry 3.
const GP_INT3: u64 = (3 << 3) | 2;
/// Debug registers KVM guest debug programs: one catches the `int3`
/// delivery, the others watch return sites.
const DRS: usize = 4;
/// Instructions the static walk of the IDT handlers decodes at most.
const WALK_BUDGET: usize = 4096;

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
    #[error(
        "breakpoint at {site:#x} hit in ring 3 after ring 0 returned by an instruction not known as a \
         return site: the 48 bytes below TSS.rsp0 cannot be restored (set REVIRT_GDB_NATIVE=0)"
    )]
    UnseenReturn { site: u64 },
}

/// What a debug exit or emulation failure meant for the breakpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trap {
    /// The guest stands at breakpoint site `rip`, before executing it
    /// (state unwound: exactly as if it had arrived there by stepping).
    Hit { rip: u64 },
    /// A debug register stopped the guest in ring 0 at an instruction that
    /// is no hit: a return site, or the guest's own #GP handler. Step it
    /// once (a return to ring 3 then starts the next free run with a fresh
    /// copy of the stack bytes), then run free again.
    StepOver,
}

/// The breakpoint sites and their patching state.
#[derive(Debug, Default)]
pub struct Breakpoints {
    /// Guest virtual addresses (linear: the platform runs with flat segments).
    sites: BTreeSet<u64>,
    /// Patched while the vCPU runs: (virtual, physical, original byte).
    patched: Vec<(u64, u64, u8)>,
    /// The sites patched during the last run (virtual).
    last_run: Vec<u64>,
    /// The IDT handlers (linear address, vector) an `int3` from ring 3 may
    /// reach: vector 3, and vector 13 (#GP) when the vector-3 gate is DPL 0.
    catch: Vec<(u64, u8)>,
    /// Return sites (ring 0 to ring 3) learned by stepping.
    learned: BTreeSet<u64>,
    /// Return sites found by walking the IDT handlers, for (IDT base, limit).
    walked: Option<(u64, u16, BTreeSet<u64>)>,
    /// The bytes below TSS.rsp0 before this free run (address, bytes).
    saved: Option<(u64, [u8; FRAME])>,
    /// This free run started in ring 0 (no saved copy is good).
    from_ring0: bool,
    /// KVM guest debug is programmed for breakpoints (with these debug
    /// registers: reprogramming costs an ioctl per run otherwise).
    programmed: bool,
    debugregs: [u64; 8],
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

    /// A return from ring 0 to ring 3 at `rip`, seen by stepping.
    pub fn learn_return(&mut self, rip: u64) {
        self.learned.insert(rip);
    }

    /// Every return site known: walked from the IDT handlers and learned.
    pub fn return_sites(&self) -> BTreeSet<u64> {
        let mut r = self.learned.clone();
        if let Some((_, _, w)) = &self.walked {
            r.extend(w);
        }
        r
    }

    /// Prepares a free run: finds the handler an `int3` from ring 3 reaches
    /// and the return sites, saves the stack bytes that `int3` overwrites
    /// (from ring 3), patches every site and programs the hardware
    /// breakpoints. Returns false when it cannot: no IDT yet, or in ring 0
    /// with no return site known or more than the debug registers hold.
    /// The caller steps instead.
    /// `sregs`: the vCPU's SREGS if the caller has them (else read here).
    /// `entering`: an interrupt may be injected before the run (ring 0 will
    /// run, as if the run started there).
    pub fn arm(
        &mut self,
        vcpu: &Vcpu,
        mem: &GuestMemoryMmap,
        sregs: Option<kvm_bindings::kvm_sregs>,
        entering: bool,
    ) -> Result<bool, BreakpointError> {
        let s = match sregs {
            Some(s) => s,
            None => vcpu.sregs()?,
        };
        self.catch.clear();
        let Some((h3, dpl)) = idt_gate(mem, s.idt.base, s.idt.limit, 3) else { return Ok(false) };
        self.catch.push((h3, 3));
        if dpl != 3 {
            if let Some((h13, _)) = idt_gate(mem, s.idt.base, s.idt.limit, 13) {
                self.catch.push((h13, 13));
            }
        }
        if !matches!(&self.walked, Some((b, l, _)) if *b == s.idt.base && *l == s.idt.limit) {
            let skip: Vec<u64> = self.catch.iter().map(|c| c.0).collect();
            let w = walk_returns(mem, &s, &skip);
            self.walked = Some((s.idt.base, s.idt.limit, w));
        }
        let catch: Vec<u64> = self.catch.iter().map(|c| c.0).collect();
        let returns: Vec<u64> = self.return_sites().into_iter().filter(|r| !catch.contains(r)).collect();
        self.from_ring0 = entering || s.cs.selector & 3 != 3;
        if self.from_ring0 && (returns.is_empty() || returns.len() > DRS - catch.len()) {
            return Ok(false);
        }
        self.saved = None;
        if !self.from_ring0 {
            let rsp0: u64 = read(mem, s.tr.base + 4, "TSS.rsp0")?;
            let at = (rsp0 & !0xf).wrapping_sub(FRAME as u64);
            let mut b = [0u8; FRAME];
            mem.read_slice(&mut b, GuestAddress(at))
                .map_err(|_| BreakpointError::Memory { addr: at, what: "ring-0 stack" })?;
            self.saved = Some((at, b));
        }
        self.patch(mem, &s)?;
        let mut dbg = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP | KVM_GUESTDBG_USE_HW_BP,
            ..Default::default()
        };
        // The first debug registers catch the int3 delivery, the others
        // watch return sites (from ring 3 with more sites than that, a
        // return through an unwatched one only matters after an unwatched
        // entry into ring 0).
        let mut dr7 = 0u64;
        for (i, a) in catch.into_iter().chain(returns).take(DRS).enumerate() {
            dbg.arch.debugreg[i] = a;
            dr7 |= 1 << (2 * i); // Li: local enable, execute, 1 byte
        }
        dbg.arch.debugreg[7] = dr7;
        if !self.programmed || self.debugregs != dbg.arch.debugreg {
            vcpu.fd.set_guest_debug(&dbg).map_err(BreakpointError::GuestDebug)?;
            self.debugregs = dbg.arch.debugreg;
        }
        self.programmed = true;
        Ok(true)
    }

    /// Whether an interrupt to `vector` can be delivered in a free run: no
    /// site at its handler's entry (stepping never stops there), and the
    /// return sites known and few enough to watch (as [`Breakpoints::arm`]
    /// requires from ring 0).
    pub fn can_deliver_free(&self, mem: &GuestMemoryMmap, s: &kvm_bindings::kvm_sregs, vector: u8) -> bool {
        let Some((h, _)) = idt_gate(mem, s.idt.base, s.idt.limit, vector as u64) else { return false };
        let n = self.return_sites().iter().filter(|r| !self.catch.iter().any(|c| c.0 == **r)).count();
        !self.sites.contains(&h) && n > 0 && n <= DRS - self.catch.len().max(1)
    }

    /// The guest-physical pages (frame numbers) patched for this run.
    pub fn patched_pages(&self) -> BTreeSet<u64> {
        self.patched.iter().map(|p| p.1 >> 12).collect()
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
        self.last_run.clear();
        for (va, pa, orig) in self.patched.drain(..) {
            self.last_run.push(va);
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
        let catch = self.catch.iter().find(|c| c.0 == pc).copied();
        if catch.is_none() {
            if self.return_sites().contains(&pc) {
                // A return site (ring 0 stands there, exact): a hit if a
                // breakpoint is set on it too.
                if self.sites.contains(&pc) {
                    self.hits += 1;
                    return Ok(Some(Trap::Hit { rip: pc }));
                }
                return Ok(Some(Trap::StepOver));
            }
            return Ok(None);
        }
        let (vec3, vec13) = (catch.is_some_and(|c| c.1 == 3), catch.is_some_and(|c| c.1 == 13));
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
            return Ok(Some(Trap::StepOver)); // a #GP of the guest's own
        };
        if self.from_ring0 {
            return Err(BreakpointError::UnseenReturn { site });
        }
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
        (cpl == 0 && self.last_run.contains(&rip)).then(|| {
            self.hits += 1;
            Trap::Hit { rip }
        })
    }
}

fn read(mem: &GuestMemoryMmap, addr: u64, what: &'static str) -> Result<u64, BreakpointError> {
    mem.read_obj(GuestAddress(addr)).map_err(|_| BreakpointError::Memory { addr, what })
}

/// The handler of IDT `vector` (64-bit gates) and the gate's DPL, if present.
fn idt_gate(mem: &GuestMemoryMmap, base: u64, limit: u16, vector: u64) -> Option<(u64, u64)> {
    let gate = base + 16 * vector;
    if gate + 15 > base + limit as u64 {
        return None;
    }
    let lo: u64 = mem.read_obj(GuestAddress(gate)).ok()?;
    let hi: u64 = mem.read_obj(GuestAddress(gate + 8)).ok()?;
    if lo & (1 << 47) == 0 {
        return None;
    }
    Some(((lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32), (lo >> 45) & 3))
}

/// Reads guest-virtual bytes (as many as are mapped from `va` on).
fn read_virt(mem: &GuestMemoryMmap, s: &kvm_bindings::kvm_sregs, va: u64, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        let a = va.wrapping_add(n as u64);
        let Some(pa) = super::paging::translate(mem, s, a) else { break };
        let take = (buf.len() - n).min(4096 - (a & 0xfff) as usize);
        if mem.read_slice(&mut buf[n..n + take], GuestAddress(pa)).is_err() {
            break;
        }
        n += take;
    }
    n
}

/// The return sites (`iretq`, `sysret`, `sysexit`) reachable from the IDT
/// handlers through straight-line code, direct jumps and conditional
/// branches (calls are not followed; they come back). The handlers in
/// `skip` are left out: their entry is caught, so the free run never gets
/// to their returns. A guest whose returns hide behind indirect jumps or
/// calls has its sites learned by stepping instead.
fn walk_returns(mem: &GuestMemoryMmap, s: &kvm_bindings::kvm_sregs, skip: &[u64]) -> BTreeSet<u64> {
    let mut todo: Vec<u64> = (0..256u64.min((s.idt.limit as u64 + 1) / 16))
        .filter_map(|v| idt_gate(mem, s.idt.base, s.idt.limit, v).map(|g| g.0))
        .filter(|h| !skip.contains(h))
        .collect();
    let mut seen = BTreeSet::new();
    let mut found = BTreeSet::new();
    let mut budget = WALK_BUDGET;
    while let Some(mut ip) = todo.pop() {
        while budget > 0 && seen.insert(ip) {
            budget -= 1;
            let mut code = [0u8; 15];
            let n = read_virt(mem, s, ip, &mut code);
            let ins = Decoder::with_ip(64, &code[..n], ip, DecoderOptions::NONE).decode();
            if ins.is_invalid() {
                break;
            }
            if matches!(ins.mnemonic(), Mnemonic::Iretq | Mnemonic::Iretd | Mnemonic::Sysretq | Mnemonic::Sysexitq) {
                found.insert(ip);
                break;
            }
            let direct = matches!(ins.op0_kind(), OpKind::NearBranch64);
            match ins.flow_control() {
                FlowControl::Next | FlowControl::Call | FlowControl::IndirectCall => ip = ins.next_ip(),
                FlowControl::ConditionalBranch => {
                    if direct {
                        todo.push(ins.near_branch_target());
                    }
                    ip = ins.next_ip();
                }
                FlowControl::UnconditionalBranch if direct => ip = ins.near_branch_target(),
                _ => break,
            }
        }
    }
    found
}
