//! Multi-process runs: more clients than one process may hold sockets for.
//!
//! Every client needs its own UDP socket, so one process runs at most about RLIMIT_NOFILE
//! clients, and the hard limit cannot be raised without CAP_SYS_RESOURCE. With
//! `--processes N` (or automatically, when the hard limit is too low for `--clients`) the
//! parent:
//! 1. **enrolls** every client at once (one write of the clients file, so the host reloads
//!    once), plus one probe connection per child, and gives child `i` its credentials in a
//!    private temporary JSON-lines file (`--credentials`);
//! 2. **spawns** `N` copies of this executable (`rebindgw loadgen ... --shard I/N/FIRST/TOTAL
//!    --json`): child `i` drives the global clients `FIRST..FIRST+n` (so source addresses,
//!    stamps and moved-to addresses are disjoint across children) at its share of the
//!    rates; only child 0 runs the attacks;
//! 3. **synchronizes** the phases: each child connects its clients, prints `@ready` on stderr
//!    and waits; when all are ready the parent writes `go UNIX_MS` to every child's stdin,
//!    and each child starts its measured phase at that wall-clock instant, so storms happen
//!    at the same moment everywhere (rotation mode: the parent sends the rotation commands
//!    timed from that instant too, and the children time key delivery from it);
//! 4. **shows progress**: children print `@progress {json}` on stderr twice a second; the
//!    parent prints one merged line a second (other child stderr lines are passed through,
//!    prefixed with the child number);
//! 5. **merges** the children's JSON reports: counters add up, the HdrHistograms are merged
//!    exactly (each child's report carries them in V2 serialization), storm times take the
//!    latest, and the verdict is judged again on the merged numbers.
#![forbid(unsafe_code)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::addrs::AddrPool;
use super::attack::AttackResult;
use super::options::{ChildRole, LoadMode, LoadgenOptions};
use super::report::{
    AttackReport, LatencyHist, LoadReport, RotationCommand, RotationStat, VictimReport, fmt_ms,
    fmt_rate,
};
use super::rotation::RotationPlan;
use super::shard::ShardResult;
use super::{Timeline, build_report, obtain_n_credentials, save_credentials, sys};

/// Descriptors a process needs besides its client sockets: stdio, epoll sets, the probe,
/// the socket a move binds before closing the old one, and slack.
fn overhead(opts: &LoadgenOptions, threads: usize) -> usize {
    64 + 4 * threads + opts.attacks.len() * opts.attack_tuples
}

/// Driver threads per child when `--threads` is 0: the cores shared out.
fn child_threads(opts: &LoadgenOptions, n: usize) -> usize {
    if opts.threads > 0 {
        return opts.threads;
    }
    let cores = std::thread::available_parallelism().map_or(2, |c| c.get().min(8));
    cores.div_ceil(n).max(1)
}

/// How many processes the run needs: `opts.processes` if set, else as few as the
/// RLIMIT_NOFILE hard limit allows (1 when this process can hold every socket).
pub fn process_count(opts: &LoadgenOptions) -> anyhow::Result<usize> {
    let k = opts.fds_per_client();
    let want = k * opts.clients + overhead(opts, opts.thread_count());
    let (soft, _) = sys::raise_nofile_limit(want as u64).context("raising RLIMIT_NOFILE")?;
    let soft = soft.min(usize::MAX as u64) as usize;
    if opts.processes == 1 || (opts.processes == 0 && soft >= want) {
        return Ok(1);
    }
    // Children inherit this limit (their soft limit goes to the hard one).
    let mut n = opts.processes.max(2);
    if opts.processes == 0 {
        while n < 256 {
            let per = soft.saturating_sub(overhead(opts, child_threads(opts, n))) / k;
            if per > 0 && opts.clients.div_ceil(n) <= per {
                break;
            }
            n += 1;
        }
    }
    let per = soft.saturating_sub(overhead(opts, child_threads(opts, n))) / k;
    if opts.clients.div_ceil(n) > per {
        anyhow::bail!(
            "--processes {n}: {} clients per process need more than the {soft} descriptors \
             RLIMIT_NOFILE allows (at most {per} clients each); use more processes",
            opts.clients.div_ceil(n)
        );
    }
    if n > opts.clients {
        anyhow::bail!(
            "--processes {n}: more processes than the {} clients",
            opts.clients
        );
    }
    Ok(n)
}

