//! `revirt doctor` must tell the truth about this host. Its probe results are
//! checked against facts found independently of the probes.

mod common;
use common::*;

use std::path::Path;

/// A core PMU event source: `cpu`, or `cpu_core`/`cpu_atom` on hybrid Intel.
fn has_cpu_pmu() -> bool {
    let d = Path::new("/sys/bus/event_source/devices");
    ["cpu", "cpu_core", "cpu_atom"].iter().any(|p| d.join(p).exists())
}

fn is_hybrid() -> bool {
    Path::new("/sys/bus/event_source/devices/cpu_core").exists()
}

/// kvm_pvm runs guest ring 0 in KVM's emulator and ring 3 natively in host
/// user mode: KVM debug traps cannot reach ring-3 code there (design-notes §1).
fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

#[test]
fn doctor_reports_this_host_correctly() {
    let o = run_with_input(&["doctor", "--json"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ok = |k: &str| r[k]["ok"].as_bool().unwrap_or_else(|| panic!("no {k} in {r}"));
    assert!(ok("kvm"));
    assert_eq!(ok("pmu"), has_cpu_pmu(), "PMU probe disagrees with sysfs: {}", r["pmu"]);
    assert!(ok("singlestep_ring0"), "{}", r["singlestep_ring0"]);
    assert!(ok("hw_breakpoint_ring0"), "{}", r["hw_breakpoint_ring0"]);
    assert!(ok("interrupt_injection_ring0"));
    assert!(ok("interrupt_injection_ring3"));
    if is_pvm_host() {
        assert!(!ok("singlestep_ring3"), "{}", r["singlestep_ring3"]);
        assert!(!ok("hw_breakpoint_ring3"), "{}", r["hw_breakpoint_ring3"]);
    }
    let clock = |name: &str| {
        r["clocks"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone()
    };
    assert_eq!(clock("exit")["available"], true);
    assert_eq!(clock("step")["available"], true);
    assert_eq!(clock("pmu")["available"].as_bool().unwrap(), has_cpu_pmu());
    let probe = r["pmu_probe"]["detail"].as_str().unwrap();
    if !has_cpu_pmu() {
        assert!(r["pmu"]["detail"].as_str().unwrap().contains("no hardware PMU"), "{}", r["pmu"]);
        // The probe guest still runs, under the step clock.
        assert!(!ok("pmu_probe"));
        assert!(probe.contains("the step clock counts 709 conditional branches in the probe guest, as expected"), "{probe}");
    } else {
        // A PMU: the counter `--clock pmu` uses must pass the probe, and the
        // report names the raw event (and on hybrid hosts the pinning).
        assert!(ok("pmu_probe"), "{probe}");
        assert!(probe.contains("counted 709 of the probe guest's 709"), "{probe}");
        let pmu = r["pmu"]["detail"].as_str().unwrap();
        assert!(pmu.contains("raw event 0x"), "{pmu}");
        if is_hybrid() {
            assert!(pmu.contains("pinned to CPUs") && pmu.contains("cpu_core"), "{pmu}");
        }
    }
}

#[test]
fn doctor_text_is_readable() {
    let o = run_with_input(&["doctor"], b"");
    assert!(o.status.success());
    let t = stdout(&o);
    assert!(t.contains("replay clocks:"));
    assert!(t.contains("single-step, ring 3"));
    assert!(t.contains("PMU start-up probe"), "{t}");
    if is_pvm_host() {
        assert!(t.contains("ring 3 needs the guest's own #DB handler"), "{t}");
    }
}
