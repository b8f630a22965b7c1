//! Key epoch rotation: what starts one (the schedule, `rebindgw rotate`), how the admin
//! endpoint authenticates a rotation request, and the [`Rotator`] that derives the next
//! epoch's keys and hands them to the core.
//!
//! # Authenticating `POST /rotate`
//!
//! The admin endpoint serves its read-only pages to whoever reaches it, but a rotation needs
//! the admin key: 32 random bytes kept as 64 hex digits in `admin.key` (mode 0600, in the
//! state directory unless `admin_key` says otherwise, created on the first start like the
//! master key). The request carries
//!
//! ```text
//! X-Rebindgw-Auth: ts=<unix seconds>;nonce=<32 hex digits>;force=<0|1>;mac=<64 hex digits>
//! mac = HMAC-SHA256(admin key, "rebindgw-admin/v1 rotate\n" || ts || "\n" || nonce || "\n" || force)
//! ```
//!
//! The gateway accepts it when the MAC matches (compared in constant time), `ts` is within
//! [`AUTH_SKEW`] of its clock, and the nonce was not accepted before (nonces are remembered
//! for twice the skew, and a request stamped before the gateway's start is refused, so a
//! captured request cannot be replayed, not even across a restart). Anything else is a 401
//! with no detail, counted in `rebindgw_admin_auth_failures_total`. The key never crosses
//! the network and never appears in logs.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{KeyInit, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::core::{EpochCrypto, Rotation, Shared};
use crate::engine::{self, TrialKeys};
use crate::keys::{EpochKeys, MasterSecret};
use crate::secrets::{self, SecretFileError};
use crate::time::{TICKS_PER_SECOND, Ticks};

/// How far a request's timestamp may be from the gateway's clock.
pub const AUTH_SKEW: Duration = Duration::from_secs(30);
/// Nonces remembered at most (older ones go first; they are past the skew by then).
const MAX_NONCES: usize = 4096;
/// The header carrying a request's authentication.
pub const AUTH_HEADER: &str = "x-rebindgw-auth";
const MAC_LABEL: &[u8] = b"rebindgw-admin/v1 rotate\n";

/// The admin key. Zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct AdminKey([u8; 32]);

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKey(..)")
    }
}

impl AdminKey {
    pub fn from_bytes(b: [u8; 32]) -> AdminKey {
        AdminKey(b)
    }

    /// Writes a fresh key (mode 0600, never over an existing file).
    pub fn generate(path: &Path) -> Result<AdminKey, SecretFileError> {
        let k = AdminKey(crate::crypto::random_array());
        let text = Zeroizing::new(format!("{}\n", hex::encode(k.0)));
        secrets::write_private(path, text.as_bytes())?;
        Ok(k)
    }

    /// Loads a key file (which must be private: mode 0600, the caller's own).
    pub fn load(path: &Path) -> Result<AdminKey, SecretFileError> {
        let file = secrets::open_private(path)?;
        let mut text = Zeroizing::new(String::new());
        file.take(256)
            .read_to_string(&mut text)
            .map_err(|e| SecretFileError::Io {
                path: path.to_path_buf(),
                source: e,
            })?;
        let mut out = [0u8; 32];
        let ok = hex::decode_to_slice(text.trim(), &mut out).is_ok();
        let key = AdminKey(out);
        out.zeroize();
        if !ok {
            return Err(SecretFileError::Malformed {
                path: path.to_path_buf(),
                expected: "64 hex digits (a 32-byte admin key)",
                found: format!("{} characters", text.trim().len()),
            });
        }
        Ok(key)
    }

    /// Loads `path`, creating it first if it does not exist.
    pub fn load_or_generate(path: &Path) -> Result<AdminKey, SecretFileError> {
        match AdminKey::load(path) {
            Err(e) if e.is_not_found() => AdminKey::generate(path),
            r => r,
        }
    }

    fn mac(&self) -> hmac::Hmac<Sha256> {
        <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key")
    }
}

/// One rotation request's authentication (the `X-Rebindgw-Auth` header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RotateAuth {
    pub ts: u64,
    pub nonce: [u8; 16],
    pub force: bool,
    pub mac: [u8; 32],
}

