//! `origin`: the data flow of a location walked backwards over windows of
//! stepped execution, newest first, until every path ends at an input, a
//! constant, the boot image or the recording's start (see the module doc).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::drive::{exit_point, trace_span, Budget};
use super::flow::{is_copy, Constant, Window};
use super::input::{disk_position, Image, Input};
use super::location::{reg_of, regs_array, Key, Location, GPR_NAMES, REG_BIT};
use super::render::insn_text;
use super::tracer::{read_phys, Step};
use super::{Limits, ProvError, Recording, Timeline, R};
use crate::clock::ExecPoint;

/// Exits in the first window; each older window spans four times the last,
/// so a long history costs few replays from a checkpoint.
const FIRST_SPAN: u64 = 32;

/// Most instructions on the paths: a bound on memory, whatever the depth limit.
const MAX_NODES: usize = 400_000;

/// Where a group of source bytes came from.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// Written by node `id`.
    Node { id: usize },
    /// Memory never written since the recording started; from the image
    /// file at `elf_offset` when the loader put it there.
    Image {
        elf_offset: Option<u64>,
        symbol: String,
    },
    /// A register as it was when the recording started.
    Initial,
    /// Not followed: a limit stopped the walk.
    NotFollowed { why: String },
}

/// Some bytes an instruction read (or the query's bytes) and where they came from.
#[derive(Debug, Clone, Serialize)]
pub struct Edge {
    /// "rax[0..8]" or "mem 0x109068..0x109070".
    pub what: String,
    pub reg: Option<usize>,
    pub phys: Option<u64>,
    pub len: u64,
    /// The value of those bytes (little-endian order as in memory).
    pub value: Vec<u8>,
    pub from: Source,
    #[serde(skip)]
    keys: Vec<Key>,
    /// Window of the reader (where resolution continues).
    #[serde(skip)]
    window: usize,
    /// The writer (window, step) before it becomes a node.
    #[serde(skip)]
    wr: Option<(usize, u32)>,
}

/// One instruction on a data-flow path.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub id: usize,
    pub at: ExecPoint,
    pub ring: u8,
    pub insn: String,
    pub bytes: Vec<u8>,
    /// A plain copy (mov, movzx, push, pop ...): folded in the display.
    pub copy: bool,
    pub interrupt: bool,
    pub constants: Vec<Constant>,
    pub input: Option<Input>,
    pub sources: Vec<Edge>,
    /// Shortest distance from the query, in instructions.
    pub depth: usize,
    /// Its stack pointer (tells tasks apart).
    pub rsp: u64,
    /// A DMA read: the physical buffer it filled.
    pub dma_addr: Option<u64>,
}

/// Inputs, constants and image bytes the walk reached, summed up.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ends {
    /// Serial input: (event, offsets) in order.
    pub serial: BTreeMap<usize, Vec<usize>>,
    pub clock: Vec<usize>,
    /// Disk bytes: sector -> offsets.
    pub disk: BTreeMap<u64, Vec<u64>>,
    pub devices: Vec<u16>,
    /// (value, instruction RIP) of immediates.
    pub immediates: Vec<(u64, u64)>,
    pub return_addresses: Vec<(u64, u64)>,
    pub no_inputs: Vec<u64>,
    pub interrupt_frames: usize,
    /// Image bytes: (physical address, ELF offset).
    pub image: Vec<(u64, Option<u64>)>,
    pub initial_registers: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Origin {
    pub location: Location,
    pub at: ExecPoint,
    pub value: Vec<u8>,
    pub roots: Vec<Edge>,
    pub nodes: Vec<Node>,
    pub ends: Ends,
    /// Set when a limit stopped the walk ("stopped at depth N ...").
    pub stopped: Option<String>,
    pub steps: u64,
    pub windows: usize,
    pub traced_from: u64,
    pub millis: u64,
}

impl Edge {
    fn describe(&mut self) {
        let k = self.keys[0];
        if let Some((r, b)) = reg_of(k) {
            self.reg = Some(r);
            self.what = if b == 0 && self.len == 8 {
                format!("%{}", GPR_NAMES[r])
            } else {
                format!("%{}[{}..{}]", GPR_NAMES[r], b, b + self.len)
            };
        } else {
            self.phys = Some(k);
            self.what = format!("mem {:#x}..{:#x}", k, k + self.len);
        }
    }

