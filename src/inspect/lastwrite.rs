//! `last-write` on the search engine: the same search as gdb's `watch -l`
//! followed by `reverse-continue` (a write watchpoint on the range, the
//! guest running free from the latest checkpoint or snapshot before here,
//! the last change before here pinned down exactly), so it lands on the
//! same instruction at native speed. At an exit boundary the search takes
//! over the inspector's own replay (no second VM replaying to here).
//! `REVIRT_LASTWRITE_NATIVE=0` keeps the older path (replay one exit at a
//! time, then single-step the interval).


use std::io::Write;

use super::commands::{usage, CommandInfo};
use super::format;
use super::parse::{self, Word};
use super::{interrupt, mmu, point_str, run_to, Error, Ran, Session, View};
use crate::clock::ExecPoint;
use crate::replay::Outcome;
use crate::replay::session::{Session as Search, SessionError, StopWhy, Watch, WatchKind};

fn search_err(e: SessionError, at: u64) -> Error {
    match e {
        SessionError::Replay(r) => Error::Replay(r),
        SessionError::Diverged(why) => Error::Diverged { at, why },
        SessionError::Lost(m) => Error::Msg(m),
    }
}

impl Session {
    /// Whether `last-write` uses the search engine (default) or the older path.
    pub(super) fn last_write_native_on() -> bool {
        !std::env::var("REVIRT_LASTWRITE_NATIVE").is_ok_and(|v| v == "0" || v == "off")
    }

    /// [`Session::last_write`] on the search engine (see the module doc).
    pub(super) fn last_write_native(&mut self, va: u64, len: usize) -> Result<LastWrite, Error> {
        let pa = mmu::translate(self.view()?, va)?;
        if (pa & 0xFFF) as usize + len > 4096 {
            return Err(Error::Usage("the range must not cross a 4 KiB page".into()));
        }
        let mut now_val = vec![0u8; len];
        self.view()?.read_phys(pa, &mut now_val)?;
        if self.opts.no_kvm {
            return Err(Error::Msg(
                "finding the last write replays the recording through KVM (disabled by --no-kvm)"
                    .into(),
            ));
        }
        self.kvm_used = true;
        let now = self.exits();
        let exact = self.exact();
        let start = self.rec.checkpoints[0].1;
        let e = |err| search_err(err, now);
        let mut s = self.search_here(now, exact)?;
        s.watches.push(Watch {
            addr: va,
            len: len as u64,
            kind: WatchKind::Write,
        });
        let why = s.reverse_cont().map_err(e)?;
        match why {
            StopWhy::Watch { .. } => {}
            StopWhy::Interrupted => return Err(Error::Interrupted { at: s.pos().exits }),
            _ => {
                return Ok(LastWrite {
                    phys: pa,
                    now: now_val,
                    change: None,
                    searched_from: start,
                    within_here: false,
                })
            }
        }
        // Just before the writing instruction: its exact point (branch count).
        s.make_exact().map_err(e)?;
        let at = s.pos().point;
        let view_rip = |s: &Search| s.tl.regs().map(|r| r.rip).unwrap_or(0);
        let read = |s: &Search| {
            let mut b = vec![0u8; len];
            let _ = s.tl.read_phys(pa, &mut b);
            b
        };
        let insn = disasm_one(&s.tl, at.rip, self.intel).unwrap_or_else(|| "(unreadable)".into());
        let writer = Some(Writer { at, insn });
        let within_here = exact.is_some() && at.exits == now;
        let change = if within_here {
            s.goto_exit(now).map_err(e)?;
            Change {
                exits: now + 1,
                before: read(&s),
                after: now_val.clone(),
                rip_before: view_rip(&s),
                rip_after: exact.map_or(0, |p| p.rip),
                writer,
                why_not: None,
            }
        } else {
            // The exit interval it lies in, as the older path reports it.
            s.goto_exit(at.exits).map_err(e)?;
            let (before, rip_before) = (read(&s), view_rip(&s));
            s.goto_exit(at.exits + 1).map_err(e)?;
            let (after, rip_after) = (read(&s), view_rip(&s));
            Change {
                exits: at.exits + 1,
                before,
                after,
                rip_before,
                rip_after,
                writer,
                why_not: None,
            }
        };
        Ok(LastWrite {
            phys: pa,
            now: now_val,
            change: Some(change),
            searched_from: start,
            within_here,
        })
    }

    /// A search engine standing exactly where the inspector stands (exit
    /// `now`, or the exact point `exact` inside its interval).
    fn search_here(&mut self, now: u64, exact: Option<ExecPoint>) -> Result<Search, Error> {
        let e = |err| search_err(err, now);
        let mut s = match exact {
            // At an exit boundary: the search takes over the inspector's own
            // replay standing there (re-created on demand afterwards).
            None => {
                let tl = self.take_timeline()?;
                let end = (self.tl_state == super::TlState::Finished).then(|| "the guest stopped".to_string());
                Search::from_timeline(self.rec.clone(), tl, end).map_err(e)?
            }
            Some(_) => Search::open(self.rec.clone(), now).map_err(e)?,
        };
        s.interrupted = Some(Box::new(interrupt::take));
        // Stand where the inspector stands (an exact point: step to it).
        if let Some(p) = exact {
            let mut n = 0u64;
            while s.tl.position()? != p {
                if s.pos().end
                    || n >= MAX_REFINE_STEPS
                    || s.step().map_err(e)? == StopWhy::End
                {
                    return Err(Error::Msg(format!("cannot reach {p} from exit {now}")));
                }
                n += 1;
            }
        }
        Ok(s)
    }
}

// ---- the stepping path (REVIRT_LASTWRITE_NATIVE=0) and what both report ----

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

impl Session {
    pub(super) fn cmd_last_write(&mut self, c: &CommandInfo, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        let (a, len) = match args {
            [a] => (a, 8usize),
            [a, l] => (a, parse::number(&l.text())? as usize),
            _ => return Err(usage(c)),
        };
        if len == 0 || len > 4096 {
            return Err(Error::Usage("LEN must be 1..4096".into()));
        }
        let va = self.addr(&a.text())?;
        // Positioned first: the time printed is the search's alone.
        self.view()?;
        let t0 = std::time::Instant::now();
        let r = self.last_write(va, len)?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
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
        writeln!(out, "  searched in {ms:.0} ms")?;
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
    pub(super) fn scan_interval(&mut self, id: u32, s: u64, t: u64, pa: u64, len: usize) -> Result<Option<Change>, Error> {
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
    pub(super) fn value_at(&mut self, exits: u64, pa: u64, len: usize) -> Result<(Vec<u8>, u64), Error> {
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
