//! The event log: a file header, then chunks of postcard-encoded events,
//! zstd-compressed, each sealed with SHA-256 over (previous chunk's hash,
//! its header, its payload). A reader stops at the first chunk that is cut
//! short or does not verify, and says so; everything before it is usable.
//!
//! Events are queued in an in-memory batch (ReVirt's log buffer) that a
//! writer thread swaps out and drains, so the vCPU never waits for
//! compression or the disk, and logging an event neither allocates (the two
//! batches keep their capacity) nor makes a system call (an uncontended
//! mutex; the writer is woken only when a batch fills or is asked to flush).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::event::Event;
use super::index;

pub const FILE_MAGIC: &[u8; 8] = b"RVLOG001";
pub const CHUNK_MAGIC: &[u8; 4] = b"CHNK";
/// magic, seq u32, first_event u64, n_events u32, raw_len u32, comp_len u32
pub const CHUNK_HEADER: usize = 4 + 4 + 8 + 4 + 4 + 4;
const MAX_RAW: usize = 64 << 20;

/// Flush a chunk at this many raw bytes, events, or this long after its first event.
const CHUNK_BYTES: usize = 256 << 10;
const CHUNK_EVENTS: u32 = 16384;
const CHUNK_AGE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event log {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("event log {0}: not a revirt event log (bad file header)")]
    BadHeader(String),
    #[error("event log writer: {0}")]
    Writer(String),
}

/// (offset, length) of each whole chunk in the bytes of an events.log, as
/// far as the chunk headers' lengths lead (nothing is verified): for tools
/// and tests that cut or damage a log chunk by chunk.
pub fn chunk_spans(log: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut at = FILE_MAGIC.len();
    while at + CHUNK_HEADER <= log.len() {
        let comp = u32::from_le_bytes(log[at + CHUNK_HEADER - 4..at + CHUNK_HEADER].try_into().expect("4 bytes")) as usize;
        let len = CHUNK_HEADER + comp + 32;
        spans.push((at, len));
        at += len;
    }
    spans
}

/// The hash chain starts from the exact bytes of the recording's meta.json
/// (which holds a random id), so changing any byte of meta.json, or moving a
/// log under another recording, breaks the chain at its first chunk.
pub fn genesis(meta_json: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"revirt-events-v1\0")
        .chain_update(meta_json)
        .finalize()
        .into()
}

/// The genesis of the recording in `dir` (from its meta.json).
pub fn genesis_of(dir: &Path) -> Result<[u8; 32], LogError> {
    let p = dir.join(super::META);
    std::fs::read(&p)
        .map(|b| genesis(&b))
        .map_err(|source| LogError::Io { path: p.display().to_string(), source })
}

fn seal(prev: &[u8; 32], header: &[u8], payload: &[u8]) -> [u8; 32] {
    Sha256::new().chain_update(prev).chain_update(header).chain_update(payload).finalize().into()
}

/// One sealed chunk as it lies in the file, from its parts (the header
/// fields are taken as given, true or not): for tools and tests that build
/// or re-seal logs. Returns the bytes and the chunk's hash.
pub fn encode_chunk(prev: &[u8; 32], seq: u32, first_event: u64, n_events: u32, raw_len: u32, comp: &[u8]) -> (Vec<u8>, [u8; 32]) {
    let mut b = Vec::with_capacity(CHUNK_HEADER + comp.len() + 32);
    b.extend_from_slice(CHUNK_MAGIC);
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&first_event.to_le_bytes());
    b.extend_from_slice(&n_events.to_le_bytes());
    b.extend_from_slice(&raw_len.to_le_bytes());
    b.extend_from_slice(&(comp.len() as u32).to_le_bytes());
    let hash = seal(prev, &b, comp);
    b.extend_from_slice(comp);
    b.extend_from_slice(&hash);
    (b, hash)
}

