//! The admin endpoint and the client side used by `rebindgw stats`.
//!
//! A deliberately small HTTP/1.x server on one thread: `GET /metrics` (Prometheus text),
//! `GET /healthz` (liveness and build info), `GET /readyz` (readiness, 503 with the failing
//! reasons). Any other method gets 405 with `Allow: GET`. It holds at most
//! [`MAX_CONNECTIONS`] connections (a new one evicts the oldest), reads at most
//! [`MAX_HEAD`] bytes of request head, and closes a connection that has not sent a whole
//! request within [`IDLE_TIMEOUT`], so idle or slow clients cannot pin it.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::metrics::WorkerMetrics;
use crate::time::{Ticks, duration_ticks};

/// Connections held at once; the oldest is dropped for a new one beyond this.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest request head (request line and headers) read.
pub const MAX_HEAD: usize = 8192;
/// A connection must deliver its request head within this time of being accepted.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed to write a response (and to drain the rest of a refused request).
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// A worker whose loop has not ticked for this long is reported not ready.
pub const WORKER_STALE: Duration = Duration::from_secs(2);
/// A host that has left a forwarded HANDSHAKE unanswered for this long is reported not ready.
pub const HOST_UNANSWERED: Duration = Duration::from_secs(10);

/// What the admin endpoint serves.
pub struct AdminRoutes {
    /// The Prometheus text for `/metrics`.
    pub metrics: Box<dyn Fn() -> String + Send>,
    /// Why the gateway is not ready (empty: ready), for `/readyz`.
    pub ready: Box<dyn Fn() -> Vec<String> + Send>,
    /// Build information appended to `/healthz`.
    pub about: String,
    /// `POST /rotate`: given the request's `X-Rebindgw-Auth` header, rotates the key epoch
    /// if it authenticates (see [`super::rotate`]); answers (status, body). `None`: 404.
    pub rotate: Option<RotateRoute>,
}

/// The handler of `POST /rotate`.
pub type RotateRoute = Box<dyn Fn(Option<&str>) -> (u16, String) + Send>;

/// The build information line of `/healthz` (the same facts as `rebindgw_build_info`).
pub fn build_info(io_backend: &str, aes_backend: &str) -> String {
    format!(
        "version={} io_backend={io_backend} aes_backend={aes_backend}",
        env!("CARGO_PKG_VERSION")
    )
}

/// The registry store's state, for readiness.
#[derive(Clone, Copy, Debug)]
pub struct StoreHealth {
    pub writer_alive: bool,
    pub last_commit_failed: bool,
}

/// Why the gateway is not ready at `now`: a worker loop that stopped ticking, a store that
/// cannot write, or a host that has not answered a forwarded HANDSHAKE for
/// [`HOST_UNANSWERED`]. `hosts` names the configured hosts in index order.
pub fn readiness(
    workers: &[Arc<WorkerMetrics>],
    hosts: &[String],
    store: StoreHealth,
    now: Ticks,
) -> Vec<String> {
    let mut problems = Vec::new();
    let age = |t: Ticks| Duration::from_nanos(now.0.saturating_sub(t.0).saturating_mul(100));
    for (i, w) in workers.iter().enumerate() {
        match w.heartbeat() {
            None => problems.push(format!("worker {i} has not started")),
            Some(t) if now.0.saturating_sub(t.0) > duration_ticks(WORKER_STALE) => {
                problems.push(format!("worker {i} stalled: no tick for {:.1?}", age(t)))
            }
            Some(_) => {}
        }
    }
    if !store.writer_alive {
        problems.push("store writer thread is not running".to_string());
    }
    if store.last_commit_failed {
        problems.push("last registry store commit failed".to_string());
    }
    for (h, name) in hosts.iter().enumerate() {
        let oldest = workers.iter().filter_map(|w| w.unanswered_since(h)).min();
        if let Some(t) = oldest
            && now.0.saturating_sub(t.0) > duration_ticks(HOST_UNANSWERED)
        {
            problems.push(format!(
                "host {name} unreachable: a HANDSHAKE forwarded {:.1?} ago is unanswered",
                age(t)
            ));
        }
    }
    problems
}

