//! A simulated world for tests and fuzz targets (quinn-proto's `Pair` is the model): the real
//! client cores ([`Client`]), the real gateway core ([`Shared`] + [`WorkerCore`]) and the real
//! echo host ([`HostCore`]), wired by an in-memory network over a virtual clock.
//!
//! - **Clock.** [`World::now`] only moves in [`World::step`]'s callers ([`World::drive_until`],
//!   [`World::run_for`]), jumping to the next event (a datagram's arrival or a core's timer).
//!   Every core gets the same `now`, so runs are deterministic for a given seed (the cores'
//!   nonces are random, but no outcome depends on their values).
//! - **Network.** Client ↔ gateway datagrams take `latency` plus a uniform `jitter` (which
//!   reorders them) and are lost with probability `loss` (seeded RNG); [`World::drop_if`]
//!   drops chosen ones. The host link (gateway ↔ host) is a data-centre link: `link_latency`,
//!   no loss.
//! - **NAT moves.** [`World::move_client`] (or [`World::move_client_to`]) gives a client a new source tuple without telling
//!   its core; datagrams to its old tuple are then undeliverable.
//! - **Gateway.** One worker; the registry changes it would persist are kept in memory, so
//!   [`World::restart_gateway`] rebuilds the core from them as `gateway::run` does from the
//!   store (every `L` raised to the last time issued before the restart).
//!
//! Compiled for the crate's tests and with the `testing` feature (integration tests in
//! `tests/`, fuzz targets).
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crossbeam::channel::{Receiver, unbounded};

use crate::client::{Client, ClientConfig, ClientEvent, ClientState, MAX_DATAGRAM_LEN};
use crate::engine::{Backend, TrialKeys};
use crate::gateway::core::{
    CommitMode, CommitRefusal, CommitRequest, CommitResult, CoreConfig, EpochCrypto, HostPeer,
    RegisterRequest, RegisterResult, RemoteChange, Rotation, Shared, WorkerCore,
};
use crate::gateway::metrics::C;
use crate::gateway::store::{StoreOp, StoredConn};
use crate::host::clients::{ClientEntry, ClientsFile};
use crate::host::{GatewayNet, HostConfig, HostCore, MAX_DATAGRAM};
use crate::hostlink::LinkKey;
use crate::io::batch::{Rx, TxQueue, Via};
use crate::keys::{EpochKeys, MasterSecret};
use crate::time::Ticks;
use crate::wire::ClientCredentials;

/// 2026-01-01T00:00:00Z.
pub const T0: Ticks = Ticks(639_028_224_000_000_000);
/// The gateway's client-facing address.
pub const GATEWAY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), 443);
/// The gateway worker's host-link address.
pub const GATEWAY_LINK: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 7000);
/// Gateway `g`'s host-link address (gateway 0's is [`GATEWAY_LINK`]).
pub fn gateway_link(g: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1 + g as u8)), 7000)
}

/// The echo host's address.
pub const HOST: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100)), 9000);

/// The world's settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seeds the network's RNG (loss, jitter, new tuples).
    pub seed: u64,
    /// Client ↔ gateway one-way latency.
    pub latency: Duration,
    /// Extra client ↔ gateway delay, uniform in `[0, jitter)`: reorders datagrams.
    pub jitter: Duration,
    /// Client ↔ gateway loss probability, each direction.
    pub loss: f64,
    /// Gateway ↔ host one-way latency.
    pub link_latency: Duration,
    /// S, slot keys per connection.
    pub slots: usize,
    /// The gateway's first epoch.
    pub epoch: u32,
    pub client: ClientConfig,
    /// Gateway settings (`slots` is taken from above).
    pub core: CoreConfig,
    /// Enrolled clients (the host's clients file); [`World::add_client`] uses them in order.
    pub enrolled: usize,
    /// Host settings (`gateways` is set to the world's gateway).
    pub host: HostConfig,
    /// `Some(latency)`: the gateway defers its commits (`CommitMode::Deferred`, as in
    /// cluster mode) to a shared store the world models, which answers after `latency`.
    pub commit_latency: Option<Duration>,
    /// Gateways sharing the client-facing address behind ECMP (cluster mode: more than one
    /// needs `commit_latency`). Gateway `g`'s host link is [`gateway_link`]`(g)`; the store's
    /// watch tells the others of each change after `commit_latency`. Rotation and restart
    /// are single-gateway only.
    pub gateways: usize,
    /// The host echoes (the default), or runs in application mode (`HostConfig::echo`):
    /// then [`World::set_host_app`] gives the application.
    pub host_echo: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        let slots = 8;
        SimConfig {
            seed: 1,
            latency: Duration::from_millis(20),
            jitter: Duration::ZERO,
            loss: 0.0,
            link_latency: Duration::from_micros(200),
            slots,
            epoch: 0x107,
            client: ClientConfig::default(),
            core: CoreConfig::new(slots),
            enrolled: 1024,
            host: HostConfig::default(),
            commit_latency: None,
            host_echo: true,
            gateways: 1,
        }
    }
}

