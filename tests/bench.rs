//! `nmvm bench` end to end: a short run measures every path, writes JSON
//! and a plot, and ends with the ratio lines. (A functional check: rates
//! on our shared machines are read from the benchmark, never asserted.)

mod common;

use std::time::Duration;

use common::bench::{last_lines, run_bench, BenchRun};

#[test]
fn quick_bench_measures_every_path_and_prints_ratios_last() {
    let BenchRun {
        stdout,
        report,
        svg,
    } = run_bench(
        "bench",
        &["--quick", "--seconds", "0.1", "--repeat", "1"],
        Duration::from_secs(60),
    );
    assert!(
        last_lines(&stdout, 4)
            .iter()
            .all(|l| l.starts_with("ratio ") && l.contains("of the copy limit")),
        "the last lines must be the ratios:\n{stdout}"
    );
    let rows = report["rows"].as_array().expect("rows");
    for (path, dir) in [("copy", "copy"), ("nmvm", "tx"), ("nmvm", "rx")] {
        for size in [64, 1514] {
            let row = rows
                .iter()
                .find(|r| r["path"] == path && r["dir"] == dir && r["size"] == size)
                .unwrap_or_else(|| panic!("no {path} {dir} {size} row in {report}"));
            assert!(
                row["frames"].as_u64().unwrap_or(0) > 0,
                "no frames moved: {row}"
            );
        }
    }
    assert!(svg.starts_with("<svg") && svg.contains("nmvm TX") && svg.contains("copy limit"));
}
