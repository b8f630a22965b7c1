//! One connection as the cluster stores it in etcd, and the sealing of its rebind secret.
//!
//! Value layout (version 1, big-endian), under the key [`conn_key`]:
//!
//! ```text
//! u8 version = 1 || u64 conn_id || nonce(12) || GCM-Seal(k_seal, nonce, aad, R)(32 + 16)
//!   || u64 L || u16 host || u16 owner || u8 tuple flag (0 none, 1 tuple) || tuple
//! aad   = "rebindgw cluster R" || u32 len(prefix) || prefix || u32 epoch || u32 x || u64 conn_id
//! k_seal = Expand(Extract("rebindgw cluster", master), "etcd seal R", 16)
//! ```
//!
//! `R` is sealed so that etcd, its snapshots and its backups hold no usable secret; the AAD
//! binds the sealed bytes to the cluster, the epoch, the index and the connection, so a
//! record copied to another key does not open. Records come from the network: the decoder is
//! length-checked and never panics (property-tested).

use std::fmt;
use std::net::SocketAddr;

use zeroize::Zeroizing;

use crate::crypto::{self, Gcm};
use crate::keys::MasterSecret;
use crate::rebind::RebindSecret;
use crate::registry::HostId;
use crate::time::Ticks;
use crate::wire::{MAX_TUPLE_LEN, emit_tuple, parse_tuple};

/// A gateway's id in its cluster (unique per cluster; the owner field of records).
pub type GatewayId = u16;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const SEALED_LEN: usize = 32 + 16;
/// version, conn_id, nonce, sealed R, L, host, owner, tuple flag.
const FIXED_LEN: usize = 1 + 8 + NONCE_LEN + SEALED_LEN + 8 + 2 + 2 + 1;
/// The longest record: the fixed part and an IPv6 tuple.
pub const MAX_RECORD_LEN: usize = FIXED_LEN + MAX_TUPLE_LEN;

/// The etcd key of connection `index` of `epoch` in the cluster under `prefix`. Hex with
/// fixed width, so a prefix range over one epoch is ordered by index.
pub fn conn_key(prefix: &str, epoch: u32, index: u32) -> String {
    format!("{}{epoch:08x}/{index:08x}", conn_prefix(prefix))
}

/// The key prefix of every connection record of the cluster.
pub fn conn_prefix(prefix: &str) -> String {
    format!("{}/conn/", prefix.trim_end_matches('/'))
}

/// `(epoch, index)` of a key made by [`conn_key`] under `prefix`, or `None` for any other key.
pub fn parse_conn_key(prefix: &str, key: &[u8]) -> Option<(u32, u32)> {
    let rest = key.strip_prefix(conn_prefix(prefix).as_bytes())?;
    let rest = std::str::from_utf8(rest).ok()?;
    let (epoch, index) = rest.split_once('/')?;
    if epoch.len() != 8 || index.len() != 8 {
        return None;
    }
    Some((
        u32::from_str_radix(epoch, 16).ok()?,
        u32::from_str_radix(index, 16).ok()?,
    ))
}

/// `R` sealed for the store: only the cluster's gateways (who hold the master secret) open it.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedSecret {
    nonce: [u8; NONCE_LEN],
    sealed: [u8; SEALED_LEN],
}

impl fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealedSecret(..)")
    }
}

/// One connection record as stored: everything the registry holds, `R` sealed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnRecord {
    pub conn_id: u64,
    pub secret: SealedSecret,
    /// `L`, the time of the last accepted REBIND (or of registration).
    pub last_rebind: Ticks,
    pub host: HostId,
    /// The gateway that accepted the last REBIND (or the registration): it forwards the
    /// connection's traffic; the others let go of the old tuple.
    pub owner: GatewayId,
    pub tuple: Option<SocketAddr>,
}

/// Why a stored value is not a record. Names the problem; never the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record shorter than its {FIXED_LEN}-byte fixed part")]
    Short,
    #[error("record version {0} (this gateway reads version {VERSION})")]
    Version(u8),
    #[error("record tuple flag {0} is neither 0 nor 1")]
    TupleFlag(u8),
    #[error("record tuple is malformed")]
    Tuple,
    #[error("bytes after the end of the record")]
    Trailing,
    #[error("the sealed rebind secret does not open under this cluster's key and this key path")]
    Seal,
}

