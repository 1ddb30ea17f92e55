//! A scripted stand-in for vmm.ko's `/dev/vmm/NAME`, so that tests run the
//! bhyve backend (its ioctls, exits, completions and vCPU threads) on any
//! OS. Each vCPU gets a script of `struct vm_exit` images that `VM_RUN`
//! returns in order; register, descriptor, capability and activation
//! ioctls act on a model of the vCPUs and are logged, so a test can check
//! what nmvm did and in which order.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::Mutex;
use std::time::Duration;

use super::abi::{self, SegDesc, VmExitBuf, VmReg};
use super::VmmDevice;

/// One ioctl the fake saw, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `VM_SET_CAPABILITY` (vCPU, capability, value).
    SetCapability(i32, i32, i32),
    /// `VM_SET_REGISTER` (vCPU, register number, value).
    SetRegister(i32, i32, u64),
    /// `VM_ACTIVATE_CPU`.
    Activate(i32),
    /// `VM_RUN` that returned an exit.
    Run(i32),
    /// `VM_ISA_PULSE_IRQ` / `VM_IOAPIC_PULSE_IRQ` (the IOAPIC pin).
    Pulse(i32),
    /// `VM_LAPIC_MSI` (address, data).
    Msi(u64, u64),
    /// `VM_SUSPEND`.
    Suspend(i32),
}

#[derive(Default)]
struct Model {
    regs: HashMap<(i32, i32), u64>,
    descs: HashMap<(i32, i32), SegDesc>,
    active: BTreeSet<i32>,
    scripts: HashMap<i32, VecDeque<VmExitBuf>>,
    log: Vec<Call>,
}

/// The fake VM device.
pub struct FakeVmm {
    model: Mutex<Model>,
    memory: File,
}

/// A register number the VMM passed, checked: the fake fails the test on
/// one vmm.ko does not have rather than storing it.
fn reg(n: i32) -> i32 {
    assert!(
        (0..VmReg::Last as i32).contains(&n),
        "register number {n} is not a vm_reg_name"
    );
    n
}

/// The `T` an ioctl argument points at.
///
/// # Safety
///
/// `arg` must point at a live, exclusive `T` (the `VmmDevice::ioctl`
/// contract, for the struct the request encodes).
unsafe fn arg_as<'a, T>(arg: *mut u8, len: usize) -> &'a mut T {
    assert_eq!(len, std::mem::size_of::<T>(), "argument size");
    // SAFETY: the caller's contract; the size was checked above.
    unsafe { &mut *arg.cast::<T>() }
}

