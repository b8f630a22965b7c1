//! REBIND construction (client side) and the rebind session key (§6):
//!
//! ```text
//! slot_i = AES(K[e][i][b_i], n_i || u64(t))
//! k      = Expand(Extract(R, n_0 || ... || n_{S-1}), "rebind" || u64(t), 16)
//! ```
#![forbid(unsafe_code)]

use std::fmt;

use crate::crypto::gcm::{SessionGcm, SessionNonce};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::crypto::{self, HmacSha256Midstate};
use crate::time::Ticks;
use crate::wire::{MAX_SLOTS, MsgType, REBIND_SLOTS_AT, emit_rebind_prefix, rebind_len};

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
        let t1 = HmacSha256Midstate::new(&prk[..]).mac(&[&expand_input(t)]);
        truncate_key(&t1)
    }

    /// [`Self::session_key`] for two independent `(kdf, nonces, t)` in lockstep: each SHA-256
    /// step of one runs beside the same step of the other (one
    /// [`compress_x2`](crate::crypto::sha256::compress_x2)), so two keys cost about one.
    /// The nonce counts may differ; the longer Extract's extra block then runs alone.
    pub fn session_keys_x2(
        (kdf_a, nonces_a, t_a): (&RebindKdf, &[[u8; 8]], Ticks),
        (kdf_b, nonces_b, t_b): (&RebindKdf, &[[u8; 8]], Ticks),
    ) -> [Zeroizing<[u8; 16]>; 2] {
        let [prk_a, prk_b] = HmacSha256Midstate::mac_x2(
            (&kdf_a.keyed, &[nonces_a.as_flattened()]),
            (&kdf_b.keyed, &[nonces_b.as_flattened()]),
        );
        let (expand_a, expand_b) = (
            HmacSha256Midstate::new(&prk_a[..]),
            HmacSha256Midstate::new(&prk_b[..]),
        );
        let [t1_a, t1_b] = HmacSha256Midstate::mac_x2(
            (&expand_a, &[&expand_input(t_a)]),
            (&expand_b, &[&expand_input(t_b)]),
        );
        [truncate_key(&t1_a), truncate_key(&t1_b)]
    }
}

impl RebindKdf {
    /// [`Self::session_key`] for up to 16 `(kdf, nonces, t)` at once, one per lane of the
    /// AVX-512 registers ([`crypto::sha256_x16`]); `out[i]` gets the key of `items[i]`. Every
    /// item must have the same nonce count (one registry's S). Without AVX-512, or under
    /// `REBINDGW_AES_BACKEND=portable`, the keys are derived one at a time.
    pub fn session_keys_x16(
        items: &[(&RebindKdf, &[[u8; 8]], Ticks)],
        out: &mut [Zeroizing<[u8; 16]>],
    ) {
        use crypto::sha256_x16::{KdfLane, LANES};
        assert!(items.len() <= LANES, "at most 16 keys per call");
        let Some(&(kdf0, nonces0, _)) = items.first() else {
            return;
        };
        let infos: [[u8; 14]; LANES] =
            std::array::from_fn(|l| items.get(l).map_or([0; 14], |&(_, _, t)| expand_info(t)));
        let lanes: [KdfLane<'_>; LANES] = std::array::from_fn(|l| {
            let (kdf, nonces) = items.get(l).map_or((kdf0, nonces0), |&(k, n, _)| (k, n));
            KdfLane {
                extract: &kdf.keyed,
                ikm: nonces.as_flattened(),
                info: &infos[l],
            }
        });
        let lanes = &lanes[..items.len()];
        crypto::sha256_x16::hkdf_keyed_x16(lanes, out);
    }
}

/// `info = "rebind" || u64(t)`. Public data.
fn expand_info(t: Ticks) -> [u8; 14] {
    let mut info = [0u8; 14];
    info[..6].copy_from_slice(b"rebind");
    info[6..].copy_from_slice(&t.0.to_be_bytes());
    info
}

/// The HMAC input of Expand's first block: `info || 0x01`, `info = "rebind" || u64(t)`.
/// Public data (`t` is in the packet), so not wiped.
fn expand_input(t: Ticks) -> [u8; 15] {
    let mut input = [0u8; 15];
    input[..6].copy_from_slice(b"rebind");
    input[6..14].copy_from_slice(&t.0.to_be_bytes());
    input[14] = 1;
    input
}

