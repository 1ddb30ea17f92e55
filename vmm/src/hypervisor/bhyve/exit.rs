//! What a `struct vm_exit` asks of the VMM, as a pure function of the exit
//! bytes and a register accessor, so tests drive it with recorded exits and
//! fake registers on any OS.
//!
//! The kernel has already advanced RIP past port I/O and past MMIO
//! instructions it decoded itself (`nextrip = rip + inst_length`); nmvm
//! only moves RIP when the kernel could not decode (`vie.decoded == 0`).

use log::debug;
use thiserror::Error;

use super::abi::{cpu_mode, exit_off as off, exitcode, VmReg, VIE_INST_SIZE};
use super::decode::{self, DecodeError, MmioInsn, MmioOp, Part};

/// Errors while handling an exit.
#[derive(Debug, Error)]
pub enum ExitError {
    /// Reading or writing a guest register failed.
    #[error("{op} of guest register {reg:?} failed: {source}")]
    Register {
        /// VM_GET_REGISTER or VM_SET_REGISTER.
        op: &'static str,
        /// Which register.
        reg: VmReg,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The MMIO instruction cannot be emulated.
    #[error("MMIO at {gpa:#x} from rip {rip:#x}: {source}")]
    Mmio {
        /// Guest-physical address.
        gpa: u64,
        /// Guest RIP.
        rip: u64,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// The exit buffer is shorter than `struct vm_exit`.
    #[error("exit structure of {0} bytes is too short")]
    Short(usize),
}

/// Guest register access for one vCPU.
pub trait Registers {
    /// Reads a register.
    fn get(&mut self, reg: VmReg) -> Result<u64, ExitError>;
    /// Writes a register.
    fn set(&mut self, reg: VmReg, value: u64) -> Result<(), ExitError>;
}

/// What the VMM must do for an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A port read of `size` bytes; complete it with [`complete_io_in`].
    IoIn {
        /// Port.
        port: u16,
        /// 1, 2 or 4.
        size: usize,
    },
    /// A port write.
    IoOut {
        /// Port.
        port: u16,
        /// 1, 2 or 4.
        size: usize,
        /// The value (low `size` bytes).
        value: u32,
    },
    /// An MMIO load; complete it with [`complete_mmio_read`].
    MmioRead {
        /// Guest-physical address.
        gpa: u64,
        /// The decoded instruction.
        insn: MmioInsn,
    },
    /// An MMIO store.
    MmioWrite {
        /// Guest-physical address.
        gpa: u64,
        /// Bytes.
        size: usize,
        /// The value (low `size` bytes).
        value: u64,
    },
    /// The VM was suspended (`enum vm_suspend_how`).
    Suspended(i32),
    /// A HLT that reached userspace.
    Halt,
    /// The guest sent a STARTUP IPI to `vcpu`, which vmm.ko leaves to the
    /// VMM to start in real mode at `rip` (the SIPI vector's page).
    SpinupAp {
        /// The application processor.
        vcpu: i32,
        /// Its start address (a page boundary below 1 MiB).
        rip: u64,
    },
    /// Nothing for the VMM to do (a signal or an idle request).
    Interrupted,
    /// Handled here (e.g. an unknown MSR); enter the guest again.
    Resume,
    /// An exit nmvm does not handle.
    Unhandled {
        /// `enum vm_exitcode`.
        exitcode: u32,
        /// Guest RIP.
        rip: u64,
    },
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | u64::from(u32_at(b, at + 4)) << 32
}

/// The code size (16, 32 or 64) of the instruction behind an INST_EMUL
/// exit.
fn bitness(exit: &[u8]) -> u32 {
    match u32_at(exit, off::EMUL_CPU_MODE) as i32 {
        cpu_mode::MODE_64BIT => 64,
        cpu_mode::REAL => 16,
        _ if u32_at(exit, off::EMUL_CS_D) != 0 => 32,
        _ => 16,
    }
}

/// Turns the exit in `exit` (a `struct vm_exit` image) into a [`Step`],
/// reading the source register of an MMIO store and answering unknown
/// MSRs through `regs`.
pub fn handle_exit(exit: &[u8], regs: &mut impl Registers) -> Result<Step, ExitError> {
    if exit.len() < super::abi::VM_EXIT_SIZE {
        return Err(ExitError::Short(exit.len()));
    }
    let code = u32_at(exit, off::EXITCODE);
    let rip = u64_at(exit, off::RIP);
    Ok(match code {
        exitcode::INOUT => {
            let bits = exit[off::INOUT_BITS];
            let size = usize::from(bits & 7);
            let (is_in, string, rep) = (bits & 8 != 0, bits & 0x10 != 0, bits & 0x20 != 0);
            if string || rep || !matches!(size, 1 | 2 | 4) {
                return Ok(Step::Unhandled {
                    exitcode: code,
                    rip,
                });
            }
            let port = u16_at(exit, off::INOUT_PORT);
            if is_in {
                Step::IoIn { port, size }
            } else {
                let mask = if size == 4 {
                    u32::MAX
                } else {
                    (1 << (size * 8)) - 1
                };
                Step::IoOut {
                    port,
                    size,
                    value: u32_at(exit, off::INOUT_EAX) & mask,
                }
            }
        }
        exitcode::INST_EMUL => {
            let gpa = u64_at(exit, off::EMUL_GPA);
            let valid = usize::from(exit[off::VIE_NUM_VALID]).min(VIE_INST_SIZE);
            let bytes = &exit[off::VIE_INST..off::VIE_INST + valid];
            let insn = decode::decode(bytes, bitness(exit)).map_err(|source| ExitError::Mmio {
                gpa,
                rip,
                source,
            })?;
            if exit[off::VIE_DECODED] == 0 {
                // The kernel did not decode, so it did not move RIP.
                regs.set(VmReg::Rip, rip.wrapping_add(insn.len as u64))?;
            }
            match insn.op {
                MmioOp::Read { .. } => Step::MmioRead { gpa, insn },
                MmioOp::WriteReg(src) => Step::MmioWrite {
                    gpa,
                    size: insn.size,
                    value: decode::store_value(&insn, regs.get(src.reg)?),
                },
                MmioOp::WriteImm(_) => Step::MmioWrite {
                    gpa,
                    size: insn.size,
                    value: decode::store_value(&insn, 0),
                },
            }
        }
        exitcode::SUSPENDED => Step::Suspended(u32_at(exit, off::SUSPENDED_HOW) as i32),
        exitcode::BOGUS | exitcode::REQIDLE => Step::Interrupted,
        exitcode::HLT => Step::Halt,
        exitcode::SPINUP_AP => Step::SpinupAp {
            vcpu: u32_at(exit, off::SPINUP_VCPU) as i32,
            rip: u64_at(exit, off::SPINUP_RIP),
        },
        exitcode::RDMSR => {
            // As bhyve without strict MSRs: an unknown MSR reads as 0 (the
            // kernel moves RIP past RDMSR).
            debug!("rdmsr {:#x} at {rip:#x}: 0", u32_at(exit, off::MSR_CODE));
            regs.set(VmReg::Rax, 0)?;
            regs.set(VmReg::Rdx, 0)?;
            Step::Resume
        }
        exitcode::WRMSR => {
            debug!(
                "wrmsr {:#x} = {:#x} at {rip:#x}: ignored",
                u32_at(exit, off::MSR_CODE),
                u64_at(exit, off::MSR_WVAL)
            );
            Step::Resume
        }
        _ => Step::Unhandled {
            exitcode: code,
            rip,
        },
    })
}

/// Completes a port read of `size` bytes with `value`: IN AL/AX keeps the
/// rest of RAX, IN EAX zero-extends.
pub fn complete_io_in(size: usize, value: u32, regs: &mut impl Registers) -> Result<(), ExitError> {
    let part = match size {
        1 => Part::Low8,
        2 => Part::W16,
        _ => Part::D32,
    };
    let old = if part == Part::D32 {
        0
    } else {
        regs.get(VmReg::Rax)?
    };
    regs.set(VmReg::Rax, part.merge(old, u64::from(value)))
}

/// Completes an MMIO load with `loaded` (the bytes the device returned,
/// little-endian): writes the destination register with MOV/MOVZX/MOVSX
/// width rules.
pub fn complete_mmio_read(
    insn: &MmioInsn,
    loaded: u64,
    regs: &mut impl Registers,
) -> Result<(), ExitError> {
    let MmioOp::Read { dest, .. } = insn.op else {
        return Ok(());
    };
    let old = match dest.part {
        Part::D32 | Part::Q64 => 0,
        _ => regs.get(dest.reg)?,
    };
    if let Some((reg, value)) = decode::load_result(insn, old, loaded) {
        regs.set(reg, value)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::abi::{suspend, VmExitBuf};
    use super::*;
    use std::collections::HashMap;

    /// Registers in a map, with a log of writes.
    #[derive(Default)]
    pub(crate) struct FakeRegs {
        pub regs: HashMap<VmReg, u64>,
        pub writes: Vec<(VmReg, u64)>,
    }

    impl Registers for FakeRegs {
        fn get(&mut self, reg: VmReg) -> Result<u64, ExitError> {
            Ok(self.regs.get(&reg).copied().unwrap_or(0))
        }
        fn set(&mut self, reg: VmReg, value: u64) -> Result<(), ExitError> {
            self.regs.insert(reg, value);
            self.writes.push((reg, value));
            Ok(())
        }
    }

    /// A `struct vm_exit` image built at the reference offsets.
    pub(crate) struct Image(pub VmExitBuf);

    impl Image {
        pub fn new(code: u32, inst_length: i32, rip: u64) -> Self {
            let mut i = Image(VmExitBuf::default());
            i.put(off::EXITCODE, &code.to_le_bytes());
            i.put(off::INST_LENGTH, &inst_length.to_le_bytes());
            i.put(off::RIP, &rip.to_le_bytes());
            i
        }
        pub fn put(&mut self, at: usize, bytes: &[u8]) -> &mut Self {
            self.0 .0[at..at + bytes.len()].copy_from_slice(bytes);
            self
        }
        pub fn inout(rip: u64, is_in: bool, size: u8, port: u16, eax: u32) -> Self {
            let mut i = Self::new(exitcode::INOUT, 1, rip);
            i.put(off::INOUT_BITS, &[size | if is_in { 8 } else { 0 }]);
            i.put(off::INOUT_PORT, &port.to_le_bytes());
            i.put(off::INOUT_EAX, &eax.to_le_bytes());
            i
        }
        pub fn mmio(rip: u64, gpa: u64, inst: &[u8], decoded: bool) -> Self {
            let mut i = Self::new(exitcode::INST_EMUL, inst.len() as i32, rip);
            i.put(off::EMUL_GPA, &gpa.to_le_bytes());
            i.put(off::EMUL_CS_D, &0i32.to_le_bytes());
            i.put(off::EMUL_CPU_MODE, &cpu_mode::MODE_64BIT.to_le_bytes());
            i.put(off::VIE_INST, inst);
            i.put(off::VIE_NUM_VALID, &[inst.len() as u8]);
            i.put(off::VIE_NUM_PROCESSED, &[inst.len() as u8]);
            i.put(off::VIE_DECODED, &[u8::from(decoded)]);
            i
        }
        pub fn bytes(&self) -> &[u8] {
            &self.0 .0
        }
    }

    #[test]
    fn port_out_and_in_with_register_completion() {
        let mut regs = FakeRegs::default();
        // outb(0x3f8, 'A') with garbage above AL in EAX.
        let step = handle_exit(
            Image::inout(0x1000, false, 1, 0x3f8, 0x1234_5641).bytes(),
            &mut regs,
        );
        assert_eq!(
            step.unwrap(),
            Step::IoOut {
                port: 0x3f8,
                size: 1,
                value: 0x41
            }
        );
        // outw
        let step = handle_exit(
            Image::inout(0x1000, false, 2, 0xcfc, 0xffff_beef).bytes(),
            &mut regs,
        );
        assert_eq!(
            step.unwrap(),
            Step::IoOut {
                port: 0xcfc,
                size: 2,
                value: 0xbeef
            }
        );
        assert!(regs.writes.is_empty(), "port writes touch no register");

        // inb(0x3fd): AL replaced, the rest of RAX kept.
        regs.regs.insert(VmReg::Rax, 0xaaaa_bbbb_cccc_dddd);
        let step = handle_exit(Image::inout(0x1000, true, 1, 0x3fd, 0).bytes(), &mut regs).unwrap();
        assert_eq!(
            step,
            Step::IoIn {
                port: 0x3fd,
                size: 1
            }
        );
        complete_io_in(1, 0x60, &mut regs).unwrap();
        assert_eq!(regs.regs[&VmReg::Rax], 0xaaaa_bbbb_cccc_dd60);
        complete_io_in(2, 0x1234, &mut regs).unwrap();
        assert_eq!(regs.regs[&VmReg::Rax], 0xaaaa_bbbb_cccc_1234);
        // inl zero-extends.
        complete_io_in(4, 0xcafe_f00d, &mut regs).unwrap();
        assert_eq!(regs.regs[&VmReg::Rax], 0xcafe_f00d);
        // RIP was never written: the kernel advances it for port I/O.
        assert!(regs.writes.iter().all(|(r, _)| *r == VmReg::Rax));
    }

    #[test]
    fn string_port_io_is_not_handled() {
        let mut i = Image::inout(0x2000, false, 1, 0x3f8, 0);
        i.put(off::INOUT_BITS, &[1 | 0x10 | 0x20]);
        let step = handle_exit(i.bytes(), &mut FakeRegs::default()).unwrap();
        assert_eq!(
            step,
            Step::Unhandled {
                exitcode: exitcode::INOUT,
                rip: 0x2000
            }
        );
    }

    #[test]
    fn mmio_write_takes_the_source_register() {
        let mut regs = FakeRegs::default();
        regs.regs.insert(VmReg::Rcx, 0x1111_2222_3333_4444);
        // mov [rax+0x3000], cx  (a virtio notify write)
        let img = Image::mmio(
            0x5000,
            0xc000_3000,
            &[0x66, 0x89, 0x88, 0x00, 0x30, 0, 0],
            true,
        );
        let step = handle_exit(img.bytes(), &mut regs).unwrap();
        assert_eq!(
            step,
            Step::MmioWrite {
                gpa: 0xc000_3000,
                size: 2,
                value: 0x4444
            }
        );
        assert!(
            regs.writes.is_empty(),
            "decoded by the kernel: RIP untouched"
        );
        // mov dword [rdi], 0x80000001
        let img = Image::mmio(0x5000, 0xc000_0014, &[0xc7, 0x07, 1, 0, 0, 0x80], true);
        let step = handle_exit(img.bytes(), &mut regs).unwrap();
        assert_eq!(
            step,
            Step::MmioWrite {
                gpa: 0xc000_0014,
                size: 4,
                value: 0x8000_0001
            }
        );
    }

    #[test]
    fn mmio_read_completes_through_the_destination_register() {
        let mut regs = FakeRegs::default();
        regs.regs.insert(VmReg::Rbx, u64::MAX);
        // mov bl, [rsi]
        let img = Image::mmio(0x6000, 0xc000_0014, &[0x8a, 0x1e], true);
        let Step::MmioRead { gpa, insn } = handle_exit(img.bytes(), &mut regs).unwrap() else {
            panic!("not a read");
        };
        assert_eq!((gpa, insn.size), (0xc000_0014, 1));
        complete_mmio_read(&insn, 0x0f, &mut regs).unwrap();
        assert_eq!(regs.regs[&VmReg::Rbx], 0xffff_ffff_ffff_ff0f);
        // mov r10d, [rsi]: zero-extends, no read of the old value needed.
        let img = Image::mmio(0x6000, 0xc000_0000, &[0x44, 0x8b, 0x16], true);
        let Step::MmioRead { insn, .. } = handle_exit(img.bytes(), &mut regs).unwrap() else {
            panic!("not a read");
        };
        regs.regs.insert(VmReg::R10, u64::MAX);
        complete_mmio_read(&insn, 0x1af4_1041, &mut regs).unwrap();
        assert_eq!(regs.regs[&VmReg::R10], 0x1af4_1041);
        assert!(!regs.writes.iter().any(|(r, _)| *r == VmReg::Rip));
    }

    #[test]
    fn undecoded_mmio_moves_rip() {
        let mut regs = FakeRegs::default();
        // The kernel failed to decode: nmvm advances RIP by the length.
        let img = Image::mmio(0x7000, 0xc000_0000, &[0x48, 0x8b, 0x47, 0x08], false);
        handle_exit(img.bytes(), &mut regs).unwrap();
        assert_eq!(regs.writes, vec![(VmReg::Rip, 0x7004)]);
    }

    #[test]
    fn mmio_32_bit_code_uses_cs_d() {
        let mut img = Image::mmio(0x7000, 0xfec0_0000, &[0x8b, 0x07], true);
        img.put(off::EMUL_CPU_MODE, &cpu_mode::PROTECTED.to_le_bytes());
        img.put(off::EMUL_CS_D, &1i32.to_le_bytes());
        let Step::MmioRead { insn, .. } =
            handle_exit(img.bytes(), &mut FakeRegs::default()).unwrap()
        else {
            panic!("not a read");
        };
        assert_eq!(insn.size, 4);
        img.put(off::EMUL_CS_D, &0i32.to_le_bytes());
        let Step::MmioRead { insn, .. } =
            handle_exit(img.bytes(), &mut FakeRegs::default()).unwrap()
        else {
            panic!("not a read");
        };
        assert_eq!(insn.size, 2);
    }

    #[test]
    fn unsupported_mmio_is_an_error() {
        // add [rdi], eax
        let img = Image::mmio(0x8000, 0xc000_0000, &[0x01, 0x07], true);
        let err = handle_exit(img.bytes(), &mut FakeRegs::default()).unwrap_err();
        assert!(err.to_string().contains("Add"), "{err}");
        // No instruction bytes at all.
        let img = Image::mmio(0x8000, 0xc000_0000, &[], true);
        assert!(handle_exit(img.bytes(), &mut FakeRegs::default()).is_err());
    }

    #[test]
    fn suspend_and_retry_exits() {
        let mut regs = FakeRegs::default();
        for how in [
            suspend::RESET,
            suspend::POWEROFF,
            suspend::HALT,
            suspend::TRIPLEFAULT,
        ] {
            let mut img = Image::new(exitcode::SUSPENDED, 0, 0x100);
            img.put(off::SUSPENDED_HOW, &how.to_le_bytes());
            assert_eq!(
                handle_exit(img.bytes(), &mut regs).unwrap(),
                Step::Suspended(how)
            );
        }
        for code in [exitcode::BOGUS, exitcode::REQIDLE] {
            let img = Image::new(code, 0, 0x100);
            assert_eq!(
                handle_exit(img.bytes(), &mut regs).unwrap(),
                Step::Interrupted
            );
        }
        let mut img = Image::new(exitcode::SPINUP_AP, 0, 0x100);
        img.put(off::SPINUP_VCPU, &3i32.to_le_bytes())
            .put(off::SPINUP_RIP, &0x9_f000u64.to_le_bytes());
        assert_eq!(
            handle_exit(img.bytes(), &mut regs).unwrap(),
            Step::SpinupAp {
                vcpu: 3,
                rip: 0x9_f000
            }
        );
        let img = Image::new(exitcode::TASK_SWITCH, 0, 0x100);
        assert_eq!(
            handle_exit(img.bytes(), &mut regs).unwrap(),
            Step::Unhandled {
                exitcode: exitcode::TASK_SWITCH,
                rip: 0x100
            }
        );
        assert!(matches!(
            handle_exit(&[0u8; 64], &mut regs),
            Err(ExitError::Short(64))
        ));
    }

    #[test]
    fn unknown_msrs_read_zero() {
        let mut regs = FakeRegs::default();
        regs.regs.insert(VmReg::Rax, 5);
        regs.regs.insert(VmReg::Rdx, 6);
        let mut img = Image::new(exitcode::RDMSR, 2, 0x100);
        img.put(off::MSR_CODE, &0x1a0u32.to_le_bytes());
        assert_eq!(handle_exit(img.bytes(), &mut regs).unwrap(), Step::Resume);
        assert_eq!((regs.regs[&VmReg::Rax], regs.regs[&VmReg::Rdx]), (0, 0));
        let img = Image::new(exitcode::WRMSR, 2, 0x100);
        assert_eq!(handle_exit(img.bytes(), &mut regs).unwrap(), Step::Resume);
    }
}
