//! The recording's checkpoints as static machine states, read from their
//! files (memory = checkpoint 0 plus the increments up to k, registers from
//! the header's machine state): no KVM needed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Regs, Sregs};
use crate::trace::checkpoint::{CheckpointHeader, PAGE};
use crate::trace::{self, Checkpoint, CheckpointError};

/// The machine state a checkpoint holds.
#[derive(Clone)]
pub struct CheckpointState {
    pub exits: u64,
    pub regs: Regs,
    pub sregs: Sregs,
    pub msrs: Vec<(u32, u64)>,
    pub memory: Arc<Vec<u8>>,
    pub next_event: usize,
    pub output_len: u64,
    /// The guest clock at the checkpoint (ns).
    pub clock_ns: u64,
}

/// The recording's checkpoints as static states, read from their files and
/// cached (a few full memory images; every header).
pub struct Checkpoints {
    dir: PathBuf,
    seals: trace::checkpoint::Seals,
    headers: HashMap<u32, Arc<CheckpointHeader>>,
    /// Memory images at some checkpoints, most recently used last.
    images: Vec<(u32, Arc<Vec<u8>>)>,
}

const KEEP_IMAGES: usize = 3;

impl Checkpoints {
    /// `seals`: what each file must match before it is decoded (the
    /// recording's, from `Recording::seals`).
    pub fn new(dir: PathBuf, seals: trace::checkpoint::Seals) -> Checkpoints {
        Checkpoints { dir, seals, headers: HashMap::new(), images: Vec::new() }
    }

    fn read(&mut self, id: u32) -> Result<Checkpoint, CheckpointError> {
        self.seals.read(&self.dir, id)
    }

    /// The header of checkpoint `id` (its machine state and page lists).
    pub fn header(&mut self, id: u32) -> Result<Arc<CheckpointHeader>, CheckpointError> {
        if let Some(h) = self.headers.get(&id) {
            return Ok(h.clone());
        }
        let ck = self.read(id)?;
        let h = Arc::new(ck.header);
        self.headers.insert(id, h.clone());
        Ok(h)
    }

    /// Guest memory at checkpoint `id`: checkpoint 0 plus the increments 1..=id.
    pub fn memory(&mut self, id: u32) -> Result<Arc<Vec<u8>>, CheckpointError> {
        if let Some(i) = self.images.iter().position(|(k, _)| *k == id) {
            let e = self.images.remove(i);
            let m = e.1.clone();
            self.images.push(e);
            return Ok(m);
        }
        let base = self.images.iter().filter(|(k, _)| *k < id).max_by_key(|(k, _)| *k).cloned();
        let (mut mem, from) = match base {
            Some((k, m)) => ((*m).clone(), k + 1),
            None => (vec![0u8; self.header(0)?.machine.config.mem_size as usize], 0),
        };
        let h = trace::checkpoint::rebuild(
            &self.dir,
            &self.seals,
            from,
            id,
            |frame, bytes| {
                let start = (frame * PAGE) as usize;
                mem.get_mut(start..start + bytes.len())
                    .ok_or("has pages beyond guest memory (damaged recording)")?
                    .copy_from_slice(bytes);
                Ok(())
            },
            |_, _| Ok(()),
        )?;
        self.headers.entry(id).or_insert_with(|| Arc::new(h));
        let m = Arc::new(mem);
        self.images.push((id, m.clone()));
        if self.images.len() > KEEP_IMAGES {
            self.images.remove(0);
        }
        Ok(m)
    }

    /// The full state at checkpoint `id`, from its files only.
    pub fn state(&mut self, id: u32) -> Result<CheckpointState, CheckpointError> {
        let memory = self.memory(id)?;
        let h = self.header(id)?;
        let v = &h.machine.vcpu;
        Ok(CheckpointState {
            exits: h.exits,
            regs: v.regs,
            sregs: v.sregs,
            msrs: v.msrs.clone(),
            memory,
            next_event: h.next_event as usize,
            output_len: h.output_len,
            clock_ns: h.machine.clock_ns,
        })
    }
}
