//! Installing nmvm's few signal handlers (vCPU kicks, SIGSYS from the
//! seccomp filters, SIGBUS from shrunk vhost-user memory).

use std::io;

/// A handler that takes the signal's `siginfo_t`.
pub type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Installs `handler` for `sig` with `SA_SIGINFO`, nothing masked and no
/// `SA_RESTART`, so a system call it interrupts returns EINTR (which the
/// vCPU kick relies on).
///
/// # Safety
///
/// `handler` must be async-signal-safe: it may only make async-signal-safe
/// calls and touch atomics or const-initialised thread locals.
pub unsafe fn set_handler(sig: libc::c_int, handler: Handler) -> io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value, filled in before
    // use; the caller vouches for the handler.
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(sig, &act, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