    /// Whether byte `k` written by `wr` continues this edge: the next byte
    /// of the same register (or of memory), from the same writer.
    fn continues(&self, k: Key, wr: Option<(usize, u32)>) -> bool {
        let last = *self.keys.last().expect("non-empty");
        let same_place = if k & REG_BIT != 0 {
            last & REG_BIT != 0 && (last & !REG_BIT) / 8 == (k & !REG_BIT) / 8
        } else {
            last & REG_BIT == 0
        };
        same_place && k == last + 1 && self.wr == wr
    }

    /// An edge still unresolved when the walk stops: bytes of the boot image
    /// when the walk reached the recording's start, else cut short by `stopped`.
    fn close(&mut self, at_start: bool, image: &Image, stopped: &Option<String>) {
        if !matches!(self.from, Source::Initial) {
            return;
        }
        if !at_start {
            self.from = Source::NotFollowed {
                why: stopped
                    .clone()
                    .unwrap_or_else(|| "not traced further back".into()),
            };
        } else if let Some(pa) = self.phys {
            let (off, va) = match image.file_offset(pa) {
                Some((o, va)) => (Some(o), va),
                None => (None, pa),
            };
            self.from = Source::Image {
                elf_offset: off,
                symbol: image.symbols.describe(va),
            };
        }
    }
}

/// The graph search over the windows traced so far.
struct Walk {
    /// Newest first: windows[0] ends at the query point.
    windows: Vec<Window>,
    ids: HashMap<(usize, u32), usize>,
    /// (window, step) of each node.
    pos: Vec<(usize, u32)>,
    nodes: Vec<Node>,
    work: VecDeque<usize>,
    first_exit: u64,
}

impl Walk {
    fn new(first_exit: u64) -> Walk {
        Walk {
            windows: Vec::new(),
            ids: HashMap::new(),
            pos: Vec::new(),
            nodes: Vec::new(),
            work: VecDeque::new(),
            first_exit,
        }
    }

    /// The writer of `key` as seen just before window `w`'s start.
    fn before(&self, w: usize, key: Key) -> Option<(usize, u32)> {
        (w + 1..self.windows.len()).find_map(|v| self.windows[v].last.get(&key).map(|i| (v, *i)))
    }

    /// Whether window `w`'s start is the start of the recording (nothing before it).
    fn oldest_is_start(&self) -> bool {
        self.windows
            .last()
            .is_none_or(|w| w.from <= self.first_exit)
    }

    /// Why the walk stopped, with how deep it had gone.
    fn stop_reason(&self, why: &str) -> String {
        format!(
            "stopped at depth {}: {why}",
            self.nodes.iter().map(|n| n.depth).max().unwrap_or(0)
        )
    }

    /// The node of window `w`'s step `i` (new ones join the work queue);
    /// `depth` lowers a known node's depth when this path is shorter.
    fn node(&mut self, w: usize, i: u32, depth: usize) -> usize {
        if let Some(id) = self.ids.get(&(w, i)) {
            let id = *id;
            if depth < self.nodes[id].depth {
                self.nodes[id].depth = depth;
            }
            return id;
        }
        let s = &self.windows[w].steps[i as usize];
        let f = &self.windows[w].flows[i as usize];
        let id = self.nodes.len();
        self.nodes.push(Node {
            id,
            at: s.at,
            ring: s.ring,
            insn: insn_text(&s.bytes, s.at.rip),
            bytes: s.bytes.clone(),
            copy: is_copy(s.insn.mnemonic())
                && f.consts.is_empty()
                && f.input.is_none()
                && !s.interrupt,
            interrupt: s.interrupt,
            constants: f.consts.clone(),
            input: f.input.clone(),
            sources: Vec::new(),
            depth,
            rsp: s.before[4],
            dma_addr: s.dma.map(|d| d.addr),
        });
        self.ids.insert((w, i), id);
        self.pos.push((w, i));
        self.work.push_back(id);
        id
    }

