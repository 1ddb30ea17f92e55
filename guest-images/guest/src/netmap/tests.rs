//! The netmap path against a simulated nmvm: the virtio fake of `net::tests` for PCI, the
//! common configuration and the notifications, plus the passthrough configuration fields, a
//! netmap region in a byte vector (a `netmap_if`, its rings and a buffer pool) and a host side
//! that does what nmvm's device worker and a `shm:` pipe peer do: it validates what the guest
//! publishes in the CSB, moves frames out of the tx ring by swapping buffers with a free pool
//! (whose buffers it scribbles over, as a peer may), fills the rx ring from a wire, and
//! publishes `hwcur`/`hwtail`/`host_need_kick`.

use std::collections::VecDeque;

use super::*;
use crate::frame::{build_frame, gen_len};
use crate::net::tests::{swapped, test_frame, wire_frames, Fake, VecOut, ALL, MAC};
use crate::virtio::queue::tests::VecDma;
use crate::virtio::{Dma, Mmio, PciConfig};

const REGION_BASE: u64 = 0xd000_0000;
const RINGS_OFS: u64 = 0x2000;
/// Device configuration in BAR0 (the fake's device cfg capability).
const DEV_CFG: u64 = crate::net::tests::BAR + 0x2000;
/// What the host writes into the virtio-net header of received frames (the guest must zero
/// it before echoing).
const RX_HDR_BYTE: u8 = 0xaa;
/// What the host leaves in a buffer it takes back (a peer may leave anything).
const SCRIBBLE: u8 = 0x5a;

/// The region's geometry.
#[derive(Clone, Copy, Debug)]
struct Layout {
    n: u32,
    buf_size: u32,
    hdr: u32,
    ni_tx: u32,
    ni_host_tx: u32,
    ni_rx: u32,
    ni_host_rx: u32,
    /// `tx_rings`/`rx_rings` in the configuration.
    cfg_tx: u32,
    cfg_rx: u32,
    nifp_offset: u32,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            n: 1024,
            buf_size: 2048,
            hdr: 0,
            ni_tx: 1,
            ni_host_tx: 0,
            ni_rx: 1,
            ni_host_rx: 0,
            cfg_tx: 1,
            cfg_rx: 1,
            nifp_offset: 0x1000,
        }
    }
}

impl Layout {
    fn rings(&self) -> u32 {
        self.ni_tx + self.ni_host_tx + self.ni_rx + self.ni_host_rx
    }
    fn ring_bytes(&self) -> u64 {
        (256 + 16 * u64::from(self.n)).next_multiple_of(128)
    }
    fn ring_addr(&self, k: u32) -> u64 {
        REGION_BASE + RINGS_OFS + u64::from(k) * self.ring_bytes()
    }
    fn pool(&self) -> u64 {
        (self.ring_addr(self.rings()) - REGION_BASE).next_multiple_of(4096)
    }
    /// Reserved 0 and 1, one buffer per slot, and a free pool of two rings' worth.
    fn nbufs(&self) -> u32 {
        2 + (self.rings() + 2) * self.n
    }
    fn size(&self) -> u64 {
        self.pool() + u64::from(self.nbufs()) * u64::from(self.buf_size)
    }
    fn nifp(&self) -> u64 {
        REGION_BASE + u64::from(self.nifp_offset)
    }
    /// Index of rx ring 0 in `ring_ofs[]`.
    fn rx0(&self) -> u32 {
        self.ni_tx + self.ni_host_tx
    }
}

/// When the host side runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HostMode {
    /// Sleeps (`host_need_kick` 1): the tx ring moves on a tx notification, or when the peer
    /// makes room for frames the host already holds; received frames arrive (peer-driven)
    /// whenever the guest idles.
    Sleepy,
    /// Polls (`host_need_kick` 0): both rings move whenever the guest idles.
    Polling,
}

/// What the host does with `control = 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Starts {
    /// After this many reads of `control`.
    After(u32),
    Refuses,
    Never,
}

struct Host {
    lay: Layout,
    mode: HostMode,
    starts: Starts,
    control_reads: u32,
    control: u32,
    csb_lo: u32,
    csb_hi: u32,
    csb: u64,
    /// Next tx slot to take; `hwtail` is the slot before it.
    tx_hwcur: u32,
    /// The guest's last valid tx `head` (published as `hwcur`, as nmvm does).
    tx_head: u32,
    rx_head: u32,
    rx_tail: u32,
    /// Frames the peer accepts per sync (`usize::MAX`: all).
    tx_room: usize,
    /// Never looks at the tx ring after the start.
    tx_dead: bool,
    /// Publishes this tx `hwtail` instead of the real one.
    bad_hwtail: Option<u32>,
    /// Corrupts the buffer index of the first received frame's slot after filling it.
    rx_bad_buf: bool,
    /// Leaves NS_MOREFRAG on the last slot of every received frame.
    rx_unterminated: bool,
    free: VecDeque<u32>,
    rx_wire: VecDeque<Vec<u8>>,
    tx_wire: Vec<Vec<u8>>,
    /// Buffer of each frame's first slot, as transmitted / as received.
    tx_bufs: Vec<u32>,
    rx_bufs: Vec<u32>,
    /// Flags of each transmitted frame's first slot.
    tx_flags: Vec<u16>,
    tx_hdr_not_zero: u32,
    bad_buf_idx: u32,
    bad_len: u32,
    bad_index: u32,
    /// Released rx slots whose buffer was not one of the pool's.
    bad_released: u32,
    syncs: u32,
    /// Idle iterations of the guest, to fail a test that would wait forever.
    relaxes: u64,
    /// Most rx slots the guest released at once.
    max_rx_release: u32,
}

/// More idle iterations than any test needs: the guest waits for something that never comes.
const RELAX_LIMIT: u64 = 2_000_000;

struct NmFake {
    v: Fake,
    region: VecDma,
    mapped: bool,
    refuse_map: bool,
    h: Host,
}

fn within(a: u32, x: u32, b: u32, n: u32) -> bool {
    nm_within(a, x, b, n)
}

fn prev(i: u32, n: u32) -> u32 {
    if i == 0 {
        n - 1
    } else {
        i - 1
    }
}

