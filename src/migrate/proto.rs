//! The migration wire protocol: a versioned handshake, then frames. Only
//! this file knows the bytes (see docs/migration.md, docs/security.md).
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

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"RVMIGRAT";
pub const VERSION: u32 = 2;
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
    pub machine: crate::vmm::MachineState,
    /// Input the source had read but not yet given to the guest.
    pub pending_input: Vec<u8>,
    pub recorder: Option<RecorderState>,
}

#[derive(Debug)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

fn crc(kind: u8, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// A migration key, derived from the bytes of a `--key-file`.
#[derive(Clone)]
pub struct Psk([u8; 32]);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

/// Fewer secret bytes than this in a key file are refused.
pub const MIN_KEY_BYTES: usize = 16;

impl Psk {
    /// Loads a key file: at least [`MIN_KEY_BYTES`] bytes, readable by its
    /// owner only (e.g. `head -c 32 /dev/urandom > key; chmod 600 key`).
    pub fn load(path: &std::path::Path) -> Result<Psk, String> {
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(path).map_err(|e| format!("key file {}: {e}", path.display()))?;
        if md.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "key file {} is readable by others (mode {:o}): chmod 600 it",
                path.display(),
                md.permissions().mode() & 0o777
            ));
        }
        let b = std::fs::read(path).map_err(|e| format!("key file {}: {e}", path.display()))?;
        if b.len() < MIN_KEY_BYTES {
            return Err(format!("key file {} holds {} bytes; at least {MIN_KEY_BYTES} are needed", path.display(), b.len()));
        }
        Ok(Psk::from_secret(&b))
    }

    pub fn from_secret(b: &[u8]) -> Psk {
        use sha2::Digest;
        Psk(sha2::Sha256::new().chain_update(b"revirt-migrate-key-v2\0").chain_update(b).finalize().into())
    }

    /// For the control socket (owner-only) between `revirt migrate` and the VM.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Psk> {
        hex::decode(s).ok()?.try_into().ok().map(Psk)
    }

    fn derive(&self, label: &[u8], src: &[u8; 32], dst: &[u8; 32]) -> [u8; 32] {
        use hmac::{KeyInit, Mac};
        let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(src);
        m.update(dst);
        m.finalize().into_bytes().into()
    }
}

/// One side's handshake: what it sent or what the peer sent.
#[derive(Debug, Clone)]
pub struct Handshake {
    pub keyed: bool,
    pub nonce: [u8; 32],
}

const HANDSHAKE: usize = 8 + 4 + 1 + 32;

impl Handshake {
    pub fn new(keyed: bool) -> Handshake {
        let mut nonce = [0u8; 32];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            let _ = f.read_exact(&mut nonce);
        }
        Handshake { keyed, nonce }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.push(self.keyed as u8);
        b.extend_from_slice(&self.nonce);
        b
    }
}

pub fn write_handshake(w: &mut impl Write, hs: &Handshake) -> Result<(), ProtoError> {
    w.write_all(&hs.bytes())?;
    w.flush()?;
    Ok(())
}

pub fn read_handshake(r: &mut impl Read) -> Result<Handshake, ProtoError> {
    let mut b = [0u8; HANDSHAKE];
    r.read_exact(&mut b[..12])?;
    if &b[..8] != MAGIC {
        return Err(ProtoError::Magic);
    }
    let theirs = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    if theirs != VERSION {
        return Err(ProtoError::Version { theirs });
    }
    r.read_exact(&mut b[12..])?;
    let keyed = match b[12] {
        0 => false,
        1 => true,
        m => return Err(ProtoError::Corrupt(format!("unknown handshake mode {m}"))),
    };
    Ok(Handshake { keyed, nonce: b[13..].try_into().expect("32 bytes") })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Destination,
}

/// Writes frames in one direction: sealed (keyed) or CRC-checked (plain).
pub struct Sealer {
    aead: Option<chacha20poly1305::ChaCha20Poly1305>,
    counter: u64,
    buf: Vec<u8>,
}

