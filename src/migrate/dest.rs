//! The receiving side (`revirt receive`): allocate the VM, take pages as
//! they come, load the final state, confirm, and run once the source commits.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};


use super::proto::{self, FinalState, Hello, Kind, ProtoError, Welcome, PAGE};
use super::{Conn, Controller, Listener, MigrateError, Summary};
use crate::record::{RecordSummary, Session};
use crate::vmm::{Console, LiveHost, Machine, Stop, VmConfig};


pub struct ReceiveOptions {
    /// Where the recording goes on, if the incoming VM is being recorded.
    pub out: Option<PathBuf>,
    /// Where a streamed disk (`--copy-disk`) is written, or this host's
    /// path of a shared disk.
    pub disk: Option<PathBuf>,
    /// Where a streamed disk goes when `disk` is `None`: a new private file
    /// this side names (`revirt receive`: the current directory).
    pub private_disk_dir: PathBuf,
    pub input: Box<dyn Read + Send>,
    pub console: Console,
    /// Accept `revirt migrate` requests for the received VM here (move it on).
    pub control: Option<Arc<Controller>>,
    /// The migration key (`--key-file`); `None`: plain channel.
    pub key: Option<proto::Psk>,
    pub limits: Limits,
}

/// What a receiver accepts from a peer it does not trust (`revirt receive`
/// flags). Anything beyond them ends the migration with an error before it
/// costs this host memory, disk or time; the source keeps running.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest guest memory (bytes).
    pub max_mem: u64,
    /// Largest frame (bytes).
    pub max_frame: u32,
    /// Largest streamed disk, and largest recording file (bytes).
    pub max_disk: u64,
    /// Memory sent, in multiples of the guest's memory (pre-copy rounds).
    pub max_rounds: u32,
    /// From the connection to the final state.
    pub max_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_mem: 4 << 30, max_frame: 16 << 20, max_disk: 64 << 30, max_rounds: 64, max_time: Duration::from_secs(600) }
    }
}

/// How a received VM ended.
pub enum Outcome {
    /// It ran here until it stopped.
    Stopped(Stop),
    /// It was being recorded; the recording was continued and is summarized here.
    Recorded(Box<RecordSummary>),
    /// It moved on to yet another host.
    MovedOn(Summary),
}

pub struct Received {
    pub outcome: Outcome,
    pub from: String,
    /// From the final state's arrival to the guest running here.
    pub resume_ms: f64,
    /// From the source's commit arriving to the guest being handed to the
    /// run loop here: what the destination adds to the source's downtime.
    pub resume_after_commit_ms: f64,
    pub bytes: u64,
}

/// Where a recording file the source names goes in `out`: one of the
/// recording's own files, never anything else ([`crate::trace::Dir::receive_path`]).
fn safe_path(out: &crate::trace::Dir, name: &str) -> Result<PathBuf, ProtoError> {
    out.receive_path(name).ok_or_else(|| ProtoError::Corrupt(format!("refusing file name {name:?}")))
}

/// A new file for a streamed disk when the user gave no `--disk`: named by
/// this side (`revirt-disk-XXXXXX.img`, random) in `dir`, created with
/// O_EXCL and mode 0600, so it is never a path the peer chose nor a file
/// that existed before. It is kept after the VM stops: it is the guest's disk.
fn private_disk(dir: &Path) -> Result<(std::fs::File, PathBuf), MigrateError> {
    let t = tempfile::Builder::new()
        .prefix("revirt-disk-")
        .suffix(".img")
        .tempfile_in(dir)
        .map_err(|source| MigrateError::Io { what: format!("creating a private disk copy in {}", dir.display()), source })?;
    let (f, path) = t.keep().map_err(|e| MigrateError::Io { what: "keeping the private disk copy".into(), source: e.error })?;
    // tempfile creates 0600 already; say so explicitly (umask cannot widen it).
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|source| MigrateError::Io { what: format!("chmod {}", path.display()), source })?;
    let path = std::path::absolute(&path).unwrap_or(path);
    eprintln!("revirt: the source streams its disk; writing it to a private copy, {}", path.display());
    Ok((f, path))
}