/// A datagram on the simulated network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

/// What the network did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub sent: u64,
    pub delivered: u64,
    /// Lost to `loss` or [`World::drop_if`].
    pub lost: u64,
    /// Addressed to a tuple nobody holds (a client's old tuple after a move).
    pub no_route: u64,
    /// In flight to the gateway when it restarted.
    pub lost_in_restart: u64,
}

/// One simulated client: its real core, its current tuple, and what it got.
pub struct SimClient {
    pub core: Client,
    pub creds: ClientCredentials,
    pub tuple: SocketAddr,
    /// Every datagram the core sent, in order (lost ones included).
    pub sent: Vec<Vec<u8>>,
    /// Every datagram handed to the core, in order (injected ones included).
    pub delivered: Vec<Vec<u8>>,
    /// Payloads received, in order.
    pub received: Vec<Vec<u8>>,
    pub events: Vec<ClientEvent>,
}

impl SimClient {
    /// Hands `datagram` to the core at `now` and collects what it yields.
    fn handle(&mut self, now: Ticks, datagram: &[u8]) {
        self.core.handle(now, datagram);
        self.delivered.push(datagram.to_vec());
        self.collect();
    }

    fn collect(&mut self) {
        while let Some(e) = self.core.poll_event() {
            self.events.push(e);
        }
        while let Some(p) = self.core.poll_received() {
            self.received.push(p);
        }
    }
}

/// One call of the gateway core, as [`World::watch_gateway`] sees it.
pub struct GatewayCall<'a> {
    pub now: Ticks,
    /// The receive batch (empty for a timer tick).
    pub rx: &'a [Datagram],
    /// What the core queued in answer, in order.
    pub tx: &'a [Datagram],
    pub shared: &'a Shared,
}

/// The gateway: its shared state, one worker, and the registry as it would be persisted.
pub struct SimGateway {
    pub shared: Arc<Shared>,
    pub worker: WorkerCore,
    store_rx: Receiver<StoreOp>,
    tx: TxQueue,
    /// The epoch keys the gateway holds, newest last.
    epochs: Vec<u32>,
    /// What the store holds: connections by `(epoch, index)`.
    pub persisted: HashMap<(u32, u32), StoredConn>,
    /// The persisted grace deadline of the previous epoch (zero: none).
    pub persisted_grace: Ticks,
    /// Restarts so far.
    pub restarts: u32,
    /// Deferred commits on their way to the store model: `(due, request)`.
    commits: Vec<(Ticks, CommitRequest)>,
    /// Deferred registrations on their way to the store model.
    registrations: Vec<(Ticks, RegisterRequest)>,
    /// The store model refuses every commit as `Unavailable` (a store without quorum).
    pub store_down: bool,
}

impl SimGateway {
    /// Deferred commits the worker holds unanswered.
    pub fn pending_commits_of_worker(&self) -> usize {
        self.worker.pending_commits()
    }

    /// The worker's counter `c` (since the last restart).
    pub fn count(&self, c: C) -> u64 {
        self.worker.metrics().get(c)
    }

    /// The store model's decision on a deferred commit (this gateway's own store).
    fn decide(&mut self, r: &CommitRequest) -> CommitResult {
        self.persist();
        decide_in(&mut self.persisted, self.store_down, r)
    }

    /// The store model's decision on a deferred registration (this gateway's own store).
    fn decide_registration(&mut self, r: &RegisterRequest) -> RegisterResult {
        self.persist();
        register_in(&mut self.persisted, self.store_down, r)
    }

    /// Applies the store operations the core queued, as the store writer would.
    fn persist(&mut self) {
        while let Ok(op) = self.store_rx.try_recv() {
            self.shared.mark_durable(1);
            match op {
                StoreOp::Register(c) => {
                    self.persisted.insert((c.epoch, c.index), c);
                }
                StoreOp::Rebind {
                    epoch,
                    index,
                    last_rebind,
                    tuple,
                } => {
                    if let Some(c) = self.persisted.get_mut(&(epoch, index)) {
                        c.last_rebind = last_rebind;
                        c.tuple = Some(tuple);
                    }
                }
                StoreOp::Unbind { epoch, index } => {
                    if let Some(c) = self.persisted.get_mut(&(epoch, index)) {
                        c.tuple = None;
                    }
                }
                StoreOp::Remove { epoch, index, .. } => {
                    self.persisted.remove(&(epoch, index));
                }
                StoreOp::Rotate {
                    grace_until,
                    drop,
                    register,
                    ..
                } => {
                    if let Some(d) = drop {
                        self.persisted.retain(|(e, _), _| *e != d);
                    }
                    for c in register {
                        self.persisted.insert((c.epoch, c.index), c);
                    }
                    self.persisted_grace = grace_until;
                }
                StoreOp::EndGrace { epoch } => {
                    self.persisted.retain(|(e, _), _| *e != epoch);
                    self.persisted_grace = Ticks(0);
                }
                StoreOp::Reserve { .. }
                | StoreOp::SetEpoch { .. }
                | StoreOp::ScheduleFrom { .. } => {}
            }
        }
    }
}

