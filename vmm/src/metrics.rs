//! Process measurements: resident memory, and how much of it is guest RAM.

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// This process's resident set size in KiB (`VmRSS`), if readable.
pub fn process_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// How much of guest RAM is resident, in KiB.
pub fn guest_resident_kib(mem: &GuestMemoryMmap) -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as usize,
        _ => 4096,
    };
    let mut resident_pages = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: the region is a live page-aligned mapping of `len` bytes
        // owned by `mem`, and `vec` has one byte per page of it.
        let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr().cast()) };
        if rc == 0 {
            resident_pages += vec.iter().filter(|b| **b & 1 != 0).count() as u64;
        }
    }
    resident_pages * page as u64 / 1024
}
