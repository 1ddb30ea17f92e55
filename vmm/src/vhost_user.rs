//! `nmvm vhost-user`: nmvm's virtio-net device served to another VMM (QEMU,
//! cloud-hypervisor, …) over the vhost-user protocol.
//!
//! One device model, two transports: the queues are processed by the very
//! same [`Net`] device and worker thread that `nmvm run` puts behind its
//! virtio-pci transport. Here the transport is a Unix socket on which the
//! frontend (the VMM that runs the guest) describes the guest's memory (file
//! descriptors to map), the rings (addresses in the frontend's address
//! space) and one kick and one call eventfd per ring. The rust-vmm `vhost`
//! crate parses the messages ([`BackendReqHandler`]); [`Backend`] keeps the
//! state they build up and activates [`Net`] once both rings are complete
//! (size, addresses, kick eventfd, enabled) and the memory table is known.
//! The worker then polls the kick eventfds itself and interrupts the guest by
//! writing the call eventfds ([`CallFds`], the device's [`VirtioInterrupt`]).
//! Any message that changes what the worker uses (memory table, ring
//! layout, kick eventfd, features, enable) stops the worker first and starts
//! it again afterwards if the rings are still complete; GET_VRING_BASE
//! stops it and answers with the ring's next avail index, which the worker
//! saved as it ended ([`Net::queue_positions`]).
//!
//! The frontend is untrusted: memory regions are checked against the size
//! of the file they map, must not overlap, and rings must lie inside one
//! region; anything else is refused with an error that names the message,
//! the connection is closed and the backend waits for the next one. A
//! frontend that disappears is a disconnection like any other: the worker is
//! stopped, its memory unmapped, its eventfds closed, and the port kept for
//! the next connection.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use log::{debug, info, warn};
use nmvm_devices::netmap::{NetmapError, Port, PortOptions};
use nmvm_devices::virtio::net::{Net, NetCounters, QueuePosition, F_MAC, F_STATUS};
use nmvm_devices::virtio::{
    Activation, VirtioDevice, VirtioInterrupt, F_RING_EVENT_IDX, F_VERSION_1,
};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
/// A mapping base address as the protocol crate spells it (`vhost::backend`, private).
type VhostUserMemoryRegionBase = u64;
use vhost::vhost_user::{
    BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult,
    VhostUserBackendReqHandlerMut,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::eventfd::EventFd;

/// Feature bit 30: the vhost-user protocol features are available.
const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// virtio-net's queues: 0 receive, 1 transmit.
const NUM_QUEUES: usize = 2;
/// The largest ring accepted (QEMU's limit; virtio allows 32768).
const MAX_RING: u16 = 1024;
/// How often a blocked wait looks at the stop flag.
const POLL_MS: i32 = 200;
/// How long the rest of a message may take once its first byte arrived.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// The device's MAC address is the frontend's business (it answers the
/// guest's configuration reads); the device model only needs one.
const UNUSED_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// What `nmvm vhost-user` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The Unix socket to create and listen on.
    pub socket: PathBuf,
    /// The netmap port behind the device.
    pub port: String,
    /// Create the userspace pipe with a 12-byte virtio-net header, which
    /// makes the device offer checksum and TSO offloads.
    pub vnet_hdr: bool,
    /// Slots per ring of a userspace pipe, if the backend opens it first.
    pub pipe_slots: u32,
    /// Stop after serving this many connections (`None`: until a signal).
    pub connections: Option<u64>,
    /// Print the device's counters after each connection.
    pub stats: bool,
}