/// Reads frames in one direction, refusing any larger than `max_frame`.
pub struct Opener {
    aead: Option<chacha20poly1305::ChaCha20Poly1305>,
    counter: u64,
    pub max_frame: u32,
}

fn nonce(counter: u64) -> chacha20poly1305::Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&counter.to_le_bytes());
    chacha20poly1305::Nonce::from(n)
}

/// Sets up both directions after the handshakes were exchanged. Refuses a
/// peer whose mode differs (one side has a key, the other none).
pub fn channel(
    psk: Option<&Psk>,
    role: Role,
    ours: &Handshake,
    theirs: &Handshake,
    max_frame: u32,
) -> Result<(Sealer, Opener, [u8; 32]), ProtoError> {
    use chacha20poly1305::KeyInit;
    let peer = if role == Role::Source { "destination" } else { "source" };
    match (psk.is_some(), theirs.keyed) {
        (true, false) => {
            return Err(ProtoError::Auth(format!("the {peer} has no key; this side has --key-file (give both the same key)")))
        }
        (false, true) => {
            return Err(ProtoError::Auth(format!("the {peer} uses a key (--key-file); this side has none")))
        }
        _ => {}
    }
    let (src, dst) = match role {
        Role::Source => (ours, theirs),
        Role::Destination => (theirs, ours),
    };
    let transcript: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::new().chain_update(src.bytes()).chain_update(dst.bytes()).finalize().into()
    };
    let Some(psk) = psk else {
        return Ok((
            Sealer { aead: None, counter: 0, buf: Vec::new() },
            Opener { aead: None, counter: 0, max_frame },
            transcript,
        ));
    };
    let s2d = psk.derive(b"revirt-migrate-v2 source to destination", &src.nonce, &dst.nonce);
    let d2s = psk.derive(b"revirt-migrate-v2 destination to source", &src.nonce, &dst.nonce);
    let (tx, rx) = match role {
        Role::Source => (s2d, d2s),
        Role::Destination => (d2s, s2d),
    };
    let key = |k: [u8; 32]| chacha20poly1305::ChaCha20Poly1305::new(&chacha20poly1305::Key::from(k));
    Ok((
        Sealer { aead: Some(key(tx)), counter: 0, buf: Vec::new() },
        Opener { aead: Some(key(rx)), counter: 0, max_frame },
        transcript,
    ))
}

impl Sealer {
    pub fn keyed(&self) -> bool {
        self.aead.is_some()
    }

    /// Writes one frame; returns the bytes put on the wire.
    pub fn write_frame(&mut self, w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<u64, ProtoError> {
        let Some(aead) = &self.aead else { return write_plain(w, kind, payload) };
        use chacha20poly1305::AeadInOut;
        let len = payload
            .len()
            .checked_add(TAG)
            .and_then(|l| u32::try_from(l).ok())
            .filter(|&l| l <= MAX_FRAME)
            .ok_or_else(|| ProtoError::Corrupt(format!("refusing to send a {} byte frame", payload.len())))?;
        let mut h = [0u8; 5];
        h[0] = kind as u8;
        h[1..5].copy_from_slice(&len.to_le_bytes());
        self.buf.clear();
        self.buf.extend_from_slice(payload);
        let tag = aead
            .encrypt_inout_detached(&nonce(self.counter), &h, self.buf.as_mut_slice().into())
            .map_err(|_| ProtoError::Corrupt("encryption failed".into()))?;
        self.counter += 1;
        w.write_all(&h)?;
        w.write_all(&self.buf)?;
        w.write_all(tag.as_slice())?;
        Ok(5 + len as u64)
    }
}

/// Reads exactly `b.len()` bytes; a close part-way is a truncated stream.
fn read_all(r: &mut impl Read, b: &mut [u8], started: bool) -> Result<(), ProtoError> {
    match r.read_exact(b) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && started => Err(ProtoError::Truncated),
        Err(e) => Err(e.into()),
    }
}

impl Opener {
    pub fn read_frame(&mut self, r: &mut impl Read) -> Result<Frame, ProtoError> {
        let mut payload = Vec::new();
        let kind = self.read_frame_into(r, &mut payload)?;
        Ok(Frame { kind, payload })
    }

