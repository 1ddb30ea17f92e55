//! `nmvm bench`: the data path measured without a guest CPU. A synthetic
//! guest driver (a host thread playing the guest's virtio driver on real
//! guest memory, with EVENT_IDX, kicks through the queue eventfds and
//! interrupts through an eventfd) drives the real virtio-net device model;
//! the real pkt-gen engine sits on the other end of a userspace netmap pipe.
//! In the same run: the copy limit (one thread copying the same frames
//! between two rings of buffers) and, where available, the tap path.
//!
//! With `/dev/kvm`, also the guest in the loop: the bundled guest's user-mode
//! (CPL 3) appliance in a real VM (`nmvm::vm::run` in this process) as `net=gen`
//! (TX) or `net=sink` (RX) against the pkt-gen engine on the other end of the
//! pipe, on the virtio path (`guest-virtio`) and on passthrough
//! (`guest-netmap`), 64 and 1514 bytes. The guest measures its own rate with
//! its calibrated TSC (first to last batch) and prints it; the row takes that
//! rate and divides the VM's exits and the device's kicks and interrupts by the
//! guest's frames.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nmvm_devices::netmap::{Port, PortOptions};
use nmvm_devices::virtio::driver::{PassthroughDriver, SyntheticDriver};
use nmvm_devices::virtio::net::{Net, NetCounters, F_MRG_RXBUF};
use nmvm_devices::virtio::passthrough::F_NMVM_NETMAP;
#[cfg(target_os = "linux")]
use nmvm_devices::virtio::tap::{PacketSocket, Tap, TapNet};
use nmvm_devices::virtio::{VirtioDevice, F_RING_EVENT_IDX, F_VERSION_1};
use serde::Serialize;

use crate::affinity;
use crate::dpdk::{Backend, RacePoint, RaceReport};
use crate::frame::{self, Endpoints};
use crate::pktgen::{self, Mode, PktGenOptions};
use crate::vm::{self, ConsoleConfig, KernelChoice, NetSpec, VmConfig};

/// Frame sizes measured.
pub const SIZES: [usize; 6] = [64, 128, 256, 512, 1024, 1514];
/// Frame sizes of the guest-in-the-loop rows (each boots a VM).
pub const GUEST_SIZES: [usize; 2] = [64, 1514];
const QUEUE_SIZE: u16 = 256;

/// One measured row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `nmvm` (virtio path), `passthrough`, `tap` or `copy` (synthetic
    /// driver), or `guest-virtio` / `guest-netmap` (the bundled guest in a VM).
    pub path: &'static str,
    /// `tx` (guest to peer) or `rx` (peer to guest); `copy` for the limit.
    pub dir: &'static str,
    /// Frame size in bytes (without the virtio-net header).
    pub size: usize,
    /// Million frames per second.
    pub mpps: f64,
    /// Gbit/s of frame bytes.
    pub gbps: f64,
    /// Guest kicks per frame.
    pub kicks_per_pkt: f64,
    /// Interrupts per frame.
    pub irqs_per_pkt: f64,
    /// VM exits that reached nmvm per frame (guest rows only; boot and
    /// device set-up included).
    pub exits_per_pkt: f64,
    /// Frames per device-worker wake-up.
    pub avg_batch: f64,
    /// Frames counted.
    pub frames: u64,
    /// The lowest Mpps of the repeated measurements (this row is their median).
    pub mpps_min: f64,
    /// The highest Mpps of the repeated measurements.
    pub mpps_max: f64,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Host cores.
    pub cores: usize,
    /// Seconds per measurement.
    pub seconds: f64,
    /// Measurements per point (each row is their median).
    pub repeat: u32,
    /// Where the threads ran.
    pub threads: &'static str,
    /// Every row.
    pub rows: Vec<Row>,
    /// The race against DPDK (`--dpdk`), every run of it; its medians are
    /// also rows (`vhost-dpdk`, `vhost-nmvm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpdk: Option<RaceReport>,
}

impl BenchReport {
    /// A report without rows yet.
    pub fn empty(seconds: f64, repeat: u32) -> BenchReport {
        BenchReport {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            seconds,
            repeat,
            threads: "",
            rows: Vec::new(),
            dpdk: None,
        }
    }

    /// Adds the race: a row per backend, direction and size (the median
    /// run), and the race itself.
    pub fn add_race(&mut self, race: RaceReport) {
        for p in &race.points {
            for (backend, runs) in [(Backend::Dpdk, &p.dpdk), (Backend::Nmvm, &p.nmvm)] {
                let Some((m, lo, hi)) = RacePoint::median(runs) else {
                    continue;
                };
                let mut r = row(backend.path(), p.dir.name(), p.size, 0, 1.0);
                r.mpps = m.mpps;
                r.gbps = m.mpps * 1e6 * p.size as f64 * 8.0 / 1e9;
                r.frames = m.counts.received;
                r.kicks_per_pkt = m.kicks_per_pkt;
                r.irqs_per_pkt = m.irqs_per_pkt;
                r.mpps_min = lo;
                r.mpps_max = hi;
                self.rows.push(r);
            }
        }
        self.dpdk = Some(race);
    }
}

