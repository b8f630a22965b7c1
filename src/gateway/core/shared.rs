//! What every worker shares: the settings, the lock-free tables, the epoch keys and live
//! settings behind generation counters, and the slow-path [`Control`] state behind one mutex.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use crossbeam::channel::Sender;
use siphasher::sip::SipHasher13;

use crate::gateway::metrics::WorkerMetrics;
use crate::gateway::store::{StoreOp, StoredConn};
use crate::hostlink::ReplayGuard;
use crate::rebind::RebindSecret;
use crate::registry::{HostId, Registry, RegistryError};
use crate::table::{ConnRef, ConnRoute, ConnTable, ConnWriter, TupleTable, TupleWriter};
use crate::time::{Ticks, duration_ticks};
use crate::verify::EpochCrypto;

use super::delivery::KeyDelivery;
use super::{CoreConfig, HostPeer, Rates, secs};

/// A host's boot id as the gateway knows it, and the `sent` time of the HELLO that set it
/// (zero when it was taken from another message, e.g. after a gateway restart).
#[derive(Clone, Copy, Debug)]
pub(super) struct HostBoot {
    pub(super) boot: u64,
    pub(super) hello_sent: Ticks,
}

/// What a reload (SIGHUP) can change while the workers run. Each worker keeps its own `Arc`
/// and looks at [`Shared::live_generation`] once per batch, so the packet path takes no lock.
pub struct Live {
    /// Connections name their host by position here, so a reload may only change keys and
    /// append hosts.
    pub hosts: Vec<HostPeer>,
    pub rates: Rates,
}

/// The current epoch and, during a rotation's grace period, the previous one.
pub struct Epochs {
    pub current: Arc<EpochCrypto>,
    pub previous: Option<Arc<EpochCrypto>>,
}

impl Epochs {
    pub(super) fn all(&self) -> impl Iterator<Item = &Arc<EpochCrypto>> {
        std::iter::once(&self.current).chain(self.previous.iter())
    }
}

/// A registration kept so a retransmitted REGISTER gets the same answer (sealed afresh).
pub(super) struct RecentRegister {
    pub(super) conn_id: u64,
    pub(super) epoch: u32,
    pub(super) index: u32,
    pub(super) secret: RebindSecret,
    pub(super) at: Ticks,
}

/// Slow-path state, behind one mutex.
pub struct Control {
    /// One registry per accepted epoch, keyed by epoch number.
    pub(super) registries: Vec<(u32, Registry)>,
    pub(super) tuples: TupleWriter,
    pub(super) conns: ConnWriter,
    pub(super) recent_registers: HashMap<(HostId, u64), RecentRegister>,
    /// Insertion order of `recent_registers`, to bound it.
    pub(super) recent_order: VecDeque<(HostId, u64)>,
    /// Control messages accepted from hosts, by nonce, over every worker's socket.
    pub(super) guard: ReplayGuard,
    /// Each host's boot id, by `HostId`.
    pub(super) boots: Vec<Option<HostBoot>>,
    /// Connections released with an epoch (end of grace): their hosts are told EXPIRED by
    /// the next worker tick.
    pub(super) expired_pending: Vec<(HostId, u64)>,
    /// The current epoch's keys on their way to the clients registered at its rotation.
    pub(super) delivery: KeyDelivery,
    /// Cluster mode: this copy also holds the connections other gateways own (and, during
    /// a grace period, their registrations in both epochs).
    pub(super) clustered: bool,
}

/// REGISTERED replies kept for retransmits. A host retries within ~2.5 s, so a bounded FIFO
/// holds every reply a retransmit can still ask for, unless registrations arrive faster than
/// this many per 2.5 s (then a late retransmit fails as a duplicate and the client retries).
pub(super) const RECENT_REGISTERS: usize = 8192;

impl Control {
    /// The boot slot of `host`; a SIGHUP may have appended hosts since the start.
    pub(super) fn boot_slot(&mut self, host: HostId) -> &mut Option<HostBoot> {
        let i = usize::from(host);
        if self.boots.len() <= i {
            self.boots.resize_with(i + 1, || None);
        }
        &mut self.boots[i]
    }

    pub(super) fn registry_mut(&mut self, epoch: u32) -> Option<&mut Registry> {
        self.registries
            .iter_mut()
            .find(|(e, _)| *e == epoch)
            .map(|(_, r)| r)
    }

    pub(super) fn registry_by_byte(&mut self, epoch_byte: u8) -> Option<(u32, &mut Registry)> {
        self.registries
            .iter_mut()
            .find(|(e, _)| *e as u8 == epoch_byte)
            .map(|(e, r)| (*e, r))
    }

