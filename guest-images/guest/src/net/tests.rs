//! The driver against a simulated virtio-net device: PCI config space, the modern common
//! configuration (which panics on any access of the wrong width), split rings in a byte
//! vector, a wire in each direction, and the device's handling of malformed chains.

use std::collections::VecDeque;

use super::*;
use crate::frame::{build_frame, check_pattern, gen_len, verify_frame, FrameError};
use crate::virtio::pci::tests::FakePci;
use crate::virtio::queue::tests::VecDma;

pub(crate) const BAR: u64 = 0xc000_0000;
pub(crate) const DMA_BASE: u64 = 0x20_0000;
pub(crate) const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub(crate) const ALL: u64 = WANTED_FEATURES | feature::NET_STATUS | feature::NET_CSUM;

#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct FakeQueue {
    max: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
    msix: u16,
    last_avail: u16,
    used_idx: u16,
    stopped: bool,
    starved: bool,
}

pub(crate) struct Fake {
    pub(crate) pci: FakePci,
    pub(crate) dma: VecDma,
    pub(crate) out: Vec<u8>,
    pub(crate) offered: u64,
    pub(crate) dfsel: u32,
    pub(crate) gfsel: u32,
    pub(crate) drv: u64,
    pub(crate) status: u8,
    pub(crate) qsel: u16,
    pub(crate) msix_config: u16,
    pub(crate) q: [FakeQueue; 2],
    pub(crate) refuse_features: bool,
    /// Also process the transmit queue without a notification (a device thread that polls).
    pub(crate) async_tx: bool,
    /// Never return transmit buffers.
    pub(crate) tx_dead: bool,
    pub(crate) rx_wire: VecDeque<Vec<u8>>,
    pub(crate) tx_wire: Vec<Vec<u8>>,
    /// Bytes the device puts in one receive buffer at most (forces merged frames).
    pub(crate) rx_chunk: usize,
    /// (queue, head, why) of every chain the device refused.
    pub(crate) bad_chains: Vec<(u16, u32, &'static str)>,
    pub(crate) notifies: [u32; 2],
    /// MSI-X table page offsets the driver wrote.
    pub(crate) msix_writes: Vec<u64>,
    pub(crate) resets: u32,
    pub(crate) now: u64,
}

impl Fake {
    pub(crate) fn new(offered: u64, qmax: u16) -> Self {
        let q = FakeQueue {
            max: qmax,
            size: qmax,
            msix: 0xffff,
            ..FakeQueue::default()
        };
        Fake {
            pci: FakePci::new(BAR, 0x8000),
            dma: VecDma::new(DMA_BASE, DMA_SIZE),
            out: Vec::new(),
            offered,
            dfsel: 0,
            gfsel: 0,
            drv: 0,
            status: 0,
            qsel: 0,
            msix_config: 0xffff,
            q: [q; 2],
            refuse_features: false,
            async_tx: false,
            tx_dead: false,
            rx_wire: VecDeque::new(),
            tx_wire: Vec::new(),
            rx_chunk: BUF_SIZE,
            bad_chains: Vec::new(),
            notifies: [0; 2],
            msix_writes: Vec::new(),
            resets: 0,
            now: 0,
        }
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.out.clone()).unwrap()
    }

    fn event_idx(&self) -> bool {
        self.drv & feature::RING_EVENT_IDX != 0
    }

    fn ready(&self, i: usize) -> bool {
        self.status & status::DRIVER_OK != 0
            && self.status & status::DEVICE_NEEDS_RESET == 0
            && self.q[i].enabled
            && !self.q[i].stopped
    }

    fn rd(&self, addr: u64, len: usize) -> u64 {
        self.dma.rd(addr, len)
    }

    fn wr(&mut self, addr: u64, len: usize, v: u64) {
        self.dma.wr(addr, len, v)
    }

    fn reset(&mut self) {
        self.status = 0;
        self.drv = 0;
        self.resets += 1;
        for q in &mut self.q {
            *q = FakeQueue {
                max: q.max,
                size: q.max,
                msix: 0xffff,
                ..FakeQueue::default()
            };
        }
    }

