//! The host-testable parts of the bundled nmvm guest.
//!
//! Everything here works on byte slices or through small traits ([`PhysMem`], for the
//! virtio-net driver [`virtio::PciConfig`], [`virtio::Mmio`], [`virtio::Dma`], [`net::Hw`], and
//! for the netmap passthrough path [`netmap::Region`]),
//! so the same code that runs on bare metal is unit-tested on the host, the driver against a
//! simulated virtio-net device. The bare-metal binary (`main.rs`) only adds the entry point,
//! port I/O, MMIO and DMA accessors and the CPU-specific actions.
//!
//! Command-line words: `exit=N|reset`, `wait=S`, `fault=panic|triple|sse`, and the packet
//! modes `net=echo|sink|gen|hostile` with `count=N`, `len=L` / `len=MIN-MAX` and
//! `path=virtio|netmap` (see [`net`], [`netmap`] and [`frame`]), `secs=S` (end a packet mode
//! S seconds after its first frame) and `mode=kernel|user` (where the appliance runs: at CPL 3
//! by default, see [`usermode`]).
//!
//! Constraints inherited from the guest's execution environment (see DESIGN.md §3): no
//! `core::fmt`, no floating point, and no code path that can panic. Every access below is
//! therefore `get()`-based or uses checked arithmetic, and division only ever happens by
//! non-zero constants.

#![cfg_attr(not(test), no_std)]

pub mod frame;
pub mod net;
pub mod netmap;
pub mod usermode;
pub mod virtio;

/// Offsets and helpers for the Linux `boot_params` "zero page".
pub mod boot_params {
    /// Size of `struct boot_params`.
    pub const SIZE: usize = 4096;
    /// `ext_cmd_line_ptr`: the high 32 bits of the command line address.
    pub const EXT_CMD_LINE_PTR: usize = 0x0C8;
    /// `e820_entries`: number of valid entries in `e820_table`.
    pub const E820_ENTRIES: usize = 0x1E8;
    /// `hdr.cmd_line_ptr`: the low 32 bits of the command line address.
    pub const CMD_LINE_PTR: usize = 0x228;
    /// `hdr.cmdline_size`: the longest command line the VMM may have written.
    pub const CMDLINE_SIZE: usize = 0x238;
    /// `e820_table`: `E820_MAX` entries of [`E820_ENTRY_SIZE`] bytes.
    pub const E820_TABLE: usize = 0x2D0;
    /// Capacity of `e820_table`.
    pub const E820_MAX: usize = 128;
    /// Size of one packed `struct boot_e820_entry`.
    pub const E820_ENTRY_SIZE: usize = 20;
    /// e820 type of usable RAM.
    pub const E820_RAM: u32 = 1;
}

/// The longest command line the guest will read, whatever the zero page claims.
pub const CMDLINE_MAX: usize = 4096;

/// Only the first 4 GiB are identity-mapped when the guest starts.
pub const IDENTITY_MAPPED_END: u64 = 1 << 32;

/// Reads a little-endian `u8`/`u16`/`u32`/`u64` from `bytes` at `off`, `None` when out of range.
fn le_bytes<const N: usize>(bytes: &[u8], off: usize) -> Option<[u8; N]> {
    let end = off.checked_add(N)?;
    let src = bytes.get(off..end)?;
    let mut out = [0u8; N];
    // A manual loop, not copy_from_slice: the latter carries a length-mismatch panic path.
    for (d, s) in out.iter_mut().zip(src) {
        *d = *s;
    }
    Some(out)
}

/// Little-endian `u16` at `off` in `bytes`.
pub fn le_u16(bytes: &[u8], off: usize) -> Option<u16> {
    le_bytes::<2>(bytes, off).map(u16::from_le_bytes)
}

/// Little-endian `u32` at `off` in `bytes`.
pub fn le_u32(bytes: &[u8], off: usize) -> Option<u32> {
    le_bytes::<4>(bytes, off).map(u32::from_le_bytes)
}

/// Little-endian `u64` at `off` in `bytes`.
pub fn le_u64(bytes: &[u8], off: usize) -> Option<u64> {
    le_bytes::<8>(bytes, off).map(u64::from_le_bytes)
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest-physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// e820 type (1 = RAM).
    pub kind: u32,
}

impl E820Entry {
    /// Exclusive end address, saturating so that a bogus entry cannot wrap around.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// A read-only view of a `boot_params` zero page.
#[derive(Clone, Copy)]
pub struct BootParams<'a> {
    bytes: &'a [u8],
}

impl<'a> BootParams<'a> {
    /// Wraps the bytes of a zero page; a short slice just makes the missing fields read as absent.
    pub fn new(bytes: &'a [u8]) -> Self {
        BootParams { bytes }
    }

    /// Guest-physical address of the command line, `None` when the VMM gave none.
    pub fn cmdline_addr(&self) -> Option<u64> {
        let lo = u64::from(le_u32(self.bytes, boot_params::CMD_LINE_PTR)?);
        let hi = u64::from(le_u32(self.bytes, boot_params::EXT_CMD_LINE_PTR).unwrap_or(0));
        let addr = (hi << 32) | lo;
        (addr != 0).then_some(addr)
    }

    /// How many command-line bytes may be read: `cmdline_size` when set, capped at
    /// [`CMDLINE_MAX`]. VMMs differ on whether they fill `cmdline_size` in, so 0 means "unknown".
    pub fn cmdline_limit(&self) -> usize {
        match le_u32(self.bytes, boot_params::CMDLINE_SIZE) {
            Some(0) | None => CMDLINE_MAX,
            Some(n) => usize::try_from(n).map_or(CMDLINE_MAX, |n| n.min(CMDLINE_MAX)),
        }
    }