/// Serves `routes` until `shutdown` is set. Returns the bound address.
pub fn spawn_admin(
    addr: SocketAddr,
    routes: AdminRoutes,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot serve admin on {addr}: {e}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let handle = std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || serve(&listener, &routes, &shutdown))?;
    Ok((bound, handle))
}

/// One client connection of the admin server.
struct Conn {
    stream: TcpStream,
    head: Vec<u8>,
    /// The response, once the request is read, and how much of it is written.
    out: Option<(Vec<u8>, usize)>,
    /// Response written and write side shut: reading what is left until EOF.
    draining: bool,
    deadline: Instant,
}

enum Step {
    Keep { progressed: bool },
    Close,
}

fn serve(listener: &TcpListener, routes: &AdminRoutes, shutdown: &AtomicBool) {
    let mut conns: VecDeque<Conn> = VecDeque::with_capacity(MAX_CONNECTIONS);
    while !shutdown.load(Ordering::Relaxed) {
        let mut progressed = false;
        let now = Instant::now();
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    progressed = true;
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if conns.len() == MAX_CONNECTIONS {
                        conns.pop_front();
                    }
                    conns.push_back(Conn {
                        stream,
                        head: Vec::new(),
                        out: None,
                        draining: false,
                        deadline: now + IDLE_TIMEOUT,
                    });
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // WouldBlock, or a transient accept error (e.g. out of descriptors): retry later.
                Err(_) => break,
            }
        }
        conns.retain_mut(|c| match c.step(routes, now) {
            Step::Keep { progressed: p } => {
                progressed |= p;
                true
            }
            Step::Close => {
                progressed = true;
                false
            }
        });
        if !progressed {
            std::thread::sleep(if conns.is_empty() {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(5)
            });
        }
    }
}

