//! `rebindgw loadgen`: the traffic generator the gateway is judged with.
//!
//! Many clients (up to 65,536 and more from one machine), each a [`rebindgw::client::Client`]
//! state machine with its own UDP socket and source tuple, spread over 127.0.0.0/8 (at most
//! 254 per /24) or over `--source-addrs`. They are enrolled in bulk into the host's clients
//! file (or reuse saved credentials), handshake at a paced rate, then send stamped DATA that
//! the reference host echoes (open loop at a total rate, or closed loop with a window per
//! client), while the generator moves clients to new tuples (churn, storms) without telling
//! them, and optionally mixes in attack traffic (see [`attack`]).
//!
//! Design:
//! - **Threads.** `--threads` shards (default: one per core), each owning a contiguous range
//!   of clients, one `epoll` set and one deadline heap ([`shard`]); the work per loop
//!   iteration is proportional to ready sockets and due timers, not to the client count. One
//!   more thread runs the attacks; the calling thread is the controller (phases, progress).
//! - **Phases.** connect (paced handshakes until every client is up, or the connect timeout)
//!   → run (`--duration`: load, churn, storms, attacks) → settle (load continues, no moves,
//!   until every moved client recovered or `--settle` passes) → drain (no new load, wait for
//!   echoes in flight) → stop.
//! - **Recovery.** A move records its instant on the client (a second move before recovery
//!   keeps the first instant). Recovery ends at the client's next `ClientEvent::Rebound`
//!   whose new tuple is the moved-to socket; "traffic recovery" ends at the first echo of a
//!   packet sent after the move (the payload stamp carries the move generation). A
//!   rebind that runs out (`Reconnecting`, or `Failed(RebindTimeout)` with the core's
//!   re-handshake turned off) is a failed rebind and a lost connection (`failed_later`); a
//!   move with neither by the end is unrecovered. A client whose core handshakes again
//!   (`Reconnecting`) sends load again once `Connected` (`clients.reconnected`).
//! - **Loss.** DATA payloads sent vs echoes received over the whole run, drain included.
//!   Payloads sent while the client's tuple had moved and it was not yet rebound cannot be
//!   forwarded by design, nor can echoes due to a socket that a move closed;
//!   `steady_loss_pct` leaves both out.
//!
//! Unsafe code is denied here (`deny`, not `forbid`, so that `sys`, the one small module of
//! `epoll`/`setrlimit` calls, can opt in); every other submodule forbids it.
#![deny(unsafe_code)]

pub mod addrs;
pub mod attack;
pub mod multi;
pub mod options;
pub mod report;
pub mod rotation;
pub mod shard;
pub mod stamp;
mod sys;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{self, Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use rebindgw::host::clients::{self, Enrolled};

pub use addrs::AddrPool;
pub use options::{
    AttackMode, ChildRole, LoadMode, LoadgenArgs, LoadgenOptions, MoveKind, OnMove, PayloadSizes,
    parse_duration,
};
pub use report::{LoadReport, Percentiles};

use attack::{AttackResult, Attacker, MiniConn};
use report::{
    ClientsReport, RawResult, RebindsReport, RotationCommand, RotationReport, RunSettings,
    StormReport, TrafficReport, fmt_ms, fmt_rate,
};
use rotation::RotationPlan;
use shard::{
    PHASE_CONNECT, PHASE_DRAIN, PHASE_RUN, PHASE_SETTLE, PHASE_STOP, Shard, ShardResult, ShardSpec,
    Shared,
};

/// Runs a load test against `opts.gateways`. See the module docs. With more clients than
/// one process may have sockets (or `opts.processes > 1`), the clients are spread over
/// child processes ([`multi`]); otherwise everything runs in this process.
pub fn run(opts: LoadgenOptions, progress: bool) -> anyhow::Result<LoadReport> {
    if opts.child.is_none() {
        opts.validate().map_err(anyhow::Error::msg)?;
        let n = multi::process_count(&opts)?;
        if n > 1 {
            return multi::run_multi(opts, n, progress);
        }
    }
    let gateways = opts.gateways.clone();
    run_with(opts, &gateways, progress)
}

/// `rebindgw loadgen` end to end: parse, run, print the report (JSON on stdout with
/// `--json`, else the human report), and return the verdict.
pub fn run_cli(args: LoadgenArgs) -> anyhow::Result<bool> {
    forward_network_notices()?;
    let (json, quiet) = (args.json || args.shard.is_some(), args.quiet);
    let report_json = args.report_json.clone();
    let report = run(args.into_options()?, !quiet)?;
    if let Some(p) = report_json {
        std::fs::write(&p, report.to_json())
            .with_context(|| format!("writing the JSON report to {}", p.display()))?;
    }
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_human());
    }
    Ok(report.passed())
}