fn unique_pipe(tag: &str, size: usize) -> (String, String) {
    let base = format!("shm:bench{}{tag}{size}", std::process::id());
    (format!("{base}{{0"), format!("{base}}}0"))
}

fn row(path: &'static str, dir: &'static str, size: usize, frames: u64, secs: f64) -> Row {
    let pps = frames as f64 / secs.max(1e-9);
    Row {
        path,
        dir,
        size,
        mpps: pps / 1e6,
        gbps: pps * size as f64 * 8.0 / 1e9,
        kicks_per_pkt: 0.0,
        irqs_per_pkt: 0.0,
        exits_per_pkt: 0.0,
        avg_batch: 0.0,
        frames,
        mpps_min: pps / 1e6,
        mpps_max: pps / 1e6,
    }
}

fn ratios(r: &mut Row, drv: &SyntheticDriver, counters: &NetCounters, queue: usize) {
    let f = r.frames.max(1) as f64;
    let kicks = if queue == 1 {
        drv.tx.kicks
    } else {
        drv.rx.kicks
    };
    r.kicks_per_pkt = kicks as f64 / f;
    r.irqs_per_pkt = drv.interrupt.counts[queue].load(Ordering::Relaxed) as f64 / f;
    r.avg_batch = f / counters.wakeups.load(Ordering::Relaxed).max(1) as f64;
}