/// `k`: the first 16 bytes of T(1).
fn truncate_key(t1: &[u8; 32]) -> Zeroizing<[u8; 16]> {
    let mut k = Zeroizing::new([0u8; 16]);
    k.copy_from_slice(&t1[..16]);
    k
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
    emit_rebind_prefix(&mut out, epoch_byte, t, cookie);
    for (i, (key, nonce)) in creds.slot_keys.iter().zip(nonces).enumerate() {
        let at = REBIND_SLOTS_AT + 16 * i;
        let block: &mut [u8; 16] = (&mut out[at..at + 16]).try_into().expect("16-byte slot");
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
    cookie_request_for(slots, 0)
}

/// The cookie request of §6 (1.1) naming the sender's epoch: type, epoch byte, then zeros.
/// During a grace period, one naming the previous epoch draws an UNRECOGNIZED of that epoch.
pub fn cookie_request_for(slots: usize, epoch_byte: u8) -> Vec<u8> {
    let mut out = vec![0u8; rebind_len(slots)];
    out[0] = MsgType::Rebind as u8;
    out[1] = epoch_byte;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// `k` straight from the `hkdf` crate, as PROTOCOL §6 writes it.
    fn hkdf_session_key(secret: &[u8; 32], nonces: &[[u8; 8]], t: u64) -> [u8; 16] {
        let mut k = [0u8; 16];
        crypto::hkdf(
            secret,
            nonces.as_flattened(),
            &[b"rebind", &t.to_be_bytes()],
            &mut k,
        );
        k
    }

    fn kdf(secret: [u8; 32]) -> RebindKdf {
        RebindKdf::new(&RebindSecret(secret))
    }

    #[test]
    fn session_key_matches_hkdf_for_every_slot_count() {
        for s in 1..=MAX_SLOTS {
            let secret = [s as u8; 32];
            let nonces: Vec<[u8; 8]> = (0..s).map(|i| [i as u8 ^ 0xa5; 8]).collect();
            let t = 0x0123_4567_89ab_cdef ^ s as u64;
            assert_eq!(
                *kdf(secret).session_key(&nonces, Ticks(t)),
                hkdf_session_key(&secret, &nonces, t),
                "S = {s}"
            );
        }
    }

    #[test]
    fn session_keys_x2_same_inputs_on_both_streams() {
        let k = kdf([3; 32]);
        let nonces = [[9u8; 8]; 16];
        let [a, b] = RebindKdf::session_keys_x2((&k, &nonces, Ticks(5)), (&k, &nonces, Ticks(5)));
        let want = hkdf_session_key(&[3; 32], &nonces, 5);
        assert_eq!((*a, *b), (want, want));
    }

    proptest! {
        #[test]
        fn session_keys_x2_matches_single_and_hkdf(
            secret_a in any::<[u8; 32]>(),
            secret_b in any::<[u8; 32]>(),
            nonces_a in vec(any::<[u8; 8]>(), 1..=MAX_SLOTS),
            nonces_b in vec(any::<[u8; 8]>(), 1..=MAX_SLOTS),
            t_a in any::<u64>(),
            t_b in any::<u64>(),
        ) {
            let (kdf_a, kdf_b) = (kdf(secret_a), kdf(secret_b));
            let [a, b] = RebindKdf::session_keys_x2(
                (&kdf_a, &nonces_a, Ticks(t_a)),
                (&kdf_b, &nonces_b, Ticks(t_b)),
            );
            prop_assert_eq!(*a, *kdf_a.session_key(&nonces_a, Ticks(t_a)));
            prop_assert_eq!(*b, *kdf_b.session_key(&nonces_b, Ticks(t_b)));
            prop_assert_eq!(*a, hkdf_session_key(&secret_a, &nonces_a, t_a));
            prop_assert_eq!(*b, hkdf_session_key(&secret_b, &nonces_b, t_b));
        }

        #[test]
        fn session_keys_x16_matches_hkdf(
            secrets in vec(any::<[u8; 32]>(), 1..=16),
            slots in 1usize..=MAX_SLOTS,
            seed in any::<u64>(),
        ) {
            let nonces: Vec<Vec<[u8; 8]>> = (0..secrets.len())
                .map(|l| (0..slots).map(|i| (seed ^ (l * 64 + i) as u64).to_be_bytes()).collect())
                .collect();
            let kdfs: Vec<RebindKdf> = secrets.iter().map(|s| kdf(*s)).collect();
            let items: Vec<(&RebindKdf, &[[u8; 8]], Ticks)> = (0..secrets.len())
                .map(|l| (&kdfs[l], &nonces[l][..], Ticks(seed.wrapping_add(l as u64))))
                .collect();
            let mut out: Vec<Zeroizing<[u8; 16]>> =
                (0..items.len()).map(|_| Zeroizing::new([0; 16])).collect();
            RebindKdf::session_keys_x16(&items, &mut out);
            for l in 0..items.len() {
                let t = seed.wrapping_add(l as u64);
                prop_assert_eq!(*out[l], hkdf_session_key(&secrets[l], &nonces[l], t));
            }
        }

        #[test]
        fn session_keys_x2_equal_slot_counts(
            secret_a in any::<[u8; 32]>(),
            secret_b in any::<[u8; 32]>(),
            nonces in vec(any::<([u8; 8], [u8; 8])>(), 1..=MAX_SLOTS),
            t_a in any::<u64>(),
            t_b in any::<u64>(),
        ) {
            // Random pairs rarely draw equal S; this keeps every block in lockstep.
            let (nonces_a, nonces_b): (Vec<_>, Vec<_>) = nonces.into_iter().unzip();
            let [a, b] = RebindKdf::session_keys_x2(
                (&kdf(secret_a), &nonces_a, Ticks(t_a)),
                (&kdf(secret_b), &nonces_b, Ticks(t_b)),
            );
            prop_assert_eq!(*a, hkdf_session_key(&secret_a, &nonces_a, t_a));
            prop_assert_eq!(*b, hkdf_session_key(&secret_b, &nonces_b, t_b));
        }
    }
}
