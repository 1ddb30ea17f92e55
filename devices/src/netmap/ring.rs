//! The fast-path ring API, in the spirit of `netmap_user.h`: a [`Ring`] is a
//! handle on one `netmap_ring` in shared memory (the kernel's, or a userspace
//! port's), with `head`/`cur`/`tail` accessed atomically and slots and
//! buffers accessed **by index with bounds checks**.
//!
//! The other side of a ring (the kernel, or for userspace ports another
//! process) is not trusted: every index and length read from shared memory is
//! checked before it is used; bad values make the accessor return `None` (or
//! `0`, or `false`) and bump a counter ([`RingStats`]), never an access outside
//! the region. Nothing here allocates, locks or makes a system call.
//!
//! Ownership (netmap's rules): slots in `[head, tail)` belong to the user;
//! `head` and `cur` are written only by the user, `tail` only by the sync
//! (kernel, or the userspace sync of this end). One slot is always kept empty.
//!
//! Slots are read and written as one 64-bit word covering `buf_idx`, `len`
//! and `flags`, so a value is validated and used from a single read
//! (no check-then-reread races with a peer).

use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::abi::{NETMAP_MAX_FRAGS, NETMAP_RING_SLOTS_OFFSET, NS_MOREFRAG};

/// Offset of `head` in a ring header.
const HEAD_OFS: usize = 20;
/// Offset of `cur` in a ring header.
const CUR_OFS: usize = 24;
/// Offset of `tail` in a ring header.
const TAIL_OFS: usize = 28;
/// Largest ring we accept.
pub const MAX_SLOTS: u32 = 1 << 20;

/// Errors found while setting up a ring view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// Part of the ring or its buffers lies outside the mapped region.
    #[error("{what} at offset {offset:#x} (+{len:#x}) lies outside the {region:#x}-byte region")]
    OutOfRegion {
        /// What.
        what: &'static str,
        /// Offset from the region start (may be negative).
        offset: i128,
        /// Length.
        len: u128,
        /// Region length.
        region: usize,
    },
    /// A header field has an impossible value.
    #[error("ring {what} is {value}, outside {range}")]
    BadGeometry {
        /// Field.
        what: &'static str,
        /// Value found.
        value: u64,
        /// Accepted range.
        range: &'static str,
    },
    /// The ring is not 8-byte aligned.
    #[error("ring at offset {offset:#x} is not 8-byte aligned")]
    Misaligned {
        /// Offset.
        offset: usize,
    },
}

/// The part of a slot the data path uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Slot {
    /// Buffer index.
    pub buf_idx: u32,
    /// Length of the data in the buffer.
    pub len: u16,
    /// `NS_*` flags.
    pub flags: u16,
}

impl Slot {
    /// The first 8 bytes of a `netmap_slot` as one native-endian word.
    #[inline]
    pub(crate) fn to_word(self) -> u64 {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.buf_idx.to_ne_bytes());
        b[4..6].copy_from_slice(&self.len.to_ne_bytes());
        b[6..].copy_from_slice(&self.flags.to_ne_bytes());
        u64::from_ne_bytes(b)
    }

    /// The inverse of [`Slot::to_word`].
    #[inline]
    pub(crate) fn from_word(w: u64) -> Slot {
        let b = w.to_ne_bytes();
        Slot {
            buf_idx: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            len: u16::from_ne_bytes([b[4], b[5]]),
            flags: u16::from_ne_bytes([b[6], b[7]]),
        }
    }
}

/// Counters of bad values a ring handle has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// `head`/`cur`/`tail` or a slot index out of range.
    pub bad_index: u64,
    /// Buffer indices outside the pool.
    pub bad_buf_idx: u64,
    /// Lengths larger than the buffer.
    pub bad_len: u64,
    /// Fragment chains longer than `NETMAP_MAX_FRAGS`.
    pub bad_frame: u64,
    /// Received frames skipped (bad, or larger than the caller's buffer).
    pub rx_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    bad_index: Cell<u64>,
    bad_buf_idx: Cell<u64>,
    bad_len: Cell<u64>,
    bad_frame: Cell<u64>,
    rx_dropped: Cell<u64>,
}

#[cold]
#[inline(never)]
fn bump(c: &Cell<u64>, what: &str) {
    let v = c.get() + 1;
    c.set(v);
    if v.is_power_of_two() {
        log::debug!("netmap ring: {what} (seen {v} times)");
    }
}

/// A handle on one netmap ring in a mapped region. See the module docs.
///
/// A `Ring` never outlives the port that made it (ports hand out `&mut Ring`).
#[derive(Debug)]
pub struct Ring {
    hdr: NonNull<u8>,
    slots: NonNull<u8>,
    bufs: NonNull<u8>,
    num_slots: u32,
    buf_size: u32,
    num_bufs: u32,
    c: Counters,
}

// SAFETY: a Ring only holds addresses into a shared mapping that is valid
// for the ring's whole life (guaranteed by its constructor's contract) and
// has no thread affinity; all shared-memory accesses are atomic or go through
// the bounds-checked buffer accessors. `Cell` counters make it !Sync, as it
// should be: one thread operates a ring.
unsafe impl Send for Ring {}

