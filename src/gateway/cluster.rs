//! Cluster mode's wiring (feature `cluster`): the gateway core's deferred commits go to the
//! etcd link ([`crate::cluster::sync`]) and its answers and registry events come back,
//! without any thread of the packet path waiting on etcd.
//!
//! - Each worker's [`WorkerLink`] hands the requests its core queued
//!   ([`WorkerCore::poll_commit`], [`WorkerCore::poll_registration`]) to the link after every
//!   batch and tick, and feeds the responses routed to it back
//!   ([`WorkerCore::handle_commit`], [`WorkerCore::handle_registration`]).
//! - A router thread sends each response to the worker whose ticket it carries.
//! - An event thread applies other gateways' changes (records opened with the cluster's
//!   [`RecordSeal`]) to the shared copy ([`Shared::apply_remote`]).
//! - A removal thread turns the core's removals (idle expiry, CLOSE, a host restart) into
//!   etcd removals; registrations and rebinds are in etcd before the core applies them.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};

use super::core::{
    CommitRefusal, CommitResult, RegisterResult, RemoteApplied, RemoteChange, Shared, WorkerCore,
};
use super::rotate::{ClusterEpoch, Proposed, Rotator};
use super::store::{StoreOp, StoredConn};
use crate::cluster::mirror::Applied;
use crate::cluster::record::{EpochRecord, GatewayId, RecordSeal};
use crate::cluster::sync::{
    ClusterCounters, ClusterHandle, Event, Refusal, Request, Response, RotateAnswer, Submitter,
};
use crate::io::batch::TxQueue;
use crate::logging::LogEvery;
use crate::time::Ticks;

/// Worker id in the top byte, the request kind below it, the core's ticket in the rest.
const WORKER_SHIFT: u32 = 56;
/// The "worker" whose tickets are a rotation's registrations (answered to [`Shared`]).
const ROTATION_WORKER: u8 = 254;
const REGISTRATION_BIT: u64 = 1 << 55;
const CORE_TICKET_MASK: u64 = REGISTRATION_BIT - 1;

fn link_ticket(worker: u8, registration: bool, core_ticket: u64) -> u64 {
    (u64::from(worker) << WORKER_SHIFT)
        | if registration { REGISTRATION_BIT } else { 0 }
        | (core_ticket & CORE_TICKET_MASK)
}

/// `(worker, registration, core ticket)` of a link ticket.
fn split_ticket(ticket: u64) -> (u8, bool, u64) {
    (
        (ticket >> WORKER_SHIFT) as u8,
        ticket & REGISTRATION_BIT != 0,
        ticket & CORE_TICKET_MASK,
    )
}

/// What the gateway's cluster wiring did (exported as metrics).
#[derive(Debug, Default)]
pub struct BridgeCounters {
    pub remote_added: AtomicU64,
    pub remote_updated: AtomicU64,
    pub remote_removed: AtomicU64,
    pub remote_unchanged: AtomicU64,
    /// Records of an epoch this gateway does not hold.
    pub remote_unknown_epoch: AtomicU64,
    /// Records whose sealed `R` did not open (another cluster's key, or tampered).
    pub remote_unopened: AtomicU64,
    /// Removals sent to etcd.
    pub removals_sent: AtomicU64,
    /// The link to etcd is up (watch running).
    pub link_up: AtomicBool,
    /// Times the link went down.
    pub link_downs: AtomicU64,
}

/// Rotations proposed through the link (cluster mode's [`ClusterEpoch`]).
pub struct LinkEpoch {
    submitter: Submitter,
    timeout: Duration,
}

impl LinkEpoch {
    pub fn new(handle: &ClusterHandle, timeout: Duration) -> LinkEpoch {
        LinkEpoch {
            submitter: handle.submitter(),
            timeout,
        }
    }
}

