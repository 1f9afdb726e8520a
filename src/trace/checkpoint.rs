//! Checkpoint files. The start checkpoint holds every page of memory that
//! is not zero (restoring starts from zeroed RAM) and the disk is the
//! recording's `disk.img`; later checkpoints are incremental: the
//! machine state, the pages dirtied and the disk sectors written since the
//! previous checkpoint. Restoring checkpoint k applies 0..=k in order.
//!
//! Layout: `b"RVCKPT02"`, u64 header length, header (JSON: id, counts, the
//! page and sector runs), the machine state in its versioned container
//! (`trace::state`), u64 data length, data (zstd: the listed pages then the
//! listed sectors, in order), u32 CRC-32 of everything before it. Files of
//! recordings made before the container (`b"RVCKPT01"`: the machine state
//! inside the header JSON) are still read.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::vmm::MachineState;

const MAGIC: &[u8; 8] = b"RVCKPT02";
/// The layout before the machine-state container (2026-11-30), still read.
const MAGIC_V1: &[u8; 8] = b"RVCKPT01";
pub use crate::vmm::layout::PAGE;
pub const SECTOR: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("checkpoint {path}: {msg}")]
    Bad { path: String, msg: String },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CheckpointHeader {
    pub id: u32,
    /// Guest-caused exits at the checkpoint.
    pub exits: u64,
    /// Index of the first event not yet consumed at the checkpoint.
    pub next_event: u64,
    /// Console bytes the guest had printed.
    pub output_len: u64,
    pub machine: MachineState,
    /// (first page frame, count) runs of 4 KiB pages whose contents follow.
    pub pages: Vec<(u64, u64)>,
    /// (first sector, count) runs of disk sectors whose contents follow.
    pub sectors: Vec<(u64, u64)>,
}

/// The header as `RVCKPT02` files hold it (the machine state follows it in
/// its container); generic so one definition writes borrowed runs and
/// reads owned ones.
#[derive(Serialize, Deserialize)]
struct HeaderV2<R> {
    id: u32,
    exits: u64,
    next_event: u64,
    output_len: u64,
    pages: R,
    sectors: R,
}

pub struct Checkpoint {
    pub header: CheckpointHeader,
    pub data: Vec<u8>,
}

/// What [`Checkpoint::write`] put on disk: its size and SHA-256 (hex), which
/// the recorder logs as [`crate::trace::Event::CheckpointFile`] so the file
/// is bound into the log's hash chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub sha256: String,
}

/// Largest header a reader accepts (a header lists page and sector runs;
/// 64 MiB of JSON is far beyond any real one).
pub const MAX_HEADER: u64 = 64 << 20;
/// Largest decompressed data a reader accepts: all of the largest guest
/// memory (`vmm::layout::MAX_MEM`) plus as many bytes of changed disk
/// sectors. Page runs must also lie inside the checkpoint's memory size.
pub const MAX_DATA: u64 = 2 * crate::vmm::layout::MAX_MEM;

/// Turns a sorted list of numbers into (start, count) runs.
pub fn runs(sorted: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for n in sorted {
        match out.last_mut() {
            Some((s, c)) if *s + *c == n => *c += 1,
            _ => out.push((n, 1)),
        }
    }
    out
}

impl Checkpoint {
    pub fn write(&self, path: &Path) -> Result<Written, CheckpointError> {
        let p = path.display().to_string();
        let io = |source| CheckpointError::Io { path: p.clone(), source };
        let h = &self.header;
        let v2 = HeaderV2 { id: h.id, exits: h.exits, next_event: h.next_event, output_len: h.output_len, pages: &h.pages, sectors: &h.sectors };
        let header = serde_json::to_vec(&v2).expect("checkpoint header serializes");
        let buf = assemble(&header, &super::state::encode(&h.machine), &self.data).map_err(io)?;
        super::dir::write_atomic(path, &path.with_extension("partial"), &buf, false).map_err(io)?;
        Ok(Written { bytes: buf.len() as u64, sha256: super::sha256_hex(&buf) })
    }

    pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let p = path.display().to_string();
        let b = std::fs::read(path).map_err(|source| CheckpointError::Io { path: p.clone(), source })?;
        Self::parse(&b, None).map_err(|msg| CheckpointError::Bad { path: p, msg })
    }

    /// Reads a checkpoint and checks it against the SHA-256 the log holds
    /// for it (see [`crate::trace::Event::CheckpointFile`]). The file is
    /// read once: the bytes hashed are the bytes decoded.
    pub fn read_bound(path: &Path, sha256: &str) -> Result<Checkpoint, CheckpointError> {
        Self::read_expect(path, &Expect::Bound(sha256.to_string())).map(|(c, _)| c)
    }

    /// Reads checkpoint file `path` once, checks those bytes as `expect`
    /// says, and decodes the same bytes. Returns the file's SHA-256 too.
    pub fn read_expect(path: &Path, expect: &Expect) -> Result<(Checkpoint, String), CheckpointError> {
        let p = path.display().to_string();
        let bad = |msg: String| CheckpointError::Bad { path: p.clone(), msg };
        let sha = match expect {
            Expect::Bound(sha) => Some(sha.as_str()),
            Expect::CrcOnly => None,
            Expect::Dropped => return Err(bad("was dropped from the recording (its removal is logged in the hash chain)".into())),
            Expect::Unbound => {
                return Err(bad("is not bound into the event log's hash chain (no SHA-256 logged for it), so it is not trusted".into()))
            }
        };
        let b = std::fs::read(path).map_err(|source| CheckpointError::Io { path: p.clone(), source })?;
        let c = Self::parse(&b, sha).map_err(bad)?;
        Ok((c, super::sha256_hex(&b)))
    }

    /// Folds `older` (the kept checkpoint just before this one) into this
    /// one: every page and sector `older` holds that this one does not is
    /// added (this one's own win). Restoring the kept checkpoints in order
    /// without `older` then gives exactly what restoring both gave: how
    /// the retention policy (record::retain) drops `older`.
    pub fn absorb(&mut self, older: &Checkpoint) -> Result<(), String> {
        if older.header.id == 0 || older.header.id >= self.header.id {
            return Err(format!("checkpoint {} cannot absorb checkpoint {}", self.header.id, older.header.id));
        }
        type Units = std::collections::BTreeMap<u64, (usize, bool)>;
        fn units(runs: &[(u64, u64)], size: usize, data: &[u8], at: &mut usize, out: &mut Units, newer: bool) -> Result<(), String> {
            for &(first, count) in runs {
                for u in first..first.checked_add(count).ok_or("run out of range")? {
                    if *at + size > data.len() {
                        return Err("data is shorter than its lists".into());
                    }
                    if newer || !out.contains_key(&u) {
                        out.insert(u, (*at, newer));
                    }
                    *at += size;
                }
            }
            Ok(())
        }
        let (mut pages, mut sectors) = (Units::new(), Units::new());
        let (mut a, mut b) = (0usize, 0usize);
        units(&self.header.pages, PAGE as usize, &self.data, &mut a, &mut pages, true)?;
        units(&self.header.sectors, SECTOR as usize, &self.data, &mut a, &mut sectors, true)?;
        units(&older.header.pages, PAGE as usize, &older.data, &mut b, &mut pages, false)?;
        units(&older.header.sectors, SECTOR as usize, &older.data, &mut b, &mut sectors, false)?;
        let mut data = Vec::with_capacity(pages.len() * PAGE as usize + sectors.len() * SECTOR as usize);
        for (map, size) in [(&pages, PAGE as usize), (&sectors, SECTOR as usize)] {
            for &(at, newer) in map.values() {
                let src = if newer { &self.data } else { &older.data };
                data.extend_from_slice(&src[at..at + size]);
            }
        }
        self.header.pages = runs(pages.keys().copied());
        self.header.sectors = runs(sectors.keys().copied());
        self.data = data;
        Ok(())
    }

    /// Decodes a checkpoint file's bytes. Every length is checked against
    /// the file size or a documented limit before anything is allocated.
    pub fn parse(b: &[u8], sha256: Option<&str>) -> Result<Checkpoint, String> {
        let (header, data) = Self::parse_lazy(b, sha256)?;
        let data = data.decompress()?;
        Ok(Checkpoint { header, data })
    }

    /// [`Checkpoint::parse`] up to the data: the file's bytes checked and
    /// its header decoded, the data left compressed (a restore skips the
    /// data of a file whose pages later files all replace).
    pub fn parse_lazy<'a>(b: &'a [u8], sha256: Option<&str>) -> Result<(CheckpointHeader, Packed<'a>), String> {
        let (body, hend) = Self::frame(b, sha256)?;
        let (header, dpos) = if &b[..8] == MAGIC_V1 {
            let header: CheckpointHeader = serde_json::from_slice(&body[16..hend]).map_err(|e| format!("header: {e}"))?;
            (header, hend)
        } else {
            let h: HeaderV2<Vec<(u64, u64)>> = serde_json::from_slice(&body[16..hend]).map_err(|e| format!("header: {e}"))?;
            let (payload, n) = super::state::open(&body[hend..]).map_err(|e| e.to_string())?;
            let machine = super::state::decode_payload(payload).map_err(|e| e.to_string())?;
            let header = CheckpointHeader { id: h.id, exits: h.exits, next_event: h.next_event, output_len: h.output_len, machine, pages: h.pages, sectors: h.sectors };
            (header, hend + n)
        };
        let mem = header.machine.config.mem_size;
        if mem > crate::vmm::layout::MAX_MEM {
            return Err(format!("memory size {mem} is over the {} MiB limit", crate::vmm::layout::MAX_MEM >> 20));
        }
        if header.pages.iter().any(|&(f, c)| f.checked_add(c).and_then(|e| e.checked_mul(PAGE)).is_none_or(|e| e > mem)) {
            return Err(format!("a page run lies outside the guest's {mem} bytes of memory"));
        }
        let data = Self::packed(body, dpos, &header.pages, &header.sectors)?;
        Ok((header, data))
    }

    /// What a restore needs of a checkpoint older than its target: the id,
    /// the runs and the packed data, the file checked as by
    /// [`Checkpoint::parse`] but its machine state not decoded (nor its page
    /// runs checked against its memory size: the restore checks them
    /// against the target's).
    pub fn parse_runs<'a>(b: &'a [u8], sha256: Option<&str>) -> Result<Runs<'a>, String> {
        #[derive(Deserialize)]
        struct R {
            id: u32,
            pages: Vec<(u64, u64)>,
            sectors: Vec<(u64, u64)>,
        }
        let (body, hend) = Self::frame(b, sha256)?;
        // Either layout's header JSON holds these (RVCKPT01's machine state
        // inside it is skipped without being built).
        let r: R = serde_json::from_slice(&body[16..hend]).map_err(|e| format!("header: {e}"))?;
        let dpos = if &b[..8] == MAGIC_V1 { hend } else { hend + super::state::open(&body[hend..]).map_err(|e| e.to_string())?.1 };
        let data = Self::packed(body, dpos, &r.pages, &r.sectors)?;
        Ok(Runs { id: r.id, pages: r.pages, sectors: r.sectors, data })
    }

    /// The data after `dpos` in `body`: its length checked against the
    /// file and against what the runs describe.
    fn packed<'a>(body: &'a [u8], dpos: usize, pages: &[(u64, u64)], sectors: &[(u64, u64)]) -> Result<Packed<'a>, String> {
        let dlen = body.get(dpos..dpos + 8).map(|l| u64::from_le_bytes(l.try_into().expect("8 bytes"))).ok_or("data length cut short")?;
        let dstart = dpos + 8;
        if (dstart as u64).checked_add(dlen) != Some(body.len() as u64) {
            return Err("data length does not match the file".into());
        }
        let expect = data_len(pages, sectors).ok_or("page and sector lists are out of range")?;
        if expect > MAX_DATA {
            return Err(format!("page and sector lists add up to {expect} bytes, over the {MAX_DATA}-byte limit"));
        }
        Ok(Packed { bytes: &body[dstart..], len: expect as usize })
    }

    /// Checks a file's magic, CRC-32 and (if given) SHA-256; returns the
    /// bytes before the CRC and where the header JSON ends.
    fn frame<'a>(b: &'a [u8], sha256: Option<&str>) -> Result<(&'a [u8], usize), String> {
        if b.len() >= 8 && b[..6] == MAGIC[..6] && &b[..8] != MAGIC && &b[..8] != MAGIC_V1 {
            return Err(format!(
                "checkpoint format version {} is not supported; this revirt reads versions 01 and 02",
                String::from_utf8_lossy(&b[6..8])
            ));
        }
        if b.len() < 8 + 8 + 8 + 4 || (&b[..8] != MAGIC && &b[..8] != MAGIC_V1) {
            return Err("not a revirt checkpoint (bad magic or too short)".into());
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err("damaged (checksum mismatch)".into());
        }
        if let Some(want) = sha256 {
            if super::sha256_hex(b) != want {
                return Err("damaged or tampered: its SHA-256 does not match the one in the event log's hash chain".into());
            }
        }
        let hlen = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
        if hlen > MAX_HEADER {
            return Err(format!("header length {hlen} is over the {MAX_HEADER}-byte limit"));
        }
        let hend = 16usize
            .checked_add(hlen as usize)
            .filter(|&e| e.checked_add(8).is_some_and(|x| x <= body.len()))
            .ok_or("header length out of range")?;
        Ok((body, hend))
    }
}

