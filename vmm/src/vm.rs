//! One VM from configuration to verdict: memory, boot state, devices, vCPU
//! threads, and the wait for whatever ends the run.

use std::fs::File;
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};
use nmvm_devices::bus::{lock, PioBus};
use nmvm_devices::legacy::{ExitDevice, EXIT_PORT, I8042, I8042_BASE, I8042_LEN};
use nmvm_devices::netmap::{NetmapError, Port, PortOptions, PortStats};
use nmvm_devices::pci::{PciConfigIo, PciRoot, CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN};
use nmvm_devices::serial::{COM1_BASE, COM1_IRQ, SERIAL_LEN};
use nmvm_devices::virtio::net::{Net, NetCounters, PassthroughControl};
use nmvm_devices::virtio::passthrough::SHM_ID_NETMAP;
use nmvm_devices::virtio::pci::{TransportStats, VirtioPci};
use nmvm_devices::{GuestStop, StopVm};
use regex::Regex;
use thiserror::Error;

use crate::boot::{self, layout, mptable, BootError, BootSpec};
use crate::console::{self, ConsoleOut, ConsoleSerial, RawTerminal};
use crate::hypervisor::bhyve::BhyveHypervisor;
#[cfg(target_os = "linux")]
use crate::hypervisor::kvm::KvmHypervisor;
use crate::hypervisor::Backend;
use crate::hypervisor::{HypervisorError, Vcpu, VcpuExit, Vm};
use crate::metrics;
use crate::monitor::{ConsoleEvent, ConsoleMonitor};
use crate::seccomp::{self, SeccompError, ThreadKind};
use crate::verdict::StopReason;

/// The bundled guest, built from `guest-images/guest` by the build script.
pub static BUNDLED_GUEST: &[u8] = include_bytes!(env!("NMVM_GUEST_ELF"));

/// Smallest VM nmvm creates.
pub const MIN_MEMORY: u64 = 16 << 20;

/// Errors that prevent a VM from starting.
#[derive(Debug, Error)]
pub enum VmError {
    /// A configuration value is out of range.
    #[error("{0}")]
    Config(String),
    /// The hypervisor refused something.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    File {
        /// Which file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel, initrd or command line could not be set up.
    #[error("{path}: {source}")]
    Boot {
        /// The kernel image.
        path: String,
        /// What went wrong.
        #[source]
        source: BootError,
    },
    /// A device could not be set up.
    #[error("device setup: {0}")]
    Device(String),
    /// The netmap port could not be opened.
    #[error("--net {port}: {source}")]
    Net {
        /// The port name.
        port: String,
        /// Why.
        #[source]
        source: Box<NetmapError>,
    },
    /// A thread could not be started.
    /// `--passthrough` cannot be offered on this port.
    #[error("--passthrough with --net {port}: {reason}")]
    Passthrough {
        /// The port name.
        port: String,
        /// Why not.
        reason: String,
    },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// A seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Which kernel to boot.
#[derive(Debug, Clone)]
pub enum KernelChoice {
    /// The guest embedded in nmvm.
    Bundled,
    /// A vmlinux or bzImage file.
    File(PathBuf),
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The kernel.
    pub kernel: KernelChoice,
    /// An initrd, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPU count.
    pub cpus: u8,
    /// When the process started (for boot timings).
    pub started: Instant,
    /// Console handling.
    pub console: ConsoleConfig,
    /// End the run with a timeout verdict after this long.
    pub timeout: Option<Duration>,
    /// The VM's network device, if any.
    pub net: Option<NetSpec>,
}

/// The virtio-net device's configuration.
#[derive(Debug, Clone)]
pub struct NetSpec {
    /// netmap port name (`shm:NAME{N`, `netmap:eth0`, `vale0:vm1`, …).
    pub port: String,
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// Carry a 12-byte virtio-net header on the port (offloads).
    pub vnet_hdr: bool,
    /// Map the port's region into the guest for netmap passthrough.
    pub passthrough: bool,
    /// Slots per ring of a userspace pipe this VM opens first.
    pub pipe_slots: u32,
}

/// Where the virtio-net device's BAR 0 sits: the start of the MMIO hole.
pub const NET_BAR_ADDR: u64 = layout::MMIO_HOLE_START;
/// PCI slot of the virtio-net device (00:01.0).
pub const NET_PCI_SLOT: u8 = 1;
/// Where the virtio-net device's BAR 2 (netmap passthrough) sits.
pub const NET_SHM_ADDR: u64 = 0xd000_0000;
/// The largest region passthrough maps (BAR 2 must fit in the MMIO hole
/// below the IOAPIC, aligned to its power-of-two size).
pub const NET_SHM_MAX: u64 = 256 << 20;
/// MSI-X vectors: one per queue and one for configuration changes.
const NET_MSIX_VECTORS: usize = 3;

/// What the network device saw during a run.
#[derive(Debug)]
pub struct NetOutcome {
    /// Device counters.
    pub counters: Arc<NetCounters>,
    /// Features the driver accepted (the last time it activated).
    pub features: u64,
    /// What the netmap layer counted about the peer.
    pub port: PortStats,
    /// Bad register accesses (transport) and MSI-X table accesses.
    pub bad_register_accesses: u64,
    /// Out-of-range MSI-X table accesses.
    pub bad_msix_accesses: u64,
    /// Whether the driver used MSI-X.
    pub msix_enabled: bool,
    /// Netmap passthrough registers and counters (with `--passthrough`).
    pub passthrough: Option<Arc<PassthroughControl>>,
}

/// Where the console goes and what decides the run from it.
#[derive(Debug, Clone, Default)]
pub struct ConsoleConfig {
    /// Copy the console to stdout.
    pub stdout: bool,
    /// Also write it to this file, unbuffered.
    pub serial_log: Option<PathBuf>,
    /// The run succeeds once all of these have appeared.
    pub expect: Vec<Regex>,
    /// The run fails as soon as one of these appears.
    pub expect_fail: Vec<Regex>,
}

/// How long a panicking guest may keep printing its report before nmvm
/// stops it (Linux prints a backtrace, then "---[ end Kernel panic").
const PANIC_GRACE: Duration = Duration::from_secs(5);

/// Counters kept by the vCPU threads.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// Runs that returned without a guest exit: a signal (nmvm stopping
    /// the vCPU) or, on bhyve, a pending AST.
    pub interrupted: AtomicU64,
    /// Anything else.
    pub other: AtomicU64,
}

