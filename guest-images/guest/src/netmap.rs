//! The packet modes on the port's own netmap rings (`path=netmap`), which nmvm passes through
//! into guest-physical memory when it runs with `--passthrough` (README, "Netmap passthrough").
//!
//! # Bring-up
//!
//! The virtio-net device is started as on the virtio path (`net::start_device`), with
//! feature bit 45 ([`feature::NMVM_NETMAP`]) wanted too; its two queues are set up but stay
//! idle. Without that bit, or without the passthrough fields in the device configuration
//! ([`mod@cfg`], magic "NMPT"), the mode fails with one line naming `--passthrough`. The region is
//! found through the shared memory capability (id 0), falling back to BAR 2 at offset 0; the
//! machine maps it ([`Region::region_map`]). Then every ring's `head` is copied into its CSB
//! entry (the CSB sits in the DMA area, after the idle queues' ring pages), the CSB address and
//! `control = 1` are written, and `control` is read until it says 1.
//!
//! # Rings
//!
//! The guest uses tx ring 0 and rx ring 0 (the other rings keep the positions they started
//! with). netmap's rules hold: the guest owns the slots `[head, hwtail)`, where `hwtail` comes
//! from the CSB (nmvm owns the rings' `tail`), one slot always stays empty, and a slot's
//! `buf_idx` is read afresh every time, because a sync may swap buffers. Publishing writes
//! the slots, then `cur`, then `head` (compiler barriers between them; x86 keeps stores in
//! order), then, after a full barrier, reads `host_need_kick` and notifies the queue (1 for tx,
//! 0 for rx) only if nmvm said it sleeps. The guest never sets `guest_need_kick`: it polls.
//!
//! Publishing happens at most every [`BATCH`] frames, or when a window is used up or the
//! work at hand is done; `gen` also waits for room for a whole batch while earlier frames are
//! still in flight, so that a sleeping nmvm is kicked once per batch rather than per frame.
//!
//! # Modes
//!
//! - `echo`: every received frame goes back with its MACs swapped and its virtio-net header
//!   zeroed, without a copy: the rx slot's buffer moves to the tx slot and the tx slot's free
//!   buffer to the rx slot (`NS_BUF_CHANGED` on both). Frames spanning slots move slot by slot.
//! - `sink`: received frames are checked with [`frame::verify_frame`] (a frame spanning slots
//!   is gathered first); counters as on the virtio path.
//! - `gen`: frames `0..count` as on the virtio path. Buffers circulate between the pipe's ends,
//!   so each frame is built whole in whatever buffer its slot holds.
//! - `hostile`: publishes a slot with buffer index `0xffffffff`, a slot 65000 bytes long and a
//!   `head` outside `[hwcur, hwtail]`, notifying after each and reporting what nmvm made of it;
//!   then it resumes from the CSB's `hwcur` and sends `count` (100) valid frames as `gen` does.
//!
//! Everything the host writes (`hwtail`, `hwcur`, slot contents) is checked before it is used:
//! indices against the ring size, buffers against the region.

use core::sync::atomic::{compiler_fence, Ordering};

use crate::frame::{self, FrameGen};
use crate::net::{self, Counters, Hw, Stall, STALL_SECS};
use crate::virtio::pci::{self, Bar};
use crate::virtio::transport::Transport;
use crate::virtio::{feature, Error};
use crate::{FrameLen, NetMode, Sink};

/// `id` of the shared memory capability that describes the region.
pub const SHM_ID: u8 = 0;
/// Where the region is when the device lists no capability for it: BAR 2, offset 0.
pub const SHM_BAR: u8 = 2;
/// `magic`: "NMPT".
pub const MAGIC: u32 = 0x5450_4d4e;
/// The `version` this driver speaks.
pub const VERSION: u32 = 1;

/// Offsets of the passthrough fields in the device-specific configuration (u32 each).
pub mod cfg {
    /// `magic`.
    pub const MAGIC: u64 = 0x40;
    /// `version`.
    pub const VERSION: u64 = 0x44;
    /// `nifp_offset`: the port's `netmap_if` in the region.
    pub const NIFP_OFFSET: u64 = 0x48;
    /// `tx_rings`.
    pub const TX_RINGS: u64 = 0x4c;
    /// `rx_rings`.
    pub const RX_RINGS: u64 = 0x50;
    /// `tx_slots`.
    pub const TX_SLOTS: u64 = 0x54;
    /// `rx_slots`.
    pub const RX_SLOTS: u64 = 0x58;
    /// `buf_size`.
    pub const BUF_SIZE: u64 = 0x5c;
    /// `vnet_hdr_len`: 0 or 12 bytes of virtio-net header in front of every frame.
    pub const VNET_HDR_LEN: u64 = 0x60;
    /// `region_size_lo`.
    pub const REGION_SIZE_LO: u64 = 0x64;
    /// `region_size_hi`.
    pub const REGION_SIZE_HI: u64 = 0x68;
    /// `csb_addr_lo` (read-write).
    pub const CSB_LO: u64 = 0x70;
    /// `csb_addr_hi` (read-write).
    pub const CSB_HI: u64 = 0x74;
    /// `control` (read-write).
    pub const CONTROL: u64 = 0x78;
    /// Bytes of device configuration the fields need.
    pub const END: u64 = 0x7c;
}

/// `control` values.
pub mod control {
    /// Written: start. Read: the device operates the rings for us.
    pub const ON: u32 = 1;
    /// Read: the last start was refused (nmvm logs why).
    pub const REFUSED: u32 = 2;
}