impl ConnRecord {
    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(MAX_RECORD_LEN);
        v.push(VERSION);
        v.extend_from_slice(&self.conn_id.to_be_bytes());
        v.extend_from_slice(&self.secret.nonce);
        v.extend_from_slice(&self.secret.sealed);
        v.extend_from_slice(&self.last_rebind.0.to_be_bytes());
        v.extend_from_slice(&self.host.to_be_bytes());
        v.extend_from_slice(&self.owner.to_be_bytes());
        match &self.tuple {
            Some(t) => {
                v.push(1);
                let mut b = [0u8; MAX_TUPLE_LEN];
                let n = emit_tuple(t, &mut b);
                v.extend_from_slice(&b[..n]);
            }
            None => v.push(0),
        }
        v
    }

    /// Parses stored bytes (untrusted: etcd is reachable by others than this gateway).
    pub fn decode(b: &[u8]) -> Result<ConnRecord, RecordError> {
        if b.len() < FIXED_LEN {
            return Err(RecordError::Short);
        }
        if b[0] != VERSION {
            return Err(RecordError::Version(b[0]));
        }
        let mut at = 1;
        let mut take = |n: usize| {
            let s = &b[at..at + n];
            at += n;
            s
        };
        let conn_id = u64::from_be_bytes(take(8).try_into().map_err(|_| RecordError::Short)?);
        let nonce: [u8; NONCE_LEN] = take(NONCE_LEN).try_into().map_err(|_| RecordError::Short)?;
        let sealed: [u8; SEALED_LEN] = take(SEALED_LEN)
            .try_into()
            .map_err(|_| RecordError::Short)?;
        let last = u64::from_be_bytes(take(8).try_into().map_err(|_| RecordError::Short)?);
        let host = u16::from_be_bytes(take(2).try_into().map_err(|_| RecordError::Short)?);
        let owner = u16::from_be_bytes(take(2).try_into().map_err(|_| RecordError::Short)?);
        let flag = take(1)[0];
        let tuple = match flag {
            0 if b.len() == FIXED_LEN => None,
            0 => return Err(RecordError::Trailing),
            1 => {
                let (t, n) = parse_tuple(&b[FIXED_LEN..]).map_err(|_| RecordError::Tuple)?;
                if FIXED_LEN + n != b.len() {
                    return Err(RecordError::Trailing);
                }
                Some(t)
            }
            f => return Err(RecordError::TupleFlag(f)),
        };
        Ok(ConnRecord {
            conn_id,
            secret: SealedSecret { nonce, sealed },
            last_rebind: Ticks(last),
            host,
            owner,
            tuple,
        })
    }
}

/// The key of the cluster's epoch record.
pub fn epoch_key(prefix: &str) -> String {
    format!("{}/epoch", prefix.trim_end_matches('/'))
}

const EPOCH_VERSION: u8 = 1;
/// version, current, previous flag, previous, grace deadline, rotated at.
pub const EPOCH_RECORD_LEN: usize = 1 + 4 + 1 + 4 + 8 + 8;

/// The cluster's key epoch as stored under [`epoch_key`]: what every gateway accepts. A
/// rotation replaces it in one transaction comparing its mod revision.
///
/// ```text
/// u8 version = 1 || u32 current || u8 previous flag (0 none, 1 some) || u32 previous
///   || u64 grace deadline (Unix ms; 0 none) || u64 rotated at (Unix ms; 0 never)
/// ```
///
/// The first releases stored the epoch as decimal text; [`EpochRecord::decode`] still reads
/// that (as an epoch without a previous one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochRecord {
    pub current: u32,
    /// The epoch still accepted until `grace_until_ms`.
    pub previous: Option<u32>,
    /// End of the previous epoch's grace period (Unix ms; 0 when there is no previous).
    pub grace_until_ms: u64,
    /// When the current epoch started (Unix ms; 0 if it never rotated): the schedule
    /// counts from it on every gateway.
    pub rotated_at_ms: u64,
}