/// SIGUSR1 is a network-change notice ([`shard::notice_network_change`]) to this process's
/// clients: in a multi-process run, signal every process (`pkill -USR1 -f 'rebindgw loadgen'`).
fn forward_network_notices() -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])
        .context("installing the SIGUSR1 handler")?;
    std::thread::Builder::new()
        .name("loadgen-sigusr1".into())
        .spawn(move || {
            for _ in signals.forever() {
                shard::notice_network_change();
            }
        })
        .context("spawning the SIGUSR1 thread")?;
    Ok(())
}

/// Sets `PHASE_STOP` when dropped, so an early return never leaves threads running.
struct StopOnDrop<'a>(&'a Shared);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.set_phase(PHASE_STOP);
    }
}

/// Runs a load test against `gateways` (overriding `opts.gateways`); for in-process use.
pub fn run_with(
    mut opts: LoadgenOptions,
    gateways: &[SocketAddr],
    progress: bool,
) -> anyhow::Result<LoadReport> {
    opts.gateways = gateways.to_vec();
    opts.validate().map_err(anyhow::Error::msg)?;
    let plan = RotationPlan::from_options(&opts)?;
    let threads = opts.thread_count();
    let want_fds = opts.fds_per_client() * opts.clients
        + opts.attacks.len() * opts.attack_tuples
        + 64
        + 4 * threads;
    let (soft, _) = sys::raise_nofile_limit(want_fds as u64).context("raising RLIMIT_NOFILE")?;
    if soft < want_fds as u64 {
        anyhow::bail!(
            "RLIMIT_NOFILE is {soft} but {want_fds} descriptors are needed for {} clients ({} \
             socket(s) each), and the hard limit could not be raised (that needs \
             CAP_SYS_RESOURCE); raise it with `ulimit -Hn`, run at most {} clients per \
             process, or use --processes",
            opts.clients,
            opts.fds_per_client(),
            (soft as usize).saturating_sub(want_fds - opts.fds_per_client() * opts.clients)
                / opts.fds_per_client()
        );
    }

    let (creds, _enrollment) = obtain_credentials(&opts)?;
    let v4 = gateways[0].is_ipv4();
    let client_pool = opts.source_addrs.clone().unwrap_or_else(|| {
        if v4 {
            AddrPool::clients_v4()
        } else {
            AddrPool::loopback_v6()
        }
    });
    let attack_pool = match (&opts.source_addrs, v4) {
        (Some(p), _) => p.clone(),
        (None, true) => AddrPool::attackers_v4(),
        (None, false) => AddrPool::loopback_v6(),
    };

    // The probe handshake waits for the host to load the clients file (it checks the mtime
    // about once a second); its connection is then the victim of the REBIND forgeries.
    let t_probe = Instant::now();
    let probe = MiniConn::connect(
        SocketAddr::new(attack_pool.get(0), 0),
        gateways[0],
        &creds[opts.clients].creds,
        opts.enroll_wait,
        Duration::from_millis(250),
    )
    .context("probe handshake")?;
    tracing::info!(took = ?t_probe.elapsed(), "probe connected; the host knows our clients");

    let shared = Shared::new(threads, opts.attacks.contains(&AttackMode::Replay));
    // Global client numbering and moved-to addresses over all processes of a run: each
    // shard of each process draws moved-to addresses from its own residue class.
    let (base, all_clients, slot, stride) = match opts.child {
        Some(r) => {
            let per = opts.threads.max(threads);
            (
                r.first_client,
                r.total_clients,
                r.index * per,
                r.count * per,
            )
        }
        None => (0, opts.clients, 0, threads),
    };
    let mut specs = Vec::with_capacity(threads);
    let mut first = 0;
    for id in 0..threads {
        let n = opts.clients / threads + usize::from(id < opts.clients % threads);
        specs.push(ShardSpec {
            id,
            shards: threads,
            first: base + first,
            creds: creds[first..first + n]
                .iter()
                .map(|e| e.creds.clone())
                .collect(),
            total_clients: opts.clients,
            pool: client_pool.clone(),
            move_next: (all_clients + slot + id) as u64,
            move_stride: stride as u64,
        });
        first += n;
    }
    drop(creds);

    let opts = &opts;
    let shared = &shared;
    let rotations_stop = &AtomicBool::new(false);
    std::thread::scope(|scope| -> anyhow::Result<LoadReport> {
        let _stop = StopOnDrop(shared);
        let shard_threads = specs
            .into_iter()
            .map(|spec| {
                std::thread::Builder::new()
                    .name(format!("loadgen-{}", spec.id))
                    .spawn_scoped(scope, move || Shard::new(spec, opts, shared)?.run())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let attacker = if opts.attacks.is_empty() {
            None
        } else {
            let a = Attacker::new(opts, shared, &attack_pool, Some(probe))?;
            Some(
                std::thread::Builder::new()
                    .name("loadgen-attack".into())
                    .spawn_scoped(scope, move || a.run())?,
            )
        };
        // Rotation mode: the commands go out from their own thread, timed from the
        // measured phase's start (the instant the shards time key delivery from).
        let rotator = match &plan {
            Some(p) => Some(
                std::thread::Builder::new()
                    .name("loadgen-rotate".into())
                    .spawn_scoped(scope, move || {
                        while shared.phase() < PHASE_RUN {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        p.run(shared.run_start(), rotations_stop)
                    })?,
            ),
            None => None,
        };
        let timeline = control(opts, shared, progress, &|| {
            shard_threads.iter().any(|h| h.is_finished())
        });
        rotations_stop.store(true, Ordering::Release);
        shared.set_phase(PHASE_STOP);
        let commands = match rotator {
            Some(h) => Some(
                h.join()
                    .map_err(|_| anyhow::anyhow!("the rotation thread panicked"))?,
            ),
            None => None,
        };
        let mut results = Vec::new();
        for h in shard_threads {
            let r = h
                .join()
                .map_err(|_| anyhow::anyhow!("a loadgen thread panicked"))?
                .context("loadgen driver thread")?;
            results.push(r);
        }
        let attacks = match attacker {
            Some(h) => Some(
                h.join()
                    .map_err(|_| anyhow::anyhow!("the attack thread panicked"))?
                    .context("attack thread")?,
            ),
            None => None,
        };
        let timeline = timeline?;
        let merged = ShardResult::merge_all(&results, opts.storm_times().len());
        let mut report = build_report(
            opts,
            threads,
            1,
            &timeline,
            &merged,
            attacks,
            commands.as_deref(),
        );
        if opts.child.is_some() {
            report.raw = Some(RawResult {
                counters: merged.counters.clone(),
                storms: merged.storms.clone(),
                rtt: merged.rtt.to_hex(),
                handshake: merged.handshake.to_hex(),
                recovery: merged.recovery.to_hex(),
                traffic_recovery: merged.traffic_recovery.to_hex(),
                connect_s: timeline.connect.as_secs_f64(),
                measured_s: timeline.measured.as_secs_f64(),
                settle_s: timeline.settle.as_secs_f64(),
                at_run_start: timeline.at_run_start,
                at_run_end: timeline.at_run_end,
                rotations: merged.rotations.iter().map(|r| r.to_raw()).collect(),
            });
        }
        Ok(report)
    })
}

/// Needed credentials: `clients` for the load plus one for the probe/victim connection.
fn obtain_credentials(opts: &LoadgenOptions) -> anyhow::Result<(Vec<Enrolled>, Enrollment)> {
    obtain_n_credentials(opts, opts.clients + 1)
}

/// The clients a run enrolled into the host's clients file; dropping it removes them again
/// (one file write), unless the run keeps them.
#[derive(Default)]
pub(crate) struct Enrollment {
    file: Option<PathBuf>,
    names: std::collections::HashSet<String>,
    /// The run created the file, so it goes when it is empty again.
    created: bool,
}

impl Drop for Enrollment {
    fn drop(&mut self) {
        let Some(file) = self.file.take() else {
            return;
        };
        match clients::remove_names(&file, &self.names) {
            Ok(n) => {
                tracing::info!(count = n, file = %file.display(), "removed the run's clients");
                if self.created && clients::ClientsFile::load(&file).is_ok_and(|f| f.is_empty()) {
                    let _ = std::fs::remove_file(&file);
                }
            }
            Err(e) => tracing::warn!(
                file = %file.display(),
                error = %format!("{:#}", anyhow::Error::from(e)),
                "could not remove the run's clients from the clients file"
            ),
        }
    }
}

/// `need` credentials: from `--credentials` first, the rest enrolled in one write.
fn obtain_n_credentials(
    opts: &LoadgenOptions,
    need: usize,
) -> anyhow::Result<(Vec<Enrolled>, Enrollment)> {
    let mut enrollment = Enrollment::default();
    let mut creds = match &opts.credentials {
        Some(p) => load_credentials(p)?,
        None => Vec::new(),
    };
    if creds.len() < need {
        let Some(file) = &opts.clients_file else {
            anyhow::bail!(
                "--credentials {} holds {} clients but {need} are needed ({} clients + {} \
                 probe(s)); add --clients-file to enroll the rest",
                opts.credentials
                    .as_deref()
                    .unwrap_or(Path::new(""))
                    .display(),
                creds.len(),
                opts.clients,
                need - opts.clients
            );
        };
        let prefix = opts.name_prefix.clone().unwrap_or_else(|| {
            format!(
                "loadgen-{}-{}-",
                std::process::id(),
                hex::encode(rebindgw::crypto::random_array::<3>())
            )
        });
        let t = Instant::now();
        let created = !file.exists();
        let more = clients::enroll_many(file, &prefix, need - creds.len())
            .with_context(|| format!("enrolling clients into {}", file.display()))?;
        if !opts.keep_clients && opts.save_credentials.is_none() {
            enrollment = Enrollment {
                file: Some(file.clone()),
                names: more.iter().map(|e| e.name.clone()).collect(),
                created,
            };
        }
        tracing::info!(count = more.len(), took = ?t.elapsed(), file = %file.display(), "enrolled");
        creds.extend(more);
    }
    creds.truncate(need);
    if let Some(p) = &opts.save_credentials {
        save_credentials(p, &creds)?;
    }
    Ok((creds, enrollment))
}

/// Reads JSON lines of `{name, client_id, psk}`.
pub fn load_credentials(path: &Path) -> anyhow::Result<Vec<Enrolled>> {
    rebindgw::secrets::check_private(path)
        .with_context(|| format!("credentials file {}", path.display()))?;
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("reading credentials file {}", path.display()))?,
    );
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<Enrolled>(l)
                .with_context(|| format!("credentials file {} line {}", path.display(), i + 1))
        })
        .collect()
}

