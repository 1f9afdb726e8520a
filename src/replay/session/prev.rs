//! The instruction before a position found at native speed, for any
//! position the session reached by running free (an arrival "n-th time at
//! RIP r after exit e", or an exit boundary whose exiting instruction is not
//! one `native_prev` knows). Without a branch counter the only way to name
//! a point inside an exit interval is an arrival count, so the step back
//! guesses where the previous instruction is (it fell through to r, jumped
//! to r, or returned to r), counts arrivals at the guesses together with r
//! natively, and checks the guess by stepping once from its last arrival.
//! A wrong or missing guess still leaves the latest arrival before here:
//! single-stepping starts there instead of at the exit boundary, which on a
//! long interval is the difference between milliseconds and minutes.

use super::*;
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction};

/// What the search found.
pub(super) enum Prev {
    /// The position just before here.
    Found(Pos),
    /// Not found, but the previous position lies after this one (an arrival
    /// counted on the way): single-step from it.
    StepFrom(At),
    /// Nothing known: single-step from the exit boundary.
    Unknown,
}

/// How far around r the decoder looks for branches to it.
const BRANCH_WINDOW: u64 = 1024;
/// How far into a called function the decoder looks for its returns.
const CALLEE_WINDOW: u64 = 2048;
/// At most this many guesses in one run (each is a breakpoint).
const MAX_GUESSES: usize = 12;

impl Session {
    /// The position before `here` (an arrival or an exit boundary), found
    /// at native speed; see the module's doc.
    /// `guesses`: [`Session::predecessor_guesses`] made where here's machine
    /// state stood (they read its code and stack); `truth`: here's state
    /// hash, which the step from a guess must reproduce (memory included).
    pub(super) fn native_prev_guess(&mut self, here: Pos, guesses: Vec<Vec<u64>>, truth: Option<&str>) -> R<Prev> {
        if !self.native || here.end || here.steps > 0 || self.patched_diverged {
            return Ok(Prev::Unknown);
        }
        let r = here.point.rip;
        // The interval the previous instruction ran in.
        let x = match here.anchor {
            Some((k, _)) if k & WATCH == 0 => here.exits,
            None if here.exits > 0 => here.exits - 1,
            _ => return Ok(Prev::Unknown),
        };
        let mut from = None;
        for group in guesses {
            let mut bps: BTreeSet<u64> = group.iter().copied().collect();
            bps.insert(r);
            // A guess that is not an instruction start changes the code
            // that runs: the run fails (the machine is restored next time).
            let Ok((hits, _)) = self.scan_native(x, here, &bps) else {
                self.pos.end = true;
                continue;
            };
            let Some(&(at, key)) = hits.last() else { continue };
            from.get_or_insert(at);
            // Nothing counted lies between that arrival and here (every
            // arrival at r but here's own is in `hits`), so if one step from
            // it lands on here's state it is the step before here.
            if key == r {
                continue;
            }
            self.reach(at)?;
            let p = self.pos;
            if self.step1()? == StopWhy::Step && self.pos.same_state(&here) && self.reproduces(truth)? {
                return Ok(Prev::Found(p));
            }
        }
        Ok(from.map_or(Prev::Unknown, Prev::StepFrom))
    }

    /// Groups of addresses that may hold the instruction executed just
    /// before RIP `r`, most likely first: the instruction that falls
    /// through to r; then branches to r near it, the returns of the
    /// function a call just before r calls (r is a return address), and
    /// the call whose return address is on the stack (r is a function's
    /// first instruction).
    pub(super) fn predecessor_guesses(&self, r: u64) -> Vec<Vec<u64>> {
        let ends = self.ending_at_votes(r);
        let mut groups = Vec::new();
        let mut rest = Vec::new();
        if let Some(&(top, ins)) = ends.first() {
            if falls_through(&ins) || ins.near_branch_target() == r {
                groups.push(vec![top]);
            }
            if ins.flow_control() == FlowControl::Call {
                rest.extend(self.returns_of(ins.near_branch_target()));
            }
        }
        rest.extend(ends.iter().skip(1).filter(|(_, i)| falls_through(i)).map(|(a, _)| *a));
        rest.extend(self.branches_to(r));
        if let Some(call) = self.call_before_return_address() {
            rest.push(call);
        }
        rest.sort_unstable();
        rest.dedup();
        let first: Vec<u64> = groups.first().cloned().unwrap_or_default();
        rest.retain(|a| !first.contains(a));
        rest.truncate(MAX_GUESSES);
        if !rest.is_empty() {
            groups.push(rest);
        }
        groups
    }