/// What the vCPU thread hands over: queued events, flush requests, the end.
#[derive(Default)]
struct Batch {
    events: Vec<Event>,
    /// Flush, then answer where the log ends.
    heads: Vec<mpsc::SyncSender<Result<LogHead, String>>>,
    /// Close the chunk after these events (a checkpoint), without waiting.
    cut: bool,
    closed: bool,
}

#[derive(Default)]
struct Queue {
    batch: Mutex<Batch>,
    wake: Condvar,
}

/// Where a log ends after a flush: what an appender needs to continue its
/// hash chain (a recording that migrates goes on at the destination).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogHead {
    /// Hash of the last chunk (hex), or the genesis when there is none.
    pub prev: String,
    /// Sequence number of the next chunk.
    pub seq: u32,
    /// Index of the next event.
    pub next_event: u64,
    /// File length: where the next chunk starts.
    pub len: u64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct WriterStats {
    pub events: u64,
    pub chunks: u64,
    pub raw_bytes: u64,
    pub compressed_bytes: u64,
}

pub struct LogWriter {
    queue: Arc<Queue>,
    thread: Option<JoinHandle<Result<WriterStats, String>>>,
}

struct ChunkWriter {
    out: BufWriter<File>,
    prev: [u8; 32],
    seq: u32,
    next_event: u64,
    buf: Vec<u8>,
    n: u32,
    first_at: Option<Instant>,
    stats: WriterStats,
    /// Bytes of the log file so far (where the next chunk starts).
    len: u64,
    /// The seek index, and what of the open chunk's events goes into it.
    index: Option<index::Writer>,
    notes: Vec<(u64, index::Note)>,
}

impl ChunkWriter {
    fn flush_chunk(&mut self) -> Result<(), String> {
        if self.n > 0 {
            let comp = zstd::bulk::compress(&self.buf, 3).map_err(|e| e.to_string())?;
            let mut h = Vec::with_capacity(CHUNK_HEADER);
            h.extend_from_slice(CHUNK_MAGIC);
            h.extend_from_slice(&self.seq.to_le_bytes());
            h.extend_from_slice(&(self.next_event).to_le_bytes());
            h.extend_from_slice(&self.n.to_le_bytes());
            h.extend_from_slice(&(self.buf.len() as u32).to_le_bytes());
            h.extend_from_slice(&(comp.len() as u32).to_le_bytes());
            let hash = seal(&self.prev, &h, &comp);
            self.out.write_all(&h).map_err(|e| e.to_string())?;
            self.out.write_all(&comp).map_err(|e| e.to_string())?;
            self.out.write_all(&hash).map_err(|e| e.to_string())?;
            self.prev = hash;
            self.seq += 1;
            self.next_event += self.n as u64;
            self.len += (CHUNK_HEADER + comp.len() + 32) as u64;
            if let Some(ix) = &mut self.index {
                let after = index::At { seq: self.seq, offset: self.len, first: self.next_event, prev: hash };
                let mut recs = Vec::new();
                index::records(&self.notes, self.seq - 1, after, &mut recs);
                for r in &recs {
                    ix.push(r).map_err(|e| format!("seek index: {e}"))?;
                }
            }
            self.notes.clear();
            self.stats.chunks += 1;
            self.stats.raw_bytes += self.buf.len() as u64;
            self.stats.compressed_bytes += (CHUNK_HEADER + comp.len() + 32) as u64;
            self.buf.clear();
            self.n = 0;
            self.first_at = None;
        }
        // Hand the bytes to the kernel: a killed recorder loses nothing
        // flushed. The log first: an index never names a chunk the log lacks.
        self.out.flush().map_err(|e| e.to_string())?;
        match &mut self.index {
            Some(ix) => ix.flush().map_err(|e| format!("seek index: {e}")),
            None => Ok(()),
        }
    }

