//! The bhyve backend: FreeBSD's `vmm.ko` driven directly through
//! `/dev/vmmctl` and `/dev/vmm/NAME`, without libvmmapi.
//!
//! - [`abi`]: ioctl numbers and structs (plain data, tested on every OS);
//! - [`decode`]: the MMIO instruction decoder (iced-x86) and x86's
//!   register-width rules;
//! - [`exit`]: `struct vm_exit` to an access-level step, a pure function of
//!   the exit bytes and a register accessor;
//! - this file: the VM, its memory, interrupts and vCPUs, all through a
//!   `VmmDevice` (the kernel's `/dev/vmm/NAME`, or in tests the scripted
//!   stand-in of `fake`).
//!
//! The module compiles on every OS; off FreeBSD, opening `/dev/vmmctl`
//! fails at run time with an error that says bhyve needs FreeBSD.
//!
//! bhyve has no ioeventfd or irqfd. A queue notification is an MMIO exit on
//! the vCPU thread, which the shared virtio-pci code turns into a write of
//! the queue's kick eventfd (the device worker polls those eventfds either
//! way), and interrupts are raised from any thread with `VM_LAPIC_MSI` and
//! `VM_ISA_PULSE_IRQ`, which take no vCPU lock.

pub mod abi;
pub mod decode;
pub mod exit;
#[cfg(test)]
pub(crate) mod fake;

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use log::{debug, warn};
use nmvm_devices::eventfd::EventFd;
use nmvm_devices::pci::msix::{MsiMessage, MsiVector};
use nmvm_devices::Interrupt;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use self::abi::{SegDesc, VmReg};
use self::decode::MmioInsn;
use self::exit::{ExitError, Registers, Step};
use super::{CpuState, HypervisorError, Result, Segment, VcpuExit};

/// The control device of FreeBSD 15's vmm.
pub const VMMCTL_PATH: &str = "/dev/vmmctl";

#[cfg(all(target_os = "linux", target_env = "musl"))]
type IoctlRequest = libc::c_int;
#[cfg(not(all(target_os = "linux", target_env = "musl")))]
type IoctlRequest = libc::c_ulong;

