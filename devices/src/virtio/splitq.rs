//! Split virtqueues on host pointers: the data-path replacement for
//! `virtio_queue::Queue` (device side) and the ring accessors the synthetic
//! driver uses (driver side).
//!
//! At activation the descriptor table, the avail ring and the used ring are
//! each checked to lie inside one guest memory region and are translated to
//! host pointers once ([`SplitRing`], which keeps a clone of the guest
//! memory so the mapping outlives the pointers). From then on every access
//! is a single atomic load or store on a plain integer in guest memory: the
//! avail index is read with acquire (the entries and descriptors it
//! publishes are then read relaxed), used elements are written relaxed and
//! the used index is published with release, once per batch
//! ([`DeviceQueue::publish_used`]). Each value the guest controls is read
//! exactly once and then checked, so a driver that rewrites a descriptor
//! while the device reads it can only garble its own buffer, never cause an
//! access outside guest RAM.
//!
//! Descriptor buffers are translated with [`GuestRam::translate`]: one
//! bounds check against the largest RAM region, then the others. A buffer
//! that spans two regions is rejected like one outside RAM.
//!
//! The device side reads a batch at a time: [`DeviceQueue::pending`] reads
//! the avail index once, [`DeviceQueue::peek_simple`] collects the run of
//! one-descriptor chains (the common case) for a fast path, anything else
//! goes through [`DeviceQueue::walk`], and [`DeviceQueue::consume`] moves
//! past what was handled. [`DeviceQueue::pop`] takes one entry at a time.
//!
//! The guest is untrusted. [`DeviceQueue::walk`] returns a chain only if
//! every descriptor is in RAM, non-empty, in the expected direction, not
//! indirect (not negotiated), and the walk ends within `min(MAX_CHAIN,
//! queue size)` descriptors; a head outside the table is
//! [`ChainError::BadHead`]; an avail index more than a queue's worth ahead
//! of what was consumed is [`BadAvailIndex`].

use std::ops::RangeInclusive;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Avail flag: the driver does not want interrupts (without EVENT_IDX).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used flag: the device does not want kicks (without EVENT_IDX).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
/// Largest split queue the spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Largest chain, in descriptors, that the device walks.
pub const MAX_CHAIN: usize = 64;

/// `vring_need_event`: whether moving an index from `old` to `new` crosses
/// `event` (the other side asked to be told when `event` is passed).
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Why a chain is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// The avail entry names a descriptor outside the table.
    BadHead,
    /// Anything else wrong with it.
    Bad(&'static str),
}

/// The driver's avail index is more than a queue's worth ahead of what the
/// device consumed: the queue is broken and the device needs a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadAvailIndex;

#[derive(Debug, Clone, Copy)]
struct HostRegion {
    start: u64,
    len: u64,
    host: NonNull<u8>,
}

impl HostRegion {
    /// Host address of `[gpa, gpa + len)` if it lies inside this region.
    #[inline]
    fn translate(&self, gpa: u64, len: u64) -> Option<NonNull<u8>> {
        let off = gpa.wrapping_sub(self.start);
        if off < self.len && len <= self.len - off {
            // SAFETY: `off < self.len`, so the result stays inside the
            // region's mapping (non-null, no wrap-around).
            Some(unsafe { self.host.add(off as usize) })
        } else {
            None
        }
    }
}

/// Guest RAM as a table of host mappings, for one-compare translations.
/// Holds a clone of the `GuestMemoryMmap`, which keeps every region mapped
/// for as long as this value (and so any pointer it handed out) lives.
#[derive(Debug, Clone)]
pub struct GuestRam {
    /// The largest region.
    first: HostRegion,
    /// The others.
    rest: Box<[HostRegion]>,
    mem: GuestMemoryMmap,
}

// SAFETY: the host pointers point into mappings owned (through Arcs) by
// `mem`, which is itself Send; `GuestRam` only reads its table, so it can
// move to another thread. What is done through the translated pointers is
// argued where it is done.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// The host view of `mem`. Fails if it has no regions.
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, String> {
        let mut regions = Vec::with_capacity(mem.num_regions());
        for r in mem.iter() {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| format!("guest region at {:#x}: {e}", r.start_addr().0))?;
            let host = NonNull::new(host).ok_or("guest region mapped at null")?;
            regions.push(HostRegion {
                start: r.start_addr().0,
                len: r.len(),
                host,
            });
        }
        // The largest region first: almost every buffer lives there.
        regions.sort_by_key(|r| std::cmp::Reverse(r.len));
        let first = *regions.first().ok_or("guest memory has no regions")?;
        Ok(Self {
            first,
            rest: regions[1..].into(),
            mem: mem.clone(),
        })
    }

    /// The memory this view was made from.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Host address of the guest range `[gpa, gpa + len)`, if the whole
    /// range lies inside one region. `len` must not be 0.
    #[inline]
    pub fn translate(&self, gpa: u64, len: u64) -> Option<NonNull<u8>> {
        match self.first.translate(gpa, len) {
            Some(p) => Some(p),
            None => self.translate_slow(gpa, len),
        }
    }

    /// [`GuestRam::translate`] in the largest region only (`None`
    /// elsewhere), without a call: for fast paths that leave anything else
    /// to a slower one.
    #[inline]
    pub fn translate_main(&self, gpa: u64, len: u64) -> Option<NonNull<u8>> {
        self.first.translate(gpa, len)
    }

    #[cold]
    #[inline(never)]
    fn translate_slow(&self, gpa: u64, len: u64) -> Option<NonNull<u8>> {
        self.rest.iter().find_map(|r| r.translate(gpa, len))
    }
}

/// A descriptor as read (once) from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// `VIRTQ_DESC_F_*`.
    pub flags: u16,
    /// Next descriptor if `flags` has `VIRTQ_DESC_F_NEXT`.
    pub next: u16,
}

/// Size of the avail ring of `size` entries (flags, idx, ring, used_event).
fn avail_bytes(size: u16) -> u64 {
    6 + 2 * u64::from(size)
}

/// Size of the used ring of `size` entries (flags, idx, ring, avail_event).
fn used_bytes(size: u16) -> u64 {
    6 + 8 * u64::from(size)
}

/// The three parts of a split virtqueue, translated to host pointers, with
/// atomic accessors for both sides. Ring positions are taken modulo the
/// queue size inside the accessors, so no index can reach outside a ring.
#[derive(Debug)]
pub struct SplitRing {
    desc: NonNull<u8>,
    avail: NonNull<u8>,
    used: NonNull<u8>,
    size: u16,
    /// `size - 1`: ring positions are taken modulo the size with it.
    mask: usize,
    /// Keeps the mapping behind the pointers alive.
    _ram: GuestRam,
}

