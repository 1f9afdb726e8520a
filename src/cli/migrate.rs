use std::path::PathBuf;
use std::time::Duration;

use revirt::migrate::source::Compress;
use revirt::migrate::proto::Psk;
use revirt::migrate::{self, MigrateRequest, Summary};

use super::{parse_duration, parse_size};

#[derive(clap::Args)]
pub struct Args {
    /// The running VM's control socket (`revirt run|record ... --control PATH`).
    control: PathBuf,
    /// Destination where `revirt receive` listens: HOST:PORT or unix:PATH.
    #[arg(long)]
    to: String,
    /// Stream the disk to the destination too (default: it opens the same path, shared storage).
    #[arg(long)]
    copy_disk: bool,
    /// Cap on bytes per second on the wire, e.g. 100M.
    #[arg(long, value_parser = parse_size)]
    bandwidth: Option<u64>,
    /// Stop the guest for the final copy once that is predicted to take at most this long.
    #[arg(long, default_value = "30ms", value_parser = parse_duration)]
    max_downtime: Duration,
    /// Stop the guest after this many pre-copy rounds whatever remains.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Do not throttle a guest that dirties memory faster than the link carries it.
    #[arg(long)]
    no_auto_converge: bool,
    /// Page compression: auto (zstd while the link is the bottleneck), always, never.
    #[arg(long, value_enum, default_value = "auto")]
    compress: Compress,
    /// Shared secret the receiver also loads (`revirt receive --key-file`):
    /// authenticated, encrypted channel.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Allow a plain channel (no key) to a non-loopback address.
    #[arg(long)]
    insecure: bool,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn print_summary(s: &Summary) {
    eprintln!(
        "revirt: migrated to {} in {:.0} ms: downtime {:.1} ms, {} rounds, {} pages ({} in the stop-and-copy), {:.1} MiB on the wire{}{}",
        s.to,
        s.total_ms,
        s.downtime_ms,
        s.rounds,
        s.pages,
        s.final_pages,
        s.bytes as f64 / (1 << 20) as f64,
        if s.max_throttle > 0 { format!(", guest throttled up to {}%", s.max_throttle) } else { String::new() },
        if s.recording { "; the recording continues at the destination" } else { "" },
    );
}

pub fn main(a: Args) -> anyhow::Result<u8> {
    let req = MigrateRequest {
        to: a.to.clone(),
        copy_disk: a.copy_disk,
        bandwidth: a.bandwidth,
        max_downtime_ms: a.max_downtime.as_millis() as u64,
        max_rounds: a.max_rounds.max(1),
        auto_converge: !a.no_auto_converge,
        compress: a.compress,
        key: a.key_file.as_deref().map(Psk::load).transpose().map_err(anyhow::Error::msg)?.map(|k| k.to_hex()),
        insecure: a.insecure,
    };
    match migrate::source::request(&a.control, &req, &mut |p| eprintln!("revirt: {p}")) {
        Ok(s) => {
            print_summary(&s);
            if a.json {
                println!("{}", serde_json::to_string(&s)?);
            }
            Ok(0)
        }
        Err(e) => {
            eprintln!("revirt: migration failed: {e}");
            Ok(1)
        }
    }
}
