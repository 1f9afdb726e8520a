//! The migration wire protocol: a versioned handshake, then frames. Only
//! this module knows the bytes (`channel`: handshake, keys and frames;
//! `payload`: what frames carry) (see docs/migration.md, docs/security.md).
//!
//! Handshake, each way: magic, version (u32 LE), mode (u8: 0 plain, 1
//! keyed), a fresh random 32-byte nonce.
//!
//! Keyed mode (both ends loaded the same `--key-file`): each direction has
//! its own ChaCha20-Poly1305 key, HMAC-SHA256(file key, label, source
//! nonce, destination nonce), so a key is never used in two sessions or two
//! directions. Frame: kind (u8), length (u32 LE), ciphertext+tag; the AEAD
//! nonce is the frame's counter in its direction, the kind and length are
//! its associated data. A replayed, reordered, dropped or changed frame
//! fails authentication. The first frame each way is `Auth`, holding the
//! hash of both handshakes: the mutual challenge (each side proves it has
//! the key *and* saw this session's nonces) and a guard against a
//! downgraded handshake.
//!
//! Plain mode (loopback and Unix sockets, or `--insecure`): kind (u8),
//! payload length (u32 LE), CRC-32 of kind, length and payload (u32 LE),
//! payload: accidents are caught, attackers are not.
//!
//! A frame that fails its check, has an unknown kind or is larger than the
//! reader's limit ends the migration with an error; the source then keeps
//! running.

use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"RVMIGRAT";
/// 3: the final state's machine is the versioned container (trace::state).
pub const VERSION: u32 = 3;
pub const PAGE: u64 = 4096;
/// Larger frames are never sent; a reader's own limit may be lower (a
/// corrupt or hostile length must not allocate gigabytes).
pub const MAX_FRAME: u32 = 64 << 20;
/// What the destination may send the source (small control frames).
pub const MAX_REPLY_FRAME: u32 = 1 << 20;
const TAG: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a revirt migration stream (bad magic)")]
    Magic,
    #[error("protocol version {theirs} is not supported (this revirt speaks version {VERSION})")]
    Version { theirs: u32 },
    #[error("corrupt frame: {0}")]
    Corrupt(String),
    #[error("corrupt frame: {what}: {source}")]
    Json { what: String, source: serde_json::Error },
    #[error("unexpected frame {got} (expected {want})")]
    Unexpected { got: &'static str, want: &'static str },
    #[error("the other side aborted: {0}")]
    Aborted(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("the connection closed in the middle of a frame (truncated stream)")]
    Truncated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source -> destination: what is coming ([`Hello`], JSON).
    Hello = 1,
    /// Destination -> source: allocated and ready for pages ([`Welcome`], JSON).
    Welcome = 2,
    /// Guest pages ([`Pages`]).
    Pages = 3,
    /// Pages that are now all zero (page numbers only).
    ZeroPages = 4,
    /// Disk sectors (`--copy-disk`).
    Disk = 5,
    /// Bytes of a recording file at an offset.
    File = 6,
    /// Stop-and-copy is over: vCPU, devices, host state ([`FinalState`], JSON).
    State = 7,
    /// Destination -> source: everything loaded; waiting for the commit.
    Ready = 8,
    /// Source -> destination: the commit point. The source has let go.
    Commit = 9,
    /// Either way: give up, with a reason.
    Abort = 10,
    /// Either way, first in keyed mode: the hash of both handshakes.
    Auth = 11,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Pages,
            4 => Kind::ZeroPages,
            5 => Kind::Disk,
            6 => Kind::File,
            7 => Kind::State,
            8 => Kind::Ready,
            9 => Kind::Commit,
            10 => Kind::Abort,
            11 => Kind::Auth,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Welcome => "welcome",
            Kind::Pages => "pages",
            Kind::ZeroPages => "zero-pages",
            Kind::Disk => "disk",
            Kind::File => "file",
            Kind::State => "state",
            Kind::Ready => "ready",
            Kind::Commit => "commit",
            Kind::Abort => "abort",
            Kind::Auth => "auth",
        }
    }
}

/// What the source announces before sending memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub config: crate::vmm::VmConfig,
    /// The disk's size when it is streamed (`--copy-disk`); `None`: shared path.
    pub copy_disk: Option<u64>,
    /// The VM is being recorded: the destination continues this recording.
    pub recording: Option<RecordingHello>,
    pub source_host: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordingHello {
    pub id: String,
    pub clock: crate::clock::ClockKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    pub host: String,
}

pub use crate::record::mover::RecorderState;

#[derive(Debug, Serialize, Deserialize)]
pub struct FinalState {
    /// The machine state in its versioned container (hex in the JSON).
    pub machine: crate::trace::state::Sealed,
    /// Input the source had read but not yet given to the guest.
    pub pending_input: Vec<u8>,
    pub recorder: Option<RecorderState>,
}

#[derive(Debug)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

mod channel;
mod payload;
#[cfg(test)]
mod tests;

pub use channel::{channel, check_auth, read_handshake, send_auth, write_handshake, Handshake, Opener, Psk, Role, Sealer, MIN_KEY_BYTES};
pub use payload::*;

pub fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("protocol messages serialize")
}

pub fn from_json<T: for<'a> Deserialize<'a>>(b: &[u8], what: &str) -> Result<T, ProtoError> {
    serde_json::from_slice(b).map_err(|source| ProtoError::Json { what: what.to_string(), source })
}
