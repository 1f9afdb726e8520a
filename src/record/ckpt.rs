//! Checkpoints off the vCPU's path: the vCPU thread only copies the dirty
//! pages into a reused buffer and saves the machine state; a writer thread
//! serializes, compresses and writes the file, then hands the buffer back.
//! The same thread applies the retention policy (super::retain) and keeps
//! track of which files later ones replace entirely (super::cover).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::cover::Coverage;
use super::retain::{self, Thinned};
use super::RecordError;
use crate::trace::checkpoint::{runs, CheckpointHeader, PAGE};
use crate::trace::{self, Checkpoint};
use crate::vmm::{Machine, MachineError};

// One message per checkpoint: moving the big variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
enum Job {
    Write { path: PathBuf, ck: Checkpoint },
    /// Put a thinning pass in place once the log has its events (the
    /// receiver answers when they are in the kernel's hands).
    Commit { logged: mpsc::Receiver<Result<crate::trace::log::LogHead, String>>, rewritten: Vec<u32>, dropped: Vec<u32> },
}

enum Finished {
    Written { id: u32, w: trace::checkpoint::Written, buf: Vec<u8>, thinned: Thinned, covered: Vec<(u32, String)> },
    Committed,
}

/// Checkpoints handed over but not yet written: at most this many, so the
/// page buffers (reused, already faulted in) stay few; a guest that asks for
/// checkpoints faster than they can be compressed waits for the writer.
const MAX_IN_FLIGHT: u32 = 2;

/// A written checkpoint (its id, what was written, the buffer to reuse and
/// what the retention policy merged), or a committed thinning pass.
type Done = Result<Finished, String>;

pub struct CheckpointWriter {
    tx: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    /// Answers the thread's own CPU time when it ends.
    thread: Option<JoinHandle<std::time::Duration>>,
    /// The checkpoint thread's CPU time, once it has ended.
    pub thread_cpu: std::time::Duration,
    /// Buffers the writer has finished with (page copies go into these).
    spare: Vec<Vec<u8>>,
    in_flight: u32,
    /// Bytes of checkpoint files written so far (not counting the files
    /// the retention policy rewrote: what keeping every one would take).
    pub bytes: u64,
    /// How long the guest stood still for each incremental checkpoint
    /// (dirty log, page copies, machine state), and the pages it copied.
    pub pauses: Vec<(std::time::Duration, u64)>,
    /// The vCPU thread's CPU time in each of those pauses (on a loaded
    /// host the wall time also holds time the thread was not scheduled).
    pub pause_cpu: Vec<std::time::Duration>,
    /// Extra stops waiting for the writer (more than MAX_IN_FLIGHT pending).
    pub waits: Vec<std::time::Duration>,
    /// Files on disk whose SHA-256 the log has not bound yet: (id, hex).
    pub landed: Vec<(u32, String)>,
    /// Thinning passes whose events the log does not hold yet.
    pub thinned: Vec<Thinned>,
    /// Coverage claims the log does not hold yet: (id, by, SHA-256).
    pub covered: Vec<(u32, u32, String)>,
    /// Checkpoints dropped by the retention policy so far.
    pub dropped: u32,
    /// The checkpoints on disk that the policy keeps (as the writer
    /// thread's own set, once their files have landed).
    pub kept: std::collections::BTreeSet<u32>,
}

