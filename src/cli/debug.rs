//! `revirt debug RECORDING`: the gdb server and gdb in one step, like
//! `rr replay`: serves the replay on a free local port and starts gdb with
//! the recording's own copy of the image (its symbols and DWARF) connected
//! to it. gdb's exit ends the session.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use anyhow::Context;
use revirt::replay::session::Session;
use revirt::gdb::{serve, Target64};
use revirt::replay::Recording;

#[derive(clap::Args)]
pub struct Args {
    /// Recording directory (made by `revirt record`).
    recording: PathBuf,
    /// Start at this guest-caused exit instead of the start of the recording.
    #[arg(long, default_value_t = 0)]
    at: u64,
    /// Work on a recording that fails its integrity check (damaged
    /// evidence): say what is damaged, then go on.
    #[arg(long)]
    force: bool,
    /// The gdb to run.
    #[arg(long, default_value = "gdb")]
    gdb: String,
    /// More arguments for gdb, after `--` (e.g. `-- -ex 'break main'`); they
    /// run after the connection is made.
    #[arg(last = true)]
    gdb_args: Vec<String>,
}

pub fn main(a: Args) -> anyhow::Result<u8> {
    let rec = Arc::new(Recording::open_checked(&a.recording, a.force)?);
    if let Some(line) = &rec.integrity {
        eprintln!("revirt debug: {line}");
    }
    // The recording's copy: the exact bytes that ran, whatever happened to the original since.
    let image = rec.files().image();
    let session = Session::open(rec, a.at)?;
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("cannot listen on a local port")?;
    let port = listener.local_addr()?.port();
    eprintln!(
        "revirt debug: replaying {} on 127.0.0.1:{port}",
        a.recording.display()
    );

    let mut cmd = Command::new(&a.gdb);
    cmd.arg("-q")
        .args(["-ex", &format!("target remote 127.0.0.1:{port}")])
        .args(&a.gdb_args)
        .arg(&image);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {} (install gdb)", a.gdb))?;

    // Serve one client (gdb) here; should gdb exit without ever connecting,
    // a throwaway connection lets the server return.
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = TcpStream::connect(("127.0.0.1", port));
        status
    });
    let mut target = Target64::new(session);
    serve(&mut target, &listener, Some(1))?;
    let status = waiter
        .join()
        .map_err(|_| anyhow::anyhow!("the gdb waiter thread panicked"))?
        .context("waiting for gdb")?;
    Ok(status.code().map_or(1, |c| c.clamp(0, 255) as u8))
}
