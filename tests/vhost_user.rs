//! `nmvm vhost-user` against the real Linux virtio-net driver: QEMU (TCG,
//! shared memfd guest memory) runs the Linux appliance
//! (`guest-images/appliance/`: a stock Debian cloud kernel with its virtio
//! modules and a busybox initramfs) with a `-netdev vhost-user` device whose
//! backend is `nmvm vhost-user`, and `nmvm pkt-gen` (or a small TCP peer in
//! this file) is on the other end of the userspace netmap pipe.
//!
//! QEMU 7.2 (Debian 12) crashes under TCG with MSI-X on a vhost-user
//! virtio-net device, hence `vectors=0` (INTx). Guest memory must be shared
//! (`share=on`): without it nothing moves and nothing complains, which is
//! why every test counts frames on both sides.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::proc::{Done, Proc};
use common::{guest_image, nmvm, scratch_dir};
use nmvm_devices::netmap::{Port, PortOptions};

/// Any one process's limit.
/// The guest kernel's command line before the test's words.
const CMDLINE: &str = "console=ttyS0 quiet panic=-1 ipv6.disable=1";

// ------------------------------------------------------------ processes ---

// ---------------------------------------------------------------- setup ---

/// Fails the test, naming the package, when QEMU is missing.
fn require_qemu() {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "this test runs the Linux guest under QEMU and needs qemu-system-x86_64 \
         (Debian package qemu-system-x86), which is not installed"
    );
}

/// Builds (or finds in the cache) the appliance: (bzImage, initrd).
fn appliance() -> &'static (PathBuf, PathBuf) {
    static IMAGE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let paths = guest_image(
            "appliance/build.sh",
            "apt-get (Debian packages linux-image-*-cloud-amd64 and busybox-static), gcc \
             with libc6-dev, gzip and lz4",
            &["kernel", "initrd"],
        );
        (paths[0].clone(), paths[1].clone())
    })
}

/// A test's private directory (socket, pipe rendezvous) and pipe names.
struct Setup {
    dir: PathBuf,
    sock: PathBuf,
    guest_end: String,
    peer_end: String,
}

fn setup(test: &str) -> Setup {
    require_qemu();
    appliance();
    setup_without_qemu(test)
}

/// [`setup`] for tests that play the frontend themselves.
fn setup_without_qemu(test: &str) -> Setup {
    let dir = scratch_dir(&format!("vu-{test}"));
    Setup {
        sock: dir.join("vhost.sock"),
        guest_end: "shm:vu{0".into(),
        peer_end: "shm:vu}0".into(),
        dir,
    }
}