    /// Live connections over every epoch; one registered in two epochs (a rotation's key
    /// delivery) counts once.
    pub fn connections(&self) -> usize {
        // In a cluster during grace, the other gateways registered their connections in
        // the new epoch too (this gateway's `dual` counts only its own): one route each.
        if self.clustered && self.registries.len() > 1 {
            return self.conns.len();
        }
        let all: usize = self.registries.iter().map(|(_, r)| r.len()).sum();
        all.saturating_sub(self.delivery.dual)
    }

    /// Forgets `conn_id`'s key delivery and removes its other registration (the one `epoch`
    /// does not hold), with its store record.
    pub(super) fn release_other(&mut self, epoch: u32, conn_id: u64, shared: &Shared) {
        let Some(e) = self.delivery.remove(conn_id) else {
            return;
        };
        let delivered = self.delivery.epoch;
        let other = if epoch == delivered {
            self.registries
                .iter()
                .map(|(ep, _)| *ep)
                .find(|ep| *ep != delivered)
                .zip(e.old_index)
        } else {
            e.index.map(|i| (delivered, i))
        };
        if let Some((ep, index)) = other
            && let Some(reg) = self.registry_mut(ep)
            && reg.get(index).is_some_and(|c| c.conn_id == conn_id)
        {
            let tuple = reg.remove(index).and_then(|c| c.tuple());
            if let Some(t) = tuple
                && self.tuples.get(&t).is_some_and(|r| r.conn_id == conn_id)
            {
                self.tuples.remove(&t);
            }
            shared.persist(StoreOp::Remove {
                epoch: ep,
                index,
                conn_id,
            });
        }
        shared
            .keys_pending
            .store(self.delivery.pending, Ordering::Release);
    }

    /// Expires cached REGISTERED replies older than 30 s.
    pub fn expire(&mut self, now: Ticks) {
        let horizon = duration_ticks(Duration::from_secs(30));
        while let Some(key) = self.recent_order.front() {
            match self.recent_registers.get(key) {
                Some(r) if now.0.saturating_sub(r.at.0) < horizon => break,
                _ => {
                    self.recent_registers.remove(key);
                    self.recent_order.pop_front();
                }
            }
        }
    }
}

/// What every worker shares.
pub struct Shared {
    pub cfg: CoreConfig,
    pub(super) window_ticks: u64,
    pub tuples: TupleTable,
    pub conns: ConnTable,
    pub(super) live: RwLock<Arc<Live>>,
    pub(super) live_generation: AtomicU64,
    pub(super) epochs: RwLock<Arc<Epochs>>,
    pub(super) epochs_generation: AtomicU64,
    pub(super) control: Mutex<Control>,
    pub(super) store: Option<Sender<StoreOp>>,
    pub(super) last_issued: AtomicU64,
    /// No time above this may be issued: it is the last reservation committed to the store.
    pub(super) issue_cap: AtomicU64,
    pub(super) handshake_hash: SipHasher13,
    pub metrics: Vec<Arc<WorkerMetrics>>,
    /// Coarse last client activity (seconds) per connection slot; see [`Shared::touch`].
    pub(super) activity: Box<[AtomicU32]>,
    /// When the next idle sweep is due (ticks); a worker's `tick` claims it.
    pub(super) next_sweep: AtomicU64,
    /// Until when the previous epoch is accepted (ticks; 0: there is none, `u64::MAX`: until
    /// the next rotation).
    pub(super) grace_until: AtomicU64,
    /// Rotations since the start.
    pub(super) rotations: AtomicU64,
    /// `Control::expired_pending` is not empty (checked without the lock).
    pub(super) has_expired_pending: AtomicBool,
    /// `Control::delivery`'s unconfirmed keys (read without the lock).
    pub(super) keys_pending: AtomicUsize,
    /// Store ops sent to the writer, and ops it has committed (or failed: a broken store is
    /// reported by /readyz and must not stop key delivery for good).
    pub(super) ops_sent: AtomicU64,
    pub(super) ops_durable: Arc<AtomicU64>,
    pub(super) last_rotation: Mutex<Option<Rotation>>,
}

/// Cluster mode: how often a rotation's registration that met an unavailable store is sent
/// again at once (after that it waits for the link to come back).
pub const RETRIES_AT_ONCE: u8 = 3;

/// Cluster mode: a connection this gateway owns, to be registered in the new epoch by the
/// store (which picks the index). `ticket` names it in [`Shared::rotation_registered`].
pub struct RotationRegistration {
    pub ticket: u64,
    pub conn_id: u64,
    pub host: HostId,
    pub secret: RebindSecret,
}

/// What a rotation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// The new current epoch.
    pub epoch: u32,
    /// The epoch no longer accepted (the previous one, whose grace was cut short), if any.
    pub dropped: Option<u32>,
    /// Connections released with it (their hosts are told EXPIRED).
    pub released: usize,
    /// Live connections registered in the new epoch, whose keys go to their clients
    /// (PROTOCOL-EXT.md "Key delivery").
    pub registered: usize,
}

