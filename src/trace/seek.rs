//! Opening a recording to seek to one point without reading all of it: the
//! reader's cost no longer grows with the recording's length.
//!
//! A seek to exit P restores the nearest kept checkpoint k before P and
//! replays from there, so it uses: meta.json, image.elf, the files of the
//! kept checkpoints 0..=k, the log from k's `Checkpoint` event to past P,
//! and console.log up to P. [`open`] checks exactly these, each read once
//! (the bytes checked are the bytes used):
//! - meta.json and image.elf as a full check does;
//! - `events.idx`, its SHA-256 chain from the log's genesis (so from
//!   meta.json) verified record by record; it must end with the log's end
//!   (an `End` record whose offset is the log file's length): only a
//!   finished recording seeks this way;
//! - the log from the index's cut before checkpoint k to its first cut past
//!   P: every chunk verified from the chain hash the index holds at the first
//!   cut, ending exactly at the chain hash it holds at the last, and the
//!   index records of those chunks derived again and compared;
//! - each checkpoint file against its latest binding in the index, when
//!   replay reads it (`checkpoint::Seals`, as for a full check); a file the
//!   index's coverage claims say later files replace is not read at all;
//! - console.log's first bytes against the index's latest console binding.
//!
//! Anything else (a version-2 recording, no index, an index that stops
//! early, any check that fails) gives `None`: the caller then runs the full
//! check, which reads everything and names what is wrong. So a seek never
//! acts on bytes it has not checked, damage in what it reads is refused as
//! before, and damage in the parts of the log it does not read is found by
//! `revirt verify` and by any replay to the end.

use std::io::{Read, Seek};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::index::{At, Index, Kind, Record};
use super::{log, Event, LogReader, Meta};

/// What [`open`] checked and read.
pub struct Window {
    pub meta: Meta,
    pub image: Vec<u8>,
    /// console.log's first bytes, as far as the index's last console
    /// binding vouches (for a finished recording: all of it).
    pub console: Vec<u8>,
    /// Every checkpoint the log names, in order: (id, exits, index of its
    /// `Checkpoint` event); dropped ones included (`bindings` says which).
    pub checkpoints: Vec<(u32, u64, usize)>,
    /// The latest binding of each checkpoint (empty: dropped).
    pub bindings: std::collections::HashMap<u32, String>,
    /// The coverage claims (format version 4; `checkpoint::Seals::covered`).
    pub covers: super::checkpoint::Covers,
    /// The events from `base` on, up to past the target.
    pub events: Vec<Event>,
    pub base: usize,
    /// Events in the whole log.
    pub total: usize,
    /// One line: what was checked.
    pub summary: String,
}

/// The checkpoint a seek to `to` (exits) starts from: `from`, else the
/// last kept one before `to` (at or before, for an exit-clock recording).
fn start_checkpoint(cuts: &[&Record], bindings: &std::collections::HashMap<u32, String>, from: Option<u32>, to: u64, precise: bool) -> Option<u32> {
    if from.is_some() {
        return from;
    }
    let kept = |id: u32| bindings.get(&id).is_some_and(|s| !s.is_empty());
    cuts.iter().rev().find(|c| kept(c.id) && if precise { c.value < to } else { c.value <= to }).map(|c| c.id).or(Some(0))
}

/// Opens the recording in `dir` for a seek to exit `to` (from checkpoint
/// `from` if given). None: this recording cannot be opened this way, or
/// something failed a check; use the full check.
pub fn open(dir: &Path, from: Option<u32>, to: u64) -> Option<Window> {
    let meta_bytes = std::fs::read(dir.join(super::META)).ok()?;
    let meta = Meta::parse(&meta_bytes, &dir.join(super::META)).ok()?;
    if meta.version < 3 {
        return None;
    }
    let genesis = log::genesis(&meta_bytes);
    let ix = Index::read(&dir.join(super::INDEX), &genesis).ok()?;
    if ix.stop.is_some() {
        return None;
    }
    let end = *ix.records.last().filter(|r| r.kind == Kind::End)?;
    let mut logf = std::fs::File::open(dir.join(super::EVENTS)).ok()?;
    if logf.metadata().ok()?.len() != end.offset {
        return None;
    }
    let image = std::fs::read(dir.join(super::IMAGE)).ok()?;
    if hex::encode(Sha256::digest(&image)) != meta.image.sha256 {
        return None;
    }
    let bindings = ix.bindings()?;
    let cuts: Vec<&Record> = ix.records.iter().filter(|r| r.kind == Kind::Cut).collect();
    let k = start_checkpoint(&cuts, &bindings, from, to, meta.clock.is_precise())?;
    let kc = cuts.iter().find(|c| c.id == k)?;
    // From the cut before checkpoint k's event (the chunk holding it starts
    // there or later) to the first cut past the target (every event up to
    // it lies before that checkpoint's event).
    let first = cuts.iter().rev().find(|c| c.first <= kc.event).map(|c| c.at()).unwrap_or(At { seq: 0, offset: log::FILE_MAGIC.len() as u64, first: 0, prev: genesis });
    let last = cuts.iter().find(|c| c.value > to && c.event > kc.event).map(|c| c.at()).unwrap_or(end.at());
    let mut bytes = vec![0u8; usize::try_from(last.offset.checked_sub(first.offset)?).ok()?];
    logf.seek(std::io::SeekFrom::Start(first.offset)).ok()?;
    logf.read_exact(&mut bytes).ok()?;
    let lr = LogReader::parse_from(&bytes, first);
    if lr.status.is_damaged() || lr.end != last {
        return None;
    }
    // The window's own index records, derived again, are the index's.
    let held: Vec<Record> = ix.records.iter().filter(|r| r.event >= first.first && r.event < last.first).copied().collect();
    if held != lr.index {
        return None;
    }
    let console_len = ix.records.iter().rev().find(|r| r.kind == Kind::Console)?;
    let want = console_len.sha_hex().filter(|s| !s.is_empty())?;
    let mut console = std::fs::read(dir.join(super::CONSOLE)).ok()?;
    console.truncate(usize::try_from(console_len.value).ok()?);
    if console.len() as u64 != console_len.value || hex::encode(Sha256::digest(&console)) != want {
        return None;
    }
    let summary = format!(
        "integrity (seek): checked meta.json, image.elf (SHA-256 in meta.json), events.idx ({} records, SHA-256 chain, ends with the log's end), events.log chunks {}..{} of {} (events {}..{}, from checkpoint {k}'s segment to past exit {to}, verified from the index's chain hashes), the checkpoints as restored (SHA-256 bound in the chain), console.log ({} bytes bound in the chain); the rest of the log is not read (`revirt verify` checks everything): intact",
        ix.records.len(),
        first.seq,
        last.seq,
        end.seq,
        first.first,
        last.first,
        console.len()
    );
    Some(Window {
        meta,
        image,
        console,
        checkpoints: cuts.iter().map(|c| (c.id, c.value, c.event as usize)).collect(),
        bindings,
        covers: ix.covers(),
        events: lr.events,
        base: first.first as usize,
        total: end.first as usize,
        summary,
    })
}
