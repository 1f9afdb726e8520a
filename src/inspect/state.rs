//! Commands that describe the machine and the recording: `summary`,
//! `regs`, `info`, `events`, `diff`, `console`, `symbols`.

use std::io::Write;

use super::commands::{end_reason, joined, usage, CommandInfo};
use super::format;
use super::parse::{self, Word};
use super::{Error, Frozen, Session};
use crate::clock::ExecPoint;
use crate::trace::{Event, LogStatus};

const PAGE: usize = 4096;

/// Registers (general, segments, control, MSRs) whose values differ
/// between `a` and `b`: (name, value in a, value in b).
fn register_diffs(a: &Frozen, b: &Frozen) -> Vec<(String, u64, u64)> {
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
    regs.into_iter().filter(|(_, x, y)| x != y).collect()
}

/// `diff bytes`: the changed bytes of the changed `pages`, 16 a line, at
/// most 400 lines.
fn write_byte_diffs(a: &Frozen, b: &Frozen, pages: &[u64], out: &mut dyn Write) -> Result<(), Error> {
    let mut lines = 0usize;
    const MAX_LINES: usize = 400;
    for &p in pages {
        let base = p as usize * PAGE;
        let (x, y) = (&a.memory[base..base + PAGE], &b.memory[base..base + PAGE]);
        let mut i = 0;
        while i < PAGE {
            if x[i] == y[i] {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < PAGE && j - i < 16 && x[j] != y[j] {
                j += 1;
            }
            if lines >= MAX_LINES {
                writeln!(out, "  ... (more byte differences; narrow it down with x/xp at both points)")?;
                return Ok(());
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
    Ok(())
}

impl Session {
    pub(super) fn cmd_summary(&mut self, out: &mut dyn Write) -> Result<(), Error> {
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

    pub(super) fn cmd_regs(&mut self, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
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

    pub(super) fn cmd_info(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
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

    pub(super) fn cmd_events(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
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

    pub(super) fn cmd_diff(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let (p, bytes) = match args {
            [p] => (p, false),
            [p, b] if b.text() == "bytes" => (p, true),
            _ => return Err(usage(c)),
        };
        let t = self.resolve(parse::point(&p.text())?)?;
        let other = self.frozen_at(t)?;
        let here = super::view::freeze(self.view()?)?;
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
        let changed = register_diffs(a, b);
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
        let pages: Vec<u64> = a
            .memory
            .chunks(PAGE)
            .zip(b.memory.chunks(PAGE))
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(i, _)| i as u64)
            .collect();
        self.write_page_runs(&pages, out)?;
        if bytes {
            write_byte_diffs(a, b, &pages, out)?;
        }
        Ok(())
    }

    /// The runs of pages that differ, each with the first few symbols in it
    /// (what a reader recognises: "the heap", "task 2's stack").
    fn write_page_runs(&self, pages: &[u64], out: &mut dyn Write) -> Result<(), Error> {
        let runs = crate::trace::checkpoint::runs(pages.iter().copied());
        writeln!(out, "memory: {} page{} differ ({} KiB)", pages.len(), if pages.len() == 1 { "" } else { "s" }, pages.len() * 4)?;
        for &(first, count) in &runs {
            let (start, end) = (first * PAGE as u64, (first + count) * PAGE as u64);
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
        Ok(())
    }

    pub(super) fn cmd_console(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
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

    pub(super) fn cmd_symbols(&mut self, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
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
}
