use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use revirt::inspect::live::{record_live, run_live, StoppableStdin};
use revirt::replay::live::LiveEnd;
use revirt::inspect::{interrupt, parse, Error, Options, Session};
use revirt::trace::EndReason;
use revirt::vmm::Console;

use super::{parse_duration, EXIT_GUEST_CRASH};

#[derive(clap::Args)]
pub struct Args {
    /// Work on a recording that fails its integrity check (damaged
    /// evidence): say what is damaged, then go on.
    #[arg(long)]
    force: bool,
    /// Recording directory (made by `revirt record`).
    recording: PathBuf,
    /// Where to go live: exit:N, ckpt:K, event:I (just before event I takes effect), start.
    #[arg(long)]
    at: String,
    /// Record the live continuation as a new recording in this directory (it starts at POINT).
    #[arg(long)]
    record: Option<PathBuf>,
    /// With --record: host time between incremental checkpoints, e.g. 1s, 250ms; 0 disables.
    #[arg(long, default_value = "1s", value_parser = parse_duration, requires = "record")]
    checkpoint_every: Duration,
    /// Do not print what the guest had printed before POINT.
    #[arg(short, long)]
    quiet: bool,
}

/// Exit status = the guest's (124 = it crashed, 130 = stopped with Ctrl-C).
pub fn main(a: Args) -> anyhow::Result<u8> {
    let mut s = Session::open(&a.recording, Options { no_kvm: false, progress: true, force: a.force })?;
    interrupt::install();
    let p = parse::point(&a.at)?;
    match s.seek(p) {
        Ok(_) => {}
        Err(Error::Interrupted { at }) => {
            eprintln!("revirt: interrupted while replaying (at exit {at})");
            return Ok(130);
        }
        Err(e) => return Err(e).with_context(|| format!("--at {}", a.at)),
    }
    if s.exits() == s.end_exits() && s.rec.end().is_some() {
        bail!("--at {}: that is the end of the recording, where the guest had already stopped; choose an earlier point", a.at);
    }
    let next = s.next_event()?;
    let clock = s.clock_ns()?;
    if !a.quiet {
        let len = (s.view()?.output_len() as usize).min(s.rec.console.len());
        let mut o = std::io::stdout().lock();
        o.write_all(&s.rec.console[..len])?;
        o.flush()?;
    }
    eprintln!(
        "revirt: live from exit {} (next recorded event was #{next}), guest clock {clock} ns; {} is not changed",
        s.exits(),
        a.recording.display()
    );
    let input = Box::new(StoppableStdin::new(Arc::new(AtomicBool::new(false))));
    match a.record {
        None => Ok(match run_live(&mut s, input, Console::Stdout)? {
            LiveEnd::PowerOff(st) => st,
            LiveEnd::Panic(p) => {
                eprintln!("revirt: {p}");
                EXIT_GUEST_CRASH
            }
            LiveEnd::Interrupted { exits } => {
                eprintln!("revirt: stopped with Ctrl-C at exit {exits}");
                130
            }
        }),
        Some(dir) => {
            // The recorder handles its own stopping: Ctrl-C kills as for `revirt record`.
            interrupt::restore_default();
            let sum = record_live(&mut s, dir, a.checkpoint_every, input, Console::Stdout)?;
            eprintln!(
                "revirt: recorded the live run in {}: {} exits ({} from the start), {} events, {} checkpoints; replay it with `revirt replay {}`",
                sum.dir.display(),
                sum.exits,
                sum.exits - s.exits(),
                sum.events,
                sum.checkpoints,
                sum.dir.display()
            );
            Ok(match sum.stop {
                EndReason::PowerOff(st) => st,
                EndReason::Panic(_) => EXIT_GUEST_CRASH,
                EndReason::Stopped => 0,
            })
        }
    }
}
