//! The kernel transport: ports of the netmap kernel module through
//! `/dev/netmap` (FreeBSD natively, Linux with `netmap.ko`).
//!
//! Opening: `open("/dev/netmap", O_RDWR)`, `NIOCCTRL` with a
//! `NETMAP_REQ_REGISTER` built from the parsed name (mode, ring id, flags,
//! memory id; `NR_ACCEPT_VNET_HDR` so ports with a virtio-net header can be
//! bound), `mmap` of `nr_memsize`, rings found through `nr_offset` and the
//! `netmap_if`'s `ring_ofs[]` (non-zero entries are the bound rings), then
//! optionally `PORT_HDR_SET` and `PORT_HDR_GET` for the virtio-net header
//! length. Syncs are `NIOCTXSYNC`/`NIOCRXSYNC`; the fd is pollable (poll does
//! the syncs itself). The ring geometry the kernel reports is still checked
//! against the mapping before use.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use super::abi::{
    NetmapIf, NmreqHeader, NmreqPortHdr, NmreqRegister, NETMAP_API, NETMAP_IF_RING_OFS_OFFSET,
    NETMAP_REQ_PORT_HDR_GET, NETMAP_REQ_PORT_HDR_SET, NETMAP_REQ_REGISTER, NIOCCTRL, NIOCRXSYNC,
    NIOCTXSYNC, NR_ACCEPT_VNET_HDR,
};
use super::name::KernelSpec;
use super::ring::{Ring, RingError};
use super::sys::{self, Mapping};
use super::PortOptions;

/// The netmap control device.
pub const NETMAP_DEVICE: &str = "/dev/netmap";
/// Most rings of one kind we accept from the kernel.
const MAX_RINGS: u32 = 1024;

/// Errors of the kernel transport.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// `/dev/netmap` does not exist.
    #[error(
        "cannot open {name}: {path} does not exist, the netmap kernel module is not loaded \
         (Linux: load netmap.ko; FreeBSD: a kernel with `device netmap`); without it, use a \
         userspace port such as shm:demo{{0 (its peer is shm:demo}}0)"
    )]
    ModuleNotLoaded {
        /// Port name.
        name: String,
        /// Device path.
        path: String,
    },
    /// Another error opening the device.
    #[error("cannot open {path} for {name}: {err}")]
    Open {
        /// Port name.
        name: String,
        /// Device path.
        path: String,
        /// Cause.
        err: io::Error,
    },
    /// An `@option` we do not implement.
    #[error("{name}: port option {option:?} is not supported yet")]
    UnsupportedOption {
        /// Port name.
        name: String,
        /// The option.
        option: String,
    },
    /// A virtio-net header length the kernel would refuse.
    #[error("{name}: virtio-net header length {len} is not 0, 10 or 12")]
    BadVnetHdr {
        /// Port name.
        name: String,
        /// Length asked for.
        len: u32,
    },
    /// A NIOCCTRL request failed.
    #[error("{name}: NIOCCTRL {what} failed: {err}")]
    Ctrl {
        /// Port name.
        name: String,
        /// Request.
        what: &'static str,
        /// Cause.
        err: io::Error,
    },
    /// mmap of the region failed.
    #[error("{name}: cannot map {size} bytes of netmap memory: {err}")]
    Mmap {
        /// Port name.
        name: String,
        /// Size asked for.
        size: u64,
        /// Cause.
        err: io::Error,
    },
    /// The region's `netmap_if` is not usable.
    #[error("{name}: bad netmap memory layout: {what}")]
    BadLayout {
        /// Port name.
        name: String,
        /// What is wrong.
        what: String,
    },
    /// A ring view could not be built.
    #[error("{name}: {err}")]
    Ring {
        /// Port name.
        name: String,
        /// Cause.
        err: RingError,
    },
    /// NIOCTXSYNC/NIOCRXSYNC/poll failed.
    #[error("{name}: {what} failed: {err}")]
    Sync {
        /// Port name.
        name: String,
        /// Operation.
        what: &'static str,
        /// Cause.
        err: io::Error,
    },
}

/// The `NETMAP_REQ_REGISTER` request for `spec` (`nr_body` still 0: the
/// caller points it at the returned body right before the ioctl).
pub(crate) fn register_request(
    spec: &KernelSpec,
    accept_vnet_hdr: bool,
) -> (NmreqHeader, NmreqRegister) {
    let hdr = NmreqHeader {
        nr_version: NETMAP_API,
        nr_reqtype: NETMAP_REQ_REGISTER,
        nr_reserved: 0,
        nr_name: spec.nr_name_bytes(),
        nr_options: 0,
        nr_body: 0,
    };
    let reg = NmreqRegister {
        nr_mem_id: spec.nr_mem_id,
        nr_ringid: spec.nr_ringid,
        nr_mode: spec.nr_mode,
        nr_flags: spec.nr_flags
            | if accept_vnet_hdr {
                NR_ACCEPT_VNET_HDR
            } else {
                0
            },
        ..NmreqRegister::default()
    };
    (hdr, reg)
}