    /// The valid e820 entries (count capped at the table's capacity and the slice's length).
    pub fn e820(&self) -> impl Iterator<Item = E820Entry> + 'a {
        let bytes = self.bytes;
        let count = bytes
            .get(boot_params::E820_ENTRIES)
            .map_or(0, |&n| usize::from(n).min(boot_params::E820_MAX));
        (0..count).map_while(move |i| {
            let off = boot_params::E820_TABLE + i * boot_params::E820_ENTRY_SIZE;
            Some(E820Entry {
                addr: le_u64(bytes, off)?,
                size: le_u64(bytes, off + 8)?,
                kind: le_u32(bytes, off + 16)?,
            })
        })
    }

    /// Total usable RAM: the sum of the sizes of the type-1 entries.
    pub fn ram_bytes(&self) -> u64 {
        self.e820()
            .filter(|e| e.kind == boot_params::E820_RAM)
            .fold(0u64, |acc, e| acc.saturating_add(e.size))
    }

    /// Whether `[addr, addr + len)` is safe to read: inside the identity map, not touching
    /// address 0, and either in the first MiB (memory on every PC-style VM, where the MP table
    /// lives) or within one range the e820 map describes, RAM or reserved (the VMM marks the
    /// MP table's area reserved, but it is memory). MMIO holes are in no e820 range.
    pub fn readable(&self, addr: u64, len: u64) -> bool {
        const LOW_MEMORY_END: u64 = 0x10_0000;
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        if addr == 0 || end > IDENTITY_MAPPED_END {
            return false;
        }
        end <= LOW_MEMORY_END || self.e820().any(|e| e.addr <= addr && end <= e.end())
    }
}

/// Memory size in MiB, to the nearest MiB. The VMM reserves the MP table's kilobyte and the
/// legacy hole below 1 MiB, so a 256 MiB VM has 256 MiB less 385 KiB of e820 RAM; rounding
/// down would report 255 for it.
pub fn ram_mib(ram_bytes: u64) -> u64 {
    ram_bytes.saturating_add(1 << 19) >> 20
}

/// Read access to guest-physical memory that refuses out-of-range addresses.
pub trait PhysMem {
    /// Fills `buf` from guest-physical `addr`; returns `false` (leaving `buf` unspecified)
    /// when any byte of the range is outside readable memory.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;

    /// Reads a little-endian `u16`.
    fn read_u16(&self, addr: u64) -> Option<u16> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b).then(|| u16::from_le_bytes(b))
    }

    /// Reads a little-endian `u32`.
    fn read_u32(&self, addr: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b).then(|| u32::from_le_bytes(b))
    }
}

/// Guest-physical memory seen as a byte slice that starts at `base` (used by the tests).
pub struct SliceMem<'a> {
    /// Guest-physical address of `bytes[0]`.
    pub base: u64,
    /// The memory contents.
    pub bytes: &'a [u8],
}

impl PhysMem for SliceMem<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let Some(off) = addr.checked_sub(self.base) else {
            return false;
        };
        let Ok(off) = usize::try_from(off) else {
            return false;
        };
        let Some(src) = off
            .checked_add(buf.len())
            .and_then(|end| self.bytes.get(off..end))
        else {
            return false;
        };
        for (d, s) in buf.iter_mut().zip(src) {
            *d = *s;
        }
        true
    }
}

/// Reads the NUL-terminated command line at `addr` into `buf`, at most `limit` bytes (and at
/// most `buf.len()`); returns the number of bytes read, without the NUL. Stops at the first
/// unreadable byte, so a line that runs off the end of memory is simply cut.
pub fn read_cmdline(mem: &impl PhysMem, addr: u64, limit: usize, buf: &mut [u8]) -> usize {
    let mut len = 0;
    for (i, slot) in buf.iter_mut().take(limit).enumerate() {
        let mut b = [0u8];
        let Some(a) = addr.checked_add(i as u64) else {
            break;
        };
        if !mem.read(a, &mut b) || b[0] == 0 {
            break;
        }
        *slot = b[0];
        len = i + 1;
    }
    len
}

/// Intel MultiProcessor Specification 1.4 tables.
pub mod mptable {
    use super::PhysMem;

    /// The two places the guest searches for the floating pointer structure: the last KiB of
    /// base memory (where the EBDA sits) and the BIOS ROM area.
    pub const SEARCH_AREAS: [(u64, u64); 2] = [(0x9_FC00, 0xA_0000), (0xF_0000, 0x10_0000)];
    /// "_MP_", read as a little-endian u32.
    pub const FLOATING_SIGNATURE: u32 = u32::from_le_bytes(*b"_MP_");
    /// "PCMP", read as a little-endian u32.
    pub const CONFIG_SIGNATURE: u32 = u32::from_le_bytes(*b"PCMP");
    /// Size of the floating pointer structure.
    pub const FLOATING_LEN: u64 = 16;
    /// Size of the configuration table header; entries follow it.
    pub const CONFIG_HEADER_LEN: u16 = 44;
    /// Processor entries are 20 bytes, every other base entry type is 8.
    pub const PROCESSOR_ENTRY_LEN: u16 = 20;
    /// Bus, I/O APIC, I/O interrupt and local interrupt entries.
    pub const OTHER_ENTRY_LEN: u16 = 8;

