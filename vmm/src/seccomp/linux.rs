//! The seccomp filters themselves (Linux): one allow-list per
//! [`ThreadKind`], the SIGSYS handler that reports a violation, and the
//! switch that turns confinement on for a process.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{SeccompError, ThreadKind};
use crate::verdict::EXIT_VMM_ERROR;

/// Every kind, for building all filters up front.
const ALL_KINDS: [ThreadKind; 6] = [
    ThreadKind::Vcpu,
    ThreadKind::DeviceWorker,
    ThreadKind::Main,
    ThreadKind::ShmControl,
    ThreadKind::VhostUser,
    ThreadKind::PktGen,
];

fn kind_from_u8(v: u8) -> Option<ThreadKind> {
    ALL_KINDS.into_iter().find(|k| *k as u8 == v)
}

static ENABLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The kind of filter this thread installed, for the SIGSYS line. A
    /// const-initialised `Cell<u8>` needs no lazy set-up or destructor, so
    /// reading it from the signal handler is a plain TLS load.
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Turns filtering on for this process: installs the SIGSYS handler and
/// the device crate's thread-start hooks. From then on [`install`] confines
/// the calling thread. Call it once, before the VM's threads start.
pub fn enable() -> Result<(), SeccompError> {
    // Build every filter once up front: a bad rule is a start-up error, not
    // a surprise in a running thread.
    for kind in ALL_KINDS {
        filters(kind)?;
    }
    // SAFETY: the handler only calls async-signal-safe functions (write,
    // _exit) and reads a const-initialised thread local.
    unsafe { crate::signal::set_handler(libc::SIGSYS, sigsys_handler) }
        .map_err(SeccompError::Handler)?;
    nmvm_devices::virtio::net::set_worker_start_hook(|| confine_or_exit(ThreadKind::DeviceWorker));
    nmvm_devices::netmap::shm::set_control_start_hook(|| confine_or_exit(ThreadKind::ShmControl));
    ENABLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Confines the calling thread to `kind`'s allow-list (a no-op unless
/// [`enable`] was called).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    let (allow, no_clone3) = filters(kind)?;
    KIND.with(|k| k.set(kind as u8));
    // The allow-list goes last: installing a filter takes prctl and
    // seccomp calls that it does not allow.
    for prog in [&no_clone3, &allow] {
        seccompiler::apply_filter(prog).map_err(|source| SeccompError::Install {
            kind: kind.name(),
            source,
        })?;
    }
    log::debug!("seccomp: {} thread confined", kind.name());
    Ok(())
}

/// [`install`] for threads that have no caller to return an error to: an
/// unconfined thread must not run, so the VMM stops with one line.
pub fn confine_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        eprintln!("nmvm: {e}");
        // SAFETY: _exit ends the process at once; nothing is left half done
        // that a clean exit would have to finish.
        unsafe { libc::_exit(i32::from(EXIT_VMM_ERROR)) };
    }
}

/// The two programs for `kind`: its allow-list (anything else traps), and
/// the one-rule filter that makes `clone3` fail with ENOSYS.
fn filters(kind: ThreadKind) -> Result<(BpfProgram, BpfProgram), SeccompError> {
    let err = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let allow = SeccompFilter::new(
        rules(kind).map_err(err)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(err)?;
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(err)?;
    Ok((allow, no_clone3))
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;
type BackendResult<T> = Result<T, seccompiler::BackendError>;

/// `ioctl` request numbers the filters allow.
mod req {
    use nmvm_devices::ioctl::linux::{io, ior, iow};
    const KVMIO: u8 = 0xae;
    /// `KVM_RUN`.
    pub const KVM_RUN: u64 = io(KVMIO, 0x80) as u64;
    /// `KVM_GET_REGS` (struct kvm_regs: 144 bytes): the rip of an
    /// emulation failure, for its verdict line.
    pub const KVM_GET_REGS: u64 = ior(KVMIO, 0x81, 144) as u64;
    /// `KVM_SET_GSI_ROUTING` (struct kvm_irq_routing header: 8 bytes).
    pub const KVM_SET_GSI_ROUTING: u64 = iow(KVMIO, 0x6a, 8) as u64;
    /// `KVM_IRQFD` (struct kvm_irqfd: 32 bytes).
    pub const KVM_IRQFD: u64 = iow(KVMIO, 0x76, 32) as u64;
    /// `NIOCTXSYNC` and `NIOCRXSYNC` (netmap, Linux numbering).
    pub const NIOCTXSYNC: u64 = nmvm_devices::netmap::abi::NIOCTXSYNC as u64;
    pub const NIOCRXSYNC: u64 = nmvm_devices::netmap::abi::NIOCRXSYNC as u64;
    /// Restoring the terminal at exit.
    pub const TCSETS: u64 = libc::TCSETS;
    pub const TCGETS: u64 = libc::TCGETS;
    /// Non-blocking sockets.
    pub const FIONBIO: u64 = libc::FIONBIO;
}

/// A condition on the low 32 bits of argument `arg`: every argument the
/// filters look at is a C `int` or has its flags there, and the kernel does
/// not clear the upper half of an `int` argument's register.
fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> BackendResult<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// One rule per allowed `ioctl` request (argument 1).
fn ioctls(requests: &[u64]) -> BackendResult<Vec<SeccompRule>> {
    requests
        .iter()
        .map(|&r| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, r)?]))
        .collect()
}

