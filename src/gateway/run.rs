//! Runs the gateway: state directory and secrets, the registry store and its writer thread,
//! one pinned worker per core (its own SO_REUSEPORT client sockets, host-link socket and
//! I/O loop), the tick reservation, and the admin endpoint.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

use super::admin::{AdminRoutes, StoreHealth, readiness, spawn_admin};
use super::config::GatewayConfig;
use super::core::{EpochCrypto, HostPeer, Shared, WorkerCore};
use super::metrics::{ClusterFacts, GatewayFacts, HostFacts, STORE_LATENCY_BUCKETS, render};
use super::rotate::{AdminAuth, AdminKey, Rotator, rotate_route};
use super::store::{Store, StoreOp, open_and_load, run_writer};
use crate::engine::{self, TrialKeys};
use crate::io::batch::TxQueue;
use crate::io::{self, Handler, IoBackend, LoopOptions, Rx, WorkerSockets};
use crate::keys::{EpochKeys, MasterSecret};
use crate::secrets;
use crate::time::{Ticks, duration_ticks};

/// How far ahead of the clock the store reserves issued times.
const RESERVE_AHEAD: Duration = Duration::from_secs(10);
/// Renew the reservation when issued times come this close to it.
const RESERVE_MARGIN: Duration = Duration::from_secs(5);
const SOCKET_BUFFER: usize = 4 << 20;

/// Store commit statistics for the metrics.
#[derive(Default)]
struct StoreStats {
    commits: AtomicU64,
    errors: AtomicU64,
    latency_us: Mutex<Option<Histogram<u64>>>,
    /// The last commit failed.
    last_failed: AtomicBool,
    /// The writer thread runs (cleared when it ends, also by a panic).
    writer_alive: AtomicBool,
}

/// Clears `StoreStats::writer_alive` when the writer thread ends, however it ends.
struct WriterAlive(Arc<StoreStats>);

impl Drop for WriterAlive {
    fn drop(&mut self) {
        self.0.writer_alive.store(false, Ordering::Relaxed);
    }
}

/// A running gateway.
pub struct GatewayHandle {
    client_addrs: Vec<SocketAddr>,
    host_link_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    io_backend: IoBackend,
    engine_backend: engine::Backend,
    shutdown: Arc<AtomicBool>,
    shared: Option<Arc<Shared>>,
    workers: Vec<JoinHandle<std::io::Result<io::IoStats>>>,
    helpers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
    /// Cluster mode's link to etcd.
    #[cfg(feature = "cluster")]
    cluster: Option<super::cluster::Bridge>,
    cluster_facts: ClusterFactsSource,
    /// The state directory's lock, held (flock) until the gateway is gone.
    _state_lock: std::fs::File,
}

impl GatewayHandle {
    /// The bound client-facing addresses (ports resolved).
    pub fn client_addrs(&self) -> &[SocketAddr] {
        &self.client_addrs
    }
    /// Each worker's host-link address.
    pub fn host_link_addrs(&self) -> &[SocketAddr] {
        &self.host_link_addrs
    }
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }
    pub fn io_backend(&self) -> IoBackend {
        self.io_backend
    }
    pub fn engine_backend(&self) -> engine::Backend {
        self.engine_backend
    }
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }
    /// Cluster mode's counters (`None` on a single node).
    pub fn cluster_facts(&self) -> Option<ClusterFacts> {
        (self.cluster_facts)()
    }
    /// The shared state, for in-process inspection (tests, the demo).
    pub fn shared(&self) -> &Arc<Shared> {
        self.shared.as_ref().expect("running gateway")
    }

    /// Stops cleanly: workers finish their in-flight batch, then every queued registry write
    /// is committed before this returns.
    pub fn stop(mut self) -> anyhow::Result<io::IoStats> {
        self.shutdown.store(true, Ordering::Release);
        let mut total = io::IoStats::default();
        let mut first_err = None;
        for w in self.workers.drain(..) {
            match w.join() {
                Ok(Ok(s)) => total.merge(&s),
                Ok(Err(e)) => {
                    first_err.get_or_insert_with(|| anyhow::anyhow!("worker I/O loop failed: {e}"));
                }
                Err(_) => {
                    first_err.get_or_insert_with(|| anyhow::anyhow!("a worker panicked"));
                }
            }
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
        // The last holder of the store channel goes; the writer drains and exits.
        self.shared.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        #[cfg(feature = "cluster")]
        if let Some(c) = self.cluster.take() {
            c.shutdown();
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Release);
    }
}

