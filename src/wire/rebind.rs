//! REBIND and REBIND_ACK (§6).
//!
//! ```text
//! head   = 0x52 || u8(e mod 256) || u64(t) || cookie(16) || slot_0 .. slot_{S-1}
//! REBIND = head || GCM-Seal(k, 12 zero bytes, head, u64(conn_id))        50 + 16*S bytes
//! REBIND_ACK = 0x72 || u64(t) || GCM-Seal(k, 0^11 || 0x01, 0x72 || u64(t), u64(conn_id))   33 bytes
//! ```

use super::{MAX_SLOTS, MIN_SLOTS, MsgType, WireError, array, be_u64, check_exact};
use crate::crypto::gcm::{SessionGcm, SessionNonce};
use crate::crypto::{AuthError, TAG_LEN};
use crate::time::Ticks;

/// Bytes of a REBIND that do not depend on S: type, epoch, t, cookie, sealed conn_id.
pub const REBIND_FIXED_LEN: usize = 1 + 1 + 8 + 16 + 8 + TAG_LEN;
pub const REBIND_ACK_LEN: usize = 1 + 8 + 8 + TAG_LEN;
/// Where slot 0 starts: after the type, the epoch byte, `t` and the cookie.
pub const REBIND_SLOTS_AT: usize = 26;
const SLOTS_AT: usize = REBIND_SLOTS_AT;

/// `50 + 16*S`.
pub const fn rebind_len(slots: usize) -> usize {
    REBIND_FIXED_LEN + 16 * slots
}

/// The S that a REBIND of this length carries, if any.
pub fn slots_for_rebind_len(len: usize) -> Option<usize> {
    let body = len.checked_sub(REBIND_FIXED_LEN)?;
    let s = body / 16;
    (body % 16 == 0 && (MIN_SLOTS..=MAX_SLOTS).contains(&s)).then_some(s)
}

/// Writes the first [`REBIND_SLOTS_AT`] bytes of a REBIND into `out`: its type, epoch byte,
/// `t` and cookie.
pub fn emit_rebind_prefix(out: &mut [u8], epoch_byte: u8, t: Ticks, cookie: &[u8; 16]) {
    out[0] = MsgType::Rebind as u8;
    out[1] = epoch_byte;
    out[2..10].copy_from_slice(&t.0.to_be_bytes());
    out[10..SLOTS_AT].copy_from_slice(cookie);
}

/// A REBIND whose type and length (for the gateway's S) have been checked.
#[derive(Clone, Copy, Debug)]
pub struct RebindView<'a> {
    buf: &'a [u8],
    slots: usize,
}

impl<'a> RebindView<'a> {
    /// The only way in for untrusted bytes: checks the type byte and that the length is
    /// exactly `50 + 16*slots`.
    pub fn new_checked(buf: &'a [u8], slots: usize) -> Result<Self, WireError> {
        if !(MIN_SLOTS..=MAX_SLOTS).contains(&slots) {
            return Err(WireError::BadSlots(slots));
        }
        check_exact(buf, MsgType::Rebind, "REBIND", rebind_len(slots))?;
        Ok(RebindView { buf, slots })
    }

    pub fn slots(&self) -> usize {
        self.slots
    }
    pub fn epoch_byte(&self) -> u8 {
        self.buf[1]
    }
    pub fn t(&self) -> Ticks {
        Ticks(be_u64(self.buf, 2))
    }
    pub fn cookie(&self) -> [u8; 16] {
        array(self.buf, 10)
    }
    /// The S ciphertext slots, `16*S` bytes.
    pub fn slot_bytes(&self) -> &'a [u8] {
        &self.buf[SLOTS_AT..SLOTS_AT + 16 * self.slots]
    }
    /// The AEAD's associated data: everything before the sealed conn_id.
    pub fn head(&self) -> &'a [u8] {
        &self.buf[..SLOTS_AT + 16 * self.slots]
    }
    /// `u64(conn_id)` sealed, with its tag: 24 bytes.
    pub fn sealed(&self) -> &'a [u8] {
        &self.buf[SLOTS_AT + 16 * self.slots..]
    }
    /// True for the cookie request of §6: every byte after the type is zero.
    /// Type, any epoch byte (1.1), then zeros.
    pub fn is_cookie_request(&self) -> bool {
        self.buf[2..].iter().all(|b| *b == 0)
    }
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }
}

/// A REBIND_ACK with checked type and length.
#[derive(Clone, Copy, Debug)]
pub struct RebindAckView<'a> {
    buf: &'a [u8],
}

impl<'a> RebindAckView<'a> {
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, WireError> {
        check_exact(buf, MsgType::RebindAck, "REBIND_ACK", REBIND_ACK_LEN)?;
        Ok(RebindAckView { buf })
    }
    pub fn t(&self) -> Ticks {
        Ticks(be_u64(self.buf, 1))
    }
    /// Opens the ACK under the rebind's session key and returns the conn_id it names.
    pub fn open(&self, session: &SessionGcm) -> Result<u64, AuthError> {
        let (aad, sealed) = self.buf.split_at(9);
        let sealed = sealed.try_into().map_err(|_| AuthError)?;
        session
            .open8(SessionNonce::Ack, aad, sealed)
            .map(u64::from_be_bytes)
    }
}

/// Writes a REBIND_ACK for `t` and `conn_id` under the session key.
pub fn build_rebind_ack(session: &SessionGcm, t: Ticks, conn_id: u64) -> [u8; REBIND_ACK_LEN] {
    let mut out = [0u8; REBIND_ACK_LEN];
    out[0] = MsgType::RebindAck as u8;
    out[1..9].copy_from_slice(&t.0.to_be_bytes());
    let sealed = session.seal8(SessionNonce::Ack, &out[..9], &conn_id.to_be_bytes());
    out[9..].copy_from_slice(&sealed);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        assert_eq!(rebind_len(16), 306);
        assert_eq!(rebind_len(1), 66);
        assert_eq!(slots_for_rebind_len(306), Some(16));
        assert_eq!(slots_for_rebind_len(rebind_len(32)), Some(32));
        assert_eq!(slots_for_rebind_len(50), None);
        assert_eq!(slots_for_rebind_len(307), None);
        assert_eq!(slots_for_rebind_len(rebind_len(33)), None);
        assert_eq!(slots_for_rebind_len(0), None);
    }

    #[test]
    fn view_checks() {
        let mut b = vec![0u8; rebind_len(16)];
        b[0] = b'R';
        let v = RebindView::new_checked(&b, 16).unwrap();
        assert!(v.is_cookie_request());
        assert_eq!(v.head().len() + v.sealed().len(), b.len());
        assert_eq!(v.sealed().len(), 24);
        assert!(RebindView::new_checked(&b, 15).is_err());
        assert!(RebindView::new_checked(&b[..305], 16).is_err());
        assert!(RebindView::new_checked(&b, 0).is_err());
        b[0] = b'D';
        assert!(RebindView::new_checked(&b, 16).is_err());
    }

    #[test]
    fn ack_roundtrip() {
        let k = SessionGcm::new(&[9; 16]);
        let ack = build_rebind_ack(&k, Ticks(5), 77);
        let v = RebindAckView::new_checked(&ack).unwrap();
        assert_eq!(v.t(), Ticks(5));
        assert_eq!(v.open(&k), Ok(77));
        assert!(v.open(&SessionGcm::new(&[8; 16])).is_err());
        assert!(RebindAckView::new_checked(&ack[..32]).is_err());
    }
}
