//! The gateway's sans-IO core: what a worker does with each datagram (PROTOCOL.md §4–6 and
//! the host link). It takes `now`, the source tuple and the bytes, and writes replies into a
//! [`TxQueue`]; it never touches a socket or the clock.
//!
//! State is split by how often it changes:
//! - the fast-path tables ([`TupleTable`](crate::table::TupleTable),
//!   [`ConnTable`](crate::table::ConnTable)) are read lock-free by every worker;
//! - the epoch keys are read through a per-worker `Arc` snapshot, refreshed when a generation
//!   counter moves;
//! - the registries and the tables' writers sit in [`Control`] behind one mutex, taken only on
//!   the slow path (a batch of REBINDs, a registration, a close).
//!
//! Files: this one holds [`WorkerCore`] and the batch dispatch; `shared.rs` what the workers
//! share ([`Shared`], [`Control`], [`Live`], [`Epochs`]); `fastpath.rs` client and host DATA
//! and UNRECOGNIZED; `rebind.rs` applies the outcomes of [`crate::verify`]; `hostlink.rs`
//! HANDSHAKE forwarding, control messages, host restarts and idle expiry.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::crypto::Gcm;

use super::metrics::{C, WorkerMetrics};
use super::ratelimit::{Limiter, Rate};
use crate::hostlink::{HandshakeMac, LinkKey};
use crate::io::batch::{Rx, TxQueue, Via};
use crate::time::{TICKS_PER_SECOND, Ticks};
pub use crate::verify::EpochCrypto;
use crate::wire::MsgType;

mod commit;
mod delivery;
mod fastpath;
mod hostlink;
mod rebind;
mod remote;
mod shared;

pub use commit::{
    COMMIT_TIMEOUT, CommitMode, CommitRefusal, CommitRequest, CommitResult, MAX_PENDING_COMMITS,
    RegisterRequest, RegisterResult,
};
pub use delivery::KeyDelivery;
use hostlink::RecentHandshakes;
pub use remote::{RemoteApplied, RemoteChange};
pub use shared::{Control, Epochs, Live, RETRIES_AT_ONCE, Rotation, RotationRegistration, Shared};

/// Settings the core needs.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub slots: usize,
    pub window: Duration,
    pub max_connections: usize,
    pub workers: usize,
    /// UNRECOGNIZED replies, per source prefix and for the whole gateway.
    pub unrecognized_prefix: Rate,
    pub unrecognized_global: Rate,
    /// HANDSHAKE forwarding, per source prefix and for the whole gateway.
    pub handshake_prefix: Rate,
    pub handshake_global: Rate,
    /// Prefix buckets per limiter per worker.
    pub limiter_slots: usize,
    /// A connection with no datagram from its client (DATA or REBIND) for this long is
    /// released and its host told (EXPIRED). Zero disables expiry.
    pub idle_timeout: Duration,
    /// Tuples that recently sent a HANDSHAKE, remembered per worker (a power of two).
    pub reply_slots: usize,
    /// Whether an accepted REBIND is final at once or after a shared store agrees.
    pub commit: CommitMode,
}

impl CoreConfig {
    pub fn new(slots: usize) -> Self {
        CoreConfig {
            slots,
            window: Duration::from_secs(30),
            max_connections: (1usize << slots.min(20)).max(16),
            workers: 1,
            unrecognized_prefix: Rate::new(2_000.0, 4_000.0),
            unrecognized_global: Rate::new(200_000.0, 100_000.0),
            handshake_prefix: Rate::new(200.0, 400.0),
            handshake_global: Rate::new(20_000.0, 20_000.0),
            limiter_slots: 4096,
            idle_timeout: Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS),
            reply_slots: 16_384,
            commit: CommitMode::Local,
        }
    }
}

/// Longer than the reference host's 600 s, so a host usually closes first.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 900;

/// One host on the link: its address, link key and the key that MACs TO_HOST_HANDSHAKE.
pub struct HostPeer {
    pub addr: SocketAddr,
    pub key: Gcm,
    pub mac: HandshakeMac,
}

impl HostPeer {
    pub fn new(addr: SocketAddr, key: &LinkKey) -> HostPeer {
        HostPeer {
            addr,
            key: key.cipher(),
            mac: key.handshake_mac(),
        }
    }
}

/// The four limits the workers enforce, for the whole gateway (each worker takes its share).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    pub unrecognized_prefix: Rate,
    pub unrecognized_global: Rate,
    pub handshake_prefix: Rate,
    pub handshake_global: Rate,
}

impl CoreConfig {
    pub fn rates(&self) -> Rates {
        Rates {
            unrecognized_prefix: self.unrecognized_prefix,
            unrecognized_global: self.unrecognized_global,
            handshake_prefix: self.handshake_prefix,
            handshake_global: self.handshake_global,
        }
    }
}

