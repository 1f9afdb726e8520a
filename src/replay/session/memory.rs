//! Guest memory as a session sees it: virtual reads through the current
//! page tables, and the watchpoint checks of the stepping path (bytes that
//! changed, accesses an instruction makes, decoded with iced-x86).

use super::*;
use vm_memory::{Bytes, GuestAddress};

impl Session {
    /// Translates a guest virtual address through the current page tables
    /// (4-level paging: 4 KiB, 2 MiB and 1 GiB pages).
    pub fn translate(&self, va: u64) -> Option<u64> {
        let s = self.tl.machine.vcpu.sregs().ok()?;
        crate::vmm::paging::translate(&self.tl.machine.mem, &s, va)
    }

    pub(super) fn read_phys(&self, pa: u64, len: u64) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        let _ = self.tl.machine.mem.read_slice(&mut b, GuestAddress(pa));
        b
    }

    /// Reads guest virtual memory; returns how many bytes could be read.
    pub fn read_virt(&self, va: u64, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let a = va.wrapping_add(done as u64);
            let Some(pa) = self.translate(a) else { break };
            let n = ((0x1000 - (a & 0xfff)) as usize).min(buf.len() - done);
            if self
                .tl
                .machine
                .mem
                .read_slice(&mut buf[done..done + n], GuestAddress(pa))
                .is_err()
            {
                break;
            }
            done += n;
        }
        done
    }

    pub(super) fn watched_bytes(&self) -> Vec<Vec<u8>> {
        self.watches
            .iter()
            .map(|w| {
                let mut b = vec![0u8; w.len as usize];
                let n = self.read_virt(w.addr, &mut b);
                b.truncate(n);
                b
            })
            .collect()
    }

    /// Watches whose bytes changed between `old` and now.
    /// (An access watchpoint reports itself as such: gdb matches the kind.)
    pub(super) fn changed(&self, old: &[Vec<u8>], new: &[Vec<u8>]) -> Option<(u64, WatchKind)> {
        self.watches
            .iter()
            .zip(old.iter().zip(new))
            .find(|(w, (a, b))| w.kind != WatchKind::Read && a != b)
            .map(|(w, _)| (w.addr, w.kind))
    }

    /// Read and access watchpoints that the instruction at RIP touches
    /// (decoded with iced-x86: explicit operands and implicit stack
    /// accesses, addresses computed from the current registers).
    pub(super) fn touched(&self) -> Option<(u64, WatchKind)> {
        use iced_x86::{Decoder, DecoderOptions};
        if !self.watches.iter().any(|w| w.kind != WatchKind::Write) {
            return None;
        }
        let v = &self.tl.machine.vcpu;
        let (r, sr) = (v.regs().ok()?, v.sregs().ok()?);
        let mut code = [0u8; 15];
        let n = self.read_virt(r.rip, &mut code);
        let bits = if sr.cs.l != 0 {
            64
        } else if sr.cs.db != 0 {
            32
        } else {
            16
        };
        let mut dec = Decoder::with_ip(bits, &code[..n], r.rip, DecoderOptions::NONE);
        let ins = dec.decode();
        if ins.is_invalid() {
            return None;
        }
        for (addr, size, reads, writes) in self.mem_ops(&ins) {
            for w in &self.watches {
                let overlaps = addr < w.addr + w.len && w.addr < addr + size;
                let hit = match w.kind {
                    WatchKind::Read => reads,
                    WatchKind::Access => reads || writes,
                    WatchKind::Write => false,
                };
                if overlaps && hit {
                    return Some((w.addr, w.kind));
                }
            }
        }
        None
    }

    /// The memory an instruction accesses, with addresses computed from the
    /// current registers: (virtual address, size, reads, writes).
    pub(super) fn mem_ops(&self, ins: &iced_x86::Instruction) -> Vec<(u64, u64, bool, bool)> {
        use iced_x86::{InstructionInfoFactory, OpAccess, Register};
        let v = &self.tl.machine.vcpu;
        let (Ok(r), Ok(sr)) = (v.regs(), v.sregs()) else { return Vec::new() };
        let mut f = InstructionInfoFactory::new();
        let info = f.info(ins);
        let value = |reg: Register, _: usize, _: usize| -> Option<u64> {
            let full = match reg.full_register() {
                Register::RAX => r.rax,
                Register::RBX => r.rbx,
                Register::RCX => r.rcx,
                Register::RDX => r.rdx,
                Register::RSI => r.rsi,
                Register::RDI => r.rdi,
                Register::RSP => r.rsp,
                Register::RBP => r.rbp,
                Register::R8 => r.r8,
                Register::R9 => r.r9,
                Register::R10 => r.r10,
                Register::R11 => r.r11,
                Register::R12 => r.r12,
                Register::R13 => r.r13,
                Register::R14 => r.r14,
                Register::R15 => r.r15,
                Register::RIP => r.rip,
                Register::FS => sr.fs.base,
                Register::GS => sr.gs.base,
                Register::ES | Register::CS | Register::SS | Register::DS => 0,
                _ => return None,
            };
            Some(match reg.size() {
                1 => full & 0xff,
                2 => full & 0xffff,
                4 => full & 0xffff_ffff,
                _ => full,
            })
        };
        info.used_memory()
            .iter()
            .filter_map(|m| {
                let addr = m.virtual_address(0, value)?;
                let size = m.memory_size().size().max(1) as u64;
                let reads = matches!(m.access(), OpAccess::Read | OpAccess::CondRead | OpAccess::ReadWrite | OpAccess::ReadCondWrite);
                let writes = matches!(m.access(), OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite);
                Some((addr, size, reads, writes))
            })
            .collect()
    }
}