impl ClusterEpoch for LinkEpoch {
    fn propose(&self, from: u32, force: bool, grace: Duration) -> Proposed {
        let (answer, rx) = std::sync::mpsc::channel();
        self.submitter.submit(Request::Rotate {
            from,
            force,
            now_ms: Ticks::wall_clock().unix_ms(),
            grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            answer,
        });
        match rx.recv_timeout(self.timeout + Duration::from_secs(1)) {
            Ok(RotateAnswer::Rotated(r)) => Proposed::Rotated(r.current),
            Ok(RotateAnswer::Lost(r)) => Proposed::Lost { current: r.current },
            Ok(RotateAnswer::InGrace { previous, left_ms }) => Proposed::InGrace {
                previous,
                left_secs: left_ms.div_ceil(1000),
            },
            Ok(RotateAnswer::Unavailable(e)) => Proposed::Unavailable(e),
            Err(_) => Proposed::Unavailable("the cluster link did not answer".into()),
        }
    }
}

/// One worker's end of the link.
pub struct WorkerLink {
    worker: u8,
    submitter: Submitter,
    responses: Receiver<Response>,
}

impl WorkerLink {
    /// Feeds answered requests to `core` and sends the requests it queued. Called after
    /// every batch and tick; never blocks.
    pub fn pump(&mut self, core: &mut WorkerCore, now: Ticks, tx: &mut TxQueue) {
        while let Ok(response) = self.responses.try_recv() {
            answer(core, now, response, tx);
        }
        while let Some(r) = core.poll_commit() {
            self.submitter.submit(Request::Rebind {
                ticket: link_ticket(self.worker, false, r.ticket),
                epoch: r.epoch,
                index: r.index,
                t: r.t,
                tuple: r.to,
            });
        }
        while let Some(r) = core.poll_registration() {
            self.submitter.submit(Request::Register {
                ticket: link_ticket(self.worker, true, r.ticket),
                epoch: r.epoch,
                capacity: r.capacity,
                conn_id: r.conn_id,
                secret: r.secret,
                host: r.host,
                tuple: Some(r.tuple),
                now,
            });
        }
    }
}

fn refusal(why: &Refusal) -> CommitRefusal {
    match why {
        Refusal::Conflict | Refusal::Stale => CommitRefusal::Conflict,
        Refusal::Unknown => CommitRefusal::Unknown,
        Refusal::Unavailable(_) | Refusal::Full => CommitRefusal::Unavailable,
    }
}

fn answer(core: &mut WorkerCore, now: Ticks, response: Response, tx: &mut TxQueue) {
    match response {
        Response::Registered { ticket, index, .. } => {
            let (_, _, t) = split_ticket(ticket);
            core.handle_registration(now, t, RegisterResult::Registered { index }, tx);
        }
        Response::Rebound { ticket, old, .. } => {
            let (_, _, t) = split_ticket(ticket);
            core.handle_commit(t, CommitResult::Committed { old }, tx);
        }
        Response::Duplicate { ticket } => {
            let (_, _, t) = split_ticket(ticket);
            core.handle_commit(t, CommitResult::Duplicate, tx);
        }
        Response::Refused { ticket, why } => {
            let (_, registration, t) = split_ticket(ticket);
            if registration {
                let result = match why {
                    Refusal::Full => RegisterResult::Full,
                    other => RegisterResult::Refused(refusal(&other)),
                };
                core.handle_registration(now, t, result, tx);
            } else {
                core.handle_commit(t, CommitResult::Refused(refusal(&why)), tx);
            }
        }
        Response::Removed { .. } => {}
    }
}

/// The running wiring: its threads end when the link's channels close or on `stop`.
pub struct Bridge {
    pub counters: Arc<BridgeCounters>,
    pub link: Arc<ClusterCounters>,
    threads: Vec<JoinHandle<()>>,
    handle: Option<ClusterHandle>,
    stop: Arc<AtomicBool>,
}

