//! A hostile netmap peer: this process holds end B of nmvm's userspace pipe
//! and writes out-of-range `buf_idx`, oversized `len` and head/cur/tail
//! violations straight into the shared memory (through the testing-only
//! `hostile-peer` API of `nmvm_devices`), mixed with valid frames. nmvm must
//! keep running, deliver every valid frame exactly once and intact, drop
//! and count the bad values, and shrug off the peer leaving mid-stream.
//!
//! Ordering without races: when nmvm's device worker runs out of work it
//! sets the pipe's wake-me word (`Word::TxKick`) and sleeps, and since the
//! sink guest never transmits, our `txsync` (which clears the word and
//! kicks) is what wakes it. A bad value written while it sleeps is read by
//! its next syncs. The one write that is harmful while the worker runs (its
//! own ring header, which it trusts between syncs, as any netmap user does)
//! is made while nmvm is stopped with the worker inside poll(2), since a
//! late guest notification can also wake it.
//!
//! Linux only: it reads the worker's state and system call from /proc.
#![cfg(target_os = "linux")]

mod common;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nmvm::frame::{build, len_for, Endpoints, MAX_LEN, MIN_LEN};
use nmvm_devices::netmap::shm::hostile::{Field, Hostile, RingId, Word};
use nmvm_devices::netmap::{Port, PortOptions};

use common::{nmvm, require_kvm, scratch_dir, text};

/// Longest a whole VM run may take.
const LIMIT: Duration = Duration::from_secs(120);
/// Longest nmvm may take to react to one step.
const STEP: Duration = Duration::from_secs(20);
/// A buffer index far outside any pool.
const BAD_IDX: u32 = 0xffff_fff0;

/// nmvm running a sink guest on end A of a fresh pipe.
struct Vm {
    child: Option<Child>,
    dir: PathBuf,
    name: String,
}

