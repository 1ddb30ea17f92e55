//! CPU pinning for the benchmarks: which cores this process may use, and
//! putting a thread (this one, or one of ours found by name) on one core.
//!
//! Linux only (sched_setaffinity, /proc/self/task). Elsewhere the allowed
//! cores are unknown and pinning fails, so the benchmarks run unpinned and
//! say so.

use std::time::Duration;
#[cfg(target_os = "linux")]
use std::time::Instant;

/// The cores this process may run on, in order; empty if unknown.
#[cfg(not(target_os = "linux"))]
pub fn allowed_cores() -> Vec<usize> {
    Vec::new()
}

/// Puts thread `tid` (0: the calling thread) on `core` only: never here.
#[cfg(not(target_os = "linux"))]
pub fn pin(_tid: libc::pid_t, _core: usize) -> bool {
    false
}

/// Finds a thread by name and pins it: never here.
#[cfg(not(target_os = "linux"))]
pub fn pin_named(_name: &str, _core: usize, _limit: Duration) -> bool {
    false
}

/// The cores this process may run on, in order; empty if unknown.
#[cfg(target_os = "linux")]
pub fn allowed_cores() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set, and
    // sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// The first two allowed cores, if there are two.
pub fn two_cores() -> Option<(usize, usize)> {
    match allowed_cores()[..] {
        [a, b, ..] => Some((a, b)),
        _ => None,
    }
}

/// Puts thread `tid` (0: the calling thread) on `core` only.
#[cfg(target_os = "linux")]
pub fn pin(tid: libc::pid_t, core: usize) -> bool {
    if core >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: `set` is a valid cpu_set_t on the stack, `core` is inside it,
    // and sched_setaffinity only reads size_of::<cpu_set_t>() bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Waits up to `limit` for a thread of this process named `name` to
/// appear and puts it on `core`. False if none appeared.
#[cfg(target_os = "linux")]
pub fn pin_named(name: &str, core: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
                let tid = task.file_name().to_string_lossy().parse::<libc::pid_t>();
                if comm.trim_end() == name {
                    if let Ok(tid) = tid {
                        return pin(tid, core);
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_named_thread_is_found_and_pinned() {
        let cores = allowed_cores();
        assert!(!cores.is_empty(), "no allowed core");
        let core = cores[cores.len() - 1];
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("pin-me-test".into())
            .spawn(move || {
                let _ = rx.recv();
                allowed_cores()
            })
            .unwrap();
        assert!(pin_named("pin-me-test", core, Duration::from_secs(5)));
        tx.send(()).unwrap();
        assert_eq!(t.join().unwrap(), vec![core]);
        assert!(!pin_named(
            "no-such-thread",
            core,
            Duration::from_millis(20)
        ));
    }
}
