//! The netmap ABI: shared-memory structures, request structures, constants and
//! ioctl numbers, written from the facts in `shared/reference/netmap-abi.md`
//! (netmap API 14, LP64).
//!
//! Every `#[repr(C)]` type here mirrors its C counterpart byte for byte; the
//! tests at the bottom check each size and field offset against the reference
//! table. The shared-memory types (`NetmapSlot`, `NetmapRing`, `NetmapIf`) are
//! *layouts*: memory shared with the kernel or another process is never
//! accessed through a reference to them (see `ring.rs`), only through raw
//! pointers and atomics at the offsets they define.

use core::mem::size_of;

use crate::ioctl::{freebsd as freebsd_ioc, linux as linux_ioc};

/// The API version we speak (`NETMAP_API`).
pub const NETMAP_API: u16 = 14;
/// Oldest API version a kernel accepts (`NETMAP_MIN_API`).
pub const NETMAP_MIN_API: u16 = 14;
/// Newest API version a kernel accepts (`NETMAP_MAX_API`).
pub const NETMAP_MAX_API: u16 = 15;
/// Alignment of rings and other shared objects (`NM_CACHE_ALIGN`).
pub const NM_CACHE_ALIGN: usize = 128;
/// Most slots one packet may span (`NETMAP_MAX_FRAGS`).
pub const NETMAP_MAX_FRAGS: usize = 64;
/// Buffers 0 and 1 of every netmap memory region are reserved.
pub const NETMAP_RESERVED_BUFS: u32 = 2;

// ---------------------------------------------------------------------------
// Slots.

/// `buf_idx` changed; set by whoever changes it (user or kernel/peer).
pub const NS_BUF_CHANGED: u16 = 0x0001;
/// Ask for a transmit-completion notification.
pub const NS_REPORT: u16 = 0x0002;
/// Pass the slot between host stack and NIC (rx rings with `NR_FORWARD`).
pub const NS_FORWARD: u16 = 0x0004;
/// VALE: do not learn the source MAC address.
pub const NS_NO_LEARN: u16 = 0x0008;
/// VALE tx only: the data is at `ptr`.
pub const NS_INDIRECT: u16 = 0x0010;
/// More fragments of this packet follow in the next slot.
pub const NS_MOREFRAG: u16 = 0x0020;
/// Monitor ports: the slot comes from a tx ring.
pub const NS_TXMON: u16 = 0x0040;
/// Shift of the VALE destination port in `flags`.
pub const NS_PORT_SHIFT: u16 = 8;
/// Mask of the VALE destination port in `flags`.
pub const NS_PORT_MASK: u16 = 0xff << NS_PORT_SHIFT;

/// Number of fragments stored in the high byte of `flags` (`NS_RFRAGS`).
#[inline]
pub const fn ns_rfrags(flags: u16) -> u8 {
    (flags >> NS_PORT_SHIFT) as u8
}

/// One slot of a netmap ring (`struct netmap_slot`, 16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetmapSlot {
    /// Index of the buffer in the region's buffer pool.
    pub buf_idx: u32,
    /// Bytes of the packet (fragment) in the buffer.
    pub len: u16,
    /// `NS_*` flags.
    pub flags: u16,
    /// User address for `NS_INDIRECT`, or buffer offset when offsets are enabled.
    pub ptr: u64,
}

// ---------------------------------------------------------------------------
// Rings.

/// Ring flag: timestamp the ring on sync.
pub const NR_TIMESTAMP: u32 = 0x0002;
/// Ring flag: enable `NS_FORWARD`.
pub const NR_FORWARD: u32 = 0x0004;

/// `struct timeval` as it appears in the ring header on LP64 systems.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NmTimeval {
    /// Seconds.
    pub tv_sec: i64,
    /// Microseconds.
    pub tv_usec: i64,
}

/// Offset of `slot[0]` from the start of a ring.
pub const NETMAP_RING_SLOTS_OFFSET: usize = 256;