/// The I/O loop's view of a worker: read the wall clock once per batch, hand it to the core.
struct Driver {
    core: WorkerCore,
    /// The I/O loop's counters as last copied into the metrics.
    io_seen: io::IoStats,
    /// Cluster mode: this worker's end of the etcd link.
    #[cfg(feature = "cluster")]
    link: Option<super::cluster::WorkerLink>,
}

impl Driver {
    /// Cluster mode: answers from etcd in, this batch's commit requests out.
    #[cfg_attr(not(feature = "cluster"), allow(unused_variables))]
    fn pump(&mut self, now: Ticks, tx: &mut TxQueue) {
        #[cfg(feature = "cluster")]
        if let Some(link) = &mut self.link {
            link.pump(&mut self.core, now, tx);
        }
    }
}

impl Handler for Driver {
    fn handle_batch(&mut self, rx: &[Rx<'_>], tx: &mut TxQueue) {
        let now = Ticks::wall_clock();
        self.core.handle_batch(now, rx, tx);
        self.pump(now, tx);
    }

    fn tick(&mut self, tx: &mut TxQueue) {
        let now = Ticks::wall_clock();
        self.core.metrics().beat(now);
        self.core.tick(now, tx);
        self.pump(now, tx);
    }

    fn on_io_stats(&mut self, s: &io::IoStats) {
        let seen = &self.io_seen;
        if s.send_errors != seen.send_errors
            || s.truncated != seen.truncated
            || s.rx_errors != seen.rx_errors
            || s.no_buffers != seen.no_buffers
            || s.xdp_received != seen.xdp_received
            || s.xdp_kernel_sent != seen.xdp_kernel_sent
        {
            self.core.metrics().record_io(seen, s);
            self.io_seen = s.clone();
        }
    }
}

/// The lock file in the state directory; a gateway holds an exclusive `flock` on it.
const LOCK_FILE: &str = "lock";

/// Loads the master secret unless it is the default one that does not exist yet (then it is
/// generated once the state directory is in place).
fn load_master(cfg: &GatewayConfig) -> anyhow::Result<Option<MasterSecret>> {
    let key = cfg.master_key_path();
    match secrets::load_master(&key) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.is_not_found() && cfg.cluster.enabled() => bail!(
            "cluster mode: master key file {} does not exist; every gateway of a cluster needs \
             the same master key: copy the first gateway's (mode 0600), or create one with \
             `rebindgw keygen --out {}` and copy it to the others",
            key.display(),
            key.display()
        ),
        Err(e) if e.is_not_found() && cfg.master_key.is_none() => Ok(None),
        Err(e) if e.is_not_found() => bail!(
            "master key file {} does not exist; create one with `rebindgw keygen --out {}`",
            key.display(),
            key.display()
        ),
        Err(e) => Err(e.into()),
    }
}

/// Creates the state directory (mode 0700) if it is missing; returns the topmost directory
/// this created, for removal if the start fails.
fn create_state_dir(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    if dir.exists() {
        return Ok(None);
    }
    let top = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .last()
        .unwrap_or(dir)
        .to_path_buf();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create state directory {}", dir.display()))?;
    // The umask may have narrowed 0700 further; make it exactly 0700.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict state directory {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), "created state directory");
    Ok(Some(top))
}

