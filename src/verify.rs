//! Gateway-side REBIND verification, every check of PROTOCOL.md §6 in order, cheap ones first.
//!
//! One path for every caller (the gateway's workers, `rebindgw conformance`, the fuzz targets):
//! [`verify_batch`] takes a batch of REBINDs and returns one [`Outcome`] per packet, and
//! commits the accepted ones through [`Registries`] as it goes; the caller applies the
//! effects (tables, store, REBOUND, the REBIND_ACK). Inside, the batch is grouped by epoch
//! once: [`trial_batch`] runs checks 1–3 (the cookies eight at a time, [`precheck_batch`])
//! and one engine call per epoch (check 4), touching no registry; [`Pending::finish`] runs
//! check 5, the early freshness rule and the KDFs per epoch (sixteen at a time across
//! AVX-512 lanes, or two at a time on SHA-NI: [`KdfPath`]), then checks 6–7 packet by
//! packet, each seeing the commits of the REBINDs before it.
//! [`verify_one`] is the same path for a single packet.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use zeroize::Zeroizing;

use crate::crypto;
use crate::crypto::KdfPath;
use crate::crypto::gcm::{SessionGcm, SessionNonce};
use crate::crypto::sha256_x16::LANES;
use crate::engine::{TrialInput, TrialKeys, TrialOutput};
use crate::keys::EpochKeys;
use crate::rebind::RebindKdf;
use crate::registry::{Conn, Freshness, HostId, Registry};
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

/// The keys of one accepted epoch, as the cookie checks and the trial-decryption engine use
/// them. Its registry is held apart (the gateway keeps it under its control lock): see
/// [`Registries`].
pub struct EpochCrypto {
    pub keys: EpochKeys,
    pub trial: TrialKeys,
}

impl EpochCrypto {
    pub fn new(keys: EpochKeys, trial: TrialKeys) -> Self {
        EpochCrypto { keys, trial }
    }
}

/// The registries [`verify_batch`] checks against, and the commit of an accepted REBIND.
///
/// The commit happens between the per-packet checks 6–7, so a later REBIND of the same batch
/// sees it (its `L` and tuple). An implementation keeps whatever else it holds in step with
/// the registry there (the gateway: its tuple tables and the store).
pub trait Registries {
    /// The registry of epoch `epoch`, if it is still held.
    fn registry(&self, epoch: u32) -> Option<&Registry>;
    /// Check 7, `t > L`: sets `L = t` for connection `index` of `epoch` and binds it to `to`
    /// ([`Registry::commit_rebind`]). Returns the tuple it was bound to before.
    fn commit(&mut self, epoch: u32, index: u32, t: Ticks, to: SocketAddr) -> Option<SocketAddr>;
}

/// A lone registry serves whichever epoch is asked: for callers that hold one epoch.
impl Registries for Registry {
    fn registry(&self, _epoch: u32) -> Option<&Registry> {
        Some(self)
    }

    fn commit(&mut self, _epoch: u32, index: u32, t: Ticks, to: SocketAddr) -> Option<SocketAddr> {
        self.commit_rebind(index, t, to)
    }
}

/// A registry checked against but never changed: an accepted REBIND is reported as
/// [`Outcome::Accepted`], but its `L` and tuple stay as they were (benchmarks, and tests that
/// verify one packet several ways).
pub struct ReadOnly<'r>(pub &'r Registry);

impl Registries for ReadOnly<'_> {
    fn registry(&self, _epoch: u32) -> Option<&Registry> {
        Some(self.0)
    }

    fn commit(
        &mut self,
        _epoch: u32,
        index: u32,
        _t: Ticks,
        _to: SocketAddr,
    ) -> Option<SocketAddr> {
        self.0.get(index).and_then(|c| c.tuple())
    }
}