    fn push_used(&mut self, i: usize, head: u32, len: u32) {
        let q = self.q[i];
        let e = q.used + 4 + 8 * u64::from(q.used_idx % q.size);
        self.wr(e, 4, head.into());
        self.wr(e + 4, 4, len.into());
        self.q[i].used_idx = q.used_idx.wrapping_add(1);
    }

    fn publish_used(&mut self, i: usize) {
        let q = self.q[i];
        self.wr(q.used + 2, 2, q.used_idx.into());
    }

    fn set_avail_event(&mut self, i: usize, v: u16) {
        if self.event_idx() {
            let q = self.q[i];
            self.wr(q.used + 4 + 8 * u64::from(q.size), 2, v.into());
        }
    }

    /// Checks the avail index; a jump of more than a queue's worth breaks the device.
    fn avail_idx(&mut self, i: usize) -> Option<u16> {
        let q = self.q[i];
        let idx = self.rd(q.avail + 2, 2) as u16;
        if idx.wrapping_sub(q.last_avail) > q.size {
            self.status |= status::DEVICE_NEEDS_RESET;
            self.q[i].stopped = true;
            return None;
        }
        Some(idx)
    }

    /// Reads a transmit chain, or says why it is malformed.
    fn walk(&self, q: &FakeQueue, head: u16) -> Result<Vec<u8>, &'static str> {
        if head >= q.size {
            return Err("head out of range");
        }
        let mut out = Vec::new();
        let mut i = head;
        for _ in 0..q.size {
            let d = q.desc + 16 * u64::from(i);
            let (addr, len) = (self.rd(d, 8), self.rd(d + 8, 4) as usize);
            let (flags, next) = (self.rd(d + 12, 2) as u16, self.rd(d + 14, 2) as u16);
            if len == 0 {
                return Err("zero length");
            }
            let Some(r) = self.dma.range(addr, len) else {
                return Err("bad address");
            };
            assert_eq!(
                flags & DESC_F_WRITE,
                0,
                "device-writable transmit descriptor"
            );
            out.extend_from_slice(&self.dma.mem[r]);
            if flags & DESC_F_NEXT == 0 {
                return Ok(out);
            }
            if next >= q.size {
                return Err("next out of range");
            }
            i = next;
        }
        Err("chain too long (loop)")
    }

    fn process_tx(&mut self) {
        if !self.ready(1) || self.tx_dead {
            return;
        }
        let Some(idx) = self.avail_idx(1) else {
            return;
        };
        while self.q[1].last_avail != idx {
            let q = self.q[1];
            let head = self.rd(q.avail + 4 + 2 * u64::from(q.last_avail % q.size), 2) as u16;
            self.q[1].last_avail = q.last_avail.wrapping_add(1);
            match self.walk(&q, head) {
                Ok(bytes) => {
                    assert!(bytes.len() >= VNET_HDR_LEN + 14, "short transmit chain");
                    assert!(
                        bytes[..VNET_HDR_LEN].iter().all(|b| *b == 0),
                        "virtio-net header not zeroed"
                    );
                    self.tx_wire.push(bytes[VNET_HDR_LEN..].to_vec());
                }
                Err(why) => self.bad_chains.push((1, head.into(), why)),
            }
            self.push_used(1, head.into(), 0);
        }
        self.publish_used(1);
        self.set_avail_event(1, idx);
    }

    fn process_rx(&mut self) {
        if !self.ready(0) || self.q[0].starved {
            return;
        }
        let mrg = self.drv & feature::NET_MRG_RXBUF != 0;
        while let Some(frame) = self.rx_wire.front().cloned() {
            let Some(idx) = self.avail_idx(0) else {
                return;
            };
            let q = self.q[0];
            let mut data = vec![0u8; VNET_HDR_LEN];
            data.extend_from_slice(&frame);
            let chunk = if mrg { self.rx_chunk } else { usize::MAX };
            let (mut last, mut off) = (q.last_avail, 0);
            let mut pieces = Vec::new();
            let mut bad = Vec::new();
            while off < data.len() {
                if last == idx {
                    // Not enough buffers: wait for the driver to post more and notify.
                    self.q[0].starved = true;
                    self.set_avail_event(0, idx);
                    return;
                }
                let head = self.rd(q.avail + 4 + 2 * u64::from(last % q.size), 2) as u16;
                last = last.wrapping_add(1);
                assert!(head < q.size, "receive head out of range");
                let d = q.desc + 16 * u64::from(head);
                let (addr, len) = (self.rd(d, 8), self.rd(d + 8, 4) as usize);
                let flags = self.rd(d + 12, 2) as u16;
                assert_eq!(flags, DESC_F_WRITE, "receive descriptor flags");
                if len == 0 || self.dma.range(addr, len).is_none() {
                    bad.push(head);
                    continue;
                }
                let n = len.min(chunk).min(data.len() - off);
                assert!(
                    mrg || n == data.len(),
                    "receive buffer too small without MRG_RXBUF"
                );
                pieces.push((head, addr, off, n));
                off += n;
            }
            for head in bad {
                self.bad_chains.push((0, head.into(), "bad address"));
                self.push_used(0, head.into(), 0);
            }
            data[10..12].copy_from_slice(&(pieces.len() as u16).to_le_bytes());
            for &(head, addr, off, n) in &pieces {
                let r = self.dma.range(addr, n).unwrap();
                self.dma.mem[r].copy_from_slice(&data[off..off + n]);
                self.push_used(0, head.into(), n as u32);
            }
            self.q[0].last_avail = last;
            self.publish_used(0);
            self.rx_wire.pop_front();
        }
    }

    fn common_read(&mut self, off: u64, width: usize) -> u32 {
        let qs = usize::from(self.qsel);
        let q = self.q.get(qs).copied().unwrap_or_default();
        match (off, width) {
            (0x00, 4) => self.dfsel,
            (0x04, 4) => match self.dfsel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            (0x08, 4) => self.gfsel,
            (0x10, 2) => self.msix_config.into(),
            (0x12, 2) => 2,
            (0x14, 1) => self.status.into(),
            (0x15, 1) => 0,
            (0x16, 2) => self.qsel.into(),
            (0x18, 2) => q.size.into(),
            (0x1a, 2) => q.msix.into(),
            (0x1c, 2) => q.enabled.into(),
            (0x1e, 2) => self.qsel.into(),
            _ => panic!("common config read at {off:#x}, {width} bytes"),
        }
    }

    fn common_write(&mut self, off: u64, width: usize, v: u32) {
        let qs = usize::from(self.qsel);
        match (off, width) {
            (0x00, 4) => self.dfsel = v,
            (0x08, 4) => self.gfsel = v,
            (0x0c, 4) => match self.gfsel {
                0 => self.drv = (self.drv & !0xffff_ffff) | u64::from(v),
                1 => self.drv = (self.drv & 0xffff_ffff) | u64::from(v) << 32,
                _ => assert_eq!(v, 0),
            },
            (0x10, 2) => self.msix_config = v as u16,
            (0x14, 1) => {
                let new = v as u8;
                if new == 0 {
                    self.reset();
                    return;
                }
                let old = self.status;
                let mut s = new | (old & status::DEVICE_NEEDS_RESET);
                if new & status::FEATURES_OK != 0
                    && old & status::FEATURES_OK == 0
                    && (self.refuse_features
                        || self.drv & !self.offered != 0
                        || self.drv & feature::VERSION_1 == 0)
                {
                    s &= !status::FEATURES_OK;
                }
                if new & status::DRIVER_OK != 0 {
                    assert_ne!(old & status::FEATURES_OK, 0, "DRIVER_OK before FEATURES_OK");
                }
                self.status = s;
            }
            (0x16, 2) => self.qsel = v as u16,
            (0x18, 2) => {
                let q = &mut self.q[qs];
                assert!(!q.enabled, "queue size written while enabled");
                assert!(
                    v as u16 <= q.max && (v as u16).is_power_of_two(),
                    "queue size {v}"
                );
                q.size = v as u16;
            }
            (0x1a, 2) => self.q[qs].msix = v as u16,
            (0x1c, 2) => {
                assert_eq!(v, 1);
                self.q[qs].enabled = true;
            }
            (0x20..=0x37, 4) => {
                let q = &mut self.q[qs];
                let field = match off & !7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.avail,
                    _ => &mut q.used,
                };
                if off & 4 == 0 {
                    *field = (*field & !0xffff_ffff) | u64::from(v);
                } else {
                    *field = (*field & 0xffff_ffff) | u64::from(v) << 32;
                }
            }
            _ => panic!("common config write at {off:#x}, {width} bytes"),
        }
    }

    pub(crate) fn mmio_read(&mut self, addr: u64, width: usize) -> u32 {
        match addr.checked_sub(BAR) {
            Some(off @ 0..=0xfff) => self.common_read(off, width),
            Some(0x1000) if width == 1 => 0,
            Some(off @ 0x2000..=0x2007) if width == 1 => match off - 0x2000 {
                k @ 0..=5 => MAC[k as usize].into(),
                6 => 1,
                _ => 0,
            },
            _ => panic!("MMIO read at {addr:#x}, {width} bytes"),
        }
    }

    pub(crate) fn mmio_write(&mut self, addr: u64, width: usize, v: u32) {
        match addr.checked_sub(BAR) {
            Some(off @ 0..=0xfff) => self.common_write(off, width, v),
            Some(off @ 0x3000..=0x3fff) if width == 2 => {
                let q = (off - 0x3000) / 4;
                assert_eq!(u64::from(v), q, "notify value is not the queue index");
                assert_ne!(
                    self.status & status::DRIVER_OK,
                    0,
                    "notify before DRIVER_OK"
                );
                self.notifies[q as usize] += 1;
                if q == 0 {
                    self.q[0].starved = false;
                    self.process_rx();
                } else {
                    self.process_tx();
                }
            }
            // The MSI-X table page: only `net=hostile` writes there, past
            // the table, which a device must ignore.
            Some(off @ 0x4000..=0x4fff) if width == 4 => self.msix_writes.push(off),
            _ => panic!("MMIO write at {addr:#x}, {width} bytes"),
        }
    }
}

