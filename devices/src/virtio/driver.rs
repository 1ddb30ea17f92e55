//! A synthetic virtio-net driver: a host thread that plays the guest's
//! driver on real guest memory, with split rings, EVENT_IDX, kicks through
//! the queue eventfds and interrupts through an eventfd. It drives the real
//! device model without any guest CPU, for tests and for `nmvm bench`.

use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::net::HDR_LEN;
use super::splitq::{Desc, GuestRam, SplitRing, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use super::{Activation, VirtioInterrupt};
use crate::eventfd::EventFd;
use crate::netmap::Ring;

pub use super::splitq::need_event;

/// Size of each driver buffer.
pub const BUF_SIZE: u64 = 2048;
const DESC_SIZE: u64 = 16;
/// No next descriptor (see `DriverQueue::links`).
const NO_LINK: u16 = u16::MAX;

/// Interrupts from the device: counted, and signalled on an eventfd the
/// driver may wait on.
pub struct DriverInterrupt {
    /// Written on every queue or config interrupt.
    pub evt: EventFd,
    /// Interrupts per queue (0 = RX, 1 = TX) and configuration.
    pub counts: [AtomicU64; 3],
}

impl VirtioInterrupt for DriverInterrupt {
    fn signal_queue(&self, queue: u16) {
        self.counts[usize::from(queue.min(1))].fetch_add(1, Ordering::Relaxed);
        let _ = self.evt.write(1);
    }

    fn signal_config(&self) {
        self.counts[2].fetch_add(1, Ordering::Relaxed);
        let _ = self.evt.write(1);
    }
}

/// One split virtqueue as the driver sees it, with one buffer of
/// [`BUF_SIZE`] bytes per descriptor. The rings and buffers are translated
/// to host pointers once, like the device's; the `mem` arguments of the
/// methods are not used (they keep the API of a driver that goes through
/// `GuestMemoryMmap`).
pub struct DriverQueue {
    ring: SplitRing,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    bufs: u64,
    /// Host address of buffer 0 (`size` buffers follow).
    bufs_host: NonNull<u8>,
    free: Vec<u16>,
    /// The descriptor after each one in a chain posted by `post_chain`
    /// (`NO_LINK` otherwise), to free whole chains when they come back.
    links: Vec<u16>,
    /// Whether `post_chain` was ever used (else `links` is all `NO_LINK`).
    chains: bool,
    avail_idx: u16,
    last_used: u16,
    used_seen: u16,
    kicked_at: u16,
    /// Kicks sent.
    pub kicks: u64,
    kick: Arc<EventFd>,
}

// SAFETY: `bufs_host` points into guest memory that the queue's `ring`
// keeps mapped (it holds a `GuestRam`); the queue is used by one thread at
// a time, and its accesses to guest memory are argued where they are made.
unsafe impl Send for DriverQueue {}

impl DriverQueue {
    /// Lays a queue of `size` entries out at `base` in `mem` (needs
    /// `Self::footprint(size)` bytes) with one buffer per descriptor.
    pub fn new(
        mem: &GuestMemoryMmap,
        base: u64,
        size: u16,
        kick: Arc<EventFd>,
    ) -> std::io::Result<Self> {
        let desc = base;
        let avail = desc + DESC_SIZE * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 4095) & !4095;
        let bufs = (used + 6 + 8 * u64::from(size) + 4095) & !4095;
        let ram = GuestRam::new(mem).map_err(std::io::Error::other)?;
        let ring = SplitRing::new(&ram, desc, avail, used, size).map_err(std::io::Error::other)?;
        let bufs_host = ram
            .translate(bufs, BUF_SIZE * u64::from(size))
            .ok_or_else(|| std::io::Error::other("driver buffers outside guest memory"))?;
        Ok(Self {
            ring,
            size,
            desc,
            avail,
            used,
            bufs,
            bufs_host,
            free: (0..size).rev().collect(),
            links: vec![NO_LINK; usize::from(size)],
            chains: false,
            avail_idx: 0,
            last_used: 0,
            used_seen: 0,
            kicked_at: 0,
            kicks: 0,
            kick,
        })
    }

    /// Bytes a queue of `size` entries needs, buffers included.
    pub fn footprint(size: u16) -> u64 {
        let s = u64::from(size);
        let rings = ((DESC_SIZE * s + 6 + 2 * s + 4095) & !4095) + ((6 + 8 * s + 4095) & !4095);
        rings + BUF_SIZE * s
    }

    /// A device-side queue configured like this one.
    pub fn device_queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size is a power of two");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    fn buf_addr(&self, id: u16) -> u64 {
        self.bufs + BUF_SIZE * u64::from(id)
    }

    /// Free descriptors.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Posts one buffer: `data` for the device to read (TX), or an empty
    /// writable buffer (RX) when `data` is `None`. False if the queue is
    /// full. Visible to the device after [`DriverQueue::publish`].
    #[inline]
    pub fn post(&mut self, _mem: &GuestMemoryMmap, data: Option<&[u8]>) -> bool {
        let Some(id) = self.free.pop() else {
            return false;
        };
        let (len, flags) = match data {
            Some(d) => {
                let n = d.len().min(BUF_SIZE as usize);
                // SAFETY: the free list only holds ids below `size`, so the
                // destination is inside buffer `id`, the BUF_SIZE bytes at
                // `bufs_host + id * BUF_SIZE` in the guest memory that `new`
                // translated (and `ring` keeps mapped); n <= BUF_SIZE. The
                // buffer is the driver's until it is published (the device
                // reads it only after the release store of the avail
                // index); the bytes are plain data, and `copy` allows `d` to
                // overlap it.
                unsafe {
                    let dst = self
                        .bufs_host
                        .as_ptr()
                        .add(usize::from(id) * BUF_SIZE as usize);
                    std::ptr::copy(d.as_ptr(), dst, n);
                }
                (n as u32, 0u16)
            }
            None => (BUF_SIZE as u32, VIRTQ_DESC_F_WRITE),
        };
        self.ring.set_desc(
            id,
            Desc {
                addr: self.buf_addr(id),
                len,
                flags,
                next: 0,
            },
        );
        self.ring.set_avail_entry(self.avail_idx, id);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        true
    }

    /// Posts a chain of descriptors for the given buffers (guest address,
    /// length, flags: `VIRTQ_DESC_F_WRITE` or 0), linked in that order, and
    /// returns its head; `None` if there are not enough free descriptors.
    /// Addresses, lengths and flags are written as given, so tests can make
    /// any layout, malformed ones included. Visible to the device after
    /// [`DriverQueue::publish`].
    pub fn post_chain(&mut self, bufs: &[(u64, u32, u16)]) -> Option<u16> {
        if bufs.is_empty() || self.free.len() < bufs.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        self.chains = true;
        for (k, (&(addr, len, flags), &id)) in bufs.iter().zip(&ids).enumerate() {
            let next = ids.get(k + 1).copied();
            let flags = flags | if next.is_some() { VIRTQ_DESC_F_NEXT } else { 0 };
            self.ring.set_desc(
                id,
                Desc {
                    addr,
                    len,
                    flags,
                    next: next.unwrap_or(0),
                },
            );
            self.links[usize::from(id)] = next.unwrap_or(NO_LINK);
        }
        self.post_head(ids[0]);
        Some(ids[0])
    }

    /// Puts `head` in the avail ring as it is (say, one outside the table).
    /// Visible to the device after [`DriverQueue::publish`].
    pub fn post_head(&mut self, head: u16) {
        self.ring.set_avail_entry(self.avail_idx, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// The guest address of the buffer of descriptor `id` (each descriptor
    /// has one, used by [`DriverQueue::post`]).
    pub fn buf_addr_of(&self, id: u16) -> u64 {
        self.buf_addr(id)
    }

    /// Publishes posted buffers and kicks the device if it asked for it.
    pub fn publish(&mut self, _mem: &GuestMemoryMmap) {
        if self.avail_idx == self.kicked_at {
            return;
        }
        self.ring.set_avail_idx(self.avail_idx);
        // The new index must be visible before avail_event is read (the
        // device does the mirror image: store avail_event, fence, read idx).
        fence(Ordering::SeqCst);
        if need_event(self.ring.avail_event(), self.avail_idx, self.kicked_at) {
            self.kicks += 1;
            let _ = self.kick.write(1);
        }
        self.kicked_at = self.avail_idx;
    }

    /// Asks for an interrupt once the device has used everything posted so
    /// far (or `ahead` entries from now).
    pub fn request_interrupt(&mut self, _mem: &GuestMemoryMmap, ahead: u16) {
        let ev = self.last_used.wrapping_add(ahead).wrapping_sub(1);
        self.ring.set_used_event(ev);
        // Visible before the caller looks at the used index again.
        fence(Ordering::SeqCst);
    }

    /// Used entries the driver has not reaped yet.
    pub fn reap_pending(&self, _mem: &GuestMemoryMmap) -> u16 {
        self.ring.used_idx().wrapping_sub(self.last_used)
    }

    /// Takes the next used buffer: (descriptor, bytes written, buffer
    /// address).
    #[inline]
    pub fn reap(&mut self, _mem: &GuestMemoryMmap) -> Option<(u16, u32, u64)> {
        if self.last_used == self.used_seen {
            self.used_seen = self.ring.used_idx();
            if self.last_used == self.used_seen {
                return None;
            }
        }
        let (id, len) = self.ring.used_elem(self.last_used);
        self.last_used = self.last_used.wrapping_add(1);
        // (The size is a power of two: `SplitRing::new` checks.)
        let id = (id as u16) & (self.size - 1);
        self.free.push(id);
        if self.chains {
            let mut next = std::mem::replace(&mut self.links[usize::from(id)], NO_LINK);
            while next != NO_LINK {
                self.free.push(next);
                next = std::mem::replace(&mut self.links[usize::from(next)], NO_LINK);
            }
        }
        Some((id, len, self.buf_addr(id)))
    }
}

/// Guest memory and both queues of a synthetic virtio-net driver.
pub struct SyntheticDriver {
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// Receive queue (0).
    pub rx: DriverQueue,
    /// Transmit queue (1).
    pub tx: DriverQueue,
    /// Interrupts from the device.
    pub interrupt: Arc<DriverInterrupt>,
}

impl SyntheticDriver {
    /// Guest RAM with two queues of `size` entries.
    pub fn new(size: u16) -> std::io::Result<Self> {
        let per = DriverQueue::footprint(size);
        let total = (2 * per + 0x10_0000) as usize;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), total)])
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let rx_kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        let tx_kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        Ok(Self {
            rx: DriverQueue::new(&mem, 0x1000, size, rx_kick)?,
            tx: DriverQueue::new(&mem, 0x1000 + per, size, tx_kick)?,
            mem,
            interrupt: Arc::new(DriverInterrupt {
                evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
                counts: Default::default(),
            }),
        })
    }

    /// What the device gets at DRIVER_OK.
    pub fn activation(&self, features: u64) -> Activation {
        let event_idx = features & super::F_RING_EVENT_IDX != 0;
        Activation {
            mem: self.mem.clone(),
            queues: vec![
                self.rx.device_queue(event_idx),
                self.tx.device_queue(event_idx),
            ],
            kicks: vec![self.rx.kick.clone(), self.tx.kick.clone()],
            interrupt: self.interrupt.clone(),
            features,
        }
    }

    /// Builds a TX buffer: a zeroed virtio-net header, then `frame`.
    pub fn tx_buffer(frame: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.resize(HDR_LEN, 0);
        out.extend_from_slice(frame);
    }
}