/// Writes JSON lines of `{name, client_id, psk}` with mode 0600.
pub fn save_credentials(path: &Path, creds: &[Enrolled]) -> anyhow::Result<()> {
    let mut s = zeroize::Zeroizing::new(String::with_capacity(creds.len() * 140));
    for c in creds {
        s.push_str(&serde_json::to_string(c)?);
        s.push('\n');
    }
    rebindgw::secrets::write_private(path, s.as_bytes())
        .with_context(|| format!("writing credentials file {}", path.display()))?;
    Ok(())
}

/// What the controller observed.
#[derive(Debug, Default)]
pub(crate) struct Timeline {
    pub(crate) connect: Duration,
    pub(crate) measured: Duration,
    pub(crate) settle: Duration,
    /// (sent, received, sent payload bytes) at the start and end of the measured phase.
    pub(crate) at_run_start: (u64, u64, u64),
    pub(crate) at_run_end: (u64, u64, u64),
}

fn totals(shared: &Shared) -> (u64, u64, u64) {
    (
        shared.total(|p| &p.sent),
        shared.total(|p| &p.received),
        shared.total(|p| &p.sent_bytes),
    )
}

/// Drives the phases and prints progress. `dead()` says a driver thread stopped early.
fn control(
    opts: &LoadgenOptions,
    shared: &Shared,
    progress: bool,
    dead: &dyn Fn() -> bool,
) -> anyhow::Result<Timeline> {
    let mut tl = Timeline::default();
    let mode = if opts.child.is_some() {
        ProgressMode::Machine
    } else if progress {
        ProgressMode::Human
    } else {
        ProgressMode::Off
    };
    let mut line = Progress::new(shared, mode, opts.clients);
    let tick = Duration::from_millis(20);
    let check = |label: &str| -> anyhow::Result<()> {
        if dead() {
            anyhow::bail!("a loadgen driver thread stopped during the {label} phase");
        }
        Ok(())
    };

    // Connect.
    let t0 = Instant::now();
    loop {
        check("connect")?;
        let done = shared.total(|p| &p.connected) + shared.total(|p| &p.conn_failed);
        if done >= opts.clients as u64 || t0.elapsed() >= opts.connect_timeout {
            break;
        }
        line.maybe_print("connect", t0);
        std::thread::sleep(tick);
    }
    tl.connect = t0.elapsed();

    // A child of a multi-process run starts its measured phase at the instant the parent
    // names, so that storms happen at the same moment in every process.
    if opts.child.is_some() {
        line.maybe_print("connect", t0);
        multi::child_wait_for_go(&|| check("connect"))?;
    }

    // Run.
    let start = Instant::now();
    let ns = start.saturating_duration_since(shared.base).as_nanos() as u64;
    shared.run_start_ns.store(ns, Relaxed);
    tl.at_run_start = totals(shared);
    shared.set_phase(PHASE_RUN);
    line.reset();
    while start.elapsed() < opts.duration {
        check("run")?;
        line.maybe_print("run", start);
        std::thread::sleep(tick.min(opts.duration.saturating_sub(start.elapsed())));
    }
    tl.at_run_end = totals(shared);
    tl.measured = start.elapsed();

    // Settle: give moved clients time to recover while load continues. Every shard must
    // first confirm it left the run phase, so no move lands after the outage count is read.
    shared.set_phase(PHASE_SETTLE);
    let t1 = Instant::now();
    while shared
        .progress
        .iter()
        .any(|p| p.phase_seen.load(std::sync::atomic::Ordering::Acquire) < PHASE_SETTLE)
    {
        check("settle")?;
        std::thread::sleep(Duration::from_millis(1));
    }
    while t1.elapsed() < opts.settle
        && shared.total(|p| &p.outages) + shared.total(|p| &p.storm_pending) > 0
    {
        check("settle")?;
        line.maybe_print("settle", start);
        std::thread::sleep(tick);
    }
    tl.settle = t1.elapsed();

    // Drain: no new load; wait for the echoes in flight.
    shared.set_phase(PHASE_DRAIN);
    let t2 = Instant::now();
    let mut last = shared.total(|p| &p.received);
    let mut still_since = Instant::now();
    while t2.elapsed() < Duration::from_secs(2) {
        check("drain")?;
        std::thread::sleep(tick);
        let (sent, rx, _) = totals(shared);
        if rx >= sent {
            break;
        }
        if rx != last {
            last = rx;
            still_since = Instant::now();
        } else if still_since.elapsed() >= Duration::from_millis(300) {
            break;
        }
    }
    line.maybe_print("done", start);
    let _ = PHASE_CONNECT;
    Ok(tl)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ProgressMode {
    Off,
    /// The once-a-second line for people.
    Human,
    /// `@progress {json}` lines twice a second, for the parent of a multi-process run.
    Machine,
}

/// The once-a-second progress line on stderr.
struct Progress<'a> {
    shared: &'a Shared,
    mode: ProgressMode,
    clients: usize,
    last: Instant,
    last_tx: u64,
    last_rx: u64,
}

