//! In-band key delivery (tests/data/PROTOCOL-EXT.md, "Key delivery"): KEYS and KEYS_ACK
//! between host and client inside the connection (a §7-layer message pair the gateway
//! forwards like DATA), and the bodies of the host-link messages EPOCH_KEYS and
//! KEYS_DELIVERED.
//!
//! ```text
//! KEYS     = 0x4B || u64(kseq) || GCM-Seal(kd_s2c, u32(1) || u64(kseq), 0x4B || u64(kseq),
//!                 u32(epoch) || u32(index) || u8(S) || R(32) || K[e][0][b_0] .. K[e][S-1][b_{S-1}])
//! KEYS_ACK = 0x6B || u64(aseq) || GCM-Seal(kd_c2s, u32(1) || u64(aseq), 0x6B || u64(aseq),
//!                 u32(epoch) || u64(kseq))
//! ```
//!
//! DATA nonces are `u32(0) || u64(seq)`, so the `u32(1)` prefix keeps these in a nonce space
//! of their own under the same direction keys.

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::{MAX_SLOTS, MIN_SLOTS, WireError, be_u64};
use crate::crypto::{self, AuthError, Gcm, TAG_LEN};

/// KEYS: host -> gateway -> client.
pub const KEYS_TYPE: u8 = 0x4B;
/// KEYS_ACK: client -> gateway -> host.
pub const KEYS_ACK_TYPE: u8 = 0x6B;
/// Type and sequence number.
pub const DELIVERY_HEADER_LEN: usize = 9;
/// A KEYS_ACK is always this long.
pub const KEYS_ACK_LEN: usize = DELIVERY_HEADER_LEN + 12 + TAG_LEN;

/// `u32(1) || u64(seq)`: never a DATA nonce (those start with `u32(0)`).
pub fn delivery_nonce(seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[3] = 1;
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

/// One connection's keys for an epoch: index, rebind secret `R` and its S slot keys.
/// Zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct NewKeys {
    pub epoch: u32,
    pub index: u32,
    pub rebind_secret: [u8; 32],
    /// `K[e][i][b_i]` for i in 0..S.
    pub slot_keys: Vec<[u8; 16]>,
}

impl std::fmt::Debug for NewKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKeys")
            .field("epoch", &self.epoch)
            .field("slots", &self.slot_keys.len())
            .finish_non_exhaustive()
    }
}

/// Length of a KEYS body for `slots`.
pub fn keys_body_len(slots: usize) -> usize {
    4 + 4 + 1 + 32 + 16 * slots
}

/// Length of a KEYS datagram for `slots`.
pub fn keys_len(slots: usize) -> usize {
    DELIVERY_HEADER_LEN + keys_body_len(slots) + TAG_LEN
}

fn check_slots(s: usize) -> Result<(), WireError> {
    if (MIN_SLOTS..=MAX_SLOTS).contains(&s) {
        Ok(())
    } else {
        Err(WireError::BadSlots(s))
    }
}

/// Seals `keys` as KEYS number `kseq` into `out` (at least [`keys_len`] bytes); returns the
/// length. The slot count must be 1..=32.
pub fn seal_keys(key: &Gcm, kseq: u64, keys: &NewKeys, out: &mut [u8]) -> usize {
    let s = keys.slot_keys.len();
    let len = keys_len(s);
    let out = &mut out[..len];
    out[0] = KEYS_TYPE;
    out[1..9].copy_from_slice(&kseq.to_be_bytes());
    let body = &mut out[DELIVERY_HEADER_LEN..len - TAG_LEN];
    body[0..4].copy_from_slice(&keys.epoch.to_be_bytes());
    body[4..8].copy_from_slice(&keys.index.to_be_bytes());
    body[8] = s as u8;
    body[9..41].copy_from_slice(&keys.rebind_secret);
    for (i, k) in keys.slot_keys.iter().enumerate() {
        body[41 + 16 * i..57 + 16 * i].copy_from_slice(k);
    }
    let (aad, rest) = out.split_at_mut(DELIVERY_HEADER_LEN);
    crypto::seal_in_place(key, &delivery_nonce(kseq), aad, rest);
    len
}

/// Why a KEYS or KEYS_ACK was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("malformed: {0}")]
    Malformed(#[from] WireError),
    #[error("authentication failed")]
    Auth,
}

impl From<AuthError> for DeliveryError {
    fn from(_: AuthError) -> Self {
        DeliveryError::Auth
    }
}

fn open_delivery(
    key: &Gcm,
    datagram: &[u8],
    ty: u8,
    what: &'static str,
) -> Result<(u64, Vec<u8>), DeliveryError> {
    match datagram.first() {
        None => return Err(WireError::Empty.into()),
        Some(t) if *t != ty => return Err(WireError::UnknownType(*t).into()),
        Some(_) => {}
    }
    if datagram.len() < DELIVERY_HEADER_LEN + TAG_LEN {
        return Err(WireError::TooShort {
            what,
            min: DELIVERY_HEADER_LEN + TAG_LEN,
            got: datagram.len(),
        }
        .into());
    }
    let seq = be_u64(datagram, 1);
    let mut body = vec![0u8; datagram.len() - DELIVERY_HEADER_LEN - TAG_LEN];
    crypto::open_to(
        key,
        &delivery_nonce(seq),
        &datagram[..DELIVERY_HEADER_LEN],
        &datagram[DELIVERY_HEADER_LEN..],
        &mut body,
    )?;
    Ok((seq, body))
}

