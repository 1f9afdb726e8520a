//! `Timeline`: a replay session that can be restored to any checkpoint and
//! run forward to any execution point — the API the GDB stub and the REPL
//! build on (as rr's GdbServer talks only to its ReplayTimeline).

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::search::Scan;
use super::{Recording, ReplayError, ReplayHost, Sink, StopAt};
use crate::clock::ExecPoint;
use crate::trace::{self, Checkpoint, EndReason, Event};
use crate::trace::checkpoint::SECTOR;
use super::ReplayStop;
use crate::vmm::{HostError, Machine, MachineError, Stop};
use super::{Fpu, Regs, Sregs};
use vm_memory::{Bytes, GuestAddress};

/// How a replay run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest reached the recording's end; `problems` is empty when the
    /// final state, output and exit count all match the recording.
    Finished { stop: Stop, state_hash: String, problems: Vec<String> },
    /// The requested point was reached.
    Reached,
    /// The recording was cut short; replay got as far as it vouches for.
    EndOfRecording(String),
    /// The replay stopped matching the recording.
    Diverged(String),
    /// A requested point is not on the recorded execution path.
    NotReached(String),
}

/// Which branch counter a PMU-clock replay lands with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterKind {
    /// The simulated counter: skids up to `max_skid` from `seed`.
    Sim { max_skid: u64, seed: u64 },
    /// The hardware PMU (perf_event_open on this thread).
    Real,
}

/// PMU-clock landing: the counter and the margin before each target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LandingConfig {
    pub margin: u64,
    pub counter: CounterKind,
}

pub struct Timeline {
    pub rec: Arc<Recording>,
    pub(crate) machine: Machine,
    pub(crate) host: ReplayHost,
    /// Kept across restores (seeks rebuild the machine and the host).
    landing: Option<LandingConfig>,
    /// The disk the replay runs on: a private copy, so the recording is never written.
    _disk: Option<tempfile::NamedTempFile>,
}

impl Timeline {
    /// The latest checkpoint from which "right after exit `exits`" can be
    /// reached. Exit-clock checkpoints sit right after an exit, so one at
    /// `exits` itself will do; stepped recordings checkpoint anywhere inside
    /// an interval (possibly past that point), so theirs must lie before it.
    pub fn nearest_checkpoint(rec: &Recording, exits: u64) -> u32 {
        let precise = rec.meta.clock.is_precise();
        rec.checkpoints
            .iter()
            .rev()
            .find(|c| if precise { c.1 < exits } else { c.1 <= exits })
            .map(|c| c.0)
            .unwrap_or(0)
    }

    /// A replay session positioned at checkpoint `id`.
    pub fn at_checkpoint(rec: Arc<Recording>, id: u32, sink: Sink) -> Result<Timeline, ReplayError> {
        if !rec.checkpoints.iter().any(|c| c.0 == id) {
            return Err(ReplayError::NoCheckpoint(id));
        }
        let dir = rec.dir.clone();
        let disk = match &rec.meta.config.disk {
            Some(_) => {
                let src = rec.files().disk();
                let tmp = tempfile::Builder::new().prefix("revirt-replay-disk").tempfile().map_err(|source| {
                    ReplayError::Io { what: "creating a replay disk", path: std::env::temp_dir().display().to_string(), source }
                })?;
                // Hashed while copied: the replay runs on exactly the bytes checked.
                let mut f = tmp.as_file();
                trace::copy_checked(&src, &mut f, rec.disk_sha.as_deref())
                    .map_err(|e| ReplayError::Damaged(dir.display().to_string(), e))?;
                Some(tmp)
            }
            None => None,
        };
        // Checkpoints 0..=id straight into the new guest's RAM and the disk copy.
        let mut config = rec.meta.config.clone();
        config.disk = disk.as_ref().map(|d| d.path().to_path_buf());
        let mut machine = Machine::create(&config)?;
        let mut header = trace::checkpoint::rebuild(
            &dir,
            &rec.seals,
            0,
            id,
            |frame, bytes| machine.write_pages(frame, bytes).map_err(|e| e.to_string()),
            |first, bytes| match &disk {
                Some(d) => {
                    use std::os::unix::fs::FileExt;
                    d.as_file().write_all_at(bytes, first * SECTOR).map_err(|e| format!("writing {}: {e}", d.path().display()))
                }
                None => Ok(()),
            },
        )?;
        if (header.next_event as usize) < rec.events_base {
            return Err(ReplayError::Damaged(
                dir.display().to_string(),
                format!("checkpoint {id} starts at event #{}, before the events read for this seek (#{} on)", header.next_event, rec.events_base),
            ));
        }
        header.machine.config.disk = config.disk.clone();
        machine.config = header.machine.config.clone();
        machine.load_state(&header.machine)?;
        let ck = Checkpoint { header, data: Vec::new() };
        let mut host = ReplayHost::new(rec.clone(), ck.header.next_event as usize, ck.header.output_len, sink);
        host.set_clock(ck.header.machine.clock_ns);
        Ok(Timeline { rec, machine, host, landing: None, _disk: disk })
    }

