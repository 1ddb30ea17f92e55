//! Decoding the guest instruction behind an MMIO exit, and applying its
//! result to registers with x86's width rules.
//!
//! bhyve reports an MMIO access as the instruction bytes plus the
//! guest-physical address; the VMM finds the access width, the source of a
//! write and the destination of a read itself. nmvm decodes with iced-x86
//! (decoder only) and emulates the MOV family that device drivers use for
//! registers: `MOV` (88/89/8A/8B/C6/C7/A0–A3), `MOVZX` and `MOVSX`
//! (0F B6/B7/BE/BF) and `MOVSXD` (63).

use iced_x86::{Decoder, DecoderOptions, MemorySize, Mnemonic, OpKind, Register};
use thiserror::Error;

use super::abi::VmReg;

/// Why an MMIO instruction cannot be emulated.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes are not a complete, valid instruction.
    #[error("undecodable instruction bytes {0:02x?}")]
    Invalid(Vec<u8>),
    /// A valid instruction nmvm does not emulate on MMIO.
    #[error("MMIO through {0:?} is not emulated")]
    Unsupported(Mnemonic),
    /// An operand nmvm does not handle (e.g. a segment or vector register).
    #[error("MMIO instruction with an unsupported operand {0:?}")]
    Operand(Register),
}

/// Which bits of a general-purpose register an operand names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Bits 0–7 (AL, R8B, SIL with REX…).
    Low8,
    /// Bits 8–15 (AH, CH, DH, BH without REX).
    High8,
    /// Bits 0–15.
    W16,
    /// Bits 0–31 (a write zero-extends to 64 bits).
    D32,
    /// All 64 bits.
    Q64,
}

impl Part {
    /// Width in bytes.
    pub fn size(self) -> usize {
        match self {
            Part::Low8 | Part::High8 => 1,
            Part::W16 => 2,
            Part::D32 => 4,
            Part::Q64 => 8,
        }
    }

    /// The operand's value within the full register value `full`.
    pub fn extract(self, full: u64) -> u64 {
        match self {
            Part::Low8 => full & 0xff,
            Part::High8 => (full >> 8) & 0xff,
            Part::W16 => full & 0xffff,
            Part::D32 => full & 0xffff_ffff,
            Part::Q64 => full,
        }
    }

    /// The full register after writing `value` to this part of `old`:
    /// 8- and 16-bit writes keep the other bits, a 32-bit write
    /// zero-extends, a 64-bit write replaces.
    pub fn merge(self, old: u64, value: u64) -> u64 {
        match self {
            Part::Low8 => (old & !0xff) | (value & 0xff),
            Part::High8 => (old & !0xff00) | ((value & 0xff) << 8),
            Part::W16 => (old & !0xffff) | (value & 0xffff),
            Part::D32 => value & 0xffff_ffff,
            Part::Q64 => value,
        }
    }
}

/// A general-purpose register operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpOperand {
    /// The 64-bit register.
    pub reg: VmReg,
    /// Which bits.
    pub part: Part,
}

/// How a loaded value widens into its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extend {
    /// Same width (MOV).
    None,
    /// MOVZX.
    Zero,
    /// MOVSX/MOVSXD.
    Sign,
}

/// What the instruction does with the MMIO location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioOp {
    /// Loads `size` bytes into `dest`.
    Read {
        /// Destination register.
        dest: GpOperand,
        /// Widening.
        extend: Extend,
    },
    /// Stores the low `size` bytes of a register.
    WriteReg(GpOperand),
    /// Stores the low `size` bytes of an immediate.
    WriteImm(u64),
}

/// A decoded MMIO instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioInsn {
    /// The operation.
    pub op: MmioOp,
    /// Bytes accessed in memory (1, 2, 4 or 8).
    pub size: usize,
    /// Instruction length in bytes.
    pub len: usize,
}

