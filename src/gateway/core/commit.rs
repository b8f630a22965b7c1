//! Deferred commits: a REBIND that passes checks 1–7 against this gateway's copy of the
//! registry becomes final only when a shared store (etcd in cluster mode) accepts it, so two
//! gateways that share connections never both accept one REBIND (docs/cluster.md).
//!
//! In [`CommitMode::Deferred`] the core does not change its registry when verify accepts: it
//! queues a [`CommitRequest`] (polled with [`WorkerCore::poll_commit`]) and parks the
//! REBIND_ACK. The store's answer comes back through [`WorkerCore::handle_commit`]:
//! `Committed` applies the commit to the registry and tables and sends REBOUND and the ACK;
//! `Duplicate` (the store already holds this `t` from this tuple) sends the ACK again;
//! `Refused` sends nothing (the client retries). Requests unanswered after
//! [`COMMIT_TIMEOUT`] are dropped at a tick, so nothing waits forever. In
//! [`CommitMode::Local`] (the single-node default) verify commits at once, as before.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::gateway::metrics::C;
use crate::io::batch::{TxQueue, Via};
use crate::rebind::RebindSecret;
use crate::registry::{HostId, Registry};
use crate::time::Ticks;
use crate::verify::{Registries, Verified};

use super::WorkerCore;
use super::shared::Control;

/// Whether accepted REBINDs are final at once or after a shared store agrees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CommitMode {
    /// One gateway owns its registry: verify commits (the single-node gateway).
    #[default]
    Local,
    /// The commit is proposed to a shared store; see the module docs.
    Deferred,
}

/// A commit the store must decide: `L = t`, tuple = `to` for connection `index` of `epoch`,
/// if `L < t` there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitRequest {
    /// Names the request in [`WorkerCore::handle_commit`]; unique per worker.
    pub ticket: u64,
    pub epoch: u32,
    pub index: u32,
    pub conn_id: u64,
    pub t: Ticks,
    pub to: SocketAddr,
}

/// Why the store refused a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitRefusal {
    /// Another commit for the connection won (`L ≥ t` there, or the record changed).
    Conflict,
    /// The store is unreachable or without quorum.
    Unavailable,
    /// The store no longer holds the connection.
    Unknown,
}

/// The store's decision on a [`CommitRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitResult {
    /// Committed; `old` is the tuple the store held before.
    Committed {
        old: Option<SocketAddr>,
    },
    /// The store already holds this `t` from this tuple: answer the same ACK again.
    Duplicate,
    Refused(CommitRefusal),
}

/// A registration the store must decide: it picks a free index of `epoch` below `capacity`
/// and stores the connection there, so two gateways never issue the same index.
#[derive(Clone, Debug)]
pub struct RegisterRequest {
    /// Names the request in [`WorkerCore::handle_registration`]; unique per worker.
    pub ticket: u64,
    pub epoch: u32,
    pub capacity: u32,
    pub conn_id: u64,
    /// `R`, drawn by this gateway (sealed before the store sees it).
    pub secret: RebindSecret,
    pub host: HostId,
    pub tuple: SocketAddr,
}

/// The store's decision on a [`RegisterRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterResult {
    Registered {
        index: u32,
    },
    /// No free index below the capacity.
    Full,
    Refused(CommitRefusal),
}

/// Requests older than this get no answer any more (the client has retried by then).
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Proposals one worker holds at most; more are refused at once (counted).
pub const MAX_PENDING_COMMITS: usize = 8192;

/// An accepted REBIND waiting for the store.
pub(super) struct Parked {
    request: CommitRequest,
    host: HostId,
    via: Via,
    ack: Vec<u8>,
    at: Ticks,
}

/// A REGISTER waiting for the store.
pub(super) struct ParkedRegistration {
    pub(super) epoch: u32,
    pub(super) host: HostId,
    pub(super) request: u64,
    pub(super) conn_id: u64,
    pub(super) client: SocketAddr,
    pub(super) secret: RebindSecret,
    at: Ticks,
}

