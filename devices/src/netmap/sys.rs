//! The few system calls the netmap module makes, each behind a tiny audited
//! helper: shared mappings, eventfds, poll, ioctl, memfd, flock and fd passing
//! over Unix sockets. Compiles on Linux and FreeBSD.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

/// Turns a -1 return into the current `errno`.
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A shared, read-write mapping of a file descriptor, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is an address range owned by this value; it has no thread
// affinity, and all access to the memory behind it goes through raw pointers
// and atomics whose soundness is argued where they are used.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out the base address and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, shared, read-write.
    pub(crate) fn map_shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: we ask for a new mapping at an address of the kernel's
        // choosing (no MAP_FIXED), so no existing memory is affected; the
        // result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len })
    }

    /// An anonymous private zero-filled mapping (tests and fakes).
    #[cfg(test)]
    pub(crate) fn anonymous(len: usize) -> io::Result<Mapping> {
        // SAFETY: as in `map_shared`: a fresh mapping at a kernel-chosen
        // address, checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANON,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len })
    }

    /// Base address.
    #[inline]
    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping created by `mmap` above and
        // not unmapped yet; everything that points into it (rings) is owned
        // by the same port and dropped with it.
        let ret = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if ret != 0 {
            log::warn!("netmap: munmap failed: {}", io::Error::last_os_error());
        }
    }
}

/// A new non-blocking, close-on-exec eventfd.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; the result is checked.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd (wakes its poller). A full counter (EAGAIN) means a
/// wake-up is already pending, which is fine.
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local to a descriptor we borrow.
    let ret = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    if ret == 8 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        Ok(())
    } else {
        Err(err)
    }
}

/// Resets a non-blocking eventfd to 0; returns the value it had.
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live local.
    let ret = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    if ret == 8 {
        v
    } else {
        0
    }
}

/// Milliseconds left until `deadline` for poll(): -1 for none, rounded up.
pub(crate) fn poll_timeout_ms(deadline: Option<Instant>) -> libc::c_int {
    match deadline {
        None => -1,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            let ms = left.as_micros().div_ceil(1000);
            ms.min(i32::MAX as u128) as libc::c_int
        }
    }
}

/// `poll(2)`; EINTR is reported as zero ready descriptors.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the
    // length we pass.
    let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(err);
    }
    Ok(ret as usize)
}

/// A pollfd entry.
pub(crate) fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

#[cfg(all(target_os = "linux", target_env = "musl"))]
type IoctlRequest = libc::c_int;
#[cfg(not(all(target_os = "linux", target_env = "musl")))]
type IoctlRequest = libc::c_ulong;

/// `ioctl(fd, req, arg)` where the kernel reads and writes `*arg`.
///
/// # Safety
///
/// `req` must be a request whose argument is a `T` (by pointer), and any
/// pointers inside `*arg` must be valid for what the request does with them.
pub(crate) unsafe fn ioctl_with_mut<T>(
    fd: BorrowedFd<'_>,
    req: u32,
    arg: &mut T,
) -> io::Result<()> {
    // SAFETY: `arg` is a live exclusive borrow; the caller guarantees that
    // `req` takes a `T` and that the pointers inside it are valid.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), req as IoctlRequest, arg as *mut T) }).map(|_| ())
}

/// `ioctl(fd, req)` for requests without an argument (`_IO`).
pub(crate) fn ioctl_none(fd: BorrowedFd<'_>, req: u32) -> io::Result<()> {
    // SAFETY: `_IO` requests take no argument; the kernel reads no memory of
    // ours for them (we pass 0 as netmap applications do).
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), req as IoctlRequest, 0usize) }).map(|_| ())
}

/// Opens `path` read-write, close-on-exec.
pub(crate) fn open_rdwr(path: &str) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new sealable, close-on-exec memfd of `len` bytes, sealed against
/// shrinking and growing (so a peer that maps it cannot be made to fault).
pub(crate) fn memfd_sealed(name: &str, len: usize) -> io::Result<OwnedFd> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let fd = cvt(unsafe {
        libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len_off =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len_off) })?;
    // SAFETY: plain fcntl on a descriptor we own, integer argument.
    cvt(unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    })?;
    Ok(fd)
}

/// Size of a regular file (memfd), or an error if it is not one.
pub(crate) fn regular_file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: `stat` is plain old data; zeroes are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, exclusively borrowed stat buffer.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    u64::try_from(st.st_size).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Whether `fd` is sealed against shrinking.
pub(crate) fn sealed_against_shrink(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: plain fcntl query on a borrowed descriptor.
    let seals = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })?;
    Ok(seals & libc::F_SEAL_SHRINK != 0)
}

