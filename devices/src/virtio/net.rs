//! virtio-net with one queue pair whose backend is a netmap port.
//!
//! Packets move between descriptor chains and netmap slots in batches on a
//! device worker thread, never on a vCPU thread. TX copies each chain into
//! consecutive slots (`NS_MOREFRAG` on all but the last) and syncs once per
//! batch; RX copies each netmap frame into one or more guest buffers
//! (`MRG_RXBUF`) and releases the slots once per batch. The guest and the
//! netmap peer are both untrusted: a bad chain is returned unused and
//! counted, a bad slot is skipped by the netmap layer and counted, and
//! nothing is ever read or written outside guest RAM or the port's region.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, VirtioDevice, VirtioInterrupt, F_RING_EVENT_IDX, F_VERSION_1};
use crate::bus::lock;
use crate::netmap::{Port, PortStats, NETMAP_MAX_FRAGS, NS_MOREFRAG};
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
const HDR_NUM_BUFFERS: usize = 10;
/// Queue size offered for both queues.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Chains handled per queue before the worker looks at the other side.
const BATCH: usize = 256;
/// Shortest frame accepted from the guest: an Ethernet header.
const MIN_FRAME: usize = 14;
/// Largest frame (without header) accepted from the guest.
const MAX_FRAME: usize = 65_535 + 14;
/// Largest chain, in descriptors, that the device walks.
const MAX_CHAIN: usize = 64;

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
            "tx {} frames {} bytes, rx {} frames {} bytes, dropped: {} bad chains, {} bad heads, {} bad avail index, {} rx too big; {} kicks, {} interrupts",
            g(&self.tx_frames),
            g(&self.tx_bytes),
            g(&self.rx_frames),
            g(&self.rx_bytes),
            g(&self.bad_chains),
            g(&self.bad_heads),
            g(&self.bad_avail_index),
            g(&self.rx_too_big),
            g(&self.kicks),
            g(&self.interrupts)
        )
    }
}

struct Running {
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
}

impl Net {
    /// A virtio-net device with address `mac` on `port`.
    pub fn new(mac: [u8; 6], port: Port) -> Self {
        let mut features = F_VERSION_1 | F_RING_EVENT_IDX | F_MAC | F_STATUS | F_MRG_RXBUF;
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
        }
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

    /// The features the driver accepted (0 before activation).
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
        // mac[6], status u16 (link up), max_virtqueue_pairs u16.
        let mut cfg = [0u8; 10];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&1u16.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in virtio-net's configuration is writable for us.
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        let port = self.port.take().ok_or("the device is already running")?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?);
        self.acked.store(a.features, Ordering::Relaxed);
        self.needs_reset.store(false, Ordering::Relaxed);
        let mut queues = a.queues.into_iter();
        let (Some(rxq), Some(txq)) = (queues.next(), queues.next()) else {
            return Err("virtio-net needs two queues".into());
        };
        let worker = Worker {
            mem: a.mem,
            rxq,
            txq,
            rx_kick: a.kicks[RX].clone(),
            tx_kick: a.kicks[TX].clone(),
            interrupt: a.interrupt,
            port,
            mergeable: a.features & F_MRG_RXBUF != 0,
            counters: self.counters.clone(),
            needs_reset: self.needs_reset.clone(),
            port_stats: self.port_stats.clone(),
            stop: stop.clone(),
            descs: Vec::with_capacity(MAX_CHAIN),
        };
        let handle = std::thread::Builder::new()
            .name("nmvm-net".into())
            .spawn(move || worker.run())
            .map_err(|e| format!("cannot start the device worker: {e}"))?;
        self.running = Some(Running { stop, handle });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.write(1);
            match r.handle.join() {
                Ok(port) => self.port = Some(port),
                Err(_) => warn!("virtio-net: the device worker panicked; the port is lost"),
            }
        }
        self.acked.store(0, Ordering::Relaxed);
        self.needs_reset.store(false, Ordering::Relaxed);
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Relaxed)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

