//! gdb's `monitor origin LOCATION [--depth N] [--json]`: the query at the
//! stub's current point, with the location given the way gdb users write
//! it (`$rsp:8`, `$rbp-8:8`), translated through the current page tables.

use std::sync::Arc;
use std::time::Duration;

use super::input::Image;
use super::location::{register_index, regs_array, Location};
use super::origin::origin;
use super::tracer::translate;
use super::{Limits, Recording, Timeline, DEFAULT_DEPTH};

/// Evaluates `$reg`, numbers and `+`/`-` between them, with the registers of `tl`.
fn eval_addr(tl: &Timeline, s: &str) -> Result<u64, String> {
    let r = tl.machine.vcpu.regs().map_err(|e| e.to_string())?;
    let regs = regs_array(&r);
    let mut total: i128 = 0;
    let mut sign = 1i128;
    let mut term = String::new();
    let flush = |term: &mut String, sign: i128, total: &mut i128| -> Result<(), String> {
        let t = term.trim();
        if t.is_empty() {
            return Err(format!("bad address expression '{s}'"));
        }
        let v = if let Some(name) = t.strip_prefix('$') {
            if name == "rip" || name == "pc" {
                r.rip
            } else {
                regs[register_index(name).ok_or_else(|| format!("unknown register ${name}"))?]
            }
        } else if let Some(h) = t.strip_prefix("0x") {
            u64::from_str_radix(h, 16).map_err(|_| format!("'{t}' is not a number"))?
        } else {
            t.parse::<u64>()
                .map_err(|_| format!("'{t}' is not a number (0x hex or decimal, $reg)"))?
        };
        *total += sign * v as i128;
        term.clear();
        Ok(())
    };
    for c in s.chars() {
        match c {
            '+' | '-' => {
                flush(&mut term, sign, &mut total)?;
                sign = if c == '+' { 1 } else { -1 };
            }
            c => term.push(c),
        }
    }
    flush(&mut term, sign, &mut total)?;
    Ok(total as u64)
}

/// The location `$reg` or `ADDR[:LEN]` names at the timeline's point; the
/// message to print when it names none.
fn parse_location(tl: &Timeline, loc_s: &str) -> Result<Location, String> {
    if loc_s.starts_with('$') && !loc_s.contains([':', '+', '-']) {
        return match register_index(loc_s) {
            Some(reg) => Ok(Location::Register { reg }),
            None => Err(format!("origin follows the general registers ($rax..$r15), not {loc_s}")),
        };
    }
    let (a, len) = match loc_s.rsplit_once(':') {
        Some((a, l)) => (a, l.parse::<u64>().unwrap_or(0)),
        None => (loc_s, 8),
    };
    if len == 0 || len > 4096 {
        return Err("LEN must be 1..4096".into());
    }
    let va = eval_addr(tl, a)?;
    let Ok(s) = tl.machine.vcpu.sregs() else {
        return Err("error: cannot read the registers".into());
    };
    match translate(tl, &s, va) {
        Some(phys) if (phys & 0xfff) + len <= 4096 => Ok(Location::Memory { phys, len }),
        Some(_) => Err("the range must not cross a 4 KiB page".into()),
        None => Err(format!("cannot access memory at {va:#x}: not mapped")),
    }
}

/// `monitor origin LOCATION [--depth N] [--json]` at the stub's current point:
/// LOCATION is `$reg` or `ADDR[:LEN]` (ADDR: numbers and `$reg` with + and -,
/// virtual, through the current page tables). Returns the text to print.
pub fn monitor_origin(rec: &Arc<Recording>, tl: &Timeline, args: &[&str]) -> String {
    let usage = "usage: monitor origin LOCATION [--depth N] [--json]   (LOCATION: $reg, or ADDR[:LEN], e.g. $rsp:8)";
    let mut depth = DEFAULT_DEPTH;
    let mut json = false;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--json" => json = true,
            "--depth" => match it.next().and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => depth = n,
                _ => return usage.into(),
            },
            other => rest.push(other),
        }
    }
    let [loc_s] = rest.as_slice() else {
        return usage.into();
    };
    let at = match tl.position() {
        Ok(p) => p,
        Err(e) => return format!("error: {e}"),
    };
    let loc = match parse_location(tl, loc_s) {
        Ok(l) => l,
        Err(e) => return e,
    };
    let limits = Limits {
        max_depth: depth,
        max_time: Duration::from_secs(300),
        ..Limits::default()
    };
    match origin(rec, loc, at, &limits) {
        Ok(o) if json => serde_json::to_string_pretty(&o).unwrap_or_else(|e| format!("error: {e}")),
        Ok(o) => o.render(&Image::open(rec).symbols, 400),
        Err(e) => format!("error: {e}"),
    }
}
