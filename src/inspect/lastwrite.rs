//! `last-write` on the search engine: the same search as gdb's `watch -l`
//! followed by `reverse-continue` (a write watchpoint on the range, the
//! guest running free from the latest checkpoint or snapshot before here,
//! the last change before here pinned down exactly), so it lands on the
//! same instruction at native speed. `REVIRT_LASTWRITE_NATIVE=0` keeps the older
//! path (replay one exit at a time, then single-step the interval).


use super::commands::{disasm_one, Change, LastWrite, Writer};
use super::{interrupt, mmu, Error, Session};
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
        let mut s = Search::open(self.rec.clone(), now).map_err(e)?;
        s.interrupted = Some(Box::new(interrupt::take));
        // Stand where the inspector stands (an exact point: step to it).
        if let Some(p) = exact {
            let mut n = 0u64;
            while s.tl.position()? != p {
                if s.pos().end
                    || n >= super::commands::MAX_REFINE_STEPS
                    || s.step().map_err(e)? == StopWhy::End
                {
                    return Err(Error::Msg(format!("cannot reach {p} from exit {now}")));
                }
                n += 1;
            }
        }
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
}