    /// Why an MP table that was found could not be used.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum MpError {
        /// No floating pointer with a valid checksum in the search areas.
        NotFound,
        /// The floating pointer announces a default configuration (no table).
        NoConfigTable,
        /// The configuration table pointer or length leaves readable memory.
        BadPointer,
        /// The configuration table has the wrong signature.
        BadSignature,
        /// The configuration table's length is shorter than its header.
        BadLength,
        /// The configuration table's bytes do not sum to zero.
        BadChecksum,
        /// An entry has an unknown type or runs past the table's end.
        BadEntry,
    }

    impl MpError {
        /// A short reason, for the guest's diagnostics.
        pub fn as_str(self) -> &'static str {
            match self {
                MpError::NotFound => "no floating pointer",
                MpError::NoConfigTable => "default configuration, no table",
                MpError::BadPointer => "table out of memory",
                MpError::BadSignature => "bad table signature",
                MpError::BadLength => "bad table length",
                MpError::BadChecksum => "bad table checksum",
                MpError::BadEntry => "bad table entry",
            }
        }
    }

    /// Byte sum of `len` bytes at `addr`, `None` if any is unreadable.
    fn checksum(mem: &impl PhysMem, addr: u64, len: u64) -> Option<u8> {
        let mut sum = 0u8;
        let mut chunk = [0u8; 64];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            let part = chunk.get_mut(..n)?;
            if !mem.read(addr.checked_add(done)?, part) {
                return None;
            }
            sum = part.iter().fold(sum, |s, b| s.wrapping_add(*b));
            done += n as u64;
        }
        Some(sum)
    }

    /// Finds the floating pointer structure: signature on a 16-byte boundary and a zero
    /// checksum over its 16 bytes (candidates failing the checksum are skipped, as Linux does).
    pub fn find_floating(mem: &impl PhysMem) -> Option<u64> {
        for (start, end) in SEARCH_AREAS {
            let mut addr = start;
            while addr + FLOATING_LEN <= end {
                if mem.read_u32(addr) == Some(FLOATING_SIGNATURE)
                    && checksum(mem, addr, FLOATING_LEN) == Some(0)
                {
                    return Some(addr);
                }
                addr += 16;
            }
        }
        None
    }

    /// Counts the enabled processors in the configuration table the floating pointer at
    /// `floating` points to.
    pub fn count_cpus_at(mem: &impl PhysMem, floating: u64) -> Result<u32, MpError> {
        let table = u64::from(mem.read_u32(floating + 4).ok_or(MpError::BadPointer)?);
        if table == 0 {
            return Err(MpError::NoConfigTable);
        }
        if mem.read_u32(table).ok_or(MpError::BadPointer)? != CONFIG_SIGNATURE {
            return Err(MpError::BadSignature);
        }
        let len = mem.read_u16(table + 4).ok_or(MpError::BadPointer)?;
        if len < CONFIG_HEADER_LEN {
            return Err(MpError::BadLength);
        }
        match checksum(mem, table, u64::from(len)) {
            None => return Err(MpError::BadPointer),
            Some(0) => {}
            Some(_) => return Err(MpError::BadChecksum),
        }
        let entries = mem.read_u16(table + 34).ok_or(MpError::BadPointer)?;
        // The table is now known to be readable and consistent up to `len`; each entry is
        // checked against that length, so a lying entry count cannot walk past the table.
        let mut off = CONFIG_HEADER_LEN;
        let mut cpus = 0u32;
        for _ in 0..entries {
            let mut head = [0u8; 4];
            if off.checked_add(4).is_none_or(|e| e > len)
                || !mem.read(table + u64::from(off), &mut head)
            {
                return Err(MpError::BadEntry);
            }
            let entry_len = match head[0] {
                0 => PROCESSOR_ENTRY_LEN,
                1..=4 => OTHER_ENTRY_LEN,
                _ => return Err(MpError::BadEntry),
            };
            let next = off.checked_add(entry_len).ok_or(MpError::BadEntry)?;
            if next > len {
                return Err(MpError::BadEntry);
            }
            if head[0] == 0 && head[3] & 1 != 0 {
                cpus += 1;
            }
            off = next;
        }
        Ok(cpus)
    }

    /// Finds and parses the MP table; `Ok(n)` is the number of enabled processors in it.
    pub fn count_cpus(mem: &impl PhysMem) -> Result<u32, MpError> {
        let floating = find_floating(mem).ok_or(MpError::NotFound)?;
        count_cpus_at(mem, floating)
    }
}

/// What the guest does after its ready line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Print a Linux-style panic line and spin forever.
    Panic,
    /// Load an empty IDT and raise #UD.
    Triple,
    /// Execute one SSE instruction at CPL 0.
    Sse,
}

/// How the guest ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Write this status to the exit port.
    Status(u8),
    /// Pulse the reset line through the i8042 controller.
    Reset,
}

/// A packet mode (`net=...`): the guest drives the virtio-net device, prints its counters
/// and exits with status 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// Send every received frame back with the MACs swapped.
    Echo,
    /// Receive, verify and count.
    Sink,
    /// Send `count` test frames.
    Gen,
    /// Misbehave on purpose, then check that the device recovers after a reset.
    Hostile,
}

impl NetMode {
    /// The word on the command line (and in the counters line).
    pub fn as_str(self) -> &'static str {
        match self {
            NetMode::Echo => "echo",
            NetMode::Sink => "sink",
            NetMode::Gen => "gen",
            NetMode::Hostile => "hostile",
        }
    }
}

/// How a packet mode reaches the wire (`path=...`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetPath {
    /// Through the virtio-net queues ([`net`]).
    #[default]
    Virtio,
    /// Through the port's netmap rings, passed through by nmvm's `--passthrough` ([`netmap`]).
    Netmap,
}

impl NetPath {
    /// The word on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            NetPath::Virtio => "virtio",
            NetPath::Netmap => "netmap",
        }
    }
}

/// Frame lengths of `net=gen` (`len=L` or `len=MIN-MAX`), without CRC, within 60..=1514.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLen {
    /// Shortest.
    pub min: u16,
    /// Longest.
    pub max: u16,
}

impl Default for FrameLen {
    fn default() -> Self {
        FrameLen { min: 60, max: 60 }
    }
}

/// The guest's behaviour, as chosen on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `exit=N` or `exit=reset`.
    pub exit: Exit,
    /// `wait=S`: seconds to stay up before ending.
    pub wait_secs: u32,
    /// `fault=...`.
    pub fault: Option<Fault>,
    /// `net=echo|sink|gen|hostile`.
    pub net: Option<NetMode>,
    /// `path=virtio|netmap` (default virtio).
    pub path: NetPath,
    /// `count=N`: frames to echo, receive or send (default: forever; gen: 1000).
    pub count: Option<u64>,
    /// `len=L` or `len=MIN-MAX`.
    pub len: FrameLen,
    /// `secs=S`: a packet mode ends S seconds after its first frame (or at `count=`).
    pub secs: Option<u32>,
    /// `mode=kernel|user`: where the appliance runs (default user, at CPL 3).
    pub mode: RunMode,
}

/// Where everything after the boot's kernel-mode core runs (`mode=...`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RunMode {
    /// At CPL 3, natively on emulated KVM, with the core reachable only through exceptions.
    #[default]
    User,
    /// At CPL 0 as before the split, for comparison (emulated on our machines).
    Kernel,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            exit: Exit::Status(0),
            wait_secs: 0,
            fault: None,
            net: None,
            path: NetPath::Virtio,
            count: None,
            len: FrameLen::default(),
            secs: None,
            mode: RunMode::User,
        }
    }
}

/// Parses `L` or `MIN-MAX`, each a frame length in 60..=1514, `MIN <= MAX`.
pub fn parse_len(value: &[u8]) -> Option<FrameLen> {
    let one = |s: &[u8]| {
        parse_decimal(s)
            .filter(|n| (frame::MIN_LEN as u64..=frame::MAX_LEN as u64).contains(n))
            .map(|n| n as u16)
    };
    match value.iter().position(|c| *c == b'-') {
        None => one(value).map(|l| FrameLen { min: l, max: l }),
        Some(dash) => {
            let min = one(value.get(..dash)?)?;
            let max = one(value.get(dash + 1..)?)?;
            (min <= max).then_some(FrameLen { min, max })
        }
    }
}

/// Parses an unsigned decimal: digits only, no sign, no empty string, no overflow.
pub fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        let d = c.checked_sub(b'0').filter(|d| *d <= 9)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

