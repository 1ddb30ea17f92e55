//! The race against DPDK (`nmvm bench --dpdk`): DPDK's `virtio_user`, a
//! complete virtio-net driver that runs as a host process, drives a
//! vhost-user backend at full speed, and the same driver with the same
//! options and pinning is raced against two backends:
//!
//! - DPDK's own `net_vhost` (testpmd `rxonly` / `txonly`): the reference;
//! - `nmvm vhost-user` on a userspace netmap pipe, with `nmvm pkt-gen
//!   --no-check` on the far end of the pipe.
//!
//! Every side is a separate process, started as a user would start it. The
//! driver's testpmd runs alone on the second core; the backend side (DPDK's
//! testpmd, or nmvm's vhost-user process and pkt-gen together) on the first.
//! The rate is the driver testpmd's own per-second figure (median of the
//! seconds after the first), the same measuring point for both backends.
//!
//! Each run also accounts for every frame: the sender stops first, the
//! receiver drains, and the final counters of the driver, the backend and
//! (for nmvm) pkt-gen must agree exactly.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

/// The frame sizes raced (bytes of frame, as testpmd's `--txpkts` counts).
pub const SIZES: [usize; 2] = [64, 1514];

/// Slots per ring of the netmap pipe between `nmvm vhost-user` and pkt-gen
/// unless `nmvm bench --race-pipe-slots` says otherwise. A pipe keeps two rings' worth of buffers in flight, and at 1514 bytes
/// the worker's copy runs at the speed of the cache those buffers live in:
/// with the default 1024 slots they are 3 MiB, more than a core's L2, and
/// on a machine with 2 MiB of L2 per core the race ran 10-25 % slower at
/// 1514 B than with 256 slots (768 KiB; about 6.2 against 7.6 Mpps in TX).
/// 128 slots gained nothing more there and lost at 64 B, where each
/// wake-up of pkt-gen then covers too few frames. (On an earlier machine
/// with 512 KiB of L2, where neither size fits, 256 and 1024 slots ran
/// within the noise of each other.)
pub const PIPE_SLOTS: u32 = 256;

/// The Debian package that provides `dpdk-testpmd`.
pub const DPDK_PACKAGE: &str = "dpdk-dev";

/// Errors of the race.
#[derive(Debug, Error)]
pub enum RaceError {
    /// testpmd is missing and could not be installed.
    #[error("dpdk-testpmd not found: {0}")]
    NoTestpmd(String),
    /// The race pins each side to a core of its own.
    #[error("the race needs two CPU cores to pin its two sides to; this process may use {0}")]
    Cores(usize),
    /// A process did not start.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which process.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A process ended, or never got ready, when it should not have.
    #[error("{what} {how}; its last output:\n{tail}")]
    Process {
        /// Which process.
        what: String,
        /// What went wrong.
        how: String,
        /// The end of its output.
        tail: String,
    },
    /// Setting up the run's directory.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Which backend serves the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// DPDK's `net_vhost` in testpmd.
    Dpdk,
    /// `nmvm vhost-user` on a userspace netmap pipe, pkt-gen behind it.
    Nmvm,
}

impl Backend {
    /// The row name in the bench report.
    pub fn path(self) -> &'static str {
        match self {
            Backend::Dpdk => "vhost-dpdk",
            Backend::Nmvm => "vhost-nmvm",
        }
    }

    /// What the backend side does per frame.
    pub fn work(self, dir: Dir) -> &'static str {
        match (self, dir) {
            (Backend::Dpdk, Dir::Tx) => {
                "net_vhost copies each frame from the driver's buffer into an mbuf (1 copy); testpmd rxonly frees it"
            }
            (Backend::Dpdk, Dir::Rx) => {
                "testpmd txonly builds each frame in an mbuf from a template; net_vhost copies it into the driver's buffer (1 copy)"
            }
            (Backend::Nmvm, Dir::Tx) => {
                "the device worker copies each frame from the driver's buffer into a netmap slot (1 copy); pkt-gen --no-check counts the slot"
            }
            (Backend::Nmvm, Dir::Rx) => {
                "pkt-gen --no-check writes the MAC addresses into a netmap slot; the device worker copies the frame into the driver's buffer (1 copy)"
            }
        }
    }
}

/// Which way frames flow, from the driver's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    /// The driver (`virtio_user`, testpmd txonly) transmits.
    Tx,
    /// The driver receives (testpmd rxonly).
    Rx,
}

impl Dir {
    /// `tx` or `rx`.
    pub fn name(self) -> &'static str {
        match self {
            Dir::Tx => "tx",
            Dir::Rx => "rx",
        }
    }
}

