//! The vmm(4) ABI of FreeBSD/amd64 (LP64): ioctl numbers, argument structs,
//! register, capability, suspend and exit numbers, and the layout of
//! `struct vm_exit`.
//!
//! Everything here is plain data and compiles on every OS, so the tests at
//! the bottom (sizes, offsets, ioctl values from
//! `shared/reference/bhyve-vmm-and-pvm.md`, Part A) run in Linux CI too.

use std::mem::size_of;

/// vmm(4)'s requests are in FreeBSD's encoding on every OS nmvm builds for.
pub use nmvm_devices::ioctl::freebsd::{io, ior, iow, iowr};

/// The ioctl group of `/dev/vmm/NAME`.
pub const VMM_GROUP: u8 = b'v';
/// The ioctl group of `/dev/vmmctl`.
pub const VMMCTL_GROUP: u8 = b'V';

/// `VM_MAX_NAMELEN`: SPECNAMELEN (255) - 10 - 15 - 1.
pub const VM_MAX_NAMELEN: usize = 229;
/// `VMMCTL_CREATE_DESTROY_ON_CLOSE`.
pub const VMMCTL_CREATE_DESTROY_ON_CLOSE: u32 = 0x1;

/// `struct vmmctl_vm_create`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VmmctlVmCreate {
    /// NUL-terminated VM name.
    pub name: [u8; VM_MAX_NAMELEN + 1],
    /// `VMMCTL_CREATE_*` flags (in `reserved[0]` on kernels that predate
    /// them, which then refuse a non-zero value with EINVAL).
    pub flags: u32,
    /// Must be zero.
    pub reserved: [i32; 15],
}

/// `struct vmmctl_vm_destroy`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VmmctlVmDestroy {
    /// NUL-terminated VM name.
    pub name: [u8; VM_MAX_NAMELEN + 1],
    /// Must be zero.
    pub reserved: [i32; 16],
}

/// Copies `name` into a NUL-terminated name field, or `None` if it is too
/// long or contains a NUL or a slash.
pub fn vm_name(name: &str) -> Option<[u8; VM_MAX_NAMELEN + 1]> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() > VM_MAX_NAMELEN
        || bytes.iter().any(|&b| b == 0 || b == b'/')
    {
        return None;
    }
    let mut out = [0u8; VM_MAX_NAMELEN + 1];
    out[..bytes.len()].copy_from_slice(bytes);
    Some(out)
}

impl VmmctlVmCreate {
    /// A create request for `name` with `flags`.
    pub fn new(name: [u8; VM_MAX_NAMELEN + 1], flags: u32) -> Self {
        Self {
            name,
            flags,
            reserved: [0; 15],
        }
    }
}

impl VmmctlVmDestroy {
    /// A destroy request for `name`.
    pub fn new(name: [u8; VM_MAX_NAMELEN + 1]) -> Self {
        Self {
            name,
            reserved: [0; 16],
        }
    }
}

/// `struct vm_run` (pointers carried as integers).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VmRun {
    /// vCPU id.
    pub cpuid: i32,
    /// `cpuset_t *` the kernel fills on IPI exits.
    pub cpuset: u64,
    /// Bytes at `cpuset`.
    pub cpusetsize: u64,
    /// `struct vm_exit *` the kernel fills.
    pub vm_exit: u64,
}

/// `struct vm_capability`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VmCapability {
    /// vCPU id.
    pub cpuid: i32,
    /// `enum vm_cap_type`.
    pub captype: i32,
    /// The value.
    pub capval: i32,
    /// Apply to all vCPUs.
    pub allcpus: i32,
}

/// `struct vm_suspend`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VmSuspend {
    /// `enum vm_suspend_how`.
    pub how: i32,
}

/// `struct vm_memseg` of FreeBSD 15 (with NUMA domain fields).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VmMemseg {
    /// Segment id (`VM_SYSMEM` for RAM).
    pub segid: i32,
    /// Length in bytes.
    pub len: u64,
    /// Name; empty for system memory.
    pub name: [u8; 16],
    /// `domainset_t *` (NULL).
    pub ds_mask: u64,
    /// Bytes at `ds_mask` (0).
    pub ds_mask_size: u64,
    /// Domain policy (0).
    pub ds_policy: i32,
}