/// Why a stored value is not an epoch record (names the problem, never the bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EpochRecordError {
    #[error("epoch record of {0} bytes (a record has {EPOCH_RECORD_LEN})")]
    Length(usize),
    #[error("epoch record version {0} (this gateway reads version {EPOCH_VERSION})")]
    Version(u8),
    #[error("epoch record previous-epoch flag {0} is neither 0 nor 1")]
    Flag(u8),
    #[error("epoch record names its current epoch as the previous one")]
    SameEpoch,
}

impl EpochRecord {
    /// An epoch that never rotated.
    pub fn first(epoch: u32) -> EpochRecord {
        EpochRecord {
            current: epoch,
            previous: None,
            grace_until_ms: 0,
            rotated_at_ms: 0,
        }
    }

    /// The record after a rotation at `now_ms` with a grace period of `grace_ms`: the next
    /// epoch, this one accepted until the deadline.
    pub fn next(&self, now_ms: u64, grace_ms: u64) -> EpochRecord {
        EpochRecord {
            current: self.current.wrapping_add(1),
            previous: Some(self.current),
            grace_until_ms: now_ms.saturating_add(grace_ms).max(1),
            rotated_at_ms: now_ms,
        }
    }

    /// The previous epoch while its grace period lasts at `now_ms`.
    pub fn in_grace(&self, now_ms: u64) -> Option<u32> {
        self.previous.filter(|_| now_ms < self.grace_until_ms)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(EPOCH_RECORD_LEN);
        v.push(EPOCH_VERSION);
        v.extend_from_slice(&self.current.to_be_bytes());
        v.push(u8::from(self.previous.is_some()));
        v.extend_from_slice(&self.previous.unwrap_or(0).to_be_bytes());
        v.extend_from_slice(&self.grace_until_ms.to_be_bytes());
        v.extend_from_slice(&self.rotated_at_ms.to_be_bytes());
        v
    }

    /// Parses a stored value (untrusted; length-checked, never panics).
    pub fn decode(b: &[u8]) -> Result<EpochRecord, EpochRecordError> {
        // The first releases' decimal text.
        if !b.is_empty()
            && b.len() <= 10
            && b.iter().all(u8::is_ascii_digit)
            && let Some(e) = std::str::from_utf8(b).ok().and_then(|s| s.parse().ok())
        {
            return Ok(EpochRecord::first(e));
        }
        if b.len() != EPOCH_RECORD_LEN {
            return Err(EpochRecordError::Length(b.len()));
        }
        if b[0] != EPOCH_VERSION {
            return Err(EpochRecordError::Version(b[0]));
        }
        let u32_at = |at: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[at..at + 4]);
            u32::from_be_bytes(a)
        };
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_be_bytes(a)
        };
        let current = u32_at(1);
        let previous = match b[5] {
            0 => None,
            1 => Some(u32_at(6)),
            f => return Err(EpochRecordError::Flag(f)),
        };
        if previous == Some(current) {
            return Err(EpochRecordError::SameEpoch);
        }
        Ok(EpochRecord {
            current,
            previous,
            grace_until_ms: u64_at(10),
            rotated_at_ms: u64_at(18),
        })
    }
}

/// Seals and opens rebind secrets for one cluster (key derived from the master secret).
pub struct RecordSeal {
    gcm: Gcm,
    prefix: String,
}