/// A child's live counters, printed as `@progress {json}` on its stderr.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChildProgress {
    pub phase: String,
    pub connected: u64,
    pub conn_failed: u64,
    pub failed_later: u64,
    pub sent: u64,
    pub received: u64,
    pub moves: u64,
    pub rebinds_ok: u64,
    pub rebinds_failed: u64,
    pub outages: u64,
    #[serde(default)]
    pub storm_pending: u64,
    pub p99_us: u64,
}

const PROGRESS_TAG: &str = "@progress ";
const READY_TAG: &str = "@ready";

impl ChildProgress {
    pub(super) fn emit(&self) {
        let line = serde_json::to_string(self).expect("progress serializes");
        eprintln!("{PROGRESS_TAG}{line}");
    }
}

/// In a child: tell the parent we are connected, then wait for `go UNIX_MS` on stdin and
/// sleep until that instant. `check` fails if a driver thread died meanwhile.
pub(super) fn child_wait_for_go(check: &dyn Fn() -> anyhow::Result<()>) -> anyhow::Result<()> {
    eprintln!("{READY_TAG}");
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("loadgen-go".into())
        .spawn(move || {
            let mut line = String::new();
            let r = std::io::stdin().lock().read_line(&mut line).map(|_| line);
            let _ = tx.send(r);
        })?;
    let line = loop {
        check()?;
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(r) => break r.context("reading the start signal from the parent")?,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the start-signal reader stopped")
            }
        }
    };
    let ms: u64 = line
        .trim()
        .strip_prefix("go ")
        .and_then(|m| m.trim().parse().ok())
        .ok_or_else(|| {
            anyhow::anyhow!("expected `go UNIX_MS` from the parent on stdin, got {line:?}")
        })?;
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    if let Ok(wait) = at.duration_since(SystemTime::now()) {
        std::thread::sleep(wait);
    } else {
        tracing::warn!("the start instant had passed when the signal arrived");
    }
    Ok(())
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A `--source-addrs` value that parses back to `pool`, with runs of a whole /24 or /16 (as
/// `AddrPool::parse` expands CIDR blocks: `.1` to `.254` of each /24) written as blocks.
pub fn pool_spec(pool: &AddrPool) -> String {
    match pool {
        AddrPool::Loopback { first, count } => (*first..first.saturating_add(*count))
            .map(|a| format!("127.{a}.0.0/16"))
            .collect::<Vec<_>>()
            .join(","),
        AddrPool::Listed(v) => {
            let v4 = |k: usize| match v.get(k) {
                Some(IpAddr::V4(a)) => Some(u32::from(*a)),
                _ => None,
            };
            // Whether v[k..] starts with the CIDR expansion of the block at `base` of
            // `n24` /24s.
            let block = |k: usize, base: u32, n24: u32| -> bool {
                (0..n24).all(|b| {
                    (1..=254u32)
                        .all(|c| v4(k + (b * 254 + c - 1) as usize) == Some(base + (b << 8) + c))
                })
            };
            let mut out = Vec::new();
            let mut k = 0;
            while k < v.len() {
                if let Some(a) = v4(k)
                    && a & 0xff == 1
                {
                    let b16 = a & 0xffff_0000;
                    if a & 0xff00 == 0 && block(k, b16, 256) {
                        out.push(format!("{}/16", Ipv4Addr::from(b16)));
                        k += 256 * 254;
                        continue;
                    }
                    if block(k, a - 1, 1) {
                        out.push(format!("{}/24", Ipv4Addr::from(a - 1)));
                        k += 254;
                        continue;
                    }
                }
                out.push(v[k].to_string());
                k += 1;
            }
            out.join(",")
        }
    }
}

fn dur_arg(d: Duration) -> String {
    format!("{}us", d.as_micros())
}

fn value_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

/// The `rebindgw loadgen` arguments of one child: `clients` clients, its share of the
/// rates, credentials from `creds`. Client timers and socket buffers are the defaults.
pub fn child_args(
    o: &LoadgenOptions,
    role: ChildRole,
    clients: usize,
    threads: usize,
    creds: &Path,
) -> Vec<String> {
    let share = clients as f64 / o.clients.max(1) as f64;
    let mut a: Vec<String> = Vec::new();
    let mut kv = |k: &str, v: String| a.push(format!("--{k}={v}"));
    let gws: Vec<String> = o.gateways.iter().map(|g| g.to_string()).collect();
    kv("gateway", gws.join(","));
    kv("clients", clients.to_string());
    kv("threads", threads.to_string());
    kv("duration", dur_arg(o.duration));
    match o.load {
        LoadMode::Open { rate } => kv("rate", (rate * share).to_string()),
        LoadMode::Closed { window } => kv("window", window.to_string()),
    }
    kv("payload", o.payload.to_string());
    kv("echo-timeout", dur_arg(o.echo_timeout));
    kv("churn-per-sec", (o.churn_per_sec * share).to_string());
    kv("move-kind", value_name(&o.move_kind));
    if let Some(t) = o.storm_at {
        kv("storm-at", dur_arg(t));
    }
    if let Some(t) = o.storm_every {
        kv("storm-every", dur_arg(t));
    }
    if role.index == 0 && !o.attacks.is_empty() {
        let names: Vec<&str> = o.attacks.iter().map(|m| m.name()).collect();
        kv("attack", names.join(","));
    }
    kv("attack-rate", o.attack_rate.to_string());
    kv("attack-tuples", o.attack_tuples.to_string());
    kv("credentials", creds.display().to_string());
    if let Some(p) = &o.source_addrs {
        kv("source-addrs", pool_spec(p));
    }
    kv("connect-rate", (o.connect_rate * share).to_string());
    kv("connect-timeout", dur_arg(o.connect_timeout));
    kv("enroll-wait", dur_arg(o.enroll_wait));
    kv("settle", dur_arg(o.settle));
    if let Some(m) = o.max_loss_pct {
        kv("max-loss", m.to_string());
    }
    kv("on-move", value_name(&o.on_move));
    // The children time key delivery; only the parent sends the rotation commands.
    if !o.rotate_at.is_empty() {
        let at: Vec<String> = o.rotate_at.iter().map(|d| dur_arg(*d)).collect();
        kv("rotate-at", at.join(","));
    }
    kv("processes", "1".into());
    kv("shard", role.to_string());
    if o.storm_prebind {
        a.push("--storm-prebind".into());
    }
    if o.behind_nat {
        a.push("--behind-nat".into());
    }
    if let Some(f) = &o.rebound_log {
        a.push(format!("--rebound-log={}", f.display()));
    }
    a.push("--json".into());
    a
}

/// Removes the temporary credentials directory when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills (by their own handles) and reaps children still running when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

#[derive(Default)]
struct ChildView {
    ready: bool,
    progress: Option<ChildProgress>,
    exited: Option<std::process::ExitStatus>,
}

/// Runs the load over `n` child processes and merges their reports. See the module docs.
pub fn run_multi(opts: LoadgenOptions, n: usize, progress: bool) -> anyhow::Result<LoadReport> {
    opts.validate().map_err(anyhow::Error::msg)?;
    let plan = RotationPlan::from_options(&opts)?;
    let threads = child_threads(&opts, n);
    let exe = match &opts.child_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding this executable for the children")?,
    };

    // Enroll everyone once: clients, then one probe per child.
    let (creds, _enrollment) = obtain_n_credentials(&opts, opts.clients + n)?;
    let dir = std::env::temp_dir().join(format!(
        "rebindgw-loadgen-{}-{}",
        std::process::id(),
        hex::encode(rebindgw::crypto::random_array::<4>())
    ));
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let _dir = TempDir(dir.clone());

    let mut children = Children(Vec::with_capacity(n));
    let views: Arc<Mutex<Vec<ChildView>>> =
        Arc::new(Mutex::new((0..n).map(|_| ChildView::default()).collect()));
    let mut stdouts = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    let mut first = 0;
    for i in 0..n {
        let count = opts.clients / n + usize::from(i < opts.clients % n);
        let mut mine = creds[first..first + count].to_vec();
        mine.push(creds[opts.clients + i].clone());
        let path = dir.join(format!("creds-{i}.jsonl"));
        save_credentials(&path, &mine)?;
        drop(mine);
        let role = ChildRole {
            index: i,
            count: n,
            first_client: first,
            total_clients: opts.clients,
        };
        let args = child_args(&opts, role, count, threads, &path);
        let mut child = Command::new(&exe)
            .arg("loadgen")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting loadgen child {i} ({})", exe.display()))?;
        let mut out = child.stdout.take().expect("piped");
        stdouts.push(std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        }));
        let err = child.stderr.take().expect("piped");
        let v = Arc::clone(&views);
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if let Some(j) = line.strip_prefix(PROGRESS_TAG) {
                    if let Ok(p) = serde_json::from_str::<ChildProgress>(j) {
                        v.lock().expect("views")[i].progress = Some(p);
                    }
                } else if line.trim() == READY_TAG {
                    v.lock().expect("views")[i].ready = true;
                } else {
                    eprintln!("[loadgen {i}] {line}");
                }
            }
        }));
        children.0.push(child);
        first += count;
    }
    drop(creds);
    tracing::info!(
        processes = n,
        threads_each = threads,
        "loadgen children started"
    );

    let mut line = MergedProgress::new(progress, opts.clients, n);
    let poll = |children: &mut Children| {
        let mut v = views.lock().expect("views");
        for (i, c) in children.0.iter_mut().enumerate() {
            if v[i].exited.is_none()
                && let Ok(Some(st)) = c.try_wait()
            {
                v[i].exited = Some(st);
            }
        }
    };

    // Connect: until every child is ready.
    let t0 = Instant::now();
    let limit = opts.enroll_wait + opts.connect_timeout + Duration::from_secs(60);
    loop {
        poll(&mut children);
        {
            let v = views.lock().expect("views");
            if let Some((i, st)) = v
                .iter()
                .enumerate()
                .find_map(|(i, c)| c.exited.filter(|_| !c.ready).map(|s| (i, s)))
            {
                anyhow::bail!("loadgen child {i} exited during the connect phase ({st})");
            }
            if v.iter().all(|c| c.ready) {
                break;
            }
        }
        if t0.elapsed() > limit {
            anyhow::bail!("loadgen children not ready after {limit:?}");
        }
        line.maybe_print(&views, t0);
        std::thread::sleep(Duration::from_millis(20));
    }

    // Go: everyone starts the measured phase at the same wall-clock instant.
    let go = unix_ms_now() + 250;
    for (i, c) in children.0.iter_mut().enumerate() {
        let mut stdin = c.stdin.take().expect("piped");
        writeln!(stdin, "go {go}")
            .and_then(|_| stdin.flush())
            .with_context(|| format!("starting loadgen child {i}"))?;
    }
    // Like the children, wake at the go instant itself: rotations are sent from here and
    // timed from it in the children.
    let go_at = UNIX_EPOCH + Duration::from_millis(go);
    if let Ok(wait) = go_at.duration_since(SystemTime::now()) {
        std::thread::sleep(wait);
    }
    let start = Instant::now();
    // Rotation mode: the children time key delivery from the go instant, which `start` is.
    let rotations_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rotator = plan.map(|p| {
        let stop = Arc::clone(&rotations_stop);
        std::thread::spawn(move || p.run(start, &stop))
    });
    let stop_rotations = |r: Option<std::thread::JoinHandle<Vec<RotationCommand>>>| {
        rotations_stop.store(true, std::sync::atomic::Ordering::Release);
        r.map(|h| h.join().unwrap_or_default())
    };
    line.reset(&views);
    loop {
        poll(&mut children);
        if views
            .lock()
            .expect("views")
            .iter()
            .all(|c| c.exited.is_some())
        {
            break;
        }
        line.maybe_print(&views, start);
        std::thread::sleep(Duration::from_millis(20));
    }
    for r in readers {
        let _ = r.join();
    }
    let commands = stop_rotations(rotator);

    // Merge.
    let mut reports = Vec::with_capacity(n);
    for (i, h) in stdouts.into_iter().enumerate() {
        let out = h
            .join()
            .map_err(|_| anyhow::anyhow!("stdout reader panicked"))?;
        let st = views.lock().expect("views")[i].exited;
        let r: LoadReport = serde_json::from_str(&out).with_context(|| {
            format!(
                "loadgen child {i} ({}) gave no report; see its log above",
                st.map_or("running".into(), |s| s.to_string())
            )
        })?;
        reports.push(r);
    }
    line.done(&views, start);
    merge_reports(&opts, n, reports, commands.as_deref())
}

