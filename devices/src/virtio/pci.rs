//! The modern (virtio 1.x) PCI transport: configuration space with the
//! virtio capabilities and MSI-X, and BAR 0 holding the common, ISR,
//! device-specific and notification registers and the MSI-X table.
//!
//! BAR 0 layout (32 KiB, 64-bit memory BAR):
//!
//! | offset | region |
//! |---|---|
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status |
//! | 0x2000 | device-specific configuration |
//! | 0x3000 | notifications: queue `q` at 0x3000 + 4·q |
//! | 0x4000 | MSI-X table |
//! | 0x5000 | MSI-X pending bits |

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{
    Activation, VirtioDevice, VirtioInterrupt, F_VERSION_1, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
};
use crate::bus::lock;
use crate::eventfd::EventFd;
use crate::pci::config::ConfigSpace;
use crate::pci::msix::{MsiVector, MsixTable};
use crate::pci::PciDevice;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
/// Offset of the notification region in BAR 0.
pub const NOTIFY: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
const REGION: u64 = 0x1000;
/// "No vector".
pub const NO_VECTOR: u16 = 0xffff;

const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
/// `VIRTIO_PCI_CAP_SHARED_MEMORY_CFG`.
const CFG_SHARED_MEMORY: u8 = 8;
/// The BAR that holds shared memory (netmap passthrough).
pub const SHM_BAR: u8 = 2;

const VIRTIO_VENDOR: u16 = 0x1af4;
const DEVICE_ID_BASE: u16 = 0x1040;

/// Counters of the transport.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Guest accesses to registers that do not exist or of a bad width.
    pub bad_accesses: AtomicU64,
    /// Notifications that arrived as MMIO exits rather than ioeventfds.
    pub slow_notifies: AtomicU64,
}

/// Interrupt state shared with the device's worker.
struct PciInterrupt {
    msix: Arc<Mutex<MsixTable>>,
    queue_vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
    isr: AtomicU8,
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_queue(&self, queue: u16) {
        self.isr.fetch_or(1, Ordering::SeqCst);
        if let Some(v) = self.queue_vectors.get(usize::from(queue)) {
            lock(&self.msix).trigger(v.load(Ordering::Acquire));
        }
    }

    fn signal_config(&self) {
        self.isr.fetch_or(2, Ordering::SeqCst);
        lock(&self.msix).trigger(self.config_vector.load(Ordering::Acquire));
    }
}

/// A virtio device on PCI.
pub struct VirtioPci {
    config: ConfigSpace,
    msix_cap: usize,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<PciInterrupt>,
    kicks: Vec<Arc<EventFd>>,
    queues: Vec<Queue>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    activated: bool,
    stats: Arc<TransportStats>,
}

