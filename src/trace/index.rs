//! The seek index (`events.idx`, format version 3; coverage records since 4): what a reader seeking
//! to one point needs from the whole event log, small, in a SHA-256 chain of
//! its own that starts from the log's genesis (so from meta.json's bytes).
//! Each record is derived from the log: for every `Checkpoint` event, where
//! the chunk after the one holding it starts and the log's chain hash there
//! (a *cut*); for every `CheckpointFile` event, the binding; for every
//! `ConsoleFile` (and the `End`), the console binding; for every
//! `CheckpointCovered`, the claim; and the end of the log. The log writer
//! appends a chunk's records right after the chunk, and
//! `revirt verify` derives them again from the log and compares, so the
//! index is checked like every other file.
//!
//! A seek to exit P (`seek::open`) checks the index's chain (~0.3 µs a
//! record, 3-4 records a checkpoint), takes the bindings from it, and reads
//! and checks only the log between two cuts: from the checkpoint it starts
//! at to past P, verified from the chain hash the index holds at the first
//! cut to the one it holds at the last. The log before and after is not
//! read: what the seek does not use, it does not check (`verify`, or a
//! replay to the end, checks all of it).
//!
//! Layout: `b"RVIDX001"`, then fixed records of [`RECORD`] bytes:
//! kind u8 (1 cut, 2 checkpoint binding, 3 console binding, 4 end, 5
//! coverage claim), 3 zero
//! bytes, id u32, value u64, event u64, seq u32, flags u32, offset u64,
//! first u64, hash [32], link [32] = SHA-256(previous link || the 80 bytes
//! before it). See docs/recording-format.md.

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::Event;

pub const FILE_MAGIC: &[u8; 8] = b"RVIDX001";
pub const RECORD: usize = 112;
const BODY: usize = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `Checkpoint { id, exits: value }` is event `event`; chunk `seq`
    /// after the one holding it starts at byte `offset` with event `first`,
    /// and the log's chain hash before it is `hash`.
    Cut = 1,
    /// `CheckpointFile { id }` is event `event` in chunk `seq`: the file's
    /// SHA-256 is `hash` (flags & DROPPED: dropped; & NOT_SHA: the log's
    /// string is no SHA-256, `hash` is the string's own SHA-256).
    Bind = 2,
    /// `ConsoleFile` or `End` (event `event`, chunk `seq`): console.log's
    /// first `value` bytes have SHA-256 `hash` (flags & NOT_SHA as above).
    Console = 3,
    /// The log ends (after `End`, event `event`): chunk `seq` would start
    /// at `offset` (the file's length) with event `first`; chain head `hash`.
    End = 4,
    /// `CheckpointCovered` (event `event`, chunk `seq`): every page and
    /// sector of checkpoint `id`'s file with SHA-256 `hash` is in a later
    /// kept file up to checkpoint `value` (flags & NOT_SHA as above: then
    /// the claim matches no file and is not used). Format version 4.
    Cover = 5,
}

pub const DROPPED: u32 = 1;
pub const NOT_SHA: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub id: u32,
    pub value: u64,
    pub event: u64,
    pub seq: u32,
    pub flags: u32,
    pub offset: u64,
    pub first: u64,
    pub hash: [u8; 32],
}

/// Where a chunk starts and the chain hash before it: where a reader can
/// begin verifying the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    pub seq: u32,
    pub offset: u64,
    pub first: u64,
    pub prev: [u8; 32],
}

impl Record {
    pub fn at(&self) -> At {
        At { seq: self.seq, offset: self.offset, first: self.first, prev: self.hash }
    }

