use std::path::PathBuf;
use std::sync::Arc;

use revirt::replay::{Outcome, Recording, Sink, Timeline};
use revirt::trace::LogStatus;

#[derive(clap::Args)]
pub struct Args {
    /// Recording directory (made by `revirt record`).
    recording: PathBuf,
    /// Stop at this many guest-caused exits instead of running to the end.
    #[arg(long)]
    to: Option<u64>,
    /// Start from this checkpoint instead of the start (default: the nearest one before --to, else 0).
    #[arg(long)]
    from_checkpoint: Option<u32>,
    /// Do not print the guest's console output.
    #[arg(short, long)]
    quiet: bool,
}

/// Exit statuses: 0 replay matched, 1 diverged or mismatched, 2 the recording is incomplete.
pub fn main(a: Args) -> anyhow::Result<u8> {
    let rec = Arc::new(Recording::open(&a.recording)?);
    if let LogStatus::Incomplete { reason } = &rec.status {
        eprintln!("revirt: warning: recording is incomplete: {reason}; replaying what it holds ({} events)", rec.events.len());
    }
    let ck = a.from_checkpoint.unwrap_or_else(|| a.to.map(|t| Timeline::nearest_checkpoint(&rec, t)).unwrap_or(0));
    let sink = if a.quiet { Sink::Discard } else { Sink::Stdout };
    let mut tl = Timeline::at_checkpoint(rec.clone(), ck, sink)?;
    if ck != 0 {
        eprintln!("revirt: starting from checkpoint {ck} (exit {})", tl.exits());
    }
    let outcome = tl.run(a.to)?;
    Ok(match outcome {
        Outcome::Reached => {
            eprintln!("revirt: reached exit {} (event #{})", tl.exits(), tl.host.next);
            0
        }
        Outcome::Finished { problems, state_hash, stop } if problems.is_empty() => {
            eprintln!(
                "revirt: replay matches the recording: {} events, {} exits, {stop:?}, final state hash {state_hash}",
                rec.events.len(),
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
        Outcome::EndOfRecording(d) => {
            eprintln!("revirt: recording incomplete: {d}");
            2
        }
    })
}
