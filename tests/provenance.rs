//! `origin` and `history` on real KVM recordings of the demo guest: the
//! vuln exploit's return address back to the serial bytes that made it,
//! the disk checksum back to the sectors and the FNV constants, the race
//! counter across tasks; through `revirt inspect` and the real gdb.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, OnceLock};

use revirt::clock::ExecPoint;
use revirt::replay::provenance::{self as prov, Limits, Location};
use revirt::replay::Recording;
use revirt::trace::Event;

static ROOT: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_root() {
    if let Some(r) = ROOT.get() {
        let _ = std::fs::remove_dir_all(r);
    }
}

fn scratch(name: &str) -> PathBuf {
    let root = ROOT.get_or_init(|| {
        let d = tempfile::Builder::new()
            .prefix("revirt-prov-test")
            .tempdir()
            .unwrap()
            .keep();
        // SAFETY: registers a plain function to run at normal process exit.
        unsafe { libc::atexit(remove_root) };
        d
    });
    root.join(name)
}

/// The exploit payload from guests/demo/README.md.
fn payload() -> Vec<u8> {
    let mut p = vec![b'0'; 56];
    p.extend_from_slice(&0x200000u64.to_le_bytes());
    p.push(b'\n');
    p
}

fn vuln() -> &'static Path {
    static REC: OnceLock<PathBuf> = OnceLock::new();
    REC.get_or_init(|| {
        let dir = scratch("vuln");
        let o = record_demo(&dir, "workload=vuln", &[], &payload());
        assert_eq!(o.status.code(), Some(66), "{}\n{}", stdout(&o), stderr(&o));
        dir
    })
}

use common::demo_disasm as disasm;

fn range_of(func: &str) -> std::ops::Range<u64> {
    let d = disasm(func);
    d[0].0..d.last().unwrap().0 + 16
}

fn open(rec: &Path) -> Arc<Recording> {
    Arc::new(Recording::open(rec).unwrap())
}

fn end_exits(rec: &Recording) -> u64 {
    rec.events.iter().map(Event::exits).max().unwrap()
}

/// The first point where RIP is `rip` (single-stepping from exit `from`).
fn point_at(rec: &Arc<Recording>, rip: u64, from: u64) -> ExecPoint {
    prov::find_rip(rec, rip, from, end_exits(rec), &Limits::default())
        .unwrap()
        .unwrap_or_else(|| panic!("rip {rip:#x} never reached"))
}

fn inspect(rec: &Path, cmds: &str) -> Output {
    let o = run_with_input(&["inspect", rec.to_str().unwrap(), "-c", cmds], b"");
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    o
}

fn ok(rec: &Path, cmds: &str) -> String {
    let o = inspect(rec, cmds);
    assert!(
        o.status.success(),
        "`{cmds}` failed:\n{}\n{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

fn json(rec: &Path, cmds: &str) -> serde_json::Value {
    let s = ok(rec, cmds);
    let start = s.find('{').unwrap_or_else(|| panic!("no JSON in:\n{s}"));
    serde_json::from_str(&s[start..]).unwrap_or_else(|e| panic!("{e}:\n{s}"))
}

fn pt(p: &ExecPoint) -> String {
    format!("{}:{}:{:#x}", p.exits, p.branches, p.rip)
}

/// The node a source edge comes from, following plain copies.
fn writer<'a>(
    nodes: &'a [serde_json::Value],
    edge: &serde_json::Value,
) -> Option<&'a serde_json::Value> {
    let id = edge["from"]["id"].as_u64()? as usize;
    Some(&nodes[id])
}

