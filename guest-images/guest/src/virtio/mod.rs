//! A polling virtio 1.x driver core: PCI discovery and capabilities ([`pci`]), the modern PCI
//! transport's common configuration ([`transport`]) and split virtqueues ([`queue`]).
//!
//! All hardware access goes through three small traits, so the same code runs on bare metal
//! (port I/O and volatile accesses, in `main.rs`) and against a simulated device in the tests.

pub mod pci;
pub mod queue;
pub mod transport;

/// PCI configuration space of bus 0, function 0 (configuration mechanism #1).
pub trait PciConfig {
    /// Reads the 32-bit register at `reg` (a multiple of 4) of device `dev`.
    fn pci_read32(&mut self, dev: u8, reg: u8) -> u32;
    /// Writes the 32-bit register at `reg` (a multiple of 4) of device `dev`.
    fn pci_write32(&mut self, dev: u8, reg: u8, val: u32);
    /// Writes the 16-bit register at `reg` (a multiple of 2) of device `dev`.
    fn pci_write16(&mut self, dev: u8, reg: u8, val: u16);
}

/// Device registers in a memory BAR, accessed with exactly the given width.
pub trait Mmio {
    /// Reads a byte.
    fn mmio_read8(&mut self, addr: u64) -> u8;
    /// Reads a 16-bit register.
    fn mmio_read16(&mut self, addr: u64) -> u16;
    /// Reads a 32-bit register.
    fn mmio_read32(&mut self, addr: u64) -> u32;
    /// Writes a byte.
    fn mmio_write8(&mut self, addr: u64, val: u8);
    /// Writes a 16-bit register.
    fn mmio_write16(&mut self, addr: u64, val: u16);
    /// Writes a 32-bit register.
    fn mmio_write32(&mut self, addr: u64, val: u32);
}

/// Guest RAM shared with the device (rings and buffers), by guest-physical address.
///
/// The ring accessors are single, naturally aligned accesses that the compiler may neither
/// merge nor drop (volatile on bare metal). Out-of-range addresses read as 0 and ignore writes.
pub trait Dma {
    /// Reads a little-endian `u16`.
    fn dma_read16(&self, addr: u64) -> u16;
    /// Reads a little-endian `u32`.
    fn dma_read32(&self, addr: u64) -> u32;
    /// Writes a little-endian `u16`.
    fn dma_write16(&mut self, addr: u64, val: u16);
    /// Writes a little-endian `u32`.
    fn dma_write32(&mut self, addr: u64, val: u32);
    /// Writes a little-endian `u64` (as two 32-bit halves, low first, where that matters).
    fn dma_write64(&mut self, addr: u64, val: u64);
    /// The `len` bytes at `addr`, for buffers the driver owns (not made available to the
    /// device, or returned by it); empty if the range is outside the shared area.
    fn dma_bytes(&mut self, addr: u64, len: usize) -> &mut [u8];
    /// Copies `len` bytes from `src` to `dst` (non-overlapping, both owned by the driver);
    /// does nothing if either range is outside the shared area.
    fn dma_copy(&mut self, src: u64, dst: u64, len: usize);
    /// A full memory barrier: earlier stores become visible before later loads are done.
    /// On x86 a locked instruction (MFENCE is an SSE2 instruction, which we may not use).
    fn full_barrier(&self);
}

/// A driver failure: a fixed description and, for some, the offending value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Error {
    /// What went wrong, e.g. "no virtio-net device found".
    pub what: &'static str,
    /// The value involved (a register, an address, an id), if any.
    pub value: Option<u64>,
}

impl Error {
    /// An error without a value.
    pub const fn new(what: &'static str) -> Self {
        Error { what, value: None }
    }

    /// An error about `value`.
    pub const fn with(what: &'static str, value: u64) -> Self {
        Error {
            what,
            value: Some(value),
        }
    }

    /// Writes the one-line diagnostic: `nmvm-guest: virtio: <what>[ 0x<value>]`.
    pub fn write(&self, out: &mut impl crate::Sink) {
        out.write(b"nmvm-guest: virtio: ");
        out.write(self.what.as_bytes());
        if let Some(v) = self.value {
            out.write(b" ");
            out.write_hex(v);
        }
        out.write(b"\n");
    }
}

/// Feature bits (virtio 1.x, virtio-net).
pub mod feature {
    /// `VIRTIO_NET_F_CSUM`.
    pub const NET_CSUM: u64 = 1 << 0;
    /// `VIRTIO_NET_F_GUEST_CSUM`.
    pub const NET_GUEST_CSUM: u64 = 1 << 1;
    /// `VIRTIO_NET_F_MAC`: the device config holds the MAC.
    pub const NET_MAC: u64 = 1 << 5;
    /// `VIRTIO_NET_F_MRG_RXBUF`: a received frame may span several buffers.
    pub const NET_MRG_RXBUF: u64 = 1 << 15;
    /// `VIRTIO_NET_F_STATUS`: the device config holds a link status.
    pub const NET_STATUS: u64 = 1 << 16;
    /// `VIRTIO_F_RING_EVENT_IDX`: `used_event`/`avail_event` notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// `VIRTIO_F_VERSION_1`: a modern (1.x) device.
    pub const VERSION_1: u64 = 1 << 32;
    /// `NMVM_F_NETMAP`: nmvm's netmap passthrough (BAR 2 and the configuration fields at
    /// 0x40; see `crate::netmap`). Outside the standard bits, so stock drivers never take it.
    pub const NMVM_NETMAP: u64 = 1 << 45;
}

/// `device_status` bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}