impl Bridge {
    /// Ends the link (the lease goes, so the others see this gateway leave) and joins the
    /// threads. The removal thread ends when the core's store channel closes.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Applies the records the link loaded at start (every one comes as an event before the
/// first `Up`), so that the workers start with the cluster's registry. Returns how many.
pub fn load_initial(
    handle: &ClusterHandle,
    shared: &Shared,
    me: GatewayId,
    counters: &BridgeCounters,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match handle.events.recv_timeout(left) {
            Ok(Event::Up { records }) => {
                counters.link_up.store(true, Ordering::Relaxed);
                return Ok(records);
            }
            Ok(event) => apply_event(event, shared, &handle.seal, me, counters, &mut None, None),
            Err(_) => anyhow::bail!("cluster: the registry did not load within 30 s"),
        }
    }
}

/// Starts the router, event and removal threads; returns the workers' ends of the link.
pub fn start(
    mut handle: ClusterHandle,
    shared: Arc<Shared>,
    me: GatewayId,
    workers: usize,
    removals: Receiver<StoreOp>,
    counters: Arc<BridgeCounters>,
    rotator: Arc<Rotator>,
) -> anyhow::Result<(Bridge, Vec<WorkerLink>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let (to_workers, links): (Vec<Sender<Response>>, Vec<WorkerLink>) = (0..workers)
        .map(|w| {
            let (s, r) = crossbeam::channel::unbounded();
            (
                s,
                WorkerLink {
                    worker: w as u8,
                    submitter: handle.submitter(),
                    responses: r,
                },
            )
        })
        .unzip();
    // The link's receivers move to the threads that wait on them.
    let responses = std::mem::replace(&mut handle.responses, std::sync::mpsc::channel().1);
    let events = std::mem::replace(&mut handle.events, std::sync::mpsc::channel().1);
    let mut threads = Vec::new();
    threads.push(
        std::thread::Builder::new()
            .name("cluster-route".into())
            .spawn({
                let stop = stop.clone();
                let shared = shared.clone();
                let submitter = handle.submitter();
                move || {
                    while !stop.load(Ordering::Acquire) {
                        match responses.recv_timeout(Duration::from_millis(100)) {
                            Ok(r) => {
                                let ticket = match &r {
                                    Response::Registered { ticket, .. }
                                    | Response::Rebound { ticket, .. }
                                    | Response::Duplicate { ticket }
                                    | Response::Removed { ticket }
                                    | Response::Refused { ticket, .. } => *ticket,
                                };
                                let (w, _, t) = split_ticket(ticket);
                                if w == ROTATION_WORKER {
                                    rotation_answer(&shared, &submitter, t, &r);
                                } else if let Some(tx) = to_workers.get(usize::from(w)) {
                                    let _ = tx.send(r);
                                }
                            }
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    }
                }
            })?,
    );
    threads.push(
        std::thread::Builder::new()
            .name("cluster-events".into())
            .spawn({
                let stop = stop.clone();
                let shared = shared.clone();
                let seal = handle.seal.clone();
                let counters = counters.clone();
                let rotation = Rotating {
                    rotator,
                    submitter: handle.submitter(),
                };
                move || {
                    let mut warn = Some(LogEvery::new(Duration::from_secs(10)));
                    while !stop.load(Ordering::Acquire) {
                        match events.recv_timeout(Duration::from_millis(100)) {
                            Ok(e) => apply_event(
                                e,
                                &shared,
                                &seal,
                                me,
                                &counters,
                                &mut warn,
                                Some(&rotation),
                            ),
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    }
                }
            })?,
    );
    threads.push(
        std::thread::Builder::new()
            .name("cluster-remove".into())
            .spawn({
                let submitter = handle.submitter();
                let counters = counters.clone();
                let stop = stop.clone();
                move || {
                    let mut ticket = 0u64;
                    loop {
                        match removals.recv_timeout(Duration::from_millis(100)) {
                            Ok(StoreOp::Remove {
                                epoch,
                                index,
                                conn_id,
                            }) => {
                                ticket += 1;
                                // Worker 255's tickets are never routed to a worker.
                                submitter.submit(Request::Remove {
                                    ticket: link_ticket(u8::MAX, false, ticket),
                                    epoch,
                                    index,
                                    conn_id,
                                });
                                counters.removals_sent.fetch_add(1, Ordering::Relaxed);
                            }
                            // The end of a grace period, or a forced rotation that
                            // dropped an epoch: this gateway's records of it go.
                            Ok(
                                StoreOp::EndGrace { epoch }
                                | StoreOp::Rotate {
                                    drop: Some(epoch), ..
                                },
                            ) => submitter.submit(Request::DropEpoch { epoch }),
                            // Registrations and rebinds are in etcd already; the rest is
                            // local (tuple bindings, the rotation's local record).
                            Ok(_) => {}
                            Err(RecvTimeoutError::Timeout) => {
                                if stop.load(Ordering::Acquire) {
                                    break;
                                }
                            }
                            Err(RecvTimeoutError::Disconnected) => break,
                        }
                    }
                }
            })?,
    );
    let link = handle.counters.clone();
    Ok((
        Bridge {
            counters,
            link,
            threads,
            handle: Some(handle),
            stop,
        },
        links,
    ))
}

/// What the event thread needs to put a rotation in force.
struct Rotating {
    rotator: Arc<Rotator>,
    submitter: Submitter,
}

/// Sends a rotation's registrations to the link.
fn submit_registrations(
    submitter: &Submitter,
    shared: &Shared,
    epoch: u32,
    registrations: Vec<super::core::RotationRegistration>,
) {
    let capacity = u32::try_from(shared.cfg.max_connections).unwrap_or(u32::MAX);
    for r in registrations {
        submitter.submit(Request::Register {
            ticket: link_ticket(ROTATION_WORKER, true, r.ticket),
            epoch,
            capacity,
            conn_id: r.conn_id,
            secret: r.secret,
            host: r.host,
            tuple: None,
            now: Ticks(0),
        });
    }
}

/// The store's answer to one of a rotation's registrations.
fn rotation_answer(shared: &Shared, submitter: &Submitter, ticket: u64, r: &Response) {
    let epoch = shared.epochs().current.keys.epoch();
    let index = match r {
        Response::Registered { index, .. } => Some(*index),
        // etcd unavailable or slow: sent again (a few times at once, then when the link
        // is back up).
        Response::Refused {
            why: Refusal::Unavailable(_),
            ..
        } => {
            if let Some(again) = shared.rotation_refused(epoch, ticket, true) {
                submit_registrations(submitter, shared, epoch, vec![again]);
            }
            return;
        }
        Response::Refused { why, .. } => {
            tracing::warn!(
                epoch,
                why = ?why,
                "cluster: a connection's registration in the new epoch was refused; it \
                 handshakes again after grace"
            );
            None
        }
        _ => return,
    };
    if let Some(StoreOp::Remove {
        epoch,
        index,
        conn_id,
    }) = shared.rotation_registered(epoch, ticket, index, Ticks::wall_clock())
    {
        submitter.submit(Request::Remove {
            ticket: link_ticket(u8::MAX, false, 0),
            epoch,
            index,
            conn_id,
        });
    }
}

/// Puts in force the epoch record the watch reported (a rotation by any gateway): the new
/// keys, the previous epoch accepted until the record's grace deadline, and the connections
/// this gateway owns registered in the new epoch through etcd.
fn apply_epoch(record: EpochRecord, shared: &Shared, rotating: &Rotating) {
    let current = shared.epochs().current.keys.epoch();
    if record.current == current {
        return;
    }
    let crypto = match rotating.rotator.crypto(record.current) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(epoch = record.current, error = %e, "cluster: cannot put the cluster's new key epoch in force");
            return;
        }
    };
    let now = Ticks::wall_clock();
    // The previous epoch is the one this gateway had (if it missed a rotation, the one it
    // had is not the record's previous and goes at once).
    let grace_until = if record.previous == Some(current) {
        Ticks::from_unix_ms(record.grace_until_ms).max(Ticks(1))
    } else {
        now
    };
    let (rotation, registrations) = shared.rotate_clustered(crypto, now, grace_until);
    rotating.rotator.set_started(if record.rotated_at_ms == 0 {
        now
    } else {
        Ticks::from_unix_ms(record.rotated_at_ms)
    });
    submit_registrations(&rotating.submitter, shared, record.current, registrations);
    tracing::info!(
        epoch = record.current,
        previous = ?record.previous,
        dropped = ?rotation.dropped,
        registering = rotation.registered,
        "cluster: key epoch switched with the cluster"
    );
}

