//! Surviving memory that shrinks under a mapping.
//!
//! A vhost-user frontend hands nmvm file descriptors for its memory, and
//! nothing stops it from truncating such a file after nmvm mapped it
//! (memfds without seals, files in /dev/shm). The next access to a page
//! past the new end raises SIGBUS, which would kill the backend. Regions
//! registered with [`protect`] are rescued instead: the handler maps
//! anonymous zero pages over the whole region (the frontend broke its side
//! of the contract, so all of its memory now reads as zeros, which the
//! device treats like any other untrusted bytes), says so once on stderr,
//! and the access is retried; the vhost-user connection notices
//! [`rescued`] move and ends. A SIGBUS anywhere else ends the process
//! with one line and the VMM-error status.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Regions that can be registered at once (vhost-user allows 8 per
/// connection, or 32 with the configurable-slots feature).
const SLOTS: usize = 64;

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: AtomicUsize = AtomicUsize::new(0);
/// Start and length of each registered region (length 0: a free slot).
static STARTS: [AtomicUsize; SLOTS] = [EMPTY; SLOTS];
static LENS: [AtomicUsize; SLOTS] = [EMPTY; SLOTS];
/// Regions rescued so far.
static RESCUED: AtomicU64 = AtomicU64::new(0);
static WARNED: AtomicBool = AtomicBool::new(false);

/// Keeps a region registered; dropping it unregisters the region (do so
/// before unmapping it).
#[derive(Debug)]
pub struct Protected(usize);

impl Drop for Protected {
    fn drop(&mut self) {
        // Match nothing, clear the start, and only then free the slot, so
        // that a `protect` claiming it meanwhile keeps its own start.
        LENS[self.0].store(usize::MAX, Ordering::Release);
        STARTS[self.0].store(0, Ordering::Release);
        LENS[self.0].store(0, Ordering::Release);
    }
}

/// Registers `[start, start + len)`, a shared mapping of a file that
/// somebody else may shrink. `None` if every slot is taken (the region is
/// then unprotected, as without this module).
pub fn protect(start: *const u8, len: usize) -> Option<Protected> {
    if len == 0 {
        return None;
    }
    for i in 0..SLOTS {
        if LENS[i]
            .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            // Claimed with a length that matches nothing until the start
            // is in place.
            STARTS[i].store(start as usize, Ordering::Release);
            LENS[i].store(len, Ordering::Release);
            return Some(Protected(i));
        }
    }
    log::warn!("sigbus: no free slot; a mapping of {len} bytes is unprotected");
    None
}

/// How many regions were rescued from a SIGBUS.
pub fn rescued() -> u64 {
    RESCUED.load(Ordering::Relaxed)
}

/// Installs the SIGBUS handler (once per process; later calls return the
/// first one's result).
pub fn install() -> Result<(), std::io::Error> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: the handler only makes async-signal-safe system calls
        // (mmap, write, _exit) and reads and bumps atomics.
        unsafe { crate::signal::set_handler(libc::SIGBUS, on_sigbus) }
            .map_err(|e| e.raw_os_error().unwrap_or(0))
    });
    result.map_err(std::io::Error::from_raw_os_error)
}

/// Reserve no swap for the zero pages (FreeBSD never does, and dropped the
/// flag).
#[cfg(target_os = "linux")]
const NORESERVE: libc::c_int = libc::MAP_NORESERVE;
#[cfg(not(target_os = "linux"))]
const NORESERVE: libc::c_int = 0;

const FATAL: &[u8] =
    b"nmvm: bus error (SIGBUS) outside memory a frontend may shrink; stopping nmvm\n";

const MESSAGE: &[u8] = b"nmvm: the vhost-user frontend shrank a memory file under nmvm's \
mapping; its memory now reads as zeros\n";

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler;
    // for SIGBUS, si_addr is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    for i in 0..SLOTS {
        let (start, len) = (
            STARTS[i].load(Ordering::Acquire),
            LENS[i].load(Ordering::Acquire),
        );
        if len == 0 || len == usize::MAX || addr < start || addr - start >= len {
            continue;
        }
        // The pair is read without a lock: if the slot changed meanwhile,
        // the region is being unregistered and nmvm no longer uses it.
        if STARTS[i].load(Ordering::Acquire) != start || LENS[i].load(Ordering::Acquire) != len {
            continue;
        }
        // SAFETY: `[start, start + len)` is a mapping of ours (registered
        // by `protect` and unregistered before it is unmapped); replacing
        // it with private anonymous memory of the same size at the same
        // address keeps every pointer into it valid. mmap is a plain
        // system call, safe in a signal handler.
        let mapped = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | NORESERVE,
                -1,
                0,
            )
        };
        if mapped as usize == start {
            RESCUED.fetch_add(1, Ordering::Relaxed);
            if !WARNED.swap(true, Ordering::Relaxed) {
                // SAFETY: write(2) of a static buffer; async-signal-safe.
                unsafe { libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len()) };
            }
            // Returning retries the access, which now succeeds.
            return;
        }
        break;
    }
    // Not ours (or it could not be rescued): a bug, or memory nmvm cannot
    // vouch for. Stop with one line, as the seccomp handler does (it cannot
    // restore the default action: the filters forbid sigaction).
    // SAFETY: write(2) of a static buffer and _exit are async-signal-safe.
    unsafe {
        libc::write(2, FATAL.as_ptr().cast(), FATAL.len());
        libc::_exit(i32::from(crate::verdict::EXIT_VMM_ERROR));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};

    /// The tests share the slot table.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn a_file_shrunk_under_its_mapping_reads_as_zeros() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        install().unwrap();
        // SAFETY: memfd_create with a NUL-terminated name; checked.
        let fd = unsafe { libc::memfd_create(c"nmvm-sigbus-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let len = 64 * 4096;
        file.set_len(len as u64).unwrap();
        // SAFETY: a new shared mapping of our own file, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p.cast::<u8>();
        // SAFETY: in bounds of the live mapping.
        unsafe { p.add(len - 1).write_volatile(7) };
        let guard = protect(p, len).expect("a free slot");
        let before = rescued();
        // The "frontend" shrinks the file to one page.
        file.set_len(4096).unwrap();
        // SAFETY: in bounds of the mapping; past the file's end it faults
        // and the handler maps zeros there.
        let v = unsafe { p.add(len - 1).read_volatile() };
        assert_eq!(v, 0);
        assert_eq!(rescued(), before + 1);
        // The rest of the region is zeros too, and writable.
        // SAFETY: in bounds of the (now anonymous) mapping.
        unsafe {
            assert_eq!(p.read_volatile(), 0);
            p.write_volatile(1);
        }
        drop(guard);
        // SAFETY: the mapping made above, unregistered first.
        assert_eq!(unsafe { libc::munmap(p.cast(), len) }, 0);
    }

    #[test]
    fn slots_run_out_and_are_reused() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let x = [0u8; 16];
        let guards: Vec<_> = std::iter::from_fn(|| protect(x.as_ptr(), 16))
            .take(SLOTS + 1)
            .collect();
        assert_eq!(guards.len(), SLOTS);
        assert!(protect(x.as_ptr(), 16).is_none());
        drop(guards);
        assert!(protect(x.as_ptr(), 16).is_some());
        assert!(protect(x.as_ptr(), 0).is_none());
    }
}
