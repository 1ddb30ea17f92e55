//! The driver side of a split virtqueue (virtio 1.x §2.7), polled.
//!
//! Memory layout for a queue of `size` entries (all little-endian):
//! - descriptor table: `size` × 16 bytes: `addr` u64, `len` u32, `flags` u16, `next` u16;
//! - available ring: `flags` u16, `idx` u16, `ring[size]` u16, `used_event` u16;
//! - used ring: `flags` u16, `idx` u16, `ring[size]` {`id` u32, `len` u32}, `avail_event` u16.

use core::sync::atomic::{compiler_fence, Ordering};

use super::transport::RingAddrs;
use super::Dma;

/// The largest queue this driver uses.
pub const MAX_SIZE: u16 = 256;
/// Descriptor continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Buffer is device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// Available ring flag: no interrupts wanted (used without EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag: no notifications wanted (honoured without EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;
/// `used_event` is moved every this many consumed entries (a power of two).
pub const USED_EVENT_STEP: u16 = 64;

/// Bytes of the descriptor table.
pub const fn desc_bytes(size: u16) -> u64 {
    16 * size as u64
}

/// Bytes of the available ring, `used_event` included.
pub const fn avail_bytes(size: u16) -> u64 {
    6 + 2 * size as u64
}

/// Bytes of the used ring, `avail_event` included.
pub const fn used_bytes(size: u16) -> u64 {
    6 + 8 * size as u64
}

/// `vring_need_event`: whether moving an index from `old` to `new` crosses `event`, i.e.
/// the other side asked to hear about entry `event` and it is among the new ones.
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One used-ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index of the chain (as the device wrote it: not checked).
    pub id: u32,
    /// Bytes the device wrote into the chain.
    pub len: u32,
}

/// A split virtqueue as the driver sees it.
pub struct SplitQueue {
    size: u16,
    rings: RingAddrs,
    event_idx: bool,
    /// Next available index to publish (the driver's shadow of `avail.idx`).
    next_avail: u16,
    /// `avail.idx` as last written: entries from here to `next_avail` are
    /// pushed but not yet published.
    published: u16,
    /// `next_avail` when the device was last considered for a notification.
    kicked: u16,
    /// Next used index to consume.
    last_used: u16,
    /// Free descriptor indices, a stack.
    free: [u16; MAX_SIZE as usize],
    nfree: u16,
    /// Bit per descriptor: currently owned by the device (made available, not yet freed).
    busy: [u64; MAX_SIZE as usize / 64],
}

impl SplitQueue {
    /// A queue of `size` entries (a power of two, at most [`MAX_SIZE`]; other values are
    /// clamped to one) at `rings`. Call [`SplitQueue::init`] before use.
    pub fn new(size: u16, rings: RingAddrs, event_idx: bool) -> Self {
        let size = size.clamp(1, MAX_SIZE);
        let size = 1u16 << (15 - size.leading_zeros());
        let mut q = SplitQueue {
            size,
            rings,
            event_idx,
            next_avail: 0,
            published: 0,
            kicked: 0,
            last_used: 0,
            free: [0; MAX_SIZE as usize],
            nfree: 0,
            busy: [0; MAX_SIZE as usize / 64],
        };
        q.reset_free_list();
        q
    }

    fn reset_free_list(&mut self) {
        // Popped from the end: descriptors come out as 0, 1, 2, ...
        for (i, slot) in self
            .free
            .iter_mut()
            .take(usize::from(self.size))
            .enumerate()
        {
            *slot = self.size - 1 - i as u16;
        }
        self.nfree = self.size;
        self.busy = [0; MAX_SIZE as usize / 64];
    }

    /// Zeroes the rings and forgets all state: a fresh queue, as after a device reset.
    pub fn init(&mut self, dma: &mut impl Dma) {
        for (addr, bytes) in [
            (self.rings.desc, desc_bytes(self.size)),
            (self.rings.avail, avail_bytes(self.size)),
            (self.rings.used, used_bytes(self.size)),
        ] {
            for b in dma.dma_bytes(addr, bytes as usize) {
                *b = 0;
            }
        }
        self.next_avail = 0;
        self.published = 0;
        self.kicked = 0;
        self.last_used = 0;
        self.reset_free_list();
        if self.event_idx {
            self.write_used_event(dma);
        } else {
            dma.dma_write16(self.rings.avail, AVAIL_F_NO_INTERRUPT);
        }
        compiler_fence(Ordering::SeqCst);
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The ring addresses.
    pub fn rings(&self) -> RingAddrs {
        self.rings
    }

    /// The driver's `avail.idx`.
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.nfree
    }

