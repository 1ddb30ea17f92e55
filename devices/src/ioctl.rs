//! ioctl request numbers in the two encodings nmvm meets: Linux's
//! (`include/uapi/asm-generic/ioctl.h`) for KVM and netmap on Linux, and
//! FreeBSD's (`sys/sys/ioccom.h`) for vmm(4) and netmap on FreeBSD.
//!
//! Both pack `direction | size << 16 | group << 8 | number`, but the
//! direction bits differ: Linux's "write" (`_IOW`) is FreeBSD's `IOC_IN`
//! at the other bit, `_IO` is 0 on Linux and `IOC_VOID` on FreeBSD, and the
//! size field is 14 bits on Linux, 13 on FreeBSD. Only `_IOWR` of a small
//! struct comes out the same. Sizes that do not fit are a compile error
//! where the numbers are constants.

/// Linux: `dir << 30 | size << 16 | type << 8 | nr`.
pub mod linux {
    /// No argument (`_IO`).
    pub const IOC_NONE: u32 = 0;
    /// Userspace writes, the kernel reads (`_IOW`).
    pub const IOC_WRITE: u32 = 1;
    /// Userspace reads, the kernel writes (`_IOR`).
    pub const IOC_READ: u32 = 2;

    /// `_IOC(dir, ty, nr, size)`.
    pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
        assert!(size < (1 << 14), "Linux ioctl sizes are 14 bits");
        (dir << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
    }

    /// `_IO(ty, nr)`.
    pub const fn io(ty: u8, nr: u8) -> u32 {
        ioc(IOC_NONE, ty, nr, 0)
    }

    /// `_IOR(ty, nr, T)` with `size = sizeof(T)`.
    pub const fn ior(ty: u8, nr: u8, size: usize) -> u32 {
        ioc(IOC_READ, ty, nr, size)
    }

    /// `_IOW(ty, nr, T)` with `size = sizeof(T)`.
    pub const fn iow(ty: u8, nr: u8, size: usize) -> u32 {
        ioc(IOC_WRITE, ty, nr, size)
    }

    /// `_IOWR(ty, nr, T)` with `size = sizeof(T)`.
    pub const fn iowr(ty: u8, nr: u8, size: usize) -> u32 {
        ioc(IOC_READ | IOC_WRITE, ty, nr, size)
    }
}

/// FreeBSD: `inout | len << 16 | group << 8 | num`.
pub mod freebsd {
    /// `IOCPARM_MASK`: the argument length is 13 bits wide.
    pub const IOCPARM_MASK: u32 = 0x1fff;
    /// `IOC_VOID`: no argument (`_IO`).
    pub const IOC_VOID: u32 = 0x2000_0000;
    /// `IOC_OUT`: the kernel copies the argument out (`_IOR`).
    pub const IOC_OUT: u32 = 0x4000_0000;
    /// `IOC_IN`: the kernel copies the argument in (`_IOW`).
    pub const IOC_IN: u32 = 0x8000_0000;
    /// `IOC_INOUT`: both (`_IOWR`).
    pub const IOC_INOUT: u32 = IOC_IN | IOC_OUT;

    /// `_IOC(inout, group, num, len)`.
    pub const fn ioc(inout: u32, group: u8, num: u8, len: usize) -> u32 {
        assert!(
            len <= IOCPARM_MASK as usize,
            "FreeBSD ioctl sizes are 13 bits"
        );
        inout | ((len as u32) << 16) | ((group as u32) << 8) | num as u32
    }

    /// `_IO(group, num)`.
    pub const fn io(group: u8, num: u8) -> u32 {
        ioc(IOC_VOID, group, num, 0)
    }

    /// `_IOR(group, num, T)` with `len = sizeof(T)`.
    pub const fn ior(group: u8, num: u8, len: usize) -> u32 {
        ioc(IOC_OUT, group, num, len)
    }

    /// `_IOW(group, num, T)` with `len = sizeof(T)`.
    pub const fn iow(group: u8, num: u8, len: usize) -> u32 {
        ioc(IOC_IN, group, num, len)
    }

    /// `_IOWR(group, num, T)` with `len = sizeof(T)`.
    pub const fn iowr(group: u8, num: u8, len: usize) -> u32 {
        ioc(IOC_INOUT, group, num, len)
    }
}

#[cfg(test)]
mod tests {
    use super::{freebsd, linux};

    #[test]
    fn the_two_encodings_differ_where_the_headers_do() {
        // _IOWR is the same for small sizes.
        for size in [0usize, 1, 60, 88, 4095] {
            assert_eq!(linux::iowr(b'i', 151, size), freebsd::iowr(b'i', 151, size));
        }
        // _IOR and _IOW swap bits; _IO is 0 on Linux, IOC_VOID on FreeBSD.
        assert_eq!(linux::ior(b'i', 1, 4), 0x8004_6901);
        assert_eq!(linux::iow(b'i', 1, 4), 0x4004_6901);
        assert_eq!(freebsd::ior(b'i', 1, 4), 0x4004_6901);
        assert_eq!(freebsd::iow(b'i', 1, 4), 0x8004_6901);
        assert_eq!(linux::io(b'i', 148), 0x6994);
        assert_eq!(freebsd::io(b'i', 148), 0x2000_6994);
        // Known numbers: KVM_RUN, KVM_GET_REGS; FreeBSD's VM_REINIT,
        // VM_RUN, VM_GET_CAPABILITY.
        assert_eq!(linux::io(0xae, 0x80), 0xae80);
        assert_eq!(linux::ior(0xae, 0x81, 144), 0x8090_ae81);
        assert_eq!(freebsd::io(b'v', 5), 0x2000_7605);
        assert_eq!(freebsd::iow(b'v', 1, 32), 0x8020_7601);
        assert_eq!(freebsd::iowr(b'v', 3, 16), 0xC010_7603);
        // The largest sizes each allows.
        assert_eq!(linux::iow(b'i', 1, (1 << 14) - 1) >> 16 & 0x3fff, 0x3fff);
        assert_eq!(freebsd::iow(b'i', 1, 0x1fff) >> 16 & 0x1fff, 0x1fff);
    }

    #[test]
    #[should_panic(expected = "13 bits")]
    fn an_oversized_freebsd_argument_is_refused() {
        let len = std::hint::black_box(0x2000);
        freebsd::iow(b'v', 1, len);
    }
}
