//! A minimal Linux kernel (built by `guest-images/linux/build.sh` from
//! Debian's linux-source-6.1, cached) boots to user space on nmvm, and its
//! own `virtio_pci` + `virtio_net` drivers move frames through nmvm's
//! virtio-net device to `nmvm pkt-gen` on the other end of a userspace
//! netmap pipe. The guest's /init (guest-images/linux/init/init.c) runs the
//! mode named on the kernel command line: `net=gen|sink|echo|exit`.
//!
//! Under the emulated KVM of our machines the kernel reaches /init in
//! 10–25 s and a frame's trip through the guest kernel costs ~10–30 ms, so
//! the frame counts are small.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use common::proc::Proc;
use common::{guest_image, nmvm, require_kvm};

/// The whole run's limit (nmvm's own --timeout is 120 s).
/// The kernel command line every test starts from (see
/// shared/reference/linux-on-emulated-kvm.md §3).
const CMDLINE: &str = "console=ttyS0 noxsave clearcpuid=308,151 reboot=k panic=-1 rodata=off";
/// Guest RAM: less memory to initialise makes the emulated boot faster.
const MEMORY: &str = "64M";

/// Builds (or finds in the cache) the kernel and initramfs, once per test
/// process.
fn image() -> &'static (PathBuf, PathBuf) {
    static IMAGE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let paths = guest_image(
            "linux/build.sh",
            "apt-get, gcc and make (it builds the minimal Linux guest from Debian's \
             linux-source-6.1)",
            &["vmlinux", "initrd"],
        );
        (paths[0].clone(), paths[1].clone())
    })
}

/// A pipe name unique to this test process and test: (VM end, pkt-gen end).
fn pipe(test: &str) -> (String, String) {
    let base = format!("shm:lx{}{test}", std::process::id());
    (format!("{base}{{0"), format!("{base}}}0"))
}

/// Boots the minimal kernel with the test's mode words on its command line.
fn boot(words: &str, port: Option<&str>, extra: &[&str]) -> Proc {
    require_kvm();
    let (vmlinux, initrd) = image();
    let mut cmd = nmvm();
    cmd.args(["run", "--memory", MEMORY, "--kernel"])
        .arg(vmlinux)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", &format!("{CMDLINE} {words}")])
        .args(["--stats", "--timeout", "120s"])
        .args(extra);
    if let Some(port) = port {
        cmd.args(["--net", port]);
    }
    Proc::spawn("nmvm run", &mut cmd)
}

fn pktgen(port: &str, args: &[&str]) -> Proc {
    Proc::spawn(
        "nmvm pkt-gen",
        nmvm()
            .args(["pkt-gen", "-i", port, "--idle-timeout", "110s"])
            .args(args),
    )
}

/// The line of nmvm's `--stats` output that starts with `key`.
fn stats_line<'a>(stderr: &'a str, key: &str) -> &'a str {
    stderr
        .lines()
        .find(|l| l.trim_start().starts_with(key))
        .unwrap_or_else(|| panic!("no {key:?} line in nmvm's --stats output:\n{stderr}"))
}

/// Total VM exits from `--stats`.
fn vm_exits(stderr: &str) -> u64 {
    let line = stats_line(stderr, "VM exits");
    line.split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the VM exit count from {line:?}"))
}

fn ready_line(mode: &str, count: u64) -> String {
    format!("nmvm-linux-init ready: mode={mode} count={count}")
}

#[test]
fn linux_driver_negotiates_version_1_mrg_rxbuf_event_idx_and_msix() {
    let (guest_end, _host_end) = pipe("feat");
    // Stop the VM as soon as the init is ready (eth0 is up, so the driver
    // has negotiated): Linux resets every virtio device when it reboots.
    let ready = ready_line("sink", 1);
    let vm = boot("net=sink count=1", Some(&guest_end), &["--expect", &ready]);
    let vm = vm.finish();
    assert_eq!(vm.code, 0, "{}\n{}", vm.stdout, vm.stderr);
    let line = stats_line(&vm.stderr, "virtio-net");
    for name in ["VERSION_1", "MRG_RXBUF", "EVENT_IDX"] {
        assert!(line.contains(name), "{name} not negotiated: {line}");
    }
    assert!(line.contains("MSI-X on"), "MSI-X not used: {line}");
    eprintln!("{line} (run {:?})", vm.elapsed);
}

