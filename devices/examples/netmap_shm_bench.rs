//! Throughput of a userspace netmap pipe: one thread per end, A sends fixed
//! size frames to B in batches, B receives them.
//!
//! ```text
//! cargo run --release -p nmvm-devices --example netmap_shm_bench -- [seconds] [frame bytes] [batch] [--spin] [--no-touch]
//! ```
//!
//! By default the sender writes every frame into its buffer and the receiver
//! reads its first bytes (what a packet generator and a counting receiver
//! do); `--no-touch` moves slots only. A side that cannot progress sleeps on
//! its eventfd (`wait_*`), unless `--spin`, where it just syncs again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nmvm_devices::netmap::{Port, PortOptions, PortStats};

struct Args {
    secs: f64,
    size: usize,
    batch: u32,
    spin: bool,
    touch: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        secs: 3.0,
        size: 64,
        batch: 256,
        spin: false,
        touch: true,
    };
    let mut pos = 0;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--spin" => a.spin = true,
            "--no-touch" => a.touch = false,
            v => {
                match pos {
                    0 => a.secs = v.parse().expect("seconds"),
                    1 => a.size = v.parse().expect("frame bytes"),
                    2 => a.batch = v.parse().expect("batch"),
                    _ => panic!("unexpected argument {v}"),
                }
                pos += 1;
            }
        }
    }
    assert!(
        (14..=2048).contains(&a.size),
        "frame size must fit one buffer"
    );
    a
}

fn sender(mut p: Port, a: &Args, stop: &AtomicBool) -> (u64, PortStats) {
    let mut frame = vec![0u8; a.size];
    frame[..6].fill(0xff);
    frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    let len = a.size as u16;
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let tx = p.tx_ring();
        let room = tx.space_from_cur().min(a.batch);
        let mut i = tx.cur();
        for _ in 0..room {
            if a.touch {
                if let Some(b) = tx.tx_buf(i) {
                    b[..frame.len()].copy_from_slice(&frame);
                }
            }
            tx.set_len_flags(i, len, 0);
            i = tx.next(i);
        }
        tx.advance(i);
        sent += u64::from(room);
        p.txsync().expect("txsync");
        if room == 0 && !a.spin {
            p.wait_tx(Some(Duration::from_millis(50))).expect("wait_tx");
        }
    }
    (sent, p.stats())
}

fn receiver(mut p: Port, a: &Args, stop: &AtomicBool) -> (u64, u64, PortStats) {
    let mut rcvd = 0u64;
    let mut sum = 0u64;
    while !stop.load(Ordering::Relaxed) {
        p.rxsync().expect("rxsync");
        let rx = p.rx_ring();
        let mut i = rx.head();
        let tail = rx.tail();
        let mut k = 0;
        while i != tail && k < a.batch {
            if a.touch {
                if let Some((d, _)) = rx.frag(i) {
                    sum += u64::from(d[0]) + d.len() as u64;
                }
            } else if let Some(s) = rx.slot(i) {
                sum += u64::from(s.len);
            }
            i = rx.next(i);
            k += 1;
        }
        rx.advance(i);
        rcvd += u64::from(k);
        if k == 0 && !a.spin {
            p.wait_rx(Some(Duration::from_millis(50))).expect("wait_rx");
        }
    }
    (rcvd, sum, p.stats())
}

/// Single-thread memcpy of frame-sized blocks into 2 KiB-strided buffers,
/// as a same-run reference.
fn memcpy_rate(size: usize) -> f64 {
    let src = vec![0xabu8; size];
    let mut pool = vec![0u8; 4096 * 2048];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_millis(500) {
        for k in 0..4096 {
            let o = k * 2048;
            pool[o..o + size].copy_from_slice(&src);
        }
        n += 4096;
        std::hint::black_box(&mut pool);
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let a = Arc::new(parse_args());
    let dir = std::env::temp_dir().join(format!("nmvm-bench-{}", std::process::id()));
    let opts = PortOptions {
        run_dir: Some(dir.clone()),
        ..PortOptions::default()
    };
    let name = format!("bench{}", std::process::id());
    let pa = Port::open(&format!("shm:{name}{{0"), &opts).expect("open A");
    let pb = Port::open(&format!("shm:{name}}}0"), &opts).expect("open B");
    let stop = Arc::new(AtomicBool::new(false));
    let (a1, s1) = (a.clone(), stop.clone());
    let tx = std::thread::spawn(move || sender(pa, &a1, &s1));
    let (a2, s2) = (a.clone(), stop.clone());
    let rx = std::thread::spawn(move || receiver(pb, &a2, &s2));
    // Warm up, then measure what B receives over the interval.
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(a.secs));
    stop.store(true, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64() + 0.2;
    let (sent, st_a) = tx.join().unwrap();
    let (rcvd, _, st_b) = rx.join().unwrap();
    let mpps = rcvd as f64 / elapsed / 1e6;
    let mc = memcpy_rate(a.size) / 1e6;
    println!(
        "shm pipe A->B: {} B frames, batch {}, {}{}: {:.2} Mpps ({:.2} Gbit/s), sent {} received {}",
        a.size,
        a.batch,
        if a.spin { "spin" } else { "blocking waits" },
        if a.touch { "" } else { ", no payload touch" },
        mpps,
        mpps * 1e6 * a.size as f64 * 8.0 / 1e9,
        sent,
        rcvd
    );
    println!(
        "syscalls: A kicks {} wakeups {} (txsyncs {}), B kicks {} wakeups {} (rxsyncs {}); \
         per 1000 frames: {:.3}",
        st_a.kicks_sent,
        st_a.wakeups,
        st_a.txsyncs,
        st_b.kicks_sent,
        st_b.wakeups,
        st_b.rxsyncs,
        (st_a.kicks_sent + st_b.kicks_sent + st_a.wakeups + st_b.wakeups) as f64 * 1000.0
            / rcvd.max(1) as f64
    );
    println!(
        "reference: memcpy of {} B frames, one thread: {:.1} M/s",
        a.size, mc
    );
    let _ = std::fs::remove_dir(&dir);
}
