//! The userspace netmap pipe's sync against a hostile peer: the peer end
//! writes arbitrary ring pointers, slots (buffer indexes, lengths, flags)
//! and control words into the shared memory, then our end syncs and
//! receives and sends. Our end must never panic, read outside the region,
//! or hand out a buffer that is not in its pool; bad values are counted.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use nmvm_devices::netmap::shm::hostile::{Field, Hostile, RingId, Word};
use nmvm_devices::netmap::{Port, PortOptions, Slot};

struct Pair {
    ours: Port,
    peer: Port,
}

/// One pipe for the whole run (opening one creates a memfd, a socket and a
/// thread): each input starts from whatever state the last one left, which
/// is what a long-lived hostile peer does too.
fn pair() -> &'static Mutex<Pair> {
    static PAIR: OnceLock<Mutex<Pair>> = OnceLock::new();
    PAIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("nmvm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("run dir");
        std::env::set_var("NMVM_RUN_DIR", &dir);
        let opts = PortOptions::default();
        let name = format!("shm:fz{}", std::process::id());
        let ours = Port::open(&format!("{name}{{0"), &opts).expect("our end");
        let peer = Port::open(&format!("{name}}}0"), &opts).expect("peer end");
        Mutex::new(Pair { ours, peer })
    })
}

fuzz_target!(|data: &[u8]| {
    let mut p = pair().lock().unwrap_or_else(|e| e.into_inner());
    let Pair { ours, peer } = &mut *p;
    {
        let h = Hostile::new(peer).expect("userspace port");
        let slots = h.num_slots();
        for op in data.chunks_exact(9) {
            let v = u32::from_le_bytes([op[1], op[2], op[3], op[4]]);
            let w = u32::from_le_bytes([op[5], op[6], op[7], op[8]]);
            let ring =
                [RingId::Tx, RingId::Rx, RingId::PeerTx, RingId::PeerRx][usize::from(op[0] & 3)];
            match op[0] >> 2 & 3 {
                0 => {
                    let f = [Field::Head, Field::Cur, Field::Tail][usize::from(op[0] >> 4) % 3];
                    h.set_header(ring, f, v);
                }
                1 => {
                    let word = [
                        Word::TxTail,
                        Word::TxHead,
                        Word::TxKick,
                        Word::RxTail,
                        Word::RxHead,
                    ][usize::from(op[0] >> 4) % 5];
                    h.set_word(word, v);
                }
                2 => h.set_slot(
                    ring,
                    w % slots.max(1),
                    Slot {
                        buf_idx: v,
                        len: (w >> 16) as u16,
                        flags: op[0].into(),
                    },
                ),
                _ => {
                    let _ = h.slot(ring, w % slots.max(1));
                }
            }
        }
    }
    let mut buf = vec![0u8; 65536];
    let _ = ours.rxsync();
    while ours.rx_ring().recv(&mut buf).is_some() {}
    let _ = ours.tx_ring().send(&buf[..60]);
    let _ = ours.txsync();
    let _ = ours.rxsync();
    let _ = ours.stats();
});
