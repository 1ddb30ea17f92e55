//! Netmap passthrough end to end: the bundled guest operates the port's
//! rings itself (`path=netmap`) against `nmvm pkt-gen` on the other end of
//! a userspace pipe; exact counts both ways, VM exits per packet, and a
//! guest that corrupts its rings.

mod common;

use common::net::{both, echo_1000_mixed, exits_per_packet, pipe, pktgen, stats_line, vm_with};

const PT: &[&str] = &["--passthrough"];

#[test]
fn netmap_path_echoes_mixed_frames_back_intact() {
    let (vo, ve) = echo_1000_mixed("ptecho", PT, "path=netmap");
    assert!(vo.contains("nmvm-guest: netmap passthrough:"), "{vo}");
    assert!(
        ve.contains("NMVM_NETMAP"),
        "the feature was not negotiated:\n{ve}"
    );
}

/// Gen mode at saturation: exact count, and VM exits per packet from
/// `--stats`, with the virtio path's figure for the same work beside it.
#[test]
fn netmap_path_generates_exactly_n_frames_with_few_exits() {
    const N: &str = "20000";
    let mut figures = Vec::new();
    for (path, extra) in [("netmap", PT), ("virtio", &[][..])] {
        let (guest_end, host_end) = pipe(&format!("ptgen{path}"));
        let pg = pktgen(&host_end, &["-f", "rx", "-n", N]);
        let vm = vm_with(
            &guest_end,
            extra,
            &format!("net=gen path={path} count={N} len=60"),
        );
        let ((vc, vo, ve), (pc, _, pe)) = both(vm, pg);
        assert_eq!(pc, 0, "{pe}\n{vo}\n{ve}");
        assert!(pe.contains(&format!("Received {N} packets")), "{pe}");
        assert!(
            pe.contains(&format!(
                "Checked: {N} intact, 0 corrupt, 0 out of order, 0 lost"
            )),
            "{pe}"
        );
        assert_eq!(vc, 0, "{vo}\n{ve}");
        assert!(
            vo.contains(&format!("nmvm-guest: net gen: rx 0 tx {N} bad 0")),
            "{vo}"
        );
        let exits = exits_per_packet(&ve);
        eprintln!(
            "path={path}: {exits:.4} VM exits per packet ({})",
            stats_line(&ve, "VM exits").trim()
        );
        figures.push(exits);
    }
    assert!(
        figures[0] < 0.05,
        "path=netmap: {:.4} VM exits per packet (virtio path: {:.4})",
        figures[0],
        figures[1]
    );
}

#[test]
fn netmap_path_sink_counts_exactly_what_pktgen_sent() {
    let (guest_end, host_end) = pipe("ptsink");
    let vm = vm_with(&guest_end, PT, "net=sink path=netmap count=3000");
    let pg = pktgen(
        &host_end,
        &["-f", "tx", "-n", "3000", "-l", "60", "-l", "1514"],
    );
    let ((vc, vo, ve), (pc, _, pe)) = both(vm, pg);
    assert_eq!(pc, 0, "{pe}");
    assert!(pe.contains("Sent 3000 packets"), "{pe}");
    assert_eq!(vc, 0, "{vo}\n{ve}");
    assert!(
        vo.contains("nmvm-guest: net sink: rx 3000 tx 0 bad 0"),
        "{vo}"
    );
}

/// A guest that writes a bad buffer index, an oversized length and a head
/// beyond the tail: the VMM and the peer keep running, the bad slots are
/// dropped and counted, and the valid frames after them arrive intact.
#[test]
fn a_guest_corrupting_its_rings_only_loses_its_own_frames() {
    let (guest_end, host_end) = pipe("pthostile");
    let pg = pktgen(&host_end, &["-f", "rx", "-n", "100"]);
    let vm = vm_with(&guest_end, PT, "net=hostile path=netmap count=100");
    let ((vc, vo, ve), (pc, _, pe)) = both(vm, pg);
    assert_eq!(pc, 0, "{pe}\n{vo}\n{ve}");
    assert!(
        pe.contains("Checked: 100 intact, 0 corrupt, 0 out of order, 0 lost"),
        "{pe}"
    );
    assert_eq!(vc, 0, "{vo}\n{ve}");
    let peer = stats_line(&ve, "netmap peer");
    for what in ["bad index", "bad buf_idx", "bad len"] {
        let n: u64 = peer
            .split(&format!("{what} "))
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no '{what}' in '{peer}'"));
        assert!(n >= 1, "'{what}' not counted: {peer}");
    }
}

#[test]
fn netmap_path_without_passthrough_fails_with_a_clear_line() {
    let (guest_end, _host_end) = pipe("ptnoflag");
    let vm = vm_with(&guest_end, &[], "net=gen path=netmap count=10");
    let out = common::net::finish(vm, "nmvm run");
    let (o, e) = common::text(&out);
    assert_ne!(out.status.code(), Some(0), "{o}\n{e}");
    assert!(o.contains("--passthrough"), "{o}\n{e}");
}