/// Sleeps on the driver's interrupt eventfd for at most `ms`.
fn wait_interrupt(drv: &SyntheticDriver, ms: i32) {
    let mut pfd = libc::pollfd {
        fd: drv.interrupt.evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a live eventfd.
    unsafe { libc::poll(&mut pfd, 1, ms) };
    let _ = drv.interrupt.evt.read();
}

/// Plays the guest's receive side for `dur`: reaps used buffers and posts
/// them again, sleeping on the interrupt when none are used. Returns the
/// frames received and the seconds it took.
fn drive_rx(drv: &mut SyntheticDriver, dur: Duration) -> (u64, f64) {
    let mut frames = 0u64;
    let start = Instant::now();
    let end = start + dur;
    while Instant::now() < end {
        let mut got = 0;
        while drv.rx.reap(&drv.mem).is_some() {
            got += 1;
        }
        if got > 0 {
            frames += got;
            for _ in 0..got {
                drv.rx.post(&drv.mem, None);
            }
            drv.rx.publish(&drv.mem);
        } else {
            drv.rx.request_interrupt(&drv.mem, 1);
            if drv.rx.reap_pending(&drv.mem) == 0 {
                wait_interrupt(drv, 10);
            }
        }
    }
    (frames, start.elapsed().as_secs_f64())
}

/// Plays the guest's transmit side: keeps the TX ring full with `buf`
/// (at most `limit` frames in all), sleeping on the interrupt while the
/// device works through half of it, until `done` says so. Returns frames
/// posted.
fn drive_tx(drv: &mut SyntheticDriver, buf: &[u8], limit: u64, done: impl Fn() -> bool) -> u64 {
    let mut posted = 0u64;
    while !done() {
        while drv.tx.reap(&drv.mem).is_some() {}
        let mut any = false;
        while posted < limit && drv.tx.free() > 0 {
            drv.tx.post(&drv.mem, Some(buf));
            posted += 1;
            any = true;
        }
        if any {
            drv.tx.publish(&drv.mem);
        }
        // Look again after asking for the interrupt, or one that fired
        // just before is missed.
        drv.tx.request_interrupt(&drv.mem, QUEUE_SIZE / 2);
        if drv.tx.reap_pending(&drv.mem) < QUEUE_SIZE / 2 {
            wait_interrupt(drv, 10);
        }
    }
    posted
}

fn features() -> u64 {
    F_VERSION_1 | F_RING_EVENT_IDX | F_MRG_RXBUF
}

/// Starts the pkt-gen engine on `port` in a thread.
fn peer(
    port: String,
    mode: Mode,
    size: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Option<pktgen::PktGenReport>> {
    peer_on(port, mode, size, stop, None)
}

/// [`peer`], on `core` if given.
fn peer_on(
    port: String,
    mode: Mode,
    size: usize,
    stop: Arc<AtomicBool>,
    core: Option<usize>,
) -> std::thread::JoinHandle<Option<pktgen::PktGenReport>> {
    std::thread::spawn(move || {
        if let Some(c) = core {
            affinity::pin(0, c);
        }
        let opts = PktGenOptions {
            port,
            mode,
            len: (size.max(frame::MIN_LEN), size.max(frame::MIN_LEN)),
            count: 0,
            batch: 512,
            report: Duration::from_secs(3600),
            verbose: false,
            check: false,
            endpoints: Endpoints::default(),
            ..PktGenOptions::default()
        };
        pktgen::run(&opts, &stop).ok()
    })
}

/// Guest → peer through nmvm's device: frames/s seen by the peer.
pub fn netmap_tx(size: usize, dur: Duration) -> std::io::Result<Row> {
    let (dev_end, peer_end) = unique_pipe("tx", size);
    let port = Port::open(&dev_end, &PortOptions::default()).map_err(std::io::Error::other)?;
    let mut drv = SyntheticDriver::new(QUEUE_SIZE)?;
    let mut net = Net::new([2, 0, 0, 0, 0, 1], port);
    net.activate(drv.activation(features()))
        .map_err(std::io::Error::other)?;
    let stop = Arc::new(AtomicBool::new(false));
    let peer = peer(peer_end, Mode::Rx, size, stop.clone());

    let mut f = vec![0u8; frame::MAX_LEN];
    frame::build(&mut f, size.max(frame::MIN_LEN), 0, &Endpoints::default());
    let mut buf = Vec::new();
    SyntheticDriver::tx_buffer(&f[..size], &mut buf);
    let end = Instant::now() + dur;
    drive_tx(&mut drv, &buf, u64::MAX, || Instant::now() >= end);
    stop.store(true, Ordering::Relaxed);
    let report = peer.join().ok().flatten().unwrap_or_default();
    let counters = net.counters();
    net.reset();
    let mut r = row(
        "nmvm",
        "tx",
        size,
        report.received,
        report.elapsed.as_secs_f64(),
    );
    ratios(&mut r, &drv, &counters, 1);
    Ok(r)
}

/// Peer → guest through nmvm's device: frames/s reaped by the driver.
pub fn netmap_rx(size: usize, dur: Duration) -> std::io::Result<Row> {
    let (dev_end, peer_end) = unique_pipe("rx", size);
    let port = Port::open(&dev_end, &PortOptions::default()).map_err(std::io::Error::other)?;
    let mut drv = SyntheticDriver::new(QUEUE_SIZE)?;
    let mut net = Net::new([2, 0, 0, 0, 0, 1], port);
    net.activate(drv.activation(features()))
        .map_err(std::io::Error::other)?;
    for _ in 0..drv.rx.free() {
        drv.rx.post(&drv.mem, None);
    }
    drv.rx.publish(&drv.mem);
    let stop = Arc::new(AtomicBool::new(false));
    let peer = peer(peer_end, Mode::Tx, size, stop.clone());
    let (frames, secs) = drive_rx(&mut drv, dur);
    stop.store(true, Ordering::Relaxed);
    let _ = peer.join();
    let counters = net.counters();
    net.reset();
    let mut r = row("nmvm", "rx", size, frames, secs);
    ratios(&mut r, &drv, &counters, 0);
    Ok(r)
}

/// A device with passthrough started and the synthetic netmap-aware guest
/// that operates its rings.
fn passthrough_device(dev_end: &str) -> std::io::Result<(Net, SyntheticDriver, PassthroughDriver)> {
    use nmvm_devices::virtio::passthrough::{cfg, CFG_BASE, CONTROL_ON};
    let port = Port::open(dev_end, &PortOptions::default()).map_err(std::io::Error::other)?;
    let drv = SyntheticDriver::new(QUEUE_SIZE)?;
    let mut net = Net::new([2, 0, 0, 0, 0, 1], port);
    let g = net.enable_passthrough().map_err(std::io::Error::other)?;
    let (base, len) = net
        .port_region()
        .ok_or_else(|| std::io::Error::other("the port has no region"))?;
    net.activate(drv.activation(features() | F_NMVM_NETMAP))
        .map_err(std::io::Error::other)?;
    // SAFETY: `net` owns the port and so keeps its region mapped, and the
    // caller keeps `net` and `drv` alive as long as the guest side lives
    // (they are returned together and dropped together).
    let pd = unsafe { PassthroughDriver::new(&drv, base, len, &g) }?;
    for (ofs, v) in [
        (cfg::CSB_LO, pd.csb_gpa as u32),
        (cfg::CSB_HI, (pd.csb_gpa >> 32) as u32),
        (cfg::CONTROL, 1),
    ] {
        net.write_config(CFG_BASE + ofs, &v.to_le_bytes());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut b = [0u8; 4];
        net.read_config(CFG_BASE + cfg::CONTROL, &mut b);
        if u32::from_le_bytes(b) == CONTROL_ON {
            return Ok((net, drv, pd));
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::other("passthrough did not start"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Guest → peer with the guest operating the passed-through rings.
pub fn passthrough_tx(size: usize, dur: Duration) -> std::io::Result<Row> {
    let (dev_end, peer_end) = unique_pipe("ptx", size);
    let (mut net, drv, mut pd) = passthrough_device(&dev_end)?;
    let stop = Arc::new(AtomicBool::new(false));
    let peer = peer(peer_end, Mode::Rx, size, stop.clone());
    let mut f = vec![0u8; frame::MAX_LEN];
    frame::build(&mut f, size.max(frame::MIN_LEN), 0, &Endpoints::default());
    let end = Instant::now() + dur;
    while Instant::now() < end {
        let mut put = 0;
        while pd.tx_put(&f[..size]) {
            put += 1;
        }
        if put > 0 {
            pd.tx_publish();
            continue;
        }
        // Full: sleep until the device frees slots.
        pd.want_interrupt(true, true);
        if pd.tx_room() == 0 {
            wait_interrupt(&drv, 10);
        }
        pd.want_interrupt(true, false);
    }
    stop.store(true, Ordering::Relaxed);
    let report = peer.join().ok().flatten().unwrap_or_default();
    let counters = net.counters();
    net.reset();
    let mut r = row(
        "passthrough",
        "tx",
        size,
        report.received,
        report.elapsed.as_secs_f64(),
    );
    pt_ratios(&mut r, &pd, &drv, &counters, 1);
    Ok(r)
}

/// Peer → guest with the guest operating the passed-through rings.
pub fn passthrough_rx(size: usize, dur: Duration) -> std::io::Result<Row> {
    let (dev_end, peer_end) = unique_pipe("prx", size);
    let (mut net, drv, mut pd) = passthrough_device(&dev_end)?;
    let stop = Arc::new(AtomicBool::new(false));
    let peer = peer(peer_end, Mode::Tx, size, stop.clone());
    let (mut frames, start) = (0u64, Instant::now());
    let end = start + dur;
    while Instant::now() < end {
        let got = pd.rx_take(|_| {});
        if got > 0 {
            frames += u64::from(got);
            pd.rx_publish();
            continue;
        }
        pd.want_interrupt(false, true);
        if pd.rx_pending() == 0 {
            wait_interrupt(&drv, 10);
        }
        pd.want_interrupt(false, false);
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = peer.join();
    let counters = net.counters();
    net.reset();
    let mut r = row("passthrough", "rx", size, frames, secs);
    pt_ratios(&mut r, &pd, &drv, &counters, 0);
    Ok(r)
}

fn pt_ratios(
    r: &mut Row,
    pd: &PassthroughDriver,
    drv: &SyntheticDriver,
    counters: &NetCounters,
    queue: usize,
) {
    let f = r.frames.max(1) as f64;
    r.kicks_per_pkt = pd.kicks as f64 / f;
    r.irqs_per_pkt = drv.interrupt.counts[queue].load(Ordering::Relaxed) as f64 / f;
    r.avg_batch = f / counters.wakeups.load(Ordering::Relaxed).max(1) as f64;
}

/// Guest → tap through the same kind of device worker with writev, an
/// AF_PACKET reader on the interface counting frames.
#[cfg(target_os = "linux")]
pub fn tap_tx(size: usize, dur: Duration) -> Result<Row, String> {
    let tap = Tap::new().map_err(|e| e.to_string())?;
    let sock = PacketSocket::bind(tap.ifindex()).map_err(|e| e.to_string())?;
    let mut drv = SyntheticDriver::new(QUEUE_SIZE).map_err(|e| e.to_string())?;
    let mut net = TapNet::new([2, 0, 0, 0, 0, 1], tap);
    net.activate(drv.activation(features()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut bufs = vec![vec![0u8; 2048]; 64];
            let (mut frames, start) = (0u64, Instant::now());
            while !stop.load(Ordering::Relaxed) {
                match sock.recv_batch(&mut bufs) {
                    Ok(0) | Err(_) => {
                        let _ = sock.wait(Some(Duration::from_millis(10)));
                    }
                    Ok(n) => frames += n as u64,
                }
            }
            (frames, start.elapsed())
        })
    };
    let mut f = vec![0u8; frame::MAX_LEN];
    frame::build(&mut f, size.max(frame::MIN_LEN), 0, &Endpoints::default());
    let mut buf = Vec::new();
    SyntheticDriver::tx_buffer(&f[..size], &mut buf);
    let end = Instant::now() + dur;
    drive_tx(&mut drv, &buf, u64::MAX, || Instant::now() >= end);
    stop.store(true, Ordering::Relaxed);
    let (frames, elapsed) = reader
        .join()
        .map_err(|_| "tap reader panicked".to_string())?;
    let counters = net.counters();
    net.reset();
    let mut r = row("tap", "tx", size, frames, elapsed.as_secs_f64());
    ratios(&mut r, &drv, &counters, 1);
    Ok(r)
}

/// An AF_PACKET writer on the interface → tap → device worker with readv →
/// the synthetic driver, which counts frames.
#[cfg(target_os = "linux")]
pub fn tap_rx(size: usize, dur: Duration) -> Result<Row, String> {
    let tap = Tap::new().map_err(|e| e.to_string())?;
    let sock = PacketSocket::bind(tap.ifindex()).map_err(|e| e.to_string())?;
    let mut drv = SyntheticDriver::new(QUEUE_SIZE).map_err(|e| e.to_string())?;
    let mut net = TapNet::new([2, 0, 0, 0, 0, 1], tap);
    net.activate(drv.activation(features()))?;
    for _ in 0..drv.rx.free() {
        drv.rx.post(&drv.mem, None);
    }
    drv.rx.publish(&drv.mem);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut f = vec![0u8; frame::MAX_LEN];
            frame::build(&mut f, size.max(frame::MIN_LEN), 0, &Endpoints::default());
            let batch = vec![f[..size.max(frame::MIN_LEN)].to_vec(); 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(0) | Err(_) = sock.send_batch(&batch) {
                    std::thread::yield_now();
                }
            }
        })
    };
    let frames = drive_rx(&mut drv, dur);
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    let counters = net.counters();
    net.reset();
    let mut r = row("tap", "rx", size, frames.0, frames.1);
    ratios(&mut r, &drv, &counters, 0);
    Ok(r)
}

/// The tap path is Linux's (TUN/TAP and AF_PACKET).
#[cfg(not(target_os = "linux"))]
pub fn tap_tx(_size: usize, _dur: Duration) -> Result<Row, String> {
    Err("the tap path (Linux TUN/TAP and AF_PACKET) is not built on this OS".into())
}

/// The tap path is Linux's (TUN/TAP and AF_PACKET).
#[cfg(not(target_os = "linux"))]
pub fn tap_rx(_size: usize, _dur: Duration) -> Result<Row, String> {
    Err("the tap path (Linux TUN/TAP and AF_PACKET) is not built on this OS".into())
}

/// Which way the guest-in-the-loop rows reach the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestPath {
    /// The guest's virtio-net driver, nmvm's device worker between it and the pipe.
    Virtio,
    /// The guest on the passed-through netmap rings (`--passthrough`, `path=netmap`).
    Netmap,
}

/// Why a guest row could not be measured.
#[derive(Debug)]
pub enum GuestError {
    /// `/dev/kvm` cannot be opened: the guest rows are left out.
    NoKvm(std::io::Error),
    /// Anything else.
    Failed(String),
}

impl std::fmt::Display for GuestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestError::NoKvm(e) => write!(f, "cannot open /dev/kvm ({e})"),
            GuestError::Failed(s) => f.write_str(s),
        }
    }
}