    pub fn open(rec: Arc<Recording>, sink: Sink) -> Result<Timeline, ReplayError> {
        Timeline::at_checkpoint(rec, 0, sink)
    }

    /// The guest clock as the guest last saw it (ns): where a live
    /// continuation's clock should resume.
    pub fn clock_ns(&self) -> u64 {
        self.host.clock_ns()
    }

    /// Guest-caused exits so far.
    pub fn exits(&self) -> u64 {
        self.machine.exits
    }

    /// The general registers where the timeline stands.
    pub fn regs(&self) -> Result<Regs, ReplayError> {
        Ok(self.machine.vcpu.regs().map_err(MachineError::from)?)
    }

    /// The system registers (segments, control registers, EFER).
    pub fn sregs(&self) -> Result<Sregs, ReplayError> {
        Ok(self.machine.vcpu.sregs().map_err(MachineError::from)?)
    }

    /// The x87/SSE state.
    pub fn fpu(&self) -> Result<Fpu, ReplayError> {
        Ok(self.machine.vcpu.fpu().map_err(MachineError::from)?)
    }

    /// The MSRs a machine state saves, as (index, value).
    pub fn msrs(&self) -> Result<Vec<(u32, u64)>, ReplayError> {
        Ok(self.machine.vcpu.save().map_err(MachineError::from)?.msrs)
    }