/// `struct vm_memseg` of FreeBSD 14 and earlier.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VmMemseg14 {
    /// Segment id.
    pub segid: i32,
    /// Length in bytes.
    pub len: u64,
    /// Name; empty for system memory.
    pub name: [u8; 16],
}

/// `struct vm_memmap`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VmMemmap {
    /// Guest-physical address.
    pub gpa: u64,
    /// Segment id.
    pub segid: i32,
    /// Offset into the segment.
    pub segoff: i64,
    /// Length in bytes.
    pub len: u64,
    /// `PROT_*` for the guest.
    pub prot: i32,
    /// `VM_MEMMAP_F_*`.
    pub flags: i32,
}

/// `struct vm_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VmRegister {
    /// vCPU id.
    pub cpuid: i32,
    /// `enum vm_reg_name`.
    pub regnum: i32,
    /// The value.
    pub regval: u64,
}

/// `struct seg_desc`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SegDesc {
    /// Base address.
    pub base: u64,
    /// Limit in bytes.
    pub limit: u32,
    /// VT-x access rights (bit 16: unusable).
    pub access: u32,
}

/// `struct vm_seg_desc`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VmSegDesc {
    /// vCPU id.
    pub cpuid: i32,
    /// `enum vm_reg_name` of the segment or table register.
    pub regnum: i32,
    /// The descriptor.
    pub desc: SegDesc,
}

/// `struct vm_lapic_msi` (the message comes first).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VmLapicMsi {
    /// MSI data.
    pub msg: u64,
    /// MSI address.
    pub addr: u64,
}

/// `struct vm_isa_irq`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VmIsaIrq {
    /// 8259 pin.
    pub atpic_irq: i32,
    /// IOAPIC pin, or -1 for none.
    pub ioapic_irq: i32,
}

/// `struct vm_activate_cpu`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VmActivateCpu {
    /// vCPU id.
    pub vcpuid: i32,
}

/// `struct vm_x2apic`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VmX2apic {
    /// vCPU id.
    pub cpuid: i32,
    /// `X2APIC_DISABLED` (0) or `X2APIC_ENABLED` (1).
    pub state: i32,
}

/// `struct vm_ioapic_irq`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VmIoapicIrq {
    /// IOAPIC pin.
    pub irq: i32,
}

/// `X2APIC_DISABLED`.
pub const X2APIC_DISABLED: i32 = 0;

