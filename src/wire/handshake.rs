//! Reference HANDSHAKE and HANDSHAKE_REPLY (§7, protocol 1.1), read only by clients and hosts.
//!
//! ```text
//! k_c = Expand(Extract(client_nonce, psk), "hs c2s", 16)
//! k_s = Expand(Extract(client_nonce || server_nonce, psk), "hs s2c", 16)
//! HANDSHAKE       = 0x48 || client_id(16) || client_nonce(16)
//!                   || GCM-Seal(k_c, 0^12, <33 bytes before>, u64(client ticks)) || zero padding to 640
//! HANDSHAKE_REPLY = 0x68 || client_nonce(16) || server_nonce(16) || GCM-Seal(k_s, 0^12, <33 bytes before>,
//!                   u64(conn_id) || u8(e) || u8(S) || u32(x) || R(32) || kd_c2s(16) || kd_s2c(16) || keys(16*S))
//! ```
//!
//! Both keys seal one message each under the all-zero GCM nonce, so `k_s` must never seal two
//! different replies: the host draws a fresh `server_nonce` for every reply it builds.

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::{MAX_SLOTS, MIN_SLOTS, MsgType, WireError, array, be_u64, check_type};
use crate::crypto::{self, AuthError, TAG_LEN, ZERO_NONCE};
use crate::time::Ticks;

/// A HANDSHAKE is padded to exactly this length (§4, §7): at least the largest reply
/// (S = 32), so the host never answers with more bytes than it was sent.
pub const HANDSHAKE_LEN: usize = 640;
const HS_AAD_LEN: usize = 33;
const HS_SEALED_LEN: usize = 8 + TAG_LEN;
const REPLY_AAD_LEN: usize = 33;
const REPLY_FIXED_PLAIN: usize = 8 + 1 + 1 + 4 + 32 + 16 + 16;

/// `127 + 16*S` bytes.
pub const fn handshake_reply_len(slots: usize) -> usize {
    REPLY_AAD_LEN + REPLY_FIXED_PLAIN + 16 * slots + TAG_LEN
}

// The anti-amplification rule of §4, checked at compile time.
const _: () = assert!(handshake_reply_len(MAX_SLOTS) <= HANDSHAKE_LEN);

/// A client's out-of-band credentials.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ClientCredentials {
    pub client_id: [u8; 16],
    pub psk: [u8; 32],
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("client_id", &hex::encode(self.client_id))
            .finish_non_exhaustive()
    }
}

/// What the host hands the client in HANDSHAKE_REPLY.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct HandshakeReply {
    pub conn_id: u64,
    pub epoch_byte: u8,
    pub index: u32,
    pub rebind_secret: [u8; 32],
    pub kd_c2s: [u8; 16],
    pub kd_s2c: [u8; 16],
    /// `K[e][i][b_i]` for i in 0..S; its length is S.
    pub slot_keys: Vec<[u8; 16]>,
}

impl std::fmt::Debug for HandshakeReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeReply")
            .field("conn_id", &self.conn_id)
            .field("epoch_byte", &self.epoch_byte)
            .field("index", &self.index)
            .field("slots", &self.slot_keys.len())
            .finish_non_exhaustive()
    }
}

/// `k_c`, the key of the HANDSHAKE.
fn client_key(psk: &[u8; 32], client_nonce: &[u8; 16]) -> Zeroizing<[u8; 16]> {
    let mut k_c = Zeroizing::new([0u8; 16]);
    crypto::hkdf(client_nonce, psk, &[b"hs c2s"], &mut *k_c);
    k_c
}

/// `k_s`, the key of one HANDSHAKE_REPLY: it depends on the host's fresh `server_nonce`, so
/// a replayed HANDSHAKE never draws a second reply under the same key (1.1).
fn server_key(
    psk: &[u8; 32],
    client_nonce: &[u8; 16],
    server_nonce: &[u8; 16],
) -> Zeroizing<[u8; 16]> {
    let mut salt = [0u8; 32];
    salt[..16].copy_from_slice(client_nonce);
    salt[16..].copy_from_slice(server_nonce);
    let mut k_s = Zeroizing::new([0u8; 16]);
    crypto::hkdf(&salt, psk, &[b"hs s2c"], &mut *k_s);
    k_s
}

