//! The guest's virtio-net driver and its packet modes (`net=echo|sink|gen|hostile`).
//!
//! Everything polls: no MSI-X vector is set and interrupts stay off. While idle, a loop only
//! reads the used rings in memory and executes `pause` ([`Hw::relax`]); the device is touched
//! (an MMIO write, a VM exit) only to notify it, and only when its `avail_event` (or
//! `VRING_USED_F_NO_NOTIFY`) says it wants to hear.
//!
//! Memory (the area [`Hw::dma_area`] names, [`DMA_SIZE`] bytes, 4 KiB aligned): the receive
//! queue's descriptor table, available and used rings in pages 0..3, the transmit queue's in
//! pages 3..6, then [`NUM_BUFS`] buffers of [`BUF_SIZE`] bytes. Each buffer holds the 12-byte
//! virtio-net header followed by the frame. In `gen` and `hostile` modes buffers
//! `0..GEN_BUFS` are transmit buffers, buffer `seq % 256` always carrying frame `seq` (so the
//! payload pattern, which depends only on `seq % 256`, is written once per buffer), and the
//! others feed the receive queue; in `echo` and `sink` all of them are one pool, and `echo`
//! sends a received buffer back as it is, after swapping the MACs (no copy).

use crate::frame::{self, FrameGen};
use crate::virtio::pci::{self, Bar, Caps};
use crate::virtio::queue::{SplitQueue, Used, DESC_F_NEXT, DESC_F_WRITE, MAX_SIZE};
use crate::virtio::transport::{RingAddrs, Transport};
use crate::virtio::{feature, status, Dma, Error, Mmio, PciConfig};
use crate::{FrameLen, NetMode, Sink};

/// The virtio-net header (VERSION_1 layout, `num_buffers` included).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFF: u64 = 10;
/// Size of every buffer: header + 1514-byte frame + room.
pub const BUF_SIZE: usize = 2048;
/// Buffers in the area: enough for a full receive and a full transmit queue.
pub const NUM_BUFS: usize = 512;
/// Transmit buffers in `gen` and `hostile` modes (one per value of `seq % 256`).
pub const GEN_BUFS: usize = 256;
/// Ring pages (three per queue). The netmap path, which keeps the queues idle, puts its CSB
/// right after them.
pub(crate) const RINGS_BYTES: usize = 6 * 4096;
/// Bytes of memory the driver needs.
pub const DMA_SIZE: usize = RINGS_BYTES + NUM_BUFS * BUF_SIZE;

/// The features this driver accepts (when offered; VERSION_1 is required).
pub const WANTED_FEATURES: u64 =
    feature::VERSION_1 | feature::NET_MAC | feature::NET_MRG_RXBUF | feature::RING_EVENT_IDX;
/// Used when the device offers no MAC (locally administered).
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

const RX: u16 = 0;
const TX: u16 = 1;
/// `rx_buf`/`tx_buf` entry of a descriptor that holds no buffer of ours.
const NO_BUF: u16 = u16::MAX;
/// `rx_buf` entry of the hostile mode's receive descriptor with a bad address.
const BAD_BUF: u16 = u16::MAX - 1;
/// Publish at most this many frames before considering a notification.
const KICK_BATCH: u16 = 32;
/// How long a transfer may make no progress before the driver gives up.
pub(crate) const STALL_SECS: u64 = 5;
/// How long the rest of a merged receive frame may take to appear.
const MERGE_SECS: u64 = 1;
/// `device_status` reads while waiting for DEVICE_NEEDS_RESET, about 0.5 ms apart.
const NEEDS_RESET_POLLS: u32 = 2000;
/// A guest-physical address far beyond any RAM.
pub const HOSTILE_BAD_ADDR: u64 = 0xf000_0000_0000;

/// What the driver needs from the machine: PCI configuration, MMIO, shared memory, a console,
/// a spin-wait hint and a clock.
pub trait Hw: Sink + PciConfig + Mmio + Dma {
    /// Called in every idle iteration of a poll loop (`pause` on x86).
    fn relax(&mut self);
    /// A monotonic tick counter (the TSC).
    fn ticks(&mut self) -> u64;
    /// Ticks per second (at least 1).
    fn ticks_per_sec(&self) -> u64;
    /// The memory shared with the device: guest-physical base and length.
    fn dma_area(&self) -> (u64, usize);
    /// Frames were counted (called once per batch, not per frame): a machine that reports
    /// its rate notes the time of the first and the last call.
    fn mark(&mut self) {}
    /// Whether the mode's time limit (`secs=`, counted from the first [`Hw::mark`]) has
    /// passed: the transmit and receive loops then end as if their count were reached.
    fn expired(&mut self) -> bool {
        false
    }
}

