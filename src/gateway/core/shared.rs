//! What every worker shares: the settings, the lock-free tables, the epoch keys and live
//! settings behind generation counters, and the slow-path [`Control`] state behind one mutex.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
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
    /// Connections released because their epoch was rotated out, whose hosts get EXPIRED at
    /// a worker's next tick.
    pub(super) retired: Vec<(HostId, u64)>,
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

    /// Live connections over every epoch.
    pub fn connections(&self) -> usize {
        self.registries.iter().map(|(_, r)| r.len()).sum()
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
    /// `Control::retired` is not empty (read without the lock at each tick).
    pub(super) retired_pending: AtomicBool,
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
                retired: Vec::new(),
            }),
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
            retired_pending: AtomicBool::new(false),
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
    pub fn rotate(&self, next: EpochCrypto) {
        let epoch = next.keys.epoch();
        {
            let mut ctl = self.control();
            if ctl.registry_mut(epoch).is_none() {
                let cap = self.cfg.max_connections;
                ctl.registries
                    .insert(0, (epoch, Registry::with_capacity(self.cfg.slots, cap)));
            }
            // The epoch before the previous one is over: its connections go from the
            // registry, both tables and the store, and their hosts are told at the next tick.
            let keep = ctl.registries.len().min(2);
            for (old_epoch, reg) in ctl.registries.split_off(keep) {
                for (index, c) in reg.iter() {
                    let route = ctl.conns.remove(c.conn_id);
                    if let Some(t) = route.and_then(|r| r.tuple)
                        && ctl.tuples.get(&t).is_some_and(|r| r.conn_id == c.conn_id)
                    {
                        ctl.tuples.remove(&t);
                    }
                    ctl.retired.push((c.host, c.conn_id));
                    self.persist(StoreOp::Remove {
                        epoch: old_epoch,
                        index,
                    });
                }
            }
            self.retired_pending
                .store(!ctl.retired.is_empty(), Ordering::Release);
        }
        let mut guard = self.epochs.write().unwrap_or_else(|e| e.into_inner());
        let previous = Some(guard.current.clone());
        *guard = Arc::new(Epochs {
            current: Arc::new(next),
            previous,
        });
        drop(guard);
        self.epochs_generation.fetch_add(1, Ordering::AcqRel);
        self.persist(StoreOp::SetEpoch { epoch });
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
            // The writer thread outlives the workers; a send only fails during shutdown.
            let _ = s.send(op);
        }
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
        // The registry holds at most max_connections, and so does this table.
        let _ = ctl.conns.insert(c.conn_id, route);
        drop(ctl);
        // A restored connection gets a whole idle period from the restart.
        self.activity(epoch_byte, c.index)
            .store(secs(floor), Ordering::Relaxed);
        Ok(())
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
