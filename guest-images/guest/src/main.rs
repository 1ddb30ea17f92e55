//! The bundled nmvm guest: a bare-metal x86-64 program entered through the Linux 64-bit boot
//! protocol (long mode, first 4 GiB identity-mapped, `%rsi` = zero page).
//!
//! Its kernel-mode code runs under an instruction emulator that lacks SSE, INT3, POPCNT and
//! more (DESIGN.md §3), so everything here is integer-only, never touches `core::fmt`, and
//! has no run-time panic path. The parsing, the frame code and the virtio-net driver live in
//! the library, where they are unit-tested; this file supplies the hardware they drive.
//!
//! The guest is two parts. The kernel-mode core (`guest_main` up to [`enter_user_mode`], and
//! the exception handler) prints the ready line, parses the command line, carries out the
//! `fault=` modes, and builds the GDT, TSS, IDT and page tables of [`usermode`]. Then it drops
//! to CPL 3 with `iretq` into [`user_main`]: the appliance (TSC calibration, `wait=`, device
//! set-up and every packet loop, the exit) runs in user mode, natively on our machines'
//! emulated KVM, reaching its ports through the TSS I/O bitmap and its rings, BARs and
//! buffers through user pages. It asks the core for something (only the reset) with a marked
//! `ud2`; any other exception ends the VM with a report and status 4. `mode=kernel` keeps the
//! whole appliance at CPL 0, for comparison.

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::panic::PanicInfo;

use nmvm_guest::mptable::{self, MpError};
use nmvm_guest::net::{self, Hw, DMA_SIZE};
use nmvm_guest::netmap::{self, Region};
use nmvm_guest::usermode::{self, sel, ExceptionReport, Layout, Trap, TSS_BYTES, VECTORS};
use nmvm_guest::virtio::pci::{conf1_address, MMIO_HOLE_END, MMIO_HOLE_START};
use nmvm_guest::virtio::{Dma, Mmio, PciConfig};
use nmvm_guest::{
    boot_params, parse_cmdline, read_cmdline, tsc_hz, write_rate, write_ready_line, BootParams,
    Config, Exit, Fault, NetMode, NetPath, PhysMem, RunMode, Sink, CMDLINE_MAX,
    IDENTITY_MAPPED_END,
};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Diagnostic port: the VMM timestamps the guest's first exit here.
const PORT_POST: u16 = 0x80;
/// The VMM ends the VM with the byte written here as the process status.
const PORT_EXIT: u16 = 0xF4;
const COM1: u16 = 0x3F8;
const COM1_LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// A UART that never drains must not hang the guest: give up waiting and write anyway.
const LSR_POLLS: u32 = 100_000;
const PIT_CH2: u16 = 0x42;
const PIT_CMD: u16 = 0x43;
/// Port B of the old PC system control: bit 0 gates PIT channel 2, bit 1 drives the
/// speaker from it, bit 5 reads back its OUT line.
const PORT_B: u16 = 0x61;
const I8042_CMD: u16 = 0x64;
const I8042_PULSE_RESET: u8 = 0xFE;
/// PCI configuration mechanism #1: address and data ports.
const PCI_CONFIG_ADDRESS: u16 = 0xCF8;
const PCI_CONFIG_DATA: u16 = 0xCFC;
/// Exit status of a net mode that failed (the reason is printed first).
const NET_FAILURE: u8 = 3;

/// PIT counts for the calibration window: 59659 / 1.193182 MHz = 50 ms, short enough to be
/// a small part of any `wait=`, long enough that an 8 µs port exit is 0.02 % of it.
const PIT_CALIBRATION_COUNTS: u16 = 59_659;
/// Upper bound on OUT2 polls: at ~8 µs a poll this is about 8 s, far beyond 50 ms.
const PIT_POLLS: u32 = 1_000_000;
/// Used only when the PIT does not answer, so that `wait=` still ends.
const FALLBACK_TSC_HZ: u64 = 2_000_000_000;

// The first instruction must be the port-0x80 write: the VMM takes that exit as "first guest
// instruction". The boot protocol promises no stack, so we switch to the one the linker script
// reserves in .bss before entering Rust, and pass the zero page address (in %rsi) as the first
// argument. Nothing else needs zeroing: the VMM zeroes guest memory before loading us.
global_asm!(
    ".section .text._start, \"ax\", @progbits",
    ".global _start",
    ".type _start, @function",
    "_start:",
    "out {post}, al",
    "lea rsp, [rip + __stack_top]",
    "xor ebp, ebp",
    "mov rdi, rsi",
    "cld",
    "call {main}",
    "2:",
    "cli",
    "pause",
    "jmp 2b",
    ".size _start, . - _start",
    post = const PORT_POST,
    main = sym guest_main,
);

/// Writes `val` to I/O port `port`.
///
/// # Safety
/// The caller must know what the device behind `port` does with the write; the ports used
/// here (UART, PIT, port B, i8042, exit port) have no effect on memory Rust can see.
unsafe fn outb(port: u16, val: u8) {
    // SAFETY: `out` touches no memory and no stack; the device effect is the caller's contract.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

/// Reads I/O port `port`.
///
/// # Safety
/// As for [`outb`]: reads may have device side effects the caller must intend.
unsafe fn inb(port: u16) -> u8 {
    let val: u8;
    // SAFETY: `in` touches no memory and no stack; the device effect is the caller's contract.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") val, options(nomem, nostack, preserves_flags))
    }
    val
}