impl Shared {
    /// A gateway with no connections. `store` receives every registry change; without it the
    /// registry lives in memory only (tests).
    pub fn new(
        cfg: CoreConfig,
        current: EpochCrypto,
        hosts: Vec<HostPeer>,
        store: Option<Sender<StoreOp>>,
    ) -> Arc<Shared> {
        let tuples = TupleWriter::new(cfg.max_connections);
        let conns = ConnWriter::new(cfg.max_connections);
        let epoch = current.keys.epoch();
        let workers = cfg.workers.max(1);
        let host_count = hosts.len();
        Arc::new(Shared {
            window_ticks: duration_ticks(cfg.window),
            tuples: tuples.reader(),
            conns: conns.reader(),
            live: RwLock::new(Arc::new(Live {
                hosts,
                rates: cfg.rates(),
            })),
            live_generation: AtomicU64::new(0),
            epochs: RwLock::new(Arc::new(Epochs {
                current: Arc::new(current),
                previous: None,
            })),
            epochs_generation: AtomicU64::new(0),
            control: Mutex::new(Control {
                registries: vec![(
                    epoch,
                    Registry::with_capacity(cfg.slots, cfg.max_connections),
                )],
                tuples,
                conns,
                recent_registers: HashMap::new(),
                recent_order: VecDeque::new(),
                guard: ReplayGuard::default(),
                boots: vec![None; host_count],
                expired_pending: Vec::new(),
                delivery: KeyDelivery::default(),
                clustered: cfg.commit == super::CommitMode::Deferred,
            }),
            grace_until: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            has_expired_pending: AtomicBool::new(false),
            keys_pending: AtomicUsize::new(0),
            ops_sent: AtomicU64::new(0),
            ops_durable: Arc::new(AtomicU64::new(0)),
            last_rotation: Mutex::new(None),
            store,
            last_issued: AtomicU64::new(0),
            issue_cap: AtomicU64::new(u64::MAX),
            handshake_hash: SipHasher13::new_with_key(&crate::crypto::random_array()),
            metrics: (0..workers)
                .map(|_| Arc::new(WorkerMetrics::with_hosts(host_count)))
                .collect(),
            activity: (0..2 * cfg.max_connections.max(1))
                .map(|_| AtomicU32::new(0))
                .collect(),
            next_sweep: AtomicU64::new(0),
            cfg,
        })
    }

    /// From now on, control messages sent before `start` are refused: this run has no record
    /// of which of them an earlier run accepted.
    pub fn set_started(&self, start: Ticks) {
        self.control().guard.set_start(start);
    }

    /// The activity slot of a connection: one per index and epoch parity (the current and
    /// previous epochs differ in it). Indexes past `max_connections` share slots, which can
    /// only delay an expiry.
    pub(super) fn activity(&self, epoch_byte: u8, index: u32) -> &AtomicU32 {
        let half = self.activity.len() / 2;
        &self.activity[usize::from(epoch_byte & 1) * half + index as usize % half]
    }

    /// Records client activity at `secs`. One relaxed load per datagram and a store at most
    /// once per second per connection: no lock, and the cache line is written rarely.
    #[inline]
    pub(super) fn touch(&self, epoch_byte: u8, index: u32, secs: u32) {
        let a = self.activity(epoch_byte, index);
        if a.load(Ordering::Relaxed) != secs {
            a.store(secs, Ordering::Relaxed);
        }
    }

    /// A gateway time `t` for UNRECOGNIZED and REBIND checks (§6): later than every time
    /// issued before (so a connection whose `L` is the last issued time can always rebind
    /// again), the wall clock when that is later still, and never past the reservation
    /// committed to the store.
    pub fn issue_ticks(&self, wall: Ticks) -> Ticks {
        let cap = self.issue_cap.load(Ordering::Acquire);
        let mut prev = self.last_issued.load(Ordering::Acquire);
        loop {
            let next = wall.0.max(prev.saturating_add(1)).min(cap).max(prev);
            if next == prev {
                return Ticks(prev);
            }
            match self.last_issued.compare_exchange_weak(
                prev,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ticks(next),
                Err(p) => prev = p,
            }
        }
    }

    pub fn last_issued(&self) -> Ticks {
        Ticks(self.last_issued.load(Ordering::Acquire))
    }

    /// Allows times up to `cap`. With a store, the gateway sets this before serving and
    /// raises it each time a new reservation is durable; without one there is no cap.
    pub fn set_issue_cap(&self, cap: Ticks) {
        self.issue_cap.store(cap.0, Ordering::Release);
    }

