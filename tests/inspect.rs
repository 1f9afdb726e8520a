//! `revirt inspect` end to end: real recordings of the demo guest on real
//! KVM, every command checked through the non-interactive mode (-c), the
//! line editor driven through a pseudo-terminal (tmux), and the library
//! view that reads checkpoints without KVM compared with a replayed one.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use revirt::inspect::{self, Options, Point, Session};
use revirt::replay::{Recording, Sink, Timeline};
use revirt::trace::Event;

/// The exploit payload from guests/demo/README.md.
fn payload() -> Vec<u8> {
    let mut p = vec![b'0'; 56];
    p.extend_from_slice(&0x200000u64.to_le_bytes());
    p.push(b'\n');
    p
}

static ROOT: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_root() {
    if let Some(r) = ROOT.get() {
        let _ = std::fs::remove_dir_all(r);
    }
}

/// A temporary directory shared by the tests of this binary, removed when it exits.
fn scratch(name: &str) -> PathBuf {
    let root = ROOT.get_or_init(|| {
        let d = tempfile::Builder::new().prefix("revirt-inspect-test").tempdir().unwrap().keep();
        // SAFETY: registers a plain function to run at normal process exit.
        unsafe { libc::atexit(remove_root) };
        d
    });
    root.join(name)
}

/// The exploited vuln recording, shared by the tests of this file.
fn vuln() -> &'static Path {
    static REC: OnceLock<PathBuf> = OnceLock::new();
    REC.get_or_init(|| {
        let dir = scratch("vuln");
        let o = record_vuln_after_prompt(&dir, &payload());
        assert_eq!(o.status.code(), Some(66), "{}\n{}", stdout(&o), stderr(&o));
        assert!(stdout(&o).contains("vuln: PWNED - backdoor reached"), "{}", stdout(&o));
        dir
    })
}

/// A recording with several checkpoints (timer ticks, two tasks).
fn race() -> &'static Path {
    static REC: OnceLock<PathBuf> = OnceLock::new();
    REC.get_or_init(|| {
        let dir = scratch("race");
        let o = record_demo(&dir, "workload=race", &["--checkpoint-every", "15ms"], b"");
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        dir
    })
}

fn inspect(rec: &Path, extra: &[&str], cmds: &str) -> Output {
    let mut args = vec!["inspect", rec.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-c", cmds]);
    let o = run_with_input(&args, b"");
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    o
}

/// Runs commands that must all succeed; returns stdout.
fn ok(rec: &Path, extra: &[&str], cmds: &str) -> String {
    let o = inspect(rec, extra, cmds);
    assert_eq!(o.status.code(), Some(0), "`{cmds}` failed:\n{}\n{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// Symbol addresses from `nm`.
fn nm() -> BTreeMap<String, u64> {
    let o = Command::new("nm").arg(demo_image()).output().expect("run nm (binutils)");
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let p: Vec<&str> = l.split_whitespace().collect();
            (p.len() == 3).then(|| (p[2].to_string(), u64::from_str_radix(p[0], 16).unwrap()))
        })
        .collect()
}

fn sym(name: &str) -> u64 {
    *nm().get(name).unwrap_or_else(|| panic!("no symbol {name} in the demo guest"))
}

/// Section (vma, file offset, size) from `objdump -h`.
fn section(name: &str) -> (u64, u64, u64) {
    let o = Command::new("objdump").arg("-h").arg(demo_image()).output().expect("run objdump");
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        let p: Vec<&str> = l.split_whitespace().collect();
        if p.len() >= 6 && p[1] == name {
            let h = |s: &str| u64::from_str_radix(s, 16).unwrap();
            return (h(p[3]), h(p[5]), h(p[2]));
        }
    }
    panic!("no section {name}");
}

fn first_serial(rec: &Path) -> usize {
    let r = Recording::open(rec).unwrap();
    r.events.iter().position(|e| matches!(e, Event::Serial { .. })).expect("a serial event")
}

