//! The tap reference path: virtio-net whose backend is a Linux tap device,
//! the data path Firecracker and cloud-hypervisor use, kept here to compare
//! nmvm's netmap path against.
//!
//! [`Tap`] creates a tap interface with a 12-byte virtio-net header and no
//! offloads. [`TapNet`] is a virtio-net device whose worker thread moves
//! frames between descriptor chains and the tap fd with one `writev` or
//! `readv` per frame, straight from and into guest memory (no bounce
//! buffer): the header goes through as is on TX, and the tap writes it on
//! RX. [`PacketSocket`] is an `AF_PACKET` socket bound to the tap interface,
//! the host side of the benchmark: what it sends comes out of the tap fd
//! (device RX), and what the device writes into the tap fd it receives
//! (device TX).
//!
//! Guest chains are validated with the same code as the netmap device
//! ([`collect_chain`]); the kernel validates the header the guest wrote.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap};

use super::net::{
    ChainError, NetCounters, DEVICE_TYPE_NET, F_MAC, F_MRG_RXBUF, F_STATUS, HDR_LEN,
    HDR_NUM_BUFFERS, MAX_FRAME, MIN_FRAME, QUEUE_SIZE, RX, TX,
};
use super::{Activation, VirtioDevice, VirtioInterrupt, F_RING_EVENT_IDX, F_VERSION_1};
use crate::eventfd::EventFd;

/// Chains handled per queue before the worker looks at the other side.
const BATCH: usize = 256;
/// Largest chain, in descriptors, that the device walks.
const MAX_CHAIN: usize = super::splitq::MAX_CHAIN;

/// Name pattern of the interfaces [`Tap::new`] creates; the kernel picks
/// the first free number.
pub const TAP_NAME_PATTERN: &str = "nmvmtap%d";
/// Transmit queue length set on the tap interface. It is also the size of
/// the tap's ring towards the fd: frames sent to the interface while the
/// ring is full are dropped (and counted in its `tx_dropped`).
pub const TAP_TXQUEUELEN: i32 = 10_000;
/// Socket buffer size asked for on a [`PacketSocket`], each way.
pub const SOCKET_BUFFER: i32 = 16 << 20;
/// Room [`PacketSocket::recv_batch`] reserves in a buffer that has less.
pub const RECV_FRAME_ROOM: usize = 2048;
/// Frames per `sendmmsg`/`recvmmsg` call.
const MMSG_BATCH: usize = 64;
/// Largest iovec array for one frame (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
const TUN_PATH: &str = "/dev/net/tun";

/// Why the tap or the packet socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// No tun driver.
    #[error("{TUN_PATH} is missing or has no driver (is the tun module loaded?): {0}")]
    NoTunDevice(#[source] io::Error),
    /// The process lacks a capability.
    #[error("{what} needs {cap} (run as root): {source}")]
    NotPermitted {
        /// What was being done.
        what: &'static str,
        /// The capability it needs.
        cap: &'static str,
        /// The error the kernel returned.
        #[source]
        source: io::Error,
    },
    /// Any other system call failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An interface name that does not fit `IFNAMSIZ` or contains NUL.
    #[error("bad interface name {0:?}")]
    BadName(String),
}

impl TapError {
    fn from_os(what: &'static str, cap: &'static str, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Self::NotPermitted { what, cap, source },
            _ => Self::Io { what, source },
        }
    }
}

/// Converts a negative libc return into the thread's `errno`.
fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// An `ifreq` naming `name`, everything else zero.
fn ifreq(name: &str) -> Result<libc::ifreq, TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(TapError::BadName(name.into()));
    }
    // SAFETY: `ifreq` is plain old data (a byte array and a union of
    // integers, sockaddrs and a raw pointer); all-zero bytes are a valid
    // value of every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// The name the kernel left in `req`.
fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Waits until `fd` has one of `events`, for at most `timeout` (forever if
/// `None`). Returns whether it does; an interrupted wait returns false.
fn poll_fd(fd: RawFd, events: libc::c_short, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `pfd` is one valid pollfd, `ts_ptr` is null or points at a
    // timespec that outlives the call, and a null signal mask leaves the
    // mask alone.
    let rc = unsafe { libc::ppoll(&mut pfd, 1, ts_ptr, std::ptr::null()) };
    match check(rc) {
        Ok(n) => Ok(n > 0),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
}

/// Kernel counters of a network interface, from sysfs. For a tap,
/// "transmit" is the kernel handing frames to the fd (the device's RX) and
/// "receive" is the kernel taking frames written into the fd (the device's
/// TX).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames the interface received (written into the tap fd).
    pub rx_packets: u64,
    /// Frames dropped on receive.
    pub rx_dropped: u64,
    /// Frames the interface transmitted (queued for the tap fd).
    pub tx_packets: u64,
    /// Frames dropped on transmit: the tap's ring towards the fd was full.
    pub tx_dropped: u64,
}

impl LinkStats {
    /// Reads the counters of interface `name`.
    pub fn read(name: &str) -> io::Result<Self> {
        let get = |field: &str| -> io::Result<u64> {
            let path = format!("/sys/class/net/{name}/statistics/{field}");
            std::fs::read_to_string(&path)?
                .trim()
                .parse()
                .map_err(|e| io::Error::other(format!("{path}: {e}")))
        };
        Ok(Self {
            rx_packets: get("rx_packets")?,
            rx_dropped: get("rx_dropped")?,
            tx_packets: get("tx_packets")?,
            tx_dropped: get("tx_dropped")?,
        })
    }

    /// Counter increments from `earlier` to `self`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            rx_packets: self.rx_packets.wrapping_sub(earlier.rx_packets),
            rx_dropped: self.rx_dropped.wrapping_sub(earlier.rx_dropped),
            tx_packets: self.tx_packets.wrapping_sub(earlier.tx_packets),
            tx_dropped: self.tx_dropped.wrapping_sub(earlier.tx_dropped),
        }
    }
}

/// A tap interface: frames carry a 12-byte virtio-net header, no offloads,
/// non-blocking fd. Dropping it closes the fd, which removes the interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    ifindex: u32,
}

impl Tap {
    /// Creates an interface named after [`TAP_NAME_PATTERN`] and brings it
    /// up.
    pub fn new() -> Result<Self, TapError> {
        Self::with_name(TAP_NAME_PATTERN)
    }

