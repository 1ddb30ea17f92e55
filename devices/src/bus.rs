//! The port-I/O bus: maps guest port accesses to device models.
//!
//! A VM has a handful of port devices, so a short vector searched linearly is
//! both the simplest and the fastest structure here.

use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device that answers guest port I/O within its range.
pub trait PioDevice: Send {
    /// Fills `data` for a read at `offset` from the device's base port.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Handles a write of `data` at `offset` from the device's base port.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim overlapping port ranges.
    #[error("port range {base:#x}+{len} overlaps a device already on the bus")]
    Overlap {
        /// First port of the rejected range.
        base: u16,
        /// Length of the rejected range.
        len: u16,
    },
    /// A range of length zero or one that wraps past 0xffff.
    #[error("invalid port range {base:#x}+{len}")]
    InvalidRange {
        /// First port of the rejected range.
        base: u16,
        /// Length of the rejected range.
        len: u16,
    },
}

struct Range {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

impl Range {
    fn contains(&self, port: u16) -> bool {
        port >= self.base && u32::from(port) < u32::from(self.base) + u32::from(self.len)
    }
}

/// Port-I/O bus shared by all vCPU threads.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
    unhandled: std::sync::atomic::AtomicU64,
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at ports `base..base+len`.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusError> {
        let end = u32::from(base) + u32::from(len);
        if len == 0 || end > 0x1_0000 {
            return Err(BusError::InvalidRange { base, len });
        }
        let overlaps = self.ranges.iter().any(|r| {
            u32::from(base) < u32::from(r.base) + u32::from(r.len) && u32::from(r.base) < end
        });
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<&Range> {
        self.ranges.iter().find(|r| r.contains(port))
    }

    /// Dispatches a guest read. Ports nobody claims read as all ones, as on
    /// real hardware with nothing driving the bus.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some(r) => lock(&r.device).read(port - r.base, data),
            None => {
                self.count_unhandled();
                data.fill(0xff);
            }
        }
    }

    /// Dispatches a guest write. Writes to unclaimed ports are dropped.
    pub fn write(&self, port: u16, data: &[u8]) {
        match self.find(port) {
            Some(r) => lock(&r.device).write(port - r.base, data),
            None => self.count_unhandled(),
        }
    }

    fn count_unhandled(&self) {
        self.unhandled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Accesses to ports no device claims (dropped or read as 0xff).
    pub fn unhandled_accesses(&self) -> u64 {
        self.unhandled.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Locks a device, recovering from a poisoned lock: a device whose handler
/// panicked on one thread must not wedge every other vCPU.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_offset_and_reads_unclaimed_ports_as_ones() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x3fd, &mut b);
        assert_eq!(b, [5]);
        bus.write(0x3f8, b"a");
        assert_eq!(lock(&dev).writes, vec![(0, b"a".to_vec())]);
        bus.read(0x3f7, &mut b);
        assert_eq!(b, [0xff]);
        bus.write(0x400, &[1]);
        assert_eq!(bus.unhandled_accesses(), 2);
    }

    #[test]
    fn rejects_overlapping_and_wrapping_ranges() {
        let mut bus = PioBus::new();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        assert_eq!(
            bus.insert(0x64, 1, Arc::new(Mutex::new(Recorder::default()))),
            Err(BusError::Overlap { base: 0x64, len: 1 })
        );
        assert_eq!(
            bus.insert(0xffff, 2, Arc::new(Mutex::new(Recorder::default()))),
            Err(BusError::InvalidRange {
                base: 0xffff,
                len: 2
            })
        );
    }
}
