//! `history` by single-stepping: every access to a byte range between two
//! points. The native path (replay::history) is checked against this one,
//! and falls back to it where hardware watching cannot work.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::super::symbols::Symbols;
use super::drive::{exit_point, trace_span, Budget};
use super::input::{disk_bytes, Input};
use super::render::{hex, insn_text, point_short};
use super::tracer::Step;
use super::{Limits, ProvError, Recording, ReplayError, R};
use crate::clock::ExecPoint;

/// One access to the watched range.
#[derive(Debug, Clone, Serialize)]
pub struct Touch {
    /// The point just before the instruction.
    pub at: ExecPoint,
    pub insn: String,
    pub ring: u8,
    pub rsp: u64,
    pub write: bool,
    pub read: bool,
    /// The part of the range it touched (physical) and the bytes there before and after.
    pub phys: u64,
    pub before: Vec<u8>,
    pub after: Vec<u8>,
    /// A DMA write or port read: where the bytes came from.
    pub input: Option<Input>,
}

/// What a `history` query watches: physical `phys..phys+len` from exit
/// `from` to point `to`, for writes, and with `reads` for reads too.
#[derive(Debug, Clone, Copy)]
pub struct Watched {
    pub phys: u64,
    pub len: u64,
    pub from: u64,
    pub to: ExecPoint,
    pub reads: bool,
    /// `to` is the boundary of exit `to.exits`, its RIP not known yet: the
    /// query finds it on the way (no replay just to learn it).
    pub to_rip_unknown: bool,
}