fn mac_input(ts: u64, nonce: &[u8; 16], force: bool) -> Vec<u8> {
    let mut m = MAC_LABEL.to_vec();
    m.extend_from_slice(format!("{ts}\n{}\n{}", hex::encode(nonce), u8::from(force)).as_bytes());
    m
}

impl RotateAuth {
    /// Signs a request at `ts` (unix seconds) with a fresh nonce.
    pub fn sign(key: &AdminKey, ts: u64, force: bool) -> RotateAuth {
        let nonce = crate::crypto::random_array();
        let mut m = key.mac();
        m.update(&mac_input(ts, &nonce, force));
        RotateAuth {
            ts,
            nonce,
            force,
            mac: m.finalize().into_bytes().into(),
        }
    }

    /// The header value.
    pub fn header(&self) -> String {
        format!(
            "ts={};nonce={};force={};mac={}",
            self.ts,
            hex::encode(self.nonce),
            u8::from(self.force),
            hex::encode(self.mac)
        )
    }

    /// Parses a header value; `None` if it is malformed.
    pub fn parse(value: &str) -> Option<RotateAuth> {
        let (mut ts, mut nonce, mut force, mut mac) = (None, None, None, None);
        for part in value.trim().split(';') {
            let (k, v) = part.trim().split_once('=')?;
            match k {
                "ts" => ts = Some(v.parse().ok()?),
                "nonce" => {
                    let mut n = [0u8; 16];
                    hex::decode_to_slice(v, &mut n).ok()?;
                    nonce = Some(n);
                }
                "force" => {
                    force = Some(match v {
                        "0" => false,
                        "1" => true,
                        _ => return None,
                    })
                }
                "mac" => {
                    let mut m = [0u8; 32];
                    hex::decode_to_slice(v, &mut m).ok()?;
                    mac = Some(m);
                }
                _ => return None,
            }
        }
        Some(RotateAuth {
            ts: ts?,
            nonce: nonce?,
            force: force?,
            mac: mac?,
        })
    }
}

/// Why a request was refused (never told to the requester in more detail than 401).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    Malformed,
    BadMac,
    Stale,
    Replayed,
}

/// The gateway's side: the key and the nonces already accepted.
pub struct AdminAuth {
    key: AdminKey,
    seen: Mutex<VecDeque<(u64, [u8; 16])>>,
    /// Requests stamped before this (unix seconds) are refused: the nonces this run has not
    /// seen include those an earlier run accepted, so a request captured before a restart
    /// cannot be replayed after it.
    not_before: u64,
    pub failures: AtomicU64,
}

impl AdminAuth {
    /// `started`: this run's start (unix seconds).
    pub fn new(key: AdminKey, started: u64) -> AdminAuth {
        AdminAuth {
            key,
            seen: Mutex::new(VecDeque::new()),
            not_before: started,
            failures: AtomicU64::new(0),
        }
    }

