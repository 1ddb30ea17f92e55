//! The test frames the guest sends and checks, shared with the host's pkt-gen checker.
//!
//! # Byte layout
//!
//! `L` is the frame length without the Ethernet CRC, `60 <= L <= 1514`. Multi-byte header
//! fields are big-endian (network order); only the sequence number is little-endian.
//!
//! | offset    | size | content                                                          |
//! |-----------|------|------------------------------------------------------------------|
//! | 0         | 6    | destination MAC `ff:ff:ff:ff:ff:ff`                              |
//! | 6         | 6    | source MAC: the virtio-net device's MAC                          |
//! | 12        | 2    | ethertype `0x0800`                                               |
//! | 14        | 1    | `0x45` (IPv4, header length 20)                                  |
//! | 15        | 1    | TOS `0x10`                                                       |
//! | 16        | 2    | IPv4 total length `L - 14`                                       |
//! | 18        | 2    | identification `0`                                               |
//! | 20        | 2    | flags and fragment offset `0x4000` (DF)                          |
//! | 22        | 1    | TTL `64`                                                         |
//! | 23        | 1    | protocol `17` (UDP)                                              |
//! | 24        | 2    | IPv4 header checksum over bytes 14..34                           |
//! | 26        | 4    | source address 10.0.0.1                                          |
//! | 30        | 4    | destination address 10.1.0.1                                     |
//! | 34        | 2    | UDP source port 1234                                             |
//! | 36        | 2    | UDP destination port 1234                                        |
//! | 38        | 2    | UDP length `L - 34`                                              |
//! | 40        | 2    | UDP checksum (below)                                             |
//! | 42        | 8    | sequence number `seq`, u64 **little-endian**                     |
//! | 42 + i    | 1    | for `8 <= i < L - 42`: `(seq as u8).wrapping_add(i as u8)`       |
//!
//! The UDP checksum is RFC 768's: the one's-complement of the one's-complement sum of the
//! big-endian 16-bit words of the pseudo-header (10.0.0.1, 10.1.0.1, a zero byte, 17, the UDP
//! length) and of bytes 34..L with the checksum field taken as 0 (an odd last byte is padded
//! with a zero byte); a result of 0 is sent as `0xffff`. It is never 0 (absent) in these frames.
//!
//! In `len=MIN-MAX` mode the frame carrying `seq` is [`gen_len`]`(seq, MIN, MAX)` bytes long:
//! `MIN + (seq * 97) % (MAX - MIN + 1)`, computed without overflow.
//!
//! The functions: [`build_frame`] (a plain reference builder), [`FrameGen::build`] (the
//! guest's fast builder, which patches a buffer it prepared before), [`verify_frame`]
//! (headers, lengths and both checksums; returns `seq`), [`check_pattern`] (payload bytes),
//! and [`gen_len`].

/// Shortest frame (without CRC): the Ethernet minimum.
pub const MIN_LEN: usize = 60;
/// Longest frame (without CRC): a 1500-byte IPv4 packet.
pub const MAX_LEN: usize = 1514;
/// Offset of the IPv4 header.
pub const IP_OFF: usize = 14;
/// Offset of the UDP header.
pub const UDP_OFF: usize = 34;
/// Offset of the UDP payload (the sequence number).
pub const PAYLOAD_OFF: usize = 42;
/// Offset of the first pattern byte (payload offset 8).
pub const PATTERN_OFF: usize = 50;
/// IPv4 source address.
pub const SRC_IP: [u8; 4] = [10, 0, 0, 1];
/// IPv4 destination address.
pub const DST_IP: [u8; 4] = [10, 1, 0, 1];
/// UDP source and destination port.
pub const UDP_PORT: u16 = 1234;
/// Destination MAC.
pub const BROADCAST: [u8; 6] = [0xff; 6];

const TOS: u8 = 0x10;
const TTL: u8 = 64;
const PROTO_UDP: u8 = 17;
const FLAGS_DF: u16 = 0x4000;