#[test]
fn disassembly_matches_objdump_at_every_function() {
    let syms = nm();
    let img = demo_image();
    // objdump's view of every instruction: address -> (bytes, text).
    // --insn-width: every instruction's bytes on one line (a 10-byte movabs
    // would otherwise continue on a second line).
    let od = Command::new("objdump").args(["-d", "-M", "intel", "--insn-width=16"]).arg(&img).output().unwrap();
    let mut want = BTreeMap::new();
    for l in String::from_utf8_lossy(&od.stdout).lines() {
        let p: Vec<&str> = l.split('\t').collect();
        if p.len() >= 3 {
            if let Ok(a) = u64::from_str_radix(p[0].trim().trim_end_matches(':'), 16) {
                want.insert(a, (p[1].trim().to_string(), p[2].trim().to_string()));
            }
        }
    }
    // Only 64-bit functions: the PVH entry stub is 32-bit code (and its data
    // labels sit in .text), which both disassemblers would misread as 64-bit.
    let re = Command::new("readelf").args(["-sW"]).arg(&img).output().unwrap();
    let func_names: std::collections::HashSet<String> = String::from_utf8_lossy(&re.stdout)
        .lines()
        .filter(|l| l.contains(" FUNC "))
        .filter_map(|l| l.split_whitespace().nth(7).map(str::to_string))
        .filter(|n| !n.starts_with("pvh"))
        .collect();
    let funcs: Vec<(&String, &u64)> =
        syms.iter().filter(|(n, a)| want.contains_key(a) && func_names.contains(*n)).collect();
    assert!(funcs.len() > 20, "too few functions: {funcs:?}");
    let mut cmds = String::from("set disassembly-flavor intel");
    for (name, _) in &funcs {
        cmds.push_str(&format!("; disas {name} 1"));
    }
    // At checkpoint 0: read from the checkpoint file.
    let out = ok(vuln(), &["--no-kvm"], &cmds);
    // Normalise: no blanks, lower case, numbers in decimal.
    let norm = |s: &str| -> String {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_lowercase();
        let mut r = String::new();
        let mut rest = s.as_str();
        while let Some(i) = rest.find("0x") {
            r.push_str(&rest[..i]);
            let hex: String = rest[i + 2..].chars().take_while(|c| c.is_ascii_hexdigit()).collect();
            r.push_str(&u64::from_str_radix(&hex, 16).map(|v| v.to_string()).unwrap_or(hex.clone()));
            rest = &rest[i + 2 + hex.len()..];
        }
        r.push_str(rest);
        r
    };
    let mut checked = 0;
    for l in out.lines().filter(|l| l.contains(" 0x")) {
        // "   0x0000000000100000 <_start>   48 c7 ...   mov rsp, 0x80000"
        let Some(addr) = l[3..].split_whitespace().next().and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()) else {
            continue;
        };
        let Some((bytes, text)) = want.get(&addr) else { continue };
        let rest = l[3..].split_once('>').map(|x| x.1).unwrap_or(l).trim();
        assert!(rest.starts_with(bytes.as_str()), "bytes at {addr:#x}: inspect `{rest}`, objdump `{bytes}`");
        let ours = rest[bytes.len()..].trim();
        assert_eq!(norm(ours), norm(text), "instruction at {addr:#x}: inspect `{ours}`, objdump `{text}`");
        checked += 1;
    }
    assert_eq!(checked, funcs.len(), "{out}");

    // Default (AT&T) flavour, at the vulnerable function, with its bytes.
    let serve = syms["serve"];
    let out = ok(vuln(), &[], "disas serve 3");
    let first = out.lines().next().unwrap();
    assert!(first.contains(&format!("{serve:#018x} <serve>")), "{out}");
    assert!(first.contains(&want[&serve].0), "{out}");
    // And at RIP, marked.
    let out = ok(vuln(), &[], "disas");
    assert!(out.lines().next().unwrap().starts_with(&format!("=> {:#018x} <_start>", syms["_start"])), "{out}");
}

#[test]
fn page_walk_of_the_identity_map() {
    let serve = sym("serve");
    let out = ok(vuln(), &["--no-kvm"], "pagewalk serve; pagewalk 0x3fffff8; pagewalk 0x4000000");
    let walks: Vec<&str> = out.split("pagewalk ").filter(|s| !s.is_empty()).collect();
    assert_eq!(walks.len(), 3, "{out}");
    let w = walks[0];
    assert!(w.starts_with(&format!("{serve:#x} <serve>: cr3 0x8000")), "{w}");
    // PML4 at 0x8000 -> PDPT at 0x9000 -> PD at 0xA000 whose entry maps a 2 MiB page, all P RW US.
    let lines: Vec<&str> = w.lines().collect();
    assert!(lines[1].contains("PML4[  0]") && lines[1].contains("entry at 0x008000") && lines[1].contains("-> next table at 0x9000"), "{w}");
    assert!(lines[2].contains("PDPT[  0]") && lines[2].contains("entry at 0x009000") && lines[2].contains("-> next table at 0xa000"), "{w}");
    assert!(lines[3].contains("PD  [  0]") && lines[3].contains("-> 2 MiB page at 0x0"), "{w}");
    for l in &lines[1..4] {
        for f in ["P", "RW", "US"] {
            assert!(l.split_whitespace().any(|x| x == f), "flag {f} missing: {l}");
        }
        assert!(!l.split_whitespace().any(|x| x == "NX"), "{l}");
    }
    assert!(lines[3].split_whitespace().any(|x| x == "PS"), "{w}");
    assert!(!lines[1].split_whitespace().any(|x| x == "PS"), "{w}");
    assert!(lines[4].contains(&format!("=> physical {serve:#x} (2 MiB page; user yes, writable yes, executable yes)")), "{w}");
    // The last 2 MiB page of 64 MiB RAM: PD entry 31, physical = virtual.
    assert!(walks[1].contains("PD  [ 31]") && walks[1].contains("-> 2 MiB page at 0x3e00000"), "{}", walks[1]);
    assert!(walks[1].contains("=> physical 0x3fffff8 "), "{}", walks[1]);
    // Above RAM nothing is mapped.
    assert!(walks[2].contains("PD  [ 32]") && walks[2].contains("=> not mapped: the PD entry is not present"), "{}", walks[2]);
    // A non-canonical address is an error, not a walk.
    let o = inspect(vuln(), &["--no-kvm"], "pagewalk 0x800000000000");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a canonical address"), "{}", stderr(&o));
}

