//! Gateway-side REBIND verification, every check of PROTOCOL.md §6 in order, cheap ones first.
//!
//! Verification is split around the trial-decryption engine so the gateway can batch it:
//! [`precheck`] runs checks 1–3 per packet, the engine runs check 4 over the whole batch, and
//! [`finish`] runs checks 5–7. [`verify_one`] chains them for a single packet.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use crate::crypto;
use crate::engine::gcm::{SessionGcm, SessionNonce};
use crate::engine::{TrialInput, TrialKeys, TrialOutput};
use crate::keys::EpochKeys;
use crate::registry::{Freshness, Registry};
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
    let view = RebindView::new_checked(datagram, slots).map_err(|_| RejectReason::Length)?;
    let epoch = epochs
        .iter()
        .position(|e| e.epoch_byte() == view.epoch_byte())
        .ok_or(RejectReason::Epoch)?;
    let t = view.t();
    if t.abs_diff(now) > window_ticks {
        return Err(RejectReason::Stale);
    }
    if !epochs[epoch].cookie_matches(from, t, &view.cookie()) {
        return Err(RejectReason::Cookie);
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

/// Checks 5–7 for a prechecked REBIND and its trial result. Changes nothing: on `Accept` the
/// caller commits with [`Registry::commit_rebind`] and moves the tuple.
pub fn finish(
    pre: &Prechecked<'_>,
    trial: Option<&TrialOutput>,
    registry: &Registry,
    from: &SocketAddr,
) -> Result<Verified, RejectReason> {
    let trial = trial.ok_or(RejectReason::Trial)?;
    let conn = registry
        .get(trial.index)
        .ok_or(RejectReason::UnknownIndex)?;
    let t = pre.view.t();
    // The freshness rule is cheap: run it before the KDF so a replay flood costs no HKDF.
    // It reveals only what the trial bits already do (§8).
    let freshness = registry
        .freshness(trial.index, t, from)
        .ok_or(RejectReason::UnknownIndex)?;
    if freshness == Freshness::Replay {
        return Err(RejectReason::Replay);
    }
    let key = conn.kdf.session_key(&trial.nonces[..registry.slots()], t);
    let session = SessionGcm::new(&key);
    let sealed = pre.view.sealed().try_into().map_err(|_| RejectReason::Aead)?;
    let plain = session
        .open8(SessionNonce::Rebind, pre.view.head(), sealed)
        .map_err(|_| RejectReason::Aead)?;
    if !crypto::ct_eq(&plain, &conn.conn_id.to_be_bytes()) {
        return Err(RejectReason::ConnId);
    }
    Ok(Verified {
        index: trial.index,
        conn_id: conn.conn_id,
        t,
        freshness,
        ack: build_rebind_ack(&session, t, conn.conn_id),
    })
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