    fn body(&self) -> [u8; BODY] {
        let mut b = [0u8; BODY];
        b[0] = self.kind as u8;
        b[4..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..16].copy_from_slice(&self.value.to_le_bytes());
        b[16..24].copy_from_slice(&self.event.to_le_bytes());
        b[24..28].copy_from_slice(&self.seq.to_le_bytes());
        b[28..32].copy_from_slice(&self.flags.to_le_bytes());
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.first.to_le_bytes());
        b[48..80].copy_from_slice(&self.hash);
        b
    }

    fn parse(b: &[u8; BODY]) -> Option<Record> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let kind = match b[0] {
            1 => Kind::Cut,
            2 => Kind::Bind,
            3 => Kind::Console,
            4 => Kind::End,
            5 => Kind::Cover,
            _ => return None,
        };
        if b[1..4] != [0, 0, 0] {
            return None;
        }
        Some(Record {
            kind,
            id: u32_at(4),
            value: u64_at(8),
            event: u64_at(16),
            seq: u32_at(24),
            flags: u32_at(28),
            offset: u64_at(32),
            first: u64_at(40),
            hash: b[48..80].try_into().expect("32 bytes"),
        })
    }

    /// The SHA-256 a binding names, as the log's hex (empty when dropped).
    pub fn sha_hex(&self) -> Option<String> {
        if self.flags & NOT_SHA != 0 {
            None
        } else if self.flags & DROPPED != 0 {
            Some(String::new())
        } else {
            Some(hex::encode(self.hash))
        }
    }
}

/// The index chain's start: bound to the log's genesis, so to meta.json.
pub fn genesis(log_genesis: &[u8; 32]) -> [u8; 32] {
    Sha256::new().chain_update(b"revirt-index-v1\0").chain_update(log_genesis).finalize().into()
}

fn link(prev: &[u8; 32], body: &[u8; BODY]) -> [u8; 32] {
    Sha256::new().chain_update(prev).chain_update(body).finalize().into()
}

/// A SHA-256 in the log's hex as index bytes and flags.
fn sha_field(hex_sha: &str) -> ([u8; 32], u32) {
    if hex_sha.is_empty() {
        return ([0; 32], DROPPED);
    }
    match hex::decode(hex_sha).ok().and_then(|v| <[u8; 32]>::try_from(v).ok()) {
        Some(h) if hex::encode(h) == hex_sha => (h, 0),
        _ => (Sha256::digest(hex_sha.as_bytes()).into(), NOT_SHA),
    }
}

/// What of one event goes into the index (most events: nothing).
#[derive(Debug, Clone)]
pub enum Note {
    Checkpoint { id: u32, exits: u64 },
    Bind { id: u32, sha256: String },
    Console { len: u64, sha256: String },
    End { len: u64, sha256: String },
    Cover { id: u32, by: u32, sha256: String },
}

pub fn note(e: &Event) -> Option<Note> {
    match e {
        Event::Checkpoint { id, exits, .. } => Some(Note::Checkpoint { id: *id, exits: *exits }),
        Event::CheckpointFile { id, sha256, .. } => Some(Note::Bind { id: *id, sha256: sha256.clone() }),
        Event::ConsoleFile { len, sha256, .. } => Some(Note::Console { len: *len, sha256: sha256.clone() }),
        Event::End { output_len, output_sha256, .. } => Some(Note::End { len: *output_len, sha256: output_sha256.clone() }),
        Event::CheckpointCovered { id, by, sha256, .. } => Some(Note::Cover { id: *id, by: *by, sha256: sha256.clone() }),
        _ => None,
    }
}

/// The records of one chunk (`seq`, holding the events `notes` names by
/// index), given where the next chunk starts (`after`): the one rule the
/// writer and every reader share.
pub fn records(notes: &[(u64, Note)], seq: u32, after: At, out: &mut Vec<Record>) {
    let base = Record { kind: Kind::Cut, id: 0, value: 0, event: 0, seq, flags: 0, offset: 0, first: 0, hash: [0; 32] };
    for (event, n) in notes {
        let event = *event;
        match n {
            Note::Checkpoint { id, exits } => out.push(Record {
                kind: Kind::Cut,
                id: *id,
                value: *exits,
                event,
                seq: after.seq,
                offset: after.offset,
                first: after.first,
                hash: after.prev,
                ..base
            }),
            Note::Bind { id, sha256 } => {
                let (hash, flags) = sha_field(sha256);
                out.push(Record { kind: Kind::Bind, id: *id, event, flags, hash, ..base });
            }
            Note::Cover { id, by, sha256 } => {
                // An empty SHA-256 names no file (not a drop).
                let (hash, flags) = sha_field(sha256);
                let flags = if flags != 0 { NOT_SHA } else { 0 };
                out.push(Record { kind: Kind::Cover, id: *id, value: u64::from(*by), event, flags, hash, ..base });
            }
            Note::Console { len, sha256 } | Note::End { len, sha256 } => {
                // An empty console SHA-256 is no SHA-256 (not a drop).
                let (hash, flags) = sha_field(sha256);
                let flags = if flags != 0 { NOT_SHA } else { 0 };
                out.push(Record { kind: Kind::Console, value: *len, event, flags, hash, ..base });
                if matches!(n, Note::End { .. }) {
                    out.push(Record { kind: Kind::End, event, seq: after.seq, offset: after.offset, first: after.first, hash: after.prev, ..base });
                }
            }
        }
    }
}

