use std::path::PathBuf;

use revirt::migrate::dest::{self, Limits, Outcome, ReceiveOptions};
use revirt::migrate::proto::Psk;
use revirt::migrate::{Controller, Listener};
use revirt::trace::EndReason;
use revirt::vmm::{Console, Stop};

use super::{parse_duration, parse_size, EXIT_GUEST_CRASH};

#[derive(clap::Args)]
pub struct Args {
    /// Where to wait for the VM: HOST:PORT or unix:PATH. A non-loopback
    /// address needs --key-file (or --insecure).
    #[arg(long)]
    listen: String,
    /// Shared secret (at least 16 bytes, mode 600) that `revirt migrate
    /// --key-file` must also give: the channel is then authenticated and
    /// encrypted (docs/security.md).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Allow a plain channel (no key) on a non-loopback address.
    #[arg(long)]
    insecure: bool,
    /// Refuse a VM with more memory than this.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    max_mem: u64,
    /// Refuse frames larger than this.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    max_frame: u64,
    /// Refuse a streamed disk (or a recording file) larger than this.
    #[arg(long, default_value = "64G", value_parser = parse_size)]
    max_disk: u64,
    /// Refuse a source that sends more than this many copies of memory.
    #[arg(long, default_value_t = 64)]
    max_rounds: u32,
    /// Refuse a migration that takes longer than this to reach its final state.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    max_time: std::time::Duration,
    /// Continue the incoming VM's recording in this directory (required if it is being recorded).
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Disk for the VM: where a streamed disk (`migrate --copy-disk`) is written,
    /// or this host's path of the shared disk. Required when the VM has a
    /// disk that is not streamed: a path the source names is never opened.
    /// Without it a streamed disk goes to a new private file in the current
    /// directory (revirt-disk-XXXXXX.img, mode 600).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Accept `revirt migrate` for the received VM on this control socket.
    #[arg(long)]
    control: Option<PathBuf>,
}

pub fn main(a: Args) -> anyhow::Result<u8> {
    let key = a.key_file.as_deref().map(Psk::load).transpose().map_err(anyhow::Error::msg)?;
    revirt::migrate::check_reach(&a.listen, key.is_some(), a.insecure, "listen on")?;
    let max_frame = u32::try_from(a.max_frame)
        .ok()
        .filter(|f| (64 << 10..=revirt::migrate::proto::MAX_FRAME).contains(f))
        .ok_or_else(|| anyhow::anyhow!("--max-frame must be from 64K to {}M", revirt::migrate::proto::MAX_FRAME >> 20))?;
    let limits = Limits { max_mem: a.max_mem, max_frame, max_disk: a.max_disk, max_rounds: a.max_rounds.max(1), max_time: a.max_time };
    let listener = Listener::bind(&a.listen)?;
    eprintln!("revirt: waiting for a VM on {}", listener.local_addr());
    let control = a.control.as_deref().map(Controller::listen).transpose()?;
    let opts = ReceiveOptions {
        out: a.out.clone(),
        disk: a.disk.clone(),
        private_disk_dir: std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
        input: Box::new(std::io::stdin()),
        console: Console::Stdout,
        control,
        key,
        limits,
    };
    let r = dest::receive(&listener, opts)?;
    eprintln!(
        "revirt: received the VM from {} ({:.1} MiB); it ran here {:.3} ms after its final state arrived, {:.3} ms after the source's commit",
        r.from,
        r.bytes as f64 / (1 << 20) as f64,
        r.resume_ms,
        r.resume_after_commit_ms
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
