//! Live migration end to end on real KVM: a guest that keeps dirtying
//! memory and printing moves between two revirt processes (over loopback,
//! and between network namespaces), with and without a recording, and
//! the failure cases leave the source running.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A running revirt process whose stdout/stderr are collected as they come.
struct Proc {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn collect(mut r: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        while let Ok(n) = r.read(&mut b) {
            if n == 0 {
                break;
            }
            buf.lock().unwrap().extend_from_slice(&b[..n]);
        }
    })
}

/// A test that fails half-way must not leave VMs running.
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), out.clone()),
            collect(child.stderr.take().unwrap(), err.clone()),
        ];
        Proc { child, out, err, readers }
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Waits until stdout or stderr contains `pat`.
    fn wait_for(&self, pat: &str, limit: Duration) {
        let t = Instant::now();
        while !self.stdout().contains(pat) && !self.stderr().contains(pat) {
            assert!(t.elapsed() < limit, "no {pat:?} within {limit:?}; stdout:\n{}\nstderr:\n{}", self.stdout(), self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit (killing it after `limit`): status, stdout, stderr.
    fn finish(mut self, limit: Duration) -> (i32, String, String) {
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
        (status.code().unwrap_or(-1), self.stdout(), self.stderr())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
    }
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_revirt")
}

/// `revirt receive` listening on an ephemeral port; returns it and its address.
fn receive(extra: &[&str]) -> (Proc, String) {
    receive_in(None, "127.0.0.1:0", extra)
}

/// `receive` on an ephemeral port, run in directory `cwd`.
fn receive_with(cwd: Option<&Path>, extra: &[&str]) -> (Proc, String) {
    receive_at(None, cwd, "127.0.0.1:0", extra)
}

fn receive_in(netns: Option<&str>, listen: &str, extra: &[&str]) -> (Proc, String) {
    receive_at(netns, None, listen, extra)
}

fn receive_at(netns: Option<&str>, cwd: Option<&Path>, listen: &str, extra: &[&str]) -> (Proc, String) {
    let mut cmd = in_ns(netns);
    cmd.args(["receive", "--listen", listen]).args(extra);
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let p = Proc::spawn(cmd);
    // The whole line: the address may arrive in pieces.
    let t = Instant::now();
    while !p.stderr().split("waiting for a VM on ").nth(1).is_some_and(|r| r.contains('\n')) {
        assert!(t.elapsed() < Duration::from_secs(30), "receive did not start: {}", p.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = p.stderr();
    let addr = err.split("waiting for a VM on ").nth(1).unwrap().lines().next().unwrap().trim().to_string();
    (p, addr)
}

fn in_ns(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin()]);
            c
        }
        None => Command::new(bin()),
    }
}

fn churn_cmdline(rounds: u64, pages: u64) -> String {
    format!("workload=churn iters={rounds} pages={pages} hz=100")
}

/// What the churn workload must print last: the host's own computation.
fn churn_check(rounds: u64, pages: u64) -> String {
    let mut sum = 0u64;
    for p in 0..pages {
        let mut v = 0u64;
        for r in 0..rounds {
            v = v.wrapping_mul(6364136223846793005).wrapping_add(r + p);
        }
        sum = sum.wrapping_add(v);
    }
    format!("churn: rounds={rounds} pages={pages} check={sum:#018x}")
}

/// The round numbers printed, in order, from complete lines only: one
/// host's output may end (or start) mid-line when the move falls there, so
/// a line counts once its newline is printed; a complete round line whose
/// number does not parse is still a failure.
fn rounds_in(out: &str) -> Vec<u64> {
    out.split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .filter_map(|l| l.strip_prefix("churn: round "))
        .map(|n| n.trim().parse().unwrap_or_else(|e| panic!("round line {n:?} in the output: {e}")))
        .collect()
}

/// A source VM (`run` or `record`) with a control socket, started in `netns`.
fn source(netns: Option<&str>, dir: &Path, cmdline: &str, record: Option<&Path>) -> (Proc, String) {
    source_with(netns, dir, cmdline, record, &["--checkpoint-every", "300ms"])
}

fn source_with(netns: Option<&str>, dir: &Path, cmdline: &str, record: Option<&Path>, rec_args: &[&str]) -> (Proc, String) {
    let img = demo_image();
    let sock = dir.join("ctl.sock").display().to_string();
    let mut cmd = in_ns(netns);
    match record {
        Some(rec) => cmd.args(["record", img.to_str().unwrap(), "-o", rec.to_str().unwrap()]).args(rec_args),
        None => cmd.args(["run", img.to_str().unwrap()]),
    };
    cmd.args(["--cmdline", cmdline, "--control", &sock]);
    let p = Proc::spawn(cmd);
    p.wait_for("churn: round 20\n", Duration::from_secs(60));
    (p, sock)
}

fn migrate(sock: &str, to: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["migrate", sock, "--to", to, "--json"];
    args.extend_from_slice(extra);
    let o = run_with_input(&args, b"");
    (o.status.code().unwrap_or(-1), stdout(&o), stderr(&o))
}