/// Why `nmvm vhost-user` could not serve at all. (A bad connection is not
/// one of these: it is reported and the next one is served.)
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The netmap port could not be opened.
    #[error("cannot open the netmap port {port}")]
    Port {
        /// The port's name.
        port: String,
        /// Why.
        #[source]
        source: Box<NetmapError>,
    },
    /// The socket could not be created.
    #[error("cannot listen on {}: {what}", path.display())]
    Listen {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket's path is taken by something that is not a socket.
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    PathTaken(PathBuf),
    /// The protocol thread could not be confined.
    #[error(transparent)]
    Seccomp(#[from] nmvm::seccomp::SeccompError),
    /// The handler that survives a frontend shrinking its memory could not
    /// be installed.
    #[error("cannot install the SIGBUS handler: {0}")]
    Sigbus(#[source] io::Error),
}

/// A frontend request the backend refuses. Reported (with the request's
/// name) to the frontend as a failure, in the log, and the connection is
/// closed.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("ring index {0} does not exist (virtio-net has ring 0, receive, and 1, transmit)")]
    BadIndex(u32),
    #[error("ring size {0} is not a power of two between 1 and {MAX_RING}")]
    BadSize(u32),
    #[error("ring base {0} is larger than 65535 (packed rings are not offered)")]
    BadBase(u32),
    #[error("the frontend accepted features {0:#x} that the backend does not offer")]
    UnofferedFeatures(u64),
    #[error("the driver did not accept VERSION_1 (legacy virtio is not supported)")]
    NoVersion1,
    #[error(
        "memory region {index} (guest {gpa:#x}, {size:#x} bytes at file offset {offset:#x}): {why}"
    )]
    BadRegion {
        index: usize,
        gpa: u64,
        size: u64,
        offset: u64,
        why: String,
    },
    #[error("the memory table is unusable: {0}")]
    BadMemoryTable(String),
    #[error("ring {ring}: the {what} at frontend address {addr:#x} (+{len:#x} bytes) is not inside one memory region")]
    RingOutsideMemory {
        ring: usize,
        what: &'static str,
        addr: u64,
        len: u64,
    },
    #[error("ring {ring}: the {what} at frontend address {addr:#x} is not {align}-byte aligned")]
    RingMisaligned {
        ring: usize,
        what: &'static str,
        addr: u64,
        align: u64,
    },
    #[error("ring {0}: polling without a kick eventfd is not supported")]
    NoKickFd(u8),
    #[error("the {0} file descriptor is not an eventfd ({1})")]
    NotEventFd(&'static str, String),
    #[error("the device could not start: {0}")]
    Activate(String),
    #[error("not supported by this backend")]
    Unsupported,
}

/// Locks `m`, also when a panicking thread poisoned it (the data are
/// plain values that stay consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guest-facing interrupts: one call eventfd per ring, written when the
/// device used buffers; and the rings' error eventfds, written when the
/// device needs a reset (vhost-user has no configuration interrupt
/// without a backend channel; QEMU reports a vring error).
#[derive(Debug, Default)]
pub struct CallFds {
    call: [Mutex<Option<EventFd>>; NUM_QUEUES],
    err: [Mutex<Option<EventFd>>; NUM_QUEUES],
}

impl VirtioInterrupt for CallFds {
    fn signal_queue(&self, queue: u16) {
        if let Some(slot) = self.call.get(usize::from(queue)) {
            if let Some(fd) = lock(slot).as_ref() {
                if let Err(e) = fd.write(1) {
                    debug!("vhost-user: cannot signal ring {queue}: {e}");
                }
            }
        }
    }

    fn signal_config(&self) {
        for slot in &self.err {
            if let Some(fd) = lock(slot).as_ref() {
                let _ = fd.write(1);
            }
        }
    }
}

/// A memory region as the frontend described it.
#[derive(Debug, Clone, Copy)]
struct RegionMap {
    gpa: u64,
    size: u64,
    user_addr: u64,
}

/// Guest memory: the mappings and how frontend addresses translate.
#[derive(Debug)]
struct Memory {
    /// The mappings' SIGBUS protection (the frontend may shrink its
    /// files); declared first so it ends before the mappings do.
    _protected: Vec<nmvm::sigbus::Protected>,
    mem: GuestMemoryMmap,
    regions: Vec<RegionMap>,
}

