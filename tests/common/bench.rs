//! Running `nmvm bench` the way its tests do: into a scratch directory, with
//! a JSON report and a plot, within a deadline.

use std::time::Duration;

use super::{nmvm, run_with_deadline, scratch_dir, text};

/// What one `nmvm bench` run left behind.
pub struct BenchRun {
    /// Its standard output (the table and the closing lines).
    pub stdout: String,
    /// The `--json` report.
    pub report: serde_json::Value,
    /// The `--plot` SVG.
    pub svg: String,
}

/// Runs `nmvm bench ARGS --json … --plot …` and fails the test unless it
/// succeeds within `limit` and writes both files.
pub fn run_bench(name: &str, args: &[&str], limit: Duration) -> BenchRun {
    let dir = scratch_dir(name);
    let (json, plot) = (dir.join("r.json"), dir.join("p.svg"));
    let out = run_with_deadline(
        nmvm()
            .arg("bench")
            .args(args)
            .arg("--json")
            .arg(&json)
            .arg("--plot")
            .arg(&plot),
        limit,
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");
    let report = std::fs::read_to_string(&json).expect("json written");
    let report = serde_json::from_str(&report).expect("the report is JSON");
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    let _ = std::fs::remove_dir_all(&dir);
    BenchRun {
        stdout,
        report,
        svg,
    }
}

/// The last `n` lines of `stdout`, last first.
pub fn last_lines(stdout: &str, n: usize) -> Vec<&str> {
    stdout.lines().rev().take(n).collect()
}
