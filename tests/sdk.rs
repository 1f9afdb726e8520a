//! The guest SDK on real KVM: third-party C code (zlib, Lua) built with it
//! runs in the guest with the same output as the same code on the host,
//! records and replays exactly, and the real gdb stops in its functions at
//! their source lines and reverse-continues; a program written from
//! docs/guest-sdk.md alone builds and records; forbidden instructions are
//! refused at build time.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// guests/programs/out, built once per test process (make is incremental;
/// it fetches zlib's and Lua's sources with scripts/third-party.sh if needed).
fn programs() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let o = Command::new("make")
            .args(["-s", "-C"])
            .arg(root().join("guests/programs"))
            .output()
            .expect("run make");
        assert!(
            o.status.success(),
            "building guests/programs failed (scripts/deps.sh installs what it needs):\n{}",
            stderr(&o)
        );
        root().join("guests/programs/out")
    })
}

/// `data` written to `path`, zero-padded to whole 512-byte sectors (a disk).
fn disk(path: &Path, data: &[u8]) {
    let mut d = data.to_vec();
    d.resize(data.len().div_ceil(512) * 512, 0);
    std::fs::write(path, d).unwrap();
}

/// Text-like data that compresses to about a third: words from a small
/// vocabulary picked by an LCG.
fn zdata(len: usize) -> Vec<u8> {
    let words = [
        "replay ", "record ", "guest ", "kvm ", "exit ", "timer ", "serial\n", "disk ", "0x1f ",
        "zlib ",
    ];
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(words[(x >> 60) as usize % words.len()].as_bytes());
        if (x >> 20) & 7 == 0 {
            out.extend_from_slice(&x.to_le_bytes()); // some incompressible bytes
        }
    }
    out.truncate(len);
    out
}

fn host(prog: &str, args: &[&str]) -> String {
    let o = Command::new(programs().join(prog))
        .args(args)
        .output()
        .expect("run host program");
    assert!(
        o.status.success(),
        "{prog} failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// `revirt record IMAGE ARGS -o DIR`; must power off with status 0.
fn record(image: &Path, dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut a = vec![
        "record",
        image.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
    ];
    a.extend_from_slice(args);
    let o = run_with_input(&a, stdin);
    assert!(
        o.status.success(),
        "record failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    o
}

/// Replays `dir`; the replay must match and print the same console output.
fn replay_matches(dir: &Path, console: &str) {
    let o = run_with_input(&["replay", dir.to_str().unwrap()], b"");
    assert!(o.status.success(), "replay failed: {}", stderr(&o));
    assert!(
        stderr(&o).contains("replay matches the recording"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        stdout(&o),
        console,
        "the replay's console differs from the recording's"
    );
}

#[test]
fn zlib_in_the_guest_matches_the_hosts_zlib_and_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let data = zdata(300_000);
    let file = tmp.path().join("data.bin");
    disk(&file, &data);
    let host_out = host(
        "zdemo-host",
        &[file.to_str().unwrap(), "bytes=300000", "level=9"],
    );
    // Sanity of the host side itself: the input's size and a compressed size.
    assert!(host_out.contains("input bytes=300000 "), "{host_out}");
    assert!(host_out.contains("round trip ok"), "{host_out}");

    let rec = tmp.path().join("rec");
    let o = record(
        &programs().join("zdemo.img"),
        &rec,
        &[
            "--disk",
            file.to_str().unwrap(),
            "--cmdline",
            "bytes=300000 level=9",
        ],
        b"",
    );
    assert_eq!(stdout(&o), host_out, "guest zlib vs host zlib");
    replay_matches(&rec, &host_out);

    // Made-up input, no disk (the form QEMU runs too: scripts/bench-sdk.sh).
    let o = run_with_input(
        &[
            "run",
            programs().join("zdemo.img").to_str().unwrap(),
            "--cmdline",
            "gen=50000",
        ],
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), host("zdemo-host", &["gen=50000"]));
}

#[test]
fn lua_in_the_guest_matches_the_host_and_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let script = root().join("guests/programs/lua/sample.lua");
    let file = tmp.path().join("script.disk");
    disk(&file, &std::fs::read(&script).unwrap());
    let host_out = host("luademo-host", &[script.to_str().unwrap()]);
    assert!(host_out.contains("fib(25) =\t75025"), "{host_out}");
    assert!(host_out.contains("gc ok\ttrue"), "{host_out}");

    let rec = tmp.path().join("rec");
    let o = record(
        &programs().join("luademo.img"),
        &rec,
        &["--disk", file.to_str().unwrap()],
        b"",
    );
    assert_eq!(stdout(&o), host_out, "guest Lua vs host Lua");
    replay_matches(&rec, &host_out);

    // A script on the command line.
    let code = "print(string.format('%.14g', math.pi * 1e5), #('x'):rep(1000), 7 // 2)";
    let o = run_with_input(
        &[
            "run",
            programs().join("luademo.img").to_str().unwrap(),
            &format!("--cmdline=-e {code}"),
        ],
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), host("luademo-host", &["-e", code]));
}

