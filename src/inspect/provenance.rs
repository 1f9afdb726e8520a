//! `origin` and `history` in the inspector: parse the arguments, resolve
//! them at the session's point, call the replay-level queries
//! ([`crate::replay::provenance`]) and print their tree or list (or JSON).

use std::io::Write;

use super::mmu;
use super::parse::{self, Word};
use super::{interrupt, Error, Session};
use crate::clock::ExecPoint;
use crate::replay::provenance::{self as prov, Limits, Location, ProvError};

fn usage(s: &str) -> Error {
    Error::Usage(s.to_string())
}

pub const ORIGIN_USAGE: &str = "usage: origin LOCATION [at POINT] [--depth N] [--time S] [--json]   (LOCATION: $reg, or ADDR[:LEN] with LEN default 8)";
pub const HISTORY_USAGE: &str = "usage: history ADDR LEN [FROM [TO]] [--reads] [--time S] [--json]   (FROM default start, TO default here)";

impl From<ProvError> for Error {
    fn from(e: ProvError) -> Self {
        match e {
            ProvError::Replay(r) => Error::Replay(r),
            ProvError::Machine(m) => Error::Replay(m.into()),
            ProvError::Diverged { at, why } => Error::Diverged { at, why },
            ProvError::Interrupted { at } => Error::Interrupted { at },
            ProvError::Msg(m) => Error::Msg(m),
        }
    }
}

/// Splits `--flag` / `--key VALUE` options from the words.
struct Opts {
    json: bool,
    reads: bool,
    depth: Option<usize>,
    /// Time limit in seconds.
    time: Option<u64>,
    rest: Vec<String>,
}

fn options(args: &[Word]) -> Result<Opts, Error> {
    let mut o = Opts {
        json: false,
        reads: false,
        depth: None,
        time: None,
        rest: Vec::new(),
    };
    let mut it = args.iter().map(Word::text);
    while let Some(w) = it.next() {
        match w.as_str() {
            "--json" => o.json = true,
            "--reads" => o.reads = true,
            "--depth" => {
                let n = it.next().ok_or_else(|| usage("--depth needs a number"))?;
                let n = parse::number(&n)? as usize;
                if n == 0 {
                    return Err(usage("--depth must be at least 1"));
                }
                o.depth = Some(n);
            }
            "--time" => {
                let n = it
                    .next()
                    .ok_or_else(|| usage("--time needs a number of seconds"))?;
                o.time = Some(parse::number(&n)?);
            }
            _ if w.starts_with("--") => return Err(Error::Usage(format!("unknown option {w}"))),
            _ => o.rest.push(w),
        }
    }
    Ok(o)
}

impl Session {
    /// The exact point the session stands at (an exit boundary is that exit, 0 branches, RIP there).
    fn here_point(&mut self) -> Result<ExecPoint, Error> {
        if let Some(p) = self.exact() {
            return Ok(p);
        }
        let exits = self.exits();
        let rip = self.view()?.regs()?.rip;
        Ok(ExecPoint {
            exits,
            branches: 0,
            rip,
        })
    }

    fn limits_for(&self, depth: Option<usize>) -> (usize, bool) {
        (depth.unwrap_or(prov::DEFAULT_DEPTH), self.opts.progress)
    }

    /// Guest virtual `va..va+len` as one physical range (an error when it is
    /// not contiguous in physical memory).
    fn phys_range(&mut self, va: u64, len: u64) -> Result<u64, Error> {
        let pa = mmu::translate(self.view()?, va)?;
        let mut a = va;
        while a < va + len {
            let next = ((a >> 12) + 1) << 12;
            if next < va + len {
                let p = mmu::translate(self.view()?, next)?;
                if p != pa + (next - va) {
                    return Err(Error::Msg(format!(
                        "{va:#x}..{:#x} is not contiguous in physical memory; ask for each page",
                        va + len
                    )));
                }
            }
            a = next;
        }
        Ok(pa)
    }