    /// Guest RAM size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.machine.config.mem_size
    }

    /// Reads guest-physical memory; an address range beyond RAM is an error.
    pub fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReplayError> {
        let end = addr.checked_add(buf.len() as u64).filter(|&e| e <= self.mem_size());
        end.and_then(|_| self.machine.mem.read_slice(buf, GuestAddress(addr)).ok()).ok_or(ReplayError::Beyond {
            addr,
            len: buf.len() as u64,
            mem: self.mem_size(),
        })
    }

    /// All of guest RAM (a copy).
    pub fn memory_bytes(&self) -> Result<Vec<u8>, ReplayError> {
        Ok(self.machine.memory_bytes()?)
    }

    /// The index of the next recorded event replay will consume.
    pub fn next_event(&self) -> usize {
        self.host.next
    }

    /// Bytes of console output so far.
    pub fn output_len(&self) -> u64 {
        self.host.output_len
    }

    /// The full machine state hash (registers, devices, memory).
    pub fn state_hash(&mut self) -> Result<String, ReplayError> {
        Ok(self.machine.state_hash()?)
    }

    /// The console output so far, when the timeline buffers it (`Sink::Buffer`).
    pub fn buffered_output(&self) -> Option<&[u8]> {
        match &self.host.sink {
            Sink::Buffer(b) => Some(b),
            _ => None,
        }
    }

    /// The PMU landing's figures, when one is in use.
    pub fn landing_stats(&self) -> Option<&crate::replay::Landing> {
        self.host.landing.as_ref()
    }

    /// Hardware-breakpoint exits the PMU landing took so far.
    pub fn landing_hits(&self) -> u64 {
        self.machine.hw_bp_hits
    }

    /// Native breakpoint traps (int3 at a site) taken so far.
    pub fn breakpoint_traps(&self) -> u64 {
        self.machine.bps.hits
    }

    /// Accesses to watched pages the VMM performed so far.
    pub fn watched_accesses(&self) -> u64 {
        self.machine.watched_accesses()
    }

    /// Whether an interrupt is waiting to be delivered at the next boundary.
    pub fn interrupt_pending(&self) -> bool {
        self.machine.devices.pic.next_vector().is_some()
    }

    /// `count` sectors of the replay's disk from `first`.
    pub fn read_sectors(&self, first: u64, count: u64) -> Result<Vec<u8>, ReplayError> {
        self.machine.devices.block.read_sectors(first, count).map_err(|source| ReplayError::Io {
            what: "reading the disk",
            path: self.machine.config.disk.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            source,
        })
    }

    /// Moves to exit count `exits`: restores the nearest checkpoint at or
    /// before it when that is closer than running on from here (or when the
    /// target lies behind us), then replays forward.
    pub fn seek(&mut self, exits: u64) -> Result<Outcome, ReplayError> {
        let ck = Timeline::nearest_checkpoint(&self.rec, exits);
        let ck_exits = self.rec.checkpoints.iter().find(|c| c.0 == ck).map(|c| c.1).unwrap_or(0);
        if exits < self.exits() || ck_exits > self.exits() {
            let sink = std::mem::replace(&mut self.host.sink, Sink::Discard);
            let landing = self.landing;
            *self = Timeline::at_checkpoint(self.rec.clone(), ck, sink)?;
            if let Some(l) = landing {
                self.use_landing(l)?;
            }
        }
        if self.exits() == exits {
            return Ok(Outcome::Reached);
        }
        self.run(Some(exits))
    }

    /// Replays precise events with the PMU clock's landing algorithm over
    /// the simulated counter (margin before each target, random skid up to
    /// `max_skid` branches), instead of stepping straight to them.
    pub fn use_simulated_pmu(&mut self, margin: u64, max_skid: u64, seed: u64) -> Result<(), ReplayError> {
        self.use_landing(LandingConfig { margin, counter: CounterKind::Sim { max_skid, seed } })
    }

    /// Replays precise events with the hardware PMU (this thread must be
    /// the one that runs the replay); `margin` defaults to the CPU's.
    pub fn use_pmu(&mut self, margin: Option<u64>) -> Result<(), ReplayError> {
        let c = crate::clock::pmu::RealCounter::open().map_err(ReplayError::NoPmu)?;
        let margin = margin.unwrap_or(c.perf.config.replay_margin);
        self.machine.set_counter(Some(Box::new(c)))?;
        self.landing = Some(LandingConfig { margin, counter: CounterKind::Real });
        self.host.landing = Some(super::Landing::new(margin));
        Ok(())
    }

    /// Installs the counter and the landing `cfg` describes.
    pub fn use_landing(&mut self, cfg: LandingConfig) -> Result<(), ReplayError> {
        match cfg.counter {
            CounterKind::Sim { max_skid, seed } => {
                let c = crate::vmm::counter::SimCounter::new(max_skid, seed, false);
                self.machine.set_counter(Some(Box::new(c)))?;
            }
            CounterKind::Real => return self.use_pmu(Some(cfg.margin)),
        }
        self.landing = Some(cfg);
        self.host.landing = Some(super::Landing::new(cfg.margin));
        Ok(())
    }

    /// The landing in use, if any.
    pub fn landing(&self) -> Option<LandingConfig> {
        self.landing
    }

    /// Lands on `target` from here (normally the start of its exit
    /// interval) the way the PMU clock does, through the run loop: the
    /// simulated counter is armed `margin` branches before the target and
    /// reports the overflow exactly `skid` branches late; the `Lander` then
    /// judges every arrival at the target RIP. Restores the previous
    /// counter and landing afterwards.
    pub fn land_simulated(
        &mut self,
        target: crate::clock::pmu::Target,
        margin: u64,
        skid: u64,
    ) -> Result<crate::clock::pmu::Verdict, ReplayError> {
        self.land_with(Box::new(crate::vmm::counter::SimCounter::with_fixed_skid(skid)), target, margin)
    }

    /// [`Timeline::land_simulated`] with any branch counter.
    pub fn land_with(
        &mut self,
        counter: Box<dyn crate::vmm::counter::BranchCounter + Send>,
        target: crate::clock::pmu::Target,
        margin: u64,
    ) -> Result<crate::clock::pmu::Verdict, ReplayError> {
        use crate::clock::pmu::Verdict;
        let saved_counter = self.machine.take_counter();
        let saved_landing = self.host.landing.take();
        self.machine.set_counter(Some(counter))?;
        self.host.landing = Some(super::Landing::new(margin));
        self.host.stop_at = Some(StopAt::Land(target));
        let r = self.run(None);
        self.host.stop_at = None;
        self.host.landing = saved_landing;
        self.machine.set_counter(saved_counter)?;
        Ok(match r? {
            Outcome::Reached => Verdict::Arrived,
            Outcome::Diverged(why) => Verdict::Overshoot(why),
            Outcome::EndOfRecording(why) | Outcome::NotReached(why) => Verdict::Overshoot(why),
            Outcome::Finished { .. } => Verdict::Overshoot("the recording ended before the target".into()),
        })
    }

    /// Runs forward with native-speed breakpoints at `scan.sites`, counting
    /// arrivals (`search`), until the scan's stop (`Outcome::Reached`), exit
    /// `limit`, or the end. Returns the scan with the hits it saw.
    pub fn run_scan(&mut self, scan: Scan, limit: Option<u64>) -> Result<(Outcome, Scan), ReplayError> {
        self.run_scan_watching(scan, &[], limit)
    }

    /// [`Timeline::run_scan`] with data watchpoints: `ranges` are the
    /// (physical start, length) of the `WATCH` keys.
    pub fn run_scan_watching(&mut self, scan: Scan, ranges: &[(u64, u64)], limit: Option<u64>) -> Result<(Outcome, Scan), ReplayError> {
        let specs = ranges.iter().map(|&(a, l)| crate::vmm::watch::WatchSpec::changes(a, l)).collect();
        self.run_scan_specs(scan, specs, limit)
    }

    /// [`Timeline::run_scan`] with data watchpoints that may report reads
    /// and every write (`vmm::watch`); their `WATCH` keys are their starts.
    pub fn run_scan_specs(
        &mut self,
        scan: Scan,
        specs: Vec<crate::vmm::watch::WatchSpec>,
        limit: Option<u64>,
    ) -> Result<(Outcome, Scan), ReplayError> {
        self.machine.bps.set_sites(scan.breakpoints());
        self.machine.set_watch_specs(specs)?;
        self.host.scan = Some(scan);
        let r = self.run(limit);
        self.machine.bps.set_sites(Default::default());
        self.machine.set_watches(Vec::new())?;
        let scan = self.host.scan.take().expect("set above");
        Ok((r?, scan))
    }

    /// Lets a request on `kick` stop the next runs wherever the guest is
    /// (they then fail with [`ReplayError::Interrupted`]); None: not.
    pub fn set_kick(&mut self, kick: Option<std::sync::Arc<crate::replay::interrupt::Interrupter>>) {
        self.host.kick = kick;
    }

    /// Single-steps while `scan` counts arrivals (nothing patched: every
    /// instruction boundary is polled, so the branch count stays exact),
    /// until the scan's stop, exit `limit` or the end. Also returns the
    /// instructions stepped, counted as [`Timeline::step`] counts them.
    pub fn step_scan(&mut self, scan: Scan, limit: Option<u64>) -> Result<(Outcome, Scan, u64), ReplayError> {
        const MANY: u64 = u64::MAX;
        self.host.scan = Some(scan);
        self.host.stop_at = Some(StopAt::Steps(MANY));
        let r = self.run(limit);
        let left = match self.host.stop_at.take() {
            Some(StopAt::Steps(n)) => n,
            _ => MANY,
        };
        let scan = self.host.scan.take().expect("set above");
        // Each boundary polled counts one down, except the one the scan stopped at.
        let stopped = matches!(r, Ok(Outcome::Reached)) && limit != Some(self.machine.exits);
        Ok((r?, scan, MANY - left + u64::from(stopped)))
    }

    /// Executes `n` guest instructions forward (single-stepping), then stops.
    pub fn step(&mut self, n: u64) -> Result<Outcome, ReplayError> {
        if n == 0 {
            return Ok(Outcome::Reached);
        }
        self.host.stop_at = Some(StopAt::Steps(n));
        let r = self.run(None);
        self.host.stop_at = None;
        r
    }

    /// Moves to an exact execution point: to its exit interval (via the
    /// nearest checkpoint), then single-steps to its branch count and RIP.
    pub fn seek_point(&mut self, p: ExecPoint) -> Result<Outcome, ReplayError> {
        let here = self.position()?;
        if (p.exits, p.branches) < (here.exits, here.branches) || p.exits > here.exits {
            match self.seek(p.exits)? {
                Outcome::Reached => {}
                other => return Ok(other),
            }
        }
        if self.position()? == p {
            return Ok(Outcome::Reached);
        }
        self.host.stop_at = Some(StopAt::Point(p));
        let r = self.run(None);
        self.host.stop_at = None;
        r
    }

    /// The current execution point (branches are exact only after stepping).
    pub fn position(&self) -> Result<ExecPoint, ReplayError> {
        Ok(self.machine.exec_point()?)
    }

    /// Runs forward until exit count `to` (or the end), verifying as it goes.
    pub fn run(&mut self, to: Option<u64>) -> Result<Outcome, ReplayError> {
        let vouched = (!self.rec.is_complete()).then(|| self.rec.last_exits());
        let limit = match (to, vouched) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match self.machine.run(&mut self.host, limit) {
            Ok(Stop::Paused) if std::mem::take(&mut self.host.kicked) => {
                self.host.reached = false;
                Err(ReplayError::Interrupted { exits: self.machine.exits })
            }
            Ok(Stop::Paused) => {
                let stepped_here = std::mem::take(&mut self.host.reached);
                if (to.is_some() && Some(self.machine.exits) == to) || stepped_here {
                    Ok(Outcome::Reached)
                } else {
                    Ok(Outcome::EndOfRecording(format!(
                        "replayed up to exit {}, the last point the {} recording vouches for",
                        self.machine.exits,
                        if self.rec.status.is_damaged() { "damaged" } else { "cut-short" }
                    )))
                }
            }
            Ok(stop) => self.finish(stop),
            Err(MachineError::Host(HostError::Host(e))) => match e.downcast::<ReplayStop>() {
                Ok(s) => Ok(match *s {
                    ReplayStop::Divergence(d) => Outcome::Diverged(d),
                    ReplayStop::EndOfRecording(d) => Outcome::EndOfRecording(d),
                    ReplayStop::NotReached(d) => Outcome::NotReached(d),
                }),
                Err(e) => Err(MachineError::Host(HostError::Host(e)).into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    fn finish(&mut self, stop: Stop) -> Result<Outcome, ReplayError> {
        let state_hash = self.machine.state_hash()?;
        let mut problems = Vec::new();
        match self.rec.end() {
            None if self.rec.status.is_damaged() => problems.push("the recording has no end record to compare with (its log is damaged)".into()),
            None => problems.push("the recording has no end record to compare with (it was cut short)".into()),
            Some(Event::End { exits, reason, state_hash: want, output_len, output_sha256 }) => {
                let got_reason = match &stop {
                    Stop::PowerOff(s) => EndReason::PowerOff(*s),
                    Stop::Panic(p) => EndReason::Panic(p.vector),
                    Stop::Paused => EndReason::Stopped,
                };
                if got_reason != *reason {
                    problems.push(format!("the recording ended with {reason:?}, the replay with {got_reason:?}"));
                }
                if *exits != self.machine.exits {
                    problems.push(format!("the recording ended at exit {exits}, the replay at exit {}", self.machine.exits));
                }
                if *output_len != self.host.output_len {
                    problems.push(format!("the recording printed {output_len} bytes, the replay {}", self.host.output_len));
                }
                let rec_sha = hex::encode(Sha256::digest(&self.rec.console));
                if rec_sha != *output_sha256 {
                    problems.push("console.log does not match the output digest in the log (edited?)".into());
                }
                if *want != state_hash {
                    problems.push(format!("final state hash differs: recorded {want}, replayed {state_hash}"));
                }
            }
            Some(_) => unreachable!("end() only returns End"),
        }
        Ok(Outcome::Finished { stop, state_hash, problems })
    }
}