/// Frame counters, printed at the end of every mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames received (echo, sink, gen: good and bad).
    pub rx: u64,
    /// Frames transmitted and returned by the device.
    pub tx: u64,
    /// Received frames that failed verification or could not be handled; in hostile mode
    /// also the malformed chains the device returned.
    pub bad: u64,
}

/// The counters line: `nmvm-guest: net <mode>: rx <R> tx <T> bad <B>`.
pub fn write_counters(out: &mut impl Sink, mode: NetMode, c: &Counters) {
    out.write(b"nmvm-guest: net ");
    out.write(mode.as_str().as_bytes());
    out.write(b": rx ");
    out.write_dec(c.rx);
    out.write(b" tx ");
    out.write_dec(c.tx);
    out.write(b" bad ");
    out.write_dec(c.bad);
    out.write(b"\n");
}

/// Writes a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn write_mac(out: &mut impl Sink, mac: [u8; 6]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in mac.iter().enumerate() {
        if i != 0 {
            out.write(b":");
        }
        out.write(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
    }
}

/// The shared memory area's base, checked to be large enough and page aligned.
pub(crate) fn check_dma_area(hw: &impl Hw) -> Result<u64, Error> {
    let (base, size) = hw.dma_area();
    if size < DMA_SIZE || base % 4096 != 0 {
        return Err(Error::with("DMA area too small or misaligned at", base));
    }
    Ok(base)
}

/// Finds the virtio-net device, enables its BAR0 and reads its capabilities: `(device number,
/// BAR0, capabilities)`.
pub(crate) fn probe(hw: &mut impl Hw) -> Result<(u8, Bar, Caps), Error> {
    let dev = pci::find_device(hw, pci::VENDOR_VIRTIO, pci::DEVICE_NET)
        .ok_or(Error::new("no virtio-net device found"))?;
    let bar = pci::setup_bar0(hw, dev)?;
    let caps = pci::find_caps(hw, dev, bar)?;
    Ok((dev, bar, caps))
}

/// Runs `mode` to its end; the caller prints the counters (or the error) and exits.
pub fn run(
    hw: &mut impl Hw,
    mode: NetMode,
    count: Option<u64>,
    len: FrameLen,
) -> Result<Counters, Error> {
    let base = check_dma_area(hw)?;
    let (_, _, caps) = probe(hw)?;
    let msix_table = caps.msix_table;
    let transport = Transport::new(caps);
    let gen_style = matches!(mode, NetMode::Gen | NetMode::Hostile);
    let mut dev = Dev::open(hw, transport, base, gen_style)?;
    hw.write(b"nmvm-guest: virtio-net ");
    write_mac(hw, dev.mac);
    hw.write(b" features ");
    hw.write_hex(dev.features);
    hw.write(b"\n");

    let mut c = Counters::default();
    match mode {
        NetMode::Echo => {
            dev.refill_rx(hw);
            dev.echo(hw, count, &mut c)?;
        }
        NetMode::Sink => {
            dev.refill_rx(hw);
            dev.sink(hw, count, &mut c)?;
        }
        NetMode::Gen => {
            dev.refill_rx(hw);
            dev.gen(hw, count.unwrap_or(1000), len, &mut c)?;
        }
        NetMode::Hostile => {
            if let Some(table) = msix_table {
                hostile_msix(hw, table);
            }
            hostile(hw, dev, &mut c)?
        }
    }
    Ok(c)
}

/// Free buffer indices, a stack.
struct Pool {
    free: [u16; NUM_BUFS],
    n: usize,
}

impl Pool {
    fn new(first: usize) -> Self {
        let mut p = Pool {
            free: [0; NUM_BUFS],
            n: 0,
        };
        for b in (first..NUM_BUFS).rev() {
            p.put(b as u16);
        }
        p
    }