/// `ioctl(fd, req, arg)`.
///
/// # Safety
///
/// `arg` must point at a live, exclusively borrowed value of the
/// `#[repr(C)]` struct of `abi` that `req` takes (its size is encoded in
/// `req`), and every pointer inside it must be valid as the request
/// requires.
unsafe fn raw_ioctl(fd: RawFd, req: u32, arg: *mut u8) -> io::Result<()> {
    // SAFETY: the caller's contract is the kernel's.
    let r = unsafe { libc::ioctl(fd, req as IoctlRequest, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `ioctl(fd, req, arg)` on a vmm(4) argument struct (`/dev/vmmctl`).
fn ioctl<T>(fd: RawFd, req: u32, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request nmvm issues is paired with the `#[repr(C)]`
    // struct of `abi` whose size is encoded in `req` (the abi tests check
    // both against the reference); `arg` is a live, exclusive borrow for
    // the whole call.
    unsafe { raw_ioctl(fd, req, (arg as *mut T).cast()) }
}

/// The VM device's two operations: ioctls on `/dev/vmm/NAME`, and a
/// descriptor to map guest memory from (the mmap offset is the
/// guest-physical address). A trait so that tests can put a scripted vmm.ko
/// in the kernel's place and run this backend, threads and all, on Linux.
pub(crate) trait VmmDevice: Send + Sync {
    /// `ioctl(req, arg)`, `arg` pointing at the request's `len`-byte struct.
    ///
    /// # Safety
    ///
    /// `arg` must point at a live, exclusively borrowed value of the
    /// `#[repr(C)]` struct of `abi` that `req` takes, `len` bytes long, and
    /// every pointer inside it must be valid as that request requires.
    unsafe fn ioctl(&self, req: u32, arg: *mut u8, len: usize) -> io::Result<()>;
    /// A descriptor to map guest memory from.
    fn memory_file(&self) -> io::Result<File>;
}

/// vmm.ko's `/dev/vmm/NAME`.
struct KernelVm(File);

impl VmmDevice for KernelVm {
    unsafe fn ioctl(&self, req: u32, arg: *mut u8, _len: usize) -> io::Result<()> {
        // SAFETY: this method's contract is `raw_ioctl`'s.
        unsafe { raw_ioctl(self.0.as_raw_fd(), req, arg) }
    }

    fn memory_file(&self) -> io::Result<File> {
        self.0.try_clone()
    }
}

/// `req` with `arg` on the VM device.
fn vm_ioctl<T>(dev: &dyn VmmDevice, req: u32, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request nmvm issues is paired with the `#[repr(C)]`
    // struct of `abi` whose size is encoded in `req` (the abi tests check
    // both against the reference); `arg` is a live, exclusive borrow for
    // the whole call, and the structs that carry pointers (VM_RUN) point at
    // buffers the caller keeps alive across it.
    unsafe { dev.ioctl(req, (arg as *mut T).cast(), std::mem::size_of::<T>()) }
}

fn call(op: &'static str) -> impl FnOnce(io::Error) -> HypervisorError {
    move |source| HypervisorError::Call { op, source }
}

/// How the VM goes away when nmvm is done with it.
enum Teardown {
    /// Created with `VMMCTL_CREATE_DESTROY_ON_CLOSE`: closing this
    /// `/dev/vmmctl` fd destroys it.
    DestroyOnClose(#[allow(dead_code)] File),
    /// Created through `/dev/vmmctl` by a kernel without the flag.
    Ioctl(File),
    /// Created with the legacy `hw.vmm.create` sysctl.
    Sysctl,
    /// A test's stand-in device: nothing to destroy.
    #[cfg(test)]
    Nothing,
}

/// An open bhyve: `/dev/vmmctl`, or the legacy sysctl interface when the
/// kernel predates it.
pub struct BhyveHypervisor {
    ctl: Option<File>,
}

fn open_vmmctl() -> io::Result<File> {
    // vmmctl refuses opens without FWRITE.
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(VMMCTL_PATH)
}

static VM_SEQ: AtomicU32 = AtomicU32::new(0);

impl BhyveHypervisor {
    /// Opens `/dev/vmmctl` (falling back to the `hw.vmm.create` sysctl on
    /// FreeBSD 14 and earlier).
    pub fn new() -> Result<Self> {
        match open_vmmctl() {
            Ok(ctl) => Ok(Self { ctl: Some(ctl) }),
            Err(e) if cfg!(target_os = "freebsd") && e.kind() == io::ErrorKind::NotFound => {
                if std::path::Path::new("/dev/vmm").exists() {
                    debug!("no {VMMCTL_PATH}: using the legacy hw.vmm.create sysctl");
                    Ok(Self { ctl: None })
                } else {
                    Err(HypervisorError::Open {
                        path: VMMCTL_PATH,
                        source: e,
                        hint: "load bhyve's kernel module first: kldload vmm",
                    })
                }
            }
            Err(source) => Err(HypervisorError::Open {
                path: VMMCTL_PATH,
                source,
                hint: if cfg!(target_os = "freebsd") {
                    "run nmvm as root (vmmctl is 0600 root:wheel) with vmm.ko loaded (kldload vmm)"
                } else {
                    "the bhyve backend needs FreeBSD's vmm.ko; on Linux use --hypervisor kvm"
                },
            }),
        }
    }

    /// The largest vCPU count this backend runs: the kernel's
    /// `hw.vmm.maxcpu`, or 16 (the old fixed `VM_MAXCPU`) if it cannot be
    /// read.
    pub fn max_vcpus(&self) -> usize {
        sysctl_int("hw.vmm.maxcpu")
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .unwrap_or(16)
    }

    /// Creates a VM named `nmvm-PID-N` that is destroyed when it is dropped
    /// (or when the process dies, with destroy-on-close).
    pub fn create_vm(&self) -> Result<BhyveVm> {
        let name = format!(
            "nmvm-{}-{}",
            std::process::id(),
            VM_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let raw = abi::vm_name(&name).ok_or(HypervisorError::Unsupported("this VM name"))?;
        let teardown = match &self.ctl {
            Some(_) => {
                // A description of its own, so that closing it destroys
                // this VM only (destroy-on-close is per open file).
                let ctl = open_vmmctl().map_err(call("open /dev/vmmctl"))?;
                let mut req = abi::VmmctlVmCreate::new(raw, abi::VMMCTL_CREATE_DESTROY_ON_CLOSE);
                match ioctl(ctl.as_raw_fd(), abi::VMMCTL_VM_CREATE, &mut req) {
                    Ok(()) => Teardown::DestroyOnClose(ctl),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        // A kernel whose struct has no `flags` yet.
                        debug!("VMMCTL_VM_CREATE refused destroy-on-close; destroying explicitly");
                        let mut req = abi::VmmctlVmCreate::new(raw, 0);
                        ioctl(ctl.as_raw_fd(), abi::VMMCTL_VM_CREATE, &mut req)
                            .map_err(call("VMMCTL_VM_CREATE"))?;
                        Teardown::Ioctl(ctl)
                    }
                    Err(e) => return Err(call("VMMCTL_VM_CREATE")(e)),
                }
            }
            None => {
                sysctl_vm("hw.vmm.create", &name).map_err(call("sysctl hw.vmm.create"))?;
                Teardown::Sysctl
            }
        };
        let guard = VmGuard { name, teardown };
        let path = format!("/dev/vmm/{}", guard.name);
        let fd = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(call("open /dev/vmm/NAME"))?;
        debug!("bhyve VM {} created", guard.name);
        Ok(BhyveVm {
            dev: Arc::new(KernelVm(fd)),
            memseg: Mutex::new(false),
            aps: Arc::new(ApTable::new()),
            guard,
        })
    }
}

/// Sets a `hw.vmm.create`/`hw.vmm.destroy` sysctl to a VM name.
#[cfg(target_os = "freebsd")]
fn sysctl_vm(sysctl: &str, name: &str) -> io::Result<()> {
    let key = CString::new(sysctl).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `key` is NUL-terminated; the new value is `name.len()` bytes
    // that stay borrowed for the call; no old value is requested (NULL
    // pointers), so the kernel writes nothing into this process.
    let r = unsafe {
        libc::sysctlbyname(
            key.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            name.as_ptr().cast(),
            name.len(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads an integer sysctl.
#[cfg(target_os = "freebsd")]
fn sysctl_int(sysctl: &str) -> io::Result<libc::c_int> {
    let key = CString::new(sysctl).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>();
    // SAFETY: `key` is NUL-terminated; the kernel writes at most `len`
    // bytes (one int) into `value` and the new length into `len`, both
    // live locals; no new value is passed.
    let r = unsafe {
        libc::sysctlbyname(
            key.as_ptr(),
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
            std::ptr::null(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// Sysctls exist only on FreeBSD.
#[cfg(not(target_os = "freebsd"))]
fn sysctl_int(_sysctl: &str) -> io::Result<libc::c_int> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// The legacy sysctls exist only on FreeBSD.
#[cfg(not(target_os = "freebsd"))]
fn sysctl_vm(sysctl: &str, _name: &str) -> io::Result<()> {
    let _ = CString::new(sysctl);
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Destroys the VM when dropped.
struct VmGuard {
    name: String,
    teardown: Teardown,
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        let result = match &self.teardown {
            // Dropping the fd (right after this) destroys the VM.
            Teardown::DestroyOnClose(_) => Ok(()),
            Teardown::Ioctl(ctl) => match abi::vm_name(&self.name) {
                Some(raw) => {
                    let mut req = abi::VmmctlVmDestroy::new(raw);
                    ioctl(ctl.as_raw_fd(), abi::VMMCTL_VM_DESTROY, &mut req)
                }
                None => Ok(()),
            },
            Teardown::Sysctl => sysctl_vm("hw.vmm.destroy", &self.name),
            #[cfg(test)]
            Teardown::Nothing => Ok(()),
        };
        match result {
            Ok(()) => debug!("bhyve VM {} destroyed", self.name),
            Err(e) => warn!("cannot destroy bhyve VM {}: {e}", self.name),
        }
    }
}

/// A bhyve virtual machine (`/dev/vmm/NAME`).
pub struct BhyveVm {
    dev: Arc<dyn VmmDevice>,
    /// Whether the system memory segment exists.
    memseg: Mutex<bool>,
    /// Which vCPUs have been started, shared by all of them.
    aps: Arc<ApTable>,
    guard: VmGuard,
}

/// Where one vCPU is in its start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApState {
    /// Not created: nmvm runs fewer vCPUs than this id.
    Absent,
    /// Created, waiting for the guest's STARTUP IPI.
    Waiting,
    /// A vCPU thread is setting it up after a SIPI.
    Starting,
    /// Activated: its thread runs it.
    Running,
}

/// What a SPINUP_AP exit means for its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sipi {
    /// The caller starts it.
    Start,
    /// It was started before: the guest is restarting a processor it
    /// took offline (INIT and SIPI again), which nmvm does not support.
    Restart,
    /// No such vCPU: the guest addressed a processor nmvm did not create.
    NoSuchCpu,
}

/// The start-up state of every vCPU of a VM. On bhyve the VMM, not the
/// kernel, starts application processors: with `VM_CAP_IPI_EXIT` off (its
/// default), vmm.ko handles INIT itself and turns the first STARTUP IPI
/// after it into one SPINUP_AP exit on the sender's thread (the second SIPI
/// of the MP protocol never reaches the VMM). That thread sets the target
/// up and activates it, then wakes the target's thread here.
#[derive(Debug)]
struct ApTable {
    states: Mutex<Vec<ApState>>,
    started: Condvar,
}

impl ApTable {
    fn new() -> Self {
        Self {
            states: Mutex::new(Vec::new()),
            started: Condvar::new(),
        }
    }

    /// Records vCPU `id` as created, running (the boot CPU) or waiting.
    fn add(&self, id: usize, running: bool) {
        let mut states = nmvm_devices::bus::lock(&self.states);
        if states.len() <= id {
            states.resize(id + 1, ApState::Absent);
        }
        states[id] = if running {
            ApState::Running
        } else {
            ApState::Waiting
        };
    }

    /// Claims the start of `vcpu` for the caller if it is waiting.
    fn claim(&self, vcpu: i32) -> Sipi {
        let mut states = nmvm_devices::bus::lock(&self.states);
        match usize::try_from(vcpu).ok().and_then(|i| states.get_mut(i)) {
            Some(s @ ApState::Waiting) => {
                *s = ApState::Starting;
                Sipi::Start
            }
            Some(ApState::Starting | ApState::Running) => Sipi::Restart,
            Some(ApState::Absent) | None => Sipi::NoSuchCpu,
        }
    }

    /// Marks a claimed vCPU running and wakes its thread.
    fn running(&self, vcpu: i32) {
        let mut states = nmvm_devices::bus::lock(&self.states);
        if let Some(s) = usize::try_from(vcpu).ok().and_then(|i| states.get_mut(i)) {
            *s = ApState::Running;
        }
        self.started.notify_all();
    }

    /// Waits up to `limit` for vCPU `id` to be running.
    fn wait_running(&self, id: i32, limit: Duration) -> bool {
        let Ok(i) = usize::try_from(id) else {
            return false;
        };
        let states = nmvm_devices::bus::lock(&self.states);
        let (states, _) = self
            .started
            .wait_timeout_while(states, limit, |s| s.get(i) != Some(&ApState::Running))
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        states.get(i) == Some(&ApState::Running)
    }
}

impl Drop for BhyveVm {
    fn drop(&mut self) {
        // Stop every vCPU for good before the VM goes away.
        let mut req = abi::VmSuspend {
            how: abi::suspend::POWEROFF,
        };
        if let Err(e) = vm_ioctl(&*self.dev, abi::VM_SUSPEND, &mut req) {
            debug!("VM_SUSPEND of {}: {e}", self.guard.name);
        }
    }
}

impl BhyveVm {
    /// A VM on a test's stand-in for `/dev/vmm/NAME`.
    #[cfg(test)]
    pub(crate) fn with_device(dev: Arc<dyn VmmDevice>) -> Self {
        BhyveVm {
            dev,
            memseg: Mutex::new(false),
            aps: Arc::new(ApTable::new()),
            guard: VmGuard {
                name: "fake".into(),
                teardown: Teardown::Nothing,
            },
        }
    }

    /// The VM's name under /dev/vmm.
    pub fn name(&self) -> &str {
        &self.guard.name
    }

    fn alloc_sysmem(&self, len: u64) -> Result<()> {
        let mut done = nmvm_devices::bus::lock(&self.memseg);
        if *done {
            return Err(HypervisorError::Unsupported(
                "a second system memory segment on bhyve",
            ));
        }
        let dev = &*self.dev;
        let mut seg = abi::VmMemseg {
            segid: abi::VM_SYSMEM,
            len,
            ..Default::default()
        };
        match vm_ioctl(dev, abi::VM_ALLOC_MEMSEG, &mut seg) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                // FreeBSD 14 and earlier: the struct without NUMA fields.
                let mut seg = abi::VmMemseg14 {
                    segid: abi::VM_SYSMEM,
                    len,
                    ..Default::default()
                };
                vm_ioctl(dev, abi::VM_ALLOC_MEMSEG_14, &mut seg)
                    .map_err(call("VM_ALLOC_MEMSEG"))?;
            }
            Err(e) => return Err(call("VM_ALLOC_MEMSEG")(e)),
        }
        *done = true;
        Ok(())
    }
}

impl super::Vm for BhyveVm {
    type Vcpu = BhyveVcpu;

    fn create_memory(&self, ranges: &[(u64, usize)]) -> Result<GuestMemoryMmap> {
        let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        let mem_err = |reason: String| HypervisorError::Memory {
            size: total,
            reason,
        };
        self.alloc_sysmem(total)?;
        let mut regions = Vec::with_capacity(ranges.len());
        let mut segoff = 0u64;
        for &(gpa, len) in ranges {
            let mut map = abi::VmMemmap {
                gpa,
                segid: abi::VM_SYSMEM,
                segoff: segoff as i64,
                len: len as u64,
                prot: abi::PROT_ALL,
                flags: 0,
            };
            vm_ioctl(&*self.dev, abi::VM_MMAP_MEMSEG, &mut map).map_err(call("VM_MMAP_MEMSEG"))?;
            // The mmap offset on /dev/vmm/NAME is the guest-physical address.
            let file = self.dev.memory_file().map_err(call("dup /dev/vmm/NAME"))?;
            let region = MmapRegion::build(
                Some(FileOffset::new(file, gpa)),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
            .map_err(|e| mem_err(format!("mmap of guest memory at {gpa:#x}: {e}")))?;
            regions.push(
                GuestRegionMmap::new(region, GuestAddress(gpa))
                    .ok_or_else(|| mem_err(format!("region at {gpa:#x} wraps around")))?,
            );
            segoff += len as u64;
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| mem_err(e.to_string()))
    }

    unsafe fn map_shared_memory(&self, _gpa: u64, _host: NonNull<u8>, _len: usize) -> Result<()> {
        // vmm.ko maps only its own memory segments into a guest, never
        // arbitrary process memory.
        Err(HypervisorError::Unsupported(
            "mapping process memory into the guest (netmap passthrough) on bhyve",
        ))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn Interrupt>> {
        Ok(Arc::new(PulseLine {
            dev: self.dev.clone(),
            gsi,
        }))
    }

    fn msi_vectors(&self, count: usize) -> Result<Vec<Arc<dyn MsiVector>>> {
        Ok((0..count)
            .map(|_| {
                Arc::new(LapicMsi {
                    dev: self.dev.clone(),
                    route: Mutex::new(None),
                }) as Arc<dyn MsiVector>
            })
            .collect())
    }

    fn register_mmio_notify(&self, addr: u64, _evt: &EventFd) -> Result<()> {
        // No ioeventfd: the write exits to the vCPU thread, and virtio-pci
        // writes the same eventfd from there.
        debug!("bhyve: queue notifications at {addr:#x} arrive as MMIO exits");
        Ok(())
    }

    /// The boot CPU (id 0) is set to `state` and activated at once.
    /// Application processors are only created: each waits for the
    /// guest's STARTUP IPI, which another vCPU's thread turns into its
    /// real-mode start (see [`ApTable`]).
    fn create_vcpu(&self, id: u8, _count: u8, state: &CpuState) -> Result<BhyveVcpu> {
        let dev = &*self.dev;
        let cpuid = i32::from(id);
        let mut x2apic = abi::VmX2apic {
            cpuid,
            state: abi::X2APIC_DISABLED,
        };
        vm_ioctl(dev, abi::VM_SET_X2APIC_STATE, &mut x2apic)
            .map_err(call("VM_SET_X2APIC_STATE"))?;
        // As bhyve: let the guest use INVPCID where the host has it (Linux
        // then flushes TLB entries by PCID); without it the guest does not
        // see the instruction, which is not an error.
        let mut invpcid = abi::VmCapability {
            cpuid,
            captype: abi::cap::ENABLE_INVPCID,
            capval: 1,
            ..Default::default()
        };
        if let Err(e) = vm_ioctl(dev, abi::VM_SET_CAPABILITY, &mut invpcid) {
            debug!("bhyve: no INVPCID for vCPU {cpuid}: {e}");
        }
        let boot = id == 0;
        if boot {
            apply(dev, cpuid, &boot_writes(state))?;
            activate(dev, cpuid)?;
        }
        self.aps.add(usize::from(id), boot);
        Ok(BhyveVcpu {
            dev: self.dev.clone(),
            id: cpuid,
            running: boot,
            aps: self.aps.clone(),
            exit: Box::default(),
            cpuset: Box::new([0; abi::CPUSET_BYTES]),
            data: [0; 8],
            pending: Pending::None,
        })
    }
}

/// Writes `writes` into vCPU `cpuid`, in order.
fn apply(dev: &dyn VmmDevice, cpuid: i32, writes: &[BootWrite]) -> Result<()> {
    for &w in writes {
        match w {
            BootWrite::Reg(reg, regval) => {
                let mut r = abi::VmRegister {
                    cpuid,
                    regnum: reg as i32,
                    regval,
                };
                vm_ioctl(dev, abi::VM_SET_REGISTER, &mut r).map_err(call("VM_SET_REGISTER"))?;
            }
            BootWrite::Desc(reg, desc) => {
                let mut d = abi::VmSegDesc {
                    cpuid,
                    regnum: reg as i32,
                    desc,
                };
                vm_ioctl(dev, abi::VM_SET_SEGMENT_DESCRIPTOR, &mut d)
                    .map_err(call("VM_SET_SEGMENT_DESCRIPTOR"))?;
            }
        }
    }
    Ok(())
}

/// `VM_ACTIVATE_CPU`: VM_RUN refuses a vCPU that is not active.
fn activate(dev: &dyn VmmDevice, cpuid: i32) -> Result<()> {
    let mut act = abi::VmActivateCpu { vcpuid: cpuid };
    vm_ioctl(dev, abi::VM_ACTIVATE_CPU, &mut act).map_err(call("VM_ACTIVATE_CPU"))
}

/// Starts application processor `vcpu` at `rip` after the guest's SIPI:
/// real mode needs unrestricted-guest execution (VT-x; SVM always has it),
/// then the INIT state with CS:IP at the vector's page, then activation.
fn start_ap(dev: &dyn VmmDevice, vcpu: i32, rip: u64) -> Result<()> {
    let mut cap = abi::VmCapability {
        cpuid: vcpu,
        captype: abi::cap::UNRESTRICTED_GUEST,
        capval: 1,
        ..Default::default()
    };
    vm_ioctl(dev, abi::VM_SET_CAPABILITY, &mut cap).map_err(call("VM_SET_CAPABILITY"))?;
    apply(dev, vcpu, &ap_start_writes(rip))?;
    activate(dev, vcpu)
}

/// The state of an application processor after INIT and a STARTUP IPI
/// whose vector page is `rip` (Intel SDM vol. 3, "processor state
/// following INIT"; the SIPI sets CS.selector = vector << 8, CS.base =
/// vector << 12, IP = 0). CR0 holds only NE, as bhyve does: VT-x needs NE,
/// and CD/NW would make the AP's first steps uncached.
pub fn ap_start_writes(rip: u64) -> Vec<BootWrite> {
    use BootWrite::{Desc, Reg};
    let page = rip & !0xfff & 0xf_ffff;
    let real_mode = |base| SegDesc {
        base,
        limit: 0xffff,
        access: 0x93,
    };
    let mut w = vec![
        Reg(VmReg::Cr0, 0x20),
        Reg(VmReg::Cr3, 0),
        Reg(VmReg::Cr4, 0),
        Reg(VmReg::Efer, 0),
        Reg(VmReg::Rflags, 2),
        Desc(VmReg::Cs, real_mode(page)),
        Reg(VmReg::Cs, page >> 4),
    ];
    for seg in [VmReg::Ds, VmReg::Es, VmReg::Fs, VmReg::Gs, VmReg::Ss] {
        w.push(Desc(seg, real_mode(0)));
        w.push(Reg(seg, 0));
    }
    let table = SegDesc {
        base: 0,
        limit: 0xffff,
        access: 0,
    };
    w.extend([
        Desc(VmReg::Gdtr, table),
        Desc(VmReg::Idtr, table),
        Desc(
            VmReg::Tr,
            SegDesc {
                base: 0,
                limit: 0xffff,
                access: 0x8b,
            },
        ),
        Reg(VmReg::Tr, 0),
        Desc(
            VmReg::Ldtr,
            SegDesc {
                base: 0,
                limit: 0xffff,
                access: 0x82,
            },
        ),
        Reg(VmReg::Ldtr, 0),
    ]);
    for reg in [
        VmReg::Cr2,
        VmReg::Rax,
        VmReg::Rbx,
        VmReg::Rcx,
        VmReg::Rsi,
        VmReg::Rdi,
        VmReg::Rbp,
        VmReg::Rsp,
        VmReg::R8,
        VmReg::R9,
        VmReg::R10,
        VmReg::R11,
        VmReg::R12,
        VmReg::R13,
        VmReg::R14,
        VmReg::R15,
        VmReg::IntrShadow,
    ] {
        w.push(Reg(reg, 0));
    }
    // EDX after INIT: the processor signature (family 15, as bhyve).
    w.push(Reg(VmReg::Rdx, 0xf00));
    w.push(Reg(VmReg::Dr6, 0xffff_0ff0));
    w.push(Reg(VmReg::Dr7, 0x400));
    w.push(Reg(VmReg::Rip, 0));
    w
}

/// One register or descriptor write of the boot CPU's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootWrite {
    /// `VM_SET_REGISTER` (for a segment: its selector).
    Reg(VmReg, u64),
    /// `VM_SET_SEGMENT_DESCRIPTOR` (segments, GDTR, IDTR).
    Desc(VmReg, SegDesc),
}

fn desc(s: &Segment) -> SegDesc {
    SegDesc {
        base: s.base,
        limit: s.limit,
        access: abi::seg_access(s),
    }
}

/// The writes that put the boot CPU in `st`, in libvmmapi's order (control
/// registers and EFER first, RIP last).
pub fn boot_writes(st: &CpuState) -> Vec<BootWrite> {
    use BootWrite::{Desc, Reg};
    let mut w = vec![
        Reg(VmReg::Cr0, st.cr0),
        Reg(VmReg::Cr4, st.cr4),
        Reg(VmReg::Efer, st.efer),
        Reg(VmReg::Cr3, st.cr3),
        Reg(VmReg::Rflags, st.rflags),
        Desc(VmReg::Cs, desc(&st.cs)),
        Reg(VmReg::Cs, u64::from(st.cs.selector)),
    ];
    for seg in [VmReg::Ds, VmReg::Es, VmReg::Fs, VmReg::Gs, VmReg::Ss] {
        w.push(Desc(seg, desc(&st.data)));
        w.push(Reg(seg, u64::from(st.data.selector)));
    }
    w.extend([
        Desc(VmReg::Tr, desc(&st.tr)),
        Reg(VmReg::Tr, u64::from(st.tr.selector)),
        Desc(
            VmReg::Ldtr,
            SegDesc {
                base: 0,
                limit: 0,
                access: abi::ACCESS_UNUSABLE,
            },
        ),
        Reg(VmReg::Ldtr, 0),
        Desc(
            VmReg::Gdtr,
            SegDesc {
                base: st.gdt.base,
                limit: u32::from(st.gdt.limit),
                access: 0,
            },
        ),
        Desc(
            VmReg::Idtr,
            SegDesc {
                base: st.idt.base,
                limit: u32::from(st.idt.limit),
                access: 0,
            },
        ),
        Reg(VmReg::Rsp, st.rsp),
        Reg(VmReg::Rbp, st.rsp),
        Reg(VmReg::Rsi, st.rsi),
        Reg(VmReg::Rip, st.rip),
    ]);
    w
}

/// A legacy interrupt line: an edge on the 8259 and IOAPIC pins (ISA
/// interrupts), or on an IOAPIC pin above 15.
struct PulseLine {
    dev: Arc<dyn VmmDevice>,
    gsi: u32,
}

impl Interrupt for PulseLine {
    fn trigger(&self) {
        let dev = &*self.dev;
        let result = if self.gsi < 16 {
            let mut irq = abi::VmIsaIrq {
                atpic_irq: self.gsi as i32,
                ioapic_irq: self.gsi as i32,
            };
            vm_ioctl(dev, abi::VM_ISA_PULSE_IRQ, &mut irq)
        } else {
            let mut irq = abi::VmIoapicIrq {
                irq: self.gsi as i32,
            };
            vm_ioctl(dev, abi::VM_IOAPIC_PULSE_IRQ, &mut irq)
        };
        if let Err(e) = result {
            warn!("cannot raise interrupt line {}: {e}", self.gsi);
        }
    }
}

/// An MSI vector: `trigger` delivers the routed message with
/// `VM_LAPIC_MSI` from the calling thread (the device worker).
struct LapicMsi {
    dev: Arc<dyn VmmDevice>,
    route: Mutex<Option<MsiMessage>>,
}

impl MsiVector for LapicMsi {
    fn set_route(&self, msg: Option<MsiMessage>) {
        *nmvm_devices::bus::lock(&self.route) = msg;
    }

    fn trigger(&self) {
        let Some(m) = *nmvm_devices::bus::lock(&self.route) else {
            return;
        };
        let mut msi = abi::VmLapicMsi {
            msg: u64::from(m.data),
            addr: m.address,
        };
        if let Err(e) = vm_ioctl(&*self.dev, abi::VM_LAPIC_MSI, &mut msi) {
            warn!("VM_LAPIC_MSI {:#x}/{:#x}: {e}", m.address, m.data);
        }
    }
}

/// A read the guest is waiting for, completed on the next run.
#[derive(Debug, Clone, Copy)]
enum Pending {
    None,
    IoIn(usize),
    Mmio(MmioInsn),
}

/// Register access through VM_GET/SET_REGISTER.
struct IoctlRegs<'a> {
    dev: &'a dyn VmmDevice,
    cpuid: i32,
}

impl Registers for IoctlRegs<'_> {
    fn get(&mut self, reg: VmReg) -> std::result::Result<u64, ExitError> {
        let mut r = abi::VmRegister {
            cpuid: self.cpuid,
            regnum: reg as i32,
            regval: 0,
        };
        vm_ioctl(self.dev, abi::VM_GET_REGISTER, &mut r).map_err(|source| ExitError::Register {
            op: "VM_GET_REGISTER",
            reg,
            source,
        })?;
        Ok(r.regval)
    }

    fn set(&mut self, reg: VmReg, value: u64) -> std::result::Result<(), ExitError> {
        let mut r = abi::VmRegister {
            cpuid: self.cpuid,
            regnum: reg as i32,
            regval: value,
        };
        vm_ioctl(self.dev, abi::VM_SET_REGISTER, &mut r).map_err(|source| ExitError::Register {
            op: "VM_SET_REGISTER",
            reg,
            source,
        })
    }
}

/// A bhyve vCPU.
pub struct BhyveVcpu {
    dev: Arc<dyn VmmDevice>,
    id: i32,
    /// Activated (the boot CPU, or an AP the guest has started).
    running: bool,
    aps: Arc<ApTable>,
    exit: Box<abi::VmExitBuf>,
    cpuset: Box<[u8; abi::CPUSET_BYTES]>,
    /// The bytes of the last port or MMIO access.
    data: [u8; 8],
    pending: Pending,
}

fn exit_err(e: ExitError) -> HypervisorError {
    HypervisorError::Emulation(e.to_string())
}

/// A name for an exit nmvm does not handle.
fn exit_name(code: u32) -> &'static str {
    use abi::exitcode::*;
    match code {
        VMX => "a bhyve VMX exit (entry failure or unhandled VM exit)",
        SVM => "a bhyve SVM exit",
        INOUT | INOUT_STR => "string or REP port I/O (INS/OUTS)",
        SPINUP_AP => "an application-processor start (SPINUP_AP)",
        TASK_SWITCH => "a task switch",
        IPI => "an IPI exit",
        DEBUG | DB | BPT | MTRAP => "a debug exit",
        PAGING => "a nested page fault",
        _ => "an exit nmvm does not handle",
    }
}

/// Turns one exit step into a [`VcpuExit`] whose data lives in `data`
/// (recording in `pending` the read to complete on the next run), or
/// `None` for "enter the guest again".
fn step_to_exit<'a>(
    step: Step,
    data: &'a mut [u8; 8],
    pending: &mut Pending,
) -> Option<VcpuExit<'a>> {
    *data = [0; 8];
    Some(match step {
        Step::IoIn { port, size } => {
            *pending = Pending::IoIn(size);
            VcpuExit::IoIn {
                port,
                data: &mut data[..size],
            }
        }
        Step::IoOut { port, size, value } => {
            data[..4].copy_from_slice(&value.to_le_bytes());
            VcpuExit::IoOut {
                port,
                data: &data[..size],
            }
        }
        Step::MmioRead { gpa, insn } => {
            *pending = Pending::Mmio(insn);
            VcpuExit::MmioRead {
                addr: gpa,
                data: &mut data[..insn.size],
            }
        }
        Step::MmioWrite { gpa, size, value } => {
            *data = value.to_le_bytes();
            VcpuExit::MmioWrite {
                addr: gpa,
                data: &data[..size],
            }
        }
        Step::Suspended(how) => match how {
            abi::suspend::RESET => VcpuExit::Reset,
            abi::suspend::POWEROFF | abi::suspend::TRIPLEFAULT => VcpuExit::Shutdown,
            abi::suspend::HALT => VcpuExit::Halt,
            _ => VcpuExit::Other("a bhyve suspend of an unknown kind"),
        },
        Step::Halt => VcpuExit::Halt,
        Step::Interrupted => VcpuExit::Interrupted,
        // A SIPI is handled on the vCPU (it needs the VM); neither leaves
        // anything for the VMM.
        Step::Resume | Step::SpinupAp { .. } => return None,
        Step::Unhandled { exitcode, rip } => {
            warn!("bhyve exit {exitcode} at rip {rip:#x}");
            VcpuExit::Other(exit_name(exitcode))
        }
    })
}

/// Completes the read recorded in `pending` with the bytes in `data`.
fn complete(pending: Pending, data: &[u8; 8], regs: &mut impl Registers) -> Result<()> {
    match pending {
        Pending::None => Ok(()),
        Pending::IoIn(size) => {
            let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            exit::complete_io_in(size, value, regs).map_err(exit_err)
        }
        Pending::Mmio(insn) => {
            exit::complete_mmio_read(&insn, u64::from_le_bytes(*data), regs).map_err(exit_err)
        }
    }
}

/// How long an application processor's thread waits for its start before
/// returning to the VMM's loop, which checks whether the VM is stopping.
const AP_WAIT: Duration = Duration::from_millis(50);

impl BhyveVcpu {
    /// Handles the guest's STARTUP IPI to `vcpu` on this (the sender's)
    /// thread. A failure to set the AP up stops the VM (as in bhyve): the
    /// guest would wait for it forever. A restart of a processor that ran
    /// before, or one to a processor nmvm did not create, is ignored with a
    /// warning.
    fn spinup_ap(&self, vcpu: i32, rip: u64) -> Result<()> {
        match self.aps.claim(vcpu) {
            Sipi::Start => {
                start_ap(&*self.dev, vcpu, rip)?;
                self.aps.running(vcpu);
                debug!("bhyve: vCPU {} started vCPU {vcpu} at {rip:#x}", self.id);
                Ok(())
            }
            Sipi::Restart => {
                warn!(
                    "bhyve: the guest restarts vCPU {vcpu} (CPU hotplug), which nmvm does not \
                     support on bhyve: ignored"
                );
                Ok(())
            }
            Sipi::NoSuchCpu => {
                warn!("bhyve: STARTUP IPI to vCPU {vcpu}, which this VM does not have: ignored");
                Ok(())
            }
        }
    }
}

impl super::Vcpu for BhyveVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        if !self.running {
            if !self.aps.wait_running(self.id, AP_WAIT) {
                return Ok(VcpuExit::Idle);
            }
            self.running = true;
        }
        let mut regs = IoctlRegs {
            dev: &*self.dev,
            cpuid: self.id,
        };
        let pending = std::mem::replace(&mut self.pending, Pending::None);
        complete(pending, &self.data, &mut regs)?;
        loop {
            let mut run = abi::VmRun {
                cpuid: self.id,
                cpuset: self.cpuset.as_mut_ptr() as u64,
                cpusetsize: abi::CPUSET_BYTES as u64,
                vm_exit: self.exit.0.as_mut_ptr() as u64,
            };
            match vm_ioctl(regs.dev, abi::VM_RUN, &mut run) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    return Ok(VcpuExit::Interrupted)
                }
                Err(e) => return Err(call("VM_RUN")(e)),
            }
            let step = exit::handle_exit(&self.exit.0, &mut regs).map_err(exit_err)?;
            if let Step::SpinupAp { vcpu, rip } = step {
                self.spinup_ap(vcpu, rip)?;
                continue;
            }
            if !matches!(step, Step::Resume) {
                return Ok(step_to_exit(step, &mut self.data, &mut self.pending)
                    .unwrap_or(VcpuExit::Interrupted));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::exit::tests::{FakeRegs, Image};
    use super::*;
    use crate::hypervisor::DescriptorTable;

    #[test]
    fn opening_off_freebsd_fails_with_a_clear_error() {
        if cfg!(target_os = "freebsd") {
            return;
        }
        let err = BhyveHypervisor::new().err().expect("no /dev/vmmctl here");
        let msg = err.to_string();
        assert!(
            msg.contains("/dev/vmmctl") && msg.contains("FreeBSD"),
            "{msg}"
        );
    }

    /// One vCPU round trip without the kernel: exit image → VcpuExit →
    /// the VMM fills the data → completion through the registers.
    fn round_trip(img: &Image, regs: &mut FakeRegs, answer: &[u8]) -> String {
        let mut data = [0u8; 8];
        let mut pending = Pending::None;
        let step = exit::handle_exit(img.bytes(), regs).unwrap();
        let described = match step_to_exit(step, &mut data, &mut pending) {
            Some(VcpuExit::IoIn { port, data }) => {
                data.copy_from_slice(&answer[..data.len()]);
                format!("in {port:#x}")
            }
            Some(VcpuExit::MmioRead { addr, data }) => {
                data.copy_from_slice(&answer[..data.len()]);
                format!("mmio read {addr:#x}/{}", data.len())
            }
            Some(VcpuExit::IoOut { port, data }) => format!("out {port:#x} {data:02x?}"),
            Some(VcpuExit::MmioWrite { addr, data }) => format!("mmio write {addr:#x} {data:02x?}"),
            Some(other) => format!("{other:?}"),
            None => "resume".into(),
        };
        complete(pending, &data, regs).unwrap();
        described
    }

    #[test]
    fn vcpu_exits_complete_through_registers() {
        let mut regs = FakeRegs::default();
        regs.regs.insert(VmReg::Rax, 0xffff_ffff_ffff_ffff);
        // inb 0x3fd answered with 0x60: AL only.
        let s = round_trip(&Image::inout(0x10, true, 1, 0x3fd, 0), &mut regs, &[0x60]);
        assert_eq!(s, "in 0x3fd");
        assert_eq!(regs.regs[&VmReg::Rax], 0xffff_ffff_ffff_ff60);
        // outb 0xf4, 7 (the exit port)
        let s = round_trip(&Image::inout(0x10, false, 1, 0xf4, 0x107), &mut regs, &[]);
        assert_eq!(s, "out 0xf4 [07]");
        // movzx ecx, word [rax]: an MMIO read of 2 bytes, zero-extended.
        regs.regs.insert(VmReg::Rcx, u64::MAX);
        let img = Image::mmio(0x20, 0xc000_0012, &[0x0f, 0xb7, 0x08], true);
        let s = round_trip(&img, &mut regs, &[0x34, 0x12]);
        assert_eq!(s, "mmio read 0xc0000012/2");
        assert_eq!(regs.regs[&VmReg::Rcx], 0x1234);
        // mov [rdx], esi: an MMIO write of ESI.
        regs.regs.insert(VmReg::Rsi, 0xaaaa_bbbb_0000_0001);
        let img = Image::mmio(0x20, 0xc000_3004, &[0x89, 0x32], true);
        let s = round_trip(&img, &mut regs, &[]);
        assert_eq!(s, "mmio write 0xc0003004 [01, 00, 00, 00]");
        // A reset and a triple fault end the VM as KVM's exits do.
        let mut img = Image::new(abi::exitcode::SUSPENDED, 0, 0);
        img.put(
            abi::exit_off::SUSPENDED_HOW,
            &abi::suspend::RESET.to_le_bytes(),
        );
        assert_eq!(round_trip(&img, &mut regs, &[]), "Reset");
        img.put(
            abi::exit_off::SUSPENDED_HOW,
            &abi::suspend::TRIPLEFAULT.to_le_bytes(),
        );
        assert_eq!(round_trip(&img, &mut regs, &[]), "Shutdown");
        assert_eq!(
            round_trip(&Image::new(abi::exitcode::BOGUS, 0, 0), &mut regs, &[]),
            "Interrupted"
        );
        assert_eq!(
            round_trip(&Image::new(abi::exitcode::WRMSR, 2, 0), &mut regs, &[]),
            "resume"
        );
    }

    #[test]
    fn boot_state_becomes_libvmmapi_style_writes() {
        let code = Segment {
            selector: 0x08,
            type_: 0xb,
            present: true,
            s: true,
            l: true,
            ..Default::default()
        };
        let data = Segment {
            selector: 0x10,
            type_: 3,
            present: true,
            s: true,
            ..Default::default()
        };
        let st = CpuState {
            rip: 0x100_0000,
            rsp: 0x8ff0,
            rsi: 0x7000,
            rflags: 2,
            cs: code,
            data,
            tr: Segment {
                type_: 0xb,
                present: true,
                ..Default::default()
            },
            gdt: DescriptorTable {
                base: 0x500,
                limit: 23,
            },
            idt: DescriptorTable::default(),
            cr0: 0x8000_0031,
            cr3: 0x9000,
            cr4: 0x20,
            efer: 0x500,
        };
        let w = boot_writes(&st);
        assert_eq!(
            &w[..3],
            &[
                BootWrite::Reg(VmReg::Cr0, 0x8000_0031),
                BootWrite::Reg(VmReg::Cr4, 0x20),
                BootWrite::Reg(VmReg::Efer, 0x500),
            ]
        );
        assert_eq!(*w.last().unwrap(), BootWrite::Reg(VmReg::Rip, 0x100_0000));
        let find = |reg| {
            w.iter()
                .find_map(|x| match x {
                    BootWrite::Desc(r, d) if *r == reg => Some(*d),
                    _ => None,
                })
                .unwrap()
        };
        assert_eq!(find(VmReg::Cs).access, 0x209b);
        for seg in [VmReg::Ds, VmReg::Es, VmReg::Fs, VmReg::Gs, VmReg::Ss] {
            assert_eq!(find(seg).access, 0x93);
            assert!(w.contains(&BootWrite::Reg(seg, 0x10)));
        }
        assert_eq!(find(VmReg::Tr).access, 0x8b);
        assert_eq!(find(VmReg::Ldtr).access, 0x1_0000);
        assert_eq!(
            find(VmReg::Gdtr),
            SegDesc {
                base: 0x500,
                limit: 23,
                access: 0
            }
        );
        assert!(w.contains(&BootWrite::Reg(VmReg::Cs, 0x08)));
        assert!(w.contains(&BootWrite::Reg(VmReg::Rsi, 0x7000)));
        assert!(w.contains(&BootWrite::Reg(VmReg::Rsp, 0x8ff0)));
    }

    #[test]
    fn a_sipi_starts_an_ap_in_real_mode_at_the_vector_page() {
        let w = ap_start_writes(0x9_f000);
        assert_eq!(w[0], BootWrite::Reg(VmReg::Cr0, 0x20));
        assert_eq!(*w.last().unwrap(), BootWrite::Reg(VmReg::Rip, 0));
        let desc = |reg| {
            w.iter()
                .find_map(|x| match x {
                    BootWrite::Desc(r, d) if *r == reg => Some(*d),
                    _ => None,
                })
                .unwrap()
        };
        // CS:IP = 9f00:0000 is linear 0x9f000.
        assert_eq!(desc(VmReg::Cs).base, 0x9_f000);
        assert_eq!(desc(VmReg::Cs).limit, 0xffff);
        assert!(w.contains(&BootWrite::Reg(VmReg::Cs, 0x9f00)));
        for seg in [VmReg::Ds, VmReg::Es, VmReg::Fs, VmReg::Gs, VmReg::Ss] {
            assert_eq!(desc(seg).base, 0);
            assert_eq!(desc(seg).access, 0x93);
            assert!(w.contains(&BootWrite::Reg(seg, 0)));
        }
        for reg in [
            VmReg::Cr2,
            VmReg::Cr3,
            VmReg::Cr4,
            VmReg::Efer,
            VmReg::Rsp,
            VmReg::R15,
            VmReg::IntrShadow,
        ] {
            assert!(w.contains(&BootWrite::Reg(reg, 0)), "{reg:?}");
        }
        assert!(w.contains(&BootWrite::Reg(VmReg::Dr6, 0xffff_0ff0)));
        assert!(w.contains(&BootWrite::Reg(VmReg::Dr7, 0x400)));
        assert_eq!(desc(VmReg::Tr).access, 0x8b);
        assert_eq!(desc(VmReg::Ldtr).access, 0x82);
        // Only the page below 1 MiB counts: what a SIPI vector can name.
        assert!(ap_start_writes(0x12_3456).contains(&BootWrite::Reg(VmReg::Cs, 0x2300)));
    }

    #[test]
    fn spinup_exits_leave_nothing_for_the_vmm() {
        let mut img = Image::new(abi::exitcode::SPINUP_AP, 0, 0x1000);
        img.put(abi::exit_off::SPINUP_VCPU, &1i32.to_le_bytes())
            .put(abi::exit_off::SPINUP_RIP, &0x8000u64.to_le_bytes());
        let mut regs = FakeRegs::default();
        let step = exit::handle_exit(img.bytes(), &mut regs).unwrap();
        assert_eq!(
            step,
            Step::SpinupAp {
                vcpu: 1,
                rip: 0x8000
            }
        );
        let (mut data, mut pending) = ([0u8; 8], Pending::None);
        assert!(step_to_exit(step, &mut data, &mut pending).is_none());
        assert!(matches!(pending, Pending::None));
    }

    #[test]
    fn each_ap_is_started_once_and_its_thread_woken() {
        let aps = Arc::new(ApTable::new());
        aps.add(0, true);
        aps.add(1, false);
        aps.add(2, false);
        assert!(aps.wait_running(0, Duration::ZERO));
        assert!(!aps.wait_running(1, Duration::from_millis(5)));
        // The AP's thread waits; another vCPU's thread handles the SIPI.
        let waiter = {
            let aps = aps.clone();
            std::thread::spawn(move || aps.wait_running(1, Duration::from_secs(10)))
        };
        assert_eq!(aps.claim(1), Sipi::Start);
        // Another SPINUP_AP for it, while it starts or after: a restart.
        assert_eq!(aps.claim(1), Sipi::Restart);
        aps.running(1);
        assert!(waiter.join().unwrap());
        assert_eq!(aps.claim(1), Sipi::Restart);
        assert!(!aps.wait_running(2, Duration::from_millis(5)));
        assert_eq!(aps.claim(0), Sipi::Restart);
        // Processors the guest made up.
        for bogus in [3, 200, -1] {
            assert_eq!(aps.claim(bogus), Sipi::NoSuchCpu);
        }
        assert!(!aps.wait_running(-1, Duration::ZERO));
    }
}