    /// Descriptors owned by the device.
    pub fn in_flight(&self) -> u16 {
        self.size - self.nfree
    }

    /// Takes a free descriptor.
    pub fn alloc(&mut self) -> Option<u16> {
        let n = self.nfree.checked_sub(1)?;
        let id = *self.free.get(usize::from(n))?;
        self.nfree = n;
        if let Some(w) = self.busy.get_mut(usize::from(id / 64)) {
            *w |= 1 << (id % 64);
        }
        Some(id)
    }

    /// Returns descriptor `id` (as a used entry named it) to the free list. `false`, and
    /// nothing done, if `id` is out of range or not allocated (a device returning garbage).
    pub fn free(&mut self, id: u32) -> bool {
        let Ok(id) = u16::try_from(id) else {
            return false;
        };
        if id >= self.size {
            return false;
        }
        let Some(w) = self.busy.get_mut(usize::from(id / 64)) else {
            return false;
        };
        let bit = 1u64 << (id % 64);
        if *w & bit == 0 {
            return false;
        }
        *w &= !bit;
        if let Some(slot) = self.free.get_mut(usize::from(self.nfree)) {
            *slot = id;
            self.nfree += 1;
        }
        true
    }

    fn desc_addr(&self, id: u16) -> u64 {
        self.rings.desc + 16 * u64::from(id & (self.size - 1))
    }

    fn used_event_addr(&self) -> u64 {
        self.rings.avail + 4 + 2 * u64::from(self.size)
    }

    fn avail_event_addr(&self) -> u64 {
        self.rings.used + 4 + 8 * u64::from(self.size)
    }

    /// Fills descriptor `id` (two 64-bit stores: `addr`, then `len`, `flags` and `next`).
    pub fn write_desc(
        &self,
        dma: &mut impl Dma,
        id: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let d = self.desc_addr(id);
        dma.dma_write64(d, addr);
        dma.dma_write64(
            d + 8,
            u64::from(len) | u64::from(flags) << 32 | u64::from(next) << 48,
        );
    }

    /// Makes the chain starting at `head` available: ring entry first, then (after a
    /// compiler barrier that also orders the buffer's contents) the index. x86 keeps stores
    /// in order, so no fence instruction is needed.
    pub fn publish(&mut self, dma: &mut impl Dma, head: u16) {
        self.push(dma, head);
        self.publish_avail(dma);
    }