/// The big-endian 16-bit word made of bytes `a`, `b`.
const fn word(a: u8, b: u8) -> u64 {
    (a as u64) << 8 | b as u64
}

/// Sum of the IPv4 header's constant big-endian words (all but total length and checksum).
const IP_CONST_SUM: u64 = word(0x45, TOS)
    + FLAGS_DF as u64
    + word(TTL, PROTO_UDP)
    + word(SRC_IP[0], SRC_IP[1])
    + word(SRC_IP[2], SRC_IP[3])
    + word(DST_IP[0], DST_IP[1])
    + word(DST_IP[2], DST_IP[3]);

/// Sum of the constant words the UDP checksum covers: the pseudo-header's addresses and
/// protocol and the two ports (the UDP length, counted twice, is added per frame).
const UDP_CONST_SUM: u64 = word(SRC_IP[0], SRC_IP[1])
    + word(SRC_IP[2], SRC_IP[3])
    + word(DST_IP[0], DST_IP[1])
    + word(DST_IP[2], DST_IP[3])
    + PROTO_UDP as u64
    + 2 * UDP_PORT as u64;

/// One's-complement addition (end-around carry) of `v` to a 64-bit accumulator. Summing
/// 64-bit words this way is the same, modulo `0xffff`, as summing their 16-bit words.
#[inline(always)]
pub fn csum_add(acc: u64, v: u64) -> u64 {
    let (sum, carry) = acc.overflowing_add(v);
    sum.wrapping_add(u64::from(carry))
}

/// Folds a 64-bit one's-complement accumulator to 16 bits (never turns a non-zero sum into 0).
pub fn csum_fold(acc: u64) -> u16 {
    let a = (acc & 0xffff_ffff) + (acc >> 32);
    let a = (a & 0xffff_ffff) + (a >> 32);
    let a = (a & 0xffff) + (a >> 16);
    let a = (a & 0xffff) + (a >> 16);
    a as u16
}

/// One's-complement sum of `bytes` read as little-endian 64-bit words (8 bytes a step, the
/// tail zero-padded), unfolded. Folded, it is the sum of the little-endian 16-bit words.
pub fn sum_le(bytes: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        if let Ok(w) = <[u8; 8]>::try_from(c) {
            acc = csum_add(acc, u64::from_le_bytes(w));
        }
    }
    let mut tail = 0u64;
    for (k, b) in chunks.remainder().iter().enumerate() {
        tail |= u64::from(*b) << (8 * k);
    }
    csum_add(acc, tail)
}

/// The folded one's-complement sum of `bytes` as big-endian 16-bit words (odd last byte padded
/// with zero), as the Internet checksum defines it. Byte-swapping commutes with the
/// one's-complement sum, so the little-endian sum is computed and swapped once.
pub fn sum_be16(bytes: &[u8]) -> u16 {
    csum_fold(sum_le(bytes)).swap_bytes()
}

/// The sum of the big-endian 16-bit words of `seq.to_le_bytes()`.
fn seq_sum(seq: u64) -> u64 {
    let x = seq.swap_bytes();
    (x >> 48) + ((x >> 32) & 0xffff) + ((x >> 16) & 0xffff) + (x & 0xffff)
}

/// Final checksum field value from a sum of words: complemented, and never 0.
fn checksum_field(acc: u64) -> u16 {
    match !csum_fold(acc) {
        0 => 0xffff,
        c => c,
    }
}

/// Length of the frame that carries `seq` in `len=MIN-MAX` mode:
/// `MIN + (seq * 97) % (MAX - MIN + 1)`, computed without overflow (`MAX < MIN` counts as
/// `MAX == MIN`).
pub fn gen_len(seq: u64, min: u16, max: u16) -> usize {
    let span = u64::from(max.saturating_sub(min)) + 1;
    let off = seq
        .checked_rem(span)
        .and_then(|r| (r * 97).checked_rem(span))
        .unwrap_or(0);
    usize::from(min) + off as usize
}