/// Merges the children's reports into the run's report; `commands` are the rotation
/// commands the parent sent.
pub fn merge_reports(
    opts: &LoadgenOptions,
    n: usize,
    reports: Vec<LoadReport>,
    commands: Option<&[RotationCommand]>,
) -> anyhow::Result<LoadReport> {
    let storms = opts.storm_times().len();
    let mut merged = ShardResult {
        storms: vec![Default::default(); storms],
        ..ShardResult::default()
    };
    let mut tl = Timeline::default();
    let mut threads = 0;
    let mut attacks: Vec<AttackReport> = Vec::new();
    let mut victim: Option<VictimReport> = None;
    for (i, r) in reports.into_iter().enumerate() {
        let raw = r
            .raw
            .ok_or_else(|| anyhow::anyhow!("loadgen child {i}: report without raw results"))?;
        let hist = |s: &str| {
            LatencyHist::from_hex(s).map_err(|e| anyhow::anyhow!("loadgen child {i}: {e}"))
        };
        merged.merge(&ShardResult {
            counters: raw.counters,
            storms: raw.storms,
            rtt: hist(&raw.rtt)?,
            handshake: hist(&raw.handshake)?,
            recovery: hist(&raw.recovery)?,
            traffic_recovery: hist(&raw.traffic_recovery)?,
            rotations: raw
                .rotations
                .iter()
                .map(RotationStat::from_raw)
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("loadgen child {i}: {e}"))?,
        });
        threads += r.settings.threads;
        let d = Duration::from_secs_f64;
        tl.connect = tl.connect.max(d(raw.connect_s));
        tl.measured = tl.measured.max(d(raw.measured_s));
        tl.settle = tl.settle.max(d(raw.settle_s));
        let add = |a: &mut (u64, u64, u64), b: (u64, u64, u64)| {
            a.0 += b.0;
            a.1 += b.1;
            a.2 += b.2;
        };
        add(&mut tl.at_run_start, raw.at_run_start);
        add(&mut tl.at_run_end, raw.at_run_end);
        for a in r.attacks {
            match attacks.iter_mut().find(|x| x.mode == a.mode) {
                Some(x) => {
                    x.sent += a.sent;
                    x.sent_bytes += a.sent_bytes;
                    x.replies += a.replies;
                    x.reply_bytes += a.reply_bytes;
                    x.unrecognized += a.unrecognized;
                    x.accepted += a.accepted;
                    x.past_cookie += a.past_cookie;
                    x.captured += a.captured;
                }
                None => attacks.push(a),
            }
        }
        if let Some(v) = r.victim {
            let m = victim.get_or_insert_with(VictimReport::default);
            m.probes += v.probes;
            m.echoes += v.echoes;
            m.unrecognized += v.unrecognized;
        }
    }
    for a in &mut attacks {
        a.reply_ratio = if a.sent_bytes == 0 {
            0.0
        } else {
            a.reply_bytes as f64 / a.sent_bytes as f64
        };
    }
    let attacks = (!attacks.is_empty() || victim.is_some()).then_some(AttackResult {
        reports: attacks,
        victim,
    });
    Ok(build_report(
        opts, threads, n, &tl, &merged, attacks, commands,
    ))
}

