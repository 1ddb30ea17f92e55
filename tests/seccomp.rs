//! The sandbox: every thread of a running VM, of `nmvm vhost-user` and of
//! `nmvm pkt-gen` is under a seccomp filter, a forbidden system call stops
//! the VMM with one line and the VMM-error status, and `--no-seccomp` says
//! loudly that it is off.

mod common;

use std::time::{Duration, Instant};

use common::net::{both, finish, pipe, pktgen, spawn, vm_with};
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

/// Polls until every thread of `pid` is in seccomp filter mode, or fails
/// after 30 s with what it saw.
fn wait_all_filtered(pid: u32, what: &str) -> Vec<(String, String)> {
    let start = Instant::now();
    loop {
        let modes = seccomp_modes(pid);
        if !modes.is_empty() && modes.iter().all(|(_, m)| m == "2") {
            return modes;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: not every thread is in seccomp filter mode: {modes:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn vhost_user_and_pkt_gen_are_filtered_while_they_serve() {
    let (backend_end, pktgen_end) = pipe("vu");
    let sock = common::scratch_dir("seccomp-vu").join("vu.sock");
    let backend = spawn(
        nmvm()
            .args(["vhost-user", "--socket"])
            .arg(&sock)
            .args(["--net", &backend_end]),
    );
    let pg = pktgen(&pktgen_end, &["-f", "rx"]);
    // Both have opened the pipe (the control threads exist) and confined
    // every thread, the protocol thread and pkt-gen's loop included.
    let vu_modes = wait_all_filtered(backend.id(), "nmvm vhost-user");
    let pg_modes = wait_all_filtered(pg.id(), "nmvm pkt-gen");
    for (modes, want) in [(&vu_modes, "nmvm-shm-ctl"), (&pg_modes, "nmvm-shm-ctl")] {
        assert!(
            modes.iter().any(|(n, _)| n == want),
            "no thread {want} in {modes:?}"
        );
    }
    // Under their filters both still stop cleanly on SIGINT, with a report.
    for child in [&pg, &backend] {
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // own child's, which has not been waited for.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    }
    let pg_out = finish(pg, "nmvm pkt-gen");
    let vu_out = finish(backend, "nmvm vhost-user");
    let (po, pe) = text(&pg_out);
    assert_eq!(pg_out.status.code(), Some(0), "{po}\n{pe}");
    assert!(pe.contains("Received 0 packets"), "{pe}");
    let (vo, ve) = text(&vu_out);
    assert_eq!(vu_out.status.code(), Some(0), "{vo}\n{ve}");
    assert!(!sock.exists(), "the socket was not removed at exit");
}

/// Every open descriptor of `pid` (a number or `self`) beyond
/// stdin/out/err whose flags lack O_CLOEXEC, with what it is.
fn inheritable_fds(pid: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("read /proc/PID/fdinfo");
    for fd in fds.flatten() {
        let n: u32 = fd.file_name().to_string_lossy().parse().unwrap_or(0);
        if n <= 2 {
            continue;
        }
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok());
        // A descriptor closed meanwhile has no fdinfo any more.
        if flags.is_some_and(|f| f & libc::O_CLOEXEC as u32 == 0) {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{n}"))
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            bad.push(format!("fd {n} ({target})"));
        }
    }
    bad
}

#[test]
fn no_descriptor_of_a_running_vm_would_survive_an_exec() {
    require_kvm();
    let (guest_end, _host_end) = pipe("cloexec");
    let mut vm = vm_with(&guest_end, &[], "wait=4");
    let (ready, seen) = read_until(&mut vm, Duration::from_secs(60), |s| {
        s.contains("nmvm-guest: waiting")
    });
    assert!(ready, "the guest never said it was waiting:\n{seen}");
    let mut bad = inheritable_fds(&vm.id().to_string());
    let out = finish(vm, "nmvm run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    // What the test itself hands down (cargo's jobserver pipe, say) is not
    // nmvm's doing.
    let inherited = inheritable_fds("self");
    bad.retain(|fd| !inherited.contains(fd));
    assert!(
        bad.is_empty(),
        "descriptors nmvm opened without O_CLOEXEC: {bad:?}"
    );
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
            "nmvm: seccomp: the device worker thread made a forbidden system call 41 (socket); stopping nmvm"
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
        e.contains("nmvm: WARNING: --no-seccomp: running without the seccomp filters"),
        "{e}"
    );
}

/// Runs the VMM and pkt-gen with no privilege beyond /dev/kvm and the
/// port: as root, through util-linux's `setpriv` as user `nobody` (65534)
/// with only the group that owns /dev/kvm; as anyone else, as that user.
#[test]
fn an_unprivileged_user_runs_a_vm_with_only_kvm_and_the_port() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_kvm();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let kvm_gid = std::fs::metadata("/dev/kvm").expect("stat /dev/kvm").gid();
    // A copy of the binary anyone may run (the checkout may be private),
    // and a runtime directory anyone may create the pipe's files in.
    let dir = std::env::temp_dir().join(format!("nmvm-unpriv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let bin = dir.join("nmvm");
    std::fs::copy(env!("CARGO_BIN_EXE_nmvm"), &bin).expect("copy nmvm");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let run_dir = dir.join("run");
    let command = || {
        let mut c = if root {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534"])
                .arg(format!("--groups={kvm_gid}"))
                .arg("--")
                .arg(&bin);
            c
        } else {
            std::process::Command::new(&bin)
        };
        c.env("NMVM_RUN_DIR", &run_dir);
        c
    };
    let (guest_end, host_end) = pipe("unpriv");
    let vm = spawn(
        command()
            .args(["run", "--stats", "--timeout", "100s", "--net", &guest_end])
            .args(["--cmdline", "net=echo count=200"]),
    );
    // setpriv execs nmvm in its own process: once that process runs our
    // copy of nmvm, its real and effective user ids are the VMM's.
    let (pid, start) = (vm.id(), Instant::now());
    let mut uids = None;
    while uids.is_none() && start.elapsed() < Duration::from_secs(10) {
        if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == bin) {
            uids = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().take(2).collect::<Vec<_>>().join(" "));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let pg = spawn(
        command()
            .args(["pkt-gen", "-i", &host_end, "--idle-timeout", "60s"])
            .args(["-f", "ping", "-n", "200", "-l", "60", "-l", "1514"]),
    );
    let ((vm_status, _, vm_err), (pg_status, pg_out, pg_err)) = both(vm, pg);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(vm_status, 0, "nmvm run as an unprivileged user:\n{vm_err}");
    assert_eq!(pg_status, 0, "pkt-gen:\n{pg_out}\n{pg_err}");
    assert!(
        format!("{pg_out}{pg_err}").contains("200 intact"),
        "not every frame came back:\n{pg_out}\n{pg_err}"
    );
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = unsafe { libc::getuid() };
    let want = if root {
        "65534 65534".to_string()
    } else {
        format!("{me} {me}")
    };
    assert_eq!(uids, Some(want), "the VMM's real and effective user ids");
}