impl Sink for Fake {
    fn write(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }
}

impl PciConfig for Fake {
    fn pci_read32(&mut self, dev: u8, reg: u8) -> u32 {
        self.pci.pci_read32(dev, reg)
    }
    fn pci_write32(&mut self, dev: u8, reg: u8, val: u32) {
        self.pci.pci_write32(dev, reg, val)
    }
    fn pci_write16(&mut self, dev: u8, reg: u8, val: u16) {
        self.pci.pci_write16(dev, reg, val)
    }
}

impl Mmio for Fake {
    fn mmio_read8(&mut self, addr: u64) -> u8 {
        self.mmio_read(addr, 1) as u8
    }
    fn mmio_read16(&mut self, addr: u64) -> u16 {
        self.mmio_read(addr, 2) as u16
    }
    fn mmio_read32(&mut self, addr: u64) -> u32 {
        self.mmio_read(addr, 4)
    }
    fn mmio_write8(&mut self, addr: u64, val: u8) {
        self.mmio_write(addr, 1, val.into())
    }
    fn mmio_write16(&mut self, addr: u64, val: u16) {
        self.mmio_write(addr, 2, val.into())
    }
    fn mmio_write32(&mut self, addr: u64, val: u32) {
        self.mmio_write(addr, 4, val)
    }
}