impl Memory {
    /// Maps the regions of a SET_MEM_TABLE, each from its own file at its
    /// own offset, after checking them.
    fn map(table: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<Self, RequestError> {
        if table.len() != files.len() {
            return Err(RequestError::BadMemoryTable(format!(
                "{} regions but {} file descriptors",
                table.len(),
                files.len()
            )));
        }
        let mut mapped = Vec::with_capacity(table.len());
        let mut regions = Vec::with_capacity(table.len());
        for (index, (r, file)) in table.iter().zip(files).enumerate() {
            let bad = |why: String| RequestError::BadRegion {
                index,
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                offset: r.mmap_offset,
                why,
            };
            if r.memory_size == 0 {
                return Err(bad("empty region".into()));
            }
            let end = r.mmap_offset.checked_add(r.memory_size);
            let fits = r.guest_phys_addr.checked_add(r.memory_size).is_some()
                && r.user_addr.checked_add(r.memory_size).is_some();
            let (Some(end), true) = (end, fits) else {
                return Err(bad("the region wraps around".into()));
            };
            let size = usize::try_from(r.memory_size).map_err(|_| bad("too large".into()))?;
            // A mapping beyond the end of the file would fault (SIGBUS) on
            // access instead of failing here.
            let file_len = file
                .metadata()
                .map_err(|e| bad(format!("cannot stat the file: {e}")))?
                .len();
            if end > file_len {
                return Err(bad(format!(
                    "the region ends beyond the end of its file ({file_len:#x} bytes)"
                )));
            }
            let mapping = MmapRegion::from_file(FileOffset::new(file, r.mmap_offset), size)
                .map_err(|e| bad(format!("cannot map it: {e}")))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_phys_addr))
                .ok_or_else(|| bad("the region wraps around".into()))?;
            mapped.push(region);
            regions.push(RegionMap {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                user_addr: r.user_addr,
            });
        }
        // Ring addresses are translated through the frontend's addresses:
        // they must be unambiguous too.
        let mut by_user: Vec<RegionMap> = regions.clone();
        by_user.sort_by_key(|r| r.user_addr);
        if by_user
            .windows(2)
            .any(|w| w[0].user_addr + w[0].size > w[1].user_addr)
        {
            return Err(RequestError::BadMemoryTable(
                "regions overlap in the frontend's address space".into(),
            ));
        }
        mapped.sort_by_key(|r| r.start_addr());
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(|e| {
            RequestError::BadMemoryTable(format!("regions overlap in guest memory ({e})"))
        })?;
        // Registered only now that every mapping lives in `mem`: a failed
        // step above unmaps what it was given, and a registration must never
        // outlive its mapping.
        let protected = mem
            .iter()
            .filter_map(|r| nmvm::sigbus::protect(r.as_ptr(), r.len() as usize))
            .collect();
        Ok(Self {
            _protected: protected,
            mem,
            regions,
        })
    }

    /// The guest-physical address of `[addr, addr + len)` in the frontend's
    /// address space, if it lies inside one region.
    fn gpa(&self, addr: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = addr.checked_sub(r.user_addr)?;
            (off < r.size && len <= r.size - off).then_some(r.gpa + off)
        })
    }
}

/// One ring as the frontend set it up.
#[derive(Debug, Default)]
struct Vring {
    size: Option<u16>,
    /// Descriptor table, avail ring, used ring: frontend addresses.
    addr: Option<[u64; 3]>,
    /// Where the device starts (SET_VRING_BASE) or stopped.
    pos: QueuePosition,
    /// Set by SET_VRING_KICK (the ring is started), taken by
    /// GET_VRING_BASE (stopped).
    kick: Option<Arc<EventFd>>,
    /// SET_VRING_ENABLE (sticky: QEMU may enable a ring before it sets it
    /// up).
    enabled: bool,
}

/// The vhost-user state of one device, across connections.
pub struct Backend {
    net: Net,
    offered: u64,
    acked: Option<u64>,
    memory: Option<Memory>,
    vrings: [Vring; NUM_QUEUES],
    signals: Arc<CallFds>,
    running: bool,
    /// Times the device was started (all connections).
    pub starts: u64,
}

impl Backend {
    /// A backend for `net`.
    pub fn new(net: Net) -> Self {
        // MAC, STATUS (and the control queue) are the frontend's; the
        // offloads are offered exactly when the port carries the header.
        let offered = (net.features() & !(F_MAC | F_STATUS)) | F_PROTOCOL_FEATURES;
        Self {
            net,
            offered,
            acked: None,
            memory: None,
            vrings: Default::default(),
            signals: Arc::default(),
            running: false,
            starts: 0,
        }
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.net.counters()
    }

    /// Features the backend offers (GET_FEATURES).
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Forgets everything a connection set up: stops the device, unmaps
    /// guest memory and closes the eventfds. The port stays.
    pub fn disconnect(&mut self) {
        self.stop();
        self.acked = None;
        self.memory = None;
        self.vrings = Default::default();
        for slot in self.signals.call.iter().chain(&self.signals.err) {
            *lock(slot) = None;
        }
    }