impl NmFake {
    fn new(lay: Layout, mode: HostMode) -> Self {
        let mut v = Fake::new(ALL | feature::NMVM_NETMAP, 256);
        v.pci.add_shared_memory(REGION_BASE, lay.size());
        let mut f = NmFake {
            v,
            region: VecDma::new(REGION_BASE, lay.size() as usize),
            mapped: false,
            refuse_map: false,
            h: Host {
                lay,
                mode,
                starts: Starts::After(0),
                control_reads: 0,
                control: 0,
                csb_lo: 0,
                csb_hi: 0,
                csb: 0,
                tx_hwcur: 0,
                tx_head: 0,
                rx_head: 0,
                rx_tail: 0,
                tx_room: usize::MAX,
                tx_dead: false,
                bad_hwtail: None,
                rx_bad_buf: false,
                rx_unterminated: false,
                free: VecDeque::new(),
                rx_wire: VecDeque::new(),
                tx_wire: Vec::new(),
                tx_bufs: Vec::new(),
                rx_bufs: Vec::new(),
                tx_flags: Vec::new(),
                tx_hdr_not_zero: 0,
                bad_buf_idx: 0,
                bad_len: 0,
                bad_index: 0,
                bad_released: 0,
                syncs: 0,
                relaxes: 0,
                max_rx_release: 0,
            },
        };
        f.build_region();
        f
    }

    fn build_region(&mut self) {
        let l = self.h.lay;
        let m = &mut self.region;
        let nifp = l.nifp();
        m.wr(nifp + 24, 4, l.ni_tx.into());
        m.wr(nifp + 28, 4, l.ni_rx.into());
        m.wr(nifp + 36, 4, l.ni_host_tx.into());
        m.wr(nifp + 40, 4, l.ni_host_rx.into());
        for k in 0..l.rings() {
            let ring = l.ring_addr(k);
            m.wr(nifp + 56 + 8 * u64::from(k), 8, ring.wrapping_sub(nifp));
            let tx = k < l.rx0();
            m.wr(ring, 8, (REGION_BASE + l.pool()).wrapping_sub(ring));
            m.wr(ring + 8, 4, l.n.into());
            m.wr(ring + 12, 4, l.buf_size.into());
            m.wr(ring + 28, 4, if tx { l.n - 1 } else { 0 }.into());
            for s in 0..l.n {
                m.wr(ring + 256 + 16 * u64::from(s), 4, (2 + k * l.n + s).into());
            }
        }
        self.h.free = (2 + l.rings() * l.n..l.nbufs()).collect();
    }

    fn text(&self) -> String {
        self.v.text()
    }

    /// Sets ring `k`'s `head` and `cur` (before the guest starts).
    fn set_ring_head(&mut self, k: u32, head: u32) {
        let ring = self.h.lay.ring_addr(k);
        self.region.wr(ring + 20, 4, head.into());
        self.region.wr(ring + 24, 4, head.into());
    }

    fn tx_ring(&self) -> u64 {
        self.h.lay.ring_addr(0)
    }
    fn rx_ring(&self) -> u64 {
        self.h.lay.ring_addr(self.h.lay.rx0())
    }
    fn slot(ring: u64, i: u32) -> u64 {
        ring + 256 + 16 * u64::from(i)
    }
    fn buf(&self, idx: u32) -> u64 {
        REGION_BASE + self.h.lay.pool() + u64::from(idx) * u64::from(self.h.lay.buf_size)
    }
    fn csb_rd(&self, entry: u32, off: u64) -> u32 {
        self.v.dma.rd(self.h.csb + 128 * u64::from(entry) + off, 4) as u32
    }
    fn csb_wr(&mut self, entry: u32, off: u64, v: u32) {
        let a = self.h.csb + 128 * u64::from(entry) + off;
        self.v.dma.wr(a, 4, v.into());
    }
    fn rx_entry(&self) -> u32 {
        self.h.lay.cfg_tx
    }

    fn config_read(&mut self, off: u64) -> u32 {
        let l = self.h.lay;
        match off {
            0x40 => MAGIC,
            0x44 => VERSION,
            0x48 => l.nifp_offset,
            0x4c => l.cfg_tx,
            0x50 => l.cfg_rx,
            0x54 | 0x58 => l.n,
            0x5c => l.buf_size,
            0x60 => l.hdr,
            0x64 => l.size() as u32,
            0x68 => (l.size() >> 32) as u32,
            0x70 => self.h.csb_lo,
            0x74 => self.h.csb_hi,
            0x78 => {
                self.h.control_reads += 1;
                if self.h.control == 0 {
                    if let Starts::After(k) = self.h.starts {
                        if self.h.control_reads > k {
                            self.start();
                        }
                    }
                }
                self.h.control
            }
            _ => 0,
        }
    }

    fn config_write(&mut self, off: u64, v: u32) {
        match off {
            0x70 => self.h.csb_lo = v,
            0x74 => self.h.csb_hi = v,
            0x78 => {
                assert_eq!(v, 1, "only starts are written");
                assert_ne!(self.v.status & 4, 0, "control written before DRIVER_OK");
                assert_ne!(self.v.drv & feature::NMVM_NETMAP, 0, "bit 45 not accepted");
                self.h.control_reads = 0;
                match self.h.starts {
                    Starts::Refuses => self.h.control = 2,
                    Starts::Never => {}
                    Starts::After(_) => {}
                }
            }
            _ => panic!("write to read-only passthrough field {off:#x}"),
        }
    }

    /// What nmvm does on a start request: checks the CSB and publishes each ring's position.
    fn start(&mut self) {
        let csb = u64::from(self.h.csb_hi) << 32 | u64::from(self.h.csb_lo);
        let entries = u64::from(self.h.lay.cfg_tx + self.h.lay.cfg_rx);
        assert_eq!(csb % 64, 0, "CSB not 64-byte aligned");
        assert!(
            self.v.dma.range(csb, (128 * entries) as usize).is_some(),
            "CSB outside the DMA area"
        );
        self.h.csb = csb;
        let n = self.h.lay.n;
        let tx_head = self.region.rd(self.tx_ring() + 20, 4) as u32;
        let rx_head = self.region.rd(self.rx_ring() + 20, 4) as u32;
        self.h.tx_hwcur = tx_head;
        self.h.tx_head = tx_head;
        self.h.rx_head = rx_head;
        self.h.rx_tail = rx_head;
        let rx = self.rx_entry();
        let tx_tail = self.h.bad_hwtail.unwrap_or(prev(tx_head, n));
        for (e, cur, tail) in [(0, tx_head, tx_tail), (rx, rx_head, rx_head)] {
            self.csb_wr(e, 64, cur);
            self.csb_wr(e, 68, tail);
        }
        self.set_need_kick();
        self.h.control = 1;
    }