/// The CSB: one entry per ring, tx rings first.
pub mod csb {
    /// Bytes per entry.
    pub const ENTRY: u64 = 128;
    /// Guest: netmap's `head`.
    pub const HEAD: u64 = 0;
    /// Guest: netmap's `cur`.
    pub const CUR: u64 = 4;
    /// Guest: 1 = interrupt me when `hwtail` moves (never set: we poll).
    pub const GUEST_NEED_KICK: u64 = 8;
    /// nmvm: `hwcur`.
    pub const HWCUR: u64 = 64;
    /// nmvm: `hwtail`; the guest owns `[head, hwtail)`.
    pub const HWTAIL: u64 = 68;
    /// nmvm: 1 = it sleeps, notify it after moving `head`.
    pub const HOST_NEED_KICK: u64 = 72;
}

/// Offsets in `struct netmap_if`.
pub mod nifp {
    /// `ni_tx_rings`.
    pub const TX_RINGS: u64 = 24;
    /// `ni_rx_rings`.
    pub const RX_RINGS: u64 = 28;
    /// `ni_host_tx_rings`.
    pub const HOST_TX_RINGS: u64 = 36;
    /// `ring_ofs[]`: i64 offsets from the `netmap_if`, tx rings, host tx rings, rx rings, ...
    pub const RING_OFS: u64 = 56;
}

/// Offsets in `struct netmap_ring` and `struct netmap_slot`.
pub mod ring {
    /// `buf_ofs` (i64): buffer 0, relative to the ring.
    pub const BUF_OFS: u64 = 0;
    /// `num_slots`.
    pub const NUM_SLOTS: u64 = 8;
    /// `nr_buf_size`.
    pub const BUF_SIZE: u64 = 12;
    /// `head`.
    pub const HEAD: u64 = 20;
    /// `tail`.
    pub const TAIL: u64 = 28;
    /// `slot[0]`.
    pub const SLOTS: u64 = 256;
    /// Bytes per slot: `buf_idx` u32, `len` u16, `flags` u16, `ptr` u64.
    pub const SLOT_SIZE: u64 = 16;
    /// `len` and `flags`, as one u32 (`len` in the low half).
    pub const SLOT_LEN_FLAGS: u64 = 4;
}

/// Slot flag: the slot's `buf_idx` changed.
pub const NS_BUF_CHANGED: u16 = 0x1;
/// Slot flag: the frame continues in the next slot.
pub const NS_MOREFRAG: u16 = 0x20;

/// Frames between two publications of `head`, at most.
pub const BATCH: u32 = 64;
/// Largest ring this driver accepts (keeps all index arithmetic far from overflow).
pub const MAX_SLOTS: u32 = 1 << 20;
/// Most rings, both directions together (their CSB entries must fit in the DMA area).
pub const MAX_RINGS: u32 = 256;
/// Smallest netmap buffer this driver accepts: a virtio-net header and an Ethernet header.
pub const MIN_BUF_SIZE: u32 = 64;
/// Frames `net=gen` sends by default.
pub const GEN_COUNT: u64 = 1000;
/// Valid frames `net=hostile` sends by default after its malformed slots.
pub const HOSTILE_COUNT: u64 = 100;
/// The hostile mode's buffer index: outside every pool.
pub const HOSTILE_BUF_IDX: u32 = 0xffff_ffff;
/// The hostile mode's slot length: more than any netmap buffer.
pub const HOSTILE_LEN: u16 = 65000;
/// How long the hostile mode waits for nmvm to hand a malformed slot back.
const HOSTILE_SECS: u64 = 1;
/// How long it leaves nmvm to see an impossible `head`, in fractions of a second. Nothing
/// shows that nmvm has seen it (it republishes the same `hwcur`), and nmvm keeps re-syncing
/// while it is there, so the pause is short but far beyond a worker's reaction time.
const HOSTILE_PAUSE_DIV: u64 = 10;

/// What the guest cannot do without nmvm's `--passthrough`.
const NO_FEATURE: &str =
    "path=netmap needs nmvm run --passthrough (feature bit 45 not offered), features";
const NO_CONFIG: &str =
    "path=netmap needs nmvm run --passthrough (no passthrough configuration), magic";
const SHORT_CONFIG: &str =
    "path=netmap needs nmvm run --passthrough (device configuration too short), length";

/// The port's netmap region (BAR 2 memory, which nmvm, its device worker and the port's peer
/// share with the guest), by guest-physical address. As for [`crate::virtio::Dma`], the
/// accessors are single, naturally aligned accesses that the compiler may neither merge nor
/// drop (volatile on bare metal); out-of-range or misaligned addresses read as 0 and ignore
/// writes.
pub trait Region {
    /// Makes `[base, base + len)` the region the other methods reach; `false` (and no change)
    /// when the machine cannot map memory there.
    fn region_map(&mut self, base: u64, len: u64) -> bool;
    /// Reads a little-endian `u32`.
    fn region_read32(&self, addr: u64) -> u32;
    /// Reads a little-endian `u64`.
    fn region_read64(&self, addr: u64) -> u64;
    /// Writes a little-endian `u32`.
    fn region_write32(&mut self, addr: u64, val: u32);
    /// The `len` bytes at `addr`, for buffers in slots the guest owns; empty if the range is
    /// not inside the region.
    fn region_bytes(&mut self, addr: u64, len: usize) -> &mut [u8];
}

/// Everything the netmap path needs: the virtio path's machine and the region.
pub trait NetmapHw: Hw + Region {}

impl<T: Hw + Region> NetmapHw for T {}

/// The slot after `i` on a ring of `n` slots.
pub fn nm_next(i: u32, n: u32) -> u32 {
    if i + 1 >= n {
        0
    } else {
        i + 1
    }
}

/// Slots from `a` forward to `b` (both below `n`).
pub fn nm_dist(a: u32, b: u32, n: u32) -> u32 {
    if b >= a {
        b - a
    } else {
        b + n - a
    }
}

/// `i` moved forward by `k` slots (`i`, `k` below `n`).
pub fn nm_add(i: u32, k: u32, n: u32) -> u32 {
    let j = i + k;
    if j >= n {
        j - n
    } else {
        j
    }
}