#[test]
fn vuln_return_address_comes_from_serial_bytes_56_to_63() {
    let dir = vuln();
    let rec = open(dir);
    // The serial event that carried the payload, and where its byte 56 is.
    let (event, bytes) = rec
        .events
        .iter()
        .enumerate()
        .find_map(|(i, e)| match e {
            Event::Serial { bytes, .. } if bytes.len() >= 64 => Some((i, bytes.clone())),
            _ => None,
        })
        .expect("a serial event with the payload");
    assert_eq!(bytes[56..64], 0x200000u64.to_le_bytes());
    let ret = disasm("serve")
        .into_iter()
        .rev()
        .find(|(_, t)| t.starts_with("ret"))
        .unwrap()
        .0;
    let at = point_at(&rec, ret, 0);
    let out = ok(dir, &format!("origin $rsp:8 at {}", pt(&at)));
    eprintln!("{out}");
    assert!(out.contains("value: 00 00 20 00 00 00 00 00"), "{out}");
    assert!(
        out.contains(&format!("serial input: event #{event} bytes 56..64")),
        "{out}"
    );
    assert!(out.contains("(every path ended)"), "{out}");

    // The graph, byte by byte: the store in serve <- the port read in con_getc <- serial byte 56+k.
    let j = json(dir, &format!("origin $rsp:8 at {} --json", pt(&at)));
    let nodes = j["nodes"].as_array().unwrap();
    let roots = j["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 8, "one writer per byte: {roots:#?}");
    let serve = range_of("serve");
    let getc = range_of("con_getc");
    for (k, r) in roots.iter().enumerate() {
        assert_eq!(r["len"], 1);
        let store = writer(nodes, r).expect("written in the recording");
        let rip = store["at"]["rip"].as_u64().unwrap();
        assert!(
            serve.contains(&rip),
            "byte {k} written outside serve: {store}"
        );
        assert!(
            store["insn"].as_str().unwrap().starts_with("mov"),
            "{store}"
        );
        // Follow the single-source chain down to the input.
        let mut n = store;
        let mut via_getc = false;
        loop {
            if let Some(inp) = n.get("input").filter(|i| !i.is_null()) {
                assert_eq!(inp["kind"], "serial", "{n}");
                assert_eq!(inp["event"].as_u64().unwrap() as usize, event);
                assert_eq!(inp["offset"].as_u64().unwrap(), 56 + k as u64, "{n}");
                assert_eq!(inp["byte"].as_u64().unwrap() as u8, bytes[56 + k]);
                assert!(
                    n["insn"].as_str().unwrap().starts_with("in"),
                    "the port read: {n}"
                );
                break;
            }
            via_getc |= getc.contains(&n["at"]["rip"].as_u64().unwrap());
            let srcs = n["sources"].as_array().unwrap();
            assert_eq!(srcs.len(), 1, "a plain copy chain: {n}");
            n = writer(nodes, &srcs[0]).expect("followed");
        }
        assert!(
            via_getc || getc.contains(&n["at"]["rip"].as_u64().unwrap()),
            "through con_getc"
        );
        assert!(
            getc.contains(&n["at"]["rip"].as_u64().unwrap()),
            "the port read is in con_getc: {n}"
        );
    }
    assert!(j["stopped"].is_null());

    // Limits: a depth limit says where it stopped; so does a time limit.
    let out = ok(dir, &format!("origin $rsp:8 at {} --depth 1", pt(&at)));
    assert!(out.contains("stopped at depth 1"), "{out}");
    let o = inspect(dir, &format!("origin $rsp:8 at {} --time 0", pt(&at)));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("the time limit (0 s)"), "{}", stderr(&o));
    // history: the eight byte stores, with old and new bytes.
    let h = ok(dir, &format!("seek {}; history $rsp 8", pt(&at)));
    eprintln!("{h}");
    let stores = h
        .lines()
        .filter(|l| l.contains("movb %al") && l.contains("<serve+"))
        .count();
    assert_eq!(stores, 8, "{h}");
    assert!(
        h.contains("+2   10 -> 20"),
        "the byte that turned 0x10 into 0x20: {h}"
    );
    assert!(
        h.lines()
            .any(|l| l.contains("callq") && l.contains("<wl_vuln+")),
        "the call that pushed the return address: {h}"
    );
}

#[test]
fn origin_interrupted_and_bad_input() {
    let dir = vuln();
    let rec = open(dir);
    // Ctrl-C (the interrupt check) stops a query: more than 256 steps to go.
    let at = prov::exit_point(&rec, 300).unwrap();
    let stop = || true;
    let lim = Limits {
        interrupted: &stop,
        ..Limits::default()
    };
    match prov::origin(&rec, Location::Register { reg: 0 }, at, &lim) {
        Err(prov::ProvError::Interrupted { at }) => assert!(at <= 300),
        Ok(o) => panic!("not interrupted: {} steps", o.steps),
        Err(e) => panic!("{e}"),
    }
    for bad in [
        "origin",
        "origin $xmm0",
        "origin 0x1000:0",
        "origin $rax at nowhere",
        "history 0x1000",
        "history 0x1000 0",
        "origin $rax --depth 0",
    ] {
        let o = inspect(dir, bad);
        assert!(!o.status.success(), "`{bad}` should fail");
        assert!(
            stderr(&o).contains("error")
                || stderr(&o).contains("usage")
                || stdout(&o).contains("usage"),
            "`{bad}`: {}",
            stderr(&o)
        );
    }
}

#[test]
fn disk_checksum_comes_from_the_sectors_and_the_fnv_constants() {
    let dir = scratch("disk");
    let img = scratch("disk8.img");
    // 8 sectors: sector 0 gets rewritten by the workload; the rest is a pattern.
    let data: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&img, &data).unwrap();
    let o = record_demo(
        &dir,
        "workload=disk",
        &["--disk", img.to_str().unwrap()],
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o)
        .lines()
        .find(|l| l.starts_with("disk: sectors="))
        .unwrap()
        .to_string();
    assert!(line.contains("sectors=8"), "{line}");
    let sum = u64::from_str_radix(
        field(&line, "checksum").unwrap().trim_start_matches("0x"),
        16,
    )
    .unwrap();
    let rec = open(&dir);
    // The call that prints it: the checksum is its 4th argument (%rcx).
    let d = disasm("wl_disk");
    let imul = d.iter().position(|(_, t)| t.starts_with("imul")).unwrap();
    let call = d[imul..]
        .iter()
        .find(|(_, t)| t.contains("<con_printf>"))
        .unwrap()
        .0;
    let at = point_at(&rec, call, 0);
    let j = json(&dir, &format!("origin $rcx at {} --json", pt(&at)));
    assert_eq!(le(&j["value"]), sum);
    // Every byte of every sector, offsets 0..512.
    let disk = j["ends"]["disk"].as_object().unwrap();
    assert_eq!(disk.len(), 8, "{disk:?}");
    for (s, offs) in disk {
        let offs: Vec<u64> = offs
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_u64().unwrap())
            .collect();
        assert_eq!(offs, (0..512).collect::<Vec<u64>>(), "sector {s}");
    }
    let imms: Vec<u64> = j["ends"]["immediates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert!(
        imms.contains(&0xcbf2_9ce4_8422_2325),
        "FNV offset basis: {imms:x?}"
    );
    assert!(imms.contains(&0x100_0000_01b3), "FNV prime: {imms:x?}");
    assert!(j["stopped"].is_null(), "{}", j["stopped"]);
    let text = ok(&dir, &format!("origin $rcx at {}", pt(&at)));
    eprintln!("{text}");
    assert!(text.contains("disk: 4096 bytes of 8 sectors"), "{text}");
    assert!(text.contains("sector 7 offsets 0..512"), "{text}");
    assert!(
        text.contains("constant 0xcbf29ce484222325 (immediate of the instruction at"),
        "{text}"
    );
    assert!(
        text.contains("= disk sector 7 offset 511"),
        "the last byte hashed, on the path: {text}"
    );
}

