//! Runs the gateway: state directory and secrets, the registry store and its writer thread,
//! one pinned worker per core (its own SO_REUSEPORT client sockets, host-link socket and
//! I/O loop), the tick reservation, and the admin endpoint.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

use super::admin::spawn_admin;
use super::config::GatewayConfig;
use super::core::{EpochCrypto, HostPeer, Shared, WorkerCore};
use super::metrics::{GatewayFacts, render};
use super::store::{Store, StoreOp, run_writer};
use super::tx::TxQueue;
use crate::engine::{self, TrialKeys};
use crate::io::{self, Handler, IoBackend, LoopOptions, Rx, WorkerSockets};
use crate::keys::EpochKeys;
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
}

impl Handler for Driver {
    fn handle_batch(&mut self, rx: &[Rx<'_>], tx: &mut TxQueue) {
        self.core.handle_batch(Ticks::wall_clock(), rx, tx);
    }

    fn tick(&mut self, tx: &mut TxQueue) {
        self.core.tick(Ticks::wall_clock(), tx);
    }
}

fn prepare_state_dir(cfg: &GatewayConfig) -> anyhow::Result<()> {
    let dir = &cfg.state_dir;
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create state directory {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict state directory {}", dir.display()))?;
        tracing::info!(dir = %dir.display(), "created state directory");
    }
    let key = cfg.master_key_path();
    if !key.exists() {
        if cfg.master_key.is_some() {
            bail!(
                "master key file {} does not exist; create one with `rebindgw keygen --out {}`",
                key.display(),
                key.display()
            );
        }
        secrets::generate_master(&key)?;
        tracing::info!(file = %key.display(), "generated a new master secret");
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

/// Starts a gateway in this process.
pub fn spawn_gateway(cfg: GatewayConfig) -> anyhow::Result<GatewayHandle> {
    cfg.validate()?;
    prepare_state_dir(&cfg)?;
    let master = secrets::load_master(&cfg.master_key_path())?;
    let store = Arc::new(Store::open(&cfg.state_dir)?);
    let loaded = store.load()?;
    if let Some(s) = loaded.slots
        && s != cfg.slots as u64
    {
        bail!(
            "state directory {} holds a registry made with S = {s}, but `slots` is {}; \
             use that S or a new state directory",
            cfg.state_dir.display(),
            cfg.slots
        );
    }
    store.set_slots(cfg.slots as u64)?;
    let epoch = loaded.epoch.unwrap_or(1);
    store.apply(&[StoreOp::SetEpoch { epoch }])?;

    let engine_backend = engine::backend_from_env()?;
    let keys = EpochKeys::derive(&master, epoch, cfg.slots)?;
    let trial = TrialKeys::new(engine_backend, keys.slot_key_pairs())?;
    drop(master);
    let mut hosts = Vec::with_capacity(cfg.hosts.len());
    for h in &cfg.hosts {
        let key = secrets::load_link_key(&h.link_key_file)
            .with_context(|| format!("host {} (config key `hosts`)", h.addr))?;
        hosts.push(HostPeer::new(h.addr, &key));
    }

    let (store_tx, store_rx) = crossbeam::channel::unbounded();
    let core_cfg = cfg.core();
    let workers = core_cfg.workers;
    let shared = Shared::new(core_cfg, EpochCrypto { keys, trial }, hosts, Some(store_tx));
    shared.set_started(Ticks::wall_clock());

    // Restore the registry. Every time issued before the restart is at most `reserved`, so
    // raising each L to it refuses every REBIND captured before the restart.
    let floor = loaded.reserved;
    let mut restored = 0usize;
    let mut warn = crate::logging::LogEvery::new(Duration::from_secs(1));
    for c in &loaded.conns {
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
    let io_backend = io::select_backend(cfg.io);
    let shutdown = Arc::new(AtomicBool::new(false));

    let stats = Arc::new(StoreStats::default());
    let writer = {
        let store = store.clone();
        let stats = stats.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let s = run_writer(
                    &store,
                    store_rx,
                    4096,
                    Duration::from_millis(2),
                    |took, _, result| {
                        match result {
                            Ok(()) => stats.commits.fetch_add(1, Ordering::Relaxed),
                            Err(_) => stats.errors.fetch_add(1, Ordering::Relaxed),
                        };
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
    };

    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut worker_threads = Vec::with_capacity(workers);
    for (i, socks) in sockets.into_iter().enumerate() {
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let core_id = (!cores.is_empty()).then(|| cores[i % cores.len()]);
        let is_v6: Vec<bool> = cfg.listen.iter().map(|a| a.is_ipv6()).collect();
        worker_threads.push(
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    if let Some(c) = core_id {
                        core_affinity::set_for_current(c);
                    }
                    let core = WorkerCore::new(i as u8, shared, &is_v6);
                    let mut driver = Driver { core };
                    io::run_loop(
                        io_backend,
                        &socks,
                        &mut driver,
                        &shutdown,
                        &LoopOptions::default(),
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
            .spawn(move || housekeeping(&shared, &store, &shutdown))?
    });

    let admin_addr = match cfg.admin {
        Some(addr) => {
            let shared = shared.clone();
            let stats = stats.clone();
            let (io_name, engine_name) = (io_backend.name(), engine_backend.name());
            let (bound, handle) = spawn_admin(
                addr,
                move || {
                    let facts = facts(&shared, &stats, io_name, engine_name);
                    render(&shared.metrics, &facts)
                },
                shutdown.clone(),
            )?;
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
        writer: Some(writer),
    })
}

fn facts(shared: &Shared, stats: &StoreStats, io: &str, engine: &str) -> GatewayFacts {
    let epochs = shared.epochs();
    let (latency, count) = {
        let h = stats.latency_us.lock().unwrap_or_else(|e| e.into_inner());
        match h.as_ref() {
            Some(h) => (
                [0.5, 0.9, 0.99, 1.0]
                    .iter()
                    .map(|q| (*q, h.value_at_quantile(*q)))
                    .collect(),
                h.len(),
            ),
            None => (Vec::new(), 0),
        }
    };
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
        store_latency_us: latency,
        store_latency_count: count,
        table_bytes: (shared.tuples.memory_bytes() + shared.conns.memory_bytes()) as u64,
    }
}

/// Renews the tick reservation before issued times reach it, and expires caches.
fn housekeeping(shared: &Shared, store: &Store, shutdown: &AtomicBool) {
    let margin = duration_ticks(RESERVE_MARGIN);
    let mut last_expire = Instant::now();
    let mut warn = crate::logging::LogEvery::new(Duration::from_secs(10));
    while !shutdown.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        let wall = Ticks::wall_clock();
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

/// `rebindgw gateway`: runs until SIGINT or SIGTERM, then stops cleanly.
pub fn run_gateway(cfg: GatewayConfig) -> anyhow::Result<()> {
    let handle = spawn_gateway(cfg)?;
    let flag = handle.shutdown_flag();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone()).context("installing signal handlers")?;
    }
    while !flag.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
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