/// A checkpoint's data, still compressed (its size is checked against
/// the header's lists).
pub struct Packed<'a> {
    bytes: &'a [u8],
    len: usize,
}

/// See [`Checkpoint::parse_runs`].
pub struct Runs<'a> {
    pub id: u32,
    pub pages: Vec<(u64, u64)>,
    pub sectors: Vec<(u64, u64)>,
    pub data: Packed<'a>,
}

impl Packed<'_> {
    pub fn decompress(&self) -> Result<Vec<u8>, String> {
        super::decompress_exact(self.bytes, self.len).map_err(|e| format!("data {e}"))
    }
}

/// What a reader checks a checkpoint file against before decoding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The SHA-256 (hex) the log's hash chain holds for the file.
    Bound(String),
    /// Its CRC-32 alone: a file a cut-short log stops before binding, or
    /// any file under `--force`, or library use without checks.
    CrcOnly,
    /// Deliberately removed (thinning), and the removal is in the chain.
    Dropped,
    /// Not bound and not to be trusted.
    Unbound,
}

/// The checkpoint-chain API: what each checkpoint file of a recording must
/// match, from the log's `CheckpointFile` events. The latest event for an
/// id wins (a checkpoint rewritten later, e.g. merged by thinning, is
/// re-bound with its new SHA-256); an empty SHA-256 marks the checkpoint
/// dropped (its file removed on purpose), which readers skip and `verify`
/// reports as such. Ids with no event get `unbound`.
#[derive(Debug, Clone)]
pub struct Seals {
    bound: std::collections::HashMap<u32, String>,
    unbound: Expect,
    covers: Covers,
}

