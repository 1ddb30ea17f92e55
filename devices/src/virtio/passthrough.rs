//! Netmap passthrough: a netmap-aware guest operates the port's rings
//! itself, in the port's memory region mapped into its physical address
//! space (BAR 2), and the device worker does on its behalf what the kernel
//! does for a netmap application: it syncs the rings with the peer.
//!
//! Guest and worker talk through a CSB (control and status block) in guest
//! RAM, one 128-byte entry per ring, tx rings first: the guest publishes
//! `head`/`cur` and whether it wants an interrupt; the worker publishes
//! `hwcur`/`hwtail` and whether it sleeps and wants a kick. The guest-facing
//! contract (feature bit, configuration fields, CSB layout, ordering rules)
//! is documented in the README, section "Netmap passthrough".
//!
//! Everything the guest writes is untrusted: the CSB values are copied into
//! the netmap ring and the port's sync validates them against its private
//! copies of the ring state, as it would for any netmap application; slot
//! contents are validated by the sync too. A guest can only lose its own
//! frames.

use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};

use log::debug;

use super::splitq::GuestRam;
use crate::netmap::Port;

/// Feature bit: the device can pass its netmap rings through (outside the
/// standard virtio-net bits; drivers that do not know it never accept it).
pub const F_NMVM_NETMAP: u64 = 1 << 45;

/// `id` of the shared memory capability that describes the region.
pub const SHM_ID_NETMAP: u8 = 0;

/// Where the passthrough fields start in the device-specific configuration.
pub const CFG_BASE: u64 = 0x40;
/// Length of the passthrough fields.
pub const CFG_LEN: u64 = 0x40;

/// `magic`: "NMPT".
pub const MAGIC: u32 = 0x5450_4d4e;
/// `version`.
pub const VERSION: u32 = 1;

/// Offsets of the fields, relative to [`CFG_BASE`].
pub mod cfg {
    /// `magic`.
    pub const MAGIC: u64 = 0x00;
    /// `version`.
    pub const VERSION: u64 = 0x04;
    /// `nifp_offset`.
    pub const NIFP_OFFSET: u64 = 0x08;
    /// `tx_rings`.
    pub const TX_RINGS: u64 = 0x0c;
    /// `rx_rings`.
    pub const RX_RINGS: u64 = 0x10;
    /// `tx_slots`.
    pub const TX_SLOTS: u64 = 0x14;
    /// `rx_slots`.
    pub const RX_SLOTS: u64 = 0x18;
    /// `buf_size`.
    pub const BUF_SIZE: u64 = 0x1c;
    /// `vnet_hdr_len`.
    pub const VNET_HDR_LEN: u64 = 0x20;
    /// `region_size_lo`.
    pub const REGION_SIZE_LO: u64 = 0x24;
    /// `region_size_hi`.
    pub const REGION_SIZE_HI: u64 = 0x28;
    /// `csb_addr_lo` (read-write).
    pub const CSB_LO: u64 = 0x30;
    /// `csb_addr_hi` (read-write).
    pub const CSB_HI: u64 = 0x34;
    /// `control` (read-write).
    pub const CONTROL: u64 = 0x38;
}

/// `control` reads: passthrough is off.
pub const CONTROL_OFF: u32 = 0;
/// `control` reads: the worker operates the rings for the guest.
pub const CONTROL_ON: u32 = 1;
/// `control` reads: the last start was refused (see the log).
pub const CONTROL_REFUSED: u32 = 2;

/// Bytes of CSB per ring.
pub const CSB_ENTRY: u64 = 128;
/// Required CSB alignment.
pub const CSB_ALIGN: u64 = 64;
/// Offsets in a CSB entry.
pub mod csb {
    /// Guest → host: netmap's `head`.
    pub const HEAD: usize = 0;
    /// Guest → host: netmap's `cur`.
    pub const CUR: usize = 4;
    /// Guest → host: 1 = interrupt me when `hwtail` moves.
    pub const GUEST_NEED_KICK: usize = 8;
    /// Host → guest: `hwcur`.
    pub const HWCUR: usize = 64;
    /// Host → guest: `hwtail` (netmap's `tail`).
    pub const HWTAIL: usize = 68;
    /// Host → guest: 1 = the worker sleeps; kick it after moving `head`.
    pub const HOST_NEED_KICK: usize = 72;
}

