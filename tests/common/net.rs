//! Helpers for tests that run a VM and `nmvm pkt-gen` on the two ends of a
//! userspace netmap pipe.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{nmvm, require_kvm, text};

/// How long a VM or pkt-gen may take before the test fails.
pub const LIMIT: Duration = Duration::from_secs(120);

/// A pipe name unique to this test process and test: (guest end, host end).
pub fn pipe(test: &str) -> (String, String) {
    let base = format!("shm:t{}{test}", std::process::id());
    (format!("{base}{{0"), format!("{base}}}0"))
}

/// Starts `cmd` with its output captured.
pub fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

/// Waits for `child` (killing it after [`LIMIT`]).
pub fn finish(mut child: Child, what: &str) -> Output {
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            let (o, e) = text(&out);
            panic!("{what} did not finish within {LIMIT:?}\nstdout:\n{o}\nstderr:\n{e}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Boots the bundled guest on `port` with `--stats`, `extra` options and
/// the guest command line `cmdline`.
pub fn vm_with(port: &str, extra: &[&str], cmdline: &str) -> Child {
    require_kvm();
    spawn(
        nmvm()
            .args(["run", "--stats", "--timeout", "100s", "--net", port])
            .args(extra)
            .arg("--cmdline")
            .arg(cmdline),
    )
}

/// Starts `nmvm pkt-gen` on `port`.
pub fn pktgen(port: &str, args: &[&str]) -> Child {
    spawn(
        nmvm()
            .args(["pkt-gen", "-i", port, "--idle-timeout", "60s"])
            .args(args),
    )
}

/// Waits for both: ((status, stdout, stderr) of the VM, ... of pkt-gen).
pub fn both(vm: Child, pg: Child) -> ((i32, String, String), (i32, String, String)) {
    let pg = finish(pg, "pkt-gen");
    let vm = finish(vm, "nmvm run");
    let (vo, ve) = text(&vm);
    let (po, pe) = text(&pg);
    (
        (vm.status.code().unwrap_or(-1), vo, ve),
        (pg.status.code().unwrap_or(-1), po, pe),
    )
}

/// Boots the bundled guest as an echo appliance for 1000 frames (`extra`
/// options, `net=echo count=1000` plus `cmdline`) and pings it with 1000
/// frames of 60–1514 bytes from pkt-gen; checks that every frame came back
/// intact and the guest echoed exactly 1000. Returns the VM's stdout and
/// stderr for the caller's own checks.
pub fn echo_1000_mixed(test: &str, extra: &[&str], cmdline: &str) -> (String, String) {
    let (guest_end, host_end) = pipe(test);
    let vm = vm_with(&guest_end, extra, &format!("net=echo count=1000 {cmdline}"));
    let pg = pktgen(
        &host_end,
        &[
            "-f",
            "ping",
            "-n",
            "1000",
            "-l",
            "60",
            "-l",
            "1514",
            "-b",
            "16",
            "-D",
            "52:54:00:12:34:56",
        ],
    );
    let ((vc, vo, ve), (pc, po, pe)) = both(vm, pg);
    assert_eq!(pc, 0, "pkt-gen:\n{po}\n{pe}\nguest:\n{vo}\n{ve}");
    assert!(
        pe.contains("Checked: 1000 intact, 0 corrupt, 0 out of order, 0 lost"),
        "{pe}"
    );
    assert!(pe.contains("RTT over 1000 packets"), "{pe}");
    assert_eq!(vc, 0, "{vo}\n{ve}");
    assert!(
        vo.contains("nmvm-guest: net echo: rx 1000 tx 1000 bad 0"),
        "{vo}"
    );
    (vo, ve)
}

/// The `--stats` line that starts with `key`.
pub fn stats_line<'a>(stderr: &'a str, key: &str) -> &'a str {
    stderr
        .lines()
        .find(|l| l.trim_start().starts_with(key))
        .unwrap_or_else(|| panic!("no '{key}' line in:\n{stderr}"))
}

/// VM exits per packet from the `--stats` "per packet" line.
pub fn exits_per_packet(stderr: &str) -> f64 {
    let line = stats_line(stderr, "per packet");
    let before = line
        .split(" VM exits")
        .next()
        .unwrap_or_else(|| panic!("no exits figure in '{line}'"));
    before
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exits figure in '{line}'"))
}