/// Coverage claims (`Event::CheckpointCovered`): (checkpoint, the SHA-256
/// of its file the claim is about) -> the earliest checkpoint `by` from
/// which on a restore need not open that file.
pub type Covers = std::collections::HashMap<(u32, String), u32>;

impl Seals {
    /// From a log's events; `unbound` is what ids without a binding get
    /// (`Expect::Unbound`, or `Expect::CrcOnly` for a cut-short log).
    pub fn from_events(events: &[crate::trace::Event], unbound: Expect) -> Seals {
        use crate::trace::Event;
        let mut bound = std::collections::HashMap::new();
        let mut covers = Covers::new();
        for e in events {
            match e {
                Event::CheckpointFile { id, sha256, .. } => {
                    bound.insert(*id, sha256.clone());
                }
                Event::CheckpointCovered { id, by, sha256, .. } => {
                    let b = covers.entry((*id, sha256.clone())).or_insert(*by);
                    *b = (*b).min(*by);
                }
                _ => {}
            }
        }
        Seals { bound, unbound, covers }
    }

    /// From bindings and claims already collected (the seek index's,
    /// `trace::seek`).
    pub fn from_bindings(bound: std::collections::HashMap<u32, String>, covers: Covers, unbound: Expect) -> Seals {
        Seals { bound, unbound, covers }
    }

    /// Every file on its CRC-32 alone (`--force`, unchecked library use).
    pub fn crc_only() -> Seals {
        Seals { bound: Default::default(), unbound: Expect::CrcOnly, covers: Covers::new() }
    }

    /// Whether a restore of checkpoint `to` need not open checkpoint `k`'s
    /// file: the chain binds it and claims (for that very file) that later
    /// kept files up to a checkpoint at or before `to` hold all its pages
    /// and sectors. `verify` checks every claim against the files.
    pub fn covered(&self, k: u32, to: u32) -> bool {
        k < to
            && self.bound.get(&k).is_some_and(|s| !s.is_empty() && self.covers.get(&(k, s.clone())).is_some_and(|&by| by <= to))
    }