    /// Creates interface `name` (a `%d` in it is replaced by the first free
    /// number) and brings it up.
    pub fn with_name(name: &str) -> Result<Self, TapError> {
        let mut req = ifreq(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                    TapError::NoTunDevice(e)
                }
                _ => TapError::from_os("opening /dev/net/tun", "CAP_NET_ADMIN", e),
            })?;
        let fd = file.as_raw_fd();
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as _;
        // SAFETY: TUNSETIFF reads and writes back one `ifreq`, and `req` is
        // a valid, exclusively borrowed one; `fd` is open.
        check(unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req) }).map_err(|e| {
            TapError::from_os("creating a tap interface (TUNSETIFF)", "CAP_NET_ADMIN", e)
        })?;
        // The kernel wrote the name it chose back.
        let name = ifreq_name(&req);
        let hdr_len = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at `hdr_len`.
        check(unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len) }).map_err(|e| {
            TapError::Io {
                what: "setting the virtio-net header size (TUNSETVNETHDRSZ)",
                source: e,
            }
        })?;
        // SAFETY: TUNSETOFFLOAD takes the offload flags by value; no memory
        // is passed.
        check(unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) }).map_err(
            |e| TapError::Io {
                what: "turning offloads off (TUNSETOFFLOAD)",
                source: e,
            },
        )?;
        let tap = Self {
            file,
            ifindex: 0,
            name,
        };
        tap.configure()
    }

    /// Looks the index up, sets the queue length, keeps IPv6 quiet and
    /// brings the interface up.
    fn configure(mut self) -> Result<Self, TapError> {
        // SAFETY: plain system call; the result is checked.
        let ctl =
            check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })
                .map_err(|e| TapError::Io {
                    what: "opening a control socket",
                    source: e,
                })?;
        // SAFETY: `ctl` is a descriptor we just opened and own alone.
        let ctl = unsafe { OwnedFd::from_raw_fd(ctl) };
        let ioctl = |request: libc::c_ulong, req: &mut libc::ifreq| {
            // SAFETY: every request used here (SIOCGIFINDEX, SIOCSIFTXQLEN,
            // SIOCGIFFLAGS, SIOCSIFFLAGS) reads and/or writes one `ifreq`,
            // and `req` is a valid, exclusively borrowed one.
            check(unsafe { libc::ioctl(ctl.as_raw_fd(), request, req as *mut libc::ifreq) })
        };
        let mut req = ifreq(&self.name)?;
        ioctl(libc::SIOCGIFINDEX, &mut req).map_err(|e| TapError::Io {
            what: "looking up the tap's index (SIOCGIFINDEX)",
            source: e,
        })?;
        // SAFETY: SIOCGIFINDEX filled the union's `ifindex` member.
        self.ifindex = unsafe { req.ifr_ifru.ifru_ifindex } as u32;

        // `ifr_qlen` is the union's int member, which libc calls
        // `ifru_metric` (among others).
        let mut req = ifreq(&self.name)?;
        req.ifr_ifru.ifru_metric = TAP_TXQUEUELEN;
        ioctl(libc::SIOCSIFTXQLEN, &mut req).map_err(|e| {
            TapError::from_os("setting txqueuelen (SIOCSIFTXQLEN)", "CAP_NET_ADMIN", e)
        })?;

        // An interface with IPv6 sends router solicitations and MLD reports
        // when it comes up; they would reach the device as stray frames.
        // Best effort: there is no such file without IPv6.
        let sysctl = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", self.name);
        if let Err(e) = std::fs::write(&sysctl, "1") {
            if e.kind() != io::ErrorKind::NotFound {
                debug!("tap {}: cannot disable IPv6: {e}", self.name);
            }
        }

        let mut req = ifreq(&self.name)?;
        ioctl(libc::SIOCGIFFLAGS, &mut req).map_err(|e| TapError::Io {
            what: "reading the tap's flags (SIOCGIFFLAGS)",
            source: e,
        })?;
        // SAFETY: SIOCGIFFLAGS filled the union's `flags` member.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        ioctl(libc::SIOCSIFFLAGS, &mut req).map_err(|e| {
            TapError::from_os("bringing the tap up (SIOCSIFFLAGS)", "CAP_NET_ADMIN", e)
        })?;
        Ok(self)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The interface's kernel counters.
    pub fn link_stats(&self) -> io::Result<LinkStats> {
        LinkStats::read(&self.name)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Counters of what only the tap path has.
#[derive(Debug, Default)]
pub struct TapCounters {
    /// Guest frames the tap refused (`writev` failed other than EAGAIN);
    /// each is returned to the guest unsent.
    pub tx_errors: AtomicU64,
    /// Times a `writev` found the tap full (EAGAIN); the frame is retried.
    pub tx_blocked: AtomicU64,
    /// Failed `readv`s other than EAGAIN.
    pub rx_errors: AtomicU64,
}

struct Running {
    stop: Arc<EventFd>,
    stop_flag: Arc<AtomicBool>,
    handle: JoinHandle<Tap>,
}

/// virtio-net with a tap backend: one queue pair, no offloads.
pub struct TapNet {
    mac: [u8; 6],
    tap: Option<Tap>,
    name: String,
    ifindex: u32,
    running: Option<Running>,
    counters: Arc<NetCounters>,
    tap_counters: Arc<TapCounters>,
    needs_reset: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
}

impl TapNet {
    /// Features offered: those of the netmap device without offloads.
    pub const FEATURES: u64 = F_VERSION_1 | F_RING_EVENT_IDX | F_MAC | F_STATUS | F_MRG_RXBUF;

    /// A device with address `mac` on `tap`.
    pub fn new(mac: [u8; 6], tap: Tap) -> Self {
        Self {
            mac,
            name: tap.name().to_owned(),
            ifindex: tap.ifindex(),
            tap: Some(tap),
            running: None,
            counters: Arc::new(NetCounters::default()),
            tap_counters: Arc::new(TapCounters::default()),
            needs_reset: Arc::new(AtomicBool::new(false)),
            acked: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The tap interface's name.
    pub fn if_name(&self) -> &str {
        &self.name
    }

    /// The tap interface's index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// The tap-specific counters.
    pub fn tap_counters(&self) -> Arc<TapCounters> {
        self.tap_counters.clone()
    }

    /// The features the driver accepted (0 before activation).
    pub fn acked_features(&self) -> Arc<AtomicU64> {
        self.acked.clone()
    }

    /// The tap interface's kernel counters.
    pub fn link_stats(&self) -> io::Result<LinkStats> {
        LinkStats::read(&self.name)
    }
}

impl VirtioDevice for TapNet {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_NET
    }

    fn features(&self) -> u64 {
        Self::FEATURES
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status u16 (link up), max_virtqueue_pairs u16.
        let mut cfg = [0u8; 10];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&1u16.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in virtio-net's configuration is writable for us.
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        if self.running.is_some() {
            return Err("the device is already running".into());
        }
        let (Some(rx_kick), Some(tx_kick)) = (a.kicks.get(RX).cloned(), a.kicks.get(TX).cloned())
        else {
            return Err("virtio-net needs two queue notifiers".into());
        };
        let mut queues = a.queues.into_iter();
        let (Some(rxq), Some(txq)) = (queues.next(), queues.next()) else {
            return Err("virtio-net needs two queues".into());
        };
        let stop = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| e.to_string())?,
        );
        let tap = self.tap.take().ok_or("the tap is lost")?;
        let stop_flag = Arc::new(AtomicBool::new(false));
        self.acked.store(a.features, Ordering::Relaxed);
        self.needs_reset.store(false, Ordering::Relaxed);
        let worker = Worker {
            mem: a.mem,
            rxq,
            txq,
            rx_kick,
            tx_kick,
            interrupt: a.interrupt,
            tap,
            counters: self.counters.clone(),
            tap_counters: self.tap_counters.clone(),
            needs_reset: self.needs_reset.clone(),
            stop: stop.clone(),
            stop_flag: stop_flag.clone(),
            descs: Vec::with_capacity(MAX_CHAIN),
        };
        let handle = std::thread::Builder::new()
            .name("nmvm-tap".into())
            .spawn(move || worker.run())
            .map_err(|e| format!("cannot start the device worker: {e}"))?;
        self.running = Some(Running {
            stop,
            stop_flag,
            handle,
        });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop_flag.store(true, Ordering::Release);
            let _ = r.stop.write(1);
            match r.handle.join() {
                Ok(tap) => self.tap = Some(tap),
                Err(_) => warn!("virtio-net (tap): the device worker panicked; the tap is lost"),
            }
        }
        self.acked.store(0, Ordering::Relaxed);
        self.needs_reset.store(false, Ordering::Relaxed);
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Relaxed)
    }
}