/// Builds a HANDSHAKE with its zero padding.
pub fn build_handshake(
    creds: &ClientCredentials,
    client_nonce: &[u8; 16],
    client_ticks: Ticks,
) -> [u8; HANDSHAKE_LEN] {
    let k_c = client_key(&creds.psk, client_nonce);
    let mut out = [0u8; HANDSHAKE_LEN];
    out[0] = MsgType::Handshake as u8;
    out[1..17].copy_from_slice(&creds.client_id);
    out[17..33].copy_from_slice(client_nonce);
    out[33..41].copy_from_slice(&client_ticks.0.to_be_bytes());
    let (aad, rest) = out.split_at_mut(HS_AAD_LEN);
    crypto::seal_in_place(
        &crypto::gcm(&k_c),
        &ZERO_NONCE,
        aad,
        &mut rest[..HS_SEALED_LEN],
    );
    out
}

/// A HANDSHAKE with checked type and length (at least [`HANDSHAKE_LEN`] bytes; the gateway
/// forwards nothing shorter).
#[derive(Clone, Copy, Debug)]
pub struct HandshakeView<'a> {
    buf: &'a [u8],
}

impl<'a> HandshakeView<'a> {
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, WireError> {
        check_type(buf, MsgType::Handshake)?;
        if buf.len() < HANDSHAKE_LEN {
            return Err(WireError::TooShort {
                what: "HANDSHAKE",
                min: HANDSHAKE_LEN,
                got: buf.len(),
            });
        }
        Ok(HandshakeView { buf })
    }
    pub fn client_id(&self) -> [u8; 16] {
        array(self.buf, 1)
    }
    pub fn client_nonce(&self) -> [u8; 16] {
        array(self.buf, 17)
    }
}

/// Verifies a HANDSHAKE under the client's PSK. Returns the client's ticks.
pub fn open_handshake(view: &HandshakeView<'_>, psk: &[u8; 32]) -> Result<Ticks, AuthError> {
    let nonce = view.client_nonce();
    let k_c = client_key(psk, &nonce);
    let mut ticks = [0u8; 8];
    crypto::open_to(
        &crypto::gcm(&k_c),
        &ZERO_NONCE,
        &view.buf[..HS_AAD_LEN],
        &view.buf[HS_AAD_LEN..HS_AAD_LEN + HS_SEALED_LEN],
        &mut ticks,
    )?;
    Ok(Ticks(u64::from_be_bytes(ticks)))
}

/// Builds HANDSHAKE_REPLY under `k_s` of (`psk`, `client_nonce`, `server_nonce`). The caller
/// must draw a fresh random `server_nonce` for every call (§7); only the conformance vectors
/// pass a fixed one.
pub fn build_handshake_reply(
    psk: &[u8; 32],
    client_nonce: &[u8; 16],
    server_nonce: &[u8; 16],
    reply: &HandshakeReply,
) -> Vec<u8> {
    let k_s = server_key(psk, client_nonce, server_nonce);
    let slots = reply.slot_keys.len();
    let mut out = vec![0u8; handshake_reply_len(slots)];
    out[0] = MsgType::HandshakeReply as u8;
    out[1..17].copy_from_slice(client_nonce);
    out[17..33].copy_from_slice(server_nonce);
    {
        let p = &mut out[REPLY_AAD_LEN..];
        p[0..8].copy_from_slice(&reply.conn_id.to_be_bytes());
        p[8] = reply.epoch_byte;
        p[9] = slots as u8;
        p[10..14].copy_from_slice(&reply.index.to_be_bytes());
        p[14..46].copy_from_slice(&reply.rebind_secret);
        p[46..62].copy_from_slice(&reply.kd_c2s);
        p[62..78].copy_from_slice(&reply.kd_s2c);
        for (i, k) in reply.slot_keys.iter().enumerate() {
            p[78 + 16 * i..94 + 16 * i].copy_from_slice(k);
        }
    }
    let (aad, body) = out.split_at_mut(REPLY_AAD_LEN);
    crypto::seal_in_place(&crypto::gcm(&k_s), &ZERO_NONCE, aad, body);
    out
}

/// Why a HANDSHAKE_REPLY was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("HANDSHAKE_REPLY answers another handshake (client nonce differs)")]
    OtherNonce,
    #[error("HANDSHAKE_REPLY failed authentication")]
    Auth,
}