impl Dma for Fake {
    fn dma_read16(&self, addr: u64) -> u16 {
        self.dma.dma_read16(addr)
    }
    fn dma_read32(&self, addr: u64) -> u32 {
        self.dma.dma_read32(addr)
    }
    fn dma_write16(&mut self, addr: u64, val: u16) {
        self.dma.dma_write16(addr, val)
    }
    fn dma_write32(&mut self, addr: u64, val: u32) {
        self.dma.dma_write32(addr, val)
    }
    fn dma_write64(&mut self, addr: u64, val: u64) {
        self.dma.dma_write64(addr, val)
    }
    fn dma_bytes(&mut self, addr: u64, len: usize) -> &mut [u8] {
        self.dma.dma_bytes(addr, len)
    }
    fn dma_copy(&mut self, src: u64, dst: u64, len: usize) {
        self.dma.dma_copy(src, dst, len)
    }
    fn full_barrier(&self) {}
}

impl Hw for Fake {
    fn relax(&mut self) {
        self.process_rx();
        if self.async_tx {
            self.process_tx();
        }
    }
    fn ticks(&mut self) -> u64 {
        self.now += 1;
        self.now
    }
    fn ticks_per_sec(&self) -> u64 {
        1000
    }
    fn dma_area(&self) -> (u64, usize) {
        (DMA_BASE, self.dma.mem.len())
    }
}