/// Whether `x` lies in `[a, b]`, going forward from `a` (netmap's rule for `head` and `cur`).
pub fn nm_within(a: u32, x: u32, b: u32, n: u32) -> bool {
    x < n && nm_dist(a, x, n) <= nm_dist(a, b, n)
}

/// The passthrough fields of the device configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Geometry {
    /// Offset of the port's `netmap_if` in the region.
    pub nifp_offset: u32,
    /// Tx rings the guest may use.
    pub tx_rings: u32,
    /// Rx rings the guest may use.
    pub rx_rings: u32,
    /// Slots per tx ring.
    pub tx_slots: u32,
    /// Slots per rx ring.
    pub rx_slots: u32,
    /// Bytes per buffer.
    pub buf_size: u32,
    /// Bytes of virtio-net header in front of each frame.
    pub vnet_hdr_len: u32,
    /// Bytes of the region.
    pub region_size: u64,
}

impl Geometry {
    /// Reads and checks the fields of the device configuration at `dev_cfg`.
    fn read(hw: &mut impl NetmapHw, dev_cfg: u64) -> Result<Geometry, Error> {
        let magic = hw.mmio_read32(dev_cfg + cfg::MAGIC);
        if magic != MAGIC {
            return Err(Error::with(NO_CONFIG, magic.into()));
        }
        let version = hw.mmio_read32(dev_cfg + cfg::VERSION);
        if version != VERSION {
            return Err(Error::with(
                "netmap: unsupported passthrough version",
                version.into(),
            ));
        }
        let mut rd = |off| hw.mmio_read32(dev_cfg + off);
        let g = Geometry {
            nifp_offset: rd(cfg::NIFP_OFFSET),
            tx_rings: rd(cfg::TX_RINGS),
            rx_rings: rd(cfg::RX_RINGS),
            tx_slots: rd(cfg::TX_SLOTS),
            rx_slots: rd(cfg::RX_SLOTS),
            buf_size: rd(cfg::BUF_SIZE),
            vnet_hdr_len: rd(cfg::VNET_HDR_LEN),
            region_size: u64::from(rd(cfg::REGION_SIZE_HI)) << 32
                | u64::from(rd(cfg::REGION_SIZE_LO)),
        };
        g.check()?;
        Ok(g)
    }

    /// Rejects what this driver cannot work with.
    fn check(&self) -> Result<(), Error> {
        if self.tx_rings == 0 || self.rx_rings == 0 || self.tx_rings + self.rx_rings > MAX_RINGS {
            return Err(Error::with(
                "netmap: unusable ring count, tx rings",
                self.tx_rings.into(),
            ));
        }
        for slots in [self.tx_slots, self.rx_slots] {
            if !(2..=MAX_SLOTS).contains(&slots) {
                return Err(Error::with("netmap: unusable ring size", slots.into()));
            }
        }
        if self.vnet_hdr_len != 0 && self.vnet_hdr_len != net::VNET_HDR_LEN as u32 {
            return Err(Error::with(
                "netmap: unsupported vnet_hdr_len",
                self.vnet_hdr_len.into(),
            ));
        }
        if self.buf_size < MIN_BUF_SIZE {
            return Err(Error::with(
                "netmap: buffers too small, buf_size",
                self.buf_size.into(),
            ));
        }
        Ok(())
    }

    /// CSB entries: one per ring.
    fn rings(&self) -> u32 {
        self.tx_rings + self.rx_rings
    }
}

/// A guest-physical range `[base, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    base: u64,
    end: u64,
}

impl Window {
    /// Whether `[addr, addr + len)` lies inside.
    fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.base && addr.checked_add(len).is_some_and(|e| e <= self.end)
    }
}

/// Where the region is: through the shared memory capability, else BAR 2 from offset 0; its
/// length must be the configuration's `region_size`, and it must not cover BAR0's registers.
fn locate_region(
    hw: &mut impl NetmapHw,
    dev: u8,
    bar0: Bar,
    geo: &Geometry,
) -> Result<Window, Error> {
    let (bar, offset, len) = match pci::find_shared_memory(hw, dev, SHM_ID) {
        Some(s) => (s.bar, s.offset, s.len),
        None => (SHM_BAR, 0, geo.region_size),
    };
    if len != geo.region_size || len == 0 {
        return Err(Error::with(
            "netmap: shared memory capability and region_size disagree, capability length",
            len,
        ));
    }
    let bar_addr = pci::mem_bar_addr(hw, dev, bar)?;
    let base = bar_addr
        .checked_add(offset)
        .filter(|_| bar_addr != 0)
        .ok_or(Error::with(
            "netmap: region BAR unassigned or offset too large",
            offset,
        ))?;
    let end = base
        .checked_add(len)
        .ok_or(Error::with("netmap: region wraps around, base", base))?;
    if base < bar0.addr.saturating_add(bar0.size) && bar0.addr < end {
        return Err(Error::with("netmap: region overlaps BAR0, base", base));
    }
    Ok(Window { base, end })
}

/// One netmap slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    buf_idx: u32,
    len: u16,
    flags: u16,
}

/// A received frame at the ring's `head`.
#[derive(Clone, Copy, Debug)]
struct RxFrame {
    /// Slots it takes.
    slots: u32,
    /// Its first slot.
    first: Slot,
    /// False for a chain of `NS_MOREFRAG` slots that fills every slot the guest can own
    /// without ending: it never completes, so it is taken as one unusable frame.
    complete: bool,
}

/// One ring as the guest operates it, with its CSB entry.
#[derive(Clone, Copy, Debug)]
struct Ring {
    /// The `netmap_ring`.
    addr: u64,
    /// Buffer 0 (the ring's address plus its `buf_ofs`).
    bufs: u64,
    /// The region: every buffer must lie inside it.
    region: Window,
    /// Slots.
    n: u32,
    /// Bytes per buffer.
    buf_size: u32,
    /// The CSB entry.
    csb: u64,
    /// Notification address and queue index (tx ring: queue 1; rx ring: queue 0).
    notify: u64,
    queue: u16,
    /// The guest's `head`: the next slot to fill (tx) or to consume (rx).
    head: u32,
    /// `head` as last written to the CSB.
    published: u32,
    /// `hwtail` as last read from the CSB.
    hwtail: u32,
}