/// What the device tells the guest about the port's region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Geometry {
    /// Offset of the port's `netmap_if` in the region.
    pub nifp_offset: u32,
    /// Tx rings.
    pub tx_rings: u32,
    /// Rx rings.
    pub rx_rings: u32,
    /// Slots per tx ring.
    pub tx_slots: u32,
    /// Slots per rx ring.
    pub rx_slots: u32,
    /// Bytes per buffer.
    pub buf_size: u32,
    /// Bytes of virtio-net header in front of each frame on the port.
    pub vnet_hdr_len: u32,
    /// Bytes of the region.
    pub region_size: u64,
}

impl Geometry {
    /// The geometry of `port`'s region and first rings.
    pub fn of(port: &mut Port) -> Self {
        let region_size = port.region().1 as u64;
        let nifp_offset = port.nifp_offset() as u32;
        let vnet_hdr_len = port.virtio_net_hdr_len();
        let (tx_rings, tx_slots, buf_size) = {
            let t = port.tx_rings();
            (t.len() as u32, t[0].num_slots(), t[0].buf_size())
        };
        let (rx_rings, rx_slots) = {
            let r = port.rx_rings();
            (r.len() as u32, r[0].num_slots())
        };
        Geometry {
            nifp_offset,
            tx_rings,
            rx_rings,
            tx_slots,
            rx_slots,
            buf_size,
            vnet_hdr_len,
            region_size,
        }
    }

    /// The read-only configuration field at `ofs` (relative to
    /// [`CFG_BASE`]), or `None` for the read-write ones.
    pub fn field(&self, ofs: u64) -> u32 {
        match ofs {
            cfg::MAGIC => MAGIC,
            cfg::VERSION => VERSION,
            cfg::NIFP_OFFSET => self.nifp_offset,
            cfg::TX_RINGS => self.tx_rings,
            cfg::RX_RINGS => self.rx_rings,
            cfg::TX_SLOTS => self.tx_slots,
            cfg::RX_SLOTS => self.rx_slots,
            cfg::BUF_SIZE => self.buf_size,
            cfg::VNET_HDR_LEN => self.vnet_hdr_len,
            cfg::REGION_SIZE_LO => self.region_size as u32,
            cfg::REGION_SIZE_HI => (self.region_size >> 32) as u32,
            _ => 0,
        }
    }

    /// Rings in all (CSB entries).
    pub fn rings(&self) -> u64 {
        u64::from(self.tx_rings) + u64::from(self.rx_rings)
    }
}

/// The guest's CSB, translated once into a host pointer into guest RAM.
#[derive(Debug)]
pub(crate) struct Csb {
    base: NonNull<u8>,
    entries: usize,
}

// SAFETY: the pointer points into guest RAM that the worker's `GuestRam`
// keeps mapped while the CSB is in use; all accesses are atomic u32s, so
// the guest writing concurrently is fine.
unsafe impl Send for Csb {}

/// Why a start was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// The address is not CSB_ALIGN-aligned.
    #[error("the CSB address {0:#x} is not 64-byte aligned")]
    Unaligned(u64),
    /// The CSB is not inside one region of guest RAM.
    #[error("the CSB at {addr:#x} ({len} bytes) is not inside guest RAM")]
    OutsideRam {
        /// Guest-physical address.
        addr: u64,
        /// Bytes needed.
        len: u64,
    },
    /// The driver did not accept [`F_NMVM_NETMAP`].
    #[error("the driver did not accept the passthrough feature (bit 45)")]
    NotNegotiated,
    /// The device is not running (no DRIVER_OK yet, or being reset).
    #[error("the device is not running (set DRIVER_OK first)")]
    NotRunning,
}

impl Csb {
    /// The CSB at guest-physical `addr` for `entries` rings.
    pub(crate) fn new(ram: &GuestRam, addr: u64, entries: usize) -> Result<Self, StartError> {
        if addr % CSB_ALIGN != 0 {
            return Err(StartError::Unaligned(addr));
        }
        let len = entries as u64 * CSB_ENTRY;
        let base = ram
            .translate(addr, len.max(1))
            .ok_or(StartError::OutsideRam { addr, len })?;
        Ok(Csb { base, entries })
    }

    fn word(&self, entry: usize, ofs: usize) -> &AtomicU32 {
        assert!(entry < self.entries && ofs < CSB_ENTRY as usize);
        // SAFETY: `entry` and `ofs` are in bounds (asserted), so the word is
        // inside the `entries * CSB_ENTRY` bytes `new` translated; the base
        // is 64-byte aligned in guest-physical space and guest RAM is mapped
        // page-aligned, so the word is 4-aligned. The memory stays mapped
        // while the worker (which owns this CSB and the `GuestRam`) runs,
        // and it is only accessed atomically here.
        unsafe {
            AtomicU32::from_ptr(
                self.base
                    .as_ptr()
                    .add(entry * CSB_ENTRY as usize + ofs)
                    .cast(),
            )
        }
    }

