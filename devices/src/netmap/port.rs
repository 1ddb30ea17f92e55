//! [`Port`]: one netmap port, kernel or userspace, behind one small API.

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::time::Duration;

use super::kernel::KernelPort;
use super::name::{self, PortSpec};
use super::ring::Ring;
use super::shm::ShmPort;
use super::NetmapError;

/// How to open a port. The geometry fields apply when this open *creates* a
/// userspace pipe; an end that attaches takes the creator's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortOptions {
    /// Slots per ring (userspace pipes; default 1024).
    pub num_slots: u32,
    /// Bytes per buffer (userspace pipes; default 2048).
    pub buf_size: u32,
    /// Spare buffers per end used to repair slots a peer corrupted
    /// (userspace pipes; default 64).
    pub spare_bufs: u32,
    /// virtio-net header length (0, 10 or 12). Userspace pipes: set by the
    /// creator (`None` = 0), checked by an attacher (`None` = accept any).
    /// Kernel ports: `Some` sends `PORT_HDR_SET` (VALE ports only).
    pub vnet_hdr_len: Option<u32>,
    /// Runtime directory for userspace pipes (default: `$NMVM_RUN_DIR`,
    /// `$XDG_RUNTIME_DIR/nmvm` or `/tmp/nmvm-<uid>`).
    pub run_dir: Option<PathBuf>,
    /// How long to wait for the process serving a userspace pipe to answer.
    pub attach_timeout: Duration,
}

impl Default for PortOptions {
    fn default() -> Self {
        PortOptions {
            num_slots: super::shm::DEFAULT_SLOTS,
            buf_size: 2048,
            spare_bufs: 64,
            vnet_hdr_len: None,
            run_dir: None,
            attach_timeout: Duration::from_secs(5),
        }
    }
}

/// Counters of a port: bad values seen from the peer (or kernel) and what
/// the port did about them, plus notification counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Ring indices (head/cur/tail, published positions) outside the window
    /// the protocol allows.
    pub bad_index: u64,
    /// Buffer indices outside the pool.
    pub bad_buf_idx: u64,
    /// Lengths larger than a buffer.
    pub bad_len: u64,
    /// Fragment chains that are too long.
    pub bad_frame: u64,
    /// Frames our txsync dropped because of bad slots.
    pub tx_dropped: u64,
    /// Received frames skipped by `Ring::recv`.
    pub rx_dropped: u64,
    /// Slots repaired with a spare buffer.
    pub repaired: u64,
    /// Syncs that could not proceed because no spare buffer was left.
    pub stalls: u64,
    /// Notifications sent to the peer (system calls).
    pub kicks_sent: u64,
    /// Notifications received.
    pub wakeups: u64,
    /// txsync calls.
    pub txsyncs: u64,
    /// rxsync calls.
    pub rxsyncs: u64,
}

#[derive(Debug)]
enum Backend {
    Shm(Box<ShmPort>),
    Kernel(KernelPort),
}

/// One netmap port. See the module docs of [`crate::netmap`].
#[derive(Debug)]
pub struct Port {
    // Rings first: they point into the backend's mapping and are dropped
    // before it.
    tx: Vec<Ring>,
    rx: Vec<Ring>,
    backend: Backend,
}

impl Port {
    /// Opens the port `name`: `shm:NAME{ID` / `shm:NAME}ID` (userspace
    /// pipe), or a kernel form (`netmap:eth0`, `vale0:p`, `netmap:p{1`, …).
    pub fn open(name: &str, opts: &PortOptions) -> Result<Port, NetmapError> {
        match name::parse(name)? {
            PortSpec::Shm(spec) => {
                let shm = Box::new(ShmPort::open(&spec, opts)?);
                // SAFETY: the rings are stored next to `shm` in the Port and
                // dropped before it (field order).
                let (tx, rx) = unsafe { shm.user_rings() }.map_err(|err| NetmapError::Ring {
                    name: name.to_string(),
                    err,
                })?;
                Ok(Port {
                    tx: vec![tx],
                    rx: vec![rx],
                    backend: Backend::Shm(shm),
                })
            }
            PortSpec::Kernel(spec) => {
                let k = KernelPort::open(&spec, opts)?;
                // SAFETY: as above.
                let (tx, rx) = unsafe { k.rings() }?;
                if tx.is_empty() || rx.is_empty() {
                    return Err(NetmapError::NoRings {
                        name: name.to_string(),
                        tx: tx.len(),
                        rx: rx.len(),
                    });
                }
                Ok(Port {
                    tx,
                    rx,
                    backend: Backend::Kernel(k),
                })
            }
        }
    }