    /// Checks a request's header value at `now_secs` (unix seconds); returns its `force`.
    pub fn check(&self, header: Option<&str>, now_secs: u64) -> Result<bool, AuthError> {
        let r = self.check_inner(header, now_secs);
        if r.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn check_inner(&self, header: Option<&str>, now_secs: u64) -> Result<bool, AuthError> {
        let auth = header
            .and_then(RotateAuth::parse)
            .ok_or(AuthError::Malformed)?;
        let mut m = self.key.mac();
        m.update(&mac_input(auth.ts, &auth.nonce, auth.force));
        // Constant time.
        m.verify_slice(&auth.mac).map_err(|_| AuthError::BadMac)?;
        if auth.ts.abs_diff(now_secs) > AUTH_SKEW.as_secs() || auth.ts < self.not_before {
            return Err(AuthError::Stale);
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let horizon = now_secs.saturating_sub(2 * AUTH_SKEW.as_secs());
        while seen
            .front()
            .is_some_and(|(ts, _)| *ts < horizon || seen.len() >= MAX_NONCES)
        {
            seen.pop_front();
        }
        if seen.iter().any(|(_, n)| *n == auth.nonce) {
            return Err(AuthError::Replayed);
        }
        seen.push_back((auth.ts, auth.nonce));
        Ok(auth.force)
    }
}

/// Cluster mode: where a rotation is decided (one etcd transaction on the cluster's epoch
/// record; docs/cluster.md "Key rotation"). Every gateway's watch then puts it in force.
pub trait ClusterEpoch: Send + Sync {
    /// Proposes the rotation of epoch `from` with a grace period of `grace`; blocks until
    /// the store answered (called from the admin and housekeeping threads, never from the
    /// packet path).
    fn propose(&self, from: u32, force: bool, grace: Duration) -> Proposed;
}

/// The store's answer to [`ClusterEpoch::propose`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proposed {
    /// This gateway's transaction won: `epoch` is the cluster's current epoch.
    Rotated(u32),
    /// Another gateway rotated first: the cluster is at `current` already.
    Lost {
        current: u32,
    },
    InGrace {
        previous: u32,
        left_secs: u64,
    },
    Unavailable(String),
}

/// Derives the next epochs' keys and puts them in force.
pub struct Rotator {
    master: MasterSecret,
    engine: engine::Backend,
    slots: usize,
    /// How long the previous epoch stays accepted.
    pub grace: Duration,
    /// Rotate this long after the last rotation; zero: only on command.
    pub every: Duration,
    /// When the current epoch started (ticks); zero if unknown (never rotated).
    started: AtomicU64,
    lock: Mutex<()>,
    /// Cluster mode: rotations are decided there.
    cluster: std::sync::OnceLock<Box<dyn ClusterEpoch>>,
}

/// Why a rotation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(
        "epoch {previous} is still in its grace period ({left_secs} s left); its clients would \
         be dropped: wait, or force it"
    )]
    InGrace { previous: u32, left_secs: u64 },
    #[error("cannot derive the next epoch's keys: {0}")]
    Keys(String),
    #[error(
        "another gateway of the cluster rotated epoch {from} first: epoch {current} is the \
         cluster's current epoch (this request changed nothing)"
    )]
    Lost { from: u32, current: u32 },
    #[error("the cluster's store did not decide the rotation (nothing changed): {0}")]
    Unavailable(String),
}

impl Rotator {
    pub fn new(
        master: MasterSecret,
        engine: engine::Backend,
        slots: usize,
        grace: Duration,
        every: Duration,
        started: Ticks,
    ) -> Rotator {
        Rotator {
            master,
            engine,
            slots,
            grace,
            every,
            started: AtomicU64::new(started.0),
            lock: Mutex::new(()),
            cluster: std::sync::OnceLock::new(),
        }
    }

    /// Cluster mode: rotations are proposed to `cluster` from now on.
    pub fn set_cluster(&self, cluster: Box<dyn ClusterEpoch>) {
        let _ = self.cluster.set(cluster);
    }

    /// Cluster mode: a rotation (by any gateway) started the current epoch at `at`; the
    /// schedule counts from it.
    pub fn set_started(&self, at: Ticks) {
        self.started.store(at.0.max(1), Ordering::Release);
    }