fn gen_len_cfg(min: u16, max: u16) -> FrameLen {
    FrameLen { min, max }
}

pub(crate) fn test_frame(mac: [u8; 6], len: usize, seq: u64) -> Vec<u8> {
    let mut f = vec![0u8; len];
    assert!(build_frame(&mut f, mac, len, seq));
    f
}

fn check_gen_output(fake: &Fake, count: u64, len: FrameLen) {
    assert_eq!(fake.tx_wire.len() as u64, count);
    for (seq, f) in fake.tx_wire.iter().enumerate() {
        let seq = seq as u64;
        assert_eq!(
            f.len(),
            gen_len(seq, len.min, len.max),
            "length of frame {seq}"
        );
        assert_eq!(verify_frame(f), Ok(seq), "frame {seq}");
        assert!(check_pattern(f, seq), "pattern of frame {seq}");
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(
            f,
            &test_frame(MAC, f.len(), seq),
            "frame {seq} differs from the reference"
        );
    }
}

#[test]
fn gen_fixed_length_with_event_idx() {
    let mut fake = Fake::new(ALL, 256);
    let c = run(&mut fake, NetMode::Gen, None, FrameLen::default()).unwrap();
    assert_eq!(
        c,
        Counters {
            rx: 0,
            tx: 1000,
            bad: 0
        }
    );
    check_gen_output(&fake, 1000, FrameLen::default());
    let features = WANTED_FEATURES;
    assert!(fake.text().contains(&format!(
        "nmvm-guest: virtio-net 52:54:00:12:34:56 features {features:#x}\n"
    )));
    assert_eq!(fake.drv, WANTED_FEATURES);
    // Batched: one notification per 32 frames at most, not one per frame.
    assert!(
        fake.notifies[1] <= 1000 / 32 + 2,
        "{} notifies",
        fake.notifies[1]
    );
    assert!(fake.notifies[1] >= 1000 / 256);
    assert!(fake.bad_chains.is_empty());
    // No interrupts asked for.
    assert_eq!(fake.q[0].msix, 0xffff);
    assert_eq!(fake.q[1].msix, 0xffff);
    assert_eq!(fake.msix_config, 0xffff);
    let mut out = Vec::new();
    write_counters(&mut VecOut(&mut out), NetMode::Gen, &c);
    assert_eq!(out, b"nmvm-guest: net gen: rx 0 tx 1000 bad 0\n");
}

pub(crate) struct VecOut<'a>(pub(crate) &'a mut Vec<u8>);
impl Sink for VecOut<'_> {
    fn write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
}

#[test]
fn gen_length_range_reuses_buffers() {
    let mut fake = Fake::new(ALL, 256);
    let len = gen_len_cfg(60, 1514);
    let c = run(&mut fake, NetMode::Gen, Some(700), len).unwrap();
    assert_eq!(c.tx, 700);
    check_gen_output(&fake, 700, len);
}

#[test]
fn gen_small_queue_without_event_idx() {
    let offered = feature::VERSION_1 | feature::NET_MAC;
    let mut fake = Fake::new(offered, 8);
    let len = gen_len_cfg(60, 200);
    let c = run(&mut fake, NetMode::Gen, Some(600), len).unwrap();
    assert_eq!(c.tx, 600);
    check_gen_output(&fake, 600, len);
    assert_eq!(fake.drv, offered);
}