impl<'a> Progress<'a> {
    fn new(shared: &'a Shared, mode: ProgressMode, clients: usize) -> Self {
        Progress {
            shared,
            mode,
            clients,
            last: Instant::now(),
            last_tx: 0,
            last_rx: 0,
        }
    }

    fn reset(&mut self) {
        self.last = Instant::now();
        let (tx, rx, _) = totals(self.shared);
        self.last_tx = tx;
        self.last_rx = rx;
    }

    fn maybe_print(&mut self, phase: &str, since: Instant) {
        let dt = self.last.elapsed();
        let every = match self.mode {
            ProgressMode::Off => return,
            ProgressMode::Human => Duration::from_secs(1),
            ProgressMode::Machine => Duration::from_millis(500),
        };
        if dt < every && phase != "done" {
            return;
        }
        let s = self.shared;
        let (tx, rx, _) = totals(s);
        let p99 = s
            .progress
            .iter()
            .map(|p| p.p99_us.load(Relaxed))
            .max()
            .unwrap_or(0);
        if self.mode == ProgressMode::Machine {
            let p = multi::ChildProgress {
                phase: phase.to_owned(),
                connected: s.total(|p| &p.connected),
                conn_failed: s.total(|p| &p.conn_failed),
                failed_later: s.total(|p| &p.failed_later),
                sent: tx,
                received: rx,
                moves: s.total(|p| &p.moves),
                rebinds_ok: s.total(|p| &p.rebinds_ok),
                rebinds_failed: s.total(|p| &p.rebinds_failed),
                outages: s.total(|p| &p.outages),
                storm_pending: s.total(|p| &p.storm_pending),
                p99_us: p99,
            };
            p.emit();
            self.last = Instant::now();
            return;
        }
        let secs = dt.as_secs_f64().max(1e-3);
        let loss = if tx == 0 {
            0.0
        } else {
            100.0 * tx.saturating_sub(rx) as f64 / tx as f64
        };
        eprintln!(
            "{phase:>7} t={:.0}s clients {}/{} up{}, tx {}/s rx {}/s, loss {loss:.2}%, rebinds {} ok \
             {} failed{}, p99 rtt {}",
            since.elapsed().as_secs_f64(),
            s.total(|p| &p.connected),
            self.clients,
            match s.total(|p| &p.conn_failed) + s.total(|p| &p.failed_later) {
                0 => String::new(),
                f => format!(" ({f} failed)"),
            },
            fmt_rate((tx - self.last_tx.min(tx)) as f64 / secs),
            fmt_rate((rx - self.last_rx.min(rx)) as f64 / secs),
            s.total(|p| &p.rebinds_ok),
            s.total(|p| &p.rebinds_failed),
            match (s.total(|p| &p.outages), s.total(|p| &p.storm_pending)) {
                (0, 0) => String::new(),
                (o, 0) => format!(", {o} recovering"),
                (o, m) => format!(", {o} recovering, {m} still to move"),
            },
            fmt_ms(p99 as f64 / 1000.0),
        );
        self.last = Instant::now();
        self.last_tx = tx;
        self.last_rx = rx;
    }
}