/// The guest's rate line: `nmvm-guest: rate X Mpps (N frames in U us)` →
/// `(N, seconds)`.
pub fn parse_guest_rate(line: &str) -> Option<(u64, f64)> {
    let rest = line.strip_prefix("nmvm-guest: rate ")?;
    let inner = rest.split_once('(')?.1;
    let mut words = inner.split_whitespace();
    let frames = words.next()?.parse().ok()?;
    let us: u64 = words.nth(2)?.parse().ok()?;
    Some((frames, us as f64 / 1e6))
}

/// The bundled guest in a VM (vCPU thread and device worker, both inside
/// `vm::run` on its own thread here) against the pkt-gen engine (this
/// thread's peer thread): `net=gen` for TX, `net=sink` for RX, `secs=` long.
pub fn guest_row(
    path: GuestPath,
    dir: &'static str,
    size: usize,
    dur: Duration,
) -> Result<Row, GuestError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(GuestError::NoKvm)?;
    let tag = match path {
        GuestPath::Virtio => "gv",
        GuestPath::Netmap => "gn",
    };
    let (dev_end, peer_end) = unique_pipe(&format!("{tag}{dir}"), size);
    let secs = dur.as_secs().max(1);
    let len = size.clamp(frame::MIN_LEN, frame::MAX_LEN);
    let mut cmdline = match dir {
        "tx" => format!("net=gen len={len} count=4000000000 secs={secs}"),
        _ => format!("net=sink secs={secs}"),
    };
    if path == GuestPath::Netmap {
        cmdline.push_str(" path=netmap");
    }
    let cfg = VmConfig {
        kernel: KernelChoice::Bundled,
        initrd: None,
        cmdline,
        memory: 256 << 20,
        cpus: 1,
        started: Instant::now(),
        console: ConsoleConfig {
            stdout: false,
            ..ConsoleConfig::default()
        },
        timeout: Some(dur + Duration::from_secs(60)),
        net: Some(NetSpec {
            port: dev_end,
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            vnet_hdr: false,
            passthrough: path == GuestPath::Netmap,
            pipe_slots: nmvm_devices::netmap::shm::DEFAULT_SLOTS,
        }),
    };
    // Pinned (with two cores): the vCPU alone on the second core, the
    // device worker and the pkt-gen peer on the first, as in the DPDK race.
    // Unpinned, the three busy threads land where the scheduler puts them
    // and the rate varies several-fold between runs.
    let cores = affinity::two_cores();
    let stop = Arc::new(AtomicBool::new(false));
    let peer = peer_on(
        peer_end,
        if dir == "tx" { Mode::Rx } else { Mode::Tx },
        size,
        stop.clone(),
        cores.map(|c| c.0),
    );
    let vm = std::thread::Builder::new()
        .name("nmvm-bench-vm".into())
        .spawn(move || {
            // The vCPU thread inherits this; the worker is moved below.
            if let Some((_, guest)) = cores {
                affinity::pin(0, guest);
            }
            vm::run(&cfg)
        })
        .map_err(|e| GuestError::Failed(format!("cannot start the VM thread: {e}")))?;
    if let Some((worker, _)) = cores {
        if !affinity::pin_named("nmvm-net", worker, Duration::from_secs(30)) {
            eprintln!("nmvm bench: could not pin the device worker; this row runs unpinned");
        }
    }
    let outcome = vm
        .join()
        .map_err(|_| GuestError::Failed("the VM thread panicked".into()))?
        .map_err(|e| GuestError::Failed(e.to_string()))?;
    stop.store(true, Ordering::Relaxed);
    let _ = peer.join();
    let rate = outcome
        .recent_lines
        .iter()
        .find_map(|l| parse_guest_rate(l));
    let Some((frames, secs)) = rate else {
        return Err(GuestError::Failed(format!(
            "the guest printed no rate ({}); last lines: {:?}",
            outcome.reason, outcome.recent_lines
        )));
    };
    let name = match path {
        GuestPath::Virtio => "guest-virtio",
        GuestPath::Netmap => "guest-netmap",
    };
    let mut r = row(name, dir, size, frames, secs);
    let f = frames.max(1) as f64;
    r.exits_per_pkt = outcome.exits.total() as f64 / f;
    if let Some(net) = &outcome.net {
        let c = &net.counters;
        r.kicks_per_pkt = c.kicks.load(Ordering::Relaxed) as f64 / f;
        r.irqs_per_pkt = c.interrupts.load(Ordering::Relaxed) as f64 / f;
        r.avg_batch = f / c.wakeups.load(Ordering::Relaxed).max(1) as f64;
    }
    Ok(r)
}

