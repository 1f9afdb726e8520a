//! Save/restore: pause a running guest, save the whole machine, restore it
//! into a fresh VM, continue, and get exactly the uninterrupted run's output.

mod common;
use common::*;

use std::sync::{Arc, Mutex};

use revirt::trace::Snapshot;
use revirt::vmm::{Console, Host, Image, LiveHost, Machine, Stop, VmConfig};

fn capture_host(input: &'static [u8], clock: u64) -> (LiveHost, Arc<Mutex<Vec<u8>>>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let host = LiveHost::new(Box::new(input), Console::Capture { buf: buf.clone(), echo: false }, clock);
    (host, buf)
}

fn config(cmdline: &str) -> VmConfig {
    VmConfig { cmdline: cmdline.into(), ..Default::default() }
}

/// Runs uninterrupted, then again with a pause after `pause_at` exits, a save,
/// a restore into a new VM and a resume; returns both outputs and statuses.
fn split_run(cmdline: &str, input: &'static [u8], pause_at: u64) -> ((Stop, String), (Stop, String)) {
    let image = Image::load_file(&demo_image()).unwrap();

    let mut m = Machine::boot(&config(cmdline), &image).unwrap();
    let (mut host, out) = capture_host(input, 0);
    let whole_stop = m.run(&mut host, None).unwrap();
    let whole = String::from_utf8(out.lock().unwrap().clone()).unwrap();

    let mut m = Machine::boot(&config(cmdline), &image).unwrap();
    let (mut host, out1) = capture_host(input, 0);
    assert_eq!(m.run(&mut host, Some(pause_at)).unwrap(), Stop::Paused);
    assert_eq!(m.exits, pause_at);
    let state = m.save_state(host.now_ns()).unwrap();
    let memory = m.memory_bytes().unwrap();
    let rest: &'static [u8] = &input[host.input_delivered()..];
    drop(m);
    drop(host);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    Snapshot { state, memory }.write(&path).unwrap();
    let snap = Snapshot::read(&path).unwrap();
    let mut m2 = Machine::restore(&snap.state, &snap.memory).unwrap();
    assert_eq!(m2.exits, pause_at);
    // Input the guest's UART already took is part of the snapshot; offer only the rest.
    let (mut host2, out2) = capture_host(rest, snap.state.clock_ns);
    let stop = m2.run(&mut host2, None).unwrap();
    let mut split = out1.lock().unwrap().clone();
    split.extend_from_slice(&out2.lock().unwrap());
    ((whole_stop, whole), (stop, String::from_utf8(split).unwrap()))
}

#[test]
fn pause_save_restore_continue_gives_identical_output() {
    // Pause in the middle of printing the first line (each byte costs exits).
    let ((s1, whole), (s2, split)) = split_run("workload=compute iters=2000000", b"", 25);
    assert_eq!(s1, Stop::PowerOff(0));
    assert_eq!(s2, Stop::PowerOff(0));
    assert_eq!(whole, split);
    assert!(whole.contains(&format!("result={:#018x}", compute_result(2_000_000))));
}

#[test]
fn save_restore_in_ring0() {
    let ((s1, whole), (s2, split)) = split_run("workload=ring0 iters=2000", b"", 40);
    assert_eq!((s1, s2), (Stop::PowerOff(0), Stop::PowerOff(0)));
    assert_eq!(whole, split);
}

#[test]
fn save_restore_with_serial_input_pending() {
    // Pause after the guest has read part of its input: the unread rest sits
    // in the UART FIFO and must survive the snapshot.
    let input: &'static [u8] = b"abc\nquit\n";
    let ((s1, whole), (s2, split)) = split_run("workload=echo", input, 60);
    assert_eq!((s1, s2), (Stop::PowerOff(0), Stop::PowerOff(0)));
    assert_eq!(whole, split);
    assert!(whole.contains("echo: abc") && whole.contains("echo: bye"));
}

#[test]
fn save_restore_with_timer_running() {
    // The race is timing-dependent, so compare structure: the restored run
    // keeps taking timer interrupts and finishes with a consistent result.
    let image = Image::load_file(&demo_image()).unwrap();
    let mut m = Machine::boot(&config("workload=race"), &image).unwrap();
    let (mut host, out1) = capture_host(b"", 0);
    assert_eq!(m.run(&mut host, Some(80)).unwrap(), Stop::Paused);
    let state = m.save_state(host.now_ns()).unwrap();
    assert!(state.devices.timer.deadline_ns.is_some() || state.devices.pic.mask & 1 == 1);
    let memory = m.memory_bytes().unwrap();
    drop(m);
    let mut m2 = Machine::restore(&state, &memory).unwrap();
    let (mut host2, out2) = capture_host(b"", state.clock_ns);
    assert_eq!(m2.run(&mut host2, None).unwrap(), Stop::PowerOff(0));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out1.lock().unwrap()),
        String::from_utf8_lossy(&out2.lock().unwrap())
    );
    let line = text.lines().find(|l| l.starts_with("race:")).expect(&text);
    assert!(field(line, "ticks").unwrap().parse::<u64>().unwrap() > 0, "{line}");
}

#[test]
fn cli_pause_save_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("mid.snap");
    let whole = run_demo("workload=compute iters=500000", &[], b"");
    let first = run_demo(
        "workload=compute iters=500000",
        &["--pause-at", "30", "--save", snap.to_str().unwrap()],
        b"",
    );
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("paused after 30 exits"));
    let second = run_with_input(&["run", "--restore", snap.to_str().unwrap()], b"");
    assert!(second.status.success(), "{}", stderr(&second));
    let mut joined = first.stdout.clone();
    joined.extend_from_slice(&second.stdout);
    assert_eq!(String::from_utf8_lossy(&joined), stdout(&whole));

    // A damaged snapshot is refused with a clear message.
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&snap, &bytes).unwrap();
    let bad = run_with_input(&["run", "--restore", snap.to_str().unwrap()], b"");
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("damaged"), "{}", stderr(&bad));
}
