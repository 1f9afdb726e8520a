//! `revirt gdb` driven by the real gdb (batch mode) on real KVM: forward and
//! reverse execution, breakpoints and watchpoints in ring 0 and ring 3, the
//! forensic demo, and a server that survives bad clients.

mod common;
use common::*;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

type Server = GdbServer;

fn record(dir: &Path, name: &str, cmdline: &str, stdin: &[u8]) -> PathBuf {
    let out = dir.join(name);
    let o = record_demo(&out, cmdline, &[], stdin);
    assert!(
        out.join("meta.json").exists(),
        "record failed: {}",
        stderr(&o)
    );
    out
}

fn serve(rec: &Path) -> Server {
    gdb_server(rec, &[])
}

/// Runs gdb in batch mode with these commands after connecting; returns stdout+stderr.
fn gdb(port: u16, cmds: &[&str]) -> String {
    gdb_batch(port, &demo_image(), None, &["set architecture i386:x86-64"], cmds)
}

/// Values printed with `printf "KEY=%#lx\n", expr`, in order.
fn values(out: &str, key: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| u64::from_str_radix(v.trim().trim_start_matches("0x"), 16).unwrap_or(0))
        .collect()
}

use common::{demo_disasm as disasm, demo_symbol as symbol};

const PC: &str = "printf \"PC=%#lx\\n\", $pc";

#[test]
fn stepi_and_reverse_stepi_ring0_and_ring3() {
    let d = tempfile::tempdir().unwrap();
    let rec = record(d.path(), "c", "workload=compute iters=20", b"");
    let s = serve(&rec);
    let start = disasm("_start");
    let wl = symbol("wl_compute");
    let out = gdb(
        s.port,
        &[
            PC,
            "stepi",
            PC,
            "info registers",
            "stepi",
            PC,
            "reverse-stepi",
            PC,
            "info registers",
            // ring 3
            &format!("break *{wl:#x}"),
            "continue",
            PC,
            "stepi",
            "stepi",
            "info registers",
            "stepi",
            PC,
            "reverse-stepi",
            PC,
            "info registers",
        ],
    );
    let pcs = values(&out, "PC");
    assert_eq!(pcs.len(), 7, "{out}");
    assert_eq!(pcs[0], start[0].0);
    assert_eq!(
        pcs[1], start[1].0,
        "stepi goes to the next instruction of _start (objdump)"
    );
    assert_eq!(pcs[2], start[2].0);
    assert_eq!(pcs[3], start[1].0, "reverse-stepi goes back");
    assert_eq!(pcs[4], wl, "breakpoint at wl_compute (ring 3)");
    let regs: Vec<&str> = out
        .split("rax ")
        .skip(1)
        .map(|b| b.split("\ngs ").next().unwrap())
        .collect();
    assert_eq!(regs.len(), 4, "{out}");
    assert_eq!(
        regs[0], regs[1],
        "ring 0: registers after reverse-stepi equal those before the stepi"
    );
    assert!(
        regs[0]
            .lines()
            .any(|l| l.starts_with("cs") && l.split_whitespace().nth(1) == Some("0x10")),
        "{}",
        regs[0]
    );
    assert_eq!(pcs[5], disasm("wl_compute")[3].0);
    assert_eq!(pcs[6], disasm("wl_compute")[2].0);
    assert_eq!(
        regs[2], regs[3],
        "ring 3: registers after reverse-stepi equal those before the stepi"
    );
    assert!(
        regs[2]
            .lines()
            .any(|l| l.starts_with("cs") && l.split_whitespace().nth(1) == Some("0x33")),
        "{}",
        regs[2]
    );
}