/// `mmap`/`mprotect` without `PROT_EXEC` (argument 2).
fn no_exec() -> BackendResult<Vec<SeccompRule>> {
    Ok(vec![SeccompRule::new(vec![cond(
        2,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?])?])
}

/// What every thread needs: memory management of the C library and of
/// thread stacks, futexes, time, writing to stderr (logs and this module's
/// last line), signal return and exit, and `getrandom` (the standard
/// library seeds each thread's first `HashMap` with it).
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_write,
];

/// What the C library and Rust's runtime do while starting a thread (in
/// the new thread, under its parent's filter).
const THREAD_START: &[i64] = &[
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_set_robust_list,
];

/// The device worker's own list (beyond [`COMMON`]): eventfd reads and
/// writes (kicks, interrupts, the peer's notifications), poll, and the
/// netmap sync ioctls of kernel ports.
const WORKER: &[i64] = &[
    libc::SYS_read,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_close,
    libc::SYS_fcntl,
];

/// The vCPU's list (beyond [`COMMON`], [`WORKER`] and thread start-up): the
/// stop eventfd of a device activation and closing it again.
const VCPU: &[i64] = &[libc::SYS_eventfd2];

/// The main and console threads: console input, the end-of-run report
/// (reading /proc/self/status, writing `--report` files), closing the
/// VM's descriptors, stopping vCPU threads with a signal.
const MAIN: &[i64] = &[
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_getpid,
    libc::SYS_lseek,
    libc::SYS_mincore,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_statx,
    libc::SYS_tgkill,
    libc::SYS_flock,
    libc::SYS_unlink,
];

/// The shm control thread: the rendezvous socket and its lock file (and
/// serving it when the serving end went away), the peer connection (the
/// memfd goes over SCM_RIGHTS), the stop eventfd.
const SHM_CONTROL: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_connect,
    libc::SYS_listen,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_getpid,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_statx,
    libc::SYS_unlink,
];

/// `nmvm vhost-user`'s protocol thread (beyond [`COMMON`], [`WORKER`] and
/// thread start-up, as it starts the device worker): frontend connections
/// and their messages with descriptors, checking that a descriptor is an
/// eventfd (`readlink` of /proc/self/fd) and a memory file's size before
/// mapping it, the worker's stop eventfd, the socket's removal at the end.
const VHOST_USER: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_eventfd2,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_readlink,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_statx,
    libc::SYS_unlink,
];

/// pkt-gen's traffic loop: waiting on the port's eventfds (or the netmap
/// descriptor), closing the port at the end.
const PKT_GEN: &[i64] = &[
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
];