/// A `PORT_HDR_SET` (`len` given) or `PORT_HDR_GET` request for `spec`.
pub(crate) fn port_hdr_request(spec: &KernelSpec, len: Option<u32>) -> (NmreqHeader, NmreqPortHdr) {
    let hdr = NmreqHeader {
        nr_version: NETMAP_API,
        nr_reqtype: if len.is_some() {
            NETMAP_REQ_PORT_HDR_SET
        } else {
            NETMAP_REQ_PORT_HDR_GET
        },
        nr_reserved: 0,
        nr_name: spec.nr_name_bytes(),
        nr_options: 0,
        nr_body: 0,
    };
    let body = NmreqPortHdr {
        nr_hdr_len: len.unwrap_or(0),
        _pad: 0,
    };
    (hdr, body)
}

/// Sends a NIOCCTRL request with body `body`.
fn ctrl<T>(fd: &OwnedFd, hdr: &mut NmreqHeader, body: &mut T) -> io::Result<()> {
    hdr.nr_body = body as *mut T as u64;
    hdr.nr_options = 0;
    // SAFETY: NIOCCTRL takes a `struct nmreq_header` by pointer; its
    // `nr_body` points to `body`, a live exclusive borrow of the body type
    // that matches `nr_reqtype` (callers pair them), and `nr_options` is 0.
    // The kernel writes only inside the header and the body.
    let r = unsafe { sys::ioctl_with_mut(fd.as_fd(), NIOCCTRL, hdr) };
    hdr.nr_body = 0;
    r
}

/// A bound kernel netmap port.
#[derive(Debug)]
pub(crate) struct KernelPort {
    name: String,
    fd: OwnedFd,
    reg: NmreqRegister,
    vnet_hdr_len: u32,
    tx_ofs: Vec<usize>,
    rx_ofs: Vec<usize>,
    /// Last: unmapped after the rings made from it are gone.
    map: Mapping,
}

impl KernelPort {
    /// Opens `spec` through [`NETMAP_DEVICE`].
    pub(crate) fn open(spec: &KernelSpec, opts: &PortOptions) -> Result<KernelPort, KernelError> {
        Self::open_device(NETMAP_DEVICE, spec, opts)
    }

    /// Opens `spec` through the control device at `path`.
    pub(crate) fn open_device(
        path: &str,
        spec: &KernelSpec,
        opts: &PortOptions,
    ) -> Result<KernelPort, KernelError> {
        let name = spec.full_name.clone();
        if let Some(option) = spec.options.first() {
            return Err(KernelError::UnsupportedOption {
                name,
                option: option.clone(),
            });
        }
        if let Some(len) = opts.vnet_hdr_len {
            if !matches!(len, 0 | 10 | 12) {
                return Err(KernelError::BadVnetHdr { name, len });
            }
        }
        let fd = sys::open_rdwr(path).map_err(|err| {
            if err.kind() == io::ErrorKind::NotFound {
                KernelError::ModuleNotLoaded {
                    name: name.clone(),
                    path: path.to_string(),
                }
            } else {
                KernelError::Open {
                    name: name.clone(),
                    path: path.to_string(),
                    err,
                }
            }
        })?;
        let (mut hdr, mut reg) = register_request(spec, true);
        ctrl(&fd, &mut hdr, &mut reg).map_err(|err| KernelError::Ctrl {
            name: name.clone(),
            what: "REGISTER",
            err,
        })?;
        let size = reg.nr_memsize;
        let len = usize::try_from(size).map_err(|_| KernelError::BadLayout {
            name: name.clone(),
            what: format!("nr_memsize {size}"),
        })?;
        let map = Mapping::map_shared(fd.as_fd(), len).map_err(|err| KernelError::Mmap {
            name: name.clone(),
            size,
            err,
        })?;
        let (tx_ofs, rx_ofs) =
            find_rings(&map, reg.nr_offset).map_err(|what| KernelError::BadLayout {
                name: name.clone(),
                what,
            })?;
        let mut port = KernelPort {
            name,
            fd,
            reg,
            vnet_hdr_len: 0,
            tx_ofs,
            rx_ofs,
            map,
        };
        if let Some(len) = opts.vnet_hdr_len {
            let (mut h, mut b) = port_hdr_request(spec, Some(len));
            ctrl(&port.fd, &mut h, &mut b).map_err(|err| KernelError::Ctrl {
                name: port.name.clone(),
                what: "PORT_HDR_SET",
                err,
            })?;
        }
        let (mut h, mut b) = port_hdr_request(spec, None);
        port.vnet_hdr_len = match ctrl(&port.fd, &mut h, &mut b) {
            Ok(()) => b.nr_hdr_len,
            Err(e) => {
                log::debug!(
                    "netmap {}: PORT_HDR_GET failed ({e}), assuming no header",
                    port.name
                );
                0
            }
        };
        log::debug!(
            "netmap {}: bound {} tx and {} rx rings, {} bytes, mem id {}",
            port.name,
            port.tx_ofs.len(),
            port.rx_ofs.len(),
            port.reg.nr_memsize,
            port.reg.nr_mem_id
        );
        Ok(port)
    }