impl VirtioPci {
    /// Puts `device` on PCI with BAR 0 at `bar_addr`, MSI-X `vectors` (one
    /// per queue plus one for configuration changes), over `mem`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bar_addr: u64,
        vectors: Vec<Arc<dyn MsiVector>>,
        mem: GuestMemoryMmap,
    ) -> std::io::Result<Self> {
        let sizes = device.queue_max_sizes();
        let device_id = DEVICE_ID_BASE + device.device_type();
        let class = match device.device_type() {
            1 => 0x02_00_00, // network controller, Ethernet
            _ => 0xff_00_00,
        };
        let mut config = ConfigSpace::new(
            VIRTIO_VENDOR,
            device_id,
            class,
            VIRTIO_VENDOR,
            device.device_type(),
        );
        config.add_mem64_bar(0, bar_addr, BAR_SIZE);
        let vcap = |cfg_type: u8, offset: u64, len: u64, extra: &[u8]| {
            // cap_len, cfg_type, bar, id, padding[2], offset, length
            let mut body = vec![16 + extra.len() as u8, cfg_type, 0, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(len as u32).to_le_bytes());
            body.extend_from_slice(extra);
            body
        };
        config.add_capability(CAP_VENDOR, &vcap(CFG_COMMON, COMMON, 0x38, &[]), &[]);
        config.add_capability(
            CAP_VENDOR,
            &vcap(
                CFG_NOTIFY,
                NOTIFY,
                REGION,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        );
        config.add_capability(CAP_VENDOR, &vcap(CFG_ISR, ISR, 1, &[]), &[]);
        config.add_capability(CAP_VENDOR, &vcap(CFG_DEVICE, DEVICE_CFG, REGION, &[]), &[]);
        let table_size = (vectors.len() as u16).saturating_sub(1);
        let mut msix_body = table_size.to_le_bytes().to_vec();
        msix_body.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes()); // BIR 0
        msix_body.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        // Byte 3 of the capability holds the enable and function-mask bits.
        let msix_cap = config.add_capability(CAP_MSIX, &msix_body, &[(3, 0xc0)]);

        let mut kicks = Vec::new();
        let mut queues = Vec::new();
        for &max in &sizes {
            kicks.push(Arc::new(EventFd::new(
                libc::EFD_NONBLOCK | libc::EFD_CLOEXEC,
            )?));
            queues.push(Queue::new(max).map_err(|e| std::io::Error::other(e.to_string()))?);
        }
        let interrupt = Arc::new(PciInterrupt {
            msix: Arc::new(Mutex::new(MsixTable::new(vectors))),
            queue_vectors: sizes.iter().map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            config_vector: AtomicU16::new(NO_VECTOR),
            isr: AtomicU8::new(0),
        });
        Ok(Self {
            config,
            msix_cap,
            device,
            mem,
            interrupt,
            kicks,
            queues,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            activated: false,
            stats: Arc::new(TransportStats::default()),
        })
    }

    /// Adds BAR 2, `bar_size` bytes at `addr`, whose first `len` bytes the
    /// VMM backs with shared memory (a memory slot), and a virtio shared
    /// memory capability with id `id` describing them. Call before the
    /// guest runs.
    pub fn add_shared_memory(&mut self, addr: u64, bar_size: u64, len: u64, id: u8) {
        self.config
            .add_mem64_bar(usize::from(SHM_BAR), addr, bar_size);
        // virtio_pci_cap64: cap_len, cfg_type, bar, id, padding[2], offset,
        // length, offset_hi, length_hi.
        let mut body = vec![24, CFG_SHARED_MEMORY, SHM_BAR, id, 0, 0];
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&(len as u32).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&((len >> 32) as u32).to_le_bytes());
        self.config.add_capability(CAP_VENDOR, &body, &[]);
    }

    /// The queues' notification eventfds, with their guest-physical
    /// addresses, for the VMM to register as ioeventfds.
    pub fn notify_eventfds(&self, bar_addr: u64) -> Vec<(u64, Arc<EventFd>)> {
        self.kicks
            .iter()
            .enumerate()
            .map(|(q, e)| {
                (
                    bar_addr + NOTIFY + u64::from(NOTIFY_OFF_MULTIPLIER) * q as u64,
                    e.clone(),
                )
            })
            .collect()
    }

    /// Transport counters.
    pub fn stats(&self) -> Arc<TransportStats> {
        self.stats.clone()
    }

    /// Whether the driver has MSI-X enabled.
    pub fn msix_enabled(&self) -> bool {
        lock(&self.interrupt.msix).enabled()
    }

    /// Out-of-range MSI-X table accesses seen so far.
    pub fn msix_bad_accesses(&self) -> u64 {
        lock(&self.interrupt.msix)
            .bad_accesses
            .load(Ordering::Relaxed)
    }

    /// Stops the device (as a guest reset would) so that it no longer
    /// touches guest memory; used when the VM ends.
    pub fn shutdown(&mut self) {
        self.reset();
    }

    fn bad(&self, what: &str, offset: u64, len: usize) {
        self.stats.bad_accesses.fetch_add(1, Ordering::Relaxed);
        debug!("virtio-pci: bad {what} access at {offset:#x} ({len} bytes)");
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        for v in &self.interrupt.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
        self.interrupt
            .config_vector
            .store(NO_VECTOR, Ordering::Release);
        self.interrupt.isr.store(0, Ordering::SeqCst);
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.status = 0;
    }

    fn set_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let mut status = status;
        if status & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok =
                self.driver_features & !offered == 0 && self.driver_features & F_VERSION_1 != 0;
            if !ok {
                warn!(
                    "virtio-pci: refusing driver features {:#x} (offered {offered:#x}; VERSION_1 is required)",
                    self.driver_features
                );
                status &= !STATUS_FEATURES_OK;
            }
        }
        if status & STATUS_DRIVER_OK != 0 && !self.activated && status & STATUS_FEATURES_OK != 0 {
            self.activate();
        }
        self.status = status;
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & super::F_RING_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for q in &self.queues {
            // The transport keeps its copy for register reads; the device
            // gets its own from the same state.
            let Ok(mut q) = Queue::try_from(q.state()) else {
                warn!("virtio-pci: a queue's configuration is invalid");
                self.status |= STATUS_NEEDS_RESET;
                return;
            };
            q.set_event_idx(event_idx);
            queues.push(q);
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            kicks: self.kicks.clone(),
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
        };
        match self.device.activate(activation) {
            Ok(()) => self.activated = true,
            Err(e) => {
                warn!("virtio-pci: cannot activate the device: {e}");
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let qsel = usize::from(self.queue_select);
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.interrupt.config_vector.load(Ordering::Acquire)),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => {
                let needs_reset = self.activated && self.device.needs_reset();
                u64::from(self.status | if needs_reset { STATUS_NEEDS_RESET } else { 0 })
            }
            (0x15, 1) => 0, // config generation: the config never changes
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => self.selected_queue().map_or(0, |q| u64::from(q.size())),
            (0x1a, 2) => self
                .interrupt
                .queue_vectors
                .get(qsel)
                .map_or(u64::from(NO_VECTOR), |v| {
                    u64::from(v.load(Ordering::Acquire))
                }),
            (0x1c, 2) => self.selected_queue().map_or(0, |q| u64::from(q.ready())),
            (0x1e, 2) => u64::from(self.queue_select),
            (0x20, 4) => self
                .selected_queue()
                .map_or(0, |q| q.desc_table() & 0xffff_ffff),
            (0x24, 4) => self.selected_queue().map_or(0, |q| q.desc_table() >> 32),
            (0x28, 4) => self
                .selected_queue()
                .map_or(0, |q| q.avail_ring() & 0xffff_ffff),
            (0x2c, 4) => self.selected_queue().map_or(0, |q| q.avail_ring() >> 32),
            (0x30, 4) => self
                .selected_queue()
                .map_or(0, |q| q.used_ring() & 0xffff_ffff),
            (0x34, 4) => self.selected_queue().map_or(0, |q| q.used_ring() >> 32),
            (0x20 | 0x28 | 0x30, 8) => self.selected_queue().map_or(0, |q| match offset {
                0x20 => q.desc_table(),
                0x28 => q.avail_ring(),
                _ => q.used_ring(),
            }),
            _ => {
                self.bad("common config read", offset, data.len());
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let v32 = value as u32;
        // Queue layout may only change while the queue is not enabled and
        // the device is not running.
        let queue_writable = !self.activated && self.selected_queue().is_some_and(|q| !q.ready());
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v32,
            (0x08, 4) => self.driver_feature_select = v32,
            (0x0c, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(v32)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32)
                    }
                    _ => {}
                }
            }
            (0x10, 2) => self
                .interrupt
                .config_vector
                .store(value as u16, Ordering::Release),
            (0x14, 1) => self.set_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) if queue_writable => {
                let size = value as u16;
                if let Some(q) = self.selected_queue() {
                    // Sizes must be powers of two up to the maximum.
                    if size.is_power_of_two() && size <= q.max_size() {
                        q.set_size(size);
                    }
                }
            }
            (0x1a, 2) => {
                let qsel = usize::from(self.queue_select);
                if let Some(v) = self.interrupt.queue_vectors.get(qsel) {
                    v.store(value as u16, Ordering::Release);
                }
            }
            (0x1c, 2) if queue_writable => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            (0x20, 4) if queue_writable => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(Some(v32), None)),
            (0x24, 4) if queue_writable => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(None, Some(v32))),
            (0x28, 4) if queue_writable => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(Some(v32), None)),
            (0x2c, 4) if queue_writable => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(None, Some(v32))),
            (0x30, 4) if queue_writable => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(Some(v32), None)),
            (0x34, 4) if queue_writable => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(None, Some(v32))),
            (0x20 | 0x28 | 0x30, 8) if queue_writable => {
                let (lo, hi) = (Some(value as u32), Some((value >> 32) as u32));
                if let Some(q) = self.selected_queue() {
                    match offset {
                        0x20 => q.set_desc_table_address(lo, hi),
                        0x28 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => self.bad("common config write", offset, data.len()),
        }
    }
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, reg: u16, data: &mut [u8]) {
        self.config.read(reg, data);
    }

    fn config_write(&mut self, reg: u16, data: &[u8]) {
        self.config.write(reg, data);
        // Message control lives at capability offset 2..4.
        let ctrl_at = self.msix_cap as u16 + 2;
        if reg <= ctrl_at + 1 && reg + data.len() as u16 > ctrl_at {
            let mut ctrl = [0u8; 2];
            self.config.read(ctrl_at, &mut ctrl);
            lock(&self.interrupt.msix).set_control(u16::from_le_bytes(ctrl));
        }
    }

    fn memory_bars(&self) -> Vec<(u8, u64, u64)> {
        [0, SHM_BAR]
            .into_iter()
            .filter_map(|bar| {
                let (addr, size) = self.config.mem64_bar(usize::from(bar))?;
                Some((bar, addr, size))
            })
            .collect()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar == SHM_BAR {
            // The shared memory is a memory slot and never exits; what
            // does is the BAR's unbacked rest (or a BAR the guest moved).
            data.fill(0);
            self.bad("shared memory BAR read", offset, data.len());
            return;
        }
        match offset {
            o if o < COMMON + REGION => self.common_read(o - COMMON, data),
            o if (ISR..ISR + REGION).contains(&o) => {
                data.fill(0);
                if o == ISR {
                    // Reading the ISR acknowledges it.
                    data[0] = self.interrupt.isr.swap(0, Ordering::SeqCst);
                }
            }
            o if (DEVICE_CFG..DEVICE_CFG + REGION).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG, data)
            }
            o if (MSIX_TABLE..MSIX_TABLE + REGION).contains(&o) => {
                lock(&self.interrupt.msix).read_table(o - MSIX_TABLE, data)
            }
            o if (MSIX_PBA..MSIX_PBA + REGION).contains(&o) => {
                lock(&self.interrupt.msix).read_pba(o - MSIX_PBA, data)
            }
            o => {
                data.fill(0);
                self.bad("BAR read", o, data.len());
            }
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == SHM_BAR {
            self.bad("shared memory BAR write", offset, data.len());
            return;
        }
        match offset {
            o if o < COMMON + REGION => self.common_write(o - COMMON, data),
            o if (DEVICE_CFG..DEVICE_CFG + REGION).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG, data)
            }
            o if (NOTIFY..NOTIFY + REGION).contains(&o) => {
                // Normally an ioeventfd catches these without an exit; this
                // is the path when it is not registered (e.g. a moved BAR).
                let q = ((o - NOTIFY) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                self.stats.slow_notifies.fetch_add(1, Ordering::Relaxed);
                match self.kicks.get(q) {
                    Some(k) => {
                        let _ = k.write(1);
                    }
                    None => self.bad("notify", o, data.len()),
                }
            }
            o if (MSIX_TABLE..MSIX_TABLE + REGION).contains(&o) => {
                lock(&self.interrupt.msix).write_table(o - MSIX_TABLE, data)
            }
            o => self.bad("BAR write", o, data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::MsiMessage;
    use std::sync::atomic::AtomicUsize;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Log {
        activations: AtomicUsize,
        resets: AtomicUsize,
        desc: AtomicU64,
        features: AtomicU64,
    }

    struct FakeDevice(Arc<Log>);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u16 {
            1
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | 1 << 5
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![256, 256]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, a: Activation) -> Result<(), String> {
            self.0.activations.fetch_add(1, Ordering::SeqCst);
            self.0
                .desc
                .store(a.queues[1].desc_table(), Ordering::SeqCst);
            self.0.features.store(a.features, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) {
            self.0.resets.fetch_add(1, Ordering::SeqCst);
        }
        fn needs_reset(&self) -> bool {
            false
        }
    }

    struct NoVector;
    impl MsiVector for NoVector {
        fn set_route(&self, _: Option<MsiMessage>) {}
        fn trigger(&self) {}
    }

    const BAR: u64 = 0xc000_0000;

    fn device() -> (VirtioPci, Arc<Log>) {
        let log = Arc::new(Log::default());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vectors: Vec<Arc<dyn MsiVector>> = (0..3).map(|_| Arc::new(NoVector) as _).collect();
        let dev = VirtioPci::new(Box::new(FakeDevice(log.clone())), BAR, vectors, mem).unwrap();
        (dev, log)
    }

    fn cfg8(d: &mut VirtioPci, reg: u16) -> u8 {
        let mut b = [0u8];
        d.config_read(reg, &mut b);
        b[0]
    }

    fn w(d: &mut VirtioPci, off: u64, v: u64, len: usize) {
        d.bar_write(0, off, &v.to_le_bytes()[..len]);
    }

    fn r(d: &mut VirtioPci, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    #[test]
    fn configuration_space_announces_a_modern_virtio_net_with_msix() {
        let (mut d, _) = device();
        let mut id = [0u8; 4];
        d.config_read(0, &mut id);
        assert_eq!(id, [0xf4, 0x1a, 0x41, 0x10]);
        let mut class = [0u8; 4];
        d.config_read(8, &mut class);
        assert_eq!(&class[1..], &[0x00, 0x00, 0x02]);
        // Walk the capability list: four virtio structures, then MSI-X.
        let mut at = cfg8(&mut d, 0x34);
        let mut seen = Vec::new();
        while at != 0 {
            let id = cfg8(&mut d, u16::from(at));
            seen.push(if id == CAP_VENDOR {
                cfg8(&mut d, u16::from(at) + 3)
            } else {
                id
            });
            at = cfg8(&mut d, u16::from(at) + 1);
        }
        assert_eq!(
            seen,
            vec![CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CAP_MSIX]
        );
        d.config_write(4, &[0x06, 0]);
        assert_eq!(d.memory_bars(), vec![(0, BAR, BAR_SIZE)]);
    }

    #[test]
    fn shared_memory_is_bar_2_with_a_capability_and_its_rest_reads_zero() {
        let (mut d, _) = device();
        const SHM: u64 = 0xd000_0000;
        d.add_shared_memory(SHM, 16 << 20, 0x86_1000, 0);
        let mut at = cfg8(&mut d, 0x34);
        let mut shm_cap = None;
        while at != 0 {
            if cfg8(&mut d, u16::from(at)) == CAP_VENDOR
                && cfg8(&mut d, u16::from(at) + 3) == CFG_SHARED_MEMORY
            {
                shm_cap = Some(u16::from(at));
            }
            at = cfg8(&mut d, u16::from(at) + 1);
        }
        let cap = shm_cap.expect("a shared memory capability");
        let mut body = [0u8; 24];
        d.config_read(cap, &mut body);
        assert_eq!(body[2], 24, "cap_len");
        assert_eq!((body[4], body[5]), (SHM_BAR, 0), "bar, id");
        assert_eq!(u32::from_le_bytes(body[8..12].try_into().unwrap()), 0);
        assert_eq!(
            u32::from_le_bytes(body[12..16].try_into().unwrap()),
            0x86_1000
        );
        assert_eq!(u32::from_le_bytes(body[20..24].try_into().unwrap()), 0);
        d.config_write(4, &[0x06, 0]);
        assert_eq!(
            d.memory_bars(),
            vec![(0, BAR, BAR_SIZE), (SHM_BAR, SHM, 16 << 20)]
        );
        // Past the memory slot: zeros, counted; never BAR 0's registers.
        let mut b = [0xffu8; 4];
        d.bar_read(SHM_BAR, 0x1000, &mut b);
        assert_eq!(b, [0; 4]);
        d.bar_write(SHM_BAR, 0x0, &[1, 0, 0, 0]);
        assert_eq!(d.stats().bad_accesses.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn drivers_without_version_1_are_refused() {
        let (mut d, log) = device();
        w(&mut d, 0x14, 1 | 2, 1);
        w(&mut d, 0x08, 0, 4);
        w(&mut d, 0x0c, 1 << 5, 4);
        w(&mut d, 0x14, 1 | 2 | 8, 1);
        assert_eq!(r(&mut d, 0x14, 1) as u8 & STATUS_FEATURES_OK, 0);
        w(&mut d, 0x14, 1 | 2 | 8 | 4, 1);
        assert_eq!(log.activations.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn negotiation_queue_setup_activation_and_reset() {
        let (mut d, log) = device();
        assert_eq!(r(&mut d, 0x12, 2), 2, "two queues");
        w(&mut d, 0x14, 1 | 2, 1);
        w(&mut d, 0x00, 1, 4);
        assert_eq!(r(&mut d, 0x04, 4), 1, "VERSION_1 is bit 32");
        w(&mut d, 0x08, 0, 4);
        w(&mut d, 0x0c, 1 << 5, 4);
        w(&mut d, 0x08, 1, 4);
        w(&mut d, 0x0c, 1, 4);
        w(&mut d, 0x14, 1 | 2 | 8, 1);
        assert_ne!(r(&mut d, 0x14, 1) as u8 & STATUS_FEATURES_OK, 0);
        for q in 0..2u64 {
            w(&mut d, 0x16, q, 2);
            assert_eq!(r(&mut d, 0x18, 2), 256);
            assert_eq!(r(&mut d, 0x1e, 2), q, "notify offset");
            w(&mut d, 0x18, 128, 2);
            w(&mut d, 0x20, 0x1_0000 + q * 0x4000, 8);
            w(&mut d, 0x28, 0x1_1000 + q * 0x4000, 4);
            w(&mut d, 0x30, 0x1_2000 + q * 0x4000, 4);
            w(&mut d, 0x1c, 1, 2);
            // Once enabled, the layout is read-only.
            w(&mut d, 0x20, 0xdead_0000, 4);
            assert_eq!(r(&mut d, 0x20, 8), 0x1_0000 + q * 0x4000);
        }
        w(&mut d, 0x14, 1 | 2 | 8 | 4, 1);
        assert_eq!(log.activations.load(Ordering::SeqCst), 1);
        assert_eq!(log.desc.load(Ordering::SeqCst), 0x1_4000);
        assert_eq!(log.features.load(Ordering::SeqCst), F_VERSION_1 | 1 << 5);
        w(&mut d, 0x14, 0, 1);
        assert_eq!(log.resets.load(Ordering::SeqCst), 1);
        assert_eq!(r(&mut d, 0x14, 1), 0);
        w(&mut d, 0x16, 1, 2);
        assert_eq!(r(&mut d, 0x1c, 2), 0, "queues are disabled by the reset");
        assert_eq!(r(&mut d, 0x18, 2), 256, "and back to their maximum size");
    }

    #[test]
    fn bad_register_and_msix_accesses_are_counted_not_followed() {
        let (mut d, _) = device();
        w(&mut d, 0x3c, 1, 4); // past the common configuration
        w(&mut d, 0x7000, 1, 4); // an unused part of the BAR
        assert_eq!(d.stats().bad_accesses.load(Ordering::Relaxed), 2);
        w(&mut d, MSIX_TABLE + 3 * 16, 0xfee0_0000, 4); // only 3 vectors
        w(&mut d, MSIX_TABLE + 0x800, 1, 4);
        assert_eq!(d.msix_bad_accesses(), 2);
        assert_eq!(r(&mut d, ISR, 1), 0);
        // A notify write that did not go through an ioeventfd still kicks.
        w(&mut d, NOTIFY + 4, 1, 2);
        assert_eq!(d.kicks[1].read().unwrap(), 1);
    }
}
