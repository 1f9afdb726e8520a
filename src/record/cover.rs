//! Which kept checkpoint files later ones replace entirely, so that a
//! restore need not open them (`Event::CheckpointCovered`,
//! trace::checkpoint::rebuild). Kept by the checkpoint thread: for every
//! page and disk sector, the newest kept file that holds it (its *owner*),
//! and for every file, how many pages and sectors it owns. A file that owns
//! none is covered by the newest checkpoint: restoring that one or any
//! later one finds every page and sector of it in newer files. Each file
//! the checkpoint thread wrote (or rewrote, by retention) is claimed once
//! per version (SHA-256); files it did not write (a migrated recording's
//! older chain) are never claimed.

use std::collections::{HashMap, HashSet};

#[derive(Default)]
pub struct Coverage {
    /// Page frame -> the newest kept file holding it.
    pages: HashMap<u64, u32>,
    /// Disk sector -> the newest kept file holding it.
    sectors: HashMap<u64, u32>,
    /// Kept files this thread knows in full: id -> (units owned, SHA-256).
    files: HashMap<u32, (u64, String)>,
    /// Files already claimed (at their current SHA-256).
    claimed: HashSet<u32>,
}

/// Runs of (first, count).
type RunList = [(u64, u64)];

/// A file as retention rewrote it: (id, page runs, sector runs, SHA-256).
pub type Holds = (u32, Vec<(u64, u64)>, Vec<(u64, u64)>, String);

impl Coverage {
    /// Checkpoint `id` (newer than every file so far) landed holding these
    /// pages and sectors, with SHA-256 `sha`.
    pub fn landed(&mut self, id: u32, pages: &RunList, sectors: &RunList, sha: &str) {
        let mut owned = 0u64;
        for (map, runs) in [(&mut self.pages, pages), (&mut self.sectors, sectors)] {
            for &(first, count) in runs {
                for u in first..first.saturating_add(count) {
                    if let Some(old) = map.insert(u, id) {
                        if old != id {
                            if let Some(f) = self.files.get_mut(&old) {
                                f.0 = f.0.saturating_sub(1);
                            }
                        }
                    }
                    owned += 1;
                }
            }
        }
        self.files.insert(id, (owned, sha.to_string()));
        self.claimed.remove(&id);
    }

    /// A retention pass: `dropped` files are gone; each rewritten file
    /// (id, its pages and sectors now, its new SHA-256) holds what it held
    /// plus what the dropped ones before it held.
    pub fn thinned(&mut self, dropped: &[u32], rewritten: &[Holds]) {
        for d in dropped {
            self.files.remove(d);
            self.claimed.remove(d);
        }
        for (id, pages, sectors, sha) in rewritten {
            let mut owned = 0u64;
            for (map, runs) in [(&mut self.pages, pages), (&mut self.sectors, sectors)] {
                for &(first, count) in runs {
                    for u in first..first.saturating_add(count) {
                        // A newer owner keeps it; an older one (a dropped
                        // file, or one this thread never knew) gives way.
                        let o = map.entry(u).or_insert(*id);
                        if *o <= *id {
                            let old = std::mem::replace(o, *id);
                            if old != *id {
                                if let Some(f) = self.files.get_mut(&old) {
                                    f.0 = f.0.saturating_sub(1);
                                }
                            }
                            owned += 1;
                        }
                    }
                }
            }
            self.files.insert(*id, (owned, sha.clone()));
            self.claimed.remove(id);
        }
    }

    /// The files now covered by checkpoint `by` (the newest) that were not
    /// claimed yet at their current SHA-256: (id, SHA-256).
    pub fn claims(&mut self, by: u32) -> Vec<(u32, String)> {
        let mut out: Vec<(u32, String)> = self
            .files
            .iter()
            .filter(|(&id, (owned, _))| id < by && *owned == 0 && !self.claimed.contains(&id))
            .map(|(&id, (_, sha))| (id, sha.clone()))
            .collect();
        out.sort_unstable();
        self.claimed.extend(out.iter().map(|c| c.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::checkpoint::runs;
    use std::collections::BTreeMap;

    /// Random checkpoints and retention passes; every claim made is true of
    /// the kept files then (all pages of the claimed file are in kept files
    /// after it up to `by`), and a file whose pages later ones all hold is
    /// claimed.
    #[test]
    fn claims_are_exactly_the_covered_files() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut c = Coverage::default();
        // The kept files' contents: id -> pages.
        let mut kept: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        let mut claimed: HashMap<u32, u32> = HashMap::new();
        let mut claims_seen = 0;
        for id in 0..400u32 {
            let mut pages: Vec<u64> = (0..rnd(6)).map(|_| rnd(24)).collect();
            pages.sort_unstable();
            pages.dedup();
            let sha = format!("s{id}");
            c.landed(id, &runs(pages.iter().copied()), &[], &sha);
            kept.insert(id, pages);
            // Drop a random older kept file into the next kept one.
            if id > 3 && rnd(2) == 0 {
                let ids: Vec<u32> = kept.keys().copied().filter(|&i| i > 0 && i < id).collect();
                let d = ids[rnd(ids.len() as u64) as usize];
                let j = *kept.range(d + 1..).next().unwrap().0;
                let old = kept.remove(&d).unwrap();
                let nj = kept.get_mut(&j).unwrap();
                nj.extend(old);
                nj.sort_unstable();
                nj.dedup();
                claimed.remove(&d);
                claimed.remove(&j);
                c.thinned(&[d], &[(j, runs(nj.iter().copied()), vec![], format!("s{j}r{id}"))]);
            }
            for (k, _) in c.claims(id) {
                claimed.insert(k, id);
                claims_seen += 1;
            }
            for (&k, pages) in &kept {
                let later: HashSet<u64> = kept.range(k + 1..).flat_map(|(_, p)| p.iter().copied()).collect();
                let covered = k < id && pages.iter().all(|p| later.contains(p));
                assert_eq!(claimed.contains_key(&k), covered, "file {k} after checkpoint {id}: covered {covered}");
                if let Some(&by) = claimed.get(&k) {
                    // Restoring the first kept checkpoint from `by` on.
                    let t = *kept.range(by..).next().unwrap().0;
                    let upto: HashSet<u64> = kept.range(k + 1..=t).flat_map(|(_, p)| p.iter().copied()).collect();
                    assert!(pages.iter().all(|p| upto.contains(p)), "file {k}: claim by {by} is false");
                }
            }
        }
        assert!(claims_seen > 50, "{claims_seen} claims");
    }
}