/// The words of a command line, split on whitespace.
pub fn words(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmdline.split(|c| is_space(*c)).filter(|w| !w.is_empty())
}

/// Parses the command line. Unknown words are ignored (the VMM and users add Linux words such
/// as `console=ttyS0`); a later word overrides an earlier one. `Err` carries the first word
/// whose value is invalid.
pub fn parse_cmdline(cmdline: &[u8]) -> Result<Config, &[u8]> {
    let mut cfg = Config::default();
    for word in words(cmdline) {
        let Some(eq) = word.iter().position(|c| *c == b'=') else {
            continue;
        };
        let (key, value) = (
            word.get(..eq).unwrap_or(&[]),
            word.get(eq + 1..).unwrap_or(&[]),
        );
        match key {
            b"exit" => {
                cfg.exit = if value == b"reset" {
                    Exit::Reset
                } else {
                    parse_decimal(value)
                        .and_then(|n| u8::try_from(n).ok())
                        .map(Exit::Status)
                        .ok_or(word)?
                };
            }
            b"wait" => {
                cfg.wait_secs = parse_decimal(value)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or(word)?;
            }
            b"fault" => {
                cfg.fault = Some(match value {
                    b"panic" => Fault::Panic,
                    b"triple" => Fault::Triple,
                    b"sse" => Fault::Sse,
                    _ => return Err(word),
                });
            }
            b"net" => {
                cfg.net = Some(match value {
                    b"echo" => NetMode::Echo,
                    b"sink" => NetMode::Sink,
                    b"gen" => NetMode::Gen,
                    b"hostile" => NetMode::Hostile,
                    _ => return Err(word),
                });
            }
            b"path" => {
                cfg.path = match value {
                    b"virtio" => NetPath::Virtio,
                    b"netmap" => NetPath::Netmap,
                    _ => return Err(word),
                };
            }
            b"count" => cfg.count = Some(parse_decimal(value).ok_or(word)?),
            b"len" => cfg.len = parse_len(value).ok_or(word)?,
            b"secs" => {
                cfg.secs = Some(
                    parse_decimal(value)
                        .and_then(|n| u32::try_from(n).ok())
                        .filter(|n| *n > 0)
                        .ok_or(word)?,
                );
            }
            b"mode" => {
                cfg.mode = match value {
                    b"user" => RunMode::User,
                    b"kernel" => RunMode::Kernel,
                    _ => return Err(word),
                };
            }
            _ => {}
        }
    }
    Ok(cfg)
}

/// Where the guest's text goes (the UART on bare metal, a buffer in the tests).
pub trait Sink {
    /// Writes `bytes` as they are.
    fn write(&mut self, bytes: &[u8]);

    /// Writes `n` in decimal.
    fn write_dec(&mut self, n: u64) {
        let mut buf = [0u8; 20];
        let s = fmt_dec(n, &mut buf);
        self.write(s);
    }

    /// Writes `n` as `0x` followed by lower-case hex digits, no leading zeros.
    fn write_hex(&mut self, n: u64) {
        let mut buf = [0u8; 16];
        self.write(b"0x");
        let s = fmt_hex(n, &mut buf);
        self.write(s);
    }
}

/// Formats `n` in decimal at the end of `buf` and returns the digits.
pub fn fmt_dec(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        // u64::MAX has 20 digits, so `i` never underflows; `get_mut` keeps the panic path out.
        if let Some(slot) = buf.get_mut(i) {
            *slot = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    buf.get(i..).unwrap_or(&[])
}

/// Formats `n` in lower-case hex (no prefix, no leading zeros) at the end of `buf`.
pub fn fmt_hex(mut n: u64, buf: &mut [u8; 16]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    loop {
        i -= 1;
        if let Some(slot) = buf.get_mut(i) {
            *slot = DIGITS[(n & 0xf) as usize];
        }
        n >>= 4;
        if n == 0 || i == 0 {
            break;
        }
    }
    buf.get(i..).unwrap_or(&[])
}

/// Writes the ready line the tests match:
/// `nmvm-guest 0.1.0 ready: memory 256 MiB, cpus 2, cmdline "exit=7 console=ttyS0"`.
pub fn write_ready_line(
    out: &mut impl Sink,
    version: &str,
    ram_bytes: u64,
    cpus: u32,
    cmdline: &[u8],
) {
    out.write(b"nmvm-guest ");
    out.write(version.as_bytes());
    out.write(b" ready: memory ");
    out.write_dec(ram_mib(ram_bytes));
    out.write(b" MiB, cpus ");
    out.write_dec(u64::from(cpus));
    out.write(b", cmdline \"");
    out.write(cmdline);
    out.write(b"\"\n");
}

/// TSC ticks per second from `ticks` counted over `pit_counts` periods of the 1.193182 MHz PIT.
/// `None` if the measurement is unusable.
pub fn tsc_hz(ticks: u64, pit_counts: u64) -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    let hz = ticks.checked_mul(PIT_HZ)?.checked_div(pit_counts)?;
    (hz != 0).then_some(hz)
}

