//! Ethernet/IPv4/IPv6/UDP frames for the AF_XDP backend: a length-checked parser for received
//! frames (untrusted bytes: every read is bounds-checked, nothing panics) and builders for the
//! frames the gateway sends (header checksums and UDP checksums computed here, since AF_XDP
//! frames bypass the kernel's stack and its offloads).
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const UDP_LEN: usize = 8;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_UDP: u8 = 17;
/// Hop limit / TTL of frames we build (the kernel's default).
const TTL: u8 = 64;

pub type Mac = [u8; 6];

/// A received UDP datagram inside a frame: addresses and the payload's byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpFrame {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// `frame[payload.0..payload.1]` is the UDP payload.
    pub payload: (usize, usize),
}

/// Why a frame was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than its headers claim, or lengths inconsistent.
    Truncated,
    /// Not IPv4/IPv6 + UDP, IPv4 with options or fragmented, bad IPv4 header checksum, ...
    Unsupported,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn mac_at(b: &[u8], at: usize) -> Option<Mac> {
    b.get(at..at + 6)?.try_into().ok()
}

/// Parses an Ethernet frame carrying IPv4 or IPv6 UDP (no VLAN tag, no IPv4 options, no IPv6
/// extension headers, not a fragment: the XDP program passes those to the kernel anyway).
/// Trailing Ethernet padding is ignored. The UDP checksum is *not* verified: on veth the
/// sender's checksum offload leaves a partial sum in the field (see docs/xdp.md).
pub fn parse(f: &[u8]) -> Result<UdpFrame, ParseError> {
    use ParseError::*;
    let dst_mac = mac_at(f, 0).ok_or(Truncated)?;
    let src_mac = mac_at(f, 6).ok_or(Truncated)?;
    let ethertype = be16(f, 12).ok_or(Truncated)?;
    let (src_ip, dst_ip, udp_at, ip_end): (IpAddr, IpAddr, usize, usize) = match ethertype {
        ETHERTYPE_IPV4 => {
            let ip = f.get(ETH_LEN..ETH_LEN + IPV4_LEN).ok_or(Truncated)?;
            if ip[0] != 0x45 || ip[9] != PROTO_UDP {
                return Err(Unsupported);
            }
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return Err(Unsupported); // a fragment
            }
            if checksum_fold(sum_be16(0, ip)) != 0 {
                return Err(Unsupported);
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            (src.into(), dst.into(), ETH_LEN + IPV4_LEN, ETH_LEN + total)
        }
        ETHERTYPE_IPV6 => {
            let ip = f.get(ETH_LEN..ETH_LEN + IPV6_LEN).ok_or(Truncated)?;
            if ip[0] >> 4 != 6 || ip[6] != PROTO_UDP {
                return Err(Unsupported);
            }
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let src: [u8; 16] = ip[8..24].try_into().map_err(|_| Truncated)?;
            let dst: [u8; 16] = ip[24..40].try_into().map_err(|_| Truncated)?;
            (
                Ipv6Addr::from(src).into(),
                Ipv6Addr::from(dst).into(),
                ETH_LEN + IPV6_LEN,
                ETH_LEN + IPV6_LEN + plen,
            )
        }
        _ => return Err(Unsupported),
    };
    if ip_end > f.len() || ip_end < udp_at + UDP_LEN {
        return Err(Truncated);
    }
    let udp = &f[udp_at..udp_at + UDP_LEN];
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    let ulen = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if ulen < UDP_LEN || udp_at + ulen > ip_end {
        return Err(Truncated);
    }
    Ok(UdpFrame {
        src_mac,
        dst_mac,
        src: SocketAddr::new(src_ip, sport),
        dst: SocketAddr::new(dst_ip, dport),
        payload: (udp_at + UDP_LEN, udp_at + ulen),
    })
}