    /// Cluster mode: proposes the rotation, then waits until this gateway's watch put it in
    /// force and the store committed the registrations of the connections it owns.
    fn rotate_clustered(
        &self,
        cluster: &dyn ClusterEpoch,
        shared: &Shared,
        force: bool,
    ) -> Result<Rotation, RotateError> {
        let from = shared.epochs().current.keys.epoch();
        let epoch = match cluster.propose(from, force, self.grace) {
            Proposed::Rotated(epoch) => epoch,
            Proposed::Lost { current } => return Err(RotateError::Lost { from, current }),
            Proposed::InGrace {
                previous,
                left_secs,
            } => {
                return Err(RotateError::InGrace {
                    previous,
                    left_secs,
                });
            }
            Proposed::Unavailable(e) => return Err(RotateError::Unavailable(e)),
        };
        // The epoch record's commit is the rotation (durable, cluster-wide); the answer waits
        // for this gateway's own switch, not for its registrations in the new epoch: those
        // take one etcd commit per batch (about 10 s for 22,000 connections on the test bed)
        // and each connection's keys follow its own commit.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while (shared.epochs().current.keys.epoch() != epoch
            || shared.last_rotation().is_none_or(|r| r.epoch != epoch))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        let r = shared
            .last_rotation()
            .filter(|r| r.epoch == epoch)
            .unwrap_or(Rotation {
                epoch,
                dropped: None,
                released: 0,
                registered: 0,
            });
        tracing::info!(
            epoch = r.epoch,
            dropped = ?r.dropped,
            registering = r.registered,
            grace_secs = self.grace.as_secs(),
            "key epoch rotated across the cluster"
        );
        Ok(r)
    }

    /// The keys of `epoch`.
    pub fn crypto(&self, epoch: u32) -> Result<EpochCrypto, RotateError> {
        let keys = EpochKeys::derive(&self.master, epoch, self.slots)
            .map_err(|e| RotateError::Keys(e.to_string()))?;
        let trial = TrialKeys::new(self.engine, keys.slot_key_pairs())
            .map_err(|e| RotateError::Keys(e.to_string()))?;
        Ok(EpochCrypto { keys, trial })
    }

    /// Starts the next epoch at `now`. During a grace period it refuses unless `force`
    /// (which ends that grace early).
    pub fn rotate(
        &self,
        shared: &Shared,
        now: Ticks,
        force: bool,
    ) -> Result<Rotation, RotateError> {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        shared.end_grace(now);
        if let Some(c) = self.cluster.get() {
            return self.rotate_clustered(c.as_ref(), shared, force);
        }
        if let Some(until) = shared.grace_until()
            && !force
        {
            return Err(RotateError::InGrace {
                previous: shared.epochs().current.keys.epoch().wrapping_sub(1),
                left_secs: until.0.saturating_sub(now.0).div_ceil(TICKS_PER_SECOND),
            });
        }
        let next = shared.epochs().current.keys.epoch().wrapping_add(1);
        let crypto = self.crypto(next)?;
        let r = shared.rotate_with_grace(crypto, now, now.saturating_add(self.grace));
        // Answer once the rotation (and its registrations) is on disk, so "rotated" survives
        // a kill -9; key delivery waits for the same commit.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !shared.rotation_durable() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.started.store(now.0, Ordering::Release);
        tracing::info!(
            epoch = r.epoch,
            dropped = ?r.dropped,
            released = r.released,
            registered = r.registered,
            grace_secs = self.grace.as_secs(),
            "key epoch rotated"
        );
        Ok(r)
    }

    /// Housekeeping: ends a grace period that is over and rotates when the schedule says so.
    pub fn tick(&self, shared: &Shared, now: Ticks) -> Option<Rotation> {
        if let Some(r) = shared.end_grace(now) {
            tracing::info!(
                epoch = ?r.dropped,
                released = r.released,
                "grace period over: previous key epoch wiped"
            );
        }
        if self.every.is_zero() {
            return None;
        }
        let started = self.started.load(Ordering::Acquire);
        if started == 0 {
            // Never rotated: the schedule counts from this start.
            self.started.store(now.0, Ordering::Release);
            return None;
        }
        if now.0 < Ticks(started).saturating_add(self.every).0 {
            return None;
        }
        match self.rotate(shared, now, true) {
            Ok(r) => Some(r),
            Err(e @ RotateError::Lost { .. }) => {
                // Another gateway's timer fired first: one rotation per period.
                tracing::info!(reason = %e, "scheduled key rotation: not needed");
                self.started.store(now.0, Ordering::Release);
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "scheduled key rotation failed");
                // Try again one period later rather than at every tick.
                self.started.store(now.0, Ordering::Release);
                None
            }
        }
    }

    /// When the current epoch started (zero: before this run and unknown).
    pub fn started(&self) -> Ticks {
        Ticks(self.started.load(Ordering::Acquire))
    }
}