impl Ring {
    /// A ring view from explicit geometry: the ring header at `ring_ofs` in
    /// the region `[base, base + region_len)`, `num_slots` slots, buffer 0 at
    /// `bufs_ofs`, `num_bufs` buffers of `buf_size` bytes. Every part is
    /// checked to lie inside the region.
    ///
    /// # Safety
    ///
    /// `[base, base + region_len)` must be mapped read-write for the whole
    /// life of the returned `Ring`, and every other access to the ring
    /// header's `head`/`cur`/`tail` and to the slots must be atomic or come
    /// from another process (which the ring treats as untrusted).
    pub(crate) unsafe fn from_parts(
        base: NonNull<u8>,
        region_len: usize,
        ring_ofs: usize,
        num_slots: u32,
        bufs_ofs: usize,
        buf_size: u32,
        num_bufs: u32,
    ) -> Result<Ring, RingError> {
        if !(2..=MAX_SLOTS).contains(&num_slots) {
            return Err(RingError::BadGeometry {
                what: "num_slots",
                value: num_slots.into(),
                range: "2..=1048576",
            });
        }
        if buf_size == 0 {
            return Err(RingError::BadGeometry {
                what: "nr_buf_size",
                value: 0,
                range: "1..",
            });
        }
        if ring_ofs % 8 != 0 {
            return Err(RingError::Misaligned { offset: ring_ofs });
        }
        let ring_len = NETMAP_RING_SLOTS_OFFSET as u128 + 16 * u128::from(num_slots);
        if ring_ofs as u128 + ring_len > region_len as u128 {
            return Err(RingError::OutOfRegion {
                what: "ring",
                offset: ring_ofs as i128,
                len: ring_len,
                region: region_len,
            });
        }
        let bufs_len = u128::from(num_bufs) * u128::from(buf_size);
        if bufs_ofs as u128 + bufs_len > region_len as u128 {
            return Err(RingError::OutOfRegion {
                what: "buffer pool",
                offset: bufs_ofs as i128,
                len: bufs_len,
                region: region_len,
            });
        }
        // SAFETY: both offsets were checked to lie inside the region, so the
        // results stay inside the same mapping and are non-null.
        let (hdr, bufs) = unsafe { (base.add(ring_ofs), base.add(bufs_ofs)) };
        // SAFETY: the whole ring (header plus slots) is inside the region.
        let slots = unsafe { hdr.add(NETMAP_RING_SLOTS_OFFSET) };
        Ok(Ring {
            hdr,
            slots,
            bufs,
            num_slots,
            buf_size,
            num_bufs,
            c: Counters::default(),
        })
    }

    /// A ring view whose geometry is read from its header (kernel rings):
    /// `num_slots`, `nr_buf_size` and `buf_ofs`; the number of buffers is
    /// however many fit between buffer 0 and the end of the region.
    ///
    /// # Safety
    ///
    /// As for [`Ring::from_parts`].
    pub(crate) unsafe fn from_header(
        base: NonNull<u8>,
        region_len: usize,
        ring_ofs: usize,
    ) -> Result<Ring, RingError> {
        if ring_ofs % 8 != 0 {
            return Err(RingError::Misaligned { offset: ring_ofs });
        }
        if ring_ofs as u128 + NETMAP_RING_SLOTS_OFFSET as u128 > region_len as u128 {
            return Err(RingError::OutOfRegion {
                what: "ring header",
                offset: ring_ofs as i128,
                len: NETMAP_RING_SLOTS_OFFSET as u128,
                region: region_len,
            });
        }
        // SAFETY: the 256-byte header is inside the mapped region (checked
        // above) and 8-aligned; each field is read once with a volatile read
        // of a plain integer, for which every bit pattern is valid.
        let (buf_ofs, num_slots, buf_size) = unsafe {
            let h = base.as_ptr().add(ring_ofs);
            (
                h.cast::<i64>().read_volatile(),
                h.add(8).cast::<u32>().read_volatile(),
                h.add(12).cast::<u32>().read_volatile(),
            )
        };
        let bufs_ofs = ring_ofs as i128 + i128::from(buf_ofs);
        if bufs_ofs < 0 || bufs_ofs > region_len as i128 {
            return Err(RingError::OutOfRegion {
                what: "buffer 0",
                offset: bufs_ofs,
                len: 0,
                region: region_len,
            });
        }
        let bufs_ofs = bufs_ofs as usize;
        if buf_size == 0 {
            return Err(RingError::BadGeometry {
                what: "nr_buf_size",
                value: 0,
                range: "1..",
            });
        }
        let num_bufs = ((region_len - bufs_ofs) / buf_size as usize).min(u32::MAX as usize) as u32;
        // SAFETY: forwarded contract.
        unsafe {
            Ring::from_parts(
                base, region_len, ring_ofs, num_slots, bufs_ofs, buf_size, num_bufs,
            )
        }
    }