/// The parent's once-a-second line, from the children's latest `@progress`.
struct MergedProgress {
    enabled: bool,
    clients: usize,
    n: usize,
    last: Instant,
    last_tx: u64,
    last_rx: u64,
}

impl MergedProgress {
    fn new(enabled: bool, clients: usize, n: usize) -> Self {
        MergedProgress {
            enabled,
            clients,
            n,
            last: Instant::now(),
            last_tx: 0,
            last_rx: 0,
        }
    }

    fn sum(views: &Mutex<Vec<ChildView>>) -> (ChildProgress, String, usize) {
        let v = views.lock().expect("views");
        let mut t = ChildProgress::default();
        let order = ["connect", "run", "settle", "done"];
        let mut phase = "done";
        let mut exited = 0;
        for c in v.iter() {
            exited += usize::from(c.exited.is_some());
            let Some(p) = &c.progress else {
                phase = "connect";
                continue;
            };
            t.connected += p.connected;
            t.conn_failed += p.conn_failed;
            t.failed_later += p.failed_later;
            t.sent += p.sent;
            t.received += p.received;
            t.moves += p.moves;
            t.rebinds_ok += p.rebinds_ok;
            t.rebinds_failed += p.rebinds_failed;
            t.outages += p.outages;
            t.storm_pending += p.storm_pending;
            t.p99_us = t.p99_us.max(p.p99_us);
            let rank = |s: &str| order.iter().position(|o| *o == s).unwrap_or(0);
            if rank(&p.phase) < rank(phase) {
                phase = order[rank(&p.phase)];
            }
        }
        (t, phase.to_owned(), exited)
    }

