//! The test frame format shared by `nmvm pkt-gen`, the benchmarks and the
//! bundled guest: Ethernet + IPv4 + UDP with a sequence number and a
//! pattern that depends on it, so that any corruption, loss, duplicate or
//! reordering is detectable.
//!
//! ```text
//! 0   dst MAC (6)  src MAC (6)  ethertype 0x0800
//! 14  IPv4: 0x45, TOS 0x10, total length, id 0, DF, TTL 64, UDP, checksum,
//!     10.0.0.1 -> 10.1.0.1
//! 34  UDP: 1234 -> 1234, length, checksum (valid, over the pseudo-header)
//! 42  payload: seq (u64 little endian), then byte i = seq as u8 + i as u8
//! ```
//!
//! Lengths are 60..=1514 bytes (no CRC).

/// Shortest frame (Ethernet minimum without CRC).
pub const MIN_LEN: usize = 60;
/// Longest frame (standard MTU).
pub const MAX_LEN: usize = 1514;
const ETH: usize = 14;
const IP: usize = 20;
const UDP: usize = 8;
/// Offset of the payload.
pub const PAYLOAD: usize = ETH + IP + UDP;

/// Addresses written into generated frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source IPv4 address.
    pub src_ip: [u8; 4],
    /// Destination IPv4 address.
    pub dst_ip: [u8; 4],
    /// UDP source port.
    pub src_port: u16,
    /// UDP destination port.
    pub dst_port: u16,
}

impl Default for Endpoints {
    /// pkt-gen's defaults: 10.0.0.1:1234 to 10.1.0.1:1234, broadcast.
    fn default() -> Self {
        Self {
            src_mac: [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01],
            dst_mac: [0xff; 6],
            src_ip: [10, 0, 0, 1],
            dst_ip: [10, 1, 0, 1],
            src_port: 1234,
            dst_port: 1234,
        }
    }
}

/// Why a received frame is not one of ours, intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than the headers and sequence number, or longer than 1514.
    Length,
    /// Not IPv4/UDP to our port.
    NotOurs,
    /// The IPv4 or UDP length fields disagree with the frame length.
    LengthFields,
    /// The IPv4 header checksum is wrong.
    IpChecksum,
    /// The UDP checksum is wrong.
    UdpChecksum,
    /// A payload byte differs from the pattern.
    Pattern,
}

/// The frame length for sequence number `seq` when sizes vary over
/// `min..=max`: `min + (seq * 97) % (max - min + 1)`, computed without
/// overflow (the same rule as the guest's `len=MIN-MAX`).
pub fn len_for(seq: u64, min: usize, max: usize) -> usize {
    if max <= min {
        return min;
    }
    let span = (max - min + 1) as u64;
    min + ((seq % span) * 97 % span) as usize
}

fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// One's-complement sum of `data` as big-endian 16-bit words.
fn sum16(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    let mut sum: u64 = chunks
        .by_ref()
        .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn udp_checksum(frame: &[u8]) -> u16 {
    let udp_len = (frame.len() - ETH - IP) as u64;
    let pseudo = sum16(&frame[ETH + 12..ETH + 20]) + 17 + udp_len;
    let c = !fold(pseudo + sum16(&frame[ETH + IP..]));
    if c == 0 {
        0xffff
    } else {
        c
    }
}

/// Writes frame `seq` of `len` bytes (60..=1514) into `out[..len]`.
pub fn build(out: &mut [u8], len: usize, seq: u64, ep: &Endpoints) {
    let len = len.clamp(MIN_LEN, MAX_LEN);
    let f = &mut out[..len];
    f[0..6].copy_from_slice(&ep.dst_mac);
    f[6..12].copy_from_slice(&ep.src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[ETH..ETH + IP];
    ip[..12].copy_from_slice(&[0x45, 0x10, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip[12..16].copy_from_slice(&ep.src_ip);
    ip[16..20].copy_from_slice(&ep.dst_ip);
    ip[2..4].copy_from_slice(&((len - ETH) as u16).to_be_bytes());
    let ipsum = !fold(sum16(ip));
    ip[10..12].copy_from_slice(&ipsum.to_be_bytes());
    let udp = &mut f[ETH + IP..PAYLOAD];
    udp[0..2].copy_from_slice(&ep.src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&ep.dst_port.to_be_bytes());
    udp[4..6].copy_from_slice(&((len - ETH - IP) as u16).to_be_bytes());
    udp[6..8].fill(0);
    f[PAYLOAD..PAYLOAD + 8].copy_from_slice(&seq.to_le_bytes());
    let base = seq as u8;
    for (i, b) in f[PAYLOAD..].iter_mut().enumerate().skip(8) {
        *b = base.wrapping_add(i as u8);
    }
    let c = udp_checksum(f);
    f[ETH + IP + 6..ETH + IP + 8].copy_from_slice(&c.to_be_bytes());
}

/// Checks a received frame; returns its sequence number.
pub fn verify(f: &[u8]) -> Result<u64, FrameError> {
    if f.len() < PAYLOAD + 8 || f.len() > MAX_LEN {
        return Err(FrameError::Length);
    }
    if f[12..14] != [0x08, 0x00] || f[ETH] != 0x45 || f[ETH + 9] != 17 {
        return Err(FrameError::NotOurs);
    }
    let ip_len = usize::from(u16::from_be_bytes([f[ETH + 2], f[ETH + 3]]));
    let udp_len = usize::from(u16::from_be_bytes([f[ETH + IP + 4], f[ETH + IP + 5]]));
    if ip_len != f.len() - ETH || udp_len != f.len() - ETH - IP {
        return Err(FrameError::LengthFields);
    }
    if fold(sum16(&f[ETH..ETH + IP])) != 0xffff {
        return Err(FrameError::IpChecksum);
    }
    let stored = u16::from_be_bytes([f[ETH + IP + 6], f[ETH + IP + 7]]);
    let mut copy = [0u8; MAX_LEN];
    copy[..f.len()].copy_from_slice(f);
    copy[ETH + IP + 6] = 0;
    copy[ETH + IP + 7] = 0;
    if udp_checksum(&copy[..f.len()]) != stored {
        return Err(FrameError::UdpChecksum);
    }
    let seq = u64::from_le_bytes(f[PAYLOAD..PAYLOAD + 8].try_into().unwrap_or_default());
    let base = seq as u8;
    if f[PAYLOAD..]
        .iter()
        .enumerate()
        .skip(8)
        .any(|(i, b)| *b != base.wrapping_add(i as u8))
    {
        return Err(FrameError::Pattern);
    }
    Ok(seq)
}

/// Swaps the MAC addresses in place (what an echo appliance does).
pub fn swap_macs(f: &mut [u8]) {
    if f.len() >= 12 {
        let (dst, rest) = f.split_at_mut(6);
        dst.swap_with_slice(&mut rest[..6]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

    fn ep() -> Endpoints {
        Endpoints {
            src_mac: SRC,
            ..Endpoints::default()
        }
    }

    #[test]
    fn built_frames_verify_at_every_length() {
        let mut buf = [0u8; MAX_LEN];
        for len in MIN_LEN..=MAX_LEN {
            let seq = (len as u64) * 1_000_003;
            build(&mut buf, len, seq, &ep());
            assert_eq!(verify(&buf[..len]), Ok(seq), "len {len}");
        }
    }

    #[test]
    fn any_single_byte_corruption_is_caught() {
        let mut buf = [0u8; MAX_LEN];
        build(&mut buf, 200, 42, &ep());
        for i in 12..200 {
            let mut f = buf;
            f[i] ^= 0x5a;
            assert!(verify(&f[..200]).is_err(), "byte {i}");
        }
        assert_eq!(verify(&buf[..199]), Err(FrameError::LengthFields));
    }

    #[test]
    fn echoed_frames_still_verify() {
        let mut buf = [0u8; MAX_LEN];
        build(&mut buf, 64, 7, &ep());
        swap_macs(&mut buf[..64]);
        assert_eq!(&buf[..6], &SRC);
        assert_eq!(verify(&buf[..64]), Ok(7));
    }

    #[test]
    fn the_guest_builds_and_checks_the_same_bytes() {
        let mut host = [0u8; MAX_LEN];
        let mut guest = [0u8; MAX_LEN];
        for (seq, len) in [
            (0u64, 60usize),
            (1, 61),
            (255, 1514),
            (1 << 40, 777),
            (u64::MAX, 64),
        ] {
            build(&mut host, len, seq, &ep());
            assert!(nmvm_guest::frame::build_frame(&mut guest, SRC, len, seq));
            assert_eq!(&host[..len], &guest[..len], "seq {seq} len {len}");
            assert_eq!(nmvm_guest::frame::verify_frame(&host[..len]), Ok(seq));
            assert_eq!(
                len_for(seq, 60, 1514),
                nmvm_guest::frame::gen_len(seq, 60, 1514)
            );
        }
    }

    #[test]
    fn mixed_lengths_cover_the_range() {
        let lens: Vec<usize> = (0..2000).map(|s| len_for(s, 60, 1514)).collect();
        assert!(lens.iter().all(|l| (60..=1514).contains(l)));
        assert!(lens.contains(&60) && lens.iter().any(|&l| l > 1400));
        assert_eq!(len_for(5, 64, 64), 64);
    }
}