    pub(crate) fn load(&self, entry: usize, ofs: usize) -> u32 {
        self.word(entry, ofs).load(Ordering::Acquire)
    }

    pub(crate) fn store(&self, entry: usize, ofs: usize, v: u32) {
        self.word(entry, ofs).store(v, Ordering::Release);
    }
}

/// What the worker last read from the CSB and published for one ring.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    /// `head` and `cur` as the guest last wrote them (maybe invalid): a
    /// change means the guest did something.
    csb_head: u32,
    csb_cur: u32,
    /// `head` as the sync accepted it.
    head: u32,
    hwtail: u32,
}

/// Counters of the passthrough loop.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassthroughStats {
    /// Syncs performed for the guest.
    pub syncs: u64,
    /// Interrupts sent because the guest asked for them.
    pub interrupts: u64,
    /// Times the worker went to sleep and asked for a kick.
    pub sleeps: u64,
}

/// The worker's passthrough state: the CSB and the last values exchanged.
#[derive(Debug)]
pub(crate) struct Kloop {
    csb: Csb,
    tx_rings: usize,
    tx: Vec<Seen>,
    rx: Vec<Seen>,
    pub(crate) stats: PassthroughStats,
}

/// Most rings per direction the worker operates (netmap's own limit is
/// far higher, but a port bound for one VM has a handful).
const MAX_RINGS: usize = 64;

/// What one [`Kloop::step`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Step {
    /// Something moved (the guest published, or hwtail changed).
    pub progress: bool,
    /// Tx rings have frames the peer has no room for yet.
    pub tx_blocked: bool,
    /// The guest has consumed every received frame it was shown and waits
    /// for more.
    pub rx_hungry: bool,
    /// Interrupt the guest's tx side (queue 1's vector).
    pub irq_tx: bool,
    /// Interrupt the guest's rx side (queue 0's vector).
    pub irq_rx: bool,
    /// Tx slots the guest handed over in this step.
    pub tx_slots: u64,
    /// Rx slots made available to the guest in this step.
    pub rx_slots: u64,
}

/// Slots from `a` to `b` on a ring of `n`; 0 if either is out of range
/// (the guest may scribble on the ring header at any time).
fn dist(a: u32, b: u32, n: u32) -> u64 {
    if a >= n || b >= n {
        return 0;
    }
    u64::from(if b >= a { b - a } else { b + n - a })
}

impl Kloop {
    /// Takes over `port`'s rings with the guest's CSB: publishes the rings'
    /// positions in it and asks for a kick (the worker has not looked yet).
    pub(crate) fn start(csb: Csb, port: &mut Port) -> Self {
        let tx_rings = port.tx_rings().len();
        let mut k = Kloop {
            csb,
            tx_rings,
            tx: Vec::new(),
            rx: Vec::new(),
            stats: PassthroughStats::default(),
        };
        let seen = |r: &crate::netmap::Ring| Seen {
            csb_head: r.head(),
            csb_cur: r.cur(),
            head: r.head(),
            hwtail: r.tail(),
        };
        for (i, r) in port.tx_rings().iter().enumerate() {
            let s = seen(r);
            k.publish(i, s.head, s.hwtail);
            k.tx.push(s);
        }
        for (i, r) in port.rx_rings().iter().enumerate() {
            let s = seen(r);
            k.publish(tx_rings + i, s.head, s.hwtail);
            k.rx.push(s);
        }
        k.set_host_need_kick(true);
        k
    }

    fn publish(&self, entry: usize, hwcur: u32, hwtail: u32) {
        self.csb.store(entry, csb::HWCUR, hwcur);
        self.csb.store(entry, csb::HWTAIL, hwtail);
    }

    /// Tells the guest whether the worker sleeps (and wants kicks).
    pub(crate) fn set_host_need_kick(&self, on: bool) {
        for e in 0..self.tx.len() + self.rx.len() {
            self.csb.store(e, csb::HOST_NEED_KICK, u32::from(on));
        }
    }

