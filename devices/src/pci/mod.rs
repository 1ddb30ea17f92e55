//! PCI: configuration mechanism #1 (ports 0xcf8/0xcfc), a host bridge, and
//! the dispatch of BAR accesses to devices. Bus 0 only, function 0 only:
//! nmvm's machine has a host bridge and one virtio-net device.

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex};

use crate::bus::{lock, PioDevice};
pub use config::{ConfigSpace, BAR_MEM64};

/// First port of configuration mechanism #1.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Ports 0xcf8..0xd00: the address register and the four data bytes.
pub const CONFIG_PORTS_LEN: u16 = 8;
const CONFIG_DATA_OFFSET: u16 = 4;
const ENABLE: u32 = 1 << 31;

/// A PCI function on bus 0.
pub trait PciDevice: Send {
    /// Reads configuration space at byte offset `reg`.
    fn config_read(&mut self, reg: u16, data: &mut [u8]);
    /// Writes configuration space at byte offset `reg`.
    fn config_write(&mut self, reg: u16, data: &[u8]);
    /// Memory BARs the device currently decodes: (BAR index, base, size).
    fn memory_bars(&self) -> Vec<(u8, u64, u64)>;
    /// A read of `data.len()` bytes at `offset` into memory BAR `bar`.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// A write at `offset` into memory BAR `bar`.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
}

/// A device on the bus, shared between vCPU threads.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// The PCI root: bus 0's devices by slot, and the configuration address
/// latch.
pub struct PciRoot {
    slots: Vec<(u8, Arc<Mutex<dyn PciDevice>>)>,
    address: u32,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with the host bridge at 00:00.0.
    pub fn new() -> Self {
        Self {
            slots: vec![(0, Arc::new(Mutex::new(HostBridge::new())))],
            address: 0,
        }
    }

    /// Puts `device` in `slot` (1..32) of bus 0.
    pub fn add(&mut self, slot: u8, device: Arc<Mutex<dyn PciDevice>>) {
        debug_assert!(slot < 32 && !self.slots.iter().any(|(s, _)| *s == slot));
        self.slots.push((slot, device));
    }

    fn selected(&self) -> Option<(&Arc<Mutex<dyn PciDevice>>, u16)> {
        let a = self.address;
        let (bus, slot, func, reg) = (
            (a >> 16) & 0xff,
            ((a >> 11) & 0x1f) as u8,
            (a >> 8) & 0x7,
            (a & 0xfc) as u16,
        );
        if a & ENABLE == 0 || bus != 0 || func != 0 {
            return None;
        }
        self.slots
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, d)| (d, reg))
    }

    /// Finds the device decoding guest-physical `addr`; returns it with the
    /// BAR index and the offset inside the BAR.
    fn device_at(&self, addr: u64, len: usize) -> Option<(&SharedPciDevice, u8, u64)> {
        self.slots.iter().find_map(|(_, d)| {
            let bars = lock(d).memory_bars();
            bars.into_iter()
                .find(|&(_, base, size)| {
                    addr >= base && addr.saturating_add(len as u64) <= base.saturating_add(size)
                })
                .map(|(bar, base, _)| (d, bar, addr - base))
        })
    }

    /// Dispatches an MMIO read; returns false if no BAR decodes `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.device_at(addr, data.len()) {
            Some((d, bar, offset)) => {
                lock(d).bar_read(bar, offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches an MMIO write; returns false if no BAR decodes `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.device_at(addr, data.len()) {
            Some((d, bar, offset)) => {
                lock(d).bar_write(bar, offset, data);
                true
            }
            None => false,
        }
    }
}

/// Configuration mechanism #1 on the port bus. The address register reads
/// back what was written, which is how Linux probes for the mechanism.
pub struct PciConfigIo(pub Arc<Mutex<PciRoot>>);

impl PioDevice for PciConfigIo {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let root = lock(&self.0);
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&root.address.to_le_bytes());
            return;
        }
        data.fill(0xff);
        if offset >= CONFIG_DATA_OFFSET {
            let byte = offset - CONFIG_DATA_OFFSET;
            if let Some((dev, reg)) = root.selected() {
                lock(dev).config_read(reg + byte, data);
            }
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let mut root = lock(&self.0);
        if offset == 0 && data.len() == 4 {
            root.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            return;
        }
        if offset >= CONFIG_DATA_OFFSET {
            let byte = offset - CONFIG_DATA_OFFSET;
            if let Some((dev, reg)) = root.selected() {
                lock(dev).config_write(reg + byte, data);
            }
        }
    }
}

/// The host bridge at 00:00.0. Linux's conf1 sanity check wants a host
/// bridge (class 0x0600) on bus 0.
struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    fn new() -> Self {
        // Red Hat's vendor ID with QEMU's generic host bridge device ID.
        Self {
            config: ConfigSpace::new(0x1b36, 0x0008, 0x06_00_00, 0, 0),
        }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: u16, data: &mut [u8]) {
        self.config.read(reg, data);
    }
    fn config_write(&mut self, reg: u16, data: &[u8]) {
        self.config.write(reg, data);
    }
    fn memory_bars(&self) -> Vec<(u8, u64, u64)> {
        Vec::new()
    }
    fn bar_read(&mut self, _: u8, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read32(io: &mut PciConfigIo, slot: u32, reg: u32) -> u32 {
        io.write(0, &(ENABLE | slot << 11 | reg).to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn address_latch_reads_back_and_host_bridge_answers() {
        let mut io = PciConfigIo(Arc::new(Mutex::new(PciRoot::new())));
        io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        assert_eq!(cfg_read32(&mut io, 0, 0), 0x0008_1b36);
        assert_eq!(cfg_read32(&mut io, 0, 8) >> 8, 0x06_00_00);
        // An empty slot reads as all ones.
        assert_eq!(cfg_read32(&mut io, 5, 0), 0xffff_ffff);
        // A narrow read of the device ID's high byte.
        io.write(0, &ENABLE.to_le_bytes());
        let mut b = [0u8; 1];
        io.read(7, &mut b);
        assert_eq!(b[0], 0x00);
        io.read(6, &mut b);
        assert_eq!(b[0], 0x08);
    }
}
