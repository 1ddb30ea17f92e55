//! `nmvm pkt-gen`: a traffic generator and sink on any netmap port, in the
//! manner of netmap's own pkt-gen (same options for what matters, same
//! report lines), which also checks every frame it receives (sequence
//! number, checksums and pattern; see [`crate::frame`]).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nmvm_devices::netmap::{NetmapError, Port, PortOptions, NS_MOREFRAG};
use thiserror::Error;

use crate::frame::{self, Endpoints};

/// What pkt-gen does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Send frames.
    Tx,
    /// Receive (and check) frames.
    Rx,
    /// Send frames and wait for each to come back; report round trips.
    Ping,
    /// Send every received frame back with its MACs swapped.
    Pong,
}

/// pkt-gen's options.
#[derive(Debug, Clone)]
pub struct PktGenOptions {
    /// The port (`shm:NAME{0`, `netmap:eth0`, …).
    pub port: String,
    /// The mode.
    pub mode: Mode,
    /// Frame length range (equal for a fixed length).
    pub len: (usize, usize),
    /// Frames to send or receive; 0 = until interrupted.
    pub count: u64,
    /// Frames per batch (in ping mode: frames in flight).
    pub batch: usize,
    /// Report interval.
    pub report: Duration,
    /// Addresses of generated frames.
    pub endpoints: Endpoints,
    /// Seconds to wait before starting (netmap's "wait for link").
    pub wait_link: Duration,
    /// Give up when nothing arrives for this long (rx, ping, pong).
    pub idle_timeout: Option<Duration>,
    /// Print periodic and final report lines.
    pub verbose: bool,
    /// virtio-net header length to create the port with (userspace pipes)
    /// or to set (VALE); `None` takes what the port has.
    pub vnet_hdr_len: Option<u32>,
    /// Slots per ring of a userspace pipe, if pkt-gen opens it first.
    pub pipe_slots: u32,
    /// Verify every received frame (off only for benchmarks).
    pub check: bool,
}

impl Default for PktGenOptions {
    fn default() -> Self {
        Self {
            port: String::new(),
            mode: Mode::Rx,
            len: (60, 60),
            count: 0,
            batch: 512,
            report: Duration::from_secs(1),
            endpoints: Endpoints::default(),
            wait_link: Duration::ZERO,
            idle_timeout: None,
            verbose: true,
            vnet_hdr_len: None,
            pipe_slots: PortOptions::default().num_slots,
            check: true,
        }
    }
}

