//! Finding a virtio PCI device, its BAR0 and its virtio capabilities (virtio 1.x §4.1.4).

use super::{Error, PciConfig};

/// Red Hat / virtio vendor id.
pub const VENDOR_VIRTIO: u16 = 0x1af4;
/// Modern virtio-net (0x1040 + device type 1).
pub const DEVICE_NET: u16 = 0x1041;
/// Where the VMM assigns memory BARs: the 32-bit PCI hole, below the I/O APIC.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End (exclusive) of the PCI hole.
pub const MMIO_HOLE_END: u64 = 0xfec0_0000;

/// Command register: memory space decoding.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Command register: bus mastering (the device may DMA).
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// Status register: the capabilities list is valid.
const STATUS_CAP_LIST: u32 = 1 << 4;

const REG_ID: u8 = 0x00;
const REG_COMMAND: u8 = 0x04;
const REG_BAR0: u8 = 0x10;
const REG_BAR1: u8 = 0x14;
/// BAR registers: BAR0..BAR5.
const NUM_BARS: u8 = 6;
const REG_CAP_PTR: u8 = 0x34;

/// Vendor-specific capability (virtio's).
pub const CAP_VENDOR: u8 = 0x09;
/// MSI-X capability.
pub const CAP_MSIX: u8 = 0x11;
/// `cfg_type` of the common configuration.
pub const CFG_COMMON: u8 = 1;
/// `cfg_type` of the notification area.
pub const CFG_NOTIFY: u8 = 2;
/// `cfg_type` of the ISR status byte.
pub const CFG_ISR: u8 = 3;
/// `cfg_type` of the device-specific configuration.
pub const CFG_DEVICE: u8 = 4;
/// `cfg_type` of a shared memory region (`struct virtio_pci_cap64`, 24 bytes).
pub const CFG_SHARED_MEMORY: u8 = 8;

/// Size of `struct virtio_pci_common_cfg` up to and including `queue_device`.
pub const COMMON_CFG_LEN: u32 = 0x38;

/// The conf1 address (port 0xCF8) of a configuration register.
pub fn conf1_address(bus: u8, dev: u8, func: u8, reg: u8) -> u32 {
    0x8000_0000
        | u32::from(bus) << 16
        | u32::from(dev & 0x1f) << 11
        | u32::from(func & 7) << 8
        | u32::from(reg & 0xfc)
}

/// The first device on bus 0 (function 0 of devices 0..32) with these ids.
pub fn find_device(pci: &mut impl PciConfig, vendor: u16, device: u16) -> Option<u8> {
    let want = u32::from(device) << 16 | u32::from(vendor);
    (0..32u8).find(|&dev| pci.pci_read32(dev, REG_ID) == want)
}

/// A memory BAR: guest-physical address and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Base address.
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

/// Reads and sizes BAR0 (a 64-bit memory BAR, as the VMM promises), checks that it lies in
/// the PCI hole, and enables memory decoding and bus mastering.
pub fn setup_bar0(pci: &mut impl PciConfig, dev: u8) -> Result<Bar, Error> {
    let lo = pci.pci_read32(dev, REG_BAR0);
    if lo & 1 != 0 {
        return Err(Error::with("BAR0 is an I/O BAR", u64::from(lo)));
    }
    if (lo >> 1) & 3 != 2 {
        return Err(Error::with(
            "BAR0 is not a 64-bit memory BAR",
            u64::from(lo),
        ));
    }
    let hi = pci.pci_read32(dev, REG_BAR1);
    let addr = u64::from(hi) << 32 | u64::from(lo & !0xf);

    // Size it with decoding off, so the all-ones address is never live; then restore.
    let command = pci.pci_read32(dev, REG_COMMAND) as u16;
    pci.pci_write16(dev, REG_COMMAND, command & !(CMD_MEMORY | CMD_BUS_MASTER));
    pci.pci_write32(dev, REG_BAR0, u32::MAX);
    pci.pci_write32(dev, REG_BAR1, u32::MAX);
    let mask = u64::from(pci.pci_read32(dev, REG_BAR1)) << 32
        | u64::from(pci.pci_read32(dev, REG_BAR0) & !0xf);
    pci.pci_write32(dev, REG_BAR0, lo);
    pci.pci_write32(dev, REG_BAR1, hi);
    let size = (!mask).wrapping_add(1);

    if mask == 0 || !size.is_power_of_two() {
        return Err(Error::with("BAR0 does not size", mask));
    }
    let end = addr.saturating_add(size);
    if addr < MMIO_HOLE_START || end > MMIO_HOLE_END || addr & (size - 1) != 0 {
        return Err(Error::with("BAR0 address outside the PCI hole", addr));
    }
    pci.pci_write16(dev, REG_COMMAND, command | CMD_MEMORY | CMD_BUS_MASTER);
    Ok(Bar { addr, size })
}