#[test]
fn gen_with_polling_device_and_odd_queue_size() {
    let mut fake = Fake::new(ALL, 128);
    fake.async_tx = true;
    let c = run(&mut fake, NetMode::Gen, Some(300), gen_len_cfg(61, 1513)).unwrap();
    assert_eq!(c.tx, 300);
    check_gen_output(&fake, 300, gen_len_cfg(61, 1513));
    assert_eq!(fake.q[1].size, 128);
}

#[test]
fn gen_zero_frames() {
    let mut fake = Fake::new(ALL, 256);
    let c = run(&mut fake, NetMode::Gen, Some(0), FrameLen::default()).unwrap();
    assert_eq!(c, Counters::default());
}

#[test]
fn gen_gives_up_when_device_keeps_buffers() {
    let mut fake = Fake::new(ALL, 16);
    fake.tx_dead = true;
    let e = run(&mut fake, NetMode::Gen, Some(100), FrameLen::default()).unwrap_err();
    assert_eq!(e.what, "gen: transmit queue stuck, device status");
    assert_eq!(e.value, Some(0x0f));
}

pub(crate) fn swapped(f: &[u8]) -> Vec<u8> {
    let mut s = f.to_vec();
    s[..6].copy_from_slice(&f[6..12]);
    s[6..12].copy_from_slice(&f[..6]);
    s
}

pub(crate) fn wire_frames(n: usize) -> Vec<Vec<u8>> {
    let peer = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
    (0..n)
        .map(|i| {
            if i % 10 == 9 {
                // Not a test frame at all: echo must not care.
                let mut f = vec![0x5a; 14 + i % 50];
                f[..6].copy_from_slice(&MAC);
                f[6..12].copy_from_slice(&peer);
                f
            } else {
                let mut f = test_frame(peer, gen_len(i as u64, 60, 1514), i as u64);
                f[..6].copy_from_slice(&MAC);
                f
            }
        })
        .collect()
}

fn echo_case(offered: u64, qmax: u16, chunk: usize) {
    let mut fake = Fake::new(offered, qmax);
    fake.rx_chunk = chunk;
    let frames = wire_frames(300);
    fake.rx_wire.extend(frames.iter().cloned());
    let c = run(&mut fake, NetMode::Echo, Some(300), FrameLen::default()).unwrap();
    assert_eq!(
        c,
        Counters {
            rx: 300,
            tx: 300,
            bad: 0
        }
    );
    assert_eq!(fake.tx_wire.len(), 300);
    for (i, (sent, got)) in frames.iter().zip(&fake.tx_wire).enumerate() {
        assert_eq!(got, &swapped(sent), "frame {i}");
    }
    assert!(fake.bad_chains.is_empty());
}

#[test]
fn echo_swaps_macs() {
    echo_case(ALL, 256, BUF_SIZE);
}

#[test]
fn echo_merged_receive_buffers() {
    // Frames of more than 500 bytes arrive in several buffers.
    echo_case(ALL, 256, 500);
    echo_case(ALL, 16, 100);
}

#[test]
fn echo_without_mrg_or_event_idx() {
    echo_case(feature::VERSION_1 | feature::NET_MAC, 32, BUF_SIZE);
}

#[test]
fn echo_stops_at_count() {
    let mut fake = Fake::new(ALL, 256);
    fake.rx_wire.extend(wire_frames(50));
    let c = run(&mut fake, NetMode::Echo, Some(20), FrameLen::default()).unwrap();
    assert_eq!(c.tx, 20);
    assert_eq!(fake.tx_wire.len(), 20);
}