impl fmt::Debug for RecordSeal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordSeal")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RecordSeal {
    pub fn new(master: &MasterSecret, prefix: &str) -> RecordSeal {
        let mut k = Zeroizing::new([0u8; 16]);
        crypto::hkdf(
            b"rebindgw cluster",
            master.expose(),
            &[b"etcd seal R"],
            &mut k[..],
        );
        RecordSeal {
            gcm: crypto::gcm(&k),
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    fn aad(&self, epoch: u32, index: u32, conn_id: u64) -> Vec<u8> {
        let mut aad = Vec::with_capacity(18 + 4 + self.prefix.len() + 16);
        aad.extend_from_slice(b"rebindgw cluster R");
        aad.extend_from_slice(&(self.prefix.len() as u32).to_be_bytes());
        aad.extend_from_slice(self.prefix.as_bytes());
        aad.extend_from_slice(&epoch.to_be_bytes());
        aad.extend_from_slice(&index.to_be_bytes());
        aad.extend_from_slice(&conn_id.to_be_bytes());
        aad
    }

    /// Seals `secret` for connection `index` of `epoch` under a fresh random nonce.
    pub fn seal(
        &self,
        epoch: u32,
        index: u32,
        conn_id: u64,
        secret: &RebindSecret,
    ) -> SealedSecret {
        let nonce: [u8; NONCE_LEN] = crypto::random_array();
        let mut sealed = [0u8; SEALED_LEN];
        sealed[..32].copy_from_slice(&secret.0);
        crypto::seal_in_place(
            &self.gcm,
            &nonce,
            &self.aad(epoch, index, conn_id),
            &mut sealed,
        );
        SealedSecret { nonce, sealed }
    }

    /// Opens the secret of `record`, stored at `(epoch, index)`.
    pub fn open(
        &self,
        epoch: u32,
        index: u32,
        record: &ConnRecord,
    ) -> Result<RebindSecret, RecordError> {
        let mut r = Zeroizing::new([0u8; 32]);
        crypto::open_to(
            &self.gcm,
            &record.secret.nonce,
            &self.aad(epoch, index, record.conn_id),
            &record.secret.sealed,
            &mut r[..],
        )
        .map_err(|_| RecordError::Seal)?;
        Ok(RebindSecret(*r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seal() -> RecordSeal {
        RecordSeal::new(&MasterSecret::from_bytes([9; 32]), "/mesh/test/")
    }

    fn record(tuple: Option<SocketAddr>) -> (ConnRecord, RebindSecret) {
        let r = RebindSecret([0x42; 32]);
        let rec = ConnRecord {
            conn_id: 0xC0FFEE,
            secret: seal().seal(3, 17, 0xC0FFEE, &r),
            last_rebind: Ticks(123_456_789),
            host: 2,
            owner: 7,
            tuple,
        };
        (rec, r)
    }

    #[test]
    fn records_roundtrip_and_open_only_at_their_own_key() {
        for tuple in [
            None,
            Some("198.51.100.7:4000".parse().unwrap()),
            Some("[2001:db8::1]:443".parse().unwrap()),
        ] {
            let (rec, r) = record(tuple);
            let bytes = rec.encode();
            assert!(bytes.len() <= MAX_RECORD_LEN);
            let back = ConnRecord::decode(&bytes).unwrap();
            assert_eq!(back, rec);
            assert_eq!(seal().open(3, 17, &back).unwrap(), r);
            // The secret is not in the stored bytes.
            assert!(!bytes.windows(32).any(|w| w == r.0));
            // Moved to another index, epoch or cluster, or given another conn_id: no open.
            assert_eq!(seal().open(3, 18, &back), Err(RecordError::Seal));
            assert_eq!(seal().open(4, 17, &back), Err(RecordError::Seal));
            let other = RecordSeal::new(&MasterSecret::from_bytes([9; 32]), "/mesh/other");
            assert_eq!(other.open(3, 17, &back), Err(RecordError::Seal));
            let mut renamed = back.clone();
            renamed.conn_id += 1;
            assert_eq!(seal().open(3, 17, &renamed), Err(RecordError::Seal));
            let wrong_master = RecordSeal::new(&MasterSecret::from_bytes([8; 32]), "/mesh/test");
            assert_eq!(wrong_master.open(3, 17, &back), Err(RecordError::Seal));
        }
    }

    #[test]
    fn every_malformed_record_is_a_named_error() {
        let (rec, _) = record(Some("198.51.100.7:4000".parse().unwrap()));
        let bytes = rec.encode();
        assert_eq!(
            ConnRecord::decode(&bytes[..FIXED_LEN - 1]),
            Err(RecordError::Short)
        );
        let mut v = bytes.clone();
        v[0] = 2;
        assert_eq!(ConnRecord::decode(&v), Err(RecordError::Version(2)));
        let mut v = bytes.clone();
        v[FIXED_LEN - 1] = 5;
        assert_eq!(ConnRecord::decode(&v), Err(RecordError::TupleFlag(5)));
        let mut v = bytes.clone();
        v.push(0);
        assert_eq!(ConnRecord::decode(&v), Err(RecordError::Trailing));
        assert_eq!(
            ConnRecord::decode(&bytes[..FIXED_LEN + 2]),
            Err(RecordError::Tuple)
        );
        let (none, _) = record(None);
        let mut v = none.encode();
        v.push(1);
        assert_eq!(ConnRecord::decode(&v), Err(RecordError::Trailing));
    }

    #[test]
    fn conn_keys_parse_back_and_reject_other_keys() {
        let k = conn_key("/mesh/a/", 0x107, 0xBEEF);
        assert_eq!(k, "/mesh/a/conn/00000107/0000beef");
        assert_eq!(
            parse_conn_key("/mesh/a", k.as_bytes()),
            Some((0x107, 0xBEEF))
        );
        assert_eq!(parse_conn_key("/mesh/b", k.as_bytes()), None);
        for bad in [
            "/mesh/a/conn/107/0000beef",
            "/mesh/a/conn/00000107",
            "/mesh/a/conn/0000010g/0000beef",
            "/mesh/a/gateways/1",
        ] {
            assert_eq!(parse_conn_key("/mesh/a", bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn epoch_records_roundtrip_and_garbage_is_a_named_error() {
        let first = EpochRecord::first(7);
        assert_eq!(EpochRecord::decode(&first.encode()), Ok(first));
        let next = first.next(1_800_000_000_000, 20_000);
        assert_eq!(
            next,
            EpochRecord {
                current: 8,
                previous: Some(7),
                grace_until_ms: 1_800_000_020_000,
                rotated_at_ms: 1_800_000_000_000,
            }
        );
        let bytes = next.encode();
        assert_eq!(bytes.len(), EPOCH_RECORD_LEN);
        assert_eq!(EpochRecord::decode(&bytes), Ok(next));
        assert_eq!(next.in_grace(1_800_000_019_999), Some(7));
        assert_eq!(next.in_grace(1_800_000_020_000), None);
        assert_eq!(first.in_grace(0), None);
        // The first releases' decimal text.
        assert_eq!(EpochRecord::decode(b"1"), Ok(EpochRecord::first(1)));
        assert_eq!(
            EpochRecord::decode(b"4294967295"),
            Ok(EpochRecord::first(u32::MAX))
        );
        // Garbage: named errors, no panic.
        assert_eq!(EpochRecord::decode(b""), Err(EpochRecordError::Length(0)));
        assert_eq!(
            EpochRecord::decode(b"4294967296"),
            Err(EpochRecordError::Length(10))
        );
        assert_eq!(
            EpochRecord::decode(&bytes[..EPOCH_RECORD_LEN - 1]),
            Err(EpochRecordError::Length(EPOCH_RECORD_LEN - 1))
        );
        let mut v = bytes.clone();
        v.push(0);
        assert_eq!(
            EpochRecord::decode(&v),
            Err(EpochRecordError::Length(EPOCH_RECORD_LEN + 1))
        );
        let mut v = bytes.clone();
        v[0] = 2;
        assert_eq!(EpochRecord::decode(&v), Err(EpochRecordError::Version(2)));
        let mut v = bytes.clone();
        v[5] = 3;
        assert_eq!(EpochRecord::decode(&v), Err(EpochRecordError::Flag(3)));
        let mut v = bytes.clone();
        v[6..10].copy_from_slice(&8u32.to_be_bytes());
        assert_eq!(EpochRecord::decode(&v), Err(EpochRecordError::SameEpoch));
        // No previous: its field is ignored.
        let mut v = first.encode();
        v[6..10].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(EpochRecord::decode(&v), Ok(first));
        assert_eq!(epoch_key("/rebindgw/prod/"), "/rebindgw/prod/epoch");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(rec) = ConnRecord::decode(&b) {
                prop_assert_eq!(rec.encode(), b);
            }
        }

        #[test]
        fn arbitrary_epoch_records_never_panic(b in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(rec) = EpochRecord::decode(&b) {
                prop_assert_eq!(EpochRecord::decode(&rec.encode()), Ok(rec));
            }
        }

        #[test]
        fn arbitrary_keys_never_panic(k in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_conn_key("/mesh/a", &k);
        }
    }
}