/// Writes a 16-bit value to I/O port `port`.
///
/// # Safety
/// As for [`outb`]; used for the PCI configuration data port only.
unsafe fn outw(port: u16, val: u16) {
    // SAFETY: `out` touches no memory and no stack; the device effect is the caller's contract.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") val, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit value to I/O port `port`.
///
/// # Safety
/// As for [`outb`]; used for the PCI configuration ports only.
unsafe fn outl(port: u16, val: u32) {
    // SAFETY: `out` touches no memory and no stack; the device effect is the caller's contract.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a 32-bit value from I/O port `port`.
///
/// # Safety
/// As for [`inb`]; used for the PCI configuration data port only.
unsafe fn inl(port: u16) -> u32 {
    let val: u32;
    // SAFETY: `in` touches no memory and no stack; the device effect is the caller's contract.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") val, options(nomem, nostack, preserves_flags))
    }
    val
}

fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: RDTSC only reads the time-stamp counter into edx:eax (CR4.TSD is clear at CPL 0
    // anyway); it touches no memory.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

fn pause() {
    // SAFETY: PAUSE is a spin-loop hint with no architectural effect.
    unsafe { asm!("pause", options(nomem, nostack, preserves_flags)) }
}

/// Stops for good; `hlt` would not do, because with an in-kernel irqchip it never reaches the
/// VMM (and faults at CPL 3), and the loop costs the emulator nothing it notices. Interrupts
/// are off: the VMM enters us with IF clear, nothing sets it, and `cli` would fault at CPL 3.
fn spin_forever() -> ! {
    loop {
        pause();
    }
}

/// The current privilege level (the RPL of CS).
fn cpl() -> u16 {
    let cs: u16;
    // SAFETY: reading CS into a register has no effect; it is allowed at any privilege level.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) }
    cs & 3
}

/// COM1, written by polling (no interrupts, no FIFO set-up: the VMM's 8250 needs none).
struct Serial;

impl Sink for Serial {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            for _ in 0..LSR_POLLS {
                // SAFETY: reading the 8250 line status register has no side effect.
                if unsafe { inb(COM1_LSR) } & LSR_THR_EMPTY != 0 {
                    break;
                }
            }
            // SAFETY: writing the transmit holding register sends one byte on the console.
            unsafe { outb(COM1, b) }
        }
    }
}

/// Guest-physical memory, read through the identity map where the zero page says it is.
struct GuestMem {
    bp: BootParams<'static>,
}

impl PhysMem for GuestMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        if !self.bp.readable(addr, buf.len() as u64) {
            return false;
        }
        // SAFETY: `readable` checked that [addr, addr + len) is non-null, inside the
        // identity-mapped first 4 GiB, and inside the first MiB or an e820 range, i.e. guest
        // memory the VMM backs. Nothing writes it while we read (the other vCPUs are never
        // started), and `buf` is on our own stack, which the boot protocol keeps apart from
        // the tables and command line we read.
        unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        true
    }
}

/// The zero page at `addr`, or an empty view when the pointer is unusable.
fn zero_page(addr: u64) -> &'static [u8] {
    let size = boot_params::SIZE as u64;
    if addr == 0 || addr > IDENTITY_MAPPED_END - size {
        return &[];
    }
    // SAFETY: the boot protocol hands us a 4 KiB zero page at `addr`, which we checked is
    // non-null and inside the identity map. The VMM wrote it before we started and nothing
    // writes it afterwards, so a shared 'static borrow of it is never aliased mutably.
    unsafe { core::slice::from_raw_parts(addr as *const u8, boot_params::SIZE) }
}

fn print(s: &[u8]) {
    Serial.write(s);
}

/// Prints the exit line and ends the VM through the exit port.
fn exit(status: u8) -> ! {
    print(b"nmvm-guest: exit ");
    Serial.write_dec(u64::from(status));
    print(b"\n");
    // SAFETY: the exit port tells the VMM to end the VM; it has no effect on guest memory.
    unsafe { outb(PORT_EXIT, status) }
    spin_forever()
}

fn reset() -> ! {
    print(b"nmvm-guest: exit reset\n");
    if cpl() == 3 {
        // The fallback below needs CPL 0: ask the core.
        // SAFETY: a marked `ud2` is the service request the exception handler recognises; it
        // never returns here (the core resets the VM), which `noreturn` states.
        unsafe {
            asm!(
                "ud2",
                in("rax") usermode::SERVICE_MAGIC,
                in("rdi") usermode::SERVICE_RESET,
                options(noreturn, nostack)
            )
        }
    }
    core_reset()
}

/// The core's reset: the i8042, then a triple fault.
fn core_reset() -> ! {
    // SAFETY: pulsing the i8042 reset line asks the VMM to end (reset) the VM; no memory effect.
    unsafe { outb(I8042_CMD, I8042_PULSE_RESET) }
    // A VMM without an i8042 still has to stop on a triple fault.
    triple_fault()
}