/// Opens a KEYS: its `kseq` and the keys. Untrusted input: never panics.
pub fn open_keys(key: &Gcm, datagram: &[u8]) -> Result<(u64, NewKeys), DeliveryError> {
    let (kseq, mut body) = open_delivery(key, datagram, KEYS_TYPE, "KEYS")?;
    let parsed = parse_keys_body(&body);
    body.zeroize();
    Ok((kseq, parsed?))
}

fn parse_keys_body(body: &[u8]) -> Result<NewKeys, WireError> {
    let s = usize::from(*body.get(8).ok_or(WireError::TooShort {
        what: "KEYS body",
        min: keys_body_len(1),
        got: body.len(),
    })?);
    check_slots(s)?;
    if body.len() != keys_body_len(s) {
        return Err(WireError::BadLength {
            what: "KEYS body",
            expected: keys_body_len(s),
            got: body.len(),
        });
    }
    let mut rebind_secret = [0u8; 32];
    rebind_secret.copy_from_slice(&body[9..41]);
    let slot_keys = body[41..]
        .chunks_exact(16)
        .map(|c| {
            let mut k = [0u8; 16];
            k.copy_from_slice(c);
            k
        })
        .collect();
    Ok(NewKeys {
        epoch: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
        index: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
        rebind_secret,
        slot_keys,
    })
}

/// Seals KEYS_ACK number `aseq`, acknowledging KEYS `kseq` of `epoch`, into `out` (at least
/// [`KEYS_ACK_LEN`] bytes).
pub fn seal_keys_ack(key: &Gcm, aseq: u64, epoch: u32, kseq: u64, out: &mut [u8]) -> usize {
    let out = &mut out[..KEYS_ACK_LEN];
    out[0] = KEYS_ACK_TYPE;
    out[1..9].copy_from_slice(&aseq.to_be_bytes());
    out[9..13].copy_from_slice(&epoch.to_be_bytes());
    out[13..21].copy_from_slice(&kseq.to_be_bytes());
    let (aad, rest) = out.split_at_mut(DELIVERY_HEADER_LEN);
    crypto::seal_in_place(key, &delivery_nonce(aseq), aad, rest);
    KEYS_ACK_LEN
}

/// Opens a KEYS_ACK: `(aseq, epoch, kseq)`.
pub fn open_keys_ack(key: &Gcm, datagram: &[u8]) -> Result<(u64, u32, u64), DeliveryError> {
    if datagram.len() != KEYS_ACK_LEN {
        return Err(WireError::BadLength {
            what: "KEYS_ACK",
            expected: KEYS_ACK_LEN,
            got: datagram.len(),
        }
        .into());
    }
    let (aseq, body) = open_delivery(key, datagram, KEYS_ACK_TYPE, "KEYS_ACK")?;
    if body.len() != 12 {
        return Err(DeliveryError::Auth);
    }
    Ok((
        aseq,
        u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
        be_u64(&body, 4),
    ))
}

/// One connection in an EPOCH_KEYS: its ID and its keys for the epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochKeysEntry {
    pub conn_id: u64,
    pub keys: NewKeys,
}

/// Length of one EPOCH_KEYS entry for `slots`.
pub fn epoch_keys_entry_len(slots: usize) -> usize {
    8 + 4 + 32 + 16 * slots
}

/// The body of EPOCH_KEYS (inside the sealed host link):
/// `u32(epoch) || u8(S) || u16(n) || n x (u64(conn_id) || u32(index) || R(32) || S x 16)`.
/// Every entry must be of `epoch` and have `slots` keys.
pub fn emit_epoch_keys(epoch: u32, slots: usize, entries: &[EpochKeysEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(7 + entries.len() * epoch_keys_entry_len(slots));
    out.extend_from_slice(&epoch.to_be_bytes());
    out.push(slots as u8);
    out.extend_from_slice(&(entries.len() as u16).to_be_bytes());
    for e in entries {
        debug_assert_eq!(e.keys.slot_keys.len(), slots);
        out.extend_from_slice(&e.conn_id.to_be_bytes());
        out.extend_from_slice(&e.keys.index.to_be_bytes());
        out.extend_from_slice(&e.keys.rebind_secret);
        for k in &e.keys.slot_keys {
            out.extend_from_slice(k);
        }
    }
    out
}

/// Parses an EPOCH_KEYS body. Untrusted input (after the link's AEAD): never panics.
pub fn parse_epoch_keys(body: &[u8]) -> Result<(u32, Vec<EpochKeysEntry>), WireError> {
    if body.len() < 7 {
        return Err(WireError::TooShort {
            what: "EPOCH_KEYS",
            min: 7,
            got: body.len(),
        });
    }
    let epoch = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let s = usize::from(body[4]);
    check_slots(s)?;
    let n = usize::from(u16::from_be_bytes([body[5], body[6]]));
    let each = epoch_keys_entry_len(s);
    if body.len() != 7 + n * each {
        return Err(WireError::BadLength {
            what: "EPOCH_KEYS",
            expected: 7 + n * each,
            got: body.len(),
        });
    }
    let entries = body[7..]
        .chunks_exact(each)
        .map(|c| {
            let mut rebind_secret = [0u8; 32];
            rebind_secret.copy_from_slice(&c[12..44]);
            EpochKeysEntry {
                conn_id: be_u64(c, 0),
                keys: NewKeys {
                    epoch,
                    index: u32::from_be_bytes([c[8], c[9], c[10], c[11]]),
                    rebind_secret,
                    slot_keys: c[44..]
                        .chunks_exact(16)
                        .map(|k| {
                            let mut a = [0u8; 16];
                            a.copy_from_slice(k);
                            a
                        })
                        .collect(),
                },
            }
        })
        .collect();
    Ok((epoch, entries))
}

/// The body of KEYS_DELIVERED (host -> gateway, sealed link):
/// `u32(epoch) || u16(n) || n x u64(conn_id)`: connections whose client acknowledged.
pub fn emit_keys_delivered(epoch: u32, conn_ids: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + 8 * conn_ids.len());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&(conn_ids.len() as u16).to_be_bytes());
    for c in conn_ids {
        out.extend_from_slice(&c.to_be_bytes());
    }
    out
}