// SAFETY: the pointers point into guest memory kept mapped by `_ram` (which
// is Send); every access through them is atomic, so the ring may be used
// from any one thread.
unsafe impl Send for SplitRing {}

impl SplitRing {
    /// Translates a queue of `size` entries whose parts are at `desc`,
    /// `avail` and `used`. Each part must lie inside one region of `ram`
    /// and be aligned as the spec requires (16, 2 and 4 bytes).
    pub fn new(
        ram: &GuestRam,
        desc: u64,
        avail: u64,
        used: u64,
        size: u16,
    ) -> Result<Self, String> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(format!(
                "queue size {size} is not a power of two up to 32768"
            ));
        }
        let part = |what: &str, gpa: u64, len: u64, align: usize| {
            let p = ram.translate(gpa, len).ok_or_else(|| {
                format!("the {what} at {gpa:#x} (+{len:#x}) is not inside one guest memory region")
            })?;
            if gpa % align as u64 != 0 || (p.as_ptr() as usize) % align != 0 {
                return Err(format!(
                    "the {what} at {gpa:#x} is not {align}-byte aligned"
                ));
            }
            Ok(p)
        };
        Ok(Self {
            desc: part("descriptor table", desc, 16 * u64::from(size), 16)?,
            avail: part("avail ring", avail, avail_bytes(size), 2)?,
            used: part("used ring", used, used_bytes(size), 4)?,
            size,
            mask: usize::from(size - 1),
            _ram: ram.clone(),
        })
    }

    /// Number of entries.
    #[inline]
    pub fn size(&self) -> u16 {
        self.size
    }

    #[inline]
    fn slot(&self, i: u16) -> usize {
        usize::from(i) & self.mask
    }

    #[inline]
    fn u16_at(&self, base: NonNull<u8>, ofs: usize) -> &AtomicU16 {
        // SAFETY: callers pass `base` = `avail` or `used` and an `ofs` of a
        // 2-byte field inside that part (flags, idx, a ring entry taken
        // modulo the size, used_event or avail_event), which `new` checked
        // to be inside one live guest mapping and 2-aligned (the parts are
        // 2- and 4-aligned, the fields at even offsets). Guest memory is only
        // accessed atomically by the host, or by the guest (which the device
        // does not trust); u16 has no invalid values.
        unsafe { AtomicU16::from_ptr(base.as_ptr().add(ofs).cast()) }
    }

    #[inline]
    fn u32_at(&self, ofs: usize) -> &AtomicU32 {
        // SAFETY: callers pass the offset of a used element's `id` or `len`
        // (4 + 8 * slot + 0 or 4, slot < size), inside the used ring that
        // `new` checked to be in one live mapping and 4-aligned. Atomic
        // access as in `u16_at`.
        unsafe { AtomicU32::from_ptr(self.used.as_ptr().add(ofs).cast()) }
    }

    #[inline]
    fn desc_word(&self, i: u16, half: usize) -> &AtomicU64 {
        // SAFETY: the descriptor `slot(i) < size` is inside the table that
        // `new` checked to be in one live mapping and 16-aligned, so both of
        // its 8-byte halves are in bounds and 8-aligned. Atomic access as in
        // `u16_at`.
        unsafe { AtomicU64::from_ptr(self.desc.as_ptr().add(16 * self.slot(i) + 8 * half).cast()) }
    }

    // --- avail ring ---

    /// `avail->idx`, acquire: the entries and descriptors it publishes are
    /// visible after this.
    #[inline]
    pub fn avail_idx(&self) -> u16 {
        u16::from_le(self.u16_at(self.avail, 2).load(Ordering::Acquire))
    }

    /// `avail->flags`.
    #[inline]
    pub fn avail_flags(&self) -> u16 {
        u16::from_le(self.u16_at(self.avail, 0).load(Ordering::Relaxed))
    }

    /// `avail->ring[i % size]`.
    #[inline]
    pub fn avail_entry(&self, i: u16) -> u16 {
        u16::from_le(
            self.u16_at(self.avail, 4 + 2 * self.slot(i))
                .load(Ordering::Relaxed),
        )
    }

    /// `used_event` (after the avail ring).
    #[inline]
    pub fn used_event(&self) -> u16 {
        let ofs = 4 + 2 * usize::from(self.size);
        u16::from_le(self.u16_at(self.avail, ofs).load(Ordering::Relaxed))
    }

    /// Driver side: writes `avail->ring[i % size]`.
    #[inline]
    pub fn set_avail_entry(&self, i: u16, head: u16) {
        self.u16_at(self.avail, 4 + 2 * self.slot(i))
            .store(head.to_le(), Ordering::Relaxed);
    }

    /// Driver side: publishes `avail->idx` (release).
    #[inline]
    pub fn set_avail_idx(&self, idx: u16) {
        self.u16_at(self.avail, 2)
            .store(idx.to_le(), Ordering::Release);
    }

    /// Driver side: writes `avail->flags`.
    #[inline]
    pub fn set_avail_flags(&self, flags: u16) {
        self.u16_at(self.avail, 0)
            .store(flags.to_le(), Ordering::Relaxed);
    }

    /// Driver side: writes `used_event`.
    #[inline]
    pub fn set_used_event(&self, v: u16) {
        let ofs = 4 + 2 * usize::from(self.size);
        self.u16_at(self.avail, ofs)
            .store(v.to_le(), Ordering::Relaxed);
    }

    // --- descriptor table ---

    /// Descriptor `i % size`, each half read once.
    #[inline]
    pub fn desc(&self, i: u16) -> Desc {
        let addr = u64::from_le(self.desc_word(i, 0).load(Ordering::Relaxed));
        let rest = u64::from_le(self.desc_word(i, 1).load(Ordering::Relaxed));
        Desc {
            addr,
            len: rest as u32,
            flags: (rest >> 32) as u16,
            next: (rest >> 48) as u16,
        }
    }

    /// Driver side: writes descriptor `i % size`.
    #[inline]
    pub fn set_desc(&self, i: u16, d: Desc) {
        let rest = u64::from(d.len) | u64::from(d.flags) << 32 | u64::from(d.next) << 48;
        self.desc_word(i, 0)
            .store(d.addr.to_le(), Ordering::Relaxed);
        self.desc_word(i, 1).store(rest.to_le(), Ordering::Relaxed);
    }

    // --- used ring ---

    /// Writes `used->ring[i % size]`.
    #[inline]
    pub fn set_used_elem(&self, i: u16, id: u32, len: u32) {
        let ofs = 4 + 8 * self.slot(i);
        self.u32_at(ofs).store(id.to_le(), Ordering::Relaxed);
        self.u32_at(ofs + 4).store(len.to_le(), Ordering::Relaxed);
    }

    /// Publishes `used->idx` (release: the elements before it are visible).
    #[inline]
    pub fn set_used_idx(&self, idx: u16) {
        self.u16_at(self.used, 2)
            .store(idx.to_le(), Ordering::Release);
    }

    /// Writes `used->flags`.
    #[inline]
    pub fn set_used_flags(&self, flags: u16) {
        self.u16_at(self.used, 0)
            .store(flags.to_le(), Ordering::Relaxed);
    }

    /// Writes `avail_event` (after the used ring).
    #[inline]
    pub fn set_avail_event(&self, v: u16) {
        let ofs = 4 + 8 * usize::from(self.size);
        self.u16_at(self.used, ofs)
            .store(v.to_le(), Ordering::Relaxed);
    }

    /// Driver side: `used->idx` (acquire).
    #[inline]
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.u16_at(self.used, 2).load(Ordering::Acquire))
    }

    /// Driver side: `used->flags`.
    #[inline]
    pub fn used_flags(&self) -> u16 {
        u16::from_le(self.u16_at(self.used, 0).load(Ordering::Relaxed))
    }

    /// Driver side: `used->ring[i % size]` as (id, len).
    #[inline]
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let ofs = 4 + 8 * self.slot(i);
        (
            u32::from_le(self.u32_at(ofs).load(Ordering::Relaxed)),
            u32::from_le(self.u32_at(ofs + 4).load(Ordering::Relaxed)),
        )
    }

    /// Driver side: `avail_event`.
    #[inline]
    pub fn avail_event(&self) -> u16 {
        let ofs = 4 + 8 * usize::from(self.size);
        u16::from_le(self.u16_at(self.used, ofs).load(Ordering::Relaxed))
    }
}