/// With an IDT of limit 0 every vector is out of bounds: #UD → #GP → #DF → shutdown.
fn triple_fault() -> ! {
    // A 10-byte IDTR image: limit 0, base 0.
    let idtr = [0u16; 5];
    // SAFETY: LIDT reads 10 bytes from `idtr`, which is live on our stack; the UD2 that
    // follows never returns because no handler can be found, which `noreturn` states.
    unsafe { asm!("lidt [{0}]", "ud2", in(reg) idtr.as_ptr(), options(noreturn, nostack)) }
}

/// Executes `xorps xmm0, xmm0` at CPL 0. It is emitted as bytes because compiled code has SSE
/// disabled. The emulator on our CI machines ends the VM here with an emulation failure; real
/// hardware raises #UD (CR4.OSFXSR is clear) and, with no IDT of ours, triple-faults.
fn sse_instruction() {
    // SAFETY: the instruction only zeroes xmm0, a register no compiled code in this binary
    // uses (SSE is disabled for it), so clobbering it cannot affect the program.
    unsafe {
        asm!(
            ".byte 0x0f, 0x57, 0xc0",
            options(nomem, nostack, preserves_flags)
        )
    }
}

/// TSC ticks per second, measured over a 50 ms PIT channel 2 one-shot (mode 0).
fn calibrate_tsc() -> Option<u64> {
    let [lo, hi] = PIT_CALIBRATION_COUNTS.to_le_bytes();
    // SAFETY: port B, the PIT command port and channel 2 drive only the PC speaker timer;
    // gate on (bit 0) with the speaker off (bit 1) so nothing audible happens.
    unsafe {
        let b = inb(PORT_B);
        outb(PORT_B, (b & !0x02) | 0x01);
        // Channel 2, lobyte/hibyte, mode 0 (OUT rises at terminal count), binary.
        outb(PIT_CMD, 0xB0);
        outb(PIT_CH2, lo);
        outb(PIT_CH2, hi);
    }
    let start = rdtsc();
    for _ in 0..PIT_POLLS {
        // SAFETY: reading port B has no side effect; bit 5 is channel 2's OUT line.
        if unsafe { inb(PORT_B) } & 0x20 != 0 {
            let hz = tsc_hz(
                rdtsc().wrapping_sub(start),
                u64::from(PIT_CALIBRATION_COUNTS),
            )?;
            // Anything below 1 MHz means OUT2 was high at once, i.e. there is no real PIT.
            return (hz >= 1_000_000).then_some(hz);
        }
    }
    None
}

fn wait_seconds(secs: u32) {
    print(b"nmvm-guest: waiting ");
    Serial.write_dec(u64::from(secs));
    print(b" s\n");
    let hz = calibrate_tsc().unwrap_or_else(|| {
        print(b"nmvm-guest: PIT calibration failed, assuming a 2 GHz TSC\n");
        FALLBACK_TSC_HZ
    });
    let ticks = hz.saturating_mul(u64::from(secs));
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < ticks {
        pause();
    }
}

fn count_cpus(mem: &GuestMem) -> u32 {
    match mptable::count_cpus(mem) {
        Ok(n) => n.max(1),
        Err(MpError::NotFound) => 1,
        Err(e) => {
            print(b"nmvm-guest: MP table ignored: ");
            print(e.as_str().as_bytes());
            print(b"\n");
            1
        }
    }
}

/// The memory the virtio-net driver shares with the device: rings and buffers, in .bss (so
/// inside the image the VMM loaded, which the e820 map is checked to cover), identity-mapped.
#[repr(C, align(4096))]
struct DmaArea(UnsafeCell<[u8; DMA_SIZE]>);

// SAFETY: the guest runs on one vCPU without interrupt handlers, so there is no concurrent
// Rust access; the area is only reached through raw pointers in `Machine`, whose accessors
// check every range (the device's concurrent access is what the virtio protocol governs).
unsafe impl Sync for DmaArea {}

static DMA_AREA: DmaArea = DmaArea(UnsafeCell::new([0; DMA_SIZE]));

/// The bare-metal machine as the virtio-net driver sees it.
struct Machine {
    tsc_hz: u64,
    dma_base: u64,
    /// The netmap region (`path=netmap`): base and length, 0 until mapped.
    region_base: u64,
    region_len: u64,
    /// TSC at the first and the last [`Hw::mark`] (0: none yet).
    first_mark: u64,
    last_mark: u64,
    /// `secs=` in ticks (0: no limit).
    limit: u64,
}

impl Machine {
    /// `addr` as a pointer to a `T` inside the DMA area, if the whole `T` is inside it and
    /// `addr` is aligned for `T`.
    /// (One subtraction, one comparison and one test: this is on every ring access.)
    fn dma_ptr<T>(&self, addr: u64) -> Option<*mut T> {
        const { assert!(core::mem::size_of::<T>() <= DMA_SIZE) };
        let last = (DMA_SIZE - core::mem::size_of::<T>()) as u64;
        let align = core::mem::align_of::<T>() as u64;
        // An address below the base wraps to a huge offset and fails the comparison.
        let off = addr.wrapping_sub(self.dma_base);
        (off <= last && addr & (align - 1) == 0).then_some(addr as usize as *mut T)
    }