type Server = GdbServer;

fn serve(rec: &Path) -> Server {
    serve_at(rec, 0)
}

/// The server, starting at guest-caused exit `at` (`revirt gdb --at`).
fn serve_at(rec: &Path, at: u64) -> Server {
    gdb_server(rec, &["--at", &at.to_string()])
}

/// The real gdb in batch mode against the server, with `image`'s symbols.
fn gdb(port: u16, image: &Path, cmds: &[&str]) -> String {
    gdb_batch(port, image, Some(&root().join("guests/programs")), &["set confirm off"], cmds)
}

/// The 1-based number of the first line containing `needle` after the last
/// line containing `anchor` (a function's header) in `file`.
fn line_after(file: &Path, anchor: &str, needle: &str) -> usize {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .rposition(|l| l.contains(anchor))
        .unwrap_or_else(|| panic!("{anchor:?}"));
    start
        + 1
        + lines[start..]
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?}"))
}

/// Values printed as `KEY=<n>` lines by gdb's printf, in order.
fn values(out: &str, key: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('=')?.trim().parse().ok())
        .collect()
}

#[test]
fn gdb_stops_in_zlib_at_its_source_line_and_reverse_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("data.bin");
    // Small: `continue` single-steps while a breakpoint is set.
    disk(&file, &zdata(4096));
    let rec = tmp.path().join("rec");
    let img = programs().join("zdemo.img");
    record(
        &img,
        &rec,
        &[
            "--disk",
            file.to_str().unwrap(),
            "--cmdline",
            "bytes=4096 level=1",
        ],
        b"",
    );

    // crc32_z runs first as crc32(0, NULL, 0), then over the input.
    let src = root().join("guests/third_party/zlib/crc32.c");
    let line = line_after(
        &src,
        "unsigned long ZEXPORT crc32_z(",
        "if (buf == Z_NULL) return 0;",
    );
    let server = serve(&rec);
    let out = gdb(
        server.port,
        &img,
        &[
            &format!("break crc32.c:{line}"),
            "continue",
            "printf \"LEN=%lu\\n\", len",
            "continue",
            "printf \"LEN=%lu\\n\", len",
            "bt",
            // Our target description: segment bases and system registers.
            "printf \"FSBASE=%lu\\n\", $fs_base",
            "printf \"TLS=%lu\\n\", &tls_block",
            "printf \"CR3=%lu\\n\", $cr3",
            "printf \"EFER=%lu\\n\", $efer",
            "reverse-continue",
            "printf \"LEN=%lu\\n\", len",
        ],
    );
    let at = format!("crc32.c:{line}");
    assert!(out.contains("Breakpoint 1, crc32_z"), "{out}");
    assert!(out.matches(&at).count() >= 3, "stops at {at}: {out}");
    assert_eq!(
        values(&out, "LEN"),
        vec![0, 4096, 0],
        "forward twice, then back to the first: {out}"
    );
    assert!(
        out.contains(" main (") && out.contains("zdemo.c:"),
        "called from main: {out}"
    );
}

