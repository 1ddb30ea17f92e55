//! How a run ended, and the process exit status that reports it.
//!
//! Guest statuses written to the exit port are passed through unchanged
//! below 250; nmvm's own verdicts use 250–255, which typical guest test
//! programs do not use (signals keep the shell's 128+N convention). A guest that writes a status in that range is
//! reported as 249 (and the original value is logged).

use std::fmt;

/// The console check failed: an `--expect-fail` pattern appeared, or the
/// guest ended the run before every `--expect` pattern had appeared.
pub const EXIT_CONSOLE_CHECK: u8 = 250;
/// A guest kernel panic was seen on the console.
pub const EXIT_PANIC: u8 = 251;
/// The guest triple-faulted or shut the machine down without an exit
/// status.
pub const EXIT_TRIPLE_FAULT: u8 = 252;
/// The hypervisor could not emulate an instruction or failed internally.
pub const EXIT_INTERNAL: u8 = 253;
/// The run hit its `--timeout`.
pub const EXIT_TIMEOUT: u8 = 254;
/// nmvm itself failed: bad command line, unusable image, missing /dev/kvm…
pub const EXIT_VMM_ERROR: u8 = 255;
/// Guest statuses at or above this are nmvm's.
pub const FIRST_RESERVED: u8 = 250;
/// What a guest status in the reserved range is reported as.
pub const EXIT_GUEST_STATUS_CLAMPED: u8 = 249;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote this status to the exit port.
    GuestExit(u8),
    /// The guest reset the machine (i8042 reset or a reset request).
    GuestReset,
    /// The guest triple-faulted or shut down.
    TripleFault,
    /// A guest kernel panic was seen on the console.
    Panic,
    /// Every `--expect` pattern appeared.
    ExpectationsMet,
    /// An `--expect-fail` pattern appeared (the text it matched).
    ForbiddenOutput(String),
    /// The guest ended the run before every `--expect` pattern appeared.
    ExpectationsMissing,
    /// The run reached its `--timeout`.
    Timeout,
    /// The hypervisor failed to emulate or run the guest.
    Internal(String),
    /// A signal (SIGINT, SIGTERM) asked nmvm to stop.
    Signal(i32),
    /// nmvm failed while the VM ran.
    Vmm(String),
}

impl StopReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> u8 {
        match self {
            StopReason::GuestExit(s) if *s >= FIRST_RESERVED => EXIT_GUEST_STATUS_CLAMPED,
            StopReason::GuestExit(s) => *s,
            StopReason::GuestReset => 0,
            StopReason::TripleFault => EXIT_TRIPLE_FAULT,
            StopReason::Panic => EXIT_PANIC,
            StopReason::ExpectationsMet => 0,
            StopReason::ForbiddenOutput(_) | StopReason::ExpectationsMissing => EXIT_CONSOLE_CHECK,
            StopReason::Timeout => EXIT_TIMEOUT,
            StopReason::Internal(_) => EXIT_INTERNAL,
            // The shell convention for death by signal.
            StopReason::Signal(sig) => 128u8.saturating_add(*sig as u8),
            StopReason::Vmm(_) => EXIT_VMM_ERROR,
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::GuestExit(s) => write!(f, "the guest exited with status {s}"),
            StopReason::GuestReset => write!(f, "the guest reset the VM"),
            StopReason::TripleFault => write!(f, "the guest triple-faulted (shutdown)"),
            StopReason::Panic => write!(f, "the guest kernel panicked"),
            StopReason::ExpectationsMet => write!(f, "every expected pattern appeared"),
            StopReason::ForbiddenOutput(text) => {
                write!(f, "forbidden output appeared on the console: {text:?}")
            }
            StopReason::ExpectationsMissing => {
                write!(
                    f,
                    "the guest stopped before every expected pattern appeared"
                )
            }
            StopReason::Timeout => write!(f, "timeout"),
            StopReason::Internal(why) => write!(f, "the hypervisor stopped the guest: {why}"),
            StopReason::Signal(sig) => write!(f, "stopped by signal {sig}"),
            StopReason::Vmm(why) => write!(f, "nmvm failed: {why}"),
        }
    }
}

impl StopReason {
    /// A short stable name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            StopReason::GuestExit(_) => "guest-exit",
            StopReason::GuestReset => "guest-reset",
            StopReason::TripleFault => "triple-fault",
            StopReason::Panic => "panic",
            StopReason::ExpectationsMet => "expect-met",
            StopReason::ForbiddenOutput(_) => "expect-fail",
            StopReason::ExpectationsMissing => "expect-missing",
            StopReason::Timeout => "timeout",
            StopReason::Internal(_) => "internal-error",
            StopReason::Signal(_) => "signal",
            StopReason::Vmm(_) => "vmm-error",
        }
    }

    /// The verdict once the console has been taken into account: a panic
    /// seen on the console outranks how the guest then ended the run (Linux
    /// resets after a panic with `panic=N`), and a guest that ends the run
    /// normally before the expected output appeared fails the check.
    pub fn resolve(self, panicked: bool, expectations_missing: bool) -> StopReason {
        match self {
            StopReason::GuestExit(_) | StopReason::GuestReset | StopReason::TripleFault
                if panicked =>
            {
                StopReason::Panic
            }
            StopReason::GuestExit(0) | StopReason::GuestReset if expectations_missing => {
                StopReason::ExpectationsMissing
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_statuses_pass_through_below_the_reserved_range() {
        assert_eq!(StopReason::GuestExit(0).exit_code(), 0);
        assert_eq!(StopReason::GuestExit(7).exit_code(), 7);
        assert_eq!(StopReason::GuestExit(249).exit_code(), 249);
        assert_eq!(
            StopReason::GuestExit(250).exit_code(),
            EXIT_GUEST_STATUS_CLAMPED
        );
        assert_eq!(
            StopReason::GuestExit(255).exit_code(),
            EXIT_GUEST_STATUS_CLAMPED
        );
    }

    #[test]
    fn nmvm_verdicts_are_distinct_and_reserved() {
        let codes = [
            EXIT_CONSOLE_CHECK,
            EXIT_PANIC,
            EXIT_TRIPLE_FAULT,
            EXIT_INTERNAL,
            EXIT_TIMEOUT,
            EXIT_VMM_ERROR,
        ];
        for (i, a) in codes.iter().enumerate() {
            assert!(*a >= FIRST_RESERVED);
            assert!(codes[i + 1..].iter().all(|b| b != a));
        }
        assert_eq!(StopReason::GuestReset.exit_code(), 0);
        assert_eq!(StopReason::Signal(libc::SIGINT).exit_code(), 130);
    }

    #[test]
    fn a_panic_seen_first_outranks_a_reset() {
        assert_eq!(
            StopReason::GuestReset.resolve(true, false),
            StopReason::Panic
        );
        assert_eq!(
            StopReason::GuestReset.resolve(false, false),
            StopReason::GuestReset
        );
        assert_eq!(
            StopReason::Timeout.resolve(true, false),
            StopReason::Timeout
        );
    }

    #[test]
    fn a_clean_end_without_the_expected_output_fails() {
        assert_eq!(
            StopReason::GuestExit(0).resolve(false, true),
            StopReason::ExpectationsMissing
        );
        // A failing guest keeps its own status.
        assert_eq!(
            StopReason::GuestExit(3).resolve(false, true),
            StopReason::GuestExit(3)
        );
        assert_eq!(
            StopReason::ExpectationsMet.resolve(false, false),
            StopReason::ExpectationsMet
        );
    }
}