    /// Whether the guest moved any `head` or `cur` since the last step.
    pub(crate) fn guest_moved(&self) -> bool {
        let moved = |base: usize, seen: &[Seen]| {
            seen.iter().enumerate().any(|(i, s)| {
                self.csb.load(base + i, csb::HEAD) != s.csb_head
                    || self.csb.load(base + i, csb::CUR) != s.csb_cur
            })
        };
        moved(0, &self.tx) || moved(self.tx_rings, &self.rx)
    }

    /// Whether the peer moved anything the guest waits for since the last
    /// step: new frames in an rx ring, or (if `tx_blocked`) room in a tx
    /// ring. Syncs the port to find out.
    pub(crate) fn peer_moved(&self, port: &mut Port, tx_blocked: bool) -> bool {
        if port.rxsync().is_err() {
            return true;
        }
        if port
            .rx_rings()
            .iter()
            .zip(&self.rx)
            .any(|(r, s)| r.tail() != s.hwtail)
        {
            return true;
        }
        tx_blocked
            && (port.txsync().is_err()
                || port
                    .tx_rings()
                    .iter()
                    .zip(&self.tx)
                    .any(|(r, s)| r.tail() != s.hwtail))
    }

    /// One round: hands the guest's published positions to the rings,
    /// syncs both directions and publishes the results.
    pub(crate) fn step(&mut self, port: &mut Port) -> Step {
        let mut st = Step::default();
        self.stats.syncs += 1;

        // Guest → peer. The port's sync checks head/cur against its own
        // private ring state and every slot it hands on.
        let mut guest = [(0u32, 0u32); MAX_RINGS];
        for (i, r) in port.tx_rings().iter_mut().enumerate().take(MAX_RINGS) {
            let head = self.csb.load(i, csb::HEAD);
            let cur = self.csb.load(i, csb::CUR);
            guest[i] = (head, cur);
            r.set_cur(cur);
            r.set_head(head);
        }
        if let Err(e) = port.txsync() {
            debug!("netmap passthrough: txsync: {e}");
        }
        for (i, r) in port.tx_rings().iter().enumerate().take(MAX_RINGS) {
            let seen = &mut self.tx[i];
            let (csb_head, csb_cur) = guest[i];
            let (head, tail) = (r.head(), r.tail());
            if (csb_head, csb_cur) != (seen.csb_head, seen.csb_cur) || tail != seen.hwtail {
                st.progress = true;
                st.tx_slots += dist(seen.head, head, r.num_slots());
                if tail != seen.hwtail && self.csb.load(i, csb::GUEST_NEED_KICK) != 0 {
                    st.irq_tx = true;
                }
            }
            st.tx_blocked |= r.tx_pending();
            *seen = Seen {
                csb_head,
                csb_cur,
                head,
                hwtail: tail,
            };
            self.publish(i, head, tail);
        }

        // Peer → guest.
        let base = self.tx_rings;
        for (i, r) in port.rx_rings().iter_mut().enumerate().take(MAX_RINGS) {
            let head = self.csb.load(base + i, csb::HEAD);
            let cur = self.csb.load(base + i, csb::CUR);
            guest[i] = (head, cur);
            r.set_cur(cur);
            r.set_head(head);
        }
        if let Err(e) = port.rxsync() {
            debug!("netmap passthrough: rxsync: {e}");
        }
        for (i, r) in port.rx_rings().iter().enumerate().take(MAX_RINGS) {
            let seen = &mut self.rx[i];
            let (csb_head, csb_cur) = guest[i];
            let (head, cur, tail) = (r.head(), r.cur(), r.tail());
            if (csb_head, csb_cur) != (seen.csb_head, seen.csb_cur) || tail != seen.hwtail {
                st.progress = true;
                st.rx_slots += dist(seen.hwtail, tail, r.num_slots());
                if tail != seen.hwtail && self.csb.load(base + i, csb::GUEST_NEED_KICK) != 0 {
                    st.irq_rx = true;
                }
            }
            st.rx_hungry |= cur == tail;
            *seen = Seen {
                csb_head,
                csb_cur,
                head,
                hwtail: tail,
            };
            self.publish(base + i, head, tail);
        }
        if st.irq_rx || st.irq_tx {
            self.stats.interrupts += u64::from(st.irq_rx) + u64::from(st.irq_tx);
        }
        st
    }

