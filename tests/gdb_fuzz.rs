//! The GDB server against hostile clients: random, malformed, oversized and
//! truncated RSP input with abrupt disconnects. The server must survive all
//! of it and then serve a real gdb normally, bound to 127.0.0.1.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::Duration;

use revirt::vmm::counter::Skid;

fn framed(body: &[u8], good_sum: bool) -> Vec<u8> {
    let sum = body.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    let mut v = vec![b'$'];
    v.extend_from_slice(body);
    v.extend_from_slice(format!("#{:02x}", if good_sum { sum } else { sum ^ 0x5a }).as_bytes());
    v
}

fn random_packet(rng: &mut Skid) -> Vec<u8> {
    const HEADS: &[&str] = &[
        "m", "M", "g", "G", "p", "P", "Z0,", "Z1,", "Z2,", "Z3,", "Z4,", "z0,", "z2,", "vCont;s", "vCont;c", "vCont?",
        "qRcmd,", "bs", "bc", "Hg", "Hc", "qSupported:", "qXfer:features:read:target.xml:", "s", "c", "?", "X", "vFile:", "qC",
        "T", "D", "k",
    ];
    let head = HEADS[rng.next(HEADS.len() as u64 - 1) as usize];
    let mut body = head.as_bytes().to_vec();
    let tail_len = match rng.next(9) {
        0 => 70_000, // oversized
        1..=3 => rng.next(8) as usize,
        _ => rng.next(64) as usize,
    };
    for _ in 0..tail_len {
        let pool = b"0123456789abcdefABCDEF,:;#$}*-xyz\x00\xff";
        body.push(pool[rng.next(pool.len() as u64 - 1) as usize]);
    }
    match rng.next(9) {
        0 => body, // raw, unframed noise
        1 => framed(&body, false),
        2 => {
            let mut f = framed(&body, true);
            f.truncate(rng.next(f.len() as u64 - 1) as usize); // cut mid-packet
            f
        }
        3 => vec![0x03], // Ctrl-C out of the blue
        _ => framed(&body, true),
    }
}

#[test]
fn hostile_clients_never_kill_the_server() {
    let d = tempfile::tempdir().unwrap();
    let rec = d.path().join("rec");
    let img = demo_image();
    let o = record_demo(&rec, "workload=compute iters=5", &["--mem", "4M"], b"");
    assert!(o.status.success(), "{}", stderr(&o));

    let mut child = revirt()
        .args(["gdb", rec.to_str().unwrap(), "--port", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("panicked") {
                eprintln!("[server] {line}");
            }
            if let Some(rest) = line.split("listening on ").nth(1) {
                let _ = tx.send(rest.split(';').next().unwrap().trim().to_string());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).expect("server did not start");
    assert!(addr.starts_with("127.0.0.1:"), "binds to loopback by default: {addr}");
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();

    let seed = 0xF00D ^ std::process::id() as u64;
    eprintln!("gdb fuzz seed {seed:#x}");
    let mut rng = Skid::new(seed);
    let mut sent = 0usize;
    for _ in 0..150 {
        let Ok(mut t) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            panic!("server stopped accepting connections (after {sent} packets)");
        };
        t.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
        for _ in 0..=rng.next(6) {
            let p = random_packet(&mut rng);
            if t.write_all(&p).is_err() {
                break;
            }
            sent += 1;
            if rng.next(2) == 0 {
                let _ = t.write_all(b"+");
                let mut b = [0u8; 4096];
                let _ = t.read(&mut b);
            }
        }
        // Abrupt disconnect (drop), sometimes half-closed first.
        if rng.next(3) == 0 {
            let _ = t.shutdown(std::net::Shutdown::Write);
        }
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
    }
    eprintln!("{sent} hostile packets over 150 connections");

    // A real gdb still gets normal service.
    let out = std::process::Command::new("gdb")
        .args(["-nx", "-batch", "-ex", "set architecture i386:x86-64", "-ex", &format!("target remote 127.0.0.1:{port}")])
        .args(["-ex", "stepi", "-ex", "printf \"PC=%#lx\\n\", $pc"])
        .arg(img.to_str().unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("PC=0x"), "{text}");
    assert!(child.try_wait().unwrap().is_none(), "the server exited");
    let _ = child.kill();
    let _ = child.wait();
}
