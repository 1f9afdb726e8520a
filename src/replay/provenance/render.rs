//! `origin`'s text: the tree from the location back to its ends, with
//! plain copies and loops folded so a path reads as one line per step of
//! meaning rather than one per instruction, then the ends summed up.

use std::collections::{BTreeMap, HashSet};

use super::super::symbols::Symbols;
use super::input::{disk_bytes, Input};
use super::location::{Location, GPR_NAMES};
use super::origin::{Edge, Node, Origin, Source};
use super::Constant;
use crate::clock::ExecPoint;

pub(super) fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `E:B:RIP`, the form `seek` takes.
pub fn point_short(p: &ExecPoint) -> String {
    format!("{}:{}:{:#x}", p.exits, p.branches, p.rip)
}

/// Ranges of sorted numbers as "0..3, 7, 9..12" (half-open).
pub(super) fn ranges(v: &[u64]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}..{}", v[i], v[j] + 1)
        });
        i = j + 1;
    }
    out.join(", ")
}

/// One capstone line for an instruction ("movb %al, -0x31(%rbp, %rbx)").
pub fn insn_text(bytes: &[u8], rip: u64) -> String {
    use capstone::prelude::*;
    let Ok(cs) = Capstone::new()
        .x86()
        .mode(arch::x86::ArchMode::Mode64)
        .syntax(arch::x86::ArchSyntax::Att)
        .build()
    else {
        return String::from("?");
    };
    let text = match cs.disasm_count(bytes, rip, 1) {
        Ok(insns) => match insns.iter().next() {
            Some(i) => format!(
                "{} {}",
                i.mnemonic().unwrap_or("?"),
                i.op_str().unwrap_or("")
            )
            .trim_end()
            .to_string(),
            None => "(undecodable)".into(),
        },
        Err(_) => "(undecodable)".into(),
    };
    text
}

impl Origin {
    /// The tree as text: each path from the location back to where its
    /// bytes came from, plain copies folded onto one line, loops folded at
    /// the second visit of an instruction, then the ends summed up.
    pub fn render(&self, syms: &Symbols, max_lines: usize) -> String {
        let mut r = Render {
            o: self,
            syms,
            out: Vec::new(),
            shown: HashSet::new(),
            max_lines,
            cut: 0,
        };
        let what = match self.location {
            Location::Memory { phys, len } => {
                format!("{len} bytes at physical {phys:#x} {}", syms.describe(phys))
            }
            Location::Register { reg } => format!("%{}", GPR_NAMES[reg]),
        };
        r.line(format!(
            "origin of {what} at {} (exit {} + {} branches @ rip {:#x} {}):",
            point_short(&self.at),
            self.at.exits,
            self.at.branches,
            self.at.rip,
            syms.describe(self.at.rip)
        ));
        r.line(format!("  value: {}", hex(&self.value)));
        for e in &self.roots {
            r.edge(e, 1, &mut Vec::new(), None);
        }
        let mut s = r.out.join("\n");
        if r.cut > 0 {
            s.push_str(&format!(
                "\n  ... {} more lines (limit {max_lines}; --json gives the whole graph)",
                r.cut
            ));
        }
        s.push('\n');
        s.push_str(&self.render_ends(syms));
        s
    }

