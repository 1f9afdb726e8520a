//! The migration wire protocol: a versioned handshake, then checksummed
//! frames. Only this file knows the bytes (see docs/migration.md).
//!
//! Frame: kind (u8), payload length (u32 LE), CRC-32 of kind, length and
//! payload (u32 LE), payload. A frame that fails its CRC, has an unknown
//! kind or is larger than [`MAX_FRAME`] ends the migration with an error;
//! the source then keeps running.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"RVMIGRAT";
pub const VERSION: u32 = 1;
pub const PAGE: u64 = 4096;
/// Larger frames are refused (a corrupt length must not allocate gigabytes).
pub const MAX_FRAME: u32 = 64 << 20;

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

/// The recorder's place in its recording when the VM stopped, so the
/// destination appends to the same log and checkpoint series.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecorderState {
    pub events: u64,
    pub log: crate::trace::log::LogHead,
    pub checkpoints: u32,
    pub output_len: u64,
    /// Changes since the source's last checkpoint: the destination's next
    /// checkpoint must include them.
    pub ckpt_pages: Vec<u64>,
    pub ckpt_sectors: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FinalState {
    pub machine: crate::vmm::MachineState,
    /// Input the source had read but not yet given to the guest.
    pub pending_input: Vec<u8>,
    pub recorder: Option<RecorderState>,
}

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

pub fn write_handshake(w: &mut impl Write) -> Result<(), ProtoError> {
    w.write_all(MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())?;
    Ok(())
}

pub fn read_handshake(r: &mut impl Read) -> Result<(), ProtoError> {
    let mut b = [0u8; 12];
    r.read_exact(&mut b)?;
    if &b[..8] != MAGIC {
        return Err(ProtoError::Magic);
    }
    let theirs = u32::from_le_bytes(b[8..].try_into().unwrap());
    if theirs != VERSION {
        return Err(ProtoError::Version { theirs });
    }
    Ok(())
}

/// Writes one frame; returns the bytes put on the wire.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<u64, ProtoError> {
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

pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtoError> {
    let mut payload = Vec::new();
    let kind = read_frame_into(r, &mut payload)?;
    Ok(Frame { kind, payload })
}

/// [`read_frame`] into a buffer the caller reuses (large frames would
/// otherwise fault in fresh pages every time).
pub fn read_frame_into(r: &mut impl Read, payload: &mut Vec<u8>) -> Result<Kind, ProtoError> {
    let mut h = [0u8; 9];
    r.read_exact(&mut h)?;
    let len = u32::from_le_bytes(h[1..5].try_into().unwrap());
    let want = u32::from_le_bytes(h[5..9].try_into().unwrap());
    if len > MAX_FRAME {
        return Err(ProtoError::Corrupt(format!("frame length {len} exceeds {MAX_FRAME}")));
    }
    payload.resize(len as usize, 0);
    r.read_exact(payload)?;
    if crc(h[0], len, payload) != want {
        return Err(ProtoError::Corrupt(format!("checksum mismatch in a {len} byte frame")));
    }
    let kind = Kind::from_u8(h[0]).ok_or_else(|| ProtoError::Corrupt(format!("unknown frame kind {}", h[0])))?;
    if kind == Kind::Abort {
        return Err(ProtoError::Aborted(String::from_utf8_lossy(payload).into_owned()));
    }
    Ok(kind)
}

/// Reads a frame that must be of `want` kind.
pub fn expect(r: &mut impl Read, want: Kind) -> Result<Vec<u8>, ProtoError> {
    let f = read_frame(r)?;
    if f.kind != want {
        return Err(ProtoError::Unexpected { got: f.kind.name(), want: want.name() });
    }
    Ok(f.payload)
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
            let v = zstd::bulk::decompress(&b[5..], raw).map_err(|e| ProtoError::Corrupt(format!("zstd: {e}")))?;
            if v.len() != raw {
                return Err(ProtoError::Corrupt("blob size mismatch".into()));
            }
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

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let mut buf = Vec::new();
        write_handshake(&mut buf).unwrap();
        let data: Vec<u8> = (0..2 * PAGE as usize).map(|i| (i % 7) as u8).collect();
        write_frame(&mut buf, Kind::Pages, &encode_pages(&[5, 9], &data)).unwrap();
        let mut r = &buf[..];
        read_handshake(&mut r).unwrap();
        let f = read_frame(&mut r).unwrap();
        assert_eq!(f.kind, Kind::Pages);
        let (p, d) = decode_pages(&f.payload).unwrap();
        assert_eq!((p, d.into_owned()), (vec![5, 9], data));
        // Every single flipped byte after the handshake is detected.
        for i in 12..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x40;
            let mut r = &b[12..];
            assert!(read_frame(&mut r).is_err(), "flip at {i} undetected");
        }
    }

    #[test]
    fn handshake_rejects_other_versions_and_garbage() {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&2u32.to_le_bytes());
        assert!(matches!(read_handshake(&mut &b[..]), Err(ProtoError::Version { theirs: 2 })));
        assert!(matches!(read_handshake(&mut &b"GET / HTTP/1.1\r\n"[..]), Err(ProtoError::Magic)));
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let mut h = vec![Kind::Pages as u8];
        h.extend_from_slice(&(MAX_FRAME + 1).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(read_frame(&mut &h[..]), Err(ProtoError::Corrupt(_))));
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::File, &encode_file("events.log", 7, b"abc")).unwrap();
        buf.truncate(buf.len() - 1);
        assert!(read_frame(&mut &buf[..]).is_err());
        assert!(decode_pages(&[255, 255, 255, 255]).is_err());
        assert!(decode_file(&[3, 0, b'a']).is_err());
    }

    proptest::proptest! {
        /// Whatever arrives, decoding is an answer or an error, never a panic.
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let _ = read_frame(&mut &b[..]);
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