    /// Before sleeping: asks the guest for kicks, then looks once more so
    /// that a `head` published in between is not missed. True if the worker
    /// must not sleep.
    pub(crate) fn prepare_sleep(&mut self) -> bool {
        self.set_host_need_kick(true);
        fence(Ordering::SeqCst);
        if self.guest_moved() {
            self.set_host_need_kick(false);
            return true;
        }
        self.stats.sleeps += 1;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netmap::Slot;
    use crate::virtio::driver::tests::{frame, pipe};
    use crate::virtio::driver::{PassthroughDriver, SyntheticDriver};
    use crate::virtio::net::Net;
    use crate::virtio::{VirtioDevice, F_RING_EVENT_IDX, F_VERSION_1};
    use std::time::{Duration, Instant};

    fn len_of(seq: u32) -> usize {
        60 + (seq as usize * 37) % 1455
    }

    fn write_reg(net: &mut Net, ofs: u64, v: u32) {
        net.write_config(CFG_BASE + ofs, &v.to_le_bytes());
    }

    fn read_reg(net: &Net, ofs: u64) -> u32 {
        let mut b = [0u8; 4];
        net.read_config(CFG_BASE + ofs, &mut b);
        u32::from_le_bytes(b)
    }

    /// A running device with passthrough started, its peer and the guest.
    fn started(name: &str) -> (Net, Port, SyntheticDriver, PassthroughDriver) {
        let (a, b, opts) = pipe(name);
        let dev_port = Port::open(&a, &opts).unwrap();
        let peer = Port::open(&b, &opts).unwrap();
        let drv = SyntheticDriver::new(256).unwrap();
        let mut net = Net::new([0x52, 0x54, 0, 0, 0, 1], dev_port);
        let g = net.enable_passthrough().unwrap();
        assert_eq!(read_reg(&net, cfg::MAGIC), MAGIC);
        assert_eq!(read_reg(&net, cfg::TX_SLOTS), 1024);
        assert_eq!(read_reg(&net, cfg::BUF_SIZE), 2048);
        assert_ne!(net.features() & F_NMVM_NETMAP, 0);
        let (base, len) = net.port_region().unwrap();
        // Before DRIVER_OK a start is refused.
        write_reg(&mut net, cfg::CONTROL, 1);
        assert_eq!(read_reg(&net, cfg::CONTROL), CONTROL_REFUSED);
        net.activate(drv.activation(F_VERSION_1 | F_RING_EVENT_IDX | F_NMVM_NETMAP))
            .unwrap();
        // SAFETY: the region is the port's, which `net` keeps mapped for as
        // long as the test runs; `drv` outlives the driver too.
        let pd = unsafe { PassthroughDriver::new(&drv, base, len, &g) }.unwrap();
        write_reg(&mut net, cfg::CSB_LO, pd.csb_gpa as u32);
        write_reg(&mut net, cfg::CSB_HI, (pd.csb_gpa >> 32) as u32);
        write_reg(&mut net, cfg::CONTROL, 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while read_reg(&net, cfg::CONTROL) != CONTROL_ON {
            assert!(Instant::now() < deadline, "passthrough never started");
            std::thread::sleep(Duration::from_millis(1));
        }
        (net, peer, drv, pd)
    }

    #[test]
    fn guest_operated_rings_move_exact_frames_both_ways() {
        let (mut net, mut peer, _drv, mut pd) = started("ptboth");
        const N: u32 = 5000;
        let (mut sent, mut received) = (0u32, 0u32);
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(20);
        while received < N {
            assert!(Instant::now() < deadline, "tx stalled at {received}/{N}");
            while sent < N && pd.tx_put(&frame(sent, len_of(sent))) {
                sent += 1;
            }
            pd.tx_publish();
            peer.rxsync().unwrap();
            while let Some(len) = peer.rx_ring().recv(&mut buf) {
                assert_eq!(&buf[..len], &frame(received, len_of(received))[..]);
                received += 1;
            }
            peer.rxsync().unwrap();
            if received < N {
                let _ = peer.wait_rx(Some(Duration::from_millis(5)));
            }
        }

        let (mut sent, mut got) = (0u32, 0u32);
        let deadline = Instant::now() + Duration::from_secs(20);
        while got < N {
            assert!(Instant::now() < deadline, "rx stalled at {got}/{N}");
            while sent < N && peer.tx_ring().send(&frame(sent, len_of(sent))) {
                sent += 1;
            }
            peer.txsync().unwrap();
            let mut expect = got;
            got += pd.rx_take(|f| {
                assert_eq!(f, &frame(expect, len_of(expect))[..]);
                expect += 1;
            });
            pd.rx_publish();
            std::thread::yield_now();
        }
        // Notifications are rare: the guest kicked only when the worker
        // slept.
        assert!(
            pd.kicks < u64::from(N),
            "{} kicks for {} frames",
            pd.kicks,
            2 * N
        );
        let c = net.counters();
        net.reset();
        assert_eq!(c.tx_frames.load(Ordering::Relaxed), u64::from(N));
        assert_eq!(c.rx_frames.load(Ordering::Relaxed), u64::from(N));
    }

    #[test]
    fn corrupt_rings_are_dropped_counted_and_traffic_recovers() {
        let (mut net, mut peer, _drv, mut pd) = started("pthostile");
        let n = pd.tx.num_slots();
        // A buffer index outside the pool, a length beyond the buffer.
        pd.tx_put_raw(Slot {
            buf_idx: u32::MAX,
            len: 60,
            flags: 0,
        });
        pd.tx_put_raw(Slot {
            buf_idx: 3,
            len: 65000,
            flags: 0,
        });
        pd.tx_publish();
        std::thread::sleep(Duration::from_millis(50));
        // A head beyond the tail (on a pipe's tx ring every other index is
        // inside [hwcur, hwtail]): the device resets the ring to hwcur.
        pd.tx_resync();
        pd.tx_publish_raw(n + 3);
        std::thread::sleep(Duration::from_millis(50));
        pd.tx_resync();

        const N: u32 = 300;
        let (mut sent, mut received) = (0u32, 0u32);
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(20);
        while received < N {
            assert!(Instant::now() < deadline, "stalled at {received}/{N}");
            while sent < N && pd.tx_put(&frame(sent, 60)) {
                sent += 1;
            }
            pd.tx_publish();
            peer.rxsync().unwrap();
            while let Some(len) = peer.rx_ring().recv(&mut buf) {
                assert_eq!(&buf[..len], &frame(received, 60)[..], "frame {received}");
                received += 1;
            }
            peer.rxsync().unwrap();
            let _ = peer.wait_rx(Some(Duration::from_millis(5)));
        }
        let stats = net.port_stats();
        net.reset();
        let st = *crate::bus::lock(&stats);
        assert!(st.bad_buf_idx >= 1, "{st:?}");
        assert!(st.bad_len >= 1, "{st:?}");
        assert!(st.bad_index >= 1, "{st:?}");
    }

    #[test]
    fn a_csb_outside_ram_or_unaligned_is_refused() {
        let (a, _b, opts) = pipe("ptbadcsb");
        let dev_port = Port::open(&a, &opts).unwrap();
        let drv = SyntheticDriver::new(256).unwrap();
        let mut net = Net::new([0x52, 0x54, 0, 0, 0, 1], dev_port);
        net.enable_passthrough().unwrap();
        net.activate(drv.activation(F_VERSION_1 | F_NMVM_NETMAP))
            .unwrap();
        for addr in [0x1_0000_0000_0000u64, 0x1004, u64::MAX - 63] {
            write_reg(&mut net, cfg::CSB_LO, addr as u32);
            write_reg(&mut net, cfg::CSB_HI, (addr >> 32) as u32);
            write_reg(&mut net, cfg::CONTROL, 1);
            let deadline = Instant::now() + Duration::from_secs(5);
            while read_reg(&net, cfg::CONTROL) != CONTROL_REFUSED {
                assert!(Instant::now() < deadline, "{addr:#x} was not refused");
                std::thread::sleep(Duration::from_millis(1));
            }
            write_reg(&mut net, cfg::CONTROL, 0);
        }
        let control = net.passthrough_control().unwrap();
        net.reset();
        assert_eq!(control.refused.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn without_the_feature_a_start_is_refused() {
        let (a, _b, opts) = pipe("ptnofeat");
        let dev_port = Port::open(&a, &opts).unwrap();
        let drv = SyntheticDriver::new(256).unwrap();
        let mut net = Net::new([0x52, 0x54, 0, 0, 0, 1], dev_port);
        net.enable_passthrough().unwrap();
        net.activate(drv.activation(F_VERSION_1)).unwrap();
        write_reg(&mut net, cfg::CONTROL, 1);
        assert_eq!(read_reg(&net, cfg::CONTROL), CONTROL_REFUSED);
        net.reset();
    }

    #[test]
    fn distances_wrap_and_ignore_garbage() {
        assert_eq!(dist(5, 9, 16), 4);
        assert_eq!(dist(14, 2, 16), 4);
        assert_eq!(dist(3, 3, 16), 0);
        assert_eq!(dist(16, 3, 16), 0);
        assert_eq!(dist(3, u32::MAX, 16), 0);
    }
}