    /// The port name.
    pub fn name(&self) -> &str {
        match &self.backend {
            Backend::Shm(s) => s.name(),
            Backend::Kernel(k) => k.name(),
        }
    }

    /// Whether this is a userspace (`shm:`) port.
    pub fn is_userspace(&self) -> bool {
        matches!(self.backend, Backend::Shm(_))
    }

    /// The (first) tx ring.
    #[inline]
    pub fn tx_ring(&mut self) -> &mut Ring {
        &mut self.tx[0]
    }

    /// The (first) rx ring.
    #[inline]
    pub fn rx_ring(&mut self) -> &mut Ring {
        &mut self.rx[0]
    }

    /// Both first rings at once: (tx, rx).
    #[inline]
    pub fn rings(&mut self) -> (&mut Ring, &mut Ring) {
        (&mut self.tx[0], &mut self.rx[0])
    }

    /// All bound tx rings (kernel ports may bind several).
    pub fn tx_rings(&mut self) -> &mut [Ring] {
        &mut self.tx
    }

    /// All bound rx rings.
    pub fn rx_rings(&mut self) -> &mut [Ring] {
        &mut self.rx
    }

    /// Hands the tx slots before `head` to the peer and reclaims free ones.
    #[inline]
    pub fn txsync(&mut self) -> Result<(), NetmapError> {
        match &mut self.backend {
            Backend::Shm(s) => {
                s.txsync();
                Ok(())
            }
            Backend::Kernel(k) => Ok(k.txsync()?),
        }
    }

    /// Returns the rx slots before `head` and picks up new frames.
    #[inline]
    pub fn rxsync(&mut self) -> Result<(), NetmapError> {
        match &mut self.backend {
            Backend::Shm(s) => {
                s.rxsync();
                Ok(())
            }
            Backend::Kernel(k) => Ok(k.rxsync()?),
        }
    }

    /// Blocks until the rx ring has frames after `cur` (`rx`) and/or the tx
    /// ring has room after `cur` (`tx`), or `timeout` passes (`None`: no
    /// limit). Syncs as netmap's poll() does. True if ready.
    pub fn wait(
        &mut self,
        rx: bool,
        tx: bool,
        timeout: Option<Duration>,
    ) -> Result<bool, NetmapError> {
        match &mut self.backend {
            Backend::Shm(s) => s.wait(rx, tx, timeout).map_err(|err| NetmapError::Wait {
                name: s.name().to_string(),
                err,
            }),
            Backend::Kernel(k) => Ok(k.wait(rx, tx, timeout)?),
        }
    }

    /// [`Port::wait`] for received frames.
    pub fn wait_rx(&mut self, timeout: Option<Duration>) -> Result<bool, NetmapError> {
        self.wait(true, false, timeout)
    }

    /// [`Port::wait`] for tx room.
    pub fn wait_tx(&mut self, timeout: Option<Duration>) -> Result<bool, NetmapError> {
        self.wait(false, true, timeout)
    }

    /// For event loops: syncs and, if nothing is ready, arms the peer's
    /// notification. Returns true if something is ready now (do not sleep);
    /// false means: sleep until [`Port::poll_fd`] shows
    /// [`Port::poll_events`], then call [`Port::ack_wakeup`].
    pub fn prepare_wait(&mut self, rx: bool, tx: bool) -> Result<bool, NetmapError> {
        match &mut self.backend {
            Backend::Shm(s) => Ok(s.prepare_wait(rx, tx)),
            Backend::Kernel(_) => Ok(false),
        }
    }

    /// [`Port::prepare_wait`] for a sender whose tx ring still holds
    /// frames the peer had no room for: arms a wake-up for when they can
    /// move. Returns true if none are pending any more (do not sleep).
    /// Kernel ports: their own poll does this; always false.
    pub fn prepare_wait_drain(&mut self, rx: bool) -> Result<bool, NetmapError> {
        match &mut self.backend {
            Backend::Shm(s) => Ok(s.prepare_wait_drain(rx)),
            Backend::Kernel(_) => Ok(false),
        }
    }

    /// Moderates the wake-ups this end gives a waiting peer (userspace
    /// pipes; kernel ports wake their peers themselves): once `slots` were
    /// moved or returned for it, or at the latest when this end prepares
    /// to sleep ([`Port::prepare_wait`]) or calls [`Port::flush_kicks`].
    /// 1, the default, wakes it at every sync.
    pub fn set_kick_batch(&mut self, slots: u32) {
        if let Backend::Shm(s) = &mut self.backend {
            s.set_kick_batch(slots);
        }
    }

