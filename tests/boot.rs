//! Boots the bundled guest for real and checks what it prints and how the
//! VM ends.

mod common;

use std::time::Duration;

use common::{nmvm, require_kvm, run_with_deadline, text};

const LIMIT: Duration = Duration::from_secs(60);

fn boot(args: &[&str]) -> (i32, String, String) {
    require_kvm();
    let out = run_with_deadline(nmvm().arg("run").args(args), LIMIT);
    let (stdout, stderr) = text(&out);
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

#[test]
fn guest_status_becomes_exit_code() {
    let (code, out, err) = boot(&["--cmdline", "exit=7"]);
    assert_eq!(code, 7, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("nmvm-guest 0.1.0 ready: memory 256 MiB, cpus 1, cmdline \"exit=7\""),
        "{out}"
    );
    assert!(out.contains("nmvm-guest: exit 7"), "{out}");
}

#[test]
fn no_arguments_boots_and_exits_zero() {
    let (code, out, err) = boot(&[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("ready: memory 256 MiB, cpus 1"), "{out}");
}

#[test]
fn two_vcpus_are_listed_in_the_mp_table() {
    let (code, out, err) = boot(&["--cpus", "2", "--cmdline", "exit=3"]);
    assert_eq!(code, 3, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("cpus 2,"), "{out}");
}

#[test]
fn memory_size_reaches_the_guest() {
    let (code, out, _) = boot(&["--memory", "1G", "--cpus", "2"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ready: memory 1024 MiB, cpus 2"), "{out}");
}

#[test]
fn memory_above_the_mmio_hole_reaches_the_guest() {
    let (code, out, _) = boot(&["--memory", "3584M"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ready: memory 3584 MiB"), "{out}");
}

#[test]
fn i8042_reset_ends_the_vm_with_status_zero() {
    let (code, out, err) = boot(&["--cmdline", "exit=reset"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("the guest reset the VM"), "{err}");
}

#[test]
fn stats_report_timings_exits_and_memory() {
    let (code, _, err) = boot(&["--stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("first guest exit"), "{err}");
    assert!(err.contains("VM exits"), "{err}");
    assert!(err.contains("KiB beyond resident guest RAM"), "{err}");
}
