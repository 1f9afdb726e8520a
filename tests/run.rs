//! `revirt run` end to end: the real binary boots the real demo guest on KVM.

mod common;
use common::*;

#[test]
fn compute_workload_matches_host_computation() {
    let o = run_demo("workload=compute iters=1000000", &[], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let want = format!("compute: iters=1000000 result={:#018x}", compute_result(1_000_000));
    assert!(stdout(&o).contains(&want), "stdout: {}\nwanted: {want}", stdout(&o));
}

#[test]
fn ring0_workload_runs_in_ring0_and_matches() {
    let o = run_demo("workload=ring0 iters=3000", &[], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let want = format!("ring0: iters=3000 result={:#018x}", compute_result(3000));
    assert!(stdout(&o).contains(&want), "stdout: {}", stdout(&o));
}

#[test]
fn timer_preempts_racing_ring3_tasks() {
    let o = run_demo("workload=race", &[], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let line = out.lines().find(|l| l.starts_with("race:")).unwrap_or_else(|| panic!("no race line: {out}"));
    let num = |k| field(line, k).unwrap().parse::<u64>().unwrap();
    let (counter, expected, lost, ticks) = (num("counter"), num("expected"), num("lost"), num("ticks"));
    assert!(ticks > 0, "no timer interrupt was delivered: {line}");
    assert!(counter <= expected && counter > 0, "{line}");
    assert_eq!(lost, expected - counter, "{line}");
}

#[test]
fn echo_workload_echoes_serial_input() {
    let o = run_demo("workload=echo", &[], b"hello\nworld of replay\nquit\n");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for l in ["echo: ready", "echo: hello", "echo: world of replay", "echo: bye"] {
        assert!(out.contains(l), "missing {l:?} in {out}");
    }
}

#[test]
fn idle_guest_with_closed_input_is_an_error_not_a_hang() {
    let o = run_demo("workload=echo", &[], b"only one line\n");
    assert!(!o.status.success());
    assert!(stdout(&o).contains("echo: only one line"));
    assert!(stderr(&o).contains("wait forever"), "stderr: {}", stderr(&o));
}

#[test]
fn disk_checksum_round_trips_through_the_block_device() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let mut content = vec![0u8; 128 * 512];
    for (i, b) in content.iter_mut().enumerate().skip(512) {
        *b = (i * 7 % 251) as u8;
    }
    std::fs::write(&disk, &content).unwrap();
    for round in 1..=2u64 {
        let o = run_demo("workload=disk", &["--disk", disk.to_str().unwrap()], b"");
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        let line = out.lines().find(|l| l.starts_with("disk:")).unwrap();
        assert_eq!(field(line, "counter").unwrap(), round.to_string(), "{line}");
        assert_eq!(field(line, "sectors").unwrap(), "64", "{line}");
        let after = std::fs::read(&disk).unwrap();
        assert_eq!(&after[..8], b"RVDISK01");
        assert_eq!(u64::from_le_bytes(after[8..16].try_into().unwrap()), round);
        assert_eq!(&after[512..], &content[512..], "guest changed sectors it should not touch");
        let want = format!("{:#018x}", fnv1a(&after[..64 * 512]));
        assert_eq!(field(line, "checksum").unwrap(), want, "{line}");
    }
}

#[test]
fn disk_workload_without_disk_reports_it() {
    let o = run_demo("workload=disk", &[], b"");
    assert_eq!(o.status.code(), Some(3));
    assert!(stdout(&o).contains("disk: no disk"));
}

#[test]
fn exit_status_propagates() {
    for status in [0u8, 42, 255] {
        let o = run_demo(&format!("workload=exit status={status}"), &[], b"");
        assert_eq!(o.status.code(), Some(status as i32), "{}", stderr(&o));
        assert!(stdout(&o).contains(&format!("exit: status={status}")));
    }
}

#[test]
fn unknown_workload_exits_2() {
    let o = run_demo("workload=nonesuch", &[], b"");
    assert_eq!(o.status.code(), Some(2));
    assert!(stdout(&o).contains("unknown workload 'nonesuch'"), "{}", stdout(&o));
}

#[test]
fn clock_advances() {
    let o = run_demo("workload=clock", &[], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let line = out.lines().find(|l| l.starts_with("clock:")).unwrap();
    let t0: u64 = field(line, "t0").unwrap().parse().unwrap();
    let t1: u64 = field(line, "t1").unwrap().parse().unwrap();
    let d: u64 = field(line, "elapsed_ns").unwrap().parse().unwrap();
    assert!(t1 > t0 && d == t1 - t0 && d > 0, "{line}");
}

#[test]
fn malformed_image_gives_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    let o = run_with_input(&["run", junk.to_str().unwrap()], b"");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not an ELF file"), "stderr: {}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));

    let img = std::fs::read(demo_image()).unwrap();
    let cut = dir.path().join("cut.img");
    std::fs::write(&cut, &img[..300]).unwrap(); // headers intact, segment data cut off
    let o = run_with_input(&["run", cut.to_str().unwrap()], b"");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("truncated") || e.contains("beyond the end of the file"), "stderr: {e}");

    let mut arm = img.clone();
    arm[18] = 183; // EM_AARCH64
    let armp = dir.path().join("arm.img");
    std::fs::write(&armp, &arm).unwrap();
    let o = run_with_input(&["run", armp.to_str().unwrap()], b"");
    assert!(stderr(&o).contains("expected x86-64"), "stderr: {}", stderr(&o));

    let o = run_with_input(&["run", "/nonexistent/vm.img"], b"");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/vm.img"), "stderr: {}", stderr(&o));
}