    fn get(&mut self) -> Option<u16> {
        self.n = self.n.checked_sub(1)?;
        self.free.get(self.n).copied()
    }

    fn put(&mut self, b: u16) {
        if usize::from(b) < NUM_BUFS {
            if let Some(slot) = self.free.get_mut(self.n) {
                *slot = b;
                self.n += 1;
            }
        }
    }
}

/// Counts the time a loop makes no progress.
pub(crate) struct Stall {
    since: Option<u64>,
    limit: u64,
}

impl Stall {
    pub(crate) fn new(hw: &impl Hw, secs: u64) -> Self {
        Stall {
            since: None,
            limit: hw.ticks_per_sec().max(1).saturating_mul(secs),
        }
    }

    pub(crate) fn progress(&mut self) {
        self.since = None;
    }

    /// One idle iteration: relaxes, and says whether the limit has passed.
    pub(crate) fn idle(&mut self, hw: &mut impl Hw) -> bool {
        hw.relax();
        let now = hw.ticks();
        match self.since {
            None => {
                self.since = Some(now);
                false
            }
            Some(t) => now.wrapping_sub(t) > self.limit,
        }
    }
}

/// An initialised device with its two queues.
struct Dev {
    t: Transport,
    features: u64,
    mac: [u8; 6],
    rx: SplitQueue,
    tx: SplitQueue,
    rx_notify: u64,
    tx_notify: u64,
    /// The shared memory area (rings first).
    base: u64,
    /// Address of buffer 0.
    bufs: u64,
    /// Buffer held by each receive / transmit descriptor.
    rx_buf: [u16; MAX_SIZE as usize],
    tx_buf: [u16; MAX_SIZE as usize],
    pool: Pool,
    /// Transmit buffers come from (and return to) the pool; otherwise they are gen buffers.
    tx_from_pool: bool,
    /// Gen buffer owned by the device.
    gen_busy: [bool; GEN_BUFS],
    /// Hostile mode: the used length of the bad receive descriptor, once returned.
    rx_bad_used: Option<u32>,
}

fn rings(base: u64, queue: u16) -> RingAddrs {
    let q = base + 3 * 4096 * u64::from(queue);
    RingAddrs {
        desc: q,
        avail: q + 4096,
        used: q + 2 * 4096,
    }
}

/// A device brought up to DRIVER_OK by [`start_device`].
pub(crate) struct Started {
    /// The negotiated features.
    pub features: u64,
    /// The device's MAC, or [`DEFAULT_MAC`].
    pub mac: [u8; 6],
    /// The receive queue, initialised (empty).
    pub rx: SplitQueue,
    /// The transmit queue, initialised (empty).
    pub tx: SplitQueue,
    /// Queue 0's notification address.
    pub rx_notify: u64,
    /// Queue 1's notification address.
    pub tx_notify: u64,
}

/// Resets and initialises the device (virtio 1.x §3.1.1): accepts `wanted` (as far as offered),
/// sets up both queues with fresh rings in `base` and sets DRIVER_OK.
pub(crate) fn start_device(
    hw: &mut impl Hw,
    t: &Transport,
    base: u64,
    wanted: u64,
) -> Result<Started, Error> {
    t.reset(hw)?;
    let features = t.negotiate(hw, wanted)?;
    let event_idx = features & feature::RING_EVENT_IDX != 0;
    let (rx_size, rx_notify) = t.setup_queue(hw, RX, MAX_SIZE, rings(base, RX))?;
    let (tx_size, tx_notify) = t.setup_queue(hw, TX, MAX_SIZE, rings(base, TX))?;
    let mac = if features & feature::NET_MAC != 0 {
        t.read_device_config::<6>(hw, 0)?
    } else {
        DEFAULT_MAC
    };
    let mut rx = SplitQueue::new(rx_size, rings(base, RX), event_idx);
    let mut tx = SplitQueue::new(tx_size, rings(base, TX), event_idx);
    rx.init(hw);
    tx.init(hw);
    t.driver_ok(hw);
    let s = t.status(hw);
    if s & (status::DEVICE_NEEDS_RESET | status::FAILED) != 0 || s & status::DRIVER_OK == 0 {
        return Err(Error::with("device failed at DRIVER_OK, status", s.into()));
    }
    Ok(Started {
        features,
        mac,
        rx,
        tx,
        rx_notify,
        tx_notify,
    })
}