    /// [`Opener::read_frame`] into a buffer the caller reuses (large frames
    /// would otherwise fault in fresh pages every time).
    pub fn read_frame_into(&mut self, r: &mut impl Read, payload: &mut Vec<u8>) -> Result<Kind, ProtoError> {
        let Some(aead) = &self.aead else { return read_plain(r, payload, self.max_frame) };
        use chacha20poly1305::AeadInOut;
        let mut h = [0u8; 5];
        read_all(r, &mut h[..1], false)?;
        read_all(r, &mut h[1..], true)?;
        let len = u32::from_le_bytes(h[1..5].try_into().expect("4 bytes"));
        if len > self.max_frame {
            return Err(ProtoError::Corrupt(format!("frame length {len} exceeds this side's limit of {} bytes", self.max_frame)));
        }
        if (len as usize) < TAG {
            return Err(ProtoError::Corrupt(format!("frame length {len} is shorter than its tag")));
        }
        payload.clear();
        payload.try_reserve_exact(len as usize).map_err(|_| ProtoError::Corrupt(format!("cannot allocate a {len} byte frame")))?;
        payload.resize(len as usize, 0);
        read_all(r, payload, true)?;
        let n = len as usize - TAG;
        let tag = chacha20poly1305::Tag::try_from(&payload[n..]).expect("16 bytes");
        let first = self.counter == 0;
        aead.decrypt_inout_detached(&nonce(self.counter), &h, payload[..n].as_mut().into(), &tag).map_err(|_| {
            if first {
                ProtoError::Auth("the first frame does not open with this key: the other side has a different --key-file".into())
            } else {
                ProtoError::Auth(format!(
                    "frame {} fails authentication: tampered with, replayed, reordered or dropped in transit",
                    self.counter
                ))
            }
        })?;
        self.counter += 1;
        payload.truncate(n);
        let kind = Kind::from_u8(h[0]).ok_or_else(|| ProtoError::Corrupt(format!("unknown frame kind {}", h[0])))?;
        if kind == Kind::Abort {
            return Err(ProtoError::Aborted(String::from_utf8_lossy(payload).into_owned()));
        }
        Ok(kind)
    }

    /// Reads a frame that must be of `want` kind.
    pub fn expect(&mut self, r: &mut impl Read, want: Kind) -> Result<Vec<u8>, ProtoError> {
        let f = self.read_frame(r)?;
        if f.kind != want {
            return Err(ProtoError::Unexpected { got: f.kind.name(), want: want.name() });
        }
        Ok(f.payload)
    }
}

/// The mutual challenge, keyed mode only: send our proof of the session
/// (the transcript hash, sealed under the session key).
pub fn send_auth(s: &mut Sealer, w: &mut impl Write, transcript: &[u8; 32]) -> Result<(), ProtoError> {
    if s.keyed() {
        s.write_frame(w, Kind::Auth, transcript)?;
        w.flush()?;
    }
    Ok(())
}

/// Checks the peer's proof (keyed mode only).
pub fn check_auth(o: &mut Opener, r: &mut impl Read, transcript: &[u8; 32]) -> Result<(), ProtoError> {
    if o.aead.is_some() {
        let p = o.expect(r, Kind::Auth)?;
        if p.as_slice() != transcript {
            return Err(ProtoError::Auth("the other side saw a different handshake (tampered in transit)".into()));
        }
    }
    Ok(())
}