fn summary_field(json: &str, key: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("summary {json:?}: {e}"));
    v[key].as_f64().unwrap_or_else(|| panic!("no {key} in {json}"))
}

/// Output continues without loss or duplication: every round exactly
/// once, in order, part at the source and the rest at the destination.
/// The guest writes a character per port write, so the move may fall in
/// the middle of a line: the two outputs are checked joined.
fn assert_joined(src: &str, dst: &str, rounds: u64, pages: u64) {
    let (a, b) = (rounds_in(src), rounds_in(dst));
    assert!(!a.is_empty() && !b.is_empty(), "the move happened mid-run: source printed {} rounds, destination {}", a.len(), b.len());
    let all = rounds_in(&format!("{src}{dst}"));
    assert_eq!(all, (0..rounds).collect::<Vec<_>>(), "rounds lost or duplicated across the move");
    assert!(dst.contains(&churn_check(rounds, pages)), "destination's final line is not {}:\n{dst}", churn_check(rounds, pages));
    assert!(!src.contains("churn: rounds="), "the source must not finish the workload too");
}

#[test]
fn migrates_a_running_guest_over_loopback_without_losing_output() {
    let tmp = tempfile::tempdir().unwrap();
    let (rounds, pages) = (300, 2000);
    let (dst, addr) = receive(&[]);
    let (src, sock) = source(None, tmp.path(), &churn_cmdline(rounds, pages), None);
    let (code, json, err) = migrate(&sock, &addr, &[]);
    assert_eq!(code, 0, "migrate failed: {err}");
    assert!(err.contains("round 1:") && err.contains("predicted downtime"), "progress shown: {err}");
    let downtime = summary_field(&json, "downtime_ms");
    let total = summary_field(&json, "total_ms");
    assert!(downtime > 0.0 && downtime <= total, "downtime {downtime} ms of {total} ms");
    assert!(summary_field(&json, "rounds") >= 2.0);
    eprintln!("loopback migration of a 64 MiB guest dirtying {pages} pages per tick: downtime {downtime:.1} ms, total {total:.0} ms");
    let (sc, so, se) = src.finish(Duration::from_secs(30));
    assert_eq!(sc, 0, "source: {se}");
    assert!(se.contains("migrated to"), "source reports the move: {se}");
    // No residual dependency: the source process is gone, the guest runs on.
    let before = rounds_in(&dst.stdout()).len();
    assert!(!dst.stdout().contains("churn: rounds="), "the guest is still running after the source exited");
    std::thread::sleep(Duration::from_millis(300));
    assert!(rounds_in(&dst.stdout()).len() > before, "the destination makes progress on its own");
    let (dc, d_out, de) = dst.finish(Duration::from_secs(60));
    assert_eq!(dc, 0, "destination: {de}");
    assert_joined(&so, &d_out, rounds, pages);
}

#[test]
fn a_recording_continues_across_the_move_and_replays_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (rounds, pages) = (200, 500);
    let (src_rec, dst_rec) = (tmp.path().join("src-rec"), tmp.path().join("dst-rec"));
    let (dst, addr) = receive(&["-o", dst_rec.to_str().unwrap()]);
    let (src, sock) = source(None, tmp.path(), &churn_cmdline(rounds, pages), Some(&src_rec));
    std::thread::sleep(Duration::from_millis(400)); // let the source write a checkpoint or two
    // zstd on every frame here, to run that path end to end too.
    let (code, json, err) = migrate(&sock, &addr, &["--compress", "always"]);
    assert_eq!(code, 0, "migrate failed: {err}");
    assert!(summary_field(&json, "downtime_ms") > 0.0);
    let (sc, so, se) = src.finish(Duration::from_secs(30));
    assert_eq!(sc, 0, "source: {se}");
    assert!(se.contains("the recording continues at the destination"), "{se}");
    let (dc, d_out, de) = dst.finish(Duration::from_secs(60));
    assert_eq!(dc, 0, "destination: {de}");
    assert_joined(&so, &d_out, rounds, pages);

    // The joined recording: one console, one log with the move in it, and it replays exactly.
    let console = std::fs::read_to_string(dst_rec.join("console.log")).unwrap();
    assert_eq!(console, format!("{so}{d_out}"), "console.log holds the output of both hosts, in order");
    let o = run_with_input(&["replay", dst_rec.to_str().unwrap(), "-q"], b"");
    assert_eq!(o.status.code(), Some(0), "replay of the joined recording: {}", stderr(&o));
    assert!(stderr(&o).contains("replay matches the recording"), "{}", stderr(&o));
    let o = run_with_input(&["replay", dst_rec.to_str().unwrap()], b"");
    assert_eq!(stdout(&o), console, "replay reproduces the output of both hosts");
    let o = run_with_input(&["verify", dst_rec.to_str().unwrap()], b"");
    assert_eq!(o.status.code(), Some(0), "verify: {}", stdout(&o));
    let o = run_with_input(&["inspect", dst_rec.to_str().unwrap(), "-c", "events all"], b"");
    let migrated = stdout(&o).lines().filter(|l| l.contains("migrated from")).count();
    assert_eq!(migrated, 1, "exactly one migration event: {}", stdout(&o));
    // Checkpoints written at the destination after the move hold what changed since
    // the source's last one: replaying from the last checkpoint matches too.
    let o = run_with_input(&["inspect", dst_rec.to_str().unwrap(), "-c", "summary"], b"");
    let n = stdout(&o)
        .lines()
        .find_map(|l| l.strip_prefix("checkpoints").and_then(|r| r.trim().split(':').next()).and_then(|n| n.trim().parse::<u32>().ok()))
        .unwrap_or_else(|| panic!("checkpoint count in {}", stdout(&o)));
    assert!(n >= 2, "{}", stdout(&o));
    let o = run_with_input(&["replay", dst_rec.to_str().unwrap(), "-q", "--from-checkpoint", &(n - 1).to_string()], b"");
    assert_eq!(o.status.code(), Some(0), "replay from the last checkpoint: {}", stderr(&o));
    // The source's copy stops at the move and says so.
    let o = run_with_input(&["replay", src_rec.to_str().unwrap(), "-q"], b"");
    assert_eq!(o.status.code(), Some(2), "the source's part is incomplete: {}", stderr(&o));
}