/// Pattern byte at frame offset `off` (`off >= PATTERN_OFF`) of the frame carrying `seq`.
pub fn pattern_byte(seq: u64, off: usize) -> u8 {
    (seq as u8).wrapping_add(off.wrapping_sub(PAYLOAD_OFF) as u8)
}

const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const HIGH1: u64 = 0x8080_8080_8080_8080;
const ONES: u64 = 0x0101_0101_0101_0101;
const RAMP: u64 = 0x0706_0504_0302_0100;

/// Adds the 8 bytes of `a` and `b` lane by lane, each modulo 256 (no carry between bytes).
#[inline(always)]
fn bytewise_add(a: u64, b: u64) -> u64 {
    ((a & LOW7) + (b & LOW7)) ^ ((a ^ b) & HIGH1)
}

/// Writes the pattern bytes of `seq` into `frame[from..to]` (frame offsets; `from` is raised
/// to [`PATTERN_OFF`]). Eight bytes per step: each word is the previous one plus 8 in every
/// byte lane, about six integer instructions and one store.
pub fn fill_pattern(frame: &mut [u8], seq: u64, from: usize, to: usize) {
    let from = from.max(PATTERN_OFF);
    let Some(region) = frame.get_mut(from..to) else {
        return;
    };
    let first = pattern_byte(seq, from);
    let mut w = bytewise_add(u64::from(first).wrapping_mul(ONES), RAMP);
    let step = 8 * ONES;
    let mut chunks = region.chunks_exact_mut(8);
    for c in &mut chunks {
        if let Ok(dst) = <&mut [u8; 8]>::try_from(c) {
            *dst = w.to_le_bytes();
        }
        w = bytewise_add(w, step);
    }
    for (d, s) in chunks.into_remainder().iter_mut().zip(w.to_le_bytes()) {
        *d = s;
    }
}

/// Whether the payload bytes after the sequence number are the pattern of `seq`.
pub fn check_pattern(frame: &[u8], seq: u64) -> bool {
    frame
        .iter()
        .enumerate()
        .skip(PATTERN_OFF)
        .all(|(off, b)| *b == pattern_byte(seq, off))
}

/// The 50 header bytes of a frame (through the sequence number), `None` if it is shorter.
fn head_mut(frame: &mut [u8]) -> Option<&mut [u8; PATTERN_OFF]> {
    <&mut [u8; PATTERN_OFF]>::try_from(frame.get_mut(..PATTERN_OFF)?).ok()
}

fn head(frame: &[u8]) -> Option<&[u8; PATTERN_OFF]> {
    <&[u8; PATTERN_OFF]>::try_from(frame.get(..PATTERN_OFF)?).ok()
}

fn put16(h: &mut [u8; PATTERN_OFF], off: usize, v: u16) {
    if let Some(d) = h.get_mut(off..off + 2) {
        for (d, s) in d.iter_mut().zip(v.to_be_bytes()) {
            *d = s;
        }
    }
}

fn get16(h: &[u8; PATTERN_OFF], off: usize) -> u16 {
    match (h.get(off), h.get(off + 1)) {
        (Some(a), Some(b)) => u16::from_be_bytes([*a, *b]),
        _ => 0,
    }
}

/// Writes every header byte that does not depend on the length or the sequence number.
fn write_static_headers(h: &mut [u8; PATTERN_OFF], mac: [u8; 6]) {
    let fixed: [(usize, &[u8]); 10] = [
        (0, &BROADCAST),
        (6, &mac),
        (12, &[0x08, 0x00]),
        (IP_OFF, &[0x45, TOS]),
        (IP_OFF + 4, &[0, 0]),
        (IP_OFF + 6, &FLAGS_DF.to_be_bytes()),
        (IP_OFF + 8, &[TTL, PROTO_UDP]),
        (IP_OFF + 12, &SRC_IP),
        (IP_OFF + 16, &DST_IP),
        (UDP_OFF, &[0x04, 0xd2, 0x04, 0xd2]),
    ];
    for (off, bytes) in fixed {
        if let Some(d) = h.get_mut(off..off + bytes.len()) {
            for (d, s) in d.iter_mut().zip(bytes) {
                *d = *s;
            }
        }
    }
}