    fn vring(&mut self, index: u32) -> Result<&mut Vring, RequestError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.vrings.get_mut(i))
            .ok_or(RequestError::BadIndex(index))
    }

    fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.net.reset();
        self.running = false;
        match self.net.queue_positions() {
            Some(positions) => {
                for (v, p) in self.vrings.iter_mut().zip(positions) {
                    v.pos = p;
                }
                debug!("vhost-user: device stopped at {positions:?}");
            }
            None => warn!("vhost-user: the device worker did not report its ring positions"),
        }
    }

    /// Everything the device needs is there.
    fn complete(&self) -> bool {
        let implicit_enable = self.acked.is_some_and(|f| f & F_PROTOCOL_FEATURES == 0);
        self.memory.is_some()
            && self.acked.is_some()
            && self.vrings.iter().all(|v| {
                v.size.is_some()
                    && v.addr.is_some()
                    && v.kick.is_some()
                    && (v.enabled || implicit_enable)
            })
    }

    /// Starts the device if it is stopped and complete.
    fn update(&mut self) -> Result<(), RequestError> {
        if self.running || !self.complete() {
            return Ok(());
        }
        let (Some(memory), Some(acked)) = (&self.memory, self.acked) else {
            return Ok(());
        };
        if acked & F_VERSION_1 == 0 {
            return Err(RequestError::NoVersion1);
        }
        let mut queues = Vec::with_capacity(NUM_QUEUES);
        let mut kicks = Vec::with_capacity(NUM_QUEUES);
        for (ring, v) in self.vrings.iter().enumerate() {
            let (Some(size), Some([desc, avail, used]), Some(kick)) = (v.size, v.addr, &v.kick)
            else {
                return Ok(());
            };
            let n = u64::from(size);
            let part = |what, addr: u64, len: u64, align: u64| {
                if addr % align != 0 {
                    return Err(RequestError::RingMisaligned {
                        ring,
                        what,
                        addr,
                        align,
                    });
                }
                memory
                    .gpa(addr, len)
                    .ok_or(RequestError::RingOutsideMemory {
                        ring,
                        what,
                        addr,
                        len,
                    })
            };
            let desc = part("descriptor table", desc, 16 * n, 16)?;
            let avail = part("avail ring", avail, 6 + 2 * n, 2)?;
            let used = part("used ring", used, 6 + 8 * n, 4)?;
            let mut q = Queue::new(MAX_RING).map_err(|e| RequestError::Activate(e.to_string()))?;
            let bad = |e: virtio_queue::Error| RequestError::Activate(format!("ring {ring}: {e}"));
            q.try_set_size(size).map_err(bad)?;
            q.try_set_desc_table_address(GuestAddress(desc))
                .map_err(bad)?;
            q.try_set_avail_ring_address(GuestAddress(avail))
                .map_err(bad)?;
            q.try_set_used_ring_address(GuestAddress(used))
                .map_err(bad)?;
            q.set_event_idx(acked & F_RING_EVENT_IDX != 0);
            q.set_next_avail(v.pos.next_avail);
            q.set_next_used(v.pos.next_used);
            q.set_ready(true);
            queues.push(q);
            kicks.push(kick.clone());
        }
        self.net
            .activate(Activation {
                mem: memory.mem.clone(),
                queues,
                kicks,
                interrupt: self.signals.clone(),
                features: acked & !F_PROTOCOL_FEATURES,
            })
            .map_err(RequestError::Activate)?;
        self.running = true;
        self.starts += 1;
        info!(
            "vhost-user: device started (features {:#x}, rings at {:?} / {:?})",
            acked & !F_PROTOCOL_FEATURES,
            self.vrings[0].pos,
            self.vrings[1].pos
        );
        Ok(())
    }

    /// Runs one request with the device stopped (when `stops`), then starts
    /// it again if it is complete; errors are turned into the protocol
    /// crate's, with the request's name.
    fn request<T>(
        &mut self,
        name: &str,
        stops: bool,
        f: impl FnOnce(&mut Self) -> Result<T, RequestError>,
    ) -> VuResult<T> {
        if stops {
            self.stop();
        }
        let result = f(self).and_then(|v| self.update().map(|()| v));
        result.map_err(|e| {
            debug!("vhost-user: {name}: {e}");
            VuError::ReqHandlerError(io::Error::other(format!("{name}: {e}")))
        })
    }
}

/// Takes an eventfd the frontend sent, after checking that it is one.
fn eventfd(what: &'static str, file: File) -> Result<EventFd, RequestError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("cannot tell: {e}"));
    if link != "anon_inode:[eventfd]" {
        return Err(RequestError::NotEventFd(what, link));
    }
    // SAFETY: the descriptor is open and ours alone (`into_raw_fd` gives up
    // the `File`'s ownership), and it is an eventfd (checked above), which is
    // all `EventFd` assumes of it; it closes it when dropped.
    Ok(unsafe { EventFd::from_raw_fd(file.into_raw_fd()) })
}

fn unsupported<T>(name: &str) -> VuResult<T> {
    warn!("vhost-user: {name}: {}", RequestError::Unsupported);
    Err(VuError::InvalidOperation("not supported by this backend"))
}