/// Checkpoint retention on both sides of a move: files the source's policy
/// rewrote after pre-copy sent them are sent again, the destination goes on
/// thinning the same chain, and the joined recording verifies and replays.
#[test]
fn a_thinned_recording_moves_and_keeps_thinning() {
    let tmp = tempfile::tempdir().unwrap();
    let (rounds, pages) = (200, 50);
    let (src_rec, dst_rec) = (tmp.path().join("src-rec"), tmp.path().join("dst-rec"));
    let (dst, addr) = receive(&["-o", dst_rec.to_str().unwrap()]);
    let thin = ["--checkpoint-every", "20ms", "--keep-checkpoints", "2"];
    let (src, sock) = source_with(None, tmp.path(), &churn_cmdline(rounds, pages), Some(&src_rec), &thin);
    std::thread::sleep(Duration::from_millis(300));
    let (code, _, err) = migrate(&sock, &addr, &[]);
    assert_eq!(code, 0, "migrate failed: {err}");
    let (sc, so, se) = src.finish(Duration::from_secs(30));
    assert_eq!(sc, 0, "source: {se}");
    let (dc, d_out, de) = dst.finish(Duration::from_secs(60));
    assert_eq!(dc, 0, "destination: {de}");
    assert_joined(&so, &d_out, rounds, pages);
    let o = run_with_input(&["inspect", dst_rec.to_str().unwrap(), "-c", "events all"], b"");
    let ev = stdout(&o);
    let moved_at = ev.lines().position(|l| l.contains("migrated from")).expect("a migration event");
    let dropped_after = ev.lines().skip(moved_at).filter(|l| l.contains("dropped (thinned")).count();
    let dropped_before = ev.lines().take(moved_at).filter(|l| l.contains("dropped (thinned")).count();
    assert!(dropped_before > 0 && dropped_after > 0, "thinning on both hosts: {dropped_before} / {dropped_after}\n{ev}");
    let o = run_with_input(&["verify", dst_rec.to_str().unwrap()], b"");
    assert_eq!(o.status.code(), Some(0), "verify: {}", stdout(&o));
    let o = run_with_input(&["replay", dst_rec.to_str().unwrap(), "-q"], b"");
    assert!(stderr(&o).contains("replay matches the recording"), "{}", stderr(&o));
}

#[test]
fn killing_the_destination_mid_transfer_leaves_the_source_running() {
    let tmp = tempfile::tempdir().unwrap();
    let (rounds, pages) = (300, 2000);
    let (mut dst, addr) = receive(&[]);
    let (src, sock) = source(None, tmp.path(), &churn_cmdline(rounds, pages), None);
    // 1 MB/s: the first round alone takes seconds.
    let m = std::thread::spawn(move || migrate(&sock, &addr, &["--bandwidth", "1M"]));
    std::thread::sleep(Duration::from_millis(1500));
    dst.kill();
    let (code, _, err) = m.join().unwrap();
    assert_eq!(code, 1, "migrate must fail: {err}");
    assert!(err.contains("migration failed") && err.contains("keeps running on the source"), "{err}");
    let (dc, _, _) = dst.finish(Duration::from_secs(5));
    assert_ne!(dc, 0);
    let (sc, so, se) = src.finish(Duration::from_secs(60));
    assert_eq!(sc, 0, "source: {se}");
    assert_eq!(rounds_in(&so), (0..rounds).collect::<Vec<_>>(), "the source ran every round itself");
    assert!(so.contains(&churn_check(rounds, pages)), "{so}");
}

/// Forwards one TCP connection to `to`, flipping one byte of the source's
/// stream at offset `flip`.
fn corrupting_proxy(to: String, flip: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = TcpStream::connect(&to).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
            let _ = a2.shutdown(std::net::Shutdown::Write);
        });
        let (mut a, mut b) = (a, b);
        let mut seen = 0usize;
        let mut buf = [0u8; 65536];
        loop {
            let n = match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (seen..seen + n).contains(&flip) {
                buf[flip - seen] ^= 0x10;
            }
            seen += n;
            if b.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = b.shutdown(std::net::Shutdown::Write);
    });
    addr
}

