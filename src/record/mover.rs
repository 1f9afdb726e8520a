//! Moving a recording VM to another host mid-run (live migration) without
//! record depending on migrate: the recorder hands its state to a [`Mover`]
//! (migrate's controller implements it) and learns whether the VM moved.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::vmm::pausable::Shared;
use crate::vmm::{LiveHost, Machine};

/// What a recording VM's mover may do, asked by the recorder's run loop.
pub trait Mover: Send + Sync {
    /// Handles on the machine (and the recording) for the mover's thread.
    fn attach(&self, m: &Machine, recording: Option<RecordingInfo>);
    /// The pause/throttle switch the run loop's host watches.
    fn shared(&self) -> &Arc<Shared>;
    /// Stop-and-copy with the guest paused; `Some`: committed, the VM runs
    /// elsewhere now; `None`: nothing committed, record on here.
    fn finish(&self, m: &mut Machine, live: &mut LiveHost, clock_ns: u64, recorder: RecorderState, stopped: Instant) -> Option<MoveSummary>;
    /// The guest stopped on its own (`why`) before a requested move ended.
    fn ended(&self, why: &str);
}

/// The recording the migrating VM writes, if any.
#[derive(Clone)]
pub struct RecordingInfo {
    pub dir: PathBuf,
    pub id: String,
    pub clock: crate::clock::ClockKind,
}

/// The recorder's place in its recording when the VM stopped, so the
/// destination appends to the same log and checkpoint series.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecorderState {
    pub events: u64,
    pub log: crate::trace::log::LogHead,
    pub checkpoints: u32,
    pub output_len: u64,
    /// Changes since the source's last checkpoint: the destination's next
    /// checkpoint must include them.
    pub ckpt_pages: Vec<u64>,
    pub ckpt_sectors: Vec<u64>,
    /// The checkpoints the retention policy kept (the destination thins
    /// the same set on); empty from a source that does not say.
    #[serde(default)]
    pub kept_checkpoints: Vec<u32>,
}


/// What a finished migration reports (source side).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MoveSummary {
    pub to: String,
    pub rounds: u32,
    /// Bytes put on the wire (after compression).
    pub bytes: u64,
    /// Pages sent over all rounds, including the stop-and-copy.
    pub pages: u64,
    /// Pages sent while the guest was stopped.
    pub final_pages: u64,
    pub total_ms: f64,
    /// Guest paused at the source until the commit was sent; the
    /// destination resumes it on receipt (plus one network latency).
    pub downtime_ms: f64,
    /// Highest throttle auto-converge applied (percent of time the guest slept).
    pub max_throttle: u32,
    pub recording: bool,
}
