//! The bundled nmvm guest: a bare-metal x86-64 program entered through the Linux 64-bit boot
//! protocol (long mode, first 4 GiB identity-mapped, `%rsi` = zero page).
//!
//! Its kernel-mode code runs under an instruction emulator that lacks SSE, INT3, POPCNT and
//! more (DESIGN.md §3), so everything here is integer-only, never touches `core::fmt`, and
//! has no run-time panic path. The parsing, the frame code and the virtio-net driver live in
//! the library, where they are unit-tested; this file supplies the hardware they drive.

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::panic::PanicInfo;

use nmvm_guest::mptable::{self, MpError};
use nmvm_guest::net::{self, Hw, DMA_SIZE};
use nmvm_guest::netmap::{self, Region};
use nmvm_guest::virtio::pci::{conf1_address, MMIO_HOLE_END, MMIO_HOLE_START};
use nmvm_guest::virtio::{Dma, Mmio, PciConfig};
use nmvm_guest::{
    boot_params, parse_cmdline, read_cmdline, tsc_hz, write_ready_line, BootParams, Exit, Fault,
    FrameLen, NetMode, NetPath, PhysMem, Sink, CMDLINE_MAX, IDENTITY_MAPPED_END,
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

/// Stops for good with interrupts off; `hlt` would not do, because with an in-kernel irqchip
/// it never reaches the VMM, and the loop costs the emulator nothing it notices.
fn spin_forever() -> ! {
    loop {
        // SAFETY: CLI only masks maskable interrupts, which this guest never handles anyway.
        unsafe { asm!("cli", options(nomem, nostack)) }
        pause();
    }
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
}

/// Runs a `net=` mode on `path` and ends the VM: status 0 after the counters line, 3 after a
/// one-line reason.
fn run_net(
    bp: &BootParams<'_>,
    mode: NetMode,
    path: NetPath,
    count: Option<u64>,
    len: FrameLen,
) -> ! {
    let base = DMA_AREA.0.get() as usize as u64;
    let in_ram = bp.e820().any(|e| {
        e.kind == boot_params::E820_RAM && e.addr <= base && base + DMA_SIZE as u64 <= e.end()
    });
    if !in_ram {
        print(b"nmvm-guest: virtio: DMA area not in e820 RAM at ");
        Serial.write_hex(base);
        print(b"\n");
        exit(NET_FAILURE);
    }
    let tsc_hz = calibrate_tsc().unwrap_or_else(|| {
        print(b"nmvm-guest: PIT calibration failed, assuming a 2 GHz TSC\n");
        FALLBACK_TSC_HZ
    });
    let mut machine = Machine {
        tsc_hz,
        dma_base: base,
        region_base: 0,
        region_len: 0,
    };
    let result = match path {
        NetPath::Virtio => net::run(&mut machine, mode, count, len),
        NetPath::Netmap => netmap::run(&mut machine, mode, count, len),
    };
    match result {
        Ok(counters) => {
            net::write_counters(&mut Serial, mode, &counters);
            exit(0)
        }
        Err(e) => {
            e.write(&mut Serial);
            exit(NET_FAILURE)
        }
    }
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

    if config.wait_secs != 0 {
        wait_seconds(config.wait_secs);
    }

    match config.fault {
        Some(Fault::Panic) => {
            print(b"Kernel panic - not syncing: nmvm-guest fault=panic\n");
            spin_forever()
        }
        Some(Fault::Triple) => triple_fault(),
        Some(Fault::Sse) => {
            sse_instruction();
            print(b"nmvm-guest: the SSE instruction did not stop the VM\n");
        }
        None => {}
    }

    if let Some(mode) = config.net {
        run_net(&bp, mode, config.path, config.count, config.len);
    }

    match config.exit {
        Exit::Status(n) => exit(n),
        Exit::Reset => reset(),
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