#[test]
fn a_corrupt_frame_is_a_clear_error_and_the_source_keeps_running() {
    let tmp = tempfile::tempdir().unwrap();
    let (rounds, pages) = (200, 1000);
    let (dst, addr) = receive(&[]);
    let proxy = corrupting_proxy(addr, 300_000);
    let (src, sock) = source(None, tmp.path(), &churn_cmdline(rounds, pages), None);
    let (code, _, err) = migrate(&sock, &proxy, &[]);
    assert_eq!(code, 1, "migrate must fail: {err}");
    assert!(err.contains("checksum mismatch"), "the destination's reason reaches the user: {err}");
    let (dc, _, de) = dst.finish(Duration::from_secs(10));
    assert_ne!(dc, 0);
    assert!(de.contains("corrupt frame: checksum mismatch"), "destination says why: {de}");
    assert!(!de.contains("panicked"), "{de}");
    let (sc, so, se) = src.finish(Duration::from_secs(60));
    assert_eq!(sc, 0, "source: {se}");
    assert_eq!(rounds_in(&so), (0..rounds).collect::<Vec<_>>());
    assert!(so.contains(&churn_check(rounds, pages)));
}

#[test]
fn protocol_version_mismatch_and_garbage_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A destination from the future: answers with version 99.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut hs = [0u8; 12];
        s.read_exact(&mut hs).unwrap();
        assert_eq!(&hs[..8], b"RVMIGRAT");
        s.write_all(b"RVMIGRAT").unwrap();
        s.write_all(&99u32.to_le_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    let (rounds, pages) = (120, 100);
    let (src, sock) = source(None, tmp.path(), &churn_cmdline(rounds, pages), None);
    let (code, _, err) = migrate(&sock, &addr, &[]);
    fake.join().unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("protocol version 99 is not supported"), "{err}");
    let (sc, so, _) = src.finish(Duration::from_secs(60));
    assert_eq!(sc, 0);
    assert!(so.contains(&churn_check(rounds, pages)));

    // Something that is not revirt talks to `revirt receive`.
    let (dst, addr) = receive(&[]);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (dc, _, de) = dst.finish(Duration::from_secs(10));
    assert_ne!(dc, 0);
    assert!(de.contains("not a revirt migration stream"), "{de}");

    // A migrate request to a VM without a control socket.
    let o = run_with_input(&["migrate", tmp.path().join("nope.sock").to_str().unwrap(), "--to", "127.0.0.1:1"], b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("was it started with --control"), "{}", stderr(&o));
}

#[test]
fn copy_disk_streams_the_disk_to_the_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.img");
    let bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&disk, &bytes).unwrap();
    let copy = tmp.path().join("copy.img");
    let (dst, addr) = receive(&["--disk", copy.to_str().unwrap()]);
    let img = demo_image();
    let sock = tmp.path().join("ctl.sock").display().to_string();
    let mut cmd = Command::new(bin());
    cmd.args(["run", img.to_str().unwrap(), "--disk", disk.to_str().unwrap(), "--cmdline", &churn_cmdline(150, 200), "--control", &sock]);
    let src = Proc::spawn(cmd);
    src.wait_for("churn: round 20\n", Duration::from_secs(60));
    let (code, _, err) = migrate(&sock, &addr, &["--copy-disk"]);
    assert_eq!(code, 0, "{err}");
    let (sc, _, se) = src.finish(Duration::from_secs(30));
    assert_eq!(sc, 0, "{se}");
    let (dc, d_out, de) = dst.finish(Duration::from_secs(60));
    assert_eq!(dc, 0, "{de}");
    assert!(d_out.contains(&churn_check(150, 200)));
    assert_eq!(std::fs::read(&copy).unwrap(), bytes, "the destination's disk is the source's");

    // Without --disk the receiver writes the stream to a private copy it
    // names itself, in its own directory: never the path the source names.
    let recv_dir = tmp.path().join("receiver");
    std::fs::create_dir(&recv_dir).unwrap();
    let recv_dir = recv_dir.canonicalize().unwrap();
    let private = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("revirt-disk-"))
            .collect()
    };
    let (dst, addr) = receive_with(Some(&recv_dir), &[]);
    let mut cmd = Command::new(bin());
    cmd.args(["run", img.to_str().unwrap(), "--disk", disk.to_str().unwrap(), "--cmdline", &churn_cmdline(500, 200), "--control", &sock]);
    let src = Proc::spawn(cmd);
    src.wait_for("churn: round 20\n", Duration::from_secs(60));
    let (code, _, err) = migrate(&sock, &addr, &["--copy-disk"]);
    assert_eq!(code, 0, "a streamed disk with no receive --disk: {err}");
    // While the guest runs here: the files the receiver holds open.
    let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{}/fd", dst.child.id()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect();
    assert!(!dst.stdout().contains("churn: rounds="), "the guest still runs at the destination");
    let copies = private(&recv_dir);
    assert_eq!(copies.len(), 1, "one private copy in the receiver's directory: {copies:?}");
    let copy = &copies[0];
    assert!(fds.contains(copy), "the guest's disk is the private copy {}: open files {fds:?}", copy.display());
    let src_disk = disk.canonicalize().unwrap();
    assert!(!fds.contains(&src_disk), "the receiver opened the source's disk path: {fds:?}");
    assert!(dst.stderr().contains(&format!("private copy, {}", copy.display())), "{}", dst.stderr());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(copy).unwrap().permissions().mode() & 0o777, 0o600);
    let (sc, _, se) = src.finish(Duration::from_secs(30));
    assert_eq!(sc, 0, "{se}");
    let (dc, d_out, de) = dst.finish(Duration::from_secs(60));
    assert_eq!(dc, 0, "{de}");
    assert!(d_out.contains(&churn_check(500, 200)), "{d_out}");
    assert_eq!(std::fs::read(copy).unwrap(), bytes, "the private copy holds the source's disk");

    // A streamed disk over the receiver's --max-disk is refused before any
    // file is made, and the source runs on.
    let (dst, addr) = receive_with(Some(&recv_dir), &["--max-disk", "1M"]);
    let mut cmd = Command::new(bin());
    cmd.args(["run", img.to_str().unwrap(), "--disk", disk.to_str().unwrap(), "--cmdline", &churn_cmdline(100, 50), "--control", &sock]);
    let src = Proc::spawn(cmd);
    src.wait_for("churn: round 20\n", Duration::from_secs(60));
    let (code, _, err) = migrate(&sock, &addr, &["--copy-disk"]);
    assert_eq!(code, 1);
    assert!(err.contains("--max-disk"), "{err}");
    let _ = dst.finish(Duration::from_secs(10));
    assert_eq!(private(&recv_dir).len(), 1, "no new file for a refused disk");
    let (sc, so, _) = src.finish(Duration::from_secs(60));
    assert_eq!(sc, 0);
    assert!(so.contains(&churn_check(100, 50)));
}

