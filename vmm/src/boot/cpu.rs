//! Long-mode entry state: GDT, identity page tables and registers.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{BOOT_STACK, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};
use crate::hypervisor::{CpuState, DescriptorTable, Segment};

/// Selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the flat data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the (placeholder) task state segment.
pub const TSS_SELECTOR: u16 = 0x18;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_HUGE: u64 = 0x80;

/// Encodes a GDT descriptor from its flags (access byte in bits 0..8, the
/// G/DB/L/AVL nibble in bits 12..16), base and 20-bit limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    ((base & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((limit & 0xf_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

fn segment(flags: u16, selector: u16) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: (flags & 0xf) as u8,
        present: flags & 0x80 != 0,
        dpl: ((flags >> 5) & 3) as u8,
        db: flags & 0x4000 != 0,
        s: flags & 0x10 != 0,
        l: flags & 0x2000 != 0,
        g: flags & 0x8000 != 0,
    }
}

const CODE64_FLAGS: u16 = 0xa09b;
const DATA_FLAGS: u16 = 0xc093;
const TSS_FLAGS: u16 = 0x808b;

/// Writes the GDT and page tables into guest memory and returns the boot
/// CPU's entry state: long mode, the first 4 GiB identity-mapped with 2 MiB
/// pages (so early code reaches RAM and the MMIO hole alike), interrupts
/// off, `rsi` pointing at the zero page.
pub fn setup_long_mode(
    mem: &GuestMemoryMmap,
    entry: u64,
    zero_page: u64,
) -> Result<CpuState, vm_memory::GuestMemoryError> {
    let gdt = [
        0,
        gdt_entry(CODE64_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;

    mem.write_obj(PDPT_ADDR | PAGE_PRESENT_RW, GuestAddress(PML4_ADDR))?;
    for gib in 0..4u64 {
        let pd = PD_ADDR + gib * 0x1000;
        mem.write_obj(pd | PAGE_PRESENT_RW, GuestAddress(PDPT_ADDR + gib * 8))?;
        for i in 0..512u64 {
            let addr = ((gib * 512 + i) << 21) | PAGE_PRESENT_RW | PAGE_HUGE;
            mem.write_obj(addr, GuestAddress(pd + i * 8))?;
        }
    }

    Ok(CpuState {
        rip: entry,
        rsp: BOOT_STACK,
        rsi: zero_page,
        rflags: 0x2,
        cs: segment(CODE64_FLAGS, CODE_SELECTOR),
        data: segment(DATA_FLAGS, DATA_SELECTOR),
        tr: segment(TSS_FLAGS, TSS_SELECTOR),
        gdt: DescriptorTable {
            base: GDT_ADDR,
            limit: (gdt.len() * 8 - 1) as u16,
        },
        idt: DescriptorTable {
            base: IDT_ADDR,
            limit: 7,
        },
        cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG,
        cr3: PML4_ADDR,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_encode_flat_segments() {
        assert_eq!(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let cs = segment(CODE64_FLAGS, CODE_SELECTOR);
        assert!(cs.l && cs.present && cs.s && cs.g && !cs.db);
        assert_eq!(cs.type_, 0xb);
        let ds = segment(DATA_FLAGS, DATA_SELECTOR);
        assert!(ds.db && !ds.l);
    }

    #[test]
    fn identity_maps_four_gib_and_points_rsi_at_the_zero_page() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let st = setup_long_mode(&mem, 0x10_0000, 0x7000).unwrap();
        assert_eq!((st.rip, st.rsi, st.cr3), (0x10_0000, 0x7000, PML4_ADDR));
        assert_eq!(st.efer & EFER_LMA, EFER_LMA);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        // The last 2 MiB page below 4 GiB maps 0xffe0_0000.
        let last: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last, 0xffe0_0000 | 0x83);
    }
}