/// Takes the state directory's lock, so that a second gateway on it refuses to start
/// instead of splitting the clients between two registries.
fn lock_state_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join(LOCK_FILE);
    let (file, _) = secrets::open_private_rw(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "state directory {} is in use by another gateway (it holds {}); stop that one \
             first, or give this one its own `state_dir` and `listen` port",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Fails if another socket already has a client address: SO_REUSEPORT would otherwise let
/// this gateway share the port with another one and split the clients between them. A bind
/// without SO_REUSEPORT fails while any socket holds the address.
fn probe_listen(cfg: &GatewayConfig) -> anyhow::Result<()> {
    for addr in cfg.listen.iter().filter(|a| a.port() != 0) {
        match io::bind_udp(*addr, false, 0) {
            Ok(probe) => drop(probe),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
                "client address {addr} is already in use (config key `listen`), perhaps by \
                 another gateway; stop it, or give this one another port"
            ),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot bind client address {addr} (config key `listen`)")
                });
            }
        }
    }
    Ok(())
}

/// Binds every worker's sockets. Port 0 in a listen address is resolved by the first worker
/// and reused by the others, so they share one SO_REUSEPORT group.
fn bind_sockets(
    cfg: &GatewayConfig,
    workers: usize,
) -> anyhow::Result<(Vec<WorkerSockets>, Vec<SocketAddr>)> {
    let mut listen = cfg.listen.clone();
    let mut all = Vec::with_capacity(workers);
    for w in 0..workers {
        let mut clients = Vec::new();
        for addr in listen.iter_mut() {
            let s = io::bind_udp(*addr, true, SOCKET_BUFFER).with_context(|| {
                format!("cannot bind client address {addr} (config key `listen`)")
            })?;
            if w == 0 {
                *addr = s.local_addr()?;
            }
            clients.push(s);
        }
        let host = io::bind_udp(cfg.host_link, false, SOCKET_BUFFER).with_context(|| {
            format!(
                "cannot bind host-link address {} (config key `host_link`)",
                cfg.host_link
            )
        })?;
        all.push(WorkerSockets { clients, host });
    }
    Ok((all, listen))
}

/// Starts a gateway in this process. The configuration, the keys and an existing state
/// directory are checked before anything is created; a state directory this call created is
/// removed again if the start fails.
pub fn spawn_gateway(cfg: GatewayConfig) -> anyhow::Result<GatewayHandle> {
    cfg.validate()?;
    let engine_backend = engine::backend_from_env()?;
    let hosts = super::reload::load_hosts(&cfg)?;
    if cfg.state_dir.exists() {
        secrets::check_private_dir(&cfg.state_dir)?;
    }
    let master = load_master(&cfg)?;
    probe_listen(&cfg)?;

    let created = create_state_dir(&cfg.state_dir)?;
    let started = start(cfg, master, hosts, engine_backend);
    if started.is_err()
        && let Some(top) = created
        && let Err(e) = std::fs::remove_dir_all(&top)
    {
        tracing::warn!(dir = %top.display(), error = %e, "cannot remove the state directory this failed start created");
    }
    started
}

