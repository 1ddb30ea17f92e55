//! Loading a kernel image (ELF vmlinux or bzImage) and an initrd.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::layout::HIMEM_START;

/// Errors from loading a kernel image or initrd.
#[derive(Debug, Error)]
pub enum KernelError {
    /// The file could not be read.
    #[error("cannot read {what}: {source}")]
    Io {
        /// Which file.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("not a kernel image: neither an ELF vmlinux (no \\x7fELF magic) nor a bzImage (no \"HdrS\" at offset 0x202)")]
    UnknownFormat,
    /// The image is shorter than its headers say.
    #[error(
        "truncated kernel image: the headers describe {needed} bytes but the file has {actual}"
    )]
    Truncated {
        /// Bytes the headers require.
        needed: u64,
        /// Bytes in the file.
        actual: u64,
    },
    /// An ELF image that is not a 64-bit x86 executable.
    #[error("unsupported ELF kernel: {0}")]
    BadElf(&'static str),
    /// A bzImage too old or not built for 64-bit entry.
    #[error("unsupported bzImage: {0}")]
    BadBzImage(&'static str),
    /// The image does not fit in guest RAM.
    #[error("the kernel needs guest memory up to {needed:#x} but RAM below the MMIO hole ends at {ram_end:#x}; give the VM more --memory")]
    TooBig {
        /// Highest address the kernel occupies.
        needed: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// linux-loader refused the image.
    #[error("cannot load the kernel: {0}")]
    Loader(#[from] linux_loader::loader::Error),
    /// The initrd does not fit.
    #[error("the initrd ({size} bytes) does not fit in guest RAM between the kernel end {kernel_end:#x} and {limit:#x}; give the VM more --memory")]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// End of the kernel.
        kernel_end: u64,
        /// Highest address the initrd may reach.
        limit: u64,
    },
}

/// Result of loading a kernel.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// Entry point of the 64-bit boot protocol.
    pub entry: u64,
    /// First byte after everything the kernel occupies (including the space
    /// a bzImage decompresses into).
    pub end: u64,
    /// The bzImage setup header, to seed the zero page with.
    pub setup_header: Option<setup_header>,
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const HDRS_MAGIC: u32 = 0x5372_6448;
const BZ_HEADER_OFFSET: u64 = 0x1f1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
/// The 64-bit entry point lies 0x200 bytes into the protected-mode code.
const BZ_ENTRY_64: u64 = 0x200;
/// Boot protocol 2.12 introduced `xloadflags`.
const BZ_MIN_VERSION: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> KernelError {
    move |source| KernelError::Io { what, source }
}

fn read_at<F: Read + Seek>(f: &mut F, offset: u64, buf: &mut [u8]) -> Result<bool, KernelError> {
    f.seek(SeekFrom::Start(offset))
        .map_err(io("kernel image"))?;
    match f.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io("kernel image")(e)),
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default())
}

/// Checks an ELF image's headers against the file and RAM before handing it
/// to linux-loader, so that each failure gets its own message.
fn check_elf<F: Read + Seek>(f: &mut F, file_len: u64, ram_end: u64) -> Result<(), KernelError> {
    let mut eh = [0u8; 64];
    if !read_at(f, 0, &mut eh)? {
        return Err(KernelError::Truncated {
            needed: 64,
            actual: file_len,
        });
    }
    if eh[4] != ELFCLASS64 || eh[5] != ELFDATA2LSB || u16_at(&eh, 18) != EM_X86_64 {
        return Err(KernelError::BadElf(
            "not a little-endian 64-bit x86-64 ELF file",
        ));
    }
    let phoff = u64_at(&eh, 32);
    let phentsize = u64::from(u16_at(&eh, 54));
    let phnum = u64::from(u16_at(&eh, 56));
    if phentsize != 56 || phnum == 0 {
        return Err(KernelError::BadElf("no usable program headers"));
    }
    let ph_end = phoff.saturating_add(phentsize * phnum);
    if ph_end > file_len {
        return Err(KernelError::Truncated {
            needed: ph_end,
            actual: file_len,
        });
    }
    let mut phdrs = vec![0u8; (phentsize * phnum) as usize];
    read_at(f, phoff, &mut phdrs)?;
    let mut any_load = false;
    for ph in phdrs.chunks_exact(56) {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        any_load = true;
        let (offset, paddr, filesz, memsz) = (
            u64_at(ph, 8),
            u64_at(ph, 24),
            u64_at(ph, 32),
            u64_at(ph, 40),
        );
        let file_end = offset.saturating_add(filesz);
        if file_end > file_len {
            return Err(KernelError::Truncated {
                needed: file_end,
                actual: file_len,
            });
        }
        let mem_end = paddr.saturating_add(memsz.max(filesz));
        if paddr < HIMEM_START || mem_end > ram_end {
            return Err(KernelError::TooBig {
                needed: mem_end,
                ram_end,
            });
        }
    }
    if !any_load {
        return Err(KernelError::BadElf("no loadable segment"));
    }
    Ok(())
}

