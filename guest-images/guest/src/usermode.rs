//! The tables that split the guest in two: a kernel-mode core (CPL 0) and the appliance, which
//! runs at CPL 3, natively on our machines' emulated KVM (DESIGN.md §3).
//!
//! Everything here computes table contents; `main.rs` places them in memory the appliance
//! cannot reach and loads them (`lgdt`, `ltr`, `lidt`, `mov cr3`) before it drops to CPL 3
//! with `iretq`.
//!
//! - **GDT**: null, 64-bit kernel code and data, user data and 64-bit user code (DPL 3), and a
//!   64-bit TSS descriptor ([`GDT_TEMPLATE`], [`tss_descriptor`]).
//! - **TSS**: `rsp0`, the stack exceptions from CPL 3 run on, and the I/O permission bitmap,
//!   which is the only way to give CPL 3 port access here (IOPL 3 is not honoured). It opens
//!   exactly [`USER_PORTS`]; ports past the bitmap's end are closed by the TSS limit.
//! - **IDT**: interrupt gates for the 32 exception vectors ([`idt_gate`]); any other vector is
//!   beyond the IDT's limit and arrives as #GP.
//! - **Page tables**: the image in 4 KiB pages below 2 MiB (the kernel's own page-aligned
//!   section supervisor-only, the rest user) and 2 MiB user pages above, and in the fourth GiB
//!   the PCI hole up to the IOAPIC as user pages (the device's BARs and the passed-through
//!   netmap region), the IOAPIC and LAPIC supervisor-only. Nothing else is mapped: not page 0,
//!   not the VMM's boot data in the low MiB, not the rest of RAM ([`Layout`]).
//! - **Services**: the appliance asks the core for something only through an exception: `ud2`
//!   with [`SERVICE_MAGIC`] in `rax` and the request in `rdi` ([`service`]).

use crate::Sink;

/// Selectors (with their RPL).
pub mod sel {
    /// 64-bit kernel code.
    pub const KERNEL_CODE: u16 = 0x08;
    /// Kernel data (and stack).
    pub const KERNEL_DATA: u16 = 0x10;
    /// User data and stack, RPL 3.
    pub const USER_DATA: u16 = 0x18 | 3;
    /// 64-bit user code, RPL 3.
    pub const USER_CODE: u16 = 0x20 | 3;
    /// The TSS (two GDT slots).
    pub const TSS: u16 = 0x28;
}

/// The GDT with an empty TSS descriptor in slots 5 and 6 (see [`tss_descriptor`]).
pub const GDT_TEMPLATE: [u64; 7] = [
    0,
    // Present, DPL 0, code, execute/read, L = 1 (64-bit), G = 1.
    0x00af_9a00_0000_ffff,
    // Present, DPL 0, data, read/write, D/B = 1, G = 1.
    0x00cf_9200_0000_ffff,
    // As the kernel data segment, DPL 3.
    0x00cf_f200_0000_ffff,
    // As the kernel code segment, DPL 3.
    0x00af_fa00_0000_ffff,
    0,
    0,
];

/// The two GDT slots of an available 64-bit TSS at `base` with byte limit `limit`.
pub fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let limit = u64::from(limit);
    let low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x89 << 40 // present, DPL 0, type 9 (available 64-bit TSS)
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    [low, base >> 32]
}

/// Ports the appliance may use, as `(first, count)`: COM1, the exit port, PCI configuration
/// mechanism #1, PIT channel 2 and its command port (TSC calibration), port B (the channel's
/// gate and output) and the i8042 command port (`exit=reset`).
pub const USER_PORTS: [(u16, u16); 6] = [
    (0x3f8, 8),
    (0xf4, 1),
    (0xcf8, 8),
    (0x42, 2),
    (0x61, 1),
    (0x64, 1),
];

/// Offset of the I/O permission bitmap in the TSS (right after the 104-byte 64-bit TSS).
pub const IOMAP_BASE: usize = 104;
/// Ports covered by the bitmap: everything up to the highest open port, rounded up to a byte.
pub const IOMAP_PORTS: usize = 0xd00;
/// Bytes of the TSS: the TSS proper, the bitmap, and the 0xff byte the CPU may read past it.
pub const TSS_BYTES: usize = IOMAP_BASE + IOMAP_PORTS / 8 + 1;
/// Offset of `rsp0` in the TSS.
const RSP0: usize = 4;
/// Offset of the bitmap base field.
const IOMAP_FIELD: usize = 102;