/// Writes the length fields, the IPv4 checksum and the sequence number, with the UDP
/// checksum field left 0; returns the sum of the UDP checksum's words except the payload
/// pattern's.
fn write_variable_fields(h: &mut [u8; PATTERN_OFF], len: usize, seq: u64) -> u64 {
    let ip_len = (len - IP_OFF) as u16;
    let udp_len = (len - UDP_OFF) as u16;
    put16(h, IP_OFF + 2, ip_len);
    put16(
        h,
        IP_OFF + 10,
        checksum_field(IP_CONST_SUM + u64::from(ip_len)),
    );
    put16(h, UDP_OFF + 4, udp_len);
    put16(h, UDP_OFF + 6, 0);
    if let Some(d) = h.get_mut(PAYLOAD_OFF..PATTERN_OFF) {
        for (d, s) in d.iter_mut().zip(seq.to_le_bytes()) {
            *d = s;
        }
    }
    UDP_CONST_SUM + 2 * u64::from(udp_len) + seq_sum(seq)
}

/// Builds the frame carrying `seq`, `len` bytes long, into `frame[..len]` the plain way: byte
/// by byte, the UDP checksum summed over the bytes. A reference for [`FrameGen::build`] (and
/// usable by a host-side generator). `false` (nothing usable written) if `len` is outside
/// 60..=1514 or `frame` is shorter.
pub fn build_frame(frame: &mut [u8], mac: [u8; 6], len: usize, seq: u64) -> bool {
    if !(MIN_LEN..=MAX_LEN).contains(&len) || frame.len() < len {
        return false;
    }
    let Some(h) = head_mut(frame) else {
        return false;
    };
    write_static_headers(h, mac);
    write_variable_fields(h, len, seq);
    for (off, b) in frame.iter_mut().enumerate().take(len).skip(PATTERN_OFF) {
        *b = pattern_byte(seq, off);
    }
    let pseudo = u64::from(sum_be16(&SRC_IP))
        + u64::from(sum_be16(&DST_IP))
        + u64::from(PROTO_UDP)
        + (len - UDP_OFF) as u64;
    let data = u64::from(sum_be16(frame.get(UDP_OFF..len).unwrap_or(&[])));
    if let Some(h) = head_mut(frame) {
        put16(h, UDP_OFF + 6, checksum_field(pseudo + data));
    }
    true
}

/// The part of the UDP checksum's sum contributed by the pattern bytes, in O(1) per frame.
///
/// Payload byte `i >= 8` of the frame carrying `seq` is `R(s + i)` with `s = seq mod 256` and
/// `R(k) = k mod 256`; the checksum pairs payload bytes `(i, i + 1)` for even `i`. With
/// `word(k) = R(k) << 8 | R(k + 1)` and the prefix sums `t[k + 2] = t[k] + word(k)`, the
/// pattern's words sum to `t[s + 8 + 2p] - t[s + 8]` for `p` whole pairs, plus a lone last byte.
pub struct PatternSums {
    t: [u32; SUMS_LEN],
}

/// `s + 8 + 2p` is at most `255 + (MAX_LEN - PAYLOAD_OFF)`.
const SUMS_LEN: usize = 256 + MAX_LEN - PAYLOAD_OFF;

impl Default for PatternSums {
    fn default() -> Self {
        Self::new()
    }
}

impl PatternSums {
    /// Computes the table (about 1700 additions).
    pub fn new() -> Self {
        let mut t = [0u32; SUMS_LEN];
        for k in 0..SUMS_LEN - 2 {
            let word = ((k & 0xff) << 8 | ((k + 1) & 0xff)) as u32;
            let prev = t.get(k).copied().unwrap_or(0);
            if let Some(slot) = t.get_mut(k + 2) {
                *slot = prev + word;
            }
        }
        PatternSums { t }
    }

