//! The userspace netmap transport: pipes `shm:NAME{ID` (end A) and
//! `shm:NAME}ID` (end B) in shared memory, with no kernel module.
//!
//! # Region layout
//!
//! One sealed memfd holds, in netmap's own layout (offsets from the region
//! start; every object 128-byte aligned, the buffer pool page aligned):
//!
//! ```text
//! 0          RegionHeader   magic "NMVMSHM1", version, geometry, offsets (below)
//! ctrl_ofs   control block  10 lines of 128 bytes (see "Control block")
//! if_ofs[0]  netmap_if A    ni_tx_rings = ni_rx_rings = 1, no host rings,
//!                           ring_ofs[] = {A.tx, A.rx} relative to this netmap_if
//! if_ofs[1]  netmap_if B    ring_ofs[] = {B.tx, B.rx}
//! ring_ofs[] netmap_ring    A.tx, A.rx, B.tx, B.rx: 256-byte header + num_slots slots;
//!                           buf_ofs points at the pool
//! pool       buffers        num_bufs = 2 (reserved 0, 1) + 4 * num_slots (one per
//!                           slot) + 2 * spare_bufs (repair stock, per end)
//! ```
//!
//! Defaults: 1024 slots per ring, 2048-byte buffers, 64 spare buffers per end
//! (all set by the creator; see `PortOptions`). The creator seals the memfd
//! against shrinking and growing, so a mapping can never fault; the attacher
//! checks the seal, checks the header's magic, version and geometry, and then
//! *recomputes every offset itself* from three numbers (slots, buffer size,
//! spares) — a hostile creator cannot make it read outside the mapping.
//!
//! # Control block
//!
//! Direction `d` is 0 for A→B (A.tx feeds B.rx) and 1 for B→A. Each word
//! sits alone on a 128-byte line. "P" is the producer end of the direction
//! (A for d = 0), "C" the consumer.
//!
//! | line | word | written by | read by | meaning |
//! |---|---|---|---|---|
//! | 4d+0 | `tail` | P (txsync) | C (rxsync) | next slot of C.rx that P fills: C.rx's hwtail |
//! | 4d+1 | `head` | C (rxsync) | P (txsync) | how far C has released C.rx: C.rx's hwcur |
//! | 4d+2 | `cons_kick` | C sets, P clears | P | C sleeps until `tail` moves |
//! | 4d+3 | `prod_kick` | P sets, C clears | C | P sleeps until `head` moves |
//! | 8+e | `spares_used` | end e | end e (on re-attach) | spare buffers end e consumed |
//!
//! Each ring header is written only by its own end (`head`/`cur` by that
//! end's user, `tail` by that end's sync), each control word as above. Every
//! value an end reads that the other end wrote is validated: indices against
//! the ring size and the window the protocol allows, buffer indices against
//! the pool, lengths against the buffer size. Violations are counted and
//! ignored (or repaired), never followed.
//!
//! # Sync
//!
//! `txsync` of end P takes the whole frames the user published in
//! `[hwcur, head)` of P.tx and moves them into the free slots of C.rx
//! (`[tail, head - 1)` there) by **swapping `buf_idx`**: the C.rx slot gets
//! the frame's buffer, the P.tx slot gets the free buffer (both flagged
//! `NS_BUF_CHANGED`), so the P.tx slot is immediately reusable and P.tx's
//! `tail` follows `hwcur - 1`. Frames spanning slots (`NS_MOREFRAG`) move
//! only whole, so C never sees part of a frame. Then it publishes the new
//! `tail` (release), and kicks C's eventfd only if `cons_kick` was set.
//! `rxsync` of C validates the user's `head`, publishes it as `head`
//! (release) so P can reuse those slots, kicks P only if `prod_kick` was set,
//! and picks up `tail` (acquire). A sleeper sets its kick word, re-checks the
//! rings (a SeqCst fence on both sides orders flag and index), then sleeps
//! on its eventfd. At saturation nobody sleeps, so a sync makes no system
//! call at all.
//!
//! A bad buffer index in a slot this end must hand to its user (a free slot
//! the peer released, or its own tx slot overwritten) is replaced from the
//! end's spare stock, so traffic keeps flowing once the peer behaves again;
//! with the stock exhausted the direction stalls (the peer only hurts its
//! own reception).
//!
//! # Rendezvous
//!
//! A Unix stream socket `NAME-ID.sock` in the runtime directory
//! (`$NMVM_RUN_DIR`, else `$XDG_RUNTIME_DIR/nmvm`, else `/tmp/nmvm-<uid>`;
//! mode 0700, must be ours). Opening takes an `flock` on the directory, then
//! connects: if nobody listens (no file, or a stale file whose connect is
//! refused, which is removed), this end creates the region and two eventfds
//! and listens; else it sends a hello (`NMVMHELO`, version, end, pid) and
//! receives a reply (`NMVMRPLY`, status) with the memfd and both eventfds
//! (SCM_RIGHTS). A small control thread per port serves the socket: it
//! answers hellos (refusing a second opener of either end with a clear
//! error), and tracks whether the peer is connected (EOF on its connection).
//! When the end that served the socket goes away, the other end takes the
//! socket over, so either end can be restarted. The thread is never on the
//! data path; a thread-free design would deadlock a process that opens both
//! ends from one thread (the attacher waits for an accept nobody runs).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
#[cfg(any(test, feature = "hostile-peer"))]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::abi::{
    NetmapIf, NetmapRing, NetmapSlot, NETMAP_API, NETMAP_IF_RING_OFS_OFFSET, NETMAP_MAX_FRAGS,
    NETMAP_RESERVED_BUFS, NETMAP_RING_SLOTS_OFFSET, NR_RX, NR_TX, NS_BUF_CHANGED, NS_MOREFRAG,
};
use super::name::{PipeEnd, ShmSpec};
use super::ring::{next, prev, within, Ring, RingError, Slot};
use super::sys::{self, FlockGuard, Mapping};
use super::PortOptions;

/// Magic at the start of a region.
pub const REGION_MAGIC: [u8; 8] = *b"NMVMSHM1";
/// Region layout version.
pub const REGION_VERSION: u32 = 1;
/// Smallest ring.
pub const MIN_SLOTS: u32 = 4;
/// Largest ring.
pub const MAX_SLOTS: u32 = 32768;
/// The ring size a pipe gets unless its opener asks for another.
pub const DEFAULT_SLOTS: u32 = 1024;
/// Largest region we create or map.
pub const MAX_REGION: usize = 1 << 32;
/// Largest spare stock per end.
pub const MAX_SPARE: u32 = 65536;

const LINE: usize = 128;
const CTRL_LINES: usize = 10;
const fn tail_line(d: usize) -> usize {
    4 * d
}
const fn head_line(d: usize) -> usize {
    4 * d + 1
}
const fn cons_kick_line(d: usize) -> usize {
    4 * d + 2
}
const fn prod_kick_line(d: usize) -> usize {
    4 * d + 3
}
const fn spare_line(e: usize) -> usize {
    8 + e
}

const HELLO_MAGIC: [u8; 8] = *b"NMVMHELO";
const REPLY_MAGIC: [u8; 8] = *b"NMVMRPLY";
const PROTO_VERSION: u32 = 1;
const MSG_LEN: usize = 24;
const ST_OK: u32 = 0;
const ST_SAME_END: u32 = 1;
const ST_BUSY: u32 = 2;
const ST_BAD_HELLO: u32 = 3;
/// Longest socket path (sun_path is 104 bytes on FreeBSD, 108 on Linux).
const MAX_SOCK_PATH: usize = 100;

/// Errors of the userspace transport.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// A geometry parameter out of range.
    #[error("userspace port: {what} = {value} is out of range (accepted: {range})")]
    BadGeometry {
        /// Parameter.
        what: &'static str,
        /// Value.
        value: u64,
        /// Accepted values.
        range: &'static str,
    },
    /// The runtime directory cannot be used.
    #[error("runtime directory {path}: {err}")]
    RunDir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        err: io::Error,
    },
    /// The runtime directory belongs to someone else.
    #[error(
        "runtime directory {path} belongs to uid {owner}, not to us (uid {uid}); set NMVM_RUN_DIR"
    )]
    RunDirOwner {
        /// Directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our uid.
        uid: u32,
    },
    /// The socket path does not fit a sockaddr_un.
    #[error(
        "socket path {path} is {len} bytes, more than {MAX_SOCK_PATH}; use a shorter NMVM_RUN_DIR"
    )]
    PathTooLong {
        /// Path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// This end is already open.
    #[error("{name} is already open (process {pid}); each end of a userspace pipe can be open only once")]
    EndInUse {
        /// Port name.
        name: String,
        /// Process holding it.
        pid: u32,
    },
    /// A system call failed while setting up the port.
    #[error("{name}: {what}: {err}")]
    Io {
        /// Port name.
        name: String,
        /// What we were doing.
        what: &'static str,
        /// Cause.
        err: io::Error,
    },
    /// The serving process broke the handshake protocol or did not answer.
    #[error("{name}: handshake with the process serving {path} failed: {what}")]
    Handshake {
        /// Port name.
        name: String,
        /// Socket.
        path: PathBuf,
        /// What went wrong.
        what: String,
    },
    /// The serving process closed the connection during the handshake.
    #[error("{name}: the process serving {path} closed the connection")]
    PeerClosed {
        /// Port name.
        name: String,
        /// Socket.
        path: PathBuf,
    },
    /// The offered region is not acceptable.
    #[error("{name}: the shared memory offered by the peer is invalid: {what}")]
    BadRegion {
        /// Port name.
        name: String,
        /// What is wrong.
        what: String,
    },
    /// The region's virtio-net header length differs from the one asked for.
    #[error("{name}: the pipe was created with a {found}-byte virtio-net header, {wanted} was asked for")]
    VnetHdrMismatch {
        /// Port name.
        name: String,
        /// In the region.
        found: u32,
        /// Asked for.
        wanted: u32,
    },
    /// A ring view could not be built.
    #[error("{name}: {err}")]
    Ring {
        /// Port name.
        name: String,
        /// Cause.
        err: RingError,
    },
}

/// The region header (first bytes of the memfd).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RegionHeader {
    magic: [u8; 8],
    version: u32,
    header_size: u32,
    region_size: u64,
    num_slots: u32,
    buf_size: u32,
    num_bufs: u32,
    spare_bufs: u32,
    vnet_hdr_len: u32,
    creator_end: u32,
    ctrl_ofs: u64,
    if_ofs: [u64; 2],
    ring_ofs: [u64; 4],
    buf_pool_ofs: u64,
    pipe_name: [u8; 64],
}

/// Where everything is in a region, computed from three parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub num_slots: u32,
    pub buf_size: u32,
    pub spare_bufs: u32,
    pub num_bufs: u32,
    pub ctrl_ofs: usize,
    pub if_ofs: [usize; 2],
    /// A.tx, A.rx, B.tx, B.rx.
    pub ring_ofs: [usize; 4],
    pub buf_pool_ofs: usize,
    pub region_size: usize,
}

impl Layout {
    pub(crate) fn new(num_slots: u32, buf_size: u32, spare_bufs: u32) -> Result<Layout, ShmError> {
        if !(MIN_SLOTS..=MAX_SLOTS).contains(&num_slots) {
            return Err(ShmError::BadGeometry {
                what: "slots per ring",
                value: num_slots.into(),
                range: "4..=32768",
            });
        }
        if !(64..=65472).contains(&buf_size) || buf_size % 64 != 0 {
            return Err(ShmError::BadGeometry {
                what: "buffer size",
                value: buf_size.into(),
                range: "64..=65472, a multiple of 64",
            });
        }
        if spare_bufs > MAX_SPARE {
            return Err(ShmError::BadGeometry {
                what: "spare buffers",
                value: spare_bufs.into(),
                range: "0..=65536",
            });
        }
        let n = num_slots as usize;
        let num_bufs = NETMAP_RESERVED_BUFS as usize + 4 * n + 2 * spare_bufs as usize;
        let align = |x: usize, a: usize| x.next_multiple_of(a);
        let mut ofs = align(std::mem::size_of::<RegionHeader>(), LINE);
        let ctrl_ofs = ofs;
        ofs += CTRL_LINES * LINE;
        let if_size = align(NETMAP_IF_RING_OFS_OFFSET + 2 * 8, LINE);
        let if_ofs = [ofs, ofs + if_size];
        ofs += 2 * if_size;
        let ring_size = align(NETMAP_RING_SLOTS_OFFSET + 16 * n, LINE);
        let ring_ofs = [
            ofs,
            ofs + ring_size,
            ofs + 2 * ring_size,
            ofs + 3 * ring_size,
        ];
        ofs += 4 * ring_size;
        let buf_pool_ofs = align(ofs, 4096);
        let region_size = align(buf_pool_ofs + num_bufs * buf_size as usize, 4096);
        if region_size > MAX_REGION {
            return Err(ShmError::BadGeometry {
                what: "region size",
                value: region_size as u64,
                range: "up to 4 GiB",
            });
        }
        Ok(Layout {
            num_slots,
            buf_size,
            spare_bufs,
            num_bufs: num_bufs as u32,
            ctrl_ofs,
            if_ofs,
            ring_ofs,
            buf_pool_ofs,
            region_size,
        })
    }