    fn set_need_kick(&mut self) {
        let v = u32::from(self.h.mode == HostMode::Sleepy);
        for e in 0..self.h.lay.cfg_tx + self.h.lay.cfg_rx {
            self.csb_wr(e, 72, v);
        }
    }

    fn read_slot(&self, ring: u64, i: u32) -> (u32, u16, u16) {
        let a = Self::slot(ring, i);
        let lf = self.region.rd(a + 4, 4) as u32;
        (self.region.rd(a, 4) as u32, lf as u16, (lf >> 16) as u16)
    }

    /// txsync: takes the guest's tx frames, as far as the peer has room.
    fn tx_step(&mut self) {
        if self.h.control != 1 || self.h.tx_dead {
            return;
        }
        self.h.syncs += 1;
        let (n, nbufs, bs) = (self.h.lay.n, self.h.lay.nbufs(), self.h.lay.buf_size);
        let ring = self.tx_ring();
        let head = self.csb_rd(0, 0);
        let cur = self.csb_rd(0, 4);
        if within(self.h.tx_hwcur, head, prev(self.h.tx_hwcur, n), n) {
            self.h.tx_head = head;
            if !within(head, cur, prev(self.h.tx_hwcur, n), n) {
                self.h.bad_index += 1;
            }
        } else {
            // nmvm resets the ring: head = cur = hwcur.
            self.h.bad_index += 1;
            self.h.tx_head = self.h.tx_hwcur;
        }
        let mut i = self.h.tx_hwcur;
        let mut room = self.h.tx_room;
        while i != self.h.tx_head {
            // A frame: slots up to one without NS_MOREFRAG, all published.
            let mut slots = vec![i];
            let (mut j, mut complete) = (i, true);
            while self.read_slot(ring, j).2 & NS_MOREFRAG != 0 {
                j = nm_next(j, n);
                if j == self.h.tx_head {
                    complete = false;
                    break;
                }
                slots.push(j);
            }
            if !complete {
                break; // wait for the rest
            }
            let next = nm_next(j, n);
            let bad = slots.iter().any(|&k| {
                let (b, l, _) = self.read_slot(ring, k);
                b >= nbufs || u32::from(l) > bs
            });
            if bad {
                for &k in &slots {
                    let (b, l, _) = self.read_slot(ring, k);
                    let a = Self::slot(ring, k);
                    if b >= nbufs {
                        self.h.bad_buf_idx += 1;
                        let spare = self.h.free.pop_front().unwrap();
                        self.region.wr(a, 4, spare.into());
                    }
                    if u32::from(l) > bs {
                        self.h.bad_len += 1;
                    }
                    self.region.wr(a + 4, 4, u64::from(NS_BUF_CHANGED) << 16);
                }
                i = next;
                continue;
            }
            if room == 0 {
                break;
            }
            room -= 1;
            let mut data = Vec::new();
            for &k in &slots {
                let (b, l, _) = self.read_slot(ring, k);
                let r = self.region.range(self.buf(b), l.into()).unwrap();
                data.extend_from_slice(&self.region.mem[r]);
            }
            let hdr = self.h.lay.hdr as usize;
            if data[..hdr.min(data.len())].iter().any(|b| *b != 0) {
                self.h.tx_hdr_not_zero += 1;
            }
            self.h.tx_wire.push(data[hdr.min(data.len())..].to_vec());
            let (b0, _, f0) = self.read_slot(ring, i);
            self.h.tx_bufs.push(b0);
            self.h.tx_flags.push(f0);
            // Swap each buffer with a free one; the taken buffer's bytes are the peer's now.
            for &k in &slots {
                let (b, l, _) = self.read_slot(ring, k);
                let r = self.region.range(self.buf(b), bs as usize).unwrap();
                self.region.mem[r].fill(SCRIBBLE);
                self.h.free.push_back(b);
                let d = self.h.free.pop_front().unwrap();
                let a = Self::slot(ring, k);
                self.region.wr(a, 4, d.into());
                self.region
                    .wr(a + 4, 4, u64::from(l) | u64::from(NS_BUF_CHANGED) << 16);
            }
            i = next;
        }
        self.h.tx_hwcur = i;
        let head = self.h.tx_head;
        self.csb_wr(0, 64, head);
        let tail = self.h.bad_hwtail.unwrap_or(prev(i, n));
        self.csb_wr(0, 68, tail);
    }

    /// rxsync: takes back the slots the guest released and fills free ones from the wire.
    fn rx_step(&mut self) {
        if self.h.control != 1 {
            return;
        }
        let (n, nbufs, bs) = (self.h.lay.n, self.h.lay.nbufs(), self.h.lay.buf_size);
        let e = self.rx_entry();
        let ring = self.rx_ring();
        let head = self.csb_rd(e, 0);
        if within(self.h.rx_head, head, self.h.rx_tail, n) {
            let released = nm_dist(self.h.rx_head, head, n);
            self.h.max_rx_release = self.h.max_rx_release.max(released);
            let mut i = self.h.rx_head;
            while i != head {
                if self.read_slot(ring, i).0 >= nbufs {
                    self.h.bad_released += 1;
                }
                i = nm_next(i, n);
            }
            self.h.rx_head = head;
        } else {
            self.h.bad_index += 1;
        }
        let hdr = self.h.lay.hdr as usize;
        while let Some(frame) = self.h.rx_wire.front() {
            let mut data = vec![RX_HDR_BYTE; hdr];
            data.extend_from_slice(frame);
            let chunks: Vec<&[u8]> = data.chunks(bs as usize).collect();
            let free = nm_dist(self.h.rx_tail, prev(self.h.rx_head, n), n);
            if chunks.len() as u32 > free {
                break;
            }
            let mut i = self.h.rx_tail;
            for (c, chunk) in chunks.iter().enumerate() {
                let mut b = self.read_slot(ring, i).0;
                if b >= nbufs {
                    // Counted when released; repaired from the free pool, as nmvm does.
                    b = self.h.free.pop_front().unwrap();
                    self.region.wr(Self::slot(ring, i), 4, b.into());
                }
                if c == 0 {
                    self.h.rx_bufs.push(b);
                }
                let r = self.region.range(self.buf(b), chunk.len()).unwrap();
                self.region.mem[r].copy_from_slice(chunk);
                if c == 0 && self.h.rx_bad_buf {
                    self.h.rx_bad_buf = false;
                    self.region.wr(Self::slot(ring, i), 4, 0xffff_fff0);
                }
                let last = c + 1 == chunks.len() && !self.h.rx_unterminated;
                let more = if last { 0 } else { NS_MOREFRAG };
                self.region.wr(
                    Self::slot(ring, i) + 4,
                    4,
                    chunk.len() as u64 | u64::from(more) << 16,
                );
                i = nm_next(i, n);
            }
            self.h.rx_tail = i;
            self.h.rx_wire.pop_front();
        }
        let (h, t) = (self.h.rx_head, self.h.rx_tail);
        self.csb_wr(e, 64, h);
        self.csb_wr(e, 68, t);
    }
}

