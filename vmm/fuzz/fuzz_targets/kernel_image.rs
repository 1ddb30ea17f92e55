//! Kernel image parsing: an arbitrary file as `--kernel` (ELF vmlinux or
//! bzImage headers) loaded into a small guest. Refusals are fine; a panic
//! or a write outside guest RAM is not (vm-memory checks every write).
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const RAM: u64 = 32 << 20;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)])
        .expect("guest memory");
    let mut f = Cursor::new(data);
    if let Ok(k) = nmvm::boot::kernel::load(&mem, &mut f, data.len() as u64, RAM) {
        assert!(k.end >= k.entry.min(k.end));
    }
});