/// The copy limit: one thread copying frames of `size` bytes between two
/// rings of 256 buffers of 2048 bytes.
pub fn copy_limit(size: usize, dur: Duration) -> Row {
    const SLOTS: usize = 256;
    const BUF: usize = 2048;
    let src = vec![0x5au8; SLOTS * BUF];
    let mut dst = vec![0u8; SLOTS * BUF];
    let mut frames = 0u64;
    let start = Instant::now();
    let end = start + dur;
    while Instant::now() < end {
        for i in 0..SLOTS {
            let s = &src[i * BUF..i * BUF + size];
            dst[i * BUF..i * BUF + size].copy_from_slice(std::hint::black_box(s));
        }
        std::hint::black_box(&mut dst);
        frames += SLOTS as u64;
    }
    row("copy", "copy", size, frames, start.elapsed().as_secs_f64())
}

/// Runs every row.
pub fn run(sizes: &[usize], dur: Duration, repeat: u32) -> std::io::Result<BenchReport> {
    let mut rows = Vec::new();
    let mut tap_ok = true;
    let mut guest_ok = true;
    for &size in sizes {
        rows.push(median_of(repeat, || {
            Ok::<_, std::io::Error>(copy_limit(size, dur))
        })?);
        rows.push(median_of(repeat, || netmap_tx(size, dur))?);
        rows.push(median_of(repeat, || netmap_rx(size, dur))?);
        rows.push(median_of(repeat, || passthrough_tx(size, dur))?);
        rows.push(median_of(repeat, || passthrough_rx(size, dur))?);
        if guest_ok && GUEST_SIZES.contains(&size) {
            'guest: for path in [GuestPath::Virtio, GuestPath::Netmap] {
                for dir in ["tx", "rx"] {
                    match median_of(repeat, || guest_row(path, dir, size, dur)) {
                        Ok(r) => rows.push(r),
                        Err(GuestError::NoKvm(e)) => {
                            eprintln!(
                                "nmvm bench: no guest-in-the-loop rows: cannot open /dev/kvm ({e})"
                            );
                            guest_ok = false;
                            break 'guest;
                        }
                        Err(e) => {
                            eprintln!("nmvm bench: guest row {path:?} {dir} {size} B failed: {e}")
                        }
                    }
                }
            }
        }
        if tap_ok {
            for r in [
                median_of(repeat, || tap_tx(size, dur)),
                median_of(repeat, || tap_rx(size, dur)),
            ] {
                match r {
                    Ok(r) => rows.push(r),
                    Err(e) => {
                        eprintln!("nmvm bench: tap path unavailable, no tap rows: {e}");
                        tap_ok = false;
                        break;
                    }
                }
            }
        }
    }
    Ok(BenchReport {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        seconds: dur.as_secs_f64(),
        repeat,
        threads: "synthetic rows, unpinned: synthetic driver, device worker and netmap peer each on its own thread; guest rows, pinned: the VM's vCPU thread (the guest polls at CPL 3) alone on the second core, its device worker and the pkt-gen peer on the first",
        rows,
        dpdk: None,
    })
}