#[test]
fn sink_verifies_and_counts() {
    let mut fake = Fake::new(ALL, 64);
    fake.rx_chunk = 700;
    let mut frames: Vec<Vec<u8>> = (0..200u64)
        .map(|i| test_frame([2, 0, 0, 0, 0, 9], gen_len(i, 60, 1514), i))
        .collect();
    frames[10][100] ^= 1; // payload: UDP checksum
    frames[20][16] ^= 1; // IPv4 length
    frames[30][24] ^= 0x80; // IPv4 checksum
    frames[40].truncate(50); // short
    frames[50][13] = 0xdd; // not IPv4
    fake.rx_wire.extend(frames.iter().cloned());
    let c = run(&mut fake, NetMode::Sink, Some(200), FrameLen::default()).unwrap();
    assert_eq!(
        c,
        Counters {
            rx: 200,
            tx: 0,
            bad: 5
        }
    );
    // More frames than the count: the rest stay unreceived.
    let mut fake = Fake::new(ALL, 4);
    fake.rx_wire.extend(frames[..100].iter().cloned());
    let c = run(&mut fake, NetMode::Sink, Some(30), FrameLen::default()).unwrap();
    assert_eq!(c.rx, 30);
    assert!(fake.rx_wire.len() >= 60);
    // A 4-entry receive queue only works if the driver notifies after reposting.
    assert!(fake.notifies[0] > 5);
}

#[test]
fn hostile_sequence() {
    let mut fake = Fake::new(ALL, 256);
    fake.rx_wire
        .push_back(test_frame([2, 0, 0, 0, 0, 9], 60, 77));
    let c = run(&mut fake, NetMode::Hostile, None, FrameLen::default()).unwrap();
    let text = fake.text();
    for line in [
        "nmvm-guest: hostile: address beyond RAM: used len 0\n",
        "nmvm-guest: hostile: descriptor loop: used len 0\n",
        "nmvm-guest: hostile: zero-length descriptor: used len 0\n",
        "nmvm-guest: hostile: next index out of range: used len 0\n",
        "nmvm-guest: hostile: head index out of range: used len 0\n",
        "nmvm-guest: hostile: rx bad address: used len 0\n",
        "nmvm-guest: hostile: device needs reset, status 0x4f\n",
        "nmvm-guest: hostile: device recovered\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert_eq!(
        c,
        Counters {
            rx: 1,
            tx: 2,
            bad: 6
        }
    );
    // Two writes past the 3-entry MSI-X table (0x30 bytes).
    assert!(text.contains("nmvm-guest: hostile: wrote past the MSI-X table\n"));
    assert_eq!(fake.msix_writes, vec![0x4030, 0x413c]);
    let whys: Vec<&str> = fake.bad_chains.iter().map(|b| b.2).collect();
    assert_eq!(
        whys,
        [
            "bad address",
            "bad address",
            "chain too long (loop)",
            "zero length",
            "next out of range",
            "head out of range"
        ]
    );
    assert_eq!(fake.bad_chains[5], (1, 256, "head out of range"));
    assert_eq!(fake.tx_wire.len(), 2);
    assert_eq!(verify_frame(&fake.tx_wire[0]), Ok(0));
    assert_eq!(verify_frame(&fake.tx_wire[1]), Ok(1));
    assert_eq!(fake.tx_wire[1].len(), 60);
    // Reset at start, and again for the recovery.
    assert_eq!(fake.resets, 2);
    assert_eq!(fake.status, 0x0f);
}