    /// Puts the chain starting at `head` in the avail ring without moving
    /// the index: the device sees it at the next [`SplitQueue::publish_avail`]
    /// (or [`SplitQueue::kick_needed`]). A polling device reads the index's
    /// cache line once per batch then, not once per chain.
    pub fn push(&mut self, dma: &mut impl Dma, head: u16) {
        let slot = self.rings.avail + 4 + 2 * u64::from(self.next_avail & (self.size - 1));
        dma.dma_write16(slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes every chain pushed so far: ring entries first, then (after
    /// a compiler barrier that also orders the buffers' contents) the
    /// index. x86 keeps stores in order, so no fence instruction is needed.
    pub fn publish_avail(&mut self, dma: &mut impl Dma) {
        if self.published != self.next_avail {
            compiler_fence(Ordering::SeqCst);
            dma.dma_write16(self.rings.avail + 2, self.next_avail);
            self.published = self.next_avail;
        }
    }

    /// Moves `avail.idx` by `n` without ring entries (the hostile test's "index jump").
    pub fn jump_avail_idx(&mut self, dma: &mut impl Dma, n: u16) {
        self.next_avail = self.next_avail.wrapping_add(n);
        self.publish_avail(dma);
    }

    /// Publishes what was pushed, then says whether the device must be
    /// notified of what was published since the last call:
    /// with EVENT_IDX when `avail_event` lies among the new entries, otherwise unless the
    /// device set `VRING_USED_F_NO_NOTIFY`. Needs a full barrier between the index store and
    /// the load of the device's wish.
    pub fn kick_needed(&mut self, dma: &mut impl Dma) -> bool {
        self.publish_avail(dma);
        let (old, new) = (self.kicked, self.next_avail);
        self.kicked = new;
        if old == new {
            return false;
        }
        dma.full_barrier();
        if self.event_idx {
            vring_need_event(dma.dma_read16(self.avail_event_addr()), new, old)
        } else {
            dma.dma_read16(self.rings.used) & USED_F_NO_NOTIFY == 0
        }
    }

    /// Whether the device has returned entries not consumed yet (one memory read).
    pub fn has_used(&self, dma: &impl Dma) -> bool {
        dma.dma_read16(self.rings.used + 2) != self.last_used
    }

    /// The device's `used.idx` (for diagnostics).
    pub fn used_idx(&self, dma: &impl Dma) -> u16 {
        dma.dma_read16(self.rings.used + 2)
    }

    /// Consumes the next used entry, if any. The caller frees its descriptors.
    pub fn pop_used(&mut self, dma: &mut impl Dma) -> Option<Used> {
        if dma.dma_read16(self.rings.used + 2) == self.last_used {
            return None;
        }
        // Read the entry only after the index (x86 keeps loads in order; the compiler must too).
        compiler_fence(Ordering::SeqCst);
        let elem = self.rings.used + 4 + 8 * u64::from(self.last_used & (self.size - 1));
        // Two 32-bit loads: the element is only 4-byte aligned (the ring starts 4 bytes in).
        let used = Used {
            id: dma.dma_read32(elem),
            len: dma.dma_read32(elem + 4),
        };
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx && self.last_used % USED_EVENT_STEP == 0 {
            self.write_used_event(dma);
        }
        Some(used)
    }

    /// We poll, so `used_event` asks for an interrupt half the index space away: the device's
    /// window of new entries `[old, new)` is never wider than the queue and always near
    /// `last_used`, so it never contains that value (`last_used - 1` would, if the device
    /// checked after we had consumed part of its latest batch). Refreshed every
    /// [`USED_EVENT_STEP`] entries, which keeps it far enough.
    fn write_used_event(&self, dma: &mut impl Dma) {
        dma.dma_write16(self.used_event_addr(), self.last_used.wrapping_add(0x8000));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Guest memory as a byte vector at guest-physical `base`.
    pub(crate) struct VecDma {
        pub base: u64,
        pub mem: Vec<u8>,
        pub barriers: std::cell::Cell<u32>,
    }

    impl VecDma {
        pub fn new(base: u64, len: usize) -> Self {
            VecDma {
                base,
                mem: vec![0; len],
                barriers: std::cell::Cell::new(0),
            }
        }

        pub fn range(&self, addr: u64, len: usize) -> Option<std::ops::Range<usize>> {
            let off = usize::try_from(addr.checked_sub(self.base)?).ok()?;
            let end = off.checked_add(len)?;
            (end <= self.mem.len()).then_some(off..end)
        }

        /// Ring accesses must be naturally aligned, as volatile accesses on bare metal are.
        fn check_aligned(addr: u64, len: usize) {
            assert_eq!(
                addr % len as u64,
                0,
                "misaligned {len}-byte access at {addr:#x}"
            );
        }

        pub fn rd(&self, addr: u64, len: usize) -> u64 {
            Self::check_aligned(addr, len);
            match self.range(addr, len) {
                Some(r) => self.mem[r]
                    .iter()
                    .rev()
                    .fold(0, |a, b| a << 8 | u64::from(*b)),
                None => 0,
            }
        }

        pub fn wr(&mut self, addr: u64, len: usize, v: u64) {
            Self::check_aligned(addr, len);
            if let Some(r) = self.range(addr, len) {
                self.mem[r].copy_from_slice(&v.to_le_bytes()[..len]);
            }
        }
    }

    impl Dma for VecDma {
        fn dma_read16(&self, addr: u64) -> u16 {
            self.rd(addr, 2) as u16
        }
        fn dma_read32(&self, addr: u64) -> u32 {
            self.rd(addr, 4) as u32
        }
        fn dma_write16(&mut self, addr: u64, val: u16) {
            self.wr(addr, 2, val.into());
        }
        fn dma_write32(&mut self, addr: u64, val: u32) {
            self.wr(addr, 4, val.into());
        }
        fn dma_write64(&mut self, addr: u64, val: u64) {
            self.wr(addr, 8, val);
        }
        fn dma_bytes(&mut self, addr: u64, len: usize) -> &mut [u8] {
            match self.range(addr, len) {
                Some(r) => &mut self.mem[r],
                None => &mut [],
            }
        }
        fn dma_copy(&mut self, src: u64, dst: u64, len: usize) {
            if let (Some(s), Some(d)) = (self.range(src, len), self.range(dst, len)) {
                self.mem.copy_within(s, d.start);
            }
        }
        fn full_barrier(&self) {
            self.barriers.set(self.barriers.get() + 1);
        }
    }

    const BASE: u64 = 0x10_0000;

    fn rings() -> RingAddrs {
        RingAddrs {
            desc: BASE,
            avail: BASE + 0x1000,
            used: BASE + 0x2000,
        }
    }

    #[test]
    fn need_event() {
        // Classic cases: event among the new entries or not.
        assert!(vring_need_event(0, 1, 0));
        assert!(!vring_need_event(1, 1, 0));
        assert!(vring_need_event(5, 10, 0));
        assert!(vring_need_event(9, 10, 0));
        assert!(!vring_need_event(10, 10, 0));
        assert!(!vring_need_event(3, 10, 5));
        // Across the 16-bit wrap.
        assert!(vring_need_event(0xfffe, 2, 0xfffd));
        assert!(vring_need_event(1, 2, 0xfffd));
        assert!(!vring_need_event(2, 2, 0xfffd));
        assert!(!vring_need_event(0xfffc, 2, 0xfffd));
        // Nothing new: never.
        assert!(!vring_need_event(7, 7, 7));
    }

    #[test]
    fn sizes_and_layout() {
        assert_eq!(desc_bytes(256), 4096);
        assert_eq!(avail_bytes(256), 518);
        assert_eq!(used_bytes(256), 2054);
        assert_eq!(SplitQueue::new(200, rings(), false).size(), 128);
        assert_eq!(SplitQueue::new(0, rings(), false).size(), 1);
        assert_eq!(SplitQueue::new(1024, rings(), false).size(), 256);
    }

    #[test]
    fn alloc_free_publish_pop_with_wrap() {
        let mut dma = VecDma::new(BASE, 0x3000);
        let mut q = SplitQueue::new(4, rings(), true);
        q.init(&mut dma);
        // used_event says "never" from the start.
        assert_eq!(dma.dma_read16(BASE + 0x1000 + 4 + 8), 0x8000);
        let mut device_used: u16 = 0;
        let mut device_avail: u16 = 0;
        // Many rounds, so both 16-bit indices and ring slots wrap.
        for round in 0..70_000u32 {
            let id = q.alloc().unwrap();
            q.write_desc(&mut dma, id, 0x1234_5678_9abc, 100 + round % 7, 0, 0);
            q.publish(&mut dma, id);
            assert_eq!(dma.dma_read16(BASE + 0x1000 + 2), q.avail_idx());
            // The device: take the avail entry, return it used.
            let slot = BASE + 0x1000 + 4 + 2 * u64::from(device_avail % 4);
            let head = dma.dma_read16(slot);
            assert_eq!(head, id);
            let d = BASE + 16 * u64::from(head);
            assert_eq!(dma.rd(d, 8), 0x1234_5678_9abc);
            assert_eq!(dma.dma_read32(d + 8), 100 + round % 7);
            device_avail = device_avail.wrapping_add(1);
            let e = BASE + 0x2000 + 4 + 8 * u64::from(device_used % 4);
            dma.dma_write32(e, u32::from(head));
            dma.dma_write32(e + 4, round);
            device_used = device_used.wrapping_add(1);
            dma.dma_write16(BASE + 0x2002, device_used);
            assert!(q.has_used(&dma));
            let u = q.pop_used(&mut dma).unwrap();
            assert_eq!(
                u,
                Used {
                    id: id.into(),
                    len: round
                }
            );
            assert!(q.pop_used(&mut dma).is_none());
            assert!(q.free(u.id));
            assert!(!q.free(u.id), "double free refused");
            assert_eq!(q.num_free(), 4);
            // used_event stays half the index space ahead: no interrupt wanted, whatever
            // batch the device has just added.
            let used_event = dma.dma_read16(BASE + 0x1000 + 4 + 8);
            let step = device_used & !(USED_EVENT_STEP - 1);
            assert_eq!(used_event, step.wrapping_add(0x8000));
            for old in device_used.wrapping_sub(4)..=device_used {
                for new in old..=old.wrapping_add(4) {
                    assert!(!vring_need_event(used_event, new, old));
                }
            }
        }
    }

    #[test]
    fn free_list_order_and_bad_ids() {
        let mut q = SplitQueue::new(8, rings(), false);
        let ids: Vec<u16> = (0..8).map(|_| q.alloc().unwrap()).collect();
        assert_eq!(ids, (0..8).collect::<Vec<_>>());
        assert_eq!(q.alloc(), None);
        assert_eq!(q.in_flight(), 8);
        assert!(!q.free(8));
        assert!(!q.free(u32::MAX));
        assert!(q.free(3));
        assert_eq!(q.alloc(), Some(3));
    }

    #[test]
    fn kick_with_event_idx() {
        let mut dma = VecDma::new(BASE, 0x3000);
        let mut q = SplitQueue::new(8, rings(), true);
        q.init(&mut dma);
        let avail_event = BASE + 0x2000 + 4 + 8 * 8;
        // Nothing published: no kick, and no barrier spent on finding out.
        assert!(!q.kick_needed(&mut dma));
        assert_eq!(dma.barriers.get(), 0);
        // Device waits for entry 0 (avail_event 0): kick.
        let id = q.alloc().unwrap();
        q.publish(&mut dma, id);
        assert!(q.kick_needed(&mut dma));
        assert_eq!(dma.barriers.get(), 1);
        // Device has not caught up (avail_event still 0): entries 1..3 need no kick.
        for _ in 0..3 {
            let id = q.alloc().unwrap();
            q.publish(&mut dma, id);
        }
        assert!(!q.kick_needed(&mut dma));
        // Device consumed everything and waits for entry 4: the next batch kicks.
        dma.dma_write16(avail_event, 4);
        for _ in 0..2 {
            let id = q.alloc().unwrap();
            q.publish(&mut dma, id);
        }
        assert!(q.kick_needed(&mut dma));
        // A device that wants entry 10 is not kicked for entries 6 and 7.
        dma.dma_write16(avail_event, 10);
        for _ in 0..2 {
            let id = q.alloc().unwrap();
            q.publish(&mut dma, id);
        }
        assert!(!q.kick_needed(&mut dma));
    }

    #[test]
    fn kick_without_event_idx() {
        let mut dma = VecDma::new(BASE, 0x3000);
        let mut q = SplitQueue::new(8, rings(), false);
        q.init(&mut dma);
        assert_eq!(dma.dma_read16(BASE + 0x1000), AVAIL_F_NO_INTERRUPT);
        let id = q.alloc().unwrap();
        q.publish(&mut dma, id);
        assert!(q.kick_needed(&mut dma));
        dma.dma_write16(BASE + 0x2000, USED_F_NO_NOTIFY);
        let id = q.alloc().unwrap();
        q.publish(&mut dma, id);
        assert!(!q.kick_needed(&mut dma));
        dma.dma_write16(BASE + 0x2000, 0);
        let id = q.alloc().unwrap();
        q.publish(&mut dma, id);
        assert!(q.kick_needed(&mut dma));
    }

    #[test]
    fn jump_and_reinit() {
        let mut dma = VecDma::new(BASE, 0x3000);
        let mut q = SplitQueue::new(8, rings(), true);
        q.init(&mut dma);
        let id = q.alloc().unwrap();
        q.publish(&mut dma, id);
        q.jump_avail_idx(&mut dma, 8 + 5);
        assert_eq!(dma.dma_read16(BASE + 0x1002), 14);
        dma.dma_write16(BASE + 0x2002, 3);
        q.init(&mut dma);
        assert_eq!(dma.dma_read16(BASE + 0x1002), 0);
        assert_eq!(dma.dma_read16(BASE + 0x2002), 0);
        assert_eq!(q.num_free(), 8);
        assert!(!q.has_used(&dma));
    }
}
