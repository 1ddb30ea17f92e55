//! The `nmvm` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nmvm_devices::netmap::shm;
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
    /// Measure the data path: the virtio-net device model and its netmap
    /// backend driven by a synthetic guest driver, against the copy limit
    /// (and the tap path) in the same run.
    #[command(after_help = BENCH_HELP)]
    Bench(BenchArgs),
    /// Boot the bundled guest as an echo appliance on a userspace netmap
    /// pipe, send it real frames with pkt-gen, and report what came back.
    Demo(DemoArgs),
    /// Generate, receive, echo or ping test traffic on a netmap port, like
    /// netmap's pkt-gen; every received frame is checked.
    #[command(name = "pkt-gen", after_help = PKTGEN_HELP)]
    PktGen(PktGenArgs),
    /// Serve the virtio-net device to another VMM (QEMU, …) over
    /// vhost-user: the same device model and worker as `nmvm run`, on a
    /// netmap port.
    #[command(name = "vhost-user", after_help = VHOST_USER_HELP)]
    VhostUser(VhostUserArgs),
}

const VHOST_USER_HELP: &str = "\
nmvm creates the socket and serves one frontend at a time, for as many
connections as come (or --connections N), until SIGINT/SIGTERM. The frontend
handles the device's MAC, link status and control queue; nmvm moves the
packets between the guest's rings and the netmap port. Guest memory must be
shared with nmvm (QEMU: memory-backend-memfd with share=on).

Example with QEMU (QEMU 7.2 under TCG needs vectors=0 on the device):
  nmvm vhost-user --socket /tmp/vu.sock --net 'shm:lab{0' &
  qemu-system-x86_64 -m 512 -object memory-backend-memfd,id=mem,size=512M,share=on \\
    -numa node,memdev=mem -chardev socket,id=c0,path=/tmp/vu.sock \\
    -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0,vectors=0 ...
  nmvm pkt-gen -i 'shm:lab}0' -f rx

Exit status: 0 once stopped (or after --connections N), 255 if the socket or
the port cannot be opened. A frontend that sends a bad request is told so,
logged, and disconnected; the next connection is served.";

/// Options of `nmvm vhost-user`.
#[derive(Debug, Args)]
pub struct VhostUserArgs {
    /// The Unix socket to create (a stale socket there is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The netmap port behind the device: `shm:NAME{N` / `shm:NAME}N`, or
    /// with the netmap kernel module `netmap:eth0`, `vale0:vm1`, …
    #[arg(long, value_name = "PORT")]
    pub net: String,
    /// Create the userspace pipe of --net with a 12-byte virtio-net header
    /// in front of every frame: the device then offers checksum and TSO
    /// offloads, which pass through to the peer.
    #[arg(long)]
    pub vnet_hdr: bool,
    #[command(flatten)]
    pub pipe: PipeArgs,
    /// Exit after serving N connections (default: serve until stopped).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub connections: Option<u64>,
    /// Print the device's counters when each connection ends.
    #[arg(long)]
    pub stats: bool,
    /// Debugging only: run without the seccomp filters (nmvm prints a
    /// warning). Never use it with an untrusted frontend or netmap peer.
    #[arg(long)]
    pub no_seccomp: bool,
}

/// How a userspace pipe is laid out, for commands that may open it first.
#[derive(Debug, Args)]
pub struct PipeArgs {
    /// Slots per ring of a userspace pipe, if this end opens it first
    /// (the end that comes second takes the first one's size). Smaller
    /// rings keep fewer buffers in flight; larger ones absorb longer bursts.
    #[arg(
        long,
        value_name = "N",
        default_value_t = shm::DEFAULT_SLOTS,
        value_parser = clap::value_parser!(u32).range(i64::from(shm::MIN_SLOTS)..=i64::from(shm::MAX_SLOTS)),
    )]
    pub pipe_slots: u32,
}