impl Drop for TapNet {
    fn drop(&mut self) {
        self.reset();
    }
}

struct Worker {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    rx_kick: Arc<EventFd>,
    tx_kick: Arc<EventFd>,
    interrupt: Arc<dyn VirtioInterrupt>,
    tap: Tap,
    counters: Arc<NetCounters>,
    tap_counters: Arc<TapCounters>,
    needs_reset: Arc<AtomicBool>,
    stop: Arc<EventFd>,
    stop_flag: Arc<AtomicBool>,
    descs: Vec<Descriptor>,
}

/// Points `iovs` at the guest memory of the validated chain `descs`. A
/// descriptor spanning two memory regions takes two entries. False if some
/// range cannot be mapped or there are too many pieces.
fn chain_iovecs(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    writable: bool,
    iovs: &mut Vec<libc::iovec>,
) -> bool {
    iovs.clear();
    for d in descs {
        for slice in mem.get_slices(d.addr(), d.len() as usize) {
            let Ok(slice) = slice else {
                return false;
            };
            if iovs.len() == IOV_MAX {
                return false;
            }
            // The guards do nothing for plain mmap regions; the pointers
            // stay valid as long as `mem` holds the regions. Writes through
            // them are not dirty-tracked (GuestMemoryMmap has no bitmap
            // here).
            let base = if writable {
                slice.ptr_guard_mut().as_ptr()
            } else {
                slice.ptr_guard().as_ptr().cast_mut()
            };
            iovs.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: slice.len(),
            });
        }
    }
    true
}

/// Writes `bytes` at byte `offset` of the chain `descs`, across
/// descriptor boundaries.
fn write_chain_bytes(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    mut offset: usize,
    mut bytes: &[u8],
) {
    for d in descs {
        if bytes.is_empty() {
            break;
        }
        let len = d.len() as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(bytes.len());
        let _ = mem.write_slice(&bytes[..n], d.addr().unchecked_add(offset as u64));
        bytes = &bytes[n..];
        offset = 0;
    }
}