/// A small deterministic RNG (splitmix64).
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

type DropFn = Box<dyn FnMut(&Datagram) -> bool>;
type WatchFn = Box<dyn FnMut(&GatewayCall<'_>)>;
/// An application on the host core: runs after each delivery to the host and each host
/// timer, before the host's output goes on the wire.
type HostAppFn = Box<dyn FnMut(Ticks, &mut HostCore)>;

/// The simulated world. See the module docs.
pub struct World {
    pub cfg: SimConfig,
    pub now: Ticks,
    pub clients: Vec<SimClient>,
    pub gateway: SimGateway,
    pub host: HostCore,
    pub net: NetStats,
    rng: SimRng,
    master: MasterSecret,
    link_key: LinkKey,
    enrolled: Vec<ClientCredentials>,
    /// `(arrival, sequence)` → datagram.
    in_flight: BinaryHeap<Reverse<(Ticks, u64)>>,
    packets: HashMap<u64, Datagram>,
    next_seq: u64,
    drop_if: Option<DropFn>,
    hold_if: Option<DropFn>,
    /// Datagrams [`World::hold_if`] took off the wire, oldest first.
    held: Vec<Datagram>,
    watch: Option<WatchFn>,
    /// Every datagram put on the wire (before loss), when `record` is on.
    pub wire_log: Vec<Datagram>,
    pub record: bool,
    /// The buffer the host's `poll_transmit` gets (at most [`MAX_DATAGRAM`]).
    pub host_out_len: usize,
    /// Gateways 1.. of a cluster (`SimConfig::gateways`); `gateway` is gateway 0. Inside
    /// [`World::step`] the gateway being run is swapped into `gateway`.
    pub peers: Vec<SimGateway>,
    /// Which gateways are down (their datagrams are lost; ECMP hashes over the others).
    pub dead: Vec<bool>,
    /// The index of the gateway in `gateway` (only not 0 inside `step`).
    current: usize,
    /// The cluster's shared store (more than one gateway), by `(epoch, index)`.
    pub cluster_store: Option<HashMap<(u32, u32), StoredConn>>,
    /// Watch events on their way: `(due, gateway, change)`.
    remote_events: Vec<(Ticks, usize, RemoteChange)>,
    host_app: Option<HostAppFn>,
    buf: Vec<u8>,
}

impl World {
    pub fn new(cfg: SimConfig) -> World {
        let master = MasterSecret::from_bytes([0x33; 32]);
        let link_key = LinkKey([9; 16]);
        let enrolled: Vec<ClientCredentials> = (0..cfg.enrolled).map(creds).collect();
        let clients = ClientsFile::from_entries(
            enrolled
                .iter()
                .enumerate()
                .map(|(i, c)| ClientEntry {
                    name: format!("c{i}"),
                    creds: c.clone(),
                })
                .collect(),
        );
        let host_cfg = HostConfig {
            gateways: vec![GatewayNet::new(GATEWAY_LINK.ip(), 24).expect("a /24")],
            echo: cfg.host_echo,
            ..cfg.host.clone()
        };
        let mut host = HostCore::with_config(&link_key, clients, host_cfg);
        host.set_start(T0);
        assert!(
            cfg.gateways <= 1 || cfg.commit_latency.is_some(),
            "several gateways share a store: set commit_latency"
        );
        let gateway = build_gateway(&cfg, &master, &link_key, &[cfg.epoch], T0);
        let peers = (1..cfg.gateways)
            .map(|_| build_gateway(&cfg, &master, &link_key, &[cfg.epoch], T0))
            .collect();
        World {
            now: T0,
            clients: Vec::new(),
            gateway,
            host,
            net: NetStats::default(),
            rng: SimRng::new(cfg.seed),
            master,
            link_key,
            enrolled,
            in_flight: BinaryHeap::new(),
            packets: HashMap::new(),
            next_seq: 0,
            drop_if: None,
            hold_if: None,
            held: Vec::new(),
            watch: None,
            wire_log: Vec::new(),
            record: false,
            host_out_len: MAX_DATAGRAM,
            peers,
            dead: vec![false; cfg.gateways.max(1)],
            current: 0,
            cluster_store: (cfg.gateways > 1).then(HashMap::new),
            remote_events: Vec::new(),
            host_app: None,
            buf: vec![0u8; MAX_DATAGRAM],
            cfg,
        }
    }

    /// Adds a client (the next enrolled one) at a fresh tuple; it starts its handshake now.
    pub fn add_client(&mut self) -> usize {
        let i = self.clients.len();
        let creds = self.enrolled[i].clone();
        let tuple = self.fresh_tuple();
        self.clients.push(SimClient {
            core: Client::new(self.cfg.client.clone(), creds.clone(), self.now),
            creds,
            tuple,
            sent: Vec::new(),
            delivered: Vec::new(),
            received: Vec::new(),
            events: Vec::new(),
        });
        i
    }

    /// Client `i` starts over with a new handshake from its tuple (what an application does
    /// when its client failed).
    pub fn reconnect_client(&mut self, i: usize) {
        let c = &mut self.clients[i];
        c.core = Client::new(self.cfg.client.clone(), c.creds.clone(), self.now);
    }

    /// Adds `n` clients and drives until all are connected (or `limit` passes).
    pub fn connect_clients(&mut self, n: usize, limit: Duration) -> bool {
        let first = self.clients.len();
        for _ in 0..n {
            self.add_client();
        }
        self.drive_until(limit, |w| {
            w.clients[first..]
                .iter()
                .all(|c| c.core.state() == ClientState::Connected)
        })
    }

    pub fn client(&self, i: usize) -> &SimClient {
        &self.clients[i]
    }

    /// Queues `payload` on client `i` (sent at the next step).
    pub fn send(&mut self, i: usize, payload: &[u8]) {
        self.clients[i].core.send(payload).expect("client can send");
    }

    /// A NAT move: client `i` gets a new source tuple; its core is not told.
    pub fn move_client(&mut self, i: usize) -> SocketAddr {
        let t = self.fresh_tuple();
        self.clients[i].tuple = t;
        t
    }

    /// A NAT move to a chosen tuple (IPv4 or IPv6), e.g. one another client held.
    pub fn move_client_to(&mut self, i: usize, tuple: SocketAddr) {
        self.clients[i].tuple = tuple;
    }

    /// Drops, from now on, every datagram for which `f` returns true (replaces any earlier
    /// filter); [`World::clear_drop`] removes it.
    pub fn drop_if(&mut self, f: impl FnMut(&Datagram) -> bool + 'static) {
        self.drop_if = Some(Box::new(f));
    }

    pub fn clear_drop(&mut self) {
        self.drop_if = None;
    }

    /// Takes off the wire, from now on, every datagram for which `f` returns true, keeping it
    /// for [`World::take_held`] (replaces any earlier filter; `clear_hold` removes it).
    pub fn hold_if(&mut self, f: impl FnMut(&Datagram) -> bool + 'static) {
        self.hold_if = Some(Box::new(f));
    }

    pub fn clear_hold(&mut self) {
        self.hold_if = None;
    }

    /// The held datagrams, oldest first; put them back with [`World::inject`] or
    /// [`World::deliver`].
    pub fn take_held(&mut self) -> Vec<Datagram> {
        std::mem::take(&mut self.held)
    }

    /// Calls `f` after every call of the gateway core (each receive batch and each timer
    /// tick) with what went in and what came out, e.g. to check invariants.
    pub fn watch_gateway(&mut self, f: impl FnMut(&GatewayCall<'_>) + 'static) {
        self.watch = Some(Box::new(f));
    }

    /// Hands `datagram` straight to client `i`'s core now, as if the gateway had sent it
    /// (forged, replayed or hand-built input), bypassing the network.
    pub fn deliver(&mut self, i: usize, datagram: &[u8]) {
        let now = self.now;
        self.clients[i].handle(now, datagram);
    }

    /// DATA from the host to client `i` on its current connection, sealed with a chosen
    /// `seq` (to replay, reorder or jump); `None` before it is connected.
    pub fn host_data(&self, i: usize, seq: u64, payload: &[u8]) -> Option<Vec<u8>> {
        let conn_id = self.clients[i].core.conn_id()?;
        self.host.seal_data_for(conn_id, seq, payload)
    }

    /// The host link's key (to build or forge host-link messages).
    pub fn link_key(&self) -> &LinkKey {
        &self.link_key
    }

    /// Runs `app` on the host core after each delivery to it and each host timer (with
    /// `SimConfig { host_echo: false, .. }`: it reads `poll_event` and answers with `send`).
    pub fn set_host_app(&mut self, app: impl FnMut(Ticks, &mut HostCore) + 'static) {
        self.host_app = Some(Box::new(app));
    }

    fn run_host_app(&mut self) {
        if let Some(app) = &mut self.host_app {
            app(self.now, &mut self.host);
        }
    }

    /// Puts a datagram on the wire as if `from` had sent it (e.g. a forged or hand-built one).
    pub fn inject(&mut self, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        self.transmit(Datagram { from, to, data });
    }

    /// Epoch rotation: the gateway takes `epoch` (its keys from the same master secret) and
    /// keeps the current one as the previous (grace).
    pub fn rotate_epoch(&mut self, epoch: u32) {
        self.gateway
            .shared
            .rotate(epoch_crypto(&self.master, epoch, self.cfg.slots));
        self.gateway.epochs.push(epoch);
        self.gateway.persist();
    }

    /// Epoch rotation with a grace period: the previous epoch is accepted for `grace`, then
    /// dropped (its connections released, their hosts told) at the first step after it.
    pub fn rotate_epoch_with_grace(&mut self, epoch: u32, grace: Duration) -> Rotation {
        let until = self.now.saturating_add(grace);
        let r = self.gateway.shared.rotate_with_grace(
            epoch_crypto(&self.master, epoch, self.cfg.slots),
            self.now,
            until,
        );
        self.gateway.epochs.push(epoch);
        self.gateway.persist();
        r
    }

    /// The keys of `epoch` under the world's master secret (to build what a gateway of that
    /// epoch would send).
    pub fn epoch_keys(&self, epoch: u32) -> EpochKeys {
        EpochKeys::derive(&self.master, epoch, self.cfg.slots).expect("epoch keys")
    }

    /// Restarts the gateway: a new core from the persisted registry, every `L` raised to the
    /// last time issued before the restart (as `gateway::run` does with its reservation).
    /// Datagrams in flight to it are lost.
    pub fn restart_gateway(&mut self) {
        self.gateway.persist();
        let floor = self.gateway.shared.last_issued();
        let epochs: Vec<u32> = self.gateway.epochs.iter().rev().take(1).copied().collect();
        let mut g = build_gateway(&self.cfg, &self.master, &self.link_key, &epochs, self.now);
        let current = epochs[0];
        let grace = self.gateway.persisted_grace;
        let previous = current.wrapping_sub(1);
        if grace.0 != 0 {
            g.shared
                .restore_previous(epoch_crypto(&self.master, previous, self.cfg.slots), grace);
        }
        for c in self.gateway.persisted.values() {
            if c.epoch != current && (grace.0 == 0 || c.epoch != previous) {
                g.shared.add_epoch_registry(c.epoch);
            }
            // A connection of an epoch whose keys are gone is not restored (as in `run`).
            let _ = g.shared.restore(c, floor);
        }
        g.shared.resume_key_delivery(self.now);
        g.shared.set_floor(Ticks(floor.0.saturating_add(1)));
        g.persisted = std::mem::take(&mut self.gateway.persisted);
        g.persisted_grace = grace;
        g.restarts = self.gateway.restarts + 1;
        g.store_down = self.gateway.store_down;
        self.gateway = g;
        let lost: Vec<u64> = self
            .packets
            .iter()
            .filter(|(_, d)| d.to == GATEWAY || d.to == GATEWAY_LINK)
            .map(|(s, _)| *s)
            .collect();
        for s in lost {
            self.packets.remove(&s);
            self.net.lost_in_restart += 1;
        }
    }

    /// Does everything due at `now`: delivers arrived datagrams (the gateway's as one batch),
    /// runs due timers, and puts every core's output on the wire. Returns whether anything
    /// happened.
    pub fn step(&mut self) -> bool {
        let mut progress = false;
        let now = self.now;
        // Deliveries.
        let mut to_gateway: Vec<Vec<Datagram>> = vec![Vec::new(); self.dead.len()];
        while let Some(&Reverse((at, seq))) = self.in_flight.peek() {
            if at > now {
                break;
            }
            self.in_flight.pop();
            let Some(d) = self.packets.remove(&seq) else {
                continue; // lost in a restart
            };
            progress = true;
            if let Some(g) = self.gateway_for(&d) {
                if self.dead[g] {
                    self.net.lost += 1;
                } else {
                    self.net.delivered += 1;
                    to_gateway[g].push(d);
                }
            } else if d.to == HOST {
                self.net.delivered += 1;
                self.host.handle(now, d.from, &d.data);
                self.run_host_app();
                self.drain_host();
            } else if let Some(c) = self.clients.iter_mut().find(|c| c.tuple == d.to) {
                self.net.delivered += 1;
                if d.from == GATEWAY {
                    c.handle(now, &d.data);
                }
            } else {
                self.net.no_route += 1;
            }
        }
        for (g, batch) in to_gateway.into_iter().enumerate() {
            if !self.dead[g] {
                progress |= self.with_gateway(g, |w| w.step_gateway(now, &batch));
            }
        }
        progress |= self.deliver_remote_events(now);
        if self.host.poll_timeout().is_some_and(|t| t <= now) {
            self.host.handle_timeout(now);
            progress = true;
        }
        self.run_host_app();
        progress |= self.drain_host();
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            if c.core.poll_timeout().is_some_and(|t| t <= now) {
                c.core.handle_timeout(now);
                progress = true;
            }
            let mut out = Vec::new();
            let mut buf = [0u8; MAX_DATAGRAM_LEN];
            while let Some(n) = c.core.poll_transmit(now, &mut buf) {
                c.sent.push(buf[..n].to_vec());
                out.push(Datagram {
                    from: c.tuple,
                    to: GATEWAY,
                    data: buf[..n].to_vec(),
                });
            }
            c.collect();
            progress |= !out.is_empty();
            for d in out {
                self.transmit(d);
            }
        }
        self.gateway.persist();
        for p in &mut self.peers {
            p.persist();
        }
        progress
    }

    /// Runs the gateway in `self.gateway` for `now`: its receive batches, timers and the
    /// store's answers.
    fn step_gateway(&mut self, now: Ticks, rx_all: &[Datagram]) -> bool {
        let mut progress = false;
        // In receive batches of at most 64, as a worker reaps them.
        for batch in rx_all.chunks(64) {
            let rx: Vec<Rx<'_>> = batch
                .iter()
                .map(|d| Rx {
                    via: if d.to == GATEWAY {
                        Via::Client(u8::from(d.from.is_ipv6()))
                    } else {
                        Via::Host
                    },
                    from: d.from,
                    data: &d.data,
                })
                .collect();
            self.gateway
                .worker
                .handle_batch(now, &rx, &mut self.gateway.tx);
            self.drain_gateway(batch);
        }
        // Timers.
        if self.gateway.shared.end_grace(now).is_some() {
            progress = true;
        }
        self.gateway.worker.tick(now, &mut self.gateway.tx);
        progress |= self.drain_gateway(&[]);
        // The store model's answers to deferred commits.
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.gateway.commits)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.gateway.commits = later;
        for (_, r) in due {
            let result = self.decide_commit(&r);
            self.gateway
                .worker
                .handle_commit(r.ticket, result, &mut self.gateway.tx);
            self.drain_gateway(&[]);
            progress = true;
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.gateway.registrations)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.gateway.registrations = later;
        for (_, r) in due {
            let result = self.decide_registration(&r);
            self.gateway
                .worker
                .handle_registration(now, r.ticket, result, &mut self.gateway.tx);
            self.drain_gateway(&[]);
            progress = true;
        }
        progress
    }

    /// Runs `f` with gateway `g` swapped into `self.gateway`.
    fn with_gateway<R>(&mut self, g: usize, f: impl FnOnce(&mut World) -> R) -> R {
        if g > 0 {
            std::mem::swap(&mut self.gateway, &mut self.peers[g - 1]);
        }
        self.current = g;
        let r = f(self);
        self.current = 0;
        if g > 0 {
            std::mem::swap(&mut self.gateway, &mut self.peers[g - 1]);
        }
        r
    }

    /// Gateway `g` (at rest: outside `step`).
    pub fn gateway_at(&self, g: usize) -> &SimGateway {
        if g == 0 {
            &self.gateway
        } else {
            &self.peers[g - 1]
        }
    }

    /// Gateway `g`, to change its settings (at rest).
    pub fn gateway_at_mut(&mut self, g: usize) -> &mut SimGateway {
        if g == 0 {
            &mut self.gateway
        } else {
            &mut self.peers[g - 1]
        }
    }

    /// The gateway a datagram goes to: ECMP over the live gateways for the client-facing
    /// address (a hash of the source tuple), or the one whose host link it is addressed to.
    fn gateway_for(&self, d: &Datagram) -> Option<usize> {
        if d.to == GATEWAY {
            return self.ecmp(d.from);
        }
        (0..self.dead.len()).find(|g| gateway_link(*g) == d.to)
    }

    /// The live gateway ECMP picks for source `from` (the hash of the 4-tuple; the
    /// destination is the same for every client).
    pub fn ecmp(&self, from: SocketAddr) -> Option<usize> {
        let live: Vec<usize> = (0..self.dead.len()).filter(|g| !self.dead[*g]).collect();
        if live.is_empty() {
            return None;
        }
        let ip = match from.ip() {
            IpAddr::V4(a) => u64::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a) as u64,
        };
        let h = SimRng::new(ip ^ (u64::from(from.port()) << 40)).next_u64();
        Some(live[(h % live.len() as u64) as usize])
    }

    /// Takes gateway `g` down: datagrams to it are lost and ECMP hashes over the others.
    pub fn kill_gateway(&mut self, g: usize) {
        self.dead[g] = true;
    }

    /// Sends `datagram` from `from` to gateway `g`'s client-facing socket, whatever ECMP
    /// would pick (a copy sent to every gateway at once).
    pub fn inject_to_gateway(&mut self, g: usize, from: SocketAddr, data: Vec<u8>) {
        let now = self.now;
        let rx = [Datagram {
            from,
            to: GATEWAY,
            data,
        }];
        self.with_gateway(g, |w| w.step_gateway(now, &rx));
    }

    /// The store's decision on a commit: the gateway's own store model, or the cluster's
    /// shared one (whose watch then tells the other gateways).
    fn decide_commit(&mut self, r: &CommitRequest) -> CommitResult {
        let Some(store) = self.cluster_store.as_mut() else {
            return self.gateway.decide(r);
        };
        let result = decide_in(store, self.gateway.store_down, r);
        if let CommitResult::Committed { .. } = result {
            let conn = store[&(r.epoch, r.index)].clone();
            self.tell_others(conn);
        }
        result
    }

    fn decide_registration(&mut self, r: &RegisterRequest) -> RegisterResult {
        let Some(store) = self.cluster_store.as_mut() else {
            return self.gateway.decide_registration(r);
        };
        let result = register_in(store, self.gateway.store_down, r);
        if let RegisterResult::Registered { index } = result {
            let conn = store[&(r.epoch, index)].clone();
            self.tell_others(conn);
        }
        result
    }

    /// The store's watch: every other live gateway hears of `conn` after the store latency.
    fn tell_others(&mut self, conn: StoredConn) {
        let due = self
            .now
            .saturating_add(self.cfg.commit_latency.unwrap_or_default());
        for g in 0..self.dead.len() {
            if g != self.current && !self.dead[g] {
                let change = RemoteChange::Stored {
                    conn: conn.clone(),
                    ours: false,
                };
                self.remote_events.push((due, g, change));
            }
        }
    }

    fn deliver_remote_events(&mut self, now: Ticks) -> bool {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.remote_events)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.remote_events = later;
        let any = !due.is_empty();
        for (_, g, change) in due {
            if !self.dead[g] {
                self.gateway_at(g).shared.apply_remote(change);
            }
        }
        any
    }

    /// The next time something is due: an arrival or a core's timer.
    pub fn next_event(&self) -> Option<Ticks> {
        let arrival = self.in_flight.peek().map(|Reverse((t, _))| *t);
        let clients = self
            .clients
            .iter()
            .filter_map(|c| c.core.poll_timeout())
            .min();
        let commit = std::iter::once(&self.gateway)
            .chain(&self.peers)
            .flat_map(|g| {
                g.commits
                    .iter()
                    .map(|(t, _)| *t)
                    .chain(g.registrations.iter().map(|(t, _)| *t))
            })
            .chain(self.remote_events.iter().map(|(t, _, _)| *t))
            .min();
        let grace = self
            .gateway
            .shared
            .grace_until()
            .filter(|t| t.0 != u64::MAX);
        // A due send that found no room waits for the next step, not this wake-up.
        let keys = self
            .gateway
            .shared
            .next_key_send()
            .filter(|t| *t > self.now);
        [
            arrival,
            clients,
            self.host.poll_timeout(),
            commit,
            grace,
            keys,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Steps and advances the clock from event to event until `cond` holds (true) or
    /// `limit` of simulated time has passed (false).
    pub fn drive_until(&mut self, limit: Duration, mut cond: impl FnMut(&World) -> bool) -> bool {
        let end = self.now.saturating_add(limit);
        let mut spins = 0u32;
        loop {
            while self.step() {
                spins += 1;
                assert!(spins < 1_000_000, "the world never settles");
            }
            if cond(self) {
                return true;
            }
            match self.next_event() {
                Some(t) if t <= end => self.now = self.now.max(t),
                _ => {
                    self.now = end;
                    self.step();
                    return cond(self);
                }
            }
        }
    }

    /// Runs for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        self.drive_until(d, |_| false);
    }

    fn fresh_tuple(&mut self) -> SocketAddr {
        loop {
            let r = self.rng.next_u64();
            let ip = Ipv4Addr::new(198, 51, (r >> 8) as u8 % 100, (r >> 16) as u8 | 1);
            let port = 1024 + ((r >> 32) as u16 % 60_000);
            let t = SocketAddr::new(IpAddr::V4(ip), port);
            if !self.clients.iter().any(|c| c.tuple == t) {
                return t;
            }
        }
    }

    fn transmit(&mut self, d: Datagram) {
        self.net.sent += 1;
        if self.record {
            self.wire_log.push(d.clone());
        }
        if let Some(f) = &mut self.hold_if
            && f(&d)
        {
            self.held.push(d);
            return;
        }
        let client_side = d.to == GATEWAY || d.from == GATEWAY;
        if client_side && self.cfg.loss > 0.0 && self.rng.unit() < self.cfg.loss {
            self.net.lost += 1;
            return;
        }
        if let Some(f) = &mut self.drop_if
            && f(&d)
        {
            self.net.lost += 1;
            return;
        }
        let delay = if client_side {
            let jitter = self.cfg.jitter.mul_f64(self.rng.unit());
            self.cfg.latency + jitter
        } else {
            self.cfg.link_latency
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight
            .push(Reverse((self.now.saturating_add(delay), seq)));
        self.packets.insert(seq, d);
    }

    /// Puts the gateway's queued output on the wire; `rx` is the batch it answers.
    fn drain_gateway(&mut self, rx: &[Datagram]) -> bool {
        if let Some(latency) = self.cfg.commit_latency {
            while let Some(r) = self.gateway.worker.poll_commit() {
                self.gateway
                    .commits
                    .push((self.now.saturating_add(latency), r));
            }
            while let Some(r) = self.gateway.worker.poll_registration() {
                let due = self.now.saturating_add(latency);
                self.gateway.registrations.push((due, r));
            }
        }
        let out: Vec<Datagram> = self
            .gateway
            .tx
            .iter()
            .map(|(m, b)| Datagram {
                from: match m.via {
                    Via::Client(_) => GATEWAY,
                    Via::Host => gateway_link(self.current),
                },
                to: m.to,
                data: b.to_vec(),
            })
            .collect();
        self.gateway.tx.clear();
        if let Some(f) = &mut self.watch {
            f(&GatewayCall {
                now: self.now,
                rx,
                tx: &out,
                shared: &self.gateway.shared,
            });
        }
        let any = !out.is_empty();
        for d in out {
            self.transmit(d);
        }
        any
    }

    fn drain_host(&mut self) -> bool {
        let mut any = false;
        let len = self.host_out_len.min(MAX_DATAGRAM);
        while let Some(o) = self.host.poll_transmit(self.now, &mut self.buf[..len]) {
            assert!(o.len <= len, "the host wrote past its buffer");
            let data = self.buf[..o.len].to_vec();
            self.transmit(Datagram {
                from: HOST,
                to: o.to,
                data,
            });
            any = true;
        }
        any
    }
}

/// Enrolled client `i`'s credentials.
pub fn creds(i: usize) -> ClientCredentials {
    let mut client_id = [0xc1; 16];
    client_id[..8].copy_from_slice(&(i as u64).to_be_bytes());
    let mut psk = [0x5a; 32];
    psk[..8].copy_from_slice(&(i as u64).to_be_bytes());
    ClientCredentials { client_id, psk }
}

fn epoch_crypto(master: &MasterSecret, epoch: u32, slots: usize) -> EpochCrypto {
    let keys = EpochKeys::derive(master, epoch, slots).expect("epoch keys");
    let trial = TrialKeys::new(Backend::Portable, keys.slot_key_pairs()).expect("trial keys");
    EpochCrypto { keys, trial }
}

/// A gateway whose current epoch is `epochs[0]`, started at `now`.
fn build_gateway(
    cfg: &SimConfig,
    master: &MasterSecret,
    link_key: &LinkKey,
    epochs: &[u32],
    now: Ticks,
) -> SimGateway {
    let mut core = cfg.core.clone();
    core.slots = cfg.slots;
    core.workers = 1;
    if cfg.commit_latency.is_some() {
        core.commit = CommitMode::Deferred;
    }
    let (store_tx, store_rx) = unbounded();
    let shared = Shared::new(
        core,
        epoch_crypto(master, epochs[0], cfg.slots),
        vec![HostPeer::new(HOST, link_key)],
        Some(store_tx),
    );
    shared.set_started(now);
    let worker = WorkerCore::new(0, shared.clone(), &[false, true]);
    SimGateway {
        shared,
        worker,
        store_rx,
        tx: TxQueue::new(1024),
        epochs: epochs.to_vec(),
        persisted: HashMap::new(),
        persisted_grace: Ticks(0),
        restarts: 0,
        commits: Vec::new(),
        registrations: Vec::new(),
        store_down: false,
    }
}

/// A store's decision on a deferred commit: a compare-and-swap on `L`, as the cluster's etcd
/// transaction makes it.
fn decide_in(
    store: &mut HashMap<(u32, u32), StoredConn>,
    down: bool,
    r: &CommitRequest,
) -> CommitResult {
    if down {
        return CommitResult::Refused(CommitRefusal::Unavailable);
    }
    let Some(c) = store.get_mut(&(r.epoch, r.index)) else {
        return CommitResult::Refused(CommitRefusal::Unknown);
    };
    if c.conn_id != r.conn_id {
        return CommitResult::Refused(CommitRefusal::Unknown);
    }
    if r.t > c.last_rebind {
        let old = c.tuple;
        c.last_rebind = r.t;
        c.tuple = Some(r.to);
        CommitResult::Committed { old }
    } else if r.t == c.last_rebind && c.tuple == Some(r.to) {
        CommitResult::Duplicate
    } else {
        CommitResult::Refused(CommitRefusal::Conflict)
    }
}

/// A store's decision on a deferred registration: the lowest free index of the epoch below
/// the capacity, taken at once (as the etcd create-if-absent transaction).
fn register_in(
    store: &mut HashMap<(u32, u32), StoredConn>,
    down: bool,
    r: &RegisterRequest,
) -> RegisterResult {
    if down {
        return RegisterResult::Refused(CommitRefusal::Unavailable);
    }
    let Some(index) = (0..r.capacity).find(|i| !store.contains_key(&(r.epoch, *i))) else {
        return RegisterResult::Full;
    };
    store.insert(
        (r.epoch, index),
        StoredConn {
            epoch: r.epoch,
            index,
            conn_id: r.conn_id,
            secret: r.secret.clone(),
            last_rebind: Ticks(0),
            tuple: Some(r.tuple),
            host: r.host,
        },
    );
    RegisterResult::Registered { index }
}