fn apply_event(
    event: Event,
    shared: &Shared,
    seal: &RecordSeal,
    me: GatewayId,
    counters: &BridgeCounters,
    warn: &mut Option<LogEvery>,
    rotating: Option<&Rotating>,
) {
    let change = match event {
        Event::Epoch { record } => {
            match rotating {
                Some(r) => apply_epoch(record, shared, r),
                None => tracing::warn!(
                    epoch = record.current,
                    "cluster: a rotation while the registry loaded; taken at the next one"
                ),
            }
            return;
        }
        Event::Up { records } => {
            counters.link_up.store(true, Ordering::Relaxed);
            // A rotation's registrations that met the link down go now.
            if let Some(r) = rotating {
                let again = shared.rotation_unplaced();
                if !again.is_empty() {
                    let epoch = shared.epochs().current.keys.epoch();
                    tracing::info!(
                        epoch,
                        registrations = again.len(),
                        "cluster: sending the rotation's registrations again"
                    );
                    submit_registrations(&r.submitter, shared, epoch, again);
                }
            }
            tracing::info!(
                records,
                "cluster: etcd link up; REBINDs and REGISTERs resume"
            );
            return;
        }
        Event::Down { error } => {
            counters.link_up.store(false, Ordering::Relaxed);
            counters.link_downs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                error,
                "cluster: etcd link down; known tuples keep forwarding, REBINDs and \
                 REGISTERs are refused until it returns"
            );
            return;
        }
        Event::Changed {
            applied:
                Applied::Removed {
                    epoch,
                    index,
                    conn_id,
                },
            ..
        } => RemoteChange::Removed {
            epoch,
            index,
            conn_id,
        },
        Event::Changed {
            applied: Applied::Added { epoch, index } | Applied::Updated { epoch, index, .. },
            entry: Some(entry),
        } => {
            let record = &entry.record;
            let secret = match seal.open(epoch, index, record) {
                Ok(s) => s,
                Err(e) => {
                    counters.remote_unopened.fetch_add(1, Ordering::Relaxed);
                    if let Some(held_back) = warn.as_mut().and_then(|w| w.check(Instant::now())) {
                        tracing::warn!(epoch, index, error = %e, held_back, "cluster: a stored record's secret does not open; ignored");
                    }
                    return;
                }
            };
            RemoteChange::Stored {
                conn: StoredConn {
                    epoch,
                    index,
                    conn_id: record.conn_id,
                    secret,
                    last_rebind: record.last_rebind,
                    tuple: record.tuple,
                    host: record.host,
                },
                ours: record.owner == me,
            }
        }
        Event::Changed { .. } => return,
    };
    // A start during grace: the keys this gateway's registrations in the new epoch carry
    // are sent again (the restored copy has no record of which clients have them).
    if rotating.is_none()
        && let RemoteChange::Stored { conn, ours } = &change
    {
        shared.restored_for_delivery(conn, *ours);
    }
    let c = match shared.apply_remote(change) {
        RemoteApplied::Added => &counters.remote_added,
        RemoteApplied::Updated => &counters.remote_updated,
        RemoteApplied::Removed => &counters.remote_removed,
        RemoteApplied::Unchanged => &counters.remote_unchanged,
        RemoteApplied::UnknownEpoch => &counters.remote_unknown_epoch,
    };
    c.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_round_trip() {
        for (w, reg, t) in [
            (0u8, false, 0u64),
            (3, true, 12345),
            (255, false, CORE_TICKET_MASK),
        ] {
            assert_eq!(split_ticket(link_ticket(w, reg, t)), (w, reg, t));
        }
    }
}
