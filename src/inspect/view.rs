//! What the inspector looks at: the machine state at one point of a
//! recording, from one of two sources that answer the same questions.
//!
//! - [`Frozen`]: a state held in memory. At a checkpoint it comes straight
//!   from the checkpoint files (memory = checkpoint 0 plus the increments
//!   up to k, registers from the header's `MachineState`): no KVM needed.
//!   A live state can also be frozen (for `diff`).
//! - [`Timeline`]: a replay machine paused at an exit count (KVM).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::Error;
use crate::replay::Timeline;
use crate::trace::checkpoint::{CheckpointHeader, PAGE};
use crate::trace::{self, Checkpoint};

/// The machine state at one point, whatever holds it.
pub trait View {
    /// Guest-caused exits at this point.
    fn exits(&self) -> u64;
    fn regs(&self) -> Result<kvm_regs, Error>;
    fn sregs(&self) -> Result<kvm_sregs, Error>;
    /// The saved MSRs (index, value).
    fn msrs(&self) -> Result<Vec<(u32, u64)>, Error>;
    fn mem_size(&self) -> u64;
    /// Reads guest physical memory; an error if any byte lies beyond RAM.
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error>;
    /// All of guest RAM.
    fn memory(&self) -> Result<Arc<Vec<u8>>, Error>;
    /// Index of the next event replay would consume from here (raw: may
    /// point at marks and checkpoints that are already behind).
    fn next_event(&self) -> usize;
    /// Console bytes the guest had printed by this point.
    fn output_len(&self) -> u64;
}

fn beyond(addr: u64, len: usize, size: u64) -> Error {
    Error::Msg(format!(
        "physical address {addr:#x}..{:#x} is beyond guest RAM ({} MiB, up to {size:#x})",
        addr.saturating_add(len as u64),
        size >> 20
    ))
}

/// A machine state held in memory.
#[derive(Clone)]
pub struct Frozen {
    pub exits: u64,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub msrs: Vec<(u32, u64)>,
    pub memory: Arc<Vec<u8>>,
    pub next_event: usize,
    pub output_len: u64,
    /// The guest clock known at this point (ns).
    pub clock_ns: u64,
}

impl Frozen {
    /// Copies the state a view shows.
    pub fn of(v: &dyn View) -> Result<Frozen, Error> {
        Ok(Frozen {
            exits: v.exits(),
            regs: v.regs()?,
            sregs: v.sregs()?,
            msrs: v.msrs()?,
            memory: v.memory()?,
            next_event: v.next_event(),
            output_len: v.output_len(),
            clock_ns: 0,
        })
    }
}

impl View for Frozen {
    fn exits(&self) -> u64 {
        self.exits
    }
    fn regs(&self) -> Result<kvm_regs, Error> {
        Ok(self.regs)
    }
    fn sregs(&self) -> Result<kvm_sregs, Error> {
        Ok(self.sregs)
    }
    fn msrs(&self) -> Result<Vec<(u32, u64)>, Error> {
        Ok(self.msrs.clone())
    }
    fn mem_size(&self) -> u64 {
        self.memory.len() as u64
    }
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        let src = usize::try_from(addr)
            .ok()
            .and_then(|a| self.memory.get(a..a.checked_add(buf.len())?))
            .ok_or_else(|| beyond(addr, buf.len(), self.mem_size()))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn memory(&self) -> Result<Arc<Vec<u8>>, Error> {
        Ok(self.memory.clone())
    }
    fn next_event(&self) -> usize {
        self.next_event
    }
    fn output_len(&self) -> u64 {
        self.output_len
    }
}

impl View for Timeline {
    fn exits(&self) -> u64 {
        self.machine.exits
    }
    fn regs(&self) -> Result<kvm_regs, Error> {
        Ok(self.machine.vcpu.regs().map_err(crate::vmm::MachineError::from)?)
    }
    fn sregs(&self) -> Result<kvm_sregs, Error> {
        Ok(self.machine.vcpu.sregs().map_err(crate::vmm::MachineError::from)?)
    }
    fn msrs(&self) -> Result<Vec<(u32, u64)>, Error> {
        Ok(self.machine.vcpu.save().map_err(crate::vmm::MachineError::from)?.msrs)
    }
    fn mem_size(&self) -> u64 {
        self.machine.config.mem_size
    }
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        if addr.checked_add(buf.len() as u64).is_none_or(|e| e > self.mem_size()) {
            return Err(beyond(addr, buf.len(), self.mem_size()));
        }
        self.machine
            .mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| Error::Msg(format!("reading guest memory at {addr:#x}: {e}")))
    }
    fn memory(&self) -> Result<Arc<Vec<u8>>, Error> {
        Ok(Arc::new(self.machine.memory_bytes()?))
    }
    fn next_event(&self) -> usize {
        self.host.next
    }
    fn output_len(&self) -> u64 {
        self.host.output_len
    }
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

    fn read(&mut self, id: u32) -> Result<Checkpoint, Error> {
        Ok(self.seals.read(&self.dir, id)?)
    }

    /// The header of checkpoint `id` (its machine state and page lists).
    pub fn header(&mut self, id: u32) -> Result<Arc<CheckpointHeader>, Error> {
        if let Some(h) = self.headers.get(&id) {
            return Ok(h.clone());
        }
        let ck = self.read(id)?;
        let h = Arc::new(ck.header);
        self.headers.insert(id, h.clone());
        Ok(h)
    }

    /// Guest memory at checkpoint `id`: checkpoint 0 plus the increments 1..=id.
    pub fn memory(&mut self, id: u32) -> Result<Arc<Vec<u8>>, Error> {
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
    pub fn state(&mut self, id: u32) -> Result<Frozen, Error> {
        let memory = self.memory(id)?;
        let h = self.header(id)?;
        let v = &h.machine.vcpu;
        Ok(Frozen {
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
