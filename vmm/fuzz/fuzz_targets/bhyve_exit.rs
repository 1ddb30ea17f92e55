//! bhyve's exits as nmvm handles them: an arbitrary `struct vm_exit` image
//! (the instruction bytes of an MMIO exit come from guest memory, so the
//! guest chooses them) and arbitrary register contents, through
//! `handle_exit` and the completion of the access it asks for. Refusals
//! are fine; a panic, an access size outside what x86 can do, or a write
//! to a register other than the one the instruction names is not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nmvm::hypervisor::bhyve::abi::{VmExitBuf, VmReg, VM_EXIT_SIZE};
use nmvm::hypervisor::bhyve::exit::{
    complete_io_in, complete_mmio_read, handle_exit, ExitError, Registers, Step,
};

/// Registers filled from the input; writes are recorded.
struct Regs {
    seed: u64,
    writes: Vec<VmReg>,
}

impl Registers for Regs {
    fn get(&mut self, reg: VmReg) -> Result<u64, ExitError> {
        Ok(self.seed.rotate_left(reg as u32))
    }
    fn set(&mut self, reg: VmReg, _value: u64) -> Result<(), ExitError> {
        self.writes.push(reg);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut exit = VmExitBuf::default();
    let n = data.len().min(VM_EXIT_SIZE);
    exit.0[..n].copy_from_slice(&data[..n]);
    let mut tail = [0u8; 16];
    let rest = &data[n..];
    tail[..rest.len().min(16)].copy_from_slice(&rest[..rest.len().min(16)]);
    let seed = u64::from_le_bytes(tail[..8].try_into().unwrap());
    let loaded = u64::from_le_bytes(tail[8..].try_into().unwrap());
    let mut regs = Regs {
        seed,
        writes: Vec::new(),
    };
    let Ok(step) = handle_exit(&exit.0[..VM_EXIT_SIZE], &mut regs) else {
        return;
    };
    let before = regs.writes.len();
    match step {
        Step::IoIn { size, .. } => {
            assert!(matches!(size, 1 | 2 | 4), "{step:?}");
            complete_io_in(size, loaded as u32, &mut regs).unwrap();
            assert_eq!(&regs.writes[before..], &[VmReg::Rax]);
        }
        Step::IoOut { size, .. } => assert!(matches!(size, 1 | 2 | 4), "{step:?}"),
        Step::MmioRead { insn, .. } => {
            assert!(matches!(insn.size, 1 | 2 | 4 | 8), "{step:?}");
            assert!((1..=15).contains(&insn.len), "{step:?}");
            complete_mmio_read(&insn, loaded, &mut regs).unwrap();
            assert!(regs.writes.len() - before <= 1, "{step:?}: {:?}", regs.writes);
        }
        Step::MmioWrite { size, .. } => assert!(matches!(size, 1 | 2 | 4 | 8), "{step:?}"),
        _ => {}
    }
});