impl Sink for NmFake {
    fn write(&mut self, bytes: &[u8]) {
        Sink::write(&mut self.v, bytes)
    }
}

impl PciConfig for NmFake {
    fn pci_read32(&mut self, dev: u8, reg: u8) -> u32 {
        self.v.pci_read32(dev, reg)
    }
    fn pci_write32(&mut self, dev: u8, reg: u8, val: u32) {
        self.v.pci_write32(dev, reg, val)
    }
    fn pci_write16(&mut self, dev: u8, reg: u8, val: u16) {
        self.v.pci_write16(dev, reg, val)
    }
}

impl Mmio for NmFake {
    fn mmio_read8(&mut self, addr: u64) -> u8 {
        self.v.mmio_read(addr, 1) as u8
    }
    fn mmio_read16(&mut self, addr: u64) -> u16 {
        self.v.mmio_read(addr, 2) as u16
    }
    fn mmio_read32(&mut self, addr: u64) -> u32 {
        match addr.checked_sub(DEV_CFG) {
            Some(off @ 0x40..=0x7f) => {
                assert_eq!(off % 4, 0);
                self.config_read(off)
            }
            _ => self.v.mmio_read(addr, 4),
        }
    }
    fn mmio_write8(&mut self, addr: u64, val: u8) {
        self.v.mmio_write(addr, 1, val.into())
    }
    fn mmio_write16(&mut self, addr: u64, val: u16) {
        self.v.mmio_write(addr, 2, val.into());
        // Queue 0 / queue 1 notifications (the fake counts them).
        match addr.checked_sub(crate::net::tests::BAR) {
            Some(0x3000) => self.rx_step(),
            Some(0x3004) => self.tx_step(),
            _ => {}
        }
    }
    fn mmio_write32(&mut self, addr: u64, val: u32) {
        match addr.checked_sub(DEV_CFG) {
            Some(off @ 0x40..=0x7f) => self.config_write(off, val),
            _ => self.v.mmio_write(addr, 4, val),
        }
    }
}

impl Dma for NmFake {
    fn dma_read16(&self, a: u64) -> u16 {
        self.v.dma_read16(a)
    }
    fn dma_read32(&self, a: u64) -> u32 {
        self.v.dma_read32(a)
    }
    fn dma_write16(&mut self, a: u64, v: u16) {
        self.v.dma_write16(a, v)
    }
    fn dma_write32(&mut self, a: u64, v: u32) {
        self.v.dma_write32(a, v)
    }
    fn dma_write64(&mut self, a: u64, v: u64) {
        self.v.dma_write64(a, v)
    }
    fn dma_bytes(&mut self, a: u64, l: usize) -> &mut [u8] {
        self.v.dma_bytes(a, l)
    }
    fn dma_copy(&mut self, s: u64, d: u64, l: usize) {
        self.v.dma_copy(s, d, l)
    }
    fn full_barrier(&self) {
        self.v.full_barrier()
    }
}

impl Hw for NmFake {
    fn relax(&mut self) {
        self.h.relaxes += 1;
        assert!(self.h.relaxes < RELAX_LIMIT, "the guest waits forever");
        self.v.relax();
        self.rx_step();
        if self.h.mode == HostMode::Polling || self.h.tx_hwcur != self.h.tx_head {
            self.tx_step();
        }
    }
    fn ticks(&mut self) -> u64 {
        self.v.ticks()
    }
    fn ticks_per_sec(&self) -> u64 {
        self.v.ticks_per_sec()
    }
    fn dma_area(&self) -> (u64, usize) {
        self.v.dma_area()
    }
}

impl Region for NmFake {
    fn region_map(&mut self, base: u64, len: u64) -> bool {
        if self.refuse_map {
            return false;
        }
        assert_eq!((base, len), (REGION_BASE, self.h.lay.size()));
        self.mapped = true;
        true
    }
    fn region_read32(&self, addr: u64) -> u32 {
        assert!(self.mapped, "region read before region_map");
        self.region.rd(addr, 4) as u32
    }
    fn region_read64(&self, addr: u64) -> u64 {
        assert!(self.mapped, "region read before region_map");
        self.region.rd(addr, 8)
    }
    fn region_write32(&mut self, addr: u64, val: u32) {
        assert!(self.mapped, "region write before region_map");
        self.region.wr(addr, 4, val.into())
    }
    fn region_bytes(&mut self, addr: u64, len: usize) -> &mut [u8] {
        assert!(self.mapped, "region access before region_map");
        self.region.dma_bytes(addr, len)
    }
}

fn lens(min: u16, max: u16) -> FrameLen {
    FrameLen { min, max }
}

/// The frames a gen run must have produced, compared byte for byte with the reference builder.
fn check_gen_frames(fake: &NmFake, count: usize, len: FrameLen) {
    let wire = &fake.h.tx_wire;
    assert_eq!(wire.len(), count);
    for (seq, f) in wire.iter().enumerate() {
        let seq = seq as u64;
        let l = gen_len(seq, len.min, len.max);
        let mut want = vec![0u8; l];
        assert!(build_frame(&mut want, MAC, l, seq));
        assert_eq!(f, &want, "frame {seq}");
    }
    assert_eq!(fake.h.tx_hdr_not_zero, 0, "virtio-net header not zeroed");
}

fn assert_clean(fake: &NmFake) {
    assert_eq!(
        (
            fake.h.bad_buf_idx,
            fake.h.bad_len,
            fake.h.bad_index,
            fake.h.bad_released
        ),
        (0, 0, 0, 0),
        "the host saw bad values"
    );
    // A polling guest never asks for interrupts.
    for e in 0..fake.h.lay.cfg_tx + fake.h.lay.cfg_rx {
        assert_eq!(fake.csb_rd(e, 8), 0, "guest_need_kick of entry {e}");
    }
}