/// Every general-purpose register name as (register, 64-bit register, part).
/// Written out instead of using iced-x86's `instr_info` tables, which this
/// one lookup does not justify.
const GPRS: [(Register, VmReg, Part); 68] = {
    use Part::*;
    use Register as R;
    use VmReg as V;
    [
        (R::AL, V::Rax, Low8),
        (R::CL, V::Rcx, Low8),
        (R::DL, V::Rdx, Low8),
        (R::BL, V::Rbx, Low8),
        (R::AH, V::Rax, High8),
        (R::CH, V::Rcx, High8),
        (R::DH, V::Rdx, High8),
        (R::BH, V::Rbx, High8),
        (R::SPL, V::Rsp, Low8),
        (R::BPL, V::Rbp, Low8),
        (R::SIL, V::Rsi, Low8),
        (R::DIL, V::Rdi, Low8),
        (R::R8L, V::R8, Low8),
        (R::R9L, V::R9, Low8),
        (R::R10L, V::R10, Low8),
        (R::R11L, V::R11, Low8),
        (R::R12L, V::R12, Low8),
        (R::R13L, V::R13, Low8),
        (R::R14L, V::R14, Low8),
        (R::R15L, V::R15, Low8),
        (R::AX, V::Rax, W16),
        (R::CX, V::Rcx, W16),
        (R::DX, V::Rdx, W16),
        (R::BX, V::Rbx, W16),
        (R::SP, V::Rsp, W16),
        (R::BP, V::Rbp, W16),
        (R::SI, V::Rsi, W16),
        (R::DI, V::Rdi, W16),
        (R::R8W, V::R8, W16),
        (R::R9W, V::R9, W16),
        (R::R10W, V::R10, W16),
        (R::R11W, V::R11, W16),
        (R::R12W, V::R12, W16),
        (R::R13W, V::R13, W16),
        (R::R14W, V::R14, W16),
        (R::R15W, V::R15, W16),
        (R::EAX, V::Rax, D32),
        (R::ECX, V::Rcx, D32),
        (R::EDX, V::Rdx, D32),
        (R::EBX, V::Rbx, D32),
        (R::ESP, V::Rsp, D32),
        (R::EBP, V::Rbp, D32),
        (R::ESI, V::Rsi, D32),
        (R::EDI, V::Rdi, D32),
        (R::R8D, V::R8, D32),
        (R::R9D, V::R9, D32),
        (R::R10D, V::R10, D32),
        (R::R11D, V::R11, D32),
        (R::R12D, V::R12, D32),
        (R::R13D, V::R13, D32),
        (R::R14D, V::R14, D32),
        (R::R15D, V::R15, D32),
        (R::RAX, V::Rax, Q64),
        (R::RCX, V::Rcx, Q64),
        (R::RDX, V::Rdx, Q64),
        (R::RBX, V::Rbx, Q64),
        (R::RSP, V::Rsp, Q64),
        (R::RBP, V::Rbp, Q64),
        (R::RSI, V::Rsi, Q64),
        (R::RDI, V::Rdi, Q64),
        (R::R8, V::R8, Q64),
        (R::R9, V::R9, Q64),
        (R::R10, V::R10, Q64),
        (R::R11, V::R11, Q64),
        (R::R12, V::R12, Q64),
        (R::R13, V::R13, Q64),
        (R::R14, V::R14, Q64),
        (R::R15, V::R15, Q64),
    ]
};

fn gp_operand(r: Register) -> Result<GpOperand, DecodeError> {
    GPRS.iter()
        .find(|(name, _, _)| *name == r)
        .map(|&(_, reg, part)| GpOperand { reg, part })
        .ok_or(DecodeError::Operand(r))
}

/// Bytes of an integer memory operand.
fn memory_bytes(m: MemorySize) -> Option<usize> {
    match m {
        MemorySize::UInt8 | MemorySize::Int8 => Some(1),
        MemorySize::UInt16 | MemorySize::Int16 => Some(2),
        MemorySize::UInt32 | MemorySize::Int32 => Some(4),
        MemorySize::UInt64 | MemorySize::Int64 => Some(8),
        _ => None,
    }
}

/// Decodes the instruction at the start of `bytes`, executed with a code
/// size of `bitness` (16, 32 or 64), that accessed MMIO.
pub fn decode(bytes: &[u8], bitness: u32) -> Result<MmioInsn, DecodeError> {
    let invalid = || DecodeError::Invalid(bytes.to_vec());
    let mut decoder = Decoder::new(bitness, bytes, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(invalid());
    }
    let size = memory_bytes(insn.memory_size()).ok_or(DecodeError::Unsupported(insn.mnemonic()))?;
    let extend = match insn.mnemonic() {
        Mnemonic::Mov => Extend::None,
        Mnemonic::Movzx => Extend::Zero,
        Mnemonic::Movsx | Mnemonic::Movsxd => Extend::Sign,
        m => return Err(DecodeError::Unsupported(m)),
    };
    if insn.op_count() != 2 {
        return Err(DecodeError::Unsupported(insn.mnemonic()));
    }
    let op = match (insn.op0_kind(), insn.op1_kind()) {
        (OpKind::Register, OpKind::Memory) => MmioOp::Read {
            dest: gp_operand(insn.op0_register())?,
            extend,
        },
        (OpKind::Memory, OpKind::Register) if extend == Extend::None => {
            MmioOp::WriteReg(gp_operand(insn.op1_register())?)
        }
        (
            OpKind::Memory,
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate32to64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64,
        ) if extend == Extend::None => MmioOp::WriteImm(insn.immediate(1)),
        _ => return Err(DecodeError::Unsupported(insn.mnemonic())),
    };
    Ok(MmioInsn {
        op,
        size,
        len: insn.len(),
    })
}

