//! The virtio 1.x PCI transport's common configuration (§4.1.4.3): reset, feature
//! negotiation, queue set-up, notifications and the device-specific configuration.

use super::pci::Caps;
use super::{feature, status, Error, Mmio};

/// Offsets in `struct virtio_pci_common_cfg`.
pub mod common {
    /// `device_feature_select` (u32).
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// `device_feature` (u32, read-only).
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// `driver_feature_select` (u32).
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// `driver_feature` (u32).
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// `msix_config` (u16).
    pub const MSIX_CONFIG: u64 = 0x10;
    /// `num_queues` (u16, read-only).
    pub const NUM_QUEUES: u64 = 0x12;
    /// `device_status` (u8).
    pub const DEVICE_STATUS: u64 = 0x14;
    /// `config_generation` (u8, read-only).
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// `queue_select` (u16).
    pub const QUEUE_SELECT: u64 = 0x16;
    /// `queue_size` (u16).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// `queue_msix_vector` (u16).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// `queue_enable` (u16).
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// `queue_notify_off` (u16, read-only).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// `queue_desc` (u64, as two u32).
    pub const QUEUE_DESC: u64 = 0x20;
    /// `queue_driver`: the available ring (u64, as two u32).
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// `queue_device`: the used ring (u64, as two u32).
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// "No MSI-X vector": the guest polls.
pub const NO_VECTOR: u16 = 0xffff;
/// Reads of `device_status` before a reset counts as failed.
pub const RESET_POLLS: u32 = 10_000;

/// The ring addresses of one queue, as the device is told them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
}

/// The common configuration of one device, located through its capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    caps: Caps,
}

impl Transport {
    /// The transport described by `caps`.
    pub fn new(caps: Caps) -> Self {
        Transport { caps }
    }

    /// The capabilities it was built from.
    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    fn reg(&self, off: u64) -> u64 {
        self.caps.common.addr + off
    }

    /// Reads `device_status`.
    pub fn status(&self, m: &mut impl Mmio) -> u8 {
        m.mmio_read8(self.reg(common::DEVICE_STATUS))
    }

    /// Writes `device_status`.
    pub fn set_status(&self, m: &mut impl Mmio, s: u8) {
        m.mmio_write8(self.reg(common::DEVICE_STATUS), s);
    }

    /// Resets the device: writes 0, then reads the status until it is 0.
    pub fn reset(&self, m: &mut impl Mmio) -> Result<(), Error> {
        self.set_status(m, 0);
        let mut last = 0;
        for _ in 0..RESET_POLLS {
            last = self.status(m);
            if last == 0 {
                return Ok(());
            }
        }
        Err(Error::with("device did not reset, status", u64::from(last)))
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self, m: &mut impl Mmio) -> u64 {
        m.mmio_write32(self.reg(common::DEVICE_FEATURE_SELECT), 0);
        let lo = m.mmio_read32(self.reg(common::DEVICE_FEATURE));
        m.mmio_write32(self.reg(common::DEVICE_FEATURE_SELECT), 1);
        let hi = m.mmio_read32(self.reg(common::DEVICE_FEATURE));
        u64::from(hi) << 32 | u64::from(lo)
    }