    /// The ends reached, summed up.
    pub fn render_ends(&self, syms: &Symbols) -> String {
        let e = &self.ends;
        let mut s = String::from("ends:\n");
        for (ev, offs) in &e.serial {
            let o: Vec<u64> = offs.iter().map(|x| *x as u64).collect();
            s.push_str(&format!(
                "  serial input: event #{ev} bytes {}\n",
                ranges(&o)
            ));
        }
        for ev in &e.clock {
            s.push_str(&format!("  clock reading: event #{ev}\n"));
        }
        if !e.disk.is_empty() {
            let total: usize = e.disk.values().map(Vec::len).sum();
            s.push_str(&format!(
                "  disk: {total} bytes of {} sectors (DMA reads)\n",
                e.disk.len()
            ));
            for (sec, offs) in e.disk.iter().take(16) {
                s.push_str(&format!("    sector {sec} offsets {}\n", ranges(offs)));
            }
            if e.disk.len() > 16 {
                s.push_str(&format!("    ... {} more sectors\n", e.disk.len() - 16));
            }
        }
        for p in &e.devices {
            s.push_str(&format!("  device register read: port {p:#x}\n"));
        }
        for (v, rip) in &e.immediates {
            s.push_str(&format!(
                "  constant {v:#x} (immediate of the instruction at {rip:#x} {})\n",
                syms.describe(*rip)
            ));
        }
        for (v, rip) in &e.return_addresses {
            s.push_str(&format!(
                "  constant {v:#x} (return address pushed by the call at {rip:#x} {})\n",
                syms.describe(*rip)
            ));
        }
        for rip in &e.no_inputs {
            s.push_str(&format!(
                "  a value computed from no input at {rip:#x} {}\n",
                syms.describe(*rip)
            ));
        }
        if e.interrupt_frames > 0 {
            s.push_str(&format!(
                "  {} interrupt frame(s) pushed by the CPU\n",
                e.interrupt_frames
            ));
        }
        if !e.image.is_empty() {
            let pas: Vec<u64> = e.image.iter().map(|x| x.0).collect();
            let offs: Vec<u64> = e.image.iter().filter_map(|x| x.1).collect();
            let first = pas[0];
            s.push_str(&format!(
                "  boot image bytes (never written since the recording started): physical {} {}{}\n",
                ranges(&pas),
                syms.describe(first),
                if offs.is_empty() { " (not from the ELF file: zero or set up by the loader)".to_string() } else { format!(", ELF file offsets {}", ranges(&offs)) }
            ));
        }
        for r in &e.initial_registers {
            s.push_str(&format!(
                "  %{} as it was when the recording started\n",
                GPR_NAMES[*r]
            ));
        }
        match &self.stopped {
            Some(why) => s.push_str(&format!("  {why}\n")),
            None => s.push_str("  (every path ended)\n"),
        }
        s.push_str(&format!(
            "({} instructions on the paths; {} single-stepped from exit {} in {} window(s), {} ms)\n",
            self.nodes.len(),
            self.steps,
            self.traced_from,
            self.windows,
            self.millis
        ));
        s
    }
}

/// What an instruction's value came from besides its sources: its input
/// (for a DMA read, the sector and offset of the bytes `into` read from its
/// buffer) and its constants.
fn annotations(n: &Node, into: (Option<u64>, u64)) -> Vec<String> {
    let mut tail = Vec::new();
    if let Some(i) = &n.input {
        let i = match (i, into.0, n.dma_addr) {
            (Input::Disk { sector, .. }, Some(pa), Some(base)) if pa >= base => {
                disk_bytes(*sector, base, pa, into.1)
            }
            (i, ..) => i.clone(),
        };
        tail.push(format!("= {i}"));
    }
    for c in &n.constants {
        tail.push(match c {
            Constant::Immediate { value } => format!("constant {value:#x}"),
            Constant::ReturnAddress { value } => format!("return address {value:#x}"),
            Constant::NoInputs => "computed from no input".into(),
            Constant::InterruptFrame => "interrupt frame".into(),
        });
    }
    tail
}

/// A chain of instructions shown on one line.
struct Chain {
    nodes: Vec<usize>,
    /// The node where the chain met an instruction already on the path (a loop).
    looped: Option<usize>,
    /// The bytes read from the chain's last node (for DMA offsets).
    into: (Option<u64>, u64),
}

struct Render<'a> {
    o: &'a Origin,
    syms: &'a Symbols,
    out: Vec<String>,
    shown: HashSet<usize>,
    max_lines: usize,
    cut: usize,
}