    pub fn issue_cap(&self) -> Ticks {
        Ticks(self.issue_cap.load(Ordering::Acquire))
    }

    /// Starts the clock at `floor`: nothing at or below it is issued again.
    pub fn set_floor(&self, floor: Ticks) {
        self.last_issued.fetch_max(floor.0, Ordering::AcqRel);
    }

    pub fn epochs(&self) -> Arc<Epochs> {
        self.epochs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes `next` the current epoch; the old one stays accepted (as `previous`) until the
    /// next rotation replaces it.
    pub fn rotate(&self, next: EpochCrypto) -> Rotation {
        self.rotate_with_grace(next, Ticks(0), Ticks(u64::MAX))
    }

    /// Makes `next` the current epoch at `at` and keeps the old one accepted until `grace_until`
    /// (see [`Shared::end_grace`]). An epoch still in its grace period is dropped now: its
    /// keys go, its connections are released (hosts told EXPIRED) and, in the same store
    /// op as the new epoch, its records are removed.
    pub fn rotate_with_grace(&self, next: EpochCrypto, at: Ticks, grace_until: Ticks) -> Rotation {
        self.rotate_inner(next, at, grace_until, false).0
    }

    /// Cluster mode: puts in force a rotation the store decided (every gateway switches when
    /// its watch reports the epoch record), like [`Shared::rotate_with_grace`], but the
    /// connections this gateway owns (routed here, with a tuple) are not registered in the
    /// new epoch here: the returned registrations go to the store, which picks their indices
    /// (create-if-absent, so two gateways never issue the same one), and their keys go out
    /// only once [`Shared::rotation_registered`] reports each one committed.
    pub fn rotate_clustered(
        &self,
        next: EpochCrypto,
        at: Ticks,
        grace_until: Ticks,
    ) -> (Rotation, Vec<RotationRegistration>) {
        self.rotate_inner(next, at, grace_until, true)
    }

    fn rotate_inner(
        &self,
        next: EpochCrypto,
        at: Ticks,
        grace_until: Ticks,
        clustered: bool,
    ) -> (Rotation, Vec<RotationRegistration>) {
        let epoch = next.keys.epoch();
        let mut ctl = self.control();
        let mut guard = self.epochs.write().unwrap_or_else(|e| e.into_inner());
        let current = guard.current.keys.epoch();
        let mut released = 0;
        let mut dropped = None;
        // Every registry but the current one's goes (normally only the previous epoch's).
        let stale: Vec<u32> = ctl
            .registries
            .iter()
            .map(|(e, _)| *e)
            .filter(|e| *e != current && *e != epoch)
            .collect();
        for e in stale {
            // Connections registered in `current` by the last rotation move there first.
            for op in self.migrate(&mut ctl, e) {
                self.persist(op);
            }
            released += self.release_epoch(&mut ctl, e);
            dropped = Some(e);
        }
        if let Some(p) = &guard.previous
            && p.keys.epoch() != epoch
        {
            dropped = Some(p.keys.epoch());
        }
        if ctl.registry_mut(epoch).is_none() {
            let cap = self.cfg.max_connections;
            ctl.registries
                .insert(0, (epoch, Registry::with_capacity(self.cfg.slots, cap)));
        }
        let (register, to_store) = if clustered {
            let owned = self.owned_for_delivery(&mut ctl, current, epoch);
            (Vec::new(), owned)
        } else {
            (
                self.register_for_delivery(&mut ctl, current, epoch, at),
                Vec::new(),
            )
        };
        let registered = register.len() + to_store.len();
        let previous = Some(guard.current.clone());
        *guard = Arc::new(Epochs {
            current: Arc::new(next),
            previous,
        });
        drop(guard);
        self.grace_until.store(grace_until.0, Ordering::Release);
        self.epochs_generation.fetch_add(1, Ordering::AcqRel);
        self.rotations.fetch_add(1, Ordering::Relaxed);
        self.persist(StoreOp::Rotate {
            epoch,
            at,
            grace_until,
            drop: dropped,
            register,
        });
        // No key goes out before the registrations it names are on disk: after a kill -9
        // the gateway must know every key a client may hold. (In cluster mode each entry
        // gets its index only once etcd committed it.)
        ctl.delivery.durable_at = if clustered {
            0
        } else {
            self.ops_sent.load(Ordering::Acquire)
        };
        drop(ctl);
        let rotation = Rotation {
            epoch,
            dropped,
            released,
            registered,
        };
        *self.last_rotation.lock().unwrap_or_else(|e| e.into_inner()) = Some(rotation);
        (rotation, to_store)
    }

    /// Cluster mode: the connections of `from` this gateway owns (their tuple is bound
    /// here), each with a fresh `R` for `to`, waiting for the store to place them.
    fn owned_for_delivery(
        &self,
        ctl: &mut Control,
        from: u32,
        to: u32,
    ) -> Vec<RotationRegistration> {
        ctl.delivery.start(to);
        let owned: Vec<(u32, u64, HostId)> = ctl
            .registries
            .iter()
            .find(|(e, _)| *e == from)
            .map(|(_, r)| {
                r.iter()
                    .filter(|(_, c)| {
                        c.tuple().is_some_and(|t| {
                            ctl.tuples.get(&t).is_some_and(|r| r.conn_id == c.conn_id)
                        })
                    })
                    .map(|(i, c)| (i, c.conn_id, c.host))
                    .collect()
            })
            .unwrap_or_default();
        let mut out = Vec::with_capacity(owned.len());
        for (old, conn_id, host) in owned {
            let secret = RebindSecret::generate();
            let ticket = ctl
                .delivery
                .await_registration(conn_id, old, secret.clone(), host);
            out.push(RotationRegistration {
                ticket,
                conn_id,
                host,
                secret,
            });
        }
        self.keys_pending
            .store(ctl.delivery.pending, Ordering::Release);
        out
    }

    /// Cluster mode: the store's answer to a rotation's registration (`ticket`) in `epoch`:
    /// `Some(index)` once committed (its keys may go out from now on), `None` if it was
    /// refused (the connection keeps only its old registration and handshakes again after
    /// grace). Returns a record to remove from the store, if the connection closed
    /// meanwhile.
    pub fn rotation_registered(
        &self,
        epoch: u32,
        ticket: u64,
        index: Option<u32>,
        now: Ticks,
    ) -> Option<StoreOp> {
        let mut ctl = self.control();
        if ctl.delivery.epoch != epoch {
            return None;
        }
        let conn_id = ctl.delivery.decided(ticket)?;
        let mut remove = None;
        match index {
            None => {
                ctl.delivery.remove(conn_id);
            }
            Some(index) => {
                let held = ctl
                    .delivery
                    .entries
                    .get(&conn_id)
                    .and_then(|e| Some((e.secret.clone()?, e.host)));
                match held {
                    // Closed meanwhile: its new record goes too.
                    None => {
                        remove = Some(StoreOp::Remove {
                            epoch,
                            index,
                            conn_id,
                        })
                    }
                    Some((secret, host)) => {
                        let placed = match ctl.registry_mut(epoch) {
                            // The watch may have brought this registration already.
                            Some(reg) => match reg.get(index) {
                                Some(c) => c.conn_id == conn_id,
                                None => reg
                                    .restore(index, conn_id, &secret, Ticks(0), None, host)
                                    .is_ok(),
                            },
                            None => false,
                        };
                        if placed {
                            ctl.delivery.registered(conn_id, index, now);
                        } else {
                            ctl.delivery.remove(conn_id);
                        }
                    }
                }
            }
        }
        self.keys_pending
            .store(ctl.delivery.pending, Ordering::Release);
        remove
    }

    /// Cluster mode: the store could not decide a rotation's registration (`ticket`; etcd
    /// unavailable or slow). Returns it with a new ticket to send again at once while
    /// `retry` and fewer than [`RETRIES_AT_ONCE`] tries allow; otherwise it waits, pending,
    /// for [`Shared::rotation_unplaced`] (when the link is up again).
    pub fn rotation_refused(
        &self,
        epoch: u32,
        ticket: u64,
        retry: bool,
    ) -> Option<RotationRegistration> {
        let mut ctl = self.control();
        if ctl.delivery.epoch != epoch {
            return None;
        }
        let conn_id = ctl.delivery.decided(ticket)?;
        let e = ctl.delivery.entries.get(&conn_id)?;
        if e.index.is_some() {
            return None;
        }
        let (secret, host) = (e.secret.clone()?, e.host);
        let tries = ctl.delivery.retries.entry(conn_id).or_insert(0);
        if !retry || *tries >= RETRIES_AT_ONCE {
            return None;
        }
        *tries += 1;
        let ticket = ctl.delivery.reticket(conn_id);
        Some(RotationRegistration {
            ticket,
            conn_id,
            host,
            secret,
        })
    }

    /// Cluster mode: the rotation's registrations the store could not take (refused while
    /// etcd was unavailable), each with a new ticket, to send again now that it is back.
    pub fn rotation_unplaced(&self) -> Vec<RotationRegistration> {
        let mut ctl = self.control();
        let sent: std::collections::HashSet<u64> = ctl.delivery.tickets.values().copied().collect();
        let unplaced: Vec<(u64, HostId, RebindSecret)> = ctl
            .delivery
            .entries
            .iter()
            .filter(|(c, e)| e.index.is_none() && e.old_index.is_some() && !sent.contains(c))
            .filter_map(|(c, e)| Some((*c, e.host, e.secret.clone()?)))
            .collect();
        unplaced
            .into_iter()
            .map(|(conn_id, host, secret)| RotationRegistration {
                ticket: ctl.delivery.reticket(conn_id),
                conn_id,
                host,
                secret,
            })
            .collect()
    }

    /// Cluster mode: the rotation's registrations the store has not decided yet.
    pub fn rotation_registrations_pending(&self) -> usize {
        self.control().delivery.awaiting()
    }

    /// The last rotation this gateway put in force.
    pub fn last_rotation(&self) -> Option<Rotation> {
        *self.last_rotation.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers every connection of `from` in `to` (new index and `R`, no tuple yet: the
    /// route stays with the old registration until the client rebinds under `to` or grace
    /// ends) and starts delivering their keys. Returns the records to store with the
    /// rotation. A connection that finds `to` full keeps only its old registration.
    fn register_for_delivery(
        &self,
        ctl: &mut Control,
        from: u32,
        to: u32,
        now: Ticks,
    ) -> Vec<StoredConn> {
        ctl.delivery.start(to);
        let live: Vec<(u32, u64, HostId)> = ctl
            .registries
            .iter()
            .find(|(e, _)| *e == from)
            .map(|(_, r)| r.iter().map(|(i, c)| (i, c.conn_id, c.host)).collect())
            .unwrap_or_default();
        let mut stored = Vec::with_capacity(live.len());
        for (old, conn_id, host) in live {
            let Some(reg) = ctl.registry_mut(to) else {
                break;
            };
            let Ok(r) = reg.register(conn_id, host, None) else {
                break;
            };
            stored.push(StoredConn {
                epoch: to,
                index: r.index,
                conn_id,
                secret: r.secret.clone(),
                last_rebind: Ticks(0),
                tuple: None,
                host,
            });
            ctl.delivery.add(conn_id, old, r.index, r.secret, host, now);
        }
        self.keys_pending
            .store(ctl.delivery.pending, Ordering::Release);
        stored
    }

    /// Ends the grace period if it is over at `now`: the previous epoch's keys are dropped
    /// (zeroized once no worker holds them) and its connections released (their hosts are
    /// told EXPIRED, their clients handshake again). Returns what was dropped, if anything.
    pub fn end_grace(&self, now: Ticks) -> Option<Rotation> {
        let until = self.grace_until.load(Ordering::Acquire);
        if until == 0 || now.0 < until {
            return None;
        }
        let mut ctl = self.control();
        let mut guard = self.epochs.write().unwrap_or_else(|e| e.into_inner());
        let previous = guard.previous.as_ref()?.keys.epoch();
        // Connections registered anew at the rotation move to that registration, in the
        // store before the old epoch's records go.
        for op in self.migrate(&mut ctl, previous) {
            self.persist(op);
        }
        let released = self.release_epoch(&mut ctl, previous);
        for e in ctl.delivery.entries.values_mut() {
            e.old_index = None;
        }
        ctl.delivery.dual = 0;
        *guard = Arc::new(Epochs {
            current: guard.current.clone(),
            previous: None,
        });
        drop(guard);
        self.grace_until.store(0, Ordering::Release);
        self.epochs_generation.fetch_add(1, Ordering::AcqRel);
        self.persist(StoreOp::EndGrace { epoch: previous });
        drop(ctl);
        Some(Rotation {
            epoch: previous.wrapping_add(1),
            dropped: Some(previous),
            released,
            registered: 0,
        })
    }

    /// Until when the previous epoch is accepted: `None` if there is no previous epoch,
    /// `Some(Ticks(u64::MAX))` if until the next rotation.
    pub fn grace_until(&self) -> Option<Ticks> {
        match self.grace_until.load(Ordering::Acquire) {
            0 => None,
            t => Some(Ticks(t)),
        }
    }

    /// Rotations since the start.
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }

    /// Live connections per accepted epoch, current first.
    pub fn connections_per_epoch(&self) -> Vec<(u32, usize)> {
        let ctl = self.control();
        let mut v: Vec<(u32, usize)> = ctl.registries.iter().map(|(e, r)| (*e, r.len())).collect();
        let current = self.epochs().current.keys.epoch();
        v.sort_by_key(|(e, _)| *e != current);
        v
    }

    /// Takes `epoch`'s registry out and removes its connections from both tables; queues an
    /// EXPIRED for each. The store is not told: the caller's op removes the whole epoch.
    fn release_epoch(&self, ctl: &mut Control, epoch: u32) -> usize {
        let Some(pos) = ctl.registries.iter().position(|(e, _)| *e == epoch) else {
            return 0;
        };
        let (_, reg) = ctl.registries.remove(pos);
        let mut n = 0;
        for (index, c) in reg.iter() {
            let route = ctl.conns.get(c.conn_id);
            let here = |e: u8, i: u32| e == epoch as u8 && i == index;
            if let Some(t) = c.tuple()
                && ctl
                    .tuples
                    .get(&t)
                    .is_some_and(|r| r.conn_id == c.conn_id && here(r.epoch_byte, r.index))
            {
                ctl.tuples.remove(&t);
            }
            // A connection routed by its registration in another epoch lives on there.
            if route.is_some_and(|r| !here(r.epoch_byte, r.index)) {
                continue;
            }
            if route.is_some() {
                ctl.conns.remove(c.conn_id);
            }
            if ctl.delivery.epoch != epoch {
                ctl.delivery.remove(c.conn_id);
            }
            ctl.expired_pending.push((c.host, c.conn_id));
            n += 1;
        }
        self.keys_pending
            .store(ctl.delivery.pending, Ordering::Release);
        if n > 0 {
            self.has_expired_pending.store(true, Ordering::Release);
        }
        n
    }

    /// Takes the EXPIRED notices queued by [`Shared::end_grace`] and rotations.
    pub(super) fn take_expired_pending(&self, max: usize) -> Vec<(HostId, u64)> {
        if !self.has_expired_pending.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut ctl = self.control();
        let n = ctl.expired_pending.len().min(max);
        let taken: Vec<_> = ctl.expired_pending.drain(..n).collect();
        if ctl.expired_pending.is_empty() {
            self.has_expired_pending.store(false, Ordering::Release);
        }
        taken
    }

    /// Restores the previous epoch after a restart during its grace period (until `until`).
    pub fn restore_previous(&self, previous: EpochCrypto, until: Ticks) {
        let epoch = previous.keys.epoch();
        self.add_epoch_registry(epoch);
        let mut guard = self.epochs.write().unwrap_or_else(|e| e.into_inner());
        *guard = Arc::new(Epochs {
            current: guard.current.clone(),
            previous: Some(Arc::new(previous)),
        });
        drop(guard);
        self.grace_until.store(until.0.max(1), Ordering::Release);
        self.epochs_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The hosts and rate limits in force.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts new hosts and rate limits in force; each worker picks them up at its next batch.
    pub fn set_live(&self, live: Live) {
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(live);
        self.live_generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn control(&self) -> MutexGuard<'_, Control> {
        // A worker that panicked mid-update cannot leave the registry half-written in a way
        // that matters more than stopping the gateway would; keep serving.
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn connections(&self) -> usize {
        self.control().connections()
    }

    /// Live connections per configured host (index order), for the admin endpoint. Walks
    /// the registries under the control lock: call it per scrape, not per packet.
    pub fn connections_per_host(&self) -> Vec<u64> {
        let mut per = vec![0u64; self.live().hosts.len()];
        let ctl = self.control();
        for (_, r) in &ctl.registries {
            for (_, c) in r.iter() {
                if let Some(n) = per.get_mut(usize::from(c.host)) {
                    *n += 1;
                }
            }
        }
        per
    }

    pub(super) fn persist(&self, op: StoreOp) {
        if let Some(s) = &self.store {
            self.ops_sent.fetch_add(1, Ordering::AcqRel);
            // The writer thread outlives the workers; a send only fails during shutdown.
            let _ = s.send(op);
        }
    }

    /// The store writer committed `ops` more ops (in the order they were sent).
    pub fn mark_durable(&self, ops: u64) {
        self.ops_durable.fetch_add(ops, Ordering::AcqRel);
    }

    /// The counter the store writer adds its committed ops to. The writer holds this, not
    /// `Shared`: `Shared` holds the writer's sender, and the writer ends when every sender
    /// is dropped.
    pub fn durable_ops(&self) -> Arc<AtomicU64> {
        self.ops_durable.clone()
    }

    /// Whether the last rotation (with its registrations) is committed to the store.
    pub fn rotation_durable(&self) -> bool {
        let seq = self.control().delivery.durable_at;
        self.is_durable(seq)
    }

    /// Whether every op sent up to number `seq` is committed.
    pub(super) fn is_durable(&self, seq: u64) -> bool {
        self.ops_durable.load(Ordering::Acquire) >= seq
    }

    pub fn store_queue_len(&self) -> usize {
        self.store.as_ref().map_or(0, |s| s.len())
    }

    /// Puts back a connection loaded from the store, with `L` raised to `floor` so no REBIND
    /// issued before the restart can be replayed (docs/persistence.md).
    pub fn restore(&self, c: &StoredConn, floor: Ticks) -> Result<(), RegistryError> {
        let mut ctl = self.control();
        let last = c.last_rebind.max(floor);
        let epoch_byte = c.epoch as u8;
        let Some(reg) = ctl.registry_mut(c.epoch) else {
            return Err(RegistryError::UnknownEpoch(c.epoch));
        };
        reg.restore(c.index, c.conn_id, &c.secret, last, c.tuple, c.host)?;
        let mut tuple = None;
        // Two stored connections never hold one tuple, but if they do (a store written by an
        // older version), the first keeps it and this one waits for its client's rebind.
        let taken = c
            .tuple
            .is_some_and(|t| ctl.tuples.get(&t).is_some_and(|r| r.conn_id != c.conn_id));
        if taken {
            reg_unbind(&mut ctl, c.epoch, c.index);
            self.persist(StoreOp::Unbind {
                epoch: c.epoch,
                index: c.index,
            });
        } else if let Some(t) = c.tuple {
            let cref = ConnRef {
                conn_id: c.conn_id,
                index: c.index,
                host: c.host,
                owner: 0,
                epoch_byte,
            };
            if ctl.tuples.insert(t, cref).is_ok() {
                tuple = Some(t);
            }
        }
        let route = ConnRoute {
            tuple,
            owner: 0,
            index: c.index,
            epoch_byte,
            host: c.host,
        };
        // A connection registered in two epochs (a rotation's key delivery) is routed by
        // the registration that holds its tuple; the other one only waits.
        let routed = ctl.conns.get(c.conn_id).is_some_and(|r| r.tuple.is_some());
        if tuple.is_some() || !routed {
            // The registry holds at most max_connections, and so does this table.
            let _ = ctl.conns.insert(c.conn_id, route);
        }
        let epochs = self.epochs();
        if let Some(p) = &epochs.previous {
            if c.epoch == epochs.current.keys.epoch() {
                ctl.delivery
                    .restored(c.conn_id, c.host, None, Some((c.index, c.secret.clone())));
            } else if c.epoch == p.keys.epoch() {
                ctl.delivery
                    .restored(c.conn_id, c.host, Some(c.index), None);
            }
        }
        drop(ctl);
        // A restored connection gets a whole idle period from the restart.
        self.activity(epoch_byte, c.index)
            .store(secs(floor), Ordering::Relaxed);
        Ok(())
    }

    /// Cluster mode, a start during grace: a record loaded from the store that takes part in
    /// key delivery (this gateway's registration in the current epoch, made by the rotation:
    /// `ours` and not yet rebound; or any registration in the previous epoch).
    /// [`Shared::resume_key_delivery`] then sends again the keys of the connections with
    /// both.
    pub fn restored_for_delivery(&self, c: &StoredConn, ours: bool) {
        let epochs = self.epochs();
        let Some(p) = &epochs.previous else {
            return;
        };
        let mut ctl = self.control();
        if c.epoch == epochs.current.keys.epoch() && ours && c.tuple.is_none() {
            ctl.delivery
                .restored(c.conn_id, c.host, None, Some((c.index, c.secret.clone())));
        } else if c.epoch == p.keys.epoch() {
            ctl.delivery
                .restored(c.conn_id, c.host, Some(c.index), None);
        }
    }

    /// After the restores of a restart during grace: resumes delivering the current epoch's
    /// keys to every connection registered in both epochs (all are sent again at `now`).
    pub fn resume_key_delivery(&self, now: Ticks) {
        let mut ctl = self.control();
        ctl.delivery.epoch = self.epochs().current.keys.epoch();
        ctl.delivery.finish_restore(now);
        self.keys_pending
            .store(ctl.delivery.pending, Ordering::Release);
    }

    /// When the next EPOCH_KEYS is due (a worker's `tick` sends it), if any key is pending.
    pub fn next_key_send(&self) -> Option<Ticks> {
        if self.keys_pending() == 0 {
            return None;
        }
        let ctl = self.control();
        ctl.delivery.due.peek().map(|std::cmp::Reverse((t, _))| *t)
    }

    /// Keys of the current epoch not yet confirmed by their hosts (clients' KEYS_ACK).
    pub fn keys_pending(&self) -> usize {
        self.keys_pending.load(Ordering::Acquire)
    }

    /// Adds a restored registry for a non-current epoch (kept during grace).
    pub fn add_epoch_registry(&self, epoch: u32) {
        let mut ctl = self.control();
        if ctl.registry_mut(epoch).is_none() {
            ctl.registries.push((epoch, Registry::new(self.cfg.slots)));
        }
    }

    pub fn window_ticks(&self) -> u64 {
        self.window_ticks
    }
}

fn reg_unbind(ctl: &mut Control, epoch: u32, index: u32) {
    if let Some(reg) = ctl.registry_mut(epoch) {
        reg.unbind_tuple(index);
    }
}