impl Worker {
    fn run(mut self) -> Tap {
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(MAX_CHAIN);
        let mut fds = [
            libc::pollfd {
                fd: self.tx_kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.rx_kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.tap.as_raw_fd(),
                events: 0,
                revents: 0,
            },
        ];
        let mut tx_waits_for_tap = false;
        let mut rx_waits_for_guest = false;
        while !self.stop_flag.load(Ordering::Acquire) {
            let broken = self.needs_reset.load(Ordering::Relaxed);
            if !broken {
                let (tx_moved, tx_blocked) = self.process_tx(&mut iovs);
                tx_waits_for_tap = tx_blocked;
                let (rx_moved, rx_blocked) = self.process_rx(&mut iovs);
                rx_waits_for_guest = rx_blocked;
                if tx_moved || rx_moved {
                    continue;
                }
                // About to sleep: ask the guest for notifications about
                // what we wait for, then look once more so that no kick
                // slips in between. A TX chain the tap had no room for
                // waits for POLLOUT, not for the guest.
                let tx_more = self.txq.enable_notification(&self.mem).unwrap_or(false);
                let rx_more =
                    rx_waits_for_guest && self.rxq.enable_notification(&self.mem).unwrap_or(false);
                if (tx_more && !tx_waits_for_tap) || rx_more {
                    continue;
                }
            }
            // Frames waiting in the tap must not wake us while the guest
            // has no buffers for them.
            let mut events = 0;
            if !broken && !rx_waits_for_guest {
                events |= libc::POLLIN;
            }
            if !broken && tx_waits_for_tap {
                events |= libc::POLLOUT;
            }
            fds[3].events = events;
            fds.iter_mut().for_each(|f| f.revents = 0);
            // SAFETY: `fds` is a valid array of pollfd for its whole length
            // and every descriptor in it stays open while we wait.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    warn!("virtio-net (tap): poll: {err}");
                }
                continue;
            }
            self.counters.wakeups.fetch_add(1, Ordering::Relaxed);
            for kick in [&self.tx_kick, &self.rx_kick] {
                if kick.read().is_ok() {
                    self.counters.kicks.fetch_add(1, Ordering::Relaxed);
                }
            }
            if fds[2].revents != 0 {
                break;
            }
        }
        self.tap
    }

    fn bad_avail(&mut self) {
        self.counters
            .bad_avail_index
            .fetch_add(1, Ordering::Relaxed);
        debug!(
            "virtio-net (tap): the driver's avail index is impossible; the device needs a reset"
        );
        self.needs_reset.store(true, Ordering::Relaxed);
        self.interrupt.signal_config();
    }

    fn queue(&mut self, queue: usize) -> &mut Queue {
        if queue == RX {
            &mut self.rxq
        } else {
            &mut self.txq
        }
    }

    fn signal(&mut self, queue: usize) {
        let mem = self.mem.clone();
        if self.queue(queue).needs_notification(&mem).unwrap_or(true) {
            self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
            self.interrupt.signal_queue(queue as u16);
        }
    }

    fn drop_chain(&mut self, queue: usize, head: u16, why: &'static str) {
        self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
        debug!("virtio-net (tap): dropping chain {head} on queue {queue}: {why}");
        let mem = self.mem.clone();
        let _ = self.queue(queue).add_used(&mem, head, 0);
    }

    /// Guest → tap, one `writev` per frame. Returns whether anything moved,
    /// and whether the tap had no room for a frame.
    fn process_tx(&mut self, iovs: &mut Vec<libc::iovec>) -> (bool, bool) {
        let _ = self.txq.disable_notification(&self.mem);
        let mut used = 0usize;
        let mut blocked = false;
        for _ in 0..BATCH {
            let chain = match self.txq.iter(&self.mem) {
                Ok(mut it) => match it.next() {
                    Some(c) => c,
                    None => break,
                },
                Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                    self.bad_avail();
                    break;
                }
                Err(e) => {
                    debug!("virtio-net (tap) tx: {e}");
                    break;
                }
            };
            let head = chain.head_index();
            let total = match collect_chain(&self.mem, chain, false, &mut self.descs) {
                Ok(t) if t >= HDR_LEN + MIN_FRAME && t - HDR_LEN <= MAX_FRAME => t,
                Ok(_) => {
                    self.drop_chain(TX, head, "frame length out of range");
                    used += 1;
                    continue;
                }
                Err(ChainError::BadHead) => {
                    self.counters.bad_heads.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(ChainError::Bad(why)) => {
                    self.drop_chain(TX, head, why);
                    used += 1;
                    continue;
                }
            };
            if !chain_iovecs(&self.mem, &self.descs, false, iovs) {
                self.drop_chain(TX, head, "chain cannot be mapped");
                used += 1;
                continue;
            }
            // SAFETY: `iovs` holds `iovs.len()` entries, each inside a
            // guest memory region that `self.mem` keeps mapped for the
            // whole call (checked by `collect_chain` and `get_slices`).
            // The kernel only reads them; the guest may change the bytes
            // concurrently, which garbles at most this frame and never
            // touches memory Rust holds references to.
            let rc = unsafe {
                libc::writev(
                    self.tap.as_raw_fd(),
                    iovs.as_ptr(),
                    iovs.len() as libc::c_int,
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock => {
                        // Keep the chain for when the tap has room.
                        self.txq.go_to_previous_position();
                        self.tap_counters.tx_blocked.fetch_add(1, Ordering::Relaxed);
                        blocked = true;
                        break;
                    }
                    io::ErrorKind::Interrupted => {
                        self.txq.go_to_previous_position();
                        continue;
                    }
                    _ => {
                        // Typically EINVAL for a header the kernel rejects.
                        self.tap_counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                        debug!("virtio-net (tap): writev: {err}");
                        let _ = self.txq.add_used(&self.mem, head, 0);
                        used += 1;
                        continue;
                    }
                }
            }
            let _ = self.txq.add_used(&self.mem, head, 0);
            used += 1;
            self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
            self.counters
                .tx_bytes
                .fetch_add((total - HDR_LEN) as u64, Ordering::Relaxed);
        }
        if used > 0 {
            self.signal(TX);
        }
        (used > 0, blocked)
    }

    /// Tap → guest, one `readv` per frame into one chain. Returns whether
    /// anything moved, and whether the guest ran out of buffers.
    fn process_rx(&mut self, iovs: &mut Vec<libc::iovec>) -> (bool, bool) {
        let _ = self.rxq.disable_notification(&self.mem);
        let mut used = 0usize;
        let mut blocked = false;
        for _ in 0..BATCH {
            let chain = match self.rxq.iter(&self.mem) {
                Ok(mut it) => match it.next() {
                    Some(c) => c,
                    None => {
                        blocked = true;
                        break;
                    }
                },
                Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                    self.bad_avail();
                    break;
                }
                Err(e) => {
                    debug!("virtio-net (tap) rx: {e}");
                    blocked = true;
                    break;
                }
            };
            let head = chain.head_index();
            let cap = match collect_chain(&self.mem, chain, true, &mut self.descs) {
                Ok(c) if c >= HDR_LEN => c,
                Ok(_) => {
                    self.drop_chain(RX, head, "receive buffer shorter than the header");
                    used += 1;
                    continue;
                }
                Err(ChainError::BadHead) => {
                    self.counters.bad_heads.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(ChainError::Bad(why)) => {
                    self.drop_chain(RX, head, why);
                    used += 1;
                    continue;
                }
            };
            if !chain_iovecs(&self.mem, &self.descs, true, iovs) {
                self.drop_chain(RX, head, "chain cannot be mapped");
                used += 1;
                continue;
            }
            // SAFETY: `iovs` holds `iovs.len()` entries, each inside a
            // writable guest buffer in a region that `self.mem` keeps
            // mapped for the whole call (checked by `collect_chain` and
            // `get_slices`). The kernel writes at most their total length;
            // Rust holds no references into guest memory.
            let rc = unsafe {
                libc::readv(
                    self.tap.as_raw_fd(),
                    iovs.as_ptr(),
                    iovs.len() as libc::c_int,
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                // The chain goes back to the guest's side of the ring.
                self.rxq.go_to_previous_position();
                match err.kind() {
                    io::ErrorKind::WouldBlock => {}
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.tap_counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                        warn!("virtio-net (tap): readv: {err}");
                    }
                }
                break;
            }
            // The tap returns the frame's full length even when it had to
            // cut it to fit.
            let n = rc as usize;
            if n > cap || n < HDR_LEN {
                self.counters.rx_too_big.fetch_add(1, Ordering::Relaxed);
                let _ = self.rxq.add_used(&self.mem, head, 0);
                used += 1;
                continue;
            }
            // The tap writes the first 10 header bytes and skips
            // num_buffers: one buffer per frame.
            write_chain_bytes(&self.mem, &self.descs, HDR_NUM_BUFFERS, &1u16.to_le_bytes());
            let _ = self.rxq.add_used(&self.mem, head, n as u32);
            used += 1;
            self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
            self.counters
                .rx_bytes
                .fetch_add((n - HDR_LEN) as u64, Ordering::Relaxed);
        }
        if used > 0 {
            self.signal(RX);
        }
        (used > 0, blocked)
    }
}