/// Verifies and decodes HANDSHAKE_REPLY for the handshake that used `client_nonce`.
pub fn open_handshake_reply(
    buf: &[u8],
    psk: &[u8; 32],
    client_nonce: &[u8; 16],
) -> Result<HandshakeReply, ReplyError> {
    check_type(buf, MsgType::HandshakeReply)?;
    let min = handshake_reply_len(MIN_SLOTS);
    let max = handshake_reply_len(MAX_SLOTS);
    if buf.len() < min || buf.len() > max || !(buf.len() - min).is_multiple_of(16) {
        return Err(WireError::BadLength {
            what: "HANDSHAKE_REPLY",
            expected: min,
            got: buf.len(),
        }
        .into());
    }
    if !crypto::ct_eq(&buf[1..17], client_nonce) {
        return Err(ReplyError::OtherNonce);
    }
    let server_nonce: [u8; 16] = array(buf, 17);
    let k_s = server_key(psk, client_nonce, &server_nonce);
    let mut p = Zeroizing::new(vec![0u8; buf.len() - REPLY_AAD_LEN - TAG_LEN]);
    crypto::open_to(
        &crypto::gcm(&k_s),
        &ZERO_NONCE,
        &buf[..REPLY_AAD_LEN],
        &buf[REPLY_AAD_LEN..],
        &mut p,
    )
    .map_err(|_| ReplyError::Auth)?;
    let slots = usize::from(p[9]);
    if slots != (p.len() - REPLY_FIXED_PLAIN) / 16 {
        return Err(WireError::BadSlots(slots).into());
    }
    Ok(HandshakeReply {
        conn_id: be_u64(&p, 0),
        epoch_byte: p[8],
        index: u32::from_be_bytes(array(&p, 10)),
        rebind_secret: array(&p, 14),
        kd_c2s: array(&p, 46),
        kd_s2c: array(&p, 62),
        slot_keys: (0..slots).map(|i| array(&p, 78 + 16 * i)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> ClientCredentials {
        ClientCredentials {
            client_id: [1; 16],
            psk: [2; 32],
        }
    }

    fn fields(slots: usize) -> HandshakeReply {
        HandshakeReply {
            conn_id: 5,
            epoch_byte: 7,
            index: 1234,
            rebind_secret: [4; 32],
            kd_c2s: [5; 16],
            kd_s2c: [6; 16],
            slot_keys: vec![[7; 16]; slots],
        }
    }

    #[test]
    fn handshake_roundtrip() {
        let c = creds();
        let hs = build_handshake(&c, &[3; 16], Ticks(99));
        assert_eq!(hs.len(), 640);
        assert!(hs[57..].iter().all(|b| *b == 0), "zero padding");
        let v = HandshakeView::new_checked(&hs).unwrap();
        assert_eq!(v.client_id(), [1; 16]);
        assert_eq!(v.client_nonce(), [3; 16]);
        assert_eq!(open_handshake(&v, &c.psk), Ok(Ticks(99)));
        assert!(open_handshake(&v, &[9; 32]).is_err());
        assert!(HandshakeView::new_checked(&hs[..639]).is_err());
    }

    #[test]
    fn reply_roundtrip_and_rejects() {
        let c = creds();
        let nonce = [3; 16];
        let r = fields(3);
        let buf = build_handshake_reply(&c.psk, &nonce, &[8; 16], &r);
        assert_eq!(buf.len(), handshake_reply_len(3));
        assert_eq!(buf[17..33], [8; 16], "server nonce in clear");
        assert_eq!(open_handshake_reply(&buf, &c.psk, &nonce), Ok(r));
        assert_eq!(
            open_handshake_reply(&buf, &c.psk, &[0; 16]),
            Err(ReplyError::OtherNonce)
        );
        let mut bad = buf.clone();
        bad[40] ^= 1;
        assert_eq!(
            open_handshake_reply(&bad, &c.psk, &nonce),
            Err(ReplyError::Auth)
        );
        // The server nonce is authenticated (it is in the AAD and selects k_s).
        let mut other = buf.clone();
        other[20] ^= 1;
        assert_eq!(
            open_handshake_reply(&other, &c.psk, &nonce),
            Err(ReplyError::Auth)
        );
        for cut in 0..buf.len() {
            assert!(open_handshake_reply(&buf[..cut], &c.psk, &nonce).is_err());
        }
    }

    #[test]
    fn each_server_nonce_gives_its_own_key() {
        // 1.0 sealed every reply to one client nonce under one (key, nonce) pair; two replies
        // to a replayed HANDSHAKE then leaked their XOR. Under 1.1 the keystreams differ.
        let c = creds();
        let a = build_handshake_reply(&c.psk, &[3; 16], &[1; 16], &fields(2));
        let b = build_handshake_reply(&c.psk, &[3; 16], &[2; 16], &fields(2));
        assert_ne!(a[33..], b[33..]);
        assert_eq!(open_handshake_reply(&a, &c.psk, &[3; 16]), Ok(fields(2)));
        assert_eq!(open_handshake_reply(&b, &c.psk, &[3; 16]), Ok(fields(2)));
    }

    #[test]
    fn no_reply_is_larger_than_a_handshake() {
        assert_eq!(handshake_reply_len(16), 383);
        assert_eq!(handshake_reply_len(MAX_SLOTS), 639);
        assert!(handshake_reply_len(MAX_SLOTS) <= HANDSHAKE_LEN);
    }
}
