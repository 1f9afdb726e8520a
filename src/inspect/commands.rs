//! The inspector's commands (gdb's names where gdb has one). Each writes
//! its answer to `out`; bad input is an [`Error::Usage`], never a panic.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::format;
use super::mmu::{self, WalkEnd};
use super::parse::{self, Word};
use super::{interrupt, point_str, run_to, Error, Frozen, Ran, Session, View};
use crate::clock::ExecPoint;
use crate::replay::Outcome;
use crate::trace::{EndReason, Event, LogStatus};

/// What the REPL does after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Quit,
}

pub struct CommandInfo {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub args: &'static str,
    pub help: &'static str,
}

pub const COMMANDS: &[CommandInfo] = &[
    CommandInfo { name: "help", aliases: &["h", "?"], args: "[COMMAND]", help: "list the commands, or explain one" },
    CommandInfo { name: "where", aliases: &[], args: "", help: "the current point: exit count, next event, RIP, where the state comes from" },
    CommandInfo { name: "summary", aliases: &[], args: "", help: "the recording: duration, events by kind, checkpoints, clock, log integrity, end state" },
    CommandInfo { name: "seek", aliases: &["goto"], args: "POINT", help: "move to a point (exit:N, +N, -N, ckpt:K, event:I, start, end); a checkpoint is read from its files, anything else is replayed through KVM (Ctrl-C stops a long replay)" },
    CommandInfo { name: "regs", aliases: &["registers"], args: "[NAME...]", help: "registers: general, segment, control, EFER, the saved MSRs (or only the NAMEs, e.g. regs rip cr3)" },
    CommandInfo { name: "info", aliases: &["i"], args: "registers|checkpoints|symbol ADDR", help: "info registers (= regs), info checkpoints, info symbol ADDR" },
    CommandInfo { name: "x", aliases: &[], args: "[/FMT] ADDR", help: "examine memory at a virtual address (through the guest's page tables): x/64xb ADDR hex+ASCII, x/4xg 8-byte words, x/2s strings, x/5i instructions. ADDR: 0x1000, 4096, $rsp+8, a symbol" },
    CommandInfo { name: "xp", aliases: &[], args: "[/FMT] PADDR", help: "like x, at a guest physical address" },
    CommandInfo { name: "disas", aliases: &["disassemble"], args: "[ADDR] [N]", help: "disassemble N instructions (default 10) at ADDR (default RIP), with their bytes" },
    CommandInfo { name: "pagewalk", aliases: &["pw"], args: "VADDR", help: "walk the guest page tables for VADDR: every level's entry and flags (P RW US PWT PCD A D PS G NX), and the physical address" },
    CommandInfo { name: "events", aliases: &["ev"], args: "[N|all]", help: "the events around the current point (N before and after, default 5); => marks the next one to take effect" },
    CommandInfo { name: "find", aliases: &[], args: "[/b|/h|/w|/g] \"string\"|HEXBYTES|VALUE", help: "search all guest physical memory: find \"text\", find de ad be ef, find/g 0x200000 (little-endian 8-byte value)" },
    CommandInfo { name: "diff", aliases: &[], args: "POINT [bytes]", help: "compare the current point with POINT: registers that differ and the pages that changed; with `bytes`, the changed bytes" },
    CommandInfo { name: "dump", aliases: &[], args: "[-p] ADDR LEN FILE", help: "write LEN bytes of memory at virtual (or with -p physical) ADDR to FILE" },
    CommandInfo { name: "last-write", aliases: &["lw"], args: "ADDR [LEN]", help: "when the LEN bytes (default 8) at ADDR last changed before now: the exit interval, the old and new value, and the instruction that wrote them" },
    CommandInfo { name: "origin", aliases: &[], args: "LOCATION [at POINT] [--depth N] [--time S] [--json]", help: "where the value came from: its last writer, that instruction's sources, recursively, down to serial/clock/disk input, constants or boot-image bytes (LOCATION: $reg or ADDR[:LEN]; `at` seeks there first)" },
    CommandInfo { name: "history", aliases: &[], args: "ADDR LEN [FROM [TO]] [--reads] [--time S] [--json]", help: "every write (with --reads also every read) of the LEN bytes at ADDR between FROM (default start) and TO (default here): point, instruction, old and new bytes" },
    CommandInfo { name: "stepi", aliases: &["si"], args: "[N]", help: "execute N instructions (default 1) by single-stepping the replay; shows the next instruction" },
    CommandInfo { name: "console", aliases: &[], args: "[N]", help: "the last N lines (default 20) the guest had printed by this point" },
    CommandInfo { name: "symbols", aliases: &["sym"], args: "[PATTERN]", help: "symbols of the guest image (those whose name contains PATTERN)" },
    CommandInfo { name: "set", aliases: &[], args: "disassembly-flavor att|intel | progress on|off", help: "settings" },
    CommandInfo { name: "live", aliases: &[], args: "", help: "go live from here: the guest runs on with real time and this terminal as its console (the recording is untouched); back to the REPL when it stops" },
    CommandInfo { name: "quit", aliases: &["q", "exit"], args: "", help: "leave" },
];

