//! The bundled guest and `nmvm pkt-gen` exchange real frames through nmvm's
//! virtio-net device and a userspace netmap pipe, in every direction, and
//! the device survives a hostile guest.

mod common;

use common::net::{both, echo_1000_mixed, finish, pipe, pktgen, spawn, vm_with, LIMIT};
use common::{nmvm, require_kvm, text};
use std::process::Child;

fn vm(port: &str, cmdline: &str) -> Child {
    vm_with(port, &[], cmdline)
}

#[test]
fn guest_echoes_mixed_frames_back_intact() {
    let (_, ve) = echo_1000_mixed("echo", &[], "");
    assert!(ve.contains("VERSION_1"), "{ve}");
}

#[test]
fn guest_generates_exactly_n_frames() {
    let (guest_end, host_end) = pipe("gen");
    let pg = pktgen(&host_end, &["-f", "rx", "-n", "600"]);
    let vm = vm(&guest_end, "net=gen count=600 len=60-1514");
    let ((vc, vo, ve), (pc, _, pe)) = both(vm, pg);
    assert_eq!(pc, 0, "{pe}");
    assert!(pe.contains("Received 600 packets"), "{pe}");
    assert!(
        pe.contains("Checked: 600 intact, 0 corrupt, 0 out of order, 0 lost"),
        "{pe}"
    );
    assert_eq!(vc, 0, "{vo}\n{ve}");
    assert!(
        vo.contains("nmvm-guest: net gen: rx 0 tx 600 bad 0"),
        "{vo}"
    );
    assert!(ve.contains("tx 600 frames"), "{ve}");
}

#[test]
fn pkt_gen_creates_a_pipe_with_the_ring_size_asked_for() {
    let (creator, attacher) = pipe("slots");
    let rx = pktgen(&creator, &["-f", "rx", "-n", "5000", "--pipe-slots", "64"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let tx = pktgen(
        &attacher,
        &["-f", "tx", "-n", "5000", "-l", "60", "-l", "1514"],
    );
    let tx = finish(tx, "pkt-gen tx");
    let rx = finish(rx, "pkt-gen rx");
    let (te, re) = (text(&tx).1, text(&rx).1);
    assert_eq!(
        (tx.status.code(), rx.status.code()),
        (Some(0), Some(0)),
        "tx:\n{te}\nrx:\n{re}"
    );
    // The attaching end takes the creator's ring size.
    assert!(te.contains("64 slots per ring"), "{te}");
    assert!(re.contains("64 slots per ring"), "{re}");
    assert!(
        re.contains("Checked: 5000 intact, 0 corrupt, 0 out of order, 0 lost"),
        "{re}"
    );
}

#[test]
fn run_creates_a_pipe_with_the_ring_size_asked_for() {
    let (guest_end, host_end) = pipe("runslots");
    let vm = vm_with(&guest_end, &["--pipe-slots", "128"], "net=sink count=300");
    // The VM must open the pipe first for its size to count.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pg = pktgen(&host_end, &["-f", "tx", "-n", "300", "-l", "1514"]);
    let ((vc, vo, ve), (pc, _, pe)) = both(vm, pg);
    assert_eq!((vc, pc), (0, 0), "pkt-gen:\n{pe}\nguest:\n{vo}\n{ve}");
    assert!(pe.contains("128 slots per ring"), "{pe}");
    assert!(
        vo.contains("nmvm-guest: net sink: rx 300 tx 0 bad 0"),
        "{vo}"
    );
}

#[test]
fn guest_sink_counts_exactly_what_pktgen_sent() {
    let (guest_end, host_end) = pipe("sink");
    let vm = vm(&guest_end, "net=sink count=700");
    let pg = pktgen(
        &host_end,
        &["-f", "tx", "-n", "700", "-l", "60", "-l", "1514"],
    );
    let ((vc, vo, ve), (pc, _, pe)) = both(vm, pg);
    assert_eq!(pc, 0, "{pe}");
    assert!(pe.contains("Sent 700 packets"), "{pe}");
    assert_eq!(vc, 0, "{vo}\n{ve}");
    assert!(
        vo.contains("nmvm-guest: net sink: rx 700 tx 0 bad 0"),
        "{vo}"
    );
    assert!(ve.contains("rx 700 frames"), "{ve}");
}

#[test]
fn hostile_guest_is_contained_and_counted() {
    let (guest_end, host_end) = pipe("hostile");
    let pg = pktgen(&host_end, &["-f", "rx", "-n", "2"]);
    let vm = vm(&guest_end, "net=hostile");
    let ((vc, vo, ve), (pc, _, pe)) = both(vm, pg);
    // The two valid frames, one before and one after the device reset,
    // arrive intact; nothing else does.
    assert_eq!(pc, 0, "{pe}");
    assert!(pe.contains("Checked: 2 intact, 0 corrupt"), "{pe}");
    assert_eq!(vc, 0, "{vo}\n{ve}");
    assert!(vo.contains("nmvm-guest: hostile: device recovered"), "{vo}");
    // Each bad chain was dropped and counted, the impossible avail index
    // too, and the bad MSI-X writes.
    let counters = ve
        .lines()
        .find(|l| l.contains("virtio-net counters"))
        .unwrap_or("");
    assert!(counters.contains("dropped: 4 bad chains"), "{ve}");
    assert!(counters.contains("1 bad heads"), "{ve}");
    assert!(counters.contains("1 bad avail index"), "{ve}");
    assert!(ve.contains("2 bad MSI-X table accesses"), "{ve}");
    // Visible without --stats too.
    assert!(ve.contains("nmvm: virtio-net dropped bad input"), "{ve}");
}

#[test]
fn demo_passes() {
    require_kvm();
    let out = finish(spawn(nmvm().args(["demo", "-n", "300"])), "nmvm demo");
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{o}\n{e}");
    assert!(
        o.contains("300 sent, 300 echoed back intact, 0 corrupt, 0 lost"),
        "{o}"
    );
    assert!(o.contains("demo: OK"), "{o}");
}

#[test]
fn missing_kernel_netmap_names_the_module_and_suggests_shm() {
    if std::path::Path::new("/dev/netmap").exists() {
        return; // the kernel module is there; nothing to check here
    }
    let out = common::run_with_deadline(nmvm().args(["run", "--net", "netmap:eth0"]), LIMIT);
    let (_, e) = text(&out);
    assert_eq!(out.status.code(), Some(255), "{e}");
    assert!(e.contains("shm:"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
}