fn write_plain(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<u64, ProtoError> {
    let len = u32::try_from(payload.len()).ok().filter(|&l| l <= MAX_FRAME).ok_or_else(|| {
        ProtoError::Corrupt(format!("refusing to send a {} byte frame", payload.len()))
    })?;
    let mut h = [0u8; 9];
    h[0] = kind as u8;
    h[1..5].copy_from_slice(&len.to_le_bytes());
    h[5..9].copy_from_slice(&crc(kind as u8, len, payload).to_le_bytes());
    w.write_all(&h)?;
    w.write_all(payload)?;
    Ok(9 + payload.len() as u64)
}

fn read_plain(r: &mut impl Read, payload: &mut Vec<u8>, max_frame: u32) -> Result<Kind, ProtoError> {
    let mut h = [0u8; 9];
    read_all(r, &mut h[..1], false)?;
    read_all(r, &mut h[1..], true)?;
    let len = u32::from_le_bytes(h[1..5].try_into().expect("4 bytes"));
    let want = u32::from_le_bytes(h[5..9].try_into().expect("4 bytes"));
    if len > max_frame {
        return Err(ProtoError::Corrupt(format!("frame length {len} exceeds this side's limit of {max_frame} bytes")));
    }
    payload.clear();
    payload.try_reserve_exact(len as usize).map_err(|_| ProtoError::Corrupt(format!("cannot allocate a {len} byte frame")))?;
    payload.resize(len as usize, 0);
    read_all(r, payload, true)?;
    if crc(h[0], len, payload) != want {
        return Err(ProtoError::Corrupt(format!("checksum mismatch in a {len} byte frame")));
    }
    let kind = Kind::from_u8(h[0]).ok_or_else(|| ProtoError::Corrupt(format!("unknown frame kind {}", h[0])))?;
    if kind == Kind::Abort {
        return Err(ProtoError::Aborted(String::from_utf8_lossy(payload).into_owned()));
    }
    Ok(kind)
}

pub fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("protocol messages serialize")
}

pub fn from_json<T: for<'a> Deserialize<'a>>(b: &[u8], what: &str) -> Result<T, ProtoError> {
    serde_json::from_slice(b).map_err(|e| ProtoError::Corrupt(format!("{what}: {e}")))
}

const FLAG_ZSTD: u8 = 1;

/// A compressed-or-not blob: zstd when that saves at least an eighth.
pub fn pack(data: &[u8], out: &mut Vec<u8>) {
    pack_with(data, true, out)
}

/// Like [`pack`], but tries zstd only when `zstd` is set.
pub fn pack_with(data: &[u8], zstd: bool, out: &mut Vec<u8>) {
    if zstd {
        // Compress straight into `out` (reused by the caller: no fresh pages to fault in).
        let start = out.len();
        out.push(FLAG_ZSTD);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let bound = zstd::zstd_safe::compress_bound(data.len());
        out.resize(start + 5 + bound, 0);
        match zstd::bulk::compress_to_buffer(data, &mut out[start + 5..], 1) {
            Ok(n) if n < data.len() - data.len() / 8 => {
                out.truncate(start + 5 + n);
                return;
            }
            _ => out.truncate(start),
        }
    }
    out.push(0);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
}

pub fn unpack(b: &[u8]) -> Result<Vec<u8>, ProtoError> {
    unpack_ref(b).map(|c| c.into_owned())
}

/// [`unpack`] without copying uncompressed data.
pub fn unpack_ref(b: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, ProtoError> {
    use std::borrow::Cow;
    if b.len() < 5 {
        return Err(ProtoError::Corrupt("blob header cut short".into()));
    }
    let raw = u32::from_le_bytes(b[1..5].try_into().unwrap()) as usize;
    if raw > MAX_FRAME as usize {
        return Err(ProtoError::Corrupt(format!("blob claims {raw} bytes")));
    }
    match b[0] {
        0 if b.len() - 5 == raw => Ok(Cow::Borrowed(&b[5..])),
        FLAG_ZSTD => {
            let v = crate::trace::decompress_exact(&b[5..], raw).map_err(|e| ProtoError::Corrupt(format!("zstd blob {e}")))?;
            Ok(Cow::Owned(v))
        }
        f => Err(ProtoError::Corrupt(format!("blob flags {f:#x} / size mismatch"))),
    }
}

/// Pages payload: count (u32), page numbers (u64 each), packed data.
pub fn encode_pages(pages: &[u64], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + pages.len() * 8 + data.len() / 2);
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
    pack(data, &mut out);
    out
}