    /// The rings a netmap application finds through the `netmap_if` at
    /// `nifp_offset` in a region, read as the application reads them (for
    /// drivers that play a netmap-aware guest on a passed-through region):
    /// (tx rings, rx rings), host rings left out.
    ///
    /// # Safety
    ///
    /// As for [`Ring::from_parts`].
    pub unsafe fn in_region(
        base: NonNull<u8>,
        region_len: usize,
        nifp_offset: usize,
    ) -> Result<(Vec<Ring>, Vec<Ring>), RingError> {
        const MAX_RINGS: u32 = 64;
        let words_end = nifp_offset as u128 + 56 + 8 * 2 * u128::from(MAX_RINGS + 1);
        if nifp_offset % 8 != 0 || words_end > region_len as u128 {
            return Err(RingError::OutOfRegion {
                what: "netmap_if",
                offset: nifp_offset as i128,
                len: words_end - nifp_offset as u128,
                region: region_len,
            });
        }
        let read = |ofs: usize| -> i64 {
            // SAFETY: the netmap_if header and the largest ring_ofs[] we
            // read lie inside the mapped region (checked above) and are
            // 8-aligned; each is a plain integer read once, volatile.
            unsafe {
                base.as_ptr()
                    .add(nifp_offset + ofs)
                    .cast::<i64>()
                    .read_volatile()
            }
        };
        let read32 = |ofs: usize| -> u32 {
            // SAFETY: as above, 4-byte fields at 4-aligned offsets.
            unsafe {
                base.as_ptr()
                    .add(nifp_offset + ofs)
                    .cast::<u32>()
                    .read_volatile()
            }
        };
        let (ntx, nrx, nhost_tx) = (read32(24), read32(28), read32(36));
        for (what, v) in [
            ("ni_tx_rings", ntx),
            ("ni_rx_rings", nrx),
            ("ni_host_tx_rings", nhost_tx),
        ] {
            if v > MAX_RINGS {
                return Err(RingError::BadGeometry {
                    what,
                    value: u64::from(v),
                    range: "0..=64",
                });
            }
        }
        let ring = |i: u32| -> Result<Ring, RingError> {
            let ofs = nifp_offset as i128 + i128::from(read(56 + 8 * i as usize));
            if ofs < 0 || ofs > region_len as i128 {
                return Err(RingError::OutOfRegion {
                    what: "ring",
                    offset: ofs,
                    len: 0,
                    region: region_len,
                });
            }
            // SAFETY: forwarded contract; the header is checked inside.
            unsafe { Ring::from_header(base, region_len, ofs as usize) }
        };
        let tx = (0..ntx).map(ring).collect::<Result<Vec<_>, _>>()?;
        let rx = (0..nrx)
            .map(|i| ring(i + ntx + nhost_tx))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((tx, rx))
    }

    #[inline]
    fn hdr_u32(&self, ofs: usize) -> &AtomicU32 {
        // SAFETY: `ofs` is one of HEAD/CUR/TAIL_OFS, inside the 256-byte
        // header that `from_parts` checked to be in the live mapping, and
        // 4-aligned (the header is 8-aligned). All accesses to these words
        // are atomic (ours) or from another process.
        unsafe { AtomicU32::from_ptr(self.hdr.as_ptr().add(ofs).cast()) }
    }

    #[inline]
    fn slot_word(&self, i: u32) -> &AtomicU64 {
        debug_assert!(i < self.num_slots);
        // SAFETY: callers pass i < num_slots, so the 8-byte word is inside
        // the slot array checked by `from_parts`; it is 8-aligned (header is
        // 8-aligned, slots are 16 bytes at +256). Slot words are only ever
        // accessed atomically as u64 (here) or by another process.
        unsafe { AtomicU64::from_ptr(self.slots.as_ptr().add(i as usize * 16).cast()) }
    }

    /// Number of slots.
    #[inline]
    pub fn num_slots(&self) -> u32 {
        self.num_slots
    }

