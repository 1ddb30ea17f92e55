//! The KVM backend, on kvm-ioctls.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use std::collections::BTreeMap;
use std::sync::Mutex;

use kvm_bindings::{
    kvm_fpu, kvm_irq_routing_entry, kvm_lapic_state, kvm_msr_entry, kvm_pit_config, kvm_regs,
    kvm_segment, kvm_userspace_memory_region, CpuId, KvmIrqRouting, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuExit as KvmExit, VcpuFd, VmFd};
use log::{debug, warn};
use nmvm_devices::pci::msix::{MsiMessage, MsiVector};
use nmvm_devices::Interrupt;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{CpuState, HypervisorError, Result, Segment, VcpuExit};

/// Where KVM's TSS lives on Intel hosts (three pages just below the BIOS
/// area; never RAM in our layout).
const TSS_ADDRESS: usize = 0xfffb_d000;

fn call_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::Call {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// An open `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm` and checks the capabilities nmvm relies on.
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| HypervisorError::Open {
            path: "/dev/kvm",
            source: std::io::Error::from_raw_os_error(e.errno()),
            hint: "nmvm needs KVM: load the kvm module and make /dev/kvm readable and writable by this user",
        })?;
        for (cap, name) in [
            (
                Cap::Irqchip,
                "an in-kernel interrupt controller (KVM_CAP_IRQCHIP)",
            ),
            (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
            (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
            (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
            (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::Unsupported(name));
            }
        }
        Ok(Self { kvm })
    }

    /// The largest vCPU count KVM accepts for one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Creates a VM with an in-kernel IOAPIC/PIC/LAPIC and PIT.
    pub fn create_vm(&self) -> Result<KvmVm> {
        let vm = self.kvm.create_vm().map_err(call_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDRESS)
            .map_err(call_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(call_err("KVM_CREATE_IRQCHIP"))?;
        // A PIT, because Linux calibrates and verifies its LAPIC timer
        // against it and runs without a tick if it is missing.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(call_err("KVM_CREATE_PIT2"))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(call_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_list = self
            .kvm
            .get_msr_index_list()
            .map_err(call_err("KVM_GET_MSR_INDEX_LIST"))?;
        let vm = Arc::new(vm);
        Ok(KvmVm {
            routing: Arc::new(GsiRouting::new(vm.clone())),
            vm,
            supported_cpuid: cpuid,
            supported_msrs: msr_list.as_slice().to_vec(),
            max_memslots: self.kvm.get_nr_memslots(),
            next_slot: AtomicU32::new(0),
        })
    }
}

/// A KVM virtual machine.
pub struct KvmVm {
    vm: Arc<VmFd>,
    routing: Arc<GsiRouting>,
    supported_cpuid: CpuId,
    supported_msrs: Vec<u32>,
    max_memslots: usize,
    /// The next free memory slot number.
    next_slot: AtomicU32,
}

/// An eventfd registered as an irqfd: writing it raises the line in KVM.
struct IrqFdLine {
    evt: EventFd,
    gsi: u32,
}

impl Interrupt for IrqFdLine {
    fn trigger(&self) {
        if let Err(e) = self.evt.write(1) {
            warn!("cannot raise interrupt line {}: {e}", self.gsi);
        }
    }
}

impl KvmVm {
    /// A memory slot number nobody uses yet.
    fn take_slot(&self) -> Result<u32> {
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        if slot as usize >= self.max_memslots {
            return Err(HypervisorError::Unsupported("this many memory slots"));
        }
        Ok(slot)
    }
}

impl super::Vm for KvmVm {
    type Vcpu = KvmVcpu;

    fn create_memory(&self, ranges: &[(u64, usize)]) -> Result<GuestMemoryMmap> {
        if ranges.len() > self.max_memslots {
            return Err(HypervisorError::Unsupported("this many memory slots"));
        }
        let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        let ranges: Vec<_> = ranges.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| HypervisorError::Memory {
            size: total,
            reason: e.to_string(),
        })?;
        for region in mem.iter() {
            let region_desc = kvm_userspace_memory_region {
                slot: self.take_slot()?,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of exactly `memory_size`
            // bytes owned by `mem`, which the caller keeps for as long as the
            // VM runs (the VM struct holds it); KVM only accesses it through
            // the guest.
            unsafe { self.vm.set_user_memory_region(region_desc) }
                .map_err(call_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(mem)
    }

    unsafe fn map_shared_memory(&self, gpa: u64, host: NonNull<u8>, len: usize) -> Result<()> {
        const PAGE: u64 = 4096;
        if gpa % PAGE != 0 || host.as_ptr() as u64 % PAGE != 0 || len as u64 % PAGE != 0 {
            return Err(HypervisorError::Unsupported(
                "shared memory that is not page-aligned",
            ));
        }
        let region_desc = kvm_userspace_memory_region {
            slot: self.take_slot()?,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len as u64,
            userspace_addr: host.as_ptr() as u64,
        };
        // SAFETY: the caller guarantees the mapping stays live and shared
        // for the VM's lifetime (this function's contract); the range is
        // page-aligned (checked above); KVM only accesses it for the guest.
        unsafe { self.vm.set_user_memory_region(region_desc) }
            .map_err(call_err("KVM_SET_USER_MEMORY_REGION"))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn Interrupt>> {
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| {
            HypervisorError::Call {
                op: "eventfd",
                source: e,
            }
        })?;
        self.vm
            .register_irqfd(&evt, gsi)
            .map_err(call_err("KVM_IRQFD"))?;
        Ok(Arc::new(IrqFdLine { evt, gsi }))
    }

    fn msi_vectors(&self, count: usize) -> Result<Vec<Arc<dyn MsiVector>>> {
        let mut vectors: Vec<Arc<dyn MsiVector>> = Vec::with_capacity(count);
        for _ in 0..count {
            let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| {
                HypervisorError::Call {
                    op: "eventfd",
                    source: e,
                }
            })?;
            vectors.push(Arc::new(KvmMsiVector {
                routing: self.routing.clone(),
                gsi: self.routing.allocate_gsi()?,
                evt,
                connected: Mutex::new(false),
            }));
        }
        Ok(vectors)
    }

    fn register_mmio_notify(&self, addr: u64, evt: &EventFd) -> Result<()> {
        self.vm
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(call_err("KVM_IOEVENTFD"))
    }

    fn create_vcpu(&self, id: u8, count: u8, state: &CpuState) -> Result<KvmVcpu> {
        let fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(call_err("KVM_CREATE_VCPU"))?;
        let mut cpuid = self.supported_cpuid.clone();
        normalize_cpuid(cpuid.as_mut_slice(), id, count);
        fd.set_cpuid2(&cpuid).map_err(call_err("KVM_SET_CPUID2"))?;
        set_msrs(&fd, &self.supported_msrs)?;
        set_lapic_lints(&fd)?;
        if id == 0 {
            set_boot_state(&fd, state)?;
        }
        Ok(KvmVcpu { fd })
    }
}

/// GSIs the in-kernel IOAPIC owns; MSI routes are numbered after them.
const IOAPIC_PINS: u32 = 24;
/// KVM's default routing gives ISA interrupts 0–15 to the PICs as well.
const PIC_IRQS: u32 = 16;

/// The VM's interrupt routing table. KVM_SET_GSI_ROUTING replaces the
/// whole table, so the legacy IOAPIC and PIC routes KVM starts with are
/// kept here beside the MSI routes and pushed together.
struct GsiRouting {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
    next_gsi: Mutex<u32>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl GsiRouting {
    fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            msi: Mutex::new(BTreeMap::new()),
            next_gsi: Mutex::new(IOAPIC_PINS),
        }
    }

    fn allocate_gsi(&self) -> Result<u32> {
        let mut next = nmvm_devices::bus::lock(&self.next_gsi);
        let gsi = *next;
        *next = next
            .checked_add(1)
            .ok_or(HypervisorError::Unsupported("this many interrupt routes"))?;
        Ok(gsi)
    }

    /// Sets (or with `None` removes) the MSI route of `gsi` and pushes
    /// the whole table to KVM.
    fn set(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<()> {
        let mut msi = nmvm_devices::bus::lock(&self.msi);
        match msg {
            Some(m) => msi.insert(gsi, m),
            None => msi.remove(&gsi),
        };
        let mut entries = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for irq in 0..PIC_IRQS {
            let chip = if irq < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip_entry(irq, chip, irq % 8));
        }
        for (&gsi, m) in msi.iter() {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.address as u32;
            e.u.msi.address_hi = (m.address >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| HypervisorError::Unsupported("this many interrupt routes"))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(call_err("KVM_SET_GSI_ROUTING"))
    }
}

/// One MSI vector: a GSI routed to the vector's message, and an irqfd on
/// it that the device worker writes.
struct KvmMsiVector {
    routing: Arc<GsiRouting>,
    gsi: u32,
    evt: EventFd,
    connected: Mutex<bool>,
}

impl MsiVector for KvmMsiVector {
    fn set_route(&self, msg: Option<MsiMessage>) {
        let mut connected = nmvm_devices::bus::lock(&self.connected);
        let result = match msg {
            // Route first, then attach the irqfd (older kernels mis-handle
            // an irqfd on a GSI without a route).
            Some(m) => self.routing.set(self.gsi, Some(m)).and_then(|()| {
                if !*connected {
                    self.routing
                        .vm
                        .register_irqfd(&self.evt, self.gsi)
                        .map_err(call_err("KVM_IRQFD"))?;
                    *connected = true;
                }
                Ok(())
            }),
            // Detach the irqfd before removing its route.
            None => {
                let detached = if *connected {
                    self.routing
                        .vm
                        .unregister_irqfd(&self.evt, self.gsi)
                        .map_err(call_err("KVM_IRQFD deassign"))
                } else {
                    Ok(())
                };
                *connected = false;
                detached.and_then(|()| self.routing.set(self.gsi, None))
            }
        };
        if let Err(e) = result {
            warn!("MSI route for GSI {}: {e}", self.gsi);
        }
    }

    fn trigger(&self) {
        if let Err(e) = self.evt.write(1) {
            warn!("cannot raise MSI on GSI {}: {e}", self.gsi);
        }
    }
}

/// A KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
}

impl super::Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        let fd: *mut VcpuFd = &mut self.fd;
        // SAFETY: `fd` points at `self.fd`, which `&mut self` borrows for
        // the whole call. The raw pointer only exists so that the
        // internal-error arm below can read the run area again after the
        // borrowing exit value is dead; that arm returns no borrow of the
        // first access, so the two accesses never overlap (the borrow
        // checker cannot see this across a conditional return).
        let exit = match unsafe { (*fd).run() } {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VcpuExit::Interrupted)
            }
            Err(e) => return Err(call_err("KVM_RUN")(e)),
        };
        Ok(match exit {
            KvmExit::IoIn(port, data) => VcpuExit::IoIn { port, data },
            KvmExit::IoOut(port, data) => VcpuExit::IoOut { port, data },
            KvmExit::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
            KvmExit::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
            KvmExit::Hlt => VcpuExit::Halt,
            KvmExit::Shutdown => VcpuExit::Shutdown,
            KvmExit::Intr => VcpuExit::Interrupted,
            KvmExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_RESET => VcpuExit::Reset,
                KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::Shutdown,
                _ => VcpuExit::Other("an unknown system event"),
            },
            KvmExit::FailEntry(reason, _) => VcpuExit::FailEntry { reason },
            KvmExit::InternalError => {
                // SAFETY: see `fd` above; `exit` holds no borrow in this arm.
                let fd = unsafe { &mut *fd };
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR,
                // so `internal` is the member of the exit union KVM filled.
                let code = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let rip = fd.get_regs().ok().map(|r| r.rip);
                VcpuExit::InternalError { code, rip }
            }
            KvmExit::Exception => VcpuExit::Other("an exception exit"),
            KvmExit::Unknown => VcpuExit::Other("an unknown exit"),
            _ => VcpuExit::Other("an exit nmvm does not handle"),
        })
    }
}

