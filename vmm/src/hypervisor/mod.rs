//! The hypervisor abstraction: a VM with memory, interrupt lines and vCPUs
//! whose exits are reported at the level of the guest's access.
//!
//! Exits are access-level (a port read, an MMIO write…) rather than raw
//! hypervisor structures because the two backends report them differently:
//! KVM decodes MMIO itself and completes reads from the shared run area on the
//! next entry, while bhyve hands the VMM instruction bytes to decode and takes
//! results through registers. Each backend turns its own exits into
//! [`VcpuExit`] and completes reads its own way on the next [`Vcpu::run`].

pub mod bhyve;
#[cfg(target_os = "linux")]
pub mod kvm;

use std::ptr::NonNull;
use std::sync::Arc;

use nmvm_devices::eventfd::EventFd;
use nmvm_devices::pci::msix::MsiVector;
use nmvm_devices::Interrupt;
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

/// Which hypervisor nmvm drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Linux KVM (`/dev/kvm`).
    Kvm,
    /// FreeBSD's bhyve kernel module (`/dev/vmmctl`, `/dev/vmm/NAME`).
    Bhyve,
}

impl Backend {
    /// The native hypervisor of the OS nmvm was built for.
    pub const fn native() -> Self {
        if cfg!(target_os = "freebsd") {
            Backend::Bhyve
        } else {
            Backend::Kvm
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "kvm" => Ok(Backend::Kvm),
            "bhyve" => Ok(Backend::Bhyve),
            _ => Err(format!("unknown hypervisor {s:?}: use kvm or bhyve")),
        }
    }
}

static SELECTED: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();

/// Chooses the backend for the VMs this process creates (`nmvm run
/// --hypervisor`); the first choice stands. Without one, VMs use
/// [`Backend::native`].
pub fn select(backend: Backend) {
    let _ = SELECTED.set(backend);
}

/// The backend VMs are created on.
pub fn selected() -> Backend {
    SELECTED.get().copied().unwrap_or(Backend::native())
}

/// Errors from a hypervisor backend.
#[derive(Debug, Error)]
pub enum HypervisorError {
    /// The hypervisor device cannot be opened.
    #[error("cannot open {path}: {source} ({hint})")]
    Open {
        /// The device path.
        path: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
        /// What the user can do about it.
        hint: &'static str,
    },
    /// A hypervisor call failed.
    #[error("{op} failed: {source}")]
    Call {
        /// Which call.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The hypervisor asked for does not exist on the OS nmvm was built
    /// for.
    #[error("{0} is not available on this operating system")]
    NotOnThisOs(&'static str),
    /// The hypervisor lacks something nmvm needs.
    #[error("the hypervisor does not support {0}")]
    Unsupported(&'static str),
    /// A guest access the VMM emulates (bhyve: port I/O and MMIO through
    /// registers) could not be carried out.
    #[error("cannot emulate the guest's access: {0}")]
    Emulation(String),
    /// Guest memory could not be allocated.
    #[error("cannot allocate {size} bytes of guest memory: {reason}")]
    Memory {
        /// Requested size.
        size: u64,
        /// Why.
        reason: String,
    },
}

/// Shorthand for backend results.
pub type Result<T> = std::result::Result<T, HypervisorError>;

/// A segment register in long mode, in the form both backends accept.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit (byte granular, already scaled).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (32-bit).
    pub db: bool,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// 4 KiB granularity.
    pub g: bool,
}

/// A descriptor table register (GDTR/IDTR).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Linear base.
    pub base: u64,
    /// Limit in bytes minus one.
    pub limit: u16,
}

/// The architectural state a vCPU starts from.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CpuState {
    /// RIP.
    pub rip: u64,
    /// RSP.
    pub rsp: u64,
    /// RSI (Linux boot protocol: the zero page).
    pub rsi: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CS.
    pub cs: Segment,
    /// DS, ES, FS, GS and SS.
    pub data: Segment,
    /// The task register.
    pub tr: Segment,
    /// GDTR.
    pub gdt: DescriptorTable,
    /// IDTR.
    pub idt: DescriptorTable,
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

/// What a vCPU stopped for.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// The guest read `data.len()` bytes from a port; fill `data`.
    IoIn {
        /// The port.
        port: u16,
        /// Where the result goes.
        data: &'a mut [u8],
    },
    /// The guest wrote `data` to a port.
    IoOut {
        /// The port.
        port: u16,
        /// The bytes written.
        data: &'a [u8],
    },
    /// The guest read from an address with no memory behind it; fill `data`.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Where the result goes.
        data: &'a mut [u8],
    },
    /// The guest wrote to an address with no memory behind it.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// The bytes written.
        data: &'a [u8],
    },
    /// The vCPU halted (only seen without an in-kernel interrupt controller).
    Halt,
    /// The guest shut the machine down (a triple fault on x86).
    Shutdown,
    /// The guest asked for a reset through a hypervisor-handled device.
    Reset,
    /// The run was interrupted by a signal (see `Vcpu::kick`).
    Interrupted,
    /// An application processor the guest has not started yet (bhyve,
    /// where the VMM starts APs): nothing ran; call `run` again, after
    /// checking whether the VM is stopping.
    Idle,
    /// The hypervisor could not emulate an instruction or hit an internal
    /// error.
    InternalError {
        /// The backend's sub-code (KVM: suberror).
        code: u32,
        /// Guest RIP when known.
        rip: Option<u64>,
    },
    /// Entering the guest failed.
    FailEntry {
        /// The backend's failure reason.
        reason: u64,
    },
    /// Anything else; treated as an internal error by the VMM.
    Other(&'static str),
}