/// Two network namespaces joined by a veth pair: two "hosts".
struct Netns {
    a: String,
    b: String,
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(o.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
}

impl Netns {
    fn new() -> Netns {
        let tag = std::process::id() % 100000;
        let n = Netns { a: format!("rvA{tag}"), b: format!("rvB{tag}") };
        let (va, vb) = (format!("rva{tag}"), format!("rvb{tag}"));
        ip(&["netns", "add", &n.a]);
        ip(&["netns", "add", &n.b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &n.a]);
        ip(&["link", "set", &vb, "netns", &n.b]);
        ip(&["-n", &n.a, "addr", "add", "10.231.0.1/24", "dev", &va]);
        ip(&["-n", &n.b, "addr", "add", "10.231.0.2/24", "dev", &vb]);
        for (ns, dev) in [(&n.a, &va), (&n.b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        n
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

#[test]
fn migrates_between_network_namespaces() {
    let tmp = tempfile::tempdir().unwrap();
    let ns = Netns::new();
    let (rounds, pages) = (250, 1000);
    let (src_rec, dst_rec) = (tmp.path().join("src-rec"), tmp.path().join("dst-rec"));
    // Across a network: authenticated and encrypted with a shared key.
    let key = key_file(tmp.path(), "net.key", 1);
    let (dst, addr) = receive_in(Some(&ns.b), "10.231.0.2:0", &["-o", dst_rec.to_str().unwrap(), "--key-file", &key]);
    assert!(addr.starts_with("10.231.0.2:"), "{addr}");
    let (src, sock) = source(Some(&ns.a), tmp.path(), &churn_cmdline(rounds, pages), Some(&src_rec));
    // Without the key, the source refuses to send the guest over the network.
    let (code, _, err) = migrate(&sock, &addr, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("without a key") && err.contains("keeps running on the source"), "{err}");
    // The control socket is a file: `revirt migrate` runs outside both namespaces.
    let (code, json, err) = migrate(&sock, &addr, &["--key-file", &key]);
    assert_eq!(code, 0, "{err}");
    eprintln!("veth migration: downtime {:.1} ms", summary_field(&json, "downtime_ms"));
    let (sc, so, se) = src.finish(Duration::from_secs(30));
    assert_eq!(sc, 0, "{se}");
    let (dc, d_out, de) = dst.finish(Duration::from_secs(60));
    assert_eq!(dc, 0, "{de}");
    assert_joined(&so, &d_out, rounds, pages);
    let o = run_with_input(&["replay", dst_rec.to_str().unwrap(), "-q"], b"");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn auto_converge_throttles_a_guest_that_outruns_the_link() {
    let tmp = tempfile::tempdir().unwrap();
    // ~1.2 GB/s of dirtying against a 40 MB/s link: pre-copy alone never converges.
    let (rounds, pages) = (400, 3000);
    let (dst, addr) = receive(&[]);
    let (src, sock) = source(None, tmp.path(), &churn_cmdline(rounds, pages), None);
    let (code, json, err) = migrate(&sock, &addr, &["--bandwidth", "40M"]);
    assert_eq!(code, 0, "{err}\nsource: {}", src.stderr());
    assert!(err.contains("auto-converge: the guest dirties memory faster than it can be sent"), "{err}");
    assert!(summary_field(&json, "max_throttle") >= 20.0, "{json}");
    let (sc, so, se) = src.finish(Duration::from_secs(30));
    assert_eq!(sc, 0, "{se}");
    let (dc, d_out, de) = dst.finish(Duration::from_secs(120));
    assert_eq!(dc, 0, "{de}");
    assert_joined(&so, &d_out, rounds, pages);

    // Without auto-converge the rounds stop making progress and the copy
    // stops anyway (a longer downtime), still exact.
    let (dst, addr) = receive(&[]);
    let (src, sock) = source(None, tmp.path(), &churn_cmdline(rounds, pages), None);
    let (code, json, err) = migrate(&sock, &addr, &["--bandwidth", "40M", "--no-auto-converge"]);
    assert_eq!(code, 0, "{err}\nsource: {}", src.stderr());
    assert!(err.contains("no progress for 2 rounds"), "{err}");
    assert_eq!(summary_field(&json, "max_throttle"), 0.0);
    let (sc, so, _) = src.finish(Duration::from_secs(30));
    assert_eq!(sc, 0);
    let (dc, d_out, de) = dst.finish(Duration::from_secs(120));
    assert_eq!(dc, 0, "{de}");
    assert_joined(&so, &d_out, rounds, pages);
}

#[test]
fn a_guest_that_powers_off_during_the_migration_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut dst, addr) = receive(&[]);
    // 50 more rounds (0.5 s) against a 2 MB/s link: the guest is done first.
    let (src, sock) = source(None, tmp.path(), &churn_cmdline(70, 2000), None);
    let (code, _, err) = migrate(&sock, &addr, &["--bandwidth", "2M"]);
    assert_eq!(code, 1);
    assert!(err.contains("the guest powered off (status 0) before the migration finished"), "{err}");
    let (sc, so, _) = src.finish(Duration::from_secs(30));
    assert_eq!(sc, 0);
    assert!(so.contains(&churn_check(70, 2000)));
    dst.kill();
    let _ = dst.finish(Duration::from_secs(5));
}

#[test]
fn step_and_pmu_sim_recordings_move_mid_race_and_replay_exactly() {
    for clock in ["step", "pmu-sim"] {
        moves_mid_race(clock);
    }
}

/// Interrupts land between exits with these clocks (branch counts): the
/// move happens inside such a stretch and the ExecPoints after it still line up.
fn moves_mid_race(clock: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (src_rec, dst_rec) = (tmp.path().join("src-rec"), tmp.path().join("dst-rec"));
    let (dst, addr) = receive(&["-o", dst_rec.to_str().unwrap()]);
    let img = demo_image();
    let sock = tmp.path().join("ctl.sock").display().to_string();
    let mut cmd = Command::new(bin());
    cmd.args(["record", img.to_str().unwrap(), "-o", src_rec.to_str().unwrap(), "--clock", clock])
        .args(["--checkpoint-every", "300ms", "--cmdline", "workload=race iters=400 hz=1000", "--control", &sock]);
    let src = Proc::spawn(cmd);
    src.wait_for("workload=race", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(800));
    let (code, _, err) = migrate(&sock, &addr, &[]);
    assert_eq!(code, 0, "{err}\nsource: {}", src.stderr());
    let (sc, _, se) = src.finish(Duration::from_secs(30));
    assert_eq!(sc, 0, "{se}");
    let (dc, d_out, de) = dst.finish(Duration::from_secs(120));
    assert_eq!(dc, 0, "{de}");
    assert!(d_out.contains("race: counter="), "the race finished at the destination: {d_out}");
    let o = run_with_input(&["replay", dst_rec.to_str().unwrap(), "-q"], b"");
    assert_eq!(o.status.code(), Some(0), "{clock}: {}", stderr(&o));
    // And with the other exact clock (the pmu-sim recording by stepping, and vice versa).
    let other = if clock == "step" { "pmu-sim" } else { "step" };
    let o = run_with_input(&["replay", dst_rec.to_str().unwrap(), "-q", "--clock", other], b"");
    assert_eq!(o.status.code(), Some(0), "{clock} recording replayed with {other}: {}", stderr(&o));
    let o = run_with_input(&["inspect", dst_rec.to_str().unwrap(), "-c", "events all"], b"");
    let events = stdout(&o);
    let mig = events.lines().position(|l| l.contains("migrated from")).expect("a Migrated event");
    assert!(
        events.lines().skip(mig).any(|l| l.contains("timer") && !l.contains("+ 0 branches")),
        "timer interrupts between exits after the move:\n{events}"
    );
}

#[test]
fn a_received_vm_moves_on_again_and_its_recording_follows() {
    // A -> B -> C: B received the VM (continuing its recording) and is asked
    // to move it on; C ends up with one recording that replays from A's boot.
    let tmp = tempfile::tempdir().unwrap();
    let (rounds, pages) = (300, 500);
    let (rec_a, rec_b, rec_c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    let sock_b = tmp.path().join("b.sock").display().to_string();
    let (c, addr_c) = receive(&["-o", rec_c.to_str().unwrap()]);
    let (b, addr_b) = receive(&["-o", rec_b.to_str().unwrap(), "--control", &sock_b]);
    let (a, sock_a) = source(None, tmp.path(), &churn_cmdline(rounds, pages), Some(&rec_a));
    let (code, _, err) = migrate(&sock_a, &addr_b, &[]);
    assert_eq!(code, 0, "A -> B: {err}");
    b.wait_for("churn: round ", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let (code, _, err) = migrate(&sock_b, &addr_c, &[]);
    assert_eq!(code, 0, "B -> C: {err}");
    let (ac, a_out, ae) = a.finish(Duration::from_secs(30));
    assert_eq!(ac, 0, "{ae}");
    let (bc, b_out, be) = b.finish(Duration::from_secs(30));
    assert_eq!(bc, 0, "{be}");
    assert!(be.contains("migrated to"), "B reports moving the VM on: {be}");
    let (cc, c_out, ce) = c.finish(Duration::from_secs(60));
    assert_eq!(cc, 0, "{ce}");
    assert!(!rounds_in(&b_out).is_empty(), "the VM ran on B for a while");
    assert_joined(&format!("{a_out}{b_out}"), &c_out, rounds, pages);
    let console = std::fs::read_to_string(rec_c.join("console.log")).unwrap();
    assert_eq!(console, format!("{a_out}{b_out}{c_out}"));
    let o = run_with_input(&["replay", rec_c.to_str().unwrap(), "-q"], b"");
    assert_eq!(o.status.code(), Some(0), "the twice-moved recording replays: {}", stderr(&o));
    let o = run_with_input(&["inspect", rec_c.to_str().unwrap(), "-c", "events all"], b"");
    assert_eq!(stdout(&o).lines().filter(|l| l.contains("migrated from")).count(), 2, "{}", stdout(&o));
}

/// A key file (mode 600) with `seed`-derived bytes.
fn key_file(dir: &Path, name: &str, seed: u8) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(seed.wrapping_mul(101))).collect();
    std::fs::write(&p, bytes).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.display().to_string()
}

#[derive(Clone, Copy, Debug)]
enum Mangle {
    Replay,
    Reorder,
    Truncate,
}

/// Forwards one keyed session to `to`, passing the handshake, then
/// replaying, reordering or cutting the source's frame number `at`.
fn frame_proxy(to: String, at: usize, how: Mangle) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut a, _) = l.accept().unwrap();
        let mut b = TcpStream::connect(&to).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
            let _ = a2.shutdown(std::net::Shutdown::Write);
        });
        let mut hs = [0u8; 45];
        if a.read_exact(&mut hs).is_err() || b.write_all(&hs).is_err() {
            return;
        }
        let mut held: Option<Vec<u8>> = None;
        for k in 0.. {
            let mut f = vec![0u8; 5];
            if a.read_exact(&mut f).is_err() {
                break;
            }
            let len = u32::from_le_bytes(f[1..5].try_into().unwrap()) as usize;
            f.resize(5 + len, 0);
            if a.read_exact(&mut f[5..]).is_err() {
                break;
            }
            let out: Vec<u8> = match how {
                Mangle::Replay if k == at => [f.clone(), f].concat(),
                Mangle::Reorder if k == at => {
                    held = Some(f);
                    continue;
                }
                Mangle::Reorder if k == at + 1 => [f, held.take().unwrap()].concat(),
                Mangle::Truncate if k == at => {
                    let _ = b.write_all(&f[..f.len() / 2]);
                    break;
                }
                _ => f,
            };
            if b.write_all(&out).is_err() {
                break;
            }
        }
        let _ = b.shutdown(std::net::Shutdown::Write);
        // Keep the source's side open until the destination has had its say.
        std::thread::sleep(Duration::from_secs(3));
    });
    addr
}

