//! Descriptor-chain processing as the virtio-net worker does it, on a
//! guest that controls everything: the bytes of guest memory (descriptor
//! table, avail ring, buffers), the queue size and the feature bits. The
//! device pops, walks (both directions), takes the single-descriptor fast
//! path, returns chains and publishes, and must never panic, loop, or hand
//! out a segment outside guest RAM.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nmvm_devices::virtio::splitq::{Chain, DeviceQueue, GuestRam, OneBuf, SplitRing};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM: small, so that arbitrary addresses often land inside it.
const RAM: u64 = 64 << 10;
const DESC: u64 = 0x1000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let size = 1u16 << (data[0] % 9); // 1..256 entries
    let event_idx = data[1] & 1 != 0;
    let writable = data[1] & 2 != 0;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)])
        .expect("guest memory");
    // The guest's bytes, from the descriptor table on.
    let body = &data[2..];
    let n = body.len().min((RAM - DESC) as usize);
    mem.write_slice(&body[..n], GuestAddress(DESC))
        .expect("in RAM");
    let ram = GuestRam::new(&mem).expect("ram");
    let avail = DESC + 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size) + 4095) & !4095;
    let Ok(ring) = SplitRing::new(&ram, DESC, avail, used, size) else {
        return;
    };
    let mut q = DeviceQueue::from_ring(ring, event_idx, 0, 0);
    let mut chain = Chain::default();
    let mut ones = [OneBuf::default(); 16];
    // Bounded: a hostile avail index may claim up to 65535 entries.
    for _ in 0..512 {
        let Ok(pending) = q.pending() else {
            break; // DEVICE_NEEDS_RESET
        };
        if pending == 0 {
            break;
        }
        let k = q.peek_simple(
            &ram,
            0,
            writable,
            1..=65535,
            &mut ones[..usize::from(pending.min(16))],
        );
        if k > 0 {
            for one in &ones[..k] {
                assert!(one.len > 0);
            }
        }
        let Ok(Some(head)) = q.pop() else {
            break;
        };
        match q.walk(&ram, head, writable, &mut chain) {
            Ok(len) => {
                let total: usize = chain.segs().iter().map(|s| s.len as usize).sum();
                assert_eq!(total, len);
                // Every byte of the chain is addressable.
                if len > 0 {
                    assert!(chain.byte_ptr(len - 1).is_some());
                }
                assert!(chain.byte_ptr(len).is_none());
                q.push_used(head, len.min(u32::MAX as usize) as u32);
            }
            Err(_) => q.push_used(head, 0),
        }
        if q.publish_used() {
            let _ = q.needs_notification();
        }
    }
});