/// A structure a virtio capability points at, as an absolute guest-physical range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    /// Address (BAR base + capability offset).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// What the virtio capabilities describe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    /// `struct virtio_pci_common_cfg`.
    pub common: Region,
    /// The notification area.
    pub notify: Region,
    /// `notify_off_multiplier` of the notification capability.
    pub notify_mult: u32,
    /// The ISR status byte.
    pub isr: Region,
    /// The device-specific configuration (virtio-net: MAC at 0).
    pub device: Region,
    /// Whether the device has an MSI-X capability (we leave it disabled and poll).
    pub msix: bool,
    /// The MSI-X table, when it is in BAR0 (only `net=hostile` touches it).
    pub msix_table: Option<Region>,
}

/// A byte of configuration space, through aligned 32-bit reads.
fn read8(pci: &mut impl PciConfig, dev: u8, reg: u8) -> u8 {
    (pci.pci_read32(dev, reg & 0xfc) >> (8 * (reg & 3))) as u8
}

/// Walks the capability list and collects the first usable virtio structure of each type
/// (the spec lets a device offer several; a driver uses the first it understands). Only
/// structures in BAR0 are used; each must fit inside the BAR.
pub fn find_caps(pci: &mut impl PciConfig, dev: u8, bar: Bar) -> Result<Caps, Error> {
    if (pci.pci_read32(dev, REG_COMMAND) >> 16) & STATUS_CAP_LIST == 0 {
        return Err(Error::new("device has no capability list"));
    }
    let mut caps = Caps::default();
    let (mut common, mut notify, mut isr, mut device) = (false, false, false, false);
    let mut ptr = read8(pci, dev, REG_CAP_PTR) & 0xfc;
    // 48 capabilities of at least 4 bytes fill the 192 bytes after the header: a longer walk
    // is a loop.
    for _ in 0..48 {
        if ptr == 0 {
            break;
        }
        if ptr < 0x40 {
            return Err(Error::with("bad capability pointer", u64::from(ptr)));
        }
        let head = pci.pci_read32(dev, ptr);
        let id = head as u8;
        let next = (head >> 8) as u8 & 0xfc;
        if id == CAP_MSIX && ptr <= 0xfc - 8 {
            caps.msix = true;
            let entries = ((head >> 16) & 0x7ff) + 1;
            let table = pci.pci_read32(dev, ptr + 4);
            let offset = u64::from(table & !7);
            if table & 7 == 0 && offset + 16 * u64::from(entries) <= bar.size {
                caps.msix_table = Some(Region {
                    addr: bar.addr + offset,
                    len: 16 * entries,
                });
            }
        }
        if id == CAP_VENDOR && ptr <= 0xfc - 16 {
            let cfg_type = (head >> 24) as u8;
            let bar_index = pci.pci_read32(dev, ptr + 4) as u8;
            let offset = u64::from(pci.pci_read32(dev, ptr + 8));
            let len = pci.pci_read32(dev, ptr + 12);
            let fits = bar_index == 0 && offset + u64::from(len) <= bar.size;
            let region = Region {
                addr: bar.addr + offset,
                len,
            };
            match cfg_type {
                CFG_COMMON if fits && !common && len >= COMMON_CFG_LEN => {
                    caps.common = region;
                    common = true;
                }
                CFG_NOTIFY if fits && !notify && len >= 2 => {
                    caps.notify = region;
                    caps.notify_mult = pci.pci_read32(dev, ptr + 16);
                    notify = true;
                }
                CFG_ISR if fits && !isr && len >= 1 => {
                    caps.isr = region;
                    isr = true;
                }
                CFG_DEVICE if fits && !device => {
                    caps.device = region;
                    device = true;
                }
                _ => {}
            }
        }
        ptr = next;
    }
    if !common {
        return Err(Error::new("no usable common config capability"));
    }
    if !notify {
        return Err(Error::new("no usable notify capability"));
    }
    if !isr {
        return Err(Error::new("no usable ISR capability"));
    }
    if !device {
        return Err(Error::new("no usable device config capability"));
    }
    Ok(caps)
}