#[test]
fn breakpoints_forward_and_reverse_continue_ring3() {
    let d = tempfile::tempdir().unwrap();
    let rec = record(d.path(), "c", "workload=compute iters=20", b"");
    let s = serve(&rec);
    // The loop's `add $0x1,%rcx` (i++) inside wl_compute (compute_run inlined).
    let inc = disasm("wl_compute")
        .into_iter()
        .find(|(_, t)| t.starts_with("add") && t.ends_with("$0x1,%rcx"))
        .unwrap()
        .0;
    let out = gdb(
        s.port,
        &[
            "continue", // runs free to the end
            &format!("break *{inc:#x}"),
            "reverse-continue",
            "printf \"RCX=%#lx\\n\", $rcx",
            PC,
            "reverse-continue",
            "printf \"RCX=%#lx\\n\", $rcx",
            "continue",
            "printf \"RCX=%#lx\\n\", $rcx",
            "continue",
            "delete",
            "reverse-continue",
            PC,
        ],
    );
    assert!(out.contains("No more reverse-execution history"), "{out}");
    let rcx = values(&out, "RCX");
    assert_eq!(
        rcx,
        vec![19, 18, 19],
        "last hit is the last iteration; the one before is the previous; forward again"
    );
    let pcs = values(&out, "PC");
    assert_eq!(pcs[0], inc);
    // Forward from the last hit reaches the end, back with no breakpoints reaches the start.
    assert_eq!(
        out.matches("No more reverse-execution history").count(),
        3,
        "{out}"
    );
    assert_eq!(*pcs.last().unwrap(), symbol("_start"));
}

#[test]
fn breakpoint_and_watchpoint_ring0() {
    let d = tempfile::tempdir().unwrap();
    let rec = record(d.path(), "r", "workload=ring0 iters=30", b"");
    let s = serve(&rec);
    let parse = symbol("parse_u64");
    let out = gdb(
        s.port,
        &[
            &format!("break *{parse:#x}"),
            "continue",
            PC,
            "printf \"CS=%#lx\\n\", $cs",
            "delete",
            "continue",
            "watch -l cfg.iters",
            "reverse-continue",
            PC,
            "printf \"ITERS=%#lx\\n\", cfg.iters",
            "x/i $pc",
            "delete",
            "stepi",
            "printf \"ITERS=%#lx\\n\", cfg.iters",
            "reverse-continue",
        ],
    );
    assert_eq!(values(&out, "CS"), vec![0x10]);
    let pcs = values(&out, "PC");
    assert_eq!(pcs[0], parse);
    let kmain = disasm("kmain");
    assert!(
        kmain.iter().any(|(a, _)| *a == pcs[1]),
        "the write to cfg.iters is in kmain: {:#x}",
        pcs[1]
    );
    let it = values(&out, "ITERS");
    assert_eq!(it.len(), 2, "{out}");
    assert_ne!(it[0], 30, "before the writing instruction");
    assert_eq!(it[1], 30, "the instruction stopped at wrote iters=30");
    assert!(out.contains("No more reverse-execution history"), "{out}");
}