/// Header of a netmap ring (`struct netmap_ring`, 256 bytes, 128-aligned);
/// `num_slots` [`NetmapSlot`]s follow at [`NETMAP_RING_SLOTS_OFFSET`].
///
/// `head` and `cur` are written by the ring's user, `tail` by the kernel (or,
/// for userspace ports, by the user's own sync code): see `ring.rs`.
#[repr(C, align(128))]
#[derive(Debug, Clone, Copy)]
pub struct NetmapRing {
    /// Offset from the ring to buffer 0 (may be negative).
    pub buf_ofs: i64,
    /// Number of slots.
    pub num_slots: u32,
    /// Size of each buffer.
    pub nr_buf_size: u32,
    /// Ring number.
    pub ringid: u16,
    /// 0 = tx, 1 = rx.
    pub dir: u16,
    /// First slot owned by the user (user writes).
    pub head: u32,
    /// Wake-up point (user writes).
    pub cur: u32,
    /// First slot owned by the kernel (kernel writes).
    pub tail: u32,
    /// `NR_*` ring flags.
    pub flags: u32,
    /// Padding before `ts`.
    pub _pad0: u32,
    /// Time of the last sync.
    pub ts: NmTimeval,
    /// Mask applied to `slot.ptr` to get a buffer offset.
    pub offset_mask: u64,
    /// Required alignment of buffer offsets.
    pub buf_align: u64,
    /// Padding up to `sem`.
    pub _pad1: [u8; 56],
    /// Kernel-private (`sem[128]`, cache aligned).
    pub sem: [u8; 128],
}

impl Default for NetmapRing {
    fn default() -> Self {
        NetmapRing {
            buf_ofs: 0,
            num_slots: 0,
            nr_buf_size: 0,
            ringid: 0,
            dir: 0,
            head: 0,
            cur: 0,
            tail: 0,
            flags: 0,
            _pad0: 0,
            ts: NmTimeval::default(),
            offset_mask: 0,
            buf_align: 0,
            _pad1: [0; 56],
            sem: [0; 128],
        }
    }
}

/// Ring direction value for tx rings.
pub const NR_TX: u16 = 0;
/// Ring direction value for rx rings.
pub const NR_RX: u16 = 1;

// ---------------------------------------------------------------------------
// Interfaces.

/// `ni_flags`: the region is private to this port.
pub const NI_PRIV_MEM: u32 = 1;

/// Offset of `ring_ofs[0]` in a [`NetmapIf`].
pub const NETMAP_IF_RING_OFS_OFFSET: usize = 56;

/// A netmap interface (`struct netmap_if`, 56 bytes), followed by
/// `ring_ofs[]` (`i64` each, relative to the `netmap_if` itself) in the order
/// NIC tx, host tx, NIC rx, host rx. Unbound rings have offset 0.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetmapIf {
    /// Port name, NUL terminated.
    pub ni_name: [u8; 16],
    /// API version.
    pub ni_version: u32,
    /// `NI_*` flags.
    pub ni_flags: u32,
    /// Number of NIC tx rings.
    pub ni_tx_rings: u32,
    /// Number of NIC rx rings.
    pub ni_rx_rings: u32,
    /// Head of the extra-buffer list (0 = empty).
    pub ni_bufs_head: u32,
    /// Number of host tx rings.
    pub ni_host_tx_rings: u32,
    /// Number of host rx rings.
    pub ni_host_rx_rings: u32,
    /// Spare.
    pub ni_spare1: [u32; 3],
}

// ---------------------------------------------------------------------------
// Control requests (NIOCCTRL).