/// A shared memory region as its capability describes it: `len` bytes at `offset` in BAR `bar`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedMemory {
    /// BAR index.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The first shared memory capability with `id` (virtio 1.2 §4.1.4.7), if any. The 64-bit
/// offset and length are `offset`/`offset_hi` and `length`/`length_hi`. A walk that meets a
/// bad pointer or a loop just ends: the caller decides what a missing region means.
pub fn find_shared_memory(pci: &mut impl PciConfig, dev: u8, id: u8) -> Option<SharedMemory> {
    if (pci.pci_read32(dev, REG_COMMAND) >> 16) & STATUS_CAP_LIST == 0 {
        return None;
    }
    let mut ptr = read8(pci, dev, REG_CAP_PTR) & 0xfc;
    // As in `find_caps`: 48 capabilities fill the space after the header.
    for _ in 0..48 {
        if ptr < 0x40 {
            return None;
        }
        let head = pci.pci_read32(dev, ptr);
        // The capability's 24 bytes must lie inside configuration space.
        if head as u8 == CAP_VENDOR
            && (head >> 24) as u8 == CFG_SHARED_MEMORY
            && (head >> 16) as u8 >= 24
            && u16::from(ptr) + 24 <= 0x100
        {
            let word1 = pci.pci_read32(dev, ptr + 4);
            if (word1 >> 8) as u8 == id {
                let lo_hi = |lo: u32, hi: u32| u64::from(hi) << 32 | u64::from(lo);
                return Some(SharedMemory {
                    bar: word1 as u8,
                    offset: lo_hi(pci.pci_read32(dev, ptr + 8), pci.pci_read32(dev, ptr + 16)),
                    len: lo_hi(pci.pci_read32(dev, ptr + 12), pci.pci_read32(dev, ptr + 20)),
                });
            }
        }
        ptr = (head >> 8) as u8 & 0xfc;
    }
    None
}

