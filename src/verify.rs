//! Gateway-side REBIND verification, every check of PROTOCOL.md §6 in order, cheap ones first.
//!
//! Verification is split around the trial-decryption engine so the gateway can batch it:
//! [`precheck`] runs checks 1–3 per packet, the engine runs check 4 over the whole batch, and
//! [`finish`] runs checks 5–7. [`verify_one`] chains them for a single packet.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use zeroize::Zeroizing;

use crate::crypto;
use crate::crypto::gcm::{SessionGcm, SessionNonce};
use crate::engine::{TrialInput, TrialKeys, TrialOutput};
use crate::keys::EpochKeys;
use crate::rebind::RebindKdf;
use crate::registry::{Conn, Freshness, Registry};
use crate::time::Ticks;
use crate::wire::{REBIND_ACK_LEN, RebindView, build_rebind_ack};

/// Why a REBIND was refused: the first check that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Check 1: the length does not match S.
    Length,
    /// Check 1: the epoch byte names no epoch the gateway accepts.
    Epoch,
    /// Check 2: `|t - now| > W`.
    Stale,
    /// Check 3: the cookie does not match the source tuple and `t`.
    Cookie,
    /// Check 4: some slot had zero or two good candidates.
    Trial,
    /// Check 5: no live connection has the recovered index.
    UnknownIndex,
    /// Check 6: the AEAD did not open.
    Aead,
    /// Check 6: the AEAD opened but names another conn_id.
    ConnId,
    /// Check 7: `t < L`, or `t == L` from another tuple.
    Replay,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::Length,
        RejectReason::Epoch,
        RejectReason::Stale,
        RejectReason::Cookie,
        RejectReason::Trial,
        RejectReason::UnknownIndex,
        RejectReason::Aead,
        RejectReason::ConnId,
        RejectReason::Replay,
    ];

    /// The name used by the vectors file and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            RejectReason::Length => "length",
            RejectReason::Epoch => "epoch",
            RejectReason::Stale => "stale",
            RejectReason::Cookie => "cookie",
            RejectReason::Trial => "trial",
            RejectReason::UnknownIndex => "unknown-index",
            RejectReason::Aead => "aead",
            RejectReason::ConnId => "conn-id",
            RejectReason::Replay => "replay",
        }
    }

    pub fn from_name(name: &str) -> Option<RejectReason> {
        RejectReason::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Rejections at the epoch part of check 1, at check 2 or at check 3 draw a fresh
    /// UNRECOGNIZED (§6); this is also how a cookie request is answered.
    pub fn draws_unrecognized(self) -> bool {
        matches!(
            self,
            RejectReason::Epoch | RejectReason::Stale | RejectReason::Cookie
        )
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The keys, engine keys and registry of one accepted epoch.
pub struct EpochState {
    pub keys: EpochKeys,
    pub trial: TrialKeys,
    pub registry: Registry,
}

impl EpochState {
    pub fn new(keys: EpochKeys, trial: TrialKeys) -> Self {
        let registry = Registry::new(keys.slots());
        EpochState {
            keys,
            trial,
            registry,
        }
    }
}

/// A REBIND that passed checks 1–3.
#[derive(Clone, Copy, Debug)]
pub struct Prechecked<'a> {
    pub view: RebindView<'a>,
    /// Position of its epoch in the slice given to [`precheck`].
    pub epoch: usize,
}

impl<'a> Prechecked<'a> {
    pub fn trial_input(&self) -> TrialInput<'a> {
        TrialInput {
            slots: self.view.slot_bytes(),
            t: self.view.t().0,
        }
    }
}

/// Checks 1–3: length for S, accepted epoch, freshness window, cookie.
pub fn precheck<'a>(
    datagram: &'a [u8],
    from: &SocketAddr,
    now: Ticks,
    window_ticks: u64,
    slots: usize,
    epochs: &[&EpochKeys],
) -> Result<Prechecked<'a>, RejectReason> {
    let pre = check_shape_and_time(datagram, now, window_ticks, slots, epochs)?;
    let view = pre.view;
    if !epochs[pre.epoch].cookie_matches(from, view.t(), &view.cookie()) {
        return Err(RejectReason::Cookie);
    }
    Ok(pre)
}