/// The admin route for `POST /rotate`: checks the request, rotates, answers (code, body).
pub fn rotate_route(
    shared: Arc<Shared>,
    rotator: Arc<Rotator>,
    auth: Arc<AdminAuth>,
) -> impl Fn(Option<&str>) -> (u16, String) + Send {
    move |header| {
        let now = Ticks::wall_clock();
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let force = match auth.check(header, unix) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(reason = ?e, "refused an unauthenticated rotation request");
                return (401, "unauthorized\n".into());
            }
        };
        match rotator.rotate(&shared, now, force) {
            Ok(r) => {
                let mut body = if rotator.cluster.get().is_some() {
                    format!(
                        "rotated: epoch {}, grace {} s, {} connections of this gateway being \
                         registered for key delivery",
                        r.epoch,
                        rotator.grace.as_secs(),
                        r.registered
                    )
                } else {
                    format!(
                        "rotated: epoch {}, grace {} s, {} connections registered for key delivery",
                        r.epoch,
                        rotator.grace.as_secs(),
                        r.registered
                    )
                };
                if let Some(d) = r.dropped {
                    body.push_str(&format!(
                        ", epoch {d} dropped early ({} connections released)",
                        r.released
                    ));
                }
                body.push('\n');
                (200, body)
            }
            Err(e @ (RotateError::InGrace { .. } | RotateError::Lost { .. })) => {
                (409, format!("{e}\n"))
            }
            Err(e @ RotateError::Unavailable(_)) => (503, format!("{e}\n")),
            Err(e) => (500, format!("{e}\n")),
        }
    }
}

/// `rebindgw rotate`'s arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct RotateArgs {
    /// The gateway's admin address, HOST:PORT (e.g. localhost:7480).
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub admin: String,
    /// The gateway's admin key file (its admin_key; mode 0600).
    #[arg(long, default_value = "/var/lib/rebindgw/admin.key")]
    pub admin_key: std::path::PathBuf,
    /// Rotate even during the previous rotation's grace period: the clients still on the
    /// epoch before are dropped (they handshake again).
    #[arg(long)]
    pub force: bool,
}

/// Runs `rebindgw rotate` and returns what to print.
pub fn run_rotate(args: &RotateArgs) -> anyhow::Result<String> {
    use std::net::ToSocketAddrs;
    let addr = args
        .admin
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("cannot resolve admin address {:?}: {e}", args.admin))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("admin address {:?} resolves to nothing", args.admin))?;
    request_rotation(addr, &args.admin_key, args.force, Duration::from_secs(30))
}

