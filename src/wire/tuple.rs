//! `Tuple` encoding and `addr16` (§2).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::WireError;

pub const TUPLE_V4_LEN: usize = 7;
pub const TUPLE_V6_LEN: usize = 19;
pub const MAX_TUPLE_LEN: usize = TUPLE_V6_LEN;

/// An IPv4-mapped IPv6 address (as a dual-stack socket reports IPv4 peers) becomes IPv4, so a
/// client has one tuple whichever socket saw it. Scope and flow info are dropped.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => SocketAddr::V6(SocketAddrV6::new(*v6.ip(), v6.port(), 0, 0)),
        },
        v4 => v4,
    }
}

/// The IPv6 address, or the IPv4-mapped form `::ffff:a.b.c.d`.
pub fn addr16(addr: &SocketAddr) -> [u8; 16] {
    match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn tuple_len(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => TUPLE_V4_LEN,
        SocketAddr::V6(_) => TUPLE_V6_LEN,
    }
}

/// Writes `u8 family || u16 port || address` and returns its length. `out` must hold
/// `tuple_len(addr)` bytes.
pub fn emit_tuple(addr: &SocketAddr, out: &mut [u8]) -> usize {
    out[1..3].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip() {
        IpAddr::V4(v4) => {
            out[0] = 4;
            out[3..7].copy_from_slice(&v4.octets());
            TUPLE_V4_LEN
        }
        IpAddr::V6(v6) => {
            out[0] = 6;
            out[3..19].copy_from_slice(&v6.octets());
            TUPLE_V6_LEN
        }
    }
}

/// Parses a tuple at the start of `buf`, returning it and the bytes consumed.
pub fn parse_tuple(buf: &[u8]) -> Result<(SocketAddr, usize), WireError> {
    let family = *buf.first().ok_or(WireError::TooShort {
        what: "tuple",
        min: TUPLE_V4_LEN,
        got: 0,
    })?;
    let need = match family {
        4 => TUPLE_V4_LEN,
        6 => TUPLE_V6_LEN,
        f => return Err(WireError::BadFamily(f)),
    };
    if buf.len() < need {
        return Err(WireError::TooShort {
            what: "tuple",
            min: need,
            got: buf.len(),
        });
    }
    let port = u16::from_be_bytes([buf[1], buf[2]]);
    let ip = if family == 4 {
        IpAddr::V4(Ipv4Addr::new(buf[3], buf[4], buf[5], buf[6]))
    } else {
        IpAddr::V6(Ipv6Addr::from(super::array::<16>(buf, 3)))
    };
    Ok((SocketAddr::new(ip, port), need))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_bytes() {
        let a: SocketAddr = "198.51.100.7:40001".parse().unwrap();
        let mut b = [0u8; MAX_TUPLE_LEN];
        let n = emit_tuple(&a, &mut b);
        assert_eq!(hex::encode(&b[..n]), "049c41c6336407");
        assert_eq!(parse_tuple(&b[..n]), Ok((a, 7)));
        assert_eq!(hex::encode(addr16(&a)), "00000000000000000000ffffc6336407");
    }

    #[test]
    fn v6_roundtrip_and_errors() {
        let a: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let mut b = [0u8; MAX_TUPLE_LEN];
        let n = emit_tuple(&a, &mut b);
        assert_eq!(n, 19);
        assert_eq!(parse_tuple(&b[..n]), Ok((a, 19)));
        assert!(parse_tuple(&b[..18]).is_err());
        assert_eq!(parse_tuple(&[5, 0, 0]), Err(WireError::BadFamily(5)));
        assert!(parse_tuple(&[]).is_err());
    }

    #[test]
    fn canonical_unmaps_v4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:9".parse().unwrap();
        assert_eq!(canonical(mapped), "10.1.2.3:9".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