impl Dev {
    /// Resets and initialises the device with fresh rings in `base`.
    fn open<H: Hw>(hw: &mut H, t: Transport, base: u64, gen_style: bool) -> Result<Dev, Error> {
        let Started {
            features,
            mac,
            rx,
            tx,
            rx_notify,
            tx_notify,
        } = start_device(hw, &t, base, WANTED_FEATURES)?;
        Ok(Dev {
            t,
            features,
            mac,
            rx,
            tx,
            rx_notify,
            tx_notify,
            base,
            bufs: base + RINGS_BYTES as u64,
            rx_buf: [NO_BUF; MAX_SIZE as usize],
            tx_buf: [NO_BUF; MAX_SIZE as usize],
            pool: Pool::new(if gen_style { GEN_BUFS } else { 0 }),
            tx_from_pool: !gen_style,
            gen_busy: [false; GEN_BUFS],
            rx_bad_used: None,
        })
    }

    fn buf_addr(&self, b: u16) -> u64 {
        self.bufs + BUF_SIZE as u64 * u64::from(b)
    }

    fn mrg_rxbuf(&self) -> bool {
        self.features & feature::NET_MRG_RXBUF != 0
    }

    fn kick_rx(&mut self, hw: &mut impl Hw) {
        if self.rx.kick_needed(hw) {
            Transport::notify(hw, self.rx_notify, RX);
        }
    }

    fn kick_tx(&mut self, hw: &mut impl Hw) {
        if self.tx.kick_needed(hw) {
            Transport::notify(hw, self.tx_notify, TX);
        }
    }

    /// Posts free buffers on every free receive descriptor, then notifies if needed.
    fn refill_rx(&mut self, hw: &mut impl Hw) {
        while self.rx.num_free() > 0 {
            let Some(b) = self.pool.get() else {
                break;
            };
            let Some(d) = self.rx.alloc() else {
                self.pool.put(b);
                break;
            };
            let addr = self.buf_addr(b);
            self.rx
                .write_desc(hw, d, addr, BUF_SIZE as u32, DESC_F_WRITE, 0);
            if let Some(slot) = self.rx_buf.get_mut(usize::from(d)) {
                *slot = b;
            }
            self.rx.push(hw, d);
        }
        // Publishes the lot (one index write) and notifies if needed.
        self.kick_rx(hw);
    }

    /// Frees receive descriptor `id` and returns the buffer it held.
    fn take_rx(&mut self, id: u32) -> Result<u16, Error> {
        if !self.rx.free(id) {
            return Err(Error::with(
                "device returned a receive descriptor it does not own:",
                id.into(),
            ));
        }
        let slot = self.rx_buf.get_mut(id as usize);
        Ok(slot.map_or(NO_BUF, |s| core::mem::replace(s, NO_BUF)))
    }

    /// Waits (bounded) for the next used receive entry: the rest of a merged frame.
    fn wait_rx_used(&mut self, hw: &mut impl Hw) -> Result<Used, Error> {
        let mut stall = Stall::new(hw, MERGE_SECS);
        loop {
            if let Some(u) = self.rx.pop_used(hw) {
                return Ok(u);
            }
            if stall.idle(hw) {
                return Err(Error::new("receive: merged frame incomplete"));
            }
        }
    }

    /// The next received frame: `(buffer, frame length)`, the buffer holding the header and
    /// the whole frame (the pieces of a merged frame are gathered into the first buffer).
    /// Counts every frame in `c.rx` and the unusable ones (returned to the pool) in `c.bad`.
    fn recv(&mut self, hw: &mut impl Hw, c: &mut Counters) -> Result<Option<(u16, usize)>, Error> {
        loop {
            let Some(u) = self.rx.pop_used(hw) else {
                return Ok(None);
            };
            let b = self.take_rx(u.id)?;
            if b == BAD_BUF {
                self.rx_bad_used = Some(u.len);
                c.bad += 1;
                continue;
            }
            let addr = self.buf_addr(b);
            let nbufs = if self.mrg_rxbuf() {
                hw.dma_read16(addr + NUM_BUFFERS_OFF)
            } else {
                1
            };
            let mut total = u.len as usize;
            let mut ok =
                (VNET_HDR_LEN..=BUF_SIZE).contains(&total) && nbufs >= 1 && nbufs <= self.rx.size();
            for _ in 1..if ok { nbufs } else { 1 } {
                let next = self.wait_rx_used(hw)?;
                let b2 = self.take_rx(next.id)?;
                let l2 = next.len as usize;
                if b2 == BAD_BUF {
                    self.rx_bad_used = Some(next.len);
                    ok = false;
                    continue;
                }
                if ok && total + l2 <= BUF_SIZE {
                    hw.dma_copy(self.buf_addr(b2), addr + total as u64, l2);
                    total += l2;
                } else {
                    ok = false;
                }
                self.pool.put(b2);
            }
            c.rx += 1;
            if !ok || total < VNET_HDR_LEN + 14 {
                c.bad += 1;
                self.pool.put(b);
                continue;
            }
            return Ok(Some((b, total - VNET_HDR_LEN)));
        }
    }