#[test]
fn forensic_demo_finds_the_overwrite() {
    let d = tempfile::tempdir().unwrap();
    let mut payload = vec![b'0'; 56];
    payload.extend_from_slice(&0x200000u64.to_le_bytes());
    payload.push(b'\n');
    let rec = record(d.path(), "v", "workload=vuln", &payload);
    let s = serve(&rec);
    let serve_fn = disasm("serve");
    let ret = serve_fn
        .iter()
        .find(|(_, t)| t.starts_with("ret"))
        .unwrap()
        .0;
    let store = serve_fn
        .iter()
        .find(|(_, t)| t.starts_with("mov") && t.contains("%al,-0x31(%rbp,%rbx,1)"))
        .unwrap()
        .0;
    let out = gdb(
        s.port,
        &[
            "continue",
            PC,
            // Back to serve's `ret` that jumped to the backdoor.
            &format!("break *{ret:#x}"),
            "reverse-continue",
            PC,
            "printf \"RET=%#lx\\n\", *(long*)$rsp",
            "delete",
            "watch -l *(long*)$rsp",
            "reverse-continue",
            PC,
            "printf \"AL=%#lx\\n\", $al",
            "x/i $pc",
            "bt 1",
            // gdb's own reverse commands on top of bs/bc: out of serve, back
            // over the call before it, and forward again.
            "delete",
            "reverse-finish",
            PC,
            "reverse-next",
            PC,
            "next",
            PC,
        ],
    );
    let pcs = values(&out, "PC");
    assert_eq!(pcs.len(), 6, "{out}");
    assert_eq!(
        values(&out, "RET"),
        vec![0x200000],
        "the return address was the attacker's"
    );
    assert_eq!(pcs[1], ret);
    assert_eq!(
        pcs[2], store,
        "reverse-continue with the watchpoint lands on name[n++] = c"
    );
    assert_eq!(
        values(&out, "AL"),
        vec![0x20],
        "the byte it writes is the attacker's 0x20"
    );
    let wl = disasm("wl_vuln");
    let call_serve = wl
        .iter()
        .find(|(_, t)| t.starts_with("call") && t.contains("<serve>"))
        .unwrap()
        .0;
    let call_puts = wl
        .iter()
        .find(|(_, t)| t.starts_with("call") && t.contains("<con_puts>"))
        .unwrap()
        .0;
    assert_eq!(
        pcs[3], call_serve,
        "reverse-finish stops at the call of serve"
    );
    assert!(
        pcs[4] < call_puts && pcs[4] >= wl[0].0,
        "reverse-next goes back over con_puts: {:#x}",
        pcs[4]
    );
    assert_eq!(pcs[5], pcs[3], "next comes forward to the call again");
}

