use std::path::PathBuf;
use std::time::Duration;

use revirt::clock::ClockKind;
use revirt::record::{record, RecordOptions};
use revirt::trace::EndReason;

use super::{parse_duration, VmArgs, EXIT_GUEST_CRASH};

#[derive(clap::Args)]
pub struct Args {
    /// Guest image (ELF64, see docs/platform.md).
    image: PathBuf,
    #[command(flatten)]
    vm: VmArgs,
    /// Recording directory to create (default: recordings/<image>-<time>).
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Where asynchronous events may land: auto, exit, step, pmu, pmu-sim
    /// (see `revirt doctor`). auto = pmu when the host has one, else exit.
    #[arg(long, default_value = "exit", value_parser = parse_clock)]
    clock: ClockArg,
    /// Host time between incremental checkpoints, e.g. 1s, 250ms; 0 disables.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    checkpoint_every: Duration,
    /// Checkpoint retention: keep the newest N checkpoints, and older ones
    /// ever more sparsely (N per doubling of age, log-spaced); a dropped
    /// checkpoint is merged into the next kept one and logged in the hash
    /// chain. 0 keeps every checkpoint. See docs/recording-format.md.
    #[arg(long, default_value_t = revirt::record::DEFAULT_KEEP_CHECKPOINTS, value_name = "N")]
    keep_checkpoints: u32,
    /// Accept `revirt migrate PATH --to ...` on this Unix socket; the
    /// recording continues at the destination (`revirt receive -o DIR`).
    #[arg(long)]
    control: Option<PathBuf>,
}

#[derive(Clone, Copy)]
enum ClockArg {
    Auto,
    Kind(ClockKind),
}

fn parse_clock(s: &str) -> Result<ClockArg, String> {
    use clap::ValueEnum;
    if s == "auto" {
        return Ok(ClockArg::Auto);
    }
    ClockKind::from_str(s, true).map(ClockArg::Kind).map_err(|_| format!("unknown clock '{s}': auto, exit, step, pmu or pmu-sim"))
}

pub fn main(a: Args) -> anyhow::Result<u8> {
    let clock = match a.clock {
        ClockArg::Kind(c) => c,
        ClockArg::Auto => {
            let (c, why) = revirt::doctor::auto_clock();
            eprintln!("revirt: --clock auto: {c}: {why}");
            c
        }
    };
    let out = a.out.clone().unwrap_or_else(|| {
        let stem = a.image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "vm".into());
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        PathBuf::from("recordings").join(format!("{stem}-{t}"))
    });
    let opts = RecordOptions {
        image: a.image.clone(),
        config: a.vm.config(),
        out,
        clock,
        checkpoint_every: a.checkpoint_every,
        keep_checkpoints: a.keep_checkpoints,
        parent: None,
        control: a.control.as_deref().map(revirt::migrate::Controller::listen).transpose()?.map(|c| c as std::sync::Arc<dyn revirt::record::mover::Mover>),
        pmu_counter: None,
    };
    let (input, console) = a.vm.serial()?;
    let s = record(&opts, input, console)?;
    if let Some(m) = &s.migrated {
        super::migrate::print_summary(m);
        eprintln!(
            "revirt: {} holds the recording up to the move ({} events); the destination's copy goes on from there",
            s.dir.display(),
            s.events
        );
        return Ok(0);
    }
    eprintln!(
        "revirt: recorded {} in {:.2} s: {} exits, {} events ({} bytes of log), {} checkpoints ({} bytes), clock {}{}{}",
        s.dir.display(),
        s.wall.as_secs_f64(),
        s.exits,
        s.events,
        s.log_bytes,
        s.checkpoints,
        s.checkpoint_bytes,
        clock,
        if s.checkpoints_dropped > 0 {
            format!(
                "; retention kept {} checkpoints ({} bytes on disk), dropped {}",
                s.checkpoints - s.checkpoints_dropped,
                s.checkpoint_bytes_kept,
                s.checkpoints_dropped
            )
        } else {
            String::new()
        },
        if s.max_irq_delay > Duration::from_millis(10) {
            format!("; interrupts waited up to {} ms for an exit", s.max_irq_delay.as_millis())
        } else {
            String::new()
        }
    );
    if let Some((med, max, pages)) = s.checkpoint_pauses {
        eprintln!(
            "revirt: checkpoint pauses: median {:.3} ms, max {:.3} ms, median cpu {:.3} ms (median {pages} dirty pages copied; compressed and written on another thread); {} waited for the writer first (median {:.3} ms)",
            med.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            s.checkpoint_pause_cpu.as_secs_f64() * 1e3,
            s.checkpoint_waits.0,
            s.checkpoint_waits.1.as_secs_f64() * 1e3
        );
    }
    let (vcpu, pauses, ckpt) = s.thread_cpu;
    eprintln!(
        "revirt: cpu by thread: vCPU {:.1} ms ({:.1} ms of it in checkpoint pauses), checkpoint writer {:.1} ms",
        vcpu.as_secs_f64() * 1e3,
        pauses.as_secs_f64() * 1e3,
        ckpt.as_secs_f64() * 1e3
    );
    eprintln!("revirt: replay it with `revirt replay {}`", s.dir.display());
    Ok(match s.stop {
        EndReason::PowerOff(st) => st,
        EndReason::Panic(_) => EXIT_GUEST_CRASH,
        EndReason::Stopped => 0,
    })
}