/// `nr_reqtype` values.
pub const NETMAP_REQ_REGISTER: u16 = 1;
/// Get port information.
pub const NETMAP_REQ_PORT_INFO_GET: u16 = 2;
/// Attach a port to a VALE switch.
pub const NETMAP_REQ_VALE_ATTACH: u16 = 3;
/// Detach a port from a VALE switch.
pub const NETMAP_REQ_VALE_DETACH: u16 = 4;
/// List VALE ports.
pub const NETMAP_REQ_VALE_LIST: u16 = 5;
/// Set the virtio-net header length of a port.
pub const NETMAP_REQ_PORT_HDR_SET: u16 = 6;
/// Get the virtio-net header length of a port.
pub const NETMAP_REQ_PORT_HDR_GET: u16 = 7;
/// Create a persistent VALE port.
pub const NETMAP_REQ_VALE_NEWIF: u16 = 8;
/// Delete a persistent VALE port.
pub const NETMAP_REQ_VALE_DELIF: u16 = 9;
/// Enable VALE polling.
pub const NETMAP_REQ_VALE_POLLING_ENABLE: u16 = 10;
/// Disable VALE polling.
pub const NETMAP_REQ_VALE_POLLING_DISABLE: u16 = 11;
/// Get memory pool information.
pub const NETMAP_REQ_POOLS_INFO_GET: u16 = 12;
/// Start the sync kloop.
pub const NETMAP_REQ_SYNC_KLOOP_START: u16 = 13;
/// Stop the sync kloop.
pub const NETMAP_REQ_SYNC_KLOOP_STOP: u16 = 14;
/// Enable the CSB.
pub const NETMAP_REQ_CSB_ENABLE: u16 = 15;

/// `nro_reqtype` values of request options.
pub const NETMAP_REQ_OPT_EXTMEM: u32 = 1;
/// Eventfds for the sync kloop.
pub const NETMAP_REQ_OPT_SYNC_KLOOP_EVENTFDS: u32 = 2;
/// CSB addresses.
pub const NETMAP_REQ_OPT_CSB: u32 = 3;
/// Sync kloop mode.
pub const NETMAP_REQ_OPT_SYNC_KLOOP_MODE: u32 = 4;
/// Buffer offsets (upstream netmap only).
pub const NETMAP_REQ_OPT_OFFSETS: u32 = 5;

/// `nr_mode` values of `NETMAP_REQ_REGISTER`.
pub const NR_REG_DEFAULT: u32 = 0;
/// All NIC rings.
pub const NR_REG_ALL_NIC: u32 = 1;
/// Host (software) rings only.
pub const NR_REG_SW: u32 = 2;
/// NIC and host rings.
pub const NR_REG_NIC_SW: u32 = 3;
/// One NIC ring (`nr_ringid`).
pub const NR_REG_ONE_NIC: u32 = 4;
/// Deprecated pipe master.
pub const NR_REG_PIPE_MASTER: u32 = 5;
/// Deprecated pipe slave.
pub const NR_REG_PIPE_SLAVE: u32 = 6;
/// No rings.
pub const NR_REG_NULL: u32 = 7;
/// One host ring (`nr_ringid`).
pub const NR_REG_ONE_SW: u32 = 8;

/// `nr_flags` bits of `NETMAP_REQ_REGISTER`.
pub const NR_MONITOR_TX: u64 = 0x100;
/// Monitor rx rings.
pub const NR_MONITOR_RX: u64 = 0x200;
/// Zero-copy monitor.
pub const NR_ZCOPY_MON: u64 = 0x400;
/// Exclusive access to the rings.
pub const NR_EXCLUSIVE: u64 = 0x800;
/// Bind rx rings only.
pub const NR_RX_RINGS_ONLY: u64 = 0x2000;
/// Bind tx rings only.
pub const NR_TX_RINGS_ONLY: u64 = 0x4000;
/// Accept ports that have a virtio-net header.
pub const NR_ACCEPT_VNET_HDR: u64 = 0x8000;
/// poll() does an rxsync.
pub const NR_DO_RX_POLL: u64 = 0x10000;
/// poll() does not do a txsync.
pub const NR_NO_TX_POLL: u64 = 0x20000;

/// `nr_ringid` bits (legacy API).
pub const NETMAP_HW_RING: u16 = 0x4000;
/// Legacy: bind the host ring.
pub const NETMAP_SW_RING: u16 = 0x2000;
/// Legacy: poll() does not txsync.
pub const NETMAP_NO_TX_POLL: u16 = 0x1000;
/// Legacy: poll() does rxsync.
pub const NETMAP_DO_RX_POLL: u16 = 0x8000;
/// Ring number mask of `nr_ringid`.
pub const NETMAP_RING_MASK: u16 = 0x0fff;