impl Conn {
    fn step(&mut self, routes: &AdminRoutes, now: Instant) -> Step {
        if now >= self.deadline {
            return Step::Close;
        }
        let mut buf = [0u8; 2048];
        if self.draining {
            return match self.stream.read(&mut buf) {
                Ok(0) => Step::Close,
                Ok(_) => Step::Keep { progressed: true },
                Err(e) if e.kind() == ErrorKind::WouldBlock => Step::Keep { progressed: false },
                Err(_) => Step::Close,
            };
        }
        if self.out.is_none() {
            let mut progressed = false;
            loop {
                match self.stream.read(&mut buf) {
                    Ok(0) => return Step::Close,
                    Ok(n) => {
                        progressed = true;
                        self.head.extend_from_slice(&buf[..n]);
                        if self.head.len() > MAX_HEAD {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return Step::Close,
                }
            }
            let complete = find(&self.head, b"\r\n\r\n").or_else(|| find(&self.head, b"\n\n"));
            let response = match complete {
                Some(end) if end <= MAX_HEAD => respond(&self.head[..end], routes),
                _ if self.head.len() > MAX_HEAD => response(
                    431,
                    "Request Header Fields Too Large",
                    "text/plain",
                    "request head too large\n",
                    false,
                ),
                _ => return Step::Keep { progressed },
            };
            self.out = Some((response, 0));
            self.deadline = now + WRITE_TIMEOUT;
        }
        let Some((out, done)) = &mut self.out else {
            return Step::Close;
        };
        loop {
            match self.stream.write(&out[*done..]) {
                Ok(0) => return Step::Close,
                Ok(n) => {
                    *done += n;
                    if *done == out.len() {
                        // Shut the write side and read what the client still sends, so the
                        // close does not reset the connection before it has read the answer.
                        let _ = self.stream.shutdown(Shutdown::Write);
                        self.draining = true;
                        return Step::Keep { progressed: true };
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return Step::Keep { progressed: false };
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn response(code: u16, reason: &str, content_type: &str, body: &str, allow: bool) -> Vec<u8> {
    let allow = if allow { "Allow: GET\r\n" } else { "" };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers one request head.
fn respond(head: &[u8], routes: &AdminRoutes) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut parts = text.lines().next().unwrap_or("").split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return response(
            400,
            "Bad Request",
            "text/plain",
            "bad request line\n",
            false,
        );
    };
    if !version.starts_with("HTTP/1.") {
        return response(400, "Bad Request", "text/plain", "HTTP/1.x only\n", false);
    }
    let path = target.split('?').next().unwrap_or("");
    if method == "POST" && path == "/rotate" {
        let Some(rotate) = &routes.rotate else {
            return response(404, "Not Found", "text/plain", "not found\n", false);
        };
        let header = text.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(super::rotate::AUTH_HEADER)
                .then_some(v.trim())
        });
        let (code, body) = rotate(header);
        let reason = match code {
            200 => "OK",
            401 => "Unauthorized",
            409 => "Conflict",
            _ => "Internal Server Error",
        };
        return response(code, reason, "text/plain", &body, false);
    }
    if method != "GET" {
        return response(
            405,
            "Method Not Allowed",
            "text/plain",
            "only GET is allowed\n",
            true,
        );
    }
    match path {
        "/metrics" => response(
            200,
            "OK",
            "text/plain; version=0.0.4",
            &(routes.metrics)(),
            false,
        ),
        "/healthz" => response(
            200,
            "OK",
            "text/plain",
            &format!("ok\n{}\n", routes.about),
            false,
        ),
        "/readyz" => {
            let problems = (routes.ready)();
            if problems.is_empty() {
                response(200, "OK", "text/plain", "ready\n", false)
            } else {
                let mut body = String::from("not ready\n");
                for p in problems {
                    body.push_str(&p);
                    body.push('\n');
                }
                response(503, "Service Unavailable", "text/plain", &body, false)
            }
        }
        _ => response(404, "Not Found", "text/plain", "not found\n", false),
    }
}

/// Resolves an admin address given as `HOST:PORT` (a name such as `localhost` or an IP).
pub fn resolve_admin(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("cannot resolve admin address {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("admin address {addr:?} resolves to nothing"))
}

/// Fetches `path` from an admin address; returns the status code and body.
pub fn fetch(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| anyhow::anyhow!("cannot reach the gateway admin at {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let (head, text) = body
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response from {addr}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP status line from {addr}"))?;
    Ok((code, text.to_string()))
}

/// Fetches `/metrics` from an admin address.
pub fn fetch_metrics(addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let (code, text) = fetch(addr, "/metrics", timeout)?;
    if code != 200 {
        anyhow::bail!("admin at {addr} answered {code} for /metrics");
    }
    Ok(text)
}

/// `rebindgw stats`: reads a running gateway's `/metrics`.
#[derive(clap::Args, Debug, Clone)]
pub struct StatsArgs {
    /// The gateway's admin address, HOST:PORT (e.g. localhost:7480).
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub admin: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `rebindgw stats` and returns what to print.
pub fn run_stats(args: &StatsArgs) -> anyhow::Result<String> {
    let addr = resolve_admin(&args.admin)?;
    let text = fetch_metrics(addr, Duration::from_secs(3))?;
    let summary = StatsSummary::from_text(&text);
    Ok(if args.json {
        serde_json::to_string_pretty(&summary)? + "\n"
    } else {
        summary.table()
    })
}

/// One sample of a scrape: family name, labels, value.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Splits `name{a="x",b="y"} v` into a sample (label values unescaped).
fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some(Sample {
            name: series.to_string(),
            labels: Vec::new(),
            value,
        });
    };
    let mut labels = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let key = key.trim_start_matches(',').to_string();
        if key.is_empty() || key == "}" {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut v = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => v.push('\n'),
                    c => v.push(c),
                },
                '"' => break,
                c => v.push(c),
            }
        }
        labels.push((key, v));
    }
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

struct Scrape(Vec<Sample>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        Scrape(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(parse_sample)
                .collect(),
        )
    }

    fn sum(&self, name: &str) -> u64 {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum::<f64>() as u64
    }

    fn f(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// `name` by the value of `label`.
    fn by(&self, name: &str, label: &str) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for s in self.0.iter().filter(|s| s.name == name) {
            if let Some((_, v)) = s.labels.iter().find(|(k, _)| k == label) {
                *m.entry(v.clone()).or_insert(0) += s.value as u64;
            }
        }
        m
    }

    fn label_of(&self, name: &str, label: &str) -> String {
        self.0
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.labels.iter().find(|(k, _)| k == label))
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
}

/// One host's line in `rebindgw stats`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HostStats {
    pub host: String,
    pub connections: u64,
    /// Datagrams and bytes from the gateway to the host.
    pub to_host_packets: u64,
    pub to_host_bytes: u64,
    /// Datagrams and bytes from the host to the gateway.
    pub from_host_packets: u64,
    pub from_host_bytes: u64,
    pub dropped: u64,
}

/// What `rebindgw stats` shows, from one scrape.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StatsSummary {
    pub version: String,
    pub io_backend: String,
    pub aes_backend: String,
    pub connections: u64,
    pub connections_max: u64,
    pub epoch: u64,
    pub slots: u64,
    pub workers: u64,
    pub client_rx_packets: u64,
    pub client_rx_bytes: u64,
    pub client_tx_packets: u64,
    pub client_tx_bytes: u64,
    pub host_rx_packets: u64,
    pub host_rx_bytes: u64,
    pub host_tx_packets: u64,
    pub host_tx_bytes: u64,
    pub unknown_tuples: u64,
    pub unrecognized_sent: u64,
    pub unrecognized_suppressed: BTreeMap<String, u64>,
    pub rebinds_accepted: u64,
    pub rebind_duplicates: u64,
    pub rebinds_rejected: BTreeMap<String, u64>,
    pub handshakes_forwarded: u64,
    pub handshakes_dropped: BTreeMap<String, u64>,
    pub registrations: BTreeMap<String, u64>,
    pub closes: u64,
    pub dropped: BTreeMap<String, u64>,
    pub send_errors: BTreeMap<String, u64>,
    pub mean_rx_batch: f64,
    pub store_commits: u64,
    pub store_errors: u64,
    pub store_queue: u64,
    pub store_commit_mean_seconds: f64,
    pub hosts: Vec<HostStats>,
}

impl StatsSummary {
    pub fn from_text(text: &str) -> StatsSummary {
        let s = Scrape::parse(text);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let per_host = |name: &str| s.by(name, "host");
        let (conns, tx_p, tx_b, rx_p, rx_b, drops) = (
            per_host("rebindgw_host_peer_connections"),
            per_host("rebindgw_host_peer_tx_packets_total"),
            per_host("rebindgw_host_peer_tx_bytes_total"),
            per_host("rebindgw_host_peer_rx_packets_total"),
            per_host("rebindgw_host_peer_rx_bytes_total"),
            per_host("rebindgw_host_peer_dropped_total"),
        );
        let get = |m: &BTreeMap<String, u64>, h: &str| m.get(h).copied().unwrap_or(0);
        let mut hosts: Vec<HostStats> =
            s.0.iter()
                .filter(|x| x.name == "rebindgw_host_peer_connections")
                .filter_map(|x| x.labels.iter().find(|(k, _)| k == "host"))
                .map(|(_, h)| HostStats {
                    host: h.clone(),
                    connections: get(&conns, h),
                    to_host_packets: get(&tx_p, h),
                    to_host_bytes: get(&tx_b, h),
                    from_host_packets: get(&rx_p, h),
                    from_host_bytes: get(&rx_b, h),
                    dropped: get(&drops, h),
                })
                .collect();
        hosts.dedup_by(|a, b| a.host == b.host);
        StatsSummary {
            version: s.label_of("rebindgw_build_info", "version"),
            io_backend: s.label_of("rebindgw_build_info", "io_backend"),
            aes_backend: s.label_of("rebindgw_build_info", "aes_backend"),
            connections: s.sum("rebindgw_connections"),
            connections_max: s.sum("rebindgw_connections_max"),
            epoch: s.sum("rebindgw_epoch"),
            slots: s.sum("rebindgw_slots"),
            workers: s.sum("rebindgw_workers"),
            client_rx_packets: s.sum("rebindgw_client_rx_packets_total"),
            client_rx_bytes: s.sum("rebindgw_client_rx_bytes_total"),
            client_tx_packets: s.sum("rebindgw_client_tx_packets_total"),
            client_tx_bytes: s.sum("rebindgw_client_tx_bytes_total"),
            host_rx_packets: s.sum("rebindgw_host_rx_packets_total"),
            host_rx_bytes: s.sum("rebindgw_host_rx_bytes_total"),
            host_tx_packets: s.sum("rebindgw_host_tx_packets_total"),
            host_tx_bytes: s.sum("rebindgw_host_tx_bytes_total"),
            unknown_tuples: s.sum("rebindgw_unknown_tuple_total"),
            unrecognized_sent: s.sum("rebindgw_unrecognized_sent_total"),
            unrecognized_suppressed: s.by("rebindgw_unrecognized_suppressed_total", "reason"),
            rebinds_accepted: s.sum("rebindgw_rebinds_accepted_total"),
            rebind_duplicates: s.sum("rebindgw_rebind_duplicates_total"),
            rebinds_rejected: s.by("rebindgw_rebinds_rejected_total", "reason"),
            handshakes_forwarded: s.sum("rebindgw_handshakes_forwarded_total"),
            handshakes_dropped: s.by("rebindgw_handshakes_dropped_total", "reason"),
            registrations: s.by("rebindgw_registrations_total", "result"),
            closes: s.sum("rebindgw_closes_total"),
            dropped: s.by("rebindgw_dropped_total", "reason"),
            send_errors: s.by("rebindgw_send_errors_total", "reason"),
            mean_rx_batch: ratio(
                s.f("rebindgw_worker_rx_batch_size_sum"),
                s.f("rebindgw_worker_rx_batch_size_count"),
            ),
            store_commits: s.sum("rebindgw_store_commits_total"),
            store_errors: s.sum("rebindgw_store_errors_total"),
            store_queue: s.sum("rebindgw_store_queue"),
            store_commit_mean_seconds: ratio(
                s.f("rebindgw_store_commit_duration_seconds_sum"),
                s.f("rebindgw_store_commit_duration_seconds_count"),
            ),
            hosts,
        }
    }