impl ShardResult {
    /// Adds `o`: counters and histograms add up; `counters.storms` (storms seen, the same in
    /// every shard) is the larger of the two.
    pub fn merge(&mut self, o: &ShardResult) {
        let storms = self.counters.storms.max(o.counters.storms);
        self.counters.merge(&o.counters);
        self.counters.storms = storms;
        if self.storms.len() < o.storms.len() {
            self.storms.resize(o.storms.len(), Default::default());
        }
        for (a, b) in self.storms.iter_mut().zip(&o.storms) {
            a.merge(b);
        }
        self.rtt.add(&o.rtt);
        self.handshake.add(&o.handshake);
        self.recovery.add(&o.recovery);
        self.traffic_recovery.add(&o.traffic_recovery);
        if self.rotations.len() < o.rotations.len() {
            self.rotations.resize(o.rotations.len(), Default::default());
        }
        for (a, b) in self.rotations.iter_mut().zip(&o.rotations) {
            a.merge(b);
        }
    }

    /// All shards' results in one.
    pub fn merge_all(results: &[ShardResult], storms: usize) -> ShardResult {
        let mut m = ShardResult {
            storms: vec![Default::default(); storms],
            ..ShardResult::default()
        };
        for r in results {
            m.merge(r);
        }
        m
    }
}