/// Legacy `nr_cmd` values.
pub const NETMAP_BDG_ATTACH: u16 = 1;
/// Detach from a VALE switch.
pub const NETMAP_BDG_DETACH: u16 = 2;
/// List VALE ports.
pub const NETMAP_BDG_LIST: u16 = 4;
/// Set the virtio-net header length.
pub const NETMAP_BDG_VNET_HDR: u16 = 5;
/// Create a persistent VALE port.
pub const NETMAP_BDG_NEWIF: u16 = 6;
/// Delete a persistent VALE port.
pub const NETMAP_BDG_DELIF: u16 = 7;
/// Get the virtio-net header length.
pub const NETMAP_VNET_HDR_GET: u16 = 12;

/// Size of `nr_name` in [`NmreqHeader`] (63 characters plus NUL).
pub const NETMAP_REQ_IFNAMSIZ: usize = 64;

/// Header of every NIOCCTRL request (`struct nmreq_header`, 88 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NmreqHeader {
    /// API version ([`NETMAP_API`]).
    pub nr_version: u16,
    /// `NETMAP_REQ_*`.
    pub nr_reqtype: u16,
    /// Must be 0.
    pub nr_reserved: u32,
    /// Port name, NUL terminated.
    pub nr_name: [u8; NETMAP_REQ_IFNAMSIZ],
    /// User pointer to the first [`NmreqOption`], or 0.
    pub nr_options: u64,
    /// User pointer to the request body.
    pub nr_body: u64,
}

impl Default for NmreqHeader {
    fn default() -> Self {
        NmreqHeader {
            nr_version: NETMAP_API,
            nr_reqtype: 0,
            nr_reserved: 0,
            nr_name: [0; NETMAP_REQ_IFNAMSIZ],
            nr_options: 0,
            nr_body: 0,
        }
    }
}

/// Body of `NETMAP_REQ_REGISTER` (`struct nmreq_register`, 56 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NmreqRegister {
    /// Out: offset of the `netmap_if` in the region.
    pub nr_offset: u64,
    /// Out: size of the region to mmap.
    pub nr_memsize: u64,
    /// In/out: slots per tx ring.
    pub nr_tx_slots: u32,
    /// In/out: slots per rx ring.
    pub nr_rx_slots: u32,
    /// In/out: number of tx rings.
    pub nr_tx_rings: u16,
    /// In/out: number of rx rings.
    pub nr_rx_rings: u16,
    /// In/out: number of host tx rings.
    pub nr_host_tx_rings: u16,
    /// In/out: number of host rx rings.
    pub nr_host_rx_rings: u16,
    /// In/out: memory region id.
    pub nr_mem_id: u16,
    /// In: ring number for `ONE_NIC`/`ONE_SW`.
    pub nr_ringid: u16,
    /// In: `NR_REG_*`.
    pub nr_mode: u32,
    /// In/out: extra buffers.
    pub nr_extra_bufs: u32,
    /// Padding.
    pub _pad: u32,
    /// In: `NR_*` flags.
    pub nr_flags: u64,
}

/// A request option (`struct nmreq_option`, 24 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NmreqOption {
    /// User pointer to the next option, or 0.
    pub nro_next: u64,
    /// `NETMAP_REQ_OPT_*`.
    pub nro_reqtype: u32,
    /// Out: errno for this option.
    pub nro_status: u32,
    /// Size of the whole option.
    pub nro_size: u64,
}

/// Body of `PORT_HDR_SET`/`PORT_HDR_GET` (`struct nmreq_port_hdr`, 8 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NmreqPortHdr {
    /// virtio-net header length: 0, 10 or 12.
    pub nr_hdr_len: u32,
    /// Padding.
    pub _pad: u32,
}

/// The legacy request (`struct nmreq`, 60 bytes), used by NIOCREGIF/NIOCGINFO.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Nmreq {
    /// Port name.
    pub nr_name: [u8; 16],
    /// API version.
    pub nr_version: u32,
    /// Out: offset of the `netmap_if`.
    pub nr_offset: u32,
    /// Out: region size.
    pub nr_memsize: u32,
    /// Slots per tx ring.
    pub nr_tx_slots: u32,
    /// Slots per rx ring.
    pub nr_rx_slots: u32,
    /// Number of tx rings.
    pub nr_tx_rings: u16,
    /// Number of rx rings.
    pub nr_rx_rings: u16,
    /// Ring id and `NETMAP_*_RING` bits.
    pub nr_ringid: u16,
    /// `NETMAP_BDG_*` command.
    pub nr_cmd: u16,
    /// Command argument (e.g. header length).
    pub nr_arg1: u16,
    /// Memory id.
    pub nr_arg2: u16,
    /// Extra buffers.
    pub nr_arg3: u32,
    /// Low 4 bits: `NR_REG_*` mode.
    pub nr_flags: u32,
    /// Spare.
    pub spare2: [u32; 1],
}