/// The worker's deferred commits and registrations.
#[derive(Default)]
pub(super) struct Commits {
    next_ticket: u64,
    outbox: Vec<CommitRequest>,
    parked: HashMap<u64, Parked>,
    /// The parked commit of each connection, by `(epoch, index)`: its ticket and tuple.
    in_flight: HashMap<(u32, u32), (u64, SocketAddr)>,
    registrations_out: Vec<RegisterRequest>,
    registering: HashMap<u64, ParkedRegistration>,
}

/// Verify's view in deferred mode: the registries as they are, and a "commit" that changes
/// nothing but reports the tuple the connection holds (the outcome is then proposed).
pub(super) struct Proposer<'a>(pub(super) &'a Control);

impl Registries for Proposer<'_> {
    fn registry(&self, epoch: u32) -> Option<&Registry> {
        self.0
            .registries
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|(_, r)| r)
    }

    fn commit(&mut self, epoch: u32, index: u32, _t: Ticks, _to: SocketAddr) -> Option<SocketAddr> {
        self.registry(epoch)?.get(index)?.tuple()
    }
}

impl WorkerCore {
    /// Parks an accepted REBIND and queues its commit request.
    pub(super) fn propose(
        &mut self,
        now: Ticks,
        epoch: u32,
        rebind: &Verified,
        host: HostId,
        via: Via,
        from: SocketAddr,
    ) {
        // A client's retry while its first REBIND's commit is still in flight proposes
        // nothing: the first one's ACK answers it (the client keeps its last tries' keys),
        // and under a storm every retry would otherwise be one more store write.
        if let Some(&(ticket, to)) = self.commits.in_flight.get(&(epoch, rebind.index))
            && to == from
            && self.commits.parked.contains_key(&ticket)
        {
            self.metrics.inc(C::CommitCoalesced);
            return;
        }
        if self.commits.parked.len() >= MAX_PENDING_COMMITS {
            self.metrics.inc(C::CommitBacklogFull);
            return;
        }
        let ticket = self.commits.next_ticket;
        self.commits.next_ticket += 1;
        let request = CommitRequest {
            ticket,
            epoch,
            index: rebind.index,
            conn_id: rebind.conn_id,
            t: rebind.t,
            to: from,
        };
        self.commits.outbox.push(request);
        self.commits
            .in_flight
            .insert((epoch, rebind.index), (ticket, from));
        self.commits.parked.insert(
            ticket,
            Parked {
                request,
                host,
                via,
                ack: rebind.ack.to_vec(),
                at: now,
            },
        );
        self.metrics.inc(C::CommitProposed);
    }

    /// The next commit to send to the store.
    pub fn poll_commit(&mut self) -> Option<CommitRequest> {
        self.commits.outbox.pop()
    }

    /// Commits proposed and not yet answered.
    pub fn pending_commits(&self) -> usize {
        self.commits.parked.len()
    }

    /// Applies the store's decision on `ticket` (an unknown or expired ticket is ignored).
    pub fn handle_commit(&mut self, ticket: u64, result: CommitResult, tx: &mut TxQueue) {
        let Some(p) = self.commits.parked.remove(&ticket) else {
            self.metrics.inc(C::CommitLate);
            return;
        };
        let r = p.request;
        let key = (r.epoch, r.index);
        if self
            .commits
            .in_flight
            .get(&key)
            .is_some_and(|(t, _)| *t == ticket)
        {
            self.commits.in_flight.remove(&key);
        }
        match result {
            CommitResult::Committed { old } => {
                let shared = self.shared.clone();
                let mut ctl = shared.control();
                let mut committer = self.committer(&mut ctl);
                // The store's watch may have brought this commit (or a later one) already.
                let held = committer
                    .registry(r.epoch)
                    .and_then(|reg| reg.get(r.index))
                    .filter(|c| c.conn_id == r.conn_id)
                    .map(|c| (c.last_rebind, c.host));
                match held {
                    Some((last, _)) if last < r.t => {
                        committer.commit(r.epoch, r.index, r.t, r.to);
                    }
                    // This very commit came through the watch first: the registry has it,
                    // the tables still point at the old tuple (or none).
                    Some((last, host)) if last == r.t => {
                        let old = committer.ctl.conns.get(r.conn_id).and_then(|c| c.tuple);
                        committer.bind_tuple(r.epoch, r.index, r.conn_id, host, old, r.to);
                        self.shared.touch(r.epoch as u8, r.index, self.secs);
                    }
                    _ => {}
                }
                drop(ctl);
                self.send_rebound(p.host, r.conn_id, r.t, old, r.to, tx);
                self.metrics.inc(C::RebindAccepted);
                self.metrics.inc(C::CommitCommitted);
            }
            CommitResult::Duplicate => {
                self.metrics.inc(C::RebindDuplicate);
            }
            CommitResult::Refused(why) => {
                self.metrics.inc(match why {
                    CommitRefusal::Conflict => C::CommitConflict,
                    CommitRefusal::Unavailable => C::CommitUnavailable,
                    CommitRefusal::Unknown => C::CommitUnknown,
                });
                return;
            }
        }
        if tx.push_bytes(p.via, r.to, &p.ack) {
            self.metrics.inc(C::TxClientAck);
            self.metrics.add(C::TxClientBytes, p.ack.len() as u64);
        }
    }