impl Ring {
    /// The ring at `addr`, checked against the region and the device's geometry (`slots`,
    /// `buf_size`); its `head` and `tail` are the positions it starts from.
    fn open(
        hw: &impl NetmapHw,
        region: Window,
        addr: u64,
        slots: u32,
        buf_size: u32,
    ) -> Result<Ring, Error> {
        let bytes = ring::SLOTS + ring::SLOT_SIZE * u64::from(slots);
        if addr % 8 != 0 || !region.contains(addr, bytes) {
            return Err(Error::with("netmap: ring outside the region at", addr));
        }
        let n = hw.region_read32(addr + ring::NUM_SLOTS);
        if n != slots {
            return Err(Error::with(
                "netmap: ring size differs from the device's, num_slots",
                n.into(),
            ));
        }
        let bs = hw.region_read32(addr + ring::BUF_SIZE);
        if bs != buf_size {
            return Err(Error::with(
                "netmap: buffer size differs from the device's, nr_buf_size",
                bs.into(),
            ));
        }
        let buf_ofs = hw.region_read64(addr + ring::BUF_OFS) as i64;
        let bufs = addr
            .checked_add_signed(buf_ofs)
            .ok_or(Error::with("netmap: bad buf_ofs", buf_ofs as u64))?;
        let head = hw.region_read32(addr + ring::HEAD);
        if head >= n {
            return Err(Error::with("netmap: ring head out of range:", head.into()));
        }
        let tail = hw.region_read32(addr + ring::TAIL);
        Ok(Ring {
            addr,
            bufs,
            region,
            n,
            buf_size,
            csb: 0,
            notify: 0,
            queue: 0,
            head,
            published: head,
            hwtail: if tail < n { tail } else { head },
        })
    }

    fn slot_addr(&self, i: u32) -> u64 {
        self.addr + ring::SLOTS + ring::SLOT_SIZE * u64::from(i)
    }

    fn read_slot(&self, hw: &impl NetmapHw, i: u32) -> Slot {
        let a = self.slot_addr(i);
        let lf = hw.region_read32(a + ring::SLOT_LEN_FLAGS);
        Slot {
            buf_idx: hw.region_read32(a),
            len: lf as u16,
            flags: (lf >> 16) as u16,
        }
    }

    fn write_len_flags(&self, hw: &mut impl NetmapHw, i: u32, len: u16, flags: u16) {
        let lf = u32::from(len) | u32::from(flags) << 16;
        hw.region_write32(self.slot_addr(i) + ring::SLOT_LEN_FLAGS, lf);
    }

    fn write_slot(&self, hw: &mut impl NetmapHw, i: u32, s: Slot) {
        hw.region_write32(self.slot_addr(i), s.buf_idx);
        self.write_len_flags(hw, i, s.len, s.flags);
    }

    /// Address of buffer `buf_idx`, if the whole buffer lies inside the region.
    fn buf_addr(&self, buf_idx: u32) -> Option<u64> {
        // Both factors are below 2^32, so the product fits.
        let addr = self
            .bufs
            .checked_add(u64::from(buf_idx) * u64::from(self.buf_size))?;
        self.region
            .contains(addr, self.buf_size.into())
            .then_some(addr)
    }