/// Words the REPL completes at the start of a line.
pub fn completion_words() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = COMMANDS.iter().flat_map(|c| std::iter::once(c.name).chain(c.aliases.iter().copied())).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Completions for the second word of some commands.
pub fn argument_words(cmd: &str) -> &'static [&'static str] {
    match cmd {
        "info" | "i" => &["registers", "checkpoints", "symbol"],
        "set" => &["disassembly-flavor", "progress"],
        "seek" | "goto" | "diff" => &["exit:", "ckpt:", "event:", "start", "end"],
        "help" | "h" => &[],
        _ => &[],
    }
}

fn lookup(name: &str) -> Result<&'static CommandInfo, Error> {
    if let Some(c) = COMMANDS.iter().find(|c| c.name == name || c.aliases.contains(&name)) {
        return Ok(c);
    }
    let cands: Vec<&CommandInfo> = COMMANDS.iter().filter(|c| c.name.starts_with(name)).collect();
    match cands.as_slice() {
        [one] => Ok(one),
        [] => {
            let near = COMMANDS.iter().map(|c| (edit_distance(name, c.name), c.name)).min().filter(|(d, _)| *d <= 2);
            let hint = near.map(|(_, n)| format!(" (did you mean `{n}`?)")).unwrap_or_default();
            Err(Error::Usage(format!("unknown command '{name}'{hint}; `help` lists the commands")))
        }
        many => Err(Error::Usage(format!(
            "'{name}' is ambiguous: {}",
            many.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
        ))),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + usize::from(a[i - 1] != b[j - 1]));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn usage(c: &CommandInfo) -> Error {
    Error::Usage(format!("usage: {} {}", c.name, c.args))
}

fn joined(args: &[Word]) -> String {
    args.iter().map(Word::text).collect::<Vec<_>>().join(" ")
}

fn reg_value(r: &crate::replay::Regs, name: &str) -> Option<u64> {
    let n = match name {
        "pc" => "rip",
        "sp" => "rsp",
        "fp" => "rbp",
        "eflags" => "rflags",
        o => o,
    };
    format::gprs(r).iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
}

impl Session {
    /// Runs one command line.
    pub fn exec(&mut self, line: &str, out: &mut dyn Write) -> Result<Flow, Error> {
        interrupt::clear();
        let ws = parse::words(line)?;
        let Some(first) = ws.first() else { return Ok(Flow::Continue) };
        let Word::Plain(first) = first else {
            return Err(Error::Usage("a command starts with its name, not a string".into()));
        };
        let (name, fmt) = match first.split_once('/') {
            Some((n, f)) => (n, Some(f)),
            None => (first.as_str(), None),
        };
        let c = lookup(name)?;
        let args = &ws[1..];
        if fmt.is_some() && !matches!(c.name, "x" | "xp" | "find") {
            return Err(Error::Usage(format!("{} takes no /FORMAT", c.name)));
        }
        match c.name {
            "help" => self.cmd_help(args, out)?,
            "where" => self.cmd_where(out)?,
            "summary" => self.cmd_summary(out)?,
            "seek" => self.cmd_seek(c, args, out)?,
            "regs" => self.cmd_regs(args, out)?,
            "info" => self.cmd_info(c, args, out)?,
            "x" => self.cmd_x(c, fmt, args, false, out)?,
            "xp" => self.cmd_x(c, fmt, args, true, out)?,
            "disas" => self.cmd_disas(c, args, out)?,
            "pagewalk" => self.cmd_pagewalk(c, args, out)?,
            "events" => self.cmd_events(c, args, out)?,
            "find" => self.cmd_find(fmt, args, out)?,
            "diff" => self.cmd_diff(c, args, out)?,
            "dump" => self.cmd_dump(c, args, out)?,
            "last-write" => self.cmd_last_write(c, args, out)?,
            "origin" => self.cmd_origin(args, out)?,
            "history" => self.cmd_history(args, out)?,
            "stepi" => self.cmd_stepi(c, args, out)?,
            "console" => self.cmd_console(c, args, out)?,
            "symbols" => self.cmd_symbols(args, out)?,
            "set" => self.cmd_set(c, args, out)?,
            "live" => {
                if !args.is_empty() {
                    return Err(usage(c));
                }
                super::live::repl_live(self, out)?;
            }
            "quit" => return Ok(Flow::Quit),
            other => unreachable!("command {other} has no handler"),
        }
        Ok(Flow::Continue)
    }

    /// Evaluates an address expression (numbers, $registers, symbols, + and -).
    pub fn addr(&mut self, s: &str) -> Result<u64, Error> {
        let regs = if s.contains('$') { Some(self.view()?.regs()?) } else { None };
        let syms = &self.syms;
        parse::address(s, &mut |t| {
            if let Some(r) = t.strip_prefix('$') {
                let regs = regs.as_ref().expect("read when the expression has a $");
                return reg_value(regs, r).ok_or_else(|| Error::Usage(format!("unknown register ${r} (use $rax..$r15, $rip, $rsp, $rflags)")));
            }
            syms.lookup(t).map(|s| s.addr).ok_or_else(|| {
                Error::Usage(format!("no symbol '{t}' in the guest image (numbers: 0x hex or decimal; registers: $rip)"))
            })
        })
    }