/// One worker's handler.
pub struct WorkerCore {
    id: u8,
    shared: Arc<Shared>,
    metrics: Arc<WorkerMetrics>,
    epochs: Arc<Epochs>,
    epochs_generation: u64,
    live: Arc<Live>,
    live_generation: u64,
    unrecognized_limit: Limiter,
    handshake_limit: Limiter,
    /// `Via::Client` index of the socket for IPv4 and for IPv6 clients.
    client_via: [Option<u8>; 2],
    rebinds: Vec<usize>,
    /// The gateway time issued for the current batch, once needed.
    issued: Option<Ticks>,
    /// The batch's wall clock in whole seconds, for [`Shared::touch`].
    secs: u32,
    /// Tuples this worker forwarded a HANDSHAKE from: only they may get a TO_CLIENT_REPLY.
    /// The host answers the worker that forwarded the HANDSHAKE, so per worker suffices.
    recent_handshakes: RecentHandshakes,
    /// Accepted REBINDs waiting for the shared store ([`CommitMode::Deferred`]).
    commits: commit::Commits,
}

/// The coarse clock of [`Shared::touch`]: whole seconds (wraps in 2106; compared wrapping).
fn secs(t: Ticks) -> u32 {
    (t.0 / TICKS_PER_SECOND) as u32
}

impl WorkerCore {
    /// `client_families[i]` says whether `Via::Client(i)` is an IPv6 socket.
    pub fn new(id: u8, shared: Arc<Shared>, client_is_v6: &[bool]) -> WorkerCore {
        let cfg = &shared.cfg;
        let n = cfg.workers.max(1);
        let mut client_via = [None, None];
        for (i, v6) in client_is_v6.iter().enumerate() {
            let slot = &mut client_via[usize::from(*v6)];
            if slot.is_none() {
                *slot = Some(i as u8);
            }
        }
        WorkerCore {
            id,
            metrics: shared.metrics[usize::from(id) % shared.metrics.len()].clone(),
            epochs: shared.epochs(),
            epochs_generation: shared.epochs_generation.load(Ordering::Acquire),
            live_generation: shared.live_generation.load(Ordering::Acquire),
            live: shared.live(),
            unrecognized_limit: Limiter::new(
                cfg.unrecognized_prefix.share(n),
                cfg.unrecognized_global.share(n),
                cfg.limiter_slots,
            ),
            handshake_limit: Limiter::new(
                cfg.handshake_prefix.share(n),
                cfg.handshake_global.share(n),
                cfg.limiter_slots,
            ),
            client_via,
            rebinds: Vec::with_capacity(64),
            issued: None,
            secs: 0,
            recent_handshakes: RecentHandshakes::new(cfg.reply_slots),
            commits: commit::Commits::default(),
            shared,
        }
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Takes the hosts and rate limits of a reload (bucket levels carry over).
    #[cold]
    fn take_live(&mut self, generation: u64) {
        self.live = self.shared.live();
        self.live_generation = generation;
        let n = self.shared.cfg.workers.max(1);
        let r = self.live.rates;
        self.unrecognized_limit.set_rates(
            r.unrecognized_prefix.share(n),
            r.unrecognized_global.share(n),
        );
        self.handshake_limit
            .set_rates(r.handshake_prefix.share(n), r.handshake_global.share(n));
    }

    pub fn metrics(&self) -> &WorkerMetrics {
        &self.metrics
    }

    /// Handles one receive batch. `wall` is the wall clock, not a gateway time: the gateway
    /// time `t` is issued from it (see [`Shared::issue_ticks`]) at most once per batch, and
    /// only if the batch needs it (an UNRECOGNIZED or a REBIND), so the fast path never
    /// writes the shared clock.
    pub fn handle_batch(&mut self, wall: Ticks, rx: &[Rx<'_>], tx: &mut TxQueue) {
        if rx.is_empty() {
            return;
        }
        self.issued = None;
        self.secs = secs(wall);
        self.metrics.inc(C::batch(rx.len()));
        self.metrics.add(C::BatchDatagrams, rx.len() as u64);
        let generation = self.shared.epochs_generation.load(Ordering::Acquire);
        if generation != self.epochs_generation {
            self.epochs = self.shared.epochs();
            self.epochs_generation = generation;
        }
        let generation = self.shared.live_generation.load(Ordering::Acquire);
        if generation != self.live_generation {
            self.take_live(generation);
        }
        self.rebinds.clear();
        for (i, d) in rx.iter().enumerate() {
            match d.via {
                Via::Client(_) => {
                    if d.data.first() == Some(&(MsgType::Rebind as u8)) {
                        self.metrics.inc(C::RxRebind);
                        self.metrics.add(C::RxRebindBytes, d.data.len() as u64);
                        self.rebinds.push(i);
                    } else {
                        self.client_datagram(wall, d, tx);
                    }
                }
                Via::Host => self.host_datagram(wall, d, tx),
            }
        }
        if !self.rebinds.is_empty() {
            self.verify_rebinds(wall, rx, tx);
        }
        if tx.overflowed > 0 {
            self.metrics.add(C::DropTxFull, tx.overflowed);
            tx.overflowed = 0;
        }
    }

    /// The batch's gateway time, issued on first use.
    fn issued(&mut self, wall: Ticks) -> Ticks {
        *self
            .issued
            .get_or_insert_with(|| self.shared.issue_ticks(wall))
    }
}

#[cfg(test)]
mod tests;
