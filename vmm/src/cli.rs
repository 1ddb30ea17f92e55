//! The `nmvm` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use regex::Regex;

use crate::verdict;

const EXIT_CODES: &str = "\
Exit status of `nmvm run`:
  0-249  the guest's own status, written to the exit port (0xf4); 0 also
         when the guest resets the VM on purpose (i8042 reset, reboot=k),
         and when every --expect pattern has appeared
  249    also: a guest status in the reserved range 250-255
  250    console check failed: an --expect-fail pattern appeared, or the
         guest ended the run before every --expect pattern appeared
  251    a guest kernel panic was seen on the console (even if the guest
         then reset the VM)
  252    the guest triple-faulted or shut down
  253    the hypervisor could not emulate an instruction or failed
  254    timeout
  255    nmvm itself failed (bad arguments, unusable image, no /dev/kvm)
  130/143 stopped by SIGINT/SIGTERM";

/// nmvm: a minimal VMM with one virtio-net device on netmap rings.
#[derive(Debug, Parser)]
#[command(name = "nmvm", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// nmvm's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM: the bundled guest by default, or a Linux kernel.
    #[command(after_help = EXIT_CODES)]
    Run(RunArgs),
}

/// Options of `nmvm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel to boot: an ELF vmlinux or a bzImage (64-bit boot protocol).
    /// Without it, nmvm boots its bundled guest.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk to load for the kernel.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Default for a --kernel: "console=ttyS0
    /// reboot=k panic=-1"; for the bundled guest: empty (see its words
    /// exit=N, wait=S, fault=panic|triple|sse).
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest RAM: a number of bytes with an optional K, M, G or T suffix
    /// (powers of 1024), e.g. 256M or 1G.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u8,
    /// Print boot timings, VM exits and VMM memory to stderr at exit.
    #[arg(long)]
    pub stats: bool,
    /// End the run after DURATION (e.g. 90, 90s, 1500ms, 2m) with the
    /// timeout verdict, printing the last console lines.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Also write the console to FILE, unbuffered, so it survives even a
    /// `kill -9` of nmvm.
    #[arg(long, value_name = "FILE")]
    pub serial_log: Option<PathBuf>,
    /// Do not copy the console to stdout (use with --serial-log).
    #[arg(long)]
    pub quiet: bool,
    /// A regular expression the console must show; repeatable. The run
    /// succeeds (status 0) and the VM is stopped as soon as every pattern
    /// has appeared.
    #[arg(long, value_name = "PATTERN", value_parser = parse_regex)]
    pub expect: Vec<Regex>,
    /// A regular expression that fails the run (status 250) as soon as it
    /// appears on the console; repeatable.
    #[arg(long, value_name = "PATTERN", value_parser = parse_regex)]
    pub expect_fail: Vec<Regex>,
    /// Write a report at exit: `json` to stderr, or `json:FILE` to FILE.
    /// It has the verdict, exit status, boot timings, VM exits and the
    /// patterns matched.
    #[arg(long, value_name = "FORMAT", value_parser = parse_report)]
    pub report: Option<ReportTarget>,
}

/// Where `--report` goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportTarget {
    /// JSON on stderr.
    JsonStderr,
    /// JSON in a file.
    JsonFile(PathBuf),
}

fn parse_report(s: &str) -> Result<ReportTarget, String> {
    match s.split_once(':') {
        None if s == "json" => Ok(ReportTarget::JsonStderr),
        Some(("json", path)) if !path.is_empty() => Ok(ReportTarget::JsonFile(path.into())),
        _ => Err(format!(
            "'{s}' is not a report format: use json or json:FILE"
        )),
    }
}

fn parse_regex(s: &str) -> Result<Regex, String> {
    Regex::new(s).map_err(|e| {
        let first = e.to_string();
        let last = first.lines().last().unwrap_or("invalid").trim().to_string();
        format!("'{s}' is not a valid regular expression ({last})")
    })
}

/// Parses a duration: seconds by default, or with a `ms`, `s`, `m` or `h`
/// suffix; fractions allowed (`1.5s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration: use e.g. 90, 90s, 1500ms or 2m"))?;
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("'{s}' is not a positive duration"));
    }
    Duration::try_from_secs_f64(value * scale).map_err(|_| format!("'{s}' is too long"))
}

/// Default command line for a user-supplied kernel.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Parses a size such as `256M`, `1G`, `4096` or `512k`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "'{s}' is not a size: use a number with an optional K, M, G or T suffix, e.g. 256M"
        ));
    }
    let shift = match suffix.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "'{suffix}' is not a size suffix: use K, M, G or T, e.g. 256M"
            ))
        }
    };
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// The exit status for a command-line error.
pub fn usage_error_code() -> u8 {
    verdict::EXIT_VMM_ERROR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn bad_sizes_say_what_is_expected() {
        for bad in ["", "M", "12Q", "-1", "1.5G", "99999999999999999999"] {
            let e = parse_size(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(parse_size("17179869184T").is_err());
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "abc", "0", "-1s", "1d", "inf", "1e300h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn report_targets() {
        assert_eq!(parse_report("json"), Ok(ReportTarget::JsonStderr));
        assert_eq!(
            parse_report("json:/tmp/r.json"),
            Ok(ReportTarget::JsonFile("/tmp/r.json".into()))
        );
        assert!(parse_report("xml").is_err());
        assert!(parse_report("json:").is_err());
    }

    #[test]
    fn bad_regex_is_explained() {
        let e = parse_regex("a(").unwrap_err();
        assert!(e.contains("not a valid regular expression"), "{e}");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
