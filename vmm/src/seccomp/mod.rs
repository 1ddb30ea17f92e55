//! Seccomp filters for `nmvm run`, `nmvm vhost-user`, `nmvm pkt-gen` and
//! `nmvm demo`, one allow-list per kind of thread.
//!
//! Each thread installs its own filter once its set-up is done, right before
//! it starts serving the guest (vCPU threads), the port (the device worker,
//! the userspace netmap pipe's control thread) or the operator (the main
//! thread, which also starts the console input thread under its filter).
//! A system call outside the list is trapped: [`sigsys_handler`] prints
//! one line naming the thread kind and the system call, and the process
//! exits with [`EXIT_VMM_ERROR`]. It never hangs and never continues.
//!
//! Filters are inherited by the threads a thread starts and stack with the
//! ones those threads install (the strictest action wins). The device
//! worker is started by a vCPU thread when the driver activates the
//! device, so the vCPU list also holds what the worker needs to start and
//! run; the worker's own, shorter list is what it is held to.
//!
//! `mmap` and `mprotect` are allowed only without `PROT_EXEC`: after
//! set-up no thread can make memory executable. `clone` is allowed only for
//! threads (`CLONE_THREAD`), and `clone3`, whose flags a filter cannot see,
//! fails with ENOSYS so that the C library falls back to `clone`.
//!
//! Filters are opt-in per process: only [`enable`] (called by `nmvm run`,
//! `vhost-user`, `pkt-gen` and `demo` unless `--no-seccomp`) turns
//! [`install`] on, so library users (the unit tests, `nmvm bench`, which
//! starts its vhost-user and pkt-gen peers as confined processes) run
//! unfiltered.
//!
//! seccomp is Linux's. On other systems (FreeBSD, where nmvm drives bhyve)
//! there is no filter yet: [`enable`] succeeds without confining anything,
//! [`SUPPORTED`] says so, and `nmvm` prints a warning when it starts.

use thiserror::Error;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::{confine_or_exit, enable, enabled, install};

/// Whether this build can confine threads (Linux seccomp).
pub const SUPPORTED: bool = cfg!(target_os = "linux");

/// The kinds of thread `nmvm run` confines, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    /// A vCPU thread: KVM_RUN, port and MMIO emulation, the console output.
    Vcpu = 1,
    /// The virtio-net device worker: guest rings to netmap rings.
    DeviceWorker = 2,
    /// The main thread (waits for the verdict, reports it) and the console
    /// input thread it starts.
    Main = 3,
    /// The control thread of a userspace netmap pipe (`shm:`): accepts the
    /// peer on a Unix socket and hands it the shared memory.
    ShmControl = 4,
    /// `nmvm vhost-user`'s protocol thread: accepts frontends, maps their
    /// memory, starts and stops the device worker.
    VhostUser = 5,
    /// pkt-gen's traffic loop (the `nmvm pkt-gen` process, or the demo's
    /// main thread).
    PktGen = 6,
}

impl ThreadKind {
    /// A name for log lines.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::DeviceWorker => "device worker",
            ThreadKind::Main => "main/console",
            ThreadKind::ShmControl => "netmap shm control",
            ThreadKind::VhostUser => "vhost-user",
            ThreadKind::PktGen => "pkt-gen",
        }
    }
}

/// Errors while building or installing a filter.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// The filter could not be built (a bad rule: a bug).
    #[cfg(target_os = "linux")]
    #[error("cannot build the {kind} seccomp filter: {source}")]
    Build {
        /// For which thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[cfg(target_os = "linux")]
    #[error("cannot install the {kind} seccomp filter: {source}")]
    Install {
        /// For which thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// No filter on this OS: nothing to set up.
#[cfg(not(target_os = "linux"))]
pub fn enable() -> Result<(), SeccompError> {
    Ok(())
}

/// No filter on this OS: never enabled.
#[cfg(not(target_os = "linux"))]
pub fn enabled() -> bool {
    false
}

/// No filter on this OS: the thread runs unconfined.
#[cfg(not(target_os = "linux"))]
pub fn install(_kind: ThreadKind) -> Result<(), SeccompError> {
    Ok(())
}

/// No filter on this OS: the thread runs unconfined.
#[cfg(not(target_os = "linux"))]
pub fn confine_or_exit(_kind: ThreadKind) {}
