//! Going live: restore the machine at a point of the recording, stop
//! answering from the log, and let it run on with real time and real input.
//! The replay timeline's private disk copy is the copy-on-write layer: the
//! recording's `disk.img` is never written.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{interrupt, Error, Session};
use crate::record::{self, RecordOptions, RecordSummary};
use crate::vmm::pausable::Pausable;
use crate::vmm::{Console, GuestPanic, HostError, LiveHost, Machine, MachineError, Stop};

/// How a live run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEnd {
    PowerOff(u8),
    Panic(GuestPanic),
    /// Ctrl-C stopped it at this exit count.
    Interrupted { exits: u64 },
}

/// Standard input for the guest that can be let go of: reads fd 0 directly
/// (no std buffering) in short polls, and reports end-of-input once `stop`
/// is set or Ctrl-C was pressed, so the input thread ends without eating
/// what is typed later (e.g. the REPL's next command).
pub struct StoppableStdin {
    stop: Arc<AtomicBool>,
}

impl StoppableStdin {
    pub fn new(stop: Arc<AtomicBool>) -> StoppableStdin {
        StoppableStdin { stop }
    }
}

impl Read for StoppableStdin {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.stop.load(Ordering::SeqCst) || interrupt::is_set() {
                return Ok(0);
            }
            let mut pfd = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd, its count, a timeout.
            let n = unsafe { libc::poll(&mut pfd, 1, 100) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                continue;
            }
            // SAFETY: reads at most buf.len() bytes into buf.
            let r = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return Ok(r as usize);
        }
    }
}

/// Runs the machine at the session's current point live until the guest
/// powers off or crashes (or Ctrl-C, when [`interrupt::install`] was
/// called). The session keeps its position; its next look replays again.
pub fn run_live(s: &mut Session, input: Box<dyn Read + Send>, console: Console) -> Result<LiveEnd, Error> {
    let clock = s.clock_ns()?;
    let mut tl = s.take_timeline()?;
    interrupt::clear();
    let mut live = LiveHost::new(input, console, clock);
    let r = tl.machine.run(&mut Pausable::new(&mut live, Default::default()).or_when(interrupt::is_set), None);
    drop(live);
    let interrupted = interrupt::take();
    match r {
        Ok(Stop::PowerOff(st)) => Ok(LiveEnd::PowerOff(st)),
        Ok(Stop::Panic(p)) => Ok(LiveEnd::Panic(p)),
        Ok(Stop::Paused) => Ok(LiveEnd::Interrupted { exits: tl.machine.exits }),
        Err(MachineError::Host(HostError::WouldWaitForever)) if interrupted => Ok(LiveEnd::Interrupted { exits: tl.machine.exits }),
        Err(e) => Err(e.into()),
    }
}

/// The REPL's `live`: this terminal becomes the guest's console until it stops.
pub fn repl_live(s: &mut Session, out: &mut dyn Write) -> Result<(), Error> {
    let here = s.exits();
    writeln!(
        out,
        "going live at exit {here}: the guest runs on with real time, this terminal is its console \
         (Ctrl-C stops it); the recording is not changed"
    )?;
    out.flush()?;
    let stop = Arc::new(AtomicBool::new(false));
    let r = run_live(s, Box::new(StoppableStdin::new(stop.clone())), Console::Stdout);
    stop.store(true, Ordering::SeqCst);
    // Let the input thread see `stop` before the REPL reads the terminal again.
    std::thread::sleep(Duration::from_millis(150));
    let _ = std::io::stdout().flush();
    match r? {
        LiveEnd::PowerOff(st) => writeln!(out, "\nlive: the guest powered off with status {st}")?,
        LiveEnd::Panic(p) => writeln!(out, "\nlive: the guest crashed: {p}")?,
        LiveEnd::Interrupted { exits } => writeln!(out, "\nlive: stopped by Ctrl-C at live exit {exits}")?,
    }
    writeln!(out, "back in the recording at exit {here}")?;
    Ok(())
}

/// Goes live at the session's point and records the continuation as a new
/// recording in `out_dir` (which starts with a full checkpoint of this state).
pub fn record_live(
    s: &mut Session,
    out_dir: PathBuf,
    checkpoint_every: Duration,
    input: Box<dyn Read + Send>,
    console: Console,
) -> Result<RecordSummary, Error> {
    let clock = s.clock_ns()?;
    let mut tl = s.take_timeline()?;
    // record_from takes a Machine by value: rebuild one from the timeline's
    // state, on its own copy of the (replayed) disk.
    let mut state = tl.machine.save_state(clock)?;
    let memory = tl.machine.memory_bytes()?;
    let disk = match tl.machine.devices.block.path() {
        Some(p) => {
            let tmp = tempfile::Builder::new()
                .prefix("revirt-live-disk")
                .tempfile()
                .map_err(|e| Error::Msg(format!("creating a disk copy: {e}")))?;
            std::fs::copy(p, tmp.path()).map_err(|e| Error::Msg(format!("copying the replay disk: {e}")))?;
            Some(tmp)
        }
        None => None,
    };
    state.config.disk = disk.as_ref().map(|d| d.path().to_path_buf());
    let m = Machine::restore(&state, &memory)?;
    let branched_at = tl.exits();
    drop(tl);
    let image_path = s.rec.dir.join(crate::trace::IMAGE);
    // The bytes the recording was checked with (read once when it was opened).
    let image_bytes = s.rec.image.clone();
    let mut config = s.rec.meta.config.clone();
    config.disk = config.disk.as_ref().map(|_| s.rec.dir.join(crate::trace::DISK));
    let parent = Some(crate::trace::meta::Parent { id: s.rec.meta.id.clone(), exits: branched_at });
    let opts = RecordOptions { image: image_path, config, out: out_dir, clock: s.rec.meta.clock, checkpoint_every, keep_checkpoints: record::DEFAULT_KEEP_CHECKPOINTS, parent, control: None, pmu_counter: None };
    let summary = record::record_from(&opts, &image_bytes, m, input, console, clock)
        .map_err(|e| Error::Msg(format!("recording the live run: {e}")))?;
    drop(disk);
    Ok(summary)
}