fn numbers(b: &[u8]) -> Result<(Vec<u64>, &[u8]), ProtoError> {
    if b.len() < 4 {
        return Err(ProtoError::Corrupt("page list cut short".into()));
    }
    let n = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
    let end = n.checked_mul(8).and_then(|x| x.checked_add(4)).filter(|&e| e <= b.len());
    let end = end.ok_or_else(|| ProtoError::Corrupt("page list longer than its frame".into()))?;
    let v = b[4..end].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    Ok((v, &b[end..]))
}

pub fn decode_pages(b: &[u8]) -> Result<(Vec<u64>, std::borrow::Cow<'_, [u8]>), ProtoError> {
    let (pages, rest) = numbers(b)?;
    let data = unpack_ref(rest)?;
    if data.len() as u64 != pages.len() as u64 * PAGE {
        return Err(ProtoError::Corrupt(format!("{} pages but {} bytes of data", pages.len(), data.len())));
    }
    Ok((pages, data))
}

pub fn encode_numbers(v: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + v.len() * 8);
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    for p in v {
        out.extend_from_slice(&p.to_le_bytes());
    }
    out
}

pub fn decode_numbers(b: &[u8]) -> Result<Vec<u64>, ProtoError> {
    let (v, rest) = numbers(b)?;
    if !rest.is_empty() {
        return Err(ProtoError::Corrupt("trailing bytes after a page list".into()));
    }
    Ok(v)
}

/// Disk payload: first sector (u64), packed sector data.
pub fn encode_disk(first: u64, data: &[u8]) -> Vec<u8> {
    let mut out = first.to_le_bytes().to_vec();
    pack(data, &mut out);
    out
}

pub fn decode_disk(b: &[u8]) -> Result<(u64, Vec<u8>), ProtoError> {
    if b.len() < 8 {
        return Err(ProtoError::Corrupt("disk frame cut short".into()));
    }
    let first = u64::from_le_bytes(b[..8].try_into().unwrap());
    let data = unpack(&b[8..])?;
    if data.len() % 512 != 0 {
        return Err(ProtoError::Corrupt("disk data is not whole sectors".into()));
    }
    Ok((first, data))
}