/// The TSS image with `rsp0` 0 (see [`set_rsp0`]) and the bitmap opening [`USER_PORTS`]; a
/// constant, so that it is in the loaded image and costs no emulated instructions at boot.
pub const fn tss_template() -> [u8; TSS_BYTES] {
    let mut t = [0u8; TSS_BYTES];
    let base = (IOMAP_BASE as u16).to_le_bytes();
    t[IOMAP_FIELD] = base[0];
    t[IOMAP_FIELD + 1] = base[1];
    // Everything closed, the trailing byte included...
    let mut i = IOMAP_BASE;
    while i < TSS_BYTES {
        t[i] = 0xff;
        i += 1;
    }
    // ...but the listed ports (a clear bit allows access).
    let mut r = 0;
    while r < USER_PORTS.len() {
        let (first, count) = USER_PORTS[r];
        let mut p = first as usize;
        while p < first as usize + count as usize {
            t[IOMAP_BASE + p / 8] &= !(1 << (p % 8));
            p += 1;
        }
        r += 1;
    }
    t
}

/// Sets `rsp0` in a TSS image.
pub fn set_rsp0(tss: &mut [u8; TSS_BYTES], rsp0: u64) {
    for (d, s) in tss.iter_mut().skip(RSP0).zip(rsp0.to_le_bytes()) {
        *d = s;
    }
}

/// Whether CPL 3 may access the one-byte `port` through `tss` (as the CPU decides with IOPL 0:
/// the bit must be clear and within the TSS limit, `TSS_BYTES - 1`).
pub fn port_allowed(tss: &[u8; TSS_BYTES], port: u16) -> bool {
    let byte = IOMAP_BASE + usize::from(port) / 8;
    // The CPU reads two bytes; both must be inside the limit.
    byte + 1 < TSS_BYTES && tss.get(byte).is_some_and(|b| b & (1 << (port % 8)) == 0)
}

/// An interrupt gate (interrupts stay off in the handler) to `handler` in the kernel code
/// segment, DPL 0 (so `int n` from CPL 3 cannot reach it), on the current / `rsp0` stack.
pub fn idt_gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | u64::from(sel::KERNEL_CODE) << 16
        | 0x8e << 40 // present, DPL 0, type 0xe (64-bit interrupt gate)
        | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

/// Exception vectors: the IDT holds gates for these.
pub const VECTORS: usize = 32;

/// Whether the CPU pushes an error code for exception `vector`.
pub fn has_error_code(vector: u64) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The mnemonic of exception `vector`.
pub fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 22] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "res", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
    ];
    usize::try_from(vector)
        .ok()
        .and_then(|v| NAMES.get(v))
        .copied()
        .unwrap_or("exception")
}

/// The memory the page tables must tell apart (addresses from the linker script).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// First byte of the loaded image (1 MiB).
    pub image_start: u64,
    /// The kernel's own section (GDT, TSS, IDT, page tables, exception stack): page aligned.
    pub kernel_start: u64,
    /// End of the kernel's section, page aligned; it must be below 2 MiB.
    pub kernel_end: u64,
    /// End of the image, `.bss` and the appliance's stack included.
    pub image_end: u64,
}

/// Present, writable.
const P_RW: u64 = 0x3;
/// User-accessible.
const US: u64 = 0x4;
/// A 2 MiB page (in a page directory).
const PS: u64 = 0x80;
const MIB2: u64 = 2 << 20;
/// Start of the PCI hole and of the IOAPIC (the first address user mode may not reach).
const HOLE_START: u64 = 0xc000_0000;
const HOLE_USER_END: u64 = 0xfec0_0000;

impl Layout {
    /// Whether the layout is one [`Layout::pt_entry`] and friends can express: ordered, page
    /// aligned, the kernel's section inside the first 2 MiB and the image inside the first GiB.
    pub fn valid(&self) -> bool {
        self.image_start <= self.kernel_start
            && self.kernel_start < self.kernel_end
            && self.kernel_end <= self.image_end
            && self.kernel_end <= MIB2
            && self.image_end <= 1 << 30
            && (self.kernel_start | self.kernel_end) & 0xfff == 0
    }

    /// Entry `i` of the page table for the first 2 MiB (4 KiB pages): the image only.
    pub fn pt_entry(&self, i: u64) -> u64 {
        let addr = i << 12;
        if i == 0 || !self.in_image(addr, addr + 4096) {
            0 // absent: the null page, the low BIOS area, the VMM's boot data
        } else if self.in_kernel(addr, addr + 4096) {
            addr | P_RW
        } else {
            addr | P_RW | US
        }
    }