/// The run's report. `commands`: the rotation commands this process sent (`None` in a
/// child of a multi-process run, whose parent sends them).
pub(crate) fn build_report(
    opts: &LoadgenOptions,
    threads: usize,
    processes: usize,
    tl: &Timeline,
    merged: &ShardResult,
    attacks: Option<AttackResult>,
    commands: Option<&[RotationCommand]>,
) -> LoadReport {
    let c = &merged.counters;
    let storms = c.storms;
    let (rtt, handshake, recovery, traffic_recovery) = (
        &merged.rtt,
        &merged.handshake,
        &merged.recovery,
        &merged.traffic_recovery,
    );
    let secs = tl.measured.as_secs_f64().max(1e-9);
    let pct = |num: u64, den: u64| {
        if den == 0 {
            0.0
        } else {
            100.0 * num as f64 / den as f64
        }
    };
    let lost = c.sent.saturating_sub(c.received);
    let expected = (c.sent_during_outage + c.in_flight_at_move)
        .saturating_sub(c.late_echoes)
        .min(lost);
    let (rate, window) = match opts.load {
        LoadMode::Open { rate } => (Some(rate), None),
        LoadMode::Closed { window } => (None, Some(window)),
    };
    let (attack_reports, victim) = match attacks {
        Some(a) => (a.reports, a.victim),
        None => (Vec::new(), None),
    };
    let mut report = LoadReport {
        passed: false,
        failures: Vec::new(),
        settings: RunSettings {
            gateways: opts.gateways.iter().map(|g| g.to_string()).collect(),
            clients: opts.clients,
            threads,
            processes,
            duration_s: opts.duration.as_secs_f64(),
            load: if rate.is_some() { "open" } else { "closed" }.into(),
            rate,
            window,
            payload: opts.payload.to_string(),
            churn_per_sec: opts.churn_per_sec,
            move_kind: format!("{:?}", opts.move_kind).to_lowercase(),
            on_move: format!("{:?}", opts.on_move).to_lowercase(),
            storms_at_s: opts.storm_times().iter().map(|d| d.as_secs_f64()).collect(),
            attacks: opts.attacks.iter().map(|a| a.name().to_owned()).collect(),
            attack_rate: opts.attack_rate,
        },
        clients: ClientsReport {
            requested: opts.clients,
            connected: c.connected,
            failed_to_connect: (opts.clients as u64).saturating_sub(c.connected),
            failed_after_connect: c.failed_later,
            reconnected: c.reconnected,
            handshake: handshake.summary(),
            connect_phase_s: tl.connect.as_secs_f64(),
        },
        traffic: TrafficReport {
            sent: c.sent,
            received: c.received,
            lost,
            loss_pct: pct(lost, c.sent),
            sent_during_outage: c.sent_during_outage,
            in_flight_at_move: c.in_flight_at_move,
            late_echoes: c.late_echoes,
            expected_losses: expected,
            steady_loss_pct: pct(lost - expected, c.sent - expected),
            tx_pps: (tl.at_run_end.0 - tl.at_run_start.0) as f64 / secs,
            rx_pps: (tl.at_run_end.1 - tl.at_run_start.1) as f64 / secs,
            tx_payload_mbit: (tl.at_run_end.2 - tl.at_run_start.2) as f64 * 8.0 / secs / 1e6,
            rtt: rtt.summary(),
            echo_timeouts: c.echo_timeouts,
            pacer_skipped: c.pacer_skipped,
            socket_send_errors: c.send_errors,
            stray_datagrams: c.stray,
            misdelivered: c.misdelivered,
            foreign_payloads: c.foreign,
            move_errors: c.move_errors,
            notified: c.notified,
        },
        rebinds: RebindsReport {
            moves: c.moves,
            outages: c.outages,
            storms,
            succeeded: c.rebinds_ok,
            failed: c.rebinds_failed,
            unrecovered: c.unrecovered,
            extra: c.extra,
            abandoned: c.abandoned,
            recovery: recovery.summary(),
            traffic_recovery: traffic_recovery.summary(),
            storm_detail: opts
                .storm_times()
                .iter()
                .zip(&merged.storms)
                .take(storms as usize)
                .map(|(at, st)| StormReport {
                    at_s: at.as_secs_f64(),
                    moved: st.moved,
                    recovered: st.recovered,
                    moves_done_s: st.last_move_s,
                    last_recovery_s: st.last_recovery_s,
                    all_recovered: st.recovered >= st.moved,
                })
                .collect(),
        },
        attacks: attack_reports,
        victim,
        rotations: rotation_reports(opts, merged, commands),
        measured_s: tl.measured.as_secs_f64(),
        settle_s: tl.settle.as_secs_f64(),
        raw: None,
    };
    report.judge(opts.max_loss_pct);
    report
}