// ---------------------------------------------------------------------------
// ioctl numbers.

/// The ioctl group of netmap (`'i'`).
pub const NETMAP_IOC_GROUP: u8 = b'i';

/// The ioctl numbers of one operating system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoctlNumbers {
    /// `_IOWR('i', 151, struct nmreq_header)`.
    pub nioc_ctrl: u32,
    /// `_IO('i', 148)`.
    pub nioc_txsync: u32,
    /// `_IO('i', 149)`.
    pub nioc_rxsync: u32,
    /// `_IOWR('i', 146, struct nmreq)`.
    pub nioc_regif: u32,
    /// `_IOWR('i', 145, struct nmreq)`.
    pub nioc_ginfo: u32,
}

/// Linux ioctl numbers.
pub const LINUX_IOCTLS: IoctlNumbers = IoctlNumbers {
    nioc_ctrl: linux_ioc::iowr(NETMAP_IOC_GROUP, 151, size_of::<NmreqHeader>()),
    nioc_txsync: linux_ioc::io(NETMAP_IOC_GROUP, 148),
    nioc_rxsync: linux_ioc::io(NETMAP_IOC_GROUP, 149),
    nioc_regif: linux_ioc::iowr(NETMAP_IOC_GROUP, 146, size_of::<Nmreq>()),
    nioc_ginfo: linux_ioc::iowr(NETMAP_IOC_GROUP, 145, size_of::<Nmreq>()),
};

/// FreeBSD ioctl numbers.
pub const FREEBSD_IOCTLS: IoctlNumbers = IoctlNumbers {
    nioc_ctrl: freebsd_ioc::iowr(NETMAP_IOC_GROUP, 151, size_of::<NmreqHeader>()),
    nioc_txsync: freebsd_ioc::io(NETMAP_IOC_GROUP, 148),
    nioc_rxsync: freebsd_ioc::io(NETMAP_IOC_GROUP, 149),
    nioc_regif: freebsd_ioc::iowr(NETMAP_IOC_GROUP, 146, size_of::<Nmreq>()),
    nioc_ginfo: freebsd_ioc::iowr(NETMAP_IOC_GROUP, 145, size_of::<Nmreq>()),
};

/// The ioctl numbers of the OS we are built for.
#[cfg(target_os = "freebsd")]
pub const IOCTLS: IoctlNumbers = FREEBSD_IOCTLS;
/// The ioctl numbers of the OS we are built for.
#[cfg(not(target_os = "freebsd"))]
pub const IOCTLS: IoctlNumbers = LINUX_IOCTLS;

/// `NIOCCTRL` for this OS.
pub const NIOCCTRL: u32 = IOCTLS.nioc_ctrl;
/// `NIOCTXSYNC` for this OS.
pub const NIOCTXSYNC: u32 = IOCTLS.nioc_txsync;
/// `NIOCRXSYNC` for this OS.
pub const NIOCRXSYNC: u32 = IOCTLS.nioc_rxsync;
/// `NIOCREGIF` for this OS.
pub const NIOCREGIF: u32 = IOCTLS.nioc_regif;
/// `NIOCGINFO` for this OS.
pub const NIOCGINFO: u32 = IOCTLS.nioc_ginfo;