#[test]
fn gdb_stops_in_lua_at_its_source_line_and_reverse_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("rec");
    let img = programs().join("luademo.img");
    // os.clock() reads the clock port: a recorded exit just after Lua's
    // start-up, where the session starts (`continue` single-steps while a
    // breakpoint is set, so starting at boot would step all of Lua's start-up).
    let o = record(
        &img,
        &rec,
        &["--cmdline=-e local t = os.clock() print(('abc'):reverse(), ('hello!'):reverse())"],
        b"",
    );
    assert_eq!(stdout(&o), "cba\t!olleh\n");
    let ev = run_with_input(&["inspect", rec.to_str().unwrap(), "-c", "events"], b"");
    let at: u64 = stdout(&ev)
        .lines()
        .rfind(|l| l.contains("clock read"))
        .and_then(|l| {
            l.split("exit ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no clock read in the events: {}", stdout(&ev)));
    assert!(at > 0, "{}", stdout(&ev));

    let src = root().join("guests/third_party/lua/src/lstrlib.c");
    let line = line_after(
        &src,
        "static int str_reverse (",
        "luaL_buffinitsize(L, &b, l)",
    );
    let server = serve_at(&rec, at);
    let out = gdb(
        server.port,
        &img,
        &[
            &format!("break lstrlib.c:{line}"),
            "continue",
            "printf \"L=%lu\\n\", l",
            "continue",
            "printf \"L=%lu\\n\", l",
            "reverse-continue",
            "printf \"L=%lu\\n\", l",
            "bt 3",
        ],
    );
    let at = format!("lstrlib.c:{line}");
    assert!(out.contains("Breakpoint 1, str_reverse"), "{out}");
    assert!(out.matches(&at).count() >= 3, "stops at {at}: {out}");
    assert_eq!(
        values(&out, "L"),
        vec![3, 6, 3],
        "forward twice, then back to the first: {out}"
    );
    assert!(
        out.contains("luaD_precall") || out.contains("luaV_execute"),
        "called by the Lua VM: {out}"
    );
}

/// The worked example of docs/guest-sdk.md, as a newcomer would type it:
/// it must build with the documented command and record and replay.
#[test]
fn a_program_written_from_the_docs_builds_and_records() {
    let tmp = tempfile::tempdir().unwrap();
    let prog = tmp.path().join("notes.c");
    std::fs::write(
        &prog,
        r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <revirt.h>

/* Reads a name from the serial console and the first sector of the disk,
   then answers with a greeting, a checksum and the time it took. */
int main(int argc, char **argv)
{
    uint64_t t0 = rv_clock_ns();
    char name[64];
    printf("name? ");
    fflush(stdout);
    if (!fgets(name, sizeof name, stdin))
        return 1;
    name[strcspn(name, "\n")] = 0;

    unsigned char *sector = malloc(RV_SECTOR);
    if (rv_disk_sectors() == 0 || rv_disk_read(0, sector, 1) != RV_DISK_OK) {
        printf("no disk\n");
        return 2;
    }
    unsigned sum = 0;
    for (int i = 0; i < RV_SECTOR; i++)
        sum = sum * 31 + sector[i];
    printf("hello %s: %d args, sector 0 sum %08x, %s\n", name, argc, sum,
           (char *)sector);
    free(sector);
    printf("took %llu ns\n", (unsigned long long)(rv_clock_ns() - t0));
    return 0;
}
"#,
    )
    .unwrap();
    let img = tmp.path().join("notes.img");
    let o = Command::new("make")
        .args(["-C"])
        .arg(root().join("guests/sdk"))
        .arg(format!("PROG={}", prog.display()))
        .arg(format!("OUT={}", img.display()))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "build failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    // The PVH note for QEMU is there too.
    let notes = Command::new("readelf")
        .arg("-n")
        .arg(&img)
        .output()
        .unwrap();
    assert!(stdout(&notes).contains("Xen"), "{}", stdout(&notes));

    let d = tmp.path().join("disk.img");
    disk(&d, b"a note on the disk\0");
    let rec = tmp.path().join("rec");
    let o = record(
        &img,
        &rec,
        &["--disk", d.to_str().unwrap(), "--cmdline", "one two"],
        b"ada\n",
    );
    let out = stdout(&o);
    let mut sum: u32 = 0;
    let mut sector = b"a note on the disk\0".to_vec();
    sector.resize(512, 0);
    for b in &sector {
        sum = sum.wrapping_mul(31).wrapping_add(u32::from(*b));
    }
    assert!(
        out.starts_with(&format!(
            "name? hello ada: 3 args, sector 0 sum {sum:08x}, a note on the disk\ntook "
        )),
        "{out}"
    );
    replay_matches(&rec, &out);
}