/// `VMMCTL_VM_CREATE`.
pub const VMMCTL_VM_CREATE: u32 = iowr(VMMCTL_GROUP, 0, size_of::<VmmctlVmCreate>());
/// `VMMCTL_VM_DESTROY`.
pub const VMMCTL_VM_DESTROY: u32 = iowr(VMMCTL_GROUP, 1, size_of::<VmmctlVmDestroy>());
/// `VM_RUN`.
pub const VM_RUN: u32 = iow(VMM_GROUP, 1, size_of::<VmRun>());
/// `VM_SET_CAPABILITY`.
pub const VM_SET_CAPABILITY: u32 = iow(VMM_GROUP, 2, size_of::<VmCapability>());
/// `VM_GET_CAPABILITY`.
pub const VM_GET_CAPABILITY: u32 = iowr(VMM_GROUP, 3, size_of::<VmCapability>());
/// `VM_SUSPEND`.
pub const VM_SUSPEND: u32 = iow(VMM_GROUP, 4, size_of::<VmSuspend>());
/// `VM_REINIT`.
pub const VM_REINIT: u32 = io(VMM_GROUP, 5);
/// `VM_ALLOC_MEMSEG` (FreeBSD 15 struct).
pub const VM_ALLOC_MEMSEG: u32 = iow(VMM_GROUP, 14, size_of::<VmMemseg>());
/// `VM_ALLOC_MEMSEG` (FreeBSD 14 struct).
pub const VM_ALLOC_MEMSEG_14: u32 = iow(VMM_GROUP, 14, size_of::<VmMemseg14>());
/// `VM_GET_MEMSEG`.
pub const VM_GET_MEMSEG: u32 = iowr(VMM_GROUP, 15, size_of::<VmMemseg>());
/// `VM_MMAP_MEMSEG`.
pub const VM_MMAP_MEMSEG: u32 = iow(VMM_GROUP, 16, size_of::<VmMemmap>());
/// `VM_SET_REGISTER`.
pub const VM_SET_REGISTER: u32 = iow(VMM_GROUP, 20, size_of::<VmRegister>());
/// `VM_GET_REGISTER`.
pub const VM_GET_REGISTER: u32 = iowr(VMM_GROUP, 21, size_of::<VmRegister>());
/// `VM_SET_SEGMENT_DESCRIPTOR`.
pub const VM_SET_SEGMENT_DESCRIPTOR: u32 = iow(VMM_GROUP, 22, size_of::<VmSegDesc>());
/// `VM_GET_SEGMENT_DESCRIPTOR`.
pub const VM_GET_SEGMENT_DESCRIPTOR: u32 = iowr(VMM_GROUP, 23, size_of::<VmSegDesc>());
/// `VM_LAPIC_MSI`.
pub const VM_LAPIC_MSI: u32 = iow(VMM_GROUP, 36, size_of::<VmLapicMsi>());
/// `VM_IOAPIC_PULSE_IRQ`.
pub const VM_IOAPIC_PULSE_IRQ: u32 = iow(VMM_GROUP, 35, size_of::<VmIoapicIrq>());
/// `VM_SET_X2APIC_STATE`.
pub const VM_SET_X2APIC_STATE: u32 = iow(VMM_GROUP, 60, size_of::<VmX2apic>());
/// `VM_ISA_ASSERT_IRQ`.
pub const VM_ISA_ASSERT_IRQ: u32 = iow(VMM_GROUP, 80, size_of::<VmIsaIrq>());
/// `VM_ISA_PULSE_IRQ`.
pub const VM_ISA_PULSE_IRQ: u32 = iow(VMM_GROUP, 82, size_of::<VmIsaIrq>());
/// `VM_ACTIVATE_CPU`.
pub const VM_ACTIVATE_CPU: u32 = iow(VMM_GROUP, 90, size_of::<VmActivateCpu>());

/// `VM_SYSMEM`: the segment id of guest RAM.
pub const VM_SYSMEM: i32 = 0;
/// `VM_MEMMAP_F_WIRED`.
pub const VM_MEMMAP_F_WIRED: i32 = 1;
/// Guest protection for RAM: `PROT_READ | PROT_WRITE | PROT_EXEC` as
/// FreeBSD numbers them.
pub const PROT_ALL: i32 = 0x1 | 0x2 | 0x4;

/// `enum vm_reg_name`.
#[allow(missing_docs)]
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmReg {
    Rax = 0,
    Rbx = 1,
    Rcx = 2,
    Rdx = 3,
    Rsi = 4,
    Rdi = 5,
    Rbp = 6,
    R8 = 7,
    R9 = 8,
    R10 = 9,
    R11 = 10,
    R12 = 11,
    R13 = 12,
    R14 = 13,
    R15 = 14,
    Cr0 = 15,
    Cr3 = 16,
    Cr4 = 17,
    Dr7 = 18,
    Rsp = 19,
    Rip = 20,
    Rflags = 21,
    Es = 22,
    Cs = 23,
    Ss = 24,
    Ds = 25,
    Fs = 26,
    Gs = 27,
    Ldtr = 28,
    Tr = 29,
    Idtr = 30,
    Gdtr = 31,
    Efer = 32,
    Cr2 = 33,
    Pdpte0 = 34,
    Pdpte1 = 35,
    Pdpte2 = 36,
    Pdpte3 = 37,
    IntrShadow = 38,
    Dr0 = 39,
    Dr1 = 40,
    Dr2 = 41,
    Dr3 = 42,
    Dr6 = 43,
    EntryInstLength = 44,
    FsBase = 45,
    GsBase = 46,
    KgsBase = 47,
    Tpr = 48,
    Last = 49,
}

