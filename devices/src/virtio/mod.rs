//! Virtio: the device-side contract between a transport (virtio-pci here,
//! vhost-user later) and a device (virtio-net), and the virtio-pci
//! transport itself.

pub mod driver;
pub mod net;
pub mod passthrough;
pub mod pci;
pub mod splitq;
#[cfg(target_os = "linux")]
pub mod tap;

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::eventfd::EventFd;

/// Feature bit: the device conforms to virtio 1.x.
pub const F_VERSION_1: u64 = 1 << 32;
/// Feature bit: used_event/avail_event notification suppression.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
/// Feature bit: indirect descriptors.
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// Feature bit: the device uses buffers in the order the driver made them
/// available, so a driver may reclaim them by the used index alone.
pub const F_IN_ORDER: u64 = 1 << 35;

/// Device status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Device status: the guest has a driver.
pub const STATUS_DRIVER: u8 = 2;
/// Device status: the driver is ready.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Device status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u8 = 8;
/// Device status: the device hit an error it cannot recover from alone.
pub const STATUS_NEEDS_RESET: u8 = 0x40;
/// Device status: the driver gave up.
pub const STATUS_FAILED: u8 = 0x80;

/// How a device interrupts its driver.
pub trait VirtioInterrupt: Send + Sync {
    /// Signals used buffers on queue `queue`.
    fn signal_queue(&self, queue: u16);
    /// Signals a configuration change (e.g. DEVICE_NEEDS_RESET).
    fn signal_config(&self);
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, configured by the driver (index = queue number).
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue (ioeventfd-backed).
    pub kicks: Vec<Arc<EventFd>>,
    /// The interrupt path.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Features the driver accepted.
    pub features: u64,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (1 = network).
    fn device_type(&self) -> u16;
    /// Features the device offers.
    fn features(&self) -> u64;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device on the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), String>;
    /// Stops using the queues; returns once the device no longer touches
    /// guest memory.
    fn reset(&mut self);
    /// Whether the device found the driver's queues broken and needs a
    /// reset (reported through DEVICE_NEEDS_RESET).
    fn needs_reset(&self) -> bool;
}