/// A synthetic netmap-aware guest: operates a passed-through port's rings
/// through the CSB protocol (see [`super::passthrough`]), on the region's
/// host mapping and a CSB in the synthetic driver's memory. First tx and
/// rx ring only.
pub struct PassthroughDriver {
    /// The first tx ring, as the guest sees it.
    pub tx: Ring,
    /// The first rx ring.
    pub rx: Ring,
    csb: NonNull<u8>,
    /// Guest-physical address of the CSB (for `csb_addr_lo/hi`).
    pub csb_gpa: u64,
    rx_entry: usize,
    tx_kick: Arc<EventFd>,
    rx_kick: Arc<EventFd>,
    /// The guest's own `head` (= `cur`) per direction.
    tx_head: u32,
    rx_head: u32,
    /// Kicks sent (tx, rx).
    pub kicks: u64,
    /// Bytes of virtio-net header in front of each frame on the port.
    pub hdr_len: usize,
}

// SAFETY: `csb` points into the synthetic driver's guest memory, which the
// caller of `new` keeps alive; the rings' contract is forwarded. One thread
// uses the driver at a time.
unsafe impl Send for PassthroughDriver {}

impl PassthroughDriver {
    /// The guest side of passthrough for `drv`, whose device exposes the
    /// region `[base, base + len)` with the given geometry. Puts the CSB in
    /// the last page of `drv`'s memory and fills it as the guest must before
    /// it writes `control`.
    ///
    /// # Safety
    ///
    /// The region must stay mapped, and `drv` alive, for as long as the
    /// returned value lives.
    pub unsafe fn new(
        drv: &SyntheticDriver,
        base: NonNull<u8>,
        len: usize,
        g: &super::passthrough::Geometry,
    ) -> std::io::Result<Self> {
        // SAFETY: forwarded contract.
        let (mut tx, mut rx) = unsafe { Ring::in_region(base, len, g.nifp_offset as usize) }
            .map_err(std::io::Error::other)?;
        let (Some(tx), Some(rx)) = (tx.drain(..).next(), rx.drain(..).next()) else {
            return Err(std::io::Error::other("the port has no rings"));
        };
        let ram = GuestRam::new(&drv.mem).map_err(std::io::Error::other)?;
        let size = drv.mem.iter().map(|r| r.len()).sum::<u64>();
        let entries = g.rings();
        let csb_gpa = size - 4096;
        let csb = ram
            .translate(csb_gpa, entries * super::passthrough::CSB_ENTRY)
            .ok_or_else(|| std::io::Error::other("no room for the CSB"))?;
        let d = Self {
            tx_head: tx.head(),
            rx_head: rx.head(),
            tx,
            rx,
            csb,
            csb_gpa,
            rx_entry: g.tx_rings as usize,
            tx_kick: drv.tx.kick.clone(),
            rx_kick: drv.rx.kick.clone(),
            kicks: 0,
            hdr_len: g.vnet_hdr_len as usize,
        };
        use super::passthrough::csb::{CUR, GUEST_NEED_KICK, HEAD};
        for (e, h) in [(0, d.tx_head), (d.rx_entry, d.rx_head)] {
            d.word(e, HEAD).store(h, Ordering::Relaxed);
            d.word(e, CUR).store(h, Ordering::Relaxed);
            d.word(e, GUEST_NEED_KICK).store(0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        Ok(d)
    }

    fn word(&self, entry: usize, ofs: usize) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: `entry` is 0 or `rx_entry` (< the ring count `new`
        // translated the CSB for) and `ofs` one of the CSB field offsets,
        // so the word is inside the translated, live CSB; it is 4-aligned
        // (the CSB is page-aligned) and only accessed atomically.
        unsafe {
            std::sync::atomic::AtomicU32::from_ptr(
                self.csb
                    .as_ptr()
                    .add(entry * super::passthrough::CSB_ENTRY as usize + ofs)
                    .cast(),
            )
        }
    }

    fn hwtail(&self, entry: usize) -> u32 {
        self.word(entry, super::passthrough::csb::HWTAIL)
            .load(Ordering::Acquire)
    }

    /// Free tx slots the guest may fill now.
    pub fn tx_room(&self) -> u32 {
        let (h, t, n) = (self.tx_head, self.hwtail(0), self.tx.num_slots());
        if t >= h {
            t - h
        } else {
            t + n - h
        }
    }

    /// Writes `frame` (after a zeroed header if the port has one) into the
    /// next free tx slot. False if there is none or it does not fit.
    pub fn tx_put(&mut self, frame: &[u8]) -> bool {
        let total = self.hdr_len + frame.len();
        if self.tx_room() == 0 || total > self.tx.buf_size() as usize {
            return false;
        }
        let i = self.tx_head;
        let hdr = self.hdr_len;
        let Some(buf) = self.tx.tx_buf(i) else {
            return false;
        };
        buf[..hdr].fill(0);
        buf[hdr..total].copy_from_slice(frame);
        self.tx.set_len_flags(i, total as u16, 0);
        self.tx_head = self.tx.next(i);
        true
    }

    /// Puts `slot` as it is (hostile tests: any buffer index or length)
    /// into the next tx slot.
    pub fn tx_put_raw(&mut self, slot: crate::netmap::Slot) {
        let i = self.tx_head;
        self.tx.store_slot(i, slot);
        self.tx_head = self.tx.next(i);
    }

    /// Publishes the filled tx slots and kicks the device if it sleeps.
    pub fn tx_publish(&mut self) {
        self.publish(0, self.tx_head, true);
    }

    /// Asks for (or stops asking for) an interrupt when the tx (`tx`) or rx
    /// ring's `hwtail` moves. After asking, look at the ring once more
    /// before sleeping, or a move just before is missed.
    pub fn want_interrupt(&self, tx: bool, on: bool) {
        let e = if tx { 0 } else { self.rx_entry };
        self.word(e, super::passthrough::csb::GUEST_NEED_KICK)
            .store(u32::from(on), Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Received frames waiting in `[head, hwtail)`.
    pub fn rx_pending(&self) -> u32 {
        let (h, t, n) = (
            self.rx_head,
            self.hwtail(self.rx_entry),
            self.rx.num_slots(),
        );
        if t >= h {
            t - h
        } else {
            t + n - h
        }
    }

    /// Publishes an arbitrary tx `head` (for hostile tests).
    pub fn tx_publish_raw(&mut self, head: u32) {
        self.publish(0, head, true);
    }

    /// Takes every received frame, calling `f` with each (header removed);
    /// returns how many. Call [`Self::rx_publish`] to return the slots.
    pub fn rx_take(&mut self, mut f: impl FnMut(&[u8])) -> u32 {
        let t = self.hwtail(self.rx_entry);
        let mut n = 0;
        while self.rx_head != t {
            if let Some((data, _)) = self.rx.frag(self.rx_head) {
                f(data.get(self.hdr_len..).unwrap_or(&[]));
            }
            self.rx_head = self.rx.next(self.rx_head);
            n += 1;
        }
        n
    }

    /// Returns the taken rx slots and kicks the device if it sleeps.
    pub fn rx_publish(&mut self) {
        self.publish(self.rx_entry, self.rx_head, false);
    }

    fn publish(&mut self, entry: usize, head: u32, tx: bool) {
        use super::passthrough::csb::{CUR, HEAD, HOST_NEED_KICK};
        self.word(entry, CUR).store(head, Ordering::Relaxed);
        self.word(entry, HEAD).store(head, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.word(entry, HOST_NEED_KICK).load(Ordering::Relaxed) != 0 {
            let _ = if tx { &self.tx_kick } else { &self.rx_kick }.write(1);
            self.kicks += 1;
        }
    }

    /// The device's `hwcur`/`hwtail` for the tx ring (after a reset the
    /// guest resumes from there).
    pub fn tx_resync(&mut self) {
        self.tx_head = self
            .word(0, super::passthrough::csb::HWCUR)
            .load(Ordering::Acquire);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::netmap::{Port, PortOptions};
    use crate::virtio::net::{Net, F_MRG_RXBUF, HDR_NUM_BUFFERS};
    use crate::virtio::{VirtioDevice, F_IN_ORDER, F_RING_EVENT_IDX, F_VERSION_1};
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestMemoryBackend};

    /// Both ends of a test pipe `name`, in a private runtime directory.
    pub(crate) fn pipe(name: &str) -> (String, String, PortOptions) {
        let dir = std::env::temp_dir().join(format!("nmvm-drv-{name}-{}", std::process::id()));
        let opts = PortOptions {
            run_dir: Some(dir),
            ..PortOptions::default()
        };
        (format!("shm:{name}{{0"), format!("shm:{name}}}0"), opts)
    }

    /// A recognisable test frame: broadcast, seq in bytes 14..18, pattern.
    pub(crate) fn frame(seq: u32, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[0..6].fill(0xff);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14..18].copy_from_slice(&seq.to_le_bytes());
        for (i, b) in f.iter_mut().enumerate().skip(18) {
            *b = (seq as u8).wrapping_add(i as u8);
        }
        f
    }

    /// Frames the peer had no room for wait in the device's tx ring; they
    /// must leave as soon as the peer makes room, with no further kick
    /// from the guest (which has seen all its buffers used and is idle).
    #[test]
    fn frames_queued_for_a_full_peer_leave_without_another_kick() {
        let (a, b, opts) = pipe("drvdrain");
        let dev_port = Port::open(&a, &opts).unwrap();
        let mut peer = Port::open(&b, &opts).unwrap();
        let mut drv = SyntheticDriver::new(256).unwrap();
        let mut net = Net::new([0x52, 0x54, 0, 0, 0, 1], dev_port);
        net.activate(drv.activation(F_VERSION_1 | F_RING_EVENT_IDX))
            .unwrap();
        // More than the peer's rx ring holds; the peer reads nothing yet.
        let n = peer.rx_ring().num_slots() + 300;
        let mut buf = Vec::new();
        let (mut sent, mut used) = (0u32, 0u32);
        let deadline = Instant::now() + Duration::from_secs(20);
        while used < n {
            assert!(Instant::now() < deadline, "the device used {used}/{n}");
            while drv.tx.reap(&drv.mem).is_some() {
                used += 1;
            }
            while sent < n && drv.tx.free() > 0 {
                SyntheticDriver::tx_buffer(&frame(sent, 60), &mut buf);
                assert!(drv.tx.post(&drv.mem, Some(&buf)));
                sent += 1;
            }
            drv.tx.publish(&drv.mem);
            std::thread::sleep(Duration::from_millis(1));
        }
        // The guest is done. Now the peer reads everything.
        std::thread::sleep(Duration::from_millis(50));
        let mut got = 0u32;
        let mut rxbuf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(5);
        while got < n {
            assert!(Instant::now() < deadline, "the peer got {got}/{n}");
            peer.rxsync().unwrap();
            while let Some(len) = peer.rx_ring().recv(&mut rxbuf) {
                assert_eq!(&rxbuf[..len], &frame(got, 60)[..]);
                got += 1;
            }
            peer.rxsync().unwrap();
            let _ = peer.wait_rx(Some(Duration::from_millis(10)));
        }
        let c = net.counters();
        net.reset();
        assert_eq!(c.tx_unsent_at_stop.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn tx_and_rx_move_exact_frames_through_a_netmap_pipe() {
        let (a, b, opts) = pipe("drvtxrx");
        let dev_port = Port::open(&a, &opts).unwrap();
        let mut peer = Port::open(&b, &opts).unwrap();
        let mut drv = SyntheticDriver::new(256).unwrap();
        let mut net = Net::new([0x52, 0x54, 0, 0, 0, 1], dev_port);
        let features = F_VERSION_1 | F_RING_EVENT_IDX | F_MRG_RXBUF;
        net.activate(drv.activation(features)).unwrap();

        // Guest -> peer.
        const N: u32 = 5000;
        let mut buf = Vec::new();
        let mut sent = 0u32;
        let mut received = 0u32;
        let mut rxbuf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(20);
        while received < N {
            assert!(Instant::now() < deadline, "tx stalled at {received}/{N}");
            while drv.tx.reap(&drv.mem).is_some() {}
            while sent < N && drv.tx.free() > 0 {
                let f = frame(sent, 60 + (sent as usize * 13) % 1455);
                SyntheticDriver::tx_buffer(&f, &mut buf);
                assert!(drv.tx.post(&drv.mem, Some(&buf)));
                sent += 1;
            }
            drv.tx.publish(&drv.mem);
            peer.rxsync().unwrap();
            while let Some(len) = peer.rx_ring().recv(&mut rxbuf) {
                assert_eq!(
                    &rxbuf[..len],
                    &frame(received, 60 + (received as usize * 13) % 1455)[..]
                );
                received += 1;
            }
            peer.rxsync().unwrap();
            if received < N {
                let _ = peer.wait_rx(Some(Duration::from_millis(20)));
            }
        }

        // Peer -> guest.
        for _ in 0..drv.rx.free() {
            drv.rx.post(&drv.mem, None);
        }
        drv.rx.publish(&drv.mem);
        let mut got = 0u32;
        let mut sent = 0u32;
        let deadline = Instant::now() + Duration::from_secs(20);
        while got < N {
            assert!(Instant::now() < deadline, "rx stalled at {got}/{N}");
            while sent < N
                && peer
                    .tx_ring()
                    .send(&frame(sent, 60 + (sent as usize * 7) % 1455))
            {
                sent += 1;
            }
            peer.txsync().unwrap();
            let mut reposted = false;
            while let Some((_, len, addr)) = drv.rx.reap(&drv.mem) {
                let mut data = vec![0u8; len as usize];
                drv.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
                // num_buffers is 1; the rest of the header is zero.
                assert_eq!(&data[..HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
                assert_eq!(
                    &data[HDR_LEN..],
                    &frame(got, 60 + (got as usize * 7) % 1455)[..]
                );
                got += 1;
                drv.rx.post(&drv.mem, None);
                reposted = true;
            }
            if reposted {
                drv.rx.publish(&drv.mem);
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let c = net.counters();
        assert_eq!(c.tx_frames.load(Ordering::Relaxed), u64::from(N));
        assert_eq!(c.rx_frames.load(Ordering::Relaxed), u64::from(N));
        assert_eq!(c.bad_chains.load(Ordering::Relaxed), 0);
        net.reset();
    }

    #[test]
    fn offloads_are_offered_only_when_the_port_carries_a_header() {
        use crate::virtio::net::{F_CSUM, F_GUEST_TSO4, F_HOST_TSO4};
        let offloads = F_CSUM | F_HOST_TSO4 | F_GUEST_TSO4;
        let (a, _, opts) = pipe("drvplain");
        let plain = Net::new([2, 0, 0, 0, 0, 1], Port::open(&a, &opts).unwrap());
        assert_eq!(plain.features() & offloads, 0);
        let (a, b, mut opts) = pipe("drvhdr");
        opts.vnet_hdr_len = Some(12);
        let port = Port::open(&a, &opts).unwrap();
        let mut peer = Port::open(
            &b,
            &PortOptions {
                vnet_hdr_len: None,
                ..opts.clone()
            },
        )
        .unwrap();
        assert_eq!(peer.virtio_net_hdr_len(), 12);
        let mut net = Net::new([2, 0, 0, 0, 0, 1], port);
        assert_eq!(net.features() & offloads, offloads);

        // The guest's header reaches the peer untouched, in front of the
        // frame.
        let mut drv = SyntheticDriver::new(16).unwrap();
        net.activate(drv.activation(F_VERSION_1 | F_CSUM)).unwrap();
        let mut buf = vec![1u8, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0];
        buf.extend_from_slice(&frame(9, 60));
        assert!(drv.tx.post(&drv.mem, Some(&buf)));
        drv.tx.publish(&drv.mem);
        assert!(peer.wait_rx(Some(Duration::from_secs(5))).unwrap());
        let mut out = [0u8; 2048];
        let len = peer.rx_ring().recv(&mut out).unwrap();
        assert_eq!(&out[..len], &buf[..]);
        net.reset();
    }

    /// Frames the peer end `peer` receives within `secs`, until `n`.
    fn peer_frames(peer: &mut Port, n: usize, secs: u64) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(secs);
        while got.len() < n && Instant::now() < deadline {
            let _ = peer.wait_rx(Some(Duration::from_millis(20)));
            while let Some(len) = peer.rx_ring().recv(&mut buf) {
                got.push(buf[..len].to_vec());
            }
            peer.rxsync().unwrap();
        }
        got
    }

    /// Used entries of `q` within `secs`, until `n`: (descriptor, length).
    fn used(drv: &mut SyntheticDriver, rx: bool, n: usize, secs: u64) -> Vec<(u16, u32)> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while got.len() < n && Instant::now() < deadline {
            let q = if rx { &mut drv.rx } else { &mut drv.tx };
            match q.reap(&drv.mem) {
                Some((id, len, _)) => got.push((id, len)),
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        got
    }

    /// Writes `data` at guest address `addr`.
    fn put(drv: &SyntheticDriver, addr: u64, data: &[u8]) {
        drv.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    #[test]
    fn tx_chains_of_every_shape_and_bad_ones_in_between() {
        let (a, b, opts) = pipe("drvshapes");
        let dev_port = Port::open(&a, &opts).unwrap();
        let mut peer = Port::open(&b, &opts).unwrap();
        let mut drv = SyntheticDriver::new(64).unwrap();
        let mut net = Net::new([2, 0, 0, 0, 0, 1], dev_port);
        assert_ne!(net.features() & F_IN_ORDER, 0);
        net.activate(drv.activation(F_VERSION_1 | F_RING_EVENT_IDX | F_IN_ORDER))
            .unwrap();
        // Scratch memory after both queues.
        let scratch = 0x1000 + 2 * DriverQueue::footprint(64);
        let ram_end = drv.mem.last_addr().0 + 1;
        let hdr = [0u8; HDR_LEN];
        let mut want = Vec::new();
        let mut buf = Vec::new();
        // One buffer each: the fast path.
        for seq in 0..10 {
            let f = frame(seq, 60 + seq as usize);
            SyntheticDriver::tx_buffer(&f, &mut buf);
            assert!(drv.tx.post(&drv.mem, Some(&buf)));
            want.push(f);
        }
        // Header and frame in two descriptors.
        let f = frame(10, 200);
        put(&drv, scratch, &hdr);
        put(&drv, scratch + 0x100, &f);
        drv.tx
            .post_chain(&[(scratch, HDR_LEN as u32, 0), (scratch + 0x100, 200, 0)])
            .unwrap();
        want.push(f);
        // A frame larger than a netmap buffer, in one descriptor.
        let f = frame(11, 5000);
        put(&drv, scratch + 0x1000, &hdr);
        put(&drv, scratch + 0x1000 + HDR_LEN as u64, &f);
        drv.tx
            .post_chain(&[(scratch + 0x1000, (HDR_LEN + 5000) as u32, 0)])
            .unwrap();
        want.push(f);
        // Bad ones: zero length, beyond RAM, straddling the end of RAM,
        // writable, too short, a head outside the table.
        let bad = [
            drv.tx.post_chain(&[(scratch, 0, 0)]).unwrap(),
            drv.tx.post_chain(&[(ram_end + 0x1000, 100, 0)]).unwrap(),
            drv.tx.post_chain(&[(ram_end - 50, 100, 0)]).unwrap(),
            drv.tx
                .post_chain(&[(scratch, 100, VIRTQ_DESC_F_WRITE)])
                .unwrap(),
            drv.tx
                .post_chain(&[(scratch, (HDR_LEN + 13) as u32, 0)])
                .unwrap(),
            drv.tx
                .post_chain(&[(scratch, HDR_LEN as u32, 0), (ram_end, 100, 0)])
                .unwrap(),
        ];
        drv.tx.post_head(64 + 3);
        // And one buffer each again.
        for seq in 12..17 {
            let f = frame(seq, 64);
            SyntheticDriver::tx_buffer(&f, &mut buf);
            assert!(drv.tx.post(&drv.mem, Some(&buf)));
            want.push(f);
        }
        drv.tx.publish(&drv.mem);

        let got = peer_frames(&mut peer, want.len(), 10);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w);
        }
        let used = used(&mut drv, false, want.len() + bad.len(), 10);
        assert_eq!(used.len(), 10 + 2 + bad.len() + 5, "{used:?}");
        for b in bad {
            assert!(used.contains(&(b, 0)), "bad chain {b} returned: {used:?}");
        }
        // In order (negotiated): every chain comes back where it was made
        // available, bad ones included; the head outside the table names
        // no chain and is left out.
        let posted: Vec<u16> = (0..drv.tx.avail_idx)
            .map(|i| drv.tx.ring.avail_entry(i))
            .filter(|&h| h < 64)
            .collect();
        let returned: Vec<u16> = used.iter().map(|&(id, _)| id).collect();
        assert_eq!(returned, posted);
        let c = net.counters();
        assert_eq!(c.tx_frames.load(Ordering::Relaxed), want.len() as u64);
        assert_eq!(c.bad_chains.load(Ordering::Relaxed), bad.len() as u64);
        assert_eq!(c.bad_heads.load(Ordering::Relaxed), 1);
        assert_eq!(c.bad_avail_index.load(Ordering::Relaxed), 0);
        net.reset();
    }

    #[test]
    fn rx_frame_waits_for_enough_mergeable_buffers() {
        let (a, b, opts) = pipe("drvmerge");
        let dev_port = Port::open(&a, &opts).unwrap();
        let mut peer = Port::open(&b, &opts).unwrap();
        let mut drv = SyntheticDriver::new(16).unwrap();
        let mut net = Net::new([2, 0, 0, 0, 0, 1], dev_port);
        net.activate(drv.activation(F_VERSION_1 | F_RING_EVENT_IDX | F_IN_ORDER | F_MRG_RXBUF))
            .unwrap();
        let scratch = 0x1000 + 2 * DriverQueue::footprint(16);
        let small = |k: u64| (scratch + k * 0x400, 512u32, VIRTQ_DESC_F_WRITE);
        // A bad buffer first, then two good ones: not enough for the frame.
        let bad = drv
            .rx
            .post_chain(&[(scratch, 0, VIRTQ_DESC_F_WRITE)])
            .unwrap();
        let first = drv.rx.post_chain(&[small(1)]).unwrap();
        drv.rx.post_chain(&[small(2)]).unwrap();
        drv.rx.publish(&drv.mem);
        let f = frame(7, 1514);
        assert!(peer.tx_ring().send(&f));
        peer.txsync().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(drv.rx.reap_pending(&drv.mem), 0, "nothing half-delivered");
        // Two more: the frame takes three (1526 bytes with the header).
        drv.rx.post_chain(&[small(3)]).unwrap();
        drv.rx.post_chain(&[small(4)]).unwrap();
        drv.rx.publish(&drv.mem);
        let used = used(&mut drv, true, 4, 10);
        assert_eq!(used.len(), 4, "{used:?}");
        assert_eq!(used[0], (bad, 0));
        assert_eq!(used[1], (first, 512));
        assert_eq!(used[2].1 + used[3].1, 1526 - 512);
        // The three buffers, in order.
        let mut data = Vec::new();
        for (k, &(_, len)) in (1u64..).zip(&used[1..]) {
            let mut b = vec![0u8; len as usize];
            drv.mem
                .read_slice(&mut b, GuestAddress(scratch + k * 0x400))
                .unwrap();
            data.extend_from_slice(&b);
        }
        // num_buffers is 3; the rest of the header is zero.
        assert_eq!(&data[..HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0]);
        assert_eq!(&data[HDR_LEN..], &f[..]);
        let c = net.counters();
        assert_eq!(c.rx_frames.load(Ordering::Relaxed), 1);
        assert_eq!(c.bad_chains.load(Ordering::Relaxed), 1, "counted once");
        net.reset();
    }

    #[test]
    fn buffers_outside_the_largest_region_take_the_slow_path() {
        let (a, b, opts) = pipe("drvregions");
        let dev_port = Port::open(&a, &opts).unwrap();
        let mut peer = Port::open(&b, &opts).unwrap();
        // Rings and their buffers in the large region, more RAM in a small
        // one after a hole.
        let small = 0x1000_0000u64;
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x20_0000),
            (GuestAddress(small), 0x1_0000),
        ])
        .unwrap();
        let kick = || Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let per = DriverQueue::footprint(16);
        let mut drv = SyntheticDriver {
            rx: DriverQueue::new(&mem, 0x1000, 16, kick()).unwrap(),
            tx: DriverQueue::new(&mem, 0x1000 + per, 16, kick()).unwrap(),
            mem,
            interrupt: Arc::new(DriverInterrupt {
                evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                counts: Default::default(),
            }),
        };
        let mut net = Net::new([2, 0, 0, 0, 0, 1], dev_port);
        net.activate(drv.activation(F_VERSION_1 | F_RING_EVENT_IDX | F_MRG_RXBUF))
            .unwrap();
        // TX: alternately in each region.
        let mut want = Vec::new();
        let mut buf = Vec::new();
        for seq in 0..8u32 {
            let f = frame(seq, 100);
            SyntheticDriver::tx_buffer(&f, &mut buf);
            if seq % 2 == 0 {
                drv.tx.post(&drv.mem, Some(&buf));
            } else {
                let addr = small + u64::from(seq) * 0x400;
                put(&drv, addr, &buf);
                drv.tx.post_chain(&[(addr, buf.len() as u32, 0)]).unwrap();
            }
            want.push(f);
        }
        drv.tx.publish(&drv.mem);
        assert_eq!(peer_frames(&mut peer, 8, 10), want);
        // RX: likewise.
        for k in 0..8u64 {
            if k % 2 == 0 {
                drv.rx.post(&drv.mem, None);
            } else {
                let addr = small + 0x8000 + k * 0x400;
                drv.rx
                    .post_chain(&[(addr, 0x400, VIRTQ_DESC_F_WRITE)])
                    .unwrap();
            }
        }
        drv.rx.publish(&drv.mem);
        for seq in 0..8u32 {
            assert!(peer.tx_ring().send(&frame(seq, 200)));
        }
        peer.txsync().unwrap();
        let used = used(&mut drv, true, 8, 10);
        assert_eq!(used.len(), 8);
        for (seq, &(id, len)) in used.iter().enumerate() {
            assert_eq!(len as usize, HDR_LEN + 200);
            let addr = if seq % 2 == 0 {
                drv.rx.buf_addr_of(id)
            } else {
                small + 0x8000 + seq as u64 * 0x400
            };
            let mut data = vec![0u8; HDR_LEN + 200];
            drv.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
            assert_eq!(data[HDR_NUM_BUFFERS], 1);
            assert_eq!(&data[HDR_LEN..], &frame(seq as u32, 200)[..]);
        }
        assert_eq!(net.counters().guest_errors(), 0);
        net.reset();
    }

    /// A peer that corrupts buffer indices in the device's TX ring costs
    /// it those slots, not the guest's frames (nor the guest's counters).
    #[cfg(feature = "hostile-peer")]
    #[test]
    fn tx_skips_slots_whose_buffer_the_peer_corrupted() {
        use crate::netmap::shm::hostile::{Hostile, RingId};
        use crate::netmap::Slot;
        let (a, b, opts) = pipe("drvbadslot");
        let dev_port = Port::open(&a, &opts).unwrap();
        let mut peer = Port::open(&b, &opts).unwrap();
        {
            let h = Hostile::new(&peer).unwrap();
            for i in [0, 1, 2, 5] {
                let s = h.slot(RingId::PeerTx, i);
                h.set_slot(
                    RingId::PeerTx,
                    i,
                    Slot {
                        buf_idx: h.num_bufs() + 7,
                        ..s
                    },
                );
            }
        }
        let mut drv = SyntheticDriver::new(64).unwrap();
        let mut net = Net::new([2, 0, 0, 0, 0, 1], dev_port);
        net.activate(drv.activation(F_VERSION_1 | F_RING_EVENT_IDX))
            .unwrap();
        let mut buf = Vec::new();
        let want: Vec<Vec<u8>> = (0..20).map(|seq| frame(seq, 60 + seq as usize)).collect();
        for f in &want {
            SyntheticDriver::tx_buffer(f, &mut buf);
            assert!(drv.tx.post(&drv.mem, Some(&buf)));
        }
        drv.tx.publish(&drv.mem);
        // The empty frames the bad slots became are dropped by the sync.
        let got: Vec<Vec<u8>> = peer_frames(&mut peer, want.len(), 10)
            .into_iter()
            .filter(|f| !f.is_empty())
            .collect();
        assert_eq!(got, want);
        assert_eq!(used(&mut drv, false, want.len(), 10).len(), want.len());
        let c = net.counters();
        assert_eq!(c.tx_frames.load(Ordering::Relaxed), want.len() as u64);
        assert_eq!(c.guest_errors(), 0);
        net.reset();
    }

    #[test]
    fn need_event_matches_the_spec_examples() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(12, 10, 3));
        assert!(need_event(u16::MAX, 0, u16::MAX));
    }
}
