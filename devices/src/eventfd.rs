//! The event counter devices are kicked through and wait on.
//!
//! On Linux this is vmm-sys-util's `EventFd`, because KVM's ioeventfd and
//! irqfd registrations and the vhost crate take that type. vmm-sys-util only
//! builds it for Linux; FreeBSD (13 and later) has the same eventfd(2)
//! system call, so [`PortableEventFd`] wraps it with the same methods and is
//! the `EventFd` of FreeBSD builds. It is compiled and unit-tested on Linux
//! too, so the FreeBSD build runs code that CI has exercised.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

#[cfg(target_os = "linux")]
pub use vmm_sys_util::eventfd::EventFd;

#[cfg(not(target_os = "linux"))]
pub use PortableEventFd as EventFd;

/// An eventfd(2): a 64-bit counter that `write` adds to and `read` takes
/// and clears.
#[derive(Debug)]
pub struct PortableEventFd(OwnedFd);

impl PortableEventFd {
    /// A new eventfd starting at 0; `flags` are eventfd(2)'s
    /// (`EFD_NONBLOCK`, `EFD_CLOEXEC`).
    pub fn new(flags: i32) -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds `value` to the counter, waking a poller.
    pub fn write(&self, value: u64) -> io::Result<()> {
        // SAFETY: writes the 8 bytes of a live local to a descriptor we own.
        let ret = unsafe { libc::write(self.0.as_raw_fd(), (&value as *const u64).cast(), 8) };
        match ret {
            8 => Ok(()),
            -1 => Err(io::Error::last_os_error()),
            n => Err(io::Error::other(format!("eventfd write of {n} bytes"))),
        }
    }

    /// Takes the counter's value and resets it to 0 (non-blocking
    /// descriptors fail with `WouldBlock` while it is 0).
    pub fn read(&self) -> io::Result<u64> {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live local we own.
        let ret = unsafe { libc::read(self.0.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
        match ret {
            8 => Ok(value),
            -1 => Err(io::Error::last_os_error()),
            n => Err(io::Error::other(format!("eventfd read of {n} bytes"))),
        }
    }

    /// A second handle on the same counter.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

impl AsRawFd for PortableEventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for PortableEventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl IntoRawFd for PortableEventFd {
    fn into_raw_fd(self) -> RawFd {
        self.0.into_raw_fd()
    }
}

impl FromRawFd for PortableEventFd {
    /// # Safety
    ///
    /// `fd` must be an open eventfd that the caller owns and gives up.
    unsafe fn from_raw_fd(fd: RawFd) -> Self {
        // SAFETY: the caller hands over ownership of an open descriptor.
        Self(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

#[cfg(test)]
mod tests {
    use super::PortableEventFd;
    use std::io::ErrorKind;

    #[test]
    fn writes_add_up_and_a_read_takes_and_clears_the_count() {
        let evt = PortableEventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        assert_eq!(evt.read().unwrap_err().kind(), ErrorKind::WouldBlock);
        evt.write(1).unwrap();
        evt.try_clone().unwrap().write(2).unwrap();
        assert_eq!(evt.read().unwrap(), 3);
        assert_eq!(evt.read().unwrap_err().kind(), ErrorKind::WouldBlock);
    }

    #[test]
    fn a_full_counter_refuses_more_without_blocking() {
        let evt = PortableEventFd::new(libc::EFD_NONBLOCK).unwrap();
        evt.write(u64::MAX - 1).unwrap();
        assert_eq!(evt.write(1).unwrap_err().kind(), ErrorKind::WouldBlock);
        assert_eq!(evt.read().unwrap(), u64::MAX - 1);
    }
}