#[test]
fn ring_arithmetic() {
    assert_eq!(nm_next(0, 4), 1);
    assert_eq!(nm_next(3, 4), 0);
    assert_eq!(nm_dist(1, 3, 8), 2);
    assert_eq!(nm_dist(6, 1, 8), 3);
    assert_eq!(nm_dist(5, 5, 8), 0);
    assert_eq!(nm_dist(0, 7, 8), 7);
    assert_eq!(nm_add(6, 3, 8), 1);
    assert_eq!(nm_add(0, 7, 8), 7);
    assert_eq!(nm_add(7, 0, 8), 7);
    // [hwcur, hwtail] with wrap-around, and indices past the ring.
    assert!(nm_within(6, 0, 2, 8));
    assert!(nm_within(6, 6, 2, 8));
    assert!(nm_within(6, 2, 2, 8));
    assert!(!nm_within(6, 3, 2, 8));
    assert!(!nm_within(6, 5, 2, 8));
    assert!(!nm_within(0, 8, 7, 8));
    assert!(nm_within(3, 3, 3, 8));
    assert!(!nm_within(3, 4, 3, 8));
    // Ring sizes up to MAX_SLOTS stay far from overflow.
    let n = MAX_SLOTS;
    assert_eq!(nm_add(n - 1, n - 1, n), n - 2);
    assert_eq!(nm_dist(n - 1, n - 2, n), n - 1);
}

#[test]
fn gen_sleeping_host_is_kicked_once_per_batch() {
    let lay = Layout {
        n: 256,
        ..Layout::default()
    };
    let mut fake = NmFake::new(lay, HostMode::Sleepy);
    let len = lens(60, 1514);
    let c = run(&mut fake, NetMode::Gen, None, len).unwrap();
    assert_eq!(
        c,
        Counters {
            rx: 0,
            tx: 1000,
            bad: 0
        }
    );
    check_gen_frames(&fake, 1000, len);
    assert_clean(&fake);
    let kicks = fake.v.notifies;
    assert!(kicks[1] <= 1000 / BATCH + 2, "{} tx kicks", kicks[1]);
    assert_eq!(kicks[0], 0, "rx kicks");
    // Buffers circulated (every frame left in the buffer its slot had at that time), and
    // the scribbled-over ones were rebuilt whole.
    assert!(fake.h.tx_bufs.iter().any(|&b| b >= 2 + 2 * 256));
    assert_eq!(fake.v.drv, WANTED_FEATURES_WITH_NETMAP);
    assert_eq!(
        fake.text(),
        "nmvm-guest: netmap passthrough: 1 tx rings of 256 slots, 1 rx rings, buf 2048 bytes, \
         hdr 0\n"
    );
    let mut out = Vec::new();
    net::write_counters(&mut VecOut(&mut out), NetMode::Gen, &c);
    assert_eq!(out, b"nmvm-guest: net gen: rx 0 tx 1000 bad 0\n");
}

const WANTED_FEATURES_WITH_NETMAP: u64 = net::WANTED_FEATURES | feature::NMVM_NETMAP;

#[test]
fn gen_polling_host_is_never_kicked() {
    let lay = Layout {
        hdr: 12,
        ..Layout::default()
    };
    let mut fake = NmFake::new(lay, HostMode::Polling);
    let len = lens(60, 200);
    let c = run(&mut fake, NetMode::Gen, Some(3000), len).unwrap();
    assert_eq!(c.tx, 3000);
    check_gen_frames(&fake, 3000, len);
    assert_clean(&fake);
    assert_eq!(fake.v.notifies, [0, 0]);
    // The ring wrapped: the guest followed it round.
    assert!(fake.h.tx_hwcur != 0);
}

#[test]
fn gen_small_ring_and_slow_peer() {
    for (n, room, mode) in [
        (8, 3, HostMode::Polling),
        (8, 1, HostMode::Sleepy),
        (128, 5, HostMode::Polling),
        (2, usize::MAX, HostMode::Sleepy),
    ] {
        let lay = Layout {
            n,
            ..Layout::default()
        };
        let mut fake = NmFake::new(lay, mode);
        fake.h.tx_room = room;
        let len = lens(60, 1514);
        let c = run(&mut fake, NetMode::Gen, Some(200), len).unwrap();
        assert_eq!(c.tx, 200, "n {n} room {room}");
        check_gen_frames(&fake, 200, len);
        assert_clean(&fake);
    }
}

#[test]
fn gen_waits_for_room_for_a_whole_batch() {
    // The peer takes 10 frames per sync: the guest must not publish (and kick) every time a
    // few slots come free while earlier frames are in flight.
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    fake.h.tx_room = 10;
    let c = run(&mut fake, NetMode::Gen, Some(5000), FrameLen::default()).unwrap();
    assert_eq!(c.tx, 5000);
    assert!(
        fake.v.notifies[1] <= 5000 / BATCH + 2,
        "{} kicks",
        fake.v.notifies[1]
    );
}

#[test]
fn gen_zero_frames_and_oversized_frames() {
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    let c = run(&mut fake, NetMode::Gen, Some(0), FrameLen::default()).unwrap();
    assert_eq!(c, Counters::default());
    assert_eq!(fake.v.notifies, [0, 0]);

    let lay = Layout {
        buf_size: 1024,
        ..Layout::default()
    };
    let mut fake = NmFake::new(lay, HostMode::Sleepy);
    let e = run(&mut fake, NetMode::Gen, Some(5), lens(60, 1514)).unwrap_err();
    assert_eq!(
        e,
        Error::with(
            "netmap gen: frames do not fit in a netmap buffer, buf_size",
            1024
        )
    );
}

#[test]
fn gen_gives_up_when_nothing_moves() {
    let mut fake = NmFake::new(Layout::default(), HostMode::Polling);
    fake.h.tx_room = 0;
    let e = run(&mut fake, NetMode::Gen, Some(2000), FrameLen::default()).unwrap_err();
    assert_eq!(e.what, "netmap gen: transmit ring stuck, hwtail");
    assert_eq!(e.value, Some(1023));
    let mut fake = NmFake::new(Layout::default(), HostMode::Polling);
    fake.h.tx_room = 0;
    let e = run(&mut fake, NetMode::Gen, Some(10), FrameLen::default()).unwrap_err();
    assert_eq!(e, Error::with("netmap gen: frames not sent, hwtail", 1023));
}