/// Measures one point `n` times; the median row, with the spread.
fn median_of<E>(n: u32, mut measure: impl FnMut() -> Result<Row, E>) -> Result<Row, E> {
    let mut all = (0..n.max(1))
        .map(|_| measure())
        .collect::<Result<Vec<Row>, E>>()?;
    all.sort_by(|a, b| a.mpps.total_cmp(&b.mpps));
    let (lo, hi) = (all[0].mpps, all[all.len() - 1].mpps);
    let mut mid = all.swap_remove(all.len() / 2);
    mid.mpps_min = lo;
    mid.mpps_max = hi;
    Ok(mid)
}

/// The human table.
pub fn table(r: &BenchReport) -> String {
    let mut out = format!(
        "{:<13} {:<4} {:>5} {:>9} {:>17} {:>8} {:>11} {:>10} {:>10} {:>9}\n",
        "path",
        "dir",
        "size",
        "Mpps",
        "(min-max)",
        "Gbit/s",
        "kicks/pkt",
        "irqs/pkt",
        "exits/pkt",
        "batch"
    );
    for row in &r.rows {
        out.push_str(&format!(
            "{:<13} {:<4} {:>5} {:>9.3} {:>17} {:>8.2} {:>11.5} {:>10.5} {:>10.5} {:>9.1}\n",
            row.path,
            row.dir,
            row.size,
            row.mpps,
            format!("({:.2}-{:.2})", row.mpps_min, row.mpps_max),
            row.gbps,
            row.kicks_per_pkt,
            row.irqs_per_pkt,
            row.exits_per_pkt,
            row.avg_batch
        ));
    }
    out
}