    /// `addr` as a pointer to a naturally aligned `T` inside the netmap region, if it is one.
    fn region_ptr<T>(&self, addr: u64) -> Option<*mut T> {
        let size = core::mem::size_of::<T>() as u64;
        let off = addr.wrapping_sub(self.region_base);
        let fits = self.region_len >= size && off <= self.region_len - size;
        (fits && addr % size == 0).then_some(addr as usize as *mut T)
    }

    /// `addr` as a pointer to a naturally aligned `T` register in the PCI hole, if it is one.
    fn mmio_ptr<T>(addr: u64) -> Option<*mut T> {
        let size = core::mem::size_of::<T>() as u64;
        (addr >= MMIO_HOLE_START && addr.checked_add(size)? <= MMIO_HOLE_END && addr % size == 0)
            .then_some(addr as usize as *mut T)
    }

    /// Selects configuration register `reg` of 00:dev.0 on the address port.
    fn pci_select(dev: u8, reg: u8) {
        // SAFETY: writing the conf1 address port only selects a register; no memory effect.
        unsafe { outl(PCI_CONFIG_ADDRESS, conf1_address(0, dev, 0, reg)) }
    }
}

impl Sink for Machine {
    fn write(&mut self, bytes: &[u8]) {
        Serial.write(bytes);
    }
}

impl PciConfig for Machine {
    fn pci_read32(&mut self, dev: u8, reg: u8) -> u32 {
        Self::pci_select(dev, reg);
        // SAFETY: reading the conf1 data port returns the selected register; no memory effect.
        unsafe { inl(PCI_CONFIG_DATA) }
    }

    fn pci_write32(&mut self, dev: u8, reg: u8, val: u32) {
        Self::pci_select(dev, reg);
        // SAFETY: writes the selected configuration register (BAR sizing and restoring only);
        // no effect on memory Rust can see.
        unsafe { outl(PCI_CONFIG_DATA, val) }
    }

    fn pci_write16(&mut self, dev: u8, reg: u8, val: u16) {
        Self::pci_select(dev, reg);
        // SAFETY: writes the selected 16-bit register (the command register) through the data
        // port's matching half; the device may then decode its BAR and DMA into the area the
        // driver gives it, which Rust reaches only through `Machine`'s raw pointers.
        unsafe { outw(PCI_CONFIG_DATA + u16::from(reg & 2), val) }
    }
}

macro_rules! mmio_access {
    ($read:ident, $write:ident, $t:ty) => {
        fn $read(&mut self, addr: u64) -> $t {
            match Self::mmio_ptr::<$t>(addr) {
                // SAFETY: the address is an aligned register in the PCI hole (device MMIO in the
                // identity map, never RAM), read once with exactly this width.
                Some(p) => unsafe { p.read_volatile() },
                None => <$t>::MAX,
            }
        }

        fn $write(&mut self, addr: u64, val: $t) {
            if let Some(p) = Self::mmio_ptr::<$t>(addr) {
                // SAFETY: as for the read: an aligned device register, not memory Rust owns.
                unsafe { p.write_volatile(val) }
            }
        }
    };
}

impl Mmio for Machine {
    mmio_access!(mmio_read8, mmio_write8, u8);
    mmio_access!(mmio_read16, mmio_write16, u16);
    mmio_access!(mmio_read32, mmio_write32, u32);
}

impl Dma for Machine {
    fn dma_read16(&self, addr: u64) -> u16 {
        // SAFETY: `dma_ptr` checked that the aligned u16 lies inside DMA_AREA, which nothing
        // else in Rust references; the device may write it, hence the volatile read.
        self.dma_ptr::<u16>(addr)
            .map_or(0, |p| unsafe { p.read_volatile() })
    }

    fn dma_read32(&self, addr: u64) -> u32 {
        // SAFETY: as in `dma_read16`, for an aligned u32.
        self.dma_ptr::<u32>(addr)
            .map_or(0, |p| unsafe { p.read_volatile() })
    }

    fn dma_write16(&mut self, addr: u64, val: u16) {
        if let Some(p) = self.dma_ptr::<u16>(addr) {
            // SAFETY: an aligned u16 inside DMA_AREA (checked), written once, volatile so the
            // device sees exactly this store.
            unsafe { p.write_volatile(val) }
        }
    }

    fn dma_write32(&mut self, addr: u64, val: u32) {
        if let Some(p) = self.dma_ptr::<u32>(addr) {
            // SAFETY: as in `dma_write16`, for an aligned u32.
            unsafe { p.write_volatile(val) }
        }
    }

    fn dma_write64(&mut self, addr: u64, val: u64) {
        if let Some(p) = self.dma_ptr::<u64>(addr) {
            // SAFETY: as in `dma_write16`, for an aligned u64 (half a descriptor, written while
            // the descriptor is the driver's).
            unsafe { p.write_volatile(val) }
        }
    }

    fn dma_bytes(&mut self, addr: u64, len: usize) -> &mut [u8] {
        match self.dma_ptr::<[u8; 0]>(addr) {
            Some(p) if (addr - self.dma_base).saturating_add(len as u64) <= DMA_SIZE as u64 => {
                // SAFETY: [addr, addr + len) lies inside DMA_AREA (checked). The slice borrows
                // `self` mutably, and `Machine` is the only way to DMA_AREA, so no other Rust
                // reference to these bytes exists while it lives; the driver asks only for
                // buffers and rings the device does not own at the time.
                unsafe { core::slice::from_raw_parts_mut(p.cast::<u8>(), len) }
            }
            _ => &mut [],
        }
    }

