//! The channel: handshakes, keys, and frames sealed (keyed mode) or
//! CRC-checked (plain mode); see the module above for the layout.

use std::io::{Read, Write};

use super::{Frame, Kind, ProtoError, MAGIC, MAX_FRAME, TAG, VERSION};

fn crc(kind: u8, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// A migration key, derived from the bytes of a `--key-file`.
#[derive(Clone)]
pub struct Psk(pub(super) [u8; 32]);

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
    pub(super) aead: Option<chacha20poly1305::ChaCha20Poly1305>,
    counter: u64,
    buf: Vec<u8>,
}

/// Reads frames in one direction, refusing any larger than `max_frame`.
pub struct Opener {
    pub(super) aead: Option<chacha20poly1305::ChaCha20Poly1305>,
    pub(super) counter: u64,
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

pub(super) fn write_plain(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<u64, ProtoError> {
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
