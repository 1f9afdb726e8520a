//! The sending side: a control socket that accepts `revirt migrate`
//! requests, the pre-copy thread, and the stop-and-copy + commit that run
//! on the vCPU thread once the guest is paused.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::proto::{self, FinalState, Hello, Kind, ProtoError, RecorderState, RecordingHello, Welcome, PAGE};
use super::{Conn, MigrateError, Summary};
use crate::vmm::pausable::Shared;
use crate::vmm::machine::DirtyLog;
use crate::vmm::{LiveHost, Machine, VmConfig};

/// How to compress pages on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// zstd while the link is slower than compressing (measured as it goes).
    Auto,
    Always,
    Never,
}

/// A `revirt migrate` request, sent as one JSON line on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// Destination: HOST:PORT or unix:PATH, where `revirt receive` listens.
    pub to: String,
    /// Stream the disk too (default: the destination opens the same path).
    pub copy_disk: bool,
    /// Cap on bytes per second put on the wire.
    pub bandwidth: Option<u64>,
    /// Stop-and-copy once the rest is predicted to take at most this long.
    pub max_downtime_ms: u64,
    /// Stop-and-copy after this many rounds whatever remains.
    pub max_rounds: u32,
    /// Throttle a guest that dirties memory faster than the link carries it.
    pub auto_converge: bool,
    pub compress: Compress,
    /// The migration key (`revirt migrate --key-file`), derived, hex. The
    /// control socket it travels on is owner-only.
    #[serde(default)]
    pub key: Option<String>,
    /// Allow a plain (unauthenticated, unencrypted) channel to a
    /// non-loopback address.
    #[serde(default)]
    pub insecure: bool,
}

/// One line the control socket sends back to `revirt migrate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    Progress(String),
    Done(Summary),
    Error(String),
}

pub use crate::record::mover::RecordingInfo;


/// Handles on the VM the migration thread may use while the vCPU runs.
#[derive(Clone)]
struct VmHandles {
    dirty: Arc<DirtyLog>,
    mem: GuestMemoryMmap,
    config: VmConfig,
    recording: Option<RecordingInfo>,
}

/// The pre-copy thread's hand-over to the vCPU thread.
struct Handoff {
    tx: Tx,
    rx: Receiver<Result<proto::Frame, ProtoError>>,
    files: FileSync,
    req: MigrateRequest,
    started: Instant,
    rounds: u32,
    max_throttle: u32,
}

/// Accepts migration requests for one running VM (`--control PATH`).
pub struct Controller {
    pub shared: Arc<Shared>,
    vm: Mutex<Option<VmHandles>>,
    busy: Mutex<bool>,
    handoff: Mutex<Option<Handoff>>,
    client: Mutex<Option<UnixStream>>,
    path: PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        super::release_socket_path(&self.path);
    }
}

/// One JSON line to a `revirt migrate` client (gone clients are ignored).
fn send_line(c: &mut impl Write, r: &Reply) {
    let mut line = serde_json::to_vec(r).expect("reply serializes");
    line.push(b'\n');
    let _ = c.write_all(&line);
}

fn reply(client: &Mutex<Option<UnixStream>>, r: &Reply) {
    if let Some(c) = client.lock().unwrap().as_mut() {
        send_line(c, r);
    }
}

impl Controller {
    /// Listens on a Unix socket at `path` for `revirt migrate` requests.
    pub fn listen(path: &Path) -> Result<Arc<Controller>, MigrateError> {
        // Only a stale socket from a VM that is gone is ever replaced.
        super::claim_socket_path(path)?;
        let l = UnixListener::bind(path)
            .map_err(|source| MigrateError::Io { what: format!("control socket {}", path.display()), source })?;
        // Whoever can connect can send the VM anywhere: owner only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| MigrateError::Io { what: format!("control socket {}", path.display()), source })?;
        let ctl = Arc::new(Controller {
            shared: Arc::default(),
            vm: Mutex::new(None),
            busy: Mutex::new(false),
            handoff: Mutex::new(None),
            client: Mutex::new(None),
            path: path.to_path_buf(),
        });
        let c = Arc::downgrade(&ctl);
        std::thread::Builder::new()
            .name("revirt-control".into())
            .spawn(move || {
                for conn in l.incoming() {
                    let Some(ctl) = c.upgrade() else { return };
                    if let Ok(conn) = conn {
                        ctl.request(conn);
                    }
                }
            })
            .map_err(|source| MigrateError::Io { what: "spawning the control thread".into(), source })?;
        Ok(ctl)
    }

