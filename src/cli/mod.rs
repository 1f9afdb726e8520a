//! Command-line front end. One file per subcommand; errors become anyhow
//! reports here and nowhere else.

mod debug;
mod doctor;
mod gdb;
mod inspect;
mod live;
mod migrate;
mod receive;
mod record;
mod replay;
mod run;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "revirt", version, about = "Forensic record/replay debugger for KVM virtual machines")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a guest image live: console on this terminal, exit status = the guest's.
    Run(run::Args),
    /// Run a guest live and record every non-deterministic input.
    Record(record::Args),
    /// Replay a recording exactly and check it matches.
    Replay(replay::Args),
    /// Check a recording's integrity without replaying it; print or check its digest.
    Verify(verify::Args),
    /// Check what this host's KVM supports and which replay clocks that allows.
    Doctor(doctor::Args),
    /// Examine a recording at any point: registers, memory, page tables, events (REPL or -c).
    Inspect(inspect::Args),
    /// Restore the state at a point of a recording and run on live from there.
    Live(live::Args),
    /// Serve a replay to GDB (remote protocol) with reverse execution.
    Gdb(gdb::Args),
    /// Replay under gdb in one step: the server on a free port and gdb with the image's symbols.
    Debug(debug::Args),
    /// Live-migrate a running VM (started with --control) to a `revirt receive`.
    Migrate(migrate::Args),
    /// Wait for a live-migrated VM and run it here (continuing its recording, if any).
    Receive(receive::Args),
}

/// How to build the VM: shared by the commands that boot an image.
#[derive(clap::Args)]
pub struct VmArgs {
    /// Disk image for the block device (raw, a multiple of 512 bytes). `run`
    /// writes it in place; `record` also keeps a copy as it was at the start.
    #[arg(long)]
    disk: Option<std::path::PathBuf>,
    /// Guest RAM, e.g. 64M or 1G (a multiple of 2 MiB).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    mem: u64,
    /// Kernel command line passed to the guest (the demo guest reads workload=NAME).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// The serial console on a TCP socket instead of stdin/stdout, like
    /// QEMU's `-serial tcp::PORT,server`: listen on HOST:PORT (empty HOST =
    /// 127.0.0.1; PORT 0 = any, printed) and wait for one connection before
    /// booting. Its bytes are the guest's serial input (recorded as such);
    /// the guest's output goes to it and to stdout.
    #[arg(long, value_name = "tcp:HOST:PORT", value_parser = parse_serial)]
    serial: Option<String>,
}

impl VmArgs {
    pub fn config(&self) -> revirt::vmm::VmConfig {
        revirt::vmm::VmConfig { mem_size: self.mem, cmdline: self.cmdline.clone(), disk: self.disk.clone() }
    }

    /// The serial line's two ends: stdin and stdout, or (`--serial tcp:...`)
    /// the first client of a socket, once it connects.
    pub fn serial(&self) -> anyhow::Result<(Box<dyn std::io::Read + Send>, revirt::vmm::Console)> {
        let Some(addr) = &self.serial else {
            return Ok((Box::new(std::io::stdin()), revirt::vmm::Console::Stdout));
        };
        let listener = std::net::TcpListener::bind(addr.as_str())
            .map_err(|e| anyhow::anyhow!("--serial: cannot listen on {addr}: {e}"))?;
        eprintln!(
            "revirt: serial console on tcp {}: waiting for a connection",
            listener.local_addr()?
        );
        let (stream, peer) = listener.accept()?;
        eprintln!("revirt: serial console connected from {peer}");
        let _ = stream.set_nodelay(true);
        let input = stream.try_clone()?;
        let console = revirt::vmm::Console::Socket {
            stream: std::sync::Arc::new(std::sync::Mutex::new(stream)),
            echo: true,
        };
        Ok((Box::new(input), console))
    }
}

/// `tcp:HOST:PORT` (HOST may be empty: 127.0.0.1) -> `HOST:PORT`.
fn parse_serial(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("tcp:")
        .ok_or_else(|| format!("'{s}': the serial backend must be tcp:HOST:PORT"))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("'{s}': expected tcp:HOST:PORT"))?;
    let port: u16 = port.parse().map_err(|_| format!("'{s}': bad port '{port}'"))?;
    let host = if host.is_empty() { "127.0.0.1" } else { host };
    Ok(format!("{host}:{port}"))
}

/// Exit status when revirt itself fails (bad image, KVM error, ...).
pub const EXIT_ERROR: u8 = 125;
/// Exit status when the guest crashed (exception, triple fault).
pub const EXIT_GUEST_CRASH: u8 = 124;

pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run::main(a),
        Cmd::Record(a) => record::main(a),
        Cmd::Replay(a) => replay::main(a),
        Cmd::Verify(a) => verify::main(a),
        Cmd::Doctor(a) => doctor::main(a),
        Cmd::Inspect(a) => inspect::main(a),
        Cmd::Live(a) => live::main(a),
        Cmd::Gdb(a) => gdb::main(a),
        Cmd::Debug(a) => debug::main(a),
        Cmd::Migrate(a) => migrate::main(a),
        Cmd::Receive(a) => receive::main(a),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("revirt: error: {e:#}");
            // A recording that fails its integrity check: exit 2 (as
            // `replay` of a cut-short one), not the generic error.
            let integrity = |r: &revirt::replay::ReplayError| matches!(r, revirt::replay::ReplayError::Integrity { .. });
            let damaged = e.chain().any(|c| {
                c.downcast_ref::<revirt::replay::ReplayError>().is_some_and(integrity)
                    || matches!(c.downcast_ref::<revirt::inspect::Error>(), Some(revirt::inspect::Error::Replay(r)) if integrity(r))
            });
            ExitCode::from(if damaged { 2 } else { EXIT_ERROR })
        }
    }
}

/// Parses sizes like `64M`, `1G`, `512m`, `67108864` (bytes when no unit; `M` default for small numbers).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown size unit '{c}' in '{s}' (use K, M or G)")),
            };
            (&t[..i], m)
        }
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (e.g. 64M, 1G)"))?;
    Ok(match mult {
        0 if n < 1 << 20 => n << 20, // a bare small number means MiB
        0 => n,
        m => n.checked_mul(m).ok_or_else(|| format!("size '{s}' is too large"))?,
    })
}

/// Parses durations like `1s`, `250ms`, `2m`, `0`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a duration (e.g. 1s, 250ms)"))?;
    match unit {
        "" if n == 0 => Ok(Duration::ZERO),
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("'{s}': use a unit: ms, s or m")),
    }
}