#[test]
fn gen_verifies_what_arrives_meanwhile() {
    let mut fake = NmFake::new(Layout::default(), HostMode::Polling);
    let peer = [2, 0, 0, 0, 0, 9];
    fake.h.rx_wire.push_back(test_frame(peer, 100, 7));
    let mut bad = test_frame(peer, 100, 8);
    bad[60] ^= 1;
    fake.h.rx_wire.push_back(bad);
    // Enough frames that the guest has to wait for room (and sees the arrivals) meanwhile.
    let c = run(&mut fake, NetMode::Gen, Some(2000), FrameLen::default()).unwrap();
    assert_eq!(
        c,
        Counters {
            rx: 2,
            tx: 2000,
            bad: 1
        }
    );
    assert_clean(&fake);
}

fn echo_case(lay: Layout, mode: HostMode, frames: usize) -> NmFake {
    let mut fake = NmFake::new(lay, mode);
    let wire = wire_frames(frames);
    fake.h.rx_wire.extend(wire.iter().cloned());
    let c = run(
        &mut fake,
        NetMode::Echo,
        Some(frames as u64),
        FrameLen::default(),
    )
    .unwrap();
    assert_eq!(
        c,
        Counters {
            rx: frames as u64,
            tx: frames as u64,
            bad: 0
        }
    );
    assert_eq!(fake.h.tx_wire.len(), frames);
    for (i, (sent, got)) in wire.iter().zip(&fake.h.tx_wire).enumerate() {
        assert_eq!(got, &swapped(sent), "frame {i}");
    }
    assert_eq!(fake.h.tx_hdr_not_zero, 0, "virtio-net header not zeroed");
    assert_clean(&fake);
    fake
}

#[test]
fn echo_is_zero_copy() {
    for mode in [HostMode::Sleepy, HostMode::Polling] {
        let lay = Layout {
            hdr: 12,
            n: 256,
            ..Layout::default()
        };
        let fake = echo_case(lay, mode, 700);
        // Each frame left in the very buffer it arrived in, flagged as a changed buffer.
        assert_eq!(fake.h.tx_bufs, fake.h.rx_bufs);
        assert!(fake.h.tx_flags.iter().all(|f| *f == NS_BUF_CHANGED));
    }
}

#[test]
fn echo_frames_spanning_slots() {
    let lay = Layout {
        hdr: 12,
        buf_size: 512,
        n: 64,
        ..Layout::default()
    };
    let fake = echo_case(lay, HostMode::Sleepy, 300);
    assert_eq!(fake.h.tx_bufs, fake.h.rx_bufs);
    let lay = Layout {
        buf_size: 64,
        n: 128,
        ..Layout::default()
    };
    echo_case(lay, HostMode::Polling, 100);
}

#[test]
fn echo_drops_runts_and_stops_at_count() {
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    let good = wire_frames(10);
    for (i, f) in good.iter().enumerate() {
        if i % 3 == 0 {
            fake.h.rx_wire.push_back(vec![0x11; 10]);
        }
        fake.h.rx_wire.push_back(f.clone());
    }
    let c = run(&mut fake, NetMode::Echo, Some(8), FrameLen::default()).unwrap();
    assert_eq!(
        c,
        Counters {
            rx: 11,
            tx: 8,
            bad: 3
        }
    );
    assert_eq!(fake.h.tx_wire.len(), 8);
    assert_eq!(fake.h.tx_wire[7], swapped(&good[7]));
}

#[test]
fn echo_gives_up_when_transmit_ring_is_stuck() {
    let lay = Layout {
        n: 16,
        ..Layout::default()
    };
    let mut fake = NmFake::new(lay, HostMode::Polling);
    fake.h.tx_room = 0;
    fake.h.rx_wire.extend(wire_frames(40));
    let e = run(&mut fake, NetMode::Echo, None, FrameLen::default()).unwrap_err();
    assert_eq!(e.what, "netmap echo: transmit ring stuck, hwtail");
}

#[test]
fn sink_verifies_and_counts_like_virtio() {
    let mut frames: Vec<Vec<u8>> = (0..200u64)
        .map(|i| test_frame([2, 0, 0, 0, 0, 9], gen_len(i, 60, 1514), i))
        .collect();
    frames[10][100] ^= 1; // payload: UDP checksum
    frames[20][16] ^= 1; // IPv4 length
    frames[30][24] ^= 0x80; // IPv4 checksum
    frames[40].truncate(50); // short
    frames[50][13] = 0xdd; // not IPv4
    for (lay, mode) in [
        (Layout::default(), HostMode::Sleepy),
        (
            // Frames over 500 bytes span slots and are gathered.
            Layout {
                hdr: 12,
                buf_size: 512,
                n: 32,
                ..Layout::default()
            },
            HostMode::Polling,
        ),
    ] {
        let mut fake = NmFake::new(lay, mode);
        fake.h.rx_wire.extend(frames.iter().cloned());
        let c = run(&mut fake, NetMode::Sink, Some(200), FrameLen::default()).unwrap();
        assert_eq!(
            c,
            Counters {
                rx: 200,
                tx: 0,
                bad: 5
            }
        );
        assert_clean(&fake);
    }
    // A full ring is handed back in batches, so that the peer can refill it meanwhile.
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    fake.h
        .rx_wire
        .extend(frames.iter().cycle().take(3000).cloned());
    let c = run(&mut fake, NetMode::Sink, Some(3000), FrameLen::default()).unwrap();
    assert_eq!((c.rx, c.bad), (3000, 75));
    assert!(fake.h.max_rx_release <= BATCH, "{}", fake.h.max_rx_release);
    assert!(
        fake.v.notifies[0] <= 3000 / BATCH + 20,
        "{}",
        fake.v.notifies[0]
    );
    // More frames than the count: the rest stay unreceived.
    let lay = Layout {
        n: 8,
        ..Layout::default()
    };
    let mut fake = NmFake::new(lay, HostMode::Sleepy);
    fake.h.rx_wire.extend(frames[..100].iter().cloned());
    let c = run(&mut fake, NetMode::Sink, Some(30), FrameLen::default()).unwrap();
    assert_eq!(c.rx, 30);
    assert!(fake.h.rx_wire.len() >= 60);
}