    /// Delivers the wake-ups [`Port::set_kick_batch`] held back.
    pub fn flush_kicks(&mut self) {
        if let Backend::Shm(s) = &mut self.backend {
            s.flush_kicks();
        }
    }

    /// Tx slots synced but not yet taken by the peer (userspace ports; 0
    /// for kernel ports, whose kernel keeps them).
    pub fn tx_pending_slots(&self) -> u32 {
        match &self.backend {
            Backend::Shm(s) => s.tx_pending_slots(),
            Backend::Kernel(_) => 0,
        }
    }

    /// Clears a notification after a wake-up (userspace ports).
    pub fn ack_wakeup(&mut self) {
        if let Backend::Shm(s) = &mut self.backend {
            s.ack_wakeup();
        }
    }

    /// The descriptor to poll: the port's eventfd (userspace) or its
    /// `/dev/netmap` fd (kernel).
    pub fn poll_fd(&self) -> RawFd {
        match &self.backend {
            Backend::Shm(s) => s.poll_fd(),
            Backend::Kernel(k) => k.poll_fd(),
        }
    }

    /// The poll events to wait for: always POLLIN on a userspace port;
    /// POLLIN for rx and POLLOUT for tx on a kernel port.
    pub fn poll_events(&self, rx: bool, tx: bool) -> libc::c_short {
        match &self.backend {
            Backend::Shm(_) => libc::POLLIN,
            Backend::Kernel(_) => {
                (if rx { libc::POLLIN } else { 0 }) | (if tx { libc::POLLOUT } else { 0 })
            }
        }
    }

    /// The virtio-net header length frames on this port carry (0, 10 or 12).
    pub fn virtio_net_hdr_len(&self) -> u32 {
        match &self.backend {
            Backend::Shm(s) => s.vnet_hdr_len(),
            Backend::Kernel(k) => k.vnet_hdr_len(),
        }
    }

    /// Whether the other end is attached (always true for kernel ports).
    pub fn peer_connected(&self) -> bool {
        match &self.backend {
            Backend::Shm(s) => s.peer_connected(),
            Backend::Kernel(_) => true,
        }
    }

    /// The shared memory region (base, length), e.g. to map it into a guest.
    pub fn region(&self) -> (NonNull<u8>, usize) {
        match &self.backend {
            Backend::Shm(s) => s.region(),
            Backend::Kernel(k) => k.region(),
        }
    }

    /// Offset of this port's `netmap_if` in [`Port::region`].
    pub fn nifp_offset(&self) -> usize {
        match &self.backend {
            Backend::Shm(s) => s.nifp_offset(),
            Backend::Kernel(k) => k.nifp_offset(),
        }
    }

    /// The kernel memory region id (0 for userspace ports).
    pub fn mem_id(&self) -> u16 {
        match &self.backend {
            Backend::Shm(_) => 0,
            Backend::Kernel(k) => k.mem_id(),
        }
    }

    /// Counters of bad values seen and of notifications.
    pub fn stats(&self) -> PortStats {
        let mut st = PortStats::default();
        for r in self.tx.iter().chain(self.rx.iter()) {
            let rs = r.stats();
            st.bad_index += rs.bad_index;
            st.bad_buf_idx += rs.bad_buf_idx;
            st.bad_len += rs.bad_len;
            st.bad_frame += rs.bad_frame;
            st.rx_dropped += rs.rx_dropped;
        }
        if let Backend::Shm(s) = &self.backend {
            let t = &s.stats;
            st.bad_index += t.bad_index;
            st.bad_buf_idx += t.bad_buf_idx;
            st.bad_len += t.bad_len;
            st.bad_frame += t.bad_frame;
            st.tx_dropped = t.tx_dropped;
            st.repaired = t.repaired;
            st.stalls = t.stalls;
            st.kicks_sent = t.kicks_sent;
            st.wakeups = t.wakeups;
            st.txsyncs = t.txsyncs;
            st.rxsyncs = t.rxsyncs;
        }
        st
    }

    #[cfg(test)]
    pub(crate) fn shm(&self) -> Option<&ShmPort> {
        match &self.backend {
            Backend::Shm(s) => Some(s),
            Backend::Kernel(_) => None,
        }
    }
}

impl AsRawFd for Port {
    fn as_raw_fd(&self) -> RawFd {
        self.poll_fd()
    }
}
