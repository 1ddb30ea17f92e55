//! MSI-X: the vector table and pending-bit array a device exposes in a BAR,
//! and delivery through vectors the VMM wires to the hypervisor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
const CTRL_MASKED: u32 = 1;
/// Message control: MSI-X enable.
pub const MSG_CTRL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSG_CTRL_MASK_ALL: u16 = 1 << 14;

/// An MSI message: where and what the device writes to interrupt a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// One vector as the hypervisor sees it. Implemented by the VMM (KVM: a
/// GSI route plus an irqfd).
pub trait MsiVector: Send + Sync {
    /// Points the vector at `msg`, or disconnects it (`None`) while the
    /// guest has it masked or MSI-X disabled.
    fn set_route(&self, msg: Option<MsiMessage>);
    /// Fires the vector. Only called while it is routed.
    fn trigger(&self);
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

/// An MSI-X table and pending-bit array.
pub struct MsixTable {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    routed: Vec<Option<MsiMessage>>,
    enabled: bool,
    masked: bool,
    vectors: Vec<Arc<dyn MsiVector>>,
    /// Guest accesses outside the table or PBA, or of a bad width.
    pub bad_accesses: AtomicU64,
}

impl MsixTable {
    /// A table over `vectors` (one entry each), all masked, MSI-X disabled.
    pub fn new(vectors: Vec<Arc<dyn MsiVector>>) -> Self {
        let n = vectors.len();
        Self {
            entries: vec![
                Entry {
                    ctrl: CTRL_MASKED,
                    ..Default::default()
                };
                n
            ],
            pending: vec![false; n],
            routed: vec![None; n],
            enabled: false,
            masked: false,
            vectors,
            bad_accesses: AtomicU64::new(0),
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no vectors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether MSI-X is enabled in the capability.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Applies a write to the capability's message control register.
    pub fn set_control(&mut self, ctrl: u16) {
        self.enabled = ctrl & MSG_CTRL_ENABLE != 0;
        self.masked = ctrl & MSG_CTRL_MASK_ALL != 0;
        self.update_all();
    }

    fn deliverable(&self, v: usize) -> Option<MsiMessage> {
        let e = self.entries[v];
        (self.enabled && !self.masked && e.ctrl & CTRL_MASKED == 0).then_some(MsiMessage {
            address: u64::from(e.addr_lo) | (u64::from(e.addr_hi) << 32),
            data: e.data,
        })
    }

    fn update(&mut self, v: usize) {
        let want = self.deliverable(v);
        if want != self.routed[v] {
            self.vectors[v].set_route(want);
            self.routed[v] = want;
        }
        if want.is_some() && self.pending[v] {
            self.pending[v] = false;
            self.vectors[v].trigger();
        }
    }

    fn update_all(&mut self) {
        for v in 0..self.entries.len() {
            self.update(v);
        }
    }

    /// Raises vector `v`: delivered now, or left pending while masked.
    /// Returns false for a vector that does not exist (for example the
    /// guest's "no vector", 0xffff) or while MSI-X is disabled.
    pub fn trigger(&mut self, v: u16) -> bool {
        let v = usize::from(v);
        if v >= self.entries.len() || !self.enabled {
            return false;
        }
        if self.routed[v].is_some() {
            self.vectors[v].trigger();
        } else {
            self.pending[v] = true;
        }
        true
    }

    /// A guest read of the table at byte `offset`.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((v, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = self.entries[v];
        let words = [e.addr_lo, e.addr_hi, e.data, e.ctrl];
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        data.copy_from_slice(&bytes[field..field + data.len()]);
    }

    /// A guest write to the table at byte `offset`.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((v, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = &mut self.entries[v];
        let mut bytes = [0u8; 16];
        for (i, w) in [e.addr_lo, e.addr_hi, e.data, e.ctrl].iter().enumerate() {
            bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        bytes[field..field + data.len()].copy_from_slice(data);
        let word = |i: usize| {
            u32::from_le_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ])
        };
        e.addr_lo = word(0);
        e.addr_hi = word(1);
        e.data = word(2);
        // Only the mask bit of vector control is writable.
        e.ctrl = word(3) & CTRL_MASKED;
        self.update(v);
    }

    /// A guest read of the pending-bit array at byte `offset`.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let byte = offset + i as u64;
            *b = (0..8u64)
                .filter(|bit| {
                    self.pending
                        .get((byte * 8 + bit) as usize)
                        .copied()
                        .unwrap_or(false)
                })
                .fold(0u8, |acc, bit| acc | (1 << bit));
        }
    }

    /// Finds the entry and byte within it for an access; counts and
    /// rejects accesses outside the table or straddling entries.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let v = offset / ENTRY_SIZE;
        let field = (offset % ENTRY_SIZE) as usize;
        if v >= self.entries.len() as u64 || !matches!(len, 1 | 2 | 4 | 8) || field + len > 16 {
            self.bad_accesses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some((v as usize, field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Probe {
        routes: Mutex<Vec<Option<MsiMessage>>>,
        fired: AtomicU64,
    }

    impl MsiVector for Probe {
        fn set_route(&self, msg: Option<MsiMessage>) {
            self.routes.lock().unwrap().push(msg);
        }
        fn trigger(&self) {
            self.fired.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn table() -> (MsixTable, Arc<Probe>) {
        let p = Arc::new(Probe::default());
        (
            MsixTable::new(vec![p.clone(), Arc::new(Probe::default())]),
            p,
        )
    }

    #[test]
    fn masked_vectors_keep_interrupts_pending_until_unmasked() {
        let (mut t, p) = table();
        t.set_control(MSG_CTRL_ENABLE);
        t.write_table(0, &0xfee0_0000u32.to_le_bytes());
        t.write_table(8, &0x41u32.to_le_bytes());
        assert!(t.trigger(0));
        assert_eq!(p.fired.load(Ordering::Relaxed), 0);
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        t.write_table(12, &0u32.to_le_bytes()); // unmask
        assert_eq!(p.fired.load(Ordering::Relaxed), 1);
        assert_eq!(
            *p.routes.lock().unwrap(),
            vec![Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })]
        );
        assert!(t.trigger(0));
        assert_eq!(p.fired.load(Ordering::Relaxed), 2);
        // The function mask disconnects it again.
        t.set_control(MSG_CTRL_ENABLE | MSG_CTRL_MASK_ALL);
        assert_eq!(p.routes.lock().unwrap().last(), Some(&None));
    }

    #[test]
    fn out_of_range_accesses_are_counted_and_ignored() {
        let (mut t, _) = table();
        t.write_table(2 * ENTRY_SIZE, &[1, 2, 3, 4]);
        t.write_table(14, &[1, 2, 3, 4]);
        t.write_table(0, &[1, 2, 3]);
        assert_eq!(t.bad_accesses.load(Ordering::Relaxed), 3);
        let mut d = [0xaau8; 4];
        t.read_table(1 << 20, &mut d);
        assert_eq!(d, [0; 4]);
        assert!(!t.trigger(0xffff));
    }
}
