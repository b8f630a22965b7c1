//! The gateway's sans-IO core: what a worker does with each datagram (PROTOCOL.md §4–6 and
//! the host link). It takes `now`, the source tuple and the bytes, and writes replies into a
//! [`TxQueue`]; it never touches a socket or the clock.
//!
//! State is split by how often it changes:
//! - the fast-path tables ([`TupleTable`], [`ConnTable`]) are read lock-free by every worker;
//! - the epoch keys are read through a per-worker `Arc` snapshot, refreshed when a generation
//!   counter moves;
//! - the registries and the tables' writers sit in [`Control`] behind one mutex, taken only on
//!   the slow path (a batch of REBINDs, a registration, a close).
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::hash::Hasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use crate::crypto::Gcm;
use crossbeam::channel::Sender;
use siphasher::sip::SipHasher13;

use super::metrics::{C, H, WorkerMetrics};
use super::ratelimit::{Limited, Limiter, Rate};
use super::store::{StoreOp, StoredConn};
use super::tx::{MAX_CLIENT_DATAGRAM, Rx, TxQueue, Via};
use crate::hostlink::{
    self, Control as LinkMsg, HANDSHAKE_MAC_LEN, HandshakeMac, LinkError, LinkKey, LinkType,
    RegisterFailure, ReplayGuard,
};
use crate::rebind::RebindSecret;
use crate::registry::{HostId, Registry, RegistryError};
use crate::table::{ConnRef, ConnRoute, ConnTable, ConnWriter, TupleTable, TupleWriter};
use crate::time::{TICKS_PER_SECOND, Ticks, duration_ticks};
pub use crate::verify::EpochCrypto;
use crate::verify::{self, Outcome, Registries};
use crate::wire::{
    HANDSHAKE_LEN, MAX_TUPLE_LEN, MsgType, Unrecognized, emit_tuple, unrecognized_len,
};

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
        }
    }
}

/// Longer than the reference host's 600 s, so a host usually closes first.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 900;
/// How long a forwarded HANDSHAKE lets its host answer the tuple: the host answers within
/// its REGISTER retries (2.5 s at most).
const REPLY_KEEP: Duration = Duration::from_secs(10);
/// Replies a tuple can bank (one per forwarded HANDSHAKE).
const MAX_REPLY_CREDITS: u8 = 4;

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

/// A host's boot id as the gateway knows it, and the `sent` time of the HELLO that set it
/// (zero when it was taken from another message, e.g. after a gateway restart).
#[derive(Clone, Copy, Debug)]
struct HostBoot {
    boot: u64,
    hello_sent: Ticks,
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
    fn all(&self) -> impl Iterator<Item = &Arc<EpochCrypto>> {
        std::iter::once(&self.current).chain(self.previous.iter())
    }
}

/// A registration kept so a retransmitted REGISTER gets the same answer (sealed afresh).
struct RecentRegister {
    conn_id: u64,
    epoch: u32,
    index: u32,
    secret: RebindSecret,
    at: Ticks,
}

/// Slow-path state, behind one mutex.
pub struct Control {
    /// One registry per accepted epoch, keyed by epoch number.
    registries: Vec<(u32, Registry)>,
    tuples: TupleWriter,
    conns: ConnWriter,
    recent_registers: HashMap<(HostId, u64), RecentRegister>,
    /// Insertion order of `recent_registers`, to bound it.
    recent_order: VecDeque<(HostId, u64)>,
    /// Control messages accepted from hosts, by nonce, over every worker's socket.
    guard: ReplayGuard,
    /// Each host's boot id, by `HostId`.
    boots: Vec<Option<HostBoot>>,
}

/// REGISTERED replies kept for retransmits. A host retries within ~2.5 s, so a bounded FIFO
/// holds every reply a retransmit can still ask for, unless registrations arrive faster than
/// this many per 2.5 s (then a late retransmit fails as a duplicate and the client retries).
const RECENT_REGISTERS: usize = 8192;

impl Control {
    /// The boot slot of `host`; a SIGHUP may have appended hosts since the start.
    fn boot_slot(&mut self, host: HostId) -> &mut Option<HostBoot> {
        let i = usize::from(host);
        if self.boots.len() <= i {
            self.boots.resize_with(i + 1, || None);
        }
        &mut self.boots[i]
    }

    fn registry_mut(&mut self, epoch: u32) -> Option<&mut Registry> {
        self.registries
            .iter_mut()
            .find(|(e, _)| *e == epoch)
            .map(|(_, r)| r)
    }