    /// The readable table `rebindgw stats` prints.
    pub fn table(&self) -> String {
        fn reasons(m: &BTreeMap<String, u64>) -> String {
            let v: Vec<String> = m
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(" ")
            }
        }
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("{k:<24}{v}\n"));
        row(
            "gateway",
            format!(
                "version {}, io {}, aes {}, {} workers, epoch {}, S={}",
                self.version,
                self.io_backend,
                self.aes_backend,
                self.workers,
                self.epoch,
                self.slots
            ),
        );
        row(
            "connections",
            format!("{} / {}", self.connections, self.connections_max),
        );
        row(
            "client rx",
            format!(
                "{} packets, {} bytes",
                self.client_rx_packets, self.client_rx_bytes
            ),
        );
        row(
            "client tx",
            format!(
                "{} packets, {} bytes",
                self.client_tx_packets, self.client_tx_bytes
            ),
        );
        row(
            "host link rx",
            format!(
                "{} packets, {} bytes",
                self.host_rx_packets, self.host_rx_bytes
            ),
        );
        row(
            "host link tx",
            format!(
                "{} packets, {} bytes",
                self.host_tx_packets, self.host_tx_bytes
            ),
        );
        row("mean rx batch", format!("{:.1}", self.mean_rx_batch));
        row("unknown tuples", self.unknown_tuples.to_string());
        row(
            "unrecognized",
            format!(
                "{} sent; suppressed {}",
                self.unrecognized_sent,
                reasons(&self.unrecognized_suppressed)
            ),
        );
        row(
            "rebinds",
            format!(
                "{} accepted, {} duplicates; rejected {}",
                self.rebinds_accepted,
                self.rebind_duplicates,
                reasons(&self.rebinds_rejected)
            ),
        );
        row(
            "handshakes",
            format!(
                "{} forwarded; dropped {}",
                self.handshakes_forwarded,
                reasons(&self.handshakes_dropped)
            ),
        );
        row(
            "registrations",
            format!("{}; closes {}", reasons(&self.registrations), self.closes),
        );
        row("dropped", reasons(&self.dropped));
        row("send errors", reasons(&self.send_errors));
        row(
            "store",
            format!(
                "{} commits, {} errors, queue {}, mean commit {:.3} ms",
                self.store_commits,
                self.store_errors,
                self.store_queue,
                self.store_commit_mean_seconds * 1e3
            ),
        );
        if !self.hosts.is_empty() {
            out.push_str(&format!(
                "\n{:<28}{:>12}{:>14}{:>16}{:>14}{:>16}{:>10}\n",
                "host", "connections", "to pkts", "to bytes", "from pkts", "from bytes", "dropped"
            ));
            for h in &self.hosts {
                out.push_str(&format!(
                    "{:<28}{:>12}{:>14}{:>16}{:>14}{:>16}{:>10}\n",
                    h.host,
                    h.connections,
                    h.to_host_packets,
                    h.to_host_bytes,
                    h.from_host_packets,
                    h.from_host_bytes,
                    h.dropped
                ));
            }
        }
        out
    }
}

