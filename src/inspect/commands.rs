//! The inspector's commands (gdb's names where gdb has one). Each writes
//! its answer to `out`; bad input is an [`Error::Usage`], never a panic.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::format;
use super::parse::{self, Word};
use super::{interrupt, Error, Ran, Session};
use crate::trace::{EndReason, Event};

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

pub(super) fn usage(c: &CommandInfo) -> Error {
    Error::Usage(format!("usage: {} {}", c.name, c.args))
}

pub(super) fn joined(args: &[Word]) -> String {
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


    fn cmd_seek(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let [p] = args else { return Err(usage(c)) };
        let p = parse::point(&p.text())?;
        self.seek(p)?;
        self.cmd_where(out)
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





}







/// Whether `file` would land inside `dir` (both made absolute; symlinks in
/// existing parents resolved).
pub(super) fn inside(file: &Path, dir: &Path) -> bool {
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

pub(super) fn end_reason(r: &EndReason) -> String {
    match r {
        EndReason::PowerOff(s) => format!("the guest powered off with status {s}"),
        EndReason::Panic(v) => format!("the guest crashed (exception vector {v})"),
        EndReason::Stopped => "the recorder stopped the guest".into(),
    }
}

pub(super) fn size_name(size: u64) -> &'static str {
    match size {
        0x1000 => "4 KiB",
        0x20_0000 => "2 MiB",
        0x4000_0000 => "1 GiB",
        _ => "?",
    }
}