/// Waits for one incoming VM on `listener`, receives it and runs it.
pub fn receive(listener: &Listener, opts: ReceiveOptions) -> Result<Received, MigrateError> {
    let mut conn = listener.accept()?;
    let started = Instant::now();
    let mut w = conn.try_clone().map_err(|source| MigrateError::Io { what: "socket".into(), source })?;
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let theirs = proto::read_handshake(&mut conn)?;
    let ours = proto::Handshake::new(opts.key.is_some());
    proto::write_handshake(&mut w, &ours)?;
    let (mut seal, mut open, transcript) =
        proto::channel(opts.key.as_ref(), proto::Role::Destination, &ours, &theirs, opts.limits.max_frame)?;
    let r = take(&mut conn, &mut w, &mut seal, &mut open, &transcript, &opts, started);
    let (mut m, state, clock_ns, hello, bytes, state_at) = match r {
        Ok(v) => v,
        Err(e) => {
            // Tell the source why (it keeps running), then give up.
            let _ = seal.write_frame(&mut w, Kind::Abort, e.to_string().as_bytes());
            return Err(e);
        }
    };
    // Everything is in place: what the recorder needs too, before confirming.
    let mut live = LiveHost::new(opts.input, opts.console.clone(), clock_ns);
    live.push_input(&state.pending_input);
    let mut live = Some(live);
    let mut session = None;
    if let (Some(rs), Some(out)) = (&state.recorder, &opts.out) {
        let l = live.take().expect("not yet taken");
        match Session::resume(out, &m, rs, l, &hello.source_host, opts.control.clone().map(|c| c as Arc<dyn crate::record::mover::Mover>)) {
            Ok(s) => session = Some(s),
            Err(e) => {
                let e: MigrateError = e.into();
                let _ = seal.write_frame(&mut w, Kind::Abort, e.to_string().as_bytes());
                return Err(e);
            }
        }
    }
    seal.write_frame(&mut w, Kind::Ready, &[])?;
    w.flush().map_err(ProtoError::Io)?;
    match open.read_frame(&mut conn) {
        Ok(f) if f.kind == Kind::Commit => {}
        Ok(f) => return Err(ProtoError::Unexpected { got: f.kind.name(), want: "commit" }.into()),
        Err(e) => {
            return Err(MigrateError::Refused(format!(
                "the source did not commit ({e}); the VM stays with the source"
            )))
        }
    }
    let commit_at = Instant::now();
    conn.shutdown();
    let from = hello.source_host.clone();
    // The guest goes to the run loop right after this.
    let resume_ms = state_at.elapsed().as_secs_f64() * 1e3;
    let resume_after_commit_ms = commit_at.elapsed().as_secs_f64() * 1e3;
    let outcome = match session {
        Some(s) => Outcome::Recorded(Box::new(s.run(m)?)),
        None => match run_live(&mut m, live.as_mut().expect("no session, so the live host is here"), opts.control.as_deref())? {
            LiveEnd::Stopped(s) => Outcome::Stopped(s),
            LiveEnd::Migrated(s) => Outcome::MovedOn(s),
        },
    };
    Ok(Received { outcome, from, resume_ms, resume_after_commit_ms, bytes })
}

type Taken = (Machine, FinalState, u64, Hello, u64, Instant);

