//! `nmvm bench` end to end: a short run measures every path, writes JSON
//! and a plot, and ends with the ratio lines. (A functional check: rates
//! on our shared machines are read from the benchmark, never asserted.)

mod common;

use std::time::Duration;

use common::{nmvm, run_with_deadline, text};

#[test]
fn quick_bench_measures_every_path_and_prints_ratios_last() {
    let dir = std::env::temp_dir().join(format!("nmvm-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (json, plot) = (dir.join("r.json"), dir.join("p.svg"));
    let out = run_with_deadline(
        nmvm()
            .args([
                "bench",
                "--quick",
                "--seconds",
                "0.1",
                "--repeat",
                "1",
                "--json",
            ])
            .arg(&json)
            .arg("--plot")
            .arg(&plot),
        Duration::from_secs(60),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    let last: Vec<&str> = stdout.lines().rev().take(4).collect();
    assert!(
        last.iter()
            .all(|l| l.starts_with("ratio ") && l.contains("of the copy limit")),
        "the last lines must be the ratios:\n{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("json");
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
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(svg.starts_with("<svg") && svg.contains("nmvm TX") && svg.contains("copy limit"));
    let _ = std::fs::remove_dir_all(&dir);
}