impl Render<'_> {
    fn line(&mut self, l: String) {
        if self.out.len() < self.max_lines {
            self.out.push(l);
        } else {
            self.cut += 1;
        }
    }

    /// An instruction; its stack page when it differs from the previous
    /// one shown on the path (the stack tells tasks apart).
    fn node_text(&self, n: &Node, stack: &mut Option<u64>) -> String {
        let page = n.rsp & !0xfff;
        let ring = if n.ring == 0 {
            " [ring 0]".to_string()
        } else if *stack != Some(page) {
            format!(" [stack {}]", self.syms.describe(page))
        } else {
            String::new()
        };
        *stack = Some(page);
        format!(
            "{} at {} {}{ring}",
            n.insn,
            point_short(&n.at),
            self.syms.describe(n.at.rip)
        )
    }

    /// What a folded loop hides: along its first source chain, how often
    /// the instruction at `from`'s RIP ran on each stack (task), and the
    /// nearest one on a stack other than `from`'s.
    fn loop_summary(&self, from: usize) -> String {
        let rip = self.o.nodes[from].at.rip;
        let page = self.o.nodes[from].rsp >> 12;
        let mut per: BTreeMap<u64, usize> = BTreeMap::new();
        let mut other = None;
        let mut cur = Some(from);
        let mut seen = HashSet::new();
        while let Some(c) = cur {
            if !seen.insert(c) {
                break;
            }
            let n = &self.o.nodes[c];
            if n.at.rip == rip {
                *per.entry(n.rsp >> 12).or_default() += 1;
                if other.is_none() && n.rsp >> 12 != page {
                    other = Some(c);
                }
            }
            // Follow the first source that leads to an instruction.
            cur = n.sources.iter().find_map(|e| match e.from {
                Source::Node { id } => Some(id),
                _ => None,
            });
        }
        let stacks: Vec<String> = per
            .iter()
            .map(|(p, k)| format!("{k} on stack {}", self.syms.describe(p << 12)))
            .collect();
        let mut s = format!(
            "(the folded chain runs it {} more times: {})",
            per.values().sum::<usize>(),
            stacks.join(", ")
        );
        if let Some(o) = other {
            let n = &self.o.nodes[o];
            s.push_str(&format!(
                "; nearest on another stack (another task): {} at {} [stack {}]",
                n.insn,
                point_short(&n.at),
                self.syms.describe(n.rsp & !0xfff)
            ));
        }
        s
    }

    /// From node `id` (which `e` comes from), the single-source plain copies
    /// it was copied through, up to the instruction that computed the value
    /// or one already on `path` (the same RIP on the same stack: a loop).
    fn fold_copies(&mut self, id: usize, e: &Edge, path: &[(u64, u64)]) -> Chain {
        let mut chain = Chain {
            nodes: Vec::new(),
            looped: None,
            into: (e.phys, e.len),
        };
        let mut cur = id;
        loop {
            let n = &self.o.nodes[cur];
            if path.contains(&(n.at.rip, n.rsp >> 12)) {
                chain.looped = Some(cur);
                break;
            }
            chain.nodes.push(cur);
            if n.copy && n.sources.len() == 1 && !self.shown.contains(&cur) {
                if let Source::Node { id } = n.sources[0].from {
                    self.shown.insert(cur);
                    chain.into = (n.sources[0].phys, n.sources[0].len);
                    cur = id;
                    continue;
                }
            }
            break;
        }
        chain
    }

    /// One edge and, below it, the chain of instructions it came from.
    fn edge(&mut self, e: &Edge, depth: usize, path: &mut Vec<(u64, u64)>, stack: Option<u64>) {
        let mut stack = stack;
        if self.out.len() >= self.max_lines {
            self.cut += 1;
            return;
        }
        let pad = "  ".repeat(depth);
        let mut text = format!("{pad}{} = {}", e.what, hex(&e.value));
        let id = match &e.from {
            Source::Node { id } => *id,
            Source::Image { elf_offset, symbol } => {
                let off = elf_offset.map_or("not from the ELF file".into(), |o| format!("ELF file offset {o:#x}"));
                return self.line(format!("{text}  <- boot image bytes {symbol} ({off}), never written since"));
            }
            Source::Initial => return self.line(format!("{text}  <- as it was when the recording started")),
            Source::NotFollowed { why } => return self.line(format!("{text}  <- (not followed: {why})")),
        };
        let chain = self.fold_copies(id, e, path);
        for (k, c) in chain.nodes.iter().enumerate() {
            text.push_str(if k == 0 { "  <- " } else { " <- " });
            text.push_str(&self.node_text(&self.o.nodes[*c], &mut stack));
        }
        if let Some(l) = chain.looped {
            let n = &self.o.nodes[l];
            text.push_str(&format!(
                "  <- (loop: {} again, an earlier iteration at {}; folded)",
                n.insn,
                point_short(&n.at)
            ));
            self.line(text);
            let summary = self.loop_summary(l);
            self.line(format!("{pad}    {summary}"));
            return;
        }
        let Some(&last) = chain.nodes.last() else {
            self.line(text);
            return;
        };
        let o = self.o;
        let n = &o.nodes[last];
        let tail = annotations(n, chain.into);
        if !tail.is_empty() {
            text.push_str(&format!("  [{}]", tail.join("; ")));
        }
        let seen = !self.shown.insert(last);
        if seen && !n.sources.is_empty() {
            text.push_str("  (its sources are shown above)");
            self.line(text);
            return;
        }
        self.line(text);
        let rips: Vec<(u64, u64)> = chain
            .nodes
            .iter()
            .map(|c| (self.o.nodes[*c].at.rip, self.o.nodes[*c].rsp >> 12))
            .collect();
        path.extend(&rips);
        for s in &n.sources {
            self.edge(s, depth + 1, path, stack);
        }
        path.truncate(path.len() - rips.len());
    }
}