/// Where the programs are and how long each point runs.
#[derive(Debug, Clone)]
pub struct RaceConfig {
    /// `dpdk-testpmd`.
    pub testpmd: PathBuf,
    /// The `nmvm` binary (for `vhost-user` and `pkt-gen`).
    pub nmvm: PathBuf,
    /// Seconds measured (after the first second with traffic).
    pub seconds: f64,
    /// The backend side's core and the driver's core.
    pub cores: (usize, usize),
    /// Slots per ring of nmvm's pipe ([`PIPE_SLOTS`] unless asked).
    pub pipe_slots: u32,
}

/// The final counters of one run, every side's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Frames the sending side handed over (testpmd TX-packets, or pkt-gen's
    /// sent frames that the device took).
    pub sent: u64,
    /// Frames the backend moved (nmvm: the device's counter; DPDK: the
    /// testpmd on the backend side).
    pub backend: u64,
    /// Frames the receiving side counted (testpmd RX-packets, or pkt-gen's
    /// received frames).
    pub received: u64,
    /// Frames the nmvm device dropped as malformed or left unsent when the
    /// connection ended (must be 0).
    pub device_dropped: u64,
}

impl Counts {
    /// Every side saw the same frames, and some flowed.
    pub fn agree(&self) -> bool {
        self.sent > 0
            && self.sent == self.backend
            && self.backend == self.received
            && self.device_dropped == 0
    }
}

/// One run of the driver against one backend.
#[derive(Debug, Clone, Serialize)]
pub struct RaceRun {
    /// The backend.
    pub backend: Backend,
    /// The direction.
    pub dir: Dir,
    /// Frame bytes.
    pub size: usize,
    /// Million frames per second at the driver (median of its per-second
    /// figures, the first one left out).
    pub mpps: f64,
    /// The driver's per-second figures, as testpmd printed them (Mpps).
    pub per_second: Vec<f64>,
    /// Every side's final counters.
    pub counts: Counts,
    /// nmvm only: the driver's kicks per frame.
    pub kicks_per_pkt: f64,
    /// nmvm only: interrupts (calls) per frame.
    pub irqs_per_pkt: f64,
    /// Context switches per second of the backend side's processes, all
    /// their threads (DPDK: its testpmd; nmvm: vhost-user and pkt-gen),
    /// over the measured seconds; none if /proc could not be read.
    pub switches_per_sec: Option<f64>,
    /// The Tx and Rx paths virtio_user's PMD chose with this backend (say
    /// "inorder Tx, inorder Rx"), as it logged them.
    pub driver_paths: Option<String>,
}

