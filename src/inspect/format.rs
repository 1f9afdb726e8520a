//! Text forms of machine state: registers with decoded flags, hex dumps.

use crate::replay::{DTable, Regs, Segment, Sregs};

fn bits(v: u64, names: &[(u32, &str)]) -> String {
    let set: Vec<&str> = names.iter().filter(|(b, _)| v & (1u64 << b) != 0).map(|(_, n)| *n).collect();
    if set.is_empty() {
        String::new()
    } else {
        format!("[ {} ]", set.join(" "))
    }
}

pub fn rflags(v: u64) -> String {
    let flags = bits(
        v,
        &[(0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"), (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"), (20, "VIP"), (21, "ID")],
    );
    let iopl = format!("IOPL={}", (v >> 12) & 3);
    if flags.is_empty() {
        iopl
    } else {
        format!("{flags} {iopl}")
    }
}

pub fn cr0(v: u64) -> String {
    bits(v, &[(0, "PE"), (1, "MP"), (2, "EM"), (3, "TS"), (4, "ET"), (5, "NE"), (16, "WP"), (18, "AM"), (29, "NW"), (30, "CD"), (31, "PG")])
}

pub fn cr4(v: u64) -> String {
    bits(
        v,
        &[
            (0, "VME"), (1, "PVI"), (2, "TSD"), (3, "DE"), (4, "PSE"), (5, "PAE"), (6, "MCE"), (7, "PGE"), (8, "PCE"),
            (9, "OSFXSR"), (10, "OSXMMEXCPT"), (11, "UMIP"), (12, "LA57"), (13, "VMXE"), (14, "SMXE"), (16, "FSGSBASE"),
            (17, "PCIDE"), (18, "OSXSAVE"), (20, "SMEP"), (21, "SMAP"), (22, "PKE"),
        ],
    )
}

pub fn efer(v: u64) -> String {
    bits(v, &[(0, "SCE"), (8, "LME"), (10, "LMA"), (11, "NXE"), (12, "SVME"), (14, "FFXSR")])
}

pub fn msr_name(index: u32) -> &'static str {
    match index {
        0x10 => "IA32_TSC",
        0x174 => "SYSENTER_CS",
        0x175 => "SYSENTER_ESP",
        0x176 => "SYSENTER_EIP",
        0x277 => "IA32_PAT",
        0xC000_0081 => "STAR",
        0xC000_0082 => "LSTAR",
        0xC000_0083 => "CSTAR",
        0xC000_0084 => "SFMASK",
        0xC000_0100 => "FS_BASE",
        0xC000_0101 => "GS_BASE",
        0xC000_0102 => "KERNEL_GS_BASE",
        0xC000_0103 => "TSC_AUX",
        _ => "msr",
    }
}