/// `enum vm_cap_type` values nmvm uses.
pub mod cap {
    /// `VM_CAP_HALT_EXIT`.
    pub const HALT_EXIT: i32 = 0;
    /// `VM_CAP_UNRESTRICTED_GUEST`.
    pub const UNRESTRICTED_GUEST: i32 = 3;
    /// `VM_CAP_ENABLE_INVPCID`.
    pub const ENABLE_INVPCID: i32 = 4;
    /// `VM_CAP_IPI_EXIT`.
    pub const IPI_EXIT: i32 = 8;
}

/// `enum vm_suspend_how`.
pub mod suspend {
    /// `VM_SUSPEND_NONE`.
    pub const NONE: i32 = 0;
    /// `VM_SUSPEND_RESET`.
    pub const RESET: i32 = 1;
    /// `VM_SUSPEND_POWEROFF`.
    pub const POWEROFF: i32 = 2;
    /// `VM_SUSPEND_HALT`.
    pub const HALT: i32 = 3;
    /// `VM_SUSPEND_TRIPLEFAULT`.
    pub const TRIPLEFAULT: i32 = 4;
}

/// `enum vm_exitcode`.
#[allow(missing_docs)]
pub mod exitcode {
    pub const INOUT: u32 = 0;
    pub const VMX: u32 = 1;
    pub const BOGUS: u32 = 2;
    pub const RDMSR: u32 = 3;
    pub const WRMSR: u32 = 4;
    pub const HLT: u32 = 5;
    pub const MTRAP: u32 = 6;
    pub const PAUSE: u32 = 7;
    pub const PAGING: u32 = 8;
    pub const INST_EMUL: u32 = 9;
    pub const SPINUP_AP: u32 = 10;
    pub const RENDEZVOUS: u32 = 12;
    pub const IOAPIC_EOI: u32 = 13;
    pub const SUSPENDED: u32 = 14;
    pub const INOUT_STR: u32 = 15;
    pub const TASK_SWITCH: u32 = 16;
    pub const MONITOR: u32 = 17;
    pub const MWAIT: u32 = 18;
    pub const SVM: u32 = 19;
    pub const REQIDLE: u32 = 20;
    pub const DEBUG: u32 = 21;
    pub const VMINSN: u32 = 22;
    pub const BPT: u32 = 23;
    pub const IPI: u32 = 24;
    pub const DB: u32 = 25;
}

/// `enum vm_cpu_mode` (the order of `vmm.h`; not in the reference sheet's
/// tables, so used only to pick the decoder's code size).
pub mod cpu_mode {
    /// `CPU_MODE_REAL`.
    pub const REAL: i32 = 0;
    /// `CPU_MODE_PROTECTED`.
    pub const PROTECTED: i32 = 1;
    /// `CPU_MODE_COMPATIBILITY`.
    pub const COMPATIBILITY: i32 = 2;
    /// `CPU_MODE_64BIT`.
    pub const MODE_64BIT: i32 = 3;
}

/// `sizeof(struct vm_exit)`.
pub const VM_EXIT_SIZE: usize = 136;