    /// Sum (not folded) of the big-endian words the pattern bytes of a `len`-byte frame
    /// carrying `seq` add to the UDP checksum; 0 for a length outside 60..=1514.
    pub fn sum(&self, seq: u64, len: usize) -> u64 {
        if !(MIN_LEN..=MAX_LEN).contains(&len) {
            return 0;
        }
        let n = len - PAYLOAD_OFF;
        let s = usize::from(seq as u8);
        let a = s + 8;
        let b = a + ((n - 8) & !1);
        let (Some(ta), Some(tb)) = (self.t.get(a), self.t.get(b)) else {
            return 0;
        };
        let mut sum = u64::from(tb - ta);
        if n & 1 != 0 {
            sum += (((s + n - 1) & 0xff) as u64) << 8;
        }
        sum
    }
}

/// The guest's frame builder: writes a buffer's static content once and afterwards only the
/// fields that change from frame to frame.
pub struct FrameGen {
    mac: [u8; 6],
    sums: PatternSums,
}

impl FrameGen {
    /// A builder for frames from `mac`.
    pub fn new(mac: [u8; 6]) -> Self {
        FrameGen {
            mac,
            sums: PatternSums::new(),
        }
    }

    /// Makes `frame[..len]` the frame carrying `seq`. `prepared` says how much of `frame` is
    /// already right: 0 for nothing, otherwise the value an earlier call returned for a frame
    /// whose `seq` was equal modulo 256 (the pattern depends only on that). Missing pattern
    /// bytes are written up to `upto` (at least `len`), so that later, longer frames in the same
    /// buffer need no more. Returns the new `prepared`, or 0 (nothing usable written) if `len`
    /// is outside 60..=1514 or `frame` is too short.
    ///
    /// Cost once prepared: the length fields, two checksums from precomputed sums, and the
    /// sequence number; nothing proportional to the frame length.
    pub fn build(
        &self,
        frame: &mut [u8],
        seq: u64,
        len: usize,
        prepared: usize,
        upto: usize,
    ) -> usize {
        if !(MIN_LEN..=MAX_LEN).contains(&len) {
            return 0;
        }
        let upto = upto.max(len).min(MAX_LEN);
        if frame.len() < upto {
            return 0;
        }
        let mut prepared = prepared;
        if prepared < PATTERN_OFF {
            if let Some(h) = head_mut(frame) {
                write_static_headers(h, self.mac);
            }
            prepared = PATTERN_OFF;
        }
        if prepared < len {
            fill_pattern(frame, seq, prepared, upto);
            prepared = upto;
        }
        let Some(h) = head_mut(frame) else {
            return 0;
        };
        let partial = write_variable_fields(h, len, seq);
        put16(
            h,
            UDP_OFF + 6,
            checksum_field(partial + self.sums.sum(seq, len)),
        );
        prepared
    }
}

/// Why a received frame is not a valid test frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than 60 bytes.
    Short,
    /// Longer than 1514 bytes.
    Long,
    /// Not IPv4 with a 20-byte header (ethertype or version/IHL byte).
    NotIpv4,
    /// Not UDP.
    NotUdp,
    /// IPv4 total length is not the frame length minus 14.
    IpLength,
    /// IPv4 header checksum wrong.
    IpChecksum,
    /// UDP length is not the frame length minus 34.
    UdpLength,
    /// UDP checksum absent (0) or wrong.
    UdpChecksum,
}

