use std::path::PathBuf;
use std::sync::Arc;

use revirt::clock::{ClockKind, ExecPoint};
use revirt::replay::{Outcome, Recording, Sink, Timeline};

/// `N` (an exit count) or `N:B:RIP` (exits, branches, RIP in hex or decimal).
pub fn parse_point(s: &str) -> Result<ExecPoint, String> {
    let num = |t: &str| -> Result<u64, String> {
        let t = t.trim();
        match t.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => t.parse(),
        }
        .map_err(|_| format!("'{t}' is not a number"))
    };
    let parts: Vec<&str> = s.split(':').collect();
    match parts.as_slice() {
        [e] => Ok(ExecPoint { exits: num(e)?, branches: 0, rip: u64::MAX }),
        [e, b, r] => Ok(ExecPoint { exits: num(e)?, branches: num(b)?, rip: num(r)? }),
        _ => Err(format!("'{s}': expected EXITS or EXITS:BRANCHES:RIP")),
    }
}
use revirt::trace::LogStatus;

#[derive(clap::Args)]
pub struct Args {
    /// Work on a recording that fails its integrity check (damaged
    /// evidence): say what is damaged, then go on.
    #[arg(long)]
    force: bool,
    /// Recording directory (made by `revirt record`).
    recording: PathBuf,
    /// Stop at this point instead of running to the end: EXITS, or
    /// EXITS:BRANCHES:RIP for an exact instruction (as `revirt` prints them).
    /// Replay always verifies what it passes; the final state only at the end.
    #[arg(long, value_parser = parse_point)]
    to: Option<ExecPoint>,
    /// Start from this checkpoint instead of the start (default: the nearest one before --to, else 0).
    #[arg(long)]
    from_checkpoint: Option<u32>,
    /// Do not print the guest's console output.
    #[arg(short, long)]
    quiet: bool,
    /// How to reach precisely timed events (step- or PMU-clock recordings):
    /// `step` steps straight to each; `pmu-sim` lands with the PMU algorithm
    /// over the simulated counter. Default: as recorded (a `pmu` recording on a
    /// host without a PMU replays with `step`).
    #[arg(long, value_enum)]
    clock: Option<ClockKind>,
    /// Landing margin in branches for `--clock pmu-sim`.
    #[arg(long, default_value_t = 100)]
    margin: u64,
    /// Largest simulated overflow skid in branches for `--clock pmu-sim`.
    #[arg(long, default_value_t = 80)]
    skid: u64,
    /// Seed of the simulated skids.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Exit statuses: 0 replay matched, 1 diverged or mismatched, 2 the recording is incomplete.
pub fn main(a: Args) -> anyhow::Result<u8> {
    // A seek checks what it uses (the recording's seek index, the log from
    // its checkpoint to past the target); a replay to the end checks all.
    let rec = Arc::new(match a.to {
        Some(to) => Recording::open_for_seek(&a.recording, a.force, a.from_checkpoint, to.exits)?,
        None => Recording::open_checked(&a.recording, a.force)?,
    });
    warn_status(&rec);
    if rec.checkpoints.is_empty() {
        eprintln!(
            "revirt: nothing to replay: the {} log stops before checkpoint 0 is usable",
            if rec.status.is_damaged() { "damaged" } else { "cut-short" }
        );
        return Ok(2);
    }
    let ck = a.from_checkpoint.unwrap_or_else(|| a.to.map(|t| Timeline::nearest_checkpoint(&rec, t.exits)).unwrap_or(0));
    let sink = if a.quiet { Sink::Discard } else { Sink::Stdout };
    let mut tl = match Timeline::at_checkpoint(rec.clone(), ck, sink) {
        Ok(t) => t,
        // A seek checks the checkpoints as it restores them: one that fails
        // is damage, told as the full check tells it.
        Err(e) if rec.seek_checked => {
            Recording::open_checked(&a.recording, false)?;
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    use_clock(&a, &mut tl)?;
    if ck != 0 {
        eprintln!("revirt: starting from checkpoint {ck} (exit {})", tl.exits());
    }
    let outcome = match a.to {
        None => tl.run(None)?,
        Some(p) if p.rip == u64::MAX => tl.run(Some(p.exits))?,
        Some(p) => match tl.run(Some(p.exits))? {
            Outcome::Reached => tl.seek_point(p)?,
            other => other,
        },
    };
    report(&rec, &tl, outcome)
}

/// What the integrity check found, and whether the log is cut short or damaged.
fn warn_status(rec: &Recording) {
    if let Some(line) = &rec.integrity {
        eprintln!("revirt: {line}");
    }
    match &rec.status {
        LogStatus::Incomplete { reason, damaged: true } => eprintln!(
            "revirt: warning: the event log is DAMAGED (not cut short): {reason}; replaying the {} events before the damage",
            rec.events.len()
        ),
        LogStatus::Incomplete { reason, .. } => {
            eprintln!("revirt: warning: recording is incomplete: {reason}; replaying what it holds ({} events)", rec.events.len())
        }
        LogStatus::Complete => {}
    }
}

/// Installs the clock that lands on the recording's events: `--clock`, or
/// the recorded one (the step clock where a PMU recording meets no usable
/// hardware counter); refuses a clock that cannot replay this recording.
fn use_clock(a: &Args, tl: &mut Timeline) -> anyhow::Result<()> {
    let recorded = tl.rec.meta.clock;
    // The hardware counter must open and count the start-up probe guest
    // exactly (the same check as `record --clock pmu`).
    let pmu_check = || revirt::clock::probe::check(&revirt::clock::pmu::hardware_opener());
    let clock = a.clock.unwrap_or(match recorded {
        // The hardware counter where there is a usable one, else the step clock.
        ClockKind::Pmu if pmu_check().is_ok() => ClockKind::Pmu,
        ClockKind::Pmu => ClockKind::Step,
        c => c,
    });
    match (recorded, clock) {
        (ClockKind::Exit, c) if c != ClockKind::Exit => {
            anyhow::bail!("an exit-clock recording has no instruction-precise events; replay it with its own clock")
        }
        (r, ClockKind::Exit) if r != ClockKind::Exit => {
            anyhow::bail!("a {r}-clock recording needs a precise clock to replay: step or pmu-sim")
        }
        (_, ClockKind::Pmu) => {
            if a.clock == Some(ClockKind::Pmu) {
                if let Err(e) = pmu_check() {
                    anyhow::bail!(
                        "clock 'pmu' unavailable for replay: {e}. Use --clock pmu-sim (the same landing over the simulated counter) or step"
                    );
                }
            }
            tl.use_pmu(None)?;
            eprintln!("revirt: landing on events with the hardware PMU (margin {})", tl.landing().map(|l| l.margin).unwrap_or(0));
        }
        (_, ClockKind::PmuSim) => {
            eprintln!("revirt: landing on events with the PMU algorithm over the simulated counter (margin {}, skid up to {}, seed {})", a.margin, a.skid, a.seed);
            tl.use_simulated_pmu(a.margin, a.skid, a.seed)?;
        }
        _ => {}
    }
    Ok(())
}

/// How the replay ended, said on stderr, as the exit status.
fn report(rec: &Recording, tl: &Timeline, outcome: Outcome) -> anyhow::Result<u8> {
    Ok(match outcome {
        Outcome::Reached => {
            let p = tl.position()?;
            eprintln!("revirt: reached {p} (event #{})", tl.next_event());
            0
        }
        Outcome::Finished { problems, state_hash, stop } if problems.is_empty() => {
            eprintln!(
                "revirt: replay matches the recording: {} events, {} exits, {stop:?}, final state hash {state_hash}",
                rec.events_base + rec.events.len(),
                tl.exits()
            );
            0
        }
        Outcome::Finished { problems, .. } => {
            for p in &problems {
                eprintln!("revirt: MISMATCH: {p}");
            }
            1
        }
        Outcome::Diverged(d) => {
            eprintln!("revirt: DIVERGED at exit {}: {d}", tl.exits());
            1
        }
        Outcome::NotReached(d) => {
            eprintln!("revirt: {d}");
            1
        }
        Outcome::EndOfRecording(d) if rec.status.is_damaged() => {
            eprintln!("revirt: recording damaged: {d}");
            2
        }
        Outcome::EndOfRecording(d) => {
            eprintln!("revirt: recording incomplete: {d}");
            2
        }
    })
}