/// One [`RotationReport`] per `--rotate-at` time, from the shards' merged statistics and the
/// commands sent (a command the run ended before is reported as failed).
fn rotation_reports(
    opts: &LoadgenOptions,
    merged: &ShardResult,
    commands: Option<&[RotationCommand]>,
) -> Vec<RotationReport> {
    let c = &merged.counters;
    let live = (c.connected + c.reconnected).saturating_sub(c.failed_later);
    opts.rotate_at
        .iter()
        .enumerate()
        .map(|(k, at)| {
            let st = merged.rotations.get(k).cloned().unwrap_or_default();
            RotationReport {
                at_s: at.as_secs_f64(),
                command: commands.map(|cs| {
                    cs.get(k).cloned().unwrap_or_else(|| RotationCommand {
                        answer: "not sent: the run ended first".into(),
                        ..RotationCommand::default()
                    })
                }),
                live_clients: live,
                installed: st.installed,
                installed_live: st.installed_live,
                installed_fraction: if live == 0 {
                    0.0
                } else {
                    st.installed_live as f64 / live as f64
                },
                delivery: st.delivery.summary(),
                switched: st.switched,
                handshakes: st.handshakes,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebindgw::wire::ClientCredentials;

    #[test]
    fn credentials_roundtrip_private_file() {
        let dir = std::env::temp_dir().join(format!(
            "loadgen-creds-{}-{}",
            std::process::id(),
            hex::encode(rebindgw::crypto::random_array::<4>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("creds.jsonl");
        let creds: Vec<Enrolled> = (0..3)
            .map(|i| Enrolled {
                name: format!("c{i}"),
                creds: ClientCredentials {
                    client_id: [i; 16],
                    psk: [i + 100; 32],
                },
            })
            .collect();
        save_credentials(&path, &creds).unwrap();
        let back = load_credentials(&path).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[2].name, "c2");
        assert_eq!(back[2].creds.client_id, [2; 16]);
        assert_eq!(back[2].creds.psk, [102; 32]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, "{\"name\": \"x\"}\n").unwrap();
        let err = load_credentials(&path).unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