/// Checks a received frame: ethertype IPv4, version/IHL 0x45, protocol UDP, both length
/// fields consistent with the frame length, IPv4 header checksum and UDP checksum valid
/// (the pseudo-header uses the frame's own addresses). Returns the sequence number. The payload
/// pattern is not checked (see [`check_pattern`]): the UDP checksum covers it.
pub fn verify_frame(frame: &[u8]) -> Result<u64, FrameError> {
    let len = frame.len();
    if len < MIN_LEN {
        return Err(FrameError::Short);
    }
    if len > MAX_LEN {
        return Err(FrameError::Long);
    }
    let h = head(frame).ok_or(FrameError::Short)?;
    if get16(h, 12) != 0x0800 || h[IP_OFF] != 0x45 {
        return Err(FrameError::NotIpv4);
    }
    if h[IP_OFF + 9] != PROTO_UDP {
        return Err(FrameError::NotUdp);
    }
    if usize::from(get16(h, IP_OFF + 2)) != len - IP_OFF {
        return Err(FrameError::IpLength);
    }
    if sum_be16(frame.get(IP_OFF..UDP_OFF).unwrap_or(&[])) != 0xffff {
        return Err(FrameError::IpChecksum);
    }
    let udp_len = get16(h, UDP_OFF + 4);
    if usize::from(udp_len) != len - UDP_OFF {
        return Err(FrameError::UdpLength);
    }
    if get16(h, UDP_OFF + 6) == 0 {
        return Err(FrameError::UdpChecksum);
    }
    let pseudo = u64::from(get16(h, IP_OFF + 12))
        + u64::from(get16(h, IP_OFF + 14))
        + u64::from(get16(h, IP_OFF + 16))
        + u64::from(get16(h, IP_OFF + 18))
        + u64::from(PROTO_UDP)
        + u64::from(udp_len);
    let data = sum_be16(frame.get(UDP_OFF..).unwrap_or(&[]));
    if csum_fold(pseudo + u64::from(data)) != 0xffff {
        return Err(FrameError::UdpChecksum);
    }
    let mut seq = [0u8; 8];
    for (d, s) in seq.iter_mut().zip(&h[PAYLOAD_OFF..PATTERN_OFF]) {
        *d = *s;
    }
    Ok(u64::from_le_bytes(seq))
}

