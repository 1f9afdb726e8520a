//! Helpers shared by the end-to-end tests: the real binary, the real demo
//! guest, real KVM.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn revirt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_revirt"))
}

pub fn demo_image() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/demo/out/vm.img");
    assert!(p.exists(), "demo guest not built at {}", p.display());
    p
}

/// Runs `revirt` with `args`, feeding `stdin`, with a time limit so a hung
/// guest fails the test instead of hanging it.
pub fn run_with_input(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = revirt()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn revirt");
    let mut si = child.stdin.take().unwrap();
    si.write_all(stdin).unwrap();
    drop(si);
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        if rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .is_err()
        {
            // SAFETY: plain kill(2) of our own child process.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = tx.send(());
    t.join().unwrap();
    out
}

pub fn run_demo(cmdline: &str, extra: &[&str], stdin: &[u8]) -> Output {
    let img = demo_image();
    let mut args = vec!["run", img.to_str().unwrap(), "--cmdline", cmdline];
    args.extend_from_slice(extra);
    run_with_input(&args, stdin)
}

/// `revirt record` of the demo guest into `dir`; the caller judges the outcome.
pub fn record_demo(dir: &Path, cmdline: &str, extra: &[&str], stdin: &[u8]) -> Output {
    let img = demo_image();
    let mut args = vec![
        "record",
        img.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "-o",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_with_input(&args, stdin)
}

/// [`record_demo`] that must succeed.
pub fn record_demo_ok(dir: &Path, cmdline: &str, extra: &[&str], stdin: &[u8]) {
    let o = record_demo(dir, cmdline, extra, stdin);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Hashes every file under `dir` (to show nothing was modified).
pub fn tree_hash(dir: &Path) -> std::collections::BTreeMap<PathBuf, String> {
    let mut m = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                m.insert(
                    p.clone(),
                    revirt::trace::sha256_hex(&std::fs::read(&p).unwrap()),
                );
            }
        }
    }
    m
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The demo's compute loop (guests/demo/README.md), computed on the host.
pub fn compute_result(iters: u64) -> u64 {
    let (mut x, mut acc) = (0x2545_F491_4F6C_DD1Du64, 0u64);
    for i in 0..iters {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = acc.wrapping_add(x ^ i);
    }
    acc
}

pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Extracts `key=value` from a line of guest output.
pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
}

/// Records the vuln service the way an attacker would use it: the payload
/// is typed only after the guest asked for a name.
pub fn record_vuln_after_prompt(dir: &Path, input: &[u8]) -> Output {
    let img = demo_image();
    let mut child = revirt()
        .args([
            "record",
            img.to_str().unwrap(),
            "--cmdline",
            "workload=vuln",
            "-o",
            dir.to_str().unwrap(),
            "--checkpoint-every",
            "20ms",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut so = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("vuln: name?\n") {
        assert!(
            Instant::now() < deadline,
            "no prompt: {}",
            String::from_utf8_lossy(&seen)
        );
        let n = so.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "guest output ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    // Let the guest go idle waiting for the input.
    std::thread::sleep(Duration::from_millis(100));
    let mut si = child.stdin.take().unwrap();
    si.write_all(input).unwrap();
    drop(si);
    so.read_to_end(&mut seen).unwrap();
    let mut o = child.wait_with_output().unwrap();
    o.stdout = seen;
    o
}

/// A `revirt gdb` server started by a test; killed when dropped.
pub struct GdbServer {
    pub child: std::process::Child,
    pub port: u16,
}

impl Drop for GdbServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `revirt gdb REC --port 0 EXTRA...`, once it listens.
pub fn gdb_server(rec: &Path, extra: &[&str]) -> GdbServer {
    let mut cmd = revirt();
    cmd.args(["gdb", rec.to_str().unwrap(), "--port", "0"])
        .args(extra);
    start_gdb_server(cmd)
}

/// Starts a `revirt gdb` command and waits for the port it listens on
/// (its stderr is echoed with a `[server]` prefix).
pub fn start_gdb_server(mut cmd: Command) -> GdbServer {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn revirt gdb");
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("[server] {line}");
            if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
                let port: u16 = rest.split(';').next().unwrap().trim().parse().unwrap();
                let _ = tx.send(port);
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server did not start");
    GdbServer { child, port }
}

/// The real gdb in batch mode against a `revirt gdb` server on `port`, with
/// `image`'s symbols: `pre` settings, then `target remote`, then `cmds`.
/// Killed after 240 s so a hung session fails its test instead of CI.
pub fn gdb_batch(port: u16, image: &Path, cwd: Option<&Path>, pre: &[&str], cmds: &[&str]) -> String {
    let mut c = Command::new("gdb");
    c.args(["-nx", "-batch"]);
    for x in pre.iter().chain(&["set pagination off"]) {
        c.args(["-ex", x]);
    }
    c.args(["-ex", &format!("target remote 127.0.0.1:{port}")]);
    for x in cmds {
        c.args(["-ex", x]);
    }
    c.arg(image);
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().expect("gdb");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(240)).is_err() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let o = child.wait_with_output().unwrap();
    let _ = tx.send(());
    t.join().unwrap();
    let s = format!("{}{}", stdout(&o), stderr(&o));
    eprintln!("---- gdb ----\n{s}-------------");
    s
}

/// The address of `name` in the demo image (nm).
pub fn demo_symbol(name: &str) -> u64 {
    let o = Command::new("nm").arg(demo_image()).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[2] == name).then(|| u64::from_str_radix(f[0], 16).unwrap())
        })
        .unwrap_or_else(|| panic!("no symbol {name}"))
}

/// The name of the function of the demo image that holds `addr` (the
/// nearest text symbol at or below it, nm).
pub fn demo_function_at(addr: u64) -> String {
    let o = Command::new("nm").arg(demo_image()).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let a = u64::from_str_radix(f.first()?, 16).ok()?;
            (f.len() == 3 && matches!(f[1], "T" | "t") && a <= addr).then(|| (a, f[2].to_string()))
        })
        .max()
        .map(|(_, n)| n)
        .unwrap_or_else(|| panic!("no function at {addr:#x}"))
}

/// (address, text) of each instruction of `func` in the demo image, from objdump.
pub fn demo_disasm(func: &str) -> Vec<(u64, String)> {
    let o = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(demo_image())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut inside = false;
    let mut v = Vec::new();
    for l in text.lines() {
        if l.ends_with(&format!("<{func}>:")) {
            inside = true;
            continue;
        }
        if inside {
            if l.trim().is_empty() {
                break;
            }
            if let Some((a, rest)) = l.trim().split_once(':') {
                if let Ok(a) = u64::from_str_radix(a, 16) {
                    v.push((a, rest.trim().to_string()));
                }
            }
        }
    }
    assert!(!v.is_empty(), "no function {func} in the demo image");
    v
}
