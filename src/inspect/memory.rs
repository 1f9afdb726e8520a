//! Commands that read guest memory: `x`, `disas`, `pagewalk`, `find`, `dump`.

use std::io::Write;
use std::path::PathBuf;

use super::commands::{inside, joined, size_name, usage, CommandInfo};
use super::format;
use super::mmu::{self, WalkEnd};
use super::parse::{self, Word};
use super::{interrupt, Error, Session};

impl Session {
    /// Reads memory (virtual through the page tables, or physical); returns
    /// what was readable and the error that stopped it early.
    pub(super) fn read_mem(&mut self, addr: u64, len: usize, physical: bool) -> Result<(Vec<u8>, Option<Error>), Error> {
        let v = self.view()?;
        if !physical {
            return Ok(mmu::read_virt_partial(v, addr, len));
        }
        let size = v.mem_size();
        let avail = size.saturating_sub(addr).min(len as u64) as usize;
        let mut b = vec![0u8; avail];
        if avail > 0 {
            v.read_phys(addr, &mut b)?;
        }
        let err = (avail < len).then(|| {
            Error::Msg(format!("cannot access physical memory at {:#x}: beyond guest RAM ({} MiB)", addr + avail as u64, size >> 20))
        });
        Ok((b, err))
    }

    pub(super) fn cmd_x(&mut self, c: &CommandInfo, fmt: Option<&str>, args: &[Word], physical: bool, out: &mut dyn Write) -> Result<(), Error> {
        if args.is_empty() {
            return Err(usage(c));
        }
        let f = match fmt {
            Some(s) => parse::fmt(s)?,
            None => parse::Fmt { count: 64, letter: 'x', size: 1 },
        };
        let addr = self.addr(&joined(args))?;
        let count = if f.count == 0 { 1 } else { f.count };
        if count > 1 << 20 {
            return Err(Error::Usage("count too large (at most 1048576)".into()));
        }
        match f.letter {
            'i' => return self.disassemble(addr, count, physical, out),
            's' => {
                let mut a = addr;
                for _ in 0..count {
                    let (b, err) = self.read_mem(a, 4096, physical)?;
                    let s = match b.iter().position(|&c| c == 0) {
                        Some(n) => &b[..n],
                        None if err.is_some() => return Err(err.unwrap()),
                        None => &b[..],
                    };
                    let sym = self.syms.describe(a);
                    let sym = if sym.is_empty() { sym } else { format!(" {sym}") };
                    writeln!(out, "{a:#018x}{sym}: \"{}\"", format::escaped(s))?;
                    a += s.len() as u64 + 1;
                }
                return Ok(());
            }
            _ => {}
        }
        let size = if f.size == 0 { 1 } else { f.size };
        let (b, err) = self.read_mem(addr, count * size, physical)?;
        let whole = b.len() / size * size;
        let text = if size == 1 && f.letter == 'x' { format::hexdump(addr, &b) } else { format::words(addr, &b[..whole], size, f.letter) };
        write!(out, "{text}")?;
        match err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub(super) fn disassemble(&mut self, addr: u64, n: usize, physical: bool, out: &mut dyn Write) -> Result<(), Error> {
        use capstone::prelude::*;
        let rip = self.view()?.regs()?.rip;
        let (bytes, err) = self.read_mem(addr, n * 15, physical)?;
        if bytes.is_empty() {
            return Err(err.unwrap_or_else(|| Error::Msg(format!("nothing readable at {addr:#x}"))));
        }
        let syntax = if self.intel { arch::x86::ArchSyntax::Intel } else { arch::x86::ArchSyntax::Att };
        let cs = Capstone::new()
            .x86()
            .mode(arch::x86::ArchMode::Mode64)
            .syntax(syntax)
            .build()
            .map_err(|e| Error::Msg(format!("capstone: {e}")))?;
        let insns = cs.disasm_count(&bytes, addr, n).map_err(|e| Error::Msg(format!("capstone: {e}")))?;
        let mut next = addr;
        for i in insns.iter() {
            let mark = if i.address() == rip { "=>" } else { "  " };
            let sym = self.syms.describe(i.address());
            writeln!(
                out,
                "{mark} {:#018x} {sym:<22} {:<24} {} {}",
                i.address(),
                format::hex_bytes(i.bytes()),
                i.mnemonic().unwrap_or("?"),
                i.op_str().unwrap_or("")
            )?;
            next = i.address() + i.bytes().len() as u64;
        }
        if insns.len() < n {
            let off = (next - addr) as usize;
            if off < bytes.len() && off + 15 <= bytes.len() {
                writeln!(out, "   {next:#018x} (not a valid instruction: {} ...)", format::hex_bytes(&bytes[off..(off + 4).min(bytes.len())]))?;
            } else if let Some(e) = err {
                return Err(e);
            }
        }
        Ok(())
    }

    pub(super) fn cmd_disas(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let (addr, n) = match args {
            [] => (self.view()?.regs()?.rip, 10),
            [a] => (self.addr(&a.text())?, 10),
            [a, n] => (self.addr(&a.text())?, parse::number(&n.text())? as usize),
            _ => return Err(usage(c)),
        };
        if n == 0 || n > 100_000 {
            return Err(Error::Usage("N must be 1..100000".into()));
        }
        self.disassemble(addr, n, false, out)
    }

    pub(super) fn cmd_pagewalk(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        if args.is_empty() {
            return Err(usage(c));
        }
        let va = self.addr(&joined(args))?;
        let w = mmu::walk(self.view()?, va)?;
        if w.end == WalkEnd::NoPaging {
            writeln!(out, "paging is off (CR0.PG = 0): physical = virtual = {va:#x}")?;
            return Ok(());
        }
        let sym = self.syms.describe(va);
        let sym = if sym.is_empty() { sym } else { format!(" {sym}") };
        writeln!(out, "pagewalk {va:#x}{sym}: cr3 {:#x}, 4-level paging", w.cr3)?;
        for l in &w.levels {
            let flags = mmu::flag_names(l.entry, l.level).join(" ");
            let next = if !l.present() {
                "not present".to_string()
            } else if l.level == 0 || l.large() {
                let size = 1u64 << (12 + 9 * l.level);
                format!("{} page at {:#x}", size_name(size), l.entry & mmu::ADDR_MASK & !(size - 1))
            } else {
                format!("next table at {:#x}", l.entry & mmu::ADDR_MASK)
            };
            writeln!(
                out,
                "  {:<4}[{:>3}]  entry at {:#08x} = {:#018x}  {flags:<20} -> {next}",
                l.name(),
                l.index,
                l.entry_addr,
                l.entry
            )?;
        }
        match &w.end {
            WalkEnd::Mapped { phys, page_size } => {
                let (user, write, exec) = w.effective();
                let yn = |b: bool| if b { "yes" } else { "no" };
                writeln!(
                    out,
                    "  => physical {phys:#x} ({} page; user {}, writable {}, executable {})",
                    size_name(*page_size),
                    yn(user),
                    yn(write),
                    yn(exec)
                )?;
            }
            WalkEnd::NotPresent { at } => writeln!(out, "  => not mapped: the {} entry is not present", w.levels[*at].name())?,
            WalkEnd::Reserved { why, .. } => writeln!(out, "  => invalid: {why}")?,
            WalkEnd::NoPaging => unreachable!(),
        }
        Ok(())
    }

    pub(super) fn cmd_find(&mut self, fmt: Option<&str>, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let size = match fmt {
            None => None,
            Some(f) => match parse::fmt(f)?.size {
                0 => None,
                n => Some(n),
            },
        };
        let pat = parse::pattern(args, size)?;
        let mem = self.view()?.memory()?;
        let mut hits = Vec::new();
        let mut total = 0usize;
        let mut at = 0usize;
        while at + pat.len() <= mem.len() {
            let Some(p) = mem[at..=mem.len() - pat.len()].iter().position(|&b| b == pat[0]) else { break };
            let i = at + p;
            if mem[i..i + pat.len()] == pat[..] {
                total += 1;
                if hits.len() < 32 {
                    hits.push(i);
                }
            }
            at = i + 1;
            if interrupt::take() {
                return Err(Error::Interrupted { at: self.exits() });
            }
        }
        if total == 0 {
            writeln!(out, "not found: {} ({} bytes) in guest physical memory", format::hex_bytes(&pat), pat.len())?;
            return Ok(());
        }
        writeln!(out, "{total} match{} in guest physical memory:", if total == 1 { "" } else { "es" })?;
        for i in hits {
            let ctx = &mem[i..(i + 16).min(mem.len())];
            writeln!(out, "  {:#018x} {:<24} |{}|", i, self.syms.describe(i as u64), format::ascii(ctx))?;
        }
        if total > 32 {
            writeln!(out, "  ... and {} more", total - 32)?;
        }
        Ok(())
    }

    pub(super) fn cmd_dump(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let (physical, rest) = match args.first() {
            Some(w) if w.text() == "-p" => (true, &args[1..]),
            _ => (false, args),
        };
        let [a, l, f] = rest else { return Err(usage(c)) };
        let addr = self.addr(&a.text())?;
        let len = parse::number(&l.text())? as usize;
        if len > 1 << 34 {
            return Err(Error::Usage("LEN is too large".into()));
        }
        let file = PathBuf::from(f.text());
        if inside(&file, &self.rec.dir) {
            return Err(Error::Usage(format!("{} is inside the recording; inspect never writes there", file.display())));
        }
        let (b, err) = self.read_mem(addr, len, physical)?;
        if let Some(e) = err {
            return Err(Error::Msg(format!("{e} (nothing written)")));
        }
        std::fs::write(&file, &b).map_err(|e| Error::Msg(format!("writing {}: {e}", file.display())))?;
        writeln!(out, "wrote {} bytes of {} memory at {addr:#x} to {}", b.len(), if physical { "physical" } else { "virtual" }, file.display())?;
        Ok(())
    }
}