    /// Receives and verifies frames until none is pending or `c.rx` reaches `limit`, then
    /// reposts buffers.
    fn rx_verify(&mut self, hw: &mut impl Hw, c: &mut Counters, limit: u64) -> Result<(), Error> {
        while c.rx < limit {
            let Some((b, len)) = self.recv(hw, c)? else {
                break;
            };
            let f = hw.dma_bytes(self.buf_addr(b) + VNET_HDR_LEN as u64, len);
            if frame::verify_frame(f).is_err() {
                c.bad += 1;
            }
            self.pool.put(b);
        }
        self.refill_rx(hw);
        Ok(())
    }

    /// Frees the transmit descriptors the device has returned, and their buffers.
    fn reclaim_tx(&mut self, hw: &mut impl Hw, c: &mut Counters) -> Result<(), Error> {
        while let Some(u) = self.tx.pop_used(hw) {
            if !self.tx.free(u.id) {
                return Err(Error::with(
                    "device returned a transmit descriptor it does not own:",
                    u.id.into(),
                ));
            }
            let b = self
                .tx_buf
                .get_mut(u.id as usize)
                .map_or(NO_BUF, |s| core::mem::replace(s, NO_BUF));
            if self.tx_from_pool {
                self.pool.put(b);
            } else if let Some(busy) = self.gen_busy.get_mut(usize::from(b)) {
                *busy = false;
            }
            c.tx += 1;
        }
        Ok(())
    }

    /// Puts buffer `b` (header + `len`-byte frame) on the transmit queue; the caller has
    /// checked that a descriptor is free.
    fn send(&mut self, hw: &mut impl Hw, b: u16, len: usize) -> Result<(), Error> {
        let d = self
            .tx
            .alloc()
            .ok_or(Error::new("transmit queue unexpectedly full"))?;
        let addr = self.buf_addr(b);
        self.tx
            .write_desc(hw, d, addr, (VNET_HDR_LEN + len) as u32, 0, 0);
        if let Some(slot) = self.tx_buf.get_mut(usize::from(d)) {
            *slot = b;
        }
        if let Some(busy) = self.gen_busy.get_mut(usize::from(b)) {
            if !self.tx_from_pool {
                *busy = true;
            }
        }
        // Published by the caller's next `kick_tx`.
        self.tx.push(hw, d);
        Ok(())
    }

    /// Error for a transfer that stopped, with the device status for the diagnosis.
    fn stalled(&self, hw: &mut impl Hw, what: &'static str) -> Error {
        Error::with(what, self.t.status(hw).into())
    }

    /// Waits until the device has returned every transmit buffer.
    fn drain_tx(&mut self, hw: &mut impl Hw, c: &mut Counters) -> Result<(), Error> {
        let mut stall = Stall::new(hw, STALL_SECS);
        self.kick_tx(hw);
        while self.tx.in_flight() > 0 {
            if self.tx.has_used(hw) {
                self.reclaim_tx(hw, c)?;
                stall.progress();
            } else if stall.idle(hw) {
                return Err(self.stalled(hw, "transmit: buffers not returned, device status"));
            }
        }
        Ok(())
    }