#[test]
fn the_build_refuses_instructions_that_cannot_be_replayed() {
    let tmp = tempfile::tempdir().unwrap();
    for (insn, src) in [
        ("rdtsc", "unsigned long long f(void) { unsigned a, d; asm volatile(\"rdtsc\" : \"=a\"(a), \"=d\"(d)); return a; }"),
        ("syscall", "long f(void) { long r; asm volatile(\"syscall\" : \"=a\"(r) : \"a\"(39) : \"rcx\", \"r11\"); return r; }"),
        ("cpuid", "unsigned f(void) { unsigned a = 0, b, c = 0, d; asm volatile(\"cpuid\" : \"+a\"(a), \"=b\"(b), \"+c\"(c), \"=d\"(d)); return b; }"),
        ("int", "void f(void) { asm volatile(\"int $0x80\"); }"),
    ] {
        let prog = tmp.path().join(format!("{insn}.c"));
        std::fs::write(&prog, format!("{src}\nint main(void) {{ f(); return 0; }}\n")).unwrap();
        let img = tmp.path().join(format!("{insn}.img"));
        let o = Command::new(root().join("guests/sdk/rvcc")).arg("-o").arg(&img).arg(&prog).output().unwrap();
        let err = stderr(&o);
        assert!(!o.status.success(), "{insn} was accepted");
        assert!(err.contains("refusing") && err.contains(&format!("<f>: {insn}")), "{insn}: {err}");
        assert!(!img.exists(), "the refused image was left behind");
    }
}

/// `revirt debug REC`: server and gdb in one step, with the recording's
/// image symbols and source lines (here: the demo guest).
#[test]
fn revirt_debug_starts_gdb_connected_with_the_images_symbols() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("rec");
    record_demo_ok(&rec, "workload=compute iters=1000", &[], b"");
    let o = run_with_input(
        &[
            "debug",
            rec.to_str().unwrap(),
            "--",
            "-batch",
            "-ex",
            "break wl_compute",
            "-ex",
            "continue",
            "-ex",
            "printf \"ITERS=%lu\\n\", iters",
        ],
        b"",
    );
    let out = format!("{}{}", stdout(&o), stderr(&o));
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("Breakpoint 1, wl_compute (iters=1000) at compute.c:"),
        "{out}"
    );
    assert!(out.contains("ITERS=1000"), "{out}");

    let o = run_with_input(
        &["debug", rec.to_str().unwrap(), "--gdb", "/nonexistent/gdb"],
        b"",
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cannot start /nonexistent/gdb"),
        "{}",
        stderr(&o)
    );
}

/// Two preemptive tasks computing in floating point at 1 kHz: the timer's
/// task switch saves and restores the x87/SSE state (a lost register would
/// change the sums), and setjmp/longjmp and assert work; records and replays.
#[test]
fn sdk_tasks_keep_their_fpu_state_across_switches_and_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("tasks.img");
    let o = Command::new(root().join("guests/sdk/rvcc"))
        .arg("-o")
        .arg(&img)
        .arg(root().join("guests/sdk/examples/tasks.c"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let sum = |w: f64| (1..=2_000_000).fold(0.0f64, |s, i| s + 1.0 / ((i as f64) * (i as f64) + w));
    let expected = format!(
        "tasks: sum0={:.12} sum1={:.12} ticks>0=1\ntasks: longjmp returned 42\n",
        sum(0.0),
        sum(1.0)
    );
    let rec = tmp.path().join("rec");
    let o = record(&img, &rec, &[], b"");
    assert_eq!(stdout(&o), expected);
    replay_matches(&rec, &expected);
}