/// The ratio lines: nmvm against the copy limit and the tap path, per size.
pub fn ratio_lines(r: &BenchReport) -> Vec<String> {
    let find = |path: &str, dir: &str, size: usize| {
        r.rows
            .iter()
            .find(|x| x.path == path && x.dir == dir && x.size == size)
            .map(|x| x.mpps)
    };
    let mut lines = Vec::new();
    let sizes: Vec<usize> = {
        let mut s: Vec<usize> = r.rows.iter().map(|x| x.size).collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    for size in sizes {
        for dir in ["tx", "rx"] {
            let Some(n) = find("nmvm", dir, size) else {
                continue;
            };
            let mut line = format!("ratio {dir} {size:>4} B: nmvm {n:.2} Mpps");
            if let Some(c) = find("copy", "copy", size) {
                line.push_str(&format!(", {:.2} of the copy limit", n / c));
            }
            if let Some(t) = find("tap", dir, size) {
                line.push_str(&format!(", {:.1}x the tap path", n / t));
            }
            if let Some(p) = find("passthrough", dir, size) {
                line.push_str(&format!(
                    "; passthrough {p:.2} Mpps, {:.2}x the virtio path",
                    p / n
                ));
            }
            for (path, name) in [
                ("guest-virtio", "guest virtio"),
                ("guest-netmap", "guest netmap"),
            ] {
                if let Some(g) = find(path, dir, size) {
                    line.push_str(&format!("; {name} {g:.2} Mpps"));
                }
            }
            lines.push(line);
        }
    }
    if let Some(race) = &r.dpdk {
        lines.extend(race_lines(race));
    }
    lines
}

/// The race's summary: nmvm against DPDK's backend per direction and size.
pub fn race_lines(race: &RaceReport) -> Vec<String> {
    race.points
        .iter()
        .filter_map(|p| {
            let (d, ..) = RacePoint::median(&p.dpdk)?;
            let (n, ..) = RacePoint::median(&p.nmvm)?;
            let switches = match (
                RacePoint::median_switches(&p.nmvm),
                RacePoint::median_switches(&p.dpdk),
            ) {
                (Some(n), Some(d)) => format!(
                    "; backend side {n:.0} context switches/s (DPDK's: {d:.0})"
                ),
                _ => String::new(),
            };
            Some(format!(
                "race {} {:>4} B: nmvm vhost-user {:.2} Mpps, DPDK vhost {:.2} Mpps: {:.2}x DPDK, best runs {:.2}x DPDK; {}{}",
                p.dir.name(),
                p.size,
                n.mpps,
                d.mpps,
                p.ratio().unwrap_or(0.0),
                p.best_ratio().unwrap_or(0.0),
                if p.counts_agree() {
                    "every run's counters agree"
                } else {
                    "COUNTERS DISAGREE (see the JSON)"
                },
                switches
            ))
        })
        .collect()
}

/// An SVG plot of Mpps against frame size for each path and direction.
pub fn svg(r: &BenchReport) -> String {
    let (w, h, left, bottom, top, right) = (760.0, 440.0, 60.0, 50.0, 40.0, 190.0);
    let series: Vec<(&str, &str, &str, &str)> = vec![
        ("copy", "copy", "copy limit", "#888888"),
        ("nmvm", "tx", "nmvm TX", "#1f77b4"),
        ("nmvm", "rx", "nmvm RX", "#2ca02c"),
        ("passthrough", "tx", "passthrough TX", "#9467bd"),
        ("passthrough", "rx", "passthrough RX", "#8c564b"),
        ("guest-virtio", "tx", "guest virtio TX", "#17becf"),
        ("guest-virtio", "rx", "guest virtio RX", "#bcbd22"),
        ("guest-netmap", "tx", "guest netmap TX", "#e377c2"),
        ("guest-netmap", "rx", "guest netmap RX", "#7f7f7f"),
        ("vhost-nmvm", "tx", "vhost-user nmvm TX", "#000080"),
        ("vhost-nmvm", "rx", "vhost-user nmvm RX", "#006400"),
        ("vhost-dpdk", "tx", "vhost-user DPDK TX", "#b8860b"),
        ("vhost-dpdk", "rx", "vhost-user DPDK RX", "#ff69b4"),
        ("tap", "tx", "tap TX", "#d62728"),
        ("tap", "rx", "tap RX", "#ff7f0e"),
    ];
    // A log scale: the copy limit and the tap path are two to three
    // decades apart, and a linear axis flattens everything between them.
    let positive = || r.rows.iter().map(|x| x.mpps).filter(|&m| m > 0.0);
    let lo = positive()
        .fold(f64::INFINITY, f64::min)
        .min(1.0)
        .log10()
        .floor();
    let hi = positive()
        .fold(1.0_f64, f64::max)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let xs = |size: usize| {
        let i = SIZES.iter().position(|&s| s == size).unwrap_or(0) as f64;
        left + i * (w - left - right) / (SIZES.len() - 1) as f64
    };
    let ys = |mpps: f64| {
        let l = mpps.max(10f64.powf(lo)).log10();
        h - bottom - (l - lo) / (hi - lo) * (h - bottom - top)
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"24\" font-size=\"15\">Mpps (log scale) by frame size ({} cores, {:.1} s per point)</text>\n",
        r.cores, r.seconds
    );
    out += &format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for &size in &SIZES {
        out += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{size}</text>\n",
            xs(size),
            h - bottom + 18.0
        );
    }
    out += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">frame size (bytes)</text>\n",
        (left + w - right) / 2.0,
        h - 10.0
    );
    for decade in lo as i32..=hi as i32 {
        let v = 10f64.powi(decade);
        out += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v}</text>\n<line x1=\"{left}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#eeeeee\"/>\n",
            left - 6.0,
            ys(v) + 4.0,
            w - right,
            y = ys(v)
        );
    }
    for (i, (path, dir, name, color)) in series.iter().enumerate() {
        let pts: Vec<String> = r
            .rows
            .iter()
            .filter(|x| x.path == *path && x.dir == *dir)
            .map(|x| format!("{:.1},{:.1}", xs(x.size), ys(x.mpps)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        );
        let ly = top + 20.0 * i as f64;
        out += &format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            w - right + 15.0,
            w - right + 40.0,
            w - right + 46.0,
            ly + 4.0
        );
    }
    out += "</svg>\n";
    out
}