    fn dma_copy(&mut self, src: u64, dst: u64, len: usize) {
        let end_ok = |a: u64| {
            a.checked_sub(self.dma_base)
                .and_then(|off| off.checked_add(len as u64))
                .is_some_and(|end| end <= DMA_SIZE as u64)
        };
        let disjoint =
            src.saturating_add(len as u64) <= dst || dst.saturating_add(len as u64) <= src;
        if end_ok(src) && end_ok(dst) && disjoint {
            // SAFETY: both ranges lie inside DMA_AREA (checked) and do not overlap (checked);
            // both are buffers the device has returned to the driver.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    src as usize as *const u8,
                    dst as usize as *mut u8,
                    len,
                )
            }
        }
    }

    fn full_barrier(&self) {
        // A locked read-modify-write that changes nothing: a full fence on x86 without SSE2's
        // MFENCE, and (no `nomem`) a compiler barrier too.
        // SAFETY: `lock or [rsp], 0` rewrites the stack slot at rsp with its own value.
        unsafe { asm!("lock or dword ptr [rsp], 0", options(nostack)) }
    }
}

impl Region for Machine {
    /// Only inside the PCI hole, where nmvm places its BARs: that is inside the boot page
    /// tables' identity map (no mapping of our own is needed; the region is RAM on the host
    /// side, so the default write-back type is right), and it is never RAM of ours (the image,
    /// the stack and DMA_AREA are e820 RAM below the hole).
    fn region_map(&mut self, base: u64, len: u64) -> bool {
        let ok = len != 0
            && base >= MMIO_HOLE_START
            && base
                .checked_add(len)
                .is_some_and(|end| end <= MMIO_HOLE_END);
        if ok {
            self.region_base = base;
            self.region_len = len;
        }
        ok
    }

    fn region_read32(&self, addr: u64) -> u32 {
        // SAFETY: `region_ptr` checked that the aligned u32 lies inside the region, which
        // `region_map` accepted only in the identity-mapped PCI hole, away from anything Rust
        // owns. nmvm and the port's peer may write it at any time, hence the volatile read.
        self.region_ptr::<u32>(addr)
            .map_or(0, |p| unsafe { p.read_volatile() })
    }

    fn region_read64(&self, addr: u64) -> u64 {
        // SAFETY: as in `region_read32`, for an aligned u64 (one access: x86-64 reads an
        // aligned quadword atomically).
        self.region_ptr::<u64>(addr)
            .map_or(0, |p| unsafe { p.read_volatile() })
    }

    fn region_write32(&mut self, addr: u64, val: u32) {
        if let Some(p) = self.region_ptr::<u32>(addr) {
            // SAFETY: an aligned u32 inside the region (checked), memory no Rust object
            // lives in; volatile, so nmvm sees exactly this store, in program order.
            unsafe { p.write_volatile(val) }
        }
    }

    fn region_bytes(&mut self, addr: u64, len: usize) -> &mut [u8] {
        let off = addr.wrapping_sub(self.region_base);
        // Nothing before `region_map` (the pointer would be null even for an empty slice).
        if self.region_len == 0 || off > self.region_len || (len as u64) > self.region_len - off {
            return &mut [];
        }
        // SAFETY: [addr, addr + len) lies inside the region (checked), which is identity-mapped
        // memory outside everything Rust owns. The slice borrows `self` mutably, and `Machine`
        // is the only way to the region, so no other Rust reference to these bytes exists
        // while it lives; the netmap driver asks only for buffers of slots the protocol gives
        // the guest at the time, which nmvm does not touch (a misbehaving peer can at worst
        // change the bytes we check or send).
        unsafe { core::slice::from_raw_parts_mut(addr as usize as *mut u8, len) }
    }
}

impl Hw for Machine {
    fn relax(&mut self) {
        pause();
    }

    fn ticks(&mut self) -> u64 {
        rdtsc()
    }

    fn ticks_per_sec(&self) -> u64 {
        self.tsc_hz
    }

    fn dma_area(&self) -> (u64, usize) {
        (self.dma_base, DMA_SIZE)
    }

    fn mark(&mut self) {
        self.last_mark = rdtsc();
        if self.first_mark == 0 {
            self.first_mark = self.last_mark;
        }
    }

    fn expired(&mut self) -> bool {
        self.limit != 0
            && self.first_mark != 0
            && rdtsc().wrapping_sub(self.first_mark) > self.limit
    }
}

