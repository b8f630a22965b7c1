//! DATA (§7): `0x44 || u64(seq) || GCM-Seal(kd_dir, u32(0) || u64(seq), 0x44 || u64(seq), payload)`.

use crate::crypto::Gcm;

use super::{MsgType, WireError, be_u64, check_type};
use crate::crypto::{self, AuthError, TAG_LEN};

pub const DATA_HEADER_LEN: usize = 9;
/// Header plus tag: a DATA is `payload + 25` bytes.
pub const DATA_OVERHEAD: usize = DATA_HEADER_LEN + TAG_LEN;

/// `u32(0) || u64(seq)`.
pub fn data_nonce(seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

/// Seals `payload` as DATA number `seq` into `out`, which must hold `payload.len() + 25`
/// bytes; returns the datagram length.
pub fn seal_data(key: &Gcm, seq: u64, payload: &[u8], out: &mut [u8]) -> usize {
    let len = payload.len() + DATA_OVERHEAD;
    let out = &mut out[..len];
    out[0] = MsgType::Data as u8;
    out[1..9].copy_from_slice(&seq.to_be_bytes());
    out[9..9 + payload.len()].copy_from_slice(payload);
    let (aad, body) = out.split_at_mut(DATA_HEADER_LEN);
    crypto::seal_in_place(key, &data_nonce(seq), aad, body);
    len
}

/// A DATA with checked type and minimum length.
#[derive(Clone, Copy, Debug)]
pub struct DataView<'a> {
    buf: &'a [u8],
}

impl<'a> DataView<'a> {
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, WireError> {
        check_type(buf, MsgType::Data)?;
        if buf.len() < DATA_OVERHEAD {
            return Err(WireError::TooShort {
                what: "DATA",
                min: DATA_OVERHEAD,
                got: buf.len(),
            });
        }
        Ok(DataView { buf })
    }
    pub fn seq(&self) -> u64 {
        be_u64(self.buf, 1)
    }
    pub fn payload_len(&self) -> usize {
        self.buf.len() - DATA_OVERHEAD
    }
    /// Opens the payload into `out[..payload_len()]`. Check the replay window after this
    /// succeeds, never before (an unauthenticated seq must not move it).
    pub fn open(&self, key: &Gcm, out: &mut [u8]) -> Result<usize, AuthError> {
        let n = self.payload_len();
        let out = out.get_mut(..n).ok_or(AuthError)?;
        crypto::open_to(
            key,
            &data_nonce(self.seq()),
            &self.buf[..DATA_HEADER_LEN],
            &self.buf[DATA_HEADER_LEN..],
            out,
        )?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_tamper() {
        let k = crypto::gcm(&[0x11; 16]);
        let mut buf = [0u8; 64];
        let n = seal_data(&k, 3, b"hello", &mut buf);
        assert_eq!(n, 30);
        let v = DataView::new_checked(&buf[..n]).unwrap();
        assert_eq!(v.seq(), 3);
        let mut out = [0u8; 64];
        assert_eq!(v.open(&k, &mut out), Ok(5));
        assert_eq!(&out[..5], b"hello");
        buf[1] ^= 1;
        let v = DataView::new_checked(&buf[..n]).unwrap();
        assert!(v.open(&k, &mut out).is_err());
        assert!(DataView::new_checked(&buf[..24]).is_err());
        let mut small = [0u8; 2];
        let v = DataView::new_checked(&buf[..n]).unwrap();
        assert!(v.open(&k, &mut small).is_err());
    }
}