    /// Entry `i` of the page directory for the first GiB: the page table at `pt` for entry 0,
    /// 2 MiB user pages for the rest of the image, nothing else (the core needs no RAM
    /// outside its image once the tables are loaded).
    pub fn pd0_entry(&self, i: u64, pt: u64) -> u64 {
        let addr = i * MIB2;
        if i == 0 {
            pt | P_RW | US
        } else if self.in_image(addr, addr + MIB2) {
            addr | P_RW | PS | US
        } else {
            0
        }
    }

    /// Fills the page table and the first page directory (which must start zeroed), touching
    /// only the entries that map something: this runs emulated, at a few µs an entry.
    pub fn fill(&self, pt: &mut [u64; 512], pd0: &mut [u64; 512], pt_addr: u64) {
        let first = self.image_start >> 12;
        let last = self.image_end.min(MIB2).div_ceil(4096);
        for (i, e) in pt
            .iter_mut()
            .enumerate()
            .take(last as usize)
            .skip(first as usize)
        {
            *e = self.pt_entry(i as u64);
        }
        let last = self.image_end.div_ceil(MIB2);
        for (i, e) in pd0.iter_mut().enumerate().take(last as usize) {
            *e = self.pd0_entry(i as u64, pt_addr);
        }
    }

    fn in_image(&self, start: u64, end: u64) -> bool {
        start < self.image_end && self.image_start < end
    }

    fn in_kernel(&self, start: u64, end: u64) -> bool {
        start < self.kernel_end && self.kernel_start < end
    }
}

/// Entry `i` of the page directory for the fourth GiB: 2 MiB pages, user up to the IOAPIC.
pub const fn pd3_entry(i: u64) -> u64 {
    let addr = HOLE_START + i * MIB2;
    if addr + MIB2 <= HOLE_USER_END {
        addr | P_RW | PS | US
    } else {
        addr | P_RW | PS
    }
}

/// The whole page directory for the fourth GiB, as a constant (no boot-time cost).
pub const fn pd3_table() -> [u64; 512] {
    let mut t = [0u64; 512];
    let mut i = 0;
    while i < 512 {
        t[i] = pd3_entry(i as u64);
        i += 1;
    }
    t
}

/// A page-directory-pointer or PML4 entry for the table at `table`, which may hold user
/// pages.
pub fn table_entry(table: u64) -> u64 {
    table | P_RW | US
}

/// `rax` of a service request (`ud2` at CPL 3): "nmvm-svc".
pub const SERVICE_MAGIC: u64 = 0x6376_732d_6d76_6d6e;
/// `rdi` of a service request: reset the VM (the i8042, then a triple fault).
pub const SERVICE_RESET: u64 = 1;
/// The exit status of a VM that the core ends because of an unexpected exception.
pub const EXCEPTION_STATUS: u8 = 4;

/// What the core makes of an exception.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trap {
    /// The appliance asks for a service.
    Service(u64),
    /// Anything else: report and end the VM.
    Fault,
}

/// Decides what an exception is: a service request is a #UD from CPL 3 (`cs` with RPL 3)
/// on a `ud2` (`insn` = the two bytes at `rip`) with [`SERVICE_MAGIC`] in `rax`.
pub fn classify(vector: u64, cs: u64, rax: u64, rdi: u64, insn: [u8; 2]) -> Trap {
    if vector == 6 && cs & 3 == 3 && rax == SERVICE_MAGIC && insn == [0x0f, 0x0b] {
        Trap::Service(rdi)
    } else {
        Trap::Fault
    }
}

/// What the exception handler reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionReport {
    /// Vector.
    pub vector: u64,
    /// Error code (0 when the exception has none).
    pub error: u64,
    /// Where it happened.
    pub rip: u64,
    /// The code segment it happened in (RPL 3: user mode).
    pub cs: u64,
    /// CR2 (the faulting address of a #PF).
    pub cr2: u64,
}