    /// Parks a REGISTER and queues its request to the store (one per host request at a
    /// time: a retransmitted REGISTER while it is undecided is not proposed again).
    pub(super) fn propose_registration(
        &mut self,
        now: Ticks,
        epoch: u32,
        host: HostId,
        request: u64,
        conn_id: u64,
        client: SocketAddr,
    ) {
        if self
            .commits
            .registering
            .values()
            .any(|p| p.host == host && p.request == request)
        {
            self.metrics.inc(C::RegisterRepeat);
            return;
        }
        if self.commits.registering.len() >= MAX_PENDING_COMMITS {
            self.metrics.inc(C::CommitBacklogFull);
            return;
        }
        let ticket = self.commits.next_ticket;
        self.commits.next_ticket += 1;
        let secret = RebindSecret::generate();
        let capacity = u32::try_from(self.shared.cfg.max_connections).unwrap_or(u32::MAX);
        self.commits.registrations_out.push(RegisterRequest {
            ticket,
            epoch,
            capacity,
            conn_id,
            secret: secret.clone(),
            host,
            tuple: client,
        });
        self.commits.registering.insert(
            ticket,
            ParkedRegistration {
                epoch,
                host,
                request,
                conn_id,
                client,
                secret,
                at: now,
            },
        );
        self.metrics.inc(C::CommitProposed);
    }

    /// The next registration to send to the store.
    pub fn poll_registration(&mut self) -> Option<RegisterRequest> {
        self.commits.registrations_out.pop()
    }

    /// Applies the store's decision on registration `ticket`: REGISTERED (or
    /// REGISTER_FAILED) to the host goes into `tx`.
    pub fn handle_registration(
        &mut self,
        now: Ticks,
        ticket: u64,
        result: RegisterResult,
        tx: &mut TxQueue,
    ) {
        let Some(p) = self.commits.registering.remove(&ticket) else {
            self.metrics.inc(C::CommitLate);
            return;
        };
        self.answer_registration(now, p, result, tx);
    }

    /// Drops proposals the store left unanswered for [`COMMIT_TIMEOUT`].
    pub(super) fn expire_commits(&mut self, now: Ticks) {
        let before = self.commits.registering.len();
        self.commits
            .registering
            .retain(|_, p| now.since(p.at) < COMMIT_TIMEOUT);
        let expired = before - self.commits.registering.len();
        if expired > 0 {
            self.metrics.add(C::CommitTimedOut, expired as u64);
        }
        if self.commits.parked.is_empty() {
            return;
        }
        let before = self.commits.parked.len();
        self.commits
            .parked
            .retain(|_, p| now.since(p.at) < COMMIT_TIMEOUT);
        let expired = before - self.commits.parked.len();
        if expired > 0 {
            self.metrics.add(C::CommitTimedOut, expired as u64);
            let parked = &self.commits.parked;
            self.commits
                .in_flight
                .retain(|_, (ticket, _)| parked.contains_key(ticket));
        }
    }
}