#[test]
fn hostile_fails_clearly_without_needs_reset() {
    // A device that never reports DEVICE_NEEDS_RESET (the status bit is hidden on reads).
    let fake = Fake::new(ALL, 256);
    struct NoReset(Fake);
    impl Sink for NoReset {
        fn write(&mut self, b: &[u8]) {
            Sink::write(&mut self.0, b)
        }
    }
    impl PciConfig for NoReset {
        fn pci_read32(&mut self, d: u8, r: u8) -> u32 {
            self.0.pci_read32(d, r)
        }
        fn pci_write32(&mut self, d: u8, r: u8, v: u32) {
            self.0.pci_write32(d, r, v)
        }
        fn pci_write16(&mut self, d: u8, r: u8, v: u16) {
            self.0.pci_write16(d, r, v)
        }
    }
    impl Mmio for NoReset {
        fn mmio_read8(&mut self, a: u64) -> u8 {
            let v = self.0.mmio_read8(a);
            if a == BAR + 0x14 {
                v & !status::DEVICE_NEEDS_RESET
            } else {
                v
            }
        }
        fn mmio_read16(&mut self, a: u64) -> u16 {
            self.0.mmio_read16(a)
        }
        fn mmio_read32(&mut self, a: u64) -> u32 {
            self.0.mmio_read32(a)
        }
        fn mmio_write8(&mut self, a: u64, v: u8) {
            self.0.mmio_write8(a, v)
        }
        fn mmio_write16(&mut self, a: u64, v: u16) {
            self.0.mmio_write16(a, v)
        }
        fn mmio_write32(&mut self, a: u64, v: u32) {
            self.0.mmio_write32(a, v)
        }
    }
    impl Dma for NoReset {
        fn dma_read16(&self, a: u64) -> u16 {
            self.0.dma_read16(a)
        }
        fn dma_read32(&self, a: u64) -> u32 {
            self.0.dma_read32(a)
        }
        fn dma_write16(&mut self, a: u64, v: u16) {
            self.0.dma_write16(a, v)
        }
        fn dma_write32(&mut self, a: u64, v: u32) {
            self.0.dma_write32(a, v)
        }
        fn dma_write64(&mut self, a: u64, v: u64) {
            self.0.dma_write64(a, v)
        }
        fn dma_bytes(&mut self, a: u64, l: usize) -> &mut [u8] {
            self.0.dma_bytes(a, l)
        }
        fn dma_copy(&mut self, s: u64, d: u64, l: usize) {
            self.0.dma_copy(s, d, l)
        }
        fn full_barrier(&self) {}
    }
    impl Hw for NoReset {
        fn relax(&mut self) {
            self.0.relax()
        }
        fn ticks(&mut self) -> u64 {
            self.0.ticks()
        }
        fn ticks_per_sec(&self) -> u64 {
            self.0.ticks_per_sec()
        }
        fn dma_area(&self) -> (u64, usize) {
            self.0.dma_area()
        }
    }
    let mut hw = NoReset(fake);
    let e = run(&mut hw, NetMode::Hostile, None, FrameLen::default()).unwrap_err();
    assert_eq!(
        e.what,
        "hostile: device did not set DEVICE_NEEDS_RESET, status"
    );
    assert_eq!(e.value, Some(0x0f));
}

#[test]
fn init_errors() {
    let mut fake = Fake::new(ALL, 256);
    fake.pci.cfg[2] = 0x42;
    let e = run(&mut fake, NetMode::Gen, None, FrameLen::default()).unwrap_err();
    assert_eq!(e, Error::new("no virtio-net device found"));

    let mut fake = Fake::new(ALL & !feature::VERSION_1, 256);
    let e = run(&mut fake, NetMode::Gen, None, FrameLen::default()).unwrap_err();
    assert_eq!(e.what, "device does not offer VERSION_1, features");
    assert_ne!(fake.status & status::FAILED, 0);

    let mut fake = Fake::new(ALL, 256);
    fake.refuse_features = true;
    let e = run(&mut fake, NetMode::Gen, None, FrameLen::default()).unwrap_err();
    assert_eq!(e.what, "device refused FEATURES_OK, features");
    assert_ne!(fake.status & status::FAILED, 0);

    let mut fake = Fake::new(ALL, 0);
    let e = run(&mut fake, NetMode::Gen, None, FrameLen::default()).unwrap_err();
    assert_eq!(e, Error::with("queue not available", 0));

    let mut out = Vec::new();
    e.write(&mut VecOut(&mut out));
    assert_eq!(out, b"nmvm-guest: virtio: queue not available 0x0\n");
}

#[test]
fn no_mac_feature_uses_default() {
    let mut fake = Fake::new(feature::VERSION_1, 16);
    run(&mut fake, NetMode::Gen, Some(3), FrameLen::default()).unwrap();
    assert!(fake
        .text()
        .contains("virtio-net 02:00:00:00:00:01 features 0x100000000\n"));
    assert_eq!(&fake.tx_wire[0][6..12], &DEFAULT_MAC);
}

#[test]
fn frame_errors_are_named() {
    assert_eq!(FrameError::UdpChecksum.as_str(), "bad UDP checksum");
}