impl FrameError {
    /// A short description, for the guest's diagnostics.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameError::Short => "frame too short",
            FrameError::Long => "frame too long",
            FrameError::NotIpv4 => "not IPv4",
            FrameError::NotUdp => "not UDP",
            FrameError::IpLength => "IPv4 length mismatch",
            FrameError::IpChecksum => "bad IPv4 checksum",
            FrameError::UdpLength => "UDP length mismatch",
            FrameError::UdpChecksum => "bad UDP checksum",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The Internet checksum the textbook way: 16-bit big-endian words, folded at the end.
    fn reference_sum(bytes: &[u8]) -> u16 {
        let mut s: u64 = 0;
        for pair in bytes.chunks(2) {
            s += u64::from(pair[0]) << 8 | u64::from(*pair.get(1).unwrap_or(&0));
        }
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    fn built(len: usize, seq: u64) -> Vec<u8> {
        let mut f = vec![0u8; len];
        assert!(build_frame(&mut f, MAC, len, seq));
        f
    }

    #[test]
    fn exact_bytes_of_a_60_byte_frame() {
        // Computed independently (Python, struct module) from the layout in the module docs.
        let want = hex(
            "ffffffffffff52540012345608004510002e00004000401126ad0a0000010a01000104d204d2001aa5d2\
             000000000000000008090a0b0c0d0e0f1011",
        );
        assert_eq!(built(60, 0), want);
        // Checksums of two more, from the same independent computation.
        let f = built(1514, 300);
        assert_eq!(
            (&f[24..26], &f[40..42]),
            (&[0x20, 0xff][..], &[0x51, 0x84][..])
        );
        let f = built(61, 0x0102_0304_0506_0708);
        assert_eq!(
            (&f[24..26], &f[40..42]),
            (&[0x26, 0xac][..], &[0x4f, 0x98][..])
        );
        assert_eq!(&f[42..50], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(f[50], 0x08u8.wrapping_add(8));
    }

    #[test]
    fn checksum_primitives() {
        // RFC 1071's example: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
        let b = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum_be16(&b), 0xddf2);
        assert_eq!(csum_fold(0), 0);
        assert_eq!(csum_fold(0xffff), 0xffff);
        assert_eq!(csum_fold(0x1_0000), 1);
        assert_eq!(csum_fold(u64::MAX), 0xffff);
        assert_eq!(csum_fold(0xffff_ffff_0000_0001), 1);
        assert_eq!(csum_add(u64::MAX, 1), 1);
        assert_eq!(csum_add(u64::MAX, u64::MAX), u64::MAX);
        // Against the textbook sum, for every length and alignment of some awkward data.
        let data: Vec<u8> = (0..300u32).map(|i| (i * 0x9d + 0xf1) as u8).collect();
        for start in 0..9 {
            for end in start..data.len() {
                assert_eq!(
                    sum_be16(&data[start..end]),
                    reference_sum(&data[start..end]),
                    "{start}..{end}"
                );
            }
        }
        let ff = [0xffu8; 1000];
        assert_eq!(sum_be16(&ff), 0xffff);
        assert_eq!(sum_be16(&[]), 0);
    }

    #[test]
    fn pattern_fill_matches_reference() {
        let mut f = vec![0u8; MAX_LEN + 8];
        for seq in [0u64, 1, 7, 8, 200, 247, 248, 249, 255, 256, 1000, u64::MAX] {
            for (from, to) in [
                (50, 60),
                (50, 1514),
                (51, 1514),
                (57, 58),
                (60, 1514),
                (0, 64),
            ] {
                f.fill(0xee);
                fill_pattern(&mut f, seq, from, to);
                for (off, b) in f.iter().enumerate() {
                    let want = if (from.max(PATTERN_OFF)..to).contains(&off) {
                        (seq as u8).wrapping_add((off - 42) as u8)
                    } else {
                        0xee
                    };
                    assert_eq!(*b, want, "seq {seq} {from}..{to} offset {off}");
                }
            }
        }
        // Out of range: nothing written, no panic.
        let mut short = [0u8; 10];
        fill_pattern(&mut short, 3, 50, 60);
        assert_eq!(short, [0; 10]);
    }

    #[test]
    fn pattern_sums_match_summing() {
        let sums = PatternSums::new();
        for seq in 0..256u64 {
            for len in (MIN_LEN..=MAX_LEN).step_by(if seq % 17 == 0 { 1 } else { 37 }) {
                let f = built(len, seq);
                let direct = f[PATTERN_OFF..len]
                    .chunks(2)
                    .map(|p| u64::from(p[0]) << 8 | u64::from(*p.get(1).unwrap_or(&0)))
                    .sum::<u64>();
                assert_eq!(sums.sum(seq, len), direct, "seq {seq} len {len}");
            }
        }
        assert_eq!(sums.sum(0, 59), 0);
        assert_eq!(sums.sum(0, 1515), 0);
    }

    #[test]
    fn fast_builder_matches_reference() {
        let fg = FrameGen::new(MAC);
        let mut buf = vec![0u8; 2048];
        // A fresh buffer for every length.
        for len in MIN_LEN..=MAX_LEN {
            buf.fill(0);
            let seq = len as u64 * 7919;
            assert_eq!(fg.build(&mut buf, seq, len, 0, len), len);
            assert_eq!(&buf[..len], &built(len, seq)[..], "len {len}");
        }
        // One buffer reused by frames whose seq agree modulo 256, lengths growing and shrinking:
        // only the variable fields are rewritten.
        buf.fill(0);
        let (mut prepared, mut most) = (0, 0);
        for (i, len) in [60, 1514, 61, 777, 1514, 60, 1001].into_iter().enumerate() {
            let seq = 5 + 256 * i as u64;
            prepared = fg.build(&mut buf, seq, len, prepared, 1000);
            most = most.max(1000.max(len));
            assert_eq!(prepared, most, "prepared after {len}");
            assert_eq!(&buf[..len], &built(len, seq)[..], "len {len} seq {seq}");
            assert_eq!(verify_frame(&buf[..len]), Ok(seq));
        }
        // Bad lengths or a short buffer: refused.
        assert_eq!(fg.build(&mut buf, 0, 59, 0, 0), 0);
        assert_eq!(fg.build(&mut buf, 0, 1515, 0, 0), 0);
        assert_eq!(fg.build(&mut buf[..100], 0, 101, 0, 0), 0);
        assert!(!build_frame(&mut buf[..100], MAC, 101, 0));
    }

    #[test]
    fn zero_checksum_is_sent_as_ffff() {
        // Find a frame whose UDP checksum computes to 0 and check it is sent as 0xffff.
        let fg = FrameGen::new(MAC);
        let mut buf = vec![0u8; 2048];
        let mut found = false;
        for seq in 0..200_000u64 {
            fg.build(&mut buf, seq, 60, 0, 60);
            let f = &buf[..60];
            if f[40..42] == [0xff, 0xff] {
                assert_eq!(verify_frame(f), Ok(seq));
                assert_eq!(f, &built(60, seq)[..]);
                found = true;
                break;
            }
        }
        assert!(found);
    }

    #[test]
    fn verification() {
        for (len, seq) in [(60, 0), (61, 1), (1514, 300), (1000, u64::MAX)] {
            let good = built(len, seq);
            assert_eq!(verify_frame(&good), Ok(seq));
            assert!(check_pattern(&good, seq));
            assert!(!check_pattern(&good, seq.wrapping_add(1)));
            // Any single corrupted byte from the ethertype on is caught.
            for off in 12..len {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut bad = good.clone();
                    bad[off] ^= flip;
                    assert!(
                        verify_frame(&bad).is_err(),
                        "len {len} byte {off} ^ {flip:#x}"
                    );
                }
            }
        }
        let good = built(100, 9);
        let mut f = good.clone();
        f[50] ^= 1;
        assert_eq!(verify_frame(&f), Err(FrameError::UdpChecksum));
        assert!(!check_pattern(&f, 9));
        let mut f = good.clone();
        f[24] ^= 1;
        assert_eq!(verify_frame(&f), Err(FrameError::IpChecksum));
        let mut f = good.clone();
        f[17] ^= 1;
        assert_eq!(verify_frame(&f), Err(FrameError::IpLength));
        let mut f = good.clone();
        f[39] ^= 1;
        assert_eq!(verify_frame(&f), Err(FrameError::UdpLength));
        let mut f = good.clone();
        f[23] = 6;
        assert_eq!(verify_frame(&f), Err(FrameError::NotUdp));
        let mut f = good.clone();
        f[12] = 0x86;
        assert_eq!(verify_frame(&f), Err(FrameError::NotIpv4));
        let mut f = good.clone();
        f[40..42].fill(0);
        assert_eq!(verify_frame(&f), Err(FrameError::UdpChecksum));
        // A frame cut short or padded no longer matches its length fields.
        assert_eq!(verify_frame(&good[..99]), Err(FrameError::IpLength));
        let mut f = good.clone();
        f.push(0);
        assert_eq!(verify_frame(&f), Err(FrameError::IpLength));
        assert_eq!(verify_frame(&good[..59]), Err(FrameError::Short));
        assert_eq!(verify_frame(&[0u8; 1515]), Err(FrameError::Long));
        // MACs are not covered: any source and destination verify.
        let mut f = good.clone();
        f[..12].fill(0x42);
        assert_eq!(verify_frame(&f), Ok(9));
    }

    #[test]
    fn length_rule() {
        assert_eq!(gen_len(0, 60, 1514), 60);
        assert_eq!(gen_len(1, 60, 1514), 157);
        assert_eq!(gen_len(15, 60, 1514), 60);
        assert_eq!(gen_len(16, 60, 1514), 60 + 97);
        assert_eq!(gen_len(100, 60, 1514), 60 + 9700 % 1455);
        assert_eq!(gen_len(5, 60, 60), 60);
        assert_eq!(gen_len(5, 100, 60), 100);
        for seq in (0..5000u64).chain([u64::MAX, u64::MAX / 97 + 1, 1 << 63]) {
            for (min, max) in [(60u16, 1514u16), (60, 61), (100, 1000), (1514, 1514)] {
                let span = u128::from(max - min) + 1;
                let want = u128::from(min) + (u128::from(seq) * 97) % span;
                let got = gen_len(seq, min, max);
                assert_eq!(got as u128, want, "seq {seq} {min}-{max}");
                assert!((usize::from(min)..=usize::from(max)).contains(&got));
            }
        }
    }
}
