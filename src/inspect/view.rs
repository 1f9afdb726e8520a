//! What the inspector looks at: the machine state at one point of a
//! recording, from one of two sources that answer the same questions.
//!
//! - [`Frozen`]: a state held in memory. At a checkpoint it comes straight
//!   from the checkpoint files (memory = checkpoint 0 plus the increments
//!   up to k, registers from the header's `MachineState`): no KVM needed.
//!   A live state can also be frozen (for `diff`).
//! - [`Timeline`]: a replay machine paused at an exit count (KVM).

use std::sync::Arc;

use super::Error;
use crate::replay::checkpoints::CheckpointState;
use crate::replay::{Regs, Sregs, Timeline};

/// The machine state at one point, whatever holds it.
pub trait View {
    /// Guest-caused exits at this point.
    fn exits(&self) -> u64;
    fn regs(&self) -> Result<Regs, Error>;
    fn sregs(&self) -> Result<Sregs, Error>;
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

/// A machine state held in memory: a checkpoint's, or a copy of any view's
/// (replay's own state type; `diff` compares two of them).
pub type Frozen = CheckpointState;

/// Copies the state a view shows.
pub fn freeze(v: &dyn View) -> Result<Frozen, Error> {
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

impl View for Frozen {
    fn exits(&self) -> u64 {
        self.exits
    }
    fn regs(&self) -> Result<Regs, Error> {
        Ok(self.regs)
    }
    fn sregs(&self) -> Result<Sregs, Error> {
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
        Timeline::exits(self)
    }
    fn regs(&self) -> Result<Regs, Error> {
        Ok(Timeline::regs(self)?)
    }
    fn sregs(&self) -> Result<Sregs, Error> {
        Ok(Timeline::sregs(self)?)
    }
    fn msrs(&self) -> Result<Vec<(u32, u64)>, Error> {
        Ok(Timeline::msrs(self)?)
    }
    fn mem_size(&self) -> u64 {
        Timeline::mem_size(self)
    }
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        if addr.checked_add(buf.len() as u64).is_none_or(|e| e > self.mem_size()) {
            return Err(beyond(addr, buf.len(), self.mem_size()));
        }
        Ok(Timeline::read_phys(self, addr, buf)?)
    }
    fn memory(&self) -> Result<Arc<Vec<u8>>, Error> {
        Ok(Arc::new(self.memory_bytes()?))
    }
    fn next_event(&self) -> usize {
        Timeline::next_event(self)
    }
    fn output_len(&self) -> u64 {
        Timeline::output_len(self)
    }
}