    /// The claims that apply to the files the chain binds now: (id, by).
    pub fn claims(&self) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = self.covers.iter().filter(|((id, sha), _)| self.bound.get(id) == Some(sha) && !sha.is_empty()).map(|((id, _), &by)| (*id, by)).collect();
        out.sort_unstable();
        out
    }

    pub fn expect(&self, id: u32) -> Expect {
        match self.bound.get(&id) {
            Some(s) if s.is_empty() => Expect::Dropped,
            Some(s) => Expect::Bound(s.clone()),
            None => self.unbound.clone(),
        }
    }

    /// Whether checkpoint `id` has a SHA-256 in the chain.
    pub fn is_bound(&self, id: u32) -> bool {
        self.bound.get(&id).is_some_and(|s| !s.is_empty())
    }

    /// Reads checkpoint `id` of the recording in `dir`, checked as
    /// [`Seals::expect`] says (one read: the bytes checked are the bytes
    /// decoded), and checks that the file says it is checkpoint `id`.
    /// Checkpoint `id`'s file, read once, checked as [`Seals::expect`] says.
    fn read_bytes(&self, dir: &Path, id: u32) -> Result<Vec<u8>, CheckpointError> {
        let path = super::checkpoint_path(dir, id);
        let p = path.display().to_string();
        match self.expect(id) {
            Expect::Dropped => Err(CheckpointError::Bad { path: p, msg: "was dropped from the recording (its removal is logged in the hash chain)".into() }),
            Expect::Unbound => Err(CheckpointError::Bad {
                path: p,
                msg: "is not bound into the event log's hash chain (no SHA-256 logged for it), so it is not trusted".into(),
            }),
            _ => std::fs::read(&path).map_err(|source| CheckpointError::Io { path: p, source }),
        }
    }

    pub fn read(&self, dir: &Path, id: u32) -> Result<Checkpoint, CheckpointError> {
        let path = super::checkpoint_path(dir, id);
        let (ck, _) = Checkpoint::read_expect(&path, &self.expect(id))?;
        if ck.header.id != id {
            return Err(CheckpointError::Bad {
                path: path.display().to_string(),
                msg: format!("file {id} says it is checkpoint {} (damaged recording)", ck.header.id),
            });
        }
        Ok(ck)
    }
}