/// The start once the configuration and keys are known to be good.
fn start(
    cfg: GatewayConfig,
    master: Option<MasterSecret>,
    hosts: Vec<HostPeer>,
    engine_backend: engine::Backend,
) -> anyhow::Result<GatewayHandle> {
    secrets::check_private_dir(&cfg.state_dir)?;
    let state_lock = lock_state_dir(&cfg.state_dir)?;
    let (store, loaded) = open_and_load(&cfg.state_dir, cfg.slots, cfg.set_aside_corrupt)?;
    // Generated only once the registry is known to be usable.
    let master = match master {
        Some(m) => m,
        None => {
            let key = cfg.master_key_path();
            secrets::generate_master(&key)?;
            tracing::info!(file = %key.display(), "generated a new master secret");
            secrets::load_master(&key)?
        }
    };
    let store = Arc::new(store);
    store.set_slots(cfg.slots as u64)?;
    #[cfg(feature = "cluster")]
    let link = if cfg.cluster.enabled() {
        let c = &cfg.cluster;
        let settings = crate::cluster::sync::ClusterSettings {
            endpoints: c.endpoints.clone(),
            name: c.name.clone(),
            gateway: c.gateway_id.context("cluster.gateway_id")?,
            lease_ttl: Duration::from_secs(c.lease_ttl_secs),
            timeout: Duration::from_millis(c.timeout_ms),
            epoch: loaded.epoch.unwrap_or(1),
        };
        let handle = crate::cluster::sync::ClusterHandle::start(settings, &master)?;
        if !loaded.conns.is_empty() {
            tracing::warn!(
                connections = loaded.conns.len(),
                "cluster mode: the connections in the local registry are ignored; the \
                 registry is etcd's"
            );
        }
        Some(handle)
    } else {
        None
    };
    // The cluster's epoch record: its epoch, the previous one while its grace lasts, and
    // when it rotated (the schedule counts from it on every gateway).
    #[cfg(feature = "cluster")]
    let record = link.as_ref().map(|l| l.epoch_record);
    #[cfg(not(feature = "cluster"))]
    let record: Option<crate::cluster::record::EpochRecord> = None;
    let epoch = record.map_or(loaded.epoch.unwrap_or(1), |r| r.current);
    let clustered = cfg.cluster.enabled();
    store.apply(&[StoreOp::SetEpoch { epoch }])?;
    // The rotation schedule counts from the last rotation, or from the first start ever, so
    // restarts never postpone it.
    let rotated_at = if let Some(r) = record.filter(|r| r.rotated_at_ms != 0) {
        Ticks::from_unix_ms(r.rotated_at_ms)
    } else if loaded.rotated_at.0 == 0 {
        let at = Ticks::wall_clock();
        store.apply(&[StoreOp::ScheduleFrom { at }])?;
        at
    } else {
        loaded.rotated_at
    };

    // Created beside the state like the master key, unless configured.
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let admin_auth = Arc::new(AdminAuth::new(
        AdminKey::load_or_generate(&cfg.admin_key_path())?,
        started_unix,
    ));

    let keys = EpochKeys::derive(&master, epoch, cfg.slots)?;
    let trial = TrialKeys::new(engine_backend, keys.slot_key_pairs())?;
    let rotator = Arc::new(Rotator::new(
        master,
        engine_backend,
        cfg.slots,
        cfg.grace(),
        Duration::from_secs(cfg.rotate_every_secs),
        rotated_at,
    ));

    let (store_tx, store_rx) = crossbeam::channel::unbounded();
    let core_cfg = cfg.core();
    let workers = core_cfg.workers;
    let shared = Shared::new(core_cfg, EpochCrypto { keys, trial }, hosts, Some(store_tx));
    shared.set_started(Ticks::wall_clock());
    // A restart during a grace period: the previous epoch is accepted again until its end
    // (housekeeping ends it, and tells the hosts, if that is already past).
    if loaded.grace_until.0 != 0 && !clustered {
        let previous = epoch.wrapping_sub(1);
        shared.restore_previous(rotator.crypto(previous)?, loaded.grace_until);
    }
    // In a cluster: a start during the grace period of the cluster's last rotation accepts
    // the previous epoch until the record's deadline (its records load from etcd below).
    if let Some(r) = record
        && let Some(previous) = r.in_grace(Ticks::wall_clock().unix_ms())
    {
        shared.restore_previous(
            rotator.crypto(previous)?,
            Ticks::from_unix_ms(r.grace_until_ms),
        );
    }

    // Restore the registry. Every time issued before the restart is at most `reserved`, so
    // raising each L to it refuses every REBIND captured before the restart.
    let floor = loaded.reserved;
    let mut restored = 0usize;
    let mut warn = crate::logging::LogEvery::new(Duration::from_secs(1));
    for c in loaded.conns.iter().filter(|_| !clustered) {
        if c.epoch != epoch {
            shared.add_epoch_registry(c.epoch);
        }
        match shared.restore(c, floor) {
            Ok(()) => restored += 1,
            Err(e) => {
                if let Some(held_back) = warn.check(Instant::now()) {
                    tracing::warn!(epoch = c.epoch, index = c.index, error = %e, held_back, "stored connection not restored");
                }
            }
        }
    }
    // Keys of the current epoch still owed to connections registered at its rotation.
    shared.resume_key_delivery(Ticks::wall_clock());
    shared.set_floor(Ticks(floor.0.saturating_add(1)));
    let start = shared.issue_ticks(Ticks::wall_clock());
    let cap = start.saturating_add(RESERVE_AHEAD);
    store.apply(&[StoreOp::Reserve { ticks: cap }])?;
    shared.set_issue_cap(cap);

    let (sockets, client_addrs) = bind_sockets(&cfg, workers)?;
    let host_link_addrs = sockets
        .iter()
        .map(|s| s.host.local_addr())
        .collect::<Result<Vec<_>, _>>()?;
    let xdp_cfg = io::xdp::XdpConfig {
        interface: cfg.xdp_interface.clone(),
        mode: cfg.xdp_mode,
        ..io::xdp::XdpConfig::default()
    };
    let (io_backend, mut xdp) = io::select_backend_xdp(cfg.io, &xdp_cfg, &client_addrs, workers);
    let shutdown = Arc::new(AtomicBool::new(false));

    #[cfg(feature = "cluster")]
    let (cluster, mut links, store_rx) = match link {
        Some(handle) => {
            let me = cfg.cluster.gateway_id.context("cluster.gateway_id")?;
            let counters = Arc::new(super::cluster::BridgeCounters::default());
            let loaded = super::cluster::load_initial(&handle, &shared, me, &counters)?;
            restored += loaded;
            // A start during grace: the keys of this gateway's registrations in the new
            // epoch go out again.
            shared.resume_key_delivery(Ticks::wall_clock());
            rotator.set_cluster(Box::new(super::cluster::LinkEpoch::new(
                &handle,
                Duration::from_millis(cfg.cluster.timeout_ms),
            )));
            // A grace period that ended while no gateway ran: the previous epoch's records
            // (this gateway's and those of gateways gone) still go.
            if let Some(previous) = handle
                .epoch_record
                .previous
                .filter(|_| shared.epochs().previous.is_none())
            {
                handle.submit(crate::cluster::sync::Request::DropEpoch { epoch: previous });
            }
            let (bridge, links) = super::cluster::start(
                handle,
                shared.clone(),
                me,
                workers,
                store_rx,
                counters,
                rotator.clone(),
            )?;
            let links: Vec<Option<super::cluster::WorkerLink>> =
                links.into_iter().map(Some).collect();
            (Some(bridge), links, None)
        }
        None => (None, (0..workers).map(|_| None).collect(), Some(store_rx)),
    };
    #[cfg(not(feature = "cluster"))]
    let store_rx = Some(store_rx);

    let stats = Arc::new(StoreStats::default());
    stats.writer_alive.store(true, Ordering::Relaxed);
    // In cluster mode the registry lives in etcd: no writer (the bridge sends removals).
    let writer = match store_rx {
        None => None,
        Some(store_rx) => Some({
            let store = store.clone();
            let stats = stats.clone();
            let durable = shared.durable_ops();
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || {
                    let _alive = WriterAlive(stats.clone());
                    let s = run_writer(
                        &store,
                        store_rx,
                        4096,
                        Duration::from_millis(2),
                        |took, ops, result| {
                            // Key delivery waits for its rotation to be on disk.
                            durable.fetch_add(ops as u64, Ordering::AcqRel);
                            match result {
                                Ok(()) => stats.commits.fetch_add(1, Ordering::Relaxed),
                                Err(_) => stats.errors.fetch_add(1, Ordering::Relaxed),
                            };
                            stats.last_failed.store(result.is_err(), Ordering::Relaxed);
                            let mut h = stats.latency_us.lock().unwrap_or_else(|e| e.into_inner());
                            let h = h.get_or_insert_with(|| {
                                Histogram::new(3).expect("3 significant digits")
                            });
                            let _ = h.record(took.as_micros() as u64);
                        },
                    );
                    tracing::info!(
                        commits = s.commits,
                        ops = s.ops,
                        errors = s.errors,
                        "registry store flushed"
                    );
                })?
        }),
    };

    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut worker_threads = Vec::with_capacity(workers);
    let loop_options = LoopOptions {
        // Answers from etcd are taken after each batch and tick: tick often when they come.
        tick: if clustered {
            Duration::from_millis(2)
        } else {
            LoopOptions::default().tick
        },
        ..LoopOptions::default()
    };
    for (i, socks) in sockets.into_iter().enumerate() {
        #[cfg(feature = "cluster")]
        let link = links[i].take();
        let loop_options = loop_options.clone();
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let core_id = (!cores.is_empty()).then(|| cores[i % cores.len()]);
        let is_v6: Vec<bool> = cfg.listen.iter().map(|a| a.is_ipv6()).collect();
        let xdp_worker = xdp.as_mut().and_then(|x| x.take_worker(i));
        worker_threads.push(
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    if let Some(c) = core_id {
                        core_affinity::set_for_current(c);
                    }
                    let core = WorkerCore::new(i as u8, shared, &is_v6);
                    core.metrics().beat(Ticks::wall_clock());
                    let mut driver = Driver {
                        core,
                        io_seen: io::IoStats::default(),
                        #[cfg(feature = "cluster")]
                        link,
                    };
                    io::run_worker(
                        io_backend,
                        xdp_worker,
                        &socks,
                        &mut driver,
                        &shutdown,
                        &loop_options,
                    )
                })?,
        );
    }

    let mut helpers = Vec::new();
    helpers.push({
        let shared = shared.clone();
        let store = store.clone();
        let shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name("housekeeping".into())
            .spawn({
                let rotator = rotator.clone();
                move || housekeeping(&shared, &store, &rotator, &shutdown)
            })?
    });

    let admin_addr = match cfg.admin {
        Some(addr) => {
            let shared = shared.clone();
            let stats = stats.clone();
            let (io_name, engine_name) = (io_backend.name(), engine_backend.name());
            let (s2, st2, s3) = (shared.clone(), stats.clone(), shared.clone());
            let auth1 = admin_auth.clone();
            let cluster_facts = cluster_facts_source(
                #[cfg(feature = "cluster")]
                cluster.as_ref(),
                &shared,
                cfg.cluster.gateway_id.unwrap_or(0),
            );
            let routes = AdminRoutes {
                metrics: Box::new(move || {
                    let mut facts = facts(&shared, &stats, &auth1, io_name, engine_name);
                    facts.cluster = cluster_facts();
                    render(&shared.metrics, &facts)
                }),
                ready: Box::new(move || {
                    let hosts: Vec<String> =
                        s2.live().hosts.iter().map(|h| h.addr.to_string()).collect();
                    let store = StoreHealth {
                        writer_alive: st2.writer_alive.load(Ordering::Relaxed),
                        last_commit_failed: st2.last_failed.load(Ordering::Relaxed),
                    };
                    readiness(&s2.metrics, &hosts, store, Ticks::wall_clock())
                }),
                about: super::admin::build_info(io_name, engine_name),
                rotate: Some(Box::new(rotate_route(
                    s3,
                    rotator.clone(),
                    admin_auth.clone(),
                ))),
            };
            let (bound, handle) = spawn_admin(addr, routes, shutdown.clone())?;
            helpers.push(handle);
            Some(bound)
        }
        None => None,
    };

    tracing::info!(
        listen = ?client_addrs,
        host_link = ?host_link_addrs,
        admin = ?admin_addr,
        workers,
        slots = cfg.slots,
        epoch,
        restored,
        io = io_backend.name(),
        engine = engine_backend.name(),
        "gateway running"
    );
    let cluster_facts = cluster_facts_source(
        #[cfg(feature = "cluster")]
        cluster.as_ref(),
        &shared,
        cfg.cluster.gateway_id.unwrap_or(0),
    );
    Ok(GatewayHandle {
        client_addrs,
        host_link_addrs,
        admin_addr,
        io_backend,
        engine_backend,
        shutdown,
        shared: Some(shared),
        workers: worker_threads,
        helpers,
        writer,
        cluster_facts,
        #[cfg(feature = "cluster")]
        cluster,
        _state_lock: state_lock,
    })
}