/// Sends exactly `n` 64-byte frames guest → peer and returns how many the
/// peer received: a fixed amount of device-worker work for callgrind.
pub fn worker_frames(n: u64) -> std::io::Result<u64> {
    let (dev_end, peer_end) = unique_pipe("cg", 64);
    let port = Port::open(&dev_end, &PortOptions::default()).map_err(std::io::Error::other)?;
    let mut drv = SyntheticDriver::new(QUEUE_SIZE)?;
    let mut net = Net::new([2, 0, 0, 0, 0, 1], port);
    net.activate(drv.activation(features()))
        .map_err(std::io::Error::other)?;
    let stop = Arc::new(AtomicBool::new(false));
    let peer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let opts = PktGenOptions {
                port: peer_end,
                mode: Mode::Rx,
                count: n,
                report: Duration::from_secs(3600),
                verbose: false,
                check: false,
                idle_timeout: Some(Duration::from_secs(60)),
                ..PktGenOptions::default()
            };
            pktgen::run(&opts, &stop).map(|r| r.received).unwrap_or(0)
        })
    };
    let mut f = vec![0u8; frame::MAX_LEN];
    frame::build(&mut f, 64, 0, &Endpoints::default());
    let mut buf = Vec::new();
    SyntheticDriver::tx_buffer(&f[..64], &mut buf);
    drive_tx(&mut drv, &buf, n, || peer.is_finished());
    let received = peer.join().unwrap_or(0);
    net.reset();
    Ok(received)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_rate_lines_parse() {
        assert_eq!(
            parse_guest_rate("nmvm-guest: rate 12.345 Mpps (12345000 frames in 1000000 us)"),
            Some((12_345_000, 1.0))
        );
        assert_eq!(
            parse_guest_rate("nmvm-guest: net gen: rx 0 tx 5 bad 0"),
            None
        );
        assert_eq!(
            parse_guest_rate("nmvm-guest: rate 1 Mpps (x frames in 3 us)"),
            None
        );
    }

    #[test]
    fn the_table_has_the_guest_columns() {
        let mut r = row("guest-netmap", "tx", 64, 20_000_000, 1.0);
        r.exits_per_pkt = 0.0001;
        let report = BenchReport {
            cores: 2,
            seconds: 1.0,
            repeat: 1,
            threads: "",
            rows: vec![row("nmvm", "tx", 64, 8_000_000, 1.0), r],
            dpdk: None,
        };
        let t = table(&report);
        assert!(t.contains("exits/pkt"), "{t}");
        assert!(t.contains("guest-netmap  tx      64    20.000"), "{t}");
        assert!(ratio_lines(&report)[0].contains("guest netmap 20.00 Mpps"));
        assert!(svg(&report).contains("guest netmap TX"));
    }
}