#[test]
fn memory_holds_the_image_bytes_and_strings() {
    let img = std::fs::read(demo_image()).unwrap();
    let (vma, off, size) = section(".rodata");
    let rodata = &img[off as usize..(off + size) as usize];
    let prompt = b"vuln: name?\n";
    let at = rodata.windows(prompt.len()).position(|w| w == prompt).expect("prompt string in .rodata") as u64 + vma;

    // find locates it in guest memory, x/s and x/xb read it (virtual), xp (physical) too.
    let out = ok(vuln(), &[], &format!("find \"vuln: name?\\n\"; x/s {at:#x}; x/16xb {at:#x}; xp/16xb {at:#x}"));
    assert!(out.contains(&format!("  {at:#018x}")), "{out}");
    assert!(out.contains(&format!("{at:#018x}: \"vuln: name?\\n\"")), "{out}");
    let hex: String = rodata[(at - vma) as usize..(at - vma) as usize + 16].iter().map(|b| format!("{b:02x} ")).collect();
    let dumps: Vec<&str> = out.lines().filter(|l| l.starts_with(&format!("{at:#018x}:")) && l.contains('|')).collect();
    assert_eq!(dumps.len(), 2, "{out}");
    for d in dumps {
        let got: String = d.split(':').nth(1).unwrap().split('|').next().unwrap().split_whitespace().map(|b| format!("{b} ")).collect();
        assert_eq!(got, hex, "{d}");
        let ascii: String = rodata[(at - vma) as usize..(at - vma) as usize + 16]
            .iter()
            .map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '.' })
            .collect();
        assert!(d.ends_with(&format!("|{ascii}|")), "{d}");
    }

    // Words, through registers and symbols.
    let start = sym("_start");
    let (tvma, toff, _) = section(".text");
    let t = (toff + start - tvma) as usize;
    let out = ok(vuln(), &["--no-kvm"], "x/2xg _start; x/1xw $rip; x/2i $rip");
    let lo = u64::from_le_bytes(img[t..t + 8].try_into().unwrap());
    assert!(out.contains(&format!("{start:#018x}:  {lo:#018x}")), "{out}");
    assert!(out.lines().filter(|l| l.contains("<_start")).count() >= 2, "{out}");

    // dump writes exactly the bytes, and never into the recording.
    let f = scratch("dump.bin");
    let out = ok(vuln(), &["--no-kvm"], &format!("dump _start 64 {}", f.display()));
    assert!(out.contains("wrote 64 bytes"), "{out}");
    assert_eq!(std::fs::read(&f).unwrap(), &img[t..t + 64]);
    let o = inspect(vuln(), &["--no-kvm"], &format!("dump _start 64 {}/x.bin", vuln().display()));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("inside the recording"), "{}", stderr(&o));
    assert!(!vuln().join("x.bin").exists());
}