#[test]
fn sink_rejects_bad_buffers_and_endless_chains() {
    // A slot whose buffer index points outside the region: one bad frame, and the slot is
    // handed back as it is (nmvm repairs it).
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    fake.h.rx_bad_buf = true;
    fake.h
        .rx_wire
        .push_back(test_frame([2, 0, 0, 0, 0, 9], 60, 1));
    fake.h
        .rx_wire
        .push_back(test_frame([2, 0, 0, 0, 0, 9], 60, 2));
    let c = run(&mut fake, NetMode::Sink, Some(2), FrameLen::default()).unwrap();
    assert_eq!(
        c,
        Counters {
            rx: 2,
            tx: 0,
            bad: 1
        }
    );

    // A chain of NS_MOREFRAG slots as long as the whole window can never end: one bad frame.
    let lay = Layout {
        n: 8,
        buf_size: 64,
        ..Layout::default()
    };
    let mut fake = NmFake::new(lay, HostMode::Sleepy);
    fake.h.rx_unterminated = true;
    fake.h.rx_wire.push_back(vec![0x33; 64 * 7]);
    let c = run(&mut fake, NetMode::Sink, Some(1), FrameLen::default()).unwrap();
    assert_eq!(
        c,
        Counters {
            rx: 1,
            tx: 0,
            bad: 1
        }
    );
    assert_clean(&fake);
}

#[test]
fn hostile_sequence() {
    for mode in [HostMode::Sleepy, HostMode::Polling] {
        let mut fake = NmFake::new(Layout::default(), mode);
        let c = run(&mut fake, NetMode::Hostile, None, FrameLen::default()).unwrap();
        let text = fake.text();
        for line in [
            "nmvm-guest: hostile: netmap buffer index 0xffffffff: dropped\n",
            "nmvm-guest: hostile: netmap length 65000: dropped\n",
            "nmvm-guest: hostile: netmap head 1024 beyond hwtail 1: resumed at hwcur 2\n",
            "nmvm-guest: hostile: netmap recovered\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert_eq!(
            c,
            Counters {
                rx: 0,
                tx: 100,
                bad: 3
            }
        );
        assert_eq!((fake.h.bad_buf_idx, fake.h.bad_len), (1, 1));
        assert!(fake.h.bad_index >= 1);
        // The valid frames are a gen stream from 0, for `pkt-gen -f rx` to check.
        check_gen_frames(&fake, 100, FrameLen::default());
        // The slot that carried 0xffffffff holds a real buffer again.
        assert!(fake.read_slot(fake.tx_ring(), 0).0 < fake.h.lay.nbufs());
    }
}

#[test]
fn hostile_with_a_small_ring_and_a_count() {
    // The lengths and count of the valid frames follow len= and count=.
    let lay = Layout {
        n: 16,
        hdr: 12,
        ..Layout::default()
    };
    let mut fake = NmFake::new(lay, HostMode::Polling);
    let len = lens(60, 1000);
    let c = run(&mut fake, NetMode::Hostile, Some(40), len).unwrap();
    assert_eq!(c.tx, 40);
    check_gen_frames(&fake, 40, len);
    assert!(fake
        .text()
        .contains("nmvm-guest: hostile: netmap head 16 beyond hwtail 1: resumed at hwcur 2\n"));
}

#[test]
fn hostile_against_a_host_that_never_looks() {
    // The guest reports each case as not handed back, resumes from hwcur each time, gives the
    // first slot its buffer back, and finally says that its valid frames do not leave.
    let mut fake = NmFake::new(Layout::default(), HostMode::Polling);
    fake.h.tx_dead = true;
    let e = run(&mut fake, NetMode::Hostile, None, FrameLen::default()).unwrap_err();
    let text = fake.text();
    for line in [
        "nmvm-guest: hostile: netmap buffer index 0xffffffff: not handed back, resumed at hwcur 0\n",
        "nmvm-guest: hostile: netmap length 65000: not handed back, resumed at hwcur 0\n",
        "nmvm-guest: hostile: netmap head 1024 beyond hwtail 1023: resumed at hwcur 0\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert_eq!(e, Error::with("netmap gen: frames not sent, hwtail", 1023));
    assert_eq!(fake.read_slot(fake.tx_ring(), 0).0, 2);
}

#[test]
fn hwtail_out_of_range_is_refused() {
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    fake.h.bad_hwtail = Some(5000);
    let e = run(&mut fake, NetMode::Gen, Some(5), FrameLen::default()).unwrap_err();
    assert_eq!(
        e,
        Error::with("netmap: nmvm published an hwtail out of range:", 5000)
    );
}

#[test]
fn without_passthrough() {
    // No bit 45 offered.
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    fake.v.offered = ALL;
    let e = run(&mut fake, NetMode::Echo, None, FrameLen::default()).unwrap_err();
    assert_eq!(e, Error::with(NO_FEATURE, net::WANTED_FEATURES));
    let mut out = Vec::new();
    e.write(&mut VecOut(&mut out));
    let line = String::from_utf8(out).unwrap();
    assert_eq!(
        line,
        "nmvm-guest: virtio: path=netmap needs nmvm run --passthrough (feature bit 45 not \
         offered), features 0x120008020\n"
    );
    assert!(!fake.mapped);

    // Bit 45, but no passthrough fields (magic 0).
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    let e = run_no_magic(&mut fake).unwrap_err();
    assert_eq!(e, Error::with(NO_CONFIG, 0));
    assert!(format!("{e:?}").contains("--passthrough"));
}

/// Runs gen against a device whose magic reads 0.
fn run_no_magic(fake: &mut NmFake) -> Result<Counters, Error> {
    struct Zeroed<'a>(&'a mut NmFake);
    impl Sink for Zeroed<'_> {
        fn write(&mut self, b: &[u8]) {
            Sink::write(self.0, b)
        }
    }
    impl PciConfig for Zeroed<'_> {
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
    impl Mmio for Zeroed<'_> {
        fn mmio_read8(&mut self, a: u64) -> u8 {
            self.0.mmio_read8(a)
        }
        fn mmio_read16(&mut self, a: u64) -> u16 {
            self.0.mmio_read16(a)
        }
        fn mmio_read32(&mut self, a: u64) -> u32 {
            if a == DEV_CFG + cfg::MAGIC {
                0
            } else {
                self.0.mmio_read32(a)
            }
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
    impl Dma for Zeroed<'_> {
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
    impl Hw for Zeroed<'_> {
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
    impl Region for Zeroed<'_> {
        fn region_map(&mut self, b: u64, l: u64) -> bool {
            self.0.region_map(b, l)
        }
        fn region_read32(&self, a: u64) -> u32 {
            self.0.region_read32(a)
        }
        fn region_read64(&self, a: u64) -> u64 {
            self.0.region_read64(a)
        }
        fn region_write32(&mut self, a: u64, v: u32) {
            self.0.region_write32(a, v)
        }
        fn region_bytes(&mut self, a: u64, l: usize) -> &mut [u8] {
            self.0.region_bytes(a, l)
        }
    }
    run(&mut Zeroed(fake), NetMode::Gen, None, FrameLen::default())
}

