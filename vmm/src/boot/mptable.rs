//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
//! finds its CPUs, its IOAPIC and how ISA interrupts reach it.

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR};

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT: u8 = 2;
/// Family 6, as a generic modern CPU signature.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;
const BUS_ISA: u8 = 0;
/// ISA interrupts 0..16 on IOAPIC pins 0..16.
const ISA_IRQS: u8 = 16;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;

/// Largest vCPU count the table can describe: APIC IDs 0..n plus the
/// IOAPIC's ID must fit in a byte below the broadcast ID 0xff.
pub const MAX_CPUS: u8 = 254;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

/// Builds the floating pointer followed by the configuration table, to be
/// placed at guest-physical `base`, for `cpus` processors.
pub fn build(base: u64, cpus: u8) -> Vec<u8> {
    let cpus = cpus.clamp(1, MAX_CPUS);
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;

    for id in 0..cpus {
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION]);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BOOT } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // Flags 0: polarity and trigger mode conform to the ISA bus (edge,
        // active high).
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_VECTORED, 0, 0, BUS_ISA, irq]);
        entries.extend_from_slice(&[ioapic_id, irq]);
        count += 1;
    }
    for (kind, lint) in [(INT_EXTINT, 0u8), (INT_NMI, 1)] {
        // To every local APIC (0xff).
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, BUS_ISA, 0, 0xff, lint]);
        count += 1;
    }

    let table_addr = base + 16;
    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"NMVM    ");
    table.extend_from_slice(b"NMVM VM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // no extended entries
    table.extend_from_slice(&[0, 0]);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, MPC_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts_are_consistent() {
        let t = build(0x9fc00, 2);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0x9fc10);
        let table = &t[16..];
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 2 CPUs, a bus, an IOAPIC, 16 ISA interrupts, 2 local interrupts.
        assert_eq!(count, 2 + 1 + 1 + 16 + 2);
        // Processor entries come first; only the first is the boot CPU.
        assert_eq!(&table[44..48], &[0, 0, APIC_VERSION, 3]);
        assert_eq!(&table[64..68], &[0, 1, APIC_VERSION, 1]);
    }

    #[test]
    fn table_stays_inside_the_reserved_area_for_any_cpu_count() {
        use crate::boot::layout::{HIMEM_START, MPTABLE_ADDR};
        // Up to 40 CPUs fit in the last KiB below 640 KiB; larger tables
        // run into the legacy hole, which e820 also reserves.
        assert!(build(MPTABLE_ADDR, 40).len() <= 1024);
        let largest = build(MPTABLE_ADDR, MAX_CPUS).len() as u64;
        assert!(MPTABLE_ADDR + largest <= HIMEM_START);
        assert_eq!(build(MPTABLE_ADDR, 0).len(), build(MPTABLE_ADDR, 1).len());
    }
}