#[test]
fn events_summary_where_and_seek() {
    let rec = Recording::open(vuln()).unwrap();
    let serial = first_serial(vuln());
    let Event::Serial { at, .. } = &rec.events[serial] else { unreachable!() };

    let out = ok(vuln(), &[], "summary");
    assert!(out.contains(&format!("events       {}:", rec.events.len())), "{out}");
    let n_serial = rec.events.iter().filter(|e| e.kind() == "serial").count();
    assert!(out.contains(&format!("serial {n_serial}")), "{out}");
    assert!(out.contains(&format!("checkpoints  {}:", rec.checkpoints.len())), "{out}");
    assert!(out.contains("event log complete") && out.contains("hash chain verified"), "{out}");
    assert!(out.contains("console.log matches the digest"), "{out}");
    assert!(out.contains("CRC-32 verified"), "{out}");
    assert!(out.contains(&format!("the guest powered off with status 66 at exit {}", rec.last_exits())), "{out}");
    assert!(out.contains("clock        exit"), "{out}");

    // Just before the input: the serial event is the next to take effect.
    let out = ok(vuln(), &["--at", &format!("event:{serial}")], "where; events 2; console");
    assert!(out.contains(&format!("exit {} ", at.exits - 1)), "{out}");
    assert!(out.contains(&format!("next event: #{serial} serial input")), "{out}");
    assert!(out.contains(&format!("=> #{serial:<6} exit {:<10} serial", at.exits)), "{out}");
    assert!(out.contains("vuln: name?\n") && !out.contains("hello"), "{out}");

    // Seeking: relative, to the end, back to a checkpoint (read from its file).
    let end = rec.last_exits();
    let out = ok(vuln(), &[], &format!("seek exit:{}; seek +1; where; seek end; seek ckpt:0", at.exits));
    assert!(out.contains(&format!("exit {} ", at.exits + 1)), "{out}");
    assert!(out.contains(&format!("exit {end} (state replayed")), "{out}");
    assert!(out.contains("the replay matched the recording's final state"), "{out}");
    assert!(out.contains("exit 0 = checkpoint 0 (state read from the checkpoint files, no KVM)"), "{out}");
}

/// The exit count at which the guest had printed `text` (replayed through the library).
fn printed_at(dir: &Path, text: &str) -> u64 {
    let rec = Arc::new(Recording::open(dir).unwrap());
    let c = String::from_utf8_lossy(&rec.console).into_owned();
    let idx = (c.find(text).unwrap_or_else(|| panic!("{text:?} not in {c:?}")) + text.len()) as u64;
    let mut tl = Timeline::open(rec, Sink::Discard).unwrap();
    while tl.output_len() < idx {
        let next = tl.exits() + 1;
        inspect::run_to(&mut tl, next, false).unwrap();
    }
    tl.exits()
}