#[test]
fn bad_clients_do_not_kill_the_server() {
    let d = tempfile::tempdir().unwrap();
    let rec = record(d.path(), "c", "workload=compute iters=5", b"");
    let s = serve(&rec);
    {
        let mut t = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        let _ = t.write_all(b"$qSupported:xx#00garbage$m12345678,zz#ff+++$vCont;q#");
        std::thread::sleep(Duration::from_millis(200));
    }
    {
        // A client that asks to continue and disconnects while it runs.
        let mut t = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        let _ = t.write_all(b"+$c#63");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = gdb(s.port, &["stepi", PC, "monitor where"]);
    assert_eq!(values(&out, "PC").len(), 1, "{out}");
    assert!(out.contains("next event #"), "{out}");
}

fn packet(body: &str) -> Vec<u8> {
    let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    format!("${body}#{sum:02x}").into_bytes()
}

/// Reads from the socket until a whole packet (`$...#xx`) has arrived;
/// returns its body (acks and notifications before it are skipped).
fn read_packet(t: &mut std::net::TcpStream, secs: u64) -> String {
    use std::io::Read;
    t.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut got = Vec::new();
    while std::time::Instant::now() < deadline {
        if let Some(start) = got.iter().position(|&b| b == b'$') {
            if let Some(h) = got[start..].iter().position(|&b| b == b'#') {
                if got.len() >= start + h + 3 {
                    return String::from_utf8_lossy(&got[start + 1..start + h]).into_owned();
                }
            }
        }
        let mut b = [0u8; 1];
        match t.read(&mut b) {
            Ok(0) => break,
            Ok(_) => got.push(b[0]),
            Err(_) => {}
        }
    }
    panic!(
        "no whole packet within {secs} s: {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// `continue` with an access watchpoint on bytes nothing touches, then
/// Ctrl-C after `wait`: a SIGINT stop reply promptly, and the stub still
/// answers. `native`: the search engine's path (REVIRT_GDB_NATIVE=1), which
/// can stop only at an exit boundary; otherwise the stepping path.
fn ctrl_c_case(cmdline: &str, native: bool, wait: Duration) {
    ctrl_c_case_with(cmdline, native, true, wait)
}

/// `watch`: with an access watchpoint set (else the continue runs free).
fn ctrl_c_case_with(cmdline: &str, native: bool, watch: bool, wait: Duration) {
    let d = tempfile::tempdir().unwrap();
    let rec = record(d.path(), "c", cmdline, b"");
    let mut cmd = revirt();
    cmd.args(["gdb", rec.to_str().unwrap(), "--port", "0"]).env("REVIRT_GDB_NATIVE", if native { "1" } else { "0" });
    let s = start_gdb_server(cmd);
    let mut t = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    t.write_all(&packet("QStartNoAckMode")).unwrap();
    assert_eq!(read_packet(&mut t, 10), "OK");
    if watch {
        t.write_all(&packet("Z4,123456,8")).unwrap();
        assert_eq!(read_packet(&mut t, 10), "OK");
    }
    t.write_all(&packet("vCont;c")).unwrap();
    std::thread::sleep(wait);
    let t0 = std::time::Instant::now();
    t.write_all(&[0x03]).unwrap();
    let r = read_packet(&mut t, 20);
    assert!(r.starts_with("T02") || r.starts_with("S02"), "native={native}: a SIGINT stop reply: {r:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "native={native}: stopped promptly: {:?}", t0.elapsed());
    // Still usable: read the registers.
    t.write_all(&packet("g")).unwrap();
    let g = read_packet(&mut t, 10);
    assert!(g.len() > 50 && !g.starts_with('E'), "{g:?}");
    if native {
        // Kicked out of the loop's exit interval: back at its exit
        // boundary, the last exact point, and the user is told.
        let w = monitor(&mut t, "where");
        assert!(w.contains("+ 0 steps") && w.contains("note: interrupted inside an exit-free stretch"), "{w}");
    }
}

/// The text a `monitor` command prints (its `O` packets, up to `OK`).
fn monitor(t: &mut std::net::TcpStream, cmd: &str) -> String {
    use std::io::Read;
    t.write_all(&packet(&format!("qRcmd,{}", hex::encode(cmd)))).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"$OK#") {
        let n = t.read(&mut b).unwrap();
        assert!(n > 0, "the server went away");
        got.extend_from_slice(&b[..n]);
    }
    let s = String::from_utf8_lossy(&got).into_owned();
    s.split('$')
        .filter_map(|p| p.split('#').next()?.strip_prefix('O'))
        .filter(|h| !h.is_empty() && *h != "K")
        .map(|h| String::from_utf8_lossy(&hex::decode(h).unwrap()).into_owned())
        .collect()
}

#[test]
fn ctrl_c_interrupts_a_long_stepping_continue() {
    // Stepping ~3e7 instructions would take minutes.
    ctrl_c_case("workload=compute iters=2000000", false, Duration::from_millis(1500));
}

#[test]
fn ctrl_c_interrupts_a_long_native_continue() {
    // ~1.5e10 instructions: seconds even at native speed; the stop comes at
    // the next exit boundary after the Ctrl-C.
    ctrl_c_case("workload=compute iters=1000000000", true, Duration::from_millis(400));
}

#[test]
fn ctrl_c_interrupts_a_long_continue_without_breakpoints() {
    // The same loop with nothing set: the free run is kicked out of it too.
    ctrl_c_case_with("workload=compute iters=1000000000", true, false, Duration::from_millis(400));
}

#[test]
fn read_and_access_watchpoints_and_reverse_breakpoint_ring0() {
    let d = tempfile::tempdir().unwrap();
    let rec = record(d.path(), "r", "workload=ring0 iters=30", b"");
    let s = serve(&rec);
    let parse = symbol("parse_u64");
    let out = gdb(
        s.port,
        &[
            "rwatch cfg.iters",
            "continue", // stops just after the instruction that read it
            PC,
            "delete",
            "continue", // to the end
            &format!("break *{parse:#x}"),
            "reverse-continue", // the last (only) call of parse_u64
            PC,
            "delete",
            "continue",
            "awatch cfg.iters",
            "reverse-continue", // the last access: the read in ring0_main
            PC,
            "reverse-continue", // the access before: the write in kmain
            PC,
        ],
    );
    let pcs = values(&out, "PC");
    assert_eq!(pcs.len(), 4, "{out}");
    let ring0_main = disasm("ring0_main");
    let read = ring0_main
        .iter()
        .position(|(_, t)| t.contains("<cfg+0x40>"))
        .expect("ring0_main reads cfg.iters");
    assert_eq!(
        pcs[0],
        ring0_main[read + 1].0,
        "forward read watchpoint: just after the reader"
    );
    assert_eq!(pcs[1], parse, "reverse-continue to a ring-0 breakpoint");
    assert_eq!(
        pcs[2], ring0_main[read].0,
        "reverse access watchpoint: at the reader"
    );
    let kmain = disasm("kmain");
    let w = kmain
        .iter()
        .find(|(a, _)| *a == pcs[3])
        .expect("the write is in kmain");
    assert!(
        w.1.starts_with("mov") && w.1.contains("<cfg+0x40>"),
        "{w:?}"
    );
}

#[test]
fn step_clock_recording_back_and_forth_is_exact() {
    // Timer interrupts land at arbitrary ring-3 instructions (step clock).
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("race");
    let o = record_demo(
        &out,
        "workload=race iters=300 hz=1000",
        &["--clock", "step"],
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let s = serve(&out);
    let out = gdb(
        s.port,
        &[
            "break race_loop",
            "continue",
            "delete",
            "stepi 3000",
            "info registers",
            "reverse-stepi",
            "info registers",
            "stepi",
            "info registers",
        ],
    );
    let regs: Vec<&str> = out
        .split("rax ")
        .skip(1)
        .map(|b| b.split("\ngs ").next().unwrap())
        .collect();
    assert_eq!(regs.len(), 3, "{out}");
    assert_ne!(regs[0], regs[1], "reverse-stepi moved");
    assert_eq!(
        regs[0], regs[2],
        "back and forth again: identical registers"
    );
}

fn serve_with(rec: &Path, at: u64, snapshots: bool) -> Server {
    let mut cmd = revirt();
    cmd.args(["gdb", rec.to_str().unwrap(), "--port", "0", "--at", &at.to_string()]);
    if !snapshots {
        cmd.env("REVIRT_GDB_SNAPSHOTS", "0");
    }
    start_gdb_server(cmd)
}

/// Register blocks of `info registers` (rax .. fs), in order.
fn reg_blocks(out: &str) -> Vec<String> {
    out.split("\nrax ")
        .skip(1)
        .map(|b| b.split("\ngs ").next().unwrap().to_string())
        .collect()
}

/// (exit, steps) from `monitor where`.
fn where_at(out: &str) -> (u64, u64) {
    let l = out
        .lines()
        .rev()
        .find(|l| l.contains(" steps); next event"))
        .unwrap_or_else(|| panic!("no position in {out}"));
    let inner = l.rsplit_once("(exit ").unwrap().1;
    let (e, rest) = inner.split_once(" + ").unwrap();
    let k = rest.split_once(' ').unwrap().0;
    (e.parse().unwrap(), k.parse().unwrap())
}

#[test]
fn reverse_stepi_through_snapshots_matches_a_direct_replay() {
    // Back and forth across exit boundaries, many times over the same
    // stretch (so later moves restore in-memory snapshots), then the same
    // position reached directly by a server without snapshots.
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("race");
    let o = record_demo(
        &out,
        "workload=race iters=20000 exits=16",
        &["--checkpoint-every", "5ms"],
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rec = revirt::replay::Recording::open(&out).unwrap();
    let at = rec.last_exits() * 3 / 4;
    let s = serve_with(&out, at, true);
    let mut cmds: Vec<String> = vec!["monitor where".into()];
    let moves = |v: &mut Vec<String>, what: &str, n: usize| {
        for _ in 0..n {
            v.push(what.into());
        }
        v.push("info registers".into());
        // A stop found at native speed is an arrival count: make it exit + steps.
        v.push("monitor exact".into());
        v.push("monitor where".into());
    };
    moves(&mut cmds, "reverse-stepi", 25); // across the exit boundary `at`
    moves(&mut cmds, "stepi", 40); // forward over it again
    moves(&mut cmds, "reverse-stepi", 30); // and back over it
    cmds.push(format!("monitor goto-exit {}", at - 2));
    cmds.push("maintenance flush register-cache".into());
    moves(&mut cmds, "stepi", 3);
    moves(&mut cmds, "reverse-stepi", 8); // across exit at - 2
    moves(&mut cmds, "reverse-stepi", 1);
    moves(&mut cmds, "stepi", 1);
    cmds.push("monitor stats".into());
    let cmds_ref: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    let a = gdb(s.port, &cmds_ref);
    let blocks = reg_blocks(&a);
    let wheres: Vec<(u64, u64)> = a
        .lines()
        .filter(|l| l.contains(" steps); next event"))
        .map(where_at)
        .collect();
    assert_eq!(blocks.len(), 7, "{a}");
    assert_eq!(wheres.len(), 8, "{a}");
    assert_eq!(wheres[0], (at, 0));
    assert!(wheres[1].0 < at, "25 back crossed the boundary: {wheres:?}");
    assert!(wheres[2].0 > wheres[1].0, "40 forward crossed one again: {wheres:?}");
    assert!(wheres[3].0 < wheres[2].0, "{wheres:?}");
    assert_eq!(wheres[4], (at - 2, 3), "{wheres:?}");
    assert!(wheres[5].0 < at - 2, "8 back crossed exit at - 2: {wheres:?}");
    assert_eq!(wheres[7], wheres[5], "{wheres:?}");
    assert_eq!(blocks[6], blocks[4], "back one and forward one");
    let stats = a.lines().find(|l| l.starts_with("snapshots:")).unwrap_or("");
    assert!(
        stats.contains(" restored") && !stats.contains(" 0 restored"),
        "snapshots were used: {stats}"
    );
    // Each stop, reached directly by a fresh server without snapshots.
    let plain = serve_with(&out, at, false);
    let mut direct: Vec<String> = Vec::new();
    for &(e, k) in &wheres[1..] {
        direct.push(format!("monitor goto-exit {e}"));
        direct.push("maintenance flush register-cache".into());
        if k > 0 {
            direct.push(format!("stepi {k}"));
        }
        direct.push("info registers".into());
        direct.push("monitor where".into());
    }
    let direct_ref: Vec<&str> = direct.iter().map(|s| s.as_str()).collect();
    let b = gdb(plain.port, &direct_ref);
    let bwheres: Vec<(u64, u64)> = b
        .lines()
        .filter(|l| l.contains(" steps); next event"))
        .map(where_at)
        .collect();
    assert_eq!(bwheres, wheres[1..].to_vec(), "{b}");
    assert_eq!(reg_blocks(&b), blocks, "registers via snapshots == direct replay");
}

#[test]
fn session_snapshots_give_the_exact_machine_state() {
    // Library level: the full state hash (registers, devices, all memory),
    // event index, output length and clock after each move equal those of
    // a session without snapshots; both clocks.
    use revirt::replay::session::Session;
    use std::sync::Arc;
    for (name, extra) in [("exit", vec![]), ("step", vec!["--clock", "step"])] {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join(name);
        let mut args = vec!["--checkpoint-every", "5ms"];
        args.extend(extra);
        record_demo_ok(&out, "workload=race iters=3000 exits=16 hz=1000", &args, b"");
        let rec = Arc::new(revirt::replay::Recording::open(&out).unwrap());
        let at = rec.last_exits() / 2;
        let mut a = Session::open_with(rec.clone(), at, true).unwrap();
        let mut b = Session::open_with(rec.clone(), at, false).unwrap();
        assert!(a.snaps.enabled && !b.snaps.enabled);
        // And one that keeps only 3 snapshots (evicts all the time).
        let mut t = Session::open_with(rec.clone(), at, true).unwrap();
        t.snaps.max_snaps = 3;
        let same = |a: &mut Session, b: &mut Session, hash: bool, what: &str| {
            assert_eq!(a.pos(), b.pos(), "{name}: {what}");
            assert_eq!(a.event_index(), b.event_index(), "{name}: {what}");
            assert_eq!(a.tl.output_len(), b.tl.output_len(), "{name}: {what}");
            assert_eq!(a.tl.clock_ns(), b.tl.clock_ns(), "{name}: {what}");
            if hash {
                assert_eq!(
                    a.tl.state_hash().unwrap(),
                    b.tl.state_hash().unwrap(),
                    "{name}: {what}"
                );
            }
        };
        let mut crossed = 0;
        for round in 0..3 {
            for i in 0..12 {
                let e = a.pos().exits;
                a.reverse_step().unwrap();
                b.reverse_step().unwrap();
                t.reverse_step().unwrap();
                crossed += (a.pos().exits != e) as u32;
                same(&mut a, &mut b, i % 4 == 0, &format!("round {round} back {i}"));
                same(&mut t, &mut b, i % 4 == 2, &format!("round {round} back {i}, 3 snapshots"));
            }
            for i in 0..(6 + round * 4) {
                a.step().unwrap();
                b.step().unwrap();
                t.step().unwrap();
                same(&mut a, &mut b, i == 0, &format!("round {round} forward {i}"));
                same(&mut t, &mut b, false, &format!("round {round} forward {i}, 3 snapshots"));
            }
            let e = a.pos().exits.saturating_sub(1 + round as u64);
            a.goto_exit(e).unwrap();
            b.goto_exit(e).unwrap();
            t.goto_exit(e).unwrap();
            same(&mut a, &mut b, true, &format!("round {round} goto-exit {e}"));
            same(&mut t, &mut b, true, &format!("round {round} goto-exit {e}, 3 snapshots"));
        }
        assert!(crossed > 0, "{name}: some reverse step crossed an exit boundary");
        assert!(a.snaps.stats.restored > 0, "{name}: {:?}", a.snaps.stats);
        assert!(t.snaps.stats.evicted > 0 && t.snaps.len() <= 3, "{name}: {:?}", t.snaps.stats);
        // And a fresh session that went straight there.
        let p = a.pos();
        let mut c = Session::open_with(rec.clone(), p.exits, false).unwrap();
        c.goto(p).unwrap();
        same(&mut a, &mut c, true, "fresh session");
    }
}

#[test]
fn session_snapshots_restore_the_disk_too() {
    // The disk workload writes sector 0 once: go past the write, back before
    // it through a snapshot, and forth again; the state hash covers the disk.
    use revirt::replay::session::Session;
    use std::sync::Arc;
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let out = d.path().join("disk");
    let o = record_demo(
        &out,
        "workload=disk",
        &["--disk", disk.to_str().unwrap()],
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rec = Arc::new(revirt::replay::Recording::open(&out).unwrap());
    let last = rec.last_exits();
    assert!(last > 8, "{last}");
    let mut a = Session::open_with(rec.clone(), 2, true).unwrap();
    let mut b = Session::open_with(rec.clone(), 2, false).unwrap();
    assert!(a.snaps.enabled);
    let sector0 = |s: &mut Session| s.tl.read_sectors(0, 1).unwrap();
    let before = sector0(&mut a);
    let mut seen_write = false;
    for (i, e) in [last - 1, 2, last - 2, 3, last - 1, 2].into_iter().enumerate() {
        a.goto_exit(e).unwrap();
        b.goto_exit(e).unwrap();
        assert_eq!(a.pos(), b.pos(), "move {i} to exit {e}");
        assert_eq!(sector0(&mut a), sector0(&mut b), "move {i} to exit {e}");
        seen_write |= sector0(&mut a) != before;
        assert_eq!(
            a.tl.state_hash().unwrap(),
            b.tl.state_hash().unwrap(),
            "move {i} to exit {e}"
        );
    }
    for i in 0..5 {
        a.reverse_step().unwrap();
        b.reverse_step().unwrap();
        assert_eq!(a.pos(), b.pos(), "reverse step {i}");
    }
    assert_eq!(a.tl.state_hash().unwrap(), b.tl.state_hash().unwrap());
    assert!(seen_write, "the workload wrote sector 0 at some point");
    assert!(a.snaps.stats.restored > 0, "{:?}", a.snaps.stats);
}
