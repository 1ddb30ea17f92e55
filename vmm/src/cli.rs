//! The `nmvm` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::verdict;

const EXIT_CODES: &str = "\
Exit status of `nmvm run`:
  0-249  the guest's own status, written to the exit port (0xf4); 0 also
         when the guest resets the VM on purpose (i8042 reset, reboot=k)
  249    also: a guest status in the reserved range 250-255
  251    a guest kernel panic was seen on the console
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
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