const BENCH_HELP: &str = "\
Rows: copy (the copy limit), nmvm and passthrough (the synthetic driver on
the virtio path and on passed-through netmap rings), guest-virtio and
guest-netmap (the bundled guest in a VM, its packet loop at CPL 3; needs
/dev/kvm), tap (the tap path, needs CAP_NET_ADMIN), and with --dpdk
vhost-dpdk and vhost-nmvm: DPDK's virtio_user driver (testpmd) against DPDK's
own vhost-user backend and against `nmvm vhost-user` + a netmap pipe +
pkt-gen, each side pinned to one core; every frame is accounted for on every
side. The last lines are the ratios (nmvm against the copy limit, the tap
path and DPDK); the race's also give the context switches per second of the
backend side's processes (from /proc).

Examples:
  nmvm bench --quick                       # under a minute
  nmvm bench --json r.json --plot r.svg    # every size, medians of 3
  nmvm bench --dpdk-only                   # the DPDK race alone (a few minutes)";

const PKTGEN_HELP: &str = "\
Frames are Ethernet/IPv4/UDP with a sequence number and a pattern in the
payload, so the receiver can tell intact, corrupt, lost and reordered frames
apart (--no-check: counted only, for frames from other generators and for
benchmarks). Exit status: 0, or 1 if any received frame was corrupt or lost, or 255
on an error (e.g. the port cannot be opened).

Examples:
  nmvm pkt-gen -i 'shm:lab{0' -f rx -n 1000000
  nmvm pkt-gen -i 'shm:lab}0' -f tx -n 1000000 -l 60 -l 1514";

/// Options of `nmvm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// 64- and 1514-byte frames only, 0.3 s per point (under a minute).
    #[arg(long)]
    pub quick: bool,
    /// Seconds per measurement (default 1, or 0.3 with --quick).
    #[arg(long, value_name = "SECONDS")]
    pub seconds: Option<f64>,
    /// Measure every point N times and report the median (the table also
    /// gives the lowest and highest): the machines are shared and noisy.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeat: u32,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also draw Mpps against frame size as an SVG plot in FILE.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Also race DPDK: its virtio_user driver against DPDK's own vhost-user
    /// backend and against `nmvm vhost-user` with pkt-gen behind a netmap
    /// pipe, 64 and 1514 bytes, both directions, one core per side.
    /// Installs Debian's dpdk-dev (as root) if dpdk-testpmd is missing.
    #[arg(long)]
    pub dpdk: bool,
    /// Only the DPDK race (see --dpdk), none of the other rows.
    #[arg(long)]
    pub dpdk_only: bool,
    /// Slots per ring of the netmap pipe between `nmvm vhost-user` and
    /// pkt-gen in the DPDK race: small enough that the buffers in flight
    /// stay in a core's L2 at 1514 bytes (the default), or 1024 (the pipes'
    /// usual size) to see what that costs.
    #[arg(
        long,
        value_name = "N",
        default_value_t = crate::dpdk::PIPE_SLOTS,
        value_parser = clap::value_parser!(u32).range(i64::from(shm::MIN_SLOTS)..=i64::from(shm::MAX_SLOTS)),
    )]
    pub race_pipe_slots: u32,
    /// Only the device worker's TX path for COUNT 64-byte frames, for
    /// instruction counting under callgrind (see `just bench-callgrind`).
    #[arg(long, value_name = "COUNT")]
    pub worker_frames: Option<u64>,
}

/// Options of `nmvm demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Round trips to make.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    pub frames: u64,
    /// Frames in flight at once.
    #[arg(short = 'b', long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub window: u32,
    /// Debugging only: run without the seccomp filters (nmvm prints a
    /// warning).
    #[arg(long)]
    pub no_seccomp: bool,
}