/// Everything up to the final state: the peer's proof, hello, pages, files, state.
fn take(
    conn: &mut Conn,
    w: &mut Conn,
    seal: &mut proto::Sealer,
    open: &mut proto::Opener,
    transcript: &[u8; 32],
    opts: &ReceiveOptions,
    started: Instant,
) -> Result<Taken, MigrateError> {
    // The source proves itself first; only then does this side answer.
    proto::check_auth(open, conn, transcript)?;
    proto::send_auth(seal, w, transcript)?;
    let hello: Hello = proto::from_json(&open.expect(conn, Kind::Hello)?, "hello")?;
    check_memory(&hello, &opts.limits)?;
    let mut config: VmConfig = hello.config.clone();
    // Never a path the peer names: the disk is this side's --disk.
    let (disk, disk_file) = disk_for(&hello, opts)?;
    config.disk = disk;
    let out = recording_dir(&hello, opts)?;
    let m = Machine::create(&config)?;
    seal.write_frame(w, Kind::Welcome, &proto::json(&Welcome { host: super::hostname() }))?;
    w.flush().map_err(ProtoError::Io)?;
    let npages = config.mem_size / PAGE;
    let mut inc = Incoming {
        m,
        copy_disk: hello.copy_disk,
        disk_file,
        out,
        bytes: 45,
        npages,
        pages_in: 0,
        // More than max_rounds copies of memory is a peer that never
        // converges (or never stops).
        max_pages: npages.saturating_mul(opts.limits.max_rounds as u64 + 1),
    };
    let (state, clock_ns, at) = inc.receive(conn, open, &opts.limits, started)?;
    Ok((inc.m, state, clock_ns, hello, inc.bytes, at))
}

fn mib(b: u64) -> u64 {
    b >> 20
}

/// Refuses a VM with more memory than this receiver accepts.
fn check_memory(hello: &Hello, lim: &Limits) -> Result<(), MigrateError> {
    if hello.config.mem_size > lim.max_mem {
        return Err(MigrateError::Refused(format!(
            "the VM has {} MiB of memory; this receiver accepts at most {} MiB (--max-mem)",
            mib(hello.config.mem_size),
            mib(lim.max_mem)
        )));
    }
    Ok(())
}

/// The disk the VM runs on here: a streamed disk's new file (`--disk` or a
/// private one), this host's copy of a shared disk, or none.
fn disk_for(hello: &Hello, opts: &ReceiveOptions) -> Result<(Option<PathBuf>, Option<std::fs::File>), MigrateError> {
    let lim = &opts.limits;
    if let Some(size) = hello.copy_disk {
        if size > lim.max_disk || size % 512 != 0 {
            return Err(MigrateError::Refused(format!(
                "the streamed disk has {size} bytes; this receiver accepts whole sectors up to {} MiB (--max-disk)",
                mib(lim.max_disk)
            )));
        }
        let (f, path) = match &opts.disk {
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .map_err(|source| MigrateError::Io { what: format!("creating disk {}", path.display()), source })?;
                (f, path.clone())
            }
            None => private_disk(&opts.private_disk_dir)?,
        };
        f.set_len(size).map_err(|source| MigrateError::Io { what: format!("sizing disk {}", path.display()), source })?;
        return Ok((Some(path), Some(f)));
    }
    let Some(theirs) = &hello.config.disk else { return Ok((None, None)) };
    let Some(d) = &opts.disk else {
        return Err(MigrateError::Refused(format!(
            "the VM has a disk (the source calls it {}); this receiver never opens a path the peer names: \
             give `revirt receive --disk PATH` (this host's copy of the shared disk), or migrate with --copy-disk",
            theirs.display()
        )));
    };
    Ok((Some(d.clone()), None))
}

/// Where a recorded VM's recording goes on (`-o`, absent or empty), created.
fn recording_dir(hello: &Hello, opts: &ReceiveOptions) -> Result<Option<crate::trace::Dir>, MigrateError> {
    match (&hello.recording, &opts.out) {
        (Some(r), Some(out)) => {
            let dir = crate::trace::Dir::new(out);
            if dir.is_occupied() {
                return Err(MigrateError::Refused(format!("{} already exists and is not empty", out.display())));
            }
            dir.create().map_err(|source| MigrateError::Io { what: format!("creating {}", out.display()), source })?;
            tracing::info!("continuing recording {} in {}", r.id, out.display());
            Ok(Some(dir))
        }
        (Some(r), None) => Err(MigrateError::Refused(format!(
            "the VM is being recorded (recording {}): give `revirt receive -o DIR` to continue the recording",
            r.id
        ))),
        (None, _) => Ok(None),
    }
}