#[test]
fn image_larger_than_memory_is_refused() {
    let img = demo_image();
    let o = run_with_input(&["run", img.to_str().unwrap(), "--mem", "1M"], b"");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("beyond the end of guest RAM"), "stderr: {}", stderr(&o));
    let o = run_with_input(&["run", img.to_str().unwrap(), "--mem", "5M"], b"");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("multiple of 2 MiB"), "stderr: {}", stderr(&o));
}

#[test]
fn missing_disk_gives_a_clear_error() {
    let o = run_demo("workload=disk", &["--disk", "/nonexistent/disk.img"], b"");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("/nonexistent/disk.img") && e.contains("No such file"), "stderr: {e}");
}

#[test]
fn odd_sized_disk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("odd.img");
    std::fs::write(&disk, vec![0u8; 1000]).unwrap();
    let o = run_demo("workload=disk", &["--disk", disk.to_str().unwrap()], b"");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a multiple of 512"), "stderr: {}", stderr(&o));
}

#[test]
fn vuln_service_greets_and_overflow_hijacks_control_flow() {
    let o = run_demo("workload=vuln", &[], b"alice\n");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("vuln: hello, alice"));
    assert!(stdout(&o).contains("vuln: bye"));

    // 56 filler bytes, then backdoor's address (0x200000) over the return address.
    let mut payload = vec![b'0'; 56];
    payload.extend_from_slice(&0x200000u64.to_le_bytes());
    payload.push(b'\n');
    let o = run_demo("workload=vuln", &[], &payload);
    assert_eq!(o.status.code(), Some(66), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("vuln: PWNED - backdoor reached"));
    assert!(!stdout(&o).contains("vuln: bye"));
}

#[test]
fn guest_crash_is_reported_with_the_faulting_instruction() {
    // A long line smashes the return address with ASCII: serve's `ret` faults.
    let mut line = vec![b'0'; 80];
    line.push(b'\n');
    let o = run_demo("workload=vuln", &[], &line);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert!(stderr(&o).contains("guest exception #GP"), "{}", stderr(&o));
    assert!(stderr(&o).contains("in ring 3"), "{}", stderr(&o));
}

/// The `mem` workload's pointer chase (guests/demo/mem.c), computed on the host.
fn mem_result(pages: u64, iters: u64) -> u64 {
    let n = pages * 512;
    let mut a: Vec<u64> = (0..n).collect();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = ((x >> 32) * i) >> 32;
        a.swap(i as usize, j as usize);
    }
    let (mut p, mut acc) = (0u64, 0u64);
    for k in 0..iters {
        p = a[p as usize];
        acc = acc.wrapping_add(p ^ k);
    }
    acc
}

#[test]
fn mem_workload_matches_host_computation() {
    let o = run_demo("workload=mem pages=300 iters=500000", &[], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let want = format!("mem: pages=300 iters=500000 result={:#018x}", mem_result(300, 500_000));
    assert!(stdout(&o).contains(&want), "stdout: {}\nwanted: {want}", stdout(&o));
}

/// The `branchy` workload's bytecode interpreter (guests/demo/branchy.c), on the host.
fn branchy_result(iters: u64) -> u64 {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let prog: Vec<u8> = (0..61)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 61) as u8
        })
        .collect();
    let (mut a, mut b) = (1u64, 2u64);
    for _ in 0..iters {
        for op in &prog {
            match op {
                0 => a = a.wrapping_add(b),
                1 => b ^= a << 7,
                2 => a ^= a >> 9,
                3 => b = b.wrapping_add(0x9E37_79B9_7F4A_7C15),
                4 => a = a.wrapping_add(a << 1),
                5 => b ^= b << 13,
                6 => std::mem::swap(&mut a, &mut b),
                _ => a = a.wrapping_sub(b),
            }
        }
    }
    a ^ b
}

#[test]
fn branchy_workload_matches_host_computation() {
    let o = run_demo("workload=branchy iters=20000", &[], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let want = format!("branchy: iters=20000 result={:#018x}", branchy_result(20_000));
    assert!(stdout(&o).contains(&want), "stdout: {}\nwanted: {want}", stdout(&o));
}

/// The `fpu` workload's Mandelbrot scan (guests/demo/fpu.c), on the host: the
/// same IEEE operations in the same order give the same bits.
fn fpu_result(iters: u64) -> (u64, u64) {
    let (mut count, mut sum) = (0u64, 0.0f64);
    for k in 0..iters {
        let (px, py) = (k % 256, (k / 256) % 256);
        let cr = -2.0 + px as f64 * (2.5 / 256.0);
        let ci = -1.25 + py as f64 * (2.5 / 256.0);
        let (mut zr, mut zi, mut m, mut it) = (0.0f64, 0.0f64, 0.0f64, 0u64);
        while it < 64 {
            let (zr2, zi2) = (zr * zr, zi * zi);
            m = zr2 + zi2;
            if m > 4.0 {
                break;
            }
            zi = 2.0 * zr * zi + ci;
            zr = zr2 - zi2 + cr;
            it += 1;
        }
        count += it;
        sum += m.sqrt();
    }
    (count, sum.to_bits())
}

#[test]
fn fpu_workload_matches_host_computation() {
    let o = run_demo("workload=fpu iters=70000", &[], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let (count, bits) = fpu_result(70_000);
    let want = format!("fpu: iters=70000 count={count} sum={bits:#018x}");
    assert!(stdout(&o).contains(&want), "stdout: {}\nwanted: {want}", stdout(&o));
}