impl Watched {
    /// This query with `to` made exact (a replay to its exit boundary).
    pub fn resolved(&self, rec: &Arc<Recording>) -> R<Watched> {
        if !self.to_rip_unknown {
            return Ok(*self);
        }
        Ok(Watched { to: exit_point(rec, self.to.exits)?, to_rip_unknown: false, ..*self })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct History {
    pub phys: u64,
    pub len: u64,
    pub from: u64,
    pub to: ExecPoint,
    pub touches: Vec<Touch>,
    /// Exit ranges skipped because the checkpoints' dirty-page lists show the range untouched there.
    pub skipped: Vec<(u64, u64)>,
    pub steps: u64,
    pub stopped: Option<String>,
    pub millis: u64,
    /// Found natively: the accesses the engine counted and in how many
    /// exit intervals (each then single-stepped from its start to its last hit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native: Option<(u64, u64)>,
}

impl History {
    /// What a query over `q` found, and what it cost since `started`.
    pub(crate) fn found(q: &Watched, touches: Vec<Touch>, budget: &Budget, stopped: Option<String>, started: Instant) -> History {
        History {
            phys: q.phys,
            len: q.len,
            from: q.from,
            to: q.to,
            touches,
            skipped: Vec::new(),
            steps: budget.steps,
            stopped,
            millis: started.elapsed().as_millis() as u64,
            native: None,
        }
    }
}

/// The accesses of one executed instruction to physical `phys..phys+len`
/// (writes, and reads when `reads`), appended to `out`.
pub(crate) fn touches_of(st: &Step, phys: u64, len: u64, reads: bool, out: &mut Vec<Touch>) {
    for a in &st.mem {
        if !(a.write || reads && a.read) {
            continue;
        }
        let n = a.before.len().max(a.after.len()) as u64;
        let lo = a.pa.max(phys);
        let hi = (a.pa + n).min(phys + len);
        if lo >= hi {
            continue;
        }
        let (i, j) = ((lo - a.pa) as usize, (hi - a.pa) as usize);
        let input = match (&st.dma, &st.input) {
            (Some(d), _) => Some(disk_bytes(d.lba, d.addr, lo, hi - lo)),
            (None, i) => i.clone(),
        };
        out.push(Touch {
            at: st.at,
            insn: insn_text(&st.bytes, st.at.rip),
            ring: st.ring,
            rsp: st.before[4],
            write: a.write,
            read: a.read,
            phys: lo,
            before: a.before.get(i..j).map(<[u8]>::to_vec).unwrap_or_default(),
            after: if a.write {
                a.after.get(i..j).map(<[u8]>::to_vec).unwrap_or_default()
            } else {
                Vec::new()
            },
            input,
        });
    }
}

/// Every write (and with `reads` every read) of the watched range, found
/// at native speed by the search engine (`replay::history`); by
/// single-stepping ([`history_stepping`], the oracle) when
/// `REVIRT_HISTORY_NATIVE=0` or when the watched page turns out to hold
/// running code.
pub fn history(rec: &Arc<Recording>, q: &Watched, limits: &Limits) -> R<History> {
    if std::env::var("REVIRT_HISTORY_NATIVE").is_ok_and(|v| v == "0" || v == "off") {
        return history_stepping(rec, &q.resolved(rec)?, limits);
    }
    match crate::replay::history::history_native(rec, q, limits) {
        Err(ProvError::Replay(ReplayError::Machine(crate::vmm::MachineError::WatchedCode { .. })))
        | Err(ProvError::Machine(crate::vmm::MachineError::WatchedCode { .. })) => {
            history_stepping(rec, &q.resolved(rec)?, limits)
        }
        r => r,
    }
}

/// The checkpoint intervals inside exits `from..to` whose dirty-page lists
/// leave out pages `first..=last`: nothing wrote there (DMA pages are in
/// those lists too).
fn untouched_intervals(rec: &Recording, first: u64, last: u64, from: u64, to: u64) -> R<Vec<(u64, u64)>> {
    let mut skipped = Vec::new();
    for win in rec.checkpoints.windows(2) {
        let (a, b) = (win[0].1, win[1].1);
        if a < from || b > to {
            continue;
        }
        let ck = rec.seals.read(&rec.dir, win[1].0).map_err(ReplayError::from)?;
        let touched = ck
            .header
            .pages
            .iter()
            .any(|&(f, n)| first < f + n && last >= f);
        if !touched {
            skipped.push((a, b));
        }
    }
    Ok(skipped)
}

/// The exit spans `spans` minus the intervals `skipped`.
fn without(mut spans: Vec<(u64, u64)>, skipped: &[(u64, u64)]) -> Vec<(u64, u64)> {
    for &(a, b) in skipped {
        let mut next = Vec::new();
        for (s, e) in spans {
            if b <= s || a >= e {
                next.push((s, e));
                continue;
            }
            if s < a {
                next.push((s, a));
            }
            if b < e {
                next.push((b, e));
            }
        }
        spans = next;
    }
    spans
}

/// [`history`] by single-stepping every instruction of the span (the
/// oracle the native path is tested against). Checkpoint intervals whose
/// dirty page lists leave out the range's pages are skipped when only
/// writes are wanted.
pub fn history_stepping(rec: &Arc<Recording>, q: &Watched, limits: &Limits) -> R<History> {
    let started = Instant::now();
    let q = &q.resolved(rec)?;
    let Watched { phys, len, from, to, reads, .. } = *q;
    let first = phys / 4096;
    let last = (phys + len.max(1) - 1) / 4096;
    let skipped = if reads {
        Vec::new()
    } else {
        untouched_intervals(rec, first, last, from, to.exits)?
    };
    let spans = without(vec![(from, to.exits)], &skipped);
    let mut budget = Budget::new(limits);
    let mut touches = Vec::new();
    let mut stopped = None;
    let nspans = spans.len();
    for (k, (s, e)) in spans.into_iter().enumerate() {
        let end = if k + 1 == nspans && e == to.exits {
            to
        } else {
            exit_point(rec, e)?
        };
        let mut each = |st: Step| touches_of(&st, phys, len, reads, &mut touches);
        if let Some(why) = trace_span(rec, s, end, &mut budget, &mut each, &mut |_| Ok(()))? {
            stopped = Some(format!("stopped at exit {}: {why}", s));
            break;
        }
    }
    budget.done();
    Ok(History {
        skipped,
        ..History::found(q, touches, &budget, stopped, started)
    })
}

impl History {
    pub fn render(&self, syms: &Symbols) -> String {
        let mut s = format!(
            "history of {} bytes at physical {:#x} {} from exit {} to {}: {} access(es)\n",
            self.len,
            self.phys,
            syms.describe(self.phys),
            self.from,
            point_short(&self.to),
            self.touches.len()
        );
        for t in &self.touches {
            let kind = match (t.read, t.write) {
                (true, true) => "rw",
                (false, true) => "w ",
                _ => "r ",
            };
            let stack = if t.ring == 0 {
                "ring 0".to_string()
            } else {
                format!("stack {}", syms.describe(t.rsp & !0xfff))
            };
            let vals = if t.write {
                format!("{} -> {}", hex(&t.before), hex(&t.after))
            } else {
                hex(&t.before)
            };
            s.push_str(&format!(
                "  {kind} {:<16} +{:<3} {vals:<28} {} {} [{stack}]{}\n",
                point_short(&t.at),
                t.phys - self.phys,
                t.insn,
                syms.describe(t.at.rip),
                t.input
                    .as_ref()
                    .map(|i| format!(" = {i}"))
                    .unwrap_or_default()
            ));
        }
        for (a, b) in &self.skipped {
            s.push_str(&format!("  (exits {a}..{b} skipped: the checkpoint's dirty-page list leaves the range out)\n"));
        }
        if let Some(w) = &self.stopped {
            s.push_str(&format!("  {w}\n"));
        }
        match self.native {
            Some((hits, intervals)) => s.push_str(&format!(
                "(native speed: {hits} access(es) to the range found in {intervals} exit interval(s); {} instructions single-stepped to pin them down, {} ms)\n",
                self.steps, self.millis
            )),
            None => s.push_str(&format!(
                "({} instructions single-stepped, {} ms)\n",
                self.steps, self.millis
            )),
        }
        s
    }
}