    /// Tells the controller which VM it moves (before the VM runs).
    pub fn attach(&self, m: &Machine, recording: Option<RecordingInfo>) {
        *self.vm.lock().unwrap() =
            Some(VmHandles { dirty: m.dirty_log(), mem: m.mem.clone(), config: m.config.clone(), recording });
    }

    fn request(self: &Arc<Self>, conn: UnixStream) {
        let mut line = String::new();
        let mut r = BufReader::new(match conn.try_clone() {
            Ok(c) => c,
            Err(_) => return,
        });
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let mut conn = conn;
        let mut say = |r: Reply| send_line(&mut conn, &r);
        if r.read_line(&mut line).is_err() {
            return;
        }
        let req: MigrateRequest = match serde_json::from_str(&line) {
            Ok(q) => q,
            Err(e) => return say(Reply::Error(format!("bad request: {e}"))),
        };
        // A request that arrives while the VM is still being set up waits for it.
        let t = Instant::now();
        let vm = loop {
            if let Some(vm) = self.vm.lock().unwrap().clone() {
                break vm;
            }
            if t.elapsed() > Duration::from_secs(10) {
                return say(Reply::Error("the VM is not running yet".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        {
            let mut busy = self.busy.lock().unwrap();
            if *busy {
                return say(Reply::Error("a migration is already under way".into()));
            }
            *busy = true;
        }
        let _ = conn.set_read_timeout(None);
        *self.client.lock().unwrap() = Some(conn);
        let ctl = self.clone();
        std::thread::Builder::new()
            .name("revirt-migrate".into())
            .spawn(move || {
                let started = Instant::now();
                match precopy(&ctl, &vm, &req, started) {
                    Ok(h) => {
                        *ctl.handoff.lock().unwrap() = Some(h);
                        ctl.shared.request_stop();
                    }
                    Err(e) => ctl.failed(&vm.dirty, &e),
                }
            })
            .expect("spawn migration thread");
    }

    fn failed(&self, dirty: &DirtyLog, e: &MigrateError) {
        dirty.stop_tracking();
        self.shared.clear();
        tracing::warn!("migration failed: {e}; the VM runs on here");
        eprintln!("revirt: migration failed: {e}; the VM runs on here");
        reply(&self.client, &Reply::Error(format!("{e}; the VM keeps running on the source")));
        *self.client.lock().unwrap() = None;
        *self.busy.lock().unwrap() = false;
    }

    /// The VM stopped here (powered off, crashed): a migration under way
    /// cannot finish; its requester is told why instead of a closed socket.
    pub fn ended(&self, why: &str) {
        if *self.busy.lock().unwrap() {
            reply(&self.client, &Reply::Error(format!("the guest {why} before the migration finished")));
            *self.client.lock().unwrap() = None;
        }
    }

    fn progress(&self, msg: String) {
        tracing::info!("{msg}");
        reply(&self.client, &Reply::Progress(msg));
    }

    /// Stop-and-copy and commit, on the vCPU thread, with the guest paused
    /// at a poll point (`Stop::Paused` while [`Shared::stop_requested`]).
    /// `Ok`: committed, the destination owns the VM now; the caller must let
    /// it go. `Err`: nothing was committed; the caller resumes the guest.
    /// `stopped`: when the guest stopped for good; the downtime counts from
    /// there (a recorder's log flush and dirty-log sync lie inside it).
    pub fn finish(
        &self,
        m: &mut Machine,
        live: &mut LiveHost,
        clock_ns: u64,
        recorder: Option<RecorderState>,
        stopped: Instant,
    ) -> Result<Summary, MigrateError> {
        let Some(mut h) = self.handoff.lock().unwrap().take() else {
            self.shared.clear();
            return Err(MigrateError::Refused("paused for a migration that is gone".into()));
        };
        let pending_input = live.take_pending_input();
        let r = self
            .stop_and_copy(&mut h, m, clock_ns, pending_input.clone(), recorder, stopped)
            .map_err(|e| peer_reason(&h.rx, e));
        let dirty = m.dirty_log();
        dirty.stop_tracking();
        self.shared.clear();
        match r {
            Ok(s) => {
                reply(&self.client, &Reply::Done(s.clone()));
                *self.client.lock().unwrap() = None;
                Ok(s)
            }
            Err(e) => {
                h.tx.conn().shutdown();
                live.push_input(&pending_input);
                self.failed(&dirty, &e);
                Err(e)
            }
        }
    }

    fn stop_and_copy(
        &self,
        h: &mut Handoff,
        m: &mut Machine,
        clock_ns: u64,
        pending_input: Vec<u8>,
        recorder: Option<RecorderState>,
        stopped: Instant,
    ) -> Result<Summary, MigrateError> {
        let (pages, sectors) = m.dirty_log().take_tracked()?;
        let final_pages = h.tx.send_pages(&m.mem, &pages, true)?;
        if h.req.copy_disk {
            h.tx.send_sectors(m.devices.block.path(), &sectors)?;
        }
        if let (Some(rec), Some(dir)) = (&recorder, h.files.dir.clone()) {
            h.files.sync(&mut h.tx, &dir, Some((rec.log.len, rec.output_len)))?;
        }
        let t_pages = stopped.elapsed();
        let machine = m.save_state(clock_ns)?;
        let state = FinalState { machine, pending_input, recorder };
        let state = proto::json(&state);
        h.tx.send(Kind::State, &state)?;
        h.tx.flush()?;
        let t_state = stopped.elapsed();
        match h.rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(f)) if f.kind == Kind::Ready => {}
            Ok(Ok(f)) => return Err(ProtoError::Unexpected { got: f.kind.name(), want: "ready" }.into()),
            Ok(Err(e)) => return Err(e.into()),
            Err(RecvTimeoutError::Timeout) => {
                return Err(MigrateError::Refused("the destination did not confirm within 30 s".into()))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(MigrateError::Refused("the destination closed the connection".into()))
            }
        }
        // The commit point: after this frame the destination owns the VM.
        h.tx.send(Kind::Commit, &[])?;
        h.tx.flush()?;
        let downtime = stopped.elapsed();
        tracing::info!(
            "downtime {:.2} ms: {} pages + files sent by {:.2} ms, state ({} bytes) by {:.2} ms, destination ready by {:.2} ms",
            downtime.as_secs_f64() * 1e3,
            final_pages,
            t_pages.as_secs_f64() * 1e3,
            state.len(),
            t_state.as_secs_f64() * 1e3,
            downtime.as_secs_f64() * 1e3
        );
        Ok(Summary {
            to: h.req.to.clone(),
            rounds: h.rounds + 1,
            bytes: h.tx.bytes,
            pages: h.tx.pages,
            final_pages,
            total_ms: h.started.elapsed().as_secs_f64() * 1e3,
            downtime_ms: downtime.as_secs_f64() * 1e3,
            max_throttle: h.max_throttle,
            recording: h.files.dir.is_some(),
        })
    }
}

/// The sending half of the connection: frames, byte counts, the bandwidth
/// cap and the compression choice.
struct Tx {
    w: BufWriter<Conn>,
    seal: proto::Sealer,
    bytes: u64,
    pages: u64,
    cap: Option<u64>,
    t0: Instant,
    compress: Compress,
    /// Measured throughputs (bytes/s) that decide `Compress::Auto`.
    link_bps: f64,
    zstd_bps: f64,
    zstd_saving: f64,
    batches: u64,
    /// Reused buffers: page data read from the guest, the frame payload.
    data: Vec<u8>,
    payload: Vec<u8>,
}

/// Pages per frame (1 MiB raw).
const BATCH: usize = 256;

impl Tx {
    fn conn(&self) -> &Conn {
        self.w.get_ref()
    }

    fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), MigrateError> {
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

    fn flush(&mut self) -> Result<(), MigrateError> {
        self.w.flush().map_err(|e| ProtoError::Io(e).into())
    }

    /// Whether to zstd the next batch: always, never, or (auto) when the
    /// time it saves on the link exceeds the time it costs, re-measured
    /// every 32 batches.
    fn want_zstd(&mut self) -> bool {
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
    fn pack_into(&mut self, data: &[u8], out: &mut Vec<u8>) {
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

    fn pack(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.pack_into(data, &mut out);
        out
    }

    /// One Pages frame for `full` whose contents are in `self.data`.
    fn send_batch(&mut self, full: &[u64]) -> Result<(), MigrateError> {
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
    fn send_pages(&mut self, mem: &GuestMemoryMmap, pages: &[u64], zeros: bool) -> Result<u64, MigrateError> {
        for chunk in pages.chunks(BATCH) {
            let (mut full, mut zero) = (Vec::new(), Vec::new());
            self.data.resize(chunk.len() * PAGE as usize, 0);
            let mut used = 0;
            for &p in chunk {
                let page = &mut self.data[used..used + PAGE as usize];
                mem.read_slice(page, GuestAddress(p * PAGE))
                    .map_err(|e| crate::vmm::MachineError::Memory(e.to_string()))?;
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
    fn send_all(&mut self, mem: &GuestMemoryMmap, mem_size: u64, check: &mut dyn FnMut() -> Result<(), MigrateError>) -> Result<(), MigrateError> {
        let npages = mem_size / PAGE;
        let mut first = 0;
        while first < npages {
            let n = (npages - first).min(BATCH as u64);
            self.data.resize((n * PAGE) as usize, 0);
            mem.read_slice(&mut self.data, GuestAddress(first * PAGE))
                .map_err(|e| crate::vmm::MachineError::Memory(e.to_string()))?;
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
    fn send_sectors(&mut self, disk: Option<&Path>, sectors: &[u64]) -> Result<(), MigrateError> {
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
struct FileSync {
    dir: Option<PathBuf>,
    sent: HashMap<String, u64>,
    stamp: HashMap<String, (u64, Option<std::time::SystemTime>)>,
}

const GROWING: [&str; 2] = [crate::trace::EVENTS, crate::trace::CONSOLE];

impl FileSync {
    /// `limits`: the exact lengths of events.log and console.log at the
    /// stop (the log head and output length); `None` during pre-copy.
    fn sync(&mut self, tx: &mut Tx, dir: &Path, limits: Option<(u64, u64)>) -> Result<(), MigrateError> {
        let mut names: Vec<String> = [crate::trace::META, crate::trace::IMAGE, crate::trace::DISK]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let ck = dir.join(crate::trace::CHECKPOINTS);
        if let Ok(rd) = std::fs::read_dir(&ck) {
            let mut v: Vec<String> = rd
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.ends_with(".ckpt"))
                .map(|n| format!("{}/{n}", crate::trace::CHECKPOINTS))
                .collect();
            v.sort();
            names.extend(v);
        }
        names.extend(GROWING.iter().map(|s| s.to_string()));
        for name in names {
            let path = dir.join(&name);
            let Ok(md) = std::fs::metadata(&path) else { continue };
            let growing = GROWING.contains(&name.as_str());
            let mut len = md.len();
            if let Some((log_len, out_len)) = limits {
                if name == crate::trace::EVENTS {
                    len = log_len;
                } else if name == crate::trace::CONSOLE {
                    len = out_len;
                }
            }
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

/// Anything the destination says during pre-copy is an error (an abort).
fn check(rx: &Receiver<Result<proto::Frame, ProtoError>>) -> Result<(), MigrateError> {
    match rx.try_recv() {
        Ok(Ok(f)) => Err(ProtoError::Unexpected { got: f.kind.name(), want: "nothing during pre-copy" }.into()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Ok(()),
    }
}

/// A failed write usually means the destination hung up; if it said why
/// (an Abort frame, e.g. a corrupt frame it received), that is the error.
fn peer_reason(rx: &Receiver<Result<proto::Frame, ProtoError>>, e: MigrateError) -> MigrateError {
    if !matches!(e, MigrateError::Proto(ProtoError::Io(_))) {
        return e;
    }
    let until = Instant::now() + Duration::from_secs(2);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(Err(ProtoError::Io(_))) | Err(_) => break,
            Ok(Err(peer)) => return peer.into(),
            Ok(Ok(_)) => continue,
        }
    }
    e
}

/// Connects, announces the VM, and copies memory round after round while
/// the guest runs; returns once it asked the vCPU thread to stop.
fn precopy(ctl: &Controller, vm: &VmHandles, req: &MigrateRequest, started: Instant) -> Result<Handoff, MigrateError> {
    let psk = match &req.key {
        Some(k) => Some(proto::Psk::from_hex(k).ok_or_else(|| MigrateError::Refused("the request's key is not valid".into()))?),
        None => None,
    };
    super::check_reach(&req.to, psk.is_some(), req.insecure, "connect to")?;
    let mut conn = Conn::connect(&req.to)?;
    let mut reader = conn.try_clone().map_err(|e| MigrateError::Io { what: "socket".into(), source: e })?;
    // Handshakes first: the channel's keys depend on both nonces.
    let ours = proto::Handshake::new(psk.is_some());
    proto::write_handshake(&mut conn, &ours)?;
    reader.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let theirs = proto::read_handshake(&mut reader)?;
    let (seal, mut open, transcript) =
        proto::channel(psk.as_ref(), proto::Role::Source, &ours, &theirs, proto::MAX_REPLY_FRAME)?;
    let mut tx = Tx {
        w: BufWriter::with_capacity(1 << 20, conn),
        seal,
        bytes: 0,
        pages: 0,
        cap: req.bandwidth,
        t0: Instant::now(),
        compress: req.compress,
        link_bps: 0.0,
        zstd_bps: 0.0,
        zstd_saving: 0.0,
        batches: 0,
        data: Vec::with_capacity(BATCH * PAGE as usize),
        payload: Vec::with_capacity(BATCH * (PAGE as usize + 8) + 64),
    };
    proto::send_auth(&mut tx.seal, &mut tx.w, &transcript)?;
    let disk_size = match (&vm.config.disk, req.copy_disk) {
        (Some(d), true) => Some(
            std::fs::metadata(d).map_err(|source| MigrateError::Io { what: format!("disk {}", d.display()), source })?.len(),
        ),
        (None, true) => return Err(MigrateError::Refused("--copy-disk: the VM has no disk".into())),
        _ => None,
    };
    let hello = Hello {
        config: vm.config.clone(),
        copy_disk: disk_size,
        recording: vm.recording.as_ref().map(|r| RecordingHello { id: r.id.clone(), clock: r.clock }),
        source_host: super::hostname(),
    };
    tx.send(Kind::Hello, &proto::json(&hello))?;
    tx.flush()?;
    proto::check_auth(&mut open, &mut reader, &transcript)?;
    let welcome: Welcome = proto::from_json(&open.expect(&mut reader, Kind::Welcome)?, "welcome")?;
    reader.set_read_timeout(None).ok();
    ctl.progress(format!("connected to {} ({}); copying {} MiB of memory", req.to, welcome.host, vm.config.mem_size >> 20));

    // Whatever the destination says from now on (abort, ready) arrives here.
    let (ftx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("revirt-migrate-rx".into())
        .spawn(move || loop {
            let f = open.read_frame(&mut reader);
            let end = f.is_err();
            if ftx.send(f).is_err() || end {
                return;
            }
        })
        .map_err(|source| MigrateError::Io { what: "spawning a reader".into(), source })?;

    let files = FileSync { dir: vm.recording.as_ref().map(|r| r.dir.clone()), sent: HashMap::new(), stamp: HashMap::new() };
    vm.dirty.start_tracking()?;
    let mut h = Handoff { tx, rx, files, req: req.clone(), started, rounds: 0, max_throttle: 0 };
    match rounds(ctl, vm, req, &mut h, disk_size) {
        Ok(()) => Ok(h),
        Err(e) => Err(peer_reason(&h.rx, e)),
    }
}

/// The pre-copy rounds, until the rest fits the downtime budget.
fn rounds(ctl: &Controller, vm: &VmHandles, req: &MigrateRequest, h: &mut Handoff, disk_size: Option<u64>) -> Result<(), MigrateError> {
    let Handoff { tx, rx, files, .. } = h;
    let tx = &mut *tx;
    let rx = &*rx;
    let max_downtime = Duration::from_millis(req.max_downtime_ms);
    let mut round = 1u32;
    let mut throttle = 0u32;
    let mut max_throttle = 0u32;
    let mut prev_dirty = u64::MAX;
    let mut stalled = 0;
    loop {
        let t = Instant::now();
        let bytes0 = tx.bytes;
        let sent = if round == 1 {
            let p0 = tx.pages;
            tx.send_all(&vm.mem, vm.config.mem_size, &mut || check(rx))?;
            if let Some(size) = disk_size {
                let all: Vec<u64> = (0..size / 512).collect();
                tx.send_sectors(vm.config.disk.as_deref(), &all)?;
            }
            tx.pages - p0
        } else {
            let (pages, sectors) = vm.dirty.take_tracked()?;
            let n = tx.send_pages(&vm.mem, &pages, true)?;
            if disk_size.is_some() {
                tx.send_sectors(vm.config.disk.as_deref(), &sectors)?;
            }
            n
        };
        if let Some(dir) = files.dir.clone() {
            files.sync(tx, &dir, None)?;
        }
        tx.flush()?;
        check(rx)?;
        let secs = t.elapsed().as_secs_f64().max(1e-6);
        let bps = (tx.bytes - bytes0) as f64 / secs;
        // What got dirty while this round was being sent is the next round.
        let (dirty_now, _) = vm.dirty.peek_tracked()?;
        let wire_per_page = (tx.bytes - bytes0) as f64 / sent.max(1) as f64;
        let predicted = Duration::from_secs_f64(dirty_now as f64 * wire_per_page.max(64.0) / bps.max(1.0));
        ctl.progress(format!(
            "round {round}: {sent} pages, {:.1} MiB in {:.0} ms ({:.0} MB/s); {dirty_now} pages dirtied meanwhile ({:.0} pages/s); predicted downtime {:.1} ms{}",
            (tx.bytes - bytes0) as f64 / (1 << 20) as f64,
            secs * 1e3,
            bps / 1e6,
            dirty_now as f64 / secs,
            predicted.as_secs_f64() * 1e3,
            if throttle > 0 { format!("; guest throttled {throttle}%") } else { String::new() }
        ));
        if round >= 2 && predicted <= max_downtime {
            break;
        }
        if round >= req.max_rounds {
            ctl.progress(format!("{round} rounds: stopping with {dirty_now} pages left"));
            break;
        }
        // Not converging: the guest dirties about as fast as we send.
        if round >= 2 && dirty_now * 10 >= prev_dirty * 9 {
            stalled += 1;
        } else {
            stalled = 0;
        }
        if req.auto_converge && stalled >= 1 && throttle < 99 {
            throttle = (throttle + 20).min(99);
            max_throttle = max_throttle.max(throttle);
            ctl.shared.set_throttle(throttle);
            ctl.progress(format!("auto-converge: the guest dirties memory faster than it can be sent; throttling it to {}% of its time", 100 - throttle));
            stalled = 0;
        } else if stalled >= 2 {
            ctl.progress(format!("no progress for {stalled} rounds: stopping with {dirty_now} pages left"));
            break;
        }
        prev_dirty = dirty_now;
        round += 1;
        if throttle > 0 {
            // Exit-free guest code must still reach the throttle.
            ctl.shared.nudge();
        }
    }
    h.rounds = round;
    h.max_throttle = max_throttle;
    Ok(())
}

/// `revirt migrate`: sends the request to a running VM's control socket,
/// prints its progress, returns its summary.
pub fn request(control: &Path, req: &MigrateRequest, progress: &mut dyn FnMut(&str)) -> Result<Summary, MigrateError> {
    let mut s = UnixStream::connect(control).map_err(|source| MigrateError::Io {
        what: format!("connecting to the VM's control socket {} (was it started with --control?)", control.display()),
        source,
    })?;
    let mut line = serde_json::to_vec(req).expect("request serializes");
    line.push(b'\n');
    s.write_all(&line).map_err(|source| MigrateError::Io { what: "sending the request".into(), source })?;
    for l in BufReader::new(s).lines() {
        let l = l.map_err(|source| MigrateError::Io { what: "reading the VM's answer".into(), source })?;
        match serde_json::from_str::<Reply>(&l) {
            Ok(Reply::Progress(p)) => progress(&p),
            Ok(Reply::Done(s)) => return Ok(s),
            Ok(Reply::Error(e)) => return Err(MigrateError::Refused(e)),
            Err(e) => return Err(MigrateError::Refused(format!("unreadable answer from the VM: {e}"))),
        }
    }
    Err(MigrateError::Refused("the VM closed the control connection without an answer (did it exit?)".into()))
}

/// The recorder moves its VM through the controller (record does not know migrate).
impl crate::record::mover::Mover for Controller {
    fn attach(&self, m: &Machine, recording: Option<RecordingInfo>) {
        Controller::attach(self, m, recording)
    }
    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
    fn finish(&self, m: &mut Machine, live: &mut LiveHost, clock_ns: u64, recorder: RecorderState, stopped: Instant) -> Option<Summary> {
        Controller::finish(self, m, live, clock_ns, Some(recorder), stopped).ok()
    }
    fn ended(&self, why: &str) {
        Controller::ended(self, why)
    }
}
