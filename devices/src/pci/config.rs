//! A type-0 configuration space with write masks, 64-bit memory BARs and a
//! capability list.

/// BAR type bits of a 64-bit, non-prefetchable memory BAR.
pub const BAR_MEM64: u32 = 0x4;
const STATUS_CAP_LIST: u16 = 1 << 4;
const CAP_POINTER: usize = 0x34;
const FIRST_CAP: usize = 0x40;
/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master.
pub const COMMAND_MASTER: u16 = 1 << 2;

/// 256 bytes of configuration space and which bits the guest may write.
pub struct ConfigSpace {
    regs: [u8; 256],
    wmask: [u8; 256],
    bar_sizes: [u64; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl ConfigSpace {
    /// A type-0 header for `vendor:device` of class `class` (24 bits).
    pub fn new(vendor: u16, device: u16, class: u32, subsys_vendor: u16, subsys_id: u16) -> Self {
        let mut c = Self {
            regs: [0; 256],
            wmask: [0; 256],
            bar_sizes: [0; 6],
            next_cap: FIRST_CAP,
            last_cap: None,
        };
        c.set16(0x00, vendor);
        c.set16(0x02, device);
        c.set32(0x08, (class << 8) | 1); // revision 1
        c.set16(0x2c, subsys_vendor);
        c.set16(0x2e, subsys_id);
        let command = COMMAND_MEMORY | COMMAND_MASTER;
        c.wmask[0x04..0x06].copy_from_slice(&command.to_le_bytes());
        c
    }

    fn set16(&mut self, off: usize, v: u16) {
        self.regs[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set32(&mut self, off: usize, v: u32) {
        self.regs[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.regs[off],
            self.regs[off + 1],
            self.regs[off + 2],
            self.regs[off + 3],
        ])
    }

    /// Declares BAR `index` (and `index + 1`) as a 64-bit memory BAR of
    /// `size` bytes (a power of two ≥ 16) at `addr`.
    pub fn add_mem64_bar(&mut self, index: usize, addr: u64, size: u64) {
        assert!(index < 5 && size.is_power_of_two() && size >= 16 && addr % size == 0);
        let off = 0x10 + 4 * index;
        self.set32(off, (addr as u32 & !0xf) | BAR_MEM64);
        self.set32(off + 4, (addr >> 32) as u32);
        let mask = !(size - 1);
        self.wmask[off..off + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        self.wmask[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        self.bar_sizes[index] = size;
    }

    /// The address and size of 64-bit memory BAR `index`, if memory
    /// decoding is on.
    pub fn mem64_bar(&self, index: usize) -> Option<(u64, u64)> {
        let size = *self.bar_sizes.get(index)?;
        let command = u16::from_le_bytes([self.regs[4], self.regs[5]]);
        if size == 0 || command & COMMAND_MEMORY == 0 {
            return None;
        }
        let off = 0x10 + 4 * index;
        let addr = u64::from(self.get32(off) & !0xf) | (u64::from(self.get32(off + 4)) << 32);
        Some((addr, size))
    }

    /// Whether the guest enabled bus mastering (DMA).
    pub fn bus_master(&self) -> bool {
        u16::from_le_bytes([self.regs[4], self.regs[5]]) & COMMAND_MASTER != 0
    }

    /// Appends a capability with id `id` and body `body` (bytes after the
    /// id and next pointer), with `writable` bytes of the body (offsets
    /// relative to the capability start) open to the guest. Returns its
    /// offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[(usize, u8)]) -> usize {
        let off = self.next_cap;
        let len = 2 + body.len();
        assert!(
            off + len <= 256,
            "capabilities overflow configuration space"
        );
        self.regs[off] = id;
        self.regs[off + 1] = 0;
        self.regs[off + 2..off + len].copy_from_slice(body);
        for &(at, mask) in writable {
            self.wmask[off + at] = mask;
        }
        match self.last_cap {
            None => {
                self.regs[CAP_POINTER] = off as u8;
                let status = u16::from_le_bytes([self.regs[6], self.regs[7]]) | STATUS_CAP_LIST;
                self.set16(0x06, status);
            }
            Some(prev) => self.regs[prev + 1] = off as u8,
        }
        self.last_cap = Some(off);
        self.next_cap = (off + len + 3) & !3;
        off
    }

    /// Reads `data.len()` bytes at `reg`; out of range reads as ones.
    pub fn read(&self, reg: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.regs.get(usize::from(reg) + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes through the write mask; read-only bits keep their value.
    pub fn write(&mut self, reg: u16, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = usize::from(reg) + i;
            if at < 256 {
                self.regs[at] = (self.regs[at] & !self.wmask[at]) | (b & self.wmask[at]);
            }
        }
    }

    /// Raw access for the owning device's own registers.
    pub fn bytes_mut(&mut self, reg: usize, len: usize) -> &mut [u8] {
        &mut self.regs[reg..reg + len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        let mut c = ConfigSpace::new(0x1af4, 0x1041, 0x02_00_00, 0x1af4, 1);
        c.add_mem64_bar(0, 0xc000_0000, 0x8000);
        c.write(0x04, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.mem64_bar(0), Some((0xc000_0000, 0x8000)));
        c.write(0x10, &[0xff; 4]);
        c.write(0x14, &[0xff; 4]);
        let mut d = [0u8; 4];
        c.read(0x10, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_8000 | BAR_MEM64);
        c.read(0x14, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
        // Restore and move it above 4 GiB.
        c.write(0x10, &0xd000_0000u32.to_le_bytes());
        c.write(0x14, &1u32.to_le_bytes());
        assert_eq!(c.mem64_bar(0), Some((0x1_d000_0000, 0x8000)));
        c.write(0x04, &0u16.to_le_bytes());
        assert_eq!(c.mem64_bar(0), None);
    }

    #[test]
    fn capabilities_are_chained_and_read_only_ids_stay() {
        let mut c = ConfigSpace::new(1, 2, 0, 0, 0);
        let a = c.add_capability(0x09, &[14, 1, 0, 0], &[]);
        let b = c.add_capability(0x11, &[0, 0], &[(3, 0xc0)]);
        let mut d = [0u8; 2];
        c.read(0x06, &mut d);
        assert_ne!(u16::from_le_bytes(d) & STATUS_CAP_LIST, 0);
        assert_eq!(c.regs[CAP_POINTER] as usize, a);
        assert_eq!(c.regs[a + 1] as usize, b);
        c.write(b as u16, &[0x55, 0x55, 0xff, 0xff]);
        let mut cap = [0u8; 4];
        c.read(b as u16, &mut cap);
        assert_eq!(cap, [0x11, 0, 0, 0xc0]);
        // Vendor and device IDs are read-only.
        c.write(0, &[0, 0, 0, 0]);
        c.read(0, &mut d);
        assert_eq!(u16::from_le_bytes(d), 1);
    }
}