/// Byte offsets into `struct vm_exit`.
pub mod exit_off {
    /// `u32 exitcode`.
    pub const EXITCODE: usize = 0;
    /// `i32 inst_length`.
    pub const INST_LENGTH: usize = 4;
    /// `u64 rip`.
    pub const RIP: usize = 8;
    /// The union.
    pub const UNION: usize = 16;
    /// `inout` bit field: size (0–2), in (3), string (4), rep (5).
    pub const INOUT_BITS: usize = 16;
    /// `inout.port` (u16).
    pub const INOUT_PORT: usize = 18;
    /// `inout.eax` (u32).
    pub const INOUT_EAX: usize = 20;
    /// `inst_emul.gpa` (u64).
    pub const EMUL_GPA: usize = 16;
    /// `inst_emul.gla` (u64).
    pub const EMUL_GLA: usize = 24;
    /// `inst_emul.cs_base` (u64).
    pub const EMUL_CS_BASE: usize = 32;
    /// `inst_emul.cs_d` (int).
    pub const EMUL_CS_D: usize = 40;
    /// `inst_emul.paging` (struct vm_guest_paging).
    pub const EMUL_PAGING: usize = 48;
    /// `paging.cpl` (int).
    pub const EMUL_CPL: usize = 56;
    /// `paging.cpu_mode` (enum).
    pub const EMUL_CPU_MODE: usize = 60;
    /// `inst_emul.vie`.
    pub const VIE: usize = 72;
    /// `vie.inst[15]`.
    pub const VIE_INST: usize = 72;
    /// `vie.num_valid` (u8).
    pub const VIE_NUM_VALID: usize = 87;
    /// `vie.num_processed` (u8).
    pub const VIE_NUM_PROCESSED: usize = 88;
    /// `vie.decoded` (u8).
    pub const VIE_DECODED: usize = 128;
    /// `msr.code` (u32).
    pub const MSR_CODE: usize = 16;
    /// `msr.wval` (u64).
    pub const MSR_WVAL: usize = 24;
    /// `hlt.rflags` (u64).
    pub const HLT_RFLAGS: usize = 16;
    /// `suspended.how` (enum).
    pub const SUSPENDED_HOW: usize = 16;
    /// `ipi.mode` (u32).
    pub const IPI_MODE: usize = 16;
    /// `ipi.vector` (u8; the three bytes after it are padding).
    pub const IPI_VECTOR: usize = 20;
    /// `spinup_ap.vcpu` (int): the processor the guest sent a STARTUP IPI.
    pub const SPINUP_VCPU: usize = 16;
    /// `spinup_ap.rip` (u64): the SIPI vector's page, where it starts.
    pub const SPINUP_RIP: usize = 24;
}

/// `VIE_INST_SIZE`.
pub const VIE_INST_SIZE: usize = 15;

/// A buffer for `struct vm_exit`, larger than today's 136 bytes so a newer
/// kernel with a longer struct cannot write past it.
#[repr(C, align(8))]
#[derive(Clone)]
pub struct VmExitBuf(pub [u8; 256]);

impl Default for VmExitBuf {
    fn default() -> Self {
        Self([0; 256])
    }
}

/// `cpuset_t` on amd64 (`CPU_SETSIZE` 1024 bits).
pub const CPUSET_BYTES: usize = 128;

/// A VT-x access-rights word from a segment description.
pub fn seg_access(s: &super::super::Segment) -> u32 {
    if !s.present {
        return ACCESS_UNUSABLE;
    }
    u32::from(s.type_ & 0xf)
        | u32::from(s.s) << 4
        | u32::from(s.dpl & 3) << 5
        | 1 << 7
        | u32::from(s.l) << 13
        | u32::from(s.db) << 14
        | u32::from(s.g) << 15
}