    /// The first `len` bytes of buffer `buf_idx`, if it is a buffer of the region and `len`
    /// fits in it.
    fn buf<'a>(&self, hw: &'a mut impl NetmapHw, buf_idx: u32, len: usize) -> Option<&'a mut [u8]> {
        if len > self.buf_size as usize {
            return None;
        }
        let b = hw.region_bytes(self.buf_addr(buf_idx)?, len);
        (b.len() == len).then_some(b)
    }

    /// Slots the guest owns: `[head, hwtail)`.
    fn avail(&self) -> u32 {
        nm_dist(self.head, self.hwtail, self.n)
    }

    /// Reads `hwtail` from the CSB (checked) and returns the slots the guest now owns.
    fn refresh(&mut self, hw: &impl NetmapHw) -> Result<u32, Error> {
        let t = hw.dma_read32(self.csb + csb::HWTAIL);
        // Slots and buffers are read only after hwtail (x86 keeps loads in order; the compiler
        // must too).
        compiler_fence(Ordering::SeqCst);
        if t >= self.n {
            return Err(Error::with(
                "netmap: nmvm published an hwtail out of range:",
                t.into(),
            ));
        }
        self.hwtail = t;
        Ok(self.avail())
    }

    /// Writes `cur`, then `head`, after everything written to slots and buffers before.
    fn write_positions(&mut self, hw: &mut impl NetmapHw, cur: u32, head: u32) {
        compiler_fence(Ordering::SeqCst);
        hw.dma_write32(self.csb + csb::CUR, cur);
        compiler_fence(Ordering::SeqCst);
        hw.dma_write32(self.csb + csb::HEAD, head);
        self.published = head;
    }

    /// Notifies the ring's queue if nmvm sleeps, or in any case with `always`. The full
    /// barrier orders the `head` store before the `host_need_kick` load: otherwise nmvm could
    /// go to sleep after missing our `head` while we read its old "awake".
    fn kick(&self, hw: &mut impl NetmapHw, always: bool) {
        hw.full_barrier();
        if always || hw.dma_read32(self.csb + csb::HOST_NEED_KICK) != 0 {
            Transport::notify(hw, self.notify, self.queue);
        }
    }

    /// Hands the slots before `head` to nmvm, if it moved, and notifies if needed.
    fn publish(&mut self, hw: &mut impl NetmapHw) {
        if self.head != self.published {
            self.write_positions(hw, self.head, self.head);
            self.kick(hw, false);
        }
    }

    /// Starts again from nmvm's `hwcur` (after it refused our positions): `head = cur =
    /// hwcur`, published and notified.
    fn resync(&mut self, hw: &mut impl NetmapHw) -> Result<u32, Error> {
        let hwcur = hw.dma_read32(self.csb + csb::HWCUR);
        if hwcur >= self.n {
            return Err(Error::with(
                "netmap: nmvm published an hwcur out of range:",
                hwcur.into(),
            ));
        }
        self.head = hwcur;
        self.write_positions(hw, hwcur, hwcur);
        self.kick(hw, true);
        self.refresh(hw)?;
        Ok(hwcur)
    }

    /// The frame at `head`, if one is there (whole).
    fn rx_frame(&self, hw: &impl NetmapHw) -> Option<RxFrame> {
        let avail = self.avail();
        if avail == 0 {
            return None;
        }
        let first = self.read_slot(hw, self.head);
        let (mut i, mut s, mut k) = (self.head, first, 1);
        while s.flags & NS_MOREFRAG != 0 {
            if k == avail {
                // The rest has not arrived yet, unless the chain already fills every slot
                // nmvm can give us.
                return (avail == self.n - 1).then_some(RxFrame {
                    slots: k,
                    first,
                    complete: false,
                });
            }
            i = nm_next(i, self.n);
            s = self.read_slot(hw, i);
            k += 1;
        }
        Some(RxFrame {
            slots: k,
            first,
            complete: true,
        })
    }

    /// Whether the frame `f` at `head` is a valid test frame. A frame spanning slots is
    /// gathered into `scratch` first (one longer than a test frame is invalid anyway).
    fn frame_ok(
        &self,
        hw: &mut impl NetmapHw,
        f: &RxFrame,
        hdr: usize,
        scratch: &mut [u8; frame::MAX_LEN],
    ) -> bool {
        if !f.complete {
            return false;
        }
        if f.slots == 1 {
            let len = usize::from(f.first.len);
            return len >= hdr
                && self
                    .buf(hw, f.first.buf_idx, len)
                    .and_then(|b| b.get(hdr..))
                    .is_some_and(|b| frame::verify_frame(b).is_ok());
        }
        let (mut i, mut total) = (self.head, 0);
        for j in 0..f.slots {
            let s = if j == 0 {
                f.first
            } else {
                self.read_slot(hw, i)
            };
            let skip = if j == 0 { hdr } else { 0 };
            let Some(src) = self
                .buf(hw, s.buf_idx, s.len.into())
                .and_then(|b| b.get(skip..))
            else {
                return false;
            };
            let Some(dst) = scratch.get_mut(total..total + src.len()) else {
                return false;
            };
            for (d, x) in dst.iter_mut().zip(src.iter()) {
                *d = *x;
            }
            total += src.len();
            i = nm_next(i, self.n);
        }
        scratch
            .get(..total)
            .is_some_and(|b| frame::verify_frame(b).is_ok())
    }
}

/// The rings the guest uses, once passthrough runs.
struct Port {
    tx: Ring,
    rx: Ring,
    /// Bytes of virtio-net header in front of each frame.
    hdr: usize,
    mac: [u8; 6],
    /// Where a received frame spanning slots is gathered.
    scratch: [u8; frame::MAX_LEN],
}

/// Finds every ring the CSB has an entry for, fills the entries in (`head` and `cur` from the
/// ring; `hwcur`/`hwtail` too, and `host_need_kick` 1, until nmvm publishes its own), and
/// returns tx ring 0 and rx ring 0.
fn open_rings(
    hw: &mut impl NetmapHw,
    region: Window,
    geo: &Geometry,
    csb_base: u64,
) -> Result<(Ring, Ring), Error> {
    let nifp = region
        .base
        .checked_add(geo.nifp_offset.into())
        .filter(|a| a % 8 == 0 && region.contains(*a, nifp::RING_OFS))
        .ok_or(Error::with(
            "netmap: bad nifp_offset",
            geo.nifp_offset.into(),
        ))?;
    let ni_tx = hw.region_read32(nifp + nifp::TX_RINGS);
    let ni_rx = hw.region_read32(nifp + nifp::RX_RINGS);
    let ni_host_tx = hw.region_read32(nifp + nifp::HOST_TX_RINGS);
    if geo.tx_rings > ni_tx || geo.rx_rings > ni_rx {
        return Err(Error::with(
            "netmap: the netmap_if has fewer rings than the device says, ni_tx_rings",
            ni_tx.into(),
        ));
    }
    // rx ring i is ring_ofs[ni_tx_rings + ni_host_tx_rings + i].
    let rx_first = u64::from(ni_tx) + u64::from(ni_host_tx);
    let ofs_end = 8 * (rx_first + u64::from(geo.rx_rings));
    if !region.contains(nifp + nifp::RING_OFS, ofs_end) {
        return Err(Error::with(
            "netmap: ring_ofs[] runs past the region, rings",
            rx_first,
        ));
    }
    for b in hw.dma_bytes(csb_base, (csb::ENTRY * u64::from(geo.rings())) as usize) {
        *b = 0;
    }
    let mut first = [None, None];
    for e in 0..geo.rings() {
        let tx = e < geo.tx_rings;
        let (index, slots) = if tx {
            (u64::from(e), geo.tx_slots)
        } else {
            (rx_first + u64::from(e - geo.tx_rings), geo.rx_slots)
        };
        let ofs = hw.region_read64(nifp + nifp::RING_OFS + 8 * index) as i64;
        let addr = nifp
            .checked_add_signed(ofs)
            .ok_or(Error::with("netmap: bad ring_ofs", ofs as u64))?;
        let mut r = Ring::open(hw, region, addr, slots, geo.buf_size)?;
        r.csb = csb_base + csb::ENTRY * u64::from(e);
        for (off, v) in [
            (csb::HEAD, r.head),
            (csb::CUR, r.head),
            (csb::GUEST_NEED_KICK, 0),
            (csb::HWCUR, r.head),
            (csb::HWTAIL, r.hwtail),
            (csb::HOST_NEED_KICK, 1),
        ] {
            hw.dma_write32(r.csb + off, v);
        }
        if e == 0 || e == geo.tx_rings {
            first[usize::from(!tx)] = Some(r);
        }
    }
    match first {
        [Some(tx), Some(rx)] => Ok((tx, rx)),
        _ => Err(Error::new("netmap: no rings")),
    }
}