    fn add(&mut self, e: &Event) -> Result<(), String> {
        if let Some(n) = index::note(e) {
            self.notes.push((self.next_event + self.n as u64, n));
        }
        postcard::to_io(e, &mut self.buf).map_err(|e| e.to_string())?;
        self.n += 1;
        self.stats.events += 1;
        self.first_at.get_or_insert_with(Instant::now);
        if self.buf.len() >= CHUNK_BYTES || self.n >= CHUNK_EVENTS || matches!(e, Event::End { .. }) {
            self.flush_chunk()?;
        }
        Ok(())
    }
}

fn writer_thread(mut w: ChunkWriter, q: Arc<Queue>, rebuild: Option<Rebuild>) -> Result<WriterStats, String> {
    let mut failed: Option<String> = None;
    if let Some(r) = rebuild {
        w.index = r.run();
    }
    let mut spare: Vec<Event> = Vec::with_capacity(CHUNK_EVENTS as usize);
    loop {
        let (heads, closed, cut) = {
            let mut b = q.batch.lock().unwrap_or_else(|p| p.into_inner());
            if b.events.is_empty() && b.heads.is_empty() && !b.closed && !b.cut {
                let timeout = match w.first_at {
                    Some(t) => CHUNK_AGE.saturating_sub(t.elapsed()),
                    None => CHUNK_AGE,
                };
                b = q.wake.wait_timeout(b, timeout).unwrap_or_else(|p| p.into_inner()).0;
            }
            std::mem::swap(&mut b.events, &mut spare);
            (std::mem::take(&mut b.heads), b.closed, std::mem::take(&mut b.cut))
        };
        for e in spare.drain(..) {
            if failed.is_none() {
                if let Err(e) = w.add(&e) {
                    failed = Some(e);
                }
            }
        }
        if failed.is_none() && (cut || w.first_at.is_some_and(|t| t.elapsed() >= CHUNK_AGE)) {
            if let Err(e) = w.flush_chunk() {
                failed = Some(e);
            }
        }
        for reply in heads {
            let r = match &failed {
                Some(f) => Err(f.clone()),
                None => w.flush_chunk().and_then(|_| {
                    let len = w.out.get_ref().metadata().map_err(|e| e.to_string())?.len();
                    Ok(LogHead { prev: hex::encode(w.prev), seq: w.seq, next_event: w.next_event, len })
                }),
            };
            if let Err(e) = &r {
                failed.get_or_insert(e.clone());
            }
            let _ = reply.send(r);
        }
        if closed {
            return match failed {
                Some(f) => Err(f),
                None => w.flush_chunk().map(|_| w.stats),
            };
        }
    }
}

/// An empty log (its header alone): a recorder killed before its first
/// event leaves a recording that says it is empty, not one without a log.
pub fn create_empty(path: &Path) -> Result<(), LogError> {
    std::fs::write(path, FILE_MAGIC).map_err(|source| LogError::Io { path: path.display().to_string(), source })
}

impl LogWriter {
    pub fn create(path: &Path, genesis: [u8; 32]) -> Result<LogWriter, LogError> {
        let io = |source| LogError::Io { path: path.display().to_string(), source };
        let f = File::create(path).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.write_all(FILE_MAGIC).map_err(io)?;
        out.flush().map_err(io)?;
        let ix = index::Writer::create(&index_path(path), &genesis).map_err(io)?;
        Self::start(out, genesis, (0, 0, FILE_MAGIC.len() as u64), Some(ix), None, path)
    }

