//! REBIND construction (client side) and the rebind session key (§6):
//!
//! ```text
//! slot_i = AES(K[e][i][b_i], n_i || u64(t))
//! k      = Expand(Extract(R, n_0 || ... || n_{S-1}), "rebind" || u64(t), 16)
//! ```
#![forbid(unsafe_code)]

use std::fmt;

use crate::engine::gcm::{SessionGcm, SessionNonce};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::crypto::{self, HmacSha256Midstate};
use crate::time::Ticks;
use crate::wire::{MAX_SLOTS, MsgType, rebind_len};

/// A connection's 32-byte rebind secret `R`, made by the gateway at registration.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct RebindSecret(pub [u8; 32]);

impl RebindSecret {
    pub fn generate() -> Self {
        RebindSecret(crypto::random_array())
    }
}

impl fmt::Debug for RebindSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RebindSecret(..)")
    }
}

/// `Extract(R, ·)` keyed once, as HMAC-SHA256 midstates (64 bytes): each verify skips the
/// two compressions that key the HMAC, and the gateway keeps 64 bytes per connection.
#[derive(Clone)]
pub struct RebindKdf {
    keyed: HmacSha256Midstate,
}

impl fmt::Debug for RebindKdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RebindKdf(..)")
    }
}

impl RebindKdf {
    pub fn new(secret: &RebindSecret) -> Self {
        RebindKdf {
            keyed: HmacSha256Midstate::new(&secret.0),
        }
    }

    /// The session key `k` for nonces `n_0..n_{S-1}` and time `t`.
    pub fn session_key(&self, nonces: &[[u8; 8]], t: Ticks) -> Zeroizing<[u8; 16]> {
        let prk = self.keyed.mac(&[nonces.as_flattened()]);
        // Expand with L = 16 is one HMAC block: T(1) = HMAC(PRK, info || 0x01).
        let t1 = HmacSha256Midstate::new(&prk[..]).mac(&[b"rebind", &t.0.to_be_bytes(), &[1]]);
        let mut k = Zeroizing::new([0u8; 16]);
        k.copy_from_slice(&t1[..16]);
        k
    }
}

/// What a client needs to rebind: issued in HANDSHAKE_REPLY.
pub struct RebindCredentials<'a> {
    pub conn_id: u64,
    pub secret: &'a RebindSecret,
    /// `K[e][i][b_i]`, slot 0 first; its length is S.
    pub slot_keys: &'a [[u8; 16]],
}

/// Builds a REBIND from the newest UNRECOGNIZED's `epoch_byte`, `t` and `cookie`, with the
/// given nonces (draw them fresh for every try). Returns the datagram and the session key that
/// opens the REBIND_ACK.
pub fn build_rebind(
    creds: &RebindCredentials<'_>,
    epoch_byte: u8,
    t: Ticks,
    cookie: &[u8; 16],
    nonces: &[[u8; 8]],
) -> (Vec<u8>, SessionGcm) {
    let s = creds.slot_keys.len();
    assert!(
        (1..=MAX_SLOTS).contains(&s) && nonces.len() == s,
        "one nonce per slot key, 1..=32 of them"
    );
    let mut out = vec![0u8; rebind_len(s)];
    out[0] = MsgType::Rebind as u8;
    out[1] = epoch_byte;
    out[2..10].copy_from_slice(&t.0.to_be_bytes());
    out[10..26].copy_from_slice(cookie);
    for (i, (key, nonce)) in creds.slot_keys.iter().zip(nonces).enumerate() {
        let block: &mut [u8; 16] = (&mut out[26 + 16 * i..42 + 16 * i])
            .try_into()
            .expect("16-byte slot");
        block[..8].copy_from_slice(nonce);
        block[8..].copy_from_slice(&t.0.to_be_bytes());
        crypto::aes_encrypt_block(&crypto::aes128(key), block);
    }
    let k = RebindKdf::new(creds.secret).session_key(nonces, t);
    let session = SessionGcm::new(&k);
    let head_len = 26 + 16 * s;
    let sealed = session.seal8(
        SessionNonce::Rebind,
        &out[..head_len],
        &creds.conn_id.to_be_bytes(),
    );
    out[head_len..].copy_from_slice(&sealed);
    (out, session)
}

/// Fresh random nonces for one REBIND.
pub fn fresh_nonces(slots: usize) -> Vec<[u8; 8]> {
    (0..slots).map(|_| crypto::random_array()).collect()
}

/// The cookie request of §6: a REBIND of the right length whose bytes after the type are zero.
pub fn cookie_request(slots: usize) -> Vec<u8> {
    let mut out = vec![0u8; rebind_len(slots)];
    out[0] = MsgType::Rebind as u8;
    out
}