impl FakeVmm {
    /// A VM whose vCPU `n` returns the exits of `scripts[n]`, in order,
    /// and then waits (VM_RUN fails with EINTR, as a signal would make it).
    pub fn new(scripts: Vec<Vec<VmExitBuf>>) -> Self {
        // SAFETY: memfd_create takes a NUL-terminated name; the result is
        // checked and owned by the File.
        let fd = unsafe { libc::memfd_create(c"nmvm-fake-vmm".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let memory = unsafe { File::from_raw_fd(fd) };
        let model = Model {
            scripts: scripts
                .into_iter()
                .enumerate()
                .map(|(i, s)| (i as i32, s.into()))
                .collect(),
            ..Model::default()
        };
        Self {
            model: Mutex::new(model),
            memory,
        }
    }

    /// Every call so far.
    pub fn log(&self) -> Vec<Call> {
        self.model.lock().unwrap().log.clone()
    }

    /// A register of a vCPU (0 if never written).
    pub fn register(&self, cpu: i32, r: VmReg) -> u64 {
        let m = self.model.lock().unwrap();
        m.regs.get(&(cpu, r as i32)).copied().unwrap_or(0)
    }

    /// A segment or table descriptor of a vCPU.
    pub fn descriptor(&self, cpu: i32, r: VmReg) -> Option<SegDesc> {
        self.model
            .lock()
            .unwrap()
            .descs
            .get(&(cpu, r as i32))
            .copied()
    }

    fn run(&self, run: &mut abi::VmRun) -> io::Result<()> {
        let next = {
            let mut m = self.model.lock().unwrap();
            if !m.active.contains(&run.cpuid) {
                // vmm.ko refuses to run a vCPU that is not active.
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let next = m.scripts.get_mut(&run.cpuid).and_then(VecDeque::pop_front);
            if next.is_some() {
                m.log.push(Call::Run(run.cpuid));
            }
            next
        };
        let Some(exit) = next else {
            std::thread::sleep(Duration::from_millis(1));
            return Err(io::Error::from_raw_os_error(libc::EINTR));
        };
        // SAFETY: VM_RUN's contract: `vm_exit` points at a buffer of at
        // least `struct vm_exit`'s size, alive for the call.
        unsafe {
            std::ptr::copy_nonoverlapping(
                exit.0.as_ptr(),
                run.vm_exit as *mut u8,
                abi::VM_EXIT_SIZE,
            )
        };
        Ok(())
    }
}

impl VmmDevice for FakeVmm {
    unsafe fn ioctl(&self, req: u32, arg: *mut u8, len: usize) -> io::Result<()> {
        // SAFETY: for every `arg_as` below, the caller passes the struct
        // that `req` takes (the `VmmDevice::ioctl` contract), and `arg_as`
        // checks its size.
        unsafe {
            match req {
                abi::VM_RUN => return self.run(arg_as(arg, len)),
                abi::VM_MMAP_MEMSEG => {
                    let map: &mut abi::VmMemmap = arg_as(arg, len);
                    let end = map.gpa + map.len;
                    if self.memory.metadata()?.len() < end {
                        self.memory.set_len(end)?;
                    }
                    return Ok(());
                }
                _ => {}
            }
            let mut m = self.model.lock().unwrap();
            match req {
                abi::VM_ALLOC_MEMSEG | abi::VM_SET_X2APIC_STATE => {}
                abi::VM_SET_CAPABILITY => {
                    let c: &mut abi::VmCapability = arg_as(arg, len);
                    m.log
                        .push(Call::SetCapability(c.cpuid, c.captype, c.capval));
                }
                abi::VM_SET_REGISTER => {
                    let r: &mut abi::VmRegister = arg_as(arg, len);
                    let name = reg(r.regnum);
                    m.regs.insert((r.cpuid, name), r.regval);
                    m.log.push(Call::SetRegister(r.cpuid, name, r.regval));
                }
                abi::VM_GET_REGISTER => {
                    let r: &mut abi::VmRegister = arg_as(arg, len);
                    r.regval = m.regs.get(&(r.cpuid, reg(r.regnum))).copied().unwrap_or(0);
                }
                abi::VM_SET_SEGMENT_DESCRIPTOR => {
                    let d: &mut abi::VmSegDesc = arg_as(arg, len);
                    m.descs.insert((d.cpuid, reg(d.regnum)), d.desc);
                }
                abi::VM_ACTIVATE_CPU => {
                    let a: &mut abi::VmActivateCpu = arg_as(arg, len);
                    if !m.active.insert(a.vcpuid) {
                        return Err(io::Error::from_raw_os_error(libc::EBUSY));
                    }
                    m.log.push(Call::Activate(a.vcpuid));
                }
                abi::VM_ISA_PULSE_IRQ => {
                    let i: &mut abi::VmIsaIrq = arg_as(arg, len);
                    m.log.push(Call::Pulse(i.ioapic_irq));
                }
                abi::VM_IOAPIC_PULSE_IRQ => {
                    let i: &mut abi::VmIoapicIrq = arg_as(arg, len);
                    m.log.push(Call::Pulse(i.irq));
                }
                abi::VM_LAPIC_MSI => {
                    let msi: &mut abi::VmLapicMsi = arg_as(arg, len);
                    m.log.push(Call::Msi(msi.addr, msi.msg));
                }
                abi::VM_SUSPEND => {
                    let s: &mut abi::VmSuspend = arg_as(arg, len);
                    m.log.push(Call::Suspend(s.how));
                }
                _ => return Err(io::Error::from_raw_os_error(libc::ENOTTY)),
            }
        }
        Ok(())
    }

    fn memory_file(&self) -> io::Result<File> {
        self.memory.try_clone()
    }
}