/// Where `serve` returns to: the instruction after `call serve` (objdump).
fn serve_return_address() -> u64 {
    let od = Command::new("objdump").arg("-d").arg(demo_image()).output().unwrap();
    let text = String::from_utf8_lossy(&od.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let i = lines.iter().position(|l| l.contains("call") && l.contains("<serve>")).expect("a call to serve");
    u64::from_str_radix(lines[i + 1].split(':').next().unwrap().trim(), 16).unwrap()
}

fn hex_u64(line: &str) -> u64 {
    u64::from_str_radix(line.split_whitespace().next().unwrap().trim_end_matches(':').trim_start_matches("0x"), 16).unwrap()
}

/// The stack slot that holds serve's return address, found by its value
/// just before the payload arrives.
fn return_slot() -> u64 {
    let ret = serve_return_address();
    let serial = first_serial(vuln());
    let out = ok(vuln(), &["--at", &format!("event:{serial}")], &format!("find/g {ret:#x}"));
    let l = out.lines().find(|l| l.contains("<ustacks")).unwrap_or_else(|| panic!("return address {ret:#x} not on the user stack: {out}"));
    hex_u64(l)
}

/// A point after the overflow and before serve returns: while it prints the name.
fn while_greeting() -> u64 {
    static P: OnceLock<u64> = OnceLock::new();
    *P.get_or_init(|| printed_at(vuln(), "vuln: hello, "))
}

#[test]
fn find_and_diff_show_the_overflow() {
    let slot = return_slot();
    let p = while_greeting();
    let serial = first_serial(vuln());
    let rec = Recording::open(vuln()).unwrap();

    // Before the input the slot holds the real return address; while greeting, the backdoor's.
    let ret = serve_return_address();
    let out = ok(vuln(), &["--at", &format!("event:{serial}")], &format!("x/1xg {slot:#x}; seek exit:{p}; x/1xg {slot:#x}; find/g 0x200000"));
    let vals: Vec<&str> = out.lines().filter(|l| l.starts_with(&format!("{slot:#018x}:"))).collect();
    assert_eq!(vals.len(), 2, "{out}");
    assert!(vals[0].ends_with(&format!("{ret:#018x}")), "{out}");
    assert!(vals[1].ends_with("0x0000000000200000"), "{out}");
    assert!(out.lines().any(|l| l.trim_start().starts_with(&format!("{slot:#018x} <ustacks"))), "find/g: {out}");

    // diff from before the input: registers, the stack page (ustacks), and with `bytes` the payload.
    let out = ok(vuln(), &["--at", &format!("exit:{p}")], &format!("diff event:{serial} bytes"));
    assert!(out.contains(&format!("diff exit {} -> exit {p} (earlier -> later)", rec.events[serial].exits() - 1)), "{out}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("rip ")), "{out}");
    let page = slot & !0xFFF;
    let in_run = out.lines().filter(|l| l.contains("(ustacks)")).any(|l| {
        let (a, b) = l.split_whitespace().next().unwrap().split_once("..").unwrap();
        let (a, b) = (u64::from_str_radix(&a[2..], 16).unwrap(), u64::from_str_radix(&b[2..], 16).unwrap());
        (a..b).contains(&page)
    });
    assert!(in_run, "the slot's page {page:#x} is not listed as changed: {out}");
    // Rebuild old/new bytes from the byte diff: the slot's third byte went 0x10 -> 0x20.
    let mut old = BTreeMap::new();
    let mut new = BTreeMap::new();
    for l in out.lines().filter(|l| l.contains("->") && l.trim_start().starts_with("0x") && l.contains(": ")) {
        let (a, rest) = l.trim().split_once(": ").unwrap();
        let a = u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap();
        let (o, n) = rest.split_once(" -> ").unwrap();
        for (i, (x, y)) in o.split_whitespace().zip(n.split_whitespace()).enumerate() {
            old.insert(a + i as u64, u8::from_str_radix(x, 16).unwrap());
            new.insert(a + i as u64, u8::from_str_radix(y, 16).unwrap());
        }
    }
    assert_eq!((old.get(&(slot + 2)), new.get(&(slot + 2))), (Some(&0x10), Some(&0x20)), "{out}");
    // The 56-byte filler below the slot: every byte there that changed became
    // '0' (a byte that already held 0x30 on the stack is not listed).
    let filler: Vec<u8> = new.range(slot - 56..slot).map(|(_, &b)| b).collect();
    assert!(filler.len() >= 48 && filler.iter().all(|&b| b == b'0'), "the filler: {out}");
    // The same point against itself: nothing differs.
    let out = ok(vuln(), &["--at", "end"], "diff end");
    assert!(out.contains("registers: none differ") && out.contains("memory: 0 pages differ"), "{out}");
    // Bytes that are nowhere.
    let out = ok(vuln(), &[], "find \"no such bytes anywhere\"");
    assert!(out.contains("not found"), "{out}");
}

#[test]
fn last_write_finds_the_return_address_overwrite() {
    let slot = return_slot();
    let p = while_greeting();
    let out = ok(vuln(), &["--at", &format!("exit:{p}")], &format!("last-write {slot:#x}"));
    assert!(out.contains("value now: 00 00 20 00 00 00 00 00"), "{out}");
    assert!(out.contains("after:  00 00 20 00 00 00 00 00"), "{out}");
    let l = out.lines().find(|l| l.contains("last changed between exit")).unwrap_or_else(|| panic!("{out}"));
    let e: u64 = l.rsplit(' ').next().unwrap().parse().unwrap();
    // Check the interval independently: not yet the backdoor at e-1, the backdoor at e.
    let out = ok(vuln(), &[], &format!("seek exit:{}; x/1xg {slot:#x}; seek exit:{e}; x/1xg {slot:#x}", e - 1));
    let vals: Vec<&str> = out.lines().filter(|l| l.starts_with(&format!("{slot:#018x}:"))).collect();
    assert_eq!(vals.len(), 2, "{out}");
    assert!(vals[0].contains("0x000000000010"), "still a return address into the image at exit {}: {out}", e - 1);
    assert!(vals[1].ends_with("0x0000000000200000"), "{out}");
    // The write happened after the input arrived and before the greeting.
    let serial = first_serial(vuln());
    let rec = Recording::open(vuln()).unwrap();
    assert!(e >= rec.events[serial].exits() && e <= p, "{e} not in {}..={p}", rec.events[serial].exits());
    // Refined by single-stepping: the byte store in serve's read loop (guests/demo/README.md).
    let out = ok(vuln(), &["--at", &format!("exit:{p}")], &format!("last-write {slot:#x}"));
    let w = out.lines().find(|l| l.contains("written by the instruction at")).unwrap_or_else(|| panic!("{out}"));
    assert!(w.contains("<serve+") && w.contains("movb %al, -0x31(%rbp, %rbx)"), "{w}");
    let at = out.lines().find_map(|l| l.split('(').nth(1).and_then(|x| x.split(')').next()).filter(|x| x.matches(':').count() == 2)).unwrap();
    // Standing just before that instruction the old byte is there; one step later, the new one.
    let out = ok(vuln(), &[], &format!("seek {at}; x/1xb {:#x}; stepi; x/1xb {:#x}", slot + 2, slot + 2));
    let vals: Vec<&str> = out.lines().filter(|l| l.starts_with(&format!("{:#018x}:", slot + 2))).collect();
    assert_eq!(vals.len(), 2, "{out}");
    assert!(vals[0].contains(" 10 ") && vals[1].contains(" 20 "), "{out}");
    assert!(out.contains(&format!("({at}) (state replayed through KVM")), "{out}");
    // Code the guest never writes: unchanged since the start.
    let out = ok(vuln(), &["--at", "end"], "last-write serve");
    assert!(out.contains("unchanged since exit 0"), "{out}");
}

#[test]
fn stepi_executes_one_instruction_at_a_time() {
    let serial = first_serial(vuln());
    let mut cmds = format!("seek event:{serial}; seek +3; disas $rip 1");
    for _ in 0..20 {
        cmds.push_str("; stepi");
    }
    cmds.push_str("; where");
    let out = ok(vuln(), &[], &cmds);
    // Every `=>` line is the instruction at RIP; after a non-branching one, RIP moved by its length.
    let insns: Vec<(u64, usize, String)> = out
        .lines()
        .filter(|l| l.starts_with("=> "))
        .map(|l| {
            let p: Vec<&str> = l.split_whitespace().collect();
            let addr = u64::from_str_radix(p[1].trim_start_matches("0x"), 16).unwrap();
            let nbytes = p[3..].iter().take_while(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit())).count();
            let mnem = p[3 + nbytes].to_string();
            (addr, nbytes, mnem)
        })
        .collect();
    assert_eq!(insns.len(), 21, "{out}");
    let mut checked = 0;
    for w in insns.windows(2) {
        let (a, n, m) = &w[0];
        let transfers = m.starts_with('j') || m.starts_with("call") || m.starts_with("ret") || m.starts_with("iret");
        if !transfers {
            assert_eq!(w[1].0, a + *n as u64, "after `{m}` at {a:#x}: {out}");
            checked += 1;
        }
    }
    assert!(checked >= 5, "{out}");
    // The point stepped to is reproducible: seek to it and the registers agree.
    let at = out.lines().rev().find_map(|l| l.split('(').nth(1).and_then(|x| x.split(')').next()).filter(|x| x.matches(':').count() == 2)).unwrap();
    let a = ok(vuln(), &[], &format!("{cmds}; regs"));
    let b = ok(vuln(), &[], &format!("seek {at}; regs"));
    let regs = |s: &str| s.lines().filter(|l| l.starts_with('r') && l.contains("0x")).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(regs(&a)[regs(&a).len() - 18..], regs(&b)[regs(&b).len() - 18..], "{a}\n{b}");
}

#[test]
fn errors_are_clear_and_nothing_panics() {
    for (cmds, want) in [
        ("bogus", "unknown command 'bogus'"),
        ("regz", "did you mean `regs`?"),
        ("s", "ambiguous"),
        ("x/3q 0", "bad format letter 'q'"),
        ("x", "usage: x [/FMT] ADDR"),
        ("pagewalk", "usage: pagewalk VADDR"),
        ("seek", "usage: seek POINT"),
        ("seek exit:99999999", "beyond the end of the recording"),
        ("seek ckpt:77", "no checkpoint 77"),
        ("seek event:123456", "no event #123456"),
        ("seek bogus:1", "bad point 'bogus:1'"),
        ("seek -5", "before the start"),
        ("disas nosuch", "no symbol 'nosuch'"),
        ("x/4xb $nosuch", "unknown register $nosuch"),
        ("xp/4xb 0x4000000", "beyond guest RAM"),
        ("x/4xb 0x4000000", "not mapped"),
        ("find \"open", "unterminated string"),
        ("find abc", "not hex bytes"),
        ("diff", "usage: diff POINT [bytes]"),
        ("dump 0 1", "usage: dump"),
        ("last-write 0 0", "LEN must be"),
        ("info bogus", "unknown info subcommand"),
        ("set bogus 1", "usage: set"),
        ("stepi 0", "N must be at least 1"),
        ("stepi x", "'x' is not a number"),
        ("seek 5:x:1", "bad point"),
        ("regs nosuch", "unknown register 'nosuch'"),
        ("help nosuch", "unknown command 'nosuch'"),
    ] {
        let o = inspect(vuln(), &[], cmds);
        assert_eq!(o.status.code(), Some(1), "`{cmds}` should fail: {}", stdout(&o));
        assert!(stderr(&o).contains(want), "`{cmds}`: want '{want}' in: {}", stderr(&o));
    }
    // Errors do not stop the script; the good commands still run.
    let o = inspect(vuln(), &[], "bogus; where");
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("next event"), "{}", stdout(&o));
    // help lists every command.
    let out = ok(vuln(), &[], "help; help seek");
    for c in revirt::inspect::commands::COMMANDS {
        assert!(out.contains(c.name), "help does not mention {}", c.name);
    }
    assert!(out.contains("ckpt:K"), "{out}");
    // A bad --at or a bad recording is a clean error too.
    let o = run_with_input(&["inspect", vuln().to_str().unwrap(), "--at", "nowhere:1", "-c", "where"], b"");
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("bad point"), "{}", stderr(&o));
    let o = run_with_input(&["inspect", "/nonexistent", "-c", "where"], b"");
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("not a recording directory"), "{}", stderr(&o));
}