impl VhostUserBackendReqHandlerMut for Backend {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.disconnect();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.disconnect();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        self.request("SET_FEATURES", true, |b| {
            let extra = features & !b.offered;
            if extra != 0 {
                return Err(RequestError::UnofferedFeatures(extra));
            }
            b.acked = Some(features);
            Ok(())
        })
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        // Map the new table before stopping the device: a bad table leaves
        // the old one in place (the connection is closed anyway).
        let memory = Memory::map(ctx, files).map_err(|e| {
            debug!("vhost-user: SET_MEM_TABLE: {e}");
            VuError::ReqHandlerError(io::Error::other(format!("SET_MEM_TABLE: {e}")))
        })?;
        debug!("vhost-user: memory table: {:x?}", memory.regions);
        self.request("SET_MEM_TABLE", true, |b| {
            b.memory = Some(memory);
            Ok(None)
        })
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        self.request("SET_VRING_NUM", true, |b| {
            let size = u16::try_from(num)
                .ok()
                .filter(|n| n.is_power_of_two() && *n <= MAX_RING)
                .ok_or(RequestError::BadSize(num))?;
            b.vring(index)?.size = Some(size);
            Ok(())
        })
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        // Checked against the memory table when the device starts (the
        // table may come later or change).
        self.request("SET_VRING_ADDR", true, |b| {
            b.vring(index)?.addr = Some([descriptor, available, used]);
            Ok(())
        })
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.request("SET_VRING_BASE", true, |b| {
            let base = u16::try_from(base).map_err(|_| RequestError::BadBase(base))?;
            b.vring(index)?.pos = QueuePosition {
                next_avail: base,
                next_used: base,
            };
            Ok(())
        })
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        // Stops the ring: the device stops, and starts again only when the
        // frontend sets a kick eventfd.
        self.request("GET_VRING_BASE", true, |b| {
            let v = b.vring(index)?;
            v.kick = None;
            Ok(VhostUserVringState::new(index, u32::from(v.pos.next_avail)))
        })
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.request("SET_VRING_KICK", true, |b| {
            let file = fd.ok_or(RequestError::NoKickFd(index))?;
            let kick = eventfd("kick", file)?;
            b.vring(u32::from(index))?.kick = Some(Arc::new(kick));
            Ok(())
        })
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        // Swapped under the running worker: it writes whichever is current.
        self.request("SET_VRING_CALL", false, |b| {
            let slot = b
                .signals
                .call
                .get(usize::from(index))
                .ok_or(RequestError::BadIndex(u32::from(index)))?;
            let fd = fd.map(|f| eventfd("call", f)).transpose()?;
            *lock(slot) = fd;
            Ok(())
        })
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.request("SET_VRING_ERR", false, |b| {
            let slot = b
                .signals
                .err
                .get(usize::from(index))
                .ok_or(RequestError::BadIndex(u32::from(index)))?;
            let fd = fd.map(|f| eventfd("error", f)).transpose()?;
            *lock(slot) = fd;
            Ok(())
        })
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        // REPLY_ACK is added by the protocol crate.
        Ok(VhostUserProtocolFeatures::MQ)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        debug!("vhost-user: protocol features {features:#x}");
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        // Queue pairs, as QEMU's vhost-user-net reads it.
        Ok(1)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.request("SET_VRING_ENABLE", !enable, |b| {
            b.vring(index)?.enabled = enable;
            Ok(())
        })
    }

    fn get_config(
        &mut self,
        _offset: u32,
        _size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        unsupported("GET_CONFIG")
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        unsupported("SET_CONFIG")
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        unsupported("GPU_SET_SOCKET")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        unsupported("GET_SHARED_OBJECT")
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        unsupported("GET_INFLIGHT_FD")
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        unsupported("SET_INFLIGHT_FD")
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        unsupported("GET_MAX_MEM_SLOTS")
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        unsupported("ADD_MEM_REG")
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        unsupported("REM_MEM_REG")
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        unsupported("SET_DEVICE_STATE_FD")
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        unsupported("CHECK_DEVICE_STATE")
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        unsupported("GET_SHMEM_CONFIG")
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        unsupported("SET_LOG_BASE")
    }
}