/// File payload: name length (u16), name, offset (u64), packed bytes.
pub fn encode_file(name: &str, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut out = (name.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    pack(data, &mut out);
    out
}

/// Like [`encode_file`] with the bytes already packed.
pub fn encode_file_packed(name: &str, offset: u64, packed: Vec<u8>) -> Vec<u8> {
    let mut out = (name.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&packed);
    out
}

pub fn decode_file(b: &[u8]) -> Result<(String, u64, Vec<u8>), ProtoError> {
    let bad = || ProtoError::Corrupt("file frame cut short".into());
    let n = u16::from_le_bytes(b.get(..2).ok_or_else(bad)?.try_into().unwrap()) as usize;
    let name = std::str::from_utf8(b.get(2..2 + n).ok_or_else(bad)?)
        .map_err(|_| ProtoError::Corrupt("file name is not UTF-8".into()))?
        .to_string();
    let off = u64::from_le_bytes(b.get(2 + n..10 + n).ok_or_else(bad)?.try_into().unwrap());
    let data = unpack(&b[10 + n..])?;
    Ok((name, off, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    type End = (Sealer, Opener, [u8; 32]);

    /// Both ends of a session, over in-memory buffers.
    fn pair(src_key: Option<&Psk>, dst_key: Option<&Psk>) -> Result<(End, End), ProtoError> {
        let (hs, hd) = (Handshake::new(src_key.is_some()), Handshake::new(dst_key.is_some()));
        let (mut bs, mut bd) = (Vec::new(), Vec::new());
        write_handshake(&mut bs, &hs)?;
        write_handshake(&mut bd, &hd)?;
        let seen_by_dst = read_handshake(&mut &bs[..])?;
        let seen_by_src = read_handshake(&mut &bd[..])?;
        let s = channel(src_key, Role::Source, &hs, &seen_by_src, MAX_FRAME)?;
        let d = channel(dst_key, Role::Destination, &hd, &seen_by_dst, MAX_FRAME)?;
        Ok((s, d))
    }

    fn sample_frames(seal: &mut Sealer) -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        let data: Vec<u8> = (0..2 * PAGE as usize).map(|i| (i % 7) as u8).collect();
        for k in 0..4u64 {
            seal.write_frame(&mut buf, Kind::Pages, &encode_pages(&[5 + k, 9], &data)).unwrap();
            ends.push(buf.len());
        }
        (buf, ends)
    }

    #[test]
    fn plain_frames_round_trip_and_corruption_is_caught() {
        let ((mut seal, _, _), (_, mut open, _)) = pair(None, None).unwrap();
        let (buf, _) = sample_frames(&mut seal);
        let f = open.read_frame(&mut &buf[..]).unwrap();
        assert_eq!(f.kind, Kind::Pages);
        let (p, _) = decode_pages(&f.payload).unwrap();
        assert_eq!(p, vec![5, 9]);
        let first = buf.len() / 4;
        for i in 0..first {
            let mut b = buf.clone();
            b[i] ^= 0x40;
            let ((_, _, _), (_, mut open, _)) = pair(None, None).unwrap();
            assert!(open.read_frame(&mut &b[..]).is_err(), "flip at {i} undetected");
        }
    }

    #[test]
    fn keyed_frames_refuse_tampering_replay_reordering_truncation_and_a_wrong_key() {
        let k = Psk::from_secret(b"0123456789abcdef0123456789abcdef");
        let ((mut seal, _, ts), (_, mut open, td)) = pair(Some(&k), Some(&k)).unwrap();
        assert_eq!(ts, td, "both sides hash the same transcript");
        let (buf, ends) = sample_frames(&mut seal);
        // In order: every frame opens.
        let mut r = &buf[..];
        for _ in 0..4 {
            assert_eq!(open.read_frame(&mut r).unwrap().kind, Kind::Pages);
        }
        let fresh = |b: &[u8]| {
            let ((mut s2, _, _), (_, mut o2, _)) = pair(Some(&k), Some(&k)).unwrap();
            let _ = sample_frames(&mut s2);
            // A fresh session: a frame from another session does not open.
            o2.read_frame(&mut &b[..]).map(|_| ())
        };
        assert!(matches!(fresh(&buf), Err(ProtoError::Auth(_))), "a frame replayed from another session opened");
        let frame = |i: usize| &buf[if i == 0 { 0 } else { ends[i - 1] }..ends[i]];
        let reader = || pair(Some(&k), Some(&k)).unwrap().1 .1;
        // Our own session's frames, reordered or replayed: the counter catches it.
        let ((mut seal, _, _), (_, mut open, _)) = pair(Some(&k), Some(&k)).unwrap();
        let (buf, ends) = sample_frames(&mut seal);
        let f = |i: usize| buf[if i == 0 { 0 } else { ends[i - 1] }..ends[i]].to_vec();
        let replayed = [f(0), f(0)].concat();
        let mut r = &replayed[..];
        open.read_frame(&mut r).unwrap();
        let e = open.read_frame(&mut r).unwrap_err().to_string();
        assert!(e.contains("frame 1 fails authentication"), "{e}");
        let ((mut seal, _, _), (_, mut open, _)) = pair(Some(&k), Some(&k)).unwrap();
        let (buf, ends) = sample_frames(&mut seal);
        let f = |i: usize| buf[if i == 0 { 0 } else { ends[i - 1] }..ends[i]].to_vec();
        let reordered = [f(0), f(2), f(1)].concat();
        let mut r = &reordered[..];
        open.read_frame(&mut r).unwrap();
        assert!(matches!(open.read_frame(&mut r), Err(ProtoError::Auth(_))));
        // Cut mid-frame.
        let cut = &frame(0)[..frame(0).len() / 2];
        assert!(matches!(reader().read_frame(&mut &cut[..]), Err(ProtoError::Truncated)));
        // A different key: the first frame does not open.
        let other = Psk::from_secret(b"another key, also long enough!!!");
        let ((mut seal, _, _), (_, mut open, _)) = pair(Some(&k), Some(&other)).unwrap();
        let (buf, _) = sample_frames(&mut seal);
        let e = open.read_frame(&mut &buf[..]).unwrap_err().to_string();
        assert!(e.contains("different --key-file"), "{e}");
        // One side without a key.
        assert!(matches!(pair(Some(&k), None), Err(ProtoError::Auth(_))));
        assert!(matches!(pair(None, Some(&k)), Err(ProtoError::Auth(_))));
    }

    #[test]
    fn every_flipped_byte_of_a_keyed_frame_is_refused() {
        let k = Psk::from_secret(b"0123456789abcdef");
        let ((mut seal, _, _), _) = pair(Some(&k), Some(&k)).unwrap();
        let mut buf = Vec::new();
        seal.write_frame(&mut buf, Kind::File, &encode_file("events.log", 7, b"abcdef")).unwrap();
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x01;
            // Same keys, fresh counter: rebuild the reader from the same handshake.
            let mut open = Opener { aead: seal_twin(&seal), counter: 0, max_frame: MAX_FRAME };
            assert!(open.read_frame(&mut &b[..]).is_err(), "flip at {i} undetected");
        }
    }

    /// A reader with the writer's key (unit tests only).
    fn seal_twin(s: &Sealer) -> Option<chacha20poly1305::ChaCha20Poly1305> {
        s.aead.clone()
    }

    #[test]
    fn handshake_rejects_other_versions_and_garbage() {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&99u32.to_le_bytes());
        assert!(matches!(read_handshake(&mut &b[..]), Err(ProtoError::Version { theirs: 99 })));
        assert!(matches!(read_handshake(&mut &b"GET / HTTP/1.1\r\n"[..]), Err(ProtoError::Magic)));
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let mut h = vec![Kind::Pages as u8];
        h.extend_from_slice(&(MAX_FRAME + 1).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        let mut open = Opener { aead: None, counter: 0, max_frame: MAX_FRAME };
        assert!(matches!(open.read_frame(&mut &h[..]), Err(ProtoError::Corrupt(_))));
        let mut small = Opener { aead: None, counter: 0, max_frame: 1024 };
        let mut buf = Vec::new();
        write_plain(&mut buf, Kind::File, &vec![0u8; 2000]).unwrap();
        let e = small.read_frame(&mut &buf[..]).unwrap_err().to_string();
        assert!(e.contains("exceeds this side's limit"), "{e}");
        let mut buf = Vec::new();
        write_plain(&mut buf, Kind::File, &encode_file("events.log", 7, b"abc")).unwrap();
        buf.truncate(buf.len() - 1);
        assert!(matches!(open.read_frame(&mut &buf[..]), Err(ProtoError::Truncated)));
        assert!(decode_pages(&[255, 255, 255, 255]).is_err());
        assert!(decode_file(&[3, 0, b'a']).is_err());
    }

    proptest::proptest! {
        /// Whatever arrives, decoding is an answer or an error, never a panic.
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let _ = Opener { aead: None, counter: 0, max_frame: MAX_FRAME }.read_frame(&mut &b[..]);
            let k = Psk::from_secret(b"0123456789abcdef");
            let _ = Opener { aead: Some(chacha20poly1305::KeyInit::new(&chacha20poly1305::Key::from(k.0))), counter: 0, max_frame: MAX_FRAME }.read_frame(&mut &b[..]);
            let _ = read_handshake(&mut &b[..]);
            let _ = decode_pages(&b);
            let _ = decode_numbers(&b);
            let _ = decode_disk(&b);
            let _ = decode_file(&b);
            let _ = unpack(&b);
            let _ = from_json::<Hello>(&b, "hello");
            let _ = from_json::<FinalState>(&b, "state");
        }
    }

    #[test]
    fn packing_compresses_only_when_it_pays() {
        let zeros = vec![0u8; 4096];
        let mut out = Vec::new();
        pack(&zeros, &mut out);
        assert!(out.len() < 200);
        assert_eq!(unpack(&out).unwrap(), zeros);
        let mut x = 1u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut out = Vec::new();
        pack(&noise, &mut out);
        assert_eq!(out[0], 0);
        assert_eq!(unpack(&out).unwrap(), noise);
    }
}