    fn reset(&mut self, views: &Mutex<Vec<ChildView>>) {
        let (t, _, _) = Self::sum(views);
        self.last = Instant::now();
        self.last_tx = t.sent;
        self.last_rx = t.received;
    }

    fn maybe_print(&mut self, views: &Mutex<Vec<ChildView>>, since: Instant) {
        if !self.enabled || self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.print(views, since, None);
    }

    fn done(&mut self, views: &Mutex<Vec<ChildView>>, since: Instant) {
        if self.enabled {
            self.print(views, since, Some("done"));
        }
    }

    fn print(&mut self, views: &Mutex<Vec<ChildView>>, since: Instant, phase: Option<&str>) {
        let (t, p, exited) = Self::sum(views);
        let phase = phase.unwrap_or(&p);
        let secs = self.last.elapsed().as_secs_f64().max(1e-3);
        let (tx, rx) = (t.sent, t.received);
        let loss = if tx == 0 {
            0.0
        } else {
            100.0 * tx.saturating_sub(rx) as f64 / tx as f64
        };
        eprintln!(
            "{phase:>7} t={:.0}s [{} procs{}] clients {}/{} up{}, tx {}/s rx {}/s, loss \
             {loss:.2}%, moves {}, rebinds {} ok {} failed{}, p99 rtt {}",
            since.elapsed().as_secs_f64(),
            self.n,
            if exited > 0 {
                format!(", {exited} finished")
            } else {
                String::new()
            },
            t.connected,
            self.clients,
            match t.conn_failed + t.failed_later {
                0 => String::new(),
                f => format!(" ({f} failed)"),
            },
            fmt_rate(tx.saturating_sub(self.last_tx) as f64 / secs),
            fmt_rate(rx.saturating_sub(self.last_rx) as f64 / secs),
            t.moves,
            t.rebinds_ok,
            t.rebinds_failed,
            match (t.outages, t.storm_pending) {
                (0, 0) => String::new(),
                (o, 0) => format!(", {o} recovering"),
                (o, m) => format!(", {o} recovering, {m} still to move"),
            },
            fmt_ms(t.p99_us as f64 / 1000.0),
        );
        self.last = Instant::now();
        self.last_tx = tx;
        self.last_rx = rx;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::options::{AttackMode, LoadgenArgs, MoveKind, OnMove};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    #[test]
    fn pool_spec_round_trips() {
        for spec in [
            "127.5.0.0/23,127.9.9.9",
            "127.8.0.0/16,10.0.0.0/24,10.0.1.7",
            "10.0.0.0/31",
            "::1",
        ] {
            let p = AddrPool::parse(spec).unwrap();
            let back = AddrPool::parse(&pool_spec(&p)).unwrap();
            assert_eq!(back, p, "{spec} -> {}", pool_spec(&p));
        }
        let p = AddrPool::parse("127.8.0.0/15").unwrap();
        assert_eq!(pool_spec(&p), "127.8.0.0/16,127.9.0.0/16");
        let lo = AddrPool::Loopback { first: 3, count: 2 };
        let back = AddrPool::parse(&pool_spec(&lo)).unwrap();
        for j in [0, 1, 253, 254, 254 * 256, 2 * 254 * 256 - 1] {
            assert_eq!(back.get(j), lo.get(j), "{j}");
        }
    }

    #[test]
    fn child_args_parse_back_with_shares() {
        let mut o = LoadgenOptions::new(vec!["127.0.0.1:7400".parse().unwrap()]);
        o.clients = 1000;
        o.duration = Duration::from_millis(3500);
        o.load = LoadMode::Open { rate: 8000.0 };
        o.churn_per_sec = 10.0;
        o.move_kind = MoveKind::Port;
        o.storm_at = Some(Duration::from_secs(1));
        o.storm_every = Some(Duration::from_millis(750));
        o.attacks = vec![AttackMode::Garbage, AttackMode::WrongR];
        o.clients_file = Some("/tmp/c.toml".into());
        o.source_addrs = Some(AddrPool::parse("127.8.0.0/16").unwrap());
        o.connect_rate = 2000.0;
        o.max_loss_pct = Some(1.5);
        o.on_move = OnMove::Send;
        o.storm_prebind = true;
        let role = ChildRole {
            index: 0,
            count: 4,
            first_client: 0,
            total_clients: 1000,
        };
        let mut argv = vec!["loadgen".to_owned()];
        argv.extend(child_args(&o, role, 250, 1, Path::new("/tmp/x.jsonl")));
        let cli = Cli::try_parse_from(&argv).unwrap();
        assert!(cli.args.json);
        let c = cli.args.into_options().unwrap();
        assert_eq!(c.clients, 250);
        assert_eq!(c.threads, 1);
        assert_eq!(c.duration, o.duration);
        assert_eq!(c.load, LoadMode::Open { rate: 2000.0 });
        assert_eq!(c.churn_per_sec, 2.5);
        assert_eq!(c.connect_rate, 500.0);
        assert_eq!(c.move_kind, MoveKind::Port);
        assert_eq!(c.storm_times(), o.storm_times());
        assert_eq!(c.attacks, o.attacks);
        assert_eq!(c.clients_file, None);
        assert_eq!(c.credentials.as_deref(), Some(Path::new("/tmp/x.jsonl")));
        assert_eq!(c.source_addrs, o.source_addrs);
        assert_eq!(c.max_loss_pct, Some(1.5));
        assert_eq!(c.on_move, OnMove::Send);
        assert!(c.storm_prebind);
        assert_eq!(c.processes, 1);
        assert_eq!(c.child, Some(role));
        // Attacks run in child 0 only.
        let role1 = ChildRole { index: 1, ..role };
        let mut argv = vec!["loadgen".to_owned()];
        argv.extend(child_args(&o, role1, 250, 1, Path::new("/tmp/y.jsonl")));
        let c = Cli::try_parse_from(&argv)
            .unwrap()
            .args
            .into_options()
            .unwrap();
        assert!(c.attacks.is_empty());
        // Rotation mode: every child times the rotations; none sends them.
        o.rotate_at = vec![Duration::from_secs(2), Duration::from_millis(2500)];
        o.admin = Some("127.0.0.1:7480".into());
        o.admin_key = Some("/tmp/admin.key".into());
        o.rotate_force = true;
        let argv: Vec<String> = std::iter::once("loadgen".to_owned())
            .chain(child_args(&o, role1, 250, 1, Path::new("/tmp/y.jsonl")))
            .collect();
        assert!(!argv.iter().any(|a| a.starts_with("--admin")), "{argv:?}");
        let c = Cli::try_parse_from(&argv)
            .unwrap()
            .args
            .into_options()
            .unwrap();
        assert_eq!(c.rotate_at, o.rotate_at);
        assert_eq!((c.admin, c.admin_key, c.rotate_force), (None, None, false));
        assert!(ChildRole::parse("4/4/0/10").is_err());
        assert!(ChildRole::parse("1/4/0").is_err());
    }

    #[test]
    fn explicit_process_counts() {
        let mut o = LoadgenOptions::new(vec!["127.0.0.1:7400".parse().unwrap()]);
        o.clients = 10;
        o.processes = 1;
        assert_eq!(process_count(&o).unwrap(), 1);
        o.processes = 3;
        assert_eq!(process_count(&o).unwrap(), 3);
        o.processes = 0;
        assert_eq!(process_count(&o).unwrap(), 1, "10 sockets fit any limit");
        o.processes = 11;
        assert!(process_count(&o).is_err());
    }
}