    /// Ring views (tx, rx) of the bound rings.
    ///
    /// # Safety
    ///
    /// The rings must not outlive `self`.
    pub(crate) unsafe fn rings(&self) -> Result<(Vec<Ring>, Vec<Ring>), KernelError> {
        let mk = |ofs: &Vec<usize>| -> Result<Vec<Ring>, KernelError> {
            ofs.iter()
                .map(|&o| {
                    // SAFETY: the caller keeps the rings no longer than
                    // `self`, which owns the mapping; `o` was found inside it.
                    unsafe { Ring::from_header(self.map.ptr(), self.map.len(), o) }.map_err(|err| {
                        KernelError::Ring {
                            name: self.name.clone(),
                            err,
                        }
                    })
                })
                .collect()
        };
        Ok((mk(&self.tx_ofs)?, mk(&self.rx_ofs)?))
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn vnet_hdr_len(&self) -> u32 {
        self.vnet_hdr_len
    }

    pub(crate) fn poll_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub(crate) fn region(&self) -> (NonNull<u8>, usize) {
        (self.map.ptr(), self.map.len())
    }

    pub(crate) fn nifp_offset(&self) -> usize {
        self.reg.nr_offset as usize
    }

    pub(crate) fn mem_id(&self) -> u16 {
        self.reg.nr_mem_id
    }

    pub(crate) fn txsync(&mut self) -> Result<(), KernelError> {
        sys::ioctl_none(self.fd.as_fd(), NIOCTXSYNC).map_err(|err| KernelError::Sync {
            name: self.name.clone(),
            what: "NIOCTXSYNC",
            err,
        })
    }

    pub(crate) fn rxsync(&mut self) -> Result<(), KernelError> {
        sys::ioctl_none(self.fd.as_fd(), NIOCRXSYNC).map_err(|err| KernelError::Sync {
            name: self.name.clone(),
            what: "NIOCRXSYNC",
            err,
        })
    }

    /// poll() for rx (POLLIN) and/or tx (POLLOUT); the kernel syncs.
    pub(crate) fn wait(
        &mut self,
        rx: bool,
        tx: bool,
        timeout: Option<Duration>,
    ) -> Result<bool, KernelError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut events = 0;
        if rx {
            events |= libc::POLLIN;
        }
        if tx {
            events |= libc::POLLOUT;
        }
        loop {
            let mut fds = [sys::pollfd(self.fd.as_raw_fd(), events)];
            let ms = sys::poll_timeout_ms(deadline);
            let n = sys::poll(&mut fds, ms).map_err(|err| KernelError::Sync {
                name: self.name.clone(),
                what: "poll",
                err,
            })?;
            if n > 0 {
                if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                    return Err(KernelError::Sync {
                        name: self.name.clone(),
                        what: "poll",
                        err: io::Error::other("POLLERR"),
                    });
                }
                return Ok(true);
            }
            if ms == 0 || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
    }
}

