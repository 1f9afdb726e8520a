//! `revirt gdb RECORDING`: serve a replay to GDB, with reverse execution.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use revirt::replay::session::Session;
use revirt::gdb::{serve, Target64};
use revirt::replay::Recording;

#[derive(clap::Args)]
pub struct Args {
    /// Work on a recording that fails its integrity check (damaged
    /// evidence): say what is damaged, then go on.
    #[arg(long)]
    force: bool,
    /// Recording directory (made by `revirt record`).
    recording: PathBuf,
    /// TCP port to listen on (0 = any free port; the chosen one is printed).
    #[arg(long, default_value_t = 1234)]
    port: u16,
    /// Address to listen on. The default is this machine only: anyone who
    /// can connect can read all of the recorded guest's memory.
    #[arg(long, default_value = "127.0.0.1")]
    listen: String,
    /// Start at this guest-caused exit instead of the start of the recording.
    #[arg(long, default_value_t = 0)]
    at: u64,
    /// Stop after this many clients have come and gone (default: serve forever).
    #[arg(long)]
    clients: Option<u64>,
}

pub fn main(a: Args) -> anyhow::Result<u8> {
    let rec = Arc::new(Recording::open_checked(&a.recording, a.force)?);
    if let Some(line) = &rec.integrity {
        eprintln!("revirt gdb: {line}");
    }
    let image = rec.meta.image.original_path.clone();
    let session = Session::open(rec, a.at)?;
    let listener = TcpListener::bind((a.listen.as_str(), a.port))
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", a.listen, a.port))?;
    let port = listener.local_addr()?.port();
    let p = session.pos();
    eprintln!(
        "revirt gdb: replaying {} at {}",
        a.recording.display(),
        p.point
    );
    eprintln!("revirt gdb: listening on {}:{port}; attach with:", a.listen);
    eprintln!("  gdb {image} -ex 'target remote :{port}'");
    eprintln!("  (or: gdb -x gdb-scripts/revirt.gdb -ex 'rv-connect {port}' {image})");
    let mut t = Target64::new(session);
    serve(&mut t, &listener, a.clients)?;
    Ok(0)
}