/// Writes the CSB address and `control = 1`, then waits until `control` reads 1.
fn start(hw: &mut impl NetmapHw, dev_cfg: u64, csb_base: u64) -> Result<(), Error> {
    hw.mmio_write32(dev_cfg + cfg::CSB_LO, csb_base as u32);
    hw.mmio_write32(dev_cfg + cfg::CSB_HI, (csb_base >> 32) as u32);
    hw.mmio_write32(dev_cfg + cfg::CONTROL, control::ON);
    let mut stall = Stall::new(hw, STALL_SECS);
    loop {
        match hw.mmio_read32(dev_cfg + cfg::CONTROL) {
            control::ON => return Ok(()),
            control::REFUSED => {
                return Err(Error::with(
                    "netmap: nmvm refused to start passthrough (its log says why), control",
                    control::REFUSED.into(),
                ))
            }
            v => {
                if stall.idle(hw) {
                    return Err(Error::with(
                        "netmap: passthrough did not start, control",
                        v.into(),
                    ));
                }
            }
        }
    }
}

/// `nmvm-guest: netmap passthrough: T tx rings of S slots, R rx rings[ of S' slots], buf B
/// bytes, hdr H` (the rx ring size only when it differs). The line is kept short: each console
/// byte costs two VM exits, which count against a run's exits per packet.
fn write_geometry(out: &mut impl Sink, g: &Geometry) {
    out.write(b"nmvm-guest: netmap passthrough: ");
    out.write_dec(g.tx_rings.into());
    out.write(b" tx rings of ");
    out.write_dec(g.tx_slots.into());
    out.write(b" slots, ");
    out.write_dec(g.rx_rings.into());
    out.write(b" rx rings");
    if g.rx_slots != g.tx_slots {
        out.write(b" of ");
        out.write_dec(g.rx_slots.into());
        out.write(b" slots");
    }
    out.write(b", buf ");
    out.write_dec(g.buf_size.into());
    out.write(b" bytes, hdr ");
    out.write_dec(g.vnet_hdr_len.into());
    out.write(b"\n");
}

/// Runs `mode` on the passed-through rings to its end; the caller prints the counters (or the
/// error) and exits, as for [`net::run`].
pub fn run(
    hw: &mut impl NetmapHw,
    mode: NetMode,
    count: Option<u64>,
    len: FrameLen,
) -> Result<Counters, Error> {
    let base = net::check_dma_area(hw)?;
    let (dev, bar0, caps) = net::probe(hw)?;
    let t = Transport::new(caps);
    let started = net::start_device(hw, &t, base, net::WANTED_FEATURES | feature::NMVM_NETMAP)?;
    // No `virtio-net <mac> features` line here (nmvm's --stats shows the features): the
    // console is most of this path's VM exits.
    if started.features & feature::NMVM_NETMAP == 0 {
        return Err(Error::with(NO_FEATURE, started.features));
    }
    if u64::from(caps.device.len) < cfg::END {
        return Err(Error::with(SHORT_CONFIG, caps.device.len.into()));
    }
    let geo = Geometry::read(hw, caps.device.addr)?;
    let region = locate_region(hw, dev, bar0, &geo)?;
    if !hw.region_map(region.base, region.end - region.base) {
        return Err(Error::with("netmap: cannot map the region at", region.base));
    }
    let csb_base = base + net::RINGS_BYTES as u64;
    let (mut tx, mut rx) = open_rings(hw, region, &geo, csb_base)?;
    tx.notify = started.tx_notify;
    tx.queue = 1;
    rx.notify = started.rx_notify;
    rx.queue = 0;
    start(hw, caps.device.addr, csb_base)?;
    tx.refresh(hw)?;
    rx.refresh(hw)?;
    write_geometry(hw, &geo);

    let mut port = Port {
        tx,
        rx,
        hdr: geo.vnet_hdr_len as usize,
        mac: started.mac,
        scratch: [0; frame::MAX_LEN],
    };
    let mut c = Counters::default();
    match mode {
        NetMode::Echo => port.echo(hw, count, &mut c)?,
        NetMode::Sink => port.sink(hw, count, &mut c)?,
        NetMode::Gen => port.gen(hw, count.unwrap_or(GEN_COUNT), len, &mut c)?,
        NetMode::Hostile => port.hostile(hw, count.unwrap_or(HOSTILE_COUNT), len, &mut c)?,
    }
    Ok(c)
}

impl Port {
    /// Receives and verifies the frames waiting (until `c.rx` reaches `limit`), returning
    /// their slots every [`BATCH`] frames and at the end. Says whether there were any.
    fn rx_drain(
        &mut self,
        hw: &mut impl NetmapHw,
        c: &mut Counters,
        limit: u64,
    ) -> Result<bool, Error> {
        self.rx.refresh(hw)?;
        let mut any = false;
        let mut batch = 0;
        while c.rx < limit {
            let Some(f) = self.rx.rx_frame(hw) else {
                break;
            };
            c.rx += 1;
            if !self.rx.frame_ok(hw, &f, self.hdr, &mut self.scratch) {
                c.bad += 1;
            }
            self.rx.head = nm_add(self.rx.head, f.slots, self.rx.n);
            any = true;
            batch += 1;
            if batch == BATCH {
                self.rx.publish(hw);
                batch = 0;
            }
        }
        self.rx.publish(hw);
        Ok(any)
    }

