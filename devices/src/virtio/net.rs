//! virtio-net with one queue pair whose backend is a netmap port.
//!
//! Packets move between descriptor chains and netmap slots in batches on a
//! device worker thread, never on a vCPU thread. The queues are read and
//! written through host pointers translated once at activation
//! ([`super::splitq`]), and bytes are copied straight between guest buffers
//! and netmap buffers.
//!
//! TX copies each chain into consecutive slots (`NS_MOREFRAG` on all but the
//! last); one-buffer chains whose frame fits a slot, the common case, take
//! a fast path. The used index is published every `CHUNK` frames (an
//! interrupt only if the driver asked for one), the ring synced every few
//! hundred slots or when the guest has no more. RX copies each netmap frame
//! into one or more guest buffers (`MRG_RXBUF`), one-slot frames into
//! one-buffer chains on a fast path, and releases the slots at the next
//! sync. No system call, lock, allocation or shared counter update happens
//! per frame.
//!
//! The guest and the netmap peer are both untrusted: a bad chain is
//! returned unused and counted, a bad slot is skipped by the netmap layer
//! and counted, and nothing is ever read or written outside guest RAM or
//! the port's region.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, warn};

use super::passthrough::{
    self, Csb, Geometry, Kloop, StartError, CONTROL_OFF, CONTROL_ON, CONTROL_REFUSED, F_NMVM_NETMAP,
};
use super::splitq::{BadAvailIndex, Chain, DeviceQueue, GuestRam, OneBuf};
use super::{Activation, VirtioDevice, VirtioInterrupt, F_IN_ORDER, F_RING_EVENT_IDX, F_VERSION_1};
use crate::bus::lock;
use crate::eventfd::EventFd;
use crate::netmap::{Port, PortStats, Ring, Slot, NETMAP_MAX_FRAGS, NS_MOREFRAG};
use std::sync::Mutex;

/// virtio device ID of a network card.
pub const DEVICE_TYPE_NET: u16 = 1;
/// Feature: the device handles partial checksums.
pub const F_CSUM: u64 = 1 << 0;
/// Feature: the driver handles partial checksums.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// Feature: the driver accepts TSOv4.
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// Feature: the driver accepts TSOv6.
pub const F_GUEST_TSO6: u64 = 1 << 8;
/// Feature: the device accepts TSOv4.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// Feature: the device accepts TSOv6.
pub const F_HOST_TSO6: u64 = 1 << 12;
/// Feature: the device has a MAC address.
pub const F_MAC: u64 = 1 << 5;
/// Feature: mergeable receive buffers.
pub const F_MRG_RXBUF: u64 = 1 << 15;
/// Feature: the configuration has a link status.
pub const F_STATUS: u64 = 1 << 16;
/// Length of the virtio-net header with VERSION_1.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub(crate) const HDR_NUM_BUFFERS: usize = 10;
/// Queue size offered for both queues.
pub const QUEUE_SIZE: u16 = 256;
pub(crate) const RX: usize = 0;
pub(crate) const TX: usize = 1;
/// Shortest frame accepted from the guest: an Ethernet header.
pub(crate) const MIN_FRAME: usize = 14;
/// Largest frame (without header) accepted from the guest.
pub(crate) const MAX_FRAME: usize = 65_535 + 14;

/// Device counters, readable while it runs.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames sent from the guest to the port.
    pub tx_frames: AtomicU64,
    /// Bytes sent (without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Frames delivered from the port to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered.
    pub rx_bytes: AtomicU64,
    /// Guest chains dropped: bad address, loop, zero length, wrong
    /// direction, too long.
    pub bad_chains: AtomicU64,
    /// Avail-ring entries naming a descriptor outside the table.
    pub bad_heads: AtomicU64,
    /// Times the driver's avail index was impossible (device needs reset).
    pub bad_avail_index: AtomicU64,
    /// Frames from the port dropped because they did not fit the guest's
    /// buffers (without mergeable buffers).
    pub rx_too_big: AtomicU64,
    /// Tx slots (frames, for one-slot frames) still waiting for the peer
    /// when the worker last stopped.
    pub tx_unsent_at_stop: AtomicU64,
    /// Guest kicks received by the worker.
    pub kicks: AtomicU64,
    /// Interrupts raised.
    pub interrupts: AtomicU64,
    /// Worker wake-ups.
    pub wakeups: AtomicU64,
}

impl NetCounters {
    /// Everything the device dropped because the guest got it wrong.
    pub fn guest_errors(&self) -> u64 {
        [&self.bad_chains, &self.bad_heads, &self.bad_avail_index]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// A one-line summary.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "tx {} frames {} bytes, rx {} frames {} bytes, dropped: {} bad chains, {} bad heads, {} bad avail index, {} rx too big, {} unsent at stop; {} kicks, {} interrupts",
            g(&self.tx_frames),
            g(&self.tx_bytes),
            g(&self.rx_frames),
            g(&self.rx_bytes),
            g(&self.bad_chains),
            g(&self.bad_heads),
            g(&self.bad_avail_index),
            g(&self.rx_too_big),
            g(&self.tx_unsent_at_stop),
            g(&self.kicks),
            g(&self.interrupts)
        )
    }
}

struct Running {
    /// Set, then `stop` written, to end the worker.
    stopping: Arc<AtomicBool>,
    stop: Arc<EventFd>,
    handle: JoinHandle<Port>,
}

/// The virtio-net device.
pub struct Net {
    mac: [u8; 6],
    port: Option<Port>,
    running: Option<Running>,
    counters: Arc<NetCounters>,
    needs_reset: Arc<AtomicBool>,
    features: u64,
    acked: Arc<AtomicU64>,
    port_stats: Arc<Mutex<PortStats>>,
    /// Set when the port's rings may be passed through to the guest.
    passthrough: Option<(Geometry, Arc<PassthroughControl>)>,
    /// Where the worker stopped in each queue (see [`QueuePosition`]).
    positions: Arc<SavedPositions>,
}

/// The passthrough registers, shared by the transport (guest writes, on a
/// vCPU thread) and the device worker (which acts on them).
#[derive(Debug, Default)]
pub struct PassthroughControl {
    csb_lo: AtomicU32,
    csb_hi: AtomicU32,
    /// 0: nothing asked; [`REQUEST_START`] or [`REQUEST_STOP`].
    request: AtomicU32,
    /// What `control` reads.
    state: AtomicU32,
    /// Syncs the worker did for the guest.
    pub syncs: AtomicU64,
    /// Interrupts the guest asked for and got.
    pub interrupts: AtomicU64,
    /// Times the worker slept and asked the guest for a kick.
    pub sleeps: AtomicU64,
    /// Starts refused (bad CSB address, feature not accepted, not running).
    pub refused: AtomicU64,
}

/// netmap's global allocator (shared by every port that has no private
/// region).
const NETMAP_GLOBAL_MEM_ID: u16 = 1;

const REQUEST_START: u32 = 1;
const REQUEST_STOP: u32 = 2;

impl PassthroughControl {
    fn refuse(&self, why: &StartError) {
        // Not a warning: the guest can repeat this at will; it is counted.
        debug!("virtio-net: netmap passthrough refused: {why}");
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.state.store(CONTROL_REFUSED, Ordering::Release);
    }

    fn csb_addr(&self) -> u64 {
        u64::from(self.csb_hi.load(Ordering::Acquire)) << 32
            | u64::from(self.csb_lo.load(Ordering::Acquire))
    }
}