/// Access-rights bit 16: the segment is unusable.
pub const ACCESS_UNUSABLE: u32 = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of};

    #[test]
    fn ioctl_numbers_match_the_reference() {
        assert_eq!(VMMCTL_VM_CREATE, 0xC128_5600);
        assert_eq!(VMMCTL_VM_DESTROY, 0xC128_5601);
        assert_eq!(VM_RUN, 0x8020_7601);
        assert_eq!(VM_SET_CAPABILITY, 0x8010_7602);
        assert_eq!(VM_GET_CAPABILITY, 0xC010_7603);
        assert_eq!(VM_SUSPEND, 0x8004_7604);
        assert_eq!(VM_REINIT, 0x2000_7605);
        assert_eq!(VM_ALLOC_MEMSEG, 0x8038_760E);
        assert_eq!(VM_ALLOC_MEMSEG_14, 0x8020_760E);
        assert_eq!(VM_GET_MEMSEG, 0xC038_760F);
        assert_eq!(VM_MMAP_MEMSEG, 0x8028_7610);
        assert_eq!(VM_SET_REGISTER, 0x8010_7614);
        assert_eq!(VM_GET_REGISTER, 0xC010_7615);
        assert_eq!(VM_SET_SEGMENT_DESCRIPTOR, 0x8018_7616);
        assert_eq!(VM_GET_SEGMENT_DESCRIPTOR, 0xC018_7617);
        assert_eq!(VM_LAPIC_MSI, 0x8010_7624);
        assert_eq!(VM_IOAPIC_PULSE_IRQ, 0x8004_7623);
        assert_eq!(VM_SET_X2APIC_STATE, 0x8008_763C);
        assert_eq!(VM_ISA_ASSERT_IRQ, 0x8008_7650);
        assert_eq!(VM_ISA_PULSE_IRQ, 0x8008_7652);
        assert_eq!(VM_ACTIVATE_CPU, 0x8004_765A);
    }

    #[test]
    fn struct_sizes_match_the_reference() {
        assert_eq!(size_of::<VmmctlVmCreate>(), 296);
        assert_eq!(size_of::<VmmctlVmDestroy>(), 296);
        assert_eq!(size_of::<VmRun>(), 32);
        assert_eq!(size_of::<VmCapability>(), 16);
        assert_eq!(size_of::<VmSuspend>(), 4);
        assert_eq!(size_of::<VmMemseg>(), 56);
        assert_eq!(size_of::<VmMemseg14>(), 32);
        assert_eq!(size_of::<VmMemmap>(), 40);
        assert_eq!(size_of::<VmRegister>(), 16);
        assert_eq!(size_of::<SegDesc>(), 16);
        assert_eq!(size_of::<VmSegDesc>(), 24);
        assert_eq!(size_of::<VmLapicMsi>(), 16);
        assert_eq!(size_of::<VmIsaIrq>(), 8);
        assert_eq!(size_of::<VmActivateCpu>(), 4);
        assert_eq!(size_of::<VmX2apic>(), 8);
        assert!(size_of::<VmExitBuf>() >= VM_EXIT_SIZE);
        assert_eq!(align_of::<VmExitBuf>(), 8);
    }

    #[test]
    fn field_offsets_match_the_reference() {
        assert_eq!(offset_of!(VmmctlVmCreate, flags), 232);
        assert_eq!(offset_of!(VmmctlVmCreate, reserved), 236);
        assert_eq!(offset_of!(VmmctlVmDestroy, reserved), 232);
        assert_eq!(offset_of!(VmRun, cpuset), 8);
        assert_eq!(offset_of!(VmRun, cpusetsize), 16);
        assert_eq!(offset_of!(VmRun, vm_exit), 24);
        assert_eq!(offset_of!(VmMemseg, len), 8);
        assert_eq!(offset_of!(VmMemseg, name), 16);
        assert_eq!(offset_of!(VmMemseg, ds_mask), 32);
        assert_eq!(offset_of!(VmMemseg, ds_mask_size), 40);
        assert_eq!(offset_of!(VmMemseg, ds_policy), 48);
        assert_eq!(offset_of!(VmMemmap, segid), 8);
        assert_eq!(offset_of!(VmMemmap, segoff), 16);
        assert_eq!(offset_of!(VmMemmap, len), 24);
        assert_eq!(offset_of!(VmMemmap, prot), 32);
        assert_eq!(offset_of!(VmMemmap, flags), 36);
        assert_eq!(offset_of!(VmRegister, regval), 8);
        assert_eq!(offset_of!(VmSegDesc, desc), 8);
        assert_eq!(offset_of!(SegDesc, limit), 8);
        assert_eq!(offset_of!(SegDesc, access), 12);
        // The message comes first.
        assert_eq!(offset_of!(VmLapicMsi, msg), 0);
        assert_eq!(offset_of!(VmLapicMsi, addr), 8);
        assert_eq!(offset_of!(VmIsaIrq, ioapic_irq), 4);
    }

    #[test]
    fn vm_exit_offsets_match_the_reference() {
        use exit_off::*;
        assert_eq!((EXITCODE, INST_LENGTH, RIP, UNION), (0, 4, 8, 16));
        assert_eq!((INOUT_BITS, INOUT_PORT, INOUT_EAX), (16, 18, 20));
        assert_eq!(
            (EMUL_GPA, EMUL_GLA, EMUL_CS_BASE, EMUL_CS_D),
            (16, 24, 32, 40)
        );
        assert_eq!((EMUL_PAGING, VIE), (48, 72));
        assert_eq!(
            (VIE_NUM_VALID, VIE_NUM_PROCESSED, VIE_DECODED),
            (87, 88, 128)
        );
        assert_eq!(VIE_INST + VIE_INST_SIZE, VIE_NUM_VALID);
        // vie is 64 bytes and ends the 136-byte struct.
        assert_eq!(VIE + 64, VM_EXIT_SIZE);
        assert_eq!(
            (MSR_CODE, MSR_WVAL, HLT_RFLAGS, SUSPENDED_HOW),
            (16, 24, 16, 16)
        );
        assert_eq!((IPI_MODE, IPI_VECTOR), (16, 20));
        // struct { int vcpu; uint64_t rip; }: rip is 8-aligned.
        assert_eq!((SPINUP_VCPU, SPINUP_RIP), (16, 24));
    }

    #[test]
    fn register_and_exit_numbers_match_the_reference() {
        let regs = [
            (VmReg::Rax, 0),
            (VmReg::Rbp, 6),
            (VmReg::R8, 7),
            (VmReg::R15, 14),
            (VmReg::Cr0, 15),
            (VmReg::Cr3, 16),
            (VmReg::Cr4, 17),
            (VmReg::Dr7, 18),
            (VmReg::Rsp, 19),
            (VmReg::Rip, 20),
            (VmReg::Rflags, 21),
            (VmReg::Es, 22),
            (VmReg::Cs, 23),
            (VmReg::Ss, 24),
            (VmReg::Ds, 25),
            (VmReg::Fs, 26),
            (VmReg::Gs, 27),
            (VmReg::Ldtr, 28),
            (VmReg::Tr, 29),
            (VmReg::Idtr, 30),
            (VmReg::Gdtr, 31),
            (VmReg::Efer, 32),
            (VmReg::Cr2, 33),
            (VmReg::Pdpte3, 37),
            (VmReg::IntrShadow, 38),
            (VmReg::Dr6, 43),
            (VmReg::EntryInstLength, 44),
            (VmReg::FsBase, 45),
            (VmReg::GsBase, 46),
            (VmReg::KgsBase, 47),
            (VmReg::Tpr, 48),
            (VmReg::Last, 49),
        ];
        for (r, n) in regs {
            assert_eq!(r as i32, n, "{r:?}");
        }
        use exitcode::*;
        let exits = [
            (INOUT, 0),
            (VMX, 1),
            (BOGUS, 2),
            (RDMSR, 3),
            (WRMSR, 4),
            (HLT, 5),
            (INST_EMUL, 9),
            (SPINUP_AP, 10),
            (SUSPENDED, 14),
            (INOUT_STR, 15),
            (REQIDLE, 20),
            (IPI, 24),
            (DB, 25),
        ];
        for (e, n) in exits {
            assert_eq!(e, n);
        }
        assert_eq!(
            (
                suspend::RESET,
                suspend::POWEROFF,
                suspend::HALT,
                suspend::TRIPLEFAULT
            ),
            (1, 2, 3, 4)
        );
        assert_eq!(
            (cap::UNRESTRICTED_GUEST, cap::ENABLE_INVPCID, cap::IPI_EXIT),
            (3, 4, 8)
        );
    }

    #[test]
    fn access_rights_match_libvmmapi_long_mode_values() {
        use crate::hypervisor::Segment;
        let code = Segment {
            type_: 0xb,
            present: true,
            s: true,
            l: true,
            ..Default::default()
        };
        assert_eq!(seg_access(&code), 0x209b);
        let data = Segment {
            type_: 3,
            present: true,
            s: true,
            ..Default::default()
        };
        assert_eq!(seg_access(&data), 0x93);
        let data32 = Segment {
            db: true,
            g: true,
            ..data
        };
        assert_eq!(seg_access(&data32), 0xc093);
        let tss = Segment {
            type_: 0xb,
            present: true,
            ..Default::default()
        };
        assert_eq!(seg_access(&tss), 0x8b);
        assert_eq!(seg_access(&Segment::default()), 0x10000);
    }

    #[test]
    fn names_are_checked() {
        assert!(vm_name("nmvm-1").is_some());
        assert!(vm_name("").is_none());
        assert!(vm_name("a/b").is_none());
        assert!(vm_name(&"x".repeat(VM_MAX_NAMELEN)).is_some());
        assert!(vm_name(&"x".repeat(VM_MAX_NAMELEN + 1)).is_none());
    }
}
