//! A minimal interrupt controller: 16 edge-triggered lines, a mask, one
//! interrupt in service at a time. Injection into the vCPU is the run loop's job.

use serde::{Deserialize, Serialize};

use crate::vmm::layout::IRQ_VECTOR_BASE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pic {
    pub pending: u16,
    pub mask: u16,
    /// Line whose interrupt was delivered and not yet acknowledged with EOI.
    pub in_service: Option<u8>,
}

impl Default for Pic {
    fn default() -> Self {
        Pic { pending: 0, mask: 0xFFFF, in_service: None }
    }
}

impl Pic {
    pub fn raise(&mut self, line: u8) {
        self.pending |= 1 << (line & 15);
    }

    pub fn eoi(&mut self) {
        self.in_service = None;
    }

    pub fn set_mask(&mut self, mask: u16) {
        self.mask = mask;
    }

    /// Whether any unmasked line is pending (wakes an idle guest).
    pub fn has_unmasked_pending(&self) -> bool {
        self.pending & !self.mask != 0
    }

    /// The vector to inject next, if any may be delivered now.
    pub fn next_vector(&self) -> Option<u8> {
        if self.in_service.is_some() {
            return None;
        }
        let ready = self.pending & !self.mask;
        (ready != 0).then(|| IRQ_VECTOR_BASE + ready.trailing_zeros() as u8)
    }

    /// Marks the vector returned by `next_vector` as delivered.
    pub fn ack(&mut self, vector: u8) {
        let line = vector - IRQ_VECTOR_BASE;
        self.pending &= !(1 << line);
        self.in_service = Some(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_lowest_unmasked_line_one_at_a_time() {
        let mut p = Pic::default();
        p.raise(4);
        p.raise(0);
        assert_eq!(p.next_vector(), None, "all masked at reset");
        p.set_mask(!((1 << 0) | (1 << 4)));
        assert_eq!(p.next_vector(), Some(0x20));
        p.ack(0x20);
        assert_eq!(p.next_vector(), None, "line 0 in service");
        p.eoi();
        assert_eq!(p.next_vector(), Some(0x24));
        p.ack(0x24);
        p.eoi();
        assert_eq!(p.next_vector(), None);
        assert!(!p.has_unmasked_pending());
    }
}