/// One buffer of a chain: host address and length.
#[derive(Debug, Clone, Copy)]
pub struct Seg {
    /// Host address (inside guest RAM).
    pub ptr: NonNull<u8>,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// A chain of exactly one descriptor, as [`DeviceQueue::peek_simple`] finds
/// them.
#[derive(Debug, Clone, Copy)]
pub struct OneBuf {
    /// Host address of its buffer (inside guest RAM).
    pub ptr: NonNull<u8>,
    /// Length of the buffer.
    pub len: u32,
    /// The chain's head.
    pub head: u16,
}

impl Default for OneBuf {
    fn default() -> Self {
        Self {
            ptr: NonNull::dangling(),
            len: 0,
            head: 0,
        }
    }
}

// SAFETY: as for `Chain`: an address and a length, dereferenced (and
// argued) only by the user.
unsafe impl Send for OneBuf {}

/// A checked descriptor chain: up to [`MAX_CHAIN`] host buffers.
#[derive(Debug)]
pub struct Chain {
    segs: [Seg; MAX_CHAIN],
    n: usize,
}

// SAFETY: a chain is a list of addresses and lengths; it does not access
// memory by itself. Every dereference is done (and argued) by its user,
// while the `GuestRam` the addresses came from is alive.
unsafe impl Send for Chain {}

impl Default for Chain {
    fn default() -> Self {
        Self {
            segs: [Seg {
                ptr: NonNull::dangling(),
                len: 0,
            }; MAX_CHAIN],
            n: 0,
        }
    }
}

impl Chain {
    /// The buffers, in chain order.
    #[inline]
    pub fn segs(&self) -> &[Seg] {
        &self.segs[..self.n]
    }

    /// Host address of byte `ofs` of the chain, if it has that many bytes.
    #[inline]
    pub fn byte_ptr(&self, mut ofs: usize) -> Option<NonNull<u8>> {
        for s in self.segs() {
            if ofs < s.len as usize {
                // SAFETY: `ofs < s.len`, and the whole segment is inside one
                // guest mapping (checked by `walk`).
                return Some(unsafe { s.ptr.add(ofs) });
            }
            ofs -= s.len as usize;
        }
        None
    }
}

/// Checks one descriptor (direction `want`: `VIRTQ_DESC_F_WRITE` or 0, not
/// indirect, not empty, inside one RAM region) and translates its buffer.
#[inline(always)]
fn check_desc(ram: &GuestRam, d: &Desc, want: u16) -> Result<NonNull<u8>, ChainError> {
    if d.flags & (VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE) != want {
        return Err(flags_error(d.flags));
    }
    if d.len == 0 {
        return Err(ChainError::Bad("zero-length descriptor"));
    }
    ram.translate(d.addr, u64::from(d.len))
        .ok_or(ChainError::Bad("descriptor outside guest memory"))
}

/// Why a descriptor's flags are wrong (the walk knows they are).
#[cold]
fn flags_error(flags: u16) -> ChainError {
    if flags & VIRTQ_DESC_F_INDIRECT != 0 {
        ChainError::Bad("indirect descriptor (not negotiated)")
    } else {
        ChainError::Bad("descriptor in the wrong direction")
    }
}

/// The device side of a split virtqueue.
#[derive(Debug)]
pub struct DeviceQueue {
    ring: SplitRing,
    size: u16,
    event_idx: bool,
    /// Next avail entry to consume.
    next_avail: u16,
    /// The avail index as last read.
    avail_seen: u16,
    /// Next used element to write.
    next_used: u16,
    /// The used index as last published.
    published_used: u16,
    /// `next_used` when `needs_notification` last ran.
    checked_used: u16,
    /// Without EVENT_IDX: whether `VIRTQ_USED_F_NO_NOTIFY` is set.
    kicks_off: bool,
}

impl DeviceQueue {
    /// The device side of `q` (as the driver configured it) in `ram`.
    pub fn new(ram: &GuestRam, q: &Queue) -> Result<Self, String> {
        if !q.ready() {
            return Err("the queue is not enabled".into());
        }
        let ring = SplitRing::new(ram, q.desc_table(), q.avail_ring(), q.used_ring(), q.size())?;
        Ok(Self::from_ring(
            ring,
            q.event_idx_enabled(),
            q.next_avail(),
            q.next_used(),
        ))
    }

    /// The device side of `ring`, starting at the given positions.
    pub fn from_ring(ring: SplitRing, event_idx: bool, next_avail: u16, next_used: u16) -> Self {
        Self {
            size: ring.size(),
            ring,
            event_idx,
            next_avail,
            avail_seen: next_avail,
            next_used,
            published_used: next_used,
            checked_used: next_used,
            kicks_off: false,
        }
    }

