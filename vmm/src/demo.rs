//! `nmvm demo`: the bundled guest as an echo appliance on a userspace
//! netmap pipe, with pkt-gen's ping on the other end.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::frame::Endpoints;
use crate::pktgen::{self, Mode, PktGenOptions, PktGenReport};
use crate::verdict::StopReason;
use crate::vm::{self, ConsoleConfig, KernelChoice, NetSpec, RunOutcome, VmConfig};

/// What the demo measured.
#[derive(Debug)]
pub struct DemoReport {
    /// The traffic side.
    pub traffic: PktGenReport,
    /// The VM side.
    pub vm: RunOutcome,
    /// The guest's own counters line, if it printed one.
    pub guest_counters: Option<String>,
}

impl DemoReport {
    /// Whether every frame came back intact and the guest exited cleanly.
    pub fn success(&self) -> bool {
        self.traffic.intact == self.traffic.sent
            && self.traffic.corrupt == 0
            && self.traffic.lost == 0
            && self.vm.reason == StopReason::GuestExit(0)
    }
}

/// Runs the demo with `frames` echo round trips, `window` frames in flight.
pub fn run(frames: u64, window: usize, started: Instant) -> Result<DemoReport, String> {
    let pipe = format!("shm:nmvm_demo_{}", std::process::id());
    let cfg = VmConfig {
        kernel: KernelChoice::Bundled,
        initrd: None,
        cmdline: format!("net=echo count={frames}"),
        memory: 256 << 20,
        cpus: 1,
        started,
        console: ConsoleConfig {
            stdout: false,
            ..ConsoleConfig::default()
        },
        timeout: Some(Duration::from_secs(300)),
        net: Some(NetSpec {
            port: format!("{pipe}{{0"),
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            vnet_hdr: false,
            passthrough: false,
            pipe_slots: nmvm_devices::netmap::shm::DEFAULT_SLOTS,
        }),
    };
    let vm_thread = std::thread::Builder::new()
        .name("nmvm-demo-vm".into())
        .spawn(move || vm::run(&cfg))
        .map_err(|e| format!("cannot start the VM thread: {e}"))?;
    let opts = PktGenOptions {
        port: format!("{pipe}}}0"),
        mode: Mode::Ping,
        len: (60, 1514),
        count: frames,
        batch: window,
        report: Duration::from_secs(3600),
        endpoints: Endpoints {
            dst_mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            ..Endpoints::default()
        },
        wait_link: Duration::ZERO,
        idle_timeout: Some(Duration::from_secs(60)),
        verbose: false,
        vnet_hdr_len: None,
        check: true,
        ..PktGenOptions::default()
    };
    let traffic = pktgen::run(&opts, &AtomicBool::new(false)).map_err(|e| e.to_string());
    let vm = vm_thread
        .join()
        .map_err(|_| "the VM thread panicked".to_string())?
        .map_err(|e| e.to_string())?;
    let traffic = traffic?;
    let guest_counters = vm
        .recent_lines
        .iter()
        .find(|l| l.starts_with("nmvm-guest: net "))
        .cloned();
    Ok(DemoReport {
        traffic,
        vm,
        guest_counters,
    })
}