#[test]
fn linux_generates_n_mixed_frames_that_arrive_intact() {
    const N: u64 = 200;
    let (guest_end, host_end) = pipe("gen");
    let n = N.to_string();
    let pg = pktgen(&host_end, &["-f", "rx", "-n", &n]);
    let mut vm = boot(
        &format!("net=gen count={N} len=60-1514"),
        Some(&guest_end),
        &[],
    );
    let ready = vm.wait_for(&ready_line("gen", N));
    let pg = pg.finish();
    let vm = vm.finish();
    assert_eq!(pg.code, 0, "pkt-gen:\n{}\nguest:\n{}", pg.stderr, vm.stdout);
    assert!(
        pg.stderr.contains(&format!("Received {N} packets")),
        "{}",
        pg.stderr
    );
    assert!(
        pg.stderr.contains(&format!(
            "Checked: {N} intact, 0 corrupt, 0 out of order, 0 lost"
        )),
        "{}",
        pg.stderr
    );
    assert_eq!(vm.code, 0, "{}\n{}", vm.stdout, vm.stderr);
    assert!(
        vm.stdout
            .contains(&format!("nmvm-linux-init: gen: rx 0 tx {N} bad 0")),
        "{}",
        vm.stdout
    );
    eprintln!(
        "gen: ready after {ready:?}, run {:?}, {} VM exits",
        vm.elapsed,
        vm_exits(&vm.stderr)
    );
}

#[test]
fn linux_sink_counts_exactly_the_frames_pktgen_sent() {
    const N: u64 = 200;
    let (guest_end, host_end) = pipe("sink");
    let mut vm = boot(&format!("net=sink count={N}"), Some(&guest_end), &[]);
    let ready = vm.wait_for(&ready_line("sink", N));
    let n = N.to_string();
    let pg = pktgen(&host_end, &["-f", "tx", "-n", &n, "-l", "60", "-l", "1514"]);
    let pg = pg.finish();
    let vm = vm.finish();
    assert_eq!(pg.code, 0, "pkt-gen:\n{}\nguest:\n{}", pg.stderr, vm.stdout);
    assert!(
        pg.stderr.contains(&format!("Sent {N} packets")),
        "{}",
        pg.stderr
    );
    assert_eq!(vm.code, 0, "{}\n{}", vm.stdout, vm.stderr);
    assert!(
        vm.stdout
            .contains(&format!("nmvm-linux-init: sink: rx {N} tx 0 bad 0")),
        "{}\n{}",
        vm.stdout,
        vm.stderr
    );
    eprintln!(
        "sink: ready after {ready:?}, run {:?}, {} VM exits",
        vm.elapsed,
        vm_exits(&vm.stderr)
    );
}

#[test]
fn linux_echoes_pings_back_and_reports_rtt() {
    const N: u64 = 100;
    let (guest_end, host_end) = pipe("echo");
    let mut vm = boot(&format!("net=echo count={N}"), Some(&guest_end), &[]);
    let ready = vm.wait_for(&ready_line("echo", N));
    let exits_at_ready = Instant::now();
    let n = N.to_string();
    let pg = pktgen(
        &host_end,
        &["-f", "ping", "-n", &n, "-b", "1", "-l", "60", "-l", "1514"],
    );
    let pg = pg.finish();
    let vm = vm.finish();
    assert_eq!(pg.code, 0, "pkt-gen:\n{}\nguest:\n{}", pg.stderr, vm.stdout);
    assert!(
        pg.stderr.contains(&format!(
            "Checked: {N} intact, 0 corrupt, 0 out of order, 0 lost"
        )),
        "{}",
        pg.stderr
    );
    let rtt = pg
        .stderr
        .lines()
        .find(|l| l.contains(&format!("RTT over {N} packets")))
        .unwrap_or_else(|| panic!("no RTT reported:\n{}", pg.stderr));
    assert_eq!(vm.code, 0, "{}\n{}", vm.stdout, vm.stderr);
    assert!(
        vm.stdout
            .contains(&format!("nmvm-linux-init: echo: rx {N} tx {N} bad 0")),
        "{}",
        vm.stdout
    );
    let exits = vm_exits(&vm.stderr);
    eprintln!(
        "echo: ready after {ready:?}, pings took {:?}, run {:?}; {}; \
         {exits} VM exits for the whole run ({} per echoed frame, boot included)",
        exits_at_ready.elapsed(),
        vm.elapsed,
        rtt.split("] ").last().unwrap_or(rtt),
        exits / N
    );
    eprintln!("{}", stats_line(&vm.stderr, "virtio-net counters"));
}

#[test]
fn linux_init_exiting_is_a_panic_verdict() {
    let vm = boot("net=exit", None, &[]).finish();
    assert_eq!(vm.code, 251, "{}\n{}", vm.stdout, vm.stderr);
    assert!(
        vm.stdout
            .contains("Kernel panic - not syncing: Attempted to kill init"),
        "{}",
        vm.stdout
    );
    eprintln!("exit: panic verdict after {:?}", vm.elapsed);
}