/// The VM being received: memory, disk and recording files as they come.
struct Incoming {
    m: Machine,
    copy_disk: Option<u64>,
    disk_file: Option<std::fs::File>,
    out: Option<crate::trace::Dir>,
    bytes: u64,
    npages: u64,
    pages_in: u64,
    max_pages: u64,
}

impl Incoming {
    /// Takes frames until the final state, within the time budget.
    fn receive(&mut self, conn: &mut Conn, open: &mut proto::Opener, lim: &Limits, started: Instant) -> Result<(FinalState, u64, Instant), MigrateError> {
        let over = || MigrateError::Refused(format!("the migration took longer than this receiver allows ({} s, --max-time)", lim.max_time.as_secs()));
        let mut buf = Vec::new();
        loop {
            let left = lim.max_time.checked_sub(started.elapsed()).filter(|d| !d.is_zero()).ok_or_else(over)?;
            conn.set_read_timeout(Some(left.min(Duration::from_secs(60)))).ok();
            let kind = match open.read_frame_into(conn, &mut buf) {
                Ok(k) => k,
                // A read cut off by the time budget is the budget, not a network fault.
                Err(_) if started.elapsed() >= lim.max_time => return Err(over()),
                Err(e) => return Err(e.into()),
            };
            self.bytes += 9 + buf.len() as u64;
            if let Some(done) = self.frame(kind, &buf, lim)? {
                return Ok(done);
            }
        }
    }

    /// One frame; the final state ends the transfer.
    fn frame(&mut self, kind: Kind, buf: &[u8], lim: &Limits) -> Result<Option<(FinalState, u64, Instant)>, MigrateError> {
        match kind {
            Kind::Pages => {
                let (pages, data) = proto::decode_pages(buf)?;
                self.count_pages(pages.len(), lim)?;
                for (p, d) in pages.iter().zip(data.chunks_exact(PAGE as usize)) {
                    self.check_page(*p)?;
                    self.m.write_pages(*p, d)?;
                }
            }
            Kind::ZeroPages => {
                let zeros = proto::decode_numbers(buf)?;
                self.count_pages(zeros.len(), lim)?;
                let zero = vec![0u8; PAGE as usize];
                for p in zeros {
                    self.check_page(p)?;
                    self.m.write_pages(p, &zero)?;
                }
            }
            Kind::Disk => self.disk(buf)?,
            Kind::File => self.file(buf, lim)?,
            Kind::State => return self.state(buf).map(Some),
            other => return Err(ProtoError::Unexpected { got: other.name(), want: "pages, files or state" }.into()),
        }
        Ok(None)
    }

    fn count_pages(&mut self, n: usize, lim: &Limits) -> Result<(), MigrateError> {
        self.pages_in += n as u64;
        if self.pages_in > self.max_pages {
            return Err(MigrateError::Refused(format!(
                "the source sent more than {} rounds' worth of memory (--max-rounds)",
                lim.max_rounds
            )));
        }
        Ok(())
    }

    fn check_page(&self, p: u64) -> Result<(), MigrateError> {
        if p >= self.npages {
            return Err(ProtoError::Corrupt(format!("page {p} is outside guest memory")).into());
        }
        Ok(())
    }