/// An exclusive `flock` held until drop.
#[derive(Debug)]
pub(crate) struct FlockGuard {
    fd: OwnedFd,
}

impl FlockGuard {
    /// Opens `path` (a directory or file) and locks it exclusively, waiting
    /// up to `timeout`.
    pub(crate) fn lock(path: &std::path::Path, timeout: Duration) -> io::Result<FlockGuard> {
        use std::os::unix::ffi::OsStrExt;
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
        let fd = cvt(unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) })?;
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let deadline = Instant::now() + timeout;
        loop {
            // SAFETY: plain flock on a descriptor we own.
            let ret = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if ret == 0 {
                return Ok(FlockGuard { fd });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock || Instant::now() >= deadline {
                return Err(err);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for FlockGuard {
    fn drop(&mut self) {
        // SAFETY: plain flock on a descriptor we own (closing would unlock
        // too; this just makes the release explicit).
        unsafe { libc::flock(self.fd.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Most descriptors passed in one message.
pub(crate) const MAX_PASSED_FDS: usize = 4;

/// Sends `data` with `fds` attached (SCM_RIGHTS) on a connected stream
/// socket. Returns the number of bytes sent.
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    assert!(fds.len() <= MAX_PASSED_FDS);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut cbuf = [0u64; 16];
    let fd_bytes = std::mem::size_of_val(fds) as libc::c_uint;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    assert!(space <= std::mem::size_of_val(&cbuf));
    // SAFETY: msghdr is plain old data; zeroes are a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points to `space` bytes of aligned storage, so
        // CMSG_FIRSTHDR returns a pointer inside it (not NULL).
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        // SAFETY: `cmsg` points to a cmsghdr inside `cbuf`, and CMSG_DATA
        // leaves room for `fd_bytes` bytes (we sized the buffer with
        // CMSG_SPACE); the fd array is copied unaligned.
        unsafe {
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            let data_ptr = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                data_ptr.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points to live buffers (iov -> data, control -> cbuf)
    // for the duration of the call.
    let ret = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as usize)
}

/// Receives into `buf` and collects up to [`MAX_PASSED_FDS`] descriptors
/// passed with SCM_RIGHTS (close-on-exec). Descriptors beyond that, and
/// truncated control data, are an error (any received descriptors are closed).
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: msghdr is plain old data; zeroes are a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: `msg` points to live, exclusively borrowed buffers.
    let ret = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: after a successful recvmsg, the CMSG_* walkers only visit
    // headers inside the `msg_controllen` bytes the kernel filled in.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    let mut overflow = false;
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and points inside `cbuf` (see above).
        let (level, ty, len) = unsafe {
            (
                (*cmsg).cmsg_level,
                (*cmsg).cmsg_type,
                (*cmsg).cmsg_len as usize,
            )
        };
        if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
            // SAFETY: pure computation.
            let hdr = unsafe { libc::CMSG_LEN(0) } as usize;
            let n = len.saturating_sub(hdr) / std::mem::size_of::<libc::c_int>();
            // SAFETY: the kernel wrote `n` descriptors after the header,
            // inside the control buffer; we read them unaligned.
            let data_ptr = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            for i in 0..n {
                // SAFETY: see above; index i < n is inside the message.
                let raw = unsafe { data_ptr.add(i).read_unaligned() };
                // SAFETY: SCM_RIGHTS installed `raw` as a new descriptor in
                // this process; we take ownership exactly once.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                if fds.len() < MAX_PASSED_FDS {
                    fds.push(fd);
                } else {
                    overflow = true; // dropped (closed) here
                }
            }
        }
        // SAFETY: `msg` and `cmsg` are valid as above; CMSG_NXTHDR returns
        // NULL past the end of the filled-in control data.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if overflow || msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many descriptors passed",
        ));
    }
    Ok((ret as usize, fds))
}

/// Whether a connected stream socket's peer is still there: false after EOF
/// or an error, true if nothing is pending or data is pending.
pub(crate) fn stream_alive(sock: BorrowedFd<'_>) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: reads at most 1 byte into a live local.
    let ret = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if ret > 0 {
        return true;
    }
    if ret == 0 {
        return false;
    }
    io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

/// The real user id.
pub(crate) fn getuid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}
