//! UNRECOGNIZED (§5): `0x55 || u8(e mod 256) || u64(t) || Tuple(observed) || cookie(16)`.

use std::net::SocketAddr;

use super::tuple::{emit_tuple, parse_tuple, tuple_len};
use super::{MsgType, WireError, array, be_u64, check_type};
use crate::time::Ticks;

pub const UNRECOGNIZED_V4_LEN: usize = 33;
pub const UNRECOGNIZED_V6_LEN: usize = 45;
const FIXED: usize = 1 + 1 + 8 + 16;

/// Length of the UNRECOGNIZED that a datagram from `observed` would draw.
pub fn unrecognized_len(observed: &SocketAddr) -> usize {
    FIXED + tuple_len(observed)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unrecognized {
    pub epoch_byte: u8,
    pub t: Ticks,
    pub observed: SocketAddr,
    pub cookie: [u8; 16],
}

impl Unrecognized {
    /// Parses an UNRECOGNIZED of exactly 33 (IPv4) or 45 (IPv6) bytes.
    pub fn parse(buf: &[u8]) -> Result<Unrecognized, WireError> {
        check_type(buf, MsgType::Unrecognized)?;
        if buf.len() < UNRECOGNIZED_V4_LEN {
            return Err(WireError::TooShort {
                what: "UNRECOGNIZED",
                min: UNRECOGNIZED_V4_LEN,
                got: buf.len(),
            });
        }
        let (observed, n) = parse_tuple(&buf[10..])?;
        let expected = FIXED + n;
        if buf.len() != expected {
            return Err(WireError::BadLength {
                what: "UNRECOGNIZED",
                expected,
                got: buf.len(),
            });
        }
        Ok(Unrecognized {
            epoch_byte: buf[1],
            t: Ticks(be_u64(buf, 2)),
            observed,
            cookie: array(buf, 10 + n),
        })
    }

    pub fn len(&self) -> usize {
        unrecognized_len(&self.observed)
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the datagram into `out` (at least `self.len()` bytes) and returns its length.
    pub fn emit(&self, out: &mut [u8]) -> usize {
        out[0] = MsgType::Unrecognized as u8;
        out[1] = self.epoch_byte;
        out[2..10].copy_from_slice(&self.t.0.to_be_bytes());
        let n = emit_tuple(&self.observed, &mut out[10..]);
        out[10 + n..10 + n + 16].copy_from_slice(&self.cookie);
        FIXED + n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_both_families() {
        for addr in ["198.51.100.7:40001", "[2001:db8::7]:40001"] {
            let u = Unrecognized {
                epoch_byte: 7,
                t: Ticks(639_028_224_000_000_000),
                observed: addr.parse().unwrap(),
                cookie: [0xab; 16],
            };
            let mut buf = [0u8; UNRECOGNIZED_V6_LEN];
            let n = u.emit(&mut buf);
            assert_eq!(n, u.len());
            assert_eq!(Unrecognized::parse(&buf[..n]), Ok(u));
            for cut in 0..n {
                assert!(Unrecognized::parse(&buf[..cut]).is_err());
            }
            let mut longer = buf[..n].to_vec();
            longer.push(0);
            assert!(Unrecognized::parse(&longer).is_err());
        }
    }
}