/// Kernel counters of a [`PacketSocket`] since the previous read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketStats {
    /// Frames received (including dropped ones).
    pub packets: u64,
    /// Frames dropped because the receive buffer was full.
    pub drops: u64,
}

/// An `AF_PACKET` raw socket bound to one interface, seeing every frame
/// the interface receives and none of those it sends. Non-blocking.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: the option value is one int that outlives the call, and its
    // size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

impl PacketSocket {
    /// Opens a socket on interface `ifindex` with [`SOCKET_BUFFER`]-sized
    /// buffers (forced past the sysctl limits when privileged).
    pub fn bind(ifindex: u32) -> Result<Self, TapError> {
        // Protocol 0: nothing is received until bind() names the
        // interface, so no frame from another interface gets in.
        // SAFETY: plain system call; the result is checked.
        let fd = check(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })
        .map_err(|e| TapError::from_os("opening an AF_PACKET socket", "CAP_NET_RAW", e))?;
        // SAFETY: `fd` is a descriptor we just opened and own alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        for (forced, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if !setsockopt_int(raw, libc::SOL_SOCKET, forced, SOCKET_BUFFER) {
                // Capped at net.core.[rw]mem_max.
                let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
            }
        }
        // Since Linux 4.20; receive filters on sll_pkttype as well.
        let _ = setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
        // SAFETY: all-zero bytes are a valid sockaddr_ll (integers and a
        // byte array).
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as libc::c_ushort;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = ifindex as libc::c_int;
        // SAFETY: `addr` is a valid sockaddr_ll and its exact size is
        // passed.
        check(unsafe {
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })
        .map_err(|e| TapError::Io {
            what: "binding the AF_PACKET socket",
            source: e,
        })?;
        Ok(Self { fd, ifindex })
    }

    /// The interface the socket is bound to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Sends `frames` (whole Ethernet frames) with `sendmmsg`. Returns how
    /// many went out, in order; fewer than `frames.len()` (maybe 0) when
    /// the socket would block.
    pub fn send_batch<F: AsRef<[u8]>>(&self, frames: &[F]) -> io::Result<usize> {
        let mut sent = 0usize;
        for chunk in frames.chunks(MMSG_BATCH) {
            // SAFETY: iovec and mmsghdr are plain C structs of integers and
            // raw pointers; all-zero bytes are valid for every field.
            let mut iovs: [libc::iovec; MMSG_BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut msgs: [libc::mmsghdr; MMSG_BATCH] = unsafe { std::mem::zeroed() };
            for (iov, f) in iovs.iter_mut().zip(chunk) {
                let f = f.as_ref();
                iov.iov_base = f.as_ptr().cast_mut().cast();
                iov.iov_len = f.len();
            }
            for (msg, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
                msg.msg_hdr.msg_iov = iov;
                msg.msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: the first `chunk.len()` messages each point at one
            // iovec describing a live frame of `frames`; the kernel only
            // reads them and writes `msg_len`. The bound socket supplies
            // the destination, so there is no msg_name.
            let rc = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    chunk.len() as libc::c_uint,
                    0,
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if sent > 0 || err.kind() == io::ErrorKind::WouldBlock {
                    return Ok(sent);
                }
                return Err(err);
            }
            sent += rc as usize;
            if (rc as usize) < chunk.len() {
                break;
            }
        }
        Ok(sent)
    }

    /// Receives up to `bufs.len()` frames with `recvmmsg`, each into one
    /// buffer (whose length becomes the frame's; a buffer with less than
    /// [`RECV_FRAME_ROOM`] bytes of capacity gets that much, and a frame
    /// longer than the capacity is cut). Returns how many buffers were
    /// filled: 0 if nothing is waiting.
    pub fn recv_batch(&self, bufs: &mut [Vec<u8>]) -> io::Result<usize> {
        let mut got = 0usize;
        while got < bufs.len() {
            let want = (bufs.len() - got).min(MMSG_BATCH);
            // SAFETY: iovec, sockaddr_ll and mmsghdr are plain C structs
            // of integers, byte arrays and raw pointers; all-zero bytes
            // are valid for every field.
            let mut iovs: [libc::iovec; MMSG_BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut addrs: [libc::sockaddr_ll; MMSG_BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut msgs: [libc::mmsghdr; MMSG_BATCH] = unsafe { std::mem::zeroed() };
            for (iov, buf) in iovs.iter_mut().zip(&mut bufs[got..got + want]) {
                buf.clear();
                if buf.capacity() < RECV_FRAME_ROOM {
                    buf.reserve(RECV_FRAME_ROOM);
                }
                iov.iov_base = buf.as_mut_ptr().cast();
                iov.iov_len = buf.capacity();
            }
            for ((msg, iov), addr) in msgs.iter_mut().zip(iovs.iter_mut()).zip(addrs.iter_mut()) {
                msg.msg_hdr.msg_iov = iov;
                msg.msg_hdr.msg_iovlen = 1;
                msg.msg_hdr.msg_name = (addr as *mut libc::sockaddr_ll).cast();
                msg.msg_hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            }
            // SAFETY: the first `want` messages each point at one iovec
            // covering the spare capacity of a distinct buffer of `bufs`
            // and at a sockaddr_ll of the size given; all outlive the
            // call. A null timeout means none.
            let rc = unsafe {
                libc::recvmmsg(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    want as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ if got > 0 => break,
                    _ => return Err(err),
                }
            }
            let k = rc as usize;
            let mut kept = got;
            for (i, (msg, addr)) in msgs[..k].iter().zip(&addrs[..k]).enumerate() {
                let idx = got + i;
                if addr.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                let len = (msg.msg_len as usize).min(bufs[idx].capacity());
                // SAFETY: the kernel wrote `msg_len` bytes at the start of
                // this buffer's allocation, and `len` is no more than that
                // nor than the capacity.
                unsafe { bufs[idx].set_len(len) };
                bufs.swap(kept, idx);
                kept += 1;
            }
            got = kept;
            if k < want {
                break;
            }
        }
        Ok(got)
    }

    /// Waits until a frame can be received, for at most `timeout` (forever
    /// if `None`). Returns whether one can.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        poll_fd(self.fd.as_raw_fd(), libc::POLLIN, timeout)
    }

    /// Waits until the socket can send, for at most `timeout`.
    pub fn wait_writable(&self, timeout: Option<Duration>) -> io::Result<bool> {
        poll_fd(self.fd.as_raw_fd(), libc::POLLOUT, timeout)
    }

    /// Frames received and dropped (receive buffer full) since the previous
    /// call; the kernel resets its counters on every read.
    pub fn stats(&self) -> io::Result<PacketStats> {
        let mut st = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: `st` is a tpacket_stats of the size passed in `len`,
        // both outlive the call.
        check(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        })?;
        Ok(PacketStats {
            packets: u64::from(st.tp_packets),
            drops: u64::from(st.tp_drops),
        })
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Walks a chain into `out`, checking every descriptor against guest RAM
/// and the expected direction. Returns the total length. (The tap device
/// walks chains with `virtio_queue`; the netmap worker uses its own
/// `DeviceQueue::walk`.)
fn collect_chain<I: Iterator<Item = Descriptor>>(
    mem: &GuestMemoryMmap,
    chain: I,
    writable: bool,
    out: &mut Vec<Descriptor>,
) -> Result<usize, ChainError> {
    out.clear();
    let mut total = 0usize;
    let mut last_has_next = false;
    for d in chain {
        if out.len() == MAX_CHAIN {
            return Err(ChainError::Bad("chain too long or looping"));
        }
        if d.len() == 0 {
            return Err(ChainError::Bad("zero-length descriptor"));
        }
        if d.is_write_only() != writable {
            return Err(ChainError::Bad("descriptor in the wrong direction"));
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(ChainError::Bad("descriptor outside guest memory"));
        }
        total += d.len() as usize;
        last_has_next = d.has_next();
        out.push(d);
    }
    if out.is_empty() {
        return Err(ChainError::BadHead);
    }
    if last_has_next {
        // The walk stopped at a `next` outside the table or at the
        // queue-size bound of a loop.
        return Err(ChainError::Bad("broken or looping chain"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    //! These tests create tap interfaces: they need root (CAP_NET_ADMIN
    //! and CAP_NET_RAW) and /dev/net/tun, and fail, saying which, without
    //! them.

    use super::*;
    use crate::virtio::driver::{SyntheticDriver, BUF_SIZE};
    use std::time::Instant;
    use vm_memory::GuestAddress;

    const N: u64 = 10_000;
    /// IEEE local experimental EtherType: nothing in the kernel handles it.
    const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
    const MAC: [u8; 6] = [0x02, 0x54, 0, 0, 0, 1];
    /// With every frame sent, this long without one arriving means the
    /// rest is lost.
    const QUIET: Duration = Duration::from_millis(500);
    /// This long without progress while frames are still being sent is a
    /// stall.
    const STALL: Duration = Duration::from_secs(30);
    /// The header the tap puts in front of a frame from the packet socket,
    /// with num_buffers = 1.
    const RX_HDR: [u8; HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

    fn frame(seq: u64, len: usize, out: &mut Vec<u8>) {
        out.clear();
        out.resize(len, 0);
        out[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
        out[6..12].copy_from_slice(&MAC);
        out[12..14].copy_from_slice(&ETHERTYPE);
        out[14..22].copy_from_slice(&seq.to_le_bytes());
        for (i, b) in out.iter_mut().enumerate().skip(22) {
            *b = (seq as u8).wrapping_mul(31).wrapping_add(i as u8);
        }
    }

    /// The sequence number of one of our frames; None for anything else.
    fn seq_of(f: &[u8]) -> Option<u64> {
        if f.len() < 22 || f[12..14] != ETHERTYPE {
            return None;
        }
        Some(u64::from_le_bytes(f[14..22].try_into().unwrap()))
    }

    fn tx_len(seq: u64) -> usize {
        60 + (seq as usize * 13) % 1455
    }

    fn rx_len(seq: u64) -> usize {
        60 + (seq as usize * 7) % 1455
    }

    fn len_64(_: u64) -> usize {
        64
    }

    struct Rig {
        net: TapNet,
        sock: PacketSocket,
        drv: SyntheticDriver,
    }

    fn new_rig() -> Rig {
        let tap =
            Tap::new().unwrap_or_else(|e| panic!("the tap tests need root and {TUN_PATH}: {e}"));
        let sock = PacketSocket::bind(tap.ifindex())
            .unwrap_or_else(|e| panic!("the tap tests need root (CAP_NET_RAW): {e}"));
        let drv = SyntheticDriver::new(QUEUE_SIZE).unwrap();
        let mut net = TapNet::new(MAC, tap);
        net.activate(drv.activation(TapNet::FEATURES)).unwrap();
        Rig { net, sock, drv }
    }

    #[derive(Clone, Copy)]
    enum Limit {
        Frames(u64),
        Time(Duration),
    }

    impl Limit {
        /// How many more frames may be sent now.
        fn allowance(&self, sent: u64, start: Instant) -> u64 {
            match *self {
                Limit::Frames(n) => n - sent,
                Limit::Time(d) if start.elapsed() < d => u64::MAX,
                Limit::Time(_) => 0,
            }
        }
    }

    /// Sets the flag when dropped, so that a panicking side stops the other.
    struct AbortOnDrop<'a>(&'a AtomicBool);

    impl Drop for AbortOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }

    #[derive(Debug)]
    struct Outcome {
        sent: u64,
        delivered: u64,
        /// Frames that were not ours (the kernel's own traffic).
        foreign: u64,
        /// From the start to the last frame delivered.
        elapsed: Duration,
        socket_drops: u64,
        link: LinkStats,
    }

    impl Outcome {
        fn rate(&self) -> f64 {
            self.delivered as f64 / self.elapsed.as_secs_f64()
        }
    }

    fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
        h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Driver → TapNet → tap → packet socket. The driver keeps at most
    /// `window` frames ahead of the socket side so that the socket's
    /// receive buffer cannot overflow.
    fn run_tx(rig: &mut Rig, limit: Limit, len_of: fn(u64) -> usize, window: u64) -> Outcome {
        let link0 = rig.net.link_stats().unwrap();
        let _ = rig.sock.stats().unwrap();
        let received = AtomicU64::new(0);
        let total = AtomicU64::new(u64::MAX);
        let abort = AtomicBool::new(false);
        let sock = &rig.sock;
        let drv = &mut rig.drv;
        let start = Instant::now();
        let (sent, delivered, foreign, end) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut bufs: Vec<Vec<u8>> = (0..MMSG_BATCH)
                    .map(|_| Vec::with_capacity(RECV_FRAME_ROOM))
                    .collect();
                let mut expect = Vec::new();
                let (mut next, mut foreign) = (0u64, 0u64);
                let mut last = Instant::now();
                loop {
                    let n = sock.recv_batch(&mut bufs).expect("recvmmsg");
                    for b in &bufs[..n] {
                        let Some(seq) = seq_of(b) else {
                            foreign += 1;
                            continue;
                        };
                        if seq != next {
                            let drops = sock.stats().map(|s| s.drops).unwrap_or(0);
                            panic!("TX: frame {seq} arrived where {next} was due; kernel drops on the socket: {drops}");
                        }
                        frame(seq, len_of(seq), &mut expect);
                        assert!(b[..] == expect[..], "TX: frame {seq} arrived corrupted");
                        next += 1;
                    }
                    if n > 0 {
                        received.store(next, Ordering::Release);
                        last = Instant::now();
                        continue;
                    }
                    let t = total.load(Ordering::Acquire);
                    if next >= t || (t != u64::MAX && last.elapsed() > QUIET) {
                        break;
                    }
                    assert!(!abort.load(Ordering::Acquire), "TX: the driver side failed");
                    assert!(last.elapsed() < STALL, "TX: stalled at frame {next}");
                    let _ = sock.wait(Some(Duration::from_millis(5)));
                }
                (next, foreign, last)
            });
            let _abort = AbortOnDrop(&abort);
            let (mut sent, mut armed) = (0u64, false);
            let (mut pkt, mut buf) = (Vec::new(), Vec::new());
            loop {
                let mut progress = false;
                while drv.tx.reap(&drv.mem).is_some() {
                    progress = true;
                }
                let allowance = limit.allowance(sent, start);
                if allowance == 0 {
                    break;
                }
                let room = window - (sent - received.load(Ordering::Acquire));
                let n = allowance.min(room).min(drv.tx.free() as u64);
                for _ in 0..n {
                    frame(sent, len_of(sent), &mut pkt);
                    SyntheticDriver::tx_buffer(&pkt, &mut buf);
                    assert!(drv.tx.post(&drv.mem, Some(&buf)));
                    sent += 1;
                }
                if n > 0 {
                    drv.tx.publish(&drv.mem);
                    progress = true;
                }
                if progress {
                    armed = false;
                    continue;
                }
                if reader.is_finished() {
                    break;
                }
                if drv.tx.free() == 0 {
                    // Waiting for the device: ask for an interrupt at the
                    // next used entry, look once more, then sleep.
                    if !armed {
                        drv.tx.request_interrupt(&drv.mem, 1);
                        armed = true;
                        continue;
                    }
                    let evt = &drv.interrupt.evt;
                    let _ = poll_fd(
                        evt.as_raw_fd(),
                        libc::POLLIN,
                        Some(Duration::from_millis(1)),
                    );
                    let _ = evt.read();
                    armed = false;
                } else {
                    // Waiting for the socket side to catch up.
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
            total.store(sent, Ordering::Release);
            let (delivered, foreign, end) = join(reader);
            (sent, delivered, foreign, end)
        });
        Outcome {
            sent,
            delivered,
            foreign,
            elapsed: end.saturating_duration_since(start),
            socket_drops: rig.sock.stats().unwrap().drops,
            link: rig.net.link_stats().unwrap().since(&link0),
        }
    }

    /// Packet socket → tap → TapNet → driver. The socket side keeps at
    /// most `window` frames ahead of the driver so that the tap's ring
    /// (TAP_TXQUEUELEN) cannot overflow.
    fn run_rx(rig: &mut Rig, limit: Limit, len_of: fn(u64) -> usize, window: u64) -> Outcome {
        assert!(window < TAP_TXQUEUELEN as u64);
        let link0 = rig.net.link_stats().unwrap();
        let received = AtomicU64::new(0);
        let total = AtomicU64::new(u64::MAX);
        let abort = AtomicBool::new(false);
        let sock = &rig.sock;
        let drv = &mut rig.drv;
        while drv.rx.free() > 0 {
            drv.rx.post(&drv.mem, None);
        }
        drv.rx.publish(&drv.mem);
        let start = Instant::now();
        let (sent, delivered, foreign, end) = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let mut frames: Vec<Vec<u8>> = (0..MMSG_BATCH).map(|_| Vec::new()).collect();
                let mut sent = 0u64;
                loop {
                    let allowance = limit.allowance(sent, start);
                    if allowance == 0 || abort.load(Ordering::Acquire) {
                        break;
                    }
                    let room = window - (sent - received.load(Ordering::Acquire));
                    let k = allowance.min(room).min(MMSG_BATCH as u64) as usize;
                    if k == 0 {
                        std::thread::sleep(Duration::from_micros(20));
                        continue;
                    }
                    for (i, f) in frames[..k].iter_mut().enumerate() {
                        let seq = sent + i as u64;
                        frame(seq, len_of(seq), f);
                    }
                    let n = sock.send_batch(&frames[..k]).expect("sendmmsg");
                    sent += n as u64;
                    if n == 0 {
                        let _ = sock.wait_writable(Some(Duration::from_millis(1)));
                    }
                }
                total.store(sent, Ordering::Release);
                sent
            });
            let _abort = AbortOnDrop(&abort);
            let (mut next, mut foreign, mut armed) = (0u64, 0u64, false);
            let mut data = vec![0u8; BUF_SIZE as usize];
            let mut expect = Vec::new();
            let mut last = Instant::now();
            loop {
                let mut reaped = false;
                while let Some((_, len, addr)) = drv.rx.reap(&drv.mem) {
                    let len = len as usize;
                    assert!(
                        (HDR_LEN..=BUF_SIZE as usize).contains(&len),
                        "RX: used length {len}"
                    );
                    drv.mem
                        .read_slice(&mut data[..len], GuestAddress(addr))
                        .unwrap();
                    let f = &data[HDR_LEN..len];
                    if let Some(seq) = seq_of(f) {
                        if seq != next {
                            let drops = LinkStats::read(rig.net.if_name())
                                .map(|l| l.since(&link0).tx_dropped)
                                .unwrap_or(0);
                            panic!("RX: frame {seq} arrived where {next} was due; kernel drops on the tap: {drops}");
                        }
                        assert_eq!(data[..HDR_LEN], RX_HDR, "RX: header of frame {seq}");
                        frame(seq, len_of(seq), &mut expect);
                        assert!(f == &expect[..], "RX: frame {seq} arrived corrupted");
                        next += 1;
                    } else {
                        foreign += 1;
                    }
                    assert!(drv.rx.post(&drv.mem, None));
                    reaped = true;
                }
                if reaped {
                    drv.rx.publish(&drv.mem);
                    received.store(next, Ordering::Release);
                    last = Instant::now();
                    armed = false;
                    continue;
                }
                let t = total.load(Ordering::Acquire);
                if next >= t || (t != u64::MAX && last.elapsed() > QUIET) {
                    break;
                }
                assert!(last.elapsed() < STALL, "RX: stalled at frame {next}");
                if !armed {
                    drv.rx.request_interrupt(&drv.mem, 1);
                    armed = true;
                    continue;
                }
                let evt = &drv.interrupt.evt;
                let _ = poll_fd(
                    evt.as_raw_fd(),
                    libc::POLLIN,
                    Some(Duration::from_millis(1)),
                );
                let _ = evt.read();
                armed = false;
            }
            let sent = join(writer);
            (sent, next, foreign, last)
        });
        Outcome {
            sent,
            delivered,
            foreign,
            elapsed: end.saturating_duration_since(start),
            socket_drops: 0,
            link: rig.net.link_stats().unwrap().since(&link0),
        }
    }

    fn g(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[test]
    fn tap_tx_delivers_every_frame_intact_and_in_order() {
        let mut rig = new_rig();
        let out = run_tx(&mut rig, Limit::Frames(N), tx_len, 1024);
        rig.net.reset();
        let c = rig.net.counters();
        eprintln!("tap TX: {out:?}; device: {}", c.summary());
        assert_eq!(
            out.socket_drops, 0,
            "the kernel dropped frames on the packet socket"
        );
        assert_eq!(
            out.link.rx_dropped, 0,
            "the kernel dropped frames on the tap"
        );
        assert_eq!((out.sent, out.delivered, out.foreign), (N, N, 0));
        assert_eq!(g(&c.tx_frames), N);
        assert_eq!(out.link.rx_packets, N);
        assert_eq!(c.guest_errors(), 0);
        assert_eq!(g(&rig.net.tap_counters().tx_errors), 0);
    }

    #[test]
    fn tap_rx_delivers_every_frame_intact_with_the_header() {
        let mut rig = new_rig();
        let out = run_rx(&mut rig, Limit::Frames(N), rx_len, 1024);
        rig.net.reset();
        let c = rig.net.counters();
        eprintln!("tap RX: {out:?}; device: {}", c.summary());
        assert_eq!(
            out.link.tx_dropped, 0,
            "the kernel dropped frames on the tap"
        );
        assert_eq!((out.sent, out.delivered), (N, N));
        // Anything the kernel itself sent on the interface is counted, not
        // hidden.
        assert_eq!(g(&c.rx_frames), N + out.foreign);
        assert_eq!(g(&c.rx_too_big), 0);
        assert_eq!(c.guest_errors(), 0);
        assert_eq!(g(&rig.net.tap_counters().rx_errors), 0);
    }

    #[test]
    fn tap_tx_returns_bad_chains_and_keeps_going() {
        let mut rig = new_rig();
        let drv = &mut rig.drv;
        // A header and 8 bytes: shorter than an Ethernet header.
        assert!(drv.tx.post(&drv.mem, Some(&[0u8; HDR_LEN + 8])));
        let (mut pkt, mut buf) = (Vec::new(), Vec::new());
        frame(0, 60, &mut pkt);
        SyntheticDriver::tx_buffer(&pkt, &mut buf);
        assert!(drv.tx.post(&drv.mem, Some(&buf)));
        drv.tx.publish(&drv.mem);
        let mut bufs = vec![Vec::new()];
        let deadline = Instant::now() + Duration::from_secs(5);
        while rig.sock.recv_batch(&mut bufs).unwrap() == 0 {
            assert!(Instant::now() < deadline, "the good frame never arrived");
            let _ = rig.sock.wait(Some(Duration::from_millis(10)));
        }
        assert_eq!(bufs[0], pkt);
        rig.net.reset();
        let c = rig.net.counters();
        assert_eq!((g(&c.bad_chains), g(&c.tx_frames)), (1, 1));
        let mut used = 0;
        while rig.drv.tx.reap(&rig.drv.mem).is_some() {
            used += 1;
        }
        assert_eq!(used, 2, "both chains are returned to the driver");
    }

    #[test]
    fn tap_throughput_64_byte_frames() {
        let secs = Duration::from_secs(1);
        let mut rig = new_rig();
        let tx = run_tx(&mut rig, Limit::Time(secs), len_64, 4096);
        rig.net.reset();
        let c = rig.net.counters();
        println!(
            "tap TX 64 B: {:.0} frames/s ({} frames in {:.3} s; lost {}; socket drops {}, tap rx_dropped {}); {} kicks, {} interrupts, {} wakeups",
            tx.rate(),
            tx.delivered,
            tx.elapsed.as_secs_f64(),
            tx.sent - tx.delivered,
            tx.socket_drops,
            tx.link.rx_dropped,
            g(&c.kicks),
            g(&c.interrupts),
            g(&c.wakeups),
        );
        let mut rig = new_rig();
        let rx = run_rx(&mut rig, Limit::Time(secs), len_64, 4096);
        rig.net.reset();
        let c = rig.net.counters();
        println!(
            "tap RX 64 B: {:.0} frames/s ({} frames in {:.3} s; lost {}; tap tx_dropped {}; {} foreign); {} kicks, {} interrupts, {} wakeups",
            rx.rate(),
            rx.delivered,
            rx.elapsed.as_secs_f64(),
            rx.sent - rx.delivered,
            rx.link.tx_dropped,
            rx.foreign,
            g(&c.kicks),
            g(&c.interrupts),
            g(&c.wakeups),
        );
    }
}