    /// After a reset: ACKNOWLEDGE, DRIVER, accepts `wanted & offered` (VERSION_1 required),
    /// FEATURES_OK and checks that the device kept it. Returns the negotiated features.
    pub fn negotiate(&self, m: &mut impl Mmio, wanted: u64) -> Result<u64, Error> {
        self.set_status(m, status::ACKNOWLEDGE);
        self.set_status(m, status::ACKNOWLEDGE | status::DRIVER);
        let offered = self.device_features(m);
        if offered & feature::VERSION_1 == 0 {
            self.set_status(m, status::ACKNOWLEDGE | status::DRIVER | status::FAILED);
            return Err(Error::with(
                "device does not offer VERSION_1, features",
                offered,
            ));
        }
        let features = offered & wanted;
        m.mmio_write32(self.reg(common::DRIVER_FEATURE_SELECT), 0);
        m.mmio_write32(self.reg(common::DRIVER_FEATURE), features as u32);
        m.mmio_write32(self.reg(common::DRIVER_FEATURE_SELECT), 1);
        m.mmio_write32(self.reg(common::DRIVER_FEATURE), (features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_status(m, s);
        let got = self.status(m);
        if got & status::FEATURES_OK == 0 {
            self.set_status(m, got | status::FAILED);
            return Err(Error::with(
                "device refused FEATURES_OK, features",
                features,
            ));
        }
        // No configuration-change interrupts either.
        m.mmio_write16(self.reg(common::MSIX_CONFIG), NO_VECTOR);
        Ok(features)
    }

    /// Sets up queue `index`: the largest power of two not above the device's maximum and
    /// `max_size`, no MSI-X vector, the ring addresses, then enables it. Returns the queue size
    /// and the queue's notification address.
    pub fn setup_queue(
        &self,
        m: &mut impl Mmio,
        index: u16,
        max_size: u16,
        rings: RingAddrs,
    ) -> Result<(u16, u64), Error> {
        m.mmio_write16(self.reg(common::QUEUE_SELECT), index);
        let device_max = m.mmio_read16(self.reg(common::QUEUE_SIZE));
        let limit = device_max.min(max_size);
        if limit == 0 {
            return Err(Error::with("queue not available", u64::from(index)));
        }
        let size = 1u16 << (15 - limit.leading_zeros());
        m.mmio_write16(self.reg(common::QUEUE_SIZE), size);
        m.mmio_write16(self.reg(common::QUEUE_MSIX_VECTOR), NO_VECTOR);
        for (off, addr) in [
            (common::QUEUE_DESC, rings.desc),
            (common::QUEUE_DRIVER, rings.avail),
            (common::QUEUE_DEVICE, rings.used),
        ] {
            m.mmio_write32(self.reg(off), addr as u32);
            m.mmio_write32(self.reg(off + 4), (addr >> 32) as u32);
        }
        let notify_off = m.mmio_read16(self.reg(common::QUEUE_NOTIFY_OFF));
        let rel = u64::from(notify_off) * u64::from(self.caps.notify_mult);
        if rel + 2 > u64::from(self.caps.notify.len) {
            return Err(Error::with(
                "queue notify address outside the notify region, offset",
                rel,
            ));
        }
        m.mmio_write16(self.reg(common::QUEUE_ENABLE), 1);
        Ok((size, self.caps.notify.addr + rel))
    }

    /// Sets DRIVER_OK: the device may now use the queues.
    pub fn driver_ok(&self, m: &mut impl Mmio) {
        self.set_status(
            m,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// Tells the device that queue `index` has new available buffers.
    pub fn notify(m: &mut impl Mmio, addr: u64, index: u16) {
        m.mmio_write16(addr, index);
    }

    /// Reads `N` bytes of the device configuration at `off`, consistently (retrying while
    /// `config_generation` changes, a few times at most).
    pub fn read_device_config<const N: usize>(
        &self,
        m: &mut impl Mmio,
        off: u32,
    ) -> Result<[u8; N], Error> {
        if u64::from(off) + N as u64 > u64::from(self.caps.device.len) {
            return Err(Error::with(
                "device config too short, length",
                u64::from(self.caps.device.len),
            ));
        }
        let mut out = [0u8; N];
        for _ in 0..8 {
            let before = m.mmio_read8(self.reg(common::CONFIG_GENERATION));
            for (i, b) in out.iter_mut().enumerate() {
                *b = m.mmio_read8(self.caps.device.addr + u64::from(off) + i as u64);
            }
            if m.mmio_read8(self.reg(common::CONFIG_GENERATION)) == before {
                break;
            }
        }
        Ok(out)
    }
}