    /// Waits until nmvm has sent everything published: the whole window is free again.
    fn drain_tx(&mut self, hw: &mut impl NetmapHw, what: &'static str) -> Result<(), Error> {
        self.tx.publish(hw);
        let mut stall = Stall::new(hw, STALL_SECS);
        let mut tail = self.tx.hwtail;
        loop {
            if self.tx.refresh(hw)? == self.tx.n - 1 {
                return Ok(());
            }
            if self.tx.hwtail != tail {
                tail = self.tx.hwtail;
                stall.progress();
            } else if stall.idle(hw) {
                return Err(Error::with(what, self.tx.hwtail.into()));
            }
        }
    }

    /// `net=sink`: receive, verify and count.
    fn sink(
        &mut self,
        hw: &mut impl NetmapHw,
        count: Option<u64>,
        c: &mut Counters,
    ) -> Result<(), Error> {
        let limit = count.unwrap_or(u64::MAX);
        while c.rx < limit && !hw.expired() {
            if self.rx_drain(hw, c, limit)? {
                hw.mark();
            } else {
                hw.relax();
            }
        }
        Ok(())
    }

    /// Whether the frame `f` can be echoed: whole, with a header and MACs in its first slot.
    fn echoable(&self, f: &RxFrame) -> bool {
        f.complete && usize::from(f.first.len) >= self.hdr + 14
    }

    /// Sends the frame `f` at the rx ring's `head` back from the tx ring's `head`, which has
    /// room for it: MACs swapped and header zeroed in place, then each rx slot's buffer
    /// swapped with the tx slot's. `false` (nothing changed) if `f` cannot be echoed.
    fn echo_frame(&mut self, hw: &mut impl NetmapHw, f: &RxFrame) -> bool {
        let hdr = self.hdr;
        if !self.echoable(f) {
            return false;
        }
        let Some(b) = self.rx.buf(hw, f.first.buf_idx, hdr + 12) else {
            return false;
        };
        net::swap_macs(b, hdr);
        let (mut ri, mut ti) = (self.rx.head, self.tx.head);
        for j in 0..f.slots {
            let rs = if j == 0 {
                f.first
            } else {
                self.rx.read_slot(hw, ri)
            };
            let free = hw.region_read32(self.tx.slot_addr(ti));
            let tx_slot = Slot {
                buf_idx: rs.buf_idx,
                len: rs.len,
                flags: NS_BUF_CHANGED | (rs.flags & NS_MOREFRAG),
            };
            self.tx.write_slot(hw, ti, tx_slot);
            let rx_slot = Slot {
                buf_idx: free,
                len: 0,
                flags: NS_BUF_CHANGED,
            };
            self.rx.write_slot(hw, ri, rx_slot);
            ri = nm_next(ri, self.rx.n);
            ti = nm_next(ti, self.tx.n);
        }
        self.tx.head = ti;
        true
    }

    /// `net=echo`: every received frame goes back with its MACs swapped, zero-copy.
    fn echo(
        &mut self,
        hw: &mut impl NetmapHw,
        count: Option<u64>,
        c: &mut Counters,
    ) -> Result<(), Error> {
        let limit = count.unwrap_or(u64::MAX);
        let mut stall = Stall::new(hw, STALL_SECS);
        while c.tx < limit && !hw.expired() {
            self.tx.refresh(hw)?;
            self.rx.refresh(hw)?;
            let (mut progress, mut blocked) = (false, false);
            let mut batch = 0;
            while c.tx < limit {
                let Some(f) = self.rx.rx_frame(hw) else {
                    break;
                };
                if self.echoable(&f) && f.slots > self.tx.avail() {
                    blocked = true;
                    break;
                }
                c.rx += 1;
                if self.echo_frame(hw, &f) {
                    c.tx += 1;
                } else {
                    c.bad += 1;
                }
                self.rx.head = nm_add(self.rx.head, f.slots, self.rx.n);
                progress = true;
                batch += 1;
                if batch == BATCH {
                    self.tx.publish(hw);
                    self.rx.publish(hw);
                    batch = 0;
                }
            }
            self.tx.publish(hw);
            self.rx.publish(hw);
            if progress {
                hw.mark();
                stall.progress();
            } else if blocked {
                // Frames wait, but nmvm does not free transmit slots.
                if stall.idle(hw) {
                    return Err(Error::with(
                        "netmap echo: transmit ring stuck, hwtail",
                        self.tx.hwtail.into(),
                    ));
                }
            } else {
                stall.progress();
                hw.relax();
            }
        }
        self.drain_tx(hw, "netmap echo: frames not sent, hwtail")
    }

    /// Builds frame `seq` (`flen` bytes, after a zeroed header) in the buffer of the tx slot
    /// at `head` and moves `head` on.
    fn gen_frame(
        &mut self,
        hw: &mut impl NetmapHw,
        fg: &FrameGen,
        seq: u64,
        flen: usize,
    ) -> Result<(), Error> {
        let i = self.tx.head;
        let idx = hw.region_read32(self.tx.slot_addr(i));
        let total = self.hdr + flen;
        let buf = self.tx.buf(hw, idx, total).ok_or(Error::with(
            "netmap: a transmit slot has a bad buffer index:",
            idx.into(),
        ))?;
        let (hdr, f) = buf.split_at_mut(self.hdr.min(buf.len()));
        hdr.fill(0);
        // The buffer held anything (buffers circulate between the pipe's ends): build it all.
        if fg.build(f, seq, flen, 0, flen) == 0 {
            return Err(Error::with(
                "gen: cannot build a frame of length",
                flen as u64,
            ));
        }
        self.tx.write_len_flags(hw, i, total as u16, 0);
        self.tx.head = nm_next(i, self.tx.n);
        Ok(())
    }

