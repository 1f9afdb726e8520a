use std::path::PathBuf;

use anyhow::{bail, Context};
use revirt::migrate::dest::{run_live_until, LiveEnd};
use revirt::trace::Snapshot;
use revirt::vmm::{Image, LiveHost, Machine, Stop};

use super::{VmArgs, EXIT_GUEST_CRASH};

#[derive(clap::Args)]
pub struct Args {
    /// Guest image (ELF64, see docs/platform.md). Not needed with --restore.
    #[arg(required_unless_present = "restore")]
    image: Option<PathBuf>,
    #[command(flatten)]
    vm: VmArgs,
    /// Pause after this many guest-caused exits and write a snapshot to --save.
    #[arg(long, requires = "save")]
    pause_at: Option<u64>,
    /// Snapshot file written when --pause-at is reached.
    #[arg(long, requires = "pause_at")]
    save: Option<PathBuf>,
    /// Resume a snapshot written by --save instead of booting an image.
    #[arg(long, conflicts_with_all = ["image", "disk", "cmdline"])]
    restore: Option<PathBuf>,
    /// Accept `revirt migrate PATH --to ...` on this Unix socket (live migration).
    #[arg(long)]
    control: Option<PathBuf>,
}

pub fn main(a: Args) -> anyhow::Result<u8> {
    let (mut machine, clock_start) = match &a.restore {
        Some(path) => {
            let snap = Snapshot::read(path)?;
            let clock = snap.state.clock_ns;
            let m = Machine::restore(&snap.state, &snap.memory)
                .with_context(|| format!("restoring {}", path.display()))?;
            (m, clock)
        }
        None => {
            let image_path = a.image.as_ref().expect("clap requires image");
            let image = Image::load_file(image_path)?;
            let config = a.vm.config();
            (Machine::boot(&config, &image)?, 0)
        }
    };
    let (input, console) = a.vm.serial()?;
    let mut host = LiveHost::new(input, console, clock_start);
    let control = a.control.as_deref().map(revirt::migrate::Controller::listen).transpose()?;
    let stop = match run_live_until(&mut machine, &mut host, control.as_deref(), a.pause_at)? {
        LiveEnd::Stopped(s) => s,
        LiveEnd::Migrated(s) => {
            super::migrate::print_summary(&s);
            return Ok(0);
        }
    };
    match stop {
        Stop::PowerOff(status) => Ok(status),
        Stop::Panic(p) => {
            eprintln!("revirt: {p}");
            Ok(EXIT_GUEST_CRASH)
        }
        Stop::Paused => {
            let Some(path) = &a.save else { bail!("paused without a snapshot path") };
            use revirt::vmm::Host;
            let clock = host.now_ns();
            let state = machine.save_state(clock)?;
            let memory = machine.memory_bytes()?;
            Snapshot { state, memory }.write(path)?;
            eprintln!(
                "revirt: paused after {} exits; snapshot written to {} (resume with `revirt run --restore {}`)",
                machine.exits,
                path.display(),
                path.display()
            );
            Ok(0)
        }
    }
}
