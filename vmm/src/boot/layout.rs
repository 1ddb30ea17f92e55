//! The guest-physical memory map of an nmvm x86-64 VM.
//!
//! ```text
//! 0x0000_0500  GDT                 0x0000_9000  PML4, PDPT, 4 page directories
//! 0x0000_7000  zero page           0x0002_0000  kernel command line
//! 0x0000_8ff0  boot stack (down)   0x0009_fc00  MP table (last KiB below 640 KiB)
//! 0x0010_0000  kernel (bzImage; ELF images load at their own addresses)
//! 0xc000_0000 .. 0x1_0000_0000     MMIO hole: PCI BARs, IOAPIC, LAPIC
//! 0x1_0000_0000 ..                 RAM beyond 3 GiB
//! ```

/// The GDT.
pub const GDT_ADDR: u64 = 0x500;
/// The (empty) IDT handed to the guest at entry.
pub const IDT_ADDR: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four page directories (2 MiB pages, 4 GiB identity map).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted, terminating NUL included.
pub const CMDLINE_MAX: usize = 4096;
/// The MP floating pointer and configuration table.
pub const MPTABLE_ADDR: u64 = 0x9_fc00;
/// Start of conventional memory above the BIOS hole.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Start of RAM above the hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// The IOAPIC's registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// Guest RAM ranges (start, size) for `size` bytes of memory: below the
/// MMIO hole first, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low as usize)];
    if size > low {
        ranges.push((HIGH_RAM_START, (size - low) as usize));
    }
    ranges
}

/// A BIOS-style memory map entry type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
}

/// The e820 map for `size` bytes of RAM.
pub fn e820_map(size: u64) -> Vec<(u64, u64, E820Kind)> {
    let mut map = vec![
        (0, MPTABLE_ADDR, E820Kind::Ram),
        (MPTABLE_ADDR, HIMEM_START - MPTABLE_ADDR, E820Kind::Reserved),
    ];
    let low_end = size.min(MMIO_HOLE_START);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820Kind::Ram));
    }
    if size > low_end {
        map.push((HIGH_RAM_START, size - low_end, E820Kind::Ram));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range_below_the_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        let map = e820_map(256 << 20);
        assert_eq!(
            map.last(),
            Some(&(HIMEM_START, (256 << 20) - HIMEM_START, E820Kind::Ram))
        );
    }

    #[test]
    fn large_memory_is_split_around_the_hole() {
        let size = 4u64 << 30;
        assert_eq!(
            ram_ranges(size),
            vec![(0, 3 << 30), (HIGH_RAM_START, 1 << 30)]
        );
        let ram: u64 = e820_map(size)
            .iter()
            .filter(|e| e.2 == E820Kind::Ram)
            .map(|e| e.1)
            .sum();
        // Everything but the MP table's kilobyte and the legacy hole is usable.
        assert_eq!(ram, size - (HIMEM_START - MPTABLE_ADDR));
    }
}