impl Net {
    /// A virtio-net device with address `mac` on `port`.
    pub fn new(mac: [u8; 6], port: Port) -> Self {
        // In order: both queues consume avail entries strictly one after
        // the other and push each used entry as they go (bad chains too,
        // with length 0; a frame waiting for buffers rewinds both indexes
        // together; only a head outside the table, which names no buffer,
        // is skipped), so this costs the device nothing. Drivers that know
        // it reclaim by the used index without reading used entries; DPDK's
        // virtio PMD then takes its in-order paths, as it does with DPDK's
        // own vhost backend, which offers it too.
        let mut features =
            F_VERSION_1 | F_RING_EVENT_IDX | F_IN_ORDER | F_MAC | F_STATUS | F_MRG_RXBUF;
        if port.virtio_net_hdr_len() as usize == HDR_LEN {
            // The port carries the header to the peer, so offloads pass
            // through untouched.
            features |=
                F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_GUEST_TSO4 | F_GUEST_TSO6;
        }
        Self {
            mac,
            port: Some(port),
            running: None,
            counters: Arc::new(NetCounters::default()),
            needs_reset: Arc::new(AtomicBool::new(false)),
            features,
            acked: Arc::new(AtomicU64::new(0)),
            port_stats: Arc::new(Mutex::new(PortStats::default())),
            passthrough: None,
            positions: Arc::default(),
        }
    }

    /// Offers netmap passthrough ([`F_NMVM_NETMAP`]): the guest may operate
    /// the port's rings itself, in the port's region, which the VMM maps
    /// into guest-physical memory (BAR 2). Returns the region's geometry.
    pub fn enable_passthrough(&mut self) -> Result<Geometry, String> {
        let port = self
            .port
            .as_mut()
            .ok_or("passthrough must be enabled before the device runs")?;
        if !port.is_userspace() && port.mem_id() == NETMAP_GLOBAL_MEM_ID {
            return Err(format!(
                "{} uses netmap's global memory region, which other netmap applications \
                 share; passthrough needs a port with a private region (e.g. a VALE port)",
                port.name()
            ));
        }
        let geometry = Geometry::of(port);
        self.features |= F_NMVM_NETMAP;
        let control = Arc::new(PassthroughControl::default());
        self.passthrough = Some((geometry, control));
        Ok(geometry)
    }

    /// The passthrough registers and counters, if passthrough is offered.
    pub fn passthrough_control(&self) -> Option<Arc<PassthroughControl>> {
        self.passthrough.as_ref().map(|(_, c)| c.clone())
    }

    /// The port's memory region (host address, length), to map into the
    /// guest; `None` while the worker owns the port.
    pub fn port_region(&self) -> Option<(std::ptr::NonNull<u8>, usize)> {
        self.port.as_ref().map(|p| p.region())
    }

