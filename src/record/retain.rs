//! Checkpoint retention: bounds the checkpoint files of a long recording.
//!
//! Policy (`--keep-checkpoints K`, docs/recording-format.md "Retention"):
//! checkpoint 0 and the newest K are kept; an older checkpoint `i`, when the
//! newest is `n`, is kept only while `i` is a multiple of 2^L, where
//! L = floor(log2((n - i) / K)). So the newest K are one interval apart,
//! the K before them two, then four, and so on (log-spaced, as rr thins its
//! checkpoints): about K·(log2(n / K) + 2) files remain, and a point of age
//! A intervals is at most ~A / K intervals after a kept checkpoint. A
//! checkpoint once dropped stays dropped (L never shrinks as n grows).
//!
//! Dropping checkpoint `i` merges its pages and sectors into the next kept
//! one (`Checkpoint::absorb`: the newer one's own win), so restoring the
//! kept checkpoints in order stays exact. Order, so that a recorder killed
//! at any point leaves a recording `verify` accepts: the merged file is
//! written beside the old one (`NNNNNN.thin`); the recorder logs
//! `CheckpointFile` events (an empty SHA-256 for the dropped one, the new
//! SHA-256 for the merged one: `checkpoint::Seals`, the latest binding
//! wins); once the log writer has handed them to the kernel, the `.thin`
//! file replaces the old one and the dropped file is deleted ([`commit`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::trace::checkpoint::Written;
use crate::trace::{Checkpoint, Dir};

/// Whether checkpoint `i` is still kept when `n` is the newest, keeping the
/// newest `keep` at full density (`keep == 0`: every checkpoint is kept).
pub fn keeps(i: u32, n: u32, keep: u32) -> bool {
    if keep == 0 || i == 0 || i >= n || n - i < keep {
        return true;
    }
    let level = 31 - ((n - i) / keep).leading_zeros();
    i.is_multiple_of(1u32 << level.min(31))
}

/// One pass of thinning: what was merged where, and the rewritten files
/// (written as `.thin`, not yet in place).
#[derive(Debug, Default)]
pub struct Thinned {
    /// (dropped id, the kept checkpoint it now lives in).
    pub dropped: Vec<(u32, u32)>,
    /// Rewritten checkpoints and their new files.
    pub rewritten: Vec<(u32, Written)>,
    /// What each rewritten file holds now: (id, page runs, sector runs,
    /// SHA-256), for the checkpoint thread's coverage (super::cover).
    pub holds: Vec<super::cover::Holds>,
}

/// Drops what the policy no longer keeps now that `newest` is on disk:
/// merges each dropped checkpoint into the next kept one and writes those
/// as `.thin` files. `kept` (the checkpoints on disk, in the chain) is
/// updated. Nothing is deleted or replaced until [`commit`].
pub fn thin(
    dir: &Path,
    kept: &mut BTreeSet<u32>,
    newest: u32,
    keep: u32,
) -> Result<Thinned, String> {
    let drops: Vec<u32> = kept
        .iter()
        .copied()
        .filter(|&i| !keeps(i, newest, keep))
        .collect();
    let mut out = Thinned::default();
    if drops.is_empty() {
        return Ok(out);
    }
    let files = Dir::new(dir);
    let read = |id: u32| Checkpoint::read(&files.checkpoint(id)).map_err(|e| e.to_string());
    let mut merged: BTreeMap<u32, Checkpoint> = BTreeMap::new();
    let mut into: BTreeMap<u32, u32> = BTreeMap::new();
    for i in drops {
        let Some(&j) = kept.range(i + 1..).next() else {
            continue;
        };
        let older = match merged.remove(&i) {
            Some(c) => c,
            None => read(i)?,
        };
        let mut newer = match merged.remove(&j) {
            Some(c) => c,
            None => read(j)?,
        };
        newer
            .absorb(&older)
            .map_err(|e| format!("merging checkpoint {i} into {j}: {e}"))?;
        merged.insert(j, newer);
        kept.remove(&i);
        into.insert(i, j);
    }
    for (&i, &j) in &into {
        let mut j = j;
        while let Some(&next) = into.get(&j) {
            j = next;
        }
        out.dropped.push((i, j));
    }
    for (id, ck) in merged {
        let w = ck.write(&files.thinned(id)).map_err(|e| e.to_string())?;
        out.holds.push((id, ck.header.pages, ck.header.sectors, w.sha256.clone()));
        out.rewritten.push((id, w));
    }
    Ok(out)
}

/// Puts a pass's rewritten files in place and deletes the dropped ones;
/// called once the log holds the pass's `CheckpointFile` events.
pub fn commit(dir: &Path, rewritten: &[u32], dropped: &[u32]) -> Result<(), String> {
    let files = Dir::new(dir);
    for &id in rewritten {
        files.commit_thinned(id).map_err(|e| format!("replacing {}: {e}", files.checkpoint(id).display()))?;
    }
    for &id in dropped {
        files.remove_checkpoint(id).map_err(|e| format!("deleting {}: {e}", files.checkpoint(id).display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::keeps;

    /// Kept sets as a recording grows: monotone (dropped stays dropped),
    /// the newest `keep` all there, and about keep·log2(n/keep) in all.
    #[test]
    fn log_spaced_and_monotone() {
        for keep in [1u32, 4, 8, 16] {
            let mut alive: Vec<u32> = vec![0];
            for n in 1..20_000u32 {
                alive.push(n);
                let before = alive.clone();
                alive.retain(|&i| keeps(i, n, keep));
                for i in &before {
                    if !alive.contains(i) {
                        for m in n..n + 50 {
                            assert!(!keeps(*i, m, keep), "{i} came back at {m} (keep {keep})");
                        }
                    }
                }
                for i in n.saturating_sub(keep - 1)..=n {
                    assert!(
                        alive.contains(&i),
                        "newest {i} dropped at {n} (keep {keep})"
                    );
                }
                let bound = keep as f64 * ((n as f64 / keep as f64).max(1.0).log2() + 2.0) + 1.0;
                assert!(
                    (alive.len() as f64) <= bound,
                    "{} kept at n={n}, keep={keep}: over {bound}",
                    alive.len()
                );
            }
        }
        assert!(
            (1..100).all(|n| (0..=n).all(|i| keeps(i, n, 0))),
            "keep 0 keeps everything"
        );
    }

    /// The gap after a kept checkpoint grows with age: at most ~age / keep.
    #[test]
    fn gaps_grow_with_age() {
        let (n, keep) = (10_000u32, 8u32);
        let alive: Vec<u32> = (0..=n).filter(|&i| keeps(i, n, keep)).collect();
        for w in alive.windows(2) {
            let age = n - w[0];
            assert!(
                w[1] - w[0] <= (age / keep).max(1),
                "gap {}..{} at age {age}",
                w[0],
                w[1]
            );
        }
    }
}