/// The rate line: `nmvm-guest: rate 12.345 Mpps (N frames in U us)`, from `frames` counted
/// over `ticks` TSC ticks at `hz`. Nothing is printed for fewer than two frames or no time.
pub fn write_rate(out: &mut impl Sink, frames: u64, ticks: u64, hz: u64) {
    if frames < 2 || ticks == 0 || hz == 0 {
        return;
    }
    let us = u128::from(ticks) * 1_000_000 / u128::from(hz);
    // Thousandths of Mpps = frames per ms.
    let milli_mpps = u128::from(frames) * u128::from(hz) / u128::from(ticks) / 1000;
    let whole = u64::try_from(milli_mpps / 1000).unwrap_or(u64::MAX);
    let frac = (milli_mpps % 1000) as u64;
    out.write(b"nmvm-guest: rate ");
    out.write_dec(whole);
    out.write(b".");
    let mut buf = [0u8; 20];
    let digits = fmt_dec(frac, &mut buf);
    for _ in digits.len()..3 {
        out.write(b"0");
    }
    out.write(digits);
    out.write(b" Mpps (");
    out.write_dec(frames);
    out.write(b" frames in ");
    out.write_dec(u64::try_from(us).unwrap_or(u64::MAX));
    out.write(b" us)\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_lines() {
        let mut s = VecSink::default();
        write_rate(&mut s, 12_345_000, 2_000_000_000, 2_000_000_000);
        assert_eq!(
            s.0,
            b"nmvm-guest: rate 12.345 Mpps (12345000 frames in 1000000 us)\n"
        );
        let mut s = VecSink::default();
        write_rate(&mut s, 5_000, 3_000_000_000, 3_000_000_000);
        assert_eq!(
            s.0,
            b"nmvm-guest: rate 0.005 Mpps (5000 frames in 1000000 us)\n"
        );
        let mut s = VecSink::default();
        write_rate(&mut s, 1, 10, 10);
        write_rate(&mut s, 10, 0, 10);
        assert!(s.0.is_empty());
    }

    #[test]
    fn secs_and_mode_words() {
        let c = parse_cmdline(b"net=gen secs=2 mode=kernel").unwrap();
        assert_eq!((c.secs, c.mode), (Some(2), RunMode::Kernel));
        let c = parse_cmdline(b"net=gen").unwrap();
        assert_eq!((c.secs, c.mode), (None, RunMode::User));
        assert_eq!(parse_cmdline(b"secs=0").unwrap_err(), b"secs=0");
        assert_eq!(parse_cmdline(b"mode=ring1").unwrap_err(), b"mode=ring1");
    }

    #[derive(Default)]
    struct VecSink(Vec<u8>);
    impl Sink for VecSink {
        fn write(&mut self, bytes: &[u8]) {
            self.0.extend_from_slice(bytes);
        }
    }

    fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
        buf[off..off + bytes.len()].copy_from_slice(bytes);
    }

    fn zero_page(cmdline_ptr: u64, cmdline_size: u32, e820: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut zp = vec![0u8; boot_params::SIZE];
        put(
            &mut zp,
            boot_params::CMD_LINE_PTR,
            &(cmdline_ptr as u32).to_le_bytes(),
        );
        put(
            &mut zp,
            boot_params::EXT_CMD_LINE_PTR,
            &((cmdline_ptr >> 32) as u32).to_le_bytes(),
        );
        put(
            &mut zp,
            boot_params::CMDLINE_SIZE,
            &cmdline_size.to_le_bytes(),
        );
        zp[boot_params::E820_ENTRIES] = e820.len() as u8;
        for (i, (addr, size, kind)) in e820.iter().enumerate() {
            let off = boot_params::E820_TABLE + i * boot_params::E820_ENTRY_SIZE;
            put(&mut zp, off, &addr.to_le_bytes());
            put(&mut zp, off + 8, &size.to_le_bytes());
            put(&mut zp, off + 16, &kind.to_le_bytes());
        }
        zp
    }

    #[test]
    fn boot_params_fields() {
        let e820 = [
            (0, 0x9_fc00, 1),
            (0x9_fc00, 0x400, 2),
            (0x10_0000, 0xff0_0000, 1),
        ];
        let zp = zero_page(0x2_0000, 22, &e820);
        let bp = BootParams::new(&zp);
        assert_eq!(bp.cmdline_addr(), Some(0x2_0000));
        assert_eq!(bp.cmdline_limit(), 22);
        assert_eq!(bp.e820().count(), 3);
        assert_eq!(bp.ram_bytes(), 0x9_fc00 + 0xff0_0000);
        assert_eq!(ram_mib(bp.ram_bytes()), 256);
    }

    #[test]
    fn boot_params_high_cmdline_and_limits() {
        let bp_bytes = zero_page(0x1_0000_2000, 0, &[]);
        let bp = BootParams::new(&bp_bytes);
        assert_eq!(bp.cmdline_addr(), Some(0x1_0000_2000));
        assert_eq!(bp.cmdline_limit(), CMDLINE_MAX);
        assert_eq!(bp.ram_bytes(), 0);

        let bp_bytes = zero_page(0, 1 << 20, &[]);
        let bp = BootParams::new(&bp_bytes);
        assert_eq!(bp.cmdline_addr(), None);
        assert_eq!(bp.cmdline_limit(), CMDLINE_MAX);
    }

    #[test]
    fn boot_params_malformed() {
        // Entry count above the table's capacity is capped.
        let mut zp = zero_page(0, 0, &[(0, 1 << 20, 1)]);
        zp[boot_params::E820_ENTRIES] = 255;
        assert_eq!(BootParams::new(&zp).e820().count(), boot_params::E820_MAX);
        assert_eq!(BootParams::new(&zp).ram_bytes(), 1 << 20);
        // Overflowing sizes saturate instead of wrapping.
        let zp = zero_page(0, 0, &[(u64::MAX - 1, u64::MAX, 1), (0, u64::MAX, 1)]);
        assert_eq!(BootParams::new(&zp).ram_bytes(), u64::MAX);
        assert_eq!(ram_mib(u64::MAX), u64::MAX >> 20);
        // A truncated page reads as absent fields, not garbage.
        let zp = zero_page(0x2_0000, 0, &[(0, 1 << 20, 1), (1 << 20, 1 << 20, 1)]);
        let short = &zp[..boot_params::E820_TABLE + 30];
        assert_eq!(BootParams::new(short).e820().count(), 1);
        assert_eq!(BootParams::new(&zp[..0x100]).cmdline_addr(), None);
        assert_eq!(BootParams::new(&[]).ram_bytes(), 0);
    }

    #[test]
    fn readable_ranges() {
        let e820 = [
            (0, 0x9_fc00, 1),
            (0x9_fc00, 0x6_0400, 2),
            (0x10_0000, 0xff0_0000, 1),
        ];
        let zp = zero_page(0, 0, &e820);
        let bp = BootParams::new(&zp);
        assert!(bp.readable(0x2_0000, 4096));
        assert!(bp.readable(0x9_fc00, 1024));
        assert!(bp.readable(0xf_fff0, 16));
        assert!(bp.readable(0x10_0000, 0xff0_0000));
        assert!(!bp.readable(0x0fff_fff0, 17));
        assert!(!bp.readable(0xc000_0000, 4));
        assert!(!bp.readable(0, 4));
        assert!(!bp.readable(u64::MAX, 2));
        // Without an e820 map only the first MiB is assumed.
        let zp = zero_page(0, 0, &[]);
        let bp = BootParams::new(&zp);
        assert!(bp.readable(0x9_fc00, 16));
        assert!(!bp.readable(0xf_fff0, 17));
        // Entries above the identity map are never readable.
        let zp = zero_page(0, 0, &[(0x1_0000_0000, 1 << 30, 1)]);
        assert!(!BootParams::new(&zp).readable(0x1_0000_0000, 1));
    }

    #[test]
    fn cmdline_reading() {
        let mut mem = vec![0u8; 64];
        put(&mut mem, 16, b"exit=7 console=ttyS0\0junk");
        let m = SliceMem {
            base: 0x1000,
            bytes: &mem,
        };
        let mut buf = [0u8; 32];
        let n = read_cmdline(&m, 0x1010, 4096, &mut buf);
        assert_eq!(&buf[..n], b"exit=7 console=ttyS0");
        // cmdline_size bound.
        let n = read_cmdline(&m, 0x1010, 6, &mut buf);
        assert_eq!(&buf[..n], b"exit=7");
        // Buffer bound.
        let mut small = [0u8; 4];
        let n = read_cmdline(&m, 0x1010, 4096, &mut small);
        assert_eq!(&small[..n], b"exit");
        // Runs off the end of memory: cut, no fault.
        put(&mut mem, 60, b"abcd");
        let m = SliceMem {
            base: 0x1000,
            bytes: &mem,
        };
        let n = read_cmdline(&m, 0x103c, 4096, &mut buf);
        assert_eq!(&buf[..n], b"abcd");
        // Entirely outside memory, or wrapping around the address space.
        assert_eq!(read_cmdline(&m, 0x10, 4096, &mut buf), 0);
        assert_eq!(read_cmdline(&m, u64::MAX, 4096, &mut buf), 0);
    }

    #[test]
    fn slice_mem_bounds() {
        let mem = [1u8, 2, 3, 4];
        let m = SliceMem {
            base: 100,
            bytes: &mem,
        };
        assert_eq!(m.read_u16(102), Some(0x0403));
        assert_eq!(m.read_u16(103), None);
        assert_eq!(m.read_u32(99), None);
        assert_eq!(m.read_u32(u64::MAX - 1), None);
        assert!(m.read(104, &mut []));
    }

    /// Builds 1 MiB of low memory with an MP table, the way a VMM lays one out.
    struct MpBuilder {
        mem: Vec<u8>,
    }

    const FLOAT_AT: usize = 0x9_fc00;
    const TABLE_AT: usize = FLOAT_AT + 16;

    impl MpBuilder {
        /// `cpus`: enabled flag of each processor entry; then one bus, one I/O APIC, one
        /// I/O interrupt and one local interrupt entry.
        fn new(cpus: &[bool]) -> Self {
            let mut mem = vec![0u8; 0x10_0000];
            let mut entries = Vec::new();
            for (i, &en) in cpus.iter().enumerate() {
                let mut e = [0u8; 20];
                e[0] = 0;
                e[1] = i as u8;
                e[2] = 0x14;
                e[3] = u8::from(en) | if i == 0 { 2 } else { 0 };
                entries.extend_from_slice(&e);
            }
            for kind in 1..=4u8 {
                let mut e = [0u8; 8];
                e[0] = kind;
                entries.extend_from_slice(&e);
            }
            let len = 44 + entries.len();
            let t = TABLE_AT;
            put(&mut mem, t, b"PCMP");
            put(&mut mem, t + 4, &(len as u16).to_le_bytes());
            mem[t + 6] = 4;
            put(&mut mem, t + 8, b"NMVM    ");
            put(&mut mem, t + 34, &((cpus.len() + 4) as u16).to_le_bytes());
            put(&mut mem, t + 44, &entries);
            let f = FLOAT_AT;
            put(&mut mem, f, b"_MP_");
            put(&mut mem, f + 4, &(t as u32).to_le_bytes());
            mem[f + 8] = 1;
            mem[f + 9] = 4;
            let mut b = MpBuilder { mem };
            b.fix_checksums();
            b
        }

        fn table_len(&self) -> usize {
            u16::from_le_bytes([self.mem[TABLE_AT + 4], self.mem[TABLE_AT + 5]]) as usize
        }

        fn fix_checksums(&mut self) {
            let len = self.table_len().max(44);
            self.mem[TABLE_AT + 7] = 0;
            let s = self.mem[TABLE_AT..TABLE_AT + len]
                .iter()
                .fold(0u8, |a, b| a.wrapping_add(*b));
            self.mem[TABLE_AT + 7] = 0u8.wrapping_sub(s);
            self.mem[FLOAT_AT + 10] = 0;
            let s = self.mem[FLOAT_AT..FLOAT_AT + 16]
                .iter()
                .fold(0u8, |a, b| a.wrapping_add(*b));
            self.mem[FLOAT_AT + 10] = 0u8.wrapping_sub(s);
        }

        fn mem(&self) -> SliceMem<'_> {
            SliceMem {
                base: 0,
                bytes: &self.mem,
            }
        }
    }

    #[test]
    fn mp_counts_enabled_cpus() {
        let b = MpBuilder::new(&[true, true]);
        assert_eq!(mptable::find_floating(&b.mem()), Some(FLOAT_AT as u64));
        assert_eq!(mptable::count_cpus(&b.mem()), Ok(2));
        let b = MpBuilder::new(&[true, false, true, true]);
        assert_eq!(mptable::count_cpus(&b.mem()), Ok(3));
        let b = MpBuilder::new(&[true]);
        assert_eq!(mptable::count_cpus(&b.mem()), Ok(1));
    }

    #[test]
    fn mp_in_bios_area() {
        let mut b = MpBuilder::new(&[true, true, true]);
        // Move the floating pointer to the BIOS area, keep the table where it is.
        let fp: Vec<u8> = b.mem[FLOAT_AT..FLOAT_AT + 16].to_vec();
        b.mem[FLOAT_AT..FLOAT_AT + 16].fill(0);
        put(&mut b.mem, 0xf_5a50, &fp);
        assert_eq!(mptable::find_floating(&b.mem()), Some(0xf_5a50));
        assert_eq!(mptable::count_cpus(&b.mem()), Ok(3));
        // Not on a 16-byte boundary: not found.
        b.mem[0xf_5a50..0xf_5a60].fill(0);
        put(&mut b.mem, 0xf_5a58, &fp);
        assert_eq!(
            mptable::count_cpus(&b.mem()),
            Err(mptable::MpError::NotFound)
        );
    }

    #[test]
    fn mp_missing() {
        let mem = vec![0u8; 0x10_0000];
        let m = SliceMem {
            base: 0,
            bytes: &mem,
        };
        assert_eq!(mptable::count_cpus(&m), Err(mptable::MpError::NotFound));
        // Memory too small to contain the search areas at all.
        let m = SliceMem {
            base: 0,
            bytes: &mem[..0x1000],
        };
        assert_eq!(mptable::count_cpus(&m), Err(mptable::MpError::NotFound));
        // The search area exists only partially (memory ends inside it).
        let b = MpBuilder::new(&[true]);
        let m = SliceMem {
            base: 0,
            bytes: &b.mem[..FLOAT_AT + 8],
        };
        assert_eq!(mptable::count_cpus(&m), Err(mptable::MpError::NotFound));
    }

    #[test]
    fn mp_bad_floating_checksum_is_skipped() {
        let mut b = MpBuilder::new(&[true, true]);
        b.mem[FLOAT_AT + 10] ^= 1;
        assert_eq!(
            mptable::count_cpus(&b.mem()),
            Err(mptable::MpError::NotFound)
        );
    }

    #[test]
    fn mp_bad_table() {
        use mptable::MpError::*;
        // Bad table checksum.
        let mut b = MpBuilder::new(&[true, true]);
        b.mem[TABLE_AT + 7] ^= 1;
        assert_eq!(mptable::count_cpus(&b.mem()), Err(BadChecksum));
        // Default configuration (pointer 0).
        let mut b = MpBuilder::new(&[true, true]);
        put(&mut b.mem, FLOAT_AT + 4, &0u32.to_le_bytes());
        b.fix_checksums();
        assert_eq!(mptable::count_cpus(&b.mem()), Err(NoConfigTable));
        // Pointer outside memory.
        let mut b = MpBuilder::new(&[true, true]);
        put(&mut b.mem, FLOAT_AT + 4, &0xfff0_0000u32.to_le_bytes());
        b.fix_checksums();
        assert_eq!(mptable::count_cpus(&b.mem()), Err(BadPointer));
        // Pointer to something else.
        let mut b = MpBuilder::new(&[true, true]);
        put(&mut b.mem, FLOAT_AT + 4, &0x1000u32.to_le_bytes());
        b.fix_checksums();
        assert_eq!(mptable::count_cpus(&b.mem()), Err(BadSignature));
        // Length shorter than the header.
        let mut b = MpBuilder::new(&[true, true]);
        put(&mut b.mem, TABLE_AT + 4, &20u16.to_le_bytes());
        b.fix_checksums();
        assert_eq!(mptable::count_cpus(&b.mem()), Err(BadLength));
        // Length running past the end of memory.
        let mut b = MpBuilder::new(&[true, true]);
        put(&mut b.mem, TABLE_AT + 4, &0xffffu16.to_le_bytes());
        let m = SliceMem {
            base: 0,
            bytes: &b.mem[..TABLE_AT + 0x1000],
        };
        assert_eq!(mptable::count_cpus(&m), Err(BadPointer));
    }

    #[test]
    fn mp_bad_entries() {
        use mptable::MpError::*;
        // Entry count larger than the table holds: truncated table.
        let mut b = MpBuilder::new(&[true, true]);
        put(&mut b.mem, TABLE_AT + 34, &1000u16.to_le_bytes());
        b.fix_checksums();
        assert_eq!(mptable::count_cpus(&b.mem()), Err(BadEntry));
        // Table length cut in the middle of a processor entry.
        let mut b = MpBuilder::new(&[true, true]);
        put(&mut b.mem, TABLE_AT + 4, &(44u16 + 30).to_le_bytes());
        b.fix_checksums();
        assert_eq!(mptable::count_cpus(&b.mem()), Err(BadEntry));
        // Unknown entry type.
        let mut b = MpBuilder::new(&[true, true]);
        b.mem[TABLE_AT + 44 + 20] = 0x80;
        b.fix_checksums();
        assert_eq!(mptable::count_cpus(&b.mem()), Err(BadEntry));
        // Fewer entries than present is fine: only those are read.
        let mut b = MpBuilder::new(&[true, true, true]);
        put(&mut b.mem, TABLE_AT + 34, &2u16.to_le_bytes());
        b.fix_checksums();
        assert_eq!(mptable::count_cpus(&b.mem()), Ok(2));
        // No entries at all.
        let mut b = MpBuilder::new(&[]);
        put(&mut b.mem, TABLE_AT + 34, &0u16.to_le_bytes());
        b.fix_checksums();
        assert_eq!(mptable::count_cpus(&b.mem()), Ok(0));
    }

    #[test]
    fn decimal_parsing() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"007"), Some(7));
        assert_eq!(parse_decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_decimal(b"18446744073709551616"), None);
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"-1"), None);
        assert_eq!(parse_decimal(b"+1"), None);
        assert_eq!(parse_decimal(b"1a"), None);
        assert_eq!(parse_decimal(b" 1"), None);
    }

    #[test]
    fn cmdline_parsing() {
        assert_eq!(parse_cmdline(b""), Ok(Config::default()));
        assert_eq!(
            parse_cmdline(b"exit=7 console=ttyS0"),
            Ok(Config {
                exit: Exit::Status(7),
                ..Config::default()
            })
        );
        assert_eq!(
            parse_cmdline(b"  wait=1\texit=3  "),
            Ok(Config {
                exit: Exit::Status(3),
                wait_secs: 1,
                ..Config::default()
            })
        );
        assert_eq!(
            parse_cmdline(b"exit=reset quiet"),
            Ok(Config {
                exit: Exit::Reset,
                ..Config::default()
            })
        );
        assert_eq!(
            parse_cmdline(b"exit=255").map(|c| c.exit),
            Ok(Exit::Status(255))
        );
        assert_eq!(
            parse_cmdline(b"exit=1 exit=2").map(|c| c.exit),
            Ok(Exit::Status(2))
        );
        for (w, f) in [
            ("panic", Fault::Panic),
            ("triple", Fault::Triple),
            ("sse", Fault::Sse),
        ] {
            let line = format!("console=ttyS0 fault={w}");
            assert_eq!(parse_cmdline(line.as_bytes()).map(|c| c.fault), Ok(Some(f)));
        }
        // Unknown keys and words without '=' are ignored, even with odd values.
        assert_eq!(
            parse_cmdline(b"noapic exitx=abc reboot=k =5 exit"),
            Ok(Config::default())
        );
    }

    #[test]
    fn cmdline_bad_values() {
        assert_eq!(
            parse_cmdline(b"console=ttyS0 exit=abc"),
            Err(&b"exit=abc"[..])
        );
        assert_eq!(parse_cmdline(b"exit=300"), Err(&b"exit=300"[..]));
        assert_eq!(parse_cmdline(b"exit="), Err(&b"exit="[..]));
        assert_eq!(parse_cmdline(b"exit=-1"), Err(&b"exit=-1"[..]));
        assert_eq!(parse_cmdline(b"wait=x exit=abc"), Err(&b"wait=x"[..]));
        assert_eq!(
            parse_cmdline(b"wait=4294967296"),
            Err(&b"wait=4294967296"[..])
        );
        assert_eq!(parse_cmdline(b"fault=oops"), Err(&b"fault=oops"[..]));
        assert_eq!(parse_cmdline(b"fault="), Err(&b"fault="[..]));
    }

    #[test]
    fn cmdline_net_words() {
        let c = parse_cmdline(b"console=ttyS0 net=gen count=5000 len=1514").unwrap();
        assert_eq!(c.net, Some(NetMode::Gen));
        assert_eq!(c.count, Some(5000));
        assert_eq!(
            c.len,
            FrameLen {
                min: 1514,
                max: 1514
            }
        );
        assert_eq!(c.exit, Exit::Status(0));
        let c = parse_cmdline(b"net=gen len=60-1514").unwrap();
        assert_eq!(c.len, FrameLen { min: 60, max: 1514 });
        assert_eq!(c.count, None);
        let c = parse_cmdline(b"net=gen len=100-100 count=0").unwrap();
        assert_eq!(c.len, FrameLen { min: 100, max: 100 });
        assert_eq!(c.count, Some(0));
        for (w, m) in [
            ("echo", NetMode::Echo),
            ("sink", NetMode::Sink),
            ("gen", NetMode::Gen),
            ("hostile", NetMode::Hostile),
        ] {
            let line = format!("net={w} exit=4");
            let c = parse_cmdline(line.as_bytes()).unwrap();
            assert_eq!(c.net, Some(m));
            assert_eq!(m.as_str(), w);
        }
        // Defaults.
        let c = parse_cmdline(b"").unwrap();
        assert_eq!(
            (c.net, c.path, c.count, c.len),
            (None, NetPath::Virtio, None, FrameLen { min: 60, max: 60 })
        );
    }

    #[test]
    fn cmdline_path_word() {
        let c = parse_cmdline(b"console=ttyS0 net=echo path=netmap").unwrap();
        assert_eq!((c.net, c.path), (Some(NetMode::Echo), NetPath::Netmap));
        // The order of the words does not matter; the last path= wins.
        let c = parse_cmdline(b"path=netmap count=5 net=gen path=virtio").unwrap();
        assert_eq!(
            (c.net, c.path, c.count),
            (Some(NetMode::Gen), NetPath::Virtio, Some(5))
        );
        // path= alone is accepted (it only matters with net=).
        assert_eq!(
            parse_cmdline(b"path=netmap").map(|c| (c.net, c.path)),
            Ok((None, NetPath::Netmap))
        );
        for p in [NetPath::Virtio, NetPath::Netmap] {
            let line = format!("net=sink path={}", p.as_str());
            assert_eq!(parse_cmdline(line.as_bytes()).map(|c| c.path), Ok(p));
        }
        for bad in [
            "path=",
            "path=NETMAP",
            "path=vhost",
            "path=netmap,virtio",
            "path=netmap=",
        ] {
            assert_eq!(
                parse_cmdline(format!("net=gen {bad} exit=1").as_bytes()),
                Err(bad.as_bytes()),
                "{bad}"
            );
        }
    }

    #[test]
    fn cmdline_net_bad_values() {
        for bad in [
            "net=",
            "net=flood",
            "net=ECHO",
            "count=",
            "count=-1",
            "count=1k",
            "count=18446744073709551616",
            "len=",
            "len=59",
            "len=1515",
            "len=0",
            "len=60-",
            "len=-100",
            "len=200-100",
            "len=60-1515",
            "len=59-100",
            "len=60--100",
            "len=60-100-200",
            "len=+60",
        ] {
            assert_eq!(
                parse_cmdline(format!("exit=1 {bad}").as_bytes()),
                Err(bad.as_bytes()),
                "{bad}"
            );
        }
        assert_eq!(parse_len(b"60"), Some(FrameLen { min: 60, max: 60 }));
        assert_eq!(
            parse_len(b"1514-1514"),
            Some(FrameLen {
                min: 1514,
                max: 1514
            })
        );
    }

    #[test]
    fn integer_formatting() {
        let mut d = [0u8; 20];
        assert_eq!(fmt_dec(0, &mut d), b"0");
        assert_eq!(fmt_dec(7, &mut d), b"7");
        assert_eq!(fmt_dec(256, &mut d), b"256");
        assert_eq!(fmt_dec(u64::MAX, &mut d), b"18446744073709551615");
        let mut h = [0u8; 16];
        assert_eq!(fmt_hex(0, &mut h), b"0");
        assert_eq!(fmt_hex(0x9fc00, &mut h), b"9fc00");
        assert_eq!(fmt_hex(u64::MAX, &mut h), b"ffffffffffffffff");
        let mut s = VecSink::default();
        s.write_dec(42);
        s.write(b" ");
        s.write_hex(0xdead_beef);
        assert_eq!(s.0, b"42 0xdeadbeef");
    }

    #[test]
    fn ready_line() {
        let mut s = VecSink::default();
        write_ready_line(&mut s, "0.1.0", 256 << 20, 2, b"exit=7 console=ttyS0");
        assert_eq!(
            String::from_utf8(s.0).unwrap(),
            "nmvm-guest 0.1.0 ready: memory 256 MiB, cpus 2, cmdline \"exit=7 console=ttyS0\"\n"
        );
        // What nmvm's e820 map gives a 256 MiB VM: the MP table's KiB and the hole reserved.
        let mut s = VecSink::default();
        write_ready_line(&mut s, "0.1.0", (256 << 20) - 0x6_0400, 1, b"x");
        assert_eq!(
            s.0,
            b"nmvm-guest 0.1.0 ready: memory 256 MiB, cpus 1, cmdline \"x\"\n"
        );
        let mut s = VecSink::default();
        write_ready_line(&mut s, "0.1.0", (1 << 19) - 1, 1, b"");
        assert_eq!(
            s.0,
            b"nmvm-guest 0.1.0 ready: memory 0 MiB, cpus 1, cmdline \"\"\n"
        );
    }

    #[test]
    fn tsc_frequency() {
        // 50 ms of PIT counts at 2 GHz.
        assert_eq!(tsc_hz(100_000_000, 59_659), Some(2_000_003_352));
        assert_eq!(tsc_hz(0, 59_659), None);
        assert_eq!(tsc_hz(1, 0), None);
        assert_eq!(tsc_hz(u64::MAX, 59_659), None);
    }
}