/// Runs a `net=` mode on `path` and ends the VM: status 0 after the rate and counters lines,
/// 3 after a one-line reason. `dma_in_ram` is the core's check that DMA_AREA lies in e820
/// RAM (the zero page is not the appliance's to read).
fn run_net(config: &Config, dma_in_ram: bool) -> ! {
    let base = DMA_AREA.0.get() as usize as u64;
    if !dma_in_ram {
        print(b"nmvm-guest: virtio: DMA area not in e820 RAM at ");
        Serial.write_hex(base);
        print(b"\n");
        exit(NET_FAILURE);
    }
    let Some(mode) = config.net else {
        exit(NET_FAILURE)
    };
    let tsc_hz = calibrate_tsc().unwrap_or_else(|| {
        print(b"nmvm-guest: PIT calibration failed, assuming a 2 GHz TSC\n");
        FALLBACK_TSC_HZ
    });
    let mut machine = Machine {
        tsc_hz,
        dma_base: base,
        region_base: 0,
        region_len: 0,
        first_mark: 0,
        last_mark: 0,
        limit: config
            .secs
            .map_or(0, |s| tsc_hz.saturating_mul(u64::from(s))),
    };
    let result = match config.path {
        NetPath::Virtio => net::run(&mut machine, mode, config.count, config.len),
        NetPath::Netmap => netmap::run(&mut machine, mode, config.count, config.len),
    };
    match result {
        Ok(counters) => {
            let frames = match mode {
                NetMode::Gen => counters.tx,
                NetMode::Echo | NetMode::Sink => counters.rx,
                NetMode::Hostile => 0,
            };
            let span = machine.last_mark.wrapping_sub(machine.first_mark);
            write_rate(&mut Serial, frames, span, tsc_hz);
            net::write_counters(&mut Serial, mode, &counters);
            exit(0)
        }
        Err(e) => {
            e.write(&mut Serial);
            exit(NET_FAILURE)
        }
    }
}

/// What the core hands the appliance.
struct UserArgs {
    config: Config,
    dma_in_ram: bool,
}

/// The appliance: everything after the core's set-up, at CPL 3 (or at CPL 0 with
/// `mode=kernel` and for the `fault=` modes).
fn appliance(args: &UserArgs) -> ! {
    let config = &args.config;
    if config.wait_secs != 0 {
        wait_seconds(config.wait_secs);
    }
    if config.net.is_some() {
        run_net(config, args.dma_in_ram);
    }
    match config.exit {
        Exit::Status(n) => exit(n),
        Exit::Reset => reset(),
    }
}

/// The appliance's entry at CPL 3: `args` points into the core's boot stack frame, which
/// stays live (the core never returns) and lies in user pages.
extern "C" fn user_main(args: *const UserArgs) -> ! {
    // SAFETY: `enter_user_mode` passes a pointer to a live, initialised `UserArgs` that
    // nothing writes any more.
    let args = unsafe { &*args };
    appliance(args)
}

extern "C" fn guest_main(zero_page_addr: u64) -> ! {
    let bp = BootParams::new(zero_page(zero_page_addr));
    let mem = GuestMem { bp };

    let mut cmdline_buf = [0u8; CMDLINE_MAX];
    let cmdline_len = bp.cmdline_addr().map_or(0, |addr| {
        read_cmdline(&mem, addr, bp.cmdline_limit(), &mut cmdline_buf)
    });
    let cmdline = cmdline_buf.get(..cmdline_len).unwrap_or(&[]);

    let cpus = count_cpus(&mem);
    write_ready_line(&mut Serial, VERSION, bp.ram_bytes(), cpus, cmdline);

    let config = match parse_cmdline(cmdline) {
        Ok(c) => c,
        Err(word) => {
            print(b"nmvm-guest: bad value in \"");
            print(word);
            print(b"\"\n");
            exit(2)
        }
    };
    let base = DMA_AREA.0.get() as usize as u64;
    let args = UserArgs {
        config,
        dma_in_ram: bp.e820().any(|e| {
            e.kind == boot_params::E820_RAM && e.addr <= base && base + DMA_SIZE as u64 <= e.end()
        }),
    };

    // The fault modes test the kernel-mode core, as before the split: stay at CPL 0.
    if let Some(fault) = config.fault {
        if config.wait_secs != 0 {
            wait_seconds(config.wait_secs);
        }
        match fault {
            Fault::Panic => {
                print(b"Kernel panic - not syncing: nmvm-guest fault=panic\n");
                spin_forever()
            }
            Fault::Triple => triple_fault(),
            Fault::Sse => {
                sse_instruction();
                print(b"nmvm-guest: the SSE instruction did not stop the VM\n");
            }
        }
        match config.exit {
            Exit::Status(n) => exit(n),
            Exit::Reset => reset(),
        }
    }
    if config.mode == RunMode::Kernel {
        appliance(&args)
    }
    enter_user_mode(&args)
}

// ---- The kernel-mode core's tables and the drop to CPL 3 -------------------------------------

/// Bytes of the stack exceptions run on (TSS `rsp0`).
const EXCEPTION_STACK: usize = 16 * 1024;

/// The core's tables, in the `.kdata` pages (see link.ld) that no user page maps.
#[repr(C, align(4096))]
struct KernelData {
    pml4: [u64; 512],
    pdpt: [u64; 512],
    /// The first GiB (entry 0 is the page table below); the second and third stay absent.
    pd0: [u64; 512],
    /// The fourth GiB (the PCI hole), a constant.
    pd3: [u64; 512],
    /// The first 2 MiB in 4 KiB pages.
    pt: [u64; 512],
    idt: [[u64; 2]; VECTORS],
    gdt: [u64; 7],
    tss: [u8; TSS_BYTES],
    stack: [u8; EXCEPTION_STACK],
}

struct KernelCell(UnsafeCell<KernelData>);