/// Appends records to `events.idx`, continuing its chain.
pub struct Writer {
    out: std::io::BufWriter<std::fs::File>,
    link: [u8; 32],
    pub records: u64,
}

impl Writer {
    pub fn create(path: &Path, log_genesis: &[u8; 32]) -> std::io::Result<Writer> {
        let mut out = std::io::BufWriter::with_capacity(64 << 10, std::fs::File::create(path)?);
        out.write_all(FILE_MAGIC)?;
        Ok(Writer { out, link: genesis(log_genesis), records: 0 })
    }

    pub fn push(&mut self, r: &Record) -> std::io::Result<()> {
        let body = r.body();
        self.link = link(&self.link, &body);
        self.out.write_all(&body)?;
        self.out.write_all(&self.link)?;
        self.records += 1;
        Ok(())
    }

    /// Hands what was pushed to the kernel.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// An index as read: the records whose chain verifies, and why it stops
/// where it does (None: every byte verified).
#[derive(Debug, Clone)]
pub struct Index {
    pub records: Vec<Record>,
    pub stop: Option<Stop>,
    /// The last verified link (hex): the index's chain head.
    pub head: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// A record cut short at the end (a killed recorder): truncation.
    Cut(String),
    /// Bytes present fail their link or do not decode: damage.
    Damaged(String),
}

impl Index {
    pub fn read(path: &Path, log_genesis: &[u8; 32]) -> std::io::Result<Index> {
        Ok(Self::parse(&std::fs::read(path)?, log_genesis))
    }

    pub fn parse(b: &[u8], log_genesis: &[u8; 32]) -> Index {
        let mut prev = genesis(log_genesis);
        let mut records = Vec::new();
        let done = |records, prev: [u8; 32], stop| Index { records, stop, head: hex::encode(prev) };
        if b.len() < 8 || &b[..8] != FILE_MAGIC {
            let stop = if b.len() < 8 && FILE_MAGIC.starts_with(b) { Stop::Cut("the file header is cut short".into()) } else { Stop::Damaged("bad file header".into()) };
            return done(records, prev, Some(stop));
        }
        for (i, r) in b[8..].chunks(RECORD).enumerate() {
            if r.len() < RECORD {
                return done(records, prev, Some(Stop::Cut(format!("record {i} is cut short ({} of {RECORD} bytes)", r.len()))));
            }
            let body: &[u8; BODY] = r[..BODY].try_into().expect("80 bytes");
            let next = link(&prev, body);
            if next[..] != r[BODY..] {
                return done(records, prev, Some(Stop::Damaged(format!("record {i} fails its link in the chain (damaged or tampered)"))));
            }
            let Some(rec) = Record::parse(body) else {
                return done(records, prev, Some(Stop::Damaged(format!("record {i} does not decode"))));
            };
            records.push(rec);
            prev = next;
        }
        done(records, prev, None)
    }

