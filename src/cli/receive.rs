use std::path::PathBuf;

use revirt::migrate::dest::{self, Outcome, ReceiveOptions};
use revirt::migrate::{Controller, Listener};
use revirt::trace::EndReason;
use revirt::vmm::{Console, Stop};

use super::EXIT_GUEST_CRASH;

#[derive(clap::Args)]
pub struct Args {
    /// Where to wait for the VM: HOST:PORT (e.g. 0.0.0.0:4444) or unix:PATH.
    #[arg(long)]
    listen: String,
    /// Continue the incoming VM's recording in this directory (required if it is being recorded).
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Disk for the VM: where a streamed disk (`migrate --copy-disk`) is written,
    /// or this host's path of the shared disk (default: the source's path).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Accept `revirt migrate` for the received VM on this control socket.
    #[arg(long)]
    control: Option<PathBuf>,
}

pub fn main(a: Args) -> anyhow::Result<u8> {
    let listener = Listener::bind(&a.listen)?;
    eprintln!("revirt: waiting for a VM on {}", listener.local_addr());
    let control = a.control.as_deref().map(Controller::listen).transpose()?;
    let opts = ReceiveOptions {
        out: a.out.clone(),
        disk: a.disk.clone(),
        input: Box::new(std::io::stdin()),
        console: Console::Stdout,
        control,
    };
    let r = dest::receive(&listener, opts)?;
    eprintln!(
        "revirt: received the VM from {} ({:.1} MiB); it ran here {:.1} ms after its final state arrived",
        r.from,
        r.bytes as f64 / (1 << 20) as f64,
        r.resume_ms
    );
    Ok(match r.outcome {
        Outcome::Stopped(Stop::PowerOff(s)) => s,
        Outcome::Stopped(Stop::Panic(p)) => {
            eprintln!("revirt: {p}");
            EXIT_GUEST_CRASH
        }
        Outcome::Stopped(Stop::Paused) => 0,
        Outcome::MovedOn(s) => {
            super::migrate::print_summary(&s);
            0
        }
        Outcome::Recorded(s) => {
            if let Some(m) = &s.migrated {
                super::migrate::print_summary(m);
                return Ok(0);
            }
            eprintln!(
                "revirt: recording {} continued here: {} exits, {} events in all, {} checkpoints; replay it with `revirt replay {}`",
                s.dir.display(),
                s.exits,
                s.events,
                s.checkpoints,
                s.dir.display()
            );
            match s.stop {
                EndReason::PowerOff(st) => st,
                EndReason::Panic(_) => EXIT_GUEST_CRASH,
                EndReason::Stopped => 0,
            }
        }
    })
}