fn race() -> &'static Path {
    static REC: OnceLock<PathBuf> = OnceLock::new();
    REC.get_or_init(|| {
        let dir = scratch("race");
        // The step clock lands timer ticks at any instruction (the exit
        // clock only at exits): tasks switch inside and outside the racy
        // window, so values flow from one task's store to the other's load.
        let o = record_demo(
            &dir,
            "workload=race iters=200 hz=200",
            &["--clock", "step"],
            b"",
        );
        assert!(o.status.success(), "{}", stderr(&o));
        dir
    })
}

#[test]
fn race_counter_origin_crosses_tasks_and_history_interleaves() {
    let dir = race();
    let rec = open(dir);
    let console = String::from_utf8_lossy(&rec.console).into_owned();
    let line = console
        .lines()
        .find(|l| l.starts_with("race: counter="))
        .unwrap();
    let counter: u64 = field(line, "counter").unwrap().parse().unwrap();
    // wl_race's load of the counter after task_wait, for the print.
    let d = disasm("wl_race");
    let wait = d
        .iter()
        .position(|(_, t)| t.contains("<task_wait>"))
        .unwrap();
    let load = d[wait..]
        .iter()
        .find(|(_, t)| t.starts_with("mov") && t.contains("<race_counter>"))
        .unwrap()
        .0;
    let store = disasm("race_loop")
        .into_iter()
        .find(|(_, t)| t.starts_with("mov") && t.contains("%rcx,") && t.contains("<race_counter>"))
        .unwrap()
        .0;
    let at = point_at(&rec, load, 0);
    let sym = "race_counter";
    let j = json(dir, &format!("origin {sym}:8 at {} --json", pt(&at)));
    assert_eq!(le(&j["value"]), counter);
    let nodes = j["nodes"].as_array().unwrap();
    // The printing task reads it; the values it was computed from were
    // stored by both tasks, so the other task's stores are on the path.
    let stores: Vec<&serde_json::Value> = nodes
        .iter()
        .filter(|n| n["at"]["rip"].as_u64() == Some(store))
        .collect();
    let stacks: std::collections::BTreeSet<u64> = stores
        .iter()
        .map(|n| n["rsp"].as_u64().unwrap() >> 12)
        .collect();
    assert!(
        stacks.len() >= 2,
        "stores by both tasks on the path: {stacks:x?}"
    );
    assert!(
        writer(nodes, &j["roots"][0]).unwrap()["at"]["rip"].as_u64() == Some(store),
        "the last write is a race_loop store"
    );
    // It ends at `race_counter = 0` in wl_race.
    let wl = range_of("wl_race");
    let imms = j["ends"]["immediates"].as_array().unwrap();
    assert!(
        imms.iter()
            .any(|p| p[0] == 0 && wl.contains(&p[1].as_u64().unwrap())),
        "{imms:?}"
    );
    assert!(j["stopped"].is_null(), "{}", j["stopped"]);

    // history: the stores of both tasks, interleaved, ending at the printed value.
    let text = ok(dir, &format!("seek {}; history {sym} 8", pt(&at)));
    eprintln!("{text}");
    let writes: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("w ") && l.contains("<race_loop+"))
        .collect();
    assert_eq!(writes.len(), 400, "two tasks x 200 stores");
    let by_stack: Vec<&str> = writes
        .iter()
        .map(|l| l.rsplit("[stack ").next().unwrap())
        .collect();
    let switches = by_stack.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        switches >= 2,
        "the tasks' stores interleave: {switches} switches"
    );
    let last = writes.last().unwrap();
    assert!(
        last.contains(&format!("-> {}", hex8(counter))),
        "the last store wrote the printed value {counter}: {last}"
    );
}