/// One's-complement sum of big-endian 16-bit words (an odd last byte is padded with zero),
/// added to `acc`, not folded.
pub fn sum_be16(mut acc: u64, b: &[u8]) -> u64 {
    let mut chunks = b.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a sum to 16 bits and complements it.
pub fn checksum_fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Header bytes before the payload for a datagram from `src` to `dst`.
pub fn header_len(v6: bool) -> usize {
    ETH_LEN + UDP_LEN + if v6 { IPV6_LEN } else { IPV4_LEN }
}

/// The fixed fields of frames one socket sends.
#[derive(Clone, Copy, Debug)]
pub struct FrameSpec {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// IPv4 identification.
    pub ip_id: u16,
}

/// Writes a complete frame (headers + `payload`) into `out`; returns its length, or `None` if
/// `out` is too short, the payload too long for one datagram, or the addresses' families
/// differ.
pub fn build(spec: &FrameSpec, payload: &[u8], out: &mut [u8]) -> Option<usize> {
    let v6 = match (spec.src.ip(), spec.dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => false,
        (IpAddr::V6(_), IpAddr::V6(_)) => true,
        _ => return None,
    };
    let hl = header_len(v6);
    let total = hl + payload.len();
    let udp_len = u16::try_from(UDP_LEN + payload.len()).ok()?;
    if total > out.len() {
        return None;
    }
    let out = &mut out[..total];
    out[0..6].copy_from_slice(&spec.dst_mac);
    out[6..12].copy_from_slice(&spec.src_mac);
    let ethertype = if v6 { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 };
    out[12..14].copy_from_slice(&ethertype.to_be_bytes());
    let udp_at = hl - UDP_LEN;
    // Pseudo-header sum for the UDP checksum (RFC 768, RFC 8200 §8.1).
    let mut pseudo = u64::from(PROTO_UDP) + u64::from(udp_len);
    match (spec.src.ip(), spec.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip_total = u16::try_from(IPV4_LEN + usize::from(udp_len)).ok()?;
            let ip = &mut out[ETH_LEN..ETH_LEN + IPV4_LEN];
            ip[0] = 0x45;
            ip[1] = 0;
            ip[2..4].copy_from_slice(&ip_total.to_be_bytes());
            ip[4..6].copy_from_slice(&spec.ip_id.to_be_bytes());
            ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
            ip[8] = TTL;
            ip[9] = PROTO_UDP;
            ip[10..12].fill(0);
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = checksum_fold(sum_be16(0, ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            pseudo = sum_be16(pseudo, &s.octets());
            pseudo = sum_be16(pseudo, &d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = &mut out[ETH_LEN..ETH_LEN + IPV6_LEN];
            ip[0..4].copy_from_slice(&0x6000_0000u32.to_be_bytes());
            ip[4..6].copy_from_slice(&udp_len.to_be_bytes());
            ip[6] = PROTO_UDP;
            ip[7] = TTL;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            pseudo = sum_be16(pseudo, &s.octets());
            pseudo = sum_be16(pseudo, &d.octets());
        }
        _ => return None,
    }
    let udp = &mut out[udp_at..];
    udp[0..2].copy_from_slice(&spec.src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&spec.dst.port().to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].fill(0);
    udp[UDP_LEN..].copy_from_slice(payload);
    let mut c = checksum_fold(sum_be16(pseudo, udp));
    if c == 0 {
        c = 0xffff; // RFC 768: a computed zero is sent as all ones (0 means "none" in IPv4)
    }
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A straightforward reference: RFC 1071 over a byte vector, 16 bits at a time.
    fn reference_checksum(bytes: &[u8]) -> u16 {
        let mut v = bytes.to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        let mut sum: u32 = 0;
        for w in v.chunks(2) {
            sum += u32::from(w[0]) << 8 | u32::from(w[1]);
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn spec(src: &str, dst: &str) -> FrameSpec {
        FrameSpec {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            ip_id: 0x1234,
        }
    }

    /// A known IPv4/UDP frame, byte for byte (checksums worked out by hand: IPv4 0x1499,
    /// UDP 0x73c5), and the IPv4 checksum against the reference computation.
    #[test]
    fn ipv4_known_frame() {
        let mut out = [0u8; 64];
        let n = build(&spec("10.0.0.1:4000", "10.0.0.2:9"), b"hi", &mut out).unwrap();
        let want: [u8; 44] = [
            2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00, // ethernet
            0x45, 0, 0, 30, 0x12, 0x34, 0x40, 0, 64, 17, 0x14, 0x99, // ipv4 ...
            10, 0, 0, 1, 10, 0, 0, 2, // ... addresses
            0x0f, 0xa0, 0, 9, 0, 10, 0x73, 0xc5, b'h', b'i', // udp
        ];
        assert_eq!(&out[..n], &want[..]);
        let mut hdr = out[14..34].to_vec();
        hdr[10..12].fill(0);
        assert_eq!(reference_checksum(&hdr), 0x1499);
        assert!(udp_checksum_ok(&out[..n], false));
    }

    fn udp_checksum_ok(frame: &[u8], v6: bool) -> bool {
        let (ip_at, udp_at) = (ETH_LEN, header_len(v6) - UDP_LEN);
        let udp = &frame[udp_at..];
        let mut pseudo = Vec::new();
        if v6 {
            pseudo.extend_from_slice(&frame[ip_at + 8..ip_at + 40]);
            pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
        } else {
            pseudo.extend_from_slice(&frame[ip_at + 12..ip_at + 20]);
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        }
        pseudo.extend_from_slice(udp);
        reference_checksum(&pseudo) == 0
    }

    proptest! {
        /// Arbitrary bytes never panic the parser.
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        /// Valid frames round-trip, checksums verify against the reference, and every
        /// truncation or single corrupted header byte is rejected or parsed within bounds.
        #[test]
        fn build_parse_roundtrip(
            v6 in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            sport in 1u16.., dport in 1u16..,
            a in any::<[u8; 16]>(), b in any::<[u8; 16]>(),
            pad in 0usize..8, flip in 0usize..62, bit in 0u8..8,
        ) {
            let (src, dst): (IpAddr, IpAddr) = if v6 {
                (Ipv6Addr::from(a).into(), Ipv6Addr::from(b).into())
            } else {
                (Ipv4Addr::new(a[0], a[1], a[2], a[3]).into(),
                 Ipv4Addr::new(b[0], b[1], b[2], b[3]).into())
            };
            let s = FrameSpec { src: SocketAddr::new(src, sport), dst: SocketAddr::new(dst, dport), ..spec("1.1.1.1:1", "2.2.2.2:2") };
            let mut out = vec![0u8; 400];
            let n = build(&s, &payload, &mut out).unwrap();
            prop_assert_eq!(n, header_len(v6) + payload.len());
            prop_assert!(udp_checksum_ok(&out[..n], v6));
            if !v6 {
                prop_assert_eq!(reference_checksum(&out[14..34]), 0);
            }
            // Ethernet padding after the datagram is ignored.
            let p = parse(&out[..n + pad]).unwrap();
            prop_assert_eq!(p.src, s.src);
            prop_assert_eq!(p.dst, s.dst);
            prop_assert_eq!((p.src_mac, p.dst_mac), (s.src_mac, s.dst_mac));
            prop_assert_eq!(&out[p.payload.0..p.payload.1], &payload[..]);
            // Truncated frames are refused.
            for cut in [0, 13, 14, header_len(v6) - 1] {
                prop_assert!(parse(&out[..cut]).is_err());
            }
            if !payload.is_empty() {
                prop_assert_eq!(parse(&out[..n - 1]), Err(ParseError::Truncated));
            }
            // A flipped header bit never yields an out-of-bounds payload.
            let mut bad = out[..n].to_vec();
            let i = flip % header_len(v6);
            bad[i] ^= 1 << bit;
            if let Ok(q) = parse(&bad) {
                prop_assert!(q.payload.0 <= q.payload.1 && q.payload.1 <= bad.len());
            }
        }
    }

    #[test]
    fn rejects_fragments_options_and_mixed_families() {
        let mut out = [0u8; 64];
        let n = build(&spec("10.0.0.1:1", "10.0.0.2:2"), b"x", &mut out).unwrap();
        let mut frag = out[..n].to_vec();
        frag[20] |= 0x20; // MF
        assert_eq!(parse(&frag), Err(ParseError::Unsupported));
        let mut opts = out[..n].to_vec();
        opts[14] = 0x46;
        assert_eq!(parse(&opts), Err(ParseError::Unsupported));
        assert_eq!(build(&spec("10.0.0.1:1", "[::1]:2"), b"x", &mut out), None);
        assert_eq!(
            build(&spec("10.0.0.1:1", "10.0.0.2:2"), &[0; 60], &mut out),
            None
        );
    }
}
