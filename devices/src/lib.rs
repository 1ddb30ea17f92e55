//! Device models for nmvm.
//!
//! Everything a guest can touch lives here: the port-I/O bus and the legacy
//! devices on it (8250 UART, the exit port, the i8042 reset line), and later
//! PCI, virtio-pci and the virtio-net device with its netmap backend. This
//! crate never depends on the VMM crate; the VMM hands devices what they need
//! (interrupt triggers, a way to stop the VM) through the small traits below.

pub mod bus;
pub mod eventfd;
pub mod ioctl;
pub mod legacy;
pub mod netmap;
pub mod pci;
pub mod serial;
pub mod virtio;

use std::sync::Arc;

/// Why the guest asked the VM to stop, as seen by a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStop {
    /// The guest wrote a status byte to the exit port.
    ExitStatus(u8),
    /// The guest pulsed the i8042 reset line (Linux `reboot=k`).
    Reset,
}

/// Lets a device end the VM. Implemented by the VMM.
pub trait StopVm: Send + Sync {
    /// Asks the VMM to stop the VM for `why`. Must not block.
    fn stop(&self, why: GuestStop);
}

/// An edge-triggered interrupt line or MSI vector a device can raise.
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt. Errors are logged by the implementation.
    fn trigger(&self);
}

/// A shared handle on the VMM's stop hook.
pub type StopHandle = Arc<dyn StopVm>;