/// One refused migration: `revirt receive` with `recv` flags, `revirt
/// migrate` with `mig` flags (to the proxy `via` makes of the receiver's
/// address, if any). Both must fail, each saying `want` (receiver: `want_dst`).
fn refused(sock: &str, recv: &[&str], mig: &[&str], via: Option<&dyn Fn(String) -> String>, want: &str, want_dst: &str) {
    let (dst, addr) = receive(recv);
    let to = match via {
        Some(f) => f(addr),
        None => addr,
    };
    let (code, _, err) = migrate(sock, &to, mig);
    assert_eq!(code, 1, "migrate must fail: {err}");
    assert!(err.contains(want) && err.contains("keeps running on the source"), "migrate should say {want:?}: {err}");
    let (dc, _, de) = dst.finish(Duration::from_secs(15));
    assert_ne!(dc, 0, "receive must fail: {de}");
    assert!(de.contains(want_dst), "receive should say {want_dst:?}: {de}");
    assert!(!de.contains("panicked") && !err.contains("panicked"));
}

#[test]
fn hostile_peers_and_mangled_streams_are_refused_and_the_source_keeps_running() {
    let tmp = tempfile::tempdir().unwrap();
    let (k1, k2) = (key_file(tmp.path(), "a.key", 1), key_file(tmp.path(), "b.key", 2));
    let (rounds, pages) = (2500, 500);
    // The source VM has a disk: a host path it names in its hello.
    let disk = tmp.path().join("secret.img");
    let secret: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7) as u8).collect();
    std::fs::write(&disk, &secret).unwrap();
    let sock = tmp.path().join("ctl.sock").display().to_string();
    let mut cmd = Command::new(bin());
    cmd.args(["run", demo_image().to_str().unwrap(), "--disk", disk.to_str().unwrap(), "--cmdline", &churn_cmdline(rounds, pages), "--control", &sock]);
    let src = Proc::spawn(cmd);
    src.wait_for("churn: round 20\n", Duration::from_secs(60));
    let own = tmp.path().join("own.img");
    std::fs::write(&own, &secret).unwrap();
    let own_disk = own.to_str().unwrap();

    // A wrong key.
    refused(&sock, &["--key-file", &k2, "--disk", own_disk], &["--key-file", &k1], None, "different --key-file", "different --key-file");
    // A key on one side only.
    refused(&sock, &["--key-file", &k2, "--disk", own_disk], &[], None, "uses a key", "has no key");
    // Frames replayed, reordered, cut short in transit (frame 3 is guest memory).
    let replay = |a: String| frame_proxy(a, 3, Mangle::Replay);
    refused(&sock, &["--key-file", &k1, "--disk", own_disk], &["--key-file", &k1], Some(&replay), "frame 4 fails authentication", "frame 4 fails authentication");
    let reorder = |a: String| frame_proxy(a, 3, Mangle::Reorder);
    refused(&sock, &["--key-file", &k1, "--disk", own_disk], &["--key-file", &k1], Some(&reorder), "frame 3 fails authentication", "frame 3 fails authentication");
    let cut = |a: String| frame_proxy(a, 3, Mangle::Truncate);
    refused(&sock, &["--key-file", &k1, "--disk", own_disk], &["--key-file", &k1], Some(&cut), "truncated stream", "truncated stream");
    // The peer names a host path as the disk: never opened.
    refused(&sock, &["--key-file", &k1], &["--key-file", &k1], None, "never opens a path the peer names", "never opens a path the peer names");
    // More memory than the receiver allows.
    refused(&sock, &["--key-file", &k1, "--disk", own_disk, "--max-mem", "32M"], &["--key-file", &k1], None, "at most 32 MiB (--max-mem)", "--max-mem");
    // A source slower than the receiver's time budget (1 MB/s: round 1 alone takes seconds).
    refused(&sock, &["--key-file", &k1, "--disk", own_disk, "--max-time", "1s"], &["--key-file", &k1, "--bandwidth", "1M"], None, "--max-time", "--max-time");
    // A non-loopback destination without a key: refused before connecting.
    let (code, _, err) = migrate(&sock, "192.0.2.1:4444", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("refusing to connect to 192.0.2.1:4444 without a key"), "{err}");

    // After all that, the source still runs, and a proper keyed move works.
    assert!(!src.stdout().contains("churn: rounds="), "the workload outlasted the refusals");
    let (dst, addr) = receive(&["--key-file", &k1, "--disk", own_disk]);
    let (code, _, err) = migrate(&sock, &addr, &["--key-file", &k1]);
    assert_eq!(code, 0, "{err}");
    let (sc, so, se) = src.finish(Duration::from_secs(30));
    assert_eq!(sc, 0, "{se}");
    let (dc, d_out, de) = dst.finish(Duration::from_secs(120));
    assert_eq!(dc, 0, "{de}");
    assert_joined(&so, &d_out, rounds, pages);
    assert_eq!(std::fs::read(&disk).unwrap(), secret, "the source's disk is untouched");
}