    /// `net=echo`: every received frame goes back with its MACs swapped.
    fn echo(
        &mut self,
        hw: &mut impl Hw,
        count: Option<u64>,
        c: &mut Counters,
    ) -> Result<(), Error> {
        let limit = count.unwrap_or(u64::MAX);
        let mut sent = 0u64;
        let mut stall = Stall::new(hw, STALL_SECS);
        while sent < limit && !hw.expired() {
            let mut progress = false;
            if self.tx.has_used(hw) {
                self.reclaim_tx(hw, c)?;
                progress = true;
            }
            let mut batch = 0u16;
            while sent < limit && self.tx.num_free() > 0 {
                let Some((b, len)) = self.recv(hw, c)? else {
                    break;
                };
                let f = hw.dma_bytes(self.buf_addr(b), VNET_HDR_LEN + len);
                swap_macs(f, VNET_HDR_LEN);
                self.send(hw, b, len)?;
                sent += 1;
                progress = true;
                batch += 1;
                if batch == KICK_BATCH {
                    self.kick_tx(hw);
                    batch = 0;
                }
            }
            self.kick_tx(hw);
            self.refill_rx(hw);
            if progress {
                hw.mark();
                stall.progress();
            } else if self.tx.num_free() == 0 && self.rx.has_used(hw) {
                // Frames wait, but the device does not return transmit buffers.
                if stall.idle(hw) {
                    return Err(self.stalled(hw, "echo: transmit queue stuck, device status"));
                }
            } else {
                stall.progress();
                hw.relax();
            }
        }
        self.drain_tx(hw, c)
    }

    /// `net=sink`: receive, verify and count.
    fn sink(
        &mut self,
        hw: &mut impl Hw,
        count: Option<u64>,
        c: &mut Counters,
    ) -> Result<(), Error> {
        let limit = count.unwrap_or(u64::MAX);
        while c.rx < limit && !hw.expired() {
            if self.rx.has_used(hw) {
                self.rx_verify(hw, c, limit)?;
                hw.mark();
            } else {
                hw.relax();
            }
        }
        Ok(())
    }

    /// `net=gen`: sends frames `0..count` and waits until all are returned.
    fn gen(
        &mut self,
        hw: &mut impl Hw,
        count: u64,
        len: FrameLen,
        c: &mut Counters,
    ) -> Result<(), Error> {
        let fg = FrameGen::new(self.mac);
        let mut prepared = [0u16; GEN_BUFS];
        let upto = usize::from(len.max);
        let mut seq = 0u64;
        let mut stall = Stall::new(hw, STALL_SECS);
        while c.tx < count && !hw.expired() {
            let mut progress = false;
            if self.tx.has_used(hw) {
                self.reclaim_tx(hw, c)?;
                hw.mark();
                progress = true;
            }
            if self.rx.has_used(hw) {
                self.rx_verify(hw, c, u64::MAX)?;
                progress = true;
            }
            let mut batch = 0u16;
            while seq < count && self.tx.num_free() > 0 {
                let b = (seq % GEN_BUFS as u64) as u16;
                if self.gen_busy.get(usize::from(b)) != Some(&false) {
                    break;
                }
                let flen = frame::gen_len(seq, len.min, len.max);
                let p = prepared
                    .get_mut(usize::from(b))
                    .ok_or(Error::new("gen: bad buffer"))?;
                let buf = hw.dma_bytes(self.buf_addr(b), BUF_SIZE);
                let (hdr, f) = buf.split_at_mut(VNET_HDR_LEN.min(buf.len()));
                if *p == 0 {
                    hdr.fill(0);
                }
                *p = fg.build(f, seq, flen, usize::from(*p), upto) as u16;
                if *p == 0 {
                    return Err(Error::with(
                        "gen: cannot build a frame of length",
                        flen as u64,
                    ));
                }
                self.send(hw, b, flen)?;
                seq += 1;
                progress = true;
                batch += 1;
                if batch == KICK_BATCH {
                    self.kick_tx(hw);
                    batch = 0;
                }
            }
            self.kick_tx(hw);
            if progress {
                stall.progress();
            } else if stall.idle(hw) {
                return Err(self.stalled(hw, "gen: transmit queue stuck, device status"));
            }
        }
        Ok(())
    }
}