    /// The latest binding of each checkpoint (the log's rule: the latest
    /// `CheckpointFile` for an id counts); None where a binding is no SHA-256.
    pub fn bindings(&self) -> Option<std::collections::HashMap<u32, String>> {
        let binds = || self.records.iter().filter(|r| r.kind == Kind::Bind);
        if binds().any(|r| r.flags & NOT_SHA != 0) {
            return None;
        }
        // Hex only for the latest binding of each id (a seek on a long
        // recording would otherwise encode every superseded one too).
        self.latest_binds().into_values().map(|r| Some((r.id, r.sha_hex()?))).collect()
    }

    fn latest_binds(&self) -> std::collections::HashMap<u32, &Record> {
        self.records.iter().filter(|r| r.kind == Kind::Bind).map(|r| (r.id, r)).collect()
    }

    /// The coverage claims (`Kind::Cover`) about the files as bound now:
    /// (checkpoint, its file's SHA-256) -> the earliest `by` claimed.
    /// Claims about an earlier version of a file, a dropped one or no
    /// SHA-256 are left out (they match no file a reader would open).
    pub fn covers(&self) -> super::checkpoint::Covers {
        let latest = self.latest_binds();
        let mut out = super::checkpoint::Covers::new();
        for r in self.records.iter().filter(|r| r.kind == Kind::Cover && r.flags & NOT_SHA == 0) {
            if !latest.get(&r.id).is_some_and(|b| b.flags == 0 && b.hash == r.hash) {
                continue;
            }
            let by = u32::try_from(r.value).unwrap_or(u32::MAX);
            let e = out.entry((r.id, hex::encode(r.hash))).or_insert(by);
            *e = (*e).min(by);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        let mut out = Vec::new();
        let at = At { seq: 3, offset: 999, first: 40, prev: [7; 32] };
        let notes = vec![
            (38, Note::Checkpoint { id: 2, exits: 500 }),
            (39, Note::Bind { id: 1, sha256: hex::encode([9u8; 32]) }),
            (40, Note::Bind { id: 0, sha256: String::new() }),
            (41, Note::Console { len: 12, sha256: "nothex".into() }),
            (42, Note::End { len: 12, sha256: hex::encode([1u8; 32]) }),
            (43, Note::Cover { id: 1, by: 2, sha256: hex::encode([9u8; 32]) }),
            (44, Note::Cover { id: 1, by: 5, sha256: hex::encode([9u8; 32]) }),
            (45, Note::Cover { id: 0, by: 2, sha256: "nothex".into() }),
        ];
        records(&notes, 2, at, &mut out);
        out
    }

    #[test]
    fn round_trip_and_every_byte_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("events.idx");
        let g = [5u8; 32];
        let mut w = Writer::create(&p, &g).unwrap();
        let recs = sample();
        assert_eq!(recs.len(), 9);
        for r in &recs {
            w.push(r).unwrap();
        }
        w.flush().unwrap();
        let ix = Index::read(&p, &g).unwrap();
        assert_eq!(ix.stop, None);
        assert_eq!(ix.records, recs);
        let b = ix.bindings();
        assert!(b.is_some());
        let b = b.unwrap();
        assert_eq!(b[&1], hex::encode([9u8; 32]));
        assert_eq!(b[&0], "");
        // The earliest claim per (id, SHA-256); one naming no SHA-256 is not used.
        let c = ix.covers();
        assert_eq!(c.len(), 1);
        assert_eq!(c[&(1, hex::encode([9u8; 32]))], 2);
        // Another recording's genesis: nothing verifies.
        assert!(Index::read(&p, &[6; 32]).unwrap().records.is_empty());
        let bytes = std::fs::read(&p).unwrap();
        for i in 0..bytes.len() {
            let mut c = bytes.clone();
            c[i] ^= 0x10;
            let ix = Index::parse(&c, &g);
            assert!(matches!(ix.stop, Some(Stop::Damaged(_))), "flip at {i}: {:?}", ix.stop);
        }
        for cut in [3, 9, 8 + RECORD / 2, bytes.len() - 1] {
            let ix = Index::parse(&bytes[..cut], &g);
            assert!(matches!(ix.stop, Some(Stop::Cut(_))), "cut at {cut}: {:?}", ix.stop);
            assert_eq!(ix.records[..], recs[..ix.records.len()]);
        }
    }
}