fn le(v: &serde_json::Value) -> u64 {
    u64::from_le_bytes(
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect::<Vec<_>>()
            .try_into()
            .unwrap(),
    )
}

fn hex8(v: u64) -> String {
    v.to_le_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn serve(rec: &Path) -> GdbServer {
    gdb_server(rec, &[])
}

#[test]
fn gdb_monitor_origin_finds_the_serial_bytes() {
    let dir = vuln();
    let rec = open(dir);
    let event = rec
        .events
        .iter()
        .position(|e| matches!(e, Event::Serial { bytes, .. } if bytes.len() >= 64))
        .unwrap();
    let ret = disasm("serve")
        .into_iter()
        .rev()
        .find(|(_, t)| t.starts_with("ret"))
        .unwrap()
        .0;
    let s = serve(dir);
    let brk = format!("break *{ret:#x}");
    let out = gdb_batch(
        s.port,
        &demo_image(),
        None,
        &["set architecture i386:x86-64", "set remotetimeout 120"],
        &[&brk, "continue", "monitor origin $rsp:8", "monitor origin $rsp:8 --depth 1"],
    );
    assert!(
        out.contains(&format!("serial input: event #{event} bytes 56..64")),
        "{out}"
    );
    assert!(out.contains("movb %al"), "{out}");
    assert!(out.contains("stopped at depth 1"), "{out}");
}

/// `history` through `revirt inspect`, with the native engine or the
/// stepping oracle (`REVIRT_HISTORY_NATIVE=0`): (touches, native figures,
/// the TO point).
fn history_json(rec: &Path, cmds: &str, native: bool) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    let o = revirt()
        .env("REVIRT_HISTORY_NATIVE", if native { "1" } else { "0" })
        .args(["inspect", rec.to_str().unwrap(), "-c", cmds])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "`{cmds}` failed:\n{}\n{}", stdout(&o), stderr(&o));
    let s = stdout(&o);
    let j: serde_json::Value = serde_json::from_str(&s[s.find('{').unwrap()..]).unwrap_or_else(|e| panic!("{e}:\n{s}"));
    assert!(j["stopped"].is_null(), "{cmds}: {}", j["stopped"]);
    (j["touches"].clone(), j["native"].clone(), j["to"].clone())
}