#[test]
fn start_is_polled_and_can_fail() {
    // control reads 0 a few times before nmvm's worker picks the request up.
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    fake.h.starts = Starts::After(5);
    run(&mut fake, NetMode::Gen, Some(10), FrameLen::default()).unwrap();
    assert_eq!(fake.h.control_reads, 6);
    assert_eq!(
        fake.h.csb,
        crate::net::tests::DMA_BASE + net::RINGS_BYTES as u64
    );

    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    fake.h.starts = Starts::Refuses;
    let e = run(&mut fake, NetMode::Gen, Some(10), FrameLen::default()).unwrap_err();
    assert_eq!(
        e,
        Error::with(
            "netmap: nmvm refused to start passthrough (its log says why), control",
            2
        )
    );

    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    fake.h.starts = Starts::Never;
    let e = run(&mut fake, NetMode::Gen, Some(10), FrameLen::default()).unwrap_err();
    assert_eq!(
        e,
        Error::with("netmap: passthrough did not start, control", 0)
    );
}

#[test]
fn region_discovery() {
    // Without the capability: BAR 2 from offset 0, region_size long.
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    fake.v.pci.cfg[0x9d] = 0;
    run(&mut fake, NetMode::Gen, Some(10), FrameLen::default()).unwrap();
    assert_eq!(fake.h.tx_wire.len(), 10);

    // A capability whose length is not region_size.
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    fake.v.pci.set_cap(0xa8 + 12, &0x1000u32.to_le_bytes());
    let e = run(&mut fake, NetMode::Gen, Some(10), FrameLen::default()).unwrap_err();
    assert_eq!(
        e.what,
        "netmap: shared memory capability and region_size disagree, capability length"
    );

    // BAR 2 over BAR0.
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    let bar0 = crate::net::tests::BAR as u32;
    fake.v.pci.set_cap(0x18, &(bar0 | 0xc).to_le_bytes());
    let e = run(&mut fake, NetMode::Gen, Some(10), FrameLen::default()).unwrap_err();
    assert_eq!(
        e,
        Error::with("netmap: region overlaps BAR0, base", bar0.into())
    );

    // A machine that cannot map it.
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    fake.refuse_map = true;
    let e = run(&mut fake, NetMode::Gen, Some(10), FrameLen::default()).unwrap_err();
    assert_eq!(
        e,
        Error::with("netmap: cannot map the region at", REGION_BASE)
    );
}

#[test]
fn several_rings_and_host_rings() {
    // Two tx rings and a host tx ring before the rx ring in ring_ofs[]; the CSB has entries
    // for the two tx rings and the rx ring. The second tx ring starts at head 5.
    let lay = Layout {
        ni_tx: 2,
        ni_host_tx: 1,
        ni_rx: 1,
        ni_host_rx: 1,
        cfg_tx: 2,
        cfg_rx: 1,
        n: 64,
        ..Layout::default()
    };
    let mut fake = NmFake::new(lay, HostMode::Sleepy);
    fake.set_ring_head(1, 5);
    fake.set_ring_head(0, 60);
    fake.h.rx_wire.extend(wire_frames(100));
    let c = run(&mut fake, NetMode::Echo, Some(100), FrameLen::default()).unwrap();
    assert_eq!(c.tx, 100);
    assert_eq!((fake.csb_rd(1, 0), fake.csb_rd(1, 4)), (5, 5));
    assert_eq!(fake.csb_rd(1, 8), 0);
    assert_clean(&fake);
    assert_eq!(
        fake.text(),
        "nmvm-guest: netmap passthrough: 2 tx rings of 64 slots, 1 rx rings, buf 2048 bytes, \
         hdr 0\n"
    );
    // Different ring sizes are both shown.
    let mut out = Vec::new();
    let g = Geometry {
        tx_rings: 1,
        rx_rings: 4,
        tx_slots: 512,
        rx_slots: 1024,
        buf_size: 2048,
        vnet_hdr_len: 12,
        ..Geometry::default()
    };
    write_geometry(&mut VecOut(&mut out), &g);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "nmvm-guest: netmap passthrough: 1 tx rings of 512 slots, 4 rx rings of 1024 slots, \
         buf 2048 bytes, hdr 12\n"
    );
}

#[test]
fn bad_geometry() {
    let cases: [(Layout, &str); 5] = [
        (
            Layout {
                hdr: 4,
                ..Layout::default()
            },
            "netmap: unsupported vnet_hdr_len",
        ),
        (
            Layout {
                cfg_rx: 0,
                ..Layout::default()
            },
            "netmap: unusable ring count, tx rings",
        ),
        (
            Layout {
                cfg_tx: 2,
                ..Layout::default()
            },
            "netmap: the netmap_if has fewer rings than the device says, ni_tx_rings",
        ),
        (
            Layout {
                nifp_offset: 0xffff_f000,
                ..Layout::default()
            },
            "netmap: bad nifp_offset",
        ),
        (
            Layout {
                buf_size: 32,
                ..Layout::default()
            },
            "netmap: buffers too small, buf_size",
        ),
    ];
    for (lay, what) in cases {
        let mut fake = NmFake::new(lay, HostMode::Sleepy);
        let e = run(&mut fake, NetMode::Sink, None, FrameLen::default()).unwrap_err();
        assert_eq!(e.what, what);
    }
    // A ring whose header disagrees with the configuration, or points out of the region.
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    fake.region.wr(fake.rx_ring() + 8, 4, 512);
    let e = run(&mut fake, NetMode::Sink, None, FrameLen::default()).unwrap_err();
    assert_eq!(
        e,
        Error::with(
            "netmap: ring size differs from the device's, num_slots",
            512
        )
    );
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    let nifp = fake.h.lay.nifp();
    fake.region.wr(nifp + 56, 8, 0x4000_0000);
    let e = run(&mut fake, NetMode::Sink, None, FrameLen::default()).unwrap_err();
    assert_eq!(e.what, "netmap: ring outside the region at");
    // A ring head out of range.
    let mut fake = NmFake::new(Layout::default(), HostMode::Sleepy);
    fake.set_ring_head(0, 1024);
    let e = run(&mut fake, NetMode::Sink, None, FrameLen::default()).unwrap_err();
    assert_eq!(e, Error::with("netmap: ring head out of range:", 1024));
}