    /// What the netmap layer counted about the peer, as of the worker's
    /// last idle moment (and exactly, once the device is stopped).
    pub fn port_stats(&self) -> Arc<Mutex<PortStats>> {
        self.port_stats.clone()
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// The features the driver accepted when it last activated the device (0
    /// before that; a reset keeps them, so they can be reported at exit).
    pub fn acked_features(&self) -> Arc<AtomicU64> {
        self.acked.clone()
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_NET
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status u16 (link up), max_virtqueue_pairs u16, then the
        // passthrough fields at passthrough::CFG_BASE.
        let mut cfg = [0u8; (passthrough::CFG_BASE + passthrough::CFG_LEN) as usize];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&1u16.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        if let Some((geometry, control)) = &self.passthrough {
            for ofs in (0..passthrough::CFG_LEN).step_by(4) {
                let v = match ofs {
                    passthrough::cfg::CSB_LO => control.csb_lo.load(Ordering::Acquire),
                    passthrough::cfg::CSB_HI => control.csb_hi.load(Ordering::Acquire),
                    passthrough::cfg::CONTROL => control.state.load(Ordering::Acquire),
                    _ => geometry.field(ofs),
                };
                let at = (passthrough::CFG_BASE + ofs) as usize;
                cfg[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only the passthrough registers are writable, as whole u32s.
        let Some((_, control)) = &self.passthrough else {
            return;
        };
        let (Some(rel), Ok(bytes)) = (
            offset.checked_sub(passthrough::CFG_BASE),
            <[u8; 4]>::try_from(data),
        ) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match rel {
            passthrough::cfg::CSB_LO => control.csb_lo.store(v, Ordering::Release),
            passthrough::cfg::CSB_HI => control.csb_hi.store(v, Ordering::Release),
            passthrough::cfg::CONTROL => {
                let Some(running) = &self.running else {
                    control.refuse(&StartError::NotRunning);
                    return;
                };
                if v == 1 && self.acked.load(Ordering::Relaxed) & F_NMVM_NETMAP == 0 {
                    control.refuse(&StartError::NotNegotiated);
                    return;
                }
                let request = if v == 1 { REQUEST_START } else { REQUEST_STOP };
                // Reads 0 until the worker has decided.
                control.state.store(CONTROL_OFF, Ordering::Release);
                control.request.store(request, Ordering::Release);
                // Wakes the worker; it drains the eventfd unless stopping.
                let _ = running.stop.write(1);
            }
            _ => {}
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        if self.port.is_none() {
            return Err("the device is already running".into());
        }
        let (Some(rxq), Some(txq), Some(rx_kick), Some(tx_kick)) = (
            a.queues.get(RX),
            a.queues.get(TX),
            a.kicks.get(RX),
            a.kicks.get(TX),
        ) else {
            return Err("virtio-net needs two queues".into());
        };
        // The rings are translated once; a layout outside guest RAM (or
        // across regions) is refused here, and the transport reports
        // DEVICE_NEEDS_RESET.
        let ram = GuestRam::new(&a.mem)?;
        let rxq = DeviceQueue::new(&ram, rxq).map_err(|e| format!("receive queue: {e}"))?;
        let txq = DeviceQueue::new(&ram, txq).map_err(|e| format!("transmit queue: {e}"))?;
        let stop = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| e.to_string())?,
        );
        let stopping = Arc::new(AtomicBool::new(false));
        let port = self.port.take().ok_or("the device is already running")?;
        self.acked.store(a.features, Ordering::Relaxed);
        self.needs_reset.store(false, Ordering::Relaxed);
        let worker = Worker {
            ram,
            rxq,
            txq,
            rx_kick: rx_kick.clone(),
            tx_kick: tx_kick.clone(),
            interrupt: a.interrupt,
            port_hdr: port.virtio_net_hdr_len() as usize == HDR_LEN,
            port,
            mergeable: a.features & F_MRG_RXBUF != 0,
            counters: self.counters.clone(),
            needs_reset: self.needs_reset.clone(),
            port_stats: self.port_stats.clone(),
            stop: stop.clone(),
            stopping: stopping.clone(),
            chain: Chain::default(),
            spans: [Span {
                ptr: std::ptr::null(),
                len: 0,
            }; NETMAP_MAX_FRAGS + 1],
            tx_unsynced: 0,
            ones: Box::new([OneBuf::default(); CHUNK]),
            tally: Tally::default(),
            passthrough: self
                .passthrough
                .as_ref()
                .map(|(g, c)| (g.rings() as usize, c.clone())),
            kloop: None,
            positions: self.positions.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("nmvm-net".into())
            .spawn(move || {
                if let Some(hook) = WORKER_START_HOOK.get() {
                    hook();
                }
                #[cfg(feature = "hostile-peer")]
                hostile_worker_syscall();
                worker.run()
            })
            .map_err(|e| format!("cannot start the device worker: {e}"))?;
        self.running = Some(Running {
            stopping,
            stop,
            handle,
        });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some((_, control)) = &self.passthrough {
            control.request.store(0, Ordering::Release);
            control.state.store(CONTROL_OFF, Ordering::Release);
        }
        if let Some(r) = self.running.take() {
            r.stopping.store(true, Ordering::Relaxed);
            let _ = r.stop.write(1);
            match r.handle.join() {
                Ok(port) => self.port = Some(port),
                Err(_) => warn!("virtio-net: the device worker panicked; the port is lost"),
            }
        }
        self.needs_reset.store(false, Ordering::Relaxed);
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Relaxed)
    }
}

/// Run first by every device worker thread, before it touches guest
/// memory or the port: `nmvm run` installs the worker's seccomp filter here.
static WORKER_START_HOOK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets the function every device worker thread runs first (once per
/// process; later calls are ignored and return false).
pub fn set_worker_start_hook(hook: fn()) -> bool {
    WORKER_START_HOOK.set(hook).is_ok()
}

/// Testing only (`hostile-peer` feature, never in release builds): with
/// `NMVM_TEST_WORKER_SYSCALL=socket` in the environment, the worker opens
/// a socket, a system call its seccomp filter forbids, as a compromised
/// worker would. Unfiltered, the socket is closed again and nothing
/// happens.
#[cfg(feature = "hostile-peer")]
fn hostile_worker_syscall() {
    if std::env::var_os("NMVM_TEST_WORKER_SYSCALL").is_some_and(|v| v == "socket") {
        warn!("virtio-net: NMVM_TEST_WORKER_SYSCALL: the worker opens a socket");
        // SAFETY: socket() has no memory-safety preconditions; a returned
        // descriptor is owned here and closed at once.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd >= 0 {
                libc::close(fd);
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

// ---------------------------------------------------------------------------
// Queue positions across a stop, for transports that take the queues back
// from the device and hand them to it again later (vhost-user's
// GET_VRING_BASE / SET_VRING_BASE). The worker saves where it stopped as it
// ends; `Net::queue_positions` reads it once the worker is gone.

/// Where the device stopped in one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueuePosition {
    /// The next avail-ring entry the device would have consumed (what
    /// vhost-user's GET_VRING_BASE returns).
    pub next_avail: u16,
    /// The next used-ring entry the device would have written; every used
    /// element before it is published in the used index.
    pub next_used: u16,
}

/// The positions the worker saved when it last ended: (receive, transmit).
#[derive(Debug, Default)]
struct SavedPositions(Mutex<Option<[QueuePosition; 2]>>);

impl SavedPositions {
    fn save(&self, rxq: &DeviceQueue, txq: &DeviceQueue) {
        let at = |q: &DeviceQueue| QueuePosition {
            next_avail: q.next_avail(),
            next_used: q.next_used(),
        };
        *lock(&self.0) = Some([at(rxq), at(txq)]);
    }
}

impl Net {
    /// Where the device stopped in its queues (index = queue number: receive,
    /// transmit) when its worker last ended, i.e. after
    /// [`VirtioDevice::reset`]; `None` while the device runs or if it never
    /// ran. At that point every chain the device consumed has been returned
    /// in the used ring, except avail entries that named no descriptor
    /// (counted as bad heads), so `next_used` may trail `next_avail` only
    /// for a driver that broke its ring.
    pub fn queue_positions(&self) -> Option<[QueuePosition; 2]> {
        if self.running.is_some() {
            return None;
        }
        *lock(&self.positions.0)
    }
}

pub(crate) use super::splitq::ChainError;

/// Counts of one batch, added to the shared [`NetCounters`] once per batch.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    tx_frames: u64,
    tx_bytes: u64,
    rx_frames: u64,
    rx_bytes: u64,
    bad_chains: u64,
    bad_heads: u64,
    rx_too_big: u64,
}

impl Tally {
    fn flush(&mut self, c: &NetCounters) {
        for (n, counter) in [
            (self.tx_frames, &c.tx_frames),
            (self.tx_bytes, &c.tx_bytes),
            (self.rx_frames, &c.rx_frames),
            (self.rx_bytes, &c.rx_bytes),
            (self.bad_chains, &c.bad_chains),
            (self.bad_heads, &c.bad_heads),
            (self.rx_too_big, &c.rx_too_big),
        ] {
            if n != 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
        *self = Tally::default();
    }
}

/// A run of bytes to copy to the guest: the header we make up, or a netmap
/// fragment.
#[derive(Debug, Clone, Copy)]
struct Span {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a span is an address and a length; it does not access memory by
// itself, and the worker only fills and reads spans within one batch, while
// the port (and the static header) they point into are alive.
unsafe impl Send for Span {}

/// The virtio-net header of a frame whose port carries none (num_buffers is
/// patched in the guest's copy).
static ZERO_HDR: [u8; HDR_LEN] = [0; HDR_LEN];

/// How long a stopping worker waits for the peer to take the frames still
/// in the tx ring.
const STOP_DRAIN: std::time::Duration = std::time::Duration::from_millis(500);

/// Frames the netmap worker moves per queue before it looks at the other
/// queue.
const WORKER_BATCH: usize = 256;

/// Frames the fast paths handle between two publications of the used
/// index. Smaller than a queue, so that a driver that asked to be
/// interrupted half-way through the ring hears of it while the device still
/// has work, and refills it before the device runs dry.
const CHUNK: usize = 64;

/// TX slots the worker fills before it hands them to the peer (a sync,
/// and a wake-up if the peer sleeps), while the guest keeps it busy.
const TX_SYNC_SLOTS: u32 = 256;

/// Slots moved or returned before the worker wakes a peer that sleeps on
/// them (the rest wake it when the worker itself goes to sleep): a peer
/// that shares a core with the worker would otherwise be woken, and
/// switched to, for every small batch. The port caps it at half its ring.
/// With DPDK's virtio_user as the driver and pkt-gen on the worker's core
/// (1024-slot pipe, 1514-byte frames), 512 instead of 256 cut that core's
/// context switches by about a third (`perf stat -e context-switches`)
/// and gave the higher rate in ten of ten back-to-back pairs of 3-second
/// runs; 768 was no better than 512. Whole races against DPDK did not
/// move beyond the machine's noise.
const PEER_KICK_SLOTS: u32 = 512;

/// How long the worker looks for more work before it sleeps (see
/// `Worker::spin_for_work`).
const SPIN: std::time::Duration = std::time::Duration::from_micros(20);

/// Most guest buffers one received frame may fill (mergeable buffers).
const MAX_RX_BUFS: usize = 64;

struct Worker {
    ram: GuestRam,
    rxq: DeviceQueue,
    txq: DeviceQueue,
    rx_kick: Arc<EventFd>,
    tx_kick: Arc<EventFd>,
    interrupt: Arc<dyn VirtioInterrupt>,
    port: Port,
    /// The port's frames carry the virtio-net header.
    port_hdr: bool,
    mergeable: bool,
    counters: Arc<NetCounters>,
    needs_reset: Arc<AtomicBool>,
    port_stats: Arc<Mutex<PortStats>>,
    stop: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
    /// Scratch: the chain being handled.
    chain: Chain,
    /// Scratch: the spans of the frame being received.
    spans: [Span; NETMAP_MAX_FRAGS + 1],
    /// TX slots filled since the last txsync.
    tx_unsynced: u32,
    /// Scratch: one-buffer chains for the fast paths.
    ones: Box<[OneBuf; CHUNK]>,
    tally: Tally,
    /// With passthrough offered: CSB entries and the registers.
    passthrough: Option<(usize, Arc<PassthroughControl>)>,
    /// While passthrough runs: the rings are the guest's.
    kloop: Option<Kloop>,
    /// Written as the worker ends (see [`QueuePosition`]).
    positions: Arc<SavedPositions>,
}

/// What happened to one received frame.
enum Deliver {
    Done,
    Dropped,
    NoBuffers,
    QueueBroken,
}

impl Worker {
    fn run(mut self) -> Port {
        self.port.set_kick_batch(PEER_KICK_SLOTS);
        let mut fds = [
            libc::pollfd {
                fd: self.tx_kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.rx_kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.port.poll_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let mut tx_waits_for_port = false;
        // The avail index at which the receive queue ran out of buffers.
        let mut rx_waits_for_guest: Option<u16> = None;
        // Passthrough: the guest waits for frames / the peer for room.
        let (mut pt_rx_hungry, mut pt_tx_blocked) = (false, false);
        loop {
            self.passthrough_requests();
            let mut progress = false;
            if let Some(k) = self.kloop.as_mut() {
                let st = k.step(&mut self.port);
                if st.tx_slots > 0 {
                    self.counters
                        .tx_frames
                        .fetch_add(st.tx_slots, Ordering::Relaxed);
                }
                if st.rx_slots > 0 {
                    self.counters
                        .rx_frames
                        .fetch_add(st.rx_slots, Ordering::Relaxed);
                }
                for (irq, queue) in [(st.irq_rx, RX), (st.irq_tx, TX)] {
                    if irq {
                        self.interrupt.signal_queue(queue as u16);
                        self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
                    }
                }
                progress = st.progress;
                (pt_rx_hungry, pt_tx_blocked) = (st.rx_hungry, st.tx_blocked);
            } else if !self.needs_reset.load(Ordering::Relaxed) {
                let (moved, blocked) = self.process_tx();
                progress |= moved;
                tx_waits_for_port = blocked;
                let (moved, blocked) = self.process_rx();
                progress |= moved;
                rx_waits_for_guest = blocked;
            }
            if self.stopping.load(Ordering::Relaxed) {
                break;
            }
            if progress {
                continue;
            }
            let blocked = if self.kloop.is_some() {
                (pt_tx_blocked, None)
            } else {
                (tx_waits_for_port, rx_waits_for_guest)
            };
            if self.spin_for_work(blocked.0, blocked.1) {
                continue;
            }
            // About to sleep: ask the guest and the peer for notifications
            // about exactly what we wait for, then look once more so that
            // no kick or frame slips in between. Frames waiting for guest
            // buffers must not keep the worker awake.
            let (want_rx, want_tx) = if let Some(k) = self.kloop.as_mut() {
                if k.prepare_sleep() {
                    continue;
                }
                (pt_rx_hungry, pt_tx_blocked)
            } else {
                let mut guest_more = false;
                if !self.needs_reset.load(Ordering::Relaxed) {
                    let tx_more = self.txq.enable_notifications().unwrap_or(true);
                    guest_more |= tx_more && !tx_waits_for_port;
                    if let Some(at) = rx_waits_for_guest {
                        guest_more |= self.rxq.enable_notifications_past(at).unwrap_or(true);
                    }
                }
                if guest_more {
                    continue;
                }
                (rx_waits_for_guest.is_none(), tx_waits_for_port)
            };
            // Frames the peer had no room for must still leave once it
            // makes room, even if the guest sends nothing more.
            let drain = !want_tx && self.port.tx_pending_slots() > 0;
            let ready = if drain {
                self.port.prepare_wait_drain(want_rx)
            } else {
                self.port.prepare_wait(want_rx, want_tx)
            };
            let port_ready = match ready {
                Ok(ready) => ready,
                Err(e) => {
                    warn!("virtio-net: netmap port: {e}");
                    false
                }
            };
            if port_ready {
                if let Some(k) = &self.kloop {
                    k.set_host_need_kick(false);
                }
                continue;
            }
            self.publish_stats();
            fds[3].events = self.port.poll_events(want_rx, want_tx);
            fds.iter_mut().for_each(|f| f.revents = 0);
            // SAFETY: `fds` is a valid array of pollfd for its whole length
            // and every descriptor in it stays open while we wait.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    warn!("virtio-net: poll: {err}");
                }
                continue;
            }
            self.counters.wakeups.fetch_add(1, Ordering::Relaxed);
            if let Some(k) = &self.kloop {
                k.set_host_need_kick(false);
            }
            // Clear what fired, and only that (each is a system call).
            for (fd, kick) in fds.iter().zip([&self.tx_kick, &self.rx_kick]) {
                if fd.revents != 0 && kick.read().is_ok() {
                    self.counters.kicks.fetch_add(1, Ordering::Relaxed);
                }
            }
            if fds[2].revents != 0 && !self.stopping.load(Ordering::Relaxed) {
                // A passthrough request, not a stop.
                let _ = self.stop.read();
            }
            if fds[3].revents != 0 {
                self.port.ack_wakeup();
            }
        }
        self.kloop = None;
        self.drain_tx_at_stop();
        self.port.flush_kicks();
        self.port.set_kick_batch(1);
        self.publish_stats();
        self.positions.save(&self.rxq, &self.txq);
        self.port
    }

    /// Looks for new work for up to [`SPIN`] before the worker goes to
    /// sleep: a driver that streams posts more within microseconds, and a
    /// sleep makes it kick, which costs it a system call and a cross-core
    /// wake-up (tens of microseconds on a nested host: measured against
    /// DPDK's virtio_user, kicks then slowed the driver until the worker
    /// idled more and asked for still more kicks, halving the rate). True if
    /// there is work. Only what the worker could act on
    /// counts: avail entries unless the port is full, peer frames unless the
    /// guest has no buffers.
    fn spin_for_work(&mut self, tx_blocked: bool, rx_blocked: Option<u16>) -> bool {
        if self.kloop.is_none() && self.needs_reset.load(Ordering::Relaxed) {
            return false;
        }
        let until = std::time::Instant::now() + SPIN;
        loop {
            // Yielding rather than spinning: a peer on the same core (a
            // pkt-gen, the vCPU) runs meanwhile if it has work.
            std::thread::yield_now();
            if self.has_work(tx_blocked, rx_blocked) {
                return true;
            }
            if self.stopping.load(Ordering::Relaxed) || std::time::Instant::now() >= until {
                return false;
            }
        }
    }

    /// Whether the guest or the peer moved anything the worker could act
    /// on now (see [`Worker::spin_for_work`]).
    fn has_work(&mut self, tx_blocked: bool, rx_blocked: Option<u16>) -> bool {
        if let Some(k) = &self.kloop {
            return k.guest_moved() || k.peer_moved(&mut self.port, tx_blocked);
        }
        if !tx_blocked && self.txq.pending().map_or(true, |n| n > 0) {
            return true;
        }
        match rx_blocked {
            // More buffers than when the frame did not fit.
            Some(at) => self.rxq.pending().is_err() || self.rxq.avail_seen() != at,
            None => {
                if self.port.rxsync().is_err() {
                    return false;
                }
                let rx = self.port.rx_ring();
                rx.head() != rx.tail()
            }
        }
    }

    /// Before the worker ends: gives the peer up to [`STOP_DRAIN`] to take
    /// the frames still in the tx ring, and counts those it did not take
    /// (they stay in the ring: sent after a device reset, lost if the VM
    /// ends).
    fn drain_tx_at_stop(&mut self) {
        let deadline = std::time::Instant::now() + STOP_DRAIN;
        while self.port.tx_pending_slots() > 0
            && self.port.peer_connected()
            && std::time::Instant::now() < deadline
        {
            if let Err(e) = self.port.txsync() {
                warn!("virtio-net: txsync: {e}");
                break;
            }
            self.port.flush_kicks();
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        self.counters
            .tx_unsent_at_stop
            .store(u64::from(self.port.tx_pending_slots()), Ordering::Relaxed);
    }

    /// Makes the figures readable from outside while the worker sleeps.
    fn publish_stats(&self) {
        *lock(&self.port_stats) = self.port.stats();
        if let (Some(k), Some((_, control))) = (&self.kloop, &self.passthrough) {
            control.syncs.store(k.stats.syncs, Ordering::Relaxed);
            control
                .interrupts
                .store(k.stats.interrupts, Ordering::Relaxed);
            control.sleeps.store(k.stats.sleeps, Ordering::Relaxed);
        }
    }

    /// Starts or stops passthrough when the guest asked for it.
    fn passthrough_requests(&mut self) {
        let Some((entries, control)) = &self.passthrough else {
            return;
        };
        if control.request.load(Ordering::Relaxed) == 0 {
            return;
        }
        let (entries, control) = (*entries, control.clone());
        match control.request.swap(0, Ordering::AcqRel) {
            REQUEST_START => match Csb::new(&self.ram, control.csb_addr(), entries) {
                Ok(csb) => {
                    self.publish_stats();
                    self.kloop = Some(Kloop::start(csb, &mut self.port));
                    control.state.store(CONTROL_ON, Ordering::Release);
                    debug!("virtio-net: netmap passthrough on");
                }
                Err(e) => control.refuse(&e),
            },
            REQUEST_STOP => {
                self.publish_stats();
                self.kloop = None;
                control.state.store(CONTROL_OFF, Ordering::Release);
            }
            _ => {}
        }
    }

    fn bad_avail(&mut self) {
        self.counters
            .bad_avail_index
            .fetch_add(1, Ordering::Relaxed);
        // Not a warning: a guest could repeat this at will; the count is
        // reported when the VM ends.
        debug!("virtio-net: the driver's avail index is impossible; the device needs a reset");
        self.needs_reset.store(true, Ordering::Relaxed);
        self.interrupt.signal_config();
    }

    /// Publishes what `queue` used in this batch and interrupts the driver
    /// if it asked for it.
    fn finish_batch(&mut self, queue: usize) {
        let q = if queue == RX {
            &mut self.rxq
        } else {
            &mut self.txq
        };
        publish(q, queue, &*self.interrupt, &self.counters);
        self.tally.flush(&self.counters);
    }

    /// Guest → port. Returns whether any avail entry was consumed, and
    /// whether the guest has more to send than the port has room for.
    fn process_tx(&mut self) -> (bool, bool) {
        self.txq.disable_notifications();
        let skip = if self.port_hdr { 0 } else { HDR_LEN };
        let Self {
            ram,
            txq,
            port,
            chain,
            ones,
            tally,
            tx_unsynced,
            interrupt,
            counters,
            ..
        } = self;
        let tx = port.tx_ring();
        // A fragment's length must fit the 16-bit slot length.
        let bs = (tx.buf_size() as usize).min(usize::from(u16::MAX));
        let start = tx.cur();
        let mut cur = start;
        let mut room = tx.space_from_cur() as usize;
        let mut blocked = false;
        let (waiting, broken) = match txq.pending() {
            Ok(n) => (usize::from(n).min(WORKER_BATCH), false),
            Err(BadAvailIndex) => (0, true),
        };
        let (mut frames, mut bytes) = (0usize, 0usize);
        let mut k = 0;
        while k < waiting {
            // The fast path: a run of one-buffer chains, one slot each.
            let n = (waiting - k).min(room).min(CHUNK);
            let lens = (skip + MIN_FRAME) as u32..=(skip + bs) as u32;
            let m = txq.peek_simple(ram, k as u16, false, lens, &mut ones[..n]);
            let (done, b) = ones_to_slots(txq, &ones[..m], skip, tx, &mut cur);
            bytes += b;
            room -= done;
            k += done;
            frames += done;
            if k == waiting {
                break;
            }
            if done == CHUNK {
                publish(txq, TX, &**interrupt, counters);
                continue;
            }
            // Anything else, one chain.
            let head = txq.peek(k as u16);
            let why = match txq.walk(ram, head, false, chain) {
                Err(ChainError::BadHead) => {
                    tally.bad_heads += 1;
                    k += 1;
                    continue;
                }
                Err(ChainError::Bad(why)) => why,
                Ok(total) => match total.checked_sub(skip) {
                    Some(len) if (MIN_FRAME..=MAX_FRAME).contains(&len) => {
                        let slots = len.div_ceil(bs);
                        if slots > NETMAP_MAX_FRAGS {
                            "frame needs too many netmap slots"
                        } else if room < slots {
                            // The peer is behind: keep the chain for later.
                            blocked = true;
                            break;
                        } else {
                            match chain_to_slots(chain, skip, tx, cur, bs) {
                                Ok(next) => {
                                    cur = next;
                                    room -= slots;
                                    txq.push_used(head, 0);
                                    frames += 1;
                                    bytes += len;
                                    k += 1;
                                }
                                Err(bad) => match empty_slots(tx, cur, bad) {
                                    // A buffer index the peer corrupted: skip
                                    // the slot and try the frame again.
                                    Some((next, n)) => {
                                        cur = next;
                                        room -= n;
                                    }
                                    None => {
                                        blocked = true;
                                        break;
                                    }
                                },
                            }
                            continue;
                        }
                    }
                    _ => "frame length out of range",
                },
            };
            drop_chain(txq, tally, TX, head, why);
            k += 1;
        }
        txq.consume(k as u16);
        tally.tx_frames += frames as u64;
        tally.tx_bytes += bytes as u64;
        if cur != start {
            tx.advance(cur);
            *tx_unsynced += (cur + tx.num_slots() - start) % tx.num_slots();
        }
        // Hand the frames to the peer once enough have gathered, or when
        // the guest has no more for now, or to reclaim room. (Before the
        // worker sleeps, `prepare_wait` or the kernel's poll syncs too.)
        if *tx_unsynced > 0 && (*tx_unsynced >= TX_SYNC_SLOTS || waiting < WORKER_BATCH || blocked)
            || blocked
        {
            if let Err(e) = port.txsync() {
                warn!("virtio-net: txsync: {e}");
            }
            *tx_unsynced = 0;
        }
        if broken {
            self.bad_avail();
        }
        self.finish_batch(TX);
        (k > 0, blocked)
    }

    /// Port → guest. Returns whether any frame was consumed, and the avail
    /// index at which the guest ran out of buffers if frames wait for more.
    fn process_rx(&mut self) -> (bool, Option<u16>) {
        // Releases the slots of the previous batch and picks up new frames.
        if let Err(e) = self.port.rxsync() {
            warn!("virtio-net: rxsync: {e}");
        }
        self.rxq.disable_notifications();
        let Self {
            ram,
            rxq,
            port,
            chain,
            spans,
            ones,
            tally,
            port_hdr,
            mergeable,
            interrupt,
            counters,
            ..
        } = self;
        let port_hdr = *port_hdr;
        let rx = port.rx_ring();
        let tail = rx.tail();
        let start = rx.head();
        // Without a header from the port, each frame starts with ours.
        let first = if port_hdr {
            0
        } else {
            spans[0] = Span {
                ptr: ZERO_HDR.as_ptr(),
                len: HDR_LEN,
            };
            1
        };
        let mut i = start;
        let mut frames = 0usize;
        let mut blocked = None;
        let mut broken = false;
        while frames < WORKER_BATCH && i != tail {
            // The fast path: a run of one-slot frames into one-buffer chains.
            let n = rxq.pending().map_or(0, usize::from);
            let n = n.min(WORKER_BATCH - frames).min(CHUNK);
            let m = rxq.peek_simple(ram, 0, true, HDR_LEN as u32..=u32::MAX, &mut ones[..n]);
            let (done, bytes) = slots_to_ones(rxq, rx, &mut i, tail, &ones[..m], port_hdr);
            frames += done;
            tally.rx_frames += done as u64;
            tally.rx_bytes += bytes as u64;
            if frames == WORKER_BATCH || i == tail {
                break;
            }
            if done == CHUNK {
                publish(rxq, RX, &**interrupt, counters);
                continue;
            }
            // Anything else, one frame: gather its slots.
            let mut j = i;
            let mut n = first;
            let mut len = 0usize;
            let mut complete = false;
            while j != tail && n - first < NETMAP_MAX_FRAGS {
                let Some((data, flags)) = rx.frag(j) else {
                    // A bad slot (counted by the ring): skip it.
                    j = rx.next(j);
                    break;
                };
                // The slot stays ours until `head` moves past it, and the
                // port's mapping outlives the batch.
                spans[n] = Span {
                    ptr: data.as_ptr(),
                    len: data.len(),
                };
                n += 1;
                len += data.len();
                j = rx.next(j);
                if flags & NS_MOREFRAG == 0 {
                    complete = true;
                    break;
                }
            }
            if !complete {
                // A bad slot or an over-long fragment run: drop it.
                i = j;
                continue;
            }
            let need = len + if port_hdr { 0 } else { HDR_LEN };
            match deliver(rxq, ram, chain, tally, &spans[..n], need, *mergeable) {
                Deliver::Done => {
                    frames += 1;
                    tally.rx_frames += 1;
                    tally.rx_bytes += (len - if port_hdr { HDR_LEN.min(len) } else { 0 }) as u64;
                }
                Deliver::Dropped => {}
                Deliver::NoBuffers => {
                    blocked = Some(rxq.avail_seen());
                    break;
                }
                Deliver::QueueBroken => {
                    broken = true;
                    break;
                }
            }
            i = j;
        }
        if i != start {
            // Handed back to the peer at the next rxsync.
            rx.advance(i);
        }
        if broken {
            self.bad_avail();
        }
        self.finish_batch(RX);
        (i != start, blocked)
    }
}

/// The transmit fast path: copies the one-buffer chains `ones` (each
/// holding a header of `skip` bytes and a frame that fits one slot) into
/// the TX slots from `*cur` on, which the caller checked are free, moves
/// `*cur` past them and pushes the chains used. Returns how many it copied
/// (all of them, unless a slot is unusable: the caller handles that chain
/// the slow way) and their bytes. (Not inlined: its loop gets the
/// registers to itself.)
#[inline(never)]
fn ones_to_slots(
    q: &mut DeviceQueue,
    ones: &[OneBuf],
    skip: usize,
    tx: &mut Ring,
    cur: &mut u32,
) -> (usize, usize) {
    let mut i = *cur;
    let (mut done, mut bytes) = (0usize, 0usize);
    if i >= tx.num_slots() {
        return (0, 0);
    }
    for o in ones {
        // i < num_slots: checked above, and `next` stays below it.
        let slot = tx.load_slot(i);
        let Some(buf) = tx.buf_mut(slot.buf_idx) else {
            break;
        };
        let buf = buf.as_mut_ptr();
        let len = o.len as usize - skip;
        // SAFETY: the source is bytes skip..o.len of the chain's buffer
        // (`peek_simple` checked it is inside guest RAM, which the worker's
        // `GuestRam` keeps mapped, and at least skip + MIN_FRAME long); the
        // destination is the first len <= buf_size bytes of the slot's
        // buffer (bounds-checked by the ring), which the port keeps mapped
        // and which is ours until `head` moves past the slot. No reference
        // to either range exists (see `copy_bytes`).
        unsafe { copy_bytes(o.ptr.as_ptr().add(skip), buf, len) };
        // i < num_slots; len <= buf_size (`peek_simple` bounds it).
        tx.store_slot(
            i,
            Slot {
                len: len as u16,
                flags: 0,
                ..slot
            },
        );
        i = tx.next(i);
        q.push_used(o.head, 0);
        done += 1;
        bytes += len;
    }
    *cur = i;
    (done, bytes)
}

/// A virtio-net header for a frame in one buffer: num_buffers = 1.
const HDR_ONE: [u8; HDR_LEN] = {
    let mut h = [0u8; HDR_LEN];
    h[HDR_NUM_BUFFERS] = 1;
    h
};

/// The receive fast path: copies the one-slot frames from slot `*i` on (up
/// to `tail`) into the one-buffer chains `ones`, one each, for as long as
/// they fit; pushes the chains used, consumes them and moves `*i` past the
/// frames. Returns (frames, bytes without headers). Stops at anything else
/// (a fragmented or bad slot, a frame too big), which the caller handles
/// the slow way. (Not inlined: its loop gets the registers to itself.)
#[inline(never)]
fn slots_to_ones(
    q: &mut DeviceQueue,
    rx: &Ring,
    i: &mut u32,
    tail: u32,
    ones: &[OneBuf],
    port_hdr: bool,
) -> (usize, usize) {
    let hdr = if port_hdr { 0 } else { HDR_LEN };
    let mut j = *i;
    let (mut done, mut bytes) = (0usize, 0usize);
    for o in ones {
        if j == tail {
            break;
        }
        let Some((data, flags)) = rx.frag(j) else {
            break;
        };
        let len = data.len();
        let need = len + hdr;
        if flags & NS_MOREFRAG != 0 || need > o.len as usize || need < HDR_LEN {
            break;
        }
        let dst = o.ptr.as_ptr();
        // SAFETY: the destination is the first need <= o.len bytes of
        // the chain's buffer, inside guest RAM (`peek_simple` checked it,
        // the worker's `GuestRam` keeps it mapped); the source is the
        // slot's data, inside its netmap buffer (validated by `frag`),
        // which the port keeps mapped and which is ours until `head` moves
        // past the slot. Unaligned writes of plain bytes. No reference to
        // either range is held across the copy (see `copy_bytes`).
        unsafe {
            if port_hdr {
                // The port's header, with num_buffers = 1 (need >= HDR_LEN).
                copy_into_guest(data.as_ptr(), dst, len);
                dst.add(HDR_NUM_BUFFERS)
                    .cast::<[u8; 2]>()
                    .write_unaligned(1u16.to_le_bytes());
            } else {
                dst.cast::<[u8; HDR_LEN]>().write_unaligned(HDR_ONE);
                copy_into_guest(data.as_ptr(), dst.add(HDR_LEN), len);
            }
        }
        q.push_used(o.head, need as u32);
        bytes += need - HDR_LEN;
        j = rx.next(j);
        done += 1;
    }
    // The streaming stores of `copy_into_guest` must be visible before the
    // used index that tells the driver of them.
    store_fence();
    q.consume(done as u16);
    *i = j;
    (done, bytes)
}

/// Frames from this many bytes on are copied into guest buffers with
/// streaming stores (see [`copy_into_guest`]).
const STREAM_MIN: usize = 256;

/// Copies `n` bytes of a received frame from a netmap buffer into a guest
/// buffer. From [`STREAM_MIN`] bytes on, everything past the first cache
/// line or two (the headers the driver reads at once) goes with streaming
/// (non-temporal) stores, which write whole lines without first reading
/// them: a driver's receive buffers cycle through far more memory than the
/// caches hold, so an ordinary store must fetch each line from the last
/// level cache or another core only to overwrite it. With DPDK's
/// virtio_user as the driver this raised 1514-byte receive from 5.4-6.0
/// to 7.7-8.0 Mpps (five back-to-back pairs of 3-second runs, Intel Xeon,
/// 2 MiB L2); the synthetic driver and the bundled guest, whose buffers stay
/// hot, stayed within the noise. A guest that then reads the whole payload
/// finds it in memory rather than in a cache. The caller must call
/// [`store_fence`] before it publishes the frame.
///
/// # Safety
///
/// As for [`copy_bytes`].
#[inline(always)]
unsafe fn copy_into_guest(src: *const u8, dst: *mut u8, n: usize) {
    #[cfg(target_arch = "x86_64")]
    if n >= STREAM_MIN {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        // Ordinary stores up to the first 64-byte boundary at least 64
        // bytes in (64..=127 bytes), streaming stores for the whole lines
        // after it, ordinary ones for the rest.
        let head = 64 + ((dst as usize).wrapping_neg() & 63);
        let mut o = head;
        // SAFETY: head <= 127 < STREAM_MIN <= n, and every 64-byte block
        // streamed has o + 64 <= n, so all accesses are inside the two
        // ranges the caller vouches for. `dst + o` is 64-byte aligned for
        // each block (o starts at a boundary and steps by 64), as
        // `_mm_stream_si128` needs 16. The loads are unaligned. Plain
        // bytes, no references: if the ranges overlap (a guest's doing),
        // only the bytes copied suffer, as with `copy_bytes`.
        unsafe {
            copy_bytes(src, dst, head);
            while o + 64 <= n {
                let s = src.add(o).cast::<__m128i>();
                let d = dst.add(o).cast::<__m128i>();
                let v = [
                    _mm_loadu_si128(s),
                    _mm_loadu_si128(s.add(1)),
                    _mm_loadu_si128(s.add(2)),
                    _mm_loadu_si128(s.add(3)),
                ];
                for (k, v) in v.into_iter().enumerate() {
                    _mm_stream_si128(d.add(k), v);
                }
                o += 64;
            }
            copy_bytes(src.add(o), dst.add(o), n - o);
        }
        return;
    }
    // SAFETY: forwarded contract.
    unsafe { copy_bytes(src, dst, n) }
}

/// Orders the streaming stores of [`copy_into_guest`] before the stores
/// that follow (the used ring's index).
#[inline(always)]
fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `sfence` only orders stores; it touches no memory.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// Publishes what `q` used so far and interrupts the driver if it asked for
/// it.
#[inline]
fn publish(
    q: &mut DeviceQueue,
    queue: usize,
    interrupt: &dyn VirtioInterrupt,
    counters: &NetCounters,
) {
    if q.publish_used() && q.needs_notification() {
        counters.interrupts.fetch_add(1, Ordering::Relaxed);
        interrupt.signal_queue(queue as u16);
    }
}

/// Returns a bad chain to the driver unused, and counts it.
#[cold]
fn drop_chain(q: &mut DeviceQueue, tally: &mut Tally, queue: usize, head: u16, why: &str) {
    tally.bad_chains += 1;
    debug!("virtio-net: dropping chain {head} on queue {queue}: {why}");
    q.push_used(head, 0);
}

/// The next usable receive chain, walked into `chain`: (head, capacity).
/// Bad chains met on the way are returned unused and counted.
#[inline]
fn take_rx_chain(
    q: &mut DeviceQueue,
    ram: &GuestRam,
    chain: &mut Chain,
    tally: &mut Tally,
) -> Result<(u16, usize), Deliver> {
    loop {
        let head = match q.pop() {
            Ok(Some(head)) => head,
            Ok(None) => return Err(Deliver::NoBuffers),
            Err(BadAvailIndex) => return Err(Deliver::QueueBroken),
        };
        let why = match q.walk(ram, head, true, chain) {
            Ok(cap) if cap >= HDR_LEN => return Ok((head, cap)),
            Ok(_) => "receive buffer shorter than the header",
            Err(ChainError::BadHead) => {
                tally.bad_heads += 1;
                continue;
            }
            Err(ChainError::Bad(why)) => why,
        };
        drop_chain(q, tally, RX, head, why);
    }
}

/// Writes `num_buffers` into the header at the start of `chain` (which has
/// at least HDR_LEN bytes; bytewise, in case the header is split across
/// descriptors).
#[inline]
fn set_num_buffers(chain: &Chain, n: u16) {
    for (i, b) in n.to_le_bytes().into_iter().enumerate() {
        if let Some(p) = chain.byte_ptr(HDR_NUM_BUFFERS + i) {
            // SAFETY: `p` points into a buffer of the chain, inside guest
            // RAM (checked by `walk`, kept mapped by the worker's
            // `GuestRam`); a u8 store has no alignment requirement, and no
            // reference to guest memory exists.
            unsafe { p.as_ptr().write_volatile(b) };
        }
    }
}

/// Copies one frame (`need` bytes in `spans`) into as many receive chains
/// as it takes (one without mergeable buffers), and pushes them used. Out of
/// buffers, it puts back everything it took for this frame.
fn deliver(
    q: &mut DeviceQueue,
    ram: &GuestRam,
    chain: &mut Chain,
    tally: &mut Tally,
    spans: &[Span],
    need: usize,
    mergeable: bool,
) -> Deliver {
    let (avail_mark, used_mark, tally_mark) = (q.next_avail(), q.next_used(), *tally);
    let give_back = |q: &mut DeviceQueue, tally: &mut Tally, why: Deliver| {
        if let Deliver::NoBuffers = why {
            // Keep the frame in the ring and wait for buffers. Chains
            // dropped meanwhile are met (and counted) again.
            q.rewind(avail_mark);
            q.rewind_used(used_mark);
            *tally = tally_mark;
        }
        why
    };
    let (head, cap) = match take_rx_chain(q, ram, chain, tally) {
        Ok(c) => c,
        Err(why) => return give_back(q, tally, why),
    };
    if !mergeable && cap < need {
        // One buffer per frame and it does not fit: drop the frame.
        tally.rx_too_big += 1;
        q.push_used(head, 0);
        return Deliver::Dropped;
    }
    let mut cursor = (0usize, 0usize);
    let n = copy_spans(spans, &mut cursor, chain);
    if n == need {
        // The common case: the frame fits the first buffer.
        set_num_buffers(chain, 1);
        q.push_used(head, n as u32);
        return Deliver::Done;
    }
    // Mergeable buffers: fill more chains; num_buffers goes into the
    // first one's header once the count is known.
    let num_buffers = [
        chain.byte_ptr(HDR_NUM_BUFFERS),
        chain.byte_ptr(HDR_NUM_BUFFERS + 1),
    ];
    let mut heads = [(0u16, 0u32); MAX_RX_BUFS];
    heads[0] = (head, n as u32);
    let mut nheads = 1usize;
    let mut written = n;
    while written < need {
        let (head, _) = match take_rx_chain(q, ram, chain, tally) {
            Ok(c) => c,
            Err(why) => return give_back(q, tally, why),
        };
        if nheads == MAX_RX_BUFS {
            // Too many buffers for one frame: drop it.
            tally.rx_too_big += 1;
            for &(h, _) in &heads[..nheads] {
                q.push_used(h, 0);
            }
            q.push_used(head, 0);
            return Deliver::Dropped;
        }
        let n = copy_spans(spans, &mut cursor, chain);
        heads[nheads] = (head, n as u32);
        nheads += 1;
        written += n;
    }
    for (p, b) in num_buffers.into_iter().zip((nheads as u16).to_le_bytes()) {
        if let Some(p) = p {
            // SAFETY: as in `set_num_buffers`: `p` points into the first
            // chain's buffers, in guest RAM kept mapped by `ram`.
            unsafe { p.as_ptr().write_volatile(b) };
        }
    }
    for &(h, len) in &heads[..nheads] {
        q.push_used(h, len);
    }
    Deliver::Done
}

/// Copies `n` bytes from `src` to `dst`, between guest memory and netmap
/// buffers: memory shared with untrusted parties, who may write it while it
/// is copied (that can only change the bytes copied) or, should a guest
/// point a buffer at a mapping of the port, make the two ranges overlap
/// (neither way of copying here assumes they do not). Short copies, the
/// common case for small frames, are done inline in 16-byte moves rather
/// than through a call to `memmove`.
///
/// # Safety
///
/// `src` must be valid for reads and `dst` for writes of `n` bytes, for
/// the whole call, and no Rust reference to either range may exist.
#[inline(always)]
unsafe fn copy_bytes(src: *const u8, dst: *mut u8, n: usize) {
    /// Moves the 16 bytes at `src + o` to `dst + o`.
    ///
    /// # Safety
    ///
    /// Both 16-byte ranges must be valid, as for `copy_bytes`.
    #[inline(always)]
    unsafe fn mov(src: *const u8, dst: *mut u8, o: usize) {
        // SAFETY: forwarded contract; unaligned accesses of plain bytes.
        unsafe {
            let c = src.add(o).cast::<[u8; 16]>().read_unaligned();
            dst.add(o).cast::<[u8; 16]>().write_unaligned(c);
        }
    }
    // SAFETY: every `mov` offset o has o + 16 <= n (the arms bound n), so
    // each chunk is inside both ranges; the moves overlap from both ends
    // (some bytes are copied twice, which is harmless). Longer and shorter
    // copies go to `copy`, which allows overlap.
    unsafe {
        match n {
            16..=32 => {
                mov(src, dst, 0);
                mov(src, dst, n - 16);
            }
            33..=64 => {
                mov(src, dst, 0);
                mov(src, dst, 16);
                mov(src, dst, n - 32);
                mov(src, dst, n - 16);
            }
            65..=128 => {
                for o in [0, 16, 32, 48] {
                    mov(src, dst, o);
                }
                for o in [64, 48, 32, 16] {
                    mov(src, dst, n - o);
                }
            }
            _ => std::ptr::copy(src, dst, n),
        }
    }
}

/// Copies from `spans` (resuming at `cursor`: span index, offset) into the
/// buffers of `chain`, as far as either goes. Returns the bytes written.
#[inline]
fn copy_spans(spans: &[Span], cursor: &mut (usize, usize), chain: &Chain) -> usize {
    let (mut si, mut so) = *cursor;
    let mut written = 0usize;
    'segs: for seg in chain.segs() {
        let mut dst = seg.ptr.as_ptr();
        let mut room = seg.len as usize;
        while room > 0 {
            let Some(s) = spans.get(si) else {
                break 'segs;
            };
            let n = (s.len - so).min(room);
            // SAFETY: the source is `s.ptr + so .. + n`, inside the span
            // (so + n <= s.len): the static header or a netmap buffer of a
            // slot we own, whose mapping the port keeps alive. The
            // destination is inside the chain buffer (n <= room), in guest
            // RAM kept mapped by the worker's `GuestRam`. Both are plain
            // bytes shared with untrusted parties (guest, peer) who may
            // change them concurrently; that can only change the bytes
            // copied, the bounds are ours. `copy` (memmove) tolerates
            // overlap, should a guest point a buffer at a mapping of the
            // port. No reference to either memory exists across the copy.
            unsafe { copy_bytes(s.ptr.add(so), dst, n) };
            // SAFETY: n <= room: at most one past the end of the buffer.
            dst = unsafe { dst.add(n) };
            room -= n;
            written += n;
            so += n;
            if so == s.len {
                si += 1;
                so = 0;
            }
        }
    }
    *cursor = (si, so);
    written
}

/// Copies the chain's bytes after the first `skip` into TX slots from `at`
/// on (`bs` bytes per slot, `NS_MOREFRAG` on all but the last). Returns
/// the slot after the frame, or `Err` with the first slot that is unusable
/// (the frame is then not sent). The caller checked that the frame fits
/// before `tail`.
fn chain_to_slots(
    chain: &Chain,
    mut skip: usize,
    tx: &mut Ring,
    at: u32,
    bs: usize,
) -> Result<u32, u32> {
    let mut i = at;
    let mut slot = tx.slot(i).ok_or(i)?;
    let mut buf = tx.buf_mut(slot.buf_idx).ok_or(i)?.as_mut_ptr();
    let mut fill = 0usize;
    for seg in chain.segs() {
        let mut src = seg.ptr.as_ptr().cast_const();
        let mut left = seg.len as usize;
        if skip > 0 {
            let s = skip.min(left);
            skip -= s;
            left -= s;
            // SAFETY: s <= seg.len: at most one past the end of the buffer.
            src = unsafe { src.add(s) };
        }
        while left > 0 {
            if fill == bs {
                tx.set_slot(
                    i,
                    Slot {
                        len: fill as u16,
                        flags: NS_MOREFRAG,
                        ..slot
                    },
                );
                i = tx.next(i);
                slot = tx.slot(i).ok_or(i)?;
                buf = tx.buf_mut(slot.buf_idx).ok_or(i)?.as_mut_ptr();
                fill = 0;
            }
            let n = left.min(bs - fill);
            // SAFETY: the source is inside the chain's buffer (n <= left
            // bytes from `src`), in guest RAM that `walk` checked and the
            // worker's `GuestRam` keeps mapped; the destination is inside
            // the slot's buffer (fill + n <= bs <= buf_size, bounds-checked
            // by the ring), which the port keeps mapped and which is ours
            // until `head` moves past the slot. No reference to either range
            // exists (see `copy_bytes`).
            unsafe { copy_bytes(src, buf.add(fill), n) };
            // SAFETY: n <= left: at most one past the end of the buffer.
            src = unsafe { src.add(n) };
            left -= n;
            fill += n;
        }
    }
    tx.set_slot(
        i,
        Slot {
            len: fill as u16,
            flags: 0,
            ..slot
        },
    );
    Ok(tx.next(i))
}

/// Hands the TX slots `from..=to` back as empty frames (for the sync to
/// repair the one whose buffer the peer corrupted) and returns the slot
/// after them and how many they were; `None` if the ring's indices are
/// corrupt (the next sync repairs them).
fn empty_slots(tx: &mut Ring, from: u32, to: u32) -> Option<(u32, usize)> {
    let mut i = from;
    for n in 1..=NETMAP_MAX_FRAGS {
        let s = tx.slot(i)?;
        // `slot(i)` checked i; the buffer index is kept as it is.
        tx.store_slot(
            i,
            Slot {
                len: 0,
                flags: 0,
                ..s
            },
        );
        let last = i == to;
        i = tx.next(i);
        if last {
            return Some((i, n));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length up to past the streaming threshold and some longer
    /// ones, at several alignments of source and destination: each byte
    /// lands, and none outside the range is touched.
    #[test]
    fn copies_into_guest_buffers_byte_for_byte() {
        let src: Vec<u8> = (0..4200u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut dst = vec![0u8; 4400];
        for n in (0..300).chain([511, 512, 513, 1514, 1526, 2048, 4000]) {
            for (so, dofs) in [(0, 0), (1, 7), (3, 12), (0, 63), (5, 64)] {
                dst.fill(0xEE);
                // 64-byte aligned start inside the vector, then `dofs`.
                let base = dst.as_ptr().align_offset(64) + dofs;
                // SAFETY: n + so <= 4007 < src.len(), and base + n <= 63 +
                // 64 + 4000 < dst.len(); no references to either range live
                // across the call.
                unsafe { copy_into_guest(src.as_ptr().add(so), dst.as_mut_ptr().add(base), n) };
                store_fence();
                assert_eq!(&dst[base..base + n], &src[so..so + n], "n {n} dst+{dofs}");
                assert!(dst[..base].iter().all(|&b| b == 0xEE), "n {n}: before");
                assert!(dst[base + n..].iter().all(|&b| b == 0xEE), "n {n}: after");
            }
        }
    }
}
