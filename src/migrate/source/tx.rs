//! The sending half of a migration: frames on the wire with their byte
//! counts, the bandwidth cap and the compression choice, and the
//! recording's files as the destination has them.

use std::collections::HashMap;
use std::io::{BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::super::proto::{self, Kind, ProtoError, PAGE};
use super::super::{Conn, MigrateError};
use super::Compress;

/// The sending half of the connection: frames, byte counts, the bandwidth
/// cap and the compression choice.
pub(super) struct Tx {
    pub(super) w: BufWriter<Conn>,
    pub(super) seal: proto::Sealer,
    pub(super) bytes: u64,
    pub(super) pages: u64,
    pub(super) cap: Option<u64>,
    pub(super) t0: Instant,
    pub(super) compress: Compress,
    /// Measured throughputs (bytes/s) that decide `Compress::Auto`.
    pub(super) link_bps: f64,
    pub(super) zstd_bps: f64,
    pub(super) zstd_saving: f64,
    pub(super) batches: u64,
    /// Reused buffers: page data read from the guest, the frame payload.
    pub(super) data: Vec<u8>,
    pub(super) payload: Vec<u8>,
}

/// Pages per frame (1 MiB raw).
pub(super) const BATCH: usize = 256;

impl Tx {
    pub(super) fn conn(&self) -> &Conn {
        self.w.get_ref()
    }

    pub(super) fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), MigrateError> {
        let t = Instant::now();
        let n = self.seal.write_frame(&mut self.w, kind, payload)?;
        self.bytes += n;
        if let Some(cap) = self.cap {
            let due = self.t0 + Duration::from_secs_f64(self.bytes as f64 / cap as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        if n > 64 * 1024 {
            let bps = n as f64 / t.elapsed().as_secs_f64().max(1e-6);
            self.link_bps = if self.link_bps == 0.0 { bps } else { 0.8 * self.link_bps + 0.2 * bps };
        }
        Ok(())
    }

    pub(super) fn flush(&mut self) -> Result<(), MigrateError> {
        self.w.flush().map_err(|e| ProtoError::Io(e).into())
    }

    /// Whether to zstd the next batch: always, never, or (auto) when the
    /// time it saves on the link exceeds the time it costs, re-measured
    /// every 32 batches.
    pub(super) fn want_zstd(&mut self) -> bool {
        self.batches += 1;
        match self.compress {
            Compress::Always => true,
            Compress::Never => false,
            Compress::Auto => {
                self.zstd_bps == 0.0
                    || self.link_bps == 0.0
                    || self.batches.is_multiple_of(32)
                    || self.zstd_saving * self.zstd_bps > self.link_bps
            }
        }
    }

    /// Appends `data`, packed, to `out`.
    pub(super) fn pack_into(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let z = self.want_zstd();
        let t = Instant::now();
        let before = out.len();
        proto::pack_with(data, z, out);
        if z {
            let bps = data.len() as f64 / t.elapsed().as_secs_f64().max(1e-6);
            let saving = 1.0 - (out.len() - before) as f64 / data.len().max(1) as f64;
            self.zstd_bps = if self.zstd_bps == 0.0 { bps } else { 0.8 * self.zstd_bps + 0.2 * bps };
            self.zstd_saving = 0.8 * self.zstd_saving + 0.2 * saving.max(0.0);
        }
    }

    pub(super) fn pack(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.pack_into(data, &mut out);
        out
    }

    /// One Pages frame for `full` whose contents are in `self.data`.
    pub(super) fn send_batch(&mut self, full: &[u64]) -> Result<(), MigrateError> {
        let mut payload = std::mem::take(&mut self.payload);
        let data = std::mem::take(&mut self.data);
        payload.clear();
        payload.extend_from_slice(&(full.len() as u32).to_le_bytes());
        for p in full {
            payload.extend_from_slice(&p.to_le_bytes());
        }
        self.pack_into(&data, &mut payload);
        let r = self.send(Kind::Pages, &payload);
        self.payload = payload;
        self.data = data;
        r
    }

    /// Sends `pages` (sorted page numbers); all-zero pages go as a list
    /// (or not at all when `zeros` is false: the destination starts zeroed).
    /// Returns how many pages were sent.
    pub(super) fn send_pages(&mut self, mem: &GuestMemoryMmap, pages: &[u64], zeros: bool) -> Result<u64, MigrateError> {
        for chunk in pages.chunks(BATCH) {
            let (mut full, mut zero) = (Vec::new(), Vec::new());
            self.data.resize(chunk.len() * PAGE as usize, 0);
            let mut used = 0;
            for &p in chunk {
                let page = &mut self.data[used..used + PAGE as usize];
                mem.read_slice(page, GuestAddress(p * PAGE))
                    ?;
                if is_zero(page) {
                    zero.push(p);
                } else {
                    full.push(p);
                    used += PAGE as usize;
                }
            }
            self.data.truncate(used);
            if !full.is_empty() {
                self.send_batch(&full)?;
            }
            if zeros && !zero.is_empty() {
                self.send(Kind::ZeroPages, &proto::encode_numbers(&zero))?;
            }
            self.pages += chunk.len() as u64;
        }
        Ok(pages.len() as u64)
    }

    /// Round one: all of memory in large reads; zero pages are skipped.
    pub(super) fn send_all(&mut self, mem: &GuestMemoryMmap, mem_size: u64, check: &mut dyn FnMut() -> Result<(), MigrateError>) -> Result<(), MigrateError> {
        let npages = mem_size / PAGE;
        let mut first = 0;
        while first < npages {
            let n = (npages - first).min(BATCH as u64);
            self.data.resize((n * PAGE) as usize, 0);
            mem.read_slice(&mut self.data, GuestAddress(first * PAGE))
                ?;
            // Keep the non-zero pages, moved to the front.
            let mut full = Vec::new();
            for i in 0..n as usize {
                let at = i * PAGE as usize;
                if !is_zero(&self.data[at..at + PAGE as usize]) {
                    let to = full.len() * PAGE as usize;
                    self.data.copy_within(at..at + PAGE as usize, to);
                    full.push(first + i as u64);
                }
            }
            self.data.truncate(full.len() * PAGE as usize);
            if !full.is_empty() {
                self.send_batch(&full)?;
                self.pages += full.len() as u64;
            }
            first += n;
            check()?;
        }
        Ok(())
    }

    /// Disk sectors (`--copy-disk`), read from the file the VM writes.
    pub(super) fn send_sectors(&mut self, disk: Option<&Path>, sectors: &[u64]) -> Result<(), MigrateError> {
        let Some(path) = disk else { return Ok(()) };
        let mut f = std::fs::File::open(path)
            .map_err(|source| MigrateError::Io { what: format!("reading disk {}", path.display()), source })?;
        for (first, count) in crate::trace::checkpoint::runs(sectors.to_vec()) {
            let mut at = first;
            while at < first + count {
                let n = (first + count - at).min(2048);
                let mut data = vec![0u8; (n * 512) as usize];
                f.seek(std::io::SeekFrom::Start(at * 512))
                    .and_then(|_| f.read_exact(&mut data))
                    .map_err(|source| MigrateError::Io { what: format!("reading disk {}", path.display()), source })?;
                let mut payload = at.to_le_bytes().to_vec();
                payload.extend_from_slice(&self.pack(&data));
                self.send(Kind::Disk, &payload)?;
                at += n;
            }
        }
        Ok(())
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.chunks_exact(8).all(|c| u64::from_ne_bytes(c.try_into().unwrap()) == 0)
}

/// The recording's files as the destination has them: immutable files are
/// sent once (again, whole, if the checkpoint retention policy rewrote one
/// since: its length or mtime changed), the growing log and console from
/// where the last sync ended.
#[derive(Default)]
pub(super) struct FileSync {
    pub(super) dir: Option<PathBuf>,
    pub(super) sent: HashMap<String, u64>,
    pub(super) stamp: HashMap<String, (u64, Option<std::time::SystemTime>)>,
}

impl FileSync {
    /// `limits`: the exact lengths of events.log and console.log at the
    /// stop (the log head and output length); `None` during pre-copy.
    pub(super) fn sync(&mut self, tx: &mut Tx, dir: &Path, limits: Option<(u64, u64)>) -> Result<(), MigrateError> {
        use crate::trace::dir::Growth;
        for t in crate::trace::Dir::new(dir).transfers() {
            let (name, path) = (t.name, t.path);
            let Ok(md) = std::fs::metadata(&path) else { continue };
            let growing = t.growth != Growth::Fixed;
            let len = match (limits, t.growth) {
                (Some((log_len, _)), Growth::Log) => log_len,
                (Some((_, out_len)), Growth::Console) => out_len,
                _ => md.len(),
            };
            let stamp = (md.len(), md.modified().ok());
            if !growing && self.stamp.get(&name) != Some(&stamp) {
                self.sent.remove(&name);
            }
            let from = self.sent.get(&name).copied().unwrap_or(0);
            if (!growing && self.sent.contains_key(&name)) || len <= from {
                continue;
            }
            if !growing {
                self.stamp.insert(name.clone(), stamp);
            }
            let io = |source| MigrateError::Io { what: format!("reading {}", path.display()), source };
            let mut f = std::fs::File::open(&path).map_err(io)?;
            f.seek(std::io::SeekFrom::Start(from)).map_err(io)?;
            let mut at = from;
            while at < len {
                let n = (len - at).min(8 << 20);
                let mut data = vec![0u8; n as usize];
                f.read_exact(&mut data).map_err(io)?;
                let payload = proto::encode_file_packed(&name, at, tx.pack(&data));
                tx.send(Kind::File, &payload)?;
                at += n;
            }
            self.sent.insert(name, len);
        }
        Ok(())
    }
}