    /// Groups source bytes `keys` (read by a step of window `w`, with their
    /// writer in it when known, or the query's bytes) by location and by
    /// writer, as edges.
    fn edges(
        &mut self,
        w: usize,
        keys: &[(Key, Option<u32>)],
        values: &HashMap<Key, u8>,
        depth: usize,
    ) -> Vec<Edge> {
        let value = |k: Key| values.get(&k).copied().unwrap_or(0);
        let mut resolved: Vec<(Key, Option<(usize, u32)>)> = keys
            .iter()
            .map(|&(k, inw)| (k, inw.map(|i| (w, i)).or_else(|| self.before(w, k))))
            .collect();
        resolved.sort_by_key(|(k, _)| *k);
        let mut out: Vec<Edge> = Vec::new();
        for (k, wr) in resolved {
            match out.last_mut() {
                Some(e) if e.continues(k, wr) => {
                    e.keys.push(k);
                    e.value.push(value(k));
                    e.len += 1;
                }
                _ => out.push(Edge {
                    what: String::new(),
                    reg: None,
                    phys: None,
                    len: 1,
                    value: vec![value(k)],
                    from: Source::Initial,
                    keys: vec![k],
                    window: w,
                    wr,
                }),
            }
        }
        for e in &mut out {
            e.describe();
            if let Some((v, i)) = e.wr {
                let id = self.node(v, i, depth + 1);
                e.from = Source::Node { id };
            }
        }
        out
    }

    /// Traces the first window, ending at the query point, and returns the
    /// location's value there.
    fn first_window(
        &mut self,
        rec: &Arc<Recording>,
        loc: Location,
        at: ExecPoint,
        budget: &mut Budget,
    ) -> R<Vec<u8>> {
        let from = at.exits.saturating_sub(FIRST_SPAN).max(self.first_exit);
        let mut steps = Vec::new();
        let mut value_now = Vec::new();
        let mut read_value = |tl: &Timeline| -> R<()> {
            value_now = read_location(tl, loc)?;
            Ok(())
        };
        if let Some(why) = trace_span(rec, from, at, budget, &mut |s| steps.push(s), &mut read_value)? {
            budget.done();
            return Err(ProvError::Msg(format!(
                "stopped by {why} before reaching the query point"
            )));
        }
        self.windows.push(Window::new(from, at, steps));
        Ok(value_now)
    }

    /// Finds the writers of every node in the work queue, recursively, as
    /// far as the traced windows and the limits allow.
    fn expand_all(&mut self, max_depth: usize, stopped: &mut Option<String>) {
        while let Some(id) = self.work.pop_front() {
            let depth = self.nodes[id].depth;
            if depth >= max_depth {
                stopped.get_or_insert(format!(
                    "stopped at depth {depth} (the depth limit; raise it with --depth)"
                ));
                continue;
            }
            if self.nodes.len() >= MAX_NODES {
                stopped.get_or_insert(format!(
                    "stopped at depth {depth}: {MAX_NODES} instructions on the paths already"
                ));
                continue;
            }
            let (w, i) = self.pos[id];
            let win = &self.windows[w];
            let f = &win.flows[i as usize];
            let keys: Vec<(Key, Option<u32>)> = f
                .sources
                .iter()
                .copied()
                .zip(win.deps[i as usize].iter().copied())
                .collect();
            let vals = source_values(&win.steps[i as usize], &f.sources);
            self.nodes[id].sources = self.edges(w, &keys, &vals, depth);
        }
    }

    /// Traces the `span` exits before the oldest window as a new oldest
    /// window; the reason when a limit stopped it first.
    fn older_window(&mut self, rec: &Arc<Recording>, span: u64, budget: &mut Budget) -> R<Option<String>> {
        let oldest = self.windows.last().expect("one window").from;
        let from = oldest.saturating_sub(span).max(self.first_exit);
        // The oldest window's first step stands at its first exit boundary.
        let to = match self.windows.last().and_then(|w| w.steps.first()) {
            Some(st) if st.at.exits == oldest && st.at.branches == 0 => st.at,
            _ => exit_point(rec, oldest)?,
        };
        let mut steps = Vec::new();
        if let Some(why) = trace_span(rec, from, to, budget, &mut |s| steps.push(s), &mut |_| Ok(()))? {
            return Ok(Some(why));
        }
        self.windows.push(Window::new(from, to, steps));
        Ok(None)
    }