/// Options of `nmvm pkt-gen` (netmap pkt-gen's letters).
#[derive(Debug, Args)]
pub struct PktGenArgs {
    /// The netmap port: shm:NAME{N / shm:NAME}N, netmap:eth0, vale0:x, …
    /// (a bare name gets netmap: prepended, as in pkt-gen).
    #[arg(short = 'i', long = "interface", value_name = "PORT")]
    pub port: String,
    /// tx, rx, ping or pong.
    #[arg(short = 'f', long = "function", value_name = "MODE", default_value = "rx", value_parser = parse_mode)]
    pub mode: crate::pktgen::Mode,
    /// Frame length without CRC (60..1514); given twice, lengths vary
    /// between the two.
    #[arg(short = 'l', long = "length", value_name = "LEN", value_parser = clap::value_parser!(u16).range(60..=1514))]
    pub len: Vec<u16>,
    /// Frames to send or receive; 0 runs until Ctrl-C.
    #[arg(short = 'n', long = "count", value_name = "N", default_value_t = 0)]
    pub count: u64,
    /// Burst size (frames per sync; in ping mode, frames in flight).
    #[arg(short = 'b', long = "burst", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=8192))]
    pub batch: Option<u32>,
    /// Report interval in milliseconds.
    #[arg(
        short = 'T',
        long = "report-ms",
        value_name = "MS",
        default_value_t = 1000
    )]
    pub report_ms: u64,
    /// Source IP[:PORT].
    #[arg(short = 's', long = "src-ip", value_name = "IP[:PORT]", value_parser = parse_ip_port)]
    pub src: Option<([u8; 4], Option<u16>)>,
    /// Destination IP[:PORT].
    #[arg(short = 'd', long = "dst-ip", value_name = "IP[:PORT]", value_parser = parse_ip_port)]
    pub dst: Option<([u8; 4], Option<u16>)>,
    /// Source MAC.
    #[arg(short = 'S', long = "src-mac", value_name = "MAC", value_parser = parse_any_mac)]
    pub src_mac: Option<[u8; 6]>,
    /// Destination MAC (default broadcast).
    #[arg(short = 'D', long = "dst-mac", value_name = "MAC", value_parser = parse_any_mac)]
    pub dst_mac: Option<[u8; 6]>,
    /// Seconds to wait before starting.
    #[arg(
        short = 'w',
        long = "wait-link",
        value_name = "SECONDS",
        default_value_t = 0
    )]
    pub wait_link: u64,
    /// virtio-net header length on the port (0, 10 or 12): a userspace
    /// pipe created by pkt-gen carries it; frames are sent with a zeroed
    /// header and received headers are skipped.
    #[arg(short = 'H', long = "vnet-hdr", value_name = "LEN", value_parser = parse_hdr_len)]
    pub vnet_hdr_len: Option<u32>,
    #[command(flatten)]
    pub pipe: PipeArgs,
    /// Stop receiving after this long without a frame (rx, ping, pong).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Benchmark mode, like netmap's pkt-gen: tx writes only the MAC
    /// addresses into each frame, rx counts frames without reading them.
    /// Without it every frame is built and checked in full.
    #[arg(long)]
    pub no_check: bool,
    /// Debugging only: run without the seccomp filters (nmvm prints a
    /// warning). Never use it with an untrusted peer.
    #[arg(long)]
    pub no_seccomp: bool,
}

fn parse_hdr_len(s: &str) -> Result<u32, String> {
    match s {
        "0" => Ok(0),
        "10" => Ok(10),
        "12" => Ok(12),
        _ => Err(format!(
            "'{s}' is not a virtio-net header length: use 0, 10 or 12"
        )),
    }
}

fn parse_mode(s: &str) -> Result<crate::pktgen::Mode, String> {
    use crate::pktgen::Mode;
    match s {
        "tx" => Ok(Mode::Tx),
        "rx" => Ok(Mode::Rx),
        "ping" => Ok(Mode::Ping),
        "pong" => Ok(Mode::Pong),
        _ => Err(format!(
            "'{s}' is not a pkt-gen function: use tx, rx, ping or pong"
        )),
    }
}