    /// Number of entries.
    #[inline]
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The next avail position; give it to [`DeviceQueue::rewind`] to put
    /// back what was popped since.
    #[inline]
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The next used position; give it to [`DeviceQueue::rewind_used`] to
    /// forget (unpublished) used elements pushed since.
    #[inline]
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Takes the next avail entry: `Ok(None)` when the driver has posted
    /// nothing more. The head is not checked; [`DeviceQueue::walk`] does it.
    #[inline]
    pub fn pop(&mut self) -> Result<Option<u16>, BadAvailIndex> {
        if self.next_avail == self.avail_seen && !self.refresh()? {
            return Ok(None);
        }
        let head = self.ring.avail_entry(self.next_avail);
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Re-reads the avail index; true if there is something to pop.
    #[inline]
    fn refresh(&mut self) -> Result<bool, BadAvailIndex> {
        let idx = self.ring.avail_idx();
        if idx.wrapping_sub(self.next_avail) > self.size {
            return Err(BadAvailIndex);
        }
        self.avail_seen = idx;
        Ok(idx != self.next_avail)
    }

    /// Re-reads the avail index and returns how many entries wait (at most
    /// the queue size): [`DeviceQueue::peek`] them, then
    /// [`DeviceQueue::consume`] those handled.
    #[inline]
    pub fn pending(&mut self) -> Result<u16, BadAvailIndex> {
        self.refresh()?;
        Ok(self.avail_seen.wrapping_sub(self.next_avail))
    }

    /// The head of the `k`-th waiting entry (`k < pending()`), unchecked
    /// ([`DeviceQueue::walk`] checks it).
    #[inline]
    pub fn peek(&self, k: u16) -> u16 {
        self.ring.avail_entry(self.next_avail.wrapping_add(k))
    }

    /// Consumes the first `n` waiting entries.
    #[inline]
    pub fn consume(&mut self, n: u16) {
        self.next_avail = self.next_avail.wrapping_add(n);
    }

    /// Puts back everything popped since `next_avail()` returned `mark`.
    #[inline]
    pub fn rewind(&mut self, mark: u16) {
        self.next_avail = mark;
    }

    /// Walks the chain at `head` into `out` and returns its length in
    /// bytes. `writable`: the device writes the buffers (receive), or reads
    /// them (transmit). On error, `out` holds nothing useful.
    #[inline]
    pub fn walk(
        &self,
        ram: &GuestRam,
        head: u16,
        writable: bool,
        out: &mut Chain,
    ) -> Result<usize, ChainError> {
        out.n = 0;
        if head >= self.size {
            return Err(ChainError::BadHead);
        }
        let want = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
        let d = self.ring.desc(head);
        out.segs[0] = Seg {
            ptr: check_desc(ram, &d, want)?,
            len: d.len,
        };
        out.n = 1;
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(d.len as usize);
        }
        self.walk_on(ram, d, want, out)
    }

    /// The fast path for the common case, chains of one descriptor: fills
    /// `out` with the waiting entries from the `from`-th on (`from +
    /// out.len() <= pending()`) for as long as each names a chain of one
    /// valid descriptor (in the largest RAM region, direction `writable`,
    /// not indirect) whose length is in `lens`, and returns how many it
    /// found before one that does not qualify (the caller walks that one
    /// with [`DeviceQueue::walk`], which says what is wrong with it, if
    /// anything, and looks in every region). Consumes nothing. (Not
    /// inlined, and without calls: its loop gets the registers to itself.)
    #[inline(never)]
    pub fn peek_simple(
        &self,
        ram: &GuestRam,
        from: u16,
        writable: bool,
        lens: RangeInclusive<u32>,
        out: &mut [OneBuf],
    ) -> usize {
        let want = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
        let min = (*lens.start()).max(1);
        let Some(span) = lens.end().checked_sub(min) else {
            return 0;
        };
        for (k, o) in out.iter_mut().enumerate() {
            let head = self.peek(from.wrapping_add(k as u16));
            if head >= self.size {
                return k;
            }
            let d = self.ring.desc(head);
            let flags = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE;
            // min <= len <= max, in one compare.
            if d.flags & flags != want || d.len.wrapping_sub(min) > span {
                return k;
            }
            // (A buffer in another region is left to `walk`, which keeps
            // this loop free of calls.)
            let Some(ptr) = ram.translate_main(d.addr, u64::from(d.len)) else {
                return k;
            };
            *o = OneBuf {
                ptr,
                len: d.len,
                head,
            };
        }
        out.len()
    }

    /// The rest of a chain whose first descriptor `d` is in `out`.
    #[inline(never)]
    fn walk_on(
        &self,
        ram: &GuestRam,
        mut d: Desc,
        want: u16,
        out: &mut Chain,
    ) -> Result<usize, ChainError> {
        let limit = MAX_CHAIN.min(usize::from(self.size));
        let mut total = d.len as usize;
        while d.flags & VIRTQ_DESC_F_NEXT != 0 {
            if out.n >= limit {
                out.n = 0;
                return Err(ChainError::Bad("chain too long or looping"));
            }
            if d.next >= self.size {
                out.n = 0;
                return Err(ChainError::Bad("next descriptor outside the table"));
            }
            d = self.ring.desc(d.next);
            let ptr = check_desc(ram, &d, want).inspect_err(|_| out.n = 0)?;
            out.segs[out.n] = Seg { ptr, len: d.len };
            out.n += 1;
            total += d.len as usize;
        }
        Ok(total)
    }