// SAFETY: only the core touches it: once in `enter_user_mode` before the drop to CPL 3, on one
// vCPU with interrupts off; the CPU reads it afterwards (tables, TSS, IDT), and the user pages
// never map it.
unsafe impl Sync for KernelCell {}

#[link_section = ".kdata"]
static KERNEL: KernelCell = KernelCell(UnsafeCell::new(KernelData {
    pml4: [0; 512],
    pdpt: [0; 512],
    pd0: [0; 512],
    pd3: usermode::pd3_table(),
    pt: [0; 512],
    idt: [[0; 2]; VECTORS],
    gdt: usermode::GDT_TEMPLATE,
    tss: usermode::tss_template(),
    stack: [0; EXCEPTION_STACK],
}));

extern "C" {
    static __image_start: u8;
    static __kernel_start: u8;
    static __kernel_end: u8;
    static __image_end: u8;
    static __user_stack_top: u8;
    /// The 32 exception entry points (global_asm below).
    static nmvm_exc_stubs: [u64; VECTORS];
}

/// The address of a linker-script symbol.
macro_rules! sym_addr {
    ($s:ident) => {
        // Only the address of the linker symbol is taken; nothing is read through it.
        core::ptr::addr_of!($s) as usize as u64
    };
}

/// Loads a 10-byte descriptor-table register image with `lgdt` or `lidt`.
fn table_register(base: u64, bytes: usize) -> [u16; 5] {
    let limit = bytes.saturating_sub(1) as u16;
    [
        limit,
        base as u16,
        (base >> 16) as u16,
        (base >> 32) as u16,
        (base >> 48) as u16,
    ]
}

/// Builds the core's tables, loads them and drops to CPL 3 in [`user_main`].
fn enter_user_mode(args: &UserArgs) -> ! {
    let layout = Layout {
        image_start: sym_addr!(__image_start),
        kernel_start: sym_addr!(__kernel_start),
        kernel_end: sym_addr!(__kernel_end),
        image_end: sym_addr!(__image_end),
    };
    if !layout.valid() {
        print(b"nmvm-guest: image layout unusable for user mode, kernel end ");
        Serial.write_hex(layout.kernel_end);
        print(b"\n");
        exit(usermode::EXCEPTION_STATUS)
    }
    let k = KERNEL.0.get();
    // SAFETY: see `KernelCell`: this is the only reference to KERNEL, taken once, on one vCPU
    // with interrupts off, before anything (the CPU included) uses the tables.
    let k = unsafe { &mut *k };
    let addr = |p: *const u64| p as usize as u64;
    let pt = addr(k.pt.as_ptr());
    layout.fill(&mut k.pt, &mut k.pd0, pt);
    k.pdpt[0] = usermode::table_entry(addr(k.pd0.as_ptr()));
    k.pdpt[3] = usermode::table_entry(addr(k.pd3.as_ptr()));
    k.pml4[0] = usermode::table_entry(addr(k.pdpt.as_ptr()));

    let stack_top = (k.stack.as_ptr() as usize as u64 + EXCEPTION_STACK as u64) & !15;
    usermode::set_rsp0(&mut k.tss, stack_top);
    let [lo, hi] = usermode::tss_descriptor(k.tss.as_ptr() as usize as u64, TSS_BYTES as u32 - 1);
    k.gdt[5] = lo;
    k.gdt[6] = hi;
    // SAFETY: the stub table is a constant array in .rodata, emitted by the global_asm below.
    let stubs = unsafe { &*core::ptr::addr_of!(nmvm_exc_stubs) };
    for (gate, &stub) in k.idt.iter_mut().zip(stubs) {
        *gate = usermode::idt_gate(stub);
    }
    let gdtr = table_register(addr(k.gdt.as_ptr()), core::mem::size_of_val(&k.gdt));
    let idtr = table_register(
        k.idt.as_ptr() as usize as u64,
        core::mem::size_of_val(&k.idt),
    );
    let cr3 = addr(k.pml4.as_ptr());

    // SAFETY: the GDT keeps a 64-bit kernel code segment at KERNEL_CODE, so the far return
    // lands on the next instruction in the same mode; the data selectors are valid; the TSS
    // descriptor names the TSS in KERNEL; the IDT's gates name the stubs below; the new page
    // tables identity-map everything the core still uses (its image: code, stacks, KERNEL)
    // as the boot tables did. The `iretq` frame enters `user_main` at CPL 3 on
    // the user stack (user pages) with IF clear, with `args` (in the boot stack, user pages
    // too, kept live because this never returns) in rdi.
    unsafe {
        asm!(
            "lgdt [{gdtr}]",
            "push {kcode}",
            "lea rax, [rip + 2f]",
            "push rax",
            // retfq: REX.W far return, reloading CS from the new GDT.
            ".byte 0x48, 0xcb",
            "2:",
            "mov eax, {kdata}",
            "mov ss, eax",
            "mov ds, eax",
            "mov es, eax",
            "xor eax, eax",
            "mov fs, eax",
            "mov gs, eax",
            "mov eax, {tss}",
            "ltr ax",
            "lidt [{idtr}]",
            "mov cr3, {cr3}",
            "push {udata}",
            "push {ustack}",
            "push 2",
            "push {ucode}",
            "push {entry}",
            "iretq",
            gdtr = in(reg) gdtr.as_ptr(),
            idtr = in(reg) idtr.as_ptr(),
            cr3 = in(reg) cr3,
            ustack = in(reg) sym_addr!(__user_stack_top),
            entry = in(reg) user_main as usize as u64,
            // Scratch (no outputs with `noreturn`): its value is not needed.
            in("rax") 0u64,
            kcode = const sel::KERNEL_CODE,
            kdata = const sel::KERNEL_DATA,
            tss = const sel::TSS,
            udata = const sel::USER_DATA,
            ucode = const sel::USER_CODE,
            in("rdi") args as *const UserArgs,
            options(noreturn)
        )
    }
}