type ClusterFactsSource = Box<dyn Fn() -> Option<ClusterFacts> + Send + Sync>;

/// Reads cluster mode's counters for the metrics (`None` on a single node).
#[cfg(feature = "cluster")]
fn cluster_facts_source(
    bridge: Option<&super::cluster::Bridge>,
    shared: &Arc<Shared>,
    gateway_id: u16,
) -> ClusterFactsSource {
    let Some(b) = bridge else {
        return Box::new(|| None);
    };
    let (bridge, link) = (b.counters.clone(), b.link.clone());
    // Weak: the handle outlives the shared state at shutdown.
    let shared = Arc::downgrade(shared);
    Box::new(move || {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Some(ClusterFacts {
            gateway_id,
            link_up: bridge.link_up.load(Ordering::Relaxed),
            owned: shared.upgrade().map_or(0, |s| s.tuples.len() as u64),
            rebinds_taken_over: get(&link.rebinds_taken_over),
            commit_batches: get(&link.commit_batches),
            commit_retries: get(&link.commit_retries),
            link_downs: get(&bridge.link_downs),
            range_reads: get(&link.range_reads),
            watch_events: get(&link.watch_events),
            watch_resumes: get(&link.watch_resumes),
            reloads: get(&link.reloads),
            registered: get(&link.registered),
            register_collisions: get(&link.register_collisions),
            rebinds_committed: get(&link.rebinds_committed),
            duplicates: get(&link.duplicates),
            conflicts: get(&link.conflicts),
            stale: get(&link.stale),
            unavailable: get(&link.unavailable),
            removed: get(&link.removed),
            removals_sent: get(&bridge.removals_sent),
            malformed_records: get(&link.malformed_records),
            remote_added: get(&bridge.remote_added),
            remote_updated: get(&bridge.remote_updated),
            remote_removed: get(&bridge.remote_removed),
            remote_unchanged: get(&bridge.remote_unchanged),
            remote_unknown_epoch: get(&bridge.remote_unknown_epoch),
            remote_unopened: get(&bridge.remote_unopened),
        })
    })
}