/// Creates the listening socket at `path`, replacing a stale socket left
/// by an earlier run (never any other kind of file).
fn listen(path: &Path) -> Result<UnixListener, VhostUserError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| VhostUserError::Listen {
                path: path.into(),
                what: "cannot remove the old socket".into(),
                source,
            })?;
        }
        Ok(_) => return Err(VhostUserError::PathTaken(path.into())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| VhostUserError::Listen {
        path: path.into(),
        what: "bind".into(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| VhostUserError::Listen {
            path: path.into(),
            what: "set_nonblocking".into(),
            source,
        })?;
    Ok(listener)
}

/// Waits until `fd` is readable (true) or `stop` is set or `give_up`
/// says so (false); both are checked at least every [`POLL_MS`].
fn wait_readable(fd: i32, stop: &AtomicBool, give_up: impl Fn() -> bool) -> io::Result<bool> {
    loop {
        if stop.load(Ordering::Relaxed) || give_up() {
            return Ok(false);
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call,
        // and `fd` stays open while we wait (the caller owns it).
        let rc = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else if rc > 0 {
            return Ok(true);
        }
    }
}

/// How a connection ended.
enum Ended {
    /// The frontend closed it.
    Closed,
    /// We were asked to stop.
    Stopped,
}

/// Serves one frontend until it disconnects, sends a bad request, or
/// `stop` is set.
fn serve_connection(
    stream: UnixStream,
    backend: &Arc<Mutex<Backend>>,
    stop: &AtomicBool,
) -> Result<Ended, String> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(MESSAGE_TIMEOUT)))
        .map_err(|e| format!("cannot set up the connection: {e}"))?;
    let mut handler = BackendReqHandler::from_stream(stream, backend.clone());
    // A frontend that shrinks its memory under the device (see `sigbus`)
    // has broken the protocol: its connection ends.
    let rescued = nmvm::sigbus::rescued();
    let shrunk = || nmvm::sigbus::rescued() != rescued;
    loop {
        match wait_readable(handler.as_raw_fd(), stop, shrunk) {
            Ok(true) => {}
            Ok(false) if shrunk() => {
                return Err("the frontend shrank a memory file under the running device".into())
            }
            Ok(false) => return Ok(Ended::Stopped),
            Err(e) => return Err(format!("poll: {e}")),
        }
        early_vring_enable(handler.as_raw_fd(), backend);
        match handler.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected) => return Ok(Ended::Closed),
            // SET_VRING_ENABLE before SET_FEATURES (the only request the
            // protocol crate refuses this way), applied by
            // `early_vring_enable`. QEMU expects no answer; the message
            // was read whole, so the stream is still in step.
            Err(VuError::InactiveFeature(f)) if f == VhostUserVirtioFeatures::PROTOCOL_FEATURES => {
            }
            Err(VuError::SocketBroken(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Ok(Ended::Closed)
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// vhost-user's request code of SET_VRING_ENABLE.
const SET_VRING_ENABLE: u32 = 18;

/// QEMU 7.2 enables the rings with SET_VRING_ENABLE before it sends
/// SET_FEATURES, and not again once it has set them up; the protocol crate
/// refuses such an early request (the spec says the frontend should not
/// send it before PROTOCOL_FEATURES is negotiated) without showing it to the
/// backend. So the next message is peeked at, and an early
/// SET_VRING_ENABLE is applied here (the crate then refuses it, which
/// [`serve_connection`] tolerates). Any other message is left alone.
fn early_vring_enable(fd: i32, backend: &Mutex<Backend>) {
    // Header (request, flags, size) and a vring state (index, num).
    let mut msg = [0u32; 5];
    // SAFETY: `msg` is 20 writable bytes for the duration of the call and
    // `fd` is the connection's open socket; MSG_PEEK leaves the bytes in
    // the socket for the protocol crate, MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            fd,
            msg.as_mut_ptr().cast(),
            std::mem::size_of_val(&msg),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    let [code, _flags, size, index, num] = msg.map(u32::from_le);
    if n != 20 || code != SET_VRING_ENABLE || size != 8 || num > 1 {
        return;
    }
    let mut b = lock(backend);
    if b.acked.is_none() {
        debug!("vhost-user: SET_VRING_ENABLE ring {index} {num} before SET_FEATURES");
        if let Ok(v) = b.vring(index) {
            v.enabled = num == 1;
        }
    }
}

/// What [`serve`] did.
#[derive(Debug, Default)]
pub struct Served {
    /// Connections accepted.
    pub connections: u64,
    /// Connections closed because of a bad request or a socket error.
    pub failed: u64,
}

/// Serves the device on `opts.socket` until `stop` is set or
/// `opts.connections` connections have been served.
pub fn serve(opts: &Options, stop: &AtomicBool) -> Result<Served, VhostUserError> {
    let port_opts = PortOptions {
        vnet_hdr_len: opts.vnet_hdr.then_some(12),
        num_slots: opts.pipe_slots,
        ..PortOptions::default()
    };
    let port = Port::open(&opts.port, &port_opts).map_err(|source| VhostUserError::Port {
        port: opts.port.clone(),
        source: Box::new(source),
    })?;
    let backend = Arc::new(Mutex::new(Backend::new(Net::new(UNUSED_MAC, port))));
    let listener = listen(&opts.socket)?;
    nmvm::sigbus::install().map_err(VhostUserError::Sigbus)?;
    // Set-up is done: from here on the thread serves untrusted frontends.
    nmvm::seccomp::install(nmvm::seccomp::ThreadKind::VhostUser)?;
    info!(
        "vhost-user: listening on {} (features offered {:#x})",
        opts.socket.display(),
        lock(&backend).offered_features()
    );
    let mut served = Served::default();
    while opts.connections.is_none_or(|n| served.connections < n) {
        match wait_readable(listener.as_raw_fd(), stop, || false) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                warn!("vhost-user: poll on the listening socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!("vhost-user: accept: {e}");
                continue;
            }
        };
        served.connections += 1;
        let n = served.connections;
        info!("vhost-user: connection {n}: frontend connected");
        let ended = serve_connection(stream, &backend, stop);
        let mut b = lock(&backend);
        b.disconnect();
        match ended {
            Ok(Ended::Closed) => info!("vhost-user: connection {n}: frontend disconnected"),
            Ok(Ended::Stopped) => info!("vhost-user: connection {n}: stopping"),
            Err(e) => {
                served.failed += 1;
                warn!(
                    "vhost-user: connection {n}: {e}; connection closed, waiting for the next one"
                );
            }
        }
        if opts.stats {
            println!(
                "connection {n}: device started {} times; {}",
                b.starts,
                b.counters().summary()
            );
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    let _ = std::fs::remove_file(&opts.socket);
    Ok(served)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    const MIB: u64 = 1 << 20;
    /// Where the pretend frontend has guest memory mapped.
    const USER: u64 = 0x7f00_0000_0000;

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the result is
        // checked before use.
        let fd = unsafe { libc::memfd_create(c"nmvm-vhost-user-test".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn region(gpa: u64, size: u64, user_addr: u64, mmap_offset: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion {
            guest_phys_addr: gpa,
            memory_size: size,
            user_addr,
            mmap_offset,
        }
    }

    fn clone(f: &File) -> File {
        f.try_clone().unwrap()
    }

    #[test]
    fn two_regions_of_one_memfd_at_their_offsets() {
        // QEMU's layout: below 640 KiB, and the rest at its own offset.
        let f = memfd(4 * MIB);
        f.write_at(b"high", 0x10_0000 + 0x100).unwrap();
        f.write_at(b"low", 0x1000).unwrap();
        let table = [
            region(0, 0xa_0000, USER, 0),
            region(0x10_0000, 3 * MIB, USER + 0x10_0000, 0x10_0000),
        ];
        let m = Memory::map(&table, vec![clone(&f), clone(&f)]).unwrap();
        use vm_memory::Bytes;
        let mut b = [0u8; 4];
        m.mem.read_slice(&mut b, GuestAddress(0x10_0100)).unwrap();
        assert_eq!(&b, b"high");
        m.mem.read_slice(&mut b[..3], GuestAddress(0x1000)).unwrap();
        assert_eq!(&b[..3], b"low");
        assert_eq!(m.gpa(USER + 0x10_0100, 16), Some(0x10_0100));
        assert_eq!(m.gpa(USER + 0x9_fff0, 16), Some(0x9_fff0));
        // Across the end of a region, or outside any.
        assert_eq!(m.gpa(USER + 0x9_fff8, 16), None);
        assert_eq!(m.gpa(USER + 4 * MIB, 1), None);
        assert_eq!(m.gpa(USER - 1, 1), None);
        assert_eq!(m.gpa(u64::MAX, 2), None);
    }

    #[test]
    fn bad_memory_tables_are_refused() {
        let f = memfd(MIB);
        let bad = |table: &[VhostUserMemoryRegion]| {
            let files = table.iter().map(|_| clone(&f)).collect();
            Memory::map(table, files).unwrap_err().to_string()
        };
        // Past the end of the file (would fault on access).
        assert!(bad(&[region(0, 2 * MIB, USER, 0)]).contains("beyond the end of its file"));
        assert!(bad(&[region(0, MIB, USER, 4096)]).contains("beyond the end of its file"));
        assert!(bad(&[region(0, 0, USER, 0)]).contains("empty"));
        assert!(bad(&[region(u64::MAX - 10, 4096, USER, 0)]).contains("wraps"));
        // Overlaps, in guest memory or in the frontend's addresses.
        let two = |a, b| [region(0, 8192, USER, 0), region(a, 8192, b, 8192)];
        assert!(bad(&two(4096, USER + MIB)).contains("overlap in guest memory"));
        assert!(bad(&two(MIB / 2, USER + 4096)).contains("frontend's address space"));
        // A region per file descriptor.
        let e = Memory::map(&[region(0, 4096, USER, 0)], vec![]).unwrap_err();
        assert!(e.to_string().contains("1 regions but 0 file descriptors"));
    }

    #[test]
    fn only_eventfds_are_taken_as_eventfds() {
        let e = EventFd::new(0).unwrap();
        // SAFETY: dup(2) of a descriptor we own; the result is checked and
        // becomes the File's.
        let dup = unsafe { libc::dup(e.as_raw_fd()) };
        assert!(dup >= 0);
        // SAFETY: `dup` is a new descriptor nothing else owns.
        assert!(eventfd("kick", unsafe { File::from_raw_fd(dup) }).is_ok());
        let err = eventfd("call", memfd(4096)).unwrap_err().to_string();
        assert!(
            err.contains("call file descriptor is not an eventfd"),
            "{err}"
        );
    }

    /// A backend on a fresh userspace pipe, with 1 MiB of guest memory at
    /// guest address 0 (frontend address USER).
    fn backend(name: &str) -> (Backend, File, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("nmvm-vu-unit-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let opts = PortOptions {
            run_dir: Some(dir.clone()),
            ..PortOptions::default()
        };
        let port = Port::open(&format!("shm:{name}{{0"), &opts).unwrap();
        let mut b = Backend::new(Net::new(UNUSED_MAC, port));
        let f = memfd(MIB);
        b.set_mem_table(&[region(0, MIB, USER, 0)], vec![clone(&f)], None)
            .unwrap();
        (b, f, dir)
    }

    /// Sets ring `i` up at guest 0x1000 * (8 * i + 1), enabled.
    fn ring(b: &mut Backend, i: u32, base: u32) -> VuResult<()> {
        let at = USER + 0x8000 * u64::from(i) + 0x1000;
        b.set_vring_num(i, 256)?;
        b.set_vring_base(i, base)?;
        let flags = VhostUserVringAddrFlags::empty();
        b.set_vring_addr(i, flags, at, at + 0x2000, at + 0x1000, 0)?;
        b.set_vring_enable(i, true)?;
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // SAFETY: dup(2) of a descriptor we own; the result becomes the
        // File's.
        let dup = unsafe { libc::dup(kick.as_raw_fd()) };
        // SAFETY: as above.
        b.set_vring_kick(i as u8, Some(unsafe { File::from_raw_fd(dup) }))
    }

    #[test]
    fn the_device_starts_when_both_rings_are_complete_and_reports_its_base() {
        let (mut b, f, dir) = backend("start");
        let features = F_VERSION_1 | F_RING_EVENT_IDX | F_PROTOCOL_FEATURES;
        b.set_features(features).unwrap();
        // The driver has posted 5 transmit buffers... none of which name a
        // descriptor the device can use: the avail index is what matters.
        f.write_at(&5u16.to_le_bytes(), 0x9000 + 0x1000 + 2)
            .unwrap();
        ring(&mut b, 0, 0).unwrap();
        assert!(!b.running, "started with one ring");
        ring(&mut b, 1, 5).unwrap();
        assert!(b.running, "not started with both rings complete");
        // Disabling a ring stops the device; enabling starts it again.
        b.set_vring_enable(0, false).unwrap();
        assert!(!b.running);
        b.set_vring_enable(0, true).unwrap();
        assert!(b.running);
        let base = b.get_vring_base(1).unwrap();
        assert!(!b.running, "GET_VRING_BASE must stop the device");
        assert_eq!((base.index, base.num), (1, 5));
        let num = b.get_vring_base(0).unwrap().num;
        assert_eq!(num, 0);
        // Unknown rings and bad values are refused.
        assert!(b.set_vring_num(2, 256).is_err());
        assert!(b.set_vring_num(0, 100).is_err());
        assert!(b.set_vring_num(0, 4096).is_err());
        assert!(b.set_vring_base(0, 70_000).is_err());
        assert!(b.set_features(features | 1 << 40).is_err());
        assert!(b.set_vring_kick(0, None).is_err());
        b.disconnect();
        assert!(b.memory.is_none() && b.acked.is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn rings_outside_guest_memory_are_refused() {
        let (mut b, _f, dir) = backend("outside");
        b.set_features(F_VERSION_1).unwrap();
        ring(&mut b, 0, 0).unwrap();
        // Ring 1's avail ring ends past the end of guest memory.
        let at = USER + MIB - 0x100;
        b.set_vring_num(1, 256).unwrap();
        let flags = VhostUserVringAddrFlags::empty;
        b.set_vring_addr(1, flags(), USER + 0x10_000, USER + 0x20_000, at, 0)
            .unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // SAFETY: dup(2) of a descriptor we own; the result becomes the
        // File's.
        let dup = unsafe { libc::dup(kick.as_raw_fd()) };
        // SAFETY: as above.
        let e = b
            .set_vring_kick(1, Some(unsafe { File::from_raw_fd(dup) }))
            .unwrap_err();
        assert!(
            e.to_string().contains("avail ring at frontend address"),
            "{e}"
        );
        assert!(!b.running);
        // Misaligned.
        b.set_vring_addr(
            1,
            flags(),
            USER + 0x10_008,
            USER + 0x20_000,
            USER + 0x30_000,
            0,
        )
        .unwrap_err();
        assert!(!b.running);
        let _ = std::fs::remove_dir_all(dir);
    }
}
