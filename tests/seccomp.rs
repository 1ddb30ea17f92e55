//! The sandbox of `nmvm run`: every thread of a running VM is under a
//! seccomp filter, a forbidden system call stops the VMM with one line and
//! the VMM-error status, and `--no-seccomp` says loudly that it is off.

mod common;

use std::time::{Duration, Instant};

use common::net::{finish, pipe, pktgen, vm_with};
use common::{nmvm, read_until, require_kvm, run_with_deadline, text};

/// The `Seccomp:` mode of every thread of `pid`, by thread name.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/PID/task");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(|m| m.trim().to_string())
            .unwrap_or_default();
        modes.push((comm.trim().to_string(), mode));
    }
    modes
}

#[test]
fn every_thread_of_a_running_vm_is_filtered() {
    require_kvm();
    let (guest_end, _host_end) = pipe("modes");
    // wait=S keeps the guest up while the threads are inspected; the
    // network device makes the shm control thread exist too.
    let mut vm = vm_with(&guest_end, &[], "wait=4");
    let (ready, seen) = read_until(&mut vm, Duration::from_secs(60), |s| {
        s.contains("nmvm-guest: waiting")
    });
    assert!(ready, "the guest never said it was waiting:\n{seen}");
    let modes = seccomp_modes(vm.id());
    let out = finish(vm, "nmvm run");
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["nmvm", "nmvm-vcpu0", "nmvm-shm-ctl"] {
        assert!(names.contains(&want), "no thread {want} in {modes:?}");
    }
    for (name, mode) in &modes {
        assert_eq!(
            mode, "2",
            "thread {name} is not in seccomp filter mode: {modes:?}"
        );
    }
}

#[test]
fn the_device_worker_is_filtered_while_it_moves_packets() {
    let (guest_end, host_end) = pipe("worker");
    let vm = vm_with(&guest_end, &[], "net=echo count=300");
    let pg = pktgen(
        &host_end,
        &["-f", "ping", "-n", "300", "-l", "60", "-l", "1514"],
    );
    let pid = vm.id();
    // The worker starts when the guest's driver activates the device.
    let start = Instant::now();
    let mut worker = None;
    while worker.is_none() && start.elapsed() < Duration::from_secs(60) {
        worker = seccomp_modes(pid)
            .into_iter()
            .find(|(name, _)| name == "nmvm-net");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = finish(vm, "nmvm run");
    let _ = finish(pg, "pkt-gen");
    let (o, e) = text(&out);
    let (_, mode) = worker.unwrap_or_else(|| panic!("no device worker thread seen\n{o}\n{e}"));
    assert_eq!(mode, "2", "the device worker is not filtered");
    assert_eq!(out.status.code(), Some(0), "{o}\n{e}");
}

#[test]
fn a_forbidden_system_call_in_the_device_worker_stops_the_vmm() {
    // NMVM_TEST_WORKER_SYSCALL exists only with nmvm-devices' test-only
    // `hostile-peer` feature, which these tests' build enables.
    let (guest_end, _host_end) = pipe("violate");
    let mut cmd = nmvm();
    cmd.env("NMVM_TEST_WORKER_SYSCALL", "socket").args([
        "run",
        "--timeout",
        "60s",
        "--net",
        &guest_end,
        "--cmdline",
        "net=sink count=10",
    ]);
    require_kvm();
    let out = run_with_deadline(&mut cmd, Duration::from_secs(90));
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(255), "{o}\n{e}");
    assert!(
        e.contains(
            "nmvm: seccomp: the device worker thread made a forbidden system call 41 (socket); stopping the VMM"
        ),
        "{e}"
    );
}

#[test]
fn no_seccomp_warns_and_runs_unfiltered() {
    require_kvm();
    let out = run_with_deadline(
        nmvm().args(["run", "--no-seccomp", "--cmdline", "exit=3"]),
        Duration::from_secs(60),
    );
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{o}\n{e}");
    assert!(
        e.contains("nmvm: WARNING: --no-seccomp: the VMM runs without its seccomp filters"),
        "{e}"
    );
}