#[test]
fn no_kvm_mode_reads_checkpoints_and_refuses_to_replay() {
    let cks = Recording::open(race()).unwrap().checkpoints;
    assert!(cks.len() >= 3, "want several checkpoints: {cks:?}");
    let (k, exits, _) = cks[2];
    let out = ok(race(), &["--no-kvm", "--at", &format!("ckpt:{k}")], "where; regs rip; x/16xb $rsp; info checkpoints");
    assert!(out.contains(&format!("exit {exits} = checkpoint {k} (state read from the checkpoint files, no KVM)")), "{out}");
    assert!(out.contains(&format!("=>{k:>2}")), "{out}");
    let o = inspect(race(), &["--no-kvm"], &format!("seek exit:{}", exits + 1));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("needs KVM (disabled by --no-kvm)"), "{}", stderr(&o));
}

#[test]
fn checkpoint_state_from_files_equals_the_replayed_state() {
    let rec = Arc::new(Recording::open(race()).unwrap());
    let mut s = Session::open(race(), Options::default()).unwrap();
    for &(k, exits, _) in rec.checkpoints.iter().skip(1) {
        // From the files (no KVM).
        s.seek(Point::Checkpoint(k)).unwrap();
        assert_eq!(s.at_checkpoint(), Some(k));
        let a = revirt::inspect::view::freeze(s.view().unwrap()).unwrap();
        // Replayed from checkpoint 0 through KVM.
        let mut tl = Timeline::at_checkpoint(rec.clone(), 0, Sink::Discard).unwrap();
        assert_eq!(inspect::run_to(&mut tl, exits, false).unwrap(), inspect::Ran::Reached);
        let b = revirt::inspect::view::freeze(&tl).unwrap();
        assert_eq!(a.exits, b.exits);
        assert_eq!(format!("{:?}", a.regs), format!("{:?}", b.regs), "checkpoint {k}");
        assert_eq!(a.sregs.cr3, b.sregs.cr3);
        assert_eq!(a.sregs.cs.selector, b.sregs.cs.selector);
        assert!(a.memory == b.memory, "memory differs at checkpoint {k}");
        assert_eq!(a.output_len, b.output_len);
        assert_eq!(
            inspect::normalize_next(&rec.events, a.next_event, exits),
            inspect::normalize_next(&rec.events, b.next_event, exits)
        );
    }
}

