//! `--serial tcp:HOST:PORT` with a real socket: the guest's console is the
//! first client of a listening socket (like QEMU's `-serial tcp::PORT,server`),
//! what the client sends is recorded as serial input, and an attack that comes
//! in over the socket replays without it.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Starts revirt with `--serial tcp:127.0.0.1:0` and connects to the port it prints.
fn start(args: &[&str]) -> (Child, TcpStream) {
    let mut child = revirt()
        .args(args)
        .args(["--serial", "tcp:127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn revirt");
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("[revirt] {line}");
            if let Some(rest) = line.split("serial console on tcp ").nth(1) {
                let _ = tx.send(rest.split(':').nth(1).unwrap().parse::<u16>().unwrap());
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("no serial port printed");
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the serial port");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    (child, s)
}

/// Reads from the socket until `want` has arrived (or the peer closes).
fn read_until(s: &mut TcpStream, want: &str) -> String {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&got).contains(want) && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "reading the serial socket: {e}; so far {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn echo_over_a_socket_is_recorded_as_serial_input_and_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = tmp.path().join("rec");
    let img = demo_image();
    let (mut child, mut s) = start(&[
        "record",
        img.to_str().unwrap(),
        "--cmdline",
        "workload=echo",
        "-o",
        rec.to_str().unwrap(),
    ]);
    assert!(read_until(&mut s, "echo: ready\n").contains("echo: ready\n"));
    s.write_all(b"over the wire\n").unwrap();
    assert!(read_until(&mut s, "echo: over the wire\n").ends_with("echo: over the wire\n"));
    s.write_all(b"quit\n").unwrap();
    let tail = read_until(&mut s, "echo: bye\n");
    assert!(tail.contains("echo: bye\n"), "{tail}");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let expected = "revirt-demo: workload=echo\necho: ready\necho: over the wire\necho: bye\n";
    assert_eq!(out, expected, "stdout echoes the console too");

    // No socket now: the input comes from the log.
    let o = run_with_input(&["replay", rec.to_str().unwrap()], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), expected);
    let o = run_with_input(&["inspect", rec.to_str().unwrap(), "-c", "events"], b"");
    assert!(
        stdout(&o).contains("over the wire"),
        "the bytes are in the log as serial input: {}",
        stdout(&o)
    );
}

#[test]
fn the_vuln_exploit_comes_in_over_the_socket() {
    let img = demo_image();
    let (mut child, mut s) = start(&["run", img.to_str().unwrap(), "--cmdline", "workload=vuln"]);
    assert!(read_until(&mut s, "vuln: name?\n").contains("vuln: name?"));
    let mut payload = vec![b'0'; 56];
    payload.extend_from_slice(&0x200000u64.to_le_bytes());
    payload.push(b'\n');
    s.write_all(&payload).unwrap();
    let out = read_until(&mut s, "PWNED - backdoor reached\n");
    assert!(out.contains("vuln: PWNED - backdoor reached"), "{out}");
    assert_eq!(child.wait().unwrap().code(), Some(66));
}

#[test]
fn a_bad_serial_spec_is_a_clear_error() {
    for (spec, want) in [
        ("udp:1.2.3.4:5", "must be tcp:HOST:PORT"),
        ("tcp:localhost:http", "bad port"),
        ("tcp:nohost", "expected tcp:HOST:PORT"),
    ] {
        let o = run_with_input(
            &["run", demo_image().to_str().unwrap(), "--serial", spec],
            b"",
        );
        assert_eq!(o.status.code(), Some(2), "{spec}");
        assert!(stderr(&o).contains(want), "{spec}: {}", stderr(&o));
    }
}