    /// Size of each buffer.
    #[inline]
    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }

    /// Number of buffers a slot may point to (valid `buf_idx` are below it).
    #[inline]
    pub fn num_bufs(&self) -> u32 {
        self.num_bufs
    }

    /// `head`, as stored in the ring (may be out of range if tampered with).
    #[inline]
    pub fn head(&self) -> u32 {
        self.hdr_u32(HEAD_OFS).load(Ordering::Relaxed)
    }

    /// `cur`, as stored in the ring.
    #[inline]
    pub fn cur(&self) -> u32 {
        self.hdr_u32(CUR_OFS).load(Ordering::Relaxed)
    }

    /// `tail`, as stored in the ring (acquire: slots before it are ready).
    #[inline]
    pub fn tail(&self) -> u32 {
        self.hdr_u32(TAIL_OFS).load(Ordering::Acquire)
    }

    /// Sets `head` (release: slots before it are handed over at the next sync).
    #[inline]
    pub fn set_head(&mut self, head: u32) {
        self.hdr_u32(HEAD_OFS).store(head, Ordering::Release);
    }

    /// Sets `cur`.
    #[inline]
    pub fn set_cur(&mut self, cur: u32) {
        self.hdr_u32(CUR_OFS).store(cur, Ordering::Relaxed);
    }

    /// Sets `cur` and then `head` to `i`: hands over everything before `i`.
    #[inline]
    pub fn advance(&mut self, i: u32) {
        self.set_cur(i);
        self.set_head(i);
    }

    /// Sets `tail` (only the sync does this).
    #[inline]
    pub(crate) fn store_tail(&self, tail: u32) {
        self.hdr_u32(TAIL_OFS).store(tail, Ordering::Release);
    }

    /// The slot after `i` (`nm_ring_next`); out-of-range `i` gives 0.
    #[inline]
    pub fn next(&self, i: u32) -> u32 {
        let j = i.wrapping_add(1);
        if j >= self.num_slots {
            0
        } else {
            j
        }
    }

    /// Slots from `from` to `to` going forward, if both are in range.
    #[inline]
    fn dist(&self, from: u32, to: u32) -> Option<u32> {
        let n = self.num_slots;
        if from >= n || to >= n {
            bump(&self.c.bad_index, "ring index out of range");
            return None;
        }
        Some(if to >= from { to - from } else { to + n - from })
    }

    /// Slots between `head` and `tail` (`nm_ring_space`): free slots on a tx
    /// ring, received slots on an rx ring. 0 if the header is corrupt.
    #[inline]
    pub fn space(&self) -> u32 {
        self.dist(self.head(), self.tail()).unwrap_or(0)
    }

    /// Slots between `cur` and `tail`. 0 if the header is corrupt.
    #[inline]
    pub fn space_from_cur(&self) -> u32 {
        self.dist(self.cur(), self.tail()).unwrap_or(0)
    }

    /// `head == tail` (`nm_ring_empty`); a corrupt header counts as empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.space() == 0
    }

    /// Whether a tx ring still has slots not yet sent (`nm_tx_pending`).
    #[inline]
    pub fn tx_pending(&self) -> bool {
        self.next(self.tail()) != self.head()
    }

    /// The slot at index `i`, or `None` if `i` is out of range.
    #[inline]
    pub fn slot(&self, i: u32) -> Option<Slot> {
        if i >= self.num_slots {
            bump(&self.c.bad_index, "slot index out of range");
            return None;
        }
        Some(Slot::from_word(self.slot_word(i).load(Ordering::Relaxed)))
    }

    /// Slot `i` without the range check (`i < num_slots` must hold).
    #[inline]
    pub(crate) fn load_slot(&self, i: u32) -> Slot {
        Slot::from_word(self.slot_word(i).load(Ordering::Relaxed))
    }

    /// Writes slot `i` (`i < num_slots` must hold).
    #[inline]
    pub(crate) fn store_slot(&self, i: u32, s: Slot) {
        self.slot_word(i).store(s.to_word(), Ordering::Relaxed);
    }

    /// Writes slot `i`: false (and nothing written) if `i`, `buf_idx` or
    /// `len` is out of range. Set `NS_BUF_CHANGED` when changing `buf_idx`.
    #[inline]
    pub fn set_slot(&mut self, i: u32, s: Slot) -> bool {
        if i >= self.num_slots {
            bump(&self.c.bad_index, "slot index out of range");
            return false;
        }
        if s.buf_idx >= self.num_bufs {
            bump(&self.c.bad_buf_idx, "buffer index out of range");
            return false;
        }
        if u32::from(s.len) > self.buf_size {
            bump(&self.c.bad_len, "length larger than the buffer");
            return false;
        }
        self.store_slot(i, s);
        true
    }

    /// Sets `len` and `flags` of slot `i`, keeping its `buf_idx`.
    #[inline]
    pub fn set_len_flags(&mut self, i: u32, len: u16, flags: u16) -> bool {
        let Some(mut s) = self.slot(i) else {
            return false;
        };
        if u32::from(len) > self.buf_size {
            bump(&self.c.bad_len, "length larger than the buffer");
            return false;
        }
        s.len = len;
        s.flags = flags;
        self.store_slot(i, s);
        true
    }

    #[inline]
    fn buf_ptr(&self, buf_idx: u32) -> Option<*mut u8> {
        if buf_idx >= self.num_bufs {
            bump(&self.c.bad_buf_idx, "buffer index out of range");
            return None;
        }
        // SAFETY: buf_idx < num_bufs and `from_parts` checked that
        // num_bufs * buf_size bytes from `bufs` are inside the mapping.
        Some(unsafe {
            self.bufs
                .as_ptr()
                .add(buf_idx as usize * self.buf_size as usize)
        })
    }

    /// Buffer `buf_idx` (all `buf_size` bytes), or `None` if out of range.
    ///
    /// The bytes are shared memory: a misbehaving peer may change them while
    /// they are borrowed, so treat them as untrusted input.
    #[inline]
    pub fn buf(&self, buf_idx: u32) -> Option<&[u8]> {
        let p = self.buf_ptr(buf_idx)?;
        // SAFETY: `p..p+buf_size` is inside the live mapping (buf_ptr), u8
        // has no invalid values, and the ring protocol gives this end the
        // buffer of a slot it owns; the borrow is tied to `&self`. A peer
        // that writes the buffer anyway can only change the byte values the
        // caller sees, and no index or length is derived from them here.
        Some(unsafe { std::slice::from_raw_parts(p, self.buf_size as usize) })
    }

    /// Buffer `buf_idx` for writing, or `None` if out of range.
    #[inline]
    pub fn buf_mut(&mut self, buf_idx: u32) -> Option<&mut [u8]> {
        let p = self.buf_ptr(buf_idx)?;
        // SAFETY: as in `buf`; the `&mut self` borrow makes this the only
        // slice this handle hands out while it lives.
        Some(unsafe { std::slice::from_raw_parts_mut(p, self.buf_size as usize) })
    }

    /// The data of slot `i` (`buf[..len]`) and its flags, validated.
    #[inline]
    pub fn frag(&self, i: u32) -> Option<(&[u8], u16)> {
        let s = self.slot(i)?;
        if u32::from(s.len) > self.buf_size {
            bump(&self.c.bad_len, "length larger than the buffer");
            return None;
        }
        let b = self.buf(s.buf_idx)?;
        Some((&b[..usize::from(s.len)], s.flags))
    }

    /// The whole buffer of slot `i`, for writing.
    #[inline]
    pub fn tx_buf(&mut self, i: u32) -> Option<&mut [u8]> {
        let s = self.slot(i)?;
        self.buf_mut(s.buf_idx)
    }

    /// Copies `frame` into the slots from `cur` on (split at `buf_size` with
    /// `NS_MOREFRAG` on all but the last), then moves `cur` and `head` past
    /// it. Returns false, writing nothing, if it does not fit before `tail`
    /// or needs more than `NETMAP_MAX_FRAGS` slots. A slot whose `buf_idx` is
    /// out of range is handed back as an empty frame for the sync to repair.
    pub fn send(&mut self, frame: &[u8]) -> bool {
        // A fragment's length must fit the 16-bit `len`.
        let bs = (self.buf_size as usize).min(usize::from(u16::MAX));
        let nfrags = frame.len().div_ceil(bs).max(1);
        if nfrags > NETMAP_MAX_FRAGS {
            return false;
        }
        let Some(mut avail) = self.dist(self.cur(), self.tail()) else {
            return false;
        };
        let mut start = self.cur();
        'retry: loop {
            if (nfrags as u32) > avail {
                return false;
            }
            // Check every slot first so a bad one cannot leave half a frame.
            let mut i = start;
            for k in 0..nfrags {
                let s = self.load_slot(i);
                if s.buf_idx >= self.num_bufs {
                    bump(&self.c.bad_buf_idx, "buffer index out of range");
                    // Hand the slots up to the bad one back as empty frames.
                    let mut j = start;
                    for _ in 0..=k {
                        let mut e = self.load_slot(j);
                        e.len = 0;
                        e.flags = 0;
                        self.store_slot(j, e);
                        j = self.next(j);
                    }
                    avail -= k as u32 + 1;
                    start = j;
                    self.advance(start);
                    continue 'retry;
                }
                i = self.next(i);
            }
            break;
        }
        let mut i = start;
        for (k, chunk) in frame
            .chunks(bs)
            .chain(frame.is_empty().then_some(&[][..]))
            .enumerate()
        {
            let mut s = self.load_slot(i);
            if let Some(b) = self.buf_mut(s.buf_idx) {
                b[..chunk.len()].copy_from_slice(chunk);
            }
            s.len = chunk.len() as u16;
            s.flags = if k + 1 < nfrags { NS_MOREFRAG } else { 0 };
            self.store_slot(i, s);
            i = self.next(i);
        }
        self.advance(i);
        true
    }

    /// Copies the next received frame (all its fragments, from `cur`) into
    /// `out`, moves `cur` and `head` past it and returns its length. Frames
    /// with bad slots, chains longer than `NETMAP_MAX_FRAGS`, or larger than
    /// `out` are skipped and counted. `None` when no whole frame is left
    /// before `tail`.
    pub fn recv(&mut self, out: &mut [u8]) -> Option<usize> {
        let tail = self.tail();
        let mut i = self.cur();
        self.dist(i, tail)?;
        loop {
            if i == tail {
                return None;
            }
            let mut j = i;
            let mut total = 0usize;
            let mut nfrags = 0usize;
            let mut ok = true;
            loop {
                if j == tail {
                    // Incomplete chain: wait for the rest.
                    return None;
                }
                let s = self.load_slot(j);
                nfrags += 1;
                j = self.next(j);
                if ok {
                    if u32::from(s.len) > self.buf_size {
                        bump(&self.c.bad_len, "length larger than the buffer");
                        ok = false;
                    } else if let Some(b) = self.buf(s.buf_idx) {
                        let len = usize::from(s.len);
                        if total + len <= out.len() {
                            out[total..total + len].copy_from_slice(&b[..len]);
                        } else {
                            ok = false;
                        }
                        total += len;
                    } else {
                        ok = false;
                    }
                }
                if s.flags & NS_MOREFRAG == 0 {
                    break;
                }
                if nfrags == NETMAP_MAX_FRAGS {
                    bump(&self.c.bad_frame, "fragment chain too long");
                    ok = false;
                    break;
                }
            }
            self.advance(j);
            if ok {
                return Some(total);
            }
            bump(&self.c.rx_dropped, "received frame dropped");
            i = j;
        }
    }

    /// Counters of bad values this handle has seen.
    pub fn stats(&self) -> RingStats {
        RingStats {
            bad_index: self.c.bad_index.get(),
            bad_buf_idx: self.c.bad_buf_idx.get(),
            bad_len: self.c.bad_len.get(),
            bad_frame: self.c.bad_frame.get(),
            rx_dropped: self.c.rx_dropped.get(),
        }
    }
}