#[test]
fn commands_from_stdin_and_the_recording_is_untouched() {
    let before = tree_hash(vuln());
    let o = run_with_input(
        &["inspect", vuln().to_str().unwrap()],
        b"where\nseek end\nregs rip\n  \n# a comment\nx/8xb $rsp; summary\nquit\nwhere\n",
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("exit 0 = checkpoint 0"), "{out}");
    assert!(out.contains("rip            0x"), "{out}");
    assert!(out.contains("integrity"), "{out}");
    assert_eq!(out.matches("next event").count(), 2, "where after quit must not run: {out}");
    assert_eq!(before, tree_hash(vuln()), "inspect changed the recording");
}

// ---- the line editor, through a pseudo-terminal ------------------------------

struct Tmux {
    sock: PathBuf,
}

impl Tmux {
    fn start(dir: &Path, name: &str, cmd: &str) -> Tmux {
        let sock = dir.join(name);
        let st = Command::new("tmux")
            .args(["-S", sock.to_str().unwrap(), "-f", "/dev/null", "new-session", "-d", "-x", "160", "-y", "50", "-s", "t", cmd])
            .status()
            .expect("tmux is needed for this test (scripts/deps.sh installs it)");
        assert!(st.success());
        Tmux { sock }
    }
    fn tmux(&self, args: &[&str]) -> String {
        let o = Command::new("tmux").arg("-S").arg(&self.sock).args(args).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    fn keys(&self, keys: &[&str]) {
        let mut a = vec!["send-keys", "-t", "t"];
        a.extend_from_slice(keys);
        self.tmux(&a);
    }
    fn literal(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "t", "-l", text]);
    }
    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "t", "-S", "-1000"])
    }
    /// Waits until the screen satisfies `f`.
    fn wait(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.screen();
            if f(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; screen:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    /// The last non-empty line of the screen.
    fn last_line(&self) -> String {
        self.screen().lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").arg("-S").arg(&self.sock).arg("kill-server").status();
    }
}

#[test]
fn repl_in_a_terminal_completes_keeps_history_and_survives_ctrl_c() {
    let dir = scratch("repl");
    std::fs::create_dir_all(dir.join("home")).unwrap();
    // A recording long enough that replaying it takes seconds (no checkpoints after 0).
    let rec = dir.join("echo");
    let mut input = String::new();
    for i in 0..1500 {
        input.push_str(&format!("line {i}\n"));
    }
    input.push_str("quit\n");
    let o = record_demo(&rec, "workload=echo", &["--checkpoint-every", "0"], input.as_bytes());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // bash (unlike dash) carries on after a child that handled Ctrl-C itself.
    let script = dir.join("run.sh");
    std::fs::write(
        &script,
        format!(
            "unset XDG_STATE_HOME\nexport HOME={}\n{} inspect {}\necho REPL-EXITED-$?\nsleep 60\n",
            dir.join("home").display(),
            env!("CARGO_BIN_EXE_revirt"),
            rec.display()
        ),
    )
    .unwrap();
    let cmd = format!("bash {}", script.display());
    let t = Tmux::start(&dir, "tmux-1.sock", &cmd);
    t.wait("the prompt", |s| s.contains("(revirt @0)"));

    // Completion of a command name, then of a second word.
    t.literal("summ");
    t.keys(&["Tab"]);
    t.wait("completed `summary `", |s| s.lines().any(|l| l.ends_with("(revirt @0) summary")));
    t.keys(&["Enter"]);
    t.wait("summary output", |s| s.contains("hash chain verified"));
    t.literal("info ch");
    t.keys(&["Tab"]);
    t.wait("completed `info checkpoints`", |s| s.lines().any(|l| l.ends_with("(revirt @0) info checkpoints")));
    t.keys(&["Enter"]);
    t.wait("checkpoint table", |s| s.contains("clock (ns)"));
    // Several candidates: Tab completes the common prefix, a second Tab lists them.
    t.literal("pa");
    t.keys(&["Tab"]);
    t.wait("completed `pagewalk`", |s| s.lines().any(|l| l.ends_with("(revirt @0) pagewalk")));
    t.literal("0x1000");
    t.keys(&["Enter"]);
    t.wait("page walk", |s| s.contains("=> physical 0x1000 (2 MiB page"));
    t.literal("s");
    t.keys(&["Tab", "Tab"]);
    t.wait("the candidate list", |s| s.contains("seek") && s.contains("summary") && s.contains("symbols") && s.contains("stepi"));
    t.keys(&["C-u"]);

    // History: Up brings back the last command.
    t.keys(&["Up"]);
    t.wait("history recall", |s| s.lines().any(|l| l.ends_with("(revirt @0) pagewalk 0x1000")));
    t.keys(&["Up"]);
    t.wait("older history", |s| s.lines().any(|l| l.ends_with("(revirt @0) info checkpoints")));
    t.keys(&["C-u"]);

    // Errors do not end the session.
    t.literal("frobnicate");
    t.keys(&["Enter"]);
    t.wait("the error", |s| s.contains("error: unknown command 'frobnicate'"));

    // A long replay shows progress and Ctrl-C stops it without leaving the REPL.
    let end = Recording::open(&rec).unwrap().last_exits();
    t.literal("seek end");
    t.keys(&["Enter"]);
    t.wait("the progress bar", |s| s.contains("replaying to exit") && s.contains("Ctrl-C stops"));
    t.keys(&["C-c"]);
    let s = t.wait("the interruption", |s| s.contains("interrupted; now at exit"));
    let at: u64 = s
        .lines()
        .find_map(|l| l.split("interrupted; now at exit ").nth(1))
        .and_then(|x| x.trim().parse().ok())
        .unwrap();
    assert!(at > 0 && at < end, "interrupted at {at} of {end}");
    t.wait("the prompt at the interrupted point", |s| s.lines().any(|l| l.starts_with(&format!("(revirt @{at})"))));
    t.literal("where");
    t.keys(&["Enter"]);
    t.wait("where after the interruption", |s| s.contains(&format!("exit {at} (state replayed through KVM")));
    t.literal("quit");
    t.keys(&["Enter"]);
    t.wait("the REPL to exit", |s| s.contains("REPL-EXITED-0"));

    // The history file has this session's commands; a new session recalls them.
    let hist = std::fs::read_to_string(dir.join("home/.revirt_history")).unwrap();
    for c in ["summary", "info checkpoints", "pagewalk 0x1000", "seek end", "where", "quit"] {
        assert!(hist.lines().any(|l| l == c), "{c} not in history:\n{hist}");
    }
    drop(t);
    let t = Tmux::start(&dir, "tmux-2.sock", &cmd);
    t.wait("the prompt", |s| s.contains("(revirt @0)"));
    t.keys(&["Up", "Up"]);
    t.wait("history from the last session", |s| s.lines().any(|l| l.ends_with("(revirt @0) where")));
    t.keys(&["C-u", "C-d"]);
    t.wait("Ctrl-D to quit", |s| s.contains("REPL-EXITED-0"));
    let _ = t.last_line();
}