fn mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// The value a store writes to memory: the low `size` bytes of the source.
pub fn store_value(insn: &MmioInsn, source_full: u64) -> u64 {
    match insn.op {
        MmioOp::WriteReg(src) => src.part.extract(source_full) & mask(insn.size),
        MmioOp::WriteImm(imm) => imm & mask(insn.size),
        MmioOp::Read { .. } => 0,
    }
}

/// The destination register's new value after a load of `loaded` (the
/// `insn.size` bytes read from the device) into a register that held `old`.
pub fn load_result(insn: &MmioInsn, old: u64, loaded: u64) -> Option<(VmReg, u64)> {
    let MmioOp::Read { dest, extend } = insn.op else {
        return None;
    };
    let raw = loaded & mask(insn.size);
    let widened = match extend {
        Extend::None | Extend::Zero => raw,
        Extend::Sign => {
            let shift = 64 - 8 * insn.size as u32;
            (((raw << shift) as i64) >> shift) as u64
        }
    };
    Some((
        dest.reg,
        dest.part.merge(old, widened & mask(dest.part.size())),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d64(bytes: &[u8]) -> MmioInsn {
        decode(bytes, 64).unwrap()
    }

    fn read(bytes: &[u8], bitness: u32, old: u64, loaded: u64) -> (VmReg, u64) {
        let insn = decode(bytes, bitness).unwrap();
        load_result(&insn, old, loaded).unwrap()
    }

    const OLD: u64 = 0x1122_3344_5566_7788;

    #[test]
    fn mov_loads_in_every_width() {
        // mov al, [rdi]
        assert_eq!(
            read(&[0x8a, 0x07], 64, OLD, 0xab),
            (VmReg::Rax, 0x1122_3344_5566_77ab)
        );
        // mov ax, [rdi]
        assert_eq!(
            read(&[0x66, 0x8b, 0x07], 64, OLD, 0xbeef),
            (VmReg::Rax, 0x1122_3344_5566_beef)
        );
        // mov eax, [rdi]: a 32-bit write zero-extends.
        assert_eq!(
            read(&[0x8b, 0x07], 64, OLD, 0xdead_beef),
            (VmReg::Rax, 0xdead_beef)
        );
        // mov rax, [rdi]
        assert_eq!(
            read(&[0x48, 0x8b, 0x07], 64, OLD, 0x0102_0304_0506_0708),
            (VmReg::Rax, 0x0102_0304_0506_0708)
        );
        // mov r9d, [rdi+0x10]
        assert_eq!(read(&[0x44, 0x8b, 0x4f, 0x10], 64, OLD, 7), (VmReg::R9, 7));
        // mov eax, [abs moffs] (A1 with a 64-bit address)
        let insn = d64(&[0xa1, 0, 0, 0, 0xfe, 0, 0, 0, 0]);
        assert_eq!((insn.size, insn.len), (4, 9));
    }

    #[test]
    fn high_byte_registers_without_rex() {
        // mov ah, [rdi]; mov bh, [rdi]: bits 8..15, the rest kept.
        assert_eq!(
            read(&[0x8a, 0x27], 64, OLD, 0xcd),
            (VmReg::Rax, 0x1122_3344_5566_cd88)
        );
        assert_eq!(
            read(&[0x8a, 0x3f], 64, OLD, 0xcd),
            (VmReg::Rbx, 0x1122_3344_5566_cd88)
        );
        // With a REX prefix the same ModRM names SPL/DIL: low byte.
        assert_eq!(
            read(&[0x40, 0x8a, 0x27], 64, OLD, 0xcd),
            (VmReg::Rsp, 0x1122_3344_5566_77cd)
        );
        assert_eq!(
            read(&[0x40, 0x8a, 0x3f], 64, OLD, 0xcd),
            (VmReg::Rdi, 0x1122_3344_5566_77cd)
        );
        // mov [rdi], ch stores bits 8..15 of RCX.
        let insn = d64(&[0x88, 0x2f]);
        assert_eq!(insn.size, 1);
        assert_eq!(store_value(&insn, 0xaabb), 0xaa);
    }

    #[test]
    fn movzx_and_movsx() {
        // movzx eax, byte [rdi]
        assert_eq!(read(&[0x0f, 0xb6, 0x07], 64, OLD, 0xf0), (VmReg::Rax, 0xf0));
        // movzx ax, byte [rdi]: 16-bit destination keeps bits 16..63.
        assert_eq!(
            read(&[0x66, 0x0f, 0xb6, 0x07], 64, OLD, 0xf0),
            (VmReg::Rax, 0x1122_3344_5566_00f0)
        );
        // movzx rax, word [rdi]
        assert_eq!(
            read(&[0x48, 0x0f, 0xb7, 0x07], 64, OLD, 0x8001),
            (VmReg::Rax, 0x8001)
        );
        // movsx eax, byte [rdi]: sign-extended to 32, zero above.
        assert_eq!(
            read(&[0x0f, 0xbe, 0x07], 64, OLD, 0x80),
            (VmReg::Rax, 0xffff_ff80)
        );
        // movsx rax, word [rdi]
        assert_eq!(
            read(&[0x48, 0x0f, 0xbf, 0x07], 64, OLD, 0x8000),
            (VmReg::Rax, 0xffff_ffff_ffff_8000)
        );
        // movsx cx, byte [rdi]
        assert_eq!(
            read(&[0x66, 0x0f, 0xbe, 0x0f], 64, OLD, 0xff),
            (VmReg::Rcx, 0x1122_3344_5566_ffff)
        );
        // movsxd rdx, dword [rdi]
        assert_eq!(
            read(&[0x48, 0x63, 0x17], 64, OLD, 0x8000_0000),
            (VmReg::Rdx, 0xffff_ffff_8000_0000)
        );
        // A positive value stays positive.
        assert_eq!(read(&[0x0f, 0xbe, 0x07], 64, OLD, 0x7f), (VmReg::Rax, 0x7f));
    }

    #[test]
    fn stores_from_registers_in_every_width() {
        let full = 0x8877_6655_4433_2211;
        for (bytes, size, value) in [
            (&[0x88u8, 0x07][..], 1, 0x11),            // mov [rdi], al
            (&[0x66, 0x89, 0x07][..], 2, 0x2211),      // mov [rdi], ax
            (&[0x89, 0x07][..], 4, 0x4433_2211),       // mov [rdi], eax
            (&[0x48, 0x89, 0x07][..], 8, full),        // mov [rdi], rax
            (&[0x44, 0x89, 0x07][..], 4, 0x4433_2211), // mov [rdi], r8d
        ] {
            let insn = d64(bytes);
            assert_eq!((insn.size, insn.len), (size, bytes.len()), "{bytes:02x?}");
            assert_eq!(store_value(&insn, full), value, "{bytes:02x?}");
        }
        assert_eq!(
            d64(&[0x44, 0x89, 0x07]).op,
            MmioOp::WriteReg(GpOperand {
                reg: VmReg::R8,
                part: Part::D32
            })
        );
    }

    #[test]
    fn stores_of_immediates() {
        // mov byte [rdi], 0x5a
        let insn = d64(&[0xc6, 0x07, 0x5a]);
        assert_eq!((insn.size, store_value(&insn, 0)), (1, 0x5a));
        // mov word [rdi+4], 0x1234
        let insn = d64(&[0x66, 0xc7, 0x47, 0x04, 0x34, 0x12]);
        assert_eq!((insn.size, insn.len, store_value(&insn, 0)), (2, 6, 0x1234));
        // mov dword [rdi], 0x80000000
        let insn = d64(&[0xc7, 0x07, 0, 0, 0, 0x80]);
        assert_eq!((insn.size, store_value(&insn, 0)), (4, 0x8000_0000));
        // mov qword [rdi], -1 (imm32 sign-extended to 64)
        let insn = d64(&[0x48, 0xc7, 0x07, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!((insn.size, store_value(&insn, 0)), (8, u64::MAX));
    }

    #[test]
    fn code_size_follows_the_cpu_mode() {
        // 8B 07 is mov eax,[edi] in 32-bit code and mov ax,[bx] in 16-bit code.
        assert_eq!(decode(&[0x8b, 0x07], 32).unwrap().size, 4);
        assert_eq!(decode(&[0x8b, 0x07], 16).unwrap().size, 2);
        // 48 is DEC EAX outside 64-bit mode, not REX.W: no memory access.
        assert!(decode(&[0x48, 0x8b, 0x07], 32).is_err());
    }

    #[test]
    fn other_instructions_are_refused() {
        // add [rdi], eax
        assert_eq!(
            decode(&[0x01, 0x07], 64),
            Err(DecodeError::Unsupported(Mnemonic::Add))
        );
        // movss xmm0, [rdi]: not a general-purpose register.
        assert!(decode(&[0xf3, 0x0f, 0x10, 0x07], 64).is_err());
        // Truncated and empty input.
        assert!(matches!(
            decode(&[0x48, 0x8b], 64),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(decode(&[], 64), Err(DecodeError::Invalid(_))));
        // mov rax, rbx has no memory operand.
        assert!(decode(&[0x48, 0x89, 0xd8], 64).is_err());
    }
}