/// Loads the kernel in `f` (of `file_len` bytes) into `mem`, whose RAM below
/// the MMIO hole ends at `ram_end`.
pub fn load<F>(
    mem: &GuestMemoryMmap,
    f: &mut F,
    file_len: u64,
    ram_end: u64,
) -> Result<LoadedKernel, KernelError>
where
    F: Read + Seek + vm_memory::ReadVolatile,
{
    let mut magic = [0u8; 4];
    let is_elf = read_at(f, 0, &mut magic)? && magic == ELF_MAGIC;
    let mut hdr = [0u8; 0x80];
    let is_bz = !is_elf
        && read_at(f, BZ_HEADER_OFFSET, &mut hdr)?
        && u32_at(&hdr, 0x202 - 0x1f1) == HDRS_MAGIC;

    if is_elf {
        check_elf(f, file_len, ram_end)?;
        let r = Elf::load(mem, None, f, Some(GuestAddress(HIMEM_START)))?;
        return Ok(LoadedKernel {
            entry: r.kernel_load.0,
            end: r.kernel_end,
            setup_header: None,
        });
    }
    if !is_bz {
        return Err(KernelError::UnknownFormat);
    }

    // Offsets below are relative to 0x1f1, the start of the setup header.
    let setup_sects = match hdr[0] {
        0 => 4,
        n => u64::from(n),
    };
    let syssize = u64::from(u32_at(&hdr, 0x1f4 - 0x1f1));
    let version = u16_at(&hdr, 0x206 - 0x1f1);
    let xloadflags = u16_at(&hdr, 0x236 - 0x1f1);
    let init_size = u64::from(u32_at(&hdr, 0x260 - 0x1f1));
    let needed = (setup_sects + 1) * 512 + syssize * 16;
    if needed > file_len {
        return Err(KernelError::Truncated {
            needed,
            actual: file_len,
        });
    }
    if version < BZ_MIN_VERSION || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(KernelError::BadBzImage(
            "it does not support the 64-bit boot protocol (needs boot protocol 2.12 and XLF_KERNEL_64)",
        ));
    }
    let end = HIMEM_START + init_size.max(file_len);
    if end > ram_end {
        return Err(KernelError::TooBig {
            needed: end,
            ram_end,
        });
    }
    let r = BzImage::load(mem, None, f, Some(GuestAddress(HIMEM_START)))?;
    Ok(LoadedKernel {
        entry: r.kernel_load.0 + BZ_ENTRY_64,
        end: end.max(r.kernel_end),
        setup_header: r.setup_header,
    })
}

/// Where to put an initrd of `size` bytes: as high as possible below
/// `limit`, page aligned, above `kernel_end`.
pub fn initrd_address(size: u64, kernel_end: u64, limit: u64) -> Result<u64, KernelError> {
    const PAGE: u64 = 4096;
    let too_big = KernelError::InitrdTooBig {
        size,
        kernel_end,
        limit,
    };
    let start = limit.checked_sub(size).ok_or(too_big)? & !(PAGE - 1);
    if start < kernel_end {
        return Err(KernelError::InitrdTooBig {
            size,
            kernel_end,
            limit,
        });
    }
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    /// A minimal bzImage: setup sectors with a 2.15 header, then `payload`.
    fn bzimage(payload: usize, xloadflags: u16) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512 + payload];
        img[0x1f1] = setup_sects;
        img[0x1f4..0x1f8].copy_from_slice(&((payload as u32).div_ceil(16)).to_le_bytes());
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x1; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes());
        img
    }

    #[test]
    fn bzimage_enters_at_0x200_past_the_protected_mode_code() {
        let img = bzimage(4096, XLF_KERNEL_64);
        let m = mem(64 << 20);
        let k = load(&m, &mut Cursor::new(&img), img.len() as u64, 64 << 20).unwrap();
        assert_eq!(k.entry, 0x10_0200);
        assert_eq!(k.end, 0x10_0000 + 0x40_0000);
        let hdr = k.setup_header.unwrap();
        assert_eq!({ hdr.version }, 0x020f);
    }

    #[test]
    fn bzimage_without_64_bit_entry_is_refused() {
        let img = bzimage(4096, 0);
        let e = load(
            &mem(64 << 20),
            &mut Cursor::new(&img),
            img.len() as u64,
            64 << 20,
        );
        assert!(matches!(e, Err(KernelError::BadBzImage(_))), "{e:?}");
    }

    #[test]
    fn truncated_bzimage_is_refused() {
        let mut img = bzimage(8192, XLF_KERNEL_64);
        img.truncate(img.len() - 100);
        let e = load(
            &mem(64 << 20),
            &mut Cursor::new(&img),
            img.len() as u64,
            64 << 20,
        );
        assert!(matches!(e, Err(KernelError::Truncated { .. })), "{e:?}");
    }

    #[test]
    fn garbage_is_neither_format() {
        let img = vec![0x42u8; 8192];
        let e = load(&mem(16 << 20), &mut Cursor::new(&img), 8192, 16 << 20);
        assert!(matches!(e, Err(KernelError::UnknownFormat)), "{e:?}");
        let e = load(&mem(16 << 20), &mut Cursor::new(&[]), 0, 16 << 20);
        assert!(matches!(e, Err(KernelError::UnknownFormat)), "{e:?}");
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        assert_eq!(
            initrd_address(5000, 0x20_0000, 0x100_0000).unwrap(),
            0xff_e000
        );
        assert!(initrd_address(0x100_0000, 0x20_0000, 0x100_0000).is_err());
        assert!(initrd_address(u64::MAX, 0, 0x100_0000).is_err());
    }
}