fn rules(kind: ThreadKind) -> BackendResult<Rules> {
    let mut r = Rules::new();
    let mut plain = |list: &[i64]| {
        for &nr in list {
            r.insert(nr, Vec::new());
        }
    };
    plain(COMMON);
    let spawns_threads = matches!(
        kind,
        ThreadKind::Vcpu | ThreadKind::Main | ThreadKind::VhostUser
    );
    match kind {
        ThreadKind::Vcpu => {
            plain(WORKER);
            plain(VCPU);
            plain(THREAD_START);
        }
        ThreadKind::DeviceWorker => plain(WORKER),
        ThreadKind::VhostUser => {
            plain(WORKER);
            plain(VHOST_USER);
            plain(THREAD_START);
        }
        ThreadKind::PktGen => plain(PKT_GEN),
        ThreadKind::Main => {
            plain(MAIN);
            plain(THREAD_START);
        }
        ThreadKind::ShmControl => {
            plain(SHM_CONTROL);
            // Taking over the rendezvous socket when the serving end went
            // away: Unix sockets only.
            r.insert(
                libc::SYS_socket,
                vec![SeccompRule::new(vec![cond(
                    0,
                    SeccompCmpOp::Eq,
                    libc::AF_UNIX as u64,
                )?])?],
            );
        }
    }
    r.insert(libc::SYS_mmap, no_exec()?);
    r.insert(libc::SYS_mprotect, no_exec()?);
    let requests: &[u64] = match kind {
        ThreadKind::Vcpu => &[
            req::KVM_RUN,
            req::KVM_GET_REGS,
            req::KVM_SET_GSI_ROUTING,
            req::KVM_IRQFD,
            req::NIOCTXSYNC,
            req::NIOCRXSYNC,
        ],
        ThreadKind::DeviceWorker | ThreadKind::PktGen => &[req::NIOCTXSYNC, req::NIOCRXSYNC],
        // Blocking mode for an accepted connection; the worker's syncs.
        ThreadKind::VhostUser => &[req::FIONBIO, req::NIOCTXSYNC, req::NIOCRXSYNC],
        // Dropping the VM unregisters irqfds; the terminal is restored.
        ThreadKind::Main => &[req::KVM_IRQFD, req::TCSETS, req::TCGETS],
        ThreadKind::ShmControl => &[req::FIONBIO],
    };
    r.insert(libc::SYS_ioctl, ioctls(requests)?);
    if spawns_threads {
        // Threads only: a new process would escape nothing (it inherits the
        // filter), but there is no reason to allow one.
        r.insert(
            libc::SYS_clone,
            vec![SeccompRule::new(vec![cond(
                0,
                SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
                libc::CLONE_THREAD as u64,
            )?])?],
        );
        r.insert(libc::SYS_clone3, Vec::new());
        // Naming the new thread; and letting it install its own filter
        // (the device worker does), which can only take rights away.
        r.insert(
            libc::SYS_prctl,
            vec![
                SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?])?,
                SeccompRule::new(vec![cond(
                    0,
                    SeccompCmpOp::Eq,
                    libc::PR_SET_NO_NEW_PRIVS as u64,
                )?])?,
            ],
        );
        r.insert(
            libc::SYS_seccomp,
            vec![SeccompRule::new(vec![cond(
                0,
                SeccompCmpOp::Eq,
                u64::from(libc::SECCOMP_SET_MODE_FILTER),
            )?])?],
        );
    }
    Ok(r)
}