/// Offsets (from the region start) of the bound tx and rx rings, from the
/// `netmap_if` at `nr_offset`: NIC then host rings, non-zero entries only.
pub(crate) fn find_rings(
    map: &Mapping,
    nr_offset: u64,
) -> Result<(Vec<usize>, Vec<usize>), String> {
    let len = map.len() as u64;
    if nr_offset % 8 != 0 || nr_offset + NETMAP_IF_RING_OFS_OFFSET as u64 > len {
        return Err(format!(
            "nr_offset {nr_offset:#x} outside the {len:#x}-byte region"
        ));
    }
    // SAFETY: the 56-byte netmap_if is inside the mapping (checked above) and
    // 8-aligned; it holds integers only, so any bytes are a valid value.
    let nifp: NetmapIf = unsafe {
        map.ptr()
            .as_ptr()
            .add(nr_offset as usize)
            .cast::<NetmapIf>()
            .read_volatile()
    };
    let ntx = nifp.ni_tx_rings.saturating_add(nifp.ni_host_tx_rings);
    let nrx = nifp.ni_rx_rings.saturating_add(nifp.ni_host_rx_rings);
    if ntx > MAX_RINGS || nrx > MAX_RINGS {
        return Err(format!("{ntx} tx and {nrx} rx rings"));
    }
    let table = nr_offset + NETMAP_IF_RING_OFS_OFFSET as u64;
    if table + 8 * u64::from(ntx + nrx) > len {
        return Err("ring_ofs[] runs past the region".into());
    }
    let entry = |i: u32| -> Result<Option<usize>, String> {
        // SAFETY: entry i < ntx + nrx lies inside the mapping (checked above)
        // and is 8-aligned (nr_offset and 56 are multiples of 8).
        let ofs = unsafe {
            map.ptr()
                .as_ptr()
                .add((table + 8 * u64::from(i)) as usize)
                .cast::<i64>()
                .read_volatile()
        };
        if ofs == 0 {
            return Ok(None);
        }
        let abs = i128::from(nr_offset) + i128::from(ofs);
        if abs < 0 || abs >= i128::from(len) {
            return Err(format!("ring_ofs[{i}] = {ofs} points outside the region"));
        }
        Ok(Some(abs as usize))
    };
    let mut tx = Vec::new();
    let mut rx = Vec::new();
    for i in 0..ntx {
        tx.extend(entry(i)?);
    }
    for i in 0..nrx {
        rx.extend(entry(ntx + i)?);
    }
    Ok((tx, rx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netmap::abi::*;
    use crate::netmap::name::{parse, PortSpec};
    use crate::netmap::{NetmapError, Port};

    fn kspec(name: &str) -> KernelSpec {
        match parse(name).unwrap() {
            PortSpec::Kernel(k) => k,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn register_requests_from_names() {
        let (h, r) = register_request(&kspec("netmap:eth0"), true);
        assert_eq!(
            (h.nr_version, h.nr_reqtype, h.nr_reserved),
            (14, NETMAP_REQ_REGISTER, 0)
        );
        assert_eq!(&h.nr_name[..5], b"eth0\0");
        assert!(h.nr_name[4..].iter().all(|&b| b == 0));
        assert_eq!((h.nr_options, h.nr_body), (0, 0));
        assert_eq!(
            (r.nr_mode, r.nr_ringid, r.nr_mem_id),
            (NR_REG_ALL_NIC, 0, 0)
        );
        assert_eq!(r.nr_flags, NR_ACCEPT_VNET_HDR);
        assert_eq!(
            (r.nr_offset, r.nr_memsize, r.nr_tx_slots, r.nr_extra_bufs),
            (0, 0, 0, 0)
        );

        let (_, r) = register_request(&kspec("netmap:eth0-3@2/xR"), false);
        assert_eq!(
            (r.nr_mode, r.nr_ringid, r.nr_mem_id),
            (NR_REG_ONE_NIC, 3, 2)
        );
        assert_eq!(r.nr_flags, NR_EXCLUSIVE | NR_RX_RINGS_ONLY);

        let (_, r) = register_request(&kspec("netmap:eth0^1"), false);
        assert_eq!((r.nr_mode, r.nr_ringid), (NR_REG_ONE_SW, 1));
        let (_, r) = register_request(&kspec("netmap:eth0^"), false);
        assert_eq!(r.nr_mode, NR_REG_SW);
        let (_, r) = register_request(&kspec("netmap:eth0*"), false);
        assert_eq!(r.nr_mode, NR_REG_NIC_SW);

        let (h, r) = register_request(&kspec("vale0:vm1"), true);
        assert_eq!(&h.nr_name[..10], b"vale0:vm1\0");
        assert_eq!(r.nr_mode, NR_REG_ALL_NIC);

        let (h, r) = register_request(&kspec("netmap:eth0}7"), true);
        assert_eq!(&h.nr_name[..7], b"eth0}7\0");
        assert_eq!(r.nr_mode, NR_REG_ALL_NIC);

        let long = format!("netmap:{}", "a".repeat(63));
        let (h, _) = register_request(&kspec(&long), true);
        assert_eq!(h.nr_name[62], b'a');
        assert_eq!(h.nr_name[63], 0);
    }

    #[test]
    fn port_hdr_requests() {
        let (h, b) = port_hdr_request(&kspec("vale0:p"), Some(12));
        assert_eq!(h.nr_reqtype, NETMAP_REQ_PORT_HDR_SET);
        assert_eq!(b.nr_hdr_len, 12);
        assert_eq!(&h.nr_name[..8], b"vale0:p\0");
        let (h, b) = port_hdr_request(&kspec("vale0:p"), None);
        assert_eq!(h.nr_reqtype, NETMAP_REQ_PORT_HDR_GET);
        assert_eq!(b.nr_hdr_len, 0);
    }

    #[test]
    fn missing_module_is_explained() {
        let spec = kspec("netmap:eth0");
        let e = KernelPort::open_device("/nonexistent/netmap", &spec, &PortOptions::default())
            .unwrap_err();
        assert!(matches!(e, KernelError::ModuleNotLoaded { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("netmap kernel module is not loaded"), "{msg}");
        assert!(msg.contains("shm:demo{0"), "{msg}");
        // Through Port::open: on this machine /dev/netmap is either missing
        // (the message above) or present (some other outcome); both are
        // errors for a NIC that does not exist.
        if !std::path::Path::new(NETMAP_DEVICE).exists() {
            let e = Port::open("vale0:x", &PortOptions::default()).unwrap_err();
            assert!(matches!(
                e,
                NetmapError::Kernel(KernelError::ModuleNotLoaded { .. })
            ));
        }
    }

    #[test]
    fn options_and_bad_headers_are_refused() {
        let e = KernelPort::open_device(
            "/nonexistent",
            &kspec("netmap:eth0@share=x"),
            &PortOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, KernelError::UnsupportedOption { .. }), "{e}");
        let opts = PortOptions {
            vnet_hdr_len: Some(11),
            ..PortOptions::default()
        };
        let e = KernelPort::open_device("/nonexistent", &kspec("vale0:a"), &opts).unwrap_err();
        assert!(matches!(e, KernelError::BadVnetHdr { .. }), "{e}");
    }

    /// A region laid out the way the kernel does it: ring lookup finds the
    /// bound rings and rejects offsets outside the region.
    #[test]
    fn ring_lookup() {
        let map = Mapping::anonymous(1 << 16).unwrap();
        let base = map.ptr().as_ptr();
        let nifp_ofs = 0x100usize;
        // SAFETY: test-only writes inside a private anonymous mapping.
        unsafe {
            base.add(nifp_ofs).cast::<NetmapIf>().write(NetmapIf {
                ni_tx_rings: 2,
                ni_rx_rings: 2,
                ni_host_tx_rings: 1,
                ni_host_rx_rings: 1,
                ..NetmapIf::default()
            });
            let t = base.add(nifp_ofs + 56).cast::<i64>();
            // tx0 bound, tx1 unbound, host tx unbound, rx0 unbound, rx1 bound, host rx bound
            for (i, v) in [0x1000i64, 0, 0, 0, 0x3000, 0x4000].iter().enumerate() {
                t.add(i).write(*v);
            }
            for ring in [0x1100usize, 0x3100, 0x4100] {
                base.add(ring).cast::<NetmapRing>().write(NetmapRing {
                    buf_ofs: 0x8000 - ring as i64,
                    num_slots: 8,
                    nr_buf_size: 2048,
                    tail: 7,
                    ..NetmapRing::default()
                });
            }
        }
        let (tx, rx) = find_rings(&map, nifp_ofs as u64).unwrap();
        assert_eq!(tx, vec![0x1100]);
        assert_eq!(rx, vec![0x3100, 0x4100]);
        // SAFETY: the mapping outlives the ring (dropped at the end of the test).
        let r = unsafe { Ring::from_header(map.ptr(), map.len(), 0x1100) }.unwrap();
        assert_eq!((r.num_slots(), r.buf_size(), r.num_bufs()), (8, 2048, 16));
        assert_eq!(r.tail(), 7);
        // Out of range.
        assert!(find_rings(&map, 1 << 16).is_err());
        assert!(find_rings(&map, 3).is_err());
        // SAFETY: as above.
        unsafe {
            base.add(nifp_ofs + 56).cast::<i64>().write(1 << 20);
        }
        assert!(find_rings(&map, nifp_ofs as u64).is_err());
        // SAFETY: as above; a ring whose buffers start outside the region.
        unsafe {
            base.add(0x3100).cast::<i64>().write(1 << 30);
        }
        // SAFETY: as above.
        assert!(unsafe { Ring::from_header(map.ptr(), map.len(), 0x3100) }.is_err());
    }
}