/// [`precheck`] for a batch of `(datagram, source)`: checks 1–2 per packet, then the
/// cookies of the survivors eight at a time ([`EpochKeys::cookies`]). One result per
/// packet, in order.
pub fn precheck_batch<'a>(
    packets: &[(&'a [u8], &SocketAddr)],
    now: Ticks,
    window_ticks: u64,
    slots: usize,
    epochs: &[&EpochKeys],
) -> Vec<Result<Prechecked<'a>, RejectReason>> {
    let mut results: Vec<Result<Prechecked<'a>, RejectReason>> = packets
        .iter()
        .map(|(d, _)| check_shape_and_time(d, now, window_ticks, slots, epochs))
        .collect();
    // Cookies of the survivors, eight at a time per epoch (stack buffers: a garbage flood
    // that fails checks 1–2 costs no allocation here).
    for (e, keys) in epochs.iter().enumerate() {
        let mut picked = [0usize; 8];
        let mut inputs = [(NO_SOURCE, Ticks(0)); 8];
        let mut n = 0;
        for j in 0..results.len() {
            if let Ok(p) = &results[j]
                && p.epoch == e
            {
                (picked[n], inputs[n]) = (j, (packets[j].1, p.view.t()));
                n += 1;
            }
            if n == picked.len() || (n > 0 && j + 1 == results.len()) {
                check_cookies(keys, &picked[..n], &inputs[..n], &mut results);
                n = 0;
            }
        }
    }
    results
}

/// A placeholder source for unused entries of a cookie group.
const NO_SOURCE: &SocketAddr = &SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::UNSPECIFIED,
    0,
));

/// Check 3 for up to 8 packets that passed checks 1–2: `results[picked[i]]`, whose source
/// and `t` are `inputs[i]`.
fn check_cookies<'a>(
    keys: &EpochKeys,
    picked: &[usize],
    inputs: &[(&SocketAddr, Ticks)],
    results: &mut [Result<Prechecked<'a>, RejectReason>],
) {
    let n = inputs.len().min(8);
    let mut cookies = [[0u8; 16]; 8];
    keys.cookies(&inputs[..n], &mut cookies[..n]);
    for (j, cookie) in picked.iter().zip(&cookies) {
        let presented = match &results[*j] {
            Ok(p) => p.view.cookie(),
            Err(_) => continue,
        };
        if !crypto::ct_eq(cookie, &presented) {
            results[*j] = Err(RejectReason::Cookie);
        }
    }
}

/// Checks 1 and 2: length for S, accepted epoch, freshness window.
#[inline]
fn check_shape_and_time<'a>(
    datagram: &'a [u8],
    now: Ticks,
    window_ticks: u64,
    slots: usize,
    epochs: &[&EpochKeys],
) -> Result<Prechecked<'a>, RejectReason> {
    let view = RebindView::new_checked(datagram, slots).map_err(|_| RejectReason::Length)?;
    let epoch = epochs
        .iter()
        .position(|e| e.epoch_byte() == view.epoch_byte())
        .ok_or(RejectReason::Epoch)?;
    if view.t().abs_diff(now) > window_ticks {
        return Err(RejectReason::Stale);
    }
    Ok(Prechecked { view, epoch })
}

/// A REBIND that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    pub index: u32,
    pub conn_id: u64,
    pub t: Ticks,
    /// `Accept` (bind to the source tuple) or `Duplicate` (answer again, change nothing).
    pub freshness: Freshness,
    pub ack: [u8; REBIND_ACK_LEN],
}

/// A REBIND that passed check 5 and the early freshness rule, with its session key `k`.
/// It borrows nothing, so the caller may commit other REBINDs before [`open_keyed`].
pub struct Keyed {
    pub index: u32,
    pub conn_id: u64,
    key: Zeroizing<[u8; 16]>,
}

/// One REBIND of a batch as [`derive_keys`] takes it: prechecked, its trial result, its
/// source.
pub type BatchItem<'p, 'd> = (&'p Prechecked<'d>, Option<&'p TrialOutput>, &'p SocketAddr);