    fn registry_by_byte(&mut self, epoch_byte: u8) -> Option<(u32, &mut Registry)> {
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
    window_ticks: u64,
    pub tuples: TupleTable,
    pub conns: ConnTable,
    live: RwLock<Arc<Live>>,
    live_generation: AtomicU64,
    epochs: RwLock<Arc<Epochs>>,
    epochs_generation: AtomicU64,
    control: Mutex<Control>,
    store: Option<Sender<StoreOp>>,
    last_issued: AtomicU64,
    /// No time above this may be issued: it is the last reservation committed to the store.
    issue_cap: AtomicU64,
    handshake_hash: SipHasher13,
    pub metrics: Vec<Arc<WorkerMetrics>>,
    /// Coarse last client activity (seconds) per connection slot; see [`Shared::touch`].
    activity: Box<[AtomicU32]>,
    /// When the next idle sweep is due (ticks); a worker's `tick` claims it.
    next_sweep: AtomicU64,
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
    fn activity(&self, epoch_byte: u8, index: u32) -> &AtomicU32 {
        let half = self.activity.len() / 2;
        &self.activity[usize::from(epoch_byte & 1) * half + index as usize % half]
    }

    /// Records client activity at `secs`. One relaxed load per datagram and a store at most
    /// once per second per connection: no lock, and the cache line is written rarely.
    #[inline]
    fn touch(&self, epoch_byte: u8, index: u32, secs: u32) {
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
            ctl.registries.truncate(2);
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

    fn persist(&self, op: StoreOp) {
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
        if let Some(t) = c.tuple {
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
}

/// The coarse clock of [`Shared::touch`]: whole seconds (wraps in 2106; compared wrapping).
fn secs(t: Ticks) -> u32 {
    (t.0 / TICKS_PER_SECOND) as u32
}

/// A tuple that sent a HANDSHAKE through this worker.
#[derive(Clone, Copy)]
struct HandshakeSeen {
    tuple: SocketAddr,
    until: Ticks,
    /// The smallest HANDSHAKE that drew the outstanding credits: no reply may be larger.
    max_len: u16,
    host: HostId,
    credits: u8,
}

/// A fixed-size, 4-way set-associative table of recent HANDSHAKE tuples, keyed by a keyed
/// hash (tuples are attacker-chosen). Allocated once; a full set evicts the entry that
/// expires first, so a flood can only cost a legitimate client a retried HANDSHAKE.
struct RecentHandshakes {
    slots: Box<[Option<HandshakeSeen>]>,
    sets: usize,
    hash: SipHasher13,
}

const REPLY_WAYS: usize = 4;

impl RecentHandshakes {
    /// Protocol 1.1 makes every reply (`handshake_reply_len`, at most 639 bytes) fit in the
    /// 640-byte HANDSHAKE that draws it (a const assert in `wire`), so a reply is never
    /// allowed to exceed its HANDSHAKE.
    fn new(entries: usize) -> Self {
        let sets = (entries / REPLY_WAYS).max(1).next_power_of_two();
        RecentHandshakes {
            slots: vec![None; sets * REPLY_WAYS].into_boxed_slice(),
            sets,
            hash: SipHasher13::new_with_key(&crate::crypto::random_array()),
        }
    }

    fn set(&mut self, tuple: &SocketAddr) -> &mut [Option<HandshakeSeen>] {
        let mut h = self.hash;
        let mut t = [0u8; MAX_TUPLE_LEN];
        let n = emit_tuple(tuple, &mut t);
        h.write(&t[..n]);
        let i = (h.finish() as usize) & (self.sets - 1);
        &mut self.slots[i * REPLY_WAYS..(i + 1) * REPLY_WAYS]
    }

    /// A HANDSHAKE of `len` bytes from `tuple` went to `host`: allow one more reply.
    fn record(&mut self, tuple: SocketAddr, len: usize, host: HostId, now: Ticks) {
        let until = now.saturating_add(REPLY_KEEP);
        let len = len.min(usize::from(u16::MAX)) as u16;
        let set = self.set(&tuple);
        if let Some(e) = set.iter_mut().flatten().find(|e| e.tuple == tuple) {
            if e.until < now {
                *e = HandshakeSeen {
                    tuple,
                    until,
                    max_len: len,
                    host,
                    credits: 1,
                };
            } else {
                e.credits = (e.credits + 1).min(MAX_REPLY_CREDITS);
                e.max_len = e.max_len.min(len);
                e.until = until;
                e.host = host;
            }
            return;
        }
        let victim = set
            .iter_mut()
            .min_by_key(|e| e.map_or(Ticks(0), |e| e.until))
            .expect("4 ways");
        *victim = Some(HandshakeSeen {
            tuple,
            until,
            max_len: len,
            host,
            credits: 1,
        });
    }

    /// Spends a credit for a reply of `len` bytes from `host` to `tuple`, or says why not.
    fn take(&mut self, tuple: &SocketAddr, len: usize, host: HostId, now: Ticks) -> Result<(), C> {
        let set = self.set(tuple);
        let Some(slot) = set
            .iter_mut()
            .find(|e| e.is_some_and(|e| e.tuple == *tuple && e.until >= now))
        else {
            return Err(C::DropReplyUnsolicited);
        };
        let e = slot.as_mut().expect("found");
        if e.host != host {
            return Err(C::DropReplyWrongHost);
        }
        if len > usize::from(e.max_len) {
            return Err(C::DropReplyTooLarge);
        }
        e.credits -= 1;
        if e.credits == 0 {
            *slot = None;
        }
        Ok(())
    }
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

    fn client_datagram(&mut self, now: Ticks, d: &Rx<'_>, tx: &mut TxQueue) {
        let len = d.data.len() as u64;
        if d.data.len() > MAX_CLIENT_DATAGRAM {
            self.metrics.inc(C::DropOversize);
            return;
        }
        match d.data.first().copied().and_then(MsgType::from_byte) {
            Some(MsgType::Data) => {
                self.metrics.inc(C::RxData);
                self.metrics.add(C::RxDataBytes, len);
                match self.shared.tuples.get(&d.from) {
                    Some(conn) => {
                        self.shared.touch(conn.epoch_byte, conn.index, self.secs);
                        self.forward_to_host(conn, d.data, tx)
                    }
                    None => {
                        self.metrics.inc(C::UnknownTuple);
                        self.unrecognized(now, d.via, d.from, d.data.len(), tx);
                    }
                }
            }
            Some(MsgType::Handshake) => {
                self.metrics.inc(C::RxHandshake);
                self.metrics.add(C::RxHandshakeBytes, len);
                self.forward_handshake(now, d, tx);
            }
            Some(MsgType::Rebind) => unreachable!("REBINDs are batched"),
            Some(_) => {
                self.metrics.inc(C::RxWrongDirection);
                self.metrics.add(C::RxOtherBytes, len);
            }
            None => {
                self.metrics.inc(C::RxUnknownType);
                self.metrics.add(C::RxOtherBytes, len);
            }
        }
    }

    fn forward_to_host(&mut self, conn: ConnRef, datagram: &[u8], tx: &mut TxQueue) {
        let Some(host) = self.live.hosts.get(usize::from(conn.host)) else {
            self.metrics.inc(C::DropNoRoute);
            return;
        };
        let sent = tx.push(Via::Host, host.addr, |slot| {
            hostlink::emit_conn_data(LinkType::ToHostData, conn.conn_id, datagram, slot)
        });
        if sent {
            let bytes = (datagram.len() + hostlink::DATA_HEADER_LEN) as u64;
            self.metrics.inc(C::TxHostData);
            self.metrics.add(C::TxHostBytes, bytes);
            self.metrics
                .host_add(usize::from(conn.host), H::TxPackets, 1);
            self.metrics
                .host_add(usize::from(conn.host), H::TxBytes, bytes);
        }
    }

    fn forward_handshake(&mut self, now: Ticks, d: &Rx<'_>, tx: &mut TxQueue) {
        //= PROTOCOL.md §4: HANDSHAKE of at least 640 bytes: forward it, with its source tuple,
        //# to a host (rate-limited per source). A shorter one is dropped.
        if d.data.len() < HANDSHAKE_LEN {
            self.metrics.inc(C::HandshakeShort);
            return;
        }
        if self.handshake_limit.check(&d.from, now).is_err() {
            self.metrics.inc(C::HandshakeRate);
            return;
        }
        if self.live.hosts.is_empty() {
            self.metrics.inc(C::DropNoRoute);
            return;
        }
        if 1 + MAX_TUPLE_LEN + d.data.len() + HANDSHAKE_MAC_LEN > super::tx::SLOT_LEN {
            self.metrics.inc(C::HandshakeLong);
            return;
        }
        // The same tuple always reaches the same host, so a retransmitted HANDSHAKE meets the
        // host's nonce cache instead of registering twice.
        let mut h = self.shared.handshake_hash;
        let mut t = [0u8; crate::wire::MAX_TUPLE_LEN];
        let n = emit_tuple(&d.from, &mut t);
        h.write(&t[..n]);
        let host_id = (h.finish() % self.live.hosts.len() as u64) as usize;
        let host = &self.live.hosts[host_id];
        let sent = tx.push(Via::Host, host.addr, |slot| {
            hostlink::emit_handshake(&host.mac, &d.from, d.data, slot)
        });
        if sent {
            let bytes = (d.data.len() + 1 + n + HANDSHAKE_MAC_LEN) as u64;
            self.recent_handshakes
                .record(d.from, d.data.len(), host_id as HostId, now);
            self.metrics.inc(C::HandshakeForwarded);
            self.metrics.inc(C::TxHostHandshake);
            self.metrics.add(C::TxHostBytes, bytes);
            self.metrics.host_add(host_id, H::TxPackets, 1);
            self.metrics.host_add(host_id, H::TxBytes, bytes);
            self.metrics.handshake_sent(host_id, now);
        }
    }

    /// Answers an unknown source with UNRECOGNIZED, never larger than the trigger and under
    /// the rate limits (§5).
    fn unrecognized(
        &mut self,
        now: Ticks,
        via: Via,
        from: SocketAddr,
        trigger: usize,
        tx: &mut TxQueue,
    ) {
        if trigger < unrecognized_len(&from) {
            self.metrics.inc(C::UnrecognizedSmall);
            return;
        }
        match self.unrecognized_limit.check(&from, now) {
            Err(Limited::Prefix) => return self.metrics.inc(C::UnrecognizedPrefixRate),
            Err(Limited::Global) => return self.metrics.inc(C::UnrecognizedGlobalRate),
            Ok(()) => {}
        }
        let t = self.issued(now);
        let keys = &self.epochs.current.keys;
        let u = Unrecognized {
            epoch_byte: keys.epoch_byte(),
            t,
            observed: from,
            cookie: keys.cookie(&from, t),
        };
        if tx.push(via, from, |slot| u.emit(slot)) {
            self.metrics.inc(C::UnrecognizedSent);
            self.metrics.inc(C::TxClientUnrecognized);
            self.metrics.add(C::TxClientBytes, u.len() as u64);
        }
    }

    /// The batch's gateway time, issued on first use.
    fn issued(&mut self, wall: Ticks) -> Ticks {
        *self
            .issued
            .get_or_insert_with(|| self.shared.issue_ticks(wall))
    }

    /// Verifies the batch's REBINDs ([`verify::trial_batch`], then checks 5–7 under the
    /// control lock taken once) and applies the outcomes: metrics, UNRECOGNIZED for those that
    /// draw one, then REBOUND and the REBIND_ACK for the verified ones, in packet order.
    fn verify_rebinds(&mut self, wall: Ticks, rx: &[Rx<'_>], tx: &mut TxQueue) {
        let now = self.issued(wall);
        let epochs = self.epochs.clone();
        let crypto: Vec<&EpochCrypto> = epochs.all().map(|e| &**e).collect();
        let rebinds = std::mem::take(&mut self.rebinds);
        let packets: Vec<(&[u8], &SocketAddr)> =
            rebinds.iter().map(|&i| (rx[i].data, &rx[i].from)).collect();
        let pending = verify::trial_batch(
            &packets,
            now,
            self.shared.window_ticks,
            self.shared.cfg.slots,
            &crypto,
        );
        let outcomes = match pending.decided() {
            Ok(outcomes) => outcomes,
            Err(pending) => {
                let shared = self.shared.clone();
                let mut ctl = shared.control();
                pending.finish(&mut self.committer(&mut ctl))
            }
        };
        // Rejections first, as checks 1–3 decide them before any commit.
        for (&i, outcome) in rebinds.iter().zip(&outcomes) {
            if let Outcome::Rejected {
                reason,
                cookie_request,
                unrecognized,
            } = *outcome
            {
                let d = &rx[i];
                self.metrics.inc(if cookie_request {
                    C::CookieRequest
                } else {
                    C::reject(reason)
                });
                if unrecognized {
                    self.unrecognized(now, d.via, d.from, d.data.len(), tx);
                }
            }
        }
        for (&i, outcome) in rebinds.iter().zip(&outcomes) {
            let d = &rx[i];
            let v = match *outcome {
                Outcome::Rejected { .. } => continue,
                Outcome::Accepted {
                    rebind, host, old, ..
                } => {
                    self.send_rebound(host, rebind.conn_id, rebind.t, old, d.from, tx);
                    self.metrics.inc(C::RebindAccepted);
                    rebind
                }
                Outcome::Duplicate { rebind, .. } => {
                    self.metrics.inc(C::RebindDuplicate);
                    rebind
                }
            };
            if tx.push_bytes(d.via, d.from, &v.ack) {
                self.metrics.inc(C::TxClientAck);
                self.metrics.add(C::TxClientBytes, v.ack.len() as u64);
            }
        }
        self.rebinds = rebinds;
    }

    /// Tells the host that a connection moved (§6, check 7, `t > L`). Sent from this
    /// worker's host socket, so the host's replies now come here.
    fn send_rebound(
        &mut self,
        host: HostId,
        conn_id: u64,
        t: Ticks,
        old: Option<SocketAddr>,
        to: SocketAddr,
        tx: &mut TxQueue,
    ) {
        if let Some(peer) = self.live.hosts.get(usize::from(host)) {
            let msg = LinkMsg::Rebound {
                conn_id,
                t,
                old,
                new: to,
            };
            let sealed = msg.seal(&peer.key, t);
            if tx.push_bytes(Via::Host, peer.addr, &sealed) {
                self.metrics.inc(C::TxHostControl);
                self.metrics.add(C::TxHostBytes, sealed.len() as u64);
                self.metrics.host_add(usize::from(host), H::TxPackets, 1);
                self.metrics
                    .host_add(usize::from(host), H::TxBytes, sealed.len() as u64);
            }
        }
    }

    /// Points the tables at `to` for a connection (see [`Committer::bind_tuple`]).
    #[allow(clippy::too_many_arguments)]
    fn bind_tuple(
        &self,
        ctl: &mut Control,
        epoch: u32,
        index: u32,
        conn_id: u64,
        host: HostId,
        old: Option<SocketAddr>,
        to: SocketAddr,
    ) {
        self.committer(ctl)
            .bind_tuple(epoch, index, conn_id, host, old, to);
    }

    /// The tables and store kept in step with `ctl`'s registries, by this worker.
    fn committer<'a>(&'a self, ctl: &'a mut Control) -> Committer<'a> {
        Committer {
            ctl,
            shared: &self.shared,
            worker: self.id,
            secs: self.secs,
            metrics: &self.metrics,
        }
    }

    fn host_datagram(&mut self, now: Ticks, d: &Rx<'_>, tx: &mut TxQueue) {
        self.metrics.add(C::HostRxBytes, d.data.len() as u64);
        let Some(host) = self.live.hosts.iter().position(|h| h.addr == d.from) else {
            self.metrics.inc(C::DropHostBadSource);
            return;
        };
        self.metrics.host_add(host, H::RxPackets, 1);
        self.metrics.host_add(host, H::RxBytes, d.data.len() as u64);
        let host_index = host;
        let dropped = |m: &WorkerMetrics, c: C| {
            m.inc(c);
            m.host_add(host_index, H::Dropped, 1);
        };
        let host = host as HostId;
        match hostlink::link_type(d.data) {
            Ok(LinkType::ToClientData) => {
                self.metrics.inc(C::HostRxData);
                let Ok((conn_id, inner)) = hostlink::parse_conn_data(d.data) else {
                    return dropped(&self.metrics, C::DropHostMalformed);
                };
                match self.shared.conns.get(conn_id) {
                    // Only the host that registered a connection may speak for it.
                    Some(r) if r.host != host => dropped(&self.metrics, C::DropHostNotOwner),
                    Some(ConnRoute {
                        tuple: Some(tuple), ..
                    }) => self.send_to_client(tuple, inner, C::TxClientData, tx),
                    _ => dropped(&self.metrics, C::DropNoRoute),
                }
            }
            Ok(LinkType::ToClientReply) => {
                self.metrics.inc(C::HostRxReply);
                match hostlink::parse_tuple_data(d.data) {
                    Ok((client, inner)) if inner[0] == MsgType::HandshakeReply as u8 => {
                        match self.recent_handshakes.take(&client, inner.len(), host, now) {
                            Ok(()) => {
                                self.metrics.host_answered(host_index);
                                self.send_to_client(client, inner, C::TxClientReply, tx)
                            }
                            Err(c) => dropped(&self.metrics, c),
                        }
                    }
                    _ => dropped(&self.metrics, C::DropHostMalformed),
                }
            }
            Ok(t) if t.is_control() => {
                self.metrics.inc(C::HostRxControl);
                let live = self.live.clone();
                let peer = &live.hosts[host_index];
                // Decrypt outside the lock; only the replay check and what follows need it.
                let opened = LinkMsg::open_with_nonce(d.data, &peer.key, now);
                let shared = self.shared.clone();
                let mut ctl = shared.control();
                match opened.and_then(|o| ctl.guard.accept(&o, now).map(|()| o)) {
                    Ok(o) => {
                        self.metrics.host_answered(host_index);
                        let sent = o.sent;
                        self.control_message(&mut ctl, now, host, d.from, sent, o.msg, tx)
                    }
                    Err(LinkError::BadTag) => dropped(&self.metrics, C::DropHostBadTag),
                    Err(LinkError::Stale(_)) => dropped(&self.metrics, C::DropHostStale),
                    Err(LinkError::Replay | LinkError::GuardFull) => {
                        dropped(&self.metrics, C::DropHostReplay)
                    }
                    Err(_) => dropped(&self.metrics, C::DropHostMalformed),
                }
            }
            _ => dropped(&self.metrics, C::DropHostMalformed),
        }
    }

    fn send_to_client(&mut self, to: SocketAddr, datagram: &[u8], c: C, tx: &mut TxQueue) {
        let Some(via) = self.client_via[usize::from(to.is_ipv6())] else {
            return self.metrics.inc(C::DropNoRoute);
        };
        if tx.push_bytes(Via::Client(via), to, datagram) {
            self.metrics.inc(c);
            self.metrics.add(C::TxClientBytes, datagram.len() as u64);
        }
    }

    /// Is `boot` the host's current boot? The first boot id the gateway hears from a host
    /// (after its own start) is taken as current; a new one only arrives by HELLO.
    fn boot_current(&self, ctl: &mut Control, host: HostId, boot: u64) -> bool {
        match ctl.boot_slot(host) {
            Some(b) => {
                let ok = b.boot == boot;
                if !ok {
                    self.metrics.inc(C::DropHostStaleBoot);
                }
                ok
            }
            slot @ None => {
                *slot = Some(HostBoot {
                    boot,
                    hello_sent: Ticks(0),
                });
                true
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn control_message(
        &mut self,
        ctl: &mut Control,
        now: Ticks,
        host: HostId,
        from: SocketAddr,
        sent: Ticks,
        msg: LinkMsg,
        tx: &mut TxQueue,
    ) {
        let live = self.live.clone();
        let peer = &live.hosts[usize::from(host)];
        let reply = match msg {
            LinkMsg::Register {
                boot,
                request,
                conn_id,
                client,
            } => {
                if !self.boot_current(ctl, host, boot) {
                    return;
                }
                self.register(ctl, now, host, request, conn_id, client)
            }
            LinkMsg::Close {
                boot,
                request,
                conn_id,
            } => {
                if !self.boot_current(ctl, host, boot) {
                    return;
                }
                let found = self.close(ctl, host, conn_id);
                LinkMsg::Closed {
                    request,
                    conn_id,
                    found,
                }
                .seal(&peer.key, now)
            }
            LinkMsg::Hello { boot } => {
                let Some(released) = self.hello(ctl, host, boot, sent) else {
                    return self.metrics.inc(C::DropHostStaleBoot);
                };
                LinkMsg::HelloAck { boot, released }.seal(&peer.key, now)
            }
            _ => return self.metrics.inc(C::DropHostMalformed),
        };
        if tx.push_bytes(Via::Host, from, &reply) {
            self.metrics.inc(C::TxHostControl);
            self.metrics.add(C::TxHostBytes, reply.len() as u64);
            self.metrics.host_add(usize::from(host), H::TxPackets, 1);
            self.metrics
                .host_add(usize::from(host), H::TxBytes, reply.len() as u64);
        }
    }

    /// A host announced boot `boot` in a HELLO sent at `sent`. A new boot means the host
    /// restarted and forgot its connections: every connection it owns is released. Returns
    /// how many, or `None` for a HELLO older than the one that set the current boot (a
    /// delayed copy from before a restart must not release the new boot's connections).
    fn hello(&mut self, ctl: &mut Control, host: HostId, boot: u64, sent: Ticks) -> Option<u32> {
        let slot = ctl.boot_slot(host);
        match slot {
            Some(b) if b.boot == boot => {
                b.hello_sent = b.hello_sent.max(sent);
                return Some(0);
            }
            Some(b) if sent <= b.hello_sent => return None,
            _ => {}
        }
        *slot = Some(HostBoot {
            boot,
            hello_sent: sent,
        });
        self.metrics.inc(C::HostRestarts);
        let owned: Vec<(u32, u32, u64)> = ctl
            .registries
            .iter()
            .flat_map(|(e, r)| {
                r.iter()
                    .filter(|(_, c)| c.host == host)
                    .map(move |(i, c)| (*e, i, c.conn_id))
            })
            .collect();
        // The host's earlier boot may have requests cached; they must not be answered now.
        ctl.recent_registers.retain(|(h, _), _| *h != host);
        for &(epoch, index, conn_id) in &owned {
            self.release(ctl, epoch, index, conn_id);
        }
        self.metrics.add(C::Released, owned.len() as u64);
        Some(owned.len() as u32)
    }

    /// Registers a connection for a host and returns the sealed answer.
    fn register(
        &mut self,
        ctl: &mut Control,
        now: Ticks,
        host: HostId,
        request: u64,
        conn_id: u64,
        client: SocketAddr,
    ) -> Vec<u8> {
        let shared = self.shared.clone();
        let live = self.live.clone();
        let peer = &live.hosts[usize::from(host)];
        let epochs = self.epochs.clone();
        let keys = &epochs.current.keys;
        if let Some(r) = ctl.recent_registers.get(&(host, request))
            && r.conn_id == conn_id
            && let Some(e) = epochs.all().find(|e| e.keys.epoch() == r.epoch)
        {
            self.metrics.inc(C::RegisterRepeat);
            return LinkMsg::Registered {
                request,
                conn_id,
                epoch: r.epoch,
                index: r.index,
                rebind_secret: r.secret.0,
                slot_keys: e.keys.client_keys(r.index).to_vec(),
            }
            .seal(&peer.key, now);
        }
        let fail = |reason: RegisterFailure| {
            LinkMsg::RegisterFailed {
                request,
                conn_id,
                reason: reason as u8,
            }
            .seal(&peer.key, now)
        };
        if ctl.conns.get(conn_id).is_some() {
            self.metrics.inc(C::RegisterDuplicate);
            return fail(RegisterFailure::DuplicateConnId);
        }
        let epoch = keys.epoch();
        let at_capacity = ctl.connections() >= shared.cfg.max_connections;
        let registered = match ctl.registry_mut(epoch) {
            Some(reg) if !at_capacity => reg.register(conn_id, host, Some(client)),
            _ => Err(RegistryError::Full(shared.cfg.max_connections as u64)),
        };
        let Ok(reg) = registered else {
            self.metrics.inc(C::RegisterFull);
            return fail(RegisterFailure::Full);
        };
        self.bind_tuple(ctl, epoch, reg.index, conn_id, host, None, client);
        shared.persist(StoreOp::Register(StoredConn {
            epoch,
            index: reg.index,
            conn_id,
            secret: reg.secret.clone(),
            last_rebind: Ticks(0),
            tuple: Some(client),
            host,
        }));
        self.shared
            .activity(epoch as u8, reg.index)
            .store(secs(now), Ordering::Relaxed);
        self.metrics.inc(C::Registered);
        let reply = LinkMsg::Registered {
            request,
            conn_id,
            epoch,
            index: reg.index,
            rebind_secret: reg.secret.0,
            slot_keys: keys.client_keys(reg.index).to_vec(),
        }
        .seal(&peer.key, now);
        if ctl.recent_order.len() >= RECENT_REGISTERS
            && let Some(old) = ctl.recent_order.pop_front()
        {
            ctl.recent_registers.remove(&old);
        }
        ctl.recent_order.push_back((host, request));
        ctl.recent_registers.insert(
            (host, request),
            RecentRegister {
                conn_id,
                epoch,
                index: reg.index,
                secret: reg.secret,
                at: now,
            },
        );
        reply
    }

    /// Closes a connection for its owning host.
    fn close(&mut self, ctl: &mut Control, host: HostId, conn_id: u64) -> bool {
        let Some(route) = ctl.conns.get(conn_id) else {
            return false;
        };
        if route.host != host {
            self.metrics.inc(C::DropHostNotOwner);
            return false;
        }
        let Some((epoch, _)) = ctl.registry_by_byte(route.epoch_byte) else {
            return false;
        };
        self.release(ctl, epoch, route.index, conn_id);
        self.metrics.inc(C::Closed);
        true
    }

    /// Removes a connection from the registry and both tables, and from the store.
    fn release(&mut self, ctl: &mut Control, epoch: u32, index: u32, conn_id: u64) {
        let route = ctl.conns.remove(conn_id);
        if let Some(reg) = ctl.registry_mut(epoch) {
            reg.remove(index);
        }
        if let Some(t) = route.and_then(|r| r.tuple)
            && ctl.tuples.get(&t).is_some_and(|r| r.conn_id == conn_id)
        {
            ctl.tuples.remove(&t);
        }
        self.shared.persist(StoreOp::Remove { epoch, index });
    }

    /// Timers: releases connections idle for `idle_timeout` and tells their hosts (EXPIRED).
    /// One worker at a time sweeps, at most every `idle_timeout / 4` (1–10 s), taking the
    /// control lock once; a sweep stops when `tx` is full and goes on at the next tick.
    pub fn tick(&mut self, now: Ticks, tx: &mut TxQueue) {
        let idle = self.shared.cfg.idle_timeout;
        if idle.is_zero() {
            return;
        }
        let due = self.shared.next_sweep.load(Ordering::Acquire);
        let every = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
        if now.0 < due
            || self
                .shared
                .next_sweep
                .compare_exchange(
                    due,
                    now.saturating_add(every).0,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            return;
        }
        if !self.expire_idle(now, idle, tx) {
            // More to do: come back at the next tick.
            self.shared.next_sweep.store(now.0, Ordering::Release);
        }
    }

    /// Returns false if it stopped because `tx` filled up.
    fn expire_idle(&mut self, now: Ticks, idle: Duration, tx: &mut TxQueue) -> bool {
        let shared = self.shared.clone();
        let limit = i64::try_from(idle.as_secs()).unwrap_or(i64::MAX);
        let secs_now = secs(now);
        let room = tx.capacity().saturating_sub(tx.len());
        let mut ctl = shared.control();
        let mut idle_conns: Vec<(u32, u32, u64, HostId)> = Vec::new();
        let mut complete = true;
        'scan: for (epoch, reg) in &ctl.registries {
            for (index, c) in reg.iter() {
                let seen = shared.activity(*epoch as u8, index).load(Ordering::Relaxed);
                // Wrapping difference: a slot touched "ahead" of `now` reads as negative.
                if i64::from(secs_now.wrapping_sub(seen) as i32) > limit {
                    if idle_conns.len() == room {
                        complete = false;
                        break 'scan;
                    }
                    idle_conns.push((*epoch, index, c.conn_id, c.host));
                }
            }
        }
        for (epoch, index, conn_id, host) in idle_conns {
            self.release(&mut ctl, epoch, index, conn_id);
            self.metrics.inc(C::Expired);
            if let Some(peer) = self.live.hosts.get(usize::from(host)) {
                let msg = LinkMsg::Expired { conn_id }.seal(&peer.key, now);
                if tx.push_bytes(Via::Host, peer.addr, &msg) {
                    self.metrics.inc(C::TxHostControl);
                    self.metrics.add(C::TxHostBytes, msg.len() as u64);
                }
            }
        }
        complete
    }
}

/// The gateway's [`Registries`]: the registries under the control lock, with the tuple
/// tables, the activity clock and the store kept in step at each commit.
struct Committer<'a> {
    ctl: &'a mut Control,
    shared: &'a Shared,
    /// The worker that commits: it becomes the connection's owner.
    worker: u8,
    secs: u32,
    metrics: &'a WorkerMetrics,
}

impl Committer<'_> {
    /// Points the tables at `to` for a connection. A tuple belongs to at most one connection:
    /// if a NAT handed `to` on from another connection, that connection loses it.
    fn bind_tuple(
        &mut self,
        epoch: u32,
        index: u32,
        conn_id: u64,
        host: HostId,
        old: Option<SocketAddr>,
        to: SocketAddr,
    ) {
        if let Some(old) = old.filter(|o| *o != to)
            && self
                .ctl
                .tuples
                .get(&old)
                .is_some_and(|r| r.conn_id == conn_id)
        {
            self.ctl.tuples.remove(&old);
        }
        if let Some(prev) = self.ctl.tuples.get(&to).filter(|p| p.conn_id != conn_id) {
            self.metrics.inc(C::TupleTakenOver);
            if let Some((prev_epoch, reg)) = self.ctl.registry_by_byte(prev.epoch_byte) {
                reg.unbind_tuple(prev.index);
                self.shared.persist(StoreOp::Unbind {
                    epoch: prev_epoch,
                    index: prev.index,
                });
            }
            if let Some(mut route) = self.ctl.conns.get(prev.conn_id) {
                route.tuple = None;
                let _ = self.ctl.conns.insert(prev.conn_id, route);
            }
        }
        let cref = ConnRef {
            conn_id,
            index,
            host,
            owner: self.worker,
            epoch_byte: epoch as u8,
        };
        // Neither insert can overflow: each connection holds at most one tuple and one route.
        let tuple = self.ctl.tuples.insert(to, cref).is_ok().then_some(to);
        let _ = self.ctl.conns.insert(
            conn_id,
            ConnRoute {
                tuple,
                owner: self.worker,
                index,
                epoch_byte: epoch as u8,
                host,
            },
        );
    }
}

impl Registries for Committer<'_> {
    fn registry(&self, epoch: u32) -> Option<&Registry> {
        self.ctl
            .registries
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|(_, r)| r)
    }

    /// Binds connection `index` of `epoch` to `to` (§6, check 7, `t > L`).
    fn commit(&mut self, epoch: u32, index: u32, t: Ticks, to: SocketAddr) -> Option<SocketAddr> {
        let registry = self.ctl.registry_mut(epoch)?;
        let conn = registry.get(index)?;
        let (conn_id, host) = (conn.conn_id, conn.host);
        let old = registry.commit_rebind(index, t, to);
        self.shared.touch(epoch as u8, index, self.secs);
        self.bind_tuple(epoch, index, conn_id, host, old, to);
        self.shared.persist(StoreOp::Rebind {
            epoch,
            index,
            last_rebind: t,
            tuple: to,
        });
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gcm::SessionGcm;
    use crate::engine::{Backend, TrialKeys};
    use crate::hostlink::LinkKey;
    use crate::keys::{EpochKeys, MasterSecret};
    use crate::rebind::{
        RebindCredentials, RebindSecret, build_rebind, cookie_request, fresh_nonces,
    };
    use crate::time::TICKS_PER_SECOND;
    use crate::wire::{RebindAckView, rebind_len};
    use proptest::prelude::*;

    const S: usize = 8;
    const T0: u64 = 639_028_224_000_000_000;

    struct Harness {
        shared: Arc<Shared>,
        worker: WorkerCore,
        host_addr: SocketAddr,
        link: Gcm,
        now: Ticks,
        tx: TxQueue,
    }

    /// What a client learned from REGISTERED.
    struct Issued {
        conn_id: u64,
        secret: RebindSecret,
        keys: Vec<[u8; 16]>,
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    impl Harness {
        fn new(cfg: CoreConfig) -> Harness {
            Harness::with_hosts(cfg, &[])
        }

        /// Host 0 is `host_addr` with `link`; `more` are further hosts.
        fn with_hosts(cfg: CoreConfig, more: &[(SocketAddr, LinkKey)]) -> Harness {
            Harness::build(cfg, more, None)
        }

        fn build(
            cfg: CoreConfig,
            more: &[(SocketAddr, LinkKey)],
            store: Option<Sender<StoreOp>>,
        ) -> Harness {
            let keys = EpochKeys::derive(&MasterSecret::from_bytes([5; 32]), 3, cfg.slots).unwrap();
            let trial = TrialKeys::new(Backend::Portable, keys.slot_key_pairs()).unwrap();
            let host_addr = addr("127.0.0.1:7000");
            let key = LinkKey([9; 16]);
            let mut hosts = vec![HostPeer::new(host_addr, &key)];
            for (a, k) in more {
                hosts.push(HostPeer::new(*a, k));
            }
            let shared = Shared::new(cfg, EpochCrypto { keys, trial }, hosts, store);
            let worker = WorkerCore::new(0, shared.clone(), &[false, true]);
            Harness {
                shared,
                worker,
                host_addr,
                link: key.cipher(),
                now: Ticks(T0),
                tx: TxQueue::new(256),
            }
        }

        fn default() -> Harness {
            Harness::new(CoreConfig::new(S))
        }

        /// Feeds datagrams and returns what the core queued.
        fn feed(&mut self, batch: &[(Via, SocketAddr, &[u8])]) -> Vec<(Via, SocketAddr, Vec<u8>)> {
            let rx: Vec<Rx<'_>> = batch
                .iter()
                .map(|(via, from, data)| Rx {
                    via: *via,
                    from: *from,
                    data,
                })
                .collect();
            self.worker.handle_batch(self.now, &rx, &mut self.tx);
            let out = self
                .tx
                .iter()
                .map(|(m, b)| (m.via, m.to, b.to_vec()))
                .collect();
            self.tx.clear();
            out
        }

        /// Runs the worker's timer and returns what it queued.
        fn tick(&mut self) -> Vec<(Via, SocketAddr, Vec<u8>)> {
            self.worker.tick(self.now, &mut self.tx);
            let out = self
                .tx
                .iter()
                .map(|(m, b)| (m.via, m.to, b.to_vec()))
                .collect();
            self.tx.clear();
            out
        }

        fn client(&mut self, from: SocketAddr, data: &[u8]) -> Vec<(Via, SocketAddr, Vec<u8>)> {
            let via = Via::Client(u8::from(from.is_ipv6()));
            self.feed(&[(via, from, data)])
        }

        fn register(&mut self, conn_id: u64, client: SocketAddr) -> Issued {
            let msg = LinkMsg::Register {
                boot: 1,
                request: conn_id,
                conn_id,
                client,
            }
            .seal(&self.link, self.now);
            let out = self.feed(&[(Via::Host, self.host_addr, &msg)]);
            assert_eq!(out.len(), 1);
            assert_eq!((out[0].0, out[0].1), (Via::Host, self.host_addr));
            match &LinkMsg::open(&out[0].2, &self.link, self.now).unwrap() {
                LinkMsg::Registered {
                    conn_id: c,
                    rebind_secret,
                    slot_keys,
                    ..
                } => {
                    assert_eq!(*c, conn_id);
                    Issued {
                        conn_id,
                        secret: RebindSecret(*rebind_secret),
                        keys: slot_keys.clone(),
                    }
                }
                other => panic!("expected REGISTERED, got {other:?}"),
            }
        }

        fn count(&self, c: C) -> u64 {
            self.worker.metrics().get(c)
        }
    }

    fn data(n: usize) -> Vec<u8> {
        let mut d = vec![0xAB; n];
        d[0] = b'D';
        d
    }

    /// Builds a REBIND from an UNRECOGNIZED the core sent.
    fn rebind_from(issued: &Issued, unrecognized: &[u8]) -> (Vec<u8>, SessionGcm) {
        let u = Unrecognized::parse(unrecognized).unwrap();
        let creds = RebindCredentials {
            conn_id: issued.conn_id,
            secret: &issued.secret,
            slot_keys: &issued.keys,
        };
        build_rebind(&creds, u.epoch_byte, u.t, &u.cookie, &fresh_nonces(S))
    }

    #[test]
    fn fast_path_both_directions() {
        let mut h = Harness::default();
        let a = addr("10.0.0.1:4000");
        h.register(77, a);
        let out = h.client(a, &data(60));
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0, out[0].1), (Via::Host, h.host_addr));
        assert_eq!(
            hostlink::parse_conn_data(&out[0].2).unwrap(),
            (77, &data(60)[..])
        );

        let mut back = [0u8; 100];
        let n = hostlink::emit_conn_data(LinkType::ToClientData, 77, &data(40), &mut back);
        let host = h.host_addr;
        let out = h.feed(&[(Via::Host, host, &back[..n])]);
        assert_eq!(out, vec![(Via::Client(0), a, data(40))]);

        // Unknown conn_id from the host: no route.
        let n = hostlink::emit_conn_data(LinkType::ToClientData, 78, &data(40), &mut back);
        assert!(h.feed(&[(Via::Host, host, &back[..n])]).is_empty());
        assert_eq!(h.count(C::DropNoRoute), 1);
    }

    #[test]
    fn unknown_tuple_gets_unrecognized_never_larger_than_trigger() {
        let mut h = Harness::default();
        let v4 = addr("10.0.0.1:4000");
        let v6 = addr("[2001:db8::1]:4000");
        assert!(h.client(v4, &data(32)).is_empty(), "32 < 33 bytes");
        let out = h.client(v4, &data(33));
        assert_eq!(out.len(), 1);
        let u = Unrecognized::parse(&out[0].2).unwrap();
        assert_eq!((u.observed, u.t, u.epoch_byte), (v4, h.now, 3));
        assert!(h.client(v6, &data(44)).is_empty(), "44 < 45 bytes");
        let out = h.client(v6, &data(45));
        assert_eq!(out[0].2.len(), 45);
        assert_eq!(out[0].0, Via::Client(1));
        assert_eq!(h.count(C::UnrecognizedSmall), 2);
        for (_, _, reply) in h.client(v4, &data(49)) {
            assert!(reply.len() <= 49);
        }
    }

    #[test]
    fn tuple_change_then_rebind_then_replay_and_duplicate() {
        let mut h = Harness::default();
        let old = addr("10.0.0.1:4000");
        let new = addr("10.0.0.9:5555");
        let issued = h.register(42, old);
        h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
        let u = h.client(new, &data(49));
        let (rebind, session) = rebind_from(&issued, &u[0].2);
        let out = h.client(new, &rebind);
        // REBIND_ACK to the client and REBOUND to the host.
        let ack = out.iter().find(|(v, _, _)| *v == Via::Client(0)).unwrap();
        assert_eq!(ack.1, new);
        assert_eq!(
            RebindAckView::new_checked(&ack.2).unwrap().open(&session),
            Ok(42)
        );
        let rebound = out.iter().find(|(v, _, _)| *v == Via::Host).unwrap();
        match LinkMsg::open(&rebound.2, &h.link, h.now).unwrap() {
            LinkMsg::Rebound {
                conn_id,
                old: o,
                new: n,
                ..
            } => {
                assert_eq!((conn_id, o, n), (42, Some(old), new));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(h.shared.tuples.get(&new).unwrap().conn_id, 42);
        assert!(h.shared.tuples.get(&old).is_none());
        assert_eq!(h.shared.conns.get(42).unwrap().tuple, Some(new));

        // The same REBIND again from the same tuple: a duplicate, the same ACK.
        let again = h.client(new, &rebind);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].2, ack.2);
        assert_eq!(h.count(C::RebindDuplicate), 1);

        // Replayed from another tuple: the cookie binds the tuple.
        let thief = addr("10.6.6.6:6666");
        let out = h.client(thief, &rebind);
        assert!(
            out.iter()
                .all(|(_, _, b)| b[0] == MsgType::Unrecognized as u8)
        );
        assert_eq!(h.count(C::RejectCookie), 1);
        assert!(h.shared.tuples.get(&thief).is_none());

        // Replayed from the old tuple after moving back is stale by L.
        h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
        let u = h.client(old, &data(49));
        let (back, _) = rebind_from(&issued, &u[0].2);
        assert!(
            h.client(old, &back)
                .iter()
                .any(|(v, _, _)| *v == Via::Client(0))
        );
        assert!(
            h.client(new, &rebind).is_empty(),
            "t == L from another tuple"
        );
        assert_eq!(h.count(C::RejectReplay), 1);
        assert_eq!(h.count(C::RebindAccepted), 2);
    }

    #[test]
    fn tuple_handed_on_by_nat_moves_to_rebinding_connection() {
        let mut h = Harness::default();
        let a = addr("10.0.0.1:4000");
        let b = addr("10.0.0.2:4000");
        let first = h.register(1, a);
        h.register(2, b);
        // The NAT gives connection 1's client the tuple b; its DATA would reach host as conn 2,
        // so it sends a cookie request.
        let u = h.client(b, &cookie_request(S));
        assert_eq!(u.len(), 1, "cookie request draws an UNRECOGNIZED");
        assert_eq!(h.count(C::CookieRequest), 1);
        assert_eq!(h.count(C::RejectEpoch), 0);
        let (rebind, _) = rebind_from(&first, &u[0].2);
        assert!(!h.client(b, &rebind).is_empty());
        assert_eq!(h.shared.tuples.get(&b).unwrap().conn_id, 1);
        assert!(h.shared.tuples.get(&a).is_none());
        assert_eq!(
            h.shared.conns.get(2).unwrap().tuple,
            None,
            "connection 2 lost its tuple"
        );
        assert_eq!(h.count(C::TupleTakenOver), 1);
    }

    #[test]
    fn batch_of_rebinds_with_garbage_and_forgeries() {
        let mut h = Harness::default();
        let mut issued = Vec::new();
        for i in 0..20u64 {
            issued.push(h.register(100 + i, SocketAddr::from(([10, 0, 1, i as u8], 1000))));
        }
        h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
        let mut good = Vec::new();
        let mut batch_bytes = Vec::new();
        for (i, iss) in issued.iter().enumerate() {
            let from = SocketAddr::from(([10, 0, 2, i as u8], 2000));
            let u = h.client(from, &data(49));
            let (mut r, _) = rebind_from(iss, &u[0].2);
            if i % 3 == 1 {
                let last = r.len() - 1;
                r[last] ^= 1; // AEAD fails
            } else if i % 3 == 2 {
                r[40] ^= 0x80; // a slot breaks
            } else {
                good.push(from);
            }
            batch_bytes.push((from, r));
        }
        let mut garbage = vec![0x5Au8; rebind_len(S)];
        garbage[0] = b'R';
        let gfrom = addr("10.9.9.9:9");
        let mut feed: Vec<(Via, SocketAddr, &[u8])> = batch_bytes
            .iter()
            .map(|(f, r)| (Via::Client(0), *f, &r[..]))
            .collect();
        feed.push((Via::Client(0), gfrom, &garbage));
        let out = h.feed(&feed);
        let acks = out
            .iter()
            .filter(|(_, _, b)| b[0] == MsgType::RebindAck as u8)
            .count();
        assert_eq!(acks, good.len());
        assert_eq!(h.count(C::RebindAccepted), good.len() as u64);
        assert_eq!(h.count(C::RejectAead), 7);
        assert_eq!(h.count(C::RejectTrial), 6);
        assert_eq!(
            h.count(C::RejectEpoch) + h.count(C::RejectStale) + h.count(C::RejectCookie),
            1
        );
        for g in good {
            assert!(h.shared.tuples.get(&g).is_some());
        }
    }

    #[test]
    fn unrecognized_rate_limits_hold() {
        // Per prefix: one /24, so no hash collision can blur the count.
        let mut cfg = CoreConfig::new(S);
        cfg.unrecognized_prefix = Rate::new(1.0, 10.0);
        let mut h = Harness::new(cfg);
        let sent = (0..50u16)
            .filter(|p| {
                !h.client(SocketAddr::from(([10, 0, 0, 1], *p)), &data(49))
                    .is_empty()
            })
            .count();
        assert_eq!(sent, 10, "per-/24 burst");
        assert_eq!(h.count(C::UnrecognizedPrefixRate), 40);
        assert!(
            !h.client(SocketAddr::from(([10, 0, 1, 1], 1)), &data(49))
                .is_empty()
                || h.count(C::UnrecognizedPrefixRate) == 41,
            "another /24 has its own bucket unless it shares the slot"
        );

        // Globally: every source in its own /24.
        let mut cfg = CoreConfig::new(S);
        cfg.unrecognized_global = Rate::new(1.0, 25.0);
        let mut h = Harness::new(cfg);
        let sent = (0..50u8)
            .filter(|i| {
                !h.client(SocketAddr::from(([10, *i, 7, 1], 1)), &data(49))
                    .is_empty()
            })
            .count();
        assert_eq!(sent, 25, "the global burst");
        assert_eq!(h.count(C::UnrecognizedGlobalRate), 25);
    }

    #[test]
    fn a_reload_takes_effect_at_the_next_batch() {
        let mut cfg = CoreConfig::new(S);
        cfg.handshake_prefix = Rate::new(1.0, 1.0);
        let mut h = Harness::new(cfg);
        let a = addr("10.0.0.1:4000");
        let mut hs = vec![0u8; HANDSHAKE_LEN];
        hs[0] = b'H';
        let host2 = addr("127.0.0.1:7001");
        let mut buf = [0u8; 64];
        let n = hostlink::emit_conn_data(LinkType::ToClientData, 77, b"x", &mut buf);
        h.feed(&[(Via::Host, host2, &buf[..n])]);
        assert_eq!(h.count(C::DropHostBadSource), 1, "host2 is not a host yet");

        let old = h.shared.live();
        let mut rates = old.rates;
        rates.handshake_prefix = Rate::new(50.0, 100.0);
        h.shared.set_live(Live {
            hosts: vec![
                HostPeer::new(h.host_addr, &LinkKey([9; 16])),
                HostPeer::new(host2, &LinkKey([10; 16])),
            ],
            rates,
        });
        h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
        let forwarded = (0..10).filter(|_| !h.client(a, &hs).is_empty()).count();
        assert_eq!(forwarded, 10, "1/s would have allowed 1");
        h.feed(&[(Via::Host, host2, &buf[..n])]);
        assert_eq!(h.count(C::DropHostBadSource), 1, "host2 is a host now");
        assert_eq!(h.count(C::DropNoRoute), 1);
    }

    #[test]
    fn handshakes_forwarded_when_padded_and_rate_limited() {
        let mut cfg = CoreConfig::new(S);
        cfg.handshake_prefix = Rate::new(1.0, 3.0);
        let mut h = Harness::new(cfg);
        let a = addr("10.0.0.1:4000");
        // Protocol 1.1 pads to 640 bytes: one byte less, or a 1.0-sized 256, is dropped.
        let mut hs = vec![0u8; 640];
        hs[0] = b'H';
        assert!(h.client(a, &hs[..639]).is_empty());
        assert!(h.client(a, &hs[..256]).is_empty());
        let out = h.client(a, &hs);
        let framed = hostlink::verify_handshake(&LinkKey([9; 16]).handshake_mac(), &out[0].2);
        assert_eq!(
            hostlink::parse_tuple_data(framed.unwrap()).unwrap(),
            (a, &hs[..])
        );
        h.client(a, &hs);
        h.client(a, &hs);
        assert!(h.client(a, &hs).is_empty());
        assert_eq!(h.count(C::HandshakeForwarded), 3);
        assert_eq!(
            (h.count(C::HandshakeShort), h.count(C::HandshakeRate)),
            (2, 1)
        );
        // The host's reply is relayed to the tuple, but only if it is a HANDSHAKE_REPLY.
        let mut buf = [0u8; 400];
        let n = hostlink::emit_tuple_data(LinkType::ToClientReply, &a, b"hreply", &mut buf);
        let host = h.host_addr;
        assert_eq!(
            h.feed(&[(Via::Host, host, &buf[..n])]),
            vec![(Via::Client(0), a, b"hreply".to_vec())]
        );
        let n = hostlink::emit_tuple_data(LinkType::ToClientReply, &a, b"Dsneaky", &mut buf);
        assert!(h.feed(&[(Via::Host, host, &buf[..n])]).is_empty());
    }

    #[test]
    fn host_link_checks_source_tag_and_duplicates() {
        let mut h = Harness::default();
        let a = addr("10.0.0.1:4000");
        let msg = LinkMsg::Register {
            boot: 1,
            request: 1,
            conn_id: 5,
            client: a,
        };
        let good = msg.seal(&h.link, h.now);
        let forged = msg.seal(&LinkKey([1; 16]).cipher(), h.now);
        assert!(
            h.feed(&[(Via::Host, addr("127.0.0.1:7001"), &good)])
                .is_empty()
        );
        assert_eq!(h.count(C::DropHostBadSource), 1);
        let host = h.host_addr;
        assert!(h.feed(&[(Via::Host, host, &forged)]).is_empty());
        assert_eq!(h.count(C::DropHostBadTag), 1);
        let first = h.feed(&[(Via::Host, host, &good)]);
        // A copy of the same datagram is a replay; a host retransmits by sealing afresh.
        assert!(h.feed(&[(Via::Host, host, &good)]).is_empty());
        assert_eq!(h.count(C::DropHostReplay), 1);
        let retransmit = h.feed(&[(Via::Host, host, &msg.seal(&h.link, h.now))]);
        let open =
            |out: &[(Via, SocketAddr, Vec<u8>)]| LinkMsg::open(&out[0].2, &h.link, h.now).unwrap();
        assert_eq!(
            open(&first),
            open(&retransmit),
            "a retransmitted REGISTER gets the same answer"
        );
        assert!(matches!(open(&first), LinkMsg::Registered { .. }));
        assert_eq!(h.count(C::RegisterRepeat), 1);
        assert_eq!(h.shared.connections(), 1);
        let dup = LinkMsg::Register {
            boot: 1,
            request: 2,
            conn_id: 5,
            client: a,
        }
        .seal(&h.link, h.now);
        let out = h.feed(&[(Via::Host, host, &dup)]);
        assert!(matches!(
            LinkMsg::open(&out[0].2, &h.link, h.now).unwrap(),
            LinkMsg::RegisterFailed { reason: 2, .. }
        ));
        // Close frees the tuple and the route.
        let close = LinkMsg::Close {
            boot: 1,
            request: 3,
            conn_id: 5,
        }
        .seal(&h.link, h.now);
        let out = h.feed(&[(Via::Host, host, &close)]);
        assert!(matches!(
            LinkMsg::open(&out[0].2, &h.link, h.now).unwrap(),
            LinkMsg::Closed { found: true, .. }
        ));
        assert!(h.shared.tuples.get(&a).is_none());
        assert!(h.shared.conns.get(5).is_none());
        assert_eq!(h.shared.connections(), 0);
    }

    #[test]
    fn replayed_close_cannot_close_a_later_connection() {
        let mut h = Harness::default();
        let a = addr("10.0.0.1:4000");
        let host = h.host_addr;
        h.register(5, a);
        let close = LinkMsg::Close {
            boot: 1,
            request: 9,
            conn_id: 5,
        }
        .seal(&h.link, h.now);
        h.feed(&[(Via::Host, host, &close)]);
        assert!(h.shared.conns.get(5).is_none());
        let again = LinkMsg::Register {
            boot: 1,
            request: 10,
            conn_id: 5,
            client: a,
        }
        .seal(&h.link, h.now);
        h.feed(&[(Via::Host, host, &again)]);
        assert!(h.shared.conns.get(5).is_some());
        // A captured CLOSE sent again, within its validity: nothing happens.
        assert!(h.feed(&[(Via::Host, host, &close)]).is_empty());
        assert!(
            h.shared.conns.get(5).is_some(),
            "a replayed CLOSE closes nothing"
        );
    }

    #[test]
    fn handshake_replies_go_only_to_recent_handshakes_and_are_no_larger() {
        let mut h = Harness::default();
        let a = addr("10.0.0.1:4000");
        let host = h.host_addr;
        let mut reply = vec![0xEE; 200];
        reply[0] = MsgType::HandshakeReply as u8;
        let framed = |r: &[u8]| {
            let mut buf = vec![0u8; r.len() + 40];
            let n = hostlink::emit_tuple_data(LinkType::ToClientReply, &a, r, &mut buf);
            buf.truncate(n);
            buf
        };
        // No HANDSHAKE came from `a`: a host cannot aim a reply at it.
        assert!(h.feed(&[(Via::Host, host, &framed(&reply))]).is_empty());
        let mut hs = vec![0u8; HANDSHAKE_LEN];
        hs[0] = b'H';
        assert_eq!(h.client(a, &hs).len(), 1);
        // Larger than the HANDSHAKE that drew it: refused.
        let mut big = vec![0xEE; HANDSHAKE_LEN + 1];
        big[0] = MsgType::HandshakeReply as u8;
        assert!(h.feed(&[(Via::Host, host, &framed(&big))]).is_empty());
        assert_eq!(
            h.feed(&[(Via::Host, host, &framed(&reply))]),
            vec![(Via::Client(0), a, reply.clone())]
        );
        assert!(
            h.feed(&[(Via::Host, host, &framed(&reply))]).is_empty(),
            "one reply per HANDSHAKE"
        );
        // A HANDSHAKE's permission expires.
        h.client(a, &hs);
        h.now = Ticks(h.now.0 + 11 * TICKS_PER_SECOND);
        assert!(h.feed(&[(Via::Host, host, &framed(&reply))]).is_empty());
    }

    #[test]
    fn data_and_close_only_from_the_owning_host() {
        let other = addr("127.0.0.2:7000");
        let other_key = LinkKey([8; 16]);
        let mut h = Harness::with_hosts(CoreConfig::new(S), &[(other, other_key.clone())]);
        let a = addr("10.0.0.1:4000");
        h.register(77, a);
        let mut back = [0u8; 100];
        let n = hostlink::emit_conn_data(LinkType::ToClientData, 77, &data(40), &mut back);
        assert!(h.feed(&[(Via::Host, other, &back[..n])]).is_empty());
        let close = LinkMsg::Close {
            boot: 1,
            request: 1,
            conn_id: 77,
        }
        .seal(&other_key.cipher(), h.now);
        let out = h.feed(&[(Via::Host, other, &close)]);
        assert!(out.iter().all(|(_, _, b)| !matches!(
            LinkMsg::open(b, &other_key.cipher(), h.now),
            Ok(LinkMsg::Closed { found: true, .. })
        )));
        assert!(h.shared.conns.get(77).is_some(), "another host's CLOSE");
        // The owner still reaches its client.
        let host = h.host_addr;
        assert_eq!(h.feed(&[(Via::Host, host, &back[..n])]).len(), 1);
    }

    #[test]
    fn idle_connections_expire_are_unstored_and_their_host_is_told() {
        let mut cfg = CoreConfig::new(S);
        cfg.idle_timeout = Duration::from_secs(60);
        let (store, stored) = crossbeam::channel::unbounded();
        let mut h = Harness::build(cfg, &[], Some(store));
        let (a, b) = (addr("10.0.0.1:4000"), addr("10.0.0.2:4000"));
        h.register(1, a);
        h.register(2, b);
        assert!(h.tick().is_empty(), "nothing idle yet");
        // b's client keeps talking; a's goes quiet.
        h.now = Ticks(h.now.0 + 40 * TICKS_PER_SECOND);
        assert_eq!(h.client(b, &data(60)).len(), 1);
        h.now = Ticks(h.now.0 + 30 * TICKS_PER_SECOND);
        let out = h.tick();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0, out[0].1), (Via::Host, h.host_addr));
        assert_eq!(
            LinkMsg::open(&out[0].2, &h.link, h.now),
            Ok(LinkMsg::Expired { conn_id: 1 })
        );
        assert!(h.shared.conns.get(1).is_none());
        assert!(h.shared.tuples.get(&a).is_none());
        assert!(h.shared.conns.get(2).is_some());
        assert_eq!(h.shared.connections(), 1);
        assert_eq!(h.count(C::Expired), 1);
        let removed: Vec<_> = stored
            .try_iter()
            .filter(|op| matches!(op, StoreOp::Remove { .. }))
            .collect();
        assert_eq!(removed.len(), 1, "the removal is persisted");
        // The next sweep is not due yet; when it is, b (active 30 s ago) stays.
        assert!(h.tick().is_empty());
        h.now = Ticks(h.now.0 + 15 * TICKS_PER_SECOND);
        assert!(h.tick().is_empty());
        assert!(h.shared.conns.get(2).is_some());
    }

    #[test]
    fn idle_sweep_that_fills_tx_goes_on_at_the_next_tick() {
        let mut cfg = CoreConfig::new(S);
        cfg.idle_timeout = Duration::from_secs(60);
        let mut h = Harness::new(cfg);
        for i in 0..5u64 {
            h.register(i, SocketAddr::from(([10, 0, 0, i as u8], 1)));
        }
        h.now = Ticks(h.now.0 + 61 * TICKS_PER_SECOND);
        h.tx = TxQueue::new(2);
        assert_eq!(h.tick().len(), 2);
        assert_eq!(h.tick().len(), 2);
        assert_eq!(h.tick().len(), 1);
        assert_eq!(h.shared.connections(), 0);
    }

    #[test]
    fn a_restarted_host_releases_its_old_connections() {
        let other = addr("127.0.0.2:7000");
        let other_key = LinkKey([8; 16]);
        let mut h = Harness::with_hosts(CoreConfig::new(S), &[(other, other_key.clone())]);
        let host = h.host_addr;
        let (a, b, c) = (addr("10.0.0.1:1"), addr("10.0.0.2:1"), addr("10.0.0.3:1"));
        h.register(1, a);
        h.register(2, b);
        let theirs = LinkMsg::Register {
            boot: 7,
            request: 1,
            conn_id: 3,
            client: c,
        }
        .seal(&other_key.cipher(), h.now);
        assert_eq!(h.feed(&[(Via::Host, other, &theirs)]).len(), 1);
        // Host 0 restarts with boot 2: nothing of its new run is taken before its HELLO.
        let register = |request: u64, conn_id: u64, h: &Harness| {
            LinkMsg::Register {
                boot: 2,
                request,
                conn_id,
                client: addr("10.0.0.9:1"),
            }
            .seal(&h.link, h.now)
        };
        let early = register(5, 9, &h);
        assert!(h.feed(&[(Via::Host, host, &early)]).is_empty());
        assert_eq!(h.count(C::DropHostStaleBoot), 1);
        let hello = LinkMsg::Hello { boot: 2 }.seal(&h.link, h.now);
        let out = h.feed(&[(Via::Host, host, &hello)]);
        assert_eq!(
            LinkMsg::open(&out[0].2, &h.link, h.now),
            Ok(LinkMsg::HelloAck {
                boot: 2,
                released: 2
            })
        );
        assert!(h.shared.conns.get(1).is_none() && h.shared.conns.get(2).is_none());
        assert!(h.shared.tuples.get(&a).is_none() && h.shared.tuples.get(&b).is_none());
        assert!(
            h.shared.conns.get(3).is_some(),
            "another host's connection stays"
        );
        assert_eq!((h.count(C::HostRestarts), h.count(C::Released)), (1, 2));
        // A retransmitted HELLO of the same boot releases nothing more.
        let again = LinkMsg::Hello { boot: 2 }.seal(&h.link, h.now);
        let out = h.feed(&[(Via::Host, host, &again)]);
        assert!(matches!(
            LinkMsg::open(&out[0].2, &h.link, h.now),
            Ok(LinkMsg::HelloAck { released: 0, .. })
        ));
        // A delayed HELLO of the old run (sent before the new one) is refused.
        let old = LinkMsg::Hello { boot: 1 }.seal(&h.link, Ticks(h.now.0 - TICKS_PER_SECOND));
        assert!(h.feed(&[(Via::Host, host, &old)]).is_empty());
        assert_eq!(h.count(C::DropHostStaleBoot), 2);
        // The new run registers.
        let out = h.feed(&[(Via::Host, host, &register(6, 9, &h))]);
        assert!(matches!(
            LinkMsg::open(&out[0].2, &h.link, h.now),
            Ok(LinkMsg::Registered { conn_id: 9, .. })
        ));
    }

    #[test]
    fn registry_full_is_reported() {
        let mut cfg = CoreConfig::new(2);
        cfg.max_connections = 4;
        let mut h = Harness::new(cfg);
        for i in 0..4u64 {
            let msg = LinkMsg::Register {
                boot: 1,
                request: i,
                conn_id: i,
                client: SocketAddr::from(([10, 0, 0, i as u8], 1)),
            }
            .seal(&h.link, h.now);
            let host = h.host_addr;
            h.feed(&[(Via::Host, host, &msg)]);
        }
        let msg = LinkMsg::Register {
            boot: 1,
            request: 9,
            conn_id: 9,
            client: addr("10.0.0.9:1"),
        }
        .seal(&h.link, h.now);
        let host = h.host_addr;
        let out = h.feed(&[(Via::Host, host, &msg)]);
        assert!(matches!(
            LinkMsg::open(&out[0].2, &h.link, h.now).unwrap(),
            LinkMsg::RegisterFailed { reason: 1, .. }
        ));
    }

    #[test]
    fn ticks_never_run_backwards_and_respect_the_cap() {
        let h = Harness::default();
        assert_eq!(h.shared.issue_ticks(Ticks(100)), Ticks(100));
        assert_eq!(
            h.shared.issue_ticks(Ticks(50)),
            Ticks(101),
            "strictly later, even when the clock steps back"
        );
        assert_eq!(h.shared.issue_ticks(Ticks(100)), Ticks(102));
        h.shared.set_issue_cap(Ticks(150));
        assert_eq!(h.shared.issue_ticks(Ticks(200)), Ticks(150));
        assert_eq!(
            h.shared.issue_ticks(Ticks(200)),
            Ticks(150),
            "never past the reservation"
        );
        h.shared.set_issue_cap(Ticks(300));
        assert_eq!(h.shared.issue_ticks(Ticks(200)), Ticks(200));
    }

    #[test]
    fn restored_connections_refuse_pre_restart_rebinds() {
        let mut h = Harness::default();
        let old = addr("10.0.0.1:4000");
        let new = addr("10.0.0.2:4000");
        let issued = h.register(42, old);
        h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
        let u = h.client(new, &data(49));
        let (rebind, _) = rebind_from(&issued, &u[0].2);
        // The gateway "crashes" before this REBIND is seen; a new one restores connection 42
        // with the floor at the last time it could have issued.
        let mut fresh = Harness::default();
        fresh.now = h.now;
        let stored = StoredConn {
            epoch: 3,
            index: 0,
            conn_id: 42,
            secret: issued.secret.clone(),
            last_rebind: Ticks(0),
            tuple: Some(old),
            host: 0,
        };
        // A connection of an epoch the gateway does not hold is refused as such.
        let other_epoch = StoredConn {
            epoch: 9,
            ..stored.clone()
        };
        let err = fresh.shared.restore(&other_epoch, h.now).unwrap_err();
        assert_eq!(err, RegistryError::UnknownEpoch(9));
        assert_eq!(err.to_string(), "no registry for key epoch 9");
        fresh.shared.restore(&stored, h.now).unwrap();
        assert!(fresh.client(new, &rebind).is_empty());
        assert_eq!(fresh.count(C::RejectReplay), 1);
        // DATA from the restored tuple still flows at once.
        assert_eq!(fresh.client(old, &data(60))[0].0, Via::Host);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn handler_never_panics(
            datagrams in proptest::collection::vec(
                (any::<bool>(), 0u8..4, proptest::collection::vec(any::<u8>(), 0..400)),
                1..20,
            ),
            first_bytes in proptest::collection::vec(
                proptest::sample::select(vec![b'D', b'H', b'R', b'h', b'U', b'r', 1, 2, 3, 4, 0x10, 0x13, 0]),
                20,
            ),
        ) {
            let mut h = Harness::default();
            h.register(1, addr("10.0.0.1:1"));
            let host = h.host_addr;
            let owned: Vec<(Via, SocketAddr, Vec<u8>)> = datagrams
                .into_iter()
                .zip(first_bytes)
                .map(|((from_host, src, mut bytes), first)| {
                    if let Some(b) = bytes.first_mut() { *b = first; }
                    if from_host {
                        (Via::Host, host, bytes)
                    } else {
                        (Via::Client(0), SocketAddr::from(([10, 0, 0, src], 1)), bytes)
                    }
                })
                .collect();
            let feed: Vec<(Via, SocketAddr, &[u8])> =
                owned.iter().map(|(v, a, b)| (*v, *a, &b[..])).collect();
            for (_, _, reply) in h.feed(&feed) {
                prop_assert!(reply.len() <= crate::gateway::tx::SLOT_LEN);
            }
        }
    }
}
