//! Events: every non-deterministic input the guest saw, with where it saw it.

use serde::{Deserialize, Serialize};

use crate::clock::ExecPoint;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    PowerOff(u8),
    /// The guest kernel reported an unhandled exception (vector).
    Panic(u8),
    /// The recorder stopped the guest (Ctrl-C, limit).
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The guest (or a device on its behalf, e.g. timer programming) read
    /// the clock during guest-caused exit number `exits`.
    Clock { exits: u64, value: u64 },
    /// A timer interrupt was raised at `at`; `now_ns` is the clock the timer saw.
    Timer { at: ExecPoint, fp: u64, now_ns: u64 },
    /// Serial input arrived at `at`.
    Serial { at: ExecPoint, fp: u64, bytes: Vec<u8> },
    /// Nothing else happened up to here (lets a cut-short recording replay this far).
    Mark { exits: u64 },
    /// Checkpoint `id` was taken here, before the guest ran on.
    Checkpoint { id: u32, exits: u64, fp: u64 },
    /// The recording ended. `state_hash` covers registers, devices, memory and disk;
    /// `output_sha256` the whole console output.
    End { exits: u64, reason: EndReason, state_hash: String, output_len: u64, output_sha256: String },
    /// The VM was live-migrated here (after exit `exits`) from host `from`
    /// to host `to`; the recording goes on at the destination. Nothing the
    /// guest sees changes: replay runs through it.
    Migrated { exits: u64, from: String, to: String },
    /// Checkpoint `id`'s file landed on disk with this SHA-256 (hex): binds
    /// the checkpoint into the log's hash chain. Logged once the file is
    /// written (possibly later than the `Checkpoint` event, by another
    /// thread); `exits` is the exit count when it was logged (>= the
    /// checkpoint's). Replay skips it like a mark.
    CheckpointFile { id: u32, exits: u64, sha256: String },
    /// console.log's first `len` bytes were on disk (handed to the kernel)
    /// with this SHA-256 (hex) when this was logged: binds the console into
    /// the chain as it grows (at least every 100 ms of output, at each
    /// checkpoint and before a migration), so a cut-short recording vouches
    /// for all but its last moments of output. Replay skips it like a mark.
    ConsoleFile { exits: u64, len: u64, sha256: String },
    /// Every page and sector of checkpoint `id`'s file (the version with
    /// this SHA-256) is also in a later kept checkpoint file, up to
    /// checkpoint `by`: a restore of checkpoint `by` or any later one need
    /// not open it (trace::checkpoint::rebuild). Logged by the recorder
    /// once it knows (record::cover); `verify` checks the claim against the
    /// files. Format version 4. Replay skips it like a mark.
    CheckpointCovered { id: u32, by: u32, exits: u64, sha256: String },
}

impl Event {
    /// Bookkeeping that the guest never sees (replay skips it).
    pub fn is_mark(&self) -> bool {
        matches!(self, Event::Mark { .. } | Event::Checkpoint { .. } | Event::Migrated { .. } | Event::CheckpointFile { .. } | Event::ConsoleFile { .. } | Event::CheckpointCovered { .. })
    }

    /// Guest-caused exits at which the event happened.
    pub fn exits(&self) -> u64 {
        match self {
            Event::Clock { exits, .. }
            | Event::Mark { exits }
            | Event::Checkpoint { exits, .. }
            | Event::End { exits, .. }
            | Event::Migrated { exits, .. }
            | Event::CheckpointFile { exits, .. }
            | Event::ConsoleFile { exits, .. }
            | Event::CheckpointCovered { exits, .. } => *exits,
            Event::Timer { at, .. } | Event::Serial { at, .. } => at.exits,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Event::Clock { .. } => "clock",
            Event::Timer { .. } => "timer",
            Event::Serial { .. } => "serial",
            Event::Mark { .. } => "mark",
            Event::Checkpoint { .. } => "checkpoint",
            Event::End { .. } => "end",
            Event::Migrated { .. } => "migrated",
            Event::CheckpointFile { .. } => "ckpt-file",
            Event::ConsoleFile { .. } => "console-file",
            Event::CheckpointCovered { .. } => "ckpt-covered",
        }
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Clock { exits, value } => write!(f, "clock read = {value} ns at exit {exits}"),
            Event::Timer { at, fp, now_ns } => write!(f, "timer interrupt at {at} (fingerprint {fp:#x}, clock {now_ns} ns)"),
            Event::Serial { at, bytes, .. } => write!(f, "serial input {:?} at {at}", String::from_utf8_lossy(bytes)),
            Event::Mark { exits } => write!(f, "mark at exit {exits}"),
            Event::Checkpoint { id, exits, .. } => write!(f, "checkpoint {id} at exit {exits}"),
            Event::End { exits, reason, .. } => write!(f, "end ({reason:?}) at exit {exits}"),
            Event::Migrated { exits, from, to } => write!(f, "migrated from {from} to {to} at exit {exits}"),
            Event::CheckpointFile { id, sha256, .. } if sha256.is_empty() => write!(f, "checkpoint {id} dropped (thinned by the retention policy)"),
            Event::CheckpointFile { id, sha256, .. } => write!(f, "checkpoint {id} written, SHA-256 {}", &sha256[..sha256.len().min(16)]),
            Event::ConsoleFile { len, sha256, .. } => write!(f, "console.log: {len} bytes written, SHA-256 {}", &sha256[..sha256.len().min(16)]),
            Event::CheckpointCovered { id, by, .. } => write!(f, "checkpoint {id}: every page is in a later file by checkpoint {by}"),
        }
    }
}