impl ExitCounters {
    /// All exits counted.
    pub fn total(&self) -> u64 {
        [
            &self.io_in,
            &self.io_out,
            &self.mmio_read,
            &self.mmio_write,
            &self.interrupted,
            &self.other,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// What a finished run reports.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why it ended.
    pub reason: StopReason,
    /// Time from process start to the guest's first exit (for the bundled
    /// guest, its first instruction is a port write, so this is the time to
    /// its first instruction plus one exit).
    pub first_exit: Option<Duration>,
    /// Time from process start to the verdict.
    pub elapsed: Duration,
    /// VM exits by kind.
    pub exits: Arc<ExitCounters>,
    /// Process resident memory beyond resident guest RAM, in KiB.
    pub vmm_rss_kib: Option<u64>,
    /// Time from process start to the guest's first console output.
    pub first_output: Option<Duration>,
    /// `--expect` patterns and whether each appeared.
    pub expectations: Vec<(String, bool)>,
    /// The last console lines.
    pub recent_lines: Vec<String>,
    /// The network device's figures, if the VM had one.
    pub net: Option<NetOutcome>,
}

/// The stop hook handed to devices and vCPU threads: the first reason wins.
struct Control {
    stopping: AtomicBool,
    tx: Mutex<Sender<StopReason>>,
}

impl Control {
    fn request(&self, reason: StopReason) {
        if !self.stopping.swap(true, Ordering::SeqCst) {
            debug!("stop requested: {reason}");
        }
        // The receiver keeps the first reason; later ones are ignored.
        let _ = nmvm_devices::bus::lock(&self.tx).send(reason);
    }
}

impl StopVm for Control {
    fn stop(&self, why: GuestStop) {
        self.request(match why {
            GuestStop::ExitStatus(s) => StopReason::GuestExit(s),
            GuestStop::Reset => StopReason::GuestReset,
        });
    }
}

/// State shared by the vCPU threads.
struct VcpuShared {
    control: Arc<Control>,
    pio: PioBus,
    pci: Arc<Mutex<PciRoot>>,
    exits: Arc<ExitCounters>,
    first_exit: OnceLock<Instant>,
}

fn check_config(cfg: &VmConfig, max_vcpus: usize) -> Result<(), VmError> {
    if cfg.memory < MIN_MEMORY {
        return Err(VmError::Config(format!(
            "--memory {} is too small: nmvm needs at least 16M",
            cfg.memory
        )));
    }
    if cfg.memory % 4096 != 0 {
        return Err(VmError::Config(
            "--memory must be a whole number of 4 KiB pages".into(),
        ));
    }
    // SAFETY: sysconf reads a configuration value and touches no memory.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let host_ram = (pages > 0 && page_size > 0).then(|| pages as u64 * page_size as u64);
    if let Some(host) = host_ram {
        if cfg.memory > host {
            return Err(VmError::Config(format!(
                "--memory {} MiB is more than this host's {} MiB of RAM",
                cfg.memory >> 20,
                host >> 20
            )));
        }
    }
    let max = max_vcpus.min(usize::from(mptable::MAX_CPUS));
    if cfg.cpus == 0 || usize::from(cfg.cpus) > max {
        return Err(VmError::Config(format!(
            "--cpus {} is out of range: nmvm runs 1 to {max} vCPUs here",
            cfg.cpus
        )));
    }
    Ok(())
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, VmError> {
    std::fs::read(path).map_err(|source| VmError::File {
        path: path.clone(),
        source,
    })
}

/// A signal handler that does nothing: its only job is to interrupt
/// KVM_RUN or VM_RUN (which then return EINTR) so a vCPU thread sees the
/// stop flag.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks vCPU threads: the first real-time signal on Linux
/// (nothing else uses it); FreeBSD's libc bindings name none, so SIGUSR2
/// there.
fn kick_signal() -> libc::c_int {
    #[cfg(target_os = "linux")]
    return libc::SIGRTMIN();
    #[cfg(not(target_os = "linux"))]
    return libc::SIGUSR2;
}

/// Boots the VM described by `cfg` and runs it to a verdict.
pub fn run(cfg: &VmConfig) -> Result<RunOutcome, VmError> {
    match crate::hypervisor::selected() {
        #[cfg(not(target_os = "linux"))]
        Backend::Kvm => Err(crate::hypervisor::HypervisorError::NotOnThisOs(
            "KVM (Linux's hypervisor); use --hypervisor bhyve",
        )
        .into()),
        #[cfg(target_os = "linux")]
        Backend::Kvm => {
            let hv = KvmHypervisor::new()?;
            check_config(cfg, hv.max_vcpus())?;
            run_on(cfg, hv.create_vm()?)
        }
        Backend::Bhyve => {
            let hv = BhyveHypervisor::new()?;
            check_config(cfg, hv.max_vcpus())?;
            run_on(cfg, hv.create_vm()?)
        }
    }
}

/// [`run`] on a VM of either backend.
fn run_on<V: Vm>(cfg: &VmConfig, vm: V) -> Result<RunOutcome, VmError>
where
    V::Vcpu: 'static,
{
    let mem = vm.create_memory(&layout::ram_ranges(cfg.memory))?;

    let initrd = cfg.initrd.as_ref().map(read_file).transpose()?;
    let boot_state = match &cfg.kernel {
        KernelChoice::Bundled => boot::setup(
            &mem,
            BootSpec {
                kernel: &mut Cursor::new(BUNDLED_GUEST),
                kernel_len: BUNDLED_GUEST.len() as u64,
                initrd: initrd.as_deref(),
                cmdline: &cfg.cmdline,
                cpus: cfg.cpus,
                memory: cfg.memory,
            },
        )
        .map_err(|source| VmError::Boot {
            path: "bundled guest".into(),
            source,
        })?,
        KernelChoice::File(path) => {
            let mut f = File::open(path).map_err(|source| VmError::File {
                path: path.clone(),
                source,
            })?;
            let len = f
                .metadata()
                .map_err(|source| VmError::File {
                    path: path.clone(),
                    source,
                })?
                .len();
            boot::setup(
                &mem,
                BootSpec {
                    kernel: &mut f,
                    kernel_len: len,
                    initrd: initrd.as_deref(),
                    cmdline: &cfg.cmdline,
                    cpus: cfg.cpus,
                    memory: cfg.memory,
                },
            )
            .map_err(|source| VmError::Boot {
                path: path.display().to_string(),
                source,
            })?
        }
    };

    let (tx, rx) = mpsc::channel();
    let control = Arc::new(Control {
        stopping: AtomicBool::new(false),
        tx: Mutex::new(tx),
    });

    let monitor = Arc::new(Mutex::new(ConsoleMonitor::new(
        cfg.console.expect.clone(),
        cfg.console.expect_fail.clone(),
    )));
    let log = cfg
        .console
        .serial_log
        .as_ref()
        .map(|path| {
            File::create(path).map_err(|source| VmError::File {
                path: path.clone(),
                source,
            })
        })
        .transpose()?;
    let panic_started: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let on_event = {
        let control = control.clone();
        let panic_started = panic_started.clone();
        move |event| match event {
            ConsoleEvent::ExpectationsMet => control.request(StopReason::ExpectationsMet),
            ConsoleEvent::ForbiddenOutput(text) => {
                control.request(StopReason::ForbiddenOutput(text))
            }
            ConsoleEvent::PanicStarted => {
                panic_started.get_or_init(Instant::now);
            }
            ConsoleEvent::PanicEnded => control.request(StopReason::Panic),
        }
    };
    let serial = Arc::new(Mutex::new(ConsoleSerial::new(
        vm.irq_line(COM1_IRQ)?,
        ConsoleOut::new(cfg.console.stdout, log, monitor.clone(), Box::new(on_event)),
    )));
    let mut pio = PioBus::new();
    let dev_err = |e: nmvm_devices::bus::BusError| VmError::Device(e.to_string());
    pio.insert(COM1_BASE, SERIAL_LEN, serial.clone())
        .map_err(dev_err)?;
    pio.insert(
        EXIT_PORT,
        1,
        Arc::new(Mutex::new(ExitDevice::new(control.clone()))),
    )
    .map_err(dev_err)?;
    pio.insert(
        I8042_BASE,
        I8042_LEN,
        Arc::new(Mutex::new(I8042::new(control.clone()))),
    )
    .map_err(dev_err)?;
    let pci = Arc::new(Mutex::new(PciRoot::new()));
    pio.insert(
        CONFIG_ADDRESS_PORT,
        CONFIG_PORTS_LEN,
        Arc::new(Mutex::new(PciConfigIo(pci.clone()))),
    )
    .map_err(dev_err)?;
    let net = match &cfg.net {
        Some(spec) => Some(add_net_device(&vm, &mem, &pci, spec)?),
        None => None,
    };

    let shared = Arc::new(VcpuShared {
        control: control.clone(),
        pio,
        pci: pci.clone(),
        exits: Arc::new(ExitCounters::default()),
        first_exit: OnceLock::new(),
    });

    // SAFETY: the handler is async-signal-safe: it does nothing. (No
    // SA_RESTART: the run ioctl it interrupts returns EINTR.)
    unsafe { crate::signal::set_handler(kick_signal(), kick_handler) }.map_err(VmError::Thread)?;
    let signal = Arc::new(AtomicUsize::new(0));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        signal_hook::flag::register_usize(sig, signal.clone(), sig as usize)
            .map_err(VmError::Thread)?;
    }

    let mut vcpus = Vec::with_capacity(usize::from(cfg.cpus));
    for id in 0..cfg.cpus {
        vcpus.push(vm.create_vcpu(id, cfg.cpus, &boot_state)?);
    }

    let _terminal = RawTerminal::enable();

    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nmvm-vcpu{id}"))
            .spawn(move || {
                // Set-up is done: from here on the vCPU serves the guest.
                if let Err(e) = seccomp::install(ThreadKind::Vcpu) {
                    shared.control.request(StopReason::Vmm(e.to_string()));
                    return;
                }
                vcpu_loop(vcpu, &shared)
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                stop_vcpus(&control, &threads);
                return Err(VmError::Thread(e));
            }
        }
    }
    // The main thread only waits and reports from here on; the console
    // input thread it starts next inherits its filter.
    if let Err(e) = seccomp::install(ThreadKind::Main) {
        stop_vcpus(&control, &threads);
        return Err(e.into());
    }
    console::forward_stdin(serial);

    let reason = loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(reason) => break reason,
            Err(RecvTimeoutError::Timeout) => {
                let sig = signal.load(Ordering::Relaxed);
                if sig != 0 {
                    break StopReason::Signal(sig as i32);
                }
                if cfg.timeout.is_some_and(|t| cfg.started.elapsed() >= t) {
                    break StopReason::Timeout;
                }
                if panic_started
                    .get()
                    .is_some_and(|t| t.elapsed() >= PANIC_GRACE)
                {
                    break StopReason::Panic;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                break StopReason::Vmm("the VM's control channel closed".into())
            }
        }
    };
    control.stopping.store(true, Ordering::SeqCst);
    stop_vcpus(&control, &threads);
    for t in threads {
        if t.join().is_err() {
            warn!("a vCPU thread panicked");
        }
    }
    let elapsed = cfg.started.elapsed();
    let net = net.map(|n| n.finish());
    let monitor = nmvm_devices::bus::lock(&monitor);
    let reason = reason.resolve(monitor.panicked(), monitor.expectations_missing());
    let vmm_rss_kib =
        metrics::process_rss_kib().map(|rss| rss.saturating_sub(metrics::guest_resident_kib(&mem)));
    drop(vm);
    drop(mem);
    Ok(RunOutcome {
        reason,
        first_exit: shared
            .first_exit
            .get()
            .map(|t| t.saturating_duration_since(cfg.started)),
        elapsed,
        exits: shared.exits.clone(),
        vmm_rss_kib,
        first_output: monitor
            .first_output()
            .map(|t| t.saturating_duration_since(cfg.started)),
        expectations: monitor.expectations(),
        recent_lines: monitor.recent_lines(),
        net,
    })
}