/// Cyclic window test: whether `x` lies in `[a, b]` going forward on a ring of
/// `n` slots (all of `a`, `b` must be `< n`; `x >= n` is never inside).
#[inline]
pub(crate) fn within(a: u32, x: u32, b: u32, n: u32) -> bool {
    if x >= n {
        return false;
    }
    let d = |from: u32, to: u32| if to >= from { to - from } else { to + n - from };
    d(a, x) <= d(a, b)
}

/// The slot before `i` on a ring of `n` slots.
#[inline]
pub(crate) fn prev(i: u32, n: u32) -> u32 {
    if i == 0 {
        n - 1
    } else {
        i - 1
    }
}

/// The slot after `i` on a ring of `n` slots.
#[inline]
pub(crate) fn next(i: u32, n: u32) -> u32 {
    if i + 1 >= n {
        0
    } else {
        i + 1
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::netmap::abi::NS_BUF_CHANGED;
    use crate::netmap::sys::Mapping;

    /// A fake region with one ring at offset 0 and `nbufs` buffers after it.
    pub(crate) struct FakeRing {
        pub ring: Ring,
        pub _map: Mapping,
    }

    pub(crate) fn fake_ring(n: u32, buf_size: u32, nbufs: u32) -> FakeRing {
        let ring_len = 256 + 16 * n as usize;
        let bufs_ofs = ring_len.next_multiple_of(4096);
        let len = bufs_ofs + (nbufs * buf_size) as usize;
        let map = Mapping::anonymous(len.next_multiple_of(4096)).unwrap();
        // SAFETY: the mapping outlives the ring (both live in FakeRing, and
        // the ring is dropped first by field order); only this test touches it.
        let ring =
            unsafe { Ring::from_parts(map.ptr(), map.len(), 0, n, bufs_ofs, buf_size, nbufs) }
                .unwrap();
        for i in 0..n {
            ring.store_slot(
                i,
                Slot {
                    buf_idx: i,
                    len: 0,
                    flags: 0,
                },
            );
        }
        FakeRing { ring, _map: map }
    }

    /// The reference model of the index arithmetic.
    fn model_space(h: u32, t: u32, n: u32) -> u32 {
        ((t as i64 - h as i64).rem_euclid(n as i64)) as u32
    }

    #[test]
    fn slot_word_roundtrip() {
        for s in [
            Slot::default(),
            Slot {
                buf_idx: 0xdead_beef,
                len: 0xffff,
                flags: 0x8001,
            },
            Slot {
                buf_idx: 1,
                len: 2,
                flags: 3,
            },
        ] {
            assert_eq!(Slot::from_word(s.to_word()), s);
        }
        // The word matches the C layout.
        let w = Slot {
            buf_idx: 0x1122_3344,
            len: 0x5566,
            flags: 0x7788,
        }
        .to_word();
        let b = w.to_ne_bytes();
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 0x1122_3344);
        assert_eq!(u16::from_ne_bytes(b[4..6].try_into().unwrap()), 0x5566);
        assert_eq!(u16::from_ne_bytes(b[6..8].try_into().unwrap()), 0x7788);
    }

    /// Exhaustive check of next/space/empty/tx_pending against the model for
    /// every ring size up to 9 and every (head, tail) pair, plus out-of-range
    /// values (which must never panic).
    #[test]
    fn arithmetic_exhaustive() {
        for n in 2..=9u32 {
            let mut f = fake_ring(n, 64, n);
            let r = &mut f.ring;
            for i in 0..n {
                assert_eq!(r.next(i), (i + 1) % n);
                assert_eq!(next(i, n), (i + 1) % n);
                assert_eq!(prev(i, n), (i + n - 1) % n);
            }
            for h in 0..n {
                for t in 0..n {
                    r.advance(h);
                    r.store_tail(t);
                    assert_eq!(r.space(), model_space(h, t, n));
                    assert_eq!(r.is_empty(), h == t);
                    assert_eq!(r.tx_pending(), (t + 1) % n != h);
                    for x in 0..n + 2 {
                        let model = x < n && model_space(h, x, n) <= model_space(h, t, n);
                        assert_eq!(within(h, x, t, n), model, "n={n} h={h} x={x} t={t}");
                    }
                }
            }
            let before = r.stats().bad_index;
            for bad in [n, n + 1, u32::MAX] {
                r.advance(bad);
                assert_eq!(r.space(), 0);
                assert!(r.is_empty());
                assert!(r.next(bad) < n);
                assert!(r.slot(bad).is_none());
                assert!(!r.set_slot(bad, Slot::default()));
            }
            assert!(r.stats().bad_index > before);
        }
    }

    /// Pseudo-random walks (a tiny property test): a producer and consumer
    /// advance head/tail by random amounts that respect the rules, and the
    /// arithmetic always agrees with the model on a large ring.
    #[test]
    fn arithmetic_random_walk() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for n in [2u32, 3, 7, 64, 1000, 1024, 4095] {
            let mut f = fake_ring(n, 64, 4);
            let r = &mut f.ring;
            let (mut h, mut t) = (0u32, n - 1);
            r.advance(h);
            r.store_tail(t);
            for _ in 0..2000 {
                let space = r.space();
                assert_eq!(space, model_space(h, t, n));
                // user consumes some of its slots
                let k = (rnd() % (u64::from(space) + 1)) as u32;
                h = (h + k) % n;
                r.advance(h);
                // kernel returns some slots, keeping one empty
                let free = model_space(t, (h + n - 1) % n, n);
                let k = (rnd() % (u64::from(free) + 1)) as u32;
                t = (t + k) % n;
                r.store_tail(t);
                assert!(within(h, t, (h + n - 1) % n, n));
            }
        }
    }

    #[test]
    fn buffers_are_bounds_checked() {
        let mut f = fake_ring(8, 128, 8);
        let r = &mut f.ring;
        assert_eq!(r.buf(7).unwrap().len(), 128);
        assert!(r.buf(8).is_none());
        assert!(r.buf(u32::MAX).is_none());
        assert!(r.buf_mut(8).is_none());
        assert_eq!(r.stats().bad_buf_idx, 3);
        assert!(r.set_slot(
            0,
            Slot {
                buf_idx: 7,
                len: 128,
                flags: NS_BUF_CHANGED
            }
        ));
        assert!(!r.set_slot(
            0,
            Slot {
                buf_idx: 8,
                len: 1,
                flags: 0
            }
        ));
        assert!(!r.set_slot(
            0,
            Slot {
                buf_idx: 1,
                len: 129,
                flags: 0
            }
        ));
        assert_eq!(
            r.slot(0).unwrap(),
            Slot {
                buf_idx: 7,
                len: 128,
                flags: NS_BUF_CHANGED
            }
        );
        // A slot made bad behind our back (as a peer would).
        r.store_slot(
            1,
            Slot {
                buf_idx: 1,
                len: 500,
                flags: 0,
            },
        );
        assert!(r.frag(1).is_none());
        r.store_slot(
            2,
            Slot {
                buf_idx: 99,
                len: 5,
                flags: 0,
            },
        );
        assert!(r.frag(2).is_none());
        assert!(r.tx_buf(2).is_none());
        assert!(!r.set_len_flags(3, 129, 0));
        assert!(r.set_len_flags(3, 10, NS_MOREFRAG));
        assert_eq!(r.frag(3).unwrap().0.len(), 10);
    }

    /// Moves every published tx slot to an rx ring by swapping buffers, the
    /// way a pipe does, then checks `send` and `recv` with fragments.
    #[test]
    fn send_recv_fragments() {
        let n = 16;
        let mut tx = fake_ring(n, 64, 2 * n);
        let mut rx = fake_ring(n, 64, 2 * n);
        for i in 0..n {
            rx.ring.store_slot(
                i,
                Slot {
                    buf_idx: n + i,
                    len: 0,
                    flags: 0,
                },
            );
        }
        let (t, r) = (&mut tx.ring, &mut rx.ring);
        t.advance(0);
        t.store_tail(n - 1);
        r.advance(0);
        r.store_tail(0);
        // Buffers of the two fake regions are different memory, so "swap"
        // by copying bytes here; the index logic is what is under test.
        let frames: Vec<Vec<u8>> = vec![
            vec![1; 10],
            vec![2; 64],
            vec![3; 65],
            vec![4; 200],
            vec![],
            vec![5; 64 * 4],
        ];
        let mut sent = 0;
        for f in &frames {
            assert!(t.send(f));
            sent += 1;
        }
        assert_eq!(sent, frames.len());
        let used = t.head();
        assert_eq!(used, 1 + 1 + 2 + 4 + 1 + 4);
        assert!(!t.send(&[9; 64 * 4]), "only 2 slots left");
        for i in 0..used {
            let s = t.load_slot(i);
            let data = t.buf(s.buf_idx).unwrap()[..s.len as usize].to_vec();
            let mut d = r.load_slot(i);
            r.buf_mut(d.buf_idx).unwrap()[..data.len()].copy_from_slice(&data);
            d.len = s.len;
            d.flags = s.flags;
            r.store_slot(i, d);
        }
        // Publish all but the last fragment of the last frame: it must wait.
        r.store_tail(used - 1);
        let mut out = [0u8; 1024];
        for f in &frames[..frames.len() - 1] {
            let len = r.recv(&mut out).unwrap();
            assert_eq!(&out[..len], &f[..]);
        }
        assert_eq!(r.recv(&mut out), None);
        r.store_tail(used);
        let len = r.recv(&mut out).unwrap();
        assert_eq!(&out[..len], &frames[5][..]);
        assert_eq!(r.recv(&mut out), None);
        assert_eq!(r.head(), used);
        assert_eq!(r.stats(), RingStats::default());
    }

    #[test]
    fn recv_skips_bad_frames() {
        let n = 8;
        let mut f = fake_ring(n, 64, n);
        let r = &mut f.ring;
        r.advance(0);
        r.store_slot(
            0,
            Slot {
                buf_idx: 100,
                len: 10,
                flags: 0,
            },
        ); // bad buffer
        r.store_slot(
            1,
            Slot {
                buf_idx: 1,
                len: 65,
                flags: 0,
            },
        ); // bad length
        r.store_slot(
            2,
            Slot {
                buf_idx: 2,
                len: 40,
                flags: NS_MOREFRAG,
            },
        ); // too big for out
        r.store_slot(
            3,
            Slot {
                buf_idx: 3,
                len: 40,
                flags: 0,
            },
        );
        r.store_slot(
            4,
            Slot {
                buf_idx: 4,
                len: 3,
                flags: 0,
            },
        ); // good
        r.buf_mut(4).unwrap()[..3].copy_from_slice(b"abc");
        r.store_tail(5);
        let mut out = [0u8; 50];
        assert_eq!(r.recv(&mut out), Some(3));
        assert_eq!(&out[..3], b"abc");
        let st = r.stats();
        assert_eq!((st.bad_buf_idx, st.bad_len, st.rx_dropped), (1, 1, 3));
        // Header corrupted by a peer: no panic, no frame.
        r.store_tail(1000);
        assert_eq!(r.recv(&mut out), None);
        r.advance(77);
        assert_eq!(r.recv(&mut out), None);
        assert!(!r.send(b"x"));
    }

    #[test]
    fn long_chain_is_dropped() {
        let n = 128;
        let mut f = fake_ring(n, 64, n);
        let r = &mut f.ring;
        r.advance(0);
        for i in 0..100 {
            r.store_slot(
                i,
                Slot {
                    buf_idx: i,
                    len: 1,
                    flags: NS_MOREFRAG,
                },
            );
        }
        r.store_slot(
            100,
            Slot {
                buf_idx: 100,
                len: 1,
                flags: 0,
            },
        );
        r.store_slot(
            101,
            Slot {
                buf_idx: 101,
                len: 2,
                flags: 0,
            },
        );
        r.store_tail(102);
        let mut out = [0u8; 8192];
        // 64 fragments dropped as too long, then the rest of the chain (37
        // slots) arrives as one frame, then the good frame.
        assert_eq!(r.recv(&mut out), Some(37));
        assert_eq!(r.recv(&mut out), Some(2));
        assert_eq!(r.stats().bad_frame, 1);
    }

    #[test]
    fn send_repairs_bad_slot() {
        let n = 8;
        let mut f = fake_ring(n, 64, n);
        let r = &mut f.ring;
        r.advance(0);
        r.store_tail(n - 1);
        r.store_slot(
            0,
            Slot {
                buf_idx: 1000,
                len: 0,
                flags: 0,
            },
        );
        assert!(r.send(b"hello"));
        // Slot 0 was handed back empty, the frame went to slot 1.
        assert_eq!(r.load_slot(0).len, 0);
        assert_eq!(r.frag(1).unwrap().0, b"hello");
        assert_eq!(r.head(), 2);
        assert_eq!(r.stats().bad_buf_idx, 1);
    }

    /// Property tests of the ring index arithmetic against a model in
    /// plain modular arithmetic, for every ring size the ABI allows.
    mod props {
        use super::super::{next, prev, within};
        use proptest::prelude::*;

        /// Distance from `a` forward to `b` on a ring of `n`.
        fn dist(a: u32, b: u32, n: u32) -> u64 {
            (u64::from(b) + u64::from(n) - u64::from(a)) % u64::from(n)
        }

        fn ring() -> impl Strategy<Value = (u32, u32, u32, u32)> {
            (1u32..=65536).prop_flat_map(|n| (Just(n), 0..n, 0..n, 0..n))
        }

        proptest! {
            #[test]
            fn next_and_prev_step_one_slot_and_undo_each_other((n, i, _, _) in ring()) {
                prop_assert_eq!(u64::from(next(i, n)), (u64::from(i) + 1) % u64::from(n));
                prop_assert_eq!(prev(next(i, n), n), i);
                prop_assert_eq!(next(prev(i, n), n), i);
                prop_assert!(next(i, n) < n && prev(i, n) < n);
            }

            #[test]
            fn within_is_the_forward_interval((n, a, x, b) in ring()) {
                prop_assert_eq!(within(a, x, b, n), dist(a, x, n) <= dist(a, b, n));
                // Both ends are inside; an empty interval holds only `a`.
                prop_assert!(within(a, a, b, n) && within(a, b, b, n));
                prop_assert_eq!(within(a, x, a, n), x == a);
            }

            #[test]
            fn within_refuses_positions_off_the_ring(
                (n, a, _, b) in ring(),
                off in 0u32..=u32::MAX,
            ) {
                let x = n.saturating_add(off);
                prop_assert!(x < n || !within(a, x, b, n));
            }

            #[test]
            fn walking_k_slots_stays_within_exactly_k_steps((n, a, _, b) in ring(), k in 0u32..70000) {
                let mut i = a;
                for _ in 0..k % n {
                    i = next(i, n);
                }
                prop_assert_eq!(u64::from(i), (u64::from(a) + u64::from(k % n)) % u64::from(n));
                prop_assert_eq!(within(a, i, b, n), u64::from(k % n) <= dist(a, b, n));
            }
        }
    }
}