// The exception entry points: each pushes a zero error code where the CPU pushes none, then its
// vector, and joins the common path, which saves the registers a service request uses and
// calls `exception_entry` with the frame: [rax, rdi, rsi, vector, error, rip, cs, rflags, rsp,
// ss]. Nothing returns: the core either performs the service (which ends the VM) or reports
// the exception and ends the VM.
global_asm!(
    r#".section .text.nmvm_exc, "ax", @progbits"#,
    r".irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31",
    r"nmvm_exc_\v:",
    r"push 0",
    r"push \v",
    r"jmp nmvm_exc_common",
    r".endr",
    r".irp v, 8,10,11,12,13,14,17,21,29,30",
    r"nmvm_exc_\v:",
    r"push \v",
    r"jmp nmvm_exc_common",
    r".endr",
    r"nmvm_exc_common:",
    r"push rsi",
    r"push rdi",
    r"push rax",
    r"mov rdi, rsp",
    r"and rsp, -16",
    r"call {entry}",
    r"ud2",
    r#".section .rodata.nmvm_exc, "a", @progbits"#,
    r".balign 8",
    r".global nmvm_exc_stubs",
    r"nmvm_exc_stubs:",
    r".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    r".quad nmvm_exc_\v",
    r".endr",
    r".text",
    entry = sym exception_entry,
);

/// The core's exception handler (CPL 0, on `rsp0` when the appliance was interrupted).
extern "C" fn exception_entry(frame: *const [u64; 10]) -> ! {
    // SAFETY: the common stub passes the address of the ten quadwords it and the CPU pushed.
    let [rax, rdi, _rsi, vector, error, rip, cs, _rflags, _rsp, _ss] = unsafe { *frame };
    let user_text = sym_addr!(__image_start)..sym_addr!(__kernel_start).saturating_sub(1);
    let insn = if cs & 3 == 3 && user_text.contains(&rip) {
        // SAFETY: rip lies in the image's text and rodata (checked), which is mapped and
        // readable; two bytes at it and after it are inside the image.
        unsafe {
            let p = rip as usize as *const u8;
            [p.read_volatile(), p.add(1).read_volatile()]
        }
    } else {
        [0, 0]
    };
    match usermode::classify(vector, cs, rax, rdi, insn) {
        Trap::Service(usermode::SERVICE_RESET) => core_reset(),
        Trap::Service(_) | Trap::Fault => {
            let cr2: u64;
            // SAFETY: reading CR2 at CPL 0 has no effect.
            unsafe { asm!("mov {0}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
            let report = ExceptionReport {
                vector,
                error,
                rip,
                cs,
                cr2,
            };
            usermode::write_exception(&mut Serial, &report);
            exit(usermode::EXCEPTION_STATUS)
        }
    }
}

#[panic_handler]
fn panic(_info: &PanicInfo) -> ! {
    print(b"nmvm-guest: panic\n");
    exit(255)
}

// The C memory primitives the compiler calls on its own. They are written with string
// instructions in inline assembly so that LLVM cannot recognise them as a memset/memcpy
// idiom and turn their bodies into calls to themselves.

/// # Safety
/// Standard C `memcpy` contract: valid, non-overlapping ranges of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes; DF is clear (set in
    // `_start` and never changed outside `memmove`, which restores it).
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
            options(nostack, preserves_flags)
        )
    };
    dst
}

/// # Safety
/// Standard C `memmove` contract: valid ranges of `n` bytes, which may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // dst is below src or the ranges are disjoint: a forward copy never reads a byte it
        // has already overwritten.
        // SAFETY: forwarded contract, and forward order is correct for this overlap.
        unsafe { memcpy(dst, src, n) }
    } else if n != 0 {
        // dst overlaps the tail of src: copy backwards, from the last byte down.
        // SAFETY: the caller guarantees both ranges are valid for `n` bytes (n > 0, so the
        // last-byte pointers are in range); DF is restored before the block ends.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dst.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            )
        };
        dst
    } else {
        dst
    }
}

/// # Safety
/// Standard C `memset` contract: a valid range of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid for `n` bytes; DF is clear.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
            options(nostack, preserves_flags)
        )
    };
    dst
}

/// # Safety
/// Standard C `memcmp` contract: valid ranges of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, and the caller guarantees both ranges are valid for `n` bytes.
        let (x, y) = unsafe { (a.add(i).read(), b.add(i).read()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard `bcmp` contract (LLVM emits it for equality-only comparisons): as `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp, forwarded unchanged.
    unsafe { memcmp(a, b, n) }
}