/// The address of memory BAR `index`, as the VMM assigned it (32- or 64-bit; never moved or
/// sized here: a RAM-backed BAR such as nmvm's shared memory one must stay where it is).
pub fn mem_bar_addr(pci: &mut impl PciConfig, dev: u8, index: u8) -> Result<u64, Error> {
    if index >= NUM_BARS {
        return Err(Error::with("no such BAR", u64::from(index)));
    }
    let reg = REG_BAR0 + 4 * index;
    let lo = pci.pci_read32(dev, reg);
    if lo & 1 != 0 {
        return Err(Error::with(
            "shared memory BAR is an I/O BAR",
            u64::from(lo),
        ));
    }
    let hi = match (lo >> 1) & 3 {
        0 => 0,
        2 if index + 1 < NUM_BARS => pci.pci_read32(dev, reg + 4),
        _ => return Err(Error::with("bad memory BAR type", u64::from(lo))),
    };
    Ok(u64::from(hi) << 32 | u64::from(lo & !0xf))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bus 0 with a host bridge at 00:00.0 and a virtio-net device with configuration space
    /// `cfg` at 00:01.0; BAR0 decodes `bar_size` bytes.
    pub(crate) struct FakePci {
        pub cfg: [u8; 256],
        pub bar_size: u64,
        pub bar_sizing: [bool; 2],
        pub writes: Vec<(u8, u32)>,
    }

    fn put(cfg: &mut [u8], off: usize, bytes: &[u8]) {
        cfg[off..off + bytes.len()].copy_from_slice(bytes);
    }

    impl FakePci {
        /// A virtio-net config space like nmvm's: BAR0 at `bar` (64-bit), caps at 0x40.
        pub fn new(bar: u64, bar_size: u64) -> Self {
            let mut cfg = [0u8; 256];
            put(&mut cfg, 0, &0x1af4u16.to_le_bytes());
            put(&mut cfg, 2, &0x1041u16.to_le_bytes());
            put(&mut cfg, 6, &0x0010u16.to_le_bytes());
            cfg[0x0b] = 0x02;
            put(&mut cfg, 0x10, &((bar as u32) | 0x4).to_le_bytes());
            put(&mut cfg, 0x14, &((bar >> 32) as u32).to_le_bytes());
            cfg[0x34] = 0x40;
            let caps: [(usize, u8, u8, u32, u32, Option<u32>); 5] = [
                (0x40, 0x50, CFG_COMMON, 0x0000, 0x1000, None),
                (0x50, 0x68, CFG_NOTIFY, 0x3000, 0x1000, Some(4)),
                (0x68, 0x78, CFG_ISR, 0x1000, 0x1000, None),
                (0x78, 0x88, CFG_DEVICE, 0x2000, 0x1000, None),
                (0x88, 0x9c, 5, 0, 0, None),
            ];
            for (at, next, kind, off, len, mult) in caps {
                cfg[at] = CAP_VENDOR;
                cfg[at + 1] = next;
                cfg[at + 2] = if mult.is_some() { 20 } else { 16 };
                cfg[at + 3] = kind;
                cfg[at + 4] = 0;
                put(&mut cfg, at + 8, &off.to_le_bytes());
                put(&mut cfg, at + 12, &len.to_le_bytes());
                if let Some(m) = mult {
                    put(&mut cfg, at + 16, &m.to_le_bytes());
                }
            }
            cfg[0x9c] = CAP_MSIX;
            cfg[0x9d] = 0;
            // Three vectors; table at BAR0 + 0x4000, pending bits at + 0x5000.
            put(&mut cfg, 0x9e, &2u16.to_le_bytes());
            put(&mut cfg, 0xa0, &0x4000u32.to_le_bytes());
            put(&mut cfg, 0xa4, &0x5000u32.to_le_bytes());
            FakePci {
                cfg,
                bar_size,
                bar_sizing: [false; 2],
                writes: Vec::new(),
            }
        }

        /// Adds nmvm's netmap passthrough BAR 2 (64-bit, prefetchable) at `addr` and a shared
        /// memory capability (id 0) for its first `len` bytes, after the MSI-X capability.
        pub fn add_shared_memory(&mut self, addr: u64, len: u64) {
            put(&mut self.cfg, 0x18, &((addr as u32) | 0xc).to_le_bytes());
            put(&mut self.cfg, 0x1c, &((addr >> 32) as u32).to_le_bytes());
            self.cfg[0x9d] = 0xa8;
            let at = 0xa8;
            self.cfg[at..at + 6].copy_from_slice(&[CAP_VENDOR, 0, 24, CFG_SHARED_MEMORY, 2, 0]);
            put(&mut self.cfg, at + 8, &0u32.to_le_bytes());
            put(&mut self.cfg, at + 12, &(len as u32).to_le_bytes());
            put(&mut self.cfg, at + 16, &0u32.to_le_bytes());
            put(&mut self.cfg, at + 20, &((len >> 32) as u32).to_le_bytes());
        }

        pub fn command(&self) -> u16 {
            u16::from_le_bytes([self.cfg[4], self.cfg[5]])
        }

        pub fn set_cap(&mut self, at: usize, bytes: &[u8]) {
            put(&mut self.cfg, at, bytes);
        }
    }

    impl PciConfig for FakePci {
        fn pci_read32(&mut self, dev: u8, reg: u8) -> u32 {
            let r = usize::from(reg & 0xfc);
            match dev {
                0 if r == 0 => 0x29c0_8086,
                0 => 0,
                1 => {
                    let v = u32::from_le_bytes(self.cfg[r..r + 4].try_into().unwrap());
                    match r {
                        0x10 if self.bar_sizing[0] => (!(self.bar_size - 1) as u32) | (v & 0xf),
                        0x14 if self.bar_sizing[1] => (!(self.bar_size - 1) >> 32) as u32,
                        _ => v,
                    }
                }
                _ => u32::MAX,
            }
        }

        fn pci_write32(&mut self, dev: u8, reg: u8, val: u32) {
            assert_eq!(dev, 1, "write to a device that is not ours");
            self.writes.push((reg, val));
            match reg {
                0x10 | 0x14 => {
                    let i = usize::from(reg - 0x10) / 4;
                    if val == u32::MAX {
                        self.bar_sizing[i] = true;
                    } else {
                        self.bar_sizing[i] = false;
                        let keep = if i == 0 { self.cfg[0x10] & 0xf } else { 0 };
                        let v = if i == 0 {
                            (val & !0xf) | u32::from(keep)
                        } else {
                            val
                        };
                        put(&mut self.cfg, usize::from(reg), &v.to_le_bytes());
                    }
                }
                _ => panic!("unexpected 32-bit config write at {reg:#x}"),
            }
        }

        fn pci_write16(&mut self, dev: u8, reg: u8, val: u16) {
            assert_eq!(dev, 1);
            assert_eq!(reg, 4, "only the command register is written 16 bits wide");
            put(&mut self.cfg, 4, &val.to_le_bytes());
        }
    }

    #[test]
    fn conf1() {
        assert_eq!(conf1_address(0, 1, 0, 0x10), 0x8000_0810);
        assert_eq!(conf1_address(0, 31, 7, 0xff), 0x8000_fffc);
        assert_eq!(conf1_address(2, 0, 0, 0x34), 0x8002_0034);
    }

    #[test]
    fn discovers_device_bar_and_caps() {
        let mut pci = FakePci::new(0xc000_0000, 0x8000);
        assert_eq!(find_device(&mut pci, VENDOR_VIRTIO, DEVICE_NET), Some(1));
        assert_eq!(find_device(&mut pci, VENDOR_VIRTIO, 0x1042), None);
        let bar = setup_bar0(&mut pci, 1).unwrap();
        assert_eq!(
            bar,
            Bar {
                addr: 0xc000_0000,
                size: 0x8000
            }
        );
        // Restored, and enabled.
        assert_eq!(pci.pci_read32(1, 0x10), 0xc000_0004);
        assert_eq!(pci.pci_read32(1, 0x14), 0);
        assert_eq!(pci.command() & 6, 6);
        let caps = find_caps(&mut pci, 1, bar).unwrap();
        assert_eq!(caps.common.addr, 0xc000_0000);
        assert_eq!(caps.notify.addr, 0xc000_3000);
        assert_eq!(caps.notify_mult, 4);
        assert_eq!(caps.isr.addr, 0xc000_1000);
        assert_eq!(caps.device.addr, 0xc000_2000);
        assert!(caps.msix);
        assert_eq!(
            caps.msix_table,
            Some(Region {
                addr: 0xc000_4000,
                len: 48
            })
        );
    }

    #[test]
    fn high_bar_and_bad_bars() {
        let mut pci = FakePci::new(0xfe00_0000, 0x4000);
        assert_eq!(setup_bar0(&mut pci, 1).unwrap().addr, 0xfe00_0000);
        // Above 4 GiB: outside the hole.
        let mut pci = FakePci::new(0x1_0000_0000, 0x4000);
        assert_eq!(
            setup_bar0(&mut pci, 1).unwrap_err().what,
            "BAR0 address outside the PCI hole"
        );
        // A 32-bit BAR.
        let mut pci = FakePci::new(0xc000_0000, 0x4000);
        pci.cfg[0x10] = 0;
        assert_eq!(
            setup_bar0(&mut pci, 1).unwrap_err().what,
            "BAR0 is not a 64-bit memory BAR"
        );
        let mut pci = FakePci::new(0xc000_0000, 0x4000);
        pci.cfg[0x10] = 1;
        assert_eq!(
            setup_bar0(&mut pci, 1).unwrap_err().what,
            "BAR0 is an I/O BAR"
        );
        // Unassigned (address 0).
        let mut pci = FakePci::new(0, 0x4000);
        assert!(setup_bar0(&mut pci, 1).is_err());
    }

    #[test]
    fn caps_first_usable_wins() {
        let mut pci = FakePci::new(0xc000_0000, 0x8000);
        let bar = setup_bar0(&mut pci, 1).unwrap();
        // A common cfg in BAR 2 first: skipped, the BAR0 one later is used.
        pci.set_cap(0x34, &[0xa0]);
        pci.set_cap(0xa0, &[CAP_VENDOR, 0x40, 16, CFG_COMMON, 2, 0, 0, 0]);
        pci.set_cap(0xa8, &0x100u32.to_le_bytes());
        pci.set_cap(0xac, &0x1000u32.to_le_bytes());
        let caps = find_caps(&mut pci, 1, bar).unwrap();
        assert_eq!(caps.common.addr, 0xc000_0000);
        // One that runs past the BAR's end is skipped too.
        pci.set_cap(0xa4, &[0]);
        pci.set_cap(0xa8, &0x7800u32.to_le_bytes());
        let caps = find_caps(&mut pci, 1, bar).unwrap();
        assert_eq!(caps.common.addr, 0xc000_0000);
        // A usable one first wins over the later one.
        pci.set_cap(0xa8, &0x4000u32.to_le_bytes());
        let caps = find_caps(&mut pci, 1, bar).unwrap();
        assert_eq!(caps.common.addr, 0xc000_4000);
    }

    #[test]
    fn shared_memory_capability_and_bar() {
        let mut pci = FakePci::new(0xc000_0000, 0x8000);
        assert_eq!(find_shared_memory(&mut pci, 1, 0), None);
        pci.add_shared_memory(0xd000_0000, 0x1_0080_0000);
        let shm = find_shared_memory(&mut pci, 1, 0).unwrap();
        assert_eq!(
            shm,
            SharedMemory {
                bar: 2,
                offset: 0,
                len: 0x1_0080_0000
            }
        );
        // The virtio caps are still found, and BAR0 sizing does not touch BAR 2.
        let bar = setup_bar0(&mut pci, 1).unwrap();
        assert!(find_caps(&mut pci, 1, bar).is_ok());
        assert_eq!(mem_bar_addr(&mut pci, 1, 2), Ok(0xd000_0000));
        assert!(pci.writes.iter().all(|(reg, _)| *reg < 0x18));
        assert_eq!(mem_bar_addr(&mut pci, 1, 0), Ok(0xc000_0000));
        // Another id, an offset_hi, a truncated capability.
        assert_eq!(find_shared_memory(&mut pci, 1, 1), None);
        pci.set_cap(0xa8 + 16, &1u32.to_le_bytes());
        assert_eq!(find_shared_memory(&mut pci, 1, 0).unwrap().offset, 1 << 32);
        pci.set_cap(0xa8 + 2, &[20]);
        assert_eq!(find_shared_memory(&mut pci, 1, 0), None);
        // A BAR 2 that is an I/O BAR, or a 64-bit BAR in the last register.
        pci.set_cap(0x18, &1u32.to_le_bytes());
        assert!(mem_bar_addr(&mut pci, 1, 2).is_err());
        pci.set_cap(0x24, &4u32.to_le_bytes());
        assert_eq!(
            mem_bar_addr(&mut pci, 1, 5).unwrap_err().what,
            "bad memory BAR type"
        );
        assert!(mem_bar_addr(&mut pci, 1, 6).is_err());
        // A 32-bit BAR.
        pci.set_cap(0x18, &0xd000_0008u32.to_le_bytes());
        assert_eq!(mem_bar_addr(&mut pci, 1, 2), Ok(0xd000_0000));
    }

    #[test]
    fn shared_memory_walk_ends_on_loops_and_bad_pointers() {
        let mut pci = FakePci::new(0xc000_0000, 0x8000);
        pci.add_shared_memory(0xd000_0000, 0x100_0000);
        // A loop before the capability: the walk gives up.
        pci.set_cap(0x69, &[0x40]);
        assert_eq!(find_shared_memory(&mut pci, 1, 0), None);
        let mut pci = FakePci::new(0xc000_0000, 0x8000);
        pci.add_shared_memory(0xd000_0000, 0x100_0000);
        pci.set_cap(0x34, &[0x10]);
        assert_eq!(find_shared_memory(&mut pci, 1, 0), None);
        pci.set_cap(0x34, &[0x40]);
        pci.set_cap(6, &[0]);
        assert_eq!(find_shared_memory(&mut pci, 1, 0), None);
    }

    #[test]
    fn caps_missing_or_looping() {
        let mut pci = FakePci::new(0xc000_0000, 0x8000);
        let bar = setup_bar0(&mut pci, 1).unwrap();
        // Notify cap removed from the chain.
        pci.set_cap(0x41, &[0x68]);
        assert_eq!(
            find_caps(&mut pci, 1, bar).unwrap_err().what,
            "no usable notify capability"
        );
        // A loop that never reaches the device cap: the walk ends, the cap is missing.
        let mut pci = FakePci::new(0xc000_0000, 0x8000);
        pci.set_cap(0x69, &[0x40]);
        assert_eq!(
            find_caps(&mut pci, 1, bar).unwrap_err().what,
            "no usable device config capability"
        );
        // No capability list at all.
        let mut pci = FakePci::new(0xc000_0000, 0x8000);
        pci.set_cap(6, &[0]);
        assert_eq!(
            find_caps(&mut pci, 1, bar).unwrap_err().what,
            "device has no capability list"
        );
        // A pointer into the header.
        let mut pci = FakePci::new(0xc000_0000, 0x8000);
        pci.set_cap(0x34, &[0x10]);
        assert_eq!(
            find_caps(&mut pci, 1, bar).unwrap_err().what,
            "bad capability pointer"
        );
    }
}