/// Parses a KEYS_DELIVERED body.
pub fn parse_keys_delivered(body: &[u8]) -> Result<(u32, Vec<u64>), WireError> {
    if body.len() < 6 {
        return Err(WireError::TooShort {
            what: "KEYS_DELIVERED",
            min: 6,
            got: body.len(),
        });
    }
    let n = usize::from(u16::from_be_bytes([body[4], body[5]]));
    if body.len() != 6 + 8 * n {
        return Err(WireError::BadLength {
            what: "KEYS_DELIVERED",
            expected: 6 + 8 * n,
            got: body.len(),
        });
    }
    Ok((
        u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
        body[6..].chunks_exact(8).map(|c| be_u64(c, 0)).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::data_nonce;
    use proptest::prelude::*;

    fn keys(s: usize) -> NewKeys {
        NewKeys {
            epoch: 7,
            index: 0x1234,
            rebind_secret: [0xab; 32],
            slot_keys: (0..s).map(|i| [i as u8; 16]).collect(),
        }
    }

    #[test]
    fn keys_roundtrip_tamper_and_wrong_key() {
        let k = crypto::gcm(&[1; 16]);
        let mut buf = vec![0u8; keys_len(16)];
        let n = seal_keys(&k, 5, &keys(16), &mut buf);
        assert_eq!(n, keys_len(16));
        assert_eq!(open_keys(&k, &buf).unwrap(), (5, keys(16)));
        assert_eq!(
            open_keys(&crypto::gcm(&[2; 16]), &buf),
            Err(DeliveryError::Auth)
        );
        for i in [0usize, 1, 9, n - 1] {
            let mut bad = buf.clone();
            bad[i] ^= 1;
            assert!(open_keys(&k, &bad).is_err(), "byte {i}");
        }
        assert!(open_keys(&k, &buf[..n - 1]).is_err());
        let mut ack = [0u8; KEYS_ACK_LEN];
        seal_keys_ack(&k, 9, 7, 5, &mut ack);
        assert_eq!(open_keys_ack(&k, &ack), Ok((9, 7, 5)));
        assert!(open_keys(&k, &ack).is_err(), "an ACK is no KEYS");
        assert!(open_keys_ack(&k, &buf).is_err());
    }

    #[test]
    fn delivery_nonces_never_meet_data_nonces() {
        for seq in [0u64, 1, u64::MAX] {
            for other in [0u64, 1, u64::MAX] {
                assert_ne!(delivery_nonce(seq), data_nonce(other));
            }
        }
    }

    #[test]
    fn link_bodies_roundtrip() {
        let entries = vec![
            EpochKeysEntry {
                conn_id: 1,
                keys: keys(4),
            },
            EpochKeysEntry {
                conn_id: u64::MAX,
                keys: {
                    let mut k = keys(4);
                    k.index = 9;
                    k
                },
            },
        ];
        let b = emit_epoch_keys(7, 4, &entries);
        assert_eq!(b.len(), 7 + 2 * epoch_keys_entry_len(4));
        assert_eq!(parse_epoch_keys(&b).unwrap(), (7, entries));
        assert!(parse_epoch_keys(&b[..b.len() - 1]).is_err());
        let d = emit_keys_delivered(7, &[1, 2, 3]);
        assert_eq!(parse_keys_delivered(&d).unwrap(), (7, vec![1, 2, 3]));
        assert!(parse_keys_delivered(&d[..d.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let k = crypto::gcm(&[1; 16]);
            let _ = open_keys(&k, &b);
            let _ = open_keys_ack(&k, &b);
            let _ = parse_epoch_keys(&b);
            let _ = parse_keys_delivered(&b);
            let _ = parse_keys_body(&b);
        }
    }
}