    fn cmd_help(&mut self, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        if let Some(w) = args.first() {
            let c = lookup(&w.text())?;
            writeln!(out, "{} {}", c.name, c.args)?;
            writeln!(out, "  {}", c.help)?;
            if !c.aliases.is_empty() {
                writeln!(out, "  aliases: {}", c.aliases.join(", "))?;
            }
            if matches!(c.name, "seek" | "diff") {
                writeln!(out, "  {}", parse::POINT_HELP)?;
            }
            return Ok(());
        }
        writeln!(out, "commands (unique prefixes work; several per line with ';'):")?;
        for c in COMMANDS {
            let head = format!("{} {}", c.name, c.args);
            writeln!(out, "  {head:<44} {}", c.help)?;
        }
        writeln!(out, "{}", parse::POINT_HELP)?;
        Ok(())
    }

    fn cmd_where(&mut self, out: &mut dyn Write) -> Result<(), Error> {
        let end = self.end_exits();
        let next = self.next_event()?;
        let x = self.exits();
        writeln!(out, "{} of {end}", self.describe_here())?;
        match self.rec.events.get(next) {
            Some(e) => writeln!(out, "next event: #{next} {e}")?,
            None => writeln!(out, "next event: none (#{next}: past the last event)")?,
        }
        let v = self.view()?;
        let (r, s, printed) = (v.regs()?, v.sregs()?, v.output_len());
        writeln!(out, "rip {:#x} {}  ring {}", r.rip, self.syms.describe(r.rip), s.cs.selector & 3)?;
        writeln!(out, "console: {printed} bytes printed so far")?;
        if x == end {
            match self.rec.end() {
                Some(Event::End { reason, .. }) => writeln!(out, "this is the end of the recording ({})", end_reason(reason))?,
                _ => writeln!(out, "this is as far as the (cut-short) recording goes")?,
            }
            if let Some(p) = self.end_problems() {
                if p.is_empty() {
                    writeln!(out, "the replay matched the recording's final state")?;
                }
                for m in p {
                    writeln!(out, "MISMATCH: {m}")?;
                }
            }
        }
        Ok(())
    }

    fn cmd_stepi(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let n = match args {
            [] => 1,
            [n] => parse::number(&n.text())?,
            _ => return Err(usage(c)),
        };
        if n == 0 {
            return Err(Error::Usage("N must be at least 1".into()));
        }
        match self.stepi(n)? {
            Ran::Reached => {}
            Ran::Finished(_) => writeln!(out, "the guest reached the end of the recording")?,
        }
        writeln!(out, "{}", self.describe_here())?;
        let rip = self.view()?.regs()?.rip;
        self.disassemble(rip, 1, false, out)
    }