    /// Continues a log another writer left at `head` (the file holds exactly
    /// `head.len` bytes of it; anything after is cut off).
    pub fn append(path: &Path, head: &LogHead) -> Result<LogWriter, LogError> {
        let io = |source| LogError::Io { path: path.display().to_string(), source };
        let bad = |m: String| LogError::Writer(format!("{}: {m}", path.display()));
        let prev: [u8; 32] = hex::decode(&head.prev)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("log head is not a SHA-256".into()))?;
        let f = std::fs::OpenOptions::new().write(true).open(path).map_err(io)?;
        let have = f.metadata().map_err(io)?.len();
        if have < head.len {
            return Err(bad(format!("holds {have} bytes, the log head says {}", head.len)));
        }
        f.set_len(head.len).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        use std::io::Seek;
        out.seek(std::io::SeekFrom::End(0)).map_err(io)?;
        // The seek index is not migrated: the writer thread derives it
        // again from the log (off the vCPU's path) before going on.
        let rebuild = Some(Rebuild { log: path.to_path_buf(), head: head.clone() });
        Self::start(out, prev, (head.seq, head.next_event, head.len), None, rebuild, path)
    }

    fn start(
        out: BufWriter<File>,
        prev: [u8; 32],
        (seq, next_event, len): (u32, u64, u64),
        index: Option<index::Writer>,
        rebuild: Option<Rebuild>,
        path: &Path,
    ) -> Result<LogWriter, LogError> {
        let io = |source| LogError::Io { path: path.display().to_string(), source };
        let w = ChunkWriter {
            out,
            prev,
            seq,
            next_event,
            buf: Vec::with_capacity(CHUNK_BYTES + 1024),
            n: 0,
            first_at: None,
            stats: WriterStats::default(),
            len,
            index,
            notes: Vec::new(),
        };
        let queue = Arc::new(Queue::default());
        queue.batch.lock().unwrap_or_else(|p| p.into_inner()).events.reserve(CHUNK_EVENTS as usize);
        let q = queue.clone();
        let thread = std::thread::Builder::new()
            .name("revirt-log-writer".into())
            .spawn(move || writer_thread(w, q, rebuild))
            .map_err(io)?;
        Ok(LogWriter { queue, thread: Some(thread) })
    }

    /// Queues an event; never blocks on I/O, and (once the batches have
    /// grown to their working size) neither allocates nor enters the kernel:
    /// the writer is woken only when half a chunk's worth is waiting.
    pub fn push(&self, e: Event) {
        let mut b = self.queue.batch.lock().unwrap_or_else(|p| p.into_inner());
        b.events.push(e);
        if b.events.len() == CHUNK_EVENTS as usize / 2 {
            self.queue.wake.notify_one();
        }
    }

    /// Closes the chunk after the events queued so far (at a checkpoint),
    /// without waiting for it.
    pub fn cut(&self) {
        self.queue.batch.lock().unwrap_or_else(|p| p.into_inner()).cut = true;
        self.queue.wake.notify_one();
    }

    /// Waits until every queued event is on disk (in the kernel's hands).
    pub fn flush(&self) -> Result<(), LogError> {
        self.head().map(|_| ())
    }

    /// Flushes and says where the log ends.
    pub fn head(&self) -> Result<LogHead, LogError> {
        self.head_later()?
            .recv()
            .map_err(|_| LogError::Writer("writer thread is gone".into()))?
            .map_err(LogError::Writer)
    }

    /// Asks for a flush without waiting: the answer (where the log ends, once
    /// every event queued so far is in the kernel's hands) arrives on the
    /// receiver, for another thread to wait on.
    pub fn head_later(&self) -> Result<mpsc::Receiver<Result<LogHead, String>>, LogError> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        {
            let mut b = self.queue.batch.lock().unwrap_or_else(|p| p.into_inner());
            if b.closed {
                return Err(LogError::Writer("closed".into()));
            }
            b.heads.push(rtx);
        }
        self.queue.wake.notify_one();
        Ok(rrx)
    }

    fn close(&self) {
        self.queue.batch.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.queue.wake.notify_one();
    }

    pub fn finish(mut self) -> Result<WriterStats, LogError> {
        self.close();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r.map_err(LogError::Writer),
            _ => Err(LogError::Writer("writer thread panicked".into())),
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The seek index beside the log at `log`.
pub fn index_path(log: &Path) -> std::path::PathBuf {
    log.with_file_name(super::INDEX)
}

/// A log continued elsewhere (migration) gets its seek index derived again
/// from the log's bytes up to the head, checked against the head.
struct Rebuild {
    log: std::path::PathBuf,
    head: LogHead,
}

impl Rebuild {
    /// The index writer to go on with, or None (no index: readers of this
    /// recording then check the whole log, as for a recording without one).
    fn run(self) -> Option<index::Writer> {
        let w = self.derive();
        if w.is_none() {
            let _ = std::fs::remove_file(index_path(&self.log));
        }
        w
    }

    fn derive(&self) -> Option<index::Writer> {
        let genesis = genesis_of(self.log.parent()?).ok()?;
        let bytes = std::fs::read(&self.log).ok()?;
        let r = LogReader::parse(bytes.get(8..usize::try_from(self.head.len).ok()?)?, genesis);
        if r.head != self.head.prev || r.chunks != self.head.seq {
            return None;
        }
        let mut w = index::Writer::create(&index_path(&self.log), &genesis).ok()?;
        for rec in &r.index {
            w.push(rec).ok()?;
        }
        w.flush().ok()?;
        Some(w)
    }
}

/// Whether the log holds the whole recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogStatus {
    /// Every chunk verified and the last event is `End`.
    Complete,
    /// Usable up to the events returned; `reason` says what is missing or
    /// damaged. `damaged`: bytes present fail to verify (edited or
    /// corrupted), as opposed to a log that merely stops early (cut short).
    Incomplete { reason: String, damaged: bool },
}