/// `nmvm-guest: exception #PF (14) in user mode at rip 0x... error 0x4 cr2 0x0`.
pub fn write_exception(out: &mut impl Sink, r: &ExceptionReport) {
    out.write(b"nmvm-guest: exception ");
    out.write(exception_name(r.vector).as_bytes());
    out.write(b" (");
    out.write_dec(r.vector);
    out.write(if r.cs & 3 == 3 {
        b") in user mode at rip ".as_slice()
    } else {
        b") in kernel mode at rip ".as_slice()
    });
    out.write_hex(r.rip);
    out.write(b" error ");
    out.write_hex(r.error);
    if r.vector == 14 {
        out.write(b" cr2 ");
        out.write_hex(r.cr2);
    }
    out.write(b"\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_have_the_right_privilege_and_mode() {
        let dpl = |d: u64| (d >> 45) & 3;
        let long = |d: u64| (d >> 53) & 1;
        let code = |d: u64| (d >> 43) & 1;
        let g = GDT_TEMPLATE;
        assert_eq!((dpl(g[1]), long(g[1]), code(g[1])), (0, 1, 1));
        assert_eq!((dpl(g[2]), code(g[2])), (0, 0));
        assert_eq!((dpl(g[3]), code(g[3])), (3, 0));
        assert_eq!((dpl(g[4]), long(g[4]), code(g[4])), (3, 1, 1));
        assert_eq!(usize::from(sel::USER_CODE >> 3), 4);
        assert_eq!(usize::from(sel::USER_DATA >> 3), 3);
        assert_eq!(usize::from(sel::TSS >> 3), 5);
    }

    #[test]
    fn tss_descriptor_splits_base_and_limit() {
        let [lo, hi] = tss_descriptor(0x1234_5678_9abc_def0, 0x2_0208);
        assert_eq!(lo & 0xffff, 0x0208);
        assert_eq!((lo >> 48) & 0xf, 0x2);
        assert_eq!((lo >> 16) & 0xff_ffff, 0xbc_def0);
        assert_eq!(lo >> 56, 0x9a);
        assert_eq!((lo >> 40) & 0xff, 0x89);
        assert_eq!(hi, 0x1234_5678);
    }

    #[test]
    fn the_bitmap_opens_exactly_the_listed_ports() {
        let t = tss_template();
        assert_eq!(u16::from_le_bytes([t[102], t[103]]), 104);
        let open: Vec<u16> = (0..=u16::MAX).filter(|&p| port_allowed(&t, p)).collect();
        let mut want: Vec<u16> = USER_PORTS.iter().flat_map(|&(f, n)| f..f + n).collect();
        want.sort_unstable();
        assert_eq!(open, want);
        // The PIC, the PIT's other channels, the debug port and the UART's neighbour stay shut.
        for p in [0x20, 0x21, 0x40, 0x80, 0x2f8, 0x400, 0xd00, 0xffff] {
            assert!(!port_allowed(&t, p), "{p:#x}");
        }
        assert_eq!(t[TSS_BYTES - 1], 0xff);
    }

    #[test]
    fn rsp0_lands_at_offset_4() {
        let mut t = tss_template();
        set_rsp0(&mut t, 0x1122_3344_5566_7788);
        assert_eq!(&t[4..12], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(t[3], 0);
        assert_eq!(t[12], 0);
    }

    #[test]
    fn idt_gate_is_a_kernel_interrupt_gate() {
        let [lo, hi] = idt_gate(0xffff_8000_0012_3456);
        assert_eq!(lo & 0xffff, 0x3456);
        assert_eq!((lo >> 16) & 0xffff, 0x08);
        assert_eq!((lo >> 40) & 0xff, 0x8e);
        assert_eq!(lo >> 48, 0x0012);
        assert_eq!(hi, 0xffff_8000);
    }

    #[test]
    fn error_codes_and_names() {
        let with: Vec<u64> = (0..32).filter(|&v| has_error_code(v)).collect();
        assert_eq!(with, [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
        assert_eq!(exception_name(13), "#GP");
        assert_eq!(exception_name(14), "#PF");
        assert_eq!(exception_name(99), "exception");
    }

    fn layout() -> Layout {
        Layout {
            image_start: 0x10_0000,
            kernel_start: 0x11_4000,
            kernel_end: 0x11_f000,
            image_end: 0x23_5000,
        }
    }

    #[test]
    fn page_tables_separate_the_kernel_from_the_appliance() {
        let l = layout();
        assert!(l.valid());
        assert_eq!(l.pt_entry(0), 0, "null page absent");
        assert_eq!(l.pt_entry(7), 0, "zero page not mapped");
        assert_eq!(l.pt_entry(0x9f), 0, "MP table not mapped");
        assert_eq!(l.pt_entry(0x100), 0x10_0000 | 7, "image text user");
        assert_eq!(l.pt_entry(0x113), 0x11_3000 | 7);
        assert_eq!(l.pt_entry(0x114), 0x11_4000 | 3, "kernel section");
        assert_eq!(l.pt_entry(0x11e), 0x11_e000 | 3);
        assert_eq!(l.pt_entry(0x11f), 0x11_f000 | 7, ".data user");
        assert_eq!(l.pt_entry(0x1ff), 0x1f_f000 | 7, ".bss user");
        assert_eq!(l.pd0_entry(0, 0x5000), 0x5000 | 7);
        assert_eq!(
            l.pd0_entry(1, 0),
            0x20_0000 | 0x87,
            "rest of the image user"
        );
        assert_eq!(l.pd0_entry(2, 0), 0, "RAM beyond the image not mapped");
        assert_eq!(l.pd0_entry(511, 0), 0);
    }

    #[test]
    fn fill_writes_exactly_the_entries_that_map_something() {
        let l = layout();
        let (mut pt, mut pd0) = ([0u64; 512], [0u64; 512]);
        l.fill(&mut pt, &mut pd0, 0x5000);
        for i in 0..512u64 {
            assert_eq!(pt[i as usize], l.pt_entry(i), "pt {i}");
            assert_eq!(pd0[i as usize], l.pd0_entry(i, 0x5000), "pd0 {i}");
        }
        assert_eq!(pt.iter().filter(|&&e| e != 0).count(), 256);
        assert_eq!(pd0.iter().filter(|&&e| e != 0).count(), 2);
        let small = Layout {
            image_end: 0x18_0000,
            ..l
        };
        let (mut pt, mut pd0) = ([0u64; 512], [0u64; 512]);
        small.fill(&mut pt, &mut pd0, 0x5000);
        assert_eq!(pt.iter().filter(|&&e| e != 0).count(), 0x80);
        assert_eq!(pd0.iter().filter(|&&e| e != 0).count(), 1);
    }

    #[test]
    fn the_pci_hole_is_user_up_to_the_ioapic() {
        let t = pd3_table();
        assert_eq!(t[0], 0xc000_0000 | 0x87);
        assert_eq!(t[128], 0xd000_0000 | 0x87, "nmvm's BAR 2");
        assert_eq!(t[501], 0xfea0_0000 | 0x87);
        assert_eq!(t[502], 0xfec0_0000 | 0x83, "IOAPIC kernel-only");
        assert_eq!(t[511], 0xffe0_0000 | 0x83, "LAPIC kernel-only");
        assert_eq!(table_entry(0x9000), 0x9007);
    }

    #[test]
    fn unusual_layouts_are_refused() {
        let mut l = layout();
        l.kernel_end = 0x20_1000;
        assert!(!l.valid(), "kernel section beyond 2 MiB");
        let mut l = layout();
        l.kernel_start = 0x11_4800;
        assert!(!l.valid(), "unaligned");
        let mut l = layout();
        l.image_end = 0x11_0000;
        assert!(!l.valid(), "out of order");
    }

    #[test]
    fn only_a_marked_ud2_from_user_mode_is_a_service() {
        let ud2 = [0x0f, 0x0b];
        assert_eq!(classify(6, 0x23, SERVICE_MAGIC, 1, ud2), Trap::Service(1));
        assert_eq!(classify(6, 0x08, SERVICE_MAGIC, 1, ud2), Trap::Fault);
        assert_eq!(classify(6, 0x23, 0, 1, ud2), Trap::Fault);
        assert_eq!(classify(13, 0x23, SERVICE_MAGIC, 1, ud2), Trap::Fault);
        assert_eq!(
            classify(6, 0x23, SERVICE_MAGIC, 1, [0x0f, 0xff]),
            Trap::Fault
        );
    }

    #[test]
    fn exception_lines() {
        #[derive(Default)]
        struct S(Vec<u8>);
        impl Sink for S {
            fn write(&mut self, b: &[u8]) {
                self.0.extend_from_slice(b);
            }
        }
        let mut s = S::default();
        let r = ExceptionReport {
            vector: 14,
            error: 4,
            rip: 0x10_2345,
            cs: 0x23,
            cr2: 0x7000,
        };
        write_exception(&mut s, &r);
        assert_eq!(
            s.0,
            b"nmvm-guest: exception #PF (14) in user mode at rip 0x102345 error 0x4 cr2 0x7000\n"
        );
        let mut s = S::default();
        write_exception(
            &mut s,
            &ExceptionReport {
                vector: 13,
                cs: 0x08,
                ..r
            },
        );
        assert_eq!(
            s.0,
            b"nmvm-guest: exception #GP (13) in kernel mode at rip 0x102345 error 0x4\n"
        );
    }
}
