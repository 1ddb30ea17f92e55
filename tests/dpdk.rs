//! DPDK's virtio_user driver (a real third-party virtio-net driver, in
//! testpmd) against `nmvm vhost-user`, with pkt-gen on the far end of the
//! netmap pipe: frames flow both ways and every side's final counters agree
//! exactly. Functional checks: rates are printed, never asserted.
//!
//! Needs `dpdk-testpmd` (Debian's dpdk-dev; `.ci/run` installs it) and two
//! CPU cores.

mod common;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use common::bench::{last_lines, run_bench, BenchRun};
use nmvm::dpdk::{self, Backend, Dir, RaceConfig};

/// The runs pin themselves to the same two cores: one at a time.
static CORES: Mutex<()> = Mutex::new(());

fn config(seconds: f64) -> RaceConfig {
    let testpmd = dpdk::find_testpmd(false).unwrap_or_else(|e| {
        panic!("{e}\n(the DPDK tests need DPDK's testpmd; .ci/run installs Debian's dpdk-dev)")
    });
    RaceConfig {
        testpmd,
        nmvm: PathBuf::from(env!("CARGO_BIN_EXE_nmvm")),
        seconds,
        cores: dpdk::pick_cores().unwrap_or_else(|e| panic!("{e}")),
        pipe_slots: dpdk::PIPE_SLOTS,
    }
}

#[test]
fn virtio_user_and_pkt_gen_agree_on_every_frame_both_ways() {
    let _one = CORES.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = config(1.0);
    for size in [64, 1514] {
        for dir in [Dir::Tx, Dir::Rx] {
            let run = dpdk::run_point(&cfg, Backend::Nmvm, dir, size)
                .unwrap_or_else(|e| panic!("{dir:?} {size} B: {e}"));
            let c = run.counts;
            eprintln!(
                "{dir:?} {size} B: {:.2} Mpps; sent {}, device {}, received {}",
                run.mpps, c.sent, c.backend, c.received
            );
            assert!(c.sent > 0, "{dir:?} {size} B: nothing flowed: {run:?}");
            assert_eq!(
                (c.sent, c.device_dropped),
                (c.backend, 0),
                "{dir:?} {size} B: the device lost or dropped frames: {run:?}"
            );
            assert_eq!(
                c.backend, c.received,
                "{dir:?} {size} B: the receiver did not get every frame: {run:?}"
            );
            assert!(run.mpps > 0.0, "no per-second figure: {run:?}");
            // nmvm offers VIRTIO_F_IN_ORDER, as DPDK's own backend does, and
            // the driver takes its in-order path for the direction.
            let want = match dir {
                Dir::Tx => "inorder Tx",
                Dir::Rx => "inorder Rx",
            };
            assert!(
                run.driver_paths.as_deref().unwrap_or("").contains(want),
                "{dir:?} {size} B: virtio_user did not take its {want} path: {run:?}"
            );
        }
    }
}

#[test]
fn bench_dpdk_only_races_both_backends_and_prints_the_race_last() {
    let _one = CORES.lock().unwrap_or_else(|e| e.into_inner());
    // Fails here, with the hint, rather than inside the bench.
    let _ = config(1.0);
    let BenchRun {
        stdout,
        report,
        svg,
    } = run_bench(
        "dpdk-bench",
        &["--dpdk-only", "--seconds", "1", "--repeat", "1"],
        Duration::from_secs(400),
    );
    assert!(
        last_lines(&stdout, 4)
            .iter()
            .all(|l| l.starts_with("race ") && l.contains("x DPDK; every run's counters agree")),
        "the last lines must be the race, counters agreeing:\n{stdout}"
    );
    let points = report["dpdk"]["points"].as_array().expect("race points");
    assert_eq!(points.len(), 4, "64 and 1514 B, both ways: {report}");
    for p in points {
        for side in ["dpdk", "nmvm"] {
            let runs = p[side].as_array().expect("runs");
            assert_eq!(runs.len(), 1, "{p}");
            assert!(runs[0]["mpps"].as_f64().unwrap_or(0.0) > 0.0, "{p}");
        }
    }
    let rows = report["rows"].as_array().expect("rows");
    for path in ["vhost-dpdk", "vhost-nmvm"] {
        assert_eq!(
            rows.iter().filter(|r| r["path"] == path).count(),
            4,
            "{path} rows: {report}"
        );
    }
    assert!(svg.contains("vhost-user nmvm TX") && svg.contains("vhost-user DPDK RX"));
}