    /// `net=gen`: sends frames `0..count` and waits until nmvm has sent them all.
    fn gen(
        &mut self,
        hw: &mut impl NetmapHw,
        count: u64,
        len: FrameLen,
        c: &mut Counters,
    ) -> Result<(), Error> {
        if self.hdr + usize::from(len.max) > self.tx.buf_size as usize {
            return Err(Error::with(
                "netmap gen: frames do not fit in a netmap buffer, buf_size",
                self.tx.buf_size.into(),
            ));
        }
        let fg = FrameGen::new(self.mac);
        let n = self.tx.n;
        let mut seq = 0u64;
        let mut stall = Stall::new(hw, STALL_SECS);
        let mut tail = self.tx.hwtail;
        while seq < count && !hw.expired() {
            let mut progress = self.rx_drain(hw, c, u64::MAX)?;
            let room = self.tx.refresh(hw)?;
            if self.tx.hwtail != tail {
                tail = self.tx.hwtail;
                progress = true;
            }
            let want = (count - seq).min(BATCH.into()) as u32;
            // While earlier frames are in flight, wait for room for a whole batch: small
            // batches would each cost a notification of a sleeping nmvm.
            if room > 0 && (room >= want || room == n - 1) {
                let k = room.min(want);
                for _ in 0..k {
                    self.gen_frame(hw, &fg, seq, frame::gen_len(seq, len.min, len.max))?;
                    seq += 1;
                }
                self.tx.publish(hw);
                c.tx += u64::from(k);
                hw.mark();
                progress = true;
            }
            if progress {
                stall.progress();
            } else if stall.idle(hw) {
                return Err(Error::with(
                    "netmap gen: transmit ring stuck, hwtail",
                    self.tx.hwtail.into(),
                ));
            }
        }
        self.drain_tx(hw, "netmap gen: frames not sent, hwtail")
    }

    /// Publishes the tx ring's `head` (covering one malformed slot), notifies nmvm whatever
    /// `host_need_kick` says, and waits a little for it to hand the whole window back. If it
    /// does not, starts again from its `hwcur`. `Some(hwcur)` in that case.
    fn hostile_post(&mut self, hw: &mut impl NetmapHw) -> Result<Option<u32>, Error> {
        let head = self.tx.head;
        self.tx.write_positions(hw, head, head);
        self.tx.kick(hw, true);
        let limit = hw.ticks_per_sec().saturating_mul(HOSTILE_SECS);
        let start = hw.ticks();
        while hw.ticks().wrapping_sub(start) <= limit {
            if self.tx.refresh(hw)? == self.tx.n - 1 {
                return Ok(None);
            }
            hw.relax();
        }
        self.tx.resync(hw).map(Some)
    }

    fn hostile_line(hw: &mut impl NetmapHw, what: &[u8], resumed: Option<u32>) {
        hw.write(b"nmvm-guest: hostile: netmap ");
        hw.write(what);
        match resumed {
            None => hw.write(b": dropped\n"),
            Some(at) => {
                hw.write(b": not handed back, resumed at hwcur ");
                hw.write_dec(at.into());
                hw.write(b"\n");
            }
        }
    }

    /// `net=hostile`: three malformed publications on the tx ring, then `count` valid frames.
    fn hostile(
        &mut self,
        hw: &mut impl NetmapHw,
        count: u64,
        len: FrameLen,
        c: &mut Counters,
    ) -> Result<(), Error> {
        // From an idle ring, nmvm's verdict on each slot shows as the window coming back whole.
        self.drain_tx(hw, "netmap hostile: ring not idle, hwtail")?;
        let n = self.tx.n;
        let good_len = (self.hdr + frame::MIN_LEN) as u16;

        // 1. A buffer index outside the pool.
        let i = self.tx.head;
        let saved = hw.region_read32(self.tx.slot_addr(i));
        let bad = Slot {
            buf_idx: HOSTILE_BUF_IDX,
            len: good_len,
            flags: 0,
        };
        self.tx.write_slot(hw, i, bad);
        self.tx.head = nm_next(i, n);
        let r = self.hostile_post(hw)?;
        Self::hostile_line(hw, b"buffer index 0xffffffff", r);
        c.bad += 1;
        // nmvm puts a spare buffer there; if it had none left, the slot gets its own back.
        if hw.region_read32(self.tx.slot_addr(i)) == HOSTILE_BUF_IDX {
            hw.region_write32(self.tx.slot_addr(i), saved);
        }

        // 2. A length beyond any buffer.
        let i = self.tx.head;
        self.tx.write_len_flags(hw, i, HOSTILE_LEN, 0);
        self.tx.head = nm_next(i, n);
        let r = self.hostile_post(hw)?;
        Self::hostile_line(hw, b"length 65000", r);
        c.bad += 1;

        // 3. A head outside [hwcur, hwtail]: the slot after hwtail when that is outside, else
        // (a wholly free window covers every slot) an index past the ring's end.
        self.tx.refresh(hw)?;
        let tail = self.tx.hwtail;
        let bogus = if self.tx.avail() < n - 1 {
            nm_next(tail, n)
        } else {
            n
        };
        self.tx.write_positions(hw, bogus, bogus);
        self.tx.kick(hw, true);
        let pause = hw.ticks_per_sec() / HOSTILE_PAUSE_DIV;
        let start = hw.ticks();
        while hw.ticks().wrapping_sub(start) < pause {
            hw.relax();
        }
        let at = self.tx.resync(hw)?;
        hw.write(b"nmvm-guest: hostile: netmap head ");
        hw.write_dec(bogus.into());
        hw.write(b" beyond hwtail ");
        hw.write_dec(tail.into());
        hw.write(b": resumed at hwcur ");
        hw.write_dec(at.into());
        hw.write(b"\n");
        c.bad += 1;

        self.gen(hw, count, len, c)?;
        hw.write(b"nmvm-guest: hostile: netmap recovered\n");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