/// Zeroes the `hdr_len`-byte virtio-net header and swaps the destination and source MACs of
/// the frame after it (`buf` = header + frame); does nothing to a buffer too short for both.
pub(crate) fn swap_macs(buf: &mut [u8], hdr_len: usize) {
    // Checked splits only: with a variable `hdr_len` the compiler cannot prove plain ones in
    // bounds and would link the panic machinery in.
    let Some((hdr, rest)) = buf.split_at_mut_checked(hdr_len) else {
        return;
    };
    let Some((dst, src)) = rest.get_mut(..12).and_then(|m| m.split_at_mut_checked(6)) else {
        return;
    };
    hdr.fill(0);
    dst.swap_with_slice(src);
}

/// Names of the hostile mode's malformed transmit chains, in the order they are posted.
const HOSTILE_CASES: [&str; 5] = [
    "address beyond RAM",
    "descriptor loop",
    "zero-length descriptor",
    "next index out of range",
    "head index out of range",
];

/// Builds frame `seq` (60 bytes) in gen buffer `seq % 256`, sends it, and waits for it to come
/// back. Other used entries met meanwhile are handed to `other`.
fn send_and_wait<H: Hw>(
    hw: &mut H,
    dev: &mut Dev,
    seq: u64,
    c: &mut Counters,
    mut other: impl FnMut(&mut H, &mut Dev, Used),
) -> Result<(), Error> {
    let b = (seq % GEN_BUFS as u64) as u16;
    let fg = FrameGen::new(dev.mac);
    let buf = hw.dma_bytes(dev.buf_addr(b), BUF_SIZE);
    let (hdr, f) = buf.split_at_mut(VNET_HDR_LEN.min(buf.len()));
    hdr.fill(0);
    if fg.build(f, seq, frame::MIN_LEN, 0, frame::MIN_LEN) == 0 {
        return Err(Error::new("hostile: cannot build a frame"));
    }
    let d = dev
        .tx
        .alloc()
        .ok_or(Error::new("hostile: transmit queue full"))?;
    let addr = dev.buf_addr(b);
    dev.tx
        .write_desc(hw, d, addr, (VNET_HDR_LEN + frame::MIN_LEN) as u32, 0, 0);
    dev.tx.publish(hw, d);
    dev.kick_tx(hw);
    let mut stall = Stall::new(hw, STALL_SECS);
    loop {
        if let Some(u) = dev.tx.pop_used(hw) {
            stall.progress();
            if u.id == u32::from(d) {
                dev.tx.free(u.id);
                c.tx += 1;
                return Ok(());
            }
            other(hw, dev, u);
        } else if stall.idle(hw) {
            return Err(dev.stalled(hw, "hostile: valid frame not returned, device status"));
        }
    }
}

/// `net=hostile`, first part: MSI-X table writes just past the table's last
/// entry and further out in its page, which the device must ignore.
fn hostile_msix<H: Hw>(hw: &mut H, table: pci::Region) {
    let end = table.addr + u64::from(table.len);
    hw.mmio_write32(end, 0xfee0_0000);
    hw.mmio_write32(end + 0x100 + 12, 0);
    hw.write(b"nmvm-guest: hostile: wrote past the MSI-X table\n");
}