/// Check 5 and the freshness rule ahead of the KDF: the connection and its nonces.
fn lookup<'r, 'p>(
    (pre, trial, from): BatchItem<'p, '_>,
    registry: &'r Registry,
) -> Result<(&'r Conn, &'p TrialOutput), RejectReason> {
    let trial = trial.ok_or(RejectReason::Trial)?;
    let conn = registry
        .get(trial.index)
        .ok_or(RejectReason::UnknownIndex)?;
    // The freshness rule is cheap: run it before the KDF so a replay flood costs no HKDF.
    // It reveals only what the trial bits already do (§8). [`open_keyed`] runs it again.
    let freshness = registry
        .freshness(trial.index, pre.view.t(), from)
        .ok_or(RejectReason::UnknownIndex)?;
    if freshness == Freshness::Replay {
        return Err(RejectReason::Replay);
    }
    Ok((conn, trial))
}

/// Check 5, the early freshness rule and the KDF for a batch of one epoch: session keys
/// are derived two at a time ([`RebindKdf::session_keys_x2`]), which costs about one.
/// Changes nothing; one result per item, in order.
pub fn derive_keys(
    items: &[BatchItem<'_, '_>],
    registry: &Registry,
) -> Vec<Result<Keyed, RejectReason>> {
    let slots = registry.slots();
    let found: Vec<_> = items.iter().map(|&item| lookup(item, registry)).collect();
    let mut keys: Vec<Option<Zeroizing<[u8; 16]>>> = (0..items.len()).map(|_| None).collect();
    let ready: Vec<usize> = (0..items.len()).filter(|&j| found[j].is_ok()).collect();
    let kdf_input = |j: usize| {
        let (conn, trial) = found[j].as_ref().ok()?;
        Some((&conn.kdf, &trial.nonces[..slots], items[j].0.view.t()))
    };
    let (pairs, odd) = ready.as_chunks::<2>();
    for &[a, b] in pairs {
        if let (Some(x), Some(y)) = (kdf_input(a), kdf_input(b)) {
            let [ka, kb] = RebindKdf::session_keys_x2(x, y);
            (keys[a], keys[b]) = (Some(ka), Some(kb));
        }
    }
    for &j in odd {
        if let Some((kdf, nonces, t)) = kdf_input(j) {
            keys[j] = Some(kdf.session_key(nonces, t));
        }
    }
    found
        .into_iter()
        .zip(keys)
        .map(|(f, key)| {
            let (conn, trial) = f?;
            Ok(Keyed {
                index: trial.index,
                conn_id: conn.conn_id,
                key: key.ok_or(RejectReason::UnknownIndex)?,
            })
        })
        .collect()
}

/// Checks 6 and 7 for a keyed REBIND, against the registry as it is now (an earlier REBIND
/// of the same batch may have moved `L`). Changes nothing: on `Accept` the caller commits
/// with [`Registry::commit_rebind`] and moves the tuple.
pub fn open_keyed(
    pre: &Prechecked<'_>,
    keyed: &Keyed,
    registry: &Registry,
    from: &SocketAddr,
) -> Result<Verified, RejectReason> {
    let session = SessionGcm::new(&keyed.key);
    let sealed = pre
        .view
        .sealed()
        .try_into()
        .map_err(|_| RejectReason::Aead)?;
    let plain = session
        .open8(SessionNonce::Rebind, pre.view.head(), sealed)
        .map_err(|_| RejectReason::Aead)?;
    if !crypto::ct_eq(&plain, &keyed.conn_id.to_be_bytes()) {
        return Err(RejectReason::ConnId);
    }
    let t = pre.view.t();
    let freshness = match registry.get(keyed.index) {
        Some(conn) if conn.conn_id == keyed.conn_id => registry
            .freshness(keyed.index, t, from)
            .ok_or(RejectReason::UnknownIndex)?,
        _ => return Err(RejectReason::UnknownIndex),
    };
    if freshness == Freshness::Replay {
        return Err(RejectReason::Replay);
    }
    Ok(Verified {
        index: keyed.index,
        conn_id: keyed.conn_id,
        t,
        freshness,
        ack: build_rebind_ack(&session, t, keyed.conn_id),
    })
}

/// Checks 5–7 for one prechecked REBIND and its trial result ([`derive_keys`] then
/// [`open_keyed`]). Changes nothing.
pub fn finish(
    pre: &Prechecked<'_>,
    trial: Option<&TrialOutput>,
    registry: &Registry,
    from: &SocketAddr,
) -> Result<Verified, RejectReason> {
    let [keyed] = derive_keys(&[(pre, trial, from)], registry)
        .try_into()
        .map_err(|_| RejectReason::UnknownIndex)?;
    open_keyed(pre, &keyed?, registry, from)
}