/// The live network device, for reading its figures at the end.
struct NetHandle {
    pci: Arc<Mutex<VirtioPci>>,
    passthrough: Option<Arc<PassthroughControl>>,
    counters: Arc<NetCounters>,
    features: Arc<AtomicU64>,
    port_stats: Arc<Mutex<PortStats>>,
    transport: Arc<TransportStats>,
}

impl NetHandle {
    /// Stops the device worker and collects the figures.
    fn finish(self) -> NetOutcome {
        let mut dev = lock(&self.pci);
        let bad_msix_accesses = dev.msix_bad_accesses();
        let msix_enabled = dev.msix_enabled();
        let features = self.features.load(Ordering::Relaxed);
        dev.shutdown();
        let port = *lock(&self.port_stats);
        NetOutcome {
            counters: self.counters,
            features,
            port,
            bad_register_accesses: self.transport.bad_accesses.load(Ordering::Relaxed),
            bad_msix_accesses,
            msix_enabled,
            passthrough: self.passthrough,
        }
    }
}

fn add_net_device(
    vm: &impl Vm,
    mem: &vm_memory::GuestMemoryMmap,
    pci: &Arc<Mutex<PciRoot>>,
    spec: &NetSpec,
) -> Result<NetHandle, VmError> {
    let opts = PortOptions {
        vnet_hdr_len: spec.vnet_hdr.then_some(12),
        num_slots: spec.pipe_slots,
        ..PortOptions::default()
    };
    let port = Port::open(&spec.port, &opts).map_err(|e| VmError::Net {
        port: spec.port.clone(),
        source: Box::new(e),
    })?;
    let mut net = Net::new(spec.mac, port);
    let shared = if spec.passthrough {
        let geometry = net
            .enable_passthrough()
            .map_err(|reason| VmError::Passthrough {
                port: spec.port.clone(),
                reason,
            })?;
        let (host, len) = net
            .port_region()
            .ok_or_else(|| VmError::Device("virtio-net: the port has no region".into()))?;
        // Whole pages: the last page of the mapping is mapped in full.
        let mapped = (len as u64).next_multiple_of(4096);
        let bar_size = mapped.next_power_of_two();
        if bar_size > NET_SHM_MAX {
            return Err(VmError::Passthrough {
                port: spec.port.clone(),
                reason: format!(
                    "the port's netmap region is {} MiB; passthrough maps at most {} MiB \
                     (use fewer or smaller rings or buffers)",
                    geometry.region_size >> 20,
                    NET_SHM_MAX >> 20
                ),
            });
        }
        Some((host, mapped, bar_size, len as u64))
    } else {
        None
    };
    let counters = net.counters();
    let features = net.acked_features();
    let port_stats = net.port_stats();
    let passthrough = net.passthrough_control();
    let vectors = vm.msi_vectors(NET_MSIX_VECTORS)?;
    let mut dev = VirtioPci::new(Box::new(net), NET_BAR_ADDR, vectors, mem.clone())
        .map_err(|e| VmError::Device(format!("virtio-net: {e}")))?;
    if let Some((host, mapped, bar_size, len)) = shared {
        // SAFETY: the region is the port's shared read-write mapping, owned
        // by the port inside `dev`, which the VM keeps until its vCPUs have
        // stopped for good (NetHandle::finish runs after stop_vcpus); the
        // port never unmaps or remaps it while it lives.
        unsafe { vm.map_shared_memory(NET_SHM_ADDR, host, mapped as usize) }?;
        dev.add_shared_memory(NET_SHM_ADDR, bar_size, len, SHM_ID_NETMAP);
    }
    for (addr, evt) in dev.notify_eventfds(NET_BAR_ADDR) {
        vm.register_mmio_notify(addr, &evt)?;
    }
    let transport = dev.stats();
    let dev = Arc::new(Mutex::new(dev));
    lock(pci).add(NET_PCI_SLOT, dev.clone());
    Ok(NetHandle {
        pci: dev,
        passthrough,
        counters,
        features,
        port_stats,
        transport,
    })
}