#[cfg(not(feature = "cluster"))]
fn cluster_facts_source(_shared: &Arc<Shared>, _gateway_id: u16) -> ClusterFactsSource {
    Box::new(|| None)
}

fn facts(
    shared: &Shared,
    stats: &StoreStats,
    auth: &AdminAuth,
    io: &str,
    engine: &str,
) -> GatewayFacts {
    let epochs = shared.epochs();
    let (buckets, sum, count) = {
        let h = stats.latency_us.lock().unwrap_or_else(|e| e.into_inner());
        match h.as_ref() {
            Some(h) => (
                STORE_LATENCY_BUCKETS
                    .iter()
                    .map(|le| (*le, h.count_between(0, (le * 1e6) as u64)))
                    .collect(),
                h.mean() * h.len() as f64 / 1e6,
                h.len(),
            ),
            None => (
                STORE_LATENCY_BUCKETS.iter().map(|le| (*le, 0)).collect(),
                0.0,
                0,
            ),
        }
    };
    let per_host = shared.connections_per_host();
    GatewayFacts {
        connections: shared.connections() as u64,
        max_connections: shared.cfg.max_connections as u64,
        epoch: epochs.current.keys.epoch(),
        slots: shared.cfg.slots,
        workers: shared.metrics.len(),
        engine_backend: engine.to_string(),
        io_backend: io.to_string(),
        store_commits: stats.commits.load(Ordering::Relaxed),
        store_errors: stats.errors.load(Ordering::Relaxed),
        store_queue: shared.store_queue_len() as u64,
        store_latency_buckets: buckets,
        store_latency_sum_seconds: sum,
        store_latency_count: count,
        table_bytes: (shared.tuples.memory_bytes() + shared.conns.memory_bytes()) as u64,
        rotations: shared.rotations(),
        grace_seconds_left: shared.grace_until().map_or(0, |t| {
            t.0.saturating_sub(Ticks::wall_clock().0)
                .div_ceil(crate::time::TICKS_PER_SECOND)
        }),
        connections_per_epoch: shared
            .connections_per_epoch()
            .into_iter()
            .map(|(e, n)| (e, n as u64))
            .collect(),
        admin_auth_failures: auth.failures.load(Ordering::Relaxed),
        cluster: None,
        keys_pending: shared.keys_pending() as u64,
        hosts: shared
            .live()
            .hosts
            .iter()
            .zip(per_host)
            .map(|(h, connections)| HostFacts {
                addr: h.addr.to_string(),
                connections,
            })
            .collect(),
    }
}