    /// First spare buffer of end `e`.
    fn spare_base(&self, e: usize) -> u32 {
        NETMAP_RESERVED_BUFS + 4 * self.num_slots + e as u32 * self.spare_bufs
    }
}

/// Writes a fresh region: header, both netmap_ifs, four rings, slots.
fn init_region(map: &Mapping, l: &Layout, spec: &ShmSpec, vnet_hdr_len: u32) {
    assert!(map.len() >= l.region_size);
    let base = map.ptr().as_ptr();
    let mut pipe_name = [0u8; 64];
    let pn = spec.port_name();
    let k = pn.len().min(63);
    pipe_name[..k].copy_from_slice(&pn.as_bytes()[..k]);
    let hdr = RegionHeader {
        magic: REGION_MAGIC,
        version: REGION_VERSION,
        header_size: std::mem::size_of::<RegionHeader>() as u32,
        region_size: l.region_size as u64,
        num_slots: l.num_slots,
        buf_size: l.buf_size,
        num_bufs: l.num_bufs,
        spare_bufs: l.spare_bufs,
        vnet_hdr_len,
        creator_end: spec.end.index() as u32,
        ctrl_ofs: l.ctrl_ofs as u64,
        if_ofs: l.if_ofs.map(|x| x as u64),
        ring_ofs: l.ring_ofs.map(|x| x as u64),
        buf_pool_ofs: l.buf_pool_ofs as u64,
        pipe_name,
    };
    let n = l.num_slots;
    // SAFETY: the memfd is brand new and not yet shared, so nothing else
    // accesses the mapping; `l` was computed for a region of `region_size`
    // bytes and the mapping is at least that long (asserted above); every
    // object is written at an offset that is a multiple of its alignment
    // (0, multiples of 128 for netmap_if/netmap_ring, +256 and 16-byte steps
    // for slots, +56 for the i64 ring_ofs array).
    unsafe {
        base.cast::<RegionHeader>().write(hdr);
        for e in 0..2 {
            let mut ni_name = [0u8; 16];
            let k = pn.len().min(15);
            ni_name[..k].copy_from_slice(&pn.as_bytes()[..k]);
            if e != spec.end.index() && k > 0 {
                // Name the other end by its own separator.
                if let Some(p) = ni_name[..k].iter().position(|&c| c == b'{' || c == b'}') {
                    ni_name[p] = spec.end.peer().separator() as u8;
                }
            }
            let nifp = base.add(l.if_ofs[e]);
            nifp.cast::<NetmapIf>().write(NetmapIf {
                ni_name,
                ni_version: u32::from(NETMAP_API),
                ni_flags: 0,
                ni_tx_rings: 1,
                ni_rx_rings: 1,
                ni_bufs_head: 0,
                ni_host_tx_rings: 0,
                ni_host_rx_rings: 0,
                ni_spare1: [0; 3],
            });
            let ofs = nifp.add(NETMAP_IF_RING_OFS_OFFSET).cast::<i64>();
            ofs.write((l.ring_ofs[2 * e] - l.if_ofs[e]) as i64);
            ofs.add(1)
                .write((l.ring_ofs[2 * e + 1] - l.if_ofs[e]) as i64);
        }
        for r in 0..4 {
            let tx = r % 2 == 0;
            let ring = base.add(l.ring_ofs[r]);
            ring.cast::<NetmapRing>().write(NetmapRing {
                buf_ofs: l.buf_pool_ofs as i64 - l.ring_ofs[r] as i64,
                num_slots: n,
                nr_buf_size: l.buf_size,
                ringid: 0,
                dir: if tx { NR_TX } else { NR_RX },
                head: 0,
                cur: 0,
                tail: if tx { n - 1 } else { 0 },
                ..NetmapRing::default()
            });
            let slots = ring.add(NETMAP_RING_SLOTS_OFFSET).cast::<NetmapSlot>();
            for s in 0..n {
                slots.add(s as usize).write(NetmapSlot {
                    buf_idx: NETMAP_RESERVED_BUFS + r as u32 * n + s,
                    len: 0,
                    flags: 0,
                    ptr: 0,
                });
            }
        }
    }
}

/// Checks a region offered by a peer; returns its layout and header length.
fn validate_region(map: &Mapping) -> Result<(Layout, u32), String> {
    // SAFETY: `map` is a live mapping of `map.len()` bytes, page aligned,
    // borrowed for the whole call.
    unsafe { validate_region_at(map.ptr(), map.len()) }
}

/// [`validate_region`] on `len` bytes at `base`.
///
/// # Safety
///
/// `base` must be 8-byte aligned and `len` bytes from it must stay mapped
/// and readable during the call.
unsafe fn validate_region_at(base: NonNull<u8>, len: usize) -> Result<(Layout, u32), String> {
    if len < std::mem::size_of::<RegionHeader>() {
        return Err(format!("{len} bytes is smaller than the header"));
    }
    // SAFETY: the header lies inside the mapping (checked above, and the
    // caller guarantees the mapping) at its aligned start; it consists of
    // integers only, so any bytes are a valid value. It is read once: only
    // this copy is used from now on.
    let h = unsafe { base.as_ptr().cast::<RegionHeader>().read_volatile() };
    if h.magic != REGION_MAGIC {
        return Err("bad magic (not an nmvm userspace netmap region)".into());
    }
    if h.version != REGION_VERSION {
        return Err(format!(
            "layout version {} (we speak {REGION_VERSION})",
            h.version
        ));
    }
    if h.header_size as usize != std::mem::size_of::<RegionHeader>() {
        return Err(format!("header size {}", h.header_size));
    }
    let l = Layout::new(h.num_slots, h.buf_size, h.spare_bufs).map_err(|e| e.to_string())?;
    let same = h.num_bufs == l.num_bufs
        && h.region_size == l.region_size as u64
        && h.ctrl_ofs == l.ctrl_ofs as u64
        && h.if_ofs == l.if_ofs.map(|x| x as u64)
        && h.ring_ofs == l.ring_ofs.map(|x| x as u64)
        && h.buf_pool_ofs == l.buf_pool_ofs as u64;
    if !same {
        return Err("offsets or sizes differ from the layout of its geometry".into());
    }
    if l.region_size > len {
        return Err(format!(
            "needs {} bytes, the memfd has {len}",
            l.region_size
        ));
    }
    if !matches!(h.vnet_hdr_len, 0 | 10 | 12) {
        return Err(format!("virtio-net header length {}", h.vnet_hdr_len));
    }
    Ok((l, h.vnet_hdr_len))
}

/// Counters of one userspace port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ShmStats {
    pub bad_index: u64,
    pub bad_buf_idx: u64,
    pub bad_len: u64,
    pub bad_frame: u64,
    pub tx_dropped: u64,
    pub repaired: u64,
    pub stalls: u64,
    pub kicks_sent: u64,
    pub wakeups: u64,
    pub txsyncs: u64,
    pub rxsyncs: u64,
}

#[cold]
#[inline(never)]
fn note(counter: &mut u64, name: &str, what: &str) {
    *counter += 1;
    if counter.is_power_of_two() {
        log::debug!("netmap {name}: {what} (seen {counter} times)");
    }
}

/// Outcome of moving one multi-slot frame.
enum Chain {
    /// Moved; new positions in our tx ring and the peer's rx ring.
    Moved { i: u32, j: u32, slots: u32 },
    /// Dropped (bad slots); new position in our tx ring.
    Dropped { i: u32 },
    /// Not now (incomplete, no room, or stalled).
    Wait,
}

/// One end of a userspace pipe. See the module docs.
pub(crate) struct ShmPort {
    name: String,
    end: PipeEnd,
    layout: Layout,
    vnet_hdr_len: u32,
    my_tx: Ring,
    my_rx: Ring,
    peer_rx: Ring,
    ctrl: NonNull<u8>,
    // Private sync state (authoritative; shared copies are only hints).
    tx_hwcur: u32,
    tx_hwtail: u32,
    /// Next slot of the peer's rx ring we fill (published as `tail`).
    fill: u32,
    /// How far the peer has released its rx ring (validated `head`).
    released: u32,
    rx_hwcur: u32,
    rx_hwtail: u32,
    spares_used: u32,
    /// Kick moderation (see [`ShmPort::set_kick_batch`]): a peer that asked
    /// for a kick gets it once this many slots were moved (tx) or returned
    /// (rx) for it, or when we are about to sleep.
    kick_batch: u32,
    /// Slots moved to the peer / returned to it since its last kick.
    owed_tx: u32,
    owed_rx: u32,
    my_efd: OwnedFd,
    peer_efd: OwnedFd,
    pub(crate) stats: ShmStats,
    control: Control,
    /// Last: unmapped after everything that points into it.
    map: Mapping,
}

// SAFETY: the raw pointers (`ctrl`, and those inside the rings) point into
// `map`, which this value owns; they have no thread affinity. The port is
// used by one thread at a time (`&mut self` on every operation).
unsafe impl Send for ShmPort {}

