//! The sending side: a control socket that accepts `revirt migrate`
//! requests, the pre-copy thread, and the stop-and-copy + commit that run
//! on the vCPU thread once the guest is paused.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use super::proto::{self, FinalState, Hello, Kind, ProtoError, RecorderState, RecordingHello, Welcome, PAGE};
use super::{Conn, MigrateError, Summary};

mod request;
mod tx;
pub use request::{request, Compress, MigrateRequest, Reply};
use tx::{FileSync, Tx, BATCH};
use crate::vmm::pausable::Shared;
use crate::vmm::machine::DirtyLog;
use crate::vmm::{LiveHost, Machine, VmConfig};

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
        let machine = crate::trace::state::Sealed::of(&m.save_state(clock_ns)?);
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