impl LogStatus {
    pub fn is_damaged(&self) -> bool {
        matches!(self, LogStatus::Incomplete { damaged: true, .. })
    }
}

pub struct LogReader {
    pub events: Vec<Event>,
    pub status: LogStatus,
    /// Chunks verified (with [`LogReader::parse_from`]: up to `seq` of the
    /// first chunk not read).
    pub chunks: u32,
    /// Hash of the last verified chunk (the chain head), hex.
    pub head: String,
    /// The seek index records of the chunks verified, derived from them
    /// (what `events.idx` must hold).
    pub index: Vec<index::Record>,
    /// Where the chunk after the last verified one starts.
    pub end: index::At,
}

impl LogReader {
    pub fn read(path: &Path, genesis: [u8; 32]) -> Result<LogReader, LogError> {
        let bytes = std::fs::read(path)
            .map_err(|source| LogError::Io { path: path.display().to_string(), source })?;
        if bytes.len() < 8 || &bytes[..8] != FILE_MAGIC {
            return Err(LogError::BadHeader(path.display().to_string()));
        }
        Ok(Self::parse(&bytes[8..], genesis))
    }

    /// Verifies and decodes chunks until the first problem.
    pub fn parse(b: &[u8], genesis: [u8; 32]) -> LogReader {
        Self::parse_from(b, index::At { seq: 0, offset: FILE_MAGIC.len() as u64, first: 0, prev: genesis })
    }