/// `net=hostile`: malformed chains, one valid frame, an avail index jump, DEVICE_NEEDS_RESET,
/// a full re-initialisation and one more valid frame.
fn hostile<H: Hw>(hw: &mut H, mut dev: Dev, c: &mut Counters) -> Result<(), Error> {
    // A receive descriptor with an out-of-range address ahead of the valid ones.
    let d = dev
        .rx
        .alloc()
        .ok_or(Error::new("hostile: no receive descriptor"))?;
    dev.rx
        .write_desc(hw, d, HOSTILE_BAD_ADDR, BUF_SIZE as u32, DESC_F_WRITE, 0);
    if let Some(slot) = dev.rx_buf.get_mut(usize::from(d)) {
        *slot = BAD_BUF;
    }
    dev.rx.publish(hw, d);
    dev.refill_rx(hw);

    let size = dev.tx.size();
    if size < 8 {
        return Err(Error::with(
            "hostile: transmit queue too small:",
            size.into(),
        ));
    }
    // Valid memory for the malformed chains to point at: the last gen buffer.
    let target = dev.buf_addr(GEN_BUFS as u16 - 1);
    let len = (VNET_HDR_LEN + frame::MIN_LEN) as u32;
    let mut heads = [0u16; HOSTILE_CASES.len()];
    let alloc = |dev: &mut Dev| dev.tx.alloc().ok_or(Error::new("hostile: no descriptor"));
    // 1. An address beyond RAM.
    heads[0] = alloc(&mut dev)?;
    dev.tx.write_desc(hw, heads[0], HOSTILE_BAD_ADDR, len, 0, 0);
    // 2. A loop: A -> B -> A.
    heads[1] = alloc(&mut dev)?;
    let loop_b = alloc(&mut dev)?;
    dev.tx
        .write_desc(hw, heads[1], target, len, DESC_F_NEXT, loop_b);
    dev.tx
        .write_desc(hw, loop_b, target, len, DESC_F_NEXT, heads[1]);
    // 3. A zero-length descriptor.
    heads[2] = alloc(&mut dev)?;
    dev.tx.write_desc(hw, heads[2], target, 0, 0, 0);
    // 4. NEXT on the last descriptor, pointing past the table.
    heads[3] = alloc(&mut dev)?;
    dev.tx
        .write_desc(hw, heads[3], target, len, DESC_F_NEXT, size);
    // 5. An avail ring entry naming no descriptor.
    heads[4] = size;
    for &h in &heads {
        dev.tx.publish(hw, h);
    }

    let mut used_len: [Option<u32>; HOSTILE_CASES.len()] = [None; HOSTILE_CASES.len()];
    let mut record = |hw: &mut H, dev: &mut Dev, u: Used| {
        if let Some(i) = heads.iter().position(|&h| u32::from(h) == u.id) {
            if let Some(slot) = used_len.get_mut(i) {
                *slot = Some(u.len);
            }
            dev.tx.free(u.id);
            if i == 1 {
                dev.tx.free(loop_b.into());
            }
        } else {
            hw.write(b"nmvm-guest: hostile: unexpected used id ");
            hw.write_dec(u.id.into());
            hw.write(b" len ");
            hw.write_dec(u.len.into());
            hw.write(b"\n");
        }
    };
    send_and_wait(hw, &mut dev, 0, c, &mut record)?;
    // Anything the device returned after the valid frame.
    while let Some(u) = dev.tx.pop_used(hw) {
        record(hw, &mut dev, u);
    }
    for (name, got) in HOSTILE_CASES.iter().zip(used_len) {
        hw.write(b"nmvm-guest: hostile: ");
        hw.write(name.as_bytes());
        match got {
            Some(l) => {
                c.bad += 1;
                hw.write(b": used len ");
                hw.write_dec(l.into());
            }
            None => hw.write(b": not returned"),
        }
        hw.write(b"\n");
    }
    dev.rx_verify(hw, c, u64::MAX)?;
    hw.write(b"nmvm-guest: hostile: rx bad address: ");
    match dev.rx_bad_used {
        Some(l) => {
            hw.write(b"used len ");
            hw.write_dec(l.into());
        }
        None => hw.write(b"not used (no frame arrived)"),
    }
    hw.write(b"\n");

    // The index jump: more than a queue's worth of entries the device has not seen.
    dev.tx.jump_avail_idx(hw, size + 5);
    Transport::notify(hw, dev.tx_notify, TX);
    let tick = hw.ticks_per_sec() / 2000;
    let mut s = 0;
    for _ in 0..NEEDS_RESET_POLLS {
        s = dev.t.status(hw);
        if s & status::DEVICE_NEEDS_RESET != 0 {
            break;
        }
        let start = hw.ticks();
        while hw.ticks().wrapping_sub(start) < tick {
            hw.relax();
        }
    }
    if s & status::DEVICE_NEEDS_RESET == 0 {
        return Err(Error::with(
            "hostile: device did not set DEVICE_NEEDS_RESET, status",
            s.into(),
        ));
    }
    hw.write(b"nmvm-guest: hostile: device needs reset, status ");
    hw.write_hex(s.into());
    hw.write(b"\n");

    let t = dev.t;
    let mut dev = Dev::open(hw, t, dev.base, true)?;
    dev.refill_rx(hw);
    send_and_wait(hw, &mut dev, 1, c, |hw, _, u| {
        hw.write(b"nmvm-guest: hostile: unexpected used id ");
        hw.write_dec(u.id.into());
        hw.write(b"\n");
    })?;
    dev.rx_verify(hw, c, u64::MAX)?;
    hw.write(b"nmvm-guest: hostile: device recovered\n");
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
