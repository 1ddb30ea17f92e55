//! A synthetic virtio-net driver: a host thread that plays the guest's
//! driver on real guest memory, with split rings, EVENT_IDX, kicks through
//! the queue eventfds and interrupts through an eventfd. It drives the real
//! device model without any guest CPU, for tests and for `nmvm bench`.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::net::HDR_LEN;
use super::{Activation, VirtioInterrupt};

/// Size of each driver buffer.
pub const BUF_SIZE: u64 = 2048;
const DESC_SIZE: u64 = 16;
const VIRTQ_DESC_F_WRITE: u16 = 2;

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

/// One split virtqueue as the driver sees it.
pub struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    bufs: u64,
    free: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    kicked_at: u16,
    /// Kicks sent.
    pub kicks: u64,
    kick: Arc<EventFd>,
}

/// `vring_need_event`: whether moving from `old` to `new` crosses `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl DriverQueue {
    /// Lays a queue of `size` entries out at `base` (needs
    /// `Self::footprint(size)` bytes) with one buffer per descriptor.
    pub fn new(base: u64, size: u16, kick: Arc<EventFd>) -> Self {
        let desc = base;
        let avail = desc + DESC_SIZE * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 4095) & !4095;
        let bufs = (used + 6 + 8 * u64::from(size) + 4095) & !4095;
        Self {
            size,
            desc,
            avail,
            used,
            bufs,
            free: (0..size).rev().collect(),
            avail_idx: 0,
            last_used: 0,
            kicked_at: 0,
            kicks: 0,
            kick,
        }
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
    /// full.
    pub fn post(&mut self, mem: &GuestMemoryMmap, data: Option<&[u8]>) -> bool {
        let Some(id) = self.free.pop() else {
            return false;
        };
        let addr = self.buf_addr(id);
        let (len, flags) = match data {
            Some(d) => {
                let n = d.len().min(BUF_SIZE as usize);
                mem.write_slice(&d[..n], GuestAddress(addr))
                    .expect("buffer in RAM");
                (n as u32, 0u16)
            }
            None => (BUF_SIZE as u32, VIRTQ_DESC_F_WRITE),
        };
        let d = self.desc + DESC_SIZE * u64::from(id);
        mem.write_obj(addr, GuestAddress(d)).expect("desc");
        mem.write_obj(len, GuestAddress(d + 8)).expect("desc");
        mem.write_obj(flags, GuestAddress(d + 12)).expect("desc");
        mem.write_obj(0u16, GuestAddress(d + 14)).expect("desc");
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(id, GuestAddress(slot)).expect("avail");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        true
    }

    /// Publishes posted buffers and kicks the device if it asked for it.
    pub fn publish(&mut self, mem: &GuestMemoryMmap) {
        fence(Ordering::Release);
        mem.store(
            self.avail_idx,
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )
        .expect("avail idx");
        fence(Ordering::SeqCst);
        let event: u16 = mem
            .load(
                GuestAddress(self.used + 4 + 8 * u64::from(self.size)),
                Ordering::Acquire,
            )
            .expect("avail_event");
        if need_event(event, self.avail_idx, self.kicked_at) {
            self.kicks += 1;
            let _ = self.kick.write(1);
        }
        self.kicked_at = self.avail_idx;
    }

    /// Asks for an interrupt once the device has used everything posted so
    /// far (or `ahead` entries from now).
    pub fn request_interrupt(&mut self, mem: &GuestMemoryMmap, ahead: u16) {
        let ev = self.last_used.wrapping_add(ahead).wrapping_sub(1);
        mem.store(
            ev,
            GuestAddress(self.avail + 4 + 2 * u64::from(self.size)),
            Ordering::Release,
        )
        .expect("used_event");
        fence(Ordering::SeqCst);
    }

    /// Takes the next used buffer: (descriptor, bytes written, buffer
    /// address).
    pub fn reap(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32, u64)> {
        let used_idx: u16 = mem
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .expect("used idx");
        if used_idx == self.last_used {
            return None;
        }
        let elem = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id: u32 = mem.read_obj(GuestAddress(elem)).expect("used elem");
        let len: u32 = mem.read_obj(GuestAddress(elem + 4)).expect("used elem");
        self.last_used = self.last_used.wrapping_add(1);
        let id = (id as u16) % self.size;
        self.free.push(id);
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
        let rx_kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let tx_kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok(Self {
            rx: DriverQueue::new(0x1000, size, rx_kick),
            tx: DriverQueue::new(0x1000 + per, size, tx_kick),
            mem,
            interrupt: Arc::new(DriverInterrupt {
                evt: EventFd::new(libc::EFD_NONBLOCK)?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netmap::{Port, PortOptions};
    use crate::virtio::net::{Net, F_MRG_RXBUF};
    use crate::virtio::{VirtioDevice, F_RING_EVENT_IDX, F_VERSION_1};
    use std::time::{Duration, Instant};

    fn pipe(name: &str) -> (String, String, PortOptions) {
        let dir = std::env::temp_dir().join(format!("nmvm-drv-{name}-{}", std::process::id()));
        let opts = PortOptions {
            run_dir: Some(dir),
            ..PortOptions::default()
        };
        (format!("shm:{name}{{0"), format!("shm:{name}}}0"), opts)
    }

    fn frame(seq: u32, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[0..6].fill(0xff);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14..18].copy_from_slice(&seq.to_le_bytes());
        for (i, b) in f.iter_mut().enumerate().skip(18) {
            *b = (seq as u8).wrapping_add(i as u8);
        }
        f
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

    #[test]
    fn need_event_matches_the_spec_examples() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(12, 10, 3));
        assert!(need_event(u16::MAX, 0, u16::MAX));
    }
}