    /// [`LogReader::parse`] from the middle of a log: `b` is the file from
    /// chunk `from.seq` on (at byte `from.offset`, first event `from.first`),
    /// verified from the chain hash `from.prev`; `events` then holds the
    /// events from `from.first` on.
    pub fn parse_from(mut b: &[u8], from: index::At) -> LogReader {
        let mut events = Vec::new();
        let mut prev = from.prev;
        let mut seq = from.seq;
        let mut offset = from.offset as usize;
        let mut derived = Vec::new();
        let mut end = from;
        let incomplete = |events: Vec<Event>, seq: u32, prev: [u8; 32], reason: String, index, end| LogReader {
            events,
            status: LogStatus::Incomplete { damaged: !reason.contains("cut short"), reason },
            chunks: seq,
            head: hex::encode(prev),
            index,
            end,
        };
        macro_rules! incomplete {
            ($reason:expr) => {
                return incomplete(events, seq, prev, $reason, derived, end)
            };
        }
        while !b.is_empty() {
            let at = format!("chunk {seq} (byte {offset})");
            if b.len() < CHUNK_HEADER {
                incomplete!(format!("{at} is cut short (header)"));
            }
            let h = &b[..CHUNK_HEADER];
            let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
            if &h[..4] != CHUNK_MAGIC {
                incomplete!(format!("{at} has no chunk marker (damaged)"));
            }
            let (cseq, first) = (u32_at(4), u64::from_le_bytes(h[8..16].try_into().unwrap()));
            let (n, raw_len, comp_len) = (u32_at(16), u32_at(20) as usize, u32_at(24) as usize);
            let total = CHUNK_HEADER + comp_len + 32;
            if b.len() < total {
                // A length field changed mid-file also points past the end:
                // more chunk markers after this header tell it from a cut.
                let later = b[CHUNK_HEADER..].windows(4).any(|w| w == CHUNK_MAGIC);
                if later {
                    incomplete!(format!("{at} is damaged: its length points past the end of the file, but more chunks follow"));
                }
                incomplete!(format!("{at} is cut short ({} of {total} bytes)", b.len()));
            }
            let payload = &b[CHUNK_HEADER..CHUNK_HEADER + comp_len];
            let hash: [u8; 32] = b[CHUNK_HEADER + comp_len..total].try_into().unwrap();
            if seal(&prev, h, payload) != hash {
                incomplete!(format!("{at} fails its checksum (damaged or tampered, or chunks reordered)"));
            }
            if cseq != seq || first != from.first + events.len() as u64 || raw_len > MAX_RAW {
                incomplete!(format!("{at} is out of sequence (damaged)"));
            }
            // Every event takes at least one byte: n is bounded by raw_len,
            // which is bounded by MAX_RAW (checked above).
            if n as usize > raw_len {
                incomplete!(format!("{at} claims {n} events in {raw_len} bytes (damaged)"));
            }
            let raw = match super::decompress_exact(payload, raw_len) {
                Ok(r) => r,
                Err(e) => incomplete!(format!("{at} {e} (damaged)")),
            };
            let mut rest = raw.as_slice();
            // Fallible: n is bounded by raw_len, but n events take more
            // memory than n bytes; a crafted count is an error, not an abort.
            let mut got = Vec::new();
            if got.try_reserve_exact(n as usize).is_err() || events.try_reserve(n as usize).is_err() {
                incomplete!(format!("{at} claims {n} events: cannot allocate them (damaged)"));
            }
            for i in 0..n {
                match postcard::take_from_bytes::<Event>(rest) {
                    Ok((e, r)) => {
                        got.push(e);
                        rest = r;
                    }
                    Err(e) => {
                        incomplete!(format!("{at}: event {i} does not decode (damaged): {e}"))
                    }
                }
            }
            if !rest.is_empty() {
                incomplete!(format!("{at} has trailing bytes (damaged)"));
            }
            let base = from.first + events.len() as u64;
            let notes: Vec<(u64, index::Note)> =
                got.iter().enumerate().filter_map(|(i, e)| index::note(e).map(|n| (base + i as u64, n))).collect();
            events.extend(got);
            prev = hash;
            seq += 1;
            offset += total;
            b = &b[total..];
            end = index::At { seq, offset: offset as u64, first: from.first + events.len() as u64, prev };
            index::records(&notes, seq - 1, end, &mut derived);
        }
        let status = match events.last() {
            Some(Event::End { .. }) => LogStatus::Complete,
            _ => LogStatus::Incomplete {
                reason: "the log is cut short: it stops before the recording's end (the recorder was stopped or killed)".into(),
                damaged: false,
            },
        };
        LogReader { events, status, chunks: seq, head: hex::encode(prev), index: derived, end }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ExecPoint;

    fn sample(n: u64) -> Vec<Event> {
        let mut v: Vec<Event> = (0..n)
            .map(|i| match i % 3 {
                0 => Event::Clock { exits: i * 10, value: i * 1000 },
                1 => Event::Timer { at: ExecPoint { exits: i * 10, branches: 0, rip: 0x100000 + i }, fp: i, now_ns: i },
                _ => Event::Serial { at: ExecPoint { exits: i * 10, branches: 0, rip: 0x1000 }, fp: 7, bytes: vec![b'a'; (i % 5) as usize] },
            })
            .collect();
        v.push(Event::End {
            exits: n * 10,
            reason: super::super::EndReason::PowerOff(0),
            state_hash: "00".into(),
            output_len: 0,
            output_sha256: "00".into(),
        });
        v
    }

    fn write(dir: &Path, events: &[Event], flush_every: usize) -> std::path::PathBuf {
        let p = dir.join("events.log");
        let w = LogWriter::create(&p, genesis(b"t")).unwrap();
        for (i, e) in events.iter().enumerate() {
            w.push(e.clone());
            if flush_every > 0 && i % flush_every == flush_every - 1 {
                w.flush().unwrap();
            }
        }
        w.finish().unwrap();
        p
    }

    #[test]
    fn round_trip_many_chunks() {
        let d = tempfile::tempdir().unwrap();
        let ev = sample(1000);
        let p = write(d.path(), &ev, 100);
        let r = LogReader::read(&p, genesis(b"t")).unwrap();
        assert_eq!(r.status, LogStatus::Complete);
        assert_eq!(r.events, ev);
        assert!(r.chunks >= 10);
        // The chain is bound to the recording id.
        let other = LogReader::read(&p, genesis(b"u")).unwrap();
        assert!(other.events.is_empty());
        assert!(matches!(other.status, LogStatus::Incomplete { .. }));
    }

    #[test]
    fn truncation_keeps_whole_chunks() {
        let d = tempfile::tempdir().unwrap();
        let ev = sample(1000);
        let p = write(d.path(), &ev, 100);
        let bytes = std::fs::read(&p).unwrap();
        for cut in [9, 40, bytes.len() / 2, bytes.len() - 1] {
            let r = LogReader::parse(&bytes[8..cut], genesis(b"t"));
            assert!(matches!(r.status, LogStatus::Incomplete { .. }), "cut {cut}");
            assert_eq!(&ev[..r.events.len()], &r.events[..]);
            assert_eq!(r.events.len() % 100, 0, "only whole chunks survive");
        }
    }

    #[test]
    fn every_single_byte_change_is_detected() {
        let d = tempfile::tempdir().unwrap();
        let ev = sample(50);
        let p = write(d.path(), &ev, 20);
        let bytes = std::fs::read(&p).unwrap();
        for i in 8..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            let r = LogReader::parse(&b[8..], genesis(b"t"));
            assert!(matches!(r.status, LogStatus::Incomplete { .. }), "flip at byte {i} went unnoticed");
        }
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
            /// The chunk decoder takes any bytes without panicking.
            #[test]
            fn decoder_survives_garbage(b in proptest::collection::vec(any::<u8>(), 0..600)) {
                let r = LogReader::parse(&b, genesis(b"x"));
                // Garbage never yields events: no chunk can verify by chance.
                prop_assert!(r.events.is_empty());
                let complete = r.status == LogStatus::Complete;
                prop_assert!(!complete);
            }

            /// Valid logs with random damage: never panics, keeps only a verified prefix.
            #[test]
            fn decoder_survives_damage(pos in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
                let d = tempfile::tempdir().unwrap();
                let ev = sample(60);
                let p = write(d.path(), &ev, 25);
                let mut b = std::fs::read(&p).unwrap();
                let i = 8 + pos % (b.len() - 8);
                b[i] = byte;
                let end = 8 + cut % (b.len() - 7);
                let r = LogReader::parse(&b[8..end], genesis(b"t"));
                prop_assert_eq!(&ev[..r.events.len()], &r.events[..]);
            }
        }
    }
}