/// What became of one REBIND of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every check passed and `t > L`: committed through [`Registries::commit`] before the
    /// next REBIND of the batch was checked. Answer with `rebind.ack` (and tell the host).
    Accepted {
        /// The epoch number of the connection.
        epoch: u32,
        rebind: Verified,
        /// The connection's host, as its registry names it.
        host: HostId,
        /// The tuple the connection was bound to before.
        old: Option<SocketAddr>,
    },
    /// Every check passed, `t == L` from the connection's tuple: answer with the same
    /// REBIND_ACK again, change nothing.
    Duplicate { epoch: u32, rebind: Verified },
    /// Refused at the first check that failed.
    Rejected {
        reason: RejectReason,
        /// A cookie request (§6: the right length, every byte after the type zero).
        cookie_request: bool,
        /// Whether the REBIND draws a fresh UNRECOGNIZED for its source (§6: failed at
        /// check 1 for its epoch, at check 2 or at check 3).
        unrecognized: bool,
    },
}

impl Outcome {
    /// The verified REBIND of an accepted or duplicate outcome.
    pub fn verified(&self) -> Option<&Verified> {
        match self {
            Outcome::Accepted { rebind, .. } | Outcome::Duplicate { rebind, .. } => Some(rebind),
            Outcome::Rejected { .. } => None,
        }
    }

    /// The verified REBIND, or the check it failed.
    pub fn into_result(self) -> Result<Verified, RejectReason> {
        match self {
            Outcome::Accepted { rebind, .. } | Outcome::Duplicate { rebind, .. } => Ok(rebind),
            Outcome::Rejected { reason, .. } => Err(reason),
        }
    }

    /// Whether the REBIND draws a fresh UNRECOGNIZED (under the limits of §5).
    pub fn draws_unrecognized(&self) -> bool {
        matches!(
            self,
            Outcome::Rejected {
                unrecognized: true,
                ..
            }
        )
    }