pub fn gprs(r: &Regs) -> [(&'static str, u64); 18] {
    [
        ("rax", r.rax), ("rbx", r.rbx), ("rcx", r.rcx), ("rdx", r.rdx), ("rsi", r.rsi), ("rdi", r.rdi),
        ("rbp", r.rbp), ("rsp", r.rsp), ("r8", r.r8), ("r9", r.r9), ("r10", r.r10), ("r11", r.r11),
        ("r12", r.r12), ("r13", r.r13), ("r14", r.r14), ("r15", r.r15), ("rip", r.rip), ("rflags", r.rflags),
    ]
}

pub fn segments(s: &Sregs) -> [(&'static str, &Segment); 8] {
    [("cs", &s.cs), ("ss", &s.ss), ("ds", &s.ds), ("es", &s.es), ("fs", &s.fs), ("gs", &s.gs), ("tr", &s.tr), ("ldt", &s.ldt)]
}

pub fn segment(g: &Segment) -> String {
    let mut attrs = Vec::new();
    if g.present != 0 {
        attrs.push("P");
    }
    if g.s != 0 {
        attrs.push("S");
    }
    if g.l != 0 {
        attrs.push("L");
    }
    if g.db != 0 {
        attrs.push("DB");
    }
    if g.g != 0 {
        attrs.push("G");
    }
    if g.unusable != 0 {
        attrs.push("unusable");
    }
    format!(
        "{:#06x}  base {:#018x}  limit {:#010x}  type {:#x}  dpl {}  {}",
        g.selector,
        g.base,
        g.limit,
        g.type_,
        g.dpl,
        attrs.join(" ")
    )
}

pub fn dtable(t: &DTable) -> String {
    format!("base {:#018x}  limit {:#06x}", t.base, t.limit)
}

/// Every register as (name, line), in display order.
pub fn register_lines(r: &Regs, s: &Sregs, msrs: &[(u32, u64)], describe: &dyn Fn(u64) -> String) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (n, v) in gprs(r) {
        let extra = match n {
            "rip" => describe(v),
            "rflags" => rflags(v),
            _ => String::new(),
        };
        out.push((n.to_string(), format!("{n:<15}{v:#018x}  {extra}").trim_end().to_string()));
    }
    for (n, g) in segments(s) {
        out.push((n.to_string(), format!("{n:<15}{}", segment(g)).trim_end().to_string()));
    }
    out.push(("gdt".into(), format!("{:<15}{}", "gdt", dtable(&s.gdt))));
    out.push(("idt".into(), format!("{:<15}{}", "idt", dtable(&s.idt))));
    for (n, v, d) in [
        ("cr0", s.cr0, cr0(s.cr0)),
        ("cr2", s.cr2, String::new()),
        ("cr3", s.cr3, String::new()),
        ("cr4", s.cr4, cr4(s.cr4)),
        ("cr8", s.cr8, String::new()),
        ("efer", s.efer, efer(s.efer)),
        ("apic_base", s.apic_base, String::new()),
    ] {
        out.push((n.to_string(), format!("{n:<15}{v:#018x}  {d}").trim_end().to_string()));
    }
    for &(i, v) in msrs {
        let name = msr_name(i).to_ascii_lowercase();
        out.push((name.clone(), format!("{:<15}{v:#018x}  (MSR {i:#x})", name)));
    }
    out
}

pub fn ascii(b: &[u8]) -> String {
    b.iter().map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '.' }).collect()
}

/// Canonical hex+ASCII dump, 16 bytes a line, addresses from `addr`.
pub fn hexdump(addr: u64, b: &[u8]) -> String {
    let mut s = String::new();
    for (i, line) in b.chunks(16).enumerate() {
        let mut hex = String::new();
        for j in 0..16 {
            if j == 8 {
                hex.push(' ');
            }
            match line.get(j) {
                Some(c) => hex.push_str(&format!("{c:02x} ")),
                None => hex.push_str("   "),
            }
        }
        s.push_str(&format!("{:#018x}:  {hex} |{}|\n", addr + 16 * i as u64, ascii(line)));
    }
    s
}

/// Units of `size` bytes, little-endian, in hex or decimal; 16 bytes a line.
pub fn words(addr: u64, b: &[u8], size: usize, letter: char) -> String {
    let per_line = (16 / size).max(1);
    let mut s = String::new();
    for (i, line) in b.chunks(per_line * size).enumerate() {
        s.push_str(&format!("{:#018x}:", addr + (i * per_line * size) as u64));
        for u in line.chunks(size) {
            let mut v = [0u8; 8];
            v[..u.len()].copy_from_slice(u);
            let v = u64::from_le_bytes(v);
            let t = match letter {
                'd' => {
                    let shift = 64 - 8 * size as u32;
                    format!("{}", ((v << shift) as i64) >> shift)
                }
                'u' => format!("{v}"),
                'c' => format!("{:?}", (v as u8) as char),
                _ => format!("{v:#0w$x}", w = 2 + 2 * size),
            };
            s.push_str("  ");
            s.push_str(&t);
        }
        s.push('\n');
    }
    s
}

/// A byte string, C-escaped, for display.
pub fn escaped(b: &[u8]) -> String {
    let mut s = String::new();
    for &c in b {
        match c {
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            b'\t' => s.push_str("\\t"),
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s
}

pub fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02x}")).collect::<Vec<_>>().join(" ")
}