/// The native `history` (accesses found by watching the range's page,
/// each interval with hits stepped from its start to its last hit) lists
/// exactly what single-stepping the whole span lists: points, instructions,
/// old and new bytes, stacks, inputs; writes and reads; CPU stores, the
/// block device's DMA, and ring-3 stack slots.
#[test]
fn history_at_native_speed_equals_the_stepping_oracle() {
    let same = |dir: &Path, cmds: &str| -> serde_json::Value {
        let (n, figures, to_n) = history_json(dir, cmds, true);
        let (s, none, to_s) = history_json(dir, cmds, false);
        assert!(none.is_null(), "{cmds}: the oracle stepped");
        assert!(figures.is_array(), "{cmds}: the native engine answered: {figures}");
        assert_eq!(n, s, "{cmds}: native = stepping");
        // TO = an exit boundary: the native pass finds its point on the way.
        assert_eq!(to_n, to_s, "{cmds}: the same TO point");
        assert!(to_n["rip"].as_u64().is_some_and(|r| r != 0), "{cmds}: TO resolved: {to_n}");
        assert!(!n.as_array().unwrap().is_empty(), "{cmds}: accesses found");
        n
    };
    // The race counter (step-clock recording): both tasks' stores, and loads.
    let w = same(race(), "history race_counter 8 start end --json");
    assert!(w.as_array().unwrap().len() >= 400, "two tasks x 200 stores");
    let rw = same(race(), "history race_counter 8 start end --reads --json");
    assert!(rw.as_array().unwrap().len() > w.as_array().unwrap().len(), "loads too");

    // The disk workload: the DMA into disk_buf (sector 4 lands at +0x800),
    // then the FNV loop reading it.
    let dir = scratch("disk-history");
    let img = scratch("disk-history.img");
    let data: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&img, &data).unwrap();
    let o = record_demo(&dir, "workload=disk", &["--disk", img.to_str().unwrap()], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let t = same(&dir, "history disk_buf+0x800 8 start end --reads --json");
    let dma: Vec<&serde_json::Value> = t.as_array().unwrap().iter().filter(|t| !t["input"].is_null()).collect();
    assert_eq!(dma.len(), 1, "one DMA wrote it: {t}");
    assert_eq!(dma[0]["input"]["kind"], "disk", "{}", dma[0]);
    assert_eq!(dma[0]["input"]["sector"], 4, "{}", dma[0]);
    assert_eq!(dma[0]["input"]["offset"], 0, "{}", dma[0]);
    same(&dir, "history disk_buf 16 start end --json");

    // The vuln exploit: the saved return address on serve's stack.
    let vdir = vuln();
    let rec = open(vdir);
    let ret = disasm("serve").into_iter().rev().find(|(_, t)| t.starts_with("ret")).unwrap().0;
    let at = point_at(&rec, ret, 0);
    let t = same(vdir, &format!("seek {}; history $rsp 8 --json", pt(&at)));
    assert!(t.as_array().unwrap().len() >= 8, "the eight byte stores of the overflow: {t}");
}
