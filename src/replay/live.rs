//! Going live: restore the machine at a point of the recording, stop
//! answering from the log, and let it run on with real time and real input.
//! The replay timeline's private disk copy is the copy-on-write layer: the
//! recording's `disk.img` is never written.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use super::{ReplayError, Timeline};
use crate::record::{self, RecordOptions};
use crate::vmm::pausable::Pausable;
use crate::vmm::{HostError, LiveHost, Machine, MachineError, Stop};

pub use crate::record::RecordSummary;
pub use crate::vmm::{Console, GuestPanic};

/// How a live run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEnd {
    PowerOff(u8),
    Panic(GuestPanic),
    /// Ctrl-C (or whatever `stop` watches) stopped it at this exit count.
    Interrupted { exits: u64 },
}

/// Runs the timeline's machine live from where it stands (guest time goes
/// on from `clock` ns) until the guest powers off or crashes, or `stop`
/// says so; `stopped` tells afterwards whether it did (and resets it).
pub fn run(
    mut tl: Timeline,
    clock: u64,
    input: Box<dyn Read + Send>,
    console: Console,
    stop: fn() -> bool,
    stopped: fn() -> bool,
) -> Result<LiveEnd, ReplayError> {
    let mut live = LiveHost::new(input, console, clock);
    let r = tl.machine.run(&mut Pausable::new(&mut live, Default::default()).or_when(stop), None);
    drop(live);
    let interrupted = stopped();
    match r {
        Ok(Stop::PowerOff(st)) => Ok(LiveEnd::PowerOff(st)),
        Ok(Stop::Panic(p)) => Ok(LiveEnd::Panic(p)),
        Ok(Stop::Paused) => Ok(LiveEnd::Interrupted { exits: tl.machine.exits }),
        Err(MachineError::Host(HostError::WouldWaitForever)) if interrupted => Ok(LiveEnd::Interrupted { exits: tl.machine.exits }),
        Err(e) => Err(e.into()),
    }
}

/// Goes live where the timeline stands and records the continuation as a
/// new recording in `out_dir` (which starts with a full checkpoint of this
/// state, its parent named in meta.json).
pub fn record(
    mut tl: Timeline,
    clock: u64,
    out_dir: PathBuf,
    checkpoint_every: Duration,
    input: Box<dyn Read + Send>,
    console: Console,
) -> Result<RecordSummary, LiveError> {
    // record_from takes a Machine by value: rebuild one from the timeline's
    // state, on its own copy of the (replayed) disk.
    let mut state = tl.machine.save_state(clock).map_err(ReplayError::from)?;
    let memory = tl.machine.memory_bytes().map_err(ReplayError::from)?;
    let disk = match tl.machine.devices.block.path() {
        Some(p) => {
            let tmp = tempfile::Builder::new().prefix("revirt-live-disk").tempfile().map_err(|source| LiveError::Io { what: "creating a disk copy", source })?;
            std::fs::copy(p, tmp.path()).map_err(|source| LiveError::Io { what: "copying the replay disk", source })?;
            Some(tmp)
        }
        None => None,
    };
    state.config.disk = disk.as_ref().map(|d| d.path().to_path_buf());
    let m = Machine::restore(&state, &memory).map_err(ReplayError::from)?;
    let branched_at = tl.machine.exits;
    let rec = tl.rec.clone();
    drop(tl);
    let image_path = rec.files().image();
    // The bytes the recording was checked with (read once when it was opened).
    let image_bytes = rec.image.clone();
    let mut config = rec.meta.config.clone();
    config.disk = config.disk.as_ref().map(|_| rec.files().disk());
    let parent = Some(crate::trace::meta::Parent { id: rec.meta.id.clone(), exits: branched_at });
    let opts = RecordOptions { image: image_path, config, out: out_dir, clock: rec.meta.clock, checkpoint_every, keep_checkpoints: record::DEFAULT_KEEP_CHECKPOINTS, parent, control: None, pmu_counter: None };
    let summary = record::record_from(&opts, &image_bytes, m, input, console, clock)?;
    drop(disk);
    Ok(summary)
}

/// Why going live and recording failed.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Record(#[from] record::RecordError),
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
}
