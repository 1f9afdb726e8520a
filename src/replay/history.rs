//! `history` on the search engine: every write (and read) of a physical
//! range between two points, found at native speed instead of by stepping
//! every instruction (docs/provenance.md).
//!
//! Pass 1 replays the span with the range watched (`vmm::watch`: its page
//! read-only, or without a slot for reads), every access to it counted per
//! exit interval (`replay::search`), and a DMA write into it counted for
//! the interval whose `out` started it. Pass 2 replays again at full speed
//! to each interval that had accesses and single-steps it with the
//! provenance tracer from its start to its last access, so every access is
//! pinned down exactly (the point before the instruction, with the branch
//! count, the instruction, old and new bytes) the same way the stepping
//! oracle ([`super::provenance::history_stepping`]) finds it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::provenance::{run_to_exit, timeline_at, touches_of, Budget, History, Limits, ProvError, Tracer, Watched};
use super::search::{Scan, ScanStop, WATCH};
use super::{Outcome, Recording};
use crate::clock::ExecPoint;
use crate::vmm::watch::{WatchSpec, WriteReport, DMA};

type R<T> = Result<T, ProvError>;

/// Exits replayed per native run of pass 1 (Ctrl-C and the time limit are
/// checked between runs; the hits of one run are kept in memory).
const CHUNK_EXITS: u64 = 4096;
/// Most hits one chunk may hold.
const MAX_CHUNK_HITS: usize = 1 << 22;

/// Pass 1: accesses to the range per exit interval in `from..=to.exits`
/// (a DMA write counts for the interval of the `out` that started it);
/// with `find_to`, also the point at exit boundary `to.exits` (the run
/// pauses there once).
fn count_hits(
    rec: &Arc<Recording>,
    spec: WatchSpec,
    from: u64,
    to: ExecPoint,
    find_to: bool,
    limits: &Limits,
) -> R<(BTreeMap<u64, u64>, Option<ExecPoint>)> {
    let key = WATCH | spec.start;
    let mut tl = timeline_at(rec, from, false)?;
    let started = Instant::now();
    let mut need: BTreeMap<u64, u64> = BTreeMap::new();
    let end = to.exits + 1;
    let mut found = None;
    loop {
        let at = tl.exits();
        if find_to && found.is_none() && at == to.exits {
            found = Some(tl.position()?);
        }
        if at >= end {
            break;
        }
        let mut limit = at.saturating_add(CHUNK_EXITS).min(end);
        if find_to && found.is_none() && at < to.exits {
            limit = limit.min(to.exits);
        }
        let scan = Scan::new([key].into(), ScanStop::Never, at, &[]).keep_last(MAX_CHUNK_HITS);
        let (o, scan) = tl.run_scan_specs(scan, vec![spec], Some(limit))?;
        if scan.total > scan.hits.len() as u64 {
            return Err(ProvError::Msg(format!(
                "more than {MAX_CHUNK_HITS} accesses to the range in exits {at}..{limit}: narrow the span"
            )));
        }
        for h in &scan.hits {
            let e = if h.dma {
                h.point.exits.saturating_sub(1)
            } else {
                h.point.exits
            };
            if e >= from && e <= to.exits {
                *need.entry(e).or_insert(0) += 1;
            }
        }
        match o {
            Outcome::Reached => {}
            Outcome::Finished { .. } => {
                if find_to && found.is_none() && tl.exits() == to.exits {
                    found = Some(tl.position()?);
                }
                break;
            }
            Outcome::Diverged(why) => {
                return Err(ProvError::Diverged {
                    at: tl.exits(),
                    why,
                })
            }
            Outcome::EndOfRecording(d) | Outcome::NotReached(d) => {
                // A cut-short recording vouches for no more: up to `to` is enough.
                if tl.exits() >= to.exits {
                    break;
                }
                return Err(ProvError::Msg(d));
            }
        }
        if (limits.interrupted)() {
            return Err(ProvError::Interrupted { at: tl.exits() });
        }
        if started.elapsed() >= limits.max_time {
            return Err(ProvError::Msg(format!(
                "the time limit ({:.0} s) ran out at exit {} while finding the accesses",
                limits.max_time.as_secs_f64(),
                tl.exits()
            )));
        }
    }
    Ok((need, found))
}

/// [`super::provenance::history`] at native speed (see the module doc).
pub fn history_native(rec: &Arc<Recording>, q: &Watched, limits: &Limits) -> R<History> {
    let started = Instant::now();
    let Watched { phys, len, from, reads, .. } = *q;
    if phys & DMA != 0 || len == 0 {
        return Err(ProvError::Msg(format!("bad range {phys:#x}+{len}")));
    }
    let spec = WatchSpec {
        start: phys,
        len,
        reads,
        writes: WriteReport::Any,
    };
    let (need, found) = count_hits(rec, spec, from, q.to, q.to_rip_unknown, limits)?;
    // TO as pass 1 found it (or, if the recording ended before, a replay to it).
    let q = &match found {
        Some(p) => Watched { to: p, to_rip_unknown: false, ..*q },
        None => q.resolved(rec)?,
    };
    let to = q.to;
    let hits: u64 = need.values().sum();
    let mut budget = Budget::new(limits);
    let mut touches = Vec::new();
    let mut stopped = None;
    let mut tl = match need.keys().next() {
        Some(&e) => Some(timeline_at(rec, e, false)?),
        None => None,
    };
    'intervals: for (&e, &k) in &need {
        let Some(tl) = tl.as_mut() else { break };
        run_to_exit(tl, e, false)?;
        // Step from the interval's start (exact branch counts) to its last access.
        let mut t = Tracer::new(tl);
        let mut seen = 0u64;
        while seen < k {
            let here = t.tl.position()?;
            if here == to || t.finished || here.exits > e {
                break;
            }
            if let Some(why) = budget.exhausted() {
                stopped = Some(format!("stopped at exit {e}: {why}"));
                break 'intervals;
            }
            let st = t.step()?;
            budget.tick(st.at.exits)?;
            let before = touches.len();
            touches_of(&st, phys, len, reads, &mut touches);
            if touches.len() > before {
                seen += 1;
            }
        }
        if to.exits == e && t.tl.position()? == to {
            break;
        }
    }
    budget.done();
    Ok(History {
        native: Some((hits, need.len() as u64)),
        ..History::found(q, touches, &budget, stopped, started)
    })
}