    /// Instructions that end exactly at `r`, found by decoding forward from
    /// each of the 64 bytes before it (x86 code resynchronises after a few
    /// instructions, so the real one collects most starts), most votes first.
    fn ending_at_votes(&self, r: u64) -> Vec<(u64, Instruction)> {
        const BACK: u64 = 64;
        let start = r.saturating_sub(BACK);
        let mut code = vec![0u8; (r - start) as usize];
        if self.read_virt(start, &mut code) < code.len() {
            return Vec::new();
        }
        let mut votes: HashMap<u64, (u32, Instruction)> = HashMap::new();
        for s in 0..code.len() {
            let mut d = Decoder::with_ip(64, &code[s..], start + s as u64, DecoderOptions::NONE);
            let mut last = None;
            while d.can_decode() {
                let ins = d.decode();
                if ins.is_invalid() {
                    last = None;
                    break;
                }
                last = Some(ins);
            }
            if let Some(ins) = last.filter(|i| i.next_ip() == r) {
                votes.entry(ins.ip()).or_insert((0, ins)).0 += 1;
            }
        }
        let mut v: Vec<(u64, u32, Instruction)> = votes.into_iter().map(|(a, (n, i))| (a, n, i)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
        v.into_iter().map(|(a, _, i)| (a, i)).collect()
    }

    /// Direct jumps and calls to `r` decoded from code around it: forward
    /// from r (a real instruction start) and from the window before r when
    /// that decoding arrives exactly at r.
    fn branches_to(&self, r: u64) -> Vec<u64> {
        let mut found = Vec::new();
        let mut scan = |start: u64, len: u64, must_reach: bool| {
            let mut code = vec![0u8; len as usize];
            let n = self.read_virt(start, &mut code);
            let mut d = Decoder::with_ip(64, &code[..n], start, DecoderOptions::NONE);
            let mut here = Vec::new();
            let mut reached = !must_reach;
            while d.can_decode() {
                let ins = d.decode();
                if ins.is_invalid() {
                    break;
                }
                if ins.ip() == r {
                    reached = true;
                }
                let direct = matches!(
                    ins.flow_control(),
                    FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
                );
                if direct && ins.near_branch_target() == r {
                    here.push(ins.ip());
                }
            }
            if reached {
                found.extend(here);
            }
        };
        scan(r, BRANCH_WINDOW, false);
        let lo = r.saturating_sub(BRANCH_WINDOW);
        scan(lo, r - lo + 16, true);
        found
    }

    /// The `ret`s of the function at `entry`, decoded forward from it.
    fn returns_of(&self, entry: u64) -> Vec<u64> {
        let mut code = vec![0u8; CALLEE_WINDOW as usize];
        let n = self.read_virt(entry, &mut code);
        let mut d = Decoder::with_ip(64, &code[..n], entry, DecoderOptions::NONE);
        let mut rets = Vec::new();
        while d.can_decode() && rets.len() < 4 {
            let ins = d.decode();
            if ins.is_invalid() {
                break;
            }
            if ins.flow_control() == FlowControl::Return {
                rets.push(ins.ip());
            }
        }
        rets
    }

    /// When the word on top of the stack is a return address (here is a
    /// function's first instruction), the call just before it.
    fn call_before_return_address(&self) -> Option<u64> {
        let mut w = [0u8; 8];
        let rsp = self.tl.regs().ok()?.rsp;
        if self.read_virt(rsp, &mut w) < 8 {
            return None;
        }
        let ret = u64::from_le_bytes(w);
        self.ending_at_votes(ret)
            .into_iter()
            .find(|(_, i)| matches!(i.flow_control(), FlowControl::Call | FlowControl::IndirectCall))
            .map(|(a, _)| a)
    }
}

/// Whether the instruction can continue at the next one.
fn falls_through(i: &Instruction) -> bool {
    matches!(i.flow_control(), FlowControl::Next | FlowControl::ConditionalBranch)
}