fn to_kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: 0,
        unusable: u8::from(!s.present),
        padding: 0,
    }
}

fn set_boot_state(fd: &VcpuFd, st: &CpuState) -> Result<()> {
    let mut sregs = fd.get_sregs().map_err(call_err("KVM_GET_SREGS"))?;
    sregs.cs = to_kvm_segment(&st.cs);
    let data = to_kvm_segment(&st.data);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = to_kvm_segment(&st.tr);
    sregs.gdt.base = st.gdt.base;
    sregs.gdt.limit = st.gdt.limit;
    sregs.idt.base = st.idt.base;
    sregs.idt.limit = st.idt.limit;
    sregs.cr0 = st.cr0;
    sregs.cr3 = st.cr3;
    sregs.cr4 = st.cr4;
    sregs.efer = st.efer;
    fd.set_sregs(&sregs).map_err(call_err("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: st.rip,
        rsp: st.rsp,
        rbp: st.rsp,
        rsi: st.rsi,
        rflags: st.rflags,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(call_err("KVM_SET_REGS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(call_err("KVM_SET_FPU"))?;
    Ok(())
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// The MSR values a vCPU starts with: system-call entry points cleared (the
/// guest sets its own) and fast string operations on, as firmware leaves it.
fn boot_msrs() -> [(u32, u64); 9] {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_LSTAR, 0),
        (MSR_CSTAR, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
}

fn set_msrs(fd: &VcpuFd, supported: &[u32]) -> Result<()> {
    let entries: Vec<kvm_msr_entry> = boot_msrs()
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs =
        Msrs::from_entries(&entries).map_err(|_| HypervisorError::Unsupported("MSR list"))?;
    let set = fd.set_msrs(&msrs).map_err(call_err("KVM_SET_MSRS"))?;
    if set != entries.len() {
        debug!("KVM accepted {set} of {} boot MSRs", entries.len());
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn set_lapic_lints(fd: &VcpuFd) -> Result<()> {
    let mut lapic: kvm_lapic_state = fd.get_lapic().map_err(call_err("KVM_GET_LAPIC"))?;
    let mut set = |offset: usize, mode: u32| {
        let reg = &mut lapic.regs[offset..offset + 4];
        let old = u32::from_le_bytes([reg[0] as u8, reg[1] as u8, reg[2] as u8, reg[3] as u8]);
        let new = (old & !0x700) | (mode << 8);
        for (dst, b) in reg.iter_mut().zip(new.to_le_bytes()) {
            *dst = b as _;
        }
    };
    // The PIC's output reaches the boot CPU through LINT0 and NMIs through
    // LINT1, as an MP-table machine wires them.
    set(APIC_LVT0, APIC_MODE_EXTINT);
    set(APIC_LVT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic).map_err(call_err("KVM_SET_LAPIC"))
}

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Adjusts KVM's supported CPUID for vCPU `id` of `count`: its APIC ID,
/// the topology (one thread per core, `count` cores in one package), the
/// hypervisor bit, and no performance monitoring or power-management
/// features a VM cannot honour.
pub fn normalize_cpuid(entries: &mut [kvm_bindings::kvm_cpuid_entry2], id: u8, count: u8) {
    let id = u32::from(id);
    let count = u32::from(count.max(1));
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX: APIC ID (31:24), logical processors (23:16), CLFLUSH
                // line size in 8-byte units (15:8).
                e.ebx = (id << 24) | (count << 16) | (8 << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Cores per package minus one in EAX[31:26].
                e.eax = (e.eax & 0x03ff_ffff) | ((count - 1) << 26);
            }
            6 => {
                // No turbo or frequency control inside a VM.
                e.eax &= !0x2;
                e.ecx &= !0x1;
            }
            0xa => {
                // No PMU: KVM's virtual PMU is not part of nmvm's machine.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread), level 1 = core.
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = 32 - count.saturating_sub(1).leading_zeros();
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            _ => {}
        }
    }
}

impl AsRawFd for KvmVm {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.vm.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_carries_apic_id_and_topology() {
        let mut e = [leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1), leaf(0xa, 0)];
        normalize_cpuid(&mut e, 1, 2);
        assert_eq!(e[0].ebx >> 24, 1);
        assert_eq!((e[0].ebx >> 16) & 0xff, 2);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!((e[1].edx, e[1].ebx), (1, 1));
        assert_eq!((e[2].edx, e[2].ebx, e[2].eax), (1, 2, 1));
        assert_eq!((e[3].eax, e[3].edx), (0, 0));
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut e = [leaf(1, 0)];
        normalize_cpuid(&mut e, 0, 1);
        assert_eq!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(e[0].ebx >> 24, 0);
    }
}