/// Names for the SIGSYS line: everything on some list, plus calls an
/// attacker would reach for first.
fn syscall_name(nr: i64) -> &'static str {
    const NAMES: &[(i64, &str)] = &[
        (libc::SYS_read, "read"),
        (libc::SYS_write, "write"),
        (libc::SYS_open, "open"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_close, "close"),
        (libc::SYS_mmap, "mmap"),
        (libc::SYS_mprotect, "mprotect"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_bind, "bind"),
        (libc::SYS_listen, "listen"),
        (libc::SYS_clone, "clone"),
        (libc::SYS_fork, "fork"),
        (libc::SYS_vfork, "vfork"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_execveat, "execveat"),
        (libc::SYS_kill, "kill"),
        (libc::SYS_tgkill, "tgkill"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_prctl, "prctl"),
        (libc::SYS_mount, "mount"),
        (libc::SYS_unshare, "unshare"),
        (libc::SYS_setns, "setns"),
        (libc::SYS_getpid, "getpid"),
        (libc::SYS_getppid, "getppid"),
        (libc::SYS_eventfd2, "eventfd2"),
        (libc::SYS_poll, "poll"),
        (libc::SYS_ppoll, "ppoll"),
        (libc::SYS_fcntl, "fcntl"),
        (libc::SYS_statx, "statx"),
        (libc::SYS_newfstatat, "newfstatat"),
        (libc::SYS_unlink, "unlink"),
        (libc::SYS_sendmsg, "sendmsg"),
        (libc::SYS_recvmsg, "recvmsg"),
        (libc::SYS_memfd_create, "memfd_create"),
        (libc::SYS_getrandom, "getrandom"),
        (libc::SYS_readlink, "readlink"),
        (libc::SYS_accept4, "accept4"),
        (libc::SYS_recvfrom, "recvfrom"),
        (libc::SYS_sendto, "sendto"),
        (libc::SYS_setsockopt, "setsockopt"),
        (libc::SYS_fstat, "fstat"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or("?", |(_, name)| name)
}

/// The kernel's `siginfo_t` for SIGSYS on x86-64: `_call_addr` at 16,
/// `_syscall` at 24 (libc's `siginfo_t` does not expose the union).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

/// A stack buffer the handler formats its line into (no allocation).
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The SIGSYS handler: one line on stderr, then the VMM-error exit status.
/// Async-signal-safe: it formats into a stack buffer and calls `write` and
/// `_exit`, both on every allow-list.
extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler;
    // for SIGSYS its layout is `SigsysInfo`, which is no larger than
    // siginfo_t (128 bytes).
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let kind = KIND.with(Cell::get);
    let mut line = Line {
        buf: [0; 192],
        len: 0,
    };
    line.push(b"nmvm: seccomp: the ");
    line.push(
        kind_from_u8(kind)
            .map_or("unconfined", ThreadKind::name)
            .as_bytes(),
    );
    line.push(b" thread made a forbidden system call ");
    line.push_num(nr.max(0) as u64);
    line.push(b" (");
    line.push(syscall_name(i64::from(nr)).as_bytes());
    line.push(b"); stopping nmvm\n");
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid
    // for `len` bytes.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(i32::from(EXIT_VMM_ERROR));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds() {
        for kind in ALL_KINDS {
            assert_eq!(kind_from_u8(kind as u8), Some(kind));
            let (allow, no_clone3) = filters(kind).expect("filter");
            assert!(!allow.is_empty() && !no_clone3.is_empty());
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(req::KVM_RUN, 0xae80);
        assert_eq!(req::KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(req::KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(req::KVM_IRQFD, 0x4020_ae76);
    }

    #[test]
    fn the_worker_cannot_spawn_open_or_map_executable_memory() {
        let worker = rules(ThreadKind::DeviceWorker).expect("rules");
        for nr in [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_execve,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_eventfd2,
        ] {
            assert!(!worker.contains_key(&nr), "{}", syscall_name(nr));
        }
        // mmap is allowed only under the no-PROT_EXEC condition.
        assert_eq!(worker[&libc::SYS_mmap].len(), 1);
    }

    #[test]
    fn the_peer_facing_processes_cannot_open_files_or_sockets_or_execute() {
        for kind in [ThreadKind::VhostUser, ThreadKind::PktGen] {
            let allowed = rules(kind).expect("rules");
            for nr in [
                libc::SYS_openat,
                libc::SYS_open,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_execve,
                libc::SYS_memfd_create,
                libc::SYS_ptrace,
            ] {
                assert!(
                    !allowed.contains_key(&nr),
                    "{}: {}",
                    kind.name(),
                    syscall_name(nr)
                );
            }
            assert_eq!(allowed[&libc::SYS_mmap].len(), 1, "{}", kind.name());
        }
        // pkt-gen starts no threads; vhost-user only threads.
        assert!(!rules(ThreadKind::PktGen)
            .expect("rules")
            .contains_key(&libc::SYS_clone));
        assert_eq!(
            rules(ThreadKind::VhostUser).expect("rules")[&libc::SYS_clone].len(),
            1
        );
    }

    #[test]
    fn the_sigsys_line_is_formatted_without_allocation() {
        let mut line = Line {
            buf: [0; 192],
            len: 0,
        };
        line.push(b"call ");
        line.push_num(41);
        line.push_num(0);
        assert_eq!(&line.buf[..line.len], b"call 410");
        assert_eq!(syscall_name(libc::SYS_socket), "socket");
    }
}