impl std::fmt::Debug for ShmPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmPort")
            .field("name", &self.name)
            .field("layout", &self.layout)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl ShmPort {
    /// Opens (creating or attaching) one end of a userspace pipe.
    pub(crate) fn open(spec: &ShmSpec, opts: &PortOptions) -> Result<ShmPort, ShmError> {
        let name = spec.port_name();
        let dir = run_dir(opts.run_dir.as_deref());
        ensure_run_dir(&dir)?;
        let sock = dir.join(format!("{}-{}.sock", spec.name, spec.id));
        let len = sock.as_os_str().len();
        if len > MAX_SOCK_PATH {
            return Err(ShmError::PathTooLong { path: sock, len });
        }
        let mut tries = 0;
        loop {
            tries += 1;
            let lock =
                FlockGuard::lock(&dir, opts.attach_timeout).map_err(|err| ShmError::RunDir {
                    path: dir.clone(),
                    err,
                })?;
            match UnixStream::connect(&sock) {
                Ok(stream) => {
                    drop(lock);
                    match attach(spec, opts, &dir, &sock, stream) {
                        Err(ShmError::PeerClosed { .. }) if tries < 5 => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                        other => return other,
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                    ) =>
                {
                    if e.kind() == io::ErrorKind::ConnectionRefused {
                        log::info!("netmap {name}: removing stale socket {}", sock.display());
                        let _ = std::fs::remove_file(&sock);
                    }
                    let port = create(spec, opts, &dir, &sock)?;
                    drop(lock);
                    return Ok(port);
                }
                Err(err) => {
                    return Err(ShmError::Io {
                        name,
                        what: "cannot connect to the pipe's socket",
                        err,
                    })
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        spec: &ShmSpec,
        layout: Layout,
        vnet_hdr_len: u32,
        map: Mapping,
        memfd: OwnedFd,
        efds: [OwnedFd; 2],
        mode: ControlMode,
        opts: &PortOptions,
        dir: &Path,
        sock: &Path,
    ) -> Result<ShmPort, ShmError> {
        let name = spec.port_name();
        let e = spec.end.index();
        let l = layout;
        let ring = |r: usize| {
            // SAFETY: `map` is moved into the port together with the rings
            // and dropped after them; slots and ring headers are accessed only
            // atomically by this process, and by the peer process.
            unsafe {
                Ring::from_parts(
                    map.ptr(),
                    map.len(),
                    l.ring_ofs[r],
                    l.num_slots,
                    l.buf_pool_ofs,
                    l.buf_size,
                    l.num_bufs,
                )
            }
            .map_err(|err| ShmError::Ring {
                name: name.clone(),
                err,
            })
        };
        let my_tx = ring(2 * e)?;
        let my_rx = ring(2 * e + 1)?;
        let peer_rx = ring(2 * (1 - e) + 1)?;
        assert!(l.ctrl_ofs + CTRL_LINES * LINE <= map.len());
        // SAFETY: the control block lies inside the mapping (asserted).
        let ctrl = unsafe { map.ptr().add(l.ctrl_ofs) };
        let [efd_a, efd_b] = efds;
        let (my_efd, peer_efd) = if e == 0 {
            (efd_a, efd_b)
        } else {
            (efd_b, efd_a)
        };
        let control = Control::start(
            ControlTask {
                end: spec.end,
                name: name.clone(),
                dir: dir.to_path_buf(),
                sock: sock.to_path_buf(),
                sock_id: None,
                memfd,
                efds: if e == 0 {
                    [dup(&my_efd, &name)?, dup(&peer_efd, &name)?]
                } else {
                    [dup(&peer_efd, &name)?, dup(&my_efd, &name)?]
                },
                listener: None,
                conn: None,
                stop: sys::eventfd().map_err(|err| ShmError::Io {
                    name: name.clone(),
                    what: "eventfd",
                    err,
                })?,
                shared: Arc::new(ControlShared::default()),
                timeout: opts.attach_timeout,
            },
            mode,
        )
        .map_err(|err| ShmError::Io {
            name: name.clone(),
            what: "cannot start the control thread",
            err,
        })?;
        let mut port = ShmPort {
            name,
            end: spec.end,
            layout,
            vnet_hdr_len,
            my_tx,
            my_rx,
            peer_rx,
            ctrl,
            tx_hwcur: 0,
            tx_hwtail: 0,
            fill: 0,
            released: 0,
            rx_hwcur: 0,
            rx_hwtail: 0,
            spares_used: 0,
            kick_batch: 1,
            owed_tx: 0,
            owed_rx: 0,
            my_efd,
            peer_efd,
            stats: ShmStats::default(),
            control,
            map,
        };
        port.derive_state();
        Ok(port)
    }

    /// Sets the private state from the shared one (fresh region, or an end
    /// re-attaching after its previous process went away). Our tx ring is
    /// reset (unsent frames of a previous process are dropped); frames
    /// already delivered to our rx ring are kept.
    fn derive_state(&mut self) {
        let n = self.layout.num_slots;
        let out = self.end.index();
        let inn = 1 - out;
        let valid = |v: u32| (v < n).then_some(v);
        self.fill = valid(self.word(tail_line(out)).load(Ordering::Acquire)).unwrap_or(0);
        self.released =
            valid(self.word(head_line(out)).load(Ordering::Acquire)).unwrap_or(self.fill);
        self.rx_hwcur = valid(self.word(head_line(inn)).load(Ordering::Acquire))
            .or_else(|| valid(self.word(tail_line(inn)).load(Ordering::Acquire)))
            .unwrap_or(0);
        self.rx_hwtail = self.rx_hwcur;
        self.tx_hwcur = 0;
        self.tx_hwtail = n - 1;
        self.my_tx.advance(0);
        self.my_tx.store_tail(n - 1);
        self.my_rx.advance(self.rx_hwcur);
        self.my_rx.store_tail(self.rx_hwcur);
        self.word(head_line(inn))
            .store(self.rx_hwcur, Ordering::Release);
        self.word(cons_kick_line(inn)).store(0, Ordering::Relaxed);
        self.word(prod_kick_line(out)).store(0, Ordering::Relaxed);
        self.spares_used = self
            .word(spare_line(out))
            .load(Ordering::Relaxed)
            .min(self.layout.spare_bufs);
    }

    #[inline]
    fn word(&self, line: usize) -> &AtomicU32 {
        debug_assert!(line < CTRL_LINES);
        // SAFETY: the control block (CTRL_LINES lines of 128 bytes) is inside
        // the mapping (checked in `new`) and 128-aligned; its words are only
        // accessed atomically here, and by the peer process.
        unsafe { AtomicU32::from_ptr(self.ctrl.as_ptr().add(line * LINE).cast()) }
    }

    /// Our user-facing rings (tx, rx): new views on the same memory.
    ///
    /// # Safety
    ///
    /// The returned rings must not outlive `self`.
    pub(crate) unsafe fn user_rings(&self) -> Result<(Ring, Ring), RingError> {
        let l = &self.layout;
        let e = self.end.index();
        let mk = |r: usize| {
            // SAFETY: the caller keeps the rings no longer than `self`, which
            // owns the mapping; the geometry is the validated layout.
            unsafe {
                Ring::from_parts(
                    self.map.ptr(),
                    self.map.len(),
                    l.ring_ofs[r],
                    l.num_slots,
                    l.buf_pool_ofs,
                    l.buf_size,
                    l.num_bufs,
                )
            }
        };
        Ok((mk(2 * e)?, mk(2 * e + 1)?))
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn vnet_hdr_len(&self) -> u32 {
        self.vnet_hdr_len
    }

    pub(crate) fn poll_fd(&self) -> RawFd {
        self.my_efd.as_raw_fd()
    }

    pub(crate) fn peer_connected(&self) -> bool {
        self.control.shared.peer_connected.load(Ordering::Acquire)
    }

    pub(crate) fn region(&self) -> (NonNull<u8>, usize) {
        (self.map.ptr(), self.layout.region_size)
    }

    pub(crate) fn nifp_offset(&self) -> usize {
        self.layout.if_ofs[self.end.index()]
    }

    #[cfg(test)]
    pub(crate) fn layout(&self) -> Layout {
        self.layout
    }

    fn take_spare(&mut self) -> Option<u32> {
        if self.spares_used >= self.layout.spare_bufs {
            return None;
        }
        let b = self.layout.spare_base(self.end.index()) + self.spares_used;
        self.spares_used += 1;
        self.word(spare_line(self.end.index()))
            .store(self.spares_used, Ordering::Relaxed);
        self.stats.repaired += 1;
        Some(b)
    }

    /// A frame in our tx ring had a bad slot: drop it, repair its buffers.
    #[cold]
    #[inline(never)]
    fn drop_tx_slots(&mut self, mut i: u32, end: u32) {
        let n = self.layout.num_slots;
        while i != end {
            let mut s = self.my_tx.load_slot(i);
            if s.buf_idx >= self.layout.num_bufs {
                note(
                    &mut self.stats.bad_buf_idx,
                    &self.name,
                    "bad buffer index in our tx ring",
                );
                if let Some(b) = self.take_spare() {
                    s.buf_idx = b;
                    s.len = 0;
                }
            }
            if u32::from(s.len) > self.layout.buf_size {
                note(
                    &mut self.stats.bad_len,
                    &self.name,
                    "length larger than the buffer in our tx ring",
                );
                s.len = 0;
            }
            s.flags = NS_BUF_CHANGED;
            self.my_tx.store_slot(i, s);
            i = next(i, n);
        }
        self.stats.tx_dropped += 1;
    }

    /// A free slot the peer released has a bad buffer index: put a spare
    /// buffer there, or report that we cannot (the direction stalls).
    #[cold]
    #[inline(never)]
    fn repair_peer_slot(&mut self, j: u32) -> Option<u32> {
        note(
            &mut self.stats.bad_buf_idx,
            &self.name,
            "peer released a slot with a bad buffer index",
        );
        match self.take_spare() {
            Some(b) => {
                self.peer_rx.store_slot(
                    j,
                    Slot {
                        buf_idx: b,
                        len: 0,
                        flags: 0,
                    },
                );
                Some(b)
            }
            None => {
                note(
                    &mut self.stats.stalls,
                    &self.name,
                    "no spare buffer left: direction stalled",
                );
                None
            }
        }
    }

    /// Moves one frame that spans several slots, starting at `start`.
    #[inline(never)]
    fn move_chain(&mut self, start: u32, head: u32, j0: u32, free: u32) -> Chain {
        let n = self.layout.num_slots;
        let mut src = [Slot::default(); NETMAP_MAX_FRAGS];
        let mut k = 0usize;
        let mut i = start;
        let complete = loop {
            let s = self.my_tx.load_slot(i);
            if k < NETMAP_MAX_FRAGS {
                src[k] = s;
            }
            k += 1;
            i = next(i, n);
            if s.flags & NS_MOREFRAG == 0 {
                break true;
            }
            if i == head {
                break false;
            }
        };
        if !complete {
            return Chain::Wait;
        }
        if k > NETMAP_MAX_FRAGS || k as u32 > n - 1 {
            note(
                &mut self.stats.bad_frame,
                &self.name,
                "frame with too many fragments",
            );
            self.drop_tx_slots(start, i);
            return Chain::Dropped { i };
        }
        let frags = &src[..k];
        let bad = frags
            .iter()
            .any(|s| s.buf_idx >= self.layout.num_bufs || u32::from(s.len) > self.layout.buf_size);
        if bad {
            self.drop_tx_slots(start, i);
            return Chain::Dropped { i };
        }
        if k as u32 > free {
            return Chain::Wait;
        }
        let mut dst = [0u32; NETMAP_MAX_FRAGS];
        let mut j = j0;
        for d in dst.iter_mut().take(k) {
            let b = self.peer_rx.load_slot(j).buf_idx;
            *d = if b < self.layout.num_bufs {
                b
            } else {
                match self.repair_peer_slot(j) {
                    Some(b) => b,
                    None => return Chain::Wait,
                }
            };
            j = next(j, n);
        }
        let (mut ii, mut jj) = (start, j0);
        for (f, (s, &d)) in src.iter().zip(dst.iter()).take(k).enumerate() {
            let more = if f + 1 < k { NS_MOREFRAG } else { 0 };
            self.peer_rx.store_slot(
                jj,
                Slot {
                    buf_idx: s.buf_idx,
                    len: s.len,
                    flags: NS_BUF_CHANGED | more,
                },
            );
            self.my_tx.store_slot(
                ii,
                Slot {
                    buf_idx: d,
                    len: s.len,
                    flags: NS_BUF_CHANGED,
                },
            );
            ii = next(ii, n);
            jj = next(jj, n);
        }
        Chain::Moved {
            i,
            j: jj,
            slots: k as u32,
        }
    }

    /// Moves what our user published to the peer's rx ring (see module docs).
    pub(crate) fn txsync(&mut self) {
        self.stats.txsyncs += 1;
        let n = self.layout.num_slots;
        let nbufs = self.layout.num_bufs;
        let bsz = self.layout.buf_size;
        let out = self.end.index();

        let mut head = self.my_tx.head();
        if !within(self.tx_hwcur, head, self.tx_hwtail, n) {
            note(
                &mut self.stats.bad_index,
                &self.name,
                "tx head outside [hwcur, tail]: ring reset",
            );
            head = self.tx_hwcur;
            self.my_tx.advance(head);
        } else if !within(head, self.my_tx.cur(), self.tx_hwtail, n) {
            note(
                &mut self.stats.bad_index,
                &self.name,
                "tx cur outside [head, tail]",
            );
            self.my_tx.set_cur(head);
        }
        if self.my_tx.tail() != self.tx_hwtail {
            note(&mut self.stats.bad_index, &self.name, "tx tail overwritten");
            self.my_tx.store_tail(self.tx_hwtail);
        }

        let rel = self.word(head_line(out)).load(Ordering::Acquire);
        if rel != self.released {
            if within(self.released, rel, self.fill, n) {
                self.released = rel;
            } else {
                note(
                    &mut self.stats.bad_index,
                    &self.name,
                    "peer rx head outside [released, filled]",
                );
            }
        }
        // Free slots of the peer's rx ring: [fill, released - 1).
        let last = prev(self.released, n);
        let mut free = if last >= self.fill {
            last - self.fill
        } else {
            last + n - self.fill
        };

        let mut i = self.tx_hwcur;
        let mut j = self.fill;
        while i != head {
            let s = self.my_tx.load_slot(i);
            if s.flags & NS_MOREFRAG == 0 {
                // One-slot frame: the fast path.
                if s.buf_idx >= nbufs || u32::from(s.len) > bsz {
                    let ni = next(i, n);
                    self.drop_tx_slots(i, ni);
                    i = ni;
                    continue;
                }
                if free == 0 {
                    break;
                }
                let mut d = self.peer_rx.load_slot(j).buf_idx;
                if d >= nbufs {
                    match self.repair_peer_slot(j) {
                        Some(b) => d = b,
                        None => break,
                    }
                }
                self.peer_rx.store_slot(
                    j,
                    Slot {
                        buf_idx: s.buf_idx,
                        len: s.len,
                        flags: NS_BUF_CHANGED,
                    },
                );
                self.my_tx.store_slot(
                    i,
                    Slot {
                        buf_idx: d,
                        len: s.len,
                        flags: NS_BUF_CHANGED,
                    },
                );
                i = next(i, n);
                j = next(j, n);
                free -= 1;
                continue;
            }
            match self.move_chain(i, head, j, free) {
                Chain::Moved {
                    i: ni,
                    j: nj,
                    slots,
                } => {
                    i = ni;
                    j = nj;
                    free -= slots;
                }
                Chain::Dropped { i: ni } => i = ni,
                Chain::Wait => break,
            }
        }

        if i != self.tx_hwcur {
            self.tx_hwcur = i;
            self.tx_hwtail = prev(i, n);
            self.my_tx.store_tail(self.tx_hwtail);
        }
        if j != self.fill {
            self.owed_tx += (j + n - self.fill) % n;
            self.fill = j;
            self.word(tail_line(out)).store(j, Ordering::Release);
            fence(Ordering::SeqCst);
            self.kick_consumer(self.kick_batch);
        }
    }

    /// Kicks the peer if it waits for frames and is owed at least `min`
    /// slots. A peer that does not wait is owed nothing: it looks at the
    /// ring again after it asks for a kick, and sees what is there.
    fn kick_consumer(&mut self, min: u32) {
        let kick = self.word(cons_kick_line(self.end.index()));
        if kick.load(Ordering::Relaxed) == 0 {
            self.owed_tx = 0;
        } else if self.owed_tx >= min && kick.swap(0, Ordering::AcqRel) != 0 {
            self.owed_tx = 0;
            self.kick_peer();
        }
    }

    /// Kicks the peer if it waits for room and is owed at least `min`
    /// slots (see [`Self::kick_consumer`]).
    fn kick_producer(&mut self, min: u32) {
        let kick = self.word(prod_kick_line(1 - self.end.index()));
        if kick.load(Ordering::Relaxed) == 0 {
            self.owed_rx = 0;
        } else if self.owed_rx >= min && kick.swap(0, Ordering::AcqRel) != 0 {
            self.owed_rx = 0;
            self.kick_peer();
        }
    }

    /// Moderates kicks: a peer waiting for frames or room is woken once
    /// `slots` were moved or returned for it, instead of at every sync; the
    /// rest wait for [`Self::flush_kicks`], which every `prepare_wait*`
    /// does before the caller sleeps. 1 (the default) kicks at every sync.
    /// For a busy sender that shares a core with its peer, waking the peer
    /// for every small batch costs more than the batch.
    pub(crate) fn set_kick_batch(&mut self, slots: u32) {
        self.kick_batch = slots.clamp(1, self.layout.num_slots / 2);
    }

    /// Delivers the kicks that moderation held back.
    pub(crate) fn flush_kicks(&mut self) {
        if self.owed_tx > 0 || self.owed_rx > 0 {
            fence(Ordering::SeqCst);
            self.kick_consumer(1);
            self.kick_producer(1);
        }
    }

    /// Releases what our user consumed and picks up new frames.
    pub(crate) fn rxsync(&mut self) {
        self.stats.rxsyncs += 1;
        let n = self.layout.num_slots;
        let inn = 1 - self.end.index();

        let head = self.my_rx.head();
        let mut released = false;
        if !within(self.rx_hwcur, head, self.rx_hwtail, n) {
            note(
                &mut self.stats.bad_index,
                &self.name,
                "rx head outside [hwcur, tail]: ring reset",
            );
            self.my_rx.advance(self.rx_hwcur);
        } else {
            if !within(head, self.my_rx.cur(), self.rx_hwtail, n) {
                note(
                    &mut self.stats.bad_index,
                    &self.name,
                    "rx cur outside [head, tail]",
                );
                self.my_rx.set_cur(head);
            }
            if head != self.rx_hwcur {
                self.owed_rx += (head + n - self.rx_hwcur) % n;
                self.rx_hwcur = head;
                self.word(head_line(inn)).store(head, Ordering::Release);
                released = true;
            }
        }
        if self.my_rx.tail() != self.rx_hwtail {
            note(&mut self.stats.bad_index, &self.name, "rx tail overwritten");
        }
        let t = self.word(tail_line(inn)).load(Ordering::Acquire);
        if t != self.rx_hwtail {
            if within(self.rx_hwtail, t, prev(self.rx_hwcur, n), n) {
                self.rx_hwtail = t;
            } else {
                note(
                    &mut self.stats.bad_index,
                    &self.name,
                    "peer tail outside [tail, head - 1]",
                );
            }
        }
        self.my_rx.store_tail(self.rx_hwtail);
        if released {
            fence(Ordering::SeqCst);
            self.kick_producer(self.kick_batch);
        }
    }

    #[cold]
    fn kick_peer(&mut self) {
        self.stats.kicks_sent += 1;
        if let Err(e) = sys::eventfd_signal(self.peer_efd.as_fd()) {
            log::debug!("netmap {}: kick failed: {e}", self.name);
        }
    }

    /// Whether the rings have what a waiter wants (after a sync).
    fn ready(&self, rx: bool, tx: bool) -> bool {
        (rx && self.my_rx.cur() != self.rx_hwtail) || (tx && self.my_tx.cur() != self.tx_hwtail)
    }

    fn set_kicks(&self, rx: bool, tx: bool, v: u32) {
        let e = self.end.index();
        if rx {
            self.word(cons_kick_line(1 - e)).store(v, Ordering::Relaxed);
        }
        if tx {
            self.word(prod_kick_line(e)).store(v, Ordering::Relaxed);
        }
    }

    /// Syncs tx, and rx if `rx` or if our user consumed frames that the
    /// peer has not been given back yet: a waiter that no longer wants
    /// frames must still return the slots it used, or the peer waits for
    /// room as long as we sleep.
    fn sync(&mut self, rx: bool) {
        self.txsync();
        if rx || self.my_rx.head() != self.rx_hwcur {
            self.rxsync();
        }
    }

    /// Syncs; if nothing is ready, asks the peer for a kick on our eventfd
    /// and re-checks. True if something is ready now (do not sleep).
    pub(crate) fn prepare_wait(&mut self, rx: bool, tx: bool) -> bool {
        self.sync(rx);
        self.flush_kicks();
        if self.ready(rx, tx) {
            return true;
        }
        self.set_kicks(rx, tx, 1);
        fence(Ordering::SeqCst);
        self.sync(rx);
        if self.ready(rx, tx) {
            self.set_kicks(rx, tx, 0);
            return true;
        }
        false
    }

    /// Like [`Self::prepare_wait`] (with `tx` false), but also waits for
    /// the frames still in our tx ring, which the peer had no room for, to
    /// move: asks the peer for a kick when it frees room. True if nothing
    /// is pending any more (or `rx` is ready): do not sleep.
    pub(crate) fn prepare_wait_drain(&mut self, rx: bool) -> bool {
        let drained = |p: &Self| p.tx_hwcur == p.my_tx.head();
        self.sync(rx);
        self.flush_kicks();
        if drained(self) || self.ready(rx, false) {
            return true;
        }
        self.set_kicks(rx, true, 1);
        fence(Ordering::SeqCst);
        self.sync(rx);
        if drained(self) || self.ready(rx, false) {
            self.set_kicks(rx, true, 0);
            return true;
        }
        false
    }

    /// Tx slots handed to [`Self::txsync`] that have not reached the peer.
    pub(crate) fn tx_pending_slots(&self) -> u32 {
        let n = self.layout.num_slots;
        let head = self.my_tx.head();
        if head >= n {
            return 0;
        }
        (head + n - self.tx_hwcur) % n
    }

    /// Clears a wake-up on our eventfd.
    pub(crate) fn ack_wakeup(&mut self) {
        if sys::eventfd_drain(self.my_efd.as_fd()) != 0 {
            self.stats.wakeups += 1;
        }
    }

    /// Blocks until the rx ring has frames after `cur` (`rx`) or the tx ring
    /// has room after `cur` (`tx`), or the timeout passes. True if ready.
    pub(crate) fn wait(
        &mut self,
        rx: bool,
        tx: bool,
        timeout: Option<Duration>,
    ) -> io::Result<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.prepare_wait(rx, tx) {
                return Ok(true);
            }
            let ms = sys::poll_timeout_ms(deadline);
            if ms == 0 {
                self.set_kicks(rx, tx, 0);
                return Ok(false);
            }
            let mut fds = [sys::pollfd(self.my_efd.as_raw_fd(), libc::POLLIN)];
            sys::poll(&mut fds, ms)?;
            self.ack_wakeup();
        }
    }
}

fn dup(fd: &OwnedFd, name: &str) -> Result<OwnedFd, ShmError> {
    fd.try_clone().map_err(|err| ShmError::Io {
        name: name.to_string(),
        what: "dup",
        err,
    })
}

/// The runtime directory: `$NMVM_RUN_DIR`, else `$XDG_RUNTIME_DIR/nmvm`,
/// else `/tmp/nmvm-<uid>`, unless `over` is given.
pub fn run_dir(over: Option<&Path>) -> PathBuf {
    if let Some(p) = over {
        return p.to_path_buf();
    }
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = env("NMVM_RUN_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = env("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("nmvm");
    }
    PathBuf::from(format!("/tmp/nmvm-{}", sys::getuid()))
}

fn ensure_run_dir(dir: &Path) -> Result<(), ShmError> {
    let err = |err| ShmError::RunDir {
        path: dir.to_path_buf(),
        err,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    let md = std::fs::metadata(dir).map_err(err)?;
    let uid = sys::getuid();
    if md.uid() != uid {
        return Err(ShmError::RunDirOwner {
            path: dir.to_path_buf(),
            owner: md.uid(),
            uid,
        });
    }
    Ok(())
}

fn encode(magic: [u8; 8], a: u32, b: u32, c: u32) -> [u8; MSG_LEN] {
    let mut m = [0u8; MSG_LEN];
    m[..8].copy_from_slice(&magic);
    m[8..12].copy_from_slice(&PROTO_VERSION.to_le_bytes());
    m[12..16].copy_from_slice(&a.to_le_bytes());
    m[16..20].copy_from_slice(&b.to_le_bytes());
    m[20..24].copy_from_slice(&c.to_le_bytes());
    m
}

fn decode(m: &[u8; MSG_LEN], magic: [u8; 8]) -> Option<(u32, u32, u32, u32)> {
    if m[..8] != magic {
        return None;
    }
    let w = |o: usize| u32::from_le_bytes([m[o], m[o + 1], m[o + 2], m[o + 3]]);
    Some((w(8), w(12), w(16), w(20)))
}

fn create(
    spec: &ShmSpec,
    opts: &PortOptions,
    dir: &Path,
    sock: &Path,
) -> Result<ShmPort, ShmError> {
    let name = spec.port_name();
    let layout = Layout::new(opts.num_slots, opts.buf_size, opts.spare_bufs)?;
    let vnet = opts.vnet_hdr_len.unwrap_or(0);
    if !matches!(vnet, 0 | 10 | 12) {
        return Err(ShmError::BadGeometry {
            what: "virtio-net header length",
            value: vnet.into(),
            range: "0, 10 or 12",
        });
    }
    let io = |what: &'static str| {
        let name = name.clone();
        move |err| ShmError::Io { name, what, err }
    };
    let memfd = sys::memfd_sealed(&format!("nmvm:{name}"), layout.region_size)
        .map_err(io("cannot create the shared memory (memfd)"))?;
    let map = Mapping::map_shared(memfd.as_fd(), layout.region_size)
        .map_err(io("cannot map the shared memory"))?;
    init_region(&map, &layout, spec, vnet);
    let efds = [
        sys::eventfd().map_err(io("eventfd"))?,
        sys::eventfd().map_err(io("eventfd"))?,
    ];
    let listener = UnixListener::bind(sock).map_err(io("cannot listen on the pipe's socket"))?;
    log::debug!(
        "netmap {name}: created {} bytes, listening on {}",
        layout.region_size,
        sock.display()
    );
    ShmPort::new(
        spec,
        layout,
        vnet,
        map,
        memfd,
        efds,
        ControlMode::Serving(listener),
        opts,
        dir,
        sock,
    )
}

fn attach(
    spec: &ShmSpec,
    opts: &PortOptions,
    dir: &Path,
    sock: &Path,
    stream: UnixStream,
) -> Result<ShmPort, ShmError> {
    let name = spec.port_name();
    let hs = |what: String| ShmError::Handshake {
        name: name.clone(),
        path: sock.to_path_buf(),
        what,
    };
    let closed = || ShmError::PeerClosed {
        name: name.clone(),
        path: sock.to_path_buf(),
    };
    let setup = |r: io::Result<()>| r.map_err(|e| hs(format!("socket setup: {e}")));
    setup(stream.set_read_timeout(Some(opts.attach_timeout)))?;
    setup(stream.set_write_timeout(Some(opts.attach_timeout)))?;
    let hello = encode(HELLO_MAGIC, spec.end.index() as u32, std::process::id(), 0);
    if (&stream).write_all(&hello).is_err() {
        return Err(closed());
    }
    let mut buf = [0u8; MSG_LEN];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < MSG_LEN {
        match sys::recv_with_fds(stream.as_fd(), &mut buf[got..]) {
            Ok((0, _)) => return Err(closed()),
            Ok((k, f)) => {
                got += k;
                fds.extend(f);
                if fds.len() > 3 {
                    return Err(hs("too many descriptors".into()));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(hs(format!(
                    "no answer within {:?} (is the serving process stopped?)",
                    opts.attach_timeout
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(closed()),
            Err(e) => return Err(hs(format!("recvmsg: {e}"))),
        }
    }
    let Some((ver, status, _server_end, pid)) = decode(&buf, REPLY_MAGIC) else {
        return Err(hs("not an nmvm reply".into()));
    };
    if ver != PROTO_VERSION {
        return Err(hs(format!(
            "protocol version {ver}, we speak {PROTO_VERSION}"
        )));
    }
    match status {
        ST_OK => {}
        ST_SAME_END | ST_BUSY => return Err(ShmError::EndInUse { name, pid }),
        s => return Err(hs(format!("refused with status {s}"))),
    }
    let Ok([memfd, efd_a, efd_b]) = <[OwnedFd; 3]>::try_from(fds) else {
        return Err(hs("expected 3 descriptors".into()));
    };
    let bad = |what: String| ShmError::BadRegion {
        name: name.clone(),
        what,
    };
    let size = sys::regular_file_size(memfd.as_fd()).map_err(|e| bad(format!("memfd: {e}")))?;
    if !sys::sealed_against_shrink(memfd.as_fd()).map_err(|e| bad(format!("seals: {e}")))? {
        return Err(bad("the memfd is not sealed against shrinking".into()));
    }
    if size < 4096 || size > MAX_REGION as u64 {
        return Err(bad(format!("size {size}")));
    }
    let map =
        Mapping::map_shared(memfd.as_fd(), size as usize).map_err(|e| bad(format!("mmap: {e}")))?;
    let (layout, vnet) = validate_region(&map).map_err(bad)?;
    if let Some(wanted) = opts.vnet_hdr_len {
        if wanted != vnet {
            return Err(ShmError::VnetHdrMismatch {
                name,
                found: vnet,
                wanted,
            });
        }
    }
    setup(stream.set_read_timeout(None))?;
    setup(stream.set_nonblocking(true))?;
    log::debug!(
        "netmap {name}: attached to {} ({} bytes)",
        sock.display(),
        layout.region_size
    );
    ShmPort::new(
        spec,
        layout,
        vnet,
        map,
        memfd,
        [efd_a, efd_b],
        ControlMode::Attached(stream, pid),
        opts,
        dir,
        sock,
    )
}

// ---------------------------------------------------------------------------
// The control thread.

#[derive(Debug, Default)]
struct ControlShared {
    peer_connected: AtomicBool,
}

enum ControlMode {
    Serving(UnixListener),
    Attached(UnixStream, u32),
}

struct Control {
    stop: OwnedFd,
    shared: Arc<ControlShared>,
    thread: Option<JoinHandle<()>>,
}

struct ControlTask {
    end: PipeEnd,
    name: String,
    dir: PathBuf,
    sock: PathBuf,
    /// (dev, ino) of the socket file we bound, to remove only our own.
    sock_id: Option<(u64, u64)>,
    memfd: OwnedFd,
    efds: [OwnedFd; 2],
    listener: Option<UnixListener>,
    conn: Option<(UnixStream, u32)>,
    stop: OwnedFd,
    shared: Arc<ControlShared>,
    timeout: Duration,
}

impl Control {
    fn start(mut task: ControlTask, mode: ControlMode) -> io::Result<Control> {
        match mode {
            ControlMode::Serving(l) => {
                l.set_nonblocking(true)?;
                task.sock_id = file_id(&task.sock);
                task.listener = Some(l);
            }
            ControlMode::Attached(s, pid) => {
                task.conn = Some((s, pid));
                task.shared.peer_connected.store(true, Ordering::Release);
            }
        }
        let stop = task.stop.try_clone()?;
        let shared = task.shared.clone();
        let thread = std::thread::Builder::new()
            .name("nmvm-shm-ctl".into())
            .spawn(move || {
                if let Some(hook) = CONTROL_START_HOOK.get() {
                    hook();
                }
                task.run()
            })?;
        Ok(Control {
            stop,
            shared,
            thread: Some(thread),
        })
    }
}

/// Run first by every pipe control thread: `nmvm run` installs the
/// thread's seccomp filter here.
static CONTROL_START_HOOK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets the function every pipe control thread runs first (once per
/// process; later calls are ignored and return false).
pub fn set_control_start_hook(hook: fn()) -> bool {
    CONTROL_START_HOOK.set(hook).is_ok()
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = sys::eventfd_signal(self.stop.as_fd());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn file_id(p: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl ControlTask {
    fn run(mut self) {
        loop {
            let mut fds = vec![sys::pollfd(self.stop.as_raw_fd(), libc::POLLIN)];
            let li = self.listener.as_ref().map(|l| {
                fds.push(sys::pollfd(l.as_raw_fd(), libc::POLLIN));
                fds.len() - 1
            });
            let ci = self.conn.as_ref().map(|(c, _)| {
                fds.push(sys::pollfd(c.as_raw_fd(), libc::POLLIN));
                fds.len() - 1
            });
            match sys::poll(&mut fds, -1) {
                Ok(_) => {}
                Err(e) => {
                    log::warn!("netmap {}: control thread poll failed: {e}", self.name);
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            if fds[0].revents != 0 {
                break;
            }
            if let Some(ci) = ci {
                if fds[ci].revents != 0 {
                    self.check_conn();
                }
            }
            if let Some(li) = li {
                if fds[li].revents != 0 {
                    self.accept();
                }
            }
        }
        if self.listener.take().is_some() {
            match FlockGuard::lock(&self.dir, Duration::from_secs(2)) {
                Ok(_lock) => {
                    if self.sock_id.is_some() && file_id(&self.sock) == self.sock_id {
                        let _ = std::fs::remove_file(&self.sock);
                    }
                }
                Err(e) => log::warn!(
                    "netmap {}: cannot lock {}: {e}",
                    self.name,
                    self.dir.display()
                ),
            }
        }
    }

    /// Reads (and discards) whatever the peer sent; handles EOF.
    fn check_conn(&mut self) {
        let Some((c, _)) = self.conn.as_mut() else {
            return;
        };
        let mut buf = [0u8; 64];
        let alive = loop {
            match c.read(&mut buf) {
                Ok(0) => break false,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break false,
            }
        };
        if alive {
            return;
        }
        let pid = self.conn.take().map(|(_, p)| p).unwrap_or(0);
        self.shared.peer_connected.store(false, Ordering::Release);
        log::info!("netmap {}: peer (process {pid}) went away", self.name);
        if self.listener.is_none() {
            self.take_over();
        }
    }

    /// The serving end went away: serve the socket ourselves so that a new
    /// process can attach to our region.
    fn take_over(&mut self) {
        let _lock = match FlockGuard::lock(&self.dir, self.timeout) {
            Ok(l) => l,
            Err(e) => {
                log::warn!(
                    "netmap {}: cannot lock {}: {e}",
                    self.name,
                    self.dir.display()
                );
                return;
            }
        };
        match UnixStream::connect(&self.sock) {
            Ok(_) => {
                log::warn!(
                    "netmap {}: another process now serves {}; this end stays detached",
                    self.name,
                    self.sock.display()
                );
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                let _ = std::fs::remove_file(&self.sock);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                log::warn!(
                    "netmap {}: cannot probe {}: {e}",
                    self.name,
                    self.sock.display()
                );
                return;
            }
        }
        match UnixListener::bind(&self.sock).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
            Ok(l) => {
                self.sock_id = file_id(&self.sock);
                self.listener = Some(l);
                log::debug!("netmap {}: now serving {}", self.name, self.sock.display());
            }
            Err(e) => log::warn!(
                "netmap {}: cannot listen on {}: {e}",
                self.name,
                self.sock.display()
            ),
        }
    }

    fn accept(&mut self) {
        let Some(l) = self.listener.as_ref() else {
            return;
        };
        let stream = match l.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    log::debug!("netmap {}: accept: {e}", self.name);
                }
                return;
            }
        };
        if let Err(e) = self.handshake(stream) {
            log::debug!(
                "netmap {}: handshake with a new peer failed: {e}",
                self.name
            );
        }
    }

    fn handshake(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        let mut buf = [0u8; MSG_LEN];
        (&stream).read_exact(&mut buf)?;
        let me = std::process::id();
        let reply =
            |status: u32, pid: u32| encode(REPLY_MAGIC, status, self.end.index() as u32, pid);
        let Some((ver, end, pid, _)) = decode(&buf, HELLO_MAGIC) else {
            (&stream).write_all(&reply(ST_BAD_HELLO, me))?;
            return Ok(());
        };
        if ver != PROTO_VERSION || end > 1 {
            (&stream).write_all(&reply(ST_BAD_HELLO, me))?;
            return Ok(());
        }
        if end as usize == self.end.index() {
            (&stream).write_all(&reply(ST_SAME_END, me))?;
            return Ok(());
        }
        if let Some((c, cpid)) = &self.conn {
            if sys::stream_alive(c.as_fd()) {
                (&stream).write_all(&reply(ST_BUSY, *cpid))?;
                return Ok(());
            }
            log::info!("netmap {}: peer (process {cpid}) went away", self.name);
            self.conn = None;
        }
        let fds: [BorrowedFd<'_>; 3] = [
            self.memfd.as_fd(),
            self.efds[0].as_fd(),
            self.efds[1].as_fd(),
        ];
        let msg = reply(ST_OK, me);
        // Connected before the reply goes out, so that when the peer's open
        // returns, this end already reports it.
        self.shared.peer_connected.store(true, Ordering::Release);
        let sent = sys::send_with_fds(stream.as_fd(), &msg, &fds).and_then(|sent| {
            if sent < MSG_LEN {
                (&stream).write_all(&msg[sent..])?;
            }
            stream.set_read_timeout(None)?;
            stream.set_nonblocking(true)
        });
        if let Err(e) = sent {
            self.shared.peer_connected.store(false, Ordering::Release);
            return Err(e);
        }
        self.conn = Some((stream, pid));
        log::info!("netmap {}: peer attached (process {pid})", self.name);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Raw access, as a hostile peer has it (unit tests, and the `hostile-peer`
// feature for integration tests).

/// Unvalidated access to every shared word of a region: control words, ring
/// headers, slots and buffers. The *values* written are arbitrary; only the
/// *places* are checked (panics), so nothing outside the region is touched.
#[cfg(any(test, feature = "hostile-peer"))]
struct Raw {
    base: NonNull<u8>,
    l: Layout,
}

#[cfg(any(test, feature = "hostile-peer"))]
impl Raw {
    /// # Safety
    ///
    /// `base` must point to a mapping of at least `l.region_size` bytes laid
    /// out as `l` (e.g. a port's region and the layout validated from its
    /// header) that stays mapped while the returned value is used. Its
    /// control words, ring header words and slots must only be accessed
    /// atomically, as the ports (and peer processes) do.
    unsafe fn new(base: NonNull<u8>, l: Layout) -> Raw {
        Raw { base, l }
    }

    fn at(&self, ofs: usize, size: usize) -> *mut u8 {
        assert!(ofs % size == 0 && ofs + size <= self.l.region_size);
        // SAFETY: `ofs + size` is within the region (asserted), which is
        // mapped (contract of `new`).
        unsafe { self.base.as_ptr().add(ofs) }
    }

    /// Control word on line `line` of the control block.
    fn word(&self, line: usize) -> &AtomicU32 {
        assert!(line < CTRL_LINES);
        let p = self.at(self.l.ctrl_ofs + line * LINE, 4);
        // SAFETY: `p` is a 4-aligned word inside the live mapping (`at`);
        // control words are only accessed atomically (contract of `new`).
        unsafe { AtomicU32::from_ptr(p.cast()) }
    }

    /// The u32 at byte `ofs` of ring `ring`'s header (A.tx, A.rx, B.tx, B.rx).
    fn hdr(&self, ring: usize, ofs: usize) -> &AtomicU32 {
        assert!(ring < 4 && ofs + 4 <= NETMAP_RING_SLOTS_OFFSET);
        let p = self.at(self.l.ring_ofs[ring] + ofs, 4);
        // SAFETY: as in `word`: a 4-aligned header word of the live mapping,
        // accessed only atomically.
        unsafe { AtomicU32::from_ptr(p.cast()) }
    }

    fn slot_word(&self, ring: usize, i: u32) -> &AtomicU64 {
        assert!(ring < 4 && i < self.l.num_slots);
        let p = self.at(
            self.l.ring_ofs[ring] + NETMAP_RING_SLOTS_OFFSET + 16 * i as usize,
            8,
        );
        // SAFETY: as in `word`: the first 8-aligned word of slot `i`, inside
        // the live mapping, accessed only atomically.
        unsafe { AtomicU64::from_ptr(p.cast()) }
    }

    fn slot(&self, ring: usize, i: u32) -> Slot {
        Slot::from_word(self.slot_word(ring, i).load(Ordering::Relaxed))
    }

    fn set_slot(&self, ring: usize, i: u32, s: Slot) {
        self.slot_word(ring, i)
            .store(s.to_word(), Ordering::Relaxed);
    }

    /// Start of buffer `idx` (`buf_size` bytes are inside the region).
    fn buf_ptr(&self, idx: u32) -> *mut u8 {
        assert!(idx < self.l.num_bufs);
        let bs = self.l.buf_size as usize;
        assert!(self.l.buf_pool_ofs + (idx as usize + 1) * bs <= self.l.region_size);
        self.at(self.l.buf_pool_ofs + idx as usize * bs, 1)
    }

    #[cfg(test)]
    fn buf(&mut self, idx: u32) -> &mut [u8] {
        let p = self.buf_ptr(idx);
        // SAFETY: `buf_size` bytes from `p` are inside the live mapping
        // (`buf_ptr`); u8 has no invalid values; the borrow of `self` is
        // exclusive, and the tests use it only on buffers no port reads
        // meanwhile.
        unsafe { std::slice::from_raw_parts_mut(p, self.l.buf_size as usize) }
    }
}

/// Testing only (cargo feature `hostile-peer`, off by default): lets the
/// holder of one end of a userspace pipe behave as a hostile peer, writing
/// arbitrary values where the other end will read them. Not part of the
/// API; release builds of nmvm do not contain it.
#[cfg(feature = "hostile-peer")]
#[doc(hidden)]
pub mod hostile {
    use std::marker::PhantomData;
    use std::sync::atomic::Ordering;

    use super::{cons_kick_line, head_line, tail_line, validate_region_at, Raw};
    use crate::netmap::abi::NetmapRing;
    use crate::netmap::{Port, Slot};

    /// A ring, seen from the holder's end.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RingId {
        /// Our tx ring.
        Tx,
        /// Our rx ring (the peer produces into it).
        Rx,
        /// The peer's tx ring.
        PeerTx,
        /// The peer's rx ring (we produce into it).
        PeerRx,
    }

    /// A ring header field.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Field {
        /// `head`.
        Head,
        /// `cur`.
        Cur,
        /// `tail`.
        Tail,
    }

    /// A control word, seen from the holder's end (see the module docs of
    /// `shm`, "Control block").
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Word {
        /// We publish: next slot of the peer's rx ring we fill.
        TxTail,
        /// The peer publishes: how far it has released its rx ring.
        TxHead,
        /// The peer sets it when it sleeps until `TxTail` moves.
        TxKick,
        /// The peer publishes: next slot of our rx ring it fills.
        RxTail,
        /// We publish: how far we have released our rx ring.
        RxHead,
    }

    /// Unvalidated access to the shared memory of a userspace port.
    pub struct Hostile<'a> {
        raw: Raw,
        end: usize,
        _port: PhantomData<&'a Port>,
    }

    impl<'a> Hostile<'a> {
        /// Raw access to `port`'s pipe, for as long as `port` is borrowed.
        /// Fails on a kernel port.
        pub fn new(port: &'a Port) -> Result<Hostile<'a>, String> {
            if !port.is_userspace() {
                return Err(format!("{} is not a userspace port", port.name()));
            }
            let (base, len) = port.region();
            // SAFETY: `region` is the port's own page-aligned mapping, which
            // stays mapped while `port` is borrowed (for the whole call).
            let (l, _) = unsafe { validate_region_at(base, len)? };
            let end = l
                .if_ofs
                .iter()
                .position(|&o| o == port.nifp_offset())
                .ok_or("the port's netmap_if is not in the layout")?;
            Ok(Hostile {
                // SAFETY: the layout was validated against this mapping's
                // header and size; the mapping outlives `'a`, which bounds
                // the returned value; ports and peers access the shared
                // words only atomically.
                raw: unsafe { Raw::new(base, l) },
                end,
                _port: PhantomData,
            })
        }

        /// Slots per ring.
        pub fn num_slots(&self) -> u32 {
            self.raw.l.num_slots
        }

        /// Bytes per buffer.
        pub fn buf_size(&self) -> u32 {
            self.raw.l.buf_size
        }

        /// Buffers in the pool (valid `buf_idx` are below it).
        pub fn num_bufs(&self) -> u32 {
            self.raw.l.num_bufs
        }

        fn ring(&self, r: RingId) -> usize {
            let (e, rx) = match r {
                RingId::Tx => (self.end, 0),
                RingId::Rx => (self.end, 1),
                RingId::PeerTx => (1 - self.end, 0),
                RingId::PeerRx => (1 - self.end, 1),
            };
            2 * e + rx
        }

        fn line(&self, w: Word) -> usize {
            let (out, inn) = (self.end, 1 - self.end);
            match w {
                Word::TxTail => tail_line(out),
                Word::TxHead => head_line(out),
                Word::TxKick => cons_kick_line(out),
                Word::RxTail => tail_line(inn),
                Word::RxHead => head_line(inn),
            }
        }

        fn field_ofs(f: Field) -> usize {
            match f {
                Field::Head => std::mem::offset_of!(NetmapRing, head),
                Field::Cur => std::mem::offset_of!(NetmapRing, cur),
                Field::Tail => std::mem::offset_of!(NetmapRing, tail),
            }
        }

        /// Slot `i` (< num_slots, else panics) of `ring`.
        pub fn slot(&self, ring: RingId, i: u32) -> Slot {
            self.raw.slot(self.ring(ring), i)
        }

        /// Writes slot `i` (< num_slots, else panics) of `ring`, any values.
        pub fn set_slot(&self, ring: RingId, i: u32, s: Slot) {
            self.raw.set_slot(self.ring(ring), i, s);
        }

        /// A header field of `ring`.
        pub fn header(&self, ring: RingId, f: Field) -> u32 {
            self.raw
                .hdr(self.ring(ring), Self::field_ofs(f))
                .load(Ordering::Acquire)
        }

        /// Overwrites a header field of `ring`, any value.
        pub fn set_header(&self, ring: RingId, f: Field, v: u32) {
            self.raw
                .hdr(self.ring(ring), Self::field_ofs(f))
                .store(v, Ordering::Release);
        }

        /// A control word.
        pub fn word(&self, w: Word) -> u32 {
            self.raw.word(self.line(w)).load(Ordering::Acquire)
        }

        /// Publishes any value in a control word (release, as a sync does).
        pub fn set_word(&self, w: Word, v: u32) {
            self.raw.word(self.line(w)).store(v, Ordering::Release);
        }

        /// Copies `data` to the start of buffer `buf_idx` (< num_bufs and
        /// `data` no longer than a buffer, else panics).
        pub fn write_buf(&self, buf_idx: u32, data: &[u8]) {
            assert!(data.len() <= self.raw.l.buf_size as usize);
            let p = self.raw.buf_ptr(buf_idx);
            // SAFETY: `buf_size` bytes from `p` are inside the live mapping
            // (`buf_ptr`), `data` fits (asserted) and is ordinary memory, not
            // part of the mapping. No reference into the buffer is created,
            // so a peer process touching it concurrently only changes bytes.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netmap::{Port, PortStats, NS_BUF_CHANGED};
    use std::sync::mpsc;

    /// Runtime directory shared by the tests of this process.
    fn test_dir() -> PathBuf {
        std::env::temp_dir().join(format!("nmvm-netmap-test-{}", std::process::id()))
    }

    fn opts() -> PortOptions {
        PortOptions {
            run_dir: Some(test_dir()),
            ..PortOptions::default()
        }
    }

    /// A pipe name no other test uses: (end A, end B).
    fn pipe(prefix: &str) -> (String, String) {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}{}_{n}", std::process::id());
        (format!("shm:{name}{{0"), format!("shm:{name}}}0"))
    }

    fn mix(mut x: u64) -> u64 {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }

    /// Length of frame `seq` of a stream: `min..=max`, pseudo-random.
    fn frame_len(seq: u64, min: usize, max: usize) -> usize {
        min + (mix(seq) % (max - min + 1) as u64) as usize
    }

    const HDR: usize = 20;
    const PATTERN_SPAN: usize = 8192;

    /// Random bytes frames are cut from, and their prefix sums.
    #[allow(clippy::type_complexity)]
    fn pattern() -> &'static (Vec<u8>, Vec<u32>, Vec<u32>) {
        static P: std::sync::OnceLock<(Vec<u8>, Vec<u32>, Vec<u32>)> = std::sync::OnceLock::new();
        P.get_or_init(|| {
            let bytes: Vec<u8> = (0..PATTERN_SPAN as u64 + 16384)
                .map(|i| mix(i) as u8)
                .collect();
            let mut sums = vec![0u32; bytes.len() + 1];
            let mut pows = vec![1u32; bytes.len() + 1];
            for (i, &b) in bytes.iter().enumerate() {
                sums[i + 1] = sums[i].wrapping_mul(31).wrapping_add(u32::from(b));
                pows[i + 1] = pows[i].wrapping_mul(31);
            }
            (bytes, sums, pows)
        })
    }

    /// Checksum of `pattern[off..off + len]` (a polynomial hash, from the
    /// prefix table in O(1)).
    fn pattern_sum(off: usize, len: usize) -> u32 {
        let (_, sums, pows) = pattern();
        sums[off + len].wrapping_sub(sums[off].wrapping_mul(pows[len]))
    }

    /// Frame layout: seq (8), len (4), pattern offset (4), checksum (4),
    /// then `len - 20` payload bytes cut from a random pattern at an offset
    /// derived from seq.
    fn fill_frame(seq: u64, f: &mut [u8]) {
        let len = f.len();
        let off = (mix(seq ^ 0x5a5a) % PATTERN_SPAN as u64) as usize;
        let plen = len - HDR;
        f[HDR..].copy_from_slice(&pattern().0[off..off + plen]);
        f[..8].copy_from_slice(&seq.to_le_bytes());
        f[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        f[12..16].copy_from_slice(&(off as u32).to_le_bytes());
        f[16..20].copy_from_slice(&pattern_sum(off, plen).to_le_bytes());
    }

    /// Checks sequence number, length, checksum, and every payload byte.
    fn frame_error(f: &[u8], seq: u64) -> Option<String> {
        if f.len() < HDR {
            return Some(format!("frame {seq}: {} bytes", f.len()));
        }
        let word = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().unwrap());
        let got_seq = u64::from_le_bytes(f[..8].try_into().unwrap());
        if got_seq != seq {
            return Some(format!("frame out of order: got {got_seq}, expected {seq}"));
        }
        let (len, off, sum) = (word(8) as usize, word(12) as usize, word(16));
        if len != f.len() {
            return Some(format!(
                "frame {seq}: length {} but header says {len}",
                f.len()
            ));
        }
        if off as u64 != mix(seq ^ 0x5a5a) % PATTERN_SPAN as u64 {
            return Some(format!("frame {seq}: bad pattern offset"));
        }
        let plen = len - HDR;
        if sum != pattern_sum(off, plen) {
            return Some(format!("frame {seq}: bad checksum field"));
        }
        if f[HDR..] != pattern().0[off..off + plen] {
            return Some(format!("frame {seq}: payload corrupted"));
        }
        None
    }

    fn check_frame(f: &[u8], seq: u64) {
        if let Some(e) = frame_error(f, seq) {
            panic!("{e}");
        }
    }

    #[test]
    fn frame_checker_detects_corruption() {
        let mut f = vec![0u8; 300];
        fill_frame(42, &mut f);
        assert_eq!(frame_error(&f, 42), None);
        for pos in [0, 9, 13, 17, 20, 299] {
            let mut g = f.clone();
            g[pos] ^= 1;
            assert!(frame_error(&g, 42).is_some(), "byte {pos}");
        }
        assert!(frame_error(&f, 43).is_some());
        assert!(frame_error(&f[..299], 42).is_some());
    }

    /// Sends `frames` frames of `min..=max` bytes and receives as many,
    /// checking each, with blocking waits when neither side can progress.
    fn duplex_worker(mut p: Port, frames: u64, min: usize, max: usize) -> PortStats {
        let mut out = vec![0u8; max];
        let mut scratch = vec![0u8; max];
        let (mut sent, mut rcvd) = (0u64, 0u64);
        let single = max <= p.tx_ring().buf_size() as usize;
        loop {
            let pending = p.tx_ring().tx_pending();
            if sent == frames && rcvd == frames && !pending {
                break;
            }
            let mut progress = false;
            {
                let tx = p.tx_ring();
                while sent < frames {
                    let len = frame_len(sent, min, max);
                    if single {
                        if tx.space_from_cur() == 0 {
                            break;
                        }
                        let i = tx.cur();
                        fill_frame(sent, &mut tx.tx_buf(i).unwrap()[..len]);
                        assert!(tx.set_len_flags(i, len as u16, 0));
                        let ni = tx.next(i);
                        tx.advance(ni);
                    } else {
                        fill_frame(sent, &mut scratch[..len]);
                        if !tx.send(&scratch[..len]) {
                            break;
                        }
                    }
                    sent += 1;
                    progress = true;
                }
            }
            p.txsync().unwrap();
            p.rxsync().unwrap();
            {
                let rx = p.rx_ring();
                while let Some(len) = rx.recv(&mut out) {
                    check_frame(&out[..len], rcvd);
                    rcvd += 1;
                    progress = true;
                }
            }
            p.rxsync().unwrap();
            if !progress {
                let ok = p
                    .wait(
                        rcvd < frames,
                        sent < frames || pending,
                        Some(Duration::from_secs(20)),
                    )
                    .unwrap();
                assert!(ok, "{}: stuck at sent {sent} received {rcvd}", p.name());
            }
        }
        assert_eq!((sent, rcvd), (frames, frames));
        p.stats()
    }

    fn clean(st: &PortStats) {
        assert_eq!(
            (
                st.bad_index,
                st.bad_buf_idx,
                st.bad_len,
                st.bad_frame,
                st.tx_dropped,
                st.rx_dropped
            ),
            (0, 0, 0, 0, 0, 0),
            "{st:?}"
        );
    }

    /// Opens `first` here, then a thread opens `second`; both run duplex.
    fn duplex(first: &str, second: &str, o: &PortOptions, frames: u64, min: usize, max: usize) {
        let p1 = Port::open(first, o).unwrap();
        let (second, o2) = (second.to_string(), o.clone());
        let t1 = std::thread::spawn(move || duplex_worker(p1, frames, min, max));
        let t2 = std::thread::spawn(move || {
            let p2 = Port::open(&second, &o2).unwrap();
            duplex_worker(p2, frames, min, max)
        });
        let s1 = t1.join().unwrap();
        let s2 = t2.join().unwrap();
        clean(&s1);
        clean(&s2);
        eprintln!(
            "{frames} frames each way: kicks {}/{} wakeups {}/{} syncs {}/{}",
            s1.kicks_sent,
            s2.kicks_sent,
            s1.wakeups,
            s2.wakeups,
            s1.txsyncs + s1.rxsyncs,
            s2.txsyncs + s2.rxsyncs
        );
    }

    #[test]
    fn million_frames_both_ways_a_first() {
        let (a, b) = pipe("ma");
        duplex(&a, &b, &opts(), 1_000_000, 60, 1514);
    }

    #[test]
    fn million_frames_both_ways_b_first() {
        let (a, b) = pipe("mb");
        duplex(&b, &a, &opts(), 1_000_000, 60, 1514);
    }

    #[test]
    fn jumbo_frames_span_slots() {
        let (a, b) = pipe("j");
        duplex(&a, &b, &opts(), 20_000, 60, 9000);
        // Small rings and exact multiples of the buffer size.
        let (a, b) = pipe("j");
        let o = PortOptions {
            num_slots: 16,
            ..opts()
        };
        duplex(&b, &a, &o, 5_000, 2048, 4096 * 3);
    }

    #[test]
    fn geometry_and_vnet_hdr_options() {
        let (a, b) = pipe("g");
        let o = PortOptions {
            num_slots: 64,
            buf_size: 4096,
            vnet_hdr_len: Some(12),
            ..opts()
        };
        let mut pa = Port::open(&a, &o).unwrap();
        assert_eq!(pa.virtio_net_hdr_len(), 12);
        assert_eq!(pa.tx_ring().num_slots(), 64);
        // The attacher takes the creator's geometry.
        let mut pb = Port::open(&b, &opts()).unwrap();
        assert_eq!(pb.virtio_net_hdr_len(), 12);
        assert_eq!(
            (pb.rx_ring().num_slots(), pb.rx_ring().buf_size()),
            (64, 4096)
        );
        drop(pb);
        let wrong = PortOptions {
            vnet_hdr_len: Some(0),
            ..opts()
        };
        let e = Port::open(&b, &wrong).unwrap_err();
        assert!(e.to_string().contains("12-byte virtio-net header"), "{e}");
        // Geometry errors.
        for (slots, bs) in [(3, 2048), (65536, 2048), (64, 100), (64, 32)] {
            let (a, _) = pipe("g");
            let o = PortOptions {
                num_slots: slots,
                buf_size: bs,
                ..opts()
            };
            let e = Port::open(&a, &o).unwrap_err();
            assert!(e.to_string().contains("out of range"), "{e}");
        }
        // The netmap_if of each end: 1 tx + 1 rx ring, ring_ofs relative to it.
        let (base, _) = pa.region();
        let nifp = pa.nifp_offset();
        // SAFETY: reading inside the port's live mapping.
        let (ntx, nrx, htx, ofs0, ofs1) = unsafe {
            let p = base.as_ptr().add(nifp);
            (
                p.add(24).cast::<u32>().read_volatile(),
                p.add(28).cast::<u32>().read_volatile(),
                p.add(36).cast::<u32>().read_volatile(),
                p.add(56).cast::<i64>().read_volatile(),
                p.add(64).cast::<i64>().read_volatile(),
            )
        };
        assert_eq!((ntx, nrx, htx), (1, 1, 0));
        let l = pa.shm().unwrap().layout();
        assert_eq!(nifp as i64 + ofs0, l.ring_ofs[0] as i64);
        assert_eq!(nifp as i64 + ofs1, l.ring_ofs[1] as i64);
    }

    #[test]
    fn moderated_kicks_wait_for_a_batch_or_for_the_sender_to_sleep() {
        let (a, b) = pipe("km");
        let mut pa = Port::open(&a, &opts()).unwrap();
        let mut pb = Port::open(&b, &opts()).unwrap();
        pa.set_kick_batch(4);
        // SAFETY: `pa`'s mapping and validated layout; `pa` outlives `raw`.
        let raw = unsafe { Raw::new(pa.region().0, pa.shm().unwrap().layout()) };
        let consumer_asleep = || raw.word(cons_kick_line(0)).load(Ordering::SeqCst) == 1;
        let send = |p: &mut Port, n: usize| {
            for _ in 0..n {
                assert!(p.tx_ring().send(b"frame"));
            }
            p.txsync().unwrap();
        };
        // B asks for a kick, as it does before sleeping.
        assert!(!pb.prepare_wait(true, false).unwrap());
        assert!(consumer_asleep());
        send(&mut pa, 3);
        assert_eq!(pa.stats().kicks_sent, 0, "3 frames are less than a batch");
        assert!(consumer_asleep());
        send(&mut pa, 1);
        assert_eq!(
            pa.stats().kicks_sent,
            1,
            "the 4th frame completes the batch"
        );
        assert!(!consumer_asleep());
        // B looks, takes the 4 frames and asks again.
        pb.ack_wakeup();
        pb.rxsync().unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..4 {
            assert_eq!(pb.rx_ring().recv(&mut buf), Some(5));
        }
        assert!(!pb.prepare_wait(true, false).unwrap());
        send(&mut pa, 2);
        assert_eq!(pa.stats().kicks_sent, 1);
        // The sender about to sleep owes B its 2 frames: they go now.
        assert!(!pa.prepare_wait(false, false).unwrap());
        assert_eq!(pa.stats().kicks_sent, 2);
        // Nothing owed, nothing sent.
        pa.flush_kicks();
        assert_eq!(pa.stats().kicks_sent, 2);
        // Returned slots are moderated the same way: B releases 2 of them
        // to a sender waiting for room, then goes to sleep itself.
        assert!(!pa.prepare_wait(false, false).unwrap());
        pb.set_kick_batch(4);
        pb.ack_wakeup();
        pb.rxsync().unwrap();
        assert_eq!(pb.rx_ring().recv(&mut buf), Some(5));
        assert_eq!(pb.rx_ring().recv(&mut buf), Some(5));
        raw.word(prod_kick_line(0)).store(1, Ordering::SeqCst);
        pb.rxsync().unwrap();
        assert_eq!(pb.stats().kicks_sent, 0, "2 slots are less than a batch");
        assert!(!pb.prepare_wait(true, false).unwrap());
        assert_eq!(pb.stats().kicks_sent, 1, "B sleeps: A gets its room now");
    }

    #[test]
    fn idle_wait_sleeps_and_is_woken() {
        let (a, b) = pipe("w");
        let mut pa = Port::open(&a, &opts()).unwrap();
        let mut pb = Port::open(&b, &opts()).unwrap();
        let t0 = Instant::now();
        assert!(!pb.wait_rx(Some(Duration::from_millis(200))).unwrap());
        assert!(t0.elapsed() >= Duration::from_millis(190));
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            tx.send(()).unwrap();
            let t0 = Instant::now();
            let ok = pb.wait_rx(Some(Duration::from_secs(20))).unwrap();
            let mut buf = [0u8; 64];
            let len = pb.rx_ring().recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], b"wake up");
            (ok, t0.elapsed(), pb.stats())
        });
        rx.recv().unwrap();
        // Send only once B sleeps (its need-kick flag is up).
        // SAFETY: `pa`'s mapping and validated layout; `pa` outlives `raw`.
        let raw = unsafe { Raw::new(pa.region().0, pa.shm().unwrap().layout()) };
        wait_until(|| raw.word(cons_kick_line(0)).load(Ordering::SeqCst) == 1);
        std::thread::sleep(Duration::from_millis(20));
        assert!(pa.tx_ring().send(b"wake up"));
        pa.txsync().unwrap();
        let (ok, waited, st) = t.join().unwrap();
        assert!(ok);
        assert!(waited < Duration::from_secs(10));
        assert!(st.wakeups >= 1, "{st:?}");
        assert_eq!(pa.stats().kicks_sent, 1);
    }

    #[test]
    fn same_end_twice_is_refused() {
        let (a, b) = pipe("s");
        let pa = Port::open(&a, &opts()).unwrap();
        let e = Port::open(&a, &opts()).unwrap_err();
        assert!(e.to_string().contains("already open"), "{e}");
        let pb = Port::open(&b, &opts()).unwrap();
        let e = Port::open(&b, &opts()).unwrap_err();
        assert!(e.to_string().contains("already open"), "{e}");
        let e = Port::open(&a, &opts()).unwrap_err();
        assert!(
            matches!(
                e,
                crate::netmap::NetmapError::Shm(ShmError::EndInUse { .. })
            ),
            "{e}"
        );
        // Once B is gone, B can be opened again.
        drop(pb);
        wait_until(|| !pa.peer_connected());
        let _pb = Port::open(&b, &opts()).unwrap();
        assert!(pa.peer_connected());
    }

    fn wait_until(mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "condition not reached"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn stale_socket_is_replaced() {
        let (a, b) = pipe("st");
        let dir = test_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let stem = a.trim_start_matches("shm:").replace('{', "-");
        let sock = dir.join(format!("{stem}.sock"));
        drop(UnixListener::bind(&sock).unwrap()); // a dead process's socket
        assert!(sock.exists());
        let mut pa = Port::open(&a, &opts()).unwrap();
        let mut pb = Port::open(&b, &opts()).unwrap();
        assert!(pa.tx_ring().send(b"fresh"));
        pa.txsync().unwrap();
        pb.rxsync().unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(pb.rx_ring().recv(&mut buf), Some(5));
        drop(pa);
        drop(pb);
        assert!(
            !sock.exists(),
            "the socket is removed when the last end closes"
        );
    }

    #[test]
    fn creator_goes_away_and_comes_back() {
        let (a, b) = pipe("c");
        let pa = Port::open(&a, &opts()).unwrap();
        let mut pb = Port::open(&b, &opts()).unwrap();
        assert!(pb.peer_connected());
        drop(pa);
        wait_until(|| !pb.peer_connected());
        // B keeps working alone: its sends are just not consumed.
        for k in 0..10u8 {
            assert!(pb.tx_ring().send(&[k; 100]));
        }
        pb.txsync().unwrap();
        assert!(!pb.wait_rx(Some(Duration::from_millis(10))).unwrap());
        // A new A attaches to B's region (B took the socket over) and gets
        // what B sent meanwhile.
        let mut pa = Port::open(&a, &opts()).unwrap();
        wait_until(|| pb.peer_connected());
        let mut buf = [0u8; 128];
        for k in 0..10u8 {
            assert!(pa.wait_rx(Some(Duration::from_secs(5))).unwrap());
            assert_eq!(pa.rx_ring().recv(&mut buf), Some(100));
            assert_eq!(buf[0], k);
        }
        clean(&pa.stats());
        clean(&pb.stats());
    }

    /// A hostile B writes bad indices, lengths and positions into the shared
    /// rings; A counts them, never crashes, and keeps working once a
    /// well-behaved B attaches.
    #[test]
    fn hostile_peer() {
        const A_TX: usize = 0;
        const A_RX: usize = 1;
        const B_RX: usize = 3;
        let (a, b) = pipe("h");
        let o = PortOptions {
            num_slots: 128,
            spare_bufs: 16,
            ..opts()
        };
        let n = 128u32;
        let mut pa = Port::open(&a, &o).unwrap();
        let evil = Port::open(&b, &o).unwrap();
        // SAFETY: `evil`'s mapping and validated layout; `evil` is dropped
        // only after the last use of `raw` (step 5).
        let mut raw = unsafe { Raw::new(evil.region().0, evil.shm().unwrap().layout()) };
        let before = pa.stats();
        let bad = 0xffff_fff0u32;
        let mut buf = [0u8; 2048];

        // 1. As producer into A.rx: a bad buffer, a bad length, one good
        //    frame, published with bogus tails first.
        raw.set_slot(
            A_RX,
            0,
            Slot {
                buf_idx: bad,
                len: 60,
                flags: 0,
            },
        );
        let s1 = raw.slot(A_RX, 1);
        raw.set_slot(A_RX, 1, Slot { len: 60000, ..s1 });
        let s2 = raw.slot(A_RX, 2);
        raw.buf(s2.buf_idx)[..5].copy_from_slice(b"good!");
        raw.set_slot(A_RX, 2, Slot { len: 5, ..s2 });
        raw.word(tail_line(1)).store(n + 5, Ordering::Release);
        pa.rxsync().unwrap();
        assert!(pa.rx_ring().is_empty());
        raw.word(tail_line(1)).store(3, Ordering::Release);
        pa.rxsync().unwrap();
        assert_eq!(pa.rx_ring().space(), 3);
        // A tail going backwards while A holds frames is out of the window.
        raw.word(tail_line(1)).store(2, Ordering::Release);
        pa.rxsync().unwrap();
        assert_eq!(pa.rx_ring().space(), 3);
        raw.word(tail_line(1)).store(3, Ordering::Release);
        assert_eq!(pa.rx_ring().recv(&mut buf), Some(5));
        assert_eq!(&buf[..5], b"good!");
        assert_eq!(pa.rx_ring().recv(&mut buf), None);
        pa.rxsync().unwrap();
        let st = pa.stats();
        assert_eq!(st.bad_index - before.bad_index, 2, "{st:?}");
        assert!(
            st.bad_buf_idx >= 1 && st.bad_len >= 1 && st.rx_dropped == 2,
            "{st:?}"
        );

        // 2. As consumer of A->B: bogus release positions, bad buffers in
        //    the free slots of B.rx.
        raw.word(head_line(0)).store(n + 7, Ordering::Release);
        pa.txsync().unwrap();
        raw.word(head_line(0)).store(10, Ordering::Release); // nothing was filled yet
        pa.txsync().unwrap();
        raw.word(head_line(0)).store(0, Ordering::Release);
        assert_eq!(pa.stats().bad_index - st.bad_index, 2);
        for i in 0..3 {
            raw.set_slot(
                B_RX,
                i,
                Slot {
                    buf_idx: bad - i,
                    len: 0,
                    flags: 0,
                },
            );
        }
        for k in 0..5u8 {
            assert!(pa.tx_ring().send(&[k; 70]));
        }
        pa.txsync().unwrap();
        let st2 = pa.stats();
        assert_eq!(st2.repaired, 3, "{st2:?}");
        assert_eq!(st2.bad_buf_idx - st.bad_buf_idx, 3);
        assert_eq!(raw.word(tail_line(0)).load(Ordering::Acquire), 5);
        for i in 0..5u32 {
            let s = raw.slot(B_RX, i);
            assert!(s.buf_idx < raw.l.num_bufs);
            assert_eq!(s.len, 70);
            assert_eq!(s.flags, NS_BUF_CHANGED);
            assert!(raw.buf(s.buf_idx)[..70].iter().all(|&x| x == i as u8));
        }
        raw.word(head_line(0)).store(5, Ordering::Release); // released properly

        // 3. A's own ring headers overwritten.
        raw.hdr(A_TX, 20).store(5000, Ordering::Relaxed); // head
        raw.hdr(A_TX, 28).store(9999, Ordering::Relaxed); // tail
        assert_eq!(pa.tx_ring().space(), 0);
        assert!(!pa.tx_ring().send(b"x"));
        pa.txsync().unwrap();
        assert_eq!(pa.tx_ring().space(), n - 1);
        raw.hdr(A_RX, 28).store(7777, Ordering::Relaxed); // rx tail
        assert_eq!(pa.rx_ring().recv(&mut buf), None);
        pa.rxsync().unwrap();
        assert!(pa.rx_ring().is_empty());
        let st3 = pa.stats();
        assert!(st3.bad_index >= st2.bad_index + 3, "{st3:?}");

        // 4. A's published tx slots overwritten before A syncs.
        let tx = pa.tx_ring();
        let i = tx.cur();
        assert!(tx.send(b"will be corrupted"));
        raw.set_slot(
            A_TX,
            i,
            Slot {
                buf_idx: bad,
                len: 17,
                flags: 0,
            },
        );
        let j = tx.cur();
        assert!(tx.send(b"also corrupted"));
        let sj = raw.slot(A_TX, j);
        raw.set_slot(A_TX, j, Slot { len: 65000, ..sj });
        // A chain of 70 fragments (more than NETMAP_MAX_FRAGS).
        let mut k = tx.cur();
        for _ in 0..40 {
            assert!(tx.set_len_flags(k, 1, NS_MOREFRAG));
            k = tx.next(k);
        }
        tx.advance(k);
        pa.txsync().unwrap();
        let tx = pa.tx_ring();
        let mut k = tx.cur();
        for f in 0..30 {
            assert!(tx.set_len_flags(k, 1, if f < 29 { NS_MOREFRAG } else { 0 }));
            k = tx.next(k);
        }
        tx.advance(k);
        pa.txsync().unwrap();
        let st4 = pa.stats();
        assert_eq!(st4.tx_dropped, 3, "{st4:?}");
        assert_eq!(st4.bad_frame, 1);
        assert_eq!(
            st4.repaired, 4,
            "the overwritten tx slot got a spare buffer"
        );
        assert_eq!(
            raw.word(tail_line(0)).load(Ordering::Acquire),
            5,
            "nothing bad was delivered"
        );
        assert!(pa.tx_ring().slot(i).unwrap().buf_idx < raw.l.num_bufs);

        // 5. The hostile peer leaves; a well-behaved B attaches and good
        //    traffic flows both ways.
        drop(evil);
        wait_until(|| !pa.peer_connected());
        let pb = Port::open(&b, &o).unwrap();
        let t = std::thread::spawn(move || duplex_worker(pb, 10_000, 60, 1514));
        let sa = duplex_worker(pa, 10_000, 60, 1514);
        let sb = t.join().unwrap();
        assert_eq!(sa.tx_dropped, st4.tx_dropped, "no new drops: {sa:?}");
        assert_eq!(sa.rx_dropped, st4.rx_dropped);
        // B repaired A.rx slot 0 (bad buffer the hostile B left there).
        assert_eq!(sb.repaired, 1, "{sb:?}");
        assert_eq!(sb.tx_dropped + sb.rx_dropped, 0, "{sb:?}");
    }

    /// The testing-only API reaches the words the module docs name, from
    /// either end, and what it writes is what the other end sees.
    #[cfg(feature = "hostile-peer")]
    #[test]
    fn hostile_api_addresses_the_right_words() {
        use super::hostile::{Field, Hostile, RingId, Word};
        let (a, b) = pipe("ha");
        let mut pa = Port::open(&a, &opts()).unwrap();
        let pb = Port::open(&b, &opts()).unwrap();
        let h = Hostile::new(&pb).unwrap();
        let n = h.num_slots();
        assert_eq!((n, h.buf_size()), (1024, 2048));
        // B writes a frame straight into A's rx ring and publishes it.
        let s = h.slot(RingId::PeerRx, 0);
        assert!(s.buf_idx < h.num_bufs());
        h.write_buf(s.buf_idx, b"raw!");
        h.set_slot(RingId::PeerRx, 0, Slot { len: 4, ..s });
        h.set_word(Word::TxTail, 1);
        pa.rxsync().unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(pa.rx_ring().recv(&mut buf), Some(4));
        assert_eq!(&buf[..4], b"raw!");
        pa.rxsync().unwrap();
        assert_eq!(h.word(Word::TxHead), 1, "A released the slot");
        assert_eq!(h.header(RingId::PeerRx, Field::Tail), 1);
        // A sends: B sees its tail, and A's own view agrees.
        assert!(pa.tx_ring().send(b"to b"));
        pa.txsync().unwrap();
        assert_eq!(h.word(Word::RxTail), 1);
        assert_eq!(h.header(RingId::PeerTx, Field::Head), 1);
        assert_eq!(h.header(RingId::Rx, Field::Tail), 0, "B did not sync");
        {
            let ha = Hostile::new(&pa).unwrap();
            assert_eq!(ha.word(Word::TxTail), 1);
            assert_eq!(ha.word(Word::RxHead), 1);
            assert_eq!(ha.header(RingId::Tx, Field::Head), 1);
            assert_eq!(ha.slot(RingId::PeerRx, 0).len, 4);
        }
        // Bad values written by B are counted by A.
        let before = pa.stats();
        h.set_word(Word::TxTail, n + 1);
        h.set_header(RingId::PeerRx, Field::Cur, n + 2);
        pa.rxsync().unwrap();
        assert_eq!(pa.stats().bad_index - before.bad_index, 2);
        h.set_word(Word::TxTail, 1);
    }

    /// A hostile creator: the attacher refuses regions whose header lies.
    #[test]
    fn attacher_validates_the_region() {
        let good = Layout::new(64, 2048, 4).unwrap();
        let memfd = sys::memfd_sealed("t", good.region_size).unwrap();
        let map = Mapping::map_shared(memfd.as_fd(), good.region_size).unwrap();
        let spec = ShmSpec {
            name: "x".into(),
            id: "0".into(),
            end: PipeEnd::A,
        };
        init_region(&map, &good, &spec, 12);
        assert_eq!(validate_region(&map).unwrap(), (good, 12));
        let hdr = map.ptr().as_ptr().cast::<RegionHeader>();
        let tamper = |f: &dyn Fn(&mut RegionHeader)| {
            // SAFETY: test-only; the header is inside our private mapping.
            let orig = unsafe { hdr.read() };
            let mut h = orig;
            f(&mut h);
            // SAFETY: as above.
            unsafe { hdr.write(h) };
            let r = validate_region(&map);
            // SAFETY: as above.
            unsafe { hdr.write(orig) };
            r.unwrap_err()
        };
        assert!(tamper(&|h| h.magic[0] = b'X').contains("magic"));
        assert!(tamper(&|h| h.version = 2).contains("version"));
        assert!(tamper(&|h| h.num_slots = 1 << 30).contains("out of range"));
        assert!(tamper(&|h| h.buf_size = 1 << 20).contains("out of range"));
        assert!(tamper(&|h| h.ring_ofs[3] += 128).contains("offsets"));
        assert!(tamper(&|h| h.num_bufs += 1).contains("offsets"));
        assert!(tamper(&|h| h.region_size *= 2).contains("offsets"));
        // A bigger geometry that is self-consistent but does not fit.
        let big = Layout::new(1024, 2048, 4).unwrap();
        assert!(tamper(&|h| {
            h.num_slots = 1024;
            h.num_bufs = big.num_bufs;
            h.region_size = big.region_size as u64;
            h.ring_ofs = big.ring_ofs.map(|x| x as u64);
            h.buf_pool_ofs = big.buf_pool_ofs as u64;
        })
        .contains("needs"));
        assert!(tamper(&|h| h.vnet_hdr_len = 7).contains("header length"));
        // Unsealed memfds are refused too.
        let c = std::ffi::CString::new("u").unwrap();
        // SAFETY: plain syscall with a valid C string.
        let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        assert!(!sys::sealed_against_shrink(fd.as_fd()).unwrap());
        assert!(sys::sealed_against_shrink(memfd.as_fd()).unwrap());
    }

    const CHILD_ENV: &str = "NMVM_NETMAP_TEST_CHILD";

    /// Runs only when spawned by `two_processes`: opens end B in this
    /// process and reflects frames back, zero-copy (swapping buffers from
    /// the rx ring into the tx ring, as a netmap bridge does).
    #[test]
    fn child_process_entry() {
        let Ok(arg) = std::env::var(CHILD_ENV) else {
            return;
        };
        let mut parts = arg.split('|');
        let (name, dir, count) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let count: u64 = count.parse().unwrap();
        let o = PortOptions {
            run_dir: Some(PathBuf::from(dir)),
            ..PortOptions::default()
        };
        let mut p = Port::open(name, &o).unwrap();
        let mut done = 0u64;
        while done < count || p.tx_ring().tx_pending() {
            let (tx, rx) = p.rings();
            let mut moved = 0;
            let mut i = rx.head();
            let mut j = tx.cur();
            while i != rx.tail() && tx.space_from_cur() > moved {
                let r = rx.slot(i).unwrap();
                let t = tx.slot(j).unwrap();
                assert!(tx.set_slot(
                    j,
                    Slot {
                        buf_idx: r.buf_idx,
                        len: r.len,
                        flags: NS_BUF_CHANGED
                    }
                ));
                assert!(rx.set_slot(
                    i,
                    Slot {
                        buf_idx: t.buf_idx,
                        len: 0,
                        flags: NS_BUF_CHANGED
                    }
                ));
                i = rx.next(i);
                j = tx.next(j);
                moved += 1;
            }
            rx.advance(i);
            tx.advance(j);
            done += u64::from(moved);
            p.txsync().unwrap();
            p.rxsync().unwrap();
            if moved == 0 {
                assert!(p
                    .wait(done < count, true, Some(Duration::from_secs(20)))
                    .unwrap());
            }
        }
        clean(&p.stats());
    }

    fn spawn_child(name: &str, count: u64) -> std::process::Child {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "netmap::shm::tests::child_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                CHILD_ENV,
                format!("{name}|{}|{count}", test_dir().display()),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Sends `count` stream frames and receives them reflected, intact.
    fn exchange(pa: &mut Port, count: u64) {
        let (mut sent, mut rcvd) = (0u64, 0u64);
        let mut out = [0u8; 2048];
        while rcvd < count {
            let tx = pa.tx_ring();
            let mut progress = false;
            while sent < count && sent < rcvd + 512 && tx.space_from_cur() > 0 {
                let len = frame_len(sent, 60, 1514);
                let i = tx.cur();
                fill_frame(sent, &mut tx.tx_buf(i).unwrap()[..len]);
                tx.set_len_flags(i, len as u16, 0);
                let ni = tx.next(i);
                tx.advance(ni);
                sent += 1;
                progress = true;
            }
            pa.txsync().unwrap();
            pa.rxsync().unwrap();
            while let Some(len) = pa.rx_ring().recv(&mut out) {
                check_frame(&out[..len], rcvd);
                rcvd += 1;
                progress = true;
            }
            if !progress {
                assert!(
                    pa.wait_rx(Some(Duration::from_secs(30))).unwrap(),
                    "peer stalled at {rcvd}"
                );
            }
        }
    }

    /// Both ends in separate processes: attach by name, frames reflected
    /// intact, the peer's exit noticed, sends queued while alone, and a new
    /// process re-attaching and getting them.
    #[test]
    fn two_processes() {
        let (a, b) = pipe("p");
        let mut pa = Port::open(&a, &opts()).unwrap();
        let mut child = spawn_child(&b, 50_000);
        wait_until(|| pa.peer_connected());
        exchange(&mut pa, 50_000);
        assert!(child.wait().unwrap().success());
        wait_until(|| !pa.peer_connected());

        // Alone: sends are simply not consumed.
        let mut queued = 0u64;
        while pa.tx_ring().send(&[7u8; 64]) {
            queued += 1;
        }
        pa.txsync().unwrap();
        assert!(queued > 0);
        assert!(!pa.wait_rx(Some(Duration::from_millis(10))).unwrap());

        // A new process attaches to the same end: it reflects the queued
        // frames first, then a new stream.
        let mut child = spawn_child(&b, queued + 20_000);
        let mut got = 0;
        let mut out = [0u8; 2048];
        while got < queued {
            assert!(pa.wait(true, true, Some(Duration::from_secs(30))).unwrap());
            while let Some(len) = pa.rx_ring().recv(&mut out) {
                assert_eq!((len, out[0]), (64, 7));
                got += 1;
            }
            pa.rxsync().unwrap();
        }
        exchange(&mut pa, 20_000);
        assert!(child.wait().unwrap().success());
        clean(&pa.stats());
    }
}