impl Vm {
    fn start(test: &str, count: u64, timeout: &str) -> Vm {
        require_kvm();
        let dir = scratch_dir(&format!("hostile-{test}"));
        let name = format!("hp{}{test}", std::process::id());
        let child = nmvm()
            .args(["run", "--stats", "--timeout", timeout, "--net"])
            .arg(format!("shm:{name}{{0"))
            .arg("--cmdline")
            .arg(format!("net=sink count={count}"))
            .env("NMVM_RUN_DIR", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nmvm");
        Vm {
            child: Some(child),
            dir,
            name,
        }
    }

    fn exited(&mut self) -> bool {
        let child = self.child.as_mut().expect("running");
        child.try_wait().expect("wait").is_some()
    }

    /// Polls `cond` until it holds; fails if nmvm exits or `STEP` passes.
    fn wait_for(&mut self, what: &str, mut cond: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !cond() {
            if self.exited() {
                let (code, o, e) = self.finish(LIMIT);
                panic!("nmvm exited ({code}) {what}\nstdout:\n{o}\nstderr:\n{e}");
            }
            assert!(t0.elapsed() < STEP, "nmvm is stuck {what}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn signal(&mut self, sig: libc::c_int) {
        let pid = self.child.as_ref().expect("running").id();
        // SAFETY: kill(2) has no memory-safety preconditions. `pid` is our
        // child, not yet reaped (we hold its `Child`), so it cannot name
        // another process.
        let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Stops nmvm (SIGSTOP) at a moment when its device worker sleeps in
    /// poll(2) having taken all our frames, so that whatever we write now,
    /// its first act when it runs again is a sync (which validates) and not
    /// a read of its rings. nmvm continues when the guard is dropped.
    fn freeze_asleep(&mut self, peer: &Peer) -> Frozen {
        for _ in 0..50 {
            peer.settle(self);
            let pid = self.child.as_ref().expect("running").id();
            self.signal(libc::SIGSTOP);
            let frozen = Frozen { pid };
            self.wait_for("stopping", || {
                threads(pid).iter().all(|&(_, s, _)| s == 'T' || s == 't')
            });
            let polling = [libc::SYS_ppoll, libc::SYS_restart_syscall, SYS_POLL];
            let asleep = threads(pid)
                .iter()
                .any(|(name, _, nr)| name == "nmvm-net" && polling.contains(nr));
            if asleep && peer.idle() {
                return frozen;
            }
            drop(frozen);
        }
        panic!("nmvm's device worker never sat still in poll(2)");
    }

    /// Opens end B once nmvm has created the pipe (so that nmvm's geometry
    /// is the pipe's) and its device worker sleeps (the guest drove it).
    fn open_peer(&mut self, sent: u64) -> Peer {
        let sock = self.dir.join(format!("{}-0.sock", self.name));
        self.wait_for("before creating the pipe", || sock.exists());
        let opts = PortOptions {
            run_dir: Some(self.dir.clone()),
            ..PortOptions::default()
        };
        let port = Port::open(&format!("shm:{}}}0", self.name), &opts).expect("open end B");
        let peer = Peer {
            port,
            sent,
            buf: vec![0; MAX_LEN],
        };
        self.wait_for("before starting the device", || {
            peer.h().word(Word::TxKick) == 1
        });
        peer
    }

    /// Waits (up to `limit`) for nmvm to exit: status code, stdout, stderr.
    fn finish(&mut self, limit: Duration) -> (i32, String, String) {
        let mut child = self.child.take().expect("running");
        let t0 = Instant::now();
        while child.try_wait().expect("wait").is_none() {
            if t0.elapsed() > limit {
                let _ = child.kill();
                let (o, e) = text(&child.wait_with_output().expect("output"));
                panic!("nmvm hangs (over {limit:?})\nstdout:\n{o}\nstderr:\n{e}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("output");
        let (o, e) = text(&out);
        (out.status.code().unwrap_or(-1), o, e)
    }
}

/// nmvm's threads: (name, state letter, system call number or -1).
fn threads(pid: u32) -> Vec<(String, char, i64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc");
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    tasks
        .filter_map(Result::ok)
        .map(|t| {
            let p = t.path();
            let name = read(p.join("comm")).trim().to_string();
            let stat = read(p.join("stat"));
            // "pid (comm) S ...": the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next())
                .unwrap_or('?');
            let sys = read(p.join("syscall"));
            let nr = sys.split(' ').next().and_then(|w| w.parse().ok());
            (name, state, nr.unwrap_or(-1))
        })
        .filter(|(name, _, _)| name.starts_with("nmvm"))
        .collect()
}

/// poll(2) where it exists (the device worker sleeps in it).
#[cfg(target_arch = "x86_64")]
const SYS_POLL: i64 = libc::SYS_poll;
#[cfg(not(target_arch = "x86_64"))]
const SYS_POLL: i64 = libc::SYS_ppoll;

/// nmvm stopped by SIGSTOP; continued on drop.
struct Frozen {
    pid: u32,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions. The pid is
        // our child's, which the `Vm` holding it has not reaped unless the
        // test is already failing (then SIGCONT is harmless anyway).
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGCONT) };
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A bad slot value.
#[derive(Debug, Clone, Copy)]
enum Bad {
    /// This buffer index.
    Idx(u32),
    /// This length, with the slot's own (valid) buffer.
    Len(u16),
}

/// End B, used both normally and as a hostile peer.
struct Peer {
    port: Port,
    /// Valid frames published so far (also the next sequence number).
    sent: u64,
    buf: Vec<u8>,
}

impl Peer {
    /// Raw access to the shared memory (short-lived, so that the port stays
    /// usable in between).
    fn h(&self) -> Hostile<'_> {
        Hostile::new(&self.port).expect("userspace port")
    }

    /// Builds the next valid frame into `buf`: the format the guest checks.
    fn next_frame(&mut self) -> usize {
        let len = len_for(self.sent, MIN_LEN, MAX_LEN);
        build(&mut self.buf, len, self.sent, &Endpoints::default());
        self.sent += 1;
        len
    }

    /// Sends `k` valid frames the normal way; the txsync wakes nmvm.
    fn send(&mut self, vm: &mut Vm, k: u64) {
        for _ in 0..k {
            let len = self.next_frame();
            while !self.port.tx_ring().send(&self.buf[..len]) {
                self.port.txsync().expect("txsync");
                let sent = self.sent;
                vm.wait_for(&format!("after {sent} frames"), || {
                    self.port
                        .wait_tx(Some(Duration::from_millis(10)))
                        .expect("wait_tx")
                });
            }
        }
        self.port.txsync().expect("txsync");
    }

    /// Publishes `slots` straight into nmvm's rx ring after what we filled
    /// so far: `None` is the next valid frame (in the slot's own buffer),
    /// `Some` a bad value. Returns the new fill position, not yet published.
    fn put_raw(&mut self, slots: &[Option<Bad>]) -> u32 {
        let n = self.h().num_slots();
        let mut j = self.h().word(Word::TxTail);
        for &b in slots {
            let len = if b.is_none() { self.next_frame() } else { 0 };
            let h = self.h();
            let mut s = h.slot(RingId::PeerRx, j);
            s.flags = 0;
            match b {
                None => {
                    h.write_buf(s.buf_idx, &self.buf[..len]);
                    s.len = len as u16;
                }
                Some(Bad::Idx(i)) => s.buf_idx = i,
                Some(Bad::Len(l)) => s.len = l,
            }
            h.set_slot(RingId::PeerRx, j, s);
            j = (j + 1) % n;
        }
        j
    }

    /// nmvm asleep, having released everything we published.
    fn idle(&self) -> bool {
        let h = self.h();
        h.word(Word::TxKick) == 1 && h.word(Word::TxHead) == h.word(Word::TxTail)
    }

    /// Waits until nmvm has taken everything and sleeps, stably (no late
    /// guest notification left to wake its worker behind our back).
    fn settle(&self, vm: &mut Vm) {
        loop {
            vm.wait_for("taking our frames", || self.idle());
            std::thread::sleep(Duration::from_millis(50));
            if self.idle() {
                return;
            }
        }
    }

    /// Waits until nmvm has taken every frame we sent (it may exit then:
    /// the guest has its count).
    fn drain(&mut self, vm: &mut Vm) {
        let t0 = Instant::now();
        loop {
            self.port.txsync().expect("txsync");
            let h = self.h();
            let (tail, head) = (h.word(Word::TxTail), h.word(Word::TxHead));
            let pending = self.port.tx_ring().tx_pending();
            if head == tail && !pending {
                return;
            }
            let sent = self.sent;
            assert!(
                !vm.exited(),
                "nmvm exited before taking all {sent} frames (rx ring released up to {head}, \
                 filled up to {tail}, frames pending: {pending}): it counted something else"
            );
            assert!(
                t0.elapsed() < STEP,
                "nmvm stopped taking frames: rx ring released up to slot {head}, filled up to \
                 {tail}, {sent} frames sent"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The `  netmap peer  bad index N, ...` line of `--stats`.
fn port_stats(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.trim_start().starts_with("netmap peer"))
        .unwrap_or_else(|| panic!("no netmap peer stats line:\n{stderr}"))
}

/// The number after `label` in `line`.
fn counter(line: &str, label: &str) -> u64 {
    let at = line
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {line}"));
    let digits: String = line[at + label.len()..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {label:?} in {line}"))
}

#[test]
fn bad_values_are_dropped_and_counted_and_valid_frames_arrive_once() {
    // Enough for step 2 to retry 20 times per bad value and still come round
    // the ring afterwards.
    const N: u64 = 20000;
    let mut vm = Vm::start("main", N, "100s");
    let mut peer = vm.open_peer(0);
    let n = peer.h().num_slots();
    peer.send(&mut vm, 100);
    peer.settle(&mut vm);

    // 1. Release positions of our rx ring (read by nmvm to know where it may
    //    produce) outside the window: beyond the ring, backwards, forward
    //    past what nmvm filled (it filled nothing: the guest does not
    //    transmit, so only the current value is valid). Each is in place
    //    before a batch wakes nmvm and until it sleeps again.
    for bogus in [n + 7, u32::MAX, n - 1, 10] {
        let good = peer.h().word(Word::RxHead);
        peer.h().set_word(Word::RxHead, bogus);
        peer.send(&mut vm, 50);
        peer.settle(&mut vm);
        peer.h().set_word(Word::RxHead, good);
    }

    // 2. Our fill position (tail) beyond the ring, overwriting a properly
    //    published batch while nmvm is busy with it. nmvm has read it once
    //    it has released frames after the write (an rxsync publishes the
    //    head, then reads the tail) and gone to sleep; if it was done too
    //    early, try again. The batch must still arrive in full once the
    //    tail is right again. (A tail moved backwards is a legitimate
    //    wrap-around whenever nmvm holds no frames, so it cannot be told
    //    apart here; the unit test `shm::tests::hostile_peer` covers it.)
    for bogus in [n + 5, u32::MAX] {
        let mut seen = false;
        for _ in 0..20 {
            peer.send(&mut vm, 400);
            let good = peer.h().word(Word::TxTail);
            // nmvm took the batch (its rx tail, set by its rxsync, moved).
            // Watched without sleeping: a guest at full speed empties the
            // batch in tens of microseconds, and the bad tail must be in
            // place before nmvm releases the batch.
            let t0 = Instant::now();
            while peer.h().header(RingId::PeerRx, Field::Tail) != good {
                if t0.elapsed() > Duration::from_millis(100) {
                    vm.wait_for("before taking a batch", || {
                        peer.h().header(RingId::PeerRx, Field::Tail) == good
                    });
                    break;
                }
                std::hint::spin_loop();
            }
            peer.h().set_word(Word::TxTail, bogus);
            let released = peer.h().word(Word::TxHead);
            vm.wait_for("with a bad tail", || {
                let h = peer.h();
                seen |= h.word(Word::TxHead) != released;
                h.word(Word::TxKick) == 1
            });
            std::thread::sleep(Duration::from_millis(5));
            peer.h().set_word(Word::TxTail, good);
            // Wake nmvm for whatever it could not see behind the bad tail.
            peer.send(&mut vm, 1);
            peer.settle(&mut vm);
            if seen {
                break;
            }
        }
        assert!(seen, "nmvm never synced while the tail was {bogus}");
    }

    // 3. nmvm's own ring headers overwritten while it sleeps: rx head past
    //    its tail, cur out of range, tail into stale slots; tx head out of
    //    range, cur and tail inside. Its next syncs must repair all of it
    //    before its device reads the rings. (Its device trusts these fields
    //    between syncs, as a netmap user does: a peer writing them while it
    //    runs can make it re-read stale slots. So nmvm is stopped, asleep,
    //    while they are written.)
    {
        let _frozen = vm.freeze_asleep(&peer);
        let h = peer.h();
        let t = h.word(Word::TxTail);
        h.set_header(RingId::PeerRx, Field::Head, (t + 5) % n);
        h.set_header(RingId::PeerRx, Field::Cur, n + 1);
        h.set_header(RingId::PeerRx, Field::Tail, (t + 100) % n);
        h.set_header(RingId::PeerTx, Field::Head, n + 9);
        h.set_header(RingId::PeerTx, Field::Cur, 3);
        h.set_header(RingId::PeerTx, Field::Tail, 7);
    }
    peer.send(&mut vm, 50);
    peer.settle(&mut vm);
    {
        let h = peer.h();
        let t = h.word(Word::TxTail);
        let fields = [Field::Head, Field::Cur, Field::Tail];
        let rx = fields.map(|f| h.header(RingId::PeerRx, f));
        let tx = fields.map(|f| h.header(RingId::PeerTx, f));
        assert_eq!(rx, [t, t, t], "nmvm's rx ring header is repaired");
        assert_eq!(tx, [0, 0, n - 1], "nmvm's tx ring header is repaired");
    }

    // 4. Slots written straight into nmvm's rx ring: buffer indices and
    //    lengths far out and just out, each between two valid frames, then
    //    published. Only the valid frames may reach the guest.
    let (nbufs, bsz) = (peer.h().num_bufs(), peer.h().buf_size() as u16);
    let tail = peer.put_raw(&[
        None,
        Some(Bad::Idx(BAD_IDX)),
        None,
        Some(Bad::Len(60000)),
        None,
        Some(Bad::Idx(nbufs)),
        None,
        Some(Bad::Len(bsz + 1)),
        None,
    ]);
    peer.h().set_word(Word::TxTail, tail);
    // The port's private fill position does not know about these slots:
    // another process takes end B over and derives it from the shared
    // words, as any re-attaching peer does. Its first txsync wakes nmvm,
    // and it sends the rest of the N frames.
    let sent = peer.sent;
    assert!(
        N - sent > u64::from(n) + 16,
        "too many retries in step 2 ({sent} frames sent): the new end B must come round \
         the ring to the bad slots"
    );
    drop(peer);
    let mut peer = vm.open_peer(sent);
    peer.send(&mut vm, N - sent);
    peer.drain(&mut vm);
    let b = peer.port.stats();
    drop(peer);

    let (code, o, e) = vm.finish(LIMIT);
    assert_eq!(code, 0, "stdout:\n{o}\nstderr:\n{e}");
    // Every valid frame arrived, intact, and nothing else did: the guest
    // verified N frames, the device delivered exactly N, and it had taken
    // all N of ours (`drain`).
    assert!(
        o.contains(&format!("nmvm-guest: net sink: rx {N} tx 0 bad 0")),
        "stdout:\n{o}\nstderr:\n{e}"
    );
    assert!(e.contains(&format!("rx {N} frames")), "{e}");
    let line = port_stats(&e);
    eprintln!("{line}");
    // Each bad value seen at least once: 4 release positions, 2 tails, 2
    // rx and 2 tx header fields; 2 buffer indices, 2 lengths.
    assert!(counter(line, "bad index") >= 10, "{line}");
    assert!(counter(line, "bad buf_idx") >= 2, "{line}");
    assert!(counter(line, "bad len") >= 2, "{line}");
    assert!(e.contains("nmvm: virtio-net dropped bad input"), "{e}");
    // The new end B replaced the two bad buffer indices nmvm left in its
    // rx ring when it came round to those slots.
    assert_eq!(
        (b.bad_buf_idx, b.repaired, b.tx_dropped),
        (2, 2, 0),
        "{b:?}"
    );
}

#[test]
fn hostile_peer_leaving_mid_stream_leaves_nmvm_running() {
    let mut vm = Vm::start("exit", 500, "5s");
    let mut peer = vm.open_peer(0);
    let n = peer.h().num_slots();
    peer.send(&mut vm, 100);
    peer.settle(&mut vm);
    // Garbage nmvm sees when woken: a bad release position, and bad slots
    // around a valid frame.
    peer.h().set_word(Word::RxHead, n + 3);
    let tail = peer.put_raw(&[Some(Bad::Idx(BAD_IDX)), None, Some(Bad::Len(u16::MAX))]);
    peer.h().set_word(Word::TxTail, tail);
    let sent = peer.sent;
    drop(peer);
    let mut peer = vm.open_peer(sent);
    // A batch, then, once nmvm has started on it, garbage over the fill
    // position and the release position, and gone: fewer frames than the
    // guest waits for.
    let released = peer.h().word(Word::TxHead);
    peer.send(&mut vm, 200);
    let t0 = Instant::now();
    while peer.h().word(Word::TxHead) == released && t0.elapsed() < STEP {
        std::thread::sleep(Duration::from_micros(200));
    }
    peer.h().set_word(Word::TxTail, u32::MAX);
    peer.h().set_word(Word::RxHead, n + 4);
    drop(peer);

    // The guest waits for 500 frames and never gets them; nmvm must end on
    // its own 5 s timeout, with no crash and no hang.
    let (code, o, e) = vm.finish(Duration::from_secs(30));
    assert_eq!(code, 254, "stdout:\n{o}\nstderr:\n{e}");
    assert!(e.contains("nmvm: timeout"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    let line = port_stats(&e);
    assert!(counter(line, "bad index") >= 1, "{line}");
    assert!(counter(line, "bad buf_idx") >= 1, "{line}");
    assert!(counter(line, "bad len") >= 1, "{line}");
    assert!(e.contains("nmvm: virtio-net dropped bad input"), "{e}");
}
