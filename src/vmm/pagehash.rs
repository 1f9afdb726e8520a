//! A digest of guest memory that costs O(pages written), not O(RAM): one
//! SHA-256 per non-zero page (over its frame number and contents), summed
//! lane-wise mod 2^64 into 256 bits. Re-hashing a page subtracts its old
//! term and adds the new one, so only the pages the dirty log names since
//! the last digest are read. All-zero pages contribute nothing: two machines
//! with equal memory have equal digests whichever of their zero pages they
//! happened to track (fresh RAM is zero and is never read).

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::PAGE;

/// One page's term: SHA-256 over (frame number LE, the 4 KiB of contents)
/// as four little-endian u64 lanes.
fn term(frame: u64, page: &[u8]) -> [u64; 4] {
    let d = Sha256::new()
        .chain_update(frame.to_le_bytes())
        .chain_update(page)
        .finalize();
    let mut t = [0u64; 4];
    for (i, lane) in t.iter_mut().enumerate() {
        *lane = u64::from_le_bytes(d[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    }
    t
}

/// The per-page terms and their sum, kept up to date page by page.
#[derive(Default)]
pub struct PageHashes {
    terms: HashMap<u64, [u64; 4]>,
    sum: [u64; 4],
}

impl PageHashes {
    /// Re-reads `frames` (each at most once is enough) from `mem` and updates the sum.
    pub fn update(
        &mut self,
        mem: &GuestMemoryMmap,
        frames: impl IntoIterator<Item = u64>,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut buf = vec![0u8; PAGE as usize];
        for f in frames {
            mem.read_slice(&mut buf, GuestAddress(f * PAGE))?;
            let new = if buf.iter().all(|&b| b == 0) {
                None
            } else {
                Some(term(f, &buf))
            };
            let old = match new {
                Some(t) => self.terms.insert(f, t),
                None => self.terms.remove(&f),
            };
            for i in 0..4 {
                self.sum[i] = self.sum[i]
                    .wrapping_sub(old.map_or(0, |o| o[i]))
                    .wrapping_add(new.map_or(0, |n| n[i]));
            }
        }
        Ok(())
    }

    /// The digest of memory as of the last update (32 bytes).
    pub fn digest(&self) -> [u8; 32] {
        let mut d = [0u8; 32];
        for (i, lane) in self.sum.iter().enumerate() {
            d[i * 8..i * 8 + 8].copy_from_slice(&lane.to_le_bytes());
        }
        d
    }

    /// Frames that held non-zero data at the last update.
    pub fn frames(&self) -> impl Iterator<Item = u64> + '_ {
        self.terms.keys().copied()
    }
}

/// The same digest computed from a full memory image (for tests and checks).
pub fn digest_of(memory: &[u8]) -> [u8; 32] {
    let mut sum = [0u64; 4];
    for (f, page) in memory.chunks(PAGE as usize).enumerate() {
        if page.iter().any(|&b| b != 0) {
            let t = term(f as u64, page);
            for i in 0..4 {
                sum[i] = sum[i].wrapping_add(t[i]);
            }
        }
    }
    let mut d = [0u8; 32];
    for (i, lane) in sum.iter().enumerate() {
        d[i * 8..i * 8 + 8].copy_from_slice(&lane.to_le_bytes());
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_digest_equals_the_full_one() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 * PAGE as usize)]).unwrap();
        let mut h = PageHashes::default();
        assert_eq!(h.digest(), digest_of(&vec![0u8; 64 * PAGE as usize]));
        mem.write_slice(&[1, 2, 3], GuestAddress(5 * PAGE + 7))
            .unwrap();
        mem.write_slice(&[9], GuestAddress(40 * PAGE)).unwrap();
        h.update(&mem, [5, 40, 41]).unwrap();
        // Page 40 changes, then goes back to zero; page 5 changes again.
        mem.write_slice(&[0], GuestAddress(40 * PAGE)).unwrap();
        mem.write_slice(&[4], GuestAddress(5 * PAGE)).unwrap();
        h.update(&mem, [40, 5]).unwrap();
        let mut full = vec![0u8; 64 * PAGE as usize];
        mem.read_slice(&mut full, GuestAddress(0)).unwrap();
        assert_eq!(h.digest(), digest_of(&full));
        assert_eq!(h.frames().collect::<Vec<_>>(), vec![5]);
        // Moving the same bytes to another frame changes the digest.
        let mut moved = vec![0u8; 64 * PAGE as usize];
        moved[6 * PAGE as usize..7 * PAGE as usize]
            .copy_from_slice(&full[5 * PAGE as usize..6 * PAGE as usize]);
        assert_ne!(digest_of(&moved), digest_of(&full));
    }
}