    fn rejected(reason: RejectReason) -> Outcome {
        Outcome::Rejected {
            reason,
            cookie_request: false,
            unrecognized: false,
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
/// It borrows nothing, so other REBINDs may be committed before [`open_keyed`].
struct Keyed {
    index: u32,
    conn_id: u64,
    key: Zeroizing<[u8; 16]>,
}

/// One REBIND of a batch as [`derive_keys`] takes it: prechecked, its trial result, its
/// source.
type BatchItem<'p, 'd> = (&'p Prechecked<'d>, Option<&'p TrialOutput>, &'p SocketAddr);

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

/// Check 5, the early freshness rule and the KDF for a batch of one epoch, on `kdf`: with
/// [`KdfPath::Lanes16`] sixteen keys per AVX-512 pass
/// ([`RebindKdf::session_keys_x16`]) and a remainder under [`KdfPath::MIN_LANES`] in pairs;
/// with [`KdfPath::Pairs`] two at a time ([`RebindKdf::session_keys_x2`]), which costs about
/// one. Changes nothing; one result per item, in order.
fn derive_keys(
    items: &[BatchItem<'_, '_>],
    registry: &Registry,
    kdf: KdfPath,
) -> Vec<Result<Keyed, RejectReason>> {
    let slots = registry.slots();
    let found: Vec<_> = items.iter().map(|&item| lookup(item, registry)).collect();
    let mut keys: Vec<Option<Zeroizing<[u8; 16]>>> = (0..items.len()).map(|_| None).collect();
    let ready: Vec<usize> = (0..items.len()).filter(|&j| found[j].is_ok()).collect();
    let kdf_input = |j: usize| {
        let (conn, trial) = found[j].as_ref().ok()?;
        Some((&conn.kdf, &trial.nonces[..slots], items[j].0.view.t()))
    };
    let mut rest = &ready[..];
    // Lanes16 asked for where it cannot run (no AVX-512, or the portable backend) would be
    // the per-key portable code: pairs are faster there.
    if kdf == KdfPath::Lanes16 && crypto::sha256_x16::available(crypto::process_backend()) {
        let mut out: Vec<Zeroizing<[u8; 16]>> =
            (0..LANES).map(|_| Zeroizing::new([0; 16])).collect();
        while rest.len() >= KdfPath::MIN_LANES {
            let (group, tail) = rest.split_at(rest.len().min(LANES));
            // Every `ready` item has an input (found is Ok); stack arrays, no allocation.
            let Some(first) = kdf_input(group[0]) else {
                break;
            };
            let inputs: [_; LANES] =
                std::array::from_fn(|l| group.get(l).and_then(|&j| kdf_input(j)).unwrap_or(first));
            let out = &mut out[..group.len()];
            RebindKdf::session_keys_x16(&inputs[..group.len()], out);
            for (&j, k) in group.iter().zip(out.iter()) {
                keys[j] = Some(k.clone());
            }
            rest = tail;
        }
    }
    let (pairs, odd) = rest.as_chunks::<2>();
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
fn open_keyed(
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
#[cfg(test)]
fn finish(
    pre: &Prechecked<'_>,
    trial: Option<&TrialOutput>,
    registry: &Registry,
    from: &SocketAddr,
) -> Result<Verified, RejectReason> {
    let [keyed] = derive_keys(&[(pre, trial, from)], registry, KdfPath::Pairs)
        .try_into()
        .map_err(|_| RejectReason::UnknownIndex)?;
    open_keyed(pre, &keyed?, registry, from)
}

/// A batch of REBINDs after checks 1–4, which need no registry ([`trial_batch`]). Checks
/// 5–7 and the commits follow in [`Pending::finish`].
pub struct Pending<'p, 'a> {
    packets: &'p [(&'a [u8], &'a SocketAddr)],
    /// One per packet; a placeholder for those in `passed`.
    outcomes: Vec<Outcome>,
    /// The packets that passed checks 1–3 (position in `packets`), in order.
    passed: Vec<(usize, Prechecked<'a>)>,
    /// Check 4 for each of `passed`.
    trials: Vec<Option<TrialOutput>>,
    /// `passed` grouped by epoch: the epoch number and positions in `passed`, per epoch.
    groups: Vec<(u32, Vec<usize>)>,
}

/// Checks 1–4 for a batch of `(datagram, source)`: checks 1–2 per packet, the cookies eight
/// at a time ([`precheck_batch`]), then one engine call per epoch over the survivors.
/// Touches no registry, so the gateway runs it outside its control lock.
pub fn trial_batch<'p, 'a>(
    packets: &'p [(&'a [u8], &'a SocketAddr)],
    now: Ticks,
    window_ticks: u64,
    slots: usize,
    epochs: &[&EpochCrypto],
) -> Pending<'p, 'a> {
    let keys: Vec<&EpochKeys> = epochs.iter().map(|e| &e.keys).collect();
    let mut outcomes = Vec::with_capacity(packets.len());
    let mut passed = Vec::with_capacity(packets.len());
    for (i, result) in precheck_batch(packets, now, window_ticks, slots, &keys)
        .into_iter()
        .enumerate()
    {
        match result {
            Ok(p) => {
                passed.push((i, p));
                outcomes.push(Outcome::rejected(RejectReason::Trial));
            }
            Err(reason) => outcomes.push(Outcome::Rejected {
                reason,
                //= PROTOCOL.md §6: a cookie request is a REBIND of the right length whose
                //# bytes after the type are all zero; count it apart from real rejects.
                cookie_request: RebindView::new_checked(packets[i].0, slots)
                    .is_ok_and(|v| v.is_cookie_request()),
                unrecognized: reason.draws_unrecognized(),
            }),
        }
    }
    let mut trials = vec![None; passed.len()];
    let mut groups = Vec::new();
    if !passed.is_empty() {
        for (e, crypto) in epochs.iter().enumerate() {
            let picked: Vec<usize> = (0..passed.len())
                .filter(|&j| passed[j].1.epoch == e)
                .collect();
            if picked.is_empty() {
                continue;
            }
            let inputs: Vec<_> = picked.iter().map(|&j| passed[j].1.trial_input()).collect();
            if picked.len() == passed.len() {
                // One epoch in the batch (the usual case): the engine writes in place, no
                // copy of the 260-byte outputs.
                crypto.trial.trial_batch(&inputs, &mut trials);
            } else {
                let mut out = vec![None; inputs.len()];
                crypto.trial.trial_batch(&inputs, &mut out);
                for (&j, o) in picked.iter().zip(out) {
                    trials[j] = o;
                }
            }
            groups.push((crypto.keys.epoch(), picked));
        }
    }
    Pending {
        packets,
        outcomes,
        passed,
        trials,
        groups,
    }
}

impl Pending<'_, '_> {
    /// The outcomes, if checks 1–3 already decided every REBIND (no registry needed).
    pub fn decided(self) -> Result<Vec<Outcome>, Self> {
        if self.passed.is_empty() {
            Ok(self.outcomes)
        } else {
            Err(self)
        }
    }

    /// Checks 5–7 and the commits: check 5, the early freshness rule and the KDF per epoch
    /// ([`crypto::process_kdf_path`]: 16 keys per AVX-512 pass or 2 per SHA-NI step), then
    /// checks 6–7 packet by packet, each accepted REBIND committed through `registries`
    /// before the next is checked. One outcome per packet, in order.
    pub fn finish(self, registries: &mut impl Registries) -> Vec<Outcome> {
        self.finish_with(registries, crypto::process_kdf_path())
    }

    /// [`Self::finish`] with the KDF path given (benchmarks and tests compare them; the
    /// gateway uses the process's, [`crypto::process_kdf_path`]).
    pub fn finish_with(mut self, registries: &mut impl Registries, kdf: KdfPath) -> Vec<Outcome> {
        let mut keyed: Vec<Option<Result<Keyed, RejectReason>>> =
            (0..self.passed.len()).map(|_| None).collect();
        // Epoch number of each of `passed`.
        let mut epoch_of = vec![0u32; self.passed.len()];
        for (epoch, picked) in &self.groups {
            for &j in picked {
                epoch_of[j] = *epoch;
            }
            let Some(registry) = registries.registry(*epoch) else {
                continue;
            };
            let items: Vec<BatchItem<'_, '_>> = picked
                .iter()
                .map(|&j| {
                    let (i, pre) = &self.passed[j];
                    (pre, self.trials[j].as_ref(), self.packets[*i].1)
                })
                .collect();
            for (&j, k) in picked.iter().zip(derive_keys(&items, registry, kdf)) {
                keyed[j] = Some(k);
            }
        }
        for (j, (i, pre)) in self.passed.iter().enumerate() {
            let from = self.packets[*i].1;
            let epoch = epoch_of[j];
            let (Some(registry), Some(k)) = (registries.registry(epoch), keyed[j].take()) else {
                self.outcomes[*i] = Outcome::rejected(RejectReason::Epoch);
                continue;
            };
            let verified = k.and_then(|k| open_keyed(pre, &k, registry, from));
            self.outcomes[*i] = match verified {
                Err(r) => Outcome::rejected(r),
                Ok(rebind) if rebind.freshness == Freshness::Accept => {
                    let host = registry.get(rebind.index).map_or(0, |c| c.host);
                    let old = registries.commit(epoch, rebind.index, rebind.t, *from);
                    Outcome::Accepted {
                        epoch,
                        rebind,
                        host,
                        old,
                    }
                }
                Ok(rebind) => Outcome::Duplicate { epoch, rebind },
            };
        }
        self.outcomes
    }
}

/// Every check of §6 for a batch of `(datagram, source)`: [`trial_batch`] then
/// [`Pending::finish`]. One outcome per packet, in order; accepted REBINDs are committed.
pub fn verify_batch(
    packets: &[(&[u8], &SocketAddr)],
    now: Ticks,
    window_ticks: u64,
    slots: usize,
    epochs: &[&EpochCrypto],
    registries: &mut impl Registries,
) -> Vec<Outcome> {
    trial_batch(packets, now, window_ticks, slots, epochs).finish(registries)
}

/// [`verify_batch`] with the KDF path given ([`Pending::finish_with`]).
pub fn verify_batch_with(
    packets: &[(&[u8], &SocketAddr)],
    now: Ticks,
    window_ticks: u64,
    slots: usize,
    epochs: &[&EpochCrypto],
    registries: &mut impl Registries,
    kdf: KdfPath,
) -> Vec<Outcome> {
    trial_batch(packets, now, window_ticks, slots, epochs).finish_with(registries, kdf)
}

/// [`verify_batch`] for one REBIND.
pub fn verify_one(
    datagram: &[u8],
    from: &SocketAddr,
    now: Ticks,
    window_ticks: u64,
    slots: usize,
    epochs: &[&EpochCrypto],
    registries: &mut impl Registries,
) -> Outcome {
    let [outcome] = verify_batch(
        &[(datagram, from)],
        now,
        window_ticks,
        slots,
        epochs,
        registries,
    )
    .try_into()
    .expect("one outcome per packet");
    outcome
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
        let batch: Vec<Result<Verified, RejectReason>> =
            derive_keys(&items, &w.registry, KdfPath::Pairs)
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

    /// Batches of 1..=40 REBINDs (16-lane groups, a remainder in pairs, an odd one) with
    /// rejects mixed in: every KDF path gives the outcome of the one-by-one path.
    #[test]
    fn kdf_paths_agree_with_one_by_one() {
        let w = world(40);
        let froms: Vec<SocketAddr> = (0..40).map(addr).collect();
        let datagrams: Vec<Vec<u8>> = (0..40)
            .map(|j| {
                let mut d = rebind(&w, j as u32, &froms[j], Ticks(NOW.0 - j as u64));
                if j % 7 == 3 {
                    let last = d.len() - 1;
                    d[last] ^= 1; // check 6
                }
                d
            })
            .collect();
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
        trials[11] = None; // check 4
        let alone: Vec<Result<Verified, RejectReason>> = (0..40)
            .map(|j| finish(&pres[j], trials[j].as_ref(), &w.registry, &froms[j]))
            .collect();
        for n in [1, 2, 7, 8, 9, 16, 17, 23, 24, 31, 40] {
            let items: Vec<BatchItem<'_, '_>> = (0..n)
                .map(|j| (&pres[j], trials[j].as_ref(), &froms[j]))
                .collect();
            for kdf in [KdfPath::Pairs, KdfPath::Lanes16, KdfPath::best()] {
                let got: Vec<Result<Verified, RejectReason>> =
                    derive_keys(&items, &w.registry, kdf)
                        .into_iter()
                        .zip(&items)
                        .map(|(k, (p, _, f))| k.and_then(|k| open_keyed(p, &k, &w.registry, f)))
                        .collect();
                assert_eq!(got[..], alone[..n], "{n} items, {kdf:?}");
            }
        }
        assert_eq!(alone[3], Err(RejectReason::Aead));
        assert_eq!(alone[11], Err(RejectReason::Trial));
        assert!(alone[0].is_ok() && alone[39].is_ok());
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
        let keyed: Vec<Keyed> = derive_keys(&items, &w.registry, KdfPath::best())
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
    fn verify_batch_commits_between_checks_and_reports_every_packet() {
        let mut w = world(2);
        let t = Ticks(NOW.0 - 10);
        let (a, b) = (addr(1), addr(2));
        let datagrams = [rebind(&w, 1, &a, t), rebind(&w, 1, &b, t)];
        let mut request = vec![0u8; datagrams[0].len()];
        request[0] = b'R';
        let packets: Vec<(&[u8], &SocketAddr)> = vec![
            (&datagrams[0], &a),
            (&datagrams[1], &b),
            (&datagrams[0], &a),
            (&request, &a),
            (&datagrams[0][..10], &a),
        ];
        let crypto = EpochCrypto::new(
            EpochKeys::derive(&MasterSecret::from_bytes([3; 32]), 1, S).unwrap(),
            TrialKeys::new(Backend::best(), w.keys.slot_key_pairs()).unwrap(),
        );
        let out = verify_batch(&packets, NOW, WINDOW, S, &[&crypto], &mut w.registry);
        let Outcome::Accepted {
            epoch: 1,
            rebind: first,
            host: 0,
            old: None,
        } = out[0]
        else {
            panic!("{:?}", out[0]);
        };
        assert_eq!((first.index, first.conn_id), (1, 101));
        assert_eq!(out[1].into_result(), Err(RejectReason::Replay));
        assert!(!out[1].draws_unrecognized());
        match out[2] {
            Outcome::Duplicate { rebind, .. } => assert_eq!(rebind.ack, first.ack),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            out[3],
            Outcome::Rejected {
                cookie_request: true,
                unrecognized: true,
                ..
            }
        ));
        assert_eq!(
            out[4],
            Outcome::Rejected {
                reason: RejectReason::Length,
                cookie_request: false,
                unrecognized: false
            }
        );
        assert_eq!(w.registry.get(1).unwrap().tuple(), Some(a));
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