fn parse_ip_port(s: &str) -> Result<([u8; 4], Option<u16>), String> {
    let (ip, port) = match s.split_once(':') {
        Some((ip, port)) => (
            ip,
            Some(
                port.parse::<u16>()
                    .map_err(|_| format!("'{port}' is not a UDP port"))?,
            ),
        ),
        None => (s, None),
    };
    let addr: std::net::Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("'{ip}' is not an IPv4 address"))?;
    Ok((addr.octets(), port))
}

fn parse_any_mac(s: &str) -> Result<[u8; 6], String> {
    if s.eq_ignore_ascii_case("ff:ff:ff:ff:ff:ff") {
        return Ok([0xff; 6]);
    }
    parse_mac(s).or_else(|e| {
        // Multicast destinations are fine for a traffic generator.
        let mut m = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(e);
        }
        for (b, p) in m.iter_mut().zip(parts) {
            *b = u8::from_str_radix(p, 16).map_err(|_| e.clone())?;
        }
        Ok(m)
    })
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
    /// reboot=k panic=-1"; for the bundled guest: empty. The bundled guest
    /// understands exit=N|reset, wait=S, fault=panic|triple|sse, and with
    /// --net: net=echo|sink|gen|hostile, count=N, len=L or len=MIN-MAX.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest RAM: a number of bytes with an optional K, M, G or T suffix
    /// (powers of 1024), e.g. 256M or 1G.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u8,
    /// Hypervisor: kvm (Linux) or bhyve (FreeBSD's vmm.ko). Default: the
    /// OS's own.
    #[arg(long, value_name = "kvm|bhyve")]
    pub hypervisor: Option<crate::hypervisor::Backend>,
    /// Attach the VM's virtio-net device to this netmap port:
    /// `shm:NAME{N` / `shm:NAME}N` (the two ends of a userspace netmap
    /// pipe, no kernel module needed), or with the netmap kernel module
    /// `netmap:eth0`, `netmap:eth0^`, `vale0:vm1`, `netmap:p{1`, …
    #[arg(long, value_name = "PORT")]
    pub net: Option<String>,
    /// Create the userspace pipe of --net with a 12-byte virtio-net header
    /// in front of every frame, so that checksum and TSO offloads pass
    /// through to the peer (kernel ports: ask the VALE port for it).
    #[arg(long)]
    pub vnet_hdr: bool,
    /// Let a netmap-aware guest operate the port's rings itself: map the
    /// port's netmap memory region into the guest (BAR 2 of the device)
    /// and offer feature bit 45. See the README, "Netmap passthrough".
    #[arg(long, requires = "net")]
    pub passthrough: bool,
    #[command(flatten)]
    pub pipe: PipeArgs,
    /// The virtio-net device's MAC address.
    #[arg(long, value_name = "MAC", default_value = "52:54:00:12:34:56", value_parser = parse_mac)]
    pub mac: [u8; 6],
    /// Print boot timings, VM exits, network counters and VMM memory to
    /// stderr at exit.
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
    /// Debugging only: run without the per-thread seccomp filters (nmvm
    /// prints a warning). Never use it with an untrusted guest or peer.
    #[arg(long)]
    pub no_seccomp: bool,
}

/// Where `--report` goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportTarget {
    /// JSON on stderr.
    JsonStderr,
    /// JSON in a file.
    JsonFile(PathBuf),
}

/// Parses a MAC address such as `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("'{s}' is not a MAC address: use six hex bytes like 52:54:00:12:34:56");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "'{s}' is a multicast address; a NIC needs a unicast one"
        ));
    }
    Ok(mac)
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
    fn mac_addresses() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Ok([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "zz:54:00:12:34:56",
            "5:54:00:12:34:56",
            "01:00:5e:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
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
