//! What frames carry: packed (optionally zstd) blobs, page lists, disk
//! sectors, recording file bytes.

use super::{ProtoError, MAX_FRAME, PAGE};

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