    pub(super) fn cmd_origin(&mut self, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        if self.opts.no_kvm {
            return Err(Error::Msg("origin replays and single-steps the recording: it needs KVM (disabled by --no-kvm)".into()));
        }
        let o = options(args)?;
        let (loc_s, at) = match o.rest.as_slice() {
            [l] => (l.clone(), None),
            [l, kw, p] if kw == "at" => (l.clone(), Some(p.clone())),
            _ => return Err(usage(ORIGIN_USAGE)),
        };
        if let Some(p) = at {
            self.seek(parse::point(&p)?)?;
        }
        let at = self.here_point()?;
        let is_reg = loc_s.starts_with('$') && !loc_s.contains([':', '+', '-']);
        let loc = if is_reg {
            let reg = prov::register_index(&loc_s).ok_or_else(|| {
                Error::Usage(format!(
                    "origin follows the general registers ($rax..$r15), not {loc_s}"
                ))
            })?;
            Location::Register { reg }
        } else {
            let (a, len) = match loc_s.rsplit_once(':') {
                Some((a, l)) => (a.to_string(), parse::number(l)?),
                None => (loc_s.clone(), 8),
            };
            if len == 0 || len > 4096 {
                return Err(usage("LEN must be 1..4096"));
            }
            let va = self.addr(&a)?;
            Location::Memory {
                phys: self.phys_range(va, len)?,
                len,
            }
        };
        let (max_depth, progress) = self.limits_for(o.depth);
        let take = || interrupt::take();
        let mut limits = Limits {
            max_depth,
            progress,
            interrupted: &take,
            ..Limits::default()
        };
        if let Some(t) = o.time {
            limits.max_time = std::time::Duration::from_secs(t);
        }
        self.kvm_used = true;
        let r = prov::origin(&self.rec, loc, at, &limits)?;
        if o.json {
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&r).map_err(|e| Error::Msg(e.to_string()))?
            )?;
        } else {
            write!(out, "{}", r.render(&self.syms, 400))?;
        }
        Ok(())
    }

    pub(super) fn cmd_history(&mut self, args: &[Word], out: &mut dyn Write) -> Result<(), Error> {
        if self.opts.no_kvm {
            return Err(Error::Msg("history replays and single-steps the recording: it needs KVM (disabled by --no-kvm)".into()));
        }
        let o = options(args)?;
        let (a, l, from, to) = match o.rest.as_slice() {
            [a, l] => (a, l, None, None),
            [a, l, f] => (a, l, Some(f), None),
            [a, l, f, t] => (a, l, Some(f), Some(t)),
            _ => return Err(usage(HISTORY_USAGE)),
        };
        let len = parse::number(l)?;
        if len == 0 || len > 4096 {
            return Err(usage("LEN must be 1..4096"));
        }
        let va = self.addr(a)?;
        let phys = self.phys_range(va, len)?;
        let start = self.rec.checkpoints[0].1;
        let from = match from {
            Some(f) => {
                let t = self.resolve(parse::point(f)?)?;
                if t.exact.is_some() {
                    return Err(usage(
                        "FROM is an exit count (exit:N, ckpt:K, event:I, start)",
                    ));
                }
                t.exits
            }
            None => start,
        };
        // An exit boundary's RIP is found by the query on its way there.
        let (to, to_rip_unknown) = match to {
            Some(t) => {
                let t = self.resolve(parse::point(t)?)?;
                match t.exact {
                    Some(p) => (p, false),
                    None => (ExecPoint { exits: t.exits, branches: 0, rip: 0 }, true),
                }
            }
            None => (self.here_point()?, false),
        };
        if from > to.exits {
            return Err(Error::Usage(format!(
                "FROM (exit {from}) is after TO (exit {})",
                to.exits
            )));
        }
        let take = || interrupt::take();
        let mut limits = Limits {
            progress: self.opts.progress,
            interrupted: &take,
            ..Limits::default()
        };
        if let Some(t) = o.time {
            limits.max_time = std::time::Duration::from_secs(t);
        }
        self.kvm_used = true;
        let q = prov::Watched {
            phys,
            len,
            from,
            to,
            reads: o.reads,
            to_rip_unknown,
        };
        let h = prov::history(&self.rec, &q, &limits)?;
        if o.json {
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&h).map_err(|e| Error::Msg(e.to_string()))?
            )?;
        } else {
            write!(out, "{}", h.render(&self.syms))?;
        }
        Ok(())
    }
}