    /// Writes a used element (visible to the driver after
    /// [`DeviceQueue::publish_used`]).
    #[inline]
    pub fn push_used(&mut self, head: u16, len: u32) {
        self.ring
            .set_used_elem(self.next_used, u32::from(head), len);
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Forgets the used elements pushed since `next_used()` returned
    /// `mark` (they must not have been published).
    #[inline]
    pub fn rewind_used(&mut self, mark: u16) {
        debug_assert!(
            self.next_used.wrapping_sub(mark) <= self.next_used.wrapping_sub(self.published_used)
        );
        self.next_used = mark;
    }

    /// Publishes the used elements pushed so far (one release store).
    /// Returns whether there were any.
    #[inline]
    pub fn publish_used(&mut self) -> bool {
        if self.next_used == self.published_used {
            return false;
        }
        self.ring.set_used_idx(self.next_used);
        self.published_used = self.next_used;
        true
    }

    /// After [`DeviceQueue::publish_used`]: whether the driver wants an
    /// interrupt for what was published since the last call.
    #[inline]
    pub fn needs_notification(&mut self) -> bool {
        // The used index store must be visible before used_event / flags
        // are read, or a driver that just asked for an interrupt is missed.
        fence(Ordering::SeqCst);
        let old = self.checked_used;
        let new = self.published_used;
        self.checked_used = new;
        if self.event_idx {
            need_event(self.ring.used_event(), new, old)
        } else {
            new != old && self.ring.avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Asks the driver not to kick while the device is busy. With
    /// EVENT_IDX nothing is written: `avail_event` simply stays behind.
    #[inline]
    pub fn disable_notifications(&mut self) {
        if !self.event_idx && !self.kicks_off {
            self.ring.set_used_flags(VIRTQ_USED_F_NO_NOTIFY);
            self.kicks_off = true;
        }
    }

    /// Asks the driver to kick for anything posted after what the device
    /// consumed, then looks again: true if entries are already waiting (the
    /// caller should process them rather than sleep).
    pub fn enable_notifications(&mut self) -> Result<bool, BadAvailIndex> {
        self.enable_notifications_past(self.next_avail)
    }

    /// Like [`DeviceQueue::enable_notifications`], for a device that needs
    /// more than the driver has posted up to avail index `idx` (say, a
    /// frame that needs more receive buffers than there are): asks for a
    /// kick once the driver posts past `idx`, and returns whether it has.
    pub fn enable_notifications_past(&mut self, idx: u16) -> Result<bool, BadAvailIndex> {
        if self.event_idx {
            self.ring.set_avail_event(idx);
        } else if self.kicks_off {
            self.ring.set_used_flags(0);
            self.kicks_off = false;
        }
        // The request must be visible before the avail index is re-read
        // (the driver does the mirror image: store idx, fence, read event).
        fence(Ordering::SeqCst);
        self.refresh()?;
        Ok(self.avail_seen != idx)
    }

    /// The avail index as last read from the driver.
    #[inline]
    pub fn avail_seen(&self) -> u16 {
        self.avail_seen
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    /// Lays out a queue of `size` at `base`: table, avail at +16*size,
    /// used at the next 4 KiB boundary. Returns (desc, avail, used).
    pub(crate) fn layout(base: u64, size: u16) -> (u64, u64, u64) {
        let avail = base + 16 * u64::from(size);
        let used = (avail + avail_bytes(size) + 4095) & !4095;
        (base, avail, used)
    }

    struct Fixture {
        ram: GuestRam,
        drv: SplitRing,
        dev: DeviceQueue,
        chain: Chain,
        /// Length of the chain last walked.
        len: usize,
        avail_idx: u16,
    }

    const RAM: u64 = 0x10_0000;
    const BUFS: u64 = 0x8_0000;

    fn fixture(size: u16, event_idx: bool) -> Fixture {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let ram = GuestRam::new(&mem).unwrap();
        let (d, a, u) = layout(0x1000, size);
        let drv = SplitRing::new(&ram, d, a, u, size).unwrap();
        let dev = DeviceQueue::from_ring(
            SplitRing::new(&ram, d, a, u, size).unwrap(),
            event_idx,
            0,
            0,
        );
        Fixture {
            ram,
            drv,
            dev,
            chain: Chain::default(),
            len: 0,
            avail_idx: 0,
        }
    }

    impl Fixture {
        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            self.drv.set_desc(
                i,
                Desc {
                    addr,
                    len,
                    flags,
                    next,
                },
            );
        }

        fn post(&mut self, head: u16) {
            self.drv.set_avail_entry(self.avail_idx, head);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.drv.set_avail_idx(self.avail_idx);
        }

        fn walk(&mut self, writable: bool) -> Result<u16, ChainError> {
            let head = self.dev.pop().unwrap().expect("an entry");
            self.len = self.dev.walk(&self.ram, head, writable, &mut self.chain)?;
            Ok(head)
        }
    }

    #[test]
    fn need_event_matches_the_spec() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(12, 10, 3));
        assert!(need_event(u16::MAX, 0, u16::MAX));
        assert!(!need_event(3, 3, 3));
    }

    #[test]
    fn descriptors_and_rings_round_trip_in_guest_memory() {
        let f = fixture(8, true);
        f.desc(3, 0x1234_5678_9abc, 0xdead_beef, 0x8003, 0x7777);
        let (d, a, u) = layout(0x1000, 8);
        let mem = f.ram.mem();
        use vm_memory::Bytes;
        let raw: [u8; 16] = mem.read_obj(GuestAddress(d + 48)).unwrap();
        assert_eq!(
            u64::from_le_bytes(raw[..8].try_into().unwrap()),
            0x1234_5678_9abc
        );
        assert_eq!(
            u32::from_le_bytes(raw[8..12].try_into().unwrap()),
            0xdead_beef
        );
        assert_eq!(u16::from_le_bytes(raw[12..14].try_into().unwrap()), 0x8003);
        assert_eq!(u16::from_le_bytes(raw[14..].try_into().unwrap()), 0x7777);
        assert_eq!(f.drv.desc(3 + 8), f.drv.desc(3), "indices wrap at the size");
        f.drv.set_avail_entry(9, 5);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(a + 4 + 2)).unwrap(), 5);
        f.drv.set_used_event(0x1122);
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(a + 4 + 16)).unwrap(),
            0x1122
        );
        f.drv.set_used_elem(10, 7, 99);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(u + 4 + 16)).unwrap(), 7);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(u + 4 + 20)).unwrap(), 99);
        f.drv.set_avail_event(0x3344);
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(u + 4 + 64)).unwrap(),
            0x3344
        );
        f.drv.set_used_idx(3);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(u + 2)).unwrap(), 3);
    }

    #[test]
    fn good_chains_pop_walk_and_return() {
        let mut f = fixture(16, true);
        f.desc(2, BUFS, 100, VIRTQ_DESC_F_NEXT, 9);
        f.desc(9, BUFS + 0x1000, 50, 0, 0);
        f.desc(4, BUFS + 0x2000, 2048, VIRTQ_DESC_F_WRITE, 0);
        assert_eq!(f.dev.pop(), Ok(None));
        f.post(2);
        f.post(4);
        assert_eq!(f.walk(false), Ok(2));
        assert_eq!(f.len, 150);
        assert_eq!(f.chain.segs().len(), 2);
        let base = f.ram.translate(0, 1).unwrap().as_ptr() as usize;
        assert_eq!(
            f.chain.segs()[1].ptr.as_ptr() as usize - base,
            (BUFS + 0x1000) as usize
        );
        assert_eq!(
            f.chain.byte_ptr(110).unwrap().as_ptr() as usize - base,
            (BUFS + 0x1000 + 10) as usize
        );
        assert!(f.chain.byte_ptr(150).is_none());
        assert_eq!(f.walk(true), Ok(4));
        assert_eq!(f.dev.pop(), Ok(None));
        // Used elements are invisible until published, then all at once.
        f.dev.push_used(2, 0);
        f.dev.push_used(4, 60);
        assert_eq!(f.drv.used_idx(), 0);
        assert!(f.dev.publish_used());
        assert!(!f.dev.publish_used());
        assert_eq!(f.drv.used_idx(), 2);
        assert_eq!(f.drv.used_elem(0), (2, 0));
        assert_eq!(f.drv.used_elem(1), (4, 60));
    }

    #[test]
    fn malformed_chains_are_rejected() {
        let mut f = fixture(16, true);
        /// Name, descriptors to write, direction, what the walk says.
        type Case<'a> = (&'a str, &'a dyn Fn(&Fixture), bool, ChainError);
        let cases: &[Case] = &[
            (
                "outside RAM",
                &|f| f.desc(0, RAM - 10, 20, 0, 0),
                false,
                ChainError::Bad("descriptor outside guest memory"),
            ),
            (
                "address wraps",
                &|f| f.desc(0, u64::MAX - 4, 20, 0, 0),
                false,
                ChainError::Bad("descriptor outside guest memory"),
            ),
            (
                "zero length",
                &|f| f.desc(0, BUFS, 0, 0, 0),
                false,
                ChainError::Bad("zero-length descriptor"),
            ),
            (
                "wrong direction (tx)",
                &|f| f.desc(0, BUFS, 10, VIRTQ_DESC_F_WRITE, 0),
                false,
                ChainError::Bad("descriptor in the wrong direction"),
            ),
            (
                "wrong direction (rx)",
                &|f| f.desc(0, BUFS, 10, 0, 0),
                true,
                ChainError::Bad("descriptor in the wrong direction"),
            ),
            (
                "indirect",
                &|f| f.desc(0, BUFS, 16, VIRTQ_DESC_F_INDIRECT, 0),
                false,
                ChainError::Bad("indirect descriptor (not negotiated)"),
            ),
            (
                "next past the table",
                &|f| f.desc(0, BUFS, 10, VIRTQ_DESC_F_NEXT, 16),
                false,
                ChainError::Bad("next descriptor outside the table"),
            ),
            (
                "loop",
                &|f| {
                    f.desc(0, BUFS, 10, VIRTQ_DESC_F_NEXT, 1);
                    f.desc(1, BUFS, 10, VIRTQ_DESC_F_NEXT, 0);
                },
                false,
                ChainError::Bad("chain too long or looping"),
            ),
            (
                "self loop",
                &|f| f.desc(0, BUFS, 10, VIRTQ_DESC_F_NEXT, 0),
                false,
                ChainError::Bad("chain too long or looping"),
            ),
            (
                "bad second descriptor",
                &|f| {
                    f.desc(0, BUFS, 10, VIRTQ_DESC_F_NEXT, 5);
                    f.desc(5, RAM, 10, 0, 0);
                },
                false,
                ChainError::Bad("descriptor outside guest memory"),
            ),
        ];
        for (name, setup, writable, want) in cases {
            setup(&f);
            f.post(0);
            assert_eq!(f.walk(*writable), Err(*want), "{name}");
        }
        // A head outside the table.
        f.post(16);
        assert_eq!(f.walk(false), Err(ChainError::BadHead));
        f.post(u16::MAX);
        assert_eq!(f.walk(false), Err(ChainError::BadHead));
    }

    #[test]
    fn peek_simple_takes_runs_of_one_descriptor_chains() {
        let mut f = fixture(16, true);
        let one = |f: &Fixture, i: u16, len: u32| f.desc(i, BUFS + 0x800 * u64::from(i), len, 0, 0);
        one(&f, 0, 100);
        one(&f, 1, 60);
        one(&f, 2, 100);
        f.desc(3, BUFS, 10, VIRTQ_DESC_F_NEXT, 4); // a chain of two
        f.desc(4, BUFS, 10, 0, 0);
        one(&f, 5, 100);
        f.desc(6, BUFS, 100, VIRTQ_DESC_F_WRITE, 0); // wrong direction
        f.desc(7, RAM - 10, 100, 0, 0); // outside RAM
        one(&f, 8, 0); // empty
        for head in [0, 1, 2, 3, 5, 6, 7, 8, 99, 0] {
            f.post(head);
        }
        assert_eq!(f.dev.pending(), Ok(10));
        let mut out = [OneBuf::default(); 16];
        // Lengths 64..=128: stops at 1 (60 bytes).
        assert_eq!(f.dev.peek_simple(&f.ram, 0, false, 64..=128, &mut out), 1);
        assert_eq!((out[0].head, out[0].len), (0, 100));
        let base = f.ram.translate(0, 1).unwrap().as_ptr() as usize;
        assert_eq!(out[0].ptr.as_ptr() as usize - base, BUFS as usize);
        // Any length: 0, 1, 2, then the two-descriptor chain.
        assert_eq!(
            f.dev.peek_simple(&f.ram, 0, false, 0..=u32::MAX, &mut out),
            3
        );
        // Each bad or unusual entry stops it; what follows is found again.
        for (from, n) in [(3, 0), (4, 1), (5, 0), (6, 0), (7, 0), (8, 0), (9, 1)] {
            let out = &mut out[..usize::from(10 - from)];
            let got = f.dev.peek_simple(&f.ram, from, false, 1..=u32::MAX, out);
            assert_eq!(got, n, "from {from}");
        }
        // Bounded by `out`, and nothing is consumed.
        assert_eq!(
            f.dev
                .peek_simple(&f.ram, 0, false, 1..=u32::MAX, &mut out[..2]),
            2
        );
        let (lo, hi) = (200, 100);
        assert_eq!(f.dev.peek_simple(&f.ram, 0, false, lo..=hi, &mut out), 0);
        assert_eq!(f.dev.pending(), Ok(10));
        f.dev.consume(3);
        assert_eq!(f.dev.pending(), Ok(7));
        assert_eq!(f.dev.peek(0), 3);
        // Receive side: only writable buffers.
        assert_eq!(
            f.dev
                .peek_simple(&f.ram, 2, true, 1..=u32::MAX, &mut out[..1]),
            1
        );
        assert_eq!(out[0].head, 6);
    }

    #[test]
    fn peek_simple_leaves_other_regions_to_walk() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x100_0000), 0x1_0000),
        ])
        .unwrap();
        let ram = GuestRam::new(&mem).unwrap();
        let (d, a, u) = layout(0x1000, 8);
        let drv = SplitRing::new(&ram, d, a, u, 8).unwrap();
        let mut dev = DeviceQueue::from_ring(SplitRing::new(&ram, d, a, u, 8).unwrap(), true, 0, 0);
        let desc = |i: u16, addr: u64| {
            drv.set_desc(
                i,
                Desc {
                    addr,
                    len: 100,
                    flags: 0,
                    next: 0,
                },
            )
        };
        desc(0, BUFS);
        desc(1, 0x100_0000 + 0x100);
        for i in 0..2 {
            drv.set_avail_entry(i, i);
        }
        drv.set_avail_idx(2);
        assert_eq!(dev.pending(), Ok(2));
        let mut out = [OneBuf::default(); 4];
        assert_eq!(dev.peek_simple(&ram, 0, false, 1..=1000, &mut out[..2]), 1);
        let mut chain = Chain::default();
        assert_eq!(dev.walk(&ram, 1, false, &mut chain), Ok(100));
        assert_eq!(
            chain.segs()[0].ptr.as_ptr(),
            mem.get_host_address(GuestAddress(0x100_0100)).unwrap()
        );
    }

    #[test]
    fn chains_longer_than_the_limit_are_rejected() {
        // 64 linked descriptors are fine, 65 are not (queue of 128).
        let mut f = fixture(128, true);
        for i in 0..65u16 {
            let flags = if i == 63 || i == 64 {
                0
            } else {
                VIRTQ_DESC_F_NEXT
            };
            f.desc(i, BUFS + u64::from(i), 1, flags, i + 1);
        }
        f.post(0);
        assert_eq!(f.walk(false), Ok(0));
        assert_eq!(f.chain.segs().len(), 64);
        f.desc(63, BUFS, 1, VIRTQ_DESC_F_NEXT, 64);
        f.post(0);
        assert_eq!(
            f.walk(false),
            Err(ChainError::Bad("chain too long or looping"))
        );
        // A small queue bounds the walk by its size.
        let mut f = fixture(4, true);
        for i in 0..4u16 {
            f.desc(i, BUFS, 1, VIRTQ_DESC_F_NEXT, (i + 1) % 4);
        }
        f.post(0);
        assert_eq!(
            f.walk(false),
            Err(ChainError::Bad("chain too long or looping"))
        );
    }

    #[test]
    fn impossible_avail_index_is_reported() {
        let mut f = fixture(16, true);
        f.desc(0, BUFS, 10, 0, 0);
        // Exactly a queue's worth ahead is legal.
        for _ in 0..16 {
            f.post(0);
        }
        for _ in 0..16 {
            assert_eq!(f.walk(false), Ok(0));
        }
        assert_eq!(f.dev.pop(), Ok(None));
        f.drv.set_avail_idx(16 + 17);
        assert_eq!(f.dev.pop(), Err(BadAvailIndex));
        assert_eq!(f.dev.enable_notifications(), Err(BadAvailIndex));
        // Going backwards is just as impossible.
        f.drv.set_avail_idx(15);
        assert_eq!(f.dev.pop(), Err(BadAvailIndex));
    }

    #[test]
    fn rewind_puts_entries_and_used_elements_back() {
        let mut f = fixture(8, true);
        f.desc(1, BUFS, 10, 0, 0);
        f.desc(2, BUFS, 10, 0, 0);
        f.post(1);
        f.post(2);
        let mark = f.dev.next_avail();
        let used = f.dev.next_used();
        assert_eq!(f.walk(false), Ok(1));
        f.dev.push_used(1, 0);
        f.dev.rewind(mark);
        f.dev.rewind_used(used);
        assert!(!f.dev.publish_used());
        assert_eq!(f.walk(false), Ok(1));
        assert_eq!(f.walk(false), Ok(2));
        assert_eq!(f.dev.pop(), Ok(None));
    }

    #[test]
    fn event_idx_interrupts_and_kicks() {
        let mut f = fixture(8, true);
        f.desc(0, BUFS, 10, 0, 0);
        // The driver wants an interrupt when used passes 2 (used_event 2).
        f.drv.set_used_event(2);
        for _ in 0..2 {
            f.post(0);
            f.walk(false).unwrap();
            f.dev.push_used(0, 0);
        }
        f.dev.publish_used();
        assert!(!f.dev.needs_notification(), "used 0 -> 2 does not cross 2");
        f.post(0);
        f.walk(false).unwrap();
        f.dev.push_used(0, 0);
        f.dev.publish_used();
        assert!(f.dev.needs_notification(), "used 2 -> 3 crosses 2");
        assert!(!f.dev.needs_notification(), "nothing new");
        // Kicks: nothing pending, so enabling reports nothing and sets
        // avail_event to where the device stopped.
        assert_eq!(f.dev.enable_notifications(), Ok(false));
        assert_eq!(f.drv.avail_event(), 3);
        f.post(0);
        assert!(need_event(f.drv.avail_event(), 4, 3), "the driver kicks");
        assert_eq!(f.dev.enable_notifications(), Ok(true));
        // While busy, avail_event is left alone: no more kicks.
        f.dev.disable_notifications();
        f.walk(false).unwrap();
        f.post(0);
        assert!(!need_event(f.drv.avail_event(), 5, 4));
        assert_eq!(f.drv.used_flags(), 0);
    }

    #[test]
    fn flags_without_event_idx() {
        let mut f = fixture(8, false);
        f.desc(0, BUFS, 10, 0, 0);
        f.dev.disable_notifications();
        assert_eq!(f.drv.used_flags(), VIRTQ_USED_F_NO_NOTIFY);
        assert_eq!(f.dev.enable_notifications(), Ok(false));
        assert_eq!(f.drv.used_flags(), 0);
        f.post(0);
        f.walk(false).unwrap();
        f.dev.push_used(0, 0);
        f.dev.publish_used();
        assert!(f.dev.needs_notification());
        f.drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT);
        f.post(0);
        f.walk(false).unwrap();
        f.dev.push_used(0, 0);
        f.dev.publish_used();
        assert!(!f.dev.needs_notification());
    }

    #[test]
    fn translation_checks_regions_and_rejects_spans() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x4000),
            (GuestAddress(0x100000), 0x20000),
        ])
        .unwrap();
        let ram = GuestRam::new(&mem).unwrap();
        for (gpa, len, ok) in [
            (0u64, 1u64, true),
            (0xffff, 1, true),
            (0xfff0, 0x20, false), // spans two regions
            (0x10000, 0x4000, true),
            (0x13fff, 2, false),
            (0x14000, 1, false), // hole
            (0x100000, 0x20000, true),
            (0x11ffff, 1, true),
            (0x120000, 1, false),
            (u64::MAX, 1, false),
            (0x100000, u64::MAX, false),
        ] {
            let got = ram.translate(gpa, len);
            assert_eq!(got.is_some(), ok, "{gpa:#x}+{len:#x}");
            if let Some(p) = got {
                assert_eq!(
                    p.as_ptr(),
                    mem.get_host_address(GuestAddress(gpa)).unwrap(),
                    "{gpa:#x}"
                );
            }
        }
    }

    #[test]
    fn ring_layouts_are_checked() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        let ram = GuestRam::new(&mem).unwrap();
        assert!(SplitRing::new(&ram, 0x1000, 0x2000, 0x3000, 256).is_ok());
        for (d, a, u, size) in [
            (0x1000, 0x2000, 0x3000, 0),
            (0x1000, 0x2000, 0x3000, 100),
            (0x1008, 0x2000, 0x3000, 256),  // misaligned table
            (0x1000, 0x2001, 0x3000, 256),  // misaligned avail
            (0x1000, 0x2000, 0x3002, 256),  // misaligned used
            (0xf800, 0x2000, 0x3000, 256),  // table spans regions
            (0x1000, 0xfe00, 0x3000, 256),  // avail spans regions
            (0x1000, 0x2000, 0xf800, 256),  // used spans regions
            (0x1000, 0x2000, 0x1f800, 256), // used past RAM
            (u64::MAX - 15, 0x2000, 0x3000, 256),
        ] {
            assert!(
                SplitRing::new(&ram, d, a, u, size).is_err(),
                "{d:#x} {a:#x} {u:#x} {size}"
            );
        }
    }

    #[test]
    fn device_queue_takes_the_driver_configuration() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let ram = GuestRam::new(&mem).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        assert!(DeviceQueue::new(&ram, &q).is_err(), "not ready");
        q.set_ready(true);
        q.set_next_avail(5);
        let dq = DeviceQueue::new(&ram, &q).unwrap();
        assert_eq!((dq.size(), dq.next_avail(), dq.next_used()), (16, 5, 0));
        q.set_used_ring_address(Some(0xfff0), Some(0));
        assert!(DeviceQueue::new(&ram, &q).is_err(), "used ring past RAM");
    }

    /// The split queue as a state machine: random sequences of driver and
    /// device steps against a model of what the device must have seen.
    mod props {
        use super::*;
        use proptest::prelude::*;

        /// One driver or device step.
        #[derive(Debug, Clone)]
        enum Step {
            /// The driver posts a chain of `len` descriptors (1..=3) whose
            /// buffers are valid, or one naming `bad` as its head.
            Post {
                len: u16,
            },
            PostBadHead {
                bad: u16,
            },
            /// The device handles up to `n` waiting entries.
            Serve {
                n: u8,
            },
            /// The device publishes what it returned.
            Publish,
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                4 => (1u16..=3).prop_map(|len| Step::Post { len }),
                1 => (16u16..=u16::MAX).prop_map(|bad| Step::PostBadHead { bad }),
                3 => (1u8..=8).prop_map(|n| Step::Serve { n }),
                2 => Just(Step::Publish),
            ]
        }

        proptest! {
            #[test]
            fn the_device_returns_every_posted_chain_once_in_order(
                steps in proptest::collection::vec(step(), 1..200),
                event_idx in any::<bool>(),
            ) {
                const SIZE: u16 = 16;
                let mut f = fixture(SIZE, event_idx);
                // Model: free descriptors, posted heads in order (with the
                // chain length each should walk to), returned heads.
                let mut free: Vec<u16> = (0..SIZE).rev().collect();
                let mut posted = std::collections::VecDeque::new();
                let mut returned = Vec::new();
                let mut used = 0u16;
                for s in steps {
                    match s {
                        Step::Post { len } => {
                            if free.len() < usize::from(len) || posted.len() >= usize::from(SIZE) {
                                continue;
                            }
                            let ids: Vec<u16> = (0..len).map(|_| free.pop().unwrap()).collect();
                            for (k, &id) in ids.iter().enumerate() {
                                let last = k + 1 == ids.len();
                                let flags = if last { 0 } else { VIRTQ_DESC_F_NEXT };
                                let next = if last { 0 } else { ids[k + 1] };
                                f.desc(id, BUFS + u64::from(id) * 256, 100 + u32::from(id), flags, next);
                            }
                            let want: u32 = ids.iter().map(|&id| 100 + u32::from(id)).sum();
                            posted.push_back((ids[0], Some((ids, want))));
                            f.post(posted.back().unwrap().0);
                        }
                        Step::PostBadHead { bad } => {
                            if posted.len() >= usize::from(SIZE) {
                                continue;
                            }
                            posted.push_back((bad, None));
                            f.post(bad);
                        }
                        Step::Serve { n } => {
                            for _ in 0..n {
                                let pending = f.dev.pending().unwrap();
                                prop_assert_eq!(usize::from(pending), posted.len());
                                if pending == 0 {
                                    break;
                                }
                                let (head, chain) = posted.pop_front().unwrap();
                                prop_assert_eq!(f.dev.pop().unwrap(), Some(head));
                                let walked = f.dev.walk(&f.ram, head, false, &mut f.chain);
                                match chain {
                                    Some((ids, want)) => {
                                        prop_assert_eq!(walked, Ok(want as usize));
                                        prop_assert_eq!(f.chain.segs().len(), ids.len());
                                        f.dev.push_used(head, want);
                                        // The driver frees them when it sees them used.
                                        returned.push((head, want, ids));
                                    }
                                    None => {
                                        prop_assert_eq!(walked, Err(ChainError::BadHead));
                                    }
                                }
                            }
                        }
                        Step::Publish => {
                            let any = f.dev.publish_used();
                            prop_assert_eq!(any, !returned.is_empty());
                            // The driver sees exactly what was returned, in order.
                            while used != f.drv.used_idx() {
                                let (id, len) = f.drv.used_elem(used);
                                let (head, want, ids) = returned.remove(0);
                                prop_assert_eq!((id, len), (u32::from(head), want));
                                free.extend(ids);
                                used = used.wrapping_add(1);
                            }
                            prop_assert!(returned.is_empty());
                        }
                    }
                }
            }

            #[test]
            fn an_impossible_avail_index_is_reported_not_followed(
                jump in (17u16..=u16::MAX),
                event_idx in any::<bool>(),
            ) {
                let mut f = fixture(16, event_idx);
                f.drv.set_avail_idx(jump);
                prop_assert_eq!(f.dev.pending(), Err(BadAvailIndex));
                prop_assert_eq!(f.dev.pop(), Err(BadAvailIndex));
                prop_assert_eq!(f.dev.next_avail(), 0);
            }

            #[test]
            fn need_event_is_the_specs_window(event in any::<u16>(), old in any::<u16>(), step in 0u16..=1024) {
                let new = old.wrapping_add(step);
                // True iff `event` is in [old, new): the index moved past it.
                let crossed = event.wrapping_sub(old) < new.wrapping_sub(old);
                prop_assert_eq!(need_event(event, new, old), crossed);
            }
        }
    }
}