/// `rebindgw rotate`: asks the gateway at `addr` to rotate, signed with the key in
/// `key_path`; returns its answer.
pub fn request_rotation(
    addr: SocketAddr,
    key_path: &Path,
    force: bool,
    timeout: Duration,
) -> anyhow::Result<String> {
    let key = AdminKey::load(key_path)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let auth = RotateAuth::sign(&key, now, force);
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| anyhow::anyhow!("cannot reach the gateway admin at {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(
        format!(
            "POST /rotate HTTP/1.0\r\nHost: {addr}\r\nX-Rebindgw-Auth: {}\r\nContent-Length: 0\r\n\r\n",
            auth.header()
        )
        .as_bytes(),
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response from {addr}"))?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP status line from {addr}"))?;
    match code {
        200 => Ok(body.to_string()),
        401 => anyhow::bail!(
            "the gateway at {addr} refused the request (401): wrong admin key, or this \
             machine's clock is more than {} s off",
            AUTH_SKEW.as_secs()
        ),
        _ => anyhow::bail!("the gateway at {addr} answered {code}: {}", body.trim()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_fresh_request_signed_with_the_key_is_accepted() {
        let key = AdminKey::from_bytes([7; 32]);
        let now = 1_800_000_000;
        let auth = AdminAuth::new(key.clone(), now - 100);
        let good = RotateAuth::sign(&key, now, false);
        assert_eq!(RotateAuth::parse(&good.header()), Some(good.clone()));
        assert_eq!(auth.check(Some(&good.header()), now + 5), Ok(false));
        assert_eq!(
            auth.check(Some(&good.header()), now + 6),
            Err(AuthError::Replayed)
        );
        let forced = RotateAuth::sign(&key, now, true);
        assert_eq!(auth.check(Some(&forced.header()), now), Ok(true));
        // Another key, a changed field, an old or future timestamp, no header, garbage.
        let other = RotateAuth::sign(&AdminKey::from_bytes([8; 32]), now, false);
        assert_eq!(
            auth.check(Some(&other.header()), now),
            Err(AuthError::BadMac)
        );
        let mut flipped = RotateAuth::sign(&key, now, false);
        flipped.force = true;
        assert_eq!(
            auth.check(Some(&flipped.header()), now),
            Err(AuthError::BadMac)
        );
        let old = RotateAuth::sign(&key, now - 31, false);
        assert_eq!(auth.check(Some(&old.header()), now), Err(AuthError::Stale));
        let ahead = RotateAuth::sign(&key, now + 31, false);
        assert_eq!(
            auth.check(Some(&ahead.header()), now),
            Err(AuthError::Stale)
        );
        assert_eq!(auth.check(None, now), Err(AuthError::Malformed));
        for junk in ["", "ts=1", "ts=x;nonce=00;force=0;mac=00", "a=b;c"] {
            assert_eq!(auth.check(Some(junk), now), Err(AuthError::Malformed));
        }
        assert_eq!(auth.failures.load(Ordering::Relaxed), 10);
        // A request from before this run started (captured, then replayed after a restart
        // that forgot the nonces) is refused even within the skew.
        let restarted = AdminAuth::new(key.clone(), now);
        let captured = RotateAuth::sign(&key, now - 1, false);
        assert_eq!(
            restarted.check(Some(&captured.header()), now + 1),
            Err(AuthError::Stale)
        );
    }

    #[test]
    fn schedule_rotates_and_a_command_waits_for_grace_unless_forced() {
        use crate::gateway::core::CoreConfig;
        let s = 8;
        let master = MasterSecret::from_bytes([3; 32]);
        let sec = Duration::from_secs(1);
        let rot = Rotator::new(
            master,
            engine::Backend::Portable,
            s,
            60 * sec,
            3600 * sec,
            Ticks(0),
        );
        let shared = Shared::new(CoreConfig::new(s), rot.crypto(1).unwrap(), vec![], None);
        let t0 = Ticks(1_000 * TICKS_PER_SECOND);
        assert_eq!(rot.tick(&shared, t0), None, "the schedule starts counting");
        assert_eq!(rot.tick(&shared, t0.saturating_add(3599 * sec)), None);
        let t1 = t0.saturating_add(3600 * sec);
        let r = rot.tick(&shared, t1).expect("scheduled rotation");
        assert_eq!((r.epoch, r.dropped), (2, None));
        assert_eq!(rot.started(), t1);
        assert_eq!(shared.grace_until(), Some(t1.saturating_add(60 * sec)));
        let e = rot.rotate(&shared, t1.saturating_add(sec), false);
        assert!(matches!(
            e,
            Err(RotateError::InGrace {
                previous: 1,
                left_secs: 59
            })
        ));
        // Once grace is over, a command needs no force.
        let r = rot
            .rotate(&shared, t1.saturating_add(61 * sec), false)
            .unwrap();
        assert_eq!((r.epoch, r.dropped), (3, None));
        assert_eq!(shared.rotations(), 2);
        // Forced during grace: the previous epoch goes at once.
        let r = rot
            .rotate(&shared, t1.saturating_add(62 * sec), true)
            .unwrap();
        assert_eq!((r.epoch, r.dropped), (4, Some(2)));
    }

    #[test]
    fn admin_key_file_is_private_and_loads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!(
            "rebindgw-admin-key-{}-{}",
            std::process::id(),
            hex::encode(crate::crypto::random_array::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("admin.key");
        let k = AdminKey::load_or_generate(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = AdminKey::load_or_generate(&p).unwrap();
        assert_eq!(k.0, again.0);
        assert_eq!(format!("{k:?}"), "AdminKey(..)");
        std::fs::remove_dir_all(&dir).ok();
    }
}
