//! What `revirt migrate` asks a running VM over its control socket, and
//! the client side of that conversation.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::super::{MigrateError, Summary};

/// How to compress pages on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// zstd while the link is slower than compressing (measured as it goes).
    Auto,
    Always,
    Never,
}

/// A `revirt migrate` request, sent as one JSON line on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// Destination: HOST:PORT or unix:PATH, where `revirt receive` listens.
    pub to: String,
    /// Stream the disk too (default: the destination opens the same path).
    pub copy_disk: bool,
    /// Cap on bytes per second put on the wire.
    pub bandwidth: Option<u64>,
    /// Stop-and-copy once the rest is predicted to take at most this long.
    pub max_downtime_ms: u64,
    /// Stop-and-copy after this many rounds whatever remains.
    pub max_rounds: u32,
    /// Throttle a guest that dirties memory faster than the link carries it.
    pub auto_converge: bool,
    pub compress: Compress,
    /// The migration key (`revirt migrate --key-file`), derived, hex. The
    /// control socket it travels on is owner-only.
    #[serde(default)]
    pub key: Option<String>,
    /// Allow a plain (unauthenticated, unencrypted) channel to a
    /// non-loopback address.
    #[serde(default)]
    pub insecure: bool,
}

/// One line the control socket sends back to `revirt migrate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    Progress(String),
    Done(Summary),
    Error(String),
}

/// `revirt migrate`: sends the request to a running VM's control socket,
/// prints its progress, returns its summary.
pub fn request(control: &Path, req: &MigrateRequest, progress: &mut dyn FnMut(&str)) -> Result<Summary, MigrateError> {
    let mut s = UnixStream::connect(control).map_err(|source| MigrateError::Io {
        what: format!("connecting to the VM's control socket {} (was it started with --control?)", control.display()),
        source,
    })?;
    let mut line = serde_json::to_vec(req).expect("request serializes");
    line.push(b'\n');
    s.write_all(&line).map_err(|source| MigrateError::Io { what: "sending the request".into(), source })?;
    for l in BufReader::new(s).lines() {
        let l = l.map_err(|source| MigrateError::Io { what: "reading the VM's answer".into(), source })?;
        match serde_json::from_str::<Reply>(&l) {
            Ok(Reply::Progress(p)) => progress(&p),
            Ok(Reply::Done(s)) => return Ok(s),
            Ok(Reply::Error(e)) => return Err(MigrateError::Refused(e)),
            Err(e) => return Err(MigrateError::Refused(format!("unreadable answer from the VM: {e}"))),
        }
    }
    Err(MigrateError::Refused("the VM closed the control connection without an answer (did it exit?)".into()))
}