/// All checks for one REBIND, with the engine called for this packet alone.
pub fn verify_one(
    datagram: &[u8],
    from: &SocketAddr,
    now: Ticks,
    window_ticks: u64,
    slots: usize,
    epochs: &[&EpochState],
) -> Result<(usize, Verified), RejectReason> {
    let keys: Vec<&EpochKeys> = epochs.iter().map(|e| &e.keys).collect();
    let pre = precheck(datagram, from, now, window_ticks, slots, &keys)?;
    let state = epochs[pre.epoch];
    let trial = state.trial.trial_one(pre.trial_input());
    finish(&pre, trial.as_ref(), &state.registry, from).map(|v| (pre.epoch, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Backend;
    use crate::keys::MasterSecret;
    use crate::rebind::{RebindCredentials, build_rebind, fresh_nonces};

    const S: usize = 16;
    const NOW: Ticks = Ticks(639_028_224_000_000_000);
    const WINDOW: u64 = 300_000_000;

    struct World {
        keys: EpochKeys,
        trial: TrialKeys,
        registry: Registry,
        secrets: Vec<crate::rebind::RebindSecret>,
    }

    fn world(connections: u64) -> World {
        let keys = EpochKeys::derive(&MasterSecret::from_bytes([3; 32]), 1, S).unwrap();
        let trial = TrialKeys::new(Backend::best(), keys.slot_key_pairs()).unwrap();
        let mut registry = Registry::new(S);
        let secrets = (0..connections)
            .map(|c| registry.register(100 + c, 0, None).unwrap().secret)
            .collect();
        World {
            keys,
            trial,
            registry,
            secrets,
        }
    }

    fn rebind(w: &World, index: u32, from: &SocketAddr, t: Ticks) -> Vec<u8> {
        let slot_keys = w.keys.client_keys(index);
        let creds = RebindCredentials {
            conn_id: 100 + u64::from(index),
            secret: &w.secrets[index as usize],
            slot_keys: &slot_keys,
        };
        let cookie = w.keys.cookie(from, t);
        build_rebind(&creds, w.keys.epoch_byte(), t, &cookie, &fresh_nonces(S)).0
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 5000))
    }

    #[test]
    fn batch_keys_match_one_by_one_with_rejects_mixed_in() {
        let w = world(8);
        let froms: Vec<SocketAddr> = (0..7).map(addr).collect();
        let mut datagrams: Vec<Vec<u8>> = (0..7)
            .map(|j| rebind(&w, j as u32, &froms[j], Ticks(NOW.0 - j as u64)))
            .collect();
        // Item 3's conn_id seal is corrupted (check 6).
        let last = datagrams[3].len() - 1;
        datagrams[3][last] ^= 1;
        let epochs = [&w.keys];
        let pres: Vec<Prechecked<'_>> = datagrams
            .iter()
            .zip(&froms)
            .map(|(d, f)| precheck(d, f, NOW, WINDOW, S, &epochs).unwrap())
            .collect();
        let mut trials: Vec<Option<TrialOutput>> = pres
            .iter()
            .map(|p| w.trial.trial_one(p.trial_input()))
            .collect();
        // Item 5 fails the trial; item 6 names an index nobody holds.
        trials[5] = None;
        if let Some(t) = trials[6].as_mut() {
            t.index = 9;
        }
        let items: Vec<BatchItem<'_, '_>> = (0..7)
            .map(|j| (&pres[j], trials[j].as_ref(), &froms[j]))
            .collect();
        let batch: Vec<Result<Verified, RejectReason>> = derive_keys(&items, &w.registry)
            .into_iter()
            .zip(&items)
            .map(|(k, (p, _, f))| k.and_then(|k| open_keyed(p, &k, &w.registry, f)))
            .collect();
        for (j, got) in batch.iter().enumerate() {
            let alone = finish(&pres[j], trials[j].as_ref(), &w.registry, &froms[j]);
            assert_eq!(got, &alone, "item {j}");
        }
        let reasons: Vec<Option<RejectReason>> = batch.iter().map(|r| r.err()).collect();
        assert_eq!(
            reasons,
            [
                None,
                None,
                None,
                Some(RejectReason::Aead),
                None,
                Some(RejectReason::Trial),
                Some(RejectReason::UnknownIndex)
            ]
        );
        let accepted = batch[4].as_ref().unwrap();
        assert_eq!((accepted.index, accepted.conn_id), (4, 104));
        assert_eq!(accepted.freshness, Freshness::Accept);
    }

    #[test]
    fn a_later_rebind_in_the_same_batch_sees_the_earlier_commit() {
        let mut w = world(2);
        let t = Ticks(NOW.0 - 10);
        let (a, b) = (addr(1), addr(2));
        // The same connection and t from two tuples (a replay racing the original), and
        // the original again from its own tuple (a duplicate).
        let datagrams = [rebind(&w, 1, &a, t), rebind(&w, 1, &b, t)];
        let replayed = datagrams[0].clone();
        let epochs = [&w.keys];
        let sources = [a, b, a];
        let all = [&datagrams[0], &datagrams[1], &replayed];
        let pres: Vec<Prechecked<'_>> = all
            .iter()
            .zip(&sources)
            .map(|(d, f)| precheck(d, f, NOW, WINDOW, S, &epochs).unwrap())
            .collect();
        let trials: Vec<_> = pres
            .iter()
            .map(|p| w.trial.trial_one(p.trial_input()))
            .collect();
        let items: Vec<BatchItem<'_, '_>> = (0..3)
            .map(|j| (&pres[j], trials[j].as_ref(), &sources[j]))
            .collect();
        // All three pass the early freshness rule: nothing is committed yet.
        let keyed: Vec<Keyed> = derive_keys(&items, &w.registry)
            .into_iter()
            .map(|k| k.unwrap())
            .collect();
        drop(items);
        let first = open_keyed(&pres[0], &keyed[0], &w.registry, &a).unwrap();
        assert_eq!(first.freshness, Freshness::Accept);
        w.registry.commit_rebind(first.index, first.t, a);
        assert_eq!(
            open_keyed(&pres[1], &keyed[1], &w.registry, &b),
            Err(RejectReason::Replay)
        );
        let again = open_keyed(&pres[2], &keyed[2], &w.registry, &a).unwrap();
        assert_eq!(again.freshness, Freshness::Duplicate);
        assert_eq!(again.ack, first.ack);
    }

    #[test]
    fn batched_precheck_equals_one_by_one() {
        let w = world(4);
        let t = Ticks(NOW.0 - 5);
        let mut cases: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
        // 30 packets, 15 of them passing checks 1–2: a cookie group of 8 and a partial one.
        for j in 0..29u8 {
            let from = addr(j);
            let mut d = rebind(&w, u32::from(j % 4), &from, t);
            match j % 6 {
                1 => d[12] ^= 1,                                                    // cookie
                2 => d.truncate(d.len() - 1),                                       // length
                3 => d[1] ^= 0x80,                                                  // epoch
                4 => d[2..10].copy_from_slice(&(NOW.0 - 2 * WINDOW).to_be_bytes()), // stale
                _ => {}
            }
            cases.push((d, from));
        }
        // A valid REBIND presented from another tuple fails its cookie.
        cases.push((cases[0].0.clone(), addr(200)));
        let epochs = [&w.keys];
        let packets: Vec<(&[u8], &SocketAddr)> = cases.iter().map(|(d, f)| (&d[..], f)).collect();
        let batch = precheck_batch(&packets, NOW, WINDOW, S, &epochs);
        let mut reasons = Vec::new();
        for ((d, f), got) in packets.iter().zip(&batch) {
            let alone = precheck(d, f, NOW, WINDOW, S, &epochs);
            assert_eq!(got.as_ref().err(), alone.as_ref().err());
            assert_eq!(
                got.as_ref().ok().map(|p| p.view.t()),
                alone.ok().map(|p| p.view.t())
            );
            reasons.push(got.as_ref().err().copied());
        }
        use RejectReason::*;
        let mut want: Vec<Option<RejectReason>> = (0..29)
            .map(|j| {
                [
                    None,
                    Some(Cookie),
                    Some(Length),
                    Some(Epoch),
                    Some(Stale),
                    None,
                ][j % 6]
            })
            .collect();
        want.push(Some(Cookie));
        assert_eq!(reasons, want);
    }
}
