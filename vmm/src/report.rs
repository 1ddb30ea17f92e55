//! The machine-readable report of a run (`--report json`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use crate::verdict::StopReason;
use crate::vm::RunOutcome;

/// VM exits by kind.
#[derive(Debug, Serialize)]
pub struct ExitCounts {
    /// All exits.
    pub total: u64,
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// Runs interrupted to stop the VM.
    pub interrupted: u64,
    /// Everything else.
    pub other: u64,
}

/// One `--expect` pattern.
#[derive(Debug, Serialize)]
pub struct PatternReport {
    /// The regular expression.
    pub pattern: String,
    /// Whether it appeared.
    pub matched: bool,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Short verdict name (`guest-exit`, `timeout`, `panic`, …).
    pub verdict: &'static str,
    /// nmvm's exit status.
    pub exit_code: u8,
    /// The verdict in words.
    pub message: String,
    /// The guest's status, when it wrote one.
    pub guest_status: Option<u8>,
    /// Milliseconds from nmvm's start to the guest's first VM exit.
    pub first_instruction_ms: Option<f64>,
    /// Milliseconds to the first console output.
    pub first_output_ms: Option<f64>,
    /// Milliseconds to the verdict.
    pub verdict_ms: Option<f64>,
    /// VM exits.
    pub exits: Option<ExitCounts>,
    /// `--expect` patterns.
    pub expect: Vec<PatternReport>,
    /// What an `--expect-fail` pattern matched, if one did.
    pub expect_fail_matched: Option<String>,
    /// VMM resident memory beyond guest RAM, KiB.
    pub vmm_rss_kib: Option<u64>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Report {
    /// The report of a run that reached a verdict.
    pub fn from_outcome(o: &RunOutcome) -> Self {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let e = &o.exits;
        Report {
            verdict: o.reason.name(),
            exit_code: o.reason.exit_code(),
            message: o.reason.to_string(),
            guest_status: match o.reason {
                StopReason::GuestExit(s) => Some(s),
                _ => None,
            },
            first_instruction_ms: o.first_exit.map(ms),
            first_output_ms: o.first_output.map(ms),
            verdict_ms: Some(ms(o.elapsed)),
            exits: Some(ExitCounts {
                total: e.total(),
                io_in: get(&e.io_in),
                io_out: get(&e.io_out),
                mmio_read: get(&e.mmio_read),
                mmio_write: get(&e.mmio_write),
                interrupted: get(&e.interrupted),
                other: get(&e.other),
            }),
            expect: o
                .expectations
                .iter()
                .map(|(pattern, matched)| PatternReport {
                    pattern: pattern.clone(),
                    matched: *matched,
                })
                .collect(),
            expect_fail_matched: match &o.reason {
                StopReason::ForbiddenOutput(text) => Some(text.clone()),
                _ => None,
            },
            vmm_rss_kib: o.vmm_rss_kib,
        }
    }

    /// The report of a run that failed before it could start.
    pub fn vmm_error(message: String) -> Self {
        let reason = StopReason::Vmm(message);
        Report {
            verdict: reason.name(),
            exit_code: reason.exit_code(),
            message: reason.to_string(),
            guest_status: None,
            first_instruction_ms: None,
            first_output_ms: None,
            verdict_ms: None,
            exits: None,
            expect: Vec::new(),
            expect_fail_matched: None,
            vmm_rss_kib: None,
        }
    }

    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}