/// Why a chain is dropped.
#[derive(Debug)]
enum ChainError {
    /// Empty chain: the avail entry names a descriptor outside the table.
    BadHead,
    /// Anything else wrong with it.
    Bad(&'static str),
}

struct Worker {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    rx_kick: Arc<EventFd>,
    tx_kick: Arc<EventFd>,
    interrupt: Arc<dyn VirtioInterrupt>,
    port: Port,
    mergeable: bool,
    counters: Arc<NetCounters>,
    needs_reset: Arc<AtomicBool>,
    port_stats: Arc<Mutex<PortStats>>,
    stop: Arc<EventFd>,
    descs: Vec<Descriptor>,
}

/// Walks a chain into `out`, checking every descriptor against guest RAM
/// and the expected direction. Returns the total length.
fn collect_chain<I: Iterator<Item = Descriptor>>(
    mem: &GuestMemoryMmap,
    chain: I,
    writable: bool,
    out: &mut Vec<Descriptor>,
) -> Result<usize, ChainError> {
    out.clear();
    let mut total = 0usize;
    let mut last_has_next = false;
    for d in chain {
        if out.len() == MAX_CHAIN {
            return Err(ChainError::Bad("chain too long or looping"));
        }
        if d.len() == 0 {
            return Err(ChainError::Bad("zero-length descriptor"));
        }
        if d.is_write_only() != writable {
            return Err(ChainError::Bad("descriptor in the wrong direction"));
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(ChainError::Bad("descriptor outside guest memory"));
        }
        total += d.len() as usize;
        last_has_next = d.has_next();
        out.push(d);
    }
    if out.is_empty() {
        return Err(ChainError::BadHead);
    }
    if last_has_next {
        // The walk stopped at a `next` outside the table or at the
        // queue-size bound of a loop.
        return Err(ChainError::Bad("broken or looping chain"));
    }
    Ok(total)
}

impl Worker {
    fn run(mut self) -> Port {
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
        let mut rx_waits_for_guest = false;
        loop {
            let mut progress = false;
            if !self.needs_reset.load(Ordering::Relaxed) {
                let (moved, blocked) = self.process_tx();
                progress |= moved;
                tx_waits_for_port = blocked;
                let (moved, blocked) = self.process_rx();
                progress |= moved;
                rx_waits_for_guest = blocked;
            }
            if progress {
                continue;
            }
            if self.stop.read().is_ok() {
                break;
            }
            // About to sleep: ask the guest and the peer for notifications
            // about exactly what we wait for, then look once more so that
            // no kick or frame slips in between. Frames waiting for guest
            // buffers must not keep the worker awake.
            let tx_more = self.txq.enable_notification(&self.mem).unwrap_or(false);
            let rx_more =
                rx_waits_for_guest && self.rxq.enable_notification(&self.mem).unwrap_or(false);
            let (want_rx, want_tx) = (!rx_waits_for_guest, tx_waits_for_port);
            let port_ready = match self.port.prepare_wait(want_rx, want_tx) {
                Ok(ready) => ready,
                Err(e) => {
                    warn!("virtio-net: netmap port: {e}");
                    false
                }
            };
            if (tx_more && !tx_waits_for_port) || rx_more || port_ready {
                continue;
            }
            *lock(&self.port_stats) = self.port.stats();
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
            for kick in [&self.tx_kick, &self.rx_kick] {
                if kick.read().is_ok() {
                    self.counters.kicks.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.port.ack_wakeup();
            if fds[2].revents != 0 {
                break;
            }
        }
        *lock(&self.port_stats) = self.port.stats();
        self.port
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

    fn signal(&mut self, queue: usize) {
        let q = if queue == RX {
            &mut self.rxq
        } else {
            &mut self.txq
        };
        if q.needs_notification(&self.mem).unwrap_or(true) {
            self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
            self.interrupt.signal_queue(queue as u16);
        }
    }

    /// Guest → port. Returns whether anything moved, and whether the
    /// guest has more to send than the port has room for.
    fn process_tx(&mut self) -> (bool, bool) {
        let _ = self.txq.disable_notification(&self.mem);
        let skip = if self.port.virtio_net_hdr_len() as usize == HDR_LEN {
            0
        } else {
            HDR_LEN
        };
        let mut used = 0usize;
        let mut blocked = false;
        for _ in 0..BATCH {
            let chain = match self.txq.iter(&self.mem) {
                Ok(mut it) => match it.next() {
                    Some(c) => c,
                    None => break,
                },
                Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                    self.bad_avail();
                    break;
                }
                Err(e) => {
                    debug!("virtio-net tx: {e}");
                    break;
                }
            };
            let head = chain.head_index();
            let total = match collect_chain(&self.mem, chain, false, &mut self.descs) {
                Ok(t) if t >= skip + MIN_FRAME && t - skip <= MAX_FRAME => t,
                Ok(_) => {
                    self.drop_chain(TX, head, "frame length out of range");
                    used += 1;
                    continue;
                }
                Err(ChainError::BadHead) => {
                    self.counters.bad_heads.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(ChainError::Bad(why)) => {
                    self.drop_chain(TX, head, why);
                    used += 1;
                    continue;
                }
            };
            let frame_len = total - skip;
            let tx = self.port.tx_ring();
            let buf_size = tx.buf_size() as usize;
            let slots = frame_len.div_ceil(buf_size).max(1);
            if slots > NETMAP_MAX_FRAGS {
                self.drop_chain(TX, head, "frame needs too many netmap slots");
                used += 1;
                continue;
            }
            if (tx.space_from_cur() as usize) < slots {
                // The peer is behind: keep the chain for later.
                self.txq.go_to_previous_position();
                blocked = true;
                break;
            }
            if !copy_chain_to_slots(&self.mem, &self.descs, skip, frame_len, tx) {
                // Cannot happen after the range checks, but never trust it.
                self.drop_chain(TX, head, "copy failed");
                used += 1;
                continue;
            }
            let _ = self.txq.add_used(&self.mem, head, 0);
            used += 1;
            self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
            self.counters
                .tx_bytes
                .fetch_add(frame_len as u64, Ordering::Relaxed);
        }
        if used > 0 || blocked {
            if let Err(e) = self.port.txsync() {
                warn!("virtio-net: txsync: {e}");
            }
        }
        if used > 0 {
            self.signal(TX);
        }
        (used > 0, blocked)
    }

    fn drop_chain(&mut self, queue: usize, head: u16, why: &'static str) {
        self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
        debug!("virtio-net: dropping chain {head} on queue {queue}: {why}");
        let q = if queue == RX {
            &mut self.rxq
        } else {
            &mut self.txq
        };
        let _ = q.add_used(&self.mem, head, 0);
    }

    /// Port → guest. Returns whether anything moved, and whether frames
    /// wait for the guest to post buffers.
    fn process_rx(&mut self) -> (bool, bool) {
        if let Err(e) = self.port.rxsync() {
            warn!("virtio-net: rxsync: {e}");
        }
        let _ = self.rxq.disable_notification(&self.mem);
        let port_hdr = self.port.virtio_net_hdr_len() as usize == HDR_LEN;
        let mut frames = 0usize;
        let mut released = false;
        let mut progress = false;
        let mut blocked = false;
        while frames < BATCH {
            let rx = self.port.rx_ring();
            let start = rx.head();
            if start == rx.tail() {
                break;
            }
            // Gather the frame's slots.
            let mut i = start;
            let mut len = 0usize;
            let mut nslots = 0u32;
            let mut complete = false;
            while i != rx.tail() && nslots < NETMAP_MAX_FRAGS as u32 {
                let Some((data, flags)) = rx.frag(i) else {
                    break;
                };
                len += data.len();
                nslots += 1;
                i = rx.next(i);
                if flags & NS_MOREFRAG == 0 {
                    complete = true;
                    break;
                }
            }
            if !complete {
                // A bad slot or an over-long fragment run: skip it.
                rx.advance(i);
                released = true;
                continue;
            }
            let end = i;
            let need = len + if port_hdr { 0 } else { HDR_LEN };
            match self.deliver(start, end, need, port_hdr) {
                Deliver::Done => {
                    frames += 1;
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    self.counters.rx_bytes.fetch_add(
                        (len - if port_hdr { HDR_LEN.min(len) } else { 0 }) as u64,
                        Ordering::Relaxed,
                    );
                }
                Deliver::Dropped => {}
                Deliver::NoBuffers => {
                    blocked = true;
                    break;
                }
                Deliver::QueueBroken => {
                    self.bad_avail();
                    break;
                }
            }
            self.port.rx_ring().advance(end);
            released = true;
            progress = true;
        }
        if released {
            if let Err(e) = self.port.rxsync() {
                warn!("virtio-net: rxsync: {e}");
            }
        }
        if frames > 0 {
            self.signal(RX);
        }
        (progress, blocked)
    }

    /// Copies the frame in slots `start..end` (`need` bytes with the
    /// header) into guest buffers.
    fn deliver(&mut self, start: u32, end: u32, need: usize, port_hdr: bool) -> Deliver {
        let mut heads: [(u16, u32); 64] = [(0, 0); 64];
        let mut nheads = 0usize;
        let mut written = 0usize;
        let mut src = SlotReader {
            slot: start,
            end,
            offset: 0,
            hdr_pending: !port_hdr,
        };
        let mut first_hdr_addr: Option<GuestAddress> = None;
        while written < need {
            let chain = match self.rxq.iter(&self.mem) {
                Ok(mut it) => it.next(),
                Err(virtio_queue::Error::InvalidAvailRingIndex) => return Deliver::QueueBroken,
                Err(_) => None,
            };
            let Some(chain) = chain else {
                // Out of guest buffers: give back what we took, keep the
                // frame in the ring, wait for the guest.
                for _ in 0..nheads {
                    self.rxq.go_to_previous_position();
                }
                return Deliver::NoBuffers;
            };
            let head = chain.head_index();
            let cap = match collect_chain(&self.mem, chain, true, &mut self.descs) {
                Ok(c) if c >= HDR_LEN => c,
                Ok(_) => {
                    self.drop_chain(RX, head, "receive buffer shorter than the header");
                    continue;
                }
                Err(ChainError::BadHead) => {
                    self.counters.bad_heads.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(ChainError::Bad(why)) => {
                    self.drop_chain(RX, head, why);
                    continue;
                }
            };
            if !self.mergeable && cap < need {
                // One buffer per frame and it does not fit: drop the frame.
                self.counters.rx_too_big.fetch_add(1, Ordering::Relaxed);
                let _ = self.rxq.add_used(&self.mem, head, 0);
                return Deliver::Dropped;
            }
            if nheads == heads.len() {
                self.counters.rx_too_big.fetch_add(1, Ordering::Relaxed);
                let _ = self.rxq.add_used(&self.mem, head, 0);
                break;
            }
            if first_hdr_addr.is_none() {
                first_hdr_addr = Some(self.descs[0].addr());
            }
            let n = src.copy_into(&self.mem, &self.descs, self.port.rx_ring());
            heads[nheads] = (head, n as u32);
            nheads += 1;
            written += n;
            if n == 0 {
                break;
            }
        }
        // num_buffers in the first buffer's header (its first descriptor
        // holds at least the 12 header bytes in practice; write through
        // guest memory so a split header is still handled bytewise).
        if let Some(addr) = first_hdr_addr {
            let nb = (nheads as u16).to_le_bytes();
            let _ = self
                .mem
                .write_slice(&nb, addr.unchecked_add(HDR_NUM_BUFFERS as u64));
        }
        for &(head, len) in &heads[..nheads] {
            let _ = self.rxq.add_used(&self.mem, head, len);
        }
        Deliver::Done
    }
}

enum Deliver {
    Done,
    Dropped,
    NoBuffers,
    QueueBroken,
}

/// Reads a frame out of consecutive RX slots, optionally preceded by a
/// zeroed virtio-net header, into guest buffers.
struct SlotReader {
    slot: u32,
    end: u32,
    offset: usize,
    hdr_pending: bool,
}

impl SlotReader {
    /// Fills the chain `descs` as far as the frame goes; returns bytes
    /// written.
    fn copy_into(
        &mut self,
        mem: &GuestMemoryMmap,
        descs: &[Descriptor],
        ring: &mut crate::netmap::Ring,
    ) -> usize {
        let mut written = 0usize;
        for d in descs {
            let mut addr = d.addr();
            let mut room = d.len() as usize;
            if self.hdr_pending && room > 0 {
                // A zeroed header; num_buffers is patched later.
                let n = HDR_LEN.min(room);
                let zero = [0u8; HDR_LEN];
                if mem.write_slice(&zero[..n], addr).is_err() {
                    return written;
                }
                // Headers split across descriptors are legal but rare; the
                // remainder goes to the next descriptor.
                if n < HDR_LEN {
                    return written + n;
                }
                self.hdr_pending = false;
                addr = addr.unchecked_add(n as u64);
                room -= n;
                written += n;
            }
            while room > 0 && self.slot != self.end {
                let Some((data, _)) = ring.frag(self.slot) else {
                    self.slot = self.end;
                    break;
                };
                let chunk = &data[self.offset..];
                let n = chunk.len().min(room);
                if mem.write_slice(&chunk[..n], addr).is_err() {
                    return written;
                }
                addr = addr.unchecked_add(n as u64);
                room -= n;
                written += n;
                self.offset += n;
                if self.offset == data.len() {
                    self.offset = 0;
                    self.slot = ring.next(self.slot);
                }
            }
            if self.slot == self.end {
                break;
            }
        }
        written
    }
}

/// Copies `frame_len` bytes of the chain (after skipping `skip` header
/// bytes) into TX slots from `cur`, and publishes them.
fn copy_chain_to_slots(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    mut skip: usize,
    frame_len: usize,
    tx: &mut crate::netmap::Ring,
) -> bool {
    let buf_size = tx.buf_size() as usize;
    let mut slot = tx.cur();
    let mut fill = 0usize;
    let mut left = frame_len;
    for d in descs {
        let mut addr = d.addr();
        let mut len = d.len() as usize;
        if skip > 0 {
            let s = skip.min(len);
            skip -= s;
            len -= s;
            addr = addr.unchecked_add(s as u64);
        }
        while len > 0 {
            let Some(buf) = tx.tx_buf(slot) else {
                return false;
            };
            let n = len.min(buf_size - fill);
            if mem.read_slice(&mut buf[fill..fill + n], addr).is_err() {
                return false;
            }
            fill += n;
            len -= n;
            left -= n;
            addr = addr.unchecked_add(n as u64);
            if fill == buf_size && left > 0 {
                tx.set_len_flags(slot, fill as u16, NS_MOREFRAG);
                slot = tx.next(slot);
                fill = 0;
            }
        }
    }
    tx.set_len_flags(slot, fill as u16, 0);
    tx.advance(tx.next(slot));
    true
}