    fn cmd_summary(&mut self, out: &mut dyn Write) -> Result<(), Error> {
        let rec = self.rec.clone();
        let m = &rec.meta;
        writeln!(out, "recording    {}", rec.dir.display())?;
        writeln!(out, "id           {} (revirt {}, created at unix time {})", m.id, m.revirt_version, m.created_unix)?;
        writeln!(
            out,
            "guest        {} ({} bytes, sha256 {}), {} MiB RAM, cmdline {:?}, disk {}",
            m.image.original_path,
            m.image.size,
            &m.image.sha256[..m.image.sha256.len().min(16)],
            m.config.mem_size >> 20,
            m.config.cmdline,
            match &m.disk {
                Some(d) => format!("{} ({} bytes)", d.original_path, d.size),
                None => "none".into(),
            }
        )?;
        writeln!(out, "clock        {} (asynchronous events land at {})", m.clock, match m.clock {
            crate::clock::ClockKind::Exit => "guest-caused exits",
            _ => "any instruction (branch count + RIP)",
        })?;
        let guest_ns = rec
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Clock { value, .. } => Some(*value),
                Event::Timer { now_ns, .. } => Some(*now_ns),
                _ => None,
            })
            .max();
        let end = self.end_exits();
        match guest_ns {
            Some(ns) => writeln!(out, "duration     {:.3} s of guest time (last clock value the guest saw), {end} guest-caused exits", ns as f64 / 1e9)?,
            None => writeln!(out, "duration     {end} guest-caused exits (the guest never read the clock)")?,
        }
        let mut kinds: Vec<(&str, usize)> = Vec::new();
        for e in &rec.events {
            match kinds.iter_mut().find(|(k, _)| *k == e.kind()) {
                Some(k) => k.1 += 1,
                None => kinds.push((e.kind(), 1)),
            }
        }
        let serial_bytes: usize = rec.events.iter().map(|e| if let Event::Serial { bytes, .. } = e { bytes.len() } else { 0 }).sum();
        writeln!(
            out,
            "events       {}: {}{}",
            rec.events.len(),
            kinds.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "),
            if serial_bytes > 0 { format!(" ({serial_bytes} bytes of serial input)") } else { String::new() }
        )?;
        let cks: Vec<String> = rec.checkpoints.iter().map(|c| format!("#{} at exit {}", c.0, c.1)).collect();
        writeln!(
            out,
            "checkpoints  {}: {}{}",
            cks.len(),
            cks.join(", "),
            if m.checkpoint_every_ms > 0 { format!(" (every {} ms of host time)", m.checkpoint_every_ms) } else { String::new() }
        )?;
        // Integrity: the log's hash chain, the console digest, every checkpoint's CRC.
        match &rec.status {
            LogStatus::Complete => writeln!(out, "integrity    event log complete: {} chunks, SHA-256 hash chain verified", rec.chunks)?,
            LogStatus::Incomplete { reason, .. } => writeln!(
                out,
                "integrity    event log INCOMPLETE after {} verified chunks ({} events): {reason}",
                rec.chunks,
                rec.events.len()
            )?,
        }
        if let Some(Event::End { output_len, output_sha256, .. }) = rec.end() {
            let got = crate::trace::sha256_hex(&rec.console);
            if got == *output_sha256 && rec.console.len() as u64 == *output_len {
                writeln!(out, "             console.log matches the digest in the log ({output_len} bytes)")?;
            } else {
                writeln!(out, "             console.log does NOT match the digest in the log (edited or damaged)")?;
            }
        }
        let mut bad = Vec::new();
        for c in &rec.checkpoints {
            if let Err(e) = self.ckpts.header(c.0) {
                bad.push(format!("#{}: {e}", c.0));
            }
        }
        if bad.is_empty() {
            writeln!(out, "             checkpoint files: {} present, CRC-32 verified", rec.checkpoints.len())?;
        } else {
            writeln!(out, "             checkpoint files DAMAGED: {}", bad.join("; "))?;
        }
        match rec.end() {
            Some(Event::End { exits, reason, state_hash, output_len, .. }) => writeln!(
                out,
                "end          {} at exit {exits}; {output_len} console bytes; final state hash {}",
                end_reason(reason),
                &state_hash[..state_hash.len().min(16)]
            )?,
            _ => writeln!(out, "end          none recorded (cut short); replayable up to exit {end}")?,
        }
        Ok(())
    }

    fn cmd_seek(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let [p] = args else { return Err(usage(c)) };
        let p = parse::point(&p.text())?;
        self.seek(p)?;
        self.cmd_where(out)
    }

    fn cmd_regs(&mut self, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let v = self.view()?;
        let (r, s, msrs) = (v.regs()?, v.sregs()?, v.msrs()?);
        let syms = &self.syms;
        let lines = format::register_lines(&r, &s, &msrs, &|a| syms.describe(a));
        if args.is_empty() {
            for (_, l) in lines {
                writeln!(out, "{l}")?;
            }
            return Ok(());
        }
        for a in args {
            let want = a.text().trim_start_matches('$').to_ascii_lowercase();
            let want = match want.as_str() {
                "pc" => "rip".to_string(),
                "sp" => "rsp".to_string(),
                "eflags" => "rflags".to_string(),
                _ => want,
            };
            match lines.iter().find(|(n, _)| *n == want) {
                Some((_, l)) => writeln!(out, "{l}")?,
                None => return Err(Error::Usage(format!("unknown register '{want}'"))),
            }
        }
        Ok(())
    }

    fn cmd_info(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let Some(sub) = args.first() else { return Err(usage(c)) };
        let sub = sub.text();
        let is = |full: &str| !sub.is_empty() && full.starts_with(sub.as_str());
        if is("registers") || sub == "r" || is("all-registers") {
            self.cmd_regs(&args[1..], out)
        } else if is("checkpoints") {
            let list = self.rec.checkpoints.clone();
            writeln!(out, "{:>4}  {:>10}  {:>12}  {:>7}  {:>8}", "id", "exits", "clock (ns)", "pages", "sectors")?;
            for (id, exits, _) in list {
                let h = self.ckpts.header(id)?;
                let pages: u64 = h.pages.iter().map(|r| r.1).sum();
                let sectors: u64 = h.sectors.iter().map(|r| r.1).sum();
                let mark = if self.at_checkpoint() == Some(id) { "=>" } else { "  " };
                writeln!(out, "{mark}{id:>2}  {exits:>10}  {:>12}  {pages:>7}  {sectors:>8}", h.clock_ns())?;
            }
            Ok(())
        } else if is("symbol") {
            if args.len() < 2 {
                return Err(Error::Usage("usage: info symbol ADDR".into()));
            }
            let a = self.addr(&joined(&args[1..]))?;
            match self.syms.containing(a) {
                Some((s, off)) => writeln!(out, "{a:#x} is {} + {off:#x} (symbol at {:#x}, size {})", s.name, s.addr, s.size)?,
                None => writeln!(out, "no symbol matches {a:#x}")?,
            }
            Ok(())
        } else {
            Err(Error::Usage(format!("unknown info subcommand '{sub}': info registers | checkpoints | symbol ADDR")))
        }
    }

    /// Reads memory (virtual through the page tables, or physical); returns
    /// what was readable and the error that stopped it early.
    fn read_mem(&mut self, addr: u64, len: usize, physical: bool) -> Result<(Vec<u8>, Option<Error>), Error> {
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

    fn cmd_x(&mut self, c: &CommandInfo, fmt: Option<&str>, args: &[Word], physical: bool, out: &mut dyn Write) -> Result<(), Error> {
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

    fn disassemble(&mut self, addr: u64, n: usize, physical: bool, out: &mut dyn Write) -> Result<(), Error> {
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

    fn cmd_disas(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
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

    fn cmd_pagewalk(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
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

    fn cmd_events(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let next = self.next_event()?;
        let total = self.rec.events.len();
        let (from, to) = match args {
            [] => (next.saturating_sub(5), (next + 5).min(total)),
            [a] if a.text() == "all" => (0, total),
            [a] => {
                let n = parse::number(&a.text())? as usize;
                (next.saturating_sub(n), next.saturating_add(n).min(total))
            }
            _ => return Err(usage(c)),
        };
        writeln!(out, "events #{from}..#{} of {total} (at exit {}; => is the next to take effect)", to.saturating_sub(1), self.exits())?;
        for i in from..to {
            let e = &self.rec.events[i];
            let mark = if i == next { "=>" } else { "  " };
            writeln!(out, "{mark} #{i:<6} exit {:<10} {:<10} {e}", e.exits(), e.kind())?;
        }
        if next >= total {
            writeln!(out, "=> (no more events)")?;
        }
        Ok(())
    }

    fn cmd_find(&mut self, fmt: Option<&str>, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
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

    fn cmd_diff(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let (p, bytes) = match args {
            [p] => (p, false),
            [p, b] if b.text() == "bytes" => (p, true),
            _ => return Err(usage(c)),
        };
        let t = self.resolve(parse::point(&p.text())?)?;
        let other = self.frozen_at(t)?;
        let here = Frozen::of(self.view()?)?;
        let key = |exits: u64, exact: Option<ExecPoint>| (exits, exact.map(|p| p.branches + 1).unwrap_or(0));
        let label = |exits: u64, exact: Option<ExecPoint>| match exact {
            Some(p) => format!("{}:{}:{:#x}", p.exits, p.branches, p.rip),
            None => format!("exit {exits}"),
        };
        let (lo, hi) = ((t.exits, t.exact), (self.exits(), self.exact()));
        let ((a, la), (b, lb)) = if key(lo.0, lo.1) <= key(hi.0, hi.1) {
            ((&other, label(lo.0, lo.1)), (&here, label(hi.0, hi.1)))
        } else {
            ((&here, label(hi.0, hi.1)), (&other, label(lo.0, lo.1)))
        };
        writeln!(out, "diff {la} -> {lb} (earlier -> later)")?;
        let mut regs = Vec::new();
        for ((n, va), (_, vb)) in format::gprs(&a.regs).iter().zip(format::gprs(&b.regs).iter()) {
            regs.push((n.to_string(), *va, *vb));
        }
        for ((n, sa), (_, sb)) in format::segments(&a.sregs).iter().zip(format::segments(&b.sregs).iter()) {
            regs.push((n.to_string(), sa.selector as u64, sb.selector as u64));
            regs.push((format!("{n}.base"), sa.base, sb.base));
        }
        for (n, va, vb) in [
            ("cr0", a.sregs.cr0, b.sregs.cr0),
            ("cr2", a.sregs.cr2, b.sregs.cr2),
            ("cr3", a.sregs.cr3, b.sregs.cr3),
            ("cr4", a.sregs.cr4, b.sregs.cr4),
            ("cr8", a.sregs.cr8, b.sregs.cr8),
            ("efer", a.sregs.efer, b.sregs.efer),
            ("gdt.base", a.sregs.gdt.base, b.sregs.gdt.base),
            ("idt.base", a.sregs.idt.base, b.sregs.idt.base),
        ] {
            regs.push((n.to_string(), va, vb));
        }
        // The TSC MSR always moves; it says nothing about what the guest did.
        for &(i, va) in a.msrs.iter().filter(|m| m.0 != 0x10) {
            if let Some(&(_, vb)) = b.msrs.iter().find(|m| m.0 == i) {
                regs.push((format::msr_name(i).to_ascii_lowercase(), va, vb));
            }
        }
        let changed: Vec<_> = regs.into_iter().filter(|(_, x, y)| x != y).collect();
        if changed.is_empty() {
            writeln!(out, "registers: none differ")?;
        } else {
            writeln!(out, "registers that differ:")?;
            for (n, x, y) in changed {
                writeln!(out, "  {n:<15}{x:#018x} -> {y:#018x}")?;
            }
        }
        if a.memory.len() != b.memory.len() {
            return Err(Error::Msg("the two points have different memory sizes".into()));
        }
        let page = 4096usize;
        let pages: Vec<u64> = a
            .memory
            .chunks(page)
            .zip(b.memory.chunks(page))
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(i, _)| i as u64)
            .collect();
        let runs = crate::trace::checkpoint::runs(pages.iter().copied());
        writeln!(out, "memory: {} page{} differ ({} KiB)", pages.len(), if pages.len() == 1 { "" } else { "s" }, pages.len() * 4)?;
        for &(first, count) in &runs {
            let (start, end) = (first * page as u64, (first + count) * page as u64);
            let names: Vec<&str> = self
                .syms
                .all()
                .iter()
                .filter(|s| s.kind == 1 && s.addr < end && s.addr + s.size.max(1) > start)
                .map(|s| s.name.as_str())
                .take(4)
                .collect();
            writeln!(
                out,
                "  {start:#012x}..{end:#012x}  {count} page{}{}",
                if count == 1 { "" } else { "s" },
                if names.is_empty() { String::new() } else { format!("  ({})", names.join(", ")) }
            )?;
        }
        if bytes {
            let mut lines = 0usize;
            const MAX_LINES: usize = 400;
            'pages: for &p in &pages {
                let base = p as usize * page;
                let (x, y) = (&a.memory[base..base + page], &b.memory[base..base + page]);
                let mut i = 0;
                while i < page {
                    if x[i] == y[i] {
                        i += 1;
                        continue;
                    }
                    let mut j = i;
                    while j < page && j - i < 16 && x[j] != y[j] {
                        j += 1;
                    }
                    if lines >= MAX_LINES {
                        writeln!(out, "  ... (more byte differences; narrow it down with x/xp at both points)")?;
                        break 'pages;
                    }
                    writeln!(
                        out,
                        "  {:#012x}: {} -> {}",
                        base + i,
                        format::hex_bytes(&x[i..j]),
                        format::hex_bytes(&y[i..j])
                    )?;
                    lines += 1;
                    i = j;
                }
            }
        }
        Ok(())
    }

    fn cmd_dump(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
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

    fn cmd_console(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let n = match args {
            [] => 20,
            [n] => parse::number(&n.text())? as usize,
            _ => return Err(usage(c)),
        };
        let len = (self.view()?.output_len() as usize).min(self.rec.console.len());
        let text = String::from_utf8_lossy(&self.rec.console[..len]);
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        for l in &lines[lines.len().saturating_sub(n)..] {
            write!(out, "{l}")?;
        }
        if !text.is_empty() && !text.ends_with('\n') {
            writeln!(out)?;
        }
        writeln!(out, "({len} console bytes printed by exit {})", self.exits())?;
        Ok(())
    }

    fn cmd_symbols(&mut self, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let pat = args.first().map(Word::text).unwrap_or_default();
        let mut n = 0;
        for s in self.syms.all().iter().filter(|s| s.name.contains(&pat)) {
            let kind = match s.kind {
                1 => "object",
                2 => "func",
                _ => "",
            };
            writeln!(out, "{:#018x} {:>6} {kind:<6} {}", s.addr, s.size, s.name)?;
            n += 1;
        }
        if n == 0 {
            writeln!(out, "no symbols{}", if pat.is_empty() { String::new() } else { format!(" matching '{pat}'") })?;
        }
        Ok(())
    }

    fn cmd_set(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let [k, v] = args else { return Err(usage(c)) };
        match (k.text().as_str(), v.text().as_str()) {
            ("disassembly-flavor", "intel") => self.intel = true,
            ("disassembly-flavor", "att") => self.intel = false,
            ("progress", "on") => self.opts.progress = true,
            ("progress", "off") => self.opts.progress = false,
            _ => return Err(usage(c)),
        }
        writeln!(out, "{} = {}", k.text(), v.text())?;
        Ok(())
    }

    fn cmd_last_write(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let (a, len) = match args {
            [a] => (a, 8usize),
            [a, l] => (a, parse::number(&l.text())? as usize),
            _ => return Err(usage(c)),
        };
        if len == 0 || len > 4096 {
            return Err(Error::Usage("LEN must be 1..4096".into()));
        }
        let va = self.addr(&a.text())?;
        let r = self.last_write(va, len)?;
        let now = match self.exact() {
            Some(p) => point_str(&p),
            None => format!("exit {}", self.exits()),
        };
        writeln!(out, "last-write {va:#x} {} ({len} bytes, physical {:#x}) before {now}:", self.syms.describe(va), r.phys)?;
        writeln!(out, "  value now: {}", format::hex_bytes(&r.now))?;
        match &r.change {
            None => writeln!(
                out,
                "  unchanged since exit {} (the start of the recording): written before it (by the loader or before recording)",
                r.searched_from
            )?,
            Some(ch) => {
                match &ch.writer {
                    Some(w) => {
                        writeln!(out, "  written by the instruction at {:#x} {}: {}", w.at.rip, self.syms.describe(w.at.rip), w.insn)?;
                        writeln!(out, "    at {} (`seek` to it stands just before the write)", point_str(&w.at))?;
                    }
                    None => writeln!(out, "  (not refined to an instruction: {})", ch.why_not.as_deref().unwrap_or("-"))?,
                }
                let end = if r.within_here { "here".to_string() } else { format!("exit {}", ch.exits) };
                writeln!(out, "  last changed between exit {} and {end}", ch.exits - 1)?;
                writeln!(out, "    before: {}", format::hex_bytes(&ch.before))?;
                writeln!(out, "    after:  {}", format::hex_bytes(&ch.after))?;
                writeln!(out, "  rip at exit {}: {:#x} {}", ch.exits - 1, ch.rip_before, self.syms.describe(ch.rip_before))?;
                writeln!(out, "  rip at {end}: {:#x} {}", ch.rip_after, self.syms.describe(ch.rip_after))?;

            }
        }
        Ok(())
    }

    /// Finds the last exit interval, before the current point, in which the
    /// `len` bytes at virtual address `va` (translated here) changed.
    /// Whole checkpoint intervals whose dirty-page list does not include the
    /// page are skipped; the others are replayed one exit at a time.
    /// On the search engine unless `REVIRT_LASTWRITE_NATIVE=0` (`lastwrite`).
    pub fn last_write(&mut self, va: u64, len: usize) -> Result<LastWrite, Error> {
        if Self::last_write_native_on() {
            return self.last_write_native(va, len);
        }
        let pa = mmu::translate(self.view()?, va)?;
        if (pa & 0xFFF) as usize + len > 4096 {
            return Err(Error::Usage("the range must not cross a 4 KiB page".into()));
        }
        let mut now_val = vec![0u8; len];
        self.view()?.read_phys(pa, &mut now_val)?;
        let now = self.exits();
        // Inside an exit interval (after stepi): first the instructions since exit `now`.
        if let Some(p) = self.exact() {
            let (before, rip_before) = self.value_at(now, pa, len)?;
            if before != now_val {
                let (writer, why_not) = match self.refine_write(pa, len, now, Some(p)) {
                    Ok(w) => (w, None),
                    Err(Error::Interrupted { at }) => return Err(Error::Interrupted { at }),
                    Err(e) => (None, Some(e.to_string())),
                };
                let change = Change { exits: now + 1, before, after: now_val.clone(), rip_before, rip_after: p.rip, writer, why_not };
                return Ok(LastWrite { phys: pa, now: now_val, change: Some(change), searched_from: now, within_here: true });
            }
        }
        let page = pa / 4096;
        let cks = self.rec.checkpoints.clone();
        let start = cks[0].1;
        // Intervals [ck j, end) newest first; `end` is the next checkpoint or now.
        let mut intervals: Vec<(u32, u64, u64, bool)> = Vec::new();
        for (i, &(id, exits, _)) in cks.iter().enumerate() {
            if exits >= now {
                break;
            }
            let (end, full) = match cks.get(i + 1) {
                Some(&(_, e, _)) if e <= now => (e, true),
                _ => (now, false),
            };
            intervals.push((id, exits, end, full));
        }
        intervals.reverse();
        for (id, s, t, full) in intervals {
            if full {
                // The next checkpoint lists every page written in (s, t].
                let next_id = cks.iter().find(|c| c.1 == t).map(|c| c.0).expect("listed");
                let h = self.ckpts.header(next_id)?;
                if !h.pages.iter().any(|&(f, n)| page >= f && page < f + n) {
                    continue;
                }
            }
            if let Some(mut ch) = self.scan_interval(id, s, t, pa, len)? {
                match self.refine_write(pa, len, ch.exits - 1, None) {
                    Ok(Some(w)) => ch.writer = Some(w),
                    Ok(None) => ch.why_not = Some(format!("no single instruction changed it within {MAX_REFINE_STEPS} steps")),
                    Err(Error::Interrupted { at }) => return Err(Error::Interrupted { at }),
                    Err(e) => ch.why_not = Some(e.to_string()),
                }
                return Ok(LastWrite { phys: pa, now: now_val, change: Some(ch), searched_from: start, within_here: false });
            }
        }
        Ok(LastWrite { phys: pa, now: now_val, change: None, searched_from: start, within_here: false })
    }

    /// Replays (s, t] from checkpoint `id` one exit at a time; the last exit
    /// at which the bytes at `pa` differ from the exit before.
    fn scan_interval(&mut self, id: u32, s: u64, t: u64, pa: u64, len: usize) -> Result<Option<Change>, Error> {
        if self.opts.no_kvm {
            return Err(Error::Msg(format!(
                "the value changed between checkpoints at exits {s} and {t}; finding where needs replay through KVM (disabled by --no-kvm)"
            )));
        }
        self.kvm_used = true;
        let mut tl = crate::replay::Timeline::at_checkpoint(self.rec.clone(), id, crate::replay::Sink::Discard)?;
        let read = |tl: &crate::replay::Timeline| -> Result<(Vec<u8>, u64), Error> {
            let mut b = vec![0u8; len];
            tl.read_phys(pa, &mut b)?;
            Ok((b, tl.regs()?.rip))
        };
        let (mut prev, mut prev_rip) = read(&tl)?;
        let mut last = None;
        while tl.exits() < t {
            let next = tl.exits() + 1;
            match run_to(&mut tl, next, false)? {
                Ran::Reached => {}
                Ran::Finished(_) if tl.exits() == next => {}
                Ran::Finished(_) => break,
            }
            let (cur, rip) = read(&tl)?;
            if cur != prev {
                last = Some(Change {
                    exits: tl.exits(),
                    before: prev.clone(),
                    after: cur.clone(),
                    rip_before: prev_rip,
                    rip_after: rip,
                    writer: None,
                    why_not: None,
                });
            }
            prev = cur;
            prev_rip = rip;
            if interrupt::take() {
                return Err(Error::Interrupted { at: self.exits() });
            }
        }
        Ok(last)
    }

    /// The bytes at `pa` and RIP at exit `exits` (a scratch replay).
    fn value_at(&mut self, exits: u64, pa: u64, len: usize) -> Result<(Vec<u8>, u64), Error> {
        let t = super::Target { exits, ckpt: self.rec.checkpoints.iter().find(|c| c.1 == exits).map(|c| c.0), exact: None };
        let f = self.frozen_at(t)?;
        let mut b = vec![0u8; len];
        f.read_phys(pa, &mut b)?;
        Ok((b, f.regs.rip))
    }

    /// Single-steps from exit `from` until the bytes at `pa` change (or
    /// `limit`, or the next exit interval is passed): the instruction that
    /// wrote them, with the exact point just before it.
    pub fn refine_write(&mut self, pa: u64, len: usize, from: u64, limit: Option<ExecPoint>) -> Result<Option<Writer>, Error> {
        let mut tl = self.scratch_timeline(from)?;
        run_to(&mut tl, from, false)?;
        let read = |tl: &crate::replay::Timeline| -> Result<Vec<u8>, Error> {
            let mut b = vec![0u8; len];
            tl.read_phys(pa, &mut b)?;
            Ok(b)
        };
        let mut prev = read(&tl)?;
        let mut pos = tl.position()?;
        for _ in 0..MAX_REFINE_STEPS {
            if limit == Some(pos) {
                break;
            }
            if interrupt::take() {
                return Err(Error::Interrupted { at: self.exits() });
            }
            let done = match tl.step(1)? {
                Outcome::Reached => false,
                Outcome::Finished { .. } => true,
                Outcome::Diverged(why) => return Err(Error::Diverged { at: tl.exits(), why }),
                Outcome::EndOfRecording(d) | Outcome::NotReached(d) => return Err(Error::Msg(d)),
            };
            let cur = read(&tl)?;
            if cur != prev {
                let insn = disasm_one(&tl, pos.rip, self.intel).unwrap_or_else(|| "(unreadable)".into());
                return Ok(Some(Writer { at: pos, insn }));
            }
            prev = cur;
            let np = tl.position()?;
            if done || np.exits > from + 1 {
                break;
            }
            pos = np;
        }
        Ok(None)
    }
}

/// How many instructions `last-write` single-steps at most to find the writer.
pub const MAX_REFINE_STEPS: u64 = 2_000_000;

/// One instruction at `addr` as "bytes  text".
pub fn disasm_one(v: &dyn View, addr: u64, intel: bool) -> Option<String> {
    use capstone::prelude::*;
    let (bytes, _) = mmu::read_virt_partial(v, addr, 15);
    let syntax = if intel { arch::x86::ArchSyntax::Intel } else { arch::x86::ArchSyntax::Att };
    let cs = Capstone::new().x86().mode(arch::x86::ArchMode::Mode64).syntax(syntax).build().ok()?;
    let insns = cs.disasm_count(&bytes, addr, 1).ok()?;
    let i = insns.iter().next()?;
    Some(format!("{}  {} {}", format::hex_bytes(i.bytes()), i.mnemonic().unwrap_or("?"), i.op_str().unwrap_or("")).trim_end().to_string())
}

/// The instruction that wrote a value.
#[derive(Debug, Clone)]
pub struct Writer {
    /// The exact point just before the instruction ran.
    pub at: ExecPoint,
    pub insn: String,
}

/// The answer of `last-write`.
#[derive(Debug, Clone)]
pub struct LastWrite {
    pub phys: u64,
    pub now: Vec<u8>,
    /// None: the value has not changed since the first checkpoint.
    pub change: Option<Change>,
    pub searched_from: u64,
    /// The change lies between the last exit and the current (stepped-to) point.
    pub within_here: bool,
}

#[derive(Debug, Clone)]
pub struct Change {
    /// The value changed between exit `exits - 1` and exit `exits`.
    pub exits: u64,
    pub before: Vec<u8>,
    pub after: Vec<u8>,
    pub rip_before: u64,
    pub rip_after: u64,
    /// The instruction that wrote it (single-stepping), when found.
    pub writer: Option<Writer>,
    pub why_not: Option<String>,
}

fn end_reason(r: &EndReason) -> String {
    match r {
        EndReason::PowerOff(s) => format!("the guest powered off with status {s}"),
        EndReason::Panic(v) => format!("the guest crashed (exception vector {v})"),
        EndReason::Stopped => "the recorder stopped the guest".into(),
    }
}

fn size_name(size: u64) -> &'static str {
    match size {
        0x1000 => "4 KiB",
        0x20_0000 => "2 MiB",
        0x4000_0000 => "1 GiB",
        _ => "?",
    }
}

/// Whether `file` would land inside `dir` (both made absolute; symlinks in
/// existing parents resolved).
fn inside(file: &Path, dir: &Path) -> bool {
    let abs = |p: &Path| -> PathBuf {
        let p = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(p) };
        // Resolve the longest existing ancestor.
        let mut base = p.clone();
        let mut tail = Vec::new();
        while !base.exists() {
            match (base.file_name().map(|s| s.to_os_string()), base.parent()) {
                (Some(n), Some(parent)) => {
                    tail.push(n);
                    base = parent.to_path_buf();
                }
                _ => break,
            }
        }
        let mut r = base.canonicalize().unwrap_or(base);
        for t in tail.into_iter().rev() {
            r.push(t);
        }
        r
    };
    abs(file).starts_with(abs(dir))
}