/// Renews the tick reservation before issued times reach it, and expires caches.
fn housekeeping(shared: &Shared, store: &Store, rotator: &Rotator, shutdown: &AtomicBool) {
    let margin = duration_ticks(RESERVE_MARGIN);
    let mut last_expire = Instant::now();
    let mut warn = crate::logging::LogEvery::new(Duration::from_secs(10));
    while !shutdown.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        let wall = Ticks::wall_clock();
        rotator.tick(shared, wall);
        let cap = shared.issue_cap();
        if wall.0.max(shared.last_issued().0).saturating_add(margin) >= cap.0 {
            let next = wall.max(shared.last_issued()).saturating_add(RESERVE_AHEAD);
            match store.apply(&[StoreOp::Reserve { ticks: next }]) {
                Ok(()) => shared.set_issue_cap(next),
                Err(e) => {
                    if let Some(held_back) = warn.check(Instant::now()) {
                        tracing::error!(error = %e, held_back, "cannot renew the tick reservation; issued times will lag the clock");
                    }
                }
            }
        }
        if last_expire.elapsed() > Duration::from_secs(5) {
            shared.control().expire(shared.last_issued());
            last_expire = Instant::now();
        }
    }
}

/// `rebindgw gateway`: runs until SIGINT or SIGTERM, then stops cleanly. On SIGHUP it calls
/// `load` for the configuration again and applies what it can ([`super::reload::apply`]).
pub fn run_gateway(
    cfg: GatewayConfig,
    mut load: impl FnMut() -> anyhow::Result<GatewayConfig>,
    log: Option<&crate::logging::LogHandle>,
) -> anyhow::Result<()> {
    let mut running = cfg.clone();
    // Handlers first, so a signal sent as soon as "gateway running" is logged is handled.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())
        .context("installing the SIGHUP handler")?;
    let handle = spawn_gateway(cfg)?;
    let flag = handle.shutdown_flag();
    while !flag.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        if hup.swap(false, Ordering::AcqRel) {
            reload(&handle, &mut running, &mut load, log);
        }
    }
    tracing::info!("stopping: finishing in-flight batches and flushing the registry");
    let stats = handle.stop()?;
    tracing::info!(
        received = stats.received,
        sent = stats.sent,
        send_errors = stats.send_errors,
        "gateway stopped"
    );
    Ok(())
}

fn reload(
    handle: &GatewayHandle,
    running: &mut GatewayConfig,
    load: &mut impl FnMut() -> anyhow::Result<GatewayConfig>,
    log: Option<&crate::logging::LogHandle>,
) {
    let result = load().and_then(|new| super::reload::apply(handle.shared(), running, new, log));
    match result {
        Ok(done) => {
            tracing::info!(
                applied = ?done.applied,
                hosts = running.hosts.len(),
                "SIGHUP: configuration reloaded"
            );
            if !done.need_restart.is_empty() {
                tracing::warn!(
                    keys = ?done.need_restart,
                    "SIGHUP: these keys changed but keep their running values until a restart"
                );
            }
        }
        Err(e) => tracing::error!(
            error = format!("{e:#}"),
            "SIGHUP: reload refused; the running configuration stays in force"
        ),
    }
}