/// Errors of pkt-gen.
#[derive(Debug, Error)]
pub enum PktGenError {
    /// The port could not be opened or synced.
    #[error("{port}: {source}")]
    Port {
        /// The port.
        port: String,
        /// Why.
        #[source]
        source: Box<NetmapError>,
    },
    /// The traffic loop could not be confined.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// What a pkt-gen run did.
#[derive(Debug, Default, Clone)]
pub struct PktGenReport {
    /// Frames sent.
    pub sent: u64,
    /// Bytes sent.
    pub sent_bytes: u64,
    /// Of the frames sent, those still in the TX ring when pkt-gen
    /// stopped: the peer never took them.
    pub unsent: u64,
    /// Frames received.
    pub received: u64,
    /// Bytes received.
    pub received_bytes: u64,
    /// Received frames that passed every check.
    pub intact: u64,
    /// Received frames that failed a check.
    pub corrupt: u64,
    /// Received frames whose sequence number was not the next expected
    /// (duplicates, reordering, or a gap after loss).
    pub out_of_order: u64,
    /// Frames expected but never received (rx with a count, ping).
    pub lost: u64,
    /// Round-trip times in nanoseconds (ping): min, average, max.
    pub rtt_ns: Option<(u64, u64, u64)>,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Syncs and waits performed.
    pub events: u64,
}

impl PktGenReport {
    /// Frames per second of the main direction.
    pub fn pps(&self) -> f64 {
        let n = self.sent.max(self.received) as f64;
        n / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// netmap's `norm()`: value with a K/M/G/T suffix, 3 decimals.
pub fn norm(v: f64) -> String {
    let units = ["", "K", "M", "G", "T"];
    let mut v = v;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.3} {}", units[u])
}

struct Printer {
    start: Instant,
    verbose: bool,
}

impl Printer {
    fn line(&self, text: &str) {
        if !self.verbose {
            return;
        }
        let t = self.start.elapsed();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "{:03}.{:06} main_thread [{}] {text}",
            t.as_secs() % 1000,
            t.subsec_micros(),
            line!()
        );
    }
}

/// Runs pkt-gen until its count is reached, `stop` is set, or the idle
/// timeout passes.
pub fn run(opts: &PktGenOptions, stop: &AtomicBool) -> Result<PktGenReport, PktGenError> {
    let port_err = |source| PktGenError::Port {
        port: opts.port.clone(),
        source: Box::new(source),
    };
    let port_opts = PortOptions {
        vnet_hdr_len: opts.vnet_hdr_len,
        num_slots: opts.pipe_slots,
        ..PortOptions::default()
    };
    let mut port = Port::open(&opts.port, &port_opts).map_err(port_err)?;
    // Set-up is done: from here on the peer's rings are untrusted input.
    crate::seccomp::install(crate::seccomp::ThreadKind::PktGen)?;
    let hdr = port.virtio_net_hdr_len() as usize;
    let printer = Printer {
        start: Instant::now(),
        verbose: opts.verbose,
    };
    let verb = match opts.mode {
        Mode::Rx => "Receiving from",
        _ => "Sending on",
    };
    printer.line(&format!(
        "{verb} {}: 1 queues, 1 threads and 1 cpus.",
        opts.port
    ));
    let ring = port.rx_ring();
    printer.line(&format!(
        "{}: {} slots per ring, {}-byte buffers.",
        opts.port,
        ring.num_slots(),
        ring.buf_size()
    ));
    if !opts.wait_link.is_zero() {
        printer.line(&format!(
            "Wait {} secs for link to come up...",
            opts.wait_link.as_secs()
        ));
        std::thread::sleep(opts.wait_link);
    }
    let mut r = PktGenReport::default();
    let mut engine = Engine {
        opts,
        port: &mut port,
        stop,
        printer: &printer,
        report: &mut r,
        last_report: Instant::now(),
        last_count: 0,
        batches: 0,
        hdr,
    };
    let start = Instant::now();
    let result = match opts.mode {
        Mode::Tx => engine.tx(),
        Mode::Rx => engine.rx(),
        Mode::Ping => engine.ping(),
        Mode::Pong => engine.pong(),
    };
    r.elapsed = start.elapsed();
    result.map_err(port_err)?;
    final_lines(opts, &r, &printer);
    Ok(r)
}

fn final_lines(opts: &PktGenOptions, r: &PktGenReport, p: &Printer) {
    let (what, n, bytes) = match opts.mode {
        Mode::Rx => ("Received", r.received, r.received_bytes),
        _ => ("Sent", r.sent, r.sent_bytes),
    };
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let each = bytes.checked_div(n).unwrap_or(0);
    p.line(&format!(
        "{what} {n} packets {bytes} bytes {} events {each} bytes each in {secs:.2} seconds.",
        r.events
    ));
    let pps = n as f64 / secs;
    let bps = bytes as f64 * 8.0 / secs;
    // Raw: plus preamble, CRC and inter-frame gap per frame.
    let raw = (bytes + n * 24) as f64 * 8.0 / secs;
    p.line(&format!(
        "Speed: {}pps Bandwidth: {}bps (raw {}bps). Average batch: {:.2} pkts",
        norm(pps),
        norm(bps),
        norm(raw),
        if r.events > 0 {
            n as f64 / r.events as f64
        } else {
            0.0
        }
    ));
    if r.unsent > 0 {
        p.line(&format!(
            "Unsent: {} of them were still in the TX ring at exit (the peer never took them)",
            r.unsent
        ));
    }
    if matches!(opts.mode, Mode::Rx | Mode::Ping | Mode::Pong) {
        p.line(&format!(
            "Checked: {} intact, {} corrupt, {} out of order, {} lost",
            r.intact, r.corrupt, r.out_of_order, r.lost
        ));
    }
    if let Some((min, avg, max)) = r.rtt_ns {
        p.line(&format!(
            "RTT over {} packets: min {min} av {avg} max {max} ns",
            r.received
        ));
    }
}

struct Engine<'a> {
    opts: &'a PktGenOptions,
    port: &'a mut Port,
    stop: &'a AtomicBool,
    printer: &'a Printer,
    report: &'a mut PktGenReport,
    last_report: Instant,
    last_count: u64,
    batches: u64,
    /// virtio-net header bytes in front of every frame on this port.
    hdr: usize,
}