/// Interrupts every vCPU thread until it has seen the stop flag. Signals
/// are re-sent because one that lands while a thread is outside KVM_RUN is
/// consumed without effect.
fn stop_vcpus(control: &Control, threads: &[JoinHandle<()>]) {
    use std::os::unix::thread::JoinHandleExt;
    control.stopping.store(true, Ordering::SeqCst);
    for _ in 0..500 {
        if threads.iter().all(|t| t.is_finished()) {
            return;
        }
        for t in threads.iter().filter(|t| !t.is_finished()) {
            // SAFETY: the pthread_t belongs to a thread we spawned and have
            // not joined, so it is still valid; the signal has a handler.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    warn!("vCPU threads did not stop within a second");
}

fn vcpu_loop<V: Vcpu>(mut vcpu: V, shared: &VcpuShared) {
    let counters = &shared.exits;
    let end = |r: StopReason| {
        counters.other.fetch_add(1, Ordering::Relaxed);
        shared.control.request(r);
    };
    while !shared.control.stopping.load(Ordering::Relaxed) {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                shared.control.request(StopReason::Vmm(e.to_string()));
                return;
            }
        };
        if !matches!(exit, VcpuExit::Interrupted | VcpuExit::Idle) {
            shared.first_exit.get_or_init(Instant::now);
        }
        match exit {
            VcpuExit::IoIn { port, data } => {
                counters.io_in.fetch_add(1, Ordering::Relaxed);
                shared.pio.read(port, data);
            }
            VcpuExit::IoOut { port, data } => {
                counters.io_out.fetch_add(1, Ordering::Relaxed);
                shared.pio.write(port, data);
            }
            VcpuExit::MmioRead { addr, data } => {
                counters.mmio_read.fetch_add(1, Ordering::Relaxed);
                if !lock(&shared.pci).mmio_read(addr, data) {
                    debug!(
                        "MMIO read of {} bytes at {addr:#x}: nothing there",
                        data.len()
                    );
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite { addr, data } => {
                counters.mmio_write.fetch_add(1, Ordering::Relaxed);
                if !lock(&shared.pci).mmio_write(addr, data) {
                    debug!("MMIO write of {} bytes at {addr:#x}: dropped", data.len());
                }
            }
            VcpuExit::Interrupted => {
                counters.interrupted.fetch_add(1, Ordering::Relaxed);
            }
            VcpuExit::Idle => {}
            VcpuExit::Shutdown => return end(StopReason::TripleFault),
            VcpuExit::Reset => return end(StopReason::GuestReset),
            VcpuExit::Halt => {
                return end(StopReason::Internal(
                    "the vCPU halted outside the in-kernel interrupt controller".into(),
                ))
            }
            VcpuExit::InternalError { code, rip } => {
                return end(StopReason::Internal(format!(
                    "internal error (KVM suberror {code}{}){}",
                    if code == 1 { ", emulation failure" } else { "" },
                    rip.map(|r| format!(" at rip {r:#x}")).unwrap_or_default()
                )))
            }
            VcpuExit::FailEntry { reason } => {
                return end(StopReason::Internal(format!(
                    "entering the guest failed (hardware reason {reason:#x})"
                )))
            }
            VcpuExit::Other(what) => {
                return end(StopReason::Internal(format!("unexpected {what}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::bhyve::abi::{cap, exit_off, exitcode, suspend, VmReg};
    use crate::hypervisor::bhyve::exit::tests::Image;
    use crate::hypervisor::bhyve::fake::{Call, FakeVmm};
    use crate::hypervisor::bhyve::BhyveVm;

    fn out(port: u16, byte: u8) -> Image {
        Image::inout(0x1000, false, 1, port, u32::from(byte))
    }

    /// The whole VMM on the bhyve backend, with vmm.ko replaced by a
    /// script: the boot CPU reads the UART's line status, prints, loads
    /// from an address with nothing behind it and starts the second CPU,
    /// which prints and writes the exit port.
    #[test]
    fn a_scripted_bhyve_vm_starts_its_second_cpu_and_ends_with_the_guest_status() {
        let mut spinup = Image::new(exitcode::SPINUP_AP, 0, 0x1000);
        spinup
            .put(exit_off::SPINUP_VCPU, &1i32.to_le_bytes())
            .put(exit_off::SPINUP_RIP, &0x8000u64.to_le_bytes());
        let boot_cpu = vec![
            Image::inout(0x1000, true, 1, COM1_BASE + 5, 0),
            out(COM1_BASE, b'A'),
            out(COM1_BASE, b'\n'),
            // mov ecx, [rbx]
            Image::mmio(0x1000, 0xd000_0000, &[0x8b, 0x0b], true),
            spinup,
        ];
        let second_cpu = vec![
            out(COM1_BASE, b'B'),
            out(COM1_BASE, b'\n'),
            out(EXIT_PORT, 7),
        ];
        let fake = Arc::new(FakeVmm::new(vec![
            boot_cpu.into_iter().map(|i| i.0).collect(),
            second_cpu.into_iter().map(|i| i.0).collect(),
        ]));
        let cfg = VmConfig {
            kernel: KernelChoice::Bundled,
            initrd: None,
            cmdline: String::new(),
            memory: 64 << 20,
            cpus: 2,
            started: Instant::now(),
            console: ConsoleConfig::default(),
            timeout: Some(Duration::from_secs(30)),
            net: None,
        };
        let outcome = run_on(&cfg, BhyveVm::with_device(fake.clone())).expect("run");

        assert_eq!(outcome.reason, StopReason::GuestExit(7));
        let lines = outcome.recent_lines.join("|");
        assert!(lines.contains('A') && lines.contains('B'), "{lines}");
        // IN completed through RAX with the UART's "transmitter empty".
        assert_eq!(fake.register(0, VmReg::Rax) & 0xff, 0x60);
        // The MMIO load read all-ones, zero-extended into RCX.
        assert_eq!(fake.register(0, VmReg::Rcx), 0xffff_ffff);
        // The AP: set up for real mode at 0800:0000 and activated only
        // after the boot CPU's SIPI exit, and run only after that.
        let log = fake.log();
        let at = |c: Call| log.iter().position(|x| *x == c);
        let runs_of = |cpu| {
            log.iter()
                .enumerate()
                .filter(move |(_, c)| **c == Call::Run(cpu))
                .map(|(i, _)| i)
        };
        let sipi = runs_of(0).nth(4).expect("the boot CPU's fifth exit");
        let unrestricted = at(Call::SetCapability(1, cap::UNRESTRICTED_GUEST, 1)).unwrap();
        let activated = at(Call::Activate(1)).expect("AP activated");
        let first_run = runs_of(1).next().expect("AP ran");
        assert!(sipi < unrestricted && unrestricted < activated && activated < first_run);
        assert_eq!(runs_of(1).count(), 3);
        assert_eq!(fake.register(1, VmReg::Rip), 0);
        assert_eq!(fake.register(1, VmReg::Cs), 0x800);
        assert_eq!(fake.descriptor(1, VmReg::Cs).unwrap().base, 0x8000);
        // The boot CPU was set up and activated at creation; the VM was
        // suspended when nmvm let it go.
        assert!(at(Call::Activate(0)).unwrap() < runs_of(0).next().unwrap());
        assert_eq!(log.last(), Some(&Call::Suspend(suspend::POWEROFF)));
    }
}