// The layouts above assume LP64 (`timeval` and `ssize_t` of 8 bytes).
const _: () = assert!(size_of::<usize>() == 8, "the netmap ABI here is LP64 only");
const _: () = assert!(size_of::<NetmapRing>() == NETMAP_RING_SLOTS_OFFSET);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of};

    #[test]
    fn slot_layout() {
        assert_eq!(size_of::<NetmapSlot>(), 16);
        assert_eq!(offset_of!(NetmapSlot, buf_idx), 0);
        assert_eq!(offset_of!(NetmapSlot, len), 4);
        assert_eq!(offset_of!(NetmapSlot, flags), 6);
        assert_eq!(offset_of!(NetmapSlot, ptr), 8);
    }

    #[test]
    fn slot_flags() {
        assert_eq!(NS_BUF_CHANGED, 0x1);
        assert_eq!(NS_REPORT, 0x2);
        assert_eq!(NS_FORWARD, 0x4);
        assert_eq!(NS_NO_LEARN, 0x8);
        assert_eq!(NS_INDIRECT, 0x10);
        assert_eq!(NS_MOREFRAG, 0x20);
        assert_eq!(NS_TXMON, 0x40);
        assert_eq!(NS_PORT_SHIFT, 8);
        assert_eq!(NS_PORT_MASK, 0xff00);
        assert_eq!(ns_rfrags(0xab20), 0xab);
        assert_eq!(NETMAP_MAX_FRAGS, 64);
    }

    #[test]
    fn ring_layout() {
        assert_eq!(size_of::<NetmapRing>(), 256);
        assert_eq!(align_of::<NetmapRing>(), 128);
        assert_eq!(offset_of!(NetmapRing, buf_ofs), 0);
        assert_eq!(offset_of!(NetmapRing, num_slots), 8);
        assert_eq!(offset_of!(NetmapRing, nr_buf_size), 12);
        assert_eq!(offset_of!(NetmapRing, ringid), 16);
        assert_eq!(offset_of!(NetmapRing, dir), 18);
        assert_eq!(offset_of!(NetmapRing, head), 20);
        assert_eq!(offset_of!(NetmapRing, cur), 24);
        assert_eq!(offset_of!(NetmapRing, tail), 28);
        assert_eq!(offset_of!(NetmapRing, flags), 32);
        assert_eq!(offset_of!(NetmapRing, ts), 40);
        assert_eq!(size_of::<NmTimeval>(), 16);
        assert_eq!(offset_of!(NetmapRing, offset_mask), 56);
        assert_eq!(offset_of!(NetmapRing, buf_align), 64);
        assert_eq!(offset_of!(NetmapRing, sem), 128);
        assert_eq!(NETMAP_RING_SLOTS_OFFSET, 256);
        assert_eq!(NR_TIMESTAMP, 0x2);
        assert_eq!(NR_FORWARD, 0x4);
    }

    #[test]
    fn if_layout() {
        assert_eq!(size_of::<NetmapIf>(), 56);
        assert_eq!(offset_of!(NetmapIf, ni_name), 0);
        assert_eq!(offset_of!(NetmapIf, ni_version), 16);
        assert_eq!(offset_of!(NetmapIf, ni_flags), 20);
        assert_eq!(offset_of!(NetmapIf, ni_tx_rings), 24);
        assert_eq!(offset_of!(NetmapIf, ni_rx_rings), 28);
        assert_eq!(offset_of!(NetmapIf, ni_bufs_head), 32);
        assert_eq!(offset_of!(NetmapIf, ni_host_tx_rings), 36);
        assert_eq!(offset_of!(NetmapIf, ni_host_rx_rings), 40);
        assert_eq!(offset_of!(NetmapIf, ni_spare1), 44);
        assert_eq!(NETMAP_IF_RING_OFS_OFFSET, 56);
        assert_eq!(NI_PRIV_MEM, 1);
    }

    #[test]
    fn request_layouts() {
        assert_eq!(size_of::<NmreqHeader>(), 88);
        assert_eq!(offset_of!(NmreqHeader, nr_version), 0);
        assert_eq!(offset_of!(NmreqHeader, nr_reqtype), 2);
        assert_eq!(offset_of!(NmreqHeader, nr_reserved), 4);
        assert_eq!(offset_of!(NmreqHeader, nr_name), 8);
        assert_eq!(offset_of!(NmreqHeader, nr_options), 72);
        assert_eq!(offset_of!(NmreqHeader, nr_body), 80);

        assert_eq!(size_of::<NmreqRegister>(), 56);
        assert_eq!(offset_of!(NmreqRegister, nr_offset), 0);
        assert_eq!(offset_of!(NmreqRegister, nr_memsize), 8);
        assert_eq!(offset_of!(NmreqRegister, nr_tx_slots), 16);
        assert_eq!(offset_of!(NmreqRegister, nr_rx_slots), 20);
        assert_eq!(offset_of!(NmreqRegister, nr_tx_rings), 24);
        assert_eq!(offset_of!(NmreqRegister, nr_rx_rings), 26);
        assert_eq!(offset_of!(NmreqRegister, nr_host_tx_rings), 28);
        assert_eq!(offset_of!(NmreqRegister, nr_host_rx_rings), 30);
        assert_eq!(offset_of!(NmreqRegister, nr_mem_id), 32);
        assert_eq!(offset_of!(NmreqRegister, nr_ringid), 34);
        assert_eq!(offset_of!(NmreqRegister, nr_mode), 36);
        assert_eq!(offset_of!(NmreqRegister, nr_extra_bufs), 40);
        assert_eq!(offset_of!(NmreqRegister, _pad), 44);
        assert_eq!(offset_of!(NmreqRegister, nr_flags), 48);

        assert_eq!(size_of::<NmreqOption>(), 24);
        assert_eq!(offset_of!(NmreqOption, nro_next), 0);
        assert_eq!(offset_of!(NmreqOption, nro_reqtype), 8);
        assert_eq!(offset_of!(NmreqOption, nro_status), 12);
        assert_eq!(offset_of!(NmreqOption, nro_size), 16);

        assert_eq!(size_of::<NmreqPortHdr>(), 8);
        assert_eq!(offset_of!(NmreqPortHdr, nr_hdr_len), 0);
    }

    #[test]
    fn legacy_request_layout() {
        assert_eq!(size_of::<Nmreq>(), 60);
        assert_eq!(offset_of!(Nmreq, nr_name), 0);
        assert_eq!(offset_of!(Nmreq, nr_version), 16);
        assert_eq!(offset_of!(Nmreq, nr_offset), 20);
        assert_eq!(offset_of!(Nmreq, nr_memsize), 24);
        assert_eq!(offset_of!(Nmreq, nr_tx_slots), 28);
        assert_eq!(offset_of!(Nmreq, nr_rx_slots), 32);
        assert_eq!(offset_of!(Nmreq, nr_tx_rings), 36);
        assert_eq!(offset_of!(Nmreq, nr_rx_rings), 38);
        assert_eq!(offset_of!(Nmreq, nr_ringid), 40);
        assert_eq!(offset_of!(Nmreq, nr_cmd), 42);
        assert_eq!(offset_of!(Nmreq, nr_arg1), 44);
        assert_eq!(offset_of!(Nmreq, nr_arg2), 46);
        assert_eq!(offset_of!(Nmreq, nr_arg3), 48);
        assert_eq!(offset_of!(Nmreq, nr_flags), 52);
        assert_eq!(offset_of!(Nmreq, spare2), 56);
    }

    #[test]
    fn constants() {
        assert_eq!(NETMAP_API, 14);
        assert_eq!(NETMAP_MIN_API, 14);
        assert_eq!(NETMAP_MAX_API, 15);
        assert_eq!(NM_CACHE_ALIGN, 128);
        let req = [
            NETMAP_REQ_REGISTER,
            NETMAP_REQ_PORT_INFO_GET,
            NETMAP_REQ_VALE_ATTACH,
            NETMAP_REQ_VALE_DETACH,
            NETMAP_REQ_VALE_LIST,
            NETMAP_REQ_PORT_HDR_SET,
            NETMAP_REQ_PORT_HDR_GET,
            NETMAP_REQ_VALE_NEWIF,
            NETMAP_REQ_VALE_DELIF,
            NETMAP_REQ_VALE_POLLING_ENABLE,
            NETMAP_REQ_VALE_POLLING_DISABLE,
            NETMAP_REQ_POOLS_INFO_GET,
            NETMAP_REQ_SYNC_KLOOP_START,
            NETMAP_REQ_SYNC_KLOOP_STOP,
            NETMAP_REQ_CSB_ENABLE,
        ];
        assert_eq!(req, core::array::from_fn::<u16, 15, _>(|i| i as u16 + 1));
        assert_eq!(
            [
                NETMAP_REQ_OPT_EXTMEM,
                NETMAP_REQ_OPT_SYNC_KLOOP_EVENTFDS,
                NETMAP_REQ_OPT_CSB,
                NETMAP_REQ_OPT_SYNC_KLOOP_MODE,
                NETMAP_REQ_OPT_OFFSETS
            ],
            [1, 2, 3, 4, 5]
        );
        assert_eq!(
            [
                NR_REG_DEFAULT,
                NR_REG_ALL_NIC,
                NR_REG_SW,
                NR_REG_NIC_SW,
                NR_REG_ONE_NIC,
                NR_REG_PIPE_MASTER,
                NR_REG_PIPE_SLAVE,
                NR_REG_NULL,
                NR_REG_ONE_SW
            ],
            [0, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(NR_MONITOR_TX, 0x100);
        assert_eq!(NR_MONITOR_RX, 0x200);
        assert_eq!(NR_ZCOPY_MON, 0x400);
        assert_eq!(NR_EXCLUSIVE, 0x800);
        assert_eq!(NR_RX_RINGS_ONLY, 0x2000);
        assert_eq!(NR_TX_RINGS_ONLY, 0x4000);
        assert_eq!(NR_ACCEPT_VNET_HDR, 0x8000);
        assert_eq!(NR_DO_RX_POLL, 0x10000);
        assert_eq!(NR_NO_TX_POLL, 0x20000);
        assert_eq!(NETMAP_HW_RING, 0x4000);
        assert_eq!(NETMAP_SW_RING, 0x2000);
        assert_eq!(NETMAP_NO_TX_POLL, 0x1000);
        assert_eq!(NETMAP_DO_RX_POLL, 0x8000);
        assert_eq!(NETMAP_RING_MASK, 0xfff);
        assert_eq!(
            [
                NETMAP_BDG_ATTACH,
                NETMAP_BDG_DETACH,
                NETMAP_BDG_LIST,
                NETMAP_BDG_VNET_HDR,
                NETMAP_BDG_NEWIF,
                NETMAP_BDG_DELIF,
                NETMAP_VNET_HDR_GET
            ],
            [1, 2, 4, 5, 6, 7, 12]
        );
    }

    #[test]
    fn ioctl_numbers_linux() {
        assert_eq!(LINUX_IOCTLS.nioc_ctrl, 0xC058_6997);
        assert_eq!(LINUX_IOCTLS.nioc_txsync, 0x6994);
        assert_eq!(LINUX_IOCTLS.nioc_rxsync, 0x6995);
        assert_eq!(LINUX_IOCTLS.nioc_regif, 0xC03C_6992);
        assert_eq!(LINUX_IOCTLS.nioc_ginfo, 0xC03C_6991);
        // Cross-check with the decimal values other bindings hard-code.
        assert_eq!(LINUX_IOCTLS.nioc_ginfo, 3_225_184_657);
        assert_eq!(LINUX_IOCTLS.nioc_txsync, 27_028);
    }

    #[test]
    fn ioctl_numbers_freebsd() {
        assert_eq!(FREEBSD_IOCTLS.nioc_ctrl, 0xC058_6997);
        assert_eq!(FREEBSD_IOCTLS.nioc_txsync, 0x2000_6994);
        assert_eq!(FREEBSD_IOCTLS.nioc_rxsync, 0x2000_6995);
        assert_eq!(FREEBSD_IOCTLS.nioc_regif, 0xC03C_6992);
        assert_eq!(FREEBSD_IOCTLS.nioc_ginfo, 0xC03C_6991);
    }

    #[test]
    fn the_native_numbers_are_the_os_ones() {
        // _IOWR is the same on both; _IO differs (IOC_VOID on FreeBSD).
        let void = if cfg!(target_os = "freebsd") {
            0x2000_0000
        } else {
            0
        };
        assert_eq!(
            (NIOCCTRL, NIOCTXSYNC, NIOCRXSYNC, NIOCREGIF, NIOCGINFO),
            (
                0xC058_6997,
                void | 0x6994,
                void | 0x6995,
                0xC03C_6992,
                0xC03C_6991
            )
        );
    }
}