/// A readable summary of the metrics (the `rebindgw stats` table).
pub fn summarize(text: &str) -> String {
    StatsSummary::from_text(text).table()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::metrics::{C, GatewayFacts, H, HostFacts, WorkerMetrics, render};

    fn routes(
        metrics: impl Fn() -> String + Send + 'static,
        ready: impl Fn() -> Vec<String> + Send + 'static,
    ) -> AdminRoutes {
        AdminRoutes {
            metrics: Box::new(metrics),
            ready: Box::new(ready),
            about: build_info("mmsg", "vaes"),
            rotate: None,
        }
    }

    #[test]
    fn serves_metrics_and_summarizes_per_host() {
        let w = vec![
            Arc::new(WorkerMetrics::with_hosts(2)),
            Arc::new(WorkerMetrics::with_hosts(2)),
        ];
        w[0].add(C::RebindAccepted, 5);
        w[1].add(C::RejectReplay, 2);
        w[1].add(C::RejectUnknownIndex, 1);
        w[0].host_add(1, H::TxPackets, 3);
        w[1].host_add(1, H::TxPackets, 4);
        w[0].host_add(1, H::TxBytes, 700);
        w[1].host_add(1, H::RxPackets, 6);
        w[1].host_add(1, H::RxBytes, 600);
        w[0].host_add(1, H::Dropped, 1);
        w[0].host_add(0, H::RxPackets, 9);
        let facts = GatewayFacts {
            connections: 7,
            max_connections: 100,
            io_backend: "mmsg".into(),
            engine_backend: "vaes".into(),
            hosts: vec![
                HostFacts {
                    addr: "10.0.0.1:7000".into(),
                    connections: 2,
                },
                HostFacts {
                    addr: "[2001:db8::2]:7000".into(),
                    connections: 5,
                },
            ],
            ..Default::default()
        };
        let shutdown = Arc::new(AtomicBool::new(false));
        let w2 = w.clone();
        let (addr, handle) = spawn_admin(
            "127.0.0.1:0".parse().unwrap(),
            routes(move || render(&w2, &facts), Vec::new),
            shutdown.clone(),
        )
        .unwrap();
        let text = fetch_metrics(addr, Duration::from_secs(2)).unwrap();
        assert!(text.contains("rebindgw_rebinds_accepted_total 5"));
        let s = StatsSummary::from_text(&text);
        assert_eq!((s.connections, s.connections_max), (7, 100));
        assert_eq!(
            (s.io_backend.as_str(), s.aes_backend.as_str()),
            ("mmsg", "vaes")
        );
        assert_eq!(s.rebinds_rejected.get("replay"), Some(&2));
        assert_eq!(s.rebinds_rejected.get("unknown_index"), Some(&1));
        assert_eq!(
            s.hosts,
            vec![
                HostStats {
                    host: "10.0.0.1:7000".into(),
                    connections: 2,
                    from_host_packets: 9,
                    ..Default::default()
                },
                HostStats {
                    host: "[2001:db8::2]:7000".into(),
                    connections: 5,
                    to_host_packets: 7,
                    to_host_bytes: 700,
                    from_host_packets: 6,
                    from_host_bytes: 600,
                    dropped: 1,
                },
            ]
        );
        let table = s.table();
        assert!(
            table.contains("connections             7 / 100\n"),
            "{table}"
        );
        assert!(
            table.contains("rejected replay=2 unknown_index=1"),
            "{table}"
        );
        assert!(
            table
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == ["[2001:db8::2]:7000", "5", "7", "700", "6", "600", "1"]),
            "{table}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(json["hosts"][1]["to_host_packets"], 7);
        assert_eq!(json["rebinds_accepted"], 5);
        shutdown.store(true, Ordering::Relaxed);
        handle.join().unwrap();
    }

    #[test]
    fn resolve_admin_accepts_names_and_addresses() {
        assert_eq!(resolve_admin("localhost:7480").unwrap().port(), 7480);
        assert_eq!(
            resolve_admin("127.0.0.1:9").unwrap(),
            "127.0.0.1:9".parse::<SocketAddr>().unwrap()
        );
        assert!(resolve_admin("localhost").is_err());
    }

    #[test]
    fn readiness_reports_stalled_workers_store_and_silent_hosts() {
        let now = Ticks(1_000 * crate::time::TICKS_PER_SECOND);
        let sec = crate::time::TICKS_PER_SECOND;
        let w = vec![
            Arc::new(WorkerMetrics::with_hosts(2)),
            Arc::new(WorkerMetrics::with_hosts(2)),
        ];
        let hosts = vec!["10.0.0.1:7000".to_string(), "10.0.0.2:7000".to_string()];
        let ok = StoreHealth {
            writer_alive: true,
            last_commit_failed: false,
        };
        // Not started yet.
        assert_eq!(readiness(&w, &hosts, ok, now).len(), 2);
        w[0].beat(Ticks(now.0 - sec / 10));
        w[1].beat(Ticks(now.0 - sec / 2));
        // A handshake unanswered for a short while is normal.
        w[0].handshake_sent(0, Ticks(now.0 - sec));
        assert_eq!(readiness(&w, &hosts, ok, now), Vec::<String>::new());
        // A stalled worker, a dead writer, a failing commit and a silent host each count.
        w[1].beat(Ticks(now.0 - 5 * sec));
        w[1].handshake_sent(1, Ticks(now.0 - 30 * sec));
        let bad = StoreHealth {
            writer_alive: false,
            last_commit_failed: true,
        };
        let problems = readiness(&w, &hosts, bad, now);
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(problems[0].starts_with("worker 1 stalled"), "{problems:#?}");
        assert!(
            problems[3].starts_with("host 10.0.0.2:7000 unreachable"),
            "{problems:#?}"
        );
        // An answer clears the host.
        w[1].host_answered(1);
        w[1].beat(now);
        assert_eq!(readiness(&w, &hosts, ok, now), Vec::<String>::new());
    }

    #[test]
    fn readyz_answers_503_with_reasons_and_healthz_has_build_info() {
        let failing = Arc::new(AtomicBool::new(true));
        let f2 = failing.clone();
        let shutdown = Arc::new(AtomicBool::new(false));
        let (addr, handle) = spawn_admin(
            "127.0.0.1:0".parse().unwrap(),
            routes(String::new, move || {
                if f2.load(Ordering::Relaxed) {
                    vec!["worker 0 stalled".to_string()]
                } else {
                    Vec::new()
                }
            }),
            shutdown.clone(),
        )
        .unwrap();
        let (code, _, body) = http(addr, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            (code, body.as_str()),
            (503, "not ready\nworker 0 stalled\n")
        );
        failing.store(false, Ordering::Relaxed);
        let (code, _, body) = http(addr, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!((code, body.as_str()), (200, "ready\n"));
        let (code, _, body) = http(addr, "GET /healthz HTTP/1.0\r\n\r\n");
        assert_eq!(code, 200);
        assert_eq!(
            body,
            format!(
                "ok\nversion={} io_backend=mmsg aes_backend=vaes\n",
                env!("CARGO_PKG_VERSION")
            )
        );
        let (code, _, _) = http(addr, "GET /nope HTTP/1.0\r\n\r\n");
        assert_eq!(code, 404);
        shutdown.store(true, Ordering::Relaxed);
        handle.join().unwrap();
    }

    /// Sends `req` raw and returns (status code, head, body).
    fn http(addr: SocketAddr, req: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, head.to_string(), body.to_string())
    }

    fn serve_test() -> (SocketAddr, Arc<AtomicBool>, JoinHandle<()>) {
        let shutdown = Arc::new(AtomicBool::new(false));
        let (addr, handle) = spawn_admin(
            "127.0.0.1:0".parse().unwrap(),
            routes(
                || "# HELP x_total X.\n# TYPE x_total counter\nx_total 1\n".to_string(),
                Vec::new,
            ),
            shutdown.clone(),
        )
        .unwrap();
        (addr, shutdown, handle)
    }

    #[test]
    fn admin_answers_only_get() {
        let (addr, shutdown, handle) = serve_test();
        let (code, head, _) = http(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(code, 405, "{head}");
        assert!(
            head.to_ascii_lowercase().contains("\r\nallow: get"),
            "{head}"
        );
        let (code, _, _) = http(addr, "DELETE /healthz HTTP/1.0\r\n\r\n");
        assert_eq!(code, 405);
        let (code, _, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            (code, body.as_str()),
            (
                200,
                "# HELP x_total X.\n# TYPE x_total counter\nx_total 1\n"
            )
        );
        shutdown.store(true, Ordering::Relaxed);
        handle.join().unwrap();
    }

    #[test]
    fn idle_connections_do_not_pin_the_admin_endpoint() {
        let (addr, shutdown, handle) = serve_test();
        // Slowloris: many connections that send a partial request and then nothing.
        let idle: Vec<TcpStream> = (0..40)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
                s
            })
            .collect();
        let start = std::time::Instant::now();
        let (code, _, body) = http(addr, "GET /metrics HTTP/1.0\r\n\r\n");
        assert_eq!(code, 200);
        assert!(body.contains("x_total 1"));
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "a scrape behind 40 idle connections took {:?}",
            start.elapsed()
        );
        // The idle ones are closed by the server (timeout or eviction), not kept forever.
        for mut s in idle {
            s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
            let mut buf = Vec::new();
            match s.read_to_end(&mut buf) {
                Ok(_) => {}
                // Closed before the server read what it had sent: also closed.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("an idle connection was left open: {e}"),
            }
        }
        shutdown.store(true, Ordering::Relaxed);
        handle.join().unwrap();
    }

    #[test]
    fn oversized_request_head_is_refused() {
        let (addr, shutdown, handle) = serve_test();
        let big = format!(
            "GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(20_000)
        );
        let (code, _, _) = http(addr, &big);
        assert_eq!(code, 431);
        shutdown.store(true, Ordering::Relaxed);
        handle.join().unwrap();
    }
}
