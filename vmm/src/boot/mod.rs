//! Booting a guest through the Linux 64-bit boot protocol: kernel and initrd
//! loading, the zero page with its e820 map, the command line, the MP table
//! and the boot CPU's long-mode state.

pub mod cpu;
pub mod kernel;
pub mod layout;
pub mod mptable;

use std::io::{Read, Seek};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use thiserror::Error;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::hypervisor::CpuState;
use kernel::{KernelError, LoadedKernel};
use layout::{CMDLINE_ADDR, CMDLINE_MAX, MMIO_HOLE_START, MPTABLE_ADDR, ZERO_PAGE_ADDR};

/// Errors from setting up the boot state.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel or initrd could not be loaded.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The command line is unusable.
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The Linux zero page as a plain byte-valued object.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is a packed C struct of integers and arrays of
// integers; every byte pattern is a valid value and it has no padding.
unsafe impl ByteValued for ZeroPage {}

const BOOT_FLAG: u16 = 0xaa55;
const HDRS: u32 = 0x5372_6448;
/// "Undefined" boot loader ID, as the boot protocol asks of unlisted loaders.
const LOADER_UNDEFINED: u8 = 0xff;
/// Alignment an ELF kernel is known to be built for (2 MiB on x86-64 is the
/// minimum; 16 MiB is Linux's default `CONFIG_PHYSICAL_ALIGN`).
const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Highest address an initrd may end at when the header says nothing.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// What to boot.
pub struct BootSpec<'a, K: KernelSource> {
    /// The kernel image.
    pub kernel: &'a mut K,
    /// Its size in bytes.
    pub kernel_len: u64,
    /// The initrd contents, if any.
    pub initrd: Option<&'a [u8]>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// Number of vCPUs (for the MP table).
    pub cpus: u8,
    /// Guest RAM size in bytes.
    pub memory: u64,
}

/// A readable, seekable kernel image.
pub trait KernelSource: Read + Seek + vm_memory::ReadVolatile {}
impl<T: Read + Seek + vm_memory::ReadVolatile> KernelSource for T {}

/// Loads everything into `mem` and returns the boot CPU's state.
pub fn setup<K: KernelSource>(
    mem: &GuestMemoryMmap,
    spec: BootSpec<'_, K>,
) -> Result<CpuState, BootError> {
    let low_end = spec.memory.min(MMIO_HOLE_START);
    let kernel: LoadedKernel = kernel::load(mem, spec.kernel, spec.kernel_len, low_end)?;

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if spec.cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::Cmdline(format!(
            "it is {} bytes long; the limit is {}",
            spec.cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    if !spec.cmdline.trim().is_empty() {
        cmdline
            .insert_str(spec.cmdline)
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    let cstr = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    mem.write_slice(cstr.as_bytes_with_nul(), GuestAddress(CMDLINE_ADDR))?;

    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.kernel_alignment = ELF_KERNEL_ALIGNMENT;
    }
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDRS;
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cstr.as_bytes().len() as u32;

    if let Some(initrd) = spec.initrd {
        let max = match u64::from(params.hdr.initrd_addr_max) {
            0 => DEFAULT_INITRD_ADDR_MAX,
            m => m,
        };
        let limit = low_end.min(max + 1);
        let addr = kernel::initrd_address(initrd.len() as u64, kernel.end, limit)?;
        mem.write_slice(initrd, GuestAddress(addr))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = initrd.len() as u32;
    }

    let map = layout::e820_map(spec.memory);
    for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(ZeroPage(params), GuestAddress(ZERO_PAGE_ADDR))?;

    mem.write_slice(
        &mptable::build(MPTABLE_ADDR, spec.cpus),
        GuestAddress(MPTABLE_ADDR),
    )?;

    Ok(cpu::setup_long_mode(mem, kernel.entry, ZERO_PAGE_ADDR)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// A bzImage with just a header, as `kernel::tests` builds one.
    fn tiny_bzimage() -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512 + 4096];
        img[0x1f1] = 4;
        img[0x1f4..0x1f8].copy_from_slice(&256u32.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 1;
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&0x20_0000u32.to_le_bytes());
        img
    }

    #[test]
    fn bzimage_zero_page_and_entry_state() {
        let size = 64u64 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let img = tiny_bzimage();
        let initrd = vec![7u8; 10_000];
        let st = setup(
            &mem,
            BootSpec {
                kernel: &mut Cursor::new(img.clone()),
                kernel_len: img.len() as u64,
                initrd: Some(&initrd),
                cmdline: "console=ttyS0 marker=xyz",
                cpus: 2,
                memory: size,
            },
        )
        .unwrap();
        // 64-bit boot protocol: entry 0x200 into the protected-mode code,
        // rsi at the zero page, long mode with paging.
        assert_eq!(st.rip, 0x10_0200);
        assert_eq!(st.rsi, ZERO_PAGE_ADDR);
        assert!(st.cs.l);
        assert_ne!(st.cr0 & (1 << 31), 0);
        let zp = ZERO_PAGE_ADDR;
        assert_eq!(read_u32(&mem, zp + 0x202), HDRS);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(zp + 0x210)).unwrap(), 0xff);
        assert_eq!(read_u32(&mem, zp + 0x228), CMDLINE_ADDR as u32);
        assert_eq!(read_u32(&mem, zp + 0x238), 24);
        let mut cl = [0u8; 25];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cl, b"console=ttyS0 marker=xyz\0");
        // The initrd sits page aligned at the top of RAM and is intact.
        let rd = read_u32(&mem, zp + 0x218) as u64;
        assert_eq!(read_u32(&mem, zp + 0x21c), 10_000);
        assert_eq!(rd % 4096, 0);
        assert!(rd + 10_000 <= size && rd + 10_000 + 4096 > size);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(rd + 9_999)).unwrap(), 7);
        // e820: low RAM, the reserved MP-table area, RAM from 1 MiB.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(zp + 0x1e8)).unwrap(), 3);
        let e2_addr: u64 = mem.read_obj(GuestAddress(zp + 0x2d0 + 40)).unwrap();
        let e2_size: u64 = mem.read_obj(GuestAddress(zp + 0x2d0 + 48)).unwrap();
        assert_eq!((e2_addr, e2_addr + e2_size), (0x10_0000, size));
        // The MP table is in place.
        let mut mp = [0u8; 4];
        mem.read_slice(&mut mp, GuestAddress(MPTABLE_ADDR)).unwrap();
        assert_eq!(&mp, b"_MP_");
    }

    #[test]
    fn overlong_command_line_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let img = tiny_bzimage();
        let long = "x".repeat(CMDLINE_MAX);
        let e = setup(
            &mem,
            BootSpec {
                kernel: &mut Cursor::new(img.clone()),
                kernel_len: img.len() as u64,
                initrd: None,
                cmdline: &long,
                cpus: 1,
                memory: 64 << 20,
            },
        );
        assert!(matches!(e, Err(BootError::Cmdline(_))));
    }
}