/// Finds `dpdk-testpmd` on PATH; with `install`, installs Debian's
/// `dpdk-dev` first if it is missing (as root, with apt-get).
pub fn find_testpmd(install: bool) -> Result<PathBuf, RaceError> {
    if let Some(p) = which("dpdk-testpmd") {
        return Ok(p);
    }
    let hint = format!(
        "install Debian's {DPDK_PACKAGE} (apt-get install {DPDK_PACKAGE}) or put dpdk-testpmd on PATH"
    );
    if !install {
        return Err(RaceError::NoTestpmd(hint));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || which("apt-get").is_none() {
        return Err(RaceError::NoTestpmd(format!(
            "cannot install it here (needs root and apt-get): {hint}"
        )));
    }
    eprintln!("nmvm bench: installing DPDK (Debian package {DPDK_PACKAGE}) for the race");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let install_args = ["install", "-y", "--no-install-recommends", DPDK_PACKAGE];
    // A fresh machine may need its package lists first.
    let installed = apt(&install_args) || (apt(&["update"]) && apt(&install_args));
    if !installed {
        return Err(RaceError::NoTestpmd(format!("apt-get failed: {hint}")));
    }
    which("dpdk-testpmd").ok_or_else(|| {
        RaceError::NoTestpmd(format!(
            "{DPDK_PACKAGE} installed, still not on PATH: {hint}"
        ))
    })
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The first two cores this process may run on: (backend side, driver).
pub fn pick_cores() -> Result<(usize, usize), RaceError> {
    crate::affinity::two_cores()
        .ok_or_else(|| RaceError::Cores(crate::affinity::allowed_cores().len()))
}

/// A child process that is killed if the run is abandoned, with its output
/// in a file.
struct Proc {
    what: String,
    child: Child,
    log: PathBuf,
    /// Removed once the process is gone (DPDK's runtime directory).
    leftovers: Option<PathBuf>,
}

impl Proc {
    fn spawn(what: &str, cmd: &mut Command, log: PathBuf, core: usize) -> Result<Proc, RaceError> {
        let io = |source| RaceError::Io {
            what: format!("cannot create {}", log.display()),
            source,
        };
        let out = File::create(&log).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        pin_to(cmd, core);
        let child = cmd.spawn().map_err(|source| RaceError::Spawn {
            what: what.to_string(),
            source,
        })?;
        Ok(Proc {
            what: what.to_string(),
            child,
            log,
            leftovers: None,
        })
    }

    /// A testpmd with EAL's `--file-prefix=prefix`: its runtime directory
    /// (megabytes of memory maps) goes when it does.
    fn testpmd(
        what: &str,
        testpmd: &Path,
        args: Vec<String>,
        prefix: &str,
        log: PathBuf,
        core: usize,
    ) -> Result<Proc, RaceError> {
        let mut p = Proc::spawn(what, Command::new(testpmd).args(args), log, core)?;
        p.leftovers = Some(dpdk_runtime_dir().join(prefix));
        Ok(p)
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn fail(&self, how: impl Into<String>) -> RaceError {
        failed(&self.what, how, &self.output())
    }

    fn interrupt(&self) {
        // SAFETY: kill(2) on our own child's pid; it cannot have been
        // reaped (and its pid reused) before `wait` below.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to end by itself; its output.
    fn wait(mut self, limit: Duration) -> Result<String, RaceError> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return Ok(self.output()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return Err(self.fail(format!("did not stop within {limit:?}"))),
            }
        }
    }

    /// SIGINT, then waits.
    fn stop(self, limit: Duration) -> Result<String, RaceError> {
        self.interrupt();
        self.wait(limit)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(dir) = &self.leftovers {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Where DPDK's EAL keeps a process's runtime files: /var/run/dpdk for
/// root, else $XDG_RUNTIME_DIR/dpdk, else /tmp/dpdk.
fn dpdk_runtime_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/run/dpdk");
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
        .join("dpdk")
}

/// A process failure, with the last lines of what it printed.
fn failed(what: &str, how: impl Into<String>, out: &str) -> RaceError {
    let lines: Vec<&str> = out.lines().collect();
    RaceError::Process {
        what: what.to_string(),
        how: how.into(),
        tail: lines[lines.len().saturating_sub(15)..].join("\n"),
    }
}

/// Runs the child on `core` only.
fn pin_to(cmd: &mut Command, core: usize) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec; `pin` only
    // fills a stack cpu_set_t and makes one system call, both
    // async-signal-safe, and touches no lock or allocation of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if crate::affinity::pin(0, core) {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Waits until `path` exists (the backend listens) or the backend ends.
fn wait_for_socket(p: &mut Proc, path: &Path) -> Result<(), RaceError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if !p.running() {
            return Err(p.fail("ended before it created its socket"));
        }
        if Instant::now() > deadline {
            return Err(p.fail("created no socket within 20 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A scratch directory for one run's socket and logs, removed afterwards.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Scratch, RaceError> {
        let dir = std::env::temp_dir().join(format!("nmvm-race-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| RaceError::Io {
            what: format!("cannot create {}", dir.display()),
            source,
        })?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// testpmd's arguments for one side: EAL options without hugepages or PCI,
/// both lcores on `core`, then the forwarding options.
fn testpmd_args(prefix: &str, core: usize, vdev: &str, mode: &str, size: usize) -> Vec<String> {
    [
        "--no-huge",
        "-m",
        "512",
        "--no-pci",
        "--log-level=lib.eal:error",
        // virtio_user's PMD says which Tx and Rx paths it chose (see
        // `parse_driver_paths`).
        "--log-level=pmd.net.virtio.init:info",
        &format!("--file-prefix={prefix}"),
        &format!("--lcores=0@{core},1@{core}"),
        &format!("--vdev={vdev}"),
        "--",
        "--total-num-mbufs=16384",
        // Frames that arrive before forwarding starts are counted, not
        // flushed unseen: every frame must be accounted for.
        "--no-flush-rx",
        &format!("--forward-mode={mode}"),
        &format!("--txpkts={size}"),
        "--stats-period=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs the driver against `backend` for `cfg.seconds` in `dir` with frames
/// of `size` bytes, and collects every side's counters.
pub fn run_point(
    cfg: &RaceConfig,
    backend: Backend,
    dir: Dir,
    size: usize,
) -> Result<RaceRun, RaceError> {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tag = format!("{run}-{}-{}-{size}", backend.path(), dir.name());
    let scratch = Scratch::new(&tag)?;
    let dir_path = &scratch.0;
    let sock = dir_path.join("vhost.sock");
    // Also the pipe's name: letters, digits and `_` only.
    let prefix = format!("nmvm_race_{}_{run}", std::process::id());
    let (be_core, fe_core) = cfg.cores;
    let (fe_mode, be_mode, pg_mode) = match dir {
        Dir::Tx => ("txonly", "rxonly", "rx"),
        Dir::Rx => ("rxonly", "txonly", "tx"),
    };
    let stop_limit = Duration::from_secs(15);

    // The backend side.
    let mut backend_proc = match backend {
        Backend::Dpdk => Proc::testpmd(
            "DPDK's vhost backend (testpmd net_vhost)",
            &cfg.testpmd,
            testpmd_args(
                &format!("{prefix}_be"),
                be_core,
                &format!("net_vhost0,iface={},queues=1", sock.display()),
                be_mode,
                size,
            ),
            &format!("{prefix}_be"),
            dir_path.join("backend.log"),
            be_core,
        )?,
        Backend::Nmvm => Proc::spawn(
            "nmvm vhost-user",
            Command::new(&cfg.nmvm)
                .arg("vhost-user")
                .arg("--socket")
                .arg(&sock)
                .arg("--net")
                .arg(format!("shm:{prefix}{{0"))
                .args(["--stats", "--connections", "1"])
                .arg(format!("--pipe-slots={}", cfg.pipe_slots)),
            dir_path.join("backend.log"),
            be_core,
        )?,
    };
    wait_for_socket(&mut backend_proc, &sock)?;
    let pktgen = match backend {
        Backend::Dpdk => None,
        Backend::Nmvm => Some(Proc::spawn(
            "nmvm pkt-gen",
            Command::new(&cfg.nmvm)
                .arg("pkt-gen")
                .arg("-i")
                .arg(format!("shm:{prefix}}}0"))
                .args(["-f", pg_mode, "--no-check", "-l", &size.to_string()]),
            dir_path.join("pktgen.log"),
            be_core,
        )?),
    };

    // The driver.
    let mut driver = Proc::testpmd(
        "the virtio_user driver (testpmd)",
        &cfg.testpmd,
        testpmd_args(
            &format!("{prefix}_fe"),
            fe_core,
            &format!(
                "net_virtio_user0,path={},queues=1,queue_size=1024",
                sock.display()
            ),
            fe_mode,
            size,
        ),
        &format!("{prefix}_fe"),
        dir_path.join("driver.log"),
        fe_core,
    )?;
    // Runs until the driver has printed `seconds` per-second figures after
    // the first one with traffic (testpmd flushes each display).
    let key = match dir {
        Dir::Tx => "Tx-pps:",
        Dir::Rx => "Rx-pps:",
    };
    let want = 1 + cfg.seconds.max(1.0).ceil() as usize;
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.seconds.max(1.0) + 30.0);
    let backend_pids: Vec<u32> = std::iter::once(backend_proc.child.id())
        .chain(pktgen.as_ref().map(|p| p.child.id()))
        .collect();
    // (when, count) once traffic flows, and at the end of the window.
    let mut switches_from: Option<(Instant, Option<u64>)> = None;
    let switches_per_sec;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let d = &mut driver;
        if !d.running() {
            return Err(d.fail("ended early"));
        }
        let out = d.output();
        let figures: Vec<u64> = out
            .lines()
            .filter_map(|l| field(l.trim_start(), key))
            .skip_while(|&v| v == 0)
            .collect();
        if switches_from.is_none() && !figures.is_empty() {
            switches_from = Some((Instant::now(), context_switches(&backend_pids)));
        }
        if figures.len() >= want {
            switches_per_sec = switches_from.and_then(|(t0, n0)| {
                let (n0, n1) = (n0?, context_switches(&backend_pids)?);
                let secs = t0.elapsed().as_secs_f64();
                (secs > 0.0).then(|| n1.saturating_sub(n0) as f64 / secs)
            });
            break;
        }
        if Instant::now() > deadline {
            return Err(d.fail(format!(
                "did not print {want} per-second figures with traffic in {:.0} s",
                cfg.seconds.max(1.0) + 30.0
            )));
        }
    }

    // The sender stops first, the receiver drains, then the rest.
    let (driver_out, backend_out, pktgen_out) = match (dir, backend) {
        (Dir::Tx, Backend::Dpdk) => {
            let d = driver.stop(stop_limit)?;
            std::thread::sleep(Duration::from_millis(300));
            (d, backend_proc.stop(stop_limit)?, None)
        }
        (Dir::Rx, Backend::Dpdk) => {
            let b = backend_proc.stop(stop_limit)?;
            std::thread::sleep(Duration::from_millis(300));
            (driver.stop(stop_limit)?, b, None)
        }
        (Dir::Tx, Backend::Nmvm) => {
            let d = driver.stop(stop_limit)?;
            // nmvm ends after its one connection, having handed every frame
            // to the pipe; pkt-gen then takes what is left in it.
            let b = backend_proc.wait(stop_limit)?;
            std::thread::sleep(Duration::from_millis(300));
            let p = pktgen.map(|p| p.stop(stop_limit)).transpose()?;
            (d, b, p)
        }
        (Dir::Rx, Backend::Nmvm) => {
            let p = pktgen.map(|p| p.stop(stop_limit)).transpose()?;
            std::thread::sleep(Duration::from_millis(300));
            let d = driver.stop(stop_limit)?;
            (d, backend_proc.wait(stop_limit)?, p)
        }
    };

    let drv = parse_testpmd(&driver_out).ok_or_else(|| {
        failed(
            "the driver's testpmd",
            "printed no final counters",
            &driver_out,
        )
    })?;
    let pps = match dir {
        Dir::Tx => &drv.tx_pps,
        Dir::Rx => &drv.rx_pps,
    };
    let per_second: Vec<f64> = pps.iter().map(|&p| p as f64 / 1e6).collect();
    let (counts, kicks, irqs) = match backend {
        Backend::Dpdk => {
            let be = parse_testpmd(&backend_out).ok_or_else(|| {
                failed(
                    "DPDK's vhost backend",
                    "printed no final counters",
                    &backend_out,
                )
            })?;
            let counts = match dir {
                Dir::Tx => Counts {
                    sent: drv.tx_packets,
                    backend: be.rx_packets,
                    received: be.rx_packets,
                    device_dropped: 0,
                },
                Dir::Rx => Counts {
                    sent: be.tx_packets,
                    backend: be.tx_packets,
                    received: drv.rx_packets,
                    device_dropped: 0,
                },
            };
            (counts, 0.0, 0.0)
        }
        Backend::Nmvm => {
            let dev = parse_device_stats(&backend_out).ok_or_else(|| {
                failed(
                    "nmvm vhost-user",
                    "printed no device counters",
                    &backend_out,
                )
            })?;
            let pg_out = pktgen_out.unwrap_or_default();
            let pg = parse_pktgen(&pg_out)
                .ok_or_else(|| failed("nmvm pkt-gen", "printed no final line", &pg_out))?;
            let moved = match dir {
                Dir::Tx => dev.tx_frames,
                Dir::Rx => dev.rx_frames,
            };
            let counts = match dir {
                Dir::Tx => Counts {
                    sent: drv.tx_packets,
                    backend: dev.tx_frames,
                    received: pg.frames,
                    device_dropped: dev.dropped,
                },
                Dir::Rx => Counts {
                    sent: pg.frames.saturating_sub(pg.unsent),
                    backend: dev.rx_frames,
                    received: drv.rx_packets,
                    device_dropped: dev.dropped,
                },
            };
            let f = moved.max(1) as f64;
            (counts, dev.kicks as f64 / f, dev.interrupts as f64 / f)
        }
    };
    Ok(RaceRun {
        backend,
        dir,
        size,
        mpps: steady_median(&per_second, want - 1),
        per_second,
        counts,
        kicks_per_pkt: kicks,
        irqs_per_pkt: irqs,
        switches_per_sec,
        driver_paths: parse_driver_paths(&driver_out),
    })
}

/// The Tx and Rx paths that virtio_user's PMD logs choosing ("virtio:
/// using inorder Tx path on port 0"), in the order logged: which of its
/// code paths the backend's features let it take.
pub fn parse_driver_paths(out: &str) -> Option<String> {
    let paths: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            let rest = l.split("virtio: using ").nth(1)?;
            Some(rest.split(" path on port").next()?.trim())
        })
        .collect();
    (!paths.is_empty()).then(|| paths.join(", "))
}

/// Context switches so far of every thread of the processes `pids`
/// (voluntary and not, from /proc), if all of them could be read.
fn context_switches(pids: &[u32]) -> Option<u64> {
    let mut total = 0;
    for pid in pids {
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
            total += switches_in_status(&status)?;
        }
    }
    Some(total)
}

/// `voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` of a
/// /proc/.../status text.
fn switches_in_status(status: &str) -> Option<u64> {
    let field = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].trim().parse().ok()
    };
    Some(field("voluntary_ctxt_switches:")? + field("nonvoluntary_ctxt_switches:")?)
}

/// The median of `n` per-second figures once traffic flows: leading zeros
/// and the first second with traffic (a partial one) are left out, and so
/// is anything after the `n` (the sender may have stopped in them).
pub fn steady_median(per_second: &[f64], n: usize) -> f64 {
    let mut v: Vec<f64> = per_second
        .iter()
        .copied()
        .skip_while(|&x| x == 0.0)
        .skip(1)
        .take(n.max(1))
        .collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// What testpmd printed: per-second rates and final forward counters.
#[derive(Debug, Default, PartialEq)]
pub struct TestpmdOutput {
    /// `Rx-pps` of every periodic display.
    pub rx_pps: Vec<u64>,
    /// `Tx-pps` of every periodic display.
    pub tx_pps: Vec<u64>,
    /// Final forward statistics of port 0: RX-packets.
    pub rx_packets: u64,
    /// Final forward statistics of port 0: TX-packets.
    pub tx_packets: u64,
}

/// The value after `key` (e.g. `"RX-packets:"`) on `line`.
fn field(line: &str, key: &str) -> Option<u64> {
    let rest = line.split(key).nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Reads testpmd's output; `None` without its final forward statistics.
pub fn parse_testpmd(out: &str) -> Option<TestpmdOutput> {
    let mut r = TestpmdOutput::default();
    let mut lines = out.lines();
    let mut final_seen = false;
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("Rx-pps:") {
            r.rx_pps.extend(field(t, "Rx-pps:"));
        } else if t.starts_with("Tx-pps:") {
            r.tx_pps.extend(field(t, "Tx-pps:"));
        } else if t.contains("Forward statistics for port 0") && !final_seen {
            for l in lines.by_ref().take(4) {
                if let Some(v) = field(l, "RX-packets:") {
                    r.rx_packets = v;
                }
                if let Some(v) = field(l, "TX-packets:") {
                    r.tx_packets = v;
                }
            }
            final_seen = true;
        }
    }
    final_seen.then_some(r)
}

/// The device counters `nmvm vhost-user --stats` prints at a connection's end.
#[derive(Debug, Default, PartialEq)]
pub struct DeviceStats {
    /// Frames driver → port.
    pub tx_frames: u64,
    /// Frames port → driver.
    pub rx_frames: u64,
    /// Frames dropped as malformed, and frames left unsent at stop.
    pub dropped: u64,
    /// Driver kicks.
    pub kicks: u64,
    /// Interrupts (calls).
    pub interrupts: u64,
}

/// The number before `word` in `s` (`"12 kicks"` → 12 for `"kicks"`).
fn before(s: &str, word: &str) -> Option<u64> {
    let words: Vec<&str> = s.split([' ', ',', ';']).filter(|w| !w.is_empty()).collect();
    let i = words.iter().position(|w| *w == word)?;
    words.get(i.checked_sub(1)?)?.parse().ok()
}

/// The number after `word` in `s` (`"tx 12 frames"` → 12 for `"tx"`).
fn after(s: &str, word: &str) -> Option<u64> {
    let words: Vec<&str> = s.split([' ', ',', ';']).filter(|w| !w.is_empty()).collect();
    let i = words.iter().position(|w| *w == word)?;
    words.get(i + 1)?.parse().ok()
}

/// Reads the last `connection N: …` line of `nmvm vhost-user --stats`.
pub fn parse_device_stats(out: &str) -> Option<DeviceStats> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with("connection ") && l.contains(" kicks"))?;
    let dropped = line.split_once("dropped:")?.1.split_once(';')?.0;
    let dropped = dropped
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Some(DeviceStats {
        tx_frames: after(line, "tx")?,
        rx_frames: after(line, "rx")?,
        dropped,
        kicks: before(line, "kicks")?,
        interrupts: before(line, "interrupts")?,
    })
}

/// pkt-gen's final figures.
#[derive(Debug, Default, PartialEq)]
pub struct PktGenCount {
    /// Frames sent or received.
    pub frames: u64,
    /// Sent frames the peer never took.
    pub unsent: u64,
}

/// Reads pkt-gen's `Sent N packets` / `Received N packets` line.
pub fn parse_pktgen(out: &str) -> Option<PktGenCount> {
    let frames = out.lines().find_map(|l| {
        let i = l.find("Sent ").or_else(|| l.find("Received "))?;
        l[i..].split_whitespace().nth(1)?.parse().ok()
    })?;
    let unsent = out
        .lines()
        .find_map(|l| {
            let rest = l.split("Unsent: ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0);
    Some(PktGenCount { frames, unsent })
}

/// testpmd's DPDK version (EAL's `-v` prints it; without ports testpmd then
/// gives up at once).
pub fn testpmd_version(testpmd: &Path) -> String {
    let prefix = format!("nmvm_race_{}_version", std::process::id());
    let out = Command::new(testpmd)
        .args(["-v", "--no-huge", "-m", "64", "--no-pci"])
        .arg(format!("--file-prefix={prefix}"))
        .stdin(Stdio::null())
        .output();
    let _ = std::fs::remove_dir_all(dpdk_runtime_dir().join(prefix));
    out.ok()
        .and_then(|o| {
            let out = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            let line = out.lines().find(|l| l.contains("RTE Version"))?;
            Some(line.split('\'').nth(1)?.to_string())
        })
        .unwrap_or_else(|| "DPDK (version unknown)".into())
}

/// One point of the race: both backends measured `repeat` times,
/// alternately, so that the machine's drift hits both alike.
#[derive(Debug, Clone, Serialize)]
pub struct RacePoint {
    /// The direction (driver's point of view).
    pub dir: Dir,
    /// Frame bytes.
    pub size: usize,
    /// DPDK's backend, every run.
    pub dpdk: Vec<RaceRun>,
    /// nmvm's backend, every run.
    pub nmvm: Vec<RaceRun>,
}

impl RacePoint {
    /// The median run of `runs` by Mpps, with the lowest and highest Mpps.
    pub fn median(runs: &[RaceRun]) -> Option<(&RaceRun, f64, f64)> {
        let mut v: Vec<&RaceRun> = runs.iter().collect();
        v.sort_by(|a, b| a.mpps.total_cmp(&b.mpps));
        let (lo, hi) = (v.first()?.mpps, v.last()?.mpps);
        Some((v[v.len() / 2], lo, hi))
    }

    /// nmvm's median over DPDK's median.
    pub fn ratio(&self) -> Option<f64> {
        let d = Self::median(&self.dpdk)?.0.mpps;
        let n = Self::median(&self.nmvm)?.0.mpps;
        (d > 0.0).then_some(n / d)
    }

    /// nmvm's best run over DPDK's best run: on a machine whose speed
    /// swings for seconds at a time, what each backend does when nothing
    /// interferes.
    pub fn best_ratio(&self) -> Option<f64> {
        let d = Self::median(&self.dpdk)?.2;
        let n = Self::median(&self.nmvm)?.2;
        (d > 0.0).then_some(n / d)
    }

    /// The median of the runs' context switches per second on the backend
    /// side, if every run has the figure.
    pub fn median_switches(runs: &[RaceRun]) -> Option<f64> {
        let mut v = runs
            .iter()
            .map(|r| r.switches_per_sec)
            .collect::<Option<Vec<f64>>>()?;
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    }

    /// Every nmvm run accounted for every frame. (DPDK's own pair is not
    /// held to it: its vhost backend counts a few dozen to a few hundred
    /// frames per run as sent that its driver never receives; the JSON
    /// keeps its counts.)
    pub fn counts_agree(&self) -> bool {
        self.nmvm.iter().all(|r| r.counts.agree())
    }
}

/// The whole race as the bench report carries it.
#[derive(Debug, Clone, Serialize)]
pub struct RaceReport {
    /// testpmd's version.
    pub testpmd: String,
    /// Where each side ran.
    pub pinning: String,
    /// Seconds each run lasted (the first second not counted).
    pub seconds: f64,
    /// Every point.
    pub points: Vec<RacePoint>,
}

impl RaceReport {
    /// The distinct paths virtio_user's PMD took with `backend` (see
    /// [`RaceRun::driver_paths`]), in the order first seen.
    pub fn driver_paths(&self, backend: Backend) -> Vec<&str> {
        let mut seen: Vec<&str> = Vec::new();
        for p in &self.points {
            let runs = match backend {
                Backend::Dpdk => &p.dpdk,
                Backend::Nmvm => &p.nmvm,
            };
            for path in runs.iter().filter_map(|r| r.driver_paths.as_deref()) {
                if !seen.contains(&path) {
                    seen.push(path);
                }
            }
        }
        seen
    }
}

/// Races both backends at every size and direction.
pub fn run(cfg: &RaceConfig, sizes: &[usize], repeat: u32) -> Result<RaceReport, RaceError> {
    let mut points = Vec::new();
    for &size in sizes {
        for dir in [Dir::Tx, Dir::Rx] {
            let mut p = RacePoint {
                dir,
                size,
                dpdk: Vec::new(),
                nmvm: Vec::new(),
            };
            for _ in 0..repeat.max(1) {
                p.dpdk.push(run_point(cfg, Backend::Dpdk, dir, size)?);
                p.nmvm.push(run_point(cfg, Backend::Nmvm, dir, size)?);
            }
            points.push(p);
        }
    }
    Ok(RaceReport {
        testpmd: testpmd_version(&cfg.testpmd),
        pinning: format!(
            "core {}: the backend side (DPDK: testpmd's two lcores; nmvm: the vhost-user process and pkt-gen, on a pipe of {} slots per ring); core {}: the virtio_user driver (testpmd's two lcores)",
            cfg.cores.0, cfg.pipe_slots, cfg.cores.1
        ),
        seconds: cfg.seconds.max(1.0),
        points,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TESTPMD_OUT: &str = "\
  ######################## NIC statistics for port 0  ########################
  RX-packets: 0          RX-missed: 0          RX-bytes:  0
  TX-packets: 9000000    TX-errors: 0          TX-bytes:  576000000

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:      8000000          Tx-bps:   4096000000
  ############################################################################
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:      9000000          Tx-bps:   4608000000

Telling cores to stop...
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 58585156       TX-dropped: 36088508      TX-total: 94673664
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 1              TX-dropped: 0             TX-total: 1
";

    #[test]
    fn testpmd_output_parses() {
        let r = parse_testpmd(TESTPMD_OUT).unwrap();
        assert_eq!(r.tx_pps, vec![8_000_000, 9_000_000]);
        assert_eq!(r.rx_pps, vec![0, 0]);
        assert_eq!(r.tx_packets, 58_585_156);
        assert_eq!(r.rx_packets, 0);
        // No final statistics: the run failed.
        assert_eq!(parse_testpmd("  Tx-pps: 5 Tx-bps: 7\n"), None);
    }

    #[test]
    fn driver_paths_parse() {
        let out = "EAL: Selected IOVA mode 'VA'\n\
                   set_rxtx_funcs(): virtio: using inorder Tx path on port 0\n\
                   set_rxtx_funcs(): virtio: using mergeable buffer Rx path on port 0\n\
                   Port 0: 02:00:00:00:00:01\n";
        assert_eq!(
            parse_driver_paths(out).as_deref(),
            Some("inorder Tx, mergeable buffer Rx")
        );
        assert_eq!(parse_driver_paths(TESTPMD_OUT), None);
    }

    #[test]
    fn device_stats_parse() {
        let line = "connection 1: device started 1 times; tx 58585156 frames 3749449984 bytes, rx 7 frames 448 bytes, dropped: 1 bad chains, 0 bad heads, 2 bad avail index, 0 rx too big, 3 unsent at stop; 405049 kicks, 9 interrupts\nvhost-user: 1 connections, 0 closed on an error\n";
        assert_eq!(
            parse_device_stats(line),
            Some(DeviceStats {
                tx_frames: 58_585_156,
                rx_frames: 7,
                dropped: 6,
                kicks: 405_049,
                interrupts: 9,
            })
        );
        assert_eq!(parse_device_stats("vhost-user: 0 connections\n"), None);
    }

    #[test]
    fn pktgen_lines_parse() {
        let out = "010.593431 main_thread [157] Received 58585156 packets 3749449984 bytes 217905 events 64 bytes each in 10.59 seconds.\n";
        assert_eq!(
            parse_pktgen(out),
            Some(PktGenCount {
                frames: 58_585_156,
                unsent: 0
            })
        );
        let out = "x Sent 100 packets 6400 bytes 3 events 64 bytes each in 1.00 seconds.\nx Unsent: 12 of them were still in the TX ring at exit (the peer never took them)\n";
        assert_eq!(
            parse_pktgen(out),
            Some(PktGenCount {
                frames: 100,
                unsent: 12
            })
        );
    }

    #[test]
    fn context_switches_are_read_from_proc() {
        let status =
            "Name:\tnmvm-net\nvoluntary_ctxt_switches:\t16\nnonvoluntary_ctxt_switches:\t26424\n";
        assert_eq!(switches_in_status(status), Some(26440));
        assert_eq!(switches_in_status("Name:\tx\n"), None);
        if cfg!(target_os = "linux") {
            // A shell that blocks in wait(2) for one short sleep after
            // another: each wait is a context switch. (Not this process:
            // its test threads come and go, and their counts with them.)
            let mut sh = Command::new("sh")
                .args(["-c", "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 0.01; done"])
                .spawn()
                .expect("sh");
            let before = context_switches(&[sh.id()]).expect("the shell's /proc entry");
            std::thread::sleep(Duration::from_millis(60));
            let after = context_switches(&[sh.id()]).expect("the shell's /proc entry");
            sh.wait().expect("sh");
            assert!(after > before, "{before} -> {after}");
        }
        assert_eq!(context_switches(&[u32::MAX]), None);
    }

    #[test]
    fn the_steady_median_leaves_out_the_ramp() {
        assert_eq!(steady_median(&[0.0, 0.0, 3.0, 9.0, 10.0, 11.0], 3), 10.0);
        // A stall in the middle counts; the tail after the run does not.
        assert_eq!(steady_median(&[0.0, 3.0, 9.0, 0.0, 8.0, 1.0], 3), 8.0);
        assert_eq!(steady_median(&[0.0, 4.0], 3), 0.0);
        assert_eq!(steady_median(&[0.0, 0.0], 3), 0.0);
        assert_eq!(steady_median(&[], 3), 0.0);
    }

    #[test]
    fn counts_agree_only_when_every_side_saw_every_frame() {
        let c = Counts {
            sent: 5,
            backend: 5,
            received: 5,
            device_dropped: 0,
        };
        assert!(c.agree());
        assert!(!Counts { received: 4, ..c }.agree());
        assert!(!Counts {
            device_dropped: 1,
            ..c
        }
        .agree());
        assert!(!Counts::default().agree(), "nothing flowed");
    }
}