    /// Resolves the `pending` edges (see [`unresolved`]) again now that an
    /// older window is traced: each may split by writer.
    fn resolve(&mut self, pending: Vec<(Option<usize>, usize)>, roots: &mut Vec<Edge>) {
        for (owner, ei) in pending {
            let edge = match owner {
                Some(id) => &self.nodes[id].sources[ei],
                None => &roots[ei],
            };
            let keys: Vec<(Key, Option<u32>)> = edge.keys.iter().map(|k| (*k, None)).collect();
            let vals: HashMap<Key, u8> = edge
                .keys
                .iter()
                .copied()
                .zip(edge.value.iter().copied())
                .collect();
            let window = edge.window;
            let depth = owner.map(|id| self.nodes[id].depth).unwrap_or(0);
            let new = self.edges(window, &keys, &vals, depth);
            match owner {
                Some(id) => {
                    self.nodes[id].sources.splice(ei..ei + 1, new);
                }
                None => {
                    roots.splice(ei..ei + 1, new);
                }
            }
        }
    }

    /// Walks back window by window until every path ends or a limit stops it.
    fn run(
        &mut self,
        rec: &Arc<Recording>,
        roots: &mut Vec<Edge>,
        limits: &Limits,
        budget: &mut Budget,
    ) -> R<Option<String>> {
        let mut stopped = None;
        let mut span = FIRST_SPAN;
        loop {
            self.expand_all(limits.max_depth, &mut stopped);
            let pending = unresolved(&self.nodes, roots);
            if pending.is_empty() || self.oldest_is_start() {
                break;
            }
            if let Some(why) = budget.exhausted() {
                stopped.get_or_insert(self.stop_reason(&why));
                break;
            }
            span *= 4;
            if let Some(why) = self.older_window(rec, span, budget)? {
                stopped.get_or_insert(self.stop_reason(&why));
                break;
            }
            self.resolve(pending, roots);
        }
        Ok(stopped)
    }
}

/// The bytes of `loc` in the timeline's current state.
fn read_location(tl: &Timeline, loc: Location) -> R<Vec<u8>> {
    Ok(match loc {
        Location::Register { reg } => regs_array(&tl.machine.vcpu.regs()?)[reg]
            .to_le_bytes()
            .to_vec(),
        Location::Memory { phys, len } => {
            let b = read_phys(tl, phys, len as usize);
            if b.len() != len as usize {
                return Err(ProvError::Msg(format!(
                    "physical {phys:#x}..{:#x} is outside guest memory",
                    phys + len
                )));
            }
            b
        }
    })
}

/// Walks the data flow of `loc` at point `at` backwards (see the module doc).
pub fn origin(rec: &Arc<Recording>, loc: Location, at: ExecPoint, limits: &Limits) -> R<Origin> {
    let started = Instant::now();
    let image = Image::open(rec);
    let first_exit = rec.checkpoints.first().map(|c| c.1).unwrap_or(0);
    let mut budget = Budget::new(limits);
    let mut walk = Walk::new(first_exit);
    let value_now = walk.first_window(rec, loc, at, &mut budget)?;
    let query_keys: Vec<(Key, Option<u32>)> = loc
        .keys()
        .into_iter()
        .map(|k| (k, walk.windows[0].last.get(&k).copied()))
        .collect();
    let qvals: HashMap<Key, u8> = loc
        .keys()
        .into_iter()
        .zip(value_now.iter().copied())
        .collect();
    let mut roots = walk.edges(0, &query_keys, &qvals, 0);
    let stopped = walk.run(rec, &mut roots, limits, &mut budget)?;
    budget.done();
    // Whatever is still unresolved: image bytes, initial registers, or cut short.
    let at_start = walk.oldest_is_start();
    for e in roots.iter_mut().chain(walk.nodes.iter_mut().flat_map(|n| n.sources.iter_mut())) {
        e.close(at_start, &image, &stopped);
    }
    let ends = summarize(&walk.nodes, &roots);
    Ok(Origin {
        location: loc,
        at,
        value: value_now,
        roots,
        ends,
        stopped,
        steps: budget.steps,
        windows: walk.windows.len(),
        traced_from: walk.windows.last().map_or(0, |w| w.from),
        nodes: walk.nodes,
        millis: started.elapsed().as_millis() as u64,
    })
}