#[test]
fn receive_refuses_open_addresses_without_a_key_and_never_replaces_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run_with_input(&["receive", "--listen", "0.0.0.0:0"], b"");
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("refusing to listen on 0.0.0.0:0 without a key"), "{}", stderr(&o));
    // A key readable by others is refused.
    let loose = tmp.path().join("loose.key");
    std::fs::write(&loose, [7u8; 32]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run_with_input(&["receive", "--listen", "0.0.0.0:0", "--key-file", loose.to_str().unwrap()], b"");
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("readable by others"), "{}", stderr(&o));
    // --insecure says the user means it (it then listens; not started here).

    // A socket path that holds a regular file: refused, the file kept.
    let f = tmp.path().join("important.txt");
    std::fs::write(&f, b"keep me").unwrap();
    let o = run_with_input(&["receive", "--listen", &format!("unix:{}", f.display())], b"");
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("is not a socket"), "{}", stderr(&o));
    let o = run_with_input(&["run", demo_image().to_str().unwrap(), "--cmdline", "workload=compute iters=1", "--control", f.to_str().unwrap()], b"");
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("is not a socket"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&f).unwrap(), b"keep me");
    // A stale socket (nobody listening) is replaced.
    let stale = tmp.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let (dst, addr) = receive_in(None, &format!("unix:{}", stale.display()), &[]);
    assert_eq!(addr, format!("unix:{}", stale.display()));
    drop(dst);
}