const WAIT: Duration = Duration::from_millis(50);

impl Engine<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn periodic(&mut self, n: u64, bytes: u64) {
        let dt = self.last_report.elapsed();
        if dt < self.opts.report {
            return;
        }
        let delta = n - self.last_count;
        let secs = dt.as_secs_f64();
        let avg_batch = if self.batches > 0 {
            delta as f64 / self.batches as f64
        } else {
            0.0
        };
        let each = bytes.checked_div(n).unwrap_or(0);
        self.printer.line(&format!(
            "{}pps ({}pkts {}bps in {} usec) {avg_batch:.2} avg_batch 0 min_space",
            norm(delta as f64 / secs),
            norm(delta as f64),
            norm(delta as f64 * each as f64 * 8.0 / secs),
            dt.as_micros()
        ));
        self.last_report = Instant::now();
        self.last_count = n;
        self.batches = 0;
    }

    /// Fills up to `max` TX slots with frames from `seq` on; returns how
    /// many.
    fn fill_tx(&mut self, seq: u64, max: u64) -> u64 {
        let ep = self.opts.endpoints;
        let check = self.opts.check;
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&ep.dst_mac);
        macs[6..].copy_from_slice(&ep.src_mac);
        let (lo, hi) = self.opts.len;
        let tx = self.port.tx_ring();
        let mut i = tx.cur();
        let mut done = 0u64;
        let room = u64::from(tx.space_from_cur()).min(max);
        for k in 0..room {
            let len = frame::len_for(seq + k, lo, hi);
            let hdr = self.hdr;
            let Some(buf) = tx.tx_buf(i) else { break };
            if buf.len() < hdr + len {
                break;
            }
            // A zeroed virtio-net header: no offloads requested.
            if hdr > 0 {
                buf[..hdr].fill(0);
            }
            if check {
                frame::build(&mut buf[hdr..], len, seq + k, &ep);
            } else {
                // Benchmark peer: like netmap's pkt-gen, leave the payload
                // as it is; only the Ethernet header is written.
                buf[hdr..hdr + 12].copy_from_slice(&macs);
            }
            tx.set_len_flags(i, (hdr + len) as u16, 0);
            i = tx.next(i);
            done += 1;
            self.report.sent_bytes += len as u64;
        }
        tx.advance(i);
        done
    }

    fn tx(&mut self) -> Result<(), NetmapError> {
        let count = self.opts.count;
        let mut seq = 0u64;
        while (count == 0 || seq < count) && !self.stopped() {
            let want =
                (self.opts.batch as u64).min(if count == 0 { u64::MAX } else { count - seq });
            let n = self.fill_tx(seq, want);
            seq += n;
            self.report.sent = seq;
            if n > 0 {
                self.batches += 1;
            }
            self.port.txsync()?;
            self.report.events += 1;
            if n == 0 {
                self.port.wait_tx(Some(WAIT))?;
            }
            self.periodic(seq, self.report.sent_bytes);
        }
        // Wait until the peer has taken everything.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.port.tx_ring().tx_pending() && Instant::now() < deadline && !self.stopped() {
            self.port.txsync()?;
            self.port.wait_tx(Some(WAIT))?;
        }
        // Learn how far the peer got (one slot per frame here).
        self.port.txsync()?;
        self.report.unsent = u64::from(self.port.tx_pending_slots());
        Ok(())
    }

    /// Reads one complete frame starting at the RX ring's head into
    /// `out`; returns its length and releases its slots. `None` if the ring
    /// is empty.
    fn next_rx(&mut self, out: &mut [u8]) -> Option<usize> {
        let rx = self.port.rx_ring();
        let mut i = rx.head();
        if i == rx.tail() {
            return None;
        }
        let mut len = 0usize;
        let mut overflow = false;
        while i != rx.tail() {
            let Some((data, flags)) = rx.frag(i) else {
                i = rx.next(i);
                break;
            };
            if len + data.len() <= out.len() {
                out[len..len + data.len()].copy_from_slice(data);
            } else {
                overflow = true;
            }
            len += data.len();
            i = rx.next(i);
            if flags & NS_MOREFRAG == 0 {
                break;
            }
        }
        rx.advance(i);
        Some(if overflow { out.len() + 1 } else { len })
    }

    /// Releases every complete frame in the RX ring (up to `count` in
    /// all) without copying; returns how many.
    fn count_rx(&mut self, count: u64) -> u64 {
        let hdr = self.hdr as u64;
        let rx = self.port.rx_ring();
        let mut i = rx.head();
        let mut frames = 0u64;
        let mut bytes = 0u64;
        while i != rx.tail() && (count == 0 || self.report.received + frames < count) {
            let (len, flags) = rx.frag(i).map_or((0, 0), |(d, f)| (d.len() as u64, f));
            bytes += len;
            i = rx.next(i);
            if flags & NS_MOREFRAG == 0 {
                frames += 1;
                bytes = bytes.saturating_sub(hdr);
            }
        }
        rx.advance(i);
        self.report.received += frames;
        self.report.received_bytes += bytes;
        frames
    }

    fn check(&mut self, f: &[u8], expected: &mut u64) -> Option<u64> {
        let f = f.get(self.hdr..).unwrap_or_default();
        self.report.received += 1;
        self.report.received_bytes += f.len() as u64;
        if !self.opts.check {
            return None;
        }
        match frame::verify(f) {
            Ok(seq) => {
                self.report.intact += 1;
                if seq != *expected {
                    self.report.out_of_order += 1;
                }
                *expected = seq.wrapping_add(1);
                Some(seq)
            }
            Err(e) => {
                self.report.corrupt += 1;
                if self.report.corrupt <= 5 {
                    self.printer
                        .line(&format!("bad frame of {} bytes: {e:?}", f.len()));
                }
                None
            }
        }
    }

    fn idle_expired(&self, since: Instant) -> bool {
        self.opts.idle_timeout.is_some_and(|t| since.elapsed() >= t)
    }

    fn rx(&mut self) -> Result<(), NetmapError> {
        let mut buf = vec![0u8; 65536];
        let mut expected = 0u64;
        let mut last_rx = Instant::now();
        let count = self.opts.count;
        while (count == 0 || self.report.received < count) && !self.stopped() {
            self.port.rxsync()?;
            self.report.events += 1;
            let mut got = 0;
            if !self.opts.check {
                // netmap pkt-gen's receiver: count, touch nothing.
                got = self.count_rx(count);
            }
            while self.opts.check && (count == 0 || self.report.received < count) {
                let Some(len) = self.next_rx(&mut buf) else {
                    break;
                };
                if len > buf.len() {
                    self.report.received += 1;
                    self.report.corrupt += 1;
                } else {
                    self.check(&buf[..len], &mut expected);
                }
                got += 1;
            }
            if got > 0 {
                self.batches += 1;
                last_rx = Instant::now();
                self.port.rxsync()?;
            } else {
                if self.idle_expired(last_rx) {
                    break;
                }
                self.port.wait_rx(Some(WAIT))?;
            }
            self.periodic(self.report.received, self.report.received_bytes);
        }
        if count > 0 {
            self.report.lost = count.saturating_sub(self.report.intact);
        }
        Ok(())
    }

    fn ping(&mut self) -> Result<(), NetmapError> {
        let count = if self.opts.count == 0 {
            u64::MAX
        } else {
            self.opts.count
        };
        let window = self.opts.batch.max(1) as u64;
        let mut sent_at: Vec<Option<Instant>> = vec![None; window as usize * 2];
        let mut seq = 0u64;
        let mut buf = vec![0u8; 65536];
        let (mut min, mut max, mut sum) = (u64::MAX, 0u64, 0u64);
        let mut expected = 0u64;
        let mut last_rx = Instant::now();
        let mut done_rx = 0u64;
        while done_rx + self.report.lost < count.min(seq.max(1)) || seq < count {
            if self.stopped() || self.idle_expired(last_rx) {
                break;
            }
            let in_flight = seq - done_rx - self.report.lost;
            if seq < count && in_flight < window {
                let n = self.fill_tx(seq, (window - in_flight).min(count - seq));
                let now = Instant::now();
                for s in seq..seq + n {
                    sent_at[(s % (window * 2)) as usize] = Some(now);
                }
                seq += n;
                self.report.sent = seq;
                self.port.txsync()?;
            }
            self.port.rxsync()?;
            self.report.events += 1;
            let mut got = 0;
            while let Some(len) = self.next_rx(&mut buf) {
                got += 1;
                if let Some(s) = self.check(&buf[..len.min(buf.len())], &mut expected) {
                    if let Some(t) = sent_at
                        .get_mut((s % (window * 2)) as usize)
                        .and_then(Option::take)
                    {
                        let ns = t.elapsed().as_nanos() as u64;
                        min = min.min(ns);
                        max = max.max(ns);
                        sum += ns;
                        done_rx += 1;
                    }
                }
            }
            if got > 0 {
                last_rx = Instant::now();
                self.batches += 1;
                self.port.rxsync()?;
            } else if seq >= count || seq - done_rx >= window {
                // Frames that have not come back within a second are lost.
                let stale: Vec<usize> = sent_at
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.is_some_and(|t| t.elapsed() > Duration::from_secs(1)))
                    .map(|(i, _)| i)
                    .collect();
                for i in stale {
                    sent_at[i] = None;
                    self.report.lost += 1;
                }
                self.port.wait_rx(Some(Duration::from_millis(10)))?;
            }
            self.periodic(self.report.received, self.report.received_bytes);
        }
        if let Some(avg) = sum.checked_div(done_rx) {
            self.report.rtt_ns = Some((min, avg, max));
        }
        Ok(())
    }

    fn pong(&mut self) -> Result<(), NetmapError> {
        let mut buf = vec![0u8; 65536];
        let mut expected = 0u64;
        let mut last_rx = Instant::now();
        let count = self.opts.count;
        while (count == 0 || self.report.sent < count) && !self.stopped() {
            self.port.rxsync()?;
            self.report.events += 1;
            let mut got = 0;
            while let Some(len) = self.next_rx(&mut buf) {
                if len > buf.len() {
                    continue;
                }
                let f = &mut buf[..len];
                self.check(f, &mut expected);
                frame::swap_macs(f);
                // Echo it; wait for room rather than drop.
                loop {
                    if self.port.tx_ring().send(f) {
                        break;
                    }
                    self.port.txsync()?;
                    if self.stopped() {
                        return Ok(());
                    }
                    self.port.wait_tx(Some(WAIT))?;
                }
                self.report.sent += 1;
                self.report.sent_bytes += f.len() as u64;
                got += 1;
            }
            if got > 0 {
                last_rx = Instant::now();
                self.batches += 1;
                self.port.txsync()?;
                self.port.rxsync()?;
            } else {
                if self.idle_expired(last_rx) {
                    break;
                }
                self.port.wait_rx(Some(WAIT))?;
            }
            self.periodic(self.report.sent, self.report.sent_bytes);
        }
        Ok(())
    }
}

/// A stop flag raised by SIGINT (and SIGTERM), as netmap's pkt-gen ends
/// cleanly with its final report on Ctrl-C.
pub fn stop_on_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            log::warn!("cannot handle signal {sig}: {e}");
        }
    }
    stop
}