/// Edges (owner node or root, index) still waiting for an older window.
fn unresolved(nodes: &[Node], roots: &[Edge]) -> Vec<(Option<usize>, usize)> {
    let mut v = Vec::new();
    for (i, e) in roots.iter().enumerate() {
        if matches!(e.from, Source::Initial) {
            v.push((None, i));
        }
    }
    for n in nodes {
        for (i, e) in n.sources.iter().enumerate() {
            if matches!(e.from, Source::Initial) {
                v.push((Some(n.id), i));
            }
        }
    }
    // Splicing replaces one edge by several: do the later ones first.
    v.sort_by(|a, b| b.cmp(a));
    v
}

/// The values of an instruction's source bytes before it ran.
fn source_values(s: &Step, keys: &[Key]) -> HashMap<Key, u8> {
    let mut m = HashMap::new();
    for &k in keys {
        let v = match reg_of(k) {
            Some((r, b)) => (s.before[r] >> (8 * b)) as u8,
            None => s
                .mem
                .iter()
                .filter(|a| a.read && k >= a.pa && k < a.pa + a.before.len() as u64)
                .map(|a| a.before[(k - a.pa) as usize])
                .next()
                .unwrap_or(0),
        };
        m.insert(k, v);
    }
    m
}

/// The inputs and constants the nodes hold.
fn node_ends(e: &mut Ends, nodes: &[Node]) {
    let mut seen_imm: HashSet<(u64, u64)> = HashSet::new();
    for n in nodes {
        match &n.input {
            Some(Input::Serial { event, offset, .. }) => {
                e.serial.entry(*event).or_default().push(*offset)
            }
            Some(Input::Clock { event, .. }) => e.clock.push(*event),
            Some(Input::Device { port, .. }) => e.devices.push(*port),
            Some(Input::Disk { .. }) | None => {}
        }
        for c in &n.constants {
            match c {
                Constant::Immediate { value } => {
                    if seen_imm.insert((*value, n.at.rip)) {
                        e.immediates.push((*value, n.at.rip));
                    }
                }
                Constant::ReturnAddress { value } => e.return_addresses.push((*value, n.at.rip)),
                Constant::NoInputs => e.no_inputs.push(n.at.rip),
                Constant::InterruptFrame => e.interrupt_frames += 1,
            }
        }
    }
}

/// The ends only edges know: which disk bytes were read from a DMA buffer
/// (the DMA node wrote all of it), image bytes, initial registers.
fn edge_ends(e: &mut Ends, nodes: &[Node], roots: &[Edge]) {
    let all_edges = roots
        .iter()
        .chain(nodes.iter().flat_map(|n| n.sources.iter()));
    for ed in all_edges {
        match &ed.from {
            Source::Node { id } => {
                if let (Some(Input::Disk { sector, .. }), Some(pa), Some(base)) =
                    (&nodes[*id].input, ed.phys, nodes[*id].dma_addr)
                {
                    for k in 0..ed.len {
                        let (sector, offset) = disk_position(*sector, base, pa + k);
                        e.disk.entry(sector).or_default().push(offset);
                    }
                }
            }
            Source::Image { elf_offset, .. } => {
                if let Some(pa) = ed.phys {
                    for k in 0..ed.len {
                        e.image.push((pa + k, elf_offset.map(|o| o + k)));
                    }
                }
            }
            Source::Initial => {
                if let Some(r) = ed.reg {
                    e.initial_registers.push(r);
                }
            }
            Source::NotFollowed { .. } => {}
        }
    }
}

fn sort_dedup<T: Ord>(v: &mut Vec<T>) {
    v.sort_unstable();
    v.dedup();
}

fn summarize(nodes: &[Node], roots: &[Edge]) -> Ends {
    let mut e = Ends::default();
    node_ends(&mut e, nodes);
    edge_ends(&mut e, nodes, roots);
    e.serial.values_mut().for_each(sort_dedup);
    e.disk.values_mut().for_each(sort_dedup);
    sort_dedup(&mut e.clock);
    sort_dedup(&mut e.devices);
    sort_dedup(&mut e.image);
    sort_dedup(&mut e.initial_registers);
    sort_dedup(&mut e.no_inputs);
    e
}