impl Setup {
    /// `nmvm vhost-user` on the guest end; returns once the socket exists.
    fn backend(&self, extra: &[&str]) -> Proc {
        let mut p = Proc::spawn(
            "nmvm vhost-user",
            nmvm()
                .env("NMVM_RUN_DIR", &self.dir)
                .args(["vhost-user", "--stats", "--socket"])
                .arg(&self.sock)
                .args(["--net", &self.guest_end])
                .args(extra),
        );
        let start = Instant::now();
        while !self.sock.exists() {
            if let Some(status) = p.child().try_wait().expect("wait") {
                panic!(
                    "nmvm vhost-user ended ({status}) before creating its socket\n{}",
                    p.err()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nmvm vhost-user did not create {} within 10 s",
                self.sock.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        p
    }

    /// `nmvm pkt-gen` on the peer end.
    fn pktgen(&self, args: &[&str]) -> Proc {
        Proc::spawn(
            "nmvm pkt-gen",
            nmvm()
                .env("NMVM_RUN_DIR", &self.dir)
                .args(["pkt-gen", "-i", &self.peer_end, "--idle-timeout", "60s"])
                .args(args),
        )
    }

    /// QEMU with the appliance, its virtio-net device served by the backend.
    fn qemu(&self, words: &str) -> Proc {
        let (kernel, initrd) = appliance();
        Proc::spawn(
            "qemu-system-x86_64",
            Command::new("qemu-system-x86_64")
                .args(["-accel", "tcg", "-m", "256", "-nographic", "-no-reboot"])
                .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
                .args(["-numa", "node,memdev=mem"])
                .arg("-chardev")
                .arg(format!("socket,id=c0,path={}", self.sock.display()))
                .args(["-netdev", "vhost-user,id=n0,chardev=c0"])
                .args([
                    "-device",
                    "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,vectors=0",
                ])
                .arg("-kernel")
                .arg(kernel)
                .arg("-initrd")
                .arg(initrd)
                .args(["-append", &format!("{CMDLINE} {words}")]),
        )
    }
}

/// The number after `key` in `text` (e.g. "rx_packets 12" -> 12).
fn number_after(text: &str, key: &str) -> u64 {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in:\n{text}"));
    text[at + key.len()..]
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number after {key:?} in:\n{text}"))
}

/// The appliance's "features" bit string has bit `bit` set.
fn guest_feature(console: &str, bit: usize) -> bool {
    let line = console
        .lines()
        .find(|l| l.contains("nmvm-appliance: eth0 up"))
        .unwrap_or_else(|| panic!("no eth0 line in:\n{console}"));
    let bits = line.rsplit(' ').next().unwrap_or("");
    bits.as_bytes().get(bit) == Some(&b'1')
}

/// The line of pkt-gen's report (on stdout or stderr) that contains `key`.
fn pktgen_line(pg: &Done, key: &str) -> String {
    pg.stdout
        .lines()
        .chain(pg.stderr.lines())
        .find(|l| l.contains(key))
        .unwrap_or_else(|| {
            panic!(
                "no {key:?} line in pkt-gen's output:\n{}\n{}",
                pg.stdout, pg.stderr
            )
        })
        .to_string()
}

fn show(what: &str, d: &Done) {
    eprintln!(
        "--- {what} (exit {}, {:.1} s)\n{}\n{}",
        d.code,
        d.elapsed.as_secs_f64(),
        d.stdout.trim_end(),
        d.stderr.trim_end()
    );
}

// ---------------------------------------------------------------- tests ---

/// Linux sends N test frames; pkt-gen receives exactly N, intact.
#[test]
fn linux_sends_frames_to_pktgen() {
    const N: u64 = 2000;
    let s = setup("gen");
    let backend = s.backend(&["--connections", "1"]);
    let pg = s.pktgen(&["-f", "rx", "-n", &N.to_string()]);
    let qemu = s.qemu(&format!("net=gen count={N} len=60-1514"));
    let q = qemu.finish();
    let pg = pg.finish();
    let b = backend.finish();
    show("qemu", &q);
    show("pkt-gen", &pg);
    show("nmvm vhost-user", &b);
    assert_eq!(q.code, 0, "QEMU failed");
    assert!(
        q.stdout
            .contains(&format!("nmvm-linux-init: gen: rx 0 tx {N} bad 0")),
        "the guest did not send {N} frames"
    );
    assert_eq!(number_after(&q.stdout, "tx_packets "), N, "/proc/net/dev");
    assert_eq!(pg.code, 0, "pkt-gen found corrupt or lost frames");
    assert!(
        pktgen_line(&pg, "Checked:").contains(&format!(
            "Checked: {N} intact, 0 corrupt, 0 out of order, 0 lost"
        )),
        "pkt-gen did not receive {N} intact frames"
    );
    // No virtio-net header on the port: no offloads offered.
    assert!(
        !guest_feature(&q.stdout, 0),
        "CSUM offered without --vnet-hdr"
    );
    assert!(guest_feature(&q.stdout, 15), "MRG_RXBUF not negotiated");
    assert!(guest_feature(&q.stdout, 29), "EVENT_IDX not negotiated");
    assert!(guest_feature(&q.stdout, 32), "VERSION_1 not negotiated");
    assert_eq!(b.code, 0, "nmvm vhost-user failed");
    assert!(b.stdout.contains("device started 1 times"));
    assert_eq!(number_after(&b.stdout, "tx "), N, "device tx counter");
    // init.c waits 200 ms after link-up before it sends.
    let ms = number_after(&q.stdout, "nmvm-appliance: ran in ").saturating_sub(200);
    eprintln!(
        "guest -> peer under TCG: {N} frames of 60-1514 bytes sent in {ms} ms by the guest \
         ({:.0} frames/s), all received intact",
        N as f64 * 1000.0 / ms.max(1) as f64
    );
}

/// pkt-gen sends N test frames; Linux receives exactly N (its own check and
/// /proc/net/dev agree).
#[test]
fn pktgen_sends_frames_to_linux() {
    const N: u64 = 2000;
    let s = setup("sink");
    let backend = s.backend(&["--connections", "1"]);
    let mut qemu = s.qemu(&format!("net=sink count={N}"));
    qemu.wait_for("nmvm-linux-init ready: mode=sink");
    let started = Instant::now();
    let pg = s.pktgen(&["-f", "tx", "-n", &N.to_string(), "-l", "60", "-l", "1514"]);
    qemu.wait_for("nmvm-linux-init: sink:");
    let elapsed = started.elapsed();
    let q = qemu.finish();
    let pg = pg.finish();
    let b = backend.finish();
    show("qemu", &q);
    show("pkt-gen", &pg);
    show("nmvm vhost-user", &b);
    assert_eq!(pg.code, 0, "pkt-gen failed");
    assert!(
        q.stdout
            .contains(&format!("nmvm-linux-init: sink: rx {N} tx 0 bad 0")),
        "the guest did not receive {N} intact frames"
    );
    assert_eq!(number_after(&q.stdout, "rx_packets "), N, "/proc/net/dev");
    assert_eq!(number_after(&b.stdout, "rx "), N, "device rx counter");
    assert_eq!(b.code, 0, "nmvm vhost-user failed");
    eprintln!(
        "peer -> guest under TCG: {N} frames received and checked by the guest in {:.2} s \
         ({:.0} frames/s)",
        elapsed.as_secs_f64(),
        N as f64 / elapsed.as_secs_f64()
    );
}

/// pkt-gen pings the guest's echo: every frame comes back intact, with
/// round-trip times.
#[test]
fn ping_pong_with_linux() {
    const N: u64 = 1000;
    let s = setup("ping");
    let backend = s.backend(&["--connections", "1"]);
    let mut qemu = s.qemu(&format!("net=echo count={N}"));
    qemu.wait_for("nmvm-linux-init ready: mode=echo");
    let pg = s.pktgen(&[
        "-f",
        "ping",
        "-n",
        &N.to_string(),
        "-l",
        "60",
        "-l",
        "1514",
        "-b",
        "8",
    ]);
    let pg = pg.finish();
    let q = qemu.finish();
    let b = backend.finish();
    show("qemu", &q);
    show("pkt-gen", &pg);
    show("nmvm vhost-user", &b);
    assert_eq!(pg.code, 0, "pkt-gen found corrupt or lost frames");
    assert!(pktgen_line(&pg, "Checked:").contains(&format!(
        "Checked: {N} intact, 0 corrupt, 0 out of order, 0 lost"
    )));
    let rtt = pktgen_line(&pg, "RTT over");
    assert!(rtt.contains(&format!("RTT over {N} packets")), "{rtt}");
    assert!(q
        .stdout
        .contains(&format!("nmvm-linux-init: echo: rx {N} tx {N} bad 0")));
    eprintln!(
        "ping-pong under TCG: {}; {}",
        pktgen_line(&pg, "Speed:").trim(),
        rtt.trim()
    );
}

/// The same backend process serves QEMU twice, and a frontend that sends a
/// bad memory table in between, which is refused without harm; the second
/// guest resets the device (driver unbind and bind: QEMU stops the rings
/// with GET_VRING_BASE and sets them up again) between two runs. Every
/// frame arrives, the device is stopped and restarted each time, and the
/// port (and pkt-gen on it) stays up across all of it.
#[test]
fn reconnect_reset_and_bad_frontend() {
    const N: u64 = 100;
    let s = setup("reconnect");
    let backend = s.backend(&["--connections", "3"]);
    let pg = s.pktgen(&["-f", "rx", "-n", &(3 * N).to_string()]);
    let first = s.qemu(&format!("net=gen count={N} len=60-1514")).finish();
    show("first qemu", &first);
    assert!(first
        .stdout
        .contains(&format!("nmvm-linux-init: gen: rx 0 tx {N} bad 0")));

    bad_frontend(&s.sock);

    let second = s
        .qemu(&format!("net=gen count={N} len=60-1514 reset=1"))
        .finish();
    show("second qemu", &second);
    assert!(second
        .stdout
        .contains("nmvm-appliance: device virtio0 reset"));
    assert_eq!(
        second
            .stdout
            .matches(&format!("nmvm-linux-init: gen: rx 0 tx {N} bad 0"))
            .count(),
        2,
        "the second guest did not send its frames before and after the reset"
    );
    let pg = pg.finish();
    let b = backend.finish();
    show("pkt-gen", &pg);
    show("nmvm vhost-user", &b);
    // Each run's sequence numbers start again at 0: frames out of order.
    let checked = pktgen_line(&pg, "Checked:");
    assert!(
        checked.contains(&format!("Checked: {} intact, 0 corrupt,", 3 * N))
            && checked.contains(" 0 lost"),
        "{checked}"
    );
    assert_eq!(b.code, 0, "nmvm vhost-user failed");
    assert!(
        b.stdout
            .contains("vhost-user: 3 connections, 1 closed on an error"),
        "{}",
        b.stdout
    );
    assert!(
        b.stderr.contains("SET_MEM_TABLE") && b.stderr.contains("beyond the end of its file"),
        "the bad memory table was not reported:\n{}",
        b.stderr
    );
    let conn = |n: u32| {
        b.stdout
            .lines()
            .find(|l| l.starts_with(&format!("connection {n}:")))
            .unwrap_or_else(|| panic!("no connection {n} line:\n{}", b.stdout))
            .to_string()
    };
    assert!(conn(1).contains("device started 1 times"));
    assert!(conn(3).contains("device started 3 times"), "{}", conn(3));
    assert_eq!(number_after(&conn(3), "tx "), 3 * N);
}

/// A frontend that describes a memory region larger than the memfd it
/// sends: the backend must refuse it (never map past the end of a file,
/// which would fault on access) and close the connection.
fn bad_frontend(sock: &Path) {
    let mut c = UnixStream::connect(sock).expect("connect to the backend");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // GET_FEATURES (1), and its reply.
    send(&mut c, 1, &[], None);
    let mut reply = [0u8; 20];
    c.read_exact(&mut reply).expect("GET_FEATURES reply");
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 1);
    // SET_MEM_TABLE (5): one region of 1 MiB on a 4 KiB memfd.
    // SAFETY: memfd_create with a NUL-terminated name; the result is
    // checked, and the fd is ours.
    let fd = unsafe { libc::memfd_create(c"nmvm-test-mem".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is the memfd just created.
    assert_eq!(unsafe { libc::ftruncate(fd, 4096) }, 0);
    let mut body = Vec::new();
    body.extend_from_slice(&1u32.to_le_bytes()); // nregions
    body.extend_from_slice(&0u32.to_le_bytes()); // padding
    for v in [0u64, 1 << 20, 0x7f00_0000_0000, 0] {
        // guest_phys_addr, memory_size, userspace_addr, mmap_offset
        body.extend_from_slice(&v.to_le_bytes());
    }
    send(&mut c, 5, &body, Some(fd));
    // SAFETY: our own descriptor, sent already (the kernel holds a copy).
    unsafe { libc::close(fd) };
    // The backend closes the connection.
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
}

/// A frontend may shrink the memory file it handed over while the device
/// runs on it (nothing in vhost-user forbids it, and QEMU's and DPDK's files
/// are not sealed): the backend's next access would fault with SIGBUS. The
/// backend must survive it, say so, close that connection and go on.
#[test]
fn a_frontend_that_shrinks_its_memory_does_not_bring_the_backend_down() {
    let s = setup_without_qemu("shrink");
    let backend = s.backend(&["--connections", "2"]);
    shrinking_frontend(&s.sock);
    // The backend closes the connection and serves the next one.
    bad_frontend(&s.sock);
    let b = backend.finish();
    show("nmvm vhost-user", &b);
    assert_eq!(b.code, 0, "nmvm vhost-user failed");
    assert!(
        b.stderr
            .contains("shrank a memory file under nmvm's mapping"),
        "the shrunk memory was not reported:\n{}",
        b.stderr
    );
    assert!(
        b.stderr
            .contains("connection 1: the frontend shrank a memory file under the running device"),
        "{}",
        b.stderr
    );
    assert!(
        b.stdout
            .contains("vhost-user: 2 connections, 2 closed on an error"),
        "{}",
        b.stdout
    );
    let conn = b
        .stdout
        .lines()
        .find(|l| l.starts_with("connection 1:"))
        .unwrap_or_else(|| panic!("no connection line:\n{}", b.stdout));
    assert!(conn.contains("device started 1 times"), "{conn}");
}

/// Starts the device on a 1 MiB memfd (both rings in it, empty), then
/// truncates the memfd to nothing and kicks both rings, so the worker reads
/// the rings from pages that are gone.
fn shrinking_frontend(sock: &Path) {
    const USER: u64 = 0x7f00_0000_0000;
    let mut c = UnixStream::connect(sock).expect("connect to the backend");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // GET_FEATURES (1), and its reply.
    send(&mut c, 1, &[], None);
    let mut reply = [0u8; 20];
    c.read_exact(&mut reply).expect("GET_FEATURES reply");
    // SET_OWNER, then SET_FEATURES: VERSION_1.
    send(&mut c, 3, &[], None);
    send(&mut c, 2, &(1u64 << 32).to_le_bytes(), None);
    // SAFETY: memfd_create with a NUL-terminated name; checked below.
    let mem = unsafe { libc::memfd_create(c"nmvm-test-shrink".as_ptr(), 0) };
    assert!(mem >= 0, "memfd_create");
    // SAFETY: `mem` is the memfd just created.
    assert_eq!(unsafe { libc::ftruncate(mem, 1 << 20) }, 0);
    let mut body = Vec::new();
    body.extend_from_slice(&1u32.to_le_bytes()); // nregions
    body.extend_from_slice(&0u32.to_le_bytes()); // padding
    for v in [0u64, 1 << 20, USER, 0] {
        // guest_phys_addr, memory_size, userspace_addr, mmap_offset
        body.extend_from_slice(&v.to_le_bytes());
    }
    send(&mut c, 5, &body, Some(mem)); // SET_MEM_TABLE
    let eventfd = || {
        // SAFETY: eventfd takes no pointers; checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd");
        fd
    };
    let mut kicks = Vec::new();
    for ring in 0..2u32 {
        let base = USER + u64::from(ring) * 0x1_0000;
        let state = |num: u32| [ring.to_le_bytes(), num.to_le_bytes()].concat();
        send(&mut c, 8, &state(256), None); // SET_VRING_NUM
        let mut addr = Vec::new();
        addr.extend_from_slice(&ring.to_le_bytes());
        addr.extend_from_slice(&0u32.to_le_bytes()); // flags
        for a in [base, base + 0x2000, base + 0x1000, 0] {
            // descriptor table, used ring, avail ring, log
            addr.extend_from_slice(&a.to_le_bytes());
        }
        send(&mut c, 9, &addr, None); // SET_VRING_ADDR
        send(&mut c, 10, &state(0), None); // SET_VRING_BASE
        let index = u64::from(ring).to_le_bytes();
        send(&mut c, 13, &index, Some(eventfd())); // SET_VRING_CALL
        let kick = eventfd();
        send(&mut c, 12, &index, Some(kick)); // SET_VRING_KICK: the device starts
        kicks.push(kick);
    }
    std::thread::sleep(Duration::from_millis(300));
    // Take the memory away under the running device, and wake it.
    // SAFETY: our memfd (the backend maps its own copy of it).
    assert_eq!(unsafe { libc::ftruncate(mem, 0) }, 0);
    for kick in kicks {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our eventfd.
        assert_eq!(unsafe { libc::write(kick, one.as_ptr().cast(), 8) }, 8);
    }
    // The backend ends the connection.
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
}

/// Sends one vhost-user message (version 1), with `fd` attached.
fn send(c: &mut UnixStream, code: u32, body: &[u8], fd: Option<i32>) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    let Some(fd) = fd else {
        c.write_all(&msg).expect("send");
        return;
    };
    let mut iov = libc::iovec {
        iov_base: msg.as_mut_ptr().cast(),
        iov_len: msg.len(),
    };
    // Room for one SCM_RIGHTS descriptor, aligned for cmsghdr.
    let mut cbuf = [0u64; 4];
    // SAFETY: a zeroed msghdr is valid; every pointer set below points to
    // live buffers of the stated sizes for the duration of sendmsg, and the
    // control message is written inside `cbuf` (CMSG_SPACE(4) <= 32 bytes).
    unsafe {
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = libc::CMSG_SPACE(4) as _;
        let cm = libc::CMSG_FIRSTHDR(&mh);
        (*cm).cmsg_level = libc::SOL_SOCKET;
        (*cm).cmsg_type = libc::SCM_RIGHTS;
        (*cm).cmsg_len = libc::CMSG_LEN(4) as _;
        libc::CMSG_DATA(cm).cast::<i32>().write_unaligned(fd);
        use std::os::fd::AsRawFd;
        let n = libc::sendmsg(c.as_raw_fd(), &mh, 0);
        assert_eq!(n, msg.len() as isize, "sendmsg");
    }
}

/// With a virtio-net header on the port the device offers checksum and TSO
/// offloads; a TCP stream from the guest arrives as large TSO frames with a
/// partial checksum, whose virtio-net headers describe them correctly: the
/// peer completes every checksum as the header says and checks it against
/// one computed from scratch, and checks every byte of the stream.
#[test]
fn tso_and_checksum_offload() {
    const BYTES: u64 = 1 << 20;
    let s = setup("tso");
    let backend = s.backend(&["--connections", "1", "--vnet-hdr"]);
    let stop = Arc::new(AtomicBool::new(false));
    let peer = {
        let (name, dir, stop) = (s.peer_end.clone(), s.dir.clone(), stop.clone());
        std::thread::spawn(move || tcp_peer(&name, &dir, &stop))
    };
    let q = s.qemu(&format!("tcp={BYTES}")).finish();
    stop.store(true, Ordering::Relaxed);
    let r = peer.join().expect("TCP peer panicked");
    let b = backend.finish();
    show("qemu", &q);
    show("nmvm vhost-user", &b);
    eprintln!("TCP peer: {r:?}");
    for (bit, name) in [
        (0, "CSUM"),
        (1, "GUEST_CSUM"),
        (11, "HOST_TSO4"),
        (7, "GUEST_TSO4"),
    ] {
        assert!(guest_feature(&q.stdout, bit), "{name} not negotiated");
    }
    assert!(
        q.stdout
            .contains(&format!("nmvm-tcp-send: sent {BYTES} bytes")),
        "the guest's TCP sender did not finish"
    );
    assert_eq!(r.bad, Vec::<String>::new(), "bad frames");
    assert_eq!(
        r.stream_bytes, BYTES,
        "bytes of the stream received in order"
    );
    assert!(r.fin, "no FIN");
    assert!(
        r.gso_frames > 0 && r.max_segments >= 2,
        "no TSO frame arrived: {r:?}"
    );
    assert!(
        r.partial_csum > 0,
        "no frame with a partial checksum: {r:?}"
    );
    eprintln!(
        "TCP under TCG: {BYTES} bytes in {:.2} s",
        r.elapsed.as_secs_f64()
    );
}

// -------------------------------------------------------------- TCP peer ---

/// The peer's addresses (the guest is 10.0.0.1, 52:54:00:12:34:56).
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const PEER_IP: [u8; 4] = [10, 1, 0, 1];
const PEER_PORT: u16 = 5001;
const PEER_ISN: u32 = 1000;
/// MSS the peer announces.
const MSS: u16 = 1460;
const VNET_HDR: usize = 12;
const NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;

#[derive(Debug, Default)]
struct TcpReport {
    frames: u64,
    gso_frames: u64,
    max_segments: u64,
    max_frame: usize,
    partial_csum: u64,
    stream_bytes: u64,
    fin: bool,
    bad: Vec<String>,
    elapsed: Duration,
}

fn sum16(data: &[u8], mut s: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        s += u64::from(*b) << 8;
    }
    s
}

fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The TCP checksum of `seg` (TCP header and data, its checksum field taken
/// as zero) between `src` and `dst`.
fn tcp_checksum(src: &[u8], dst: &[u8], seg: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    let mut s = sum16(&pseudo, 0);
    s = sum16(&seg[..16], s);
    s = sum16(&seg[18..], s);
    !fold(s)
}

/// A minimal TCP receiver on the netmap pipe: answers the guest's SYN,
/// acknowledges in-order data, checks every byte against tcp-send's
/// pattern, checks the virtio-net header of every frame, and answers FIN.
fn tcp_peer(name: &str, dir: &Path, stop: &AtomicBool) -> TcpReport {
    let opts = PortOptions {
        vnet_hdr_len: Some(VNET_HDR as u32),
        run_dir: Some(dir.to_path_buf()),
        ..PortOptions::default()
    };
    let mut port = Port::open(name, &opts).expect("open the peer's end of the pipe");
    let mut r = TcpReport::default();
    let mut buf = vec![0u8; 70_000];
    let mut next: Option<u32> = None; // next expected sequence number
    let mut isn = 0u32;
    let mut guest_mac = [0u8; 6];
    let mut started = None;
    while !stop.load(Ordering::Relaxed) {
        let _ = port.wait_rx(Some(Duration::from_millis(100)));
        let mut replies = Vec::new();
        while let Some(n) = port.rx_ring().recv(&mut buf) {
            r.frames += 1;
            r.max_frame = r.max_frame.max(n);
            let f = &mut buf[..n];
            if let Some(reply) = tcp_frame(f, &mut r, &mut next, &mut isn, &mut guest_mac) {
                started.get_or_insert_with(Instant::now);
                replies.push(reply);
            }
        }
        for reply in replies {
            let tx = port.tx_ring();
            if !tx.send(&reply) {
                r.bad.push("no room to send a reply".into());
            }
        }
        let _ = port.txsync();
        if r.fin {
            r.elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
        }
    }
    r
}

/// Handles one frame (virtio-net header + Ethernet); returns the reply.
fn tcp_frame(
    f: &mut [u8],
    r: &mut TcpReport,
    next: &mut Option<u32>,
    isn: &mut u32,
    guest_mac: &mut [u8; 6],
) -> Option<Vec<u8>> {
    fn bad(r: &mut TcpReport, why: String) {
        if r.bad.len() < 20 {
            r.bad.push(why);
        }
    }
    if f.len() < VNET_HDR + 14 + 20 + 20 {
        return None; // not TCP
    }
    let (hdr, frame) = f.split_at_mut(VNET_HDR);
    if frame[12..14] != [8, 0] || frame[14 + 9] != 6 {
        return None;
    }
    let ihl = usize::from(frame[14] & 15) * 4;
    let ip_len = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let l4 = 14 + ihl;
    if ip_len + 14 != frame.len() || frame.len() < l4 + 20 {
        bad(
            r,
            format!(
                "IP length {ip_len} does not match the frame ({} bytes)",
                frame.len()
            ),
        );
        return None;
    }
    let (src, dst) = (frame[26..30].to_vec(), frame[30..34].to_vec());
    let (flags, gso_type) = (hdr[0], hdr[1]);
    let gso_size = usize::from(u16::from_le_bytes([hdr[4], hdr[5]]));
    let csum_start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
    let csum_offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
    let doff = usize::from(frame[l4 + 12] >> 4) * 4;
    let payload = frame.len() - l4 - doff;
    // The header says how to finish the checksum: do it, then compare with
    // one computed from scratch.
    if flags & NEEDS_CSUM != 0 {
        r.partial_csum += 1;
        if csum_start != l4 || csum_offset != 16 {
            bad(
                r,
                format!("csum_start {csum_start} / csum_offset {csum_offset}, expected {l4} / 16"),
            );
        } else {
            let c = !fold(sum16(&frame[csum_start..], 0));
            frame[csum_start + csum_offset..csum_start + csum_offset + 2]
                .copy_from_slice(&c.to_be_bytes());
        }
    }
    let want = tcp_checksum(&src, &dst, &frame[l4..]);
    let got = u16::from_be_bytes([frame[l4 + 16], frame[l4 + 17]]);
    if want != got && !(want == 0 && got == 0xffff) {
        bad(
            r,
            format!(
                "TCP checksum {got:#06x}, expected {want:#06x} (flags {flags:#x}, gso {gso_type})"
            ),
        );
    }
    if gso_type & 0x7f != 0 {
        r.gso_frames += 1;
        if gso_type & 0x7f != GSO_TCPV4 || gso_size == 0 || gso_size > usize::from(MSS) {
            bad(r, format!("gso_type {gso_type:#x} gso_size {gso_size}"));
        } else {
            r.max_segments = r.max_segments.max(payload.div_ceil(gso_size) as u64);
        }
    } else if payload > usize::from(MSS) {
        bad(r, format!("{payload}-byte segment without GSO"));
    }
    let tcp = &frame[l4..];
    let seq = u32::from_be_bytes(tcp[4..8].try_into().unwrap());
    let tflags = tcp[13];
    guest_mac.copy_from_slice(&frame[6..12]);
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let (syn, fin) = (tflags & 2 != 0, tflags & 1 != 0);
    let mut reply_flags = 0x10; // ACK
    if syn {
        *isn = seq;
        *next = Some(seq.wrapping_add(1));
        reply_flags |= 2;
    } else if let Some(n) = *next {
        if seq == n {
            let data = &tcp[doff..];
            let base = u64::from(seq.wrapping_sub(isn.wrapping_add(1)));
            for (k, &b) in data.iter().enumerate() {
                if b != ((base + k as u64) % 251) as u8 {
                    bad(r, format!("stream byte {} is {b}", base + k as u64));
                    break;
                }
            }
            r.stream_bytes += data.len() as u64;
            let mut n = seq.wrapping_add(data.len() as u32);
            if fin {
                n = n.wrapping_add(1);
                r.fin = true;
                reply_flags |= 1;
            }
            *next = Some(n);
        }
    } else {
        return None;
    }
    if !syn && !fin && payload == 0 {
        return None; // a pure ACK
    }
    let ack = next.unwrap_or(0);
    let our_seq = PEER_ISN.wrapping_add(if syn { 0 } else { 1 });
    Some(tcp_reply(
        guest_mac,
        &src,
        sport,
        our_seq,
        ack,
        reply_flags,
        syn,
    ))
}

/// A TCP segment from the peer (with an all-zero virtio-net header).
fn tcp_reply(
    mac: &[u8; 6],
    guest_ip: &[u8],
    guest_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    mss: bool,
) -> Vec<u8> {
    let opt_len = if mss { 4 } else { 0 };
    let tcp_len = 20 + opt_len;
    let mut f = vec![0u8; VNET_HDR + 14 + 20 + tcp_len];
    let e = &mut f[VNET_HDR..];
    e[0..6].copy_from_slice(mac);
    e[6..12].copy_from_slice(&PEER_MAC);
    e[12..14].copy_from_slice(&[8, 0]);
    let ip = &mut e[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&PEER_IP);
    ip[16..20].copy_from_slice(guest_ip);
    let c = !fold(sum16(ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let t = &mut e[34..];
    t[0..2].copy_from_slice(&PEER_PORT.to_be_bytes());
    t[2..4].copy_from_slice(&guest_port.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = ((tcp_len / 4) as u8) << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    if mss {
        t[20..24].copy_from_slice(&[2, 4, (MSS >> 8) as u8, MSS as u8]);
    }
    let c = tcp_checksum(&PEER_IP, guest_ip, t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    f
}