impl CheckpointWriter {
    /// `keep`: the retention policy's K (0 keeps every checkpoint);
    /// `kept`: the checkpoints already on disk that later ones build on
    /// (none for a new recording; a migrated one's chain); `claims`: log
    /// coverage claims (format version 4, super::cover).
    pub fn start(dir: &Path, keep: u32, kept: Vec<u32>, claims: bool) -> Result<CheckpointWriter, RecordError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (dtx, done) = mpsc::channel();
        let dir = dir.to_path_buf();
        let kept_here = kept.iter().copied().collect();
        let thread = std::thread::Builder::new()
            .name("revirt-checkpoints".into())
            .spawn(move || {
                let mut kept: std::collections::BTreeSet<u32> = kept.into_iter().collect();
                let mut cover = Coverage::default();
                // A pass not yet committed: the next waits (its files are in flux).
                let mut pending = false;
                for job in rx {
                    let r = match job {
                        Job::Write { path, ck } => ck.write(&path).map_err(|e| e.to_string()).and_then(|w| {
                            let id = ck.header.id;
                            kept.insert(id);
                            cover.landed(id, &ck.header.pages, &ck.header.sectors, &w.sha256);
                            let mut thinned = if keep > 0 && !pending {
                                retain::thin(&dir, &mut kept, id, keep)?
                            } else {
                                Thinned::default()
                            };
                            let dropped: Vec<u32> = thinned.dropped.iter().map(|d| d.0).collect();
                            cover.thinned(&dropped, &std::mem::take(&mut thinned.holds));
                            pending |= !thinned.dropped.is_empty();
                            let covered = if claims { cover.claims(id) } else { Vec::new() };
                            Ok(Finished::Written { id, w, buf: ck.data, thinned, covered })
                        }),
                        Job::Commit { logged, rewritten, dropped } => {
                            pending = false;
                            match logged.recv() {
                                Ok(Ok(_)) => retain::commit(&dir, &rewritten, &dropped).map(|_| Finished::Committed),
                                Ok(Err(e)) => Err(format!("the log did not take the retention events: {e}")),
                                Err(_) => Err("the log writer is gone".into()),
                            }
                        }
                    };
                    if dtx.send(r).is_err() {
                        break;
                    }
                }
                thread_cpu()
            })
            .map_err(|e| RecordError::CheckpointWriter(format!("starting its thread: {e}")))?;
        Ok(CheckpointWriter {
            tx: Some(tx),
            done,
            thread: Some(thread),
            thread_cpu: std::time::Duration::ZERO,
            spare: Vec::new(),
            in_flight: 0,
            bytes: 0,
            pauses: Vec::new(),
            waits: Vec::new(),
            pause_cpu: Vec::new(),
            landed: Vec::new(),
            thinned: Vec::new(),
            covered: Vec::new(),
            dropped: 0,
            kept: kept_here,
        })
    }

    fn collect(&mut self, r: Done) -> Result<(), RecordError> {
        self.in_flight -= 1;
        match r.map_err(RecordError::CheckpointWriter)? {
            Finished::Written { id, w, buf, thinned, covered } => {
                self.covered.extend(covered.into_iter().map(|(k, sha)| (k, id, sha)));
                self.bytes += w.bytes;
                self.landed.push((id, w.sha256));
                self.spare.push(buf);
                self.kept.insert(id);
                for (i, _) in &thinned.dropped {
                    self.kept.remove(i);
                }
                if !thinned.dropped.is_empty() {
                    self.thinned.push(thinned);
                }
            }
            Finished::Committed => {}
        }
        Ok(())
    }

    /// Once the log holds a thinning pass's events (`logged` answers when
    /// they are in the kernel's hands), its files go in place.
    pub fn commit(
        &mut self,
        logged: mpsc::Receiver<Result<crate::trace::log::LogHead, String>>,
        t: &Thinned,
    ) -> Result<(), RecordError> {
        let job = Job::Commit {
            logged,
            rewritten: t.rewritten.iter().map(|r| r.0).collect(),
            dropped: t.dropped.iter().map(|d| d.0).collect(),
        };
        self.dropped += t.dropped.len() as u32;
        let tx = self.tx.as_ref().expect("writer open until finish");
        if tx.send(job).is_err() {
            return self.finish().map(|_| ());
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Nothing handed over is still being written or committed.
    pub fn idle(&self) -> bool {
        self.in_flight == 0 && self.thinned.is_empty() && self.landed.is_empty() && self.covered.is_empty()
    }

    /// Takes in what the writer finished, without waiting.
    pub fn poll(&mut self) -> Result<(), RecordError> {
        while let Ok(r) = self.done.try_recv() {
            self.collect(r)?;
        }
        Ok(())
    }

    /// Checkpoint `id` of the running machine: everything dirtied since the
    /// previous one, or for id 0 every page that is not zero (fresh RAM is
    /// zero, so untouched memory costs nothing). The guest is stopped only
    /// while the pages are copied and the state saved.
    pub fn take(
        &mut self,
        dir: &Path,
        m: &mut Machine,
        id: u32,
        next_event: u64,
        output_len: u64,
        clock_ns: u64,
    ) -> Result<(), RecordError> {
        self.wait_for_room(id)?;
        let (t0, c0) = (std::time::Instant::now(), thread_cpu());
        let (dirty, sectors) = m.take_dirty()?;
        let (pages, sectors) = if id == 0 {
            (runs(m.nonzero_pages()?), vec![])
        } else {
            (runs(dirty), runs(sectors))
        };
        let page_bytes: u64 = pages.iter().map(|r| r.1 * PAGE).sum();
        let mut data = self.spare.pop().unwrap_or_default();
        copy_pages(m, &pages, page_bytes, &mut data)?;
        for &(first, count) in &sectors {
            let bytes = m.devices.block.read_sectors(first, count).map_err(|e| {
                MachineError::State(format!("reading the disk for a checkpoint: {e}"))
            })?;
            data.extend_from_slice(&bytes);
        }
        let machine = m.save_state(clock_ns)?;
        let header = CheckpointHeader { id, exits: m.exits, next_event, output_len, machine, pages, sectors };
        let tx = self.tx.as_ref().expect("writer open until finish");
        let job = Job::Write { path: trace::Dir::new(dir).checkpoint(id), ck: Checkpoint { header, data } };
        if tx.send(job).is_err() {
            // The thread ended: its error is waiting in `done`.
            return self.finish().map(|_| ());
        }
        self.in_flight += 1;
        if id > 0 {
            self.pauses.push((t0.elapsed(), page_bytes / PAGE));
            self.pause_cpu.push(thread_cpu().saturating_sub(c0));
        }
        Ok(())
    }

    /// Takes in what the writer finished and, while MAX_IN_FLIGHT
    /// checkpoints are still pending, waits for it (timed, for the report).
    fn wait_for_room(&mut self, id: u32) -> Result<(), RecordError> {
        let w0 = std::time::Instant::now();
        self.poll()?;
        let waited = self.in_flight >= MAX_IN_FLIGHT;
        while self.in_flight >= MAX_IN_FLIGHT {
            match self.done.recv() {
                Ok(r) => self.collect(r)?,
                Err(_) => return Err(RecordError::CheckpointWriter("the checkpoint writer stopped".into())),
            }
        }
        if waited && id > 0 {
            self.waits.push(w0.elapsed());
        }
        Ok(())
    }

    /// Waits until every checkpoint handed over is on disk.
    pub fn wait(&mut self) -> Result<(), RecordError> {
        while self.in_flight > 0 {
            match self.done.recv() {
                Ok(r) => self.collect(r)?,
                Err(_) => {
                    return Err(RecordError::CheckpointWriter(
                        "the checkpoint writer stopped".into(),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Waits for every checkpoint to be on disk and stops the writer;
    /// returns the bytes written.
    pub fn finish(&mut self) -> Result<u64, RecordError> {
        let r = self.wait();
        self.tx.take();
        if let Some(t) = self.thread.take() {
            self.thread_cpu = t.join().unwrap_or_default();
        }
        r.map(|_| self.bytes)
    }
}

/// Copies the guest pages of `pages` (runs of frames, `page_bytes` in
/// all) into `data` (emptied first; its capacity is reused).
fn copy_pages(m: &Machine, pages: &[(u64, u64)], page_bytes: u64, data: &mut Vec<u8>) -> Result<(), RecordError> {
    data.clear();
    data.reserve(page_bytes as usize);
    let region = m.mem.iter().next().ok_or_else(|| MachineError::Memory("no guest memory".into()))?;
    let (base, size) = (region.as_ptr(), region.len());
    for &(first, count) in pages {
        let (off, len) = (first * PAGE, count * PAGE);
        if off + len > size {
            return Err(MachineError::Memory(format!("page run {first}+{count} is outside guest memory")).into());
        }
        let at = data.len();
        // SAFETY: [off, off + len) lies inside the one guest memory
        // region (checked above), which stays mapped while `m` lives;
        // `data` has `len` bytes of spare capacity after `at` (reserved
        // above for all runs), and set_len covers exactly the bytes
        // copied. The guest is not running (we are on its vCPU thread).
        unsafe {
            std::ptr::copy_nonoverlapping(base.add(off as usize), data.as_mut_ptr().add(at), len as usize);
            data.set_len(at + len as usize);
        }
    }
    Ok(())
}

/// CPU time of the calling thread.
pub fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
