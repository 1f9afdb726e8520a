//! Live migration (lecture notes Part I; Clark et al., NSDI 2005): move a
//! running — even a recording — VM to another host by iterative pre-copy of
//! dirty pages, a short stop-and-copy, and a commit.
//!
//! The vCPU keeps running during pre-copy: a migration thread reads the
//! shared [`DirtyLog`](crate::vmm::machine::DirtyLog) and guest memory and
//! streams pages, while the run loop only sees a [`crate::vmm::pausable::Pausable`] host that can
//! throttle it (auto-converge) and finally pause it. Stop-and-copy, the
//! commit and the hand-over of the recorder happen on the vCPU thread
//! (`source::Migration::finish`). The destination is [`dest::receive`].

pub mod dest;
pub mod proto;
pub mod source;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;


pub use crate::record::mover::MoveSummary as Summary;
pub use crate::trace::meta::hostname;
pub use proto::ProtoError;
pub use source::{Controller, MigrateRequest};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Machine(#[from] crate::vmm::MachineError),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Record(#[from] Box<crate::record::RecordError>),
    #[error("the final state: {0}")]
    State(#[from] crate::trace::state::StateError),
    #[error("reading guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

impl From<crate::record::RecordError> for MigrateError {
    fn from(e: crate::record::RecordError) -> Self {
        MigrateError::Record(Box::new(e))
    }
}


/// A connection over TCP (`HOST:PORT`) or a Unix socket (`unix:PATH`).
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    pub fn connect(addr: &str) -> Result<Conn, MigrateError> {
        let io = |source| MigrateError::Io { what: format!("connecting to {addr}"), source };
        match addr.strip_prefix("unix:") {
            Some(p) => Ok(Conn::Unix(UnixStream::connect(p).map_err(io)?)),
            None => {
                let s = TcpStream::connect(addr).map_err(io)?;
                let _ = s.set_nodelay(true);
                Ok(Conn::Tcp(s))
            }
        }
    }

    pub fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(b),
            Conn::Unix(s) => s.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(b),
            Conn::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

/// A listening socket for `revirt receive`.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    pub fn bind(addr: &str) -> Result<Listener, MigrateError> {
        let io = |source| MigrateError::Io { what: format!("listening on {addr}"), source };
        match addr.strip_prefix("unix:") {
            Some(p) => {
                claim_socket_path(std::path::Path::new(p))?;
                Ok(Listener::Unix(UnixListener::bind(p).map_err(io)?, p.into()))
            }
            None => Ok(Listener::Tcp(TcpListener::bind(addr).map_err(io)?)),
        }
    }

    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    pub fn accept(&self) -> Result<Conn, MigrateError> {
        let io = |source| MigrateError::Io { what: "accepting a connection".into(), source };
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().map_err(io)?;
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }
            Listener::Unix(l, _) => Conn::Unix(l.accept().map_err(io)?.0),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            release_socket_path(p);
        }
    }
}

/// Whether every address `addr` names is on this host (loopback or a
/// Unix socket): only there may the channel run without a key.
pub fn is_local(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    if addr.starts_with("unix:") {
        return true;
    }
    match addr.to_socket_addrs() {
        Ok(mut a) => {
            let v: Vec<_> = a.by_ref().collect();
            !v.is_empty() && v.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// Refuses to listen on or connect to a non-loopback address without a
/// key, unless the user said `--insecure`.
pub fn check_reach(addr: &str, keyed: bool, insecure: bool, what: &str) -> Result<(), MigrateError> {
    if keyed || insecure || is_local(addr) {
        return Ok(());
    }
    Err(MigrateError::Refused(format!(
        "refusing to {what} {addr} without a key: the guest's memory would cross the network unauthenticated and \
         unencrypted; give both ends the same --key-file FILE (or --insecure on a network you trust completely)"
    )))
}

/// Makes `path` free for a new Unix socket: nothing there, or a stale
/// socket (no one accepts on it), which is removed. A live socket or any
/// other kind of file is never touched.
pub fn claim_socket_path(path: &std::path::Path) -> Result<(), MigrateError> {
    use std::os::unix::fs::FileTypeExt;
    let md = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(MigrateError::Io { what: format!("socket path {}", path.display()), source }),
    };
    if !md.file_type().is_socket() {
        return Err(MigrateError::Refused(format!(
            "{} exists and is not a socket: refusing to replace it (choose another path)",
            path.display()
        )));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(MigrateError::Refused(format!("{} is in use by another running process", path.display())));
    }
    std::fs::remove_file(path).map_err(|source| MigrateError::Io { what: format!("removing stale socket {}", path.display()), source })
}

/// Removes our socket at `path` when done, if a socket is still there.
pub fn release_socket_path(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