    fn disk(&mut self, buf: &[u8]) -> Result<(), MigrateError> {
        let (first, data) = proto::decode_disk(buf)?;
        let Some(d) = self.disk_file.as_mut() else {
            return Err(ProtoError::Corrupt("disk data, but no disk is being copied".into()).into());
        };
        let size = self.copy_disk.unwrap_or(0);
        if first.checked_mul(512).and_then(|o| o.checked_add(data.len() as u64)).is_none_or(|e| e > size) {
            return Err(ProtoError::Corrupt("disk data beyond the end of the disk".into()).into());
        }
        d.seek(std::io::SeekFrom::Start(first * 512))
            .and_then(|_| d.write_all(&data))
            .map_err(|source| MigrateError::Io { what: "writing the disk copy".into(), source })
    }

    fn file(&mut self, buf: &[u8], lim: &Limits) -> Result<(), MigrateError> {
        let (name, offset, data) = proto::decode_file(buf)?;
        let Some(out) = &self.out else {
            return Err(ProtoError::Corrupt("recording files, but the VM is not being recorded".into()).into());
        };
        let path = safe_path(out, &name)?;
        if offset.checked_add(data.len() as u64).is_none_or(|e| e > lim.max_disk) {
            return Err(ProtoError::Corrupt(format!("{name}: bytes beyond the {} MiB file limit (--max-disk)", mib(lim.max_disk))).into());
        }
        let io = |source| MigrateError::Io { what: format!("writing {}", path.display()), source };
        // Offset 0 starts the file afresh (a checkpoint the source's
        // retention policy rewrote is sent again, whole).
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(offset == 0).open(&path).map_err(io)?;
        file.seek(std::io::SeekFrom::Start(offset)).and_then(|_| file.write_all(&data)).map_err(io)
    }

    /// The final state (and its guest clock, ns).
    fn state(&mut self, buf: &[u8]) -> Result<(FinalState, u64, Instant), MigrateError> {
        let at = Instant::now();
        let state: FinalState = proto::from_json(buf, "final state")?;
        let machine = state.machine.open()?;
        self.m.load_state(&machine)?;
        if let Some(d) = self.disk_file.as_mut() {
            d.sync_data().map_err(|source| MigrateError::Io { what: "syncing the disk copy".into(), source })?;
        }
        if state.recorder.is_some() != self.out.is_some() {
            return Err(ProtoError::Corrupt("recorder state does not match the hello".into()).into());
        }
        Ok((state, machine.clock_ns, at))
    }
}

/// "powered off (status 0)" and the like, for a requester's error.
pub fn stopped_what(stop: &Stop) -> String {
    match stop {
        Stop::PowerOff(s) => format!("powered off (status {s})"),
        Stop::Panic(p) => format!("crashed ({p})"),
        Stop::Paused => "paused".into(),
    }
}

/// How a live run ended.
pub enum LiveEnd {
    Stopped(Stop),
    Migrated(Summary),
}

/// Runs a VM live; with a controller, `revirt migrate` can move it away
/// (then this returns `Migrated` and the VM must not run here again).
pub fn run_live(m: &mut Machine, live: &mut LiveHost, control: Option<&Controller>) -> Result<LiveEnd, MigrateError> {
    run_live_until(m, live, control, None)
}

pub fn run_live_until(
    m: &mut Machine,
    live: &mut LiveHost,
    control: Option<&Controller>,
    exit_limit: Option<u64>,
) -> Result<LiveEnd, MigrateError> {
    let Some(c) = control else {
        return Ok(LiveEnd::Stopped(m.run(live, exit_limit)?));
    };
    c.attach(m, None);
    c.shared.set_waker(live.waker());
    loop {
        let stop = m.run(&mut crate::vmm::pausable::Pausable::new(live, c.shared.clone()), exit_limit)?;
        if stop == Stop::Paused && c.shared.stop_requested() {
            use crate::vmm::Host;
            let clock = live.now_ns();
            match c.finish(m, live, clock, None, std::time::Instant::now()) {
                Ok(s) => return Ok(LiveEnd::Migrated(s)),
                Err(_) => continue, // not committed: run on here
            }
        }
        c.ended(&stopped_what(&stop));
        return Ok(LiveEnd::Stopped(stop));
    }
}