/// Memory (and disk) at checkpoint `to` of the recording in `dir`: the
/// newest version of every page and sector in checkpoints `from..=to`,
/// handing each page once to `page(frame, bytes)` and each run of disk
/// sectors to `sectors(first, bytes)`. With `from == 0` the target must
/// start all zero (fresh guest RAM, a zeroed buffer): checkpoint 0 holds
/// only the pages that were not zero, and any all-zero page in it is not
/// passed on. The files are read newest first: a file whose pages and
/// sectors later ones all replace is checked but its data not decompressed
/// (after retention merges, old files mostly hold the same working set),
/// and a file the chain says later files up to `to` replace entirely
/// (`Seals::covered`) is not opened at all, so the files a restore opens
/// do not grow with the recording's length. Returns checkpoint `to`'s header. Each file is checked as `seals` says
/// before it is decoded (dropped ones are skipped). The one reader of
/// checkpoint contents for replay (`Timeline::at_checkpoint`) and
/// inspection (`Checkpoints::memory`).
pub fn rebuild(
    dir: &Path,
    seals: &Seals,
    from: u32,
    to: u32,
    mut page: impl FnMut(u64, &[u8]) -> Result<(), String>,
    mut sectors: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<CheckpointHeader, CheckpointError> {
    let mut done = Done::default();
    let mut last = None;
    for k in (from..=to).rev() {
        if k != to && (seals.expect(k) == Expect::Dropped || seals.covered(k, to)) {
            continue;
        }
        let path = super::checkpoint_path(dir, k);
        let bad = |msg: String| CheckpointError::Bad { path: path.display().to_string(), msg };
        let bytes = seals.read_bytes(dir, k)?;
        let sha = match seals.expect(k) {
            Expect::Bound(s) => Some(s),
            _ => None,
        };
        // The target's header whole; older ones only as far as their runs.
        let runs = if last.is_none() {
            let (header, data) = Checkpoint::parse_lazy(&bytes, sha.as_deref()).map_err(&bad)?;
            done.mem = header.machine.config.mem_size;
            done.pages = vec![0u64; (done.mem / PAGE).div_ceil(64) as usize];
            let runs = Runs { id: header.id, pages: header.pages.clone(), sectors: header.sectors.clone(), data };
            last = Some(header);
            runs
        } else {
            Checkpoint::parse_runs(&bytes, sha.as_deref()).map_err(&bad)?
        };
        if runs.id != k {
            return Err(bad(format!("file {k} says it is checkpoint {} (damaged recording)", runs.id)));
        }
        if done.needs(&runs) {
            let data = runs.data.decompress().map_err(&bad)?;
            done.apply(&runs, &data, k == 0, &mut page, &mut sectors).map_err(&bad)?;
        }
    }
    last.ok_or_else(|| CheckpointError::Bad { path: dir.display().to_string(), msg: format!("no checkpoints {from}..={to}") })
}

/// The pages (a bitmap over guest memory) and sectors a newer checkpoint
/// already supplied to [`rebuild`].
#[derive(Default)]
struct Done {
    /// The target's memory size (every page must lie inside it).
    mem: u64,
    pages: Vec<u64>,
    sectors: std::collections::HashSet<u64>,
}

impl Done {
    fn page(&self, p: u64) -> Option<bool> {
        self.pages.get((p / 64) as usize).map(|w| w & (1 << (p % 64)) != 0)
    }

    /// Whether some page or sector of `h` is not supplied yet (or lies
    /// outside memory: then `apply` says so).
    fn needs(&self, h: &Runs) -> bool {
        h.pages.iter().any(|&(f, c)| (f..f.saturating_add(c)).any(|p| self.page(p) != Some(true)))
            || h.sectors.iter().any(|&(f, c)| (f..f.saturating_add(c)).any(|s| !self.sectors.contains(&s)))
    }

    /// Hands on what `h`'s `data` holds that no newer checkpoint did.
    fn apply(
        &mut self,
        h: &Runs,
        data: &[u8],
        zero_target: bool,
        page: &mut impl FnMut(u64, &[u8]) -> Result<(), String>,
        sectors: &mut impl FnMut(u64, &[u8]) -> Result<(), String>,
    ) -> Result<(), String> {
        let mem = self.mem;
        let mut at = 0usize;
        for &(first, count) in &h.pages {
            if first.checked_add(count).and_then(|e| e.checked_mul(PAGE)).is_none_or(|e| e > mem) {
                return Err("has pages beyond guest memory (damaged recording)".into());
            }
            for p in first..first + count {
                let bytes = data.get(at..at + PAGE as usize).ok_or("data is shorter than its page list")?;
                at += PAGE as usize;
                match self.page(p) {
                    None => return Err("has pages beyond the restored checkpoint's memory (damaged recording)".into()),
                    Some(true) => continue,
                    Some(false) => self.pages[(p / 64) as usize] |= 1 << (p % 64),
                }
                if zero_target && bytes.iter().all(|&b| b == 0) {
                    continue;
                }
                page(p, bytes)?;
            }
        }
        for &(first, count) in &h.sectors {
            let len = count.checked_mul(SECTOR).ok_or("sector run out of range")? as usize;
            let bytes = data.get(at..at.saturating_add(len)).ok_or("data is shorter than its sector list")?;
            at += len;
            // The sub-runs no newer checkpoint wrote.
            let mut s = 0u64;
            while s < count {
                if self.sectors.contains(&(first + s)) {
                    s += 1;
                    continue;
                }
                let start = s;
                while s < count && self.sectors.insert(first + s) {
                    s += 1;
                }
                sectors(first + start, &bytes[(start * SECTOR) as usize..(s * SECTOR) as usize])?;
            }
        }
        Ok(())
    }
}

/// A checkpoint file's bytes from a header (the JSON of a
/// [`CheckpointHeader`], taken as given: its `machine` goes into the
/// container as it is) and its raw data: what [`Checkpoint::write`]
/// writes; for tools and tests.
pub fn encode(header_json: &[u8], data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(header_json)?;
    // Taken as given even when it is no checkpoint header (tests build
    // hostile files): no machine state puts `null` in the container, which
    // a reader refuses.
    let machine = v.as_object_mut().and_then(|o| o.remove("machine")).unwrap_or(serde_json::Value::Null);
    let state = super::state::seal(&serde_json::to_vec(&machine)?);
    assemble(&serde_json::to_vec(&v)?, &state, data)
}

fn assemble(header_json: &[u8], state: &[u8], data: &[u8]) -> std::io::Result<Vec<u8>> {
    let data = zstd::bulk::compress(data, 1)?;
    let mut buf = Vec::with_capacity(header_json.len() + state.len() + data.len() + 32);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(header_json.len() as u64).to_le_bytes());
    buf.extend_from_slice(header_json);
    buf.extend_from_slice(state);
    buf.extend_from_slice(&(data.len() as u64).to_le_bytes());
    buf.extend_from_slice(&data);
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

impl CheckpointHeader {
    /// The guest clock at the checkpoint (ns).
    pub fn clock_ns(&self) -> u64 {
        self.machine.clock_ns
    }

    /// Bytes of page and sector data the lists describe, or None when a
    /// count overflows (a crafted header).
    pub fn data_len(&self) -> Option<u64> {
        data_len(&self.pages, &self.sectors)
    }
}

/// Bytes of page and sector data the runs describe, or None when a count
/// overflows (a crafted header).
fn data_len(pages: &[(u64, u64)], sectors: &[(u64, u64)]) -> Option<u64> {
    let mut n = 0u64;
    for &(first, c) in pages {
        first.checked_add(c)?.checked_mul(PAGE)?;
        n = n.checked_add(c.checked_mul(PAGE)?)?;
    }
    for &(first, c) in sectors {
        first.checked_add(c)?.checked_mul(SECTOR)?;
        n = n.checked_add(c.checked_mul(SECTOR)?)?;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recrc(b: &mut Vec<u8>) {
        b.truncate(b.len() - 4);
        let crc = crc32fast::hash(b);
        b.extend_from_slice(&crc.to_le_bytes());
    }

    /// Recordings from before the container (RVCKPT01) still read; an
    /// unknown layout and a resealed file with a changed state are refused
    /// by name.
    #[test]
    fn old_layout_reads_and_unknown_or_tampered_ones_are_refused() {
        let machine = crate::trace::state::tests::sample();
        let header = CheckpointHeader { id: 3, exits: 42, next_event: 1, output_len: 5, machine, pages: vec![(0, 1)], sectors: vec![] };
        let data = vec![7u8; PAGE as usize];
        let json = serde_json::to_vec(&header).unwrap();
        let mut v1 = assemble(&json, &[], &data).unwrap();
        v1[..8].copy_from_slice(MAGIC_V1);
        recrc(&mut v1);
        let v2 = encode(&json, &data).unwrap();
        for b in [&v1, &v2] {
            let c = Checkpoint::parse(b, None).unwrap();
            assert_eq!((c.header.id, c.header.exits, c.header.machine.exits, c.header.machine.vcpu.regs.rip), (3, 42, 42, 0x1234));
            assert_eq!(c.data, data);
        }
        let mut v9 = v2.clone();
        v9[6..8].copy_from_slice(b"09");
        recrc(&mut v9);
        let e = Checkpoint::parse(&v9, None).err().unwrap();
        assert!(e.contains("checkpoint format version 09 is not supported"), "{e}");
        let hlen = u64::from_le_bytes(v2[8..16].try_into().unwrap()) as usize;
        let mut tampered = v2.clone();
        tampered[16 + hlen + 20 + 3] ^= 1;
        recrc(&mut tampered);
        let e = Checkpoint::parse(&tampered, None).err().unwrap();
        assert!(e.contains("machine state damaged or tampered"), "{e}");
        let mut version = v2.clone();
        version[16 + hlen + 8..16 + hlen + 12].copy_from_slice(&5u32.to_le_bytes());
        recrc(&mut version);
        let e = Checkpoint::parse(&version, None).err().unwrap();
        assert!(e.contains("machine-state format version 5 is not supported"), "{e}");
    }

    #[test]
    fn runs_merge_neighbours() {
        assert_eq!(runs([1, 2, 3, 7, 8, 10]), vec![(1, 3), (7, 2), (10, 1)]);
        assert_eq!(runs(Vec::<u64>::new()), vec![]);
    }
}