/// A virtual machine.
pub trait Vm: Send + Sync {
    /// The backend's vCPU type.
    type Vcpu: Vcpu;

    /// Allocates guest RAM for `ranges` (guest-physical start, size) and
    /// makes it visible to the guest.
    fn create_memory(&self, ranges: &[(u64, usize)]) -> Result<GuestMemoryMmap>;

    /// Maps `len` bytes of host memory at `host` into guest-physical space
    /// at `gpa`, for the guest to read and write directly (no exits), e.g.
    /// a netmap port's region. Both must be page-aligned.
    ///
    /// # Safety
    ///
    /// `[host, host + len)` must be a live, shared, read-write mapping that
    /// stays mapped, and is not repurposed, for as long as the VM exists.
    unsafe fn map_shared_memory(&self, gpa: u64, host: NonNull<u8>, len: usize) -> Result<()>;

    /// A trigger for legacy interrupt line `gsi` (edge, IOAPIC/PIC).
    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn Interrupt>>;

    /// `count` MSI vectors for one device, each disconnected until the
    /// guest programs and unmasks it.
    fn msi_vectors(&self, count: usize) -> Result<Vec<Arc<dyn MsiVector>>>;

    /// Makes guest writes to MMIO address `addr` signal `evt` without
    /// leaving the hypervisor.
    fn register_mmio_notify(&self, addr: u64, evt: &EventFd) -> Result<()>;

    /// Creates vCPU `id` (also its APIC ID) of `count`, ready to start from
    /// `state` if it is the boot CPU; application processors wait for
    /// INIT/SIPI.
    fn create_vcpu(&self, id: u8, count: u8, state: &CpuState) -> Result<Self::Vcpu>;
}

/// A virtual CPU, run from one thread.
pub trait Vcpu: Send {
    /// Runs the vCPU until the next exit the VMM must handle.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
}

#[cfg(test)]
mod tests {
    use super::Backend;

    #[test]
    fn backends_parse_and_default_to_the_native_one() {
        assert_eq!("kvm".parse::<Backend>(), Ok(Backend::Kvm));
        assert_eq!("bhyve".parse::<Backend>(), Ok(Backend::Bhyve));
        assert!("xen".parse::<Backend>().is_err());
        let native = if cfg!(target_os = "freebsd") {
            Backend::Bhyve
        } else {
            Backend::Kvm
        };
        assert_eq!(Backend::native(), native);
    }
}
