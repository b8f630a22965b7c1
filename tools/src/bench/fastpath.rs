//! The fast-path benchmark: echo throughput through the gateway, through a bare relay and
//! through nginx's `stream` UDP proxy (when nginx is installed), run in rotating order on the
//! same load generator and reflector, and the RTT each adds at half load against a direct
//! (no hop) path.
//!
//! Placement on this 2-core machine: the forwarder under test (gateway worker, bare relay or
//! nginx's one worker) is pinned to core 0; the load generator and the reflector share core 1.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::nginx::{Nginx, find_nginx};
use super::pin;
use super::relay::{Running, spawn_bare_relay, spawn_reflector};
use rebindgw::gateway::config::{GatewayConfig, HostEntry};
use rebindgw::gateway::run::{GatewayHandle, spawn_gateway};
use rebindgw::hostlink::{Control, LinkKey};
use rebindgw::io::{BatchSocket, IoBackend};
use rebindgw::time::Ticks;

#[derive(Clone, Debug)]
pub struct FastpathOptions {
    /// Client sockets (distinct tuples).
    pub clients: usize,
    /// Datagrams in flight per client in the saturating runs.
    pub window: usize,
    /// DATA datagram size in bytes (at least 9).
    pub payload: usize,
    pub duration: Duration,
    /// Rounds of (relay, gateway per I/O backend[, nginx]) in rotating order.
    pub rounds: usize,
    /// The I/O backends to measure the gateway and the bare relay on (the first one is the
    /// report's headline and the half-load runs').
    pub io: Vec<IoBackend>,
    /// Measure nginx's stream UDP proxy too (skipped, with the reason, if nginx is missing).
    pub nginx: bool,
}

impl Default for FastpathOptions {
    fn default() -> Self {
        FastpathOptions {
            clients: 32,
            window: 8,
            payload: 100,
            duration: Duration::from_secs(3),
            rounds: 5,
            io: vec![IoBackend::Uring],
            nginx: true,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub path: String,
    pub sent: u64,
    pub received: u64,
    pub echoes_per_sec: f64,
    pub rtt_p50_us: u64,
    pub rtt_p99_us: u64,
    pub rtt_p999_us: u64,
}

/// Medians of one I/O backend's saturating runs.
#[derive(Clone, Debug, Serialize)]
pub struct BackendMedians {
    pub io: String,
    pub relay_median_eps: f64,
    pub gateway_median_eps: f64,
    /// Gateway ÷ bare relay on this backend.
    pub ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FastpathReport {
    pub saturating: Vec<RunResult>,
    /// Per I/O backend, in the order asked; the fields below are the first backend's.
    pub backends: Vec<BackendMedians>,
    pub relay_median_eps: f64,
    pub gateway_median_eps: f64,
    /// Gateway ÷ bare relay, medians of the saturating runs.
    pub ratio: f64,
    pub nginx_median_eps: Option<f64>,
    /// Gateway ÷ nginx, medians of the saturating runs.
    pub ratio_vs_nginx: Option<f64>,
    /// Why nginx was not measured.
    pub nginx_skipped: Option<String>,
    /// Open-loop runs at half the relay's median rate.
    pub half_load_rate: u64,
    pub half_load: Vec<RunResult>,
    /// Gateway p99 RTT minus direct p99 RTT at half load.
    pub gateway_added_p99_us: i64,
    pub relay_added_p99_us: i64,
    pub nginx_added_p99_us: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Direct,
    Relay(IoBackend),
    Gateway(IoBackend),
    Nginx,
}

impl Path {
    /// `bare-relay` and `gateway` on the first backend (`first`), `bare-relay/mmsg` and
    /// the like on the others.
    fn name(self, first: IoBackend) -> String {
        let on = |base: &str, io: IoBackend| {
            if io == first {
                base.to_string()
            } else {
                format!("{base}/{}", io.name())
            }
        };
        match self {
            Path::Direct => "direct".into(),
            Path::Relay(io) => on("bare-relay", io),
            Path::Gateway(io) => on("gateway", io),
            Path::Nginx => "nginx".into(),
        }
    }
}

/// Everything one run needs, torn down by drop.
struct Setup {
    target: SocketAddr,
    reflector: Option<Running>,
    relay: Option<Running>,
    gateway: Option<GatewayHandle>,
    nginx: Option<Nginx>,
    dir: std::path::PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        drop(self.nginx.take());
        if let Some(g) = self.gateway.take() {
            let _ = g.stop();
        }
        if let Some(r) = self.relay.take() {
            r.stop();
        }
        if let Some(r) = self.reflector.take() {
            r.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup(path: Path, clients: &[SocketAddr]) -> anyhow::Result<Setup> {
    let dir = std::env::temp_dir().join(format!(
        "rebindgw-fastpath-{}-{}",
        std::process::id(),
        hex::encode(rebindgw::crypto::random_array::<6>())
    ));
    std::fs::create_dir_all(&dir)?;
    let host_sock = rebindgw::io::bind_udp(SocketAddr::from(([127, 0, 0, 1], 0)), false, 4 << 20)?;
    let host_addr = host_sock.local_addr()?;
    let mut s = Setup {
        target: host_addr,
        reflector: None,
        relay: None,
        gateway: None,
        nginx: None,
        dir,
    };
    match path {
        Path::Direct => {}
        Path::Relay(io) => {
            let relay = spawn_bare_relay(SocketAddr::from(([127, 0, 0, 1], 0)), host_addr, io)?;
            s.target = relay.addr;
            s.relay = Some(relay);
        }
        Path::Gateway(io) => {
            let key_file = s.dir.join("link.key");
            let key = rebindgw::secrets::generate_link_key(&key_file)?;
            let cfg = GatewayConfig {
                listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
                hosts: vec![HostEntry {
                    addr: host_addr,
                    link_key_file: key_file,
                }],
                admin: None,
                state_dir: s.dir.join("state"),
                workers: 1,
                io,
                ..GatewayConfig::default()
            };
            let g = spawn_gateway(cfg)?;
            register(&host_sock, &key, g.host_link_addrs()[0], clients)?;
            s.target = g.client_addrs()[0];
            s.gateway = Some(g);
        }
        Path::Nginx => {}
    }
    s.reflector = Some(spawn_reflector(host_sock)?);
    if path == Path::Nginx {
        // nginx's probe needs the reflector running.
        let binary = find_nginx().map_err(anyhow::Error::msg)?;
        let n = Nginx::start(&binary, &s.dir.join("nginx"), host_addr)?;
        s.target = n.addr;
        s.nginx = Some(n);
    }
    Ok(s)
}

/// Registers every client tuple with the gateway, acting as the host.
fn register(
    sock: &UdpSocket,
    key: &LinkKey,
    gateway: SocketAddr,
    clients: &[SocketAddr],
) -> anyhow::Result<()> {
    let cipher = key.cipher();
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 2048];
    for (i, c) in clients.iter().enumerate() {
        let msg = Control::Register {
            boot: 1,
            request: i as u64,
            conn_id: i as u64 + 1,
            client: *c,
        };
        sock.send_to(&msg.seal(&cipher, Ticks::wall_clock()), gateway)?;
        let (n, _) = sock.recv_from(&mut buf).context("no answer to REGISTER")?;
        match Control::open(&buf[..n], &cipher, Ticks::wall_clock())? {
            Control::Registered { .. } => {}
            other => bail!("registration refused: {other:?}"),
        }
    }
    sock.set_read_timeout(None)?;
    Ok(())
}

fn payload(len: usize, epoch: Instant) -> Vec<u8> {
    let mut p = vec![0u8; len.max(9)];
    p[0] = b'D';
    p[1..9].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_be_bytes());
    p
}

/// Sends `n` timestamped DATA datagrams in one batch; returns how many went out.
fn send_stamped(
    sock: &mut BatchSocket,
    target: SocketAddr,
    n: usize,
    len: usize,
    epoch: Instant,
) -> usize {
    let pkts: Vec<Vec<u8>> = (0..n).map(|_| payload(len, epoch)).collect();
    sock.send_batch(pkts.iter().map(|p| (target, &p[..])))
        .unwrap_or(0)
}

/// Drives one run: closed loop with `window` per client, or open loop at `rate`.
fn drive(
    socks: &mut [BatchSocket],
    target: SocketAddr,
    opts: &FastpathOptions,
    rate: Option<u64>,
) -> (u64, u64, Histogram<u64>) {
    let epoch = Instant::now();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("bounds");
    let n = socks.len();
    let mut outstanding = vec![0usize; n];
    let mut last_rx = vec![Instant::now(); n];
    let warmup = Duration::from_millis(300);
    let end = Instant::now() + warmup + opts.duration;
    let measure_from = Instant::now() + warmup;
    let (mut m_sent, mut m_received) = (0u64, 0u64);
    let mut next_tick = Instant::now();
    let mut rr = 0usize;
    while Instant::now() < end {
        let now = Instant::now();
        let measuring = now >= measure_from;
        match rate {
            None => {
                for i in 0..n {
                    // Top up windows that lost datagrams.
                    if outstanding[i] < opts.window
                        && (outstanding[i] == 0
                            || now.duration_since(last_rx[i]) > Duration::from_millis(20))
                    {
                        let s = send_stamped(
                            &mut socks[i],
                            target,
                            opts.window - outstanding[i],
                            opts.payload,
                            epoch,
                        );
                        outstanding[i] += s;
                        if measuring {
                            m_sent += s as u64;
                        }
                        last_rx[i] = now;
                    }
                }
            }
            Some(r) => {
                if now >= next_tick {
                    next_tick += Duration::from_millis(1);
                    let per_tick = (r / 1000).max(1) as usize;
                    for _ in 0..per_tick {
                        let p = payload(opts.payload, epoch);
                        let s = socks[rr % n].send_batch([(target, &p[..])]).unwrap_or(0);
                        rr += 1;
                        if measuring {
                            m_sent += s as u64;
                        }
                    }
                }
            }
        }
        for i in 0..n {
            let mut echoes = 0usize;
            let _ = socks[i].recv_batch(Some(Duration::ZERO), |_, d| {
                if d.len() >= 9 {
                    let t = u64::from_be_bytes(d[1..9].try_into().expect("8 bytes"));
                    let rtt_us = (epoch.elapsed().as_nanos() as u64).saturating_sub(t) / 1000;
                    if measuring {
                        let _ = hist.record(rtt_us.max(1));
                    }
                    echoes += 1;
                }
            });
            if echoes > 0 {
                if measuring {
                    m_received += echoes as u64;
                }
                last_rx[i] = Instant::now();
                if rate.is_none() {
                    outstanding[i] = outstanding[i].saturating_sub(echoes);
                    let s = send_stamped(&mut socks[i], target, echoes, opts.payload, epoch);
                    outstanding[i] += s;
                    if measuring {
                        m_sent += s as u64;
                    }
                }
            }
        }
    }
    (m_sent, m_received, hist)
}

fn one_run(path: Path, opts: &FastpathOptions, rate: Option<u64>) -> anyhow::Result<RunResult> {
    let mut socks = Vec::with_capacity(opts.clients);
    let mut addrs = Vec::with_capacity(opts.clients);
    for i in 0..opts.clients {
        let ip = [127, 0, 2, 1 + (i % 200) as u8];
        let s = rebindgw::io::bind_udp(SocketAddr::from((ip, 0)), false, 1 << 20)?;
        addrs.push(s.local_addr()?);
        socks.push(BatchSocket::new(s)?);
    }
    let setup = setup(path, &addrs)?;
    let (sent, received, hist) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                pin(1);
                drive(&mut socks, setup.target, opts, rate)
            })
            .join()
            .expect("load thread")
    });
    drop(setup);
    Ok(RunResult {
        path: path.name(opts.io[0]),
        sent,
        received,
        echoes_per_sec: received as f64 / opts.duration.as_secs_f64(),
        rtt_p50_us: hist.value_at_quantile(0.5),
        rtt_p99_us: hist.value_at_quantile(0.99),
        rtt_p999_us: hist.value_at_quantile(0.999),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Runs the whole benchmark, printing each run as it finishes.
pub fn run_fastpath(opts: &FastpathOptions) -> anyhow::Result<FastpathReport> {
    if opts.payload < 9 {
        bail!("--payload must be at least 9 bytes (type and a timestamp)");
    }
    let Some(&first) = opts.io.first() else {
        bail!("--io names no backend");
    };
    let nginx_skipped = if opts.nginx {
        find_nginx().err()
    } else {
        Some("not asked for (--no-nginx)".to_string())
    };
    if let Some(why) = &nginx_skipped {
        eprintln!("nginx: skipped: {why}");
    }
    let mut paths: Vec<Path> = opts
        .io
        .iter()
        .flat_map(|&io| [Path::Relay(io), Path::Gateway(io)])
        .collect();
    if nginx_skipped.is_none() {
        paths.push(Path::Nginx);
    }
    let mut saturating = Vec::new();
    for round in 0..opts.rounds {
        // Rotate which goes first, so drift in the machine's load favours none.
        let mut order = paths.clone();
        order.rotate_left(round % paths.len());
        for p in order {
            let r = one_run(p, opts, None)?;
            eprintln!(
                "round {round} {:<16} {:>9.0} echoes/s  p50 {} us  p99 {} us",
                r.path, r.echoes_per_sec, r.rtt_p50_us, r.rtt_p99_us
            );
            saturating.push(r);
        }
    }
    let med = |name: &str| {
        median(
            saturating
                .iter()
                .filter(|r| r.path == name)
                .map(|r| r.echoes_per_sec)
                .collect(),
        )
    };
    let backends: Vec<BackendMedians> = opts
        .io
        .iter()
        .map(|&io| {
            let relay = med(&Path::Relay(io).name(first));
            let gateway = med(&Path::Gateway(io).name(first));
            BackendMedians {
                io: io.name().into(),
                relay_median_eps: relay,
                gateway_median_eps: gateway,
                ratio: if relay > 0.0 { gateway / relay } else { 0.0 },
            }
        })
        .collect();
    let relay = backends[0].relay_median_eps;
    let gateway = backends[0].gateway_median_eps;
    let nginx = nginx_skipped.is_none().then(|| med("nginx"));
    let half = (relay / 2.0) as u64;
    let mut half_load = Vec::new();
    let mut half_paths = vec![Path::Direct, Path::Relay(first), Path::Gateway(first)];
    if nginx.is_some() {
        half_paths.push(Path::Nginx);
    }
    for p in half_paths {
        let r = one_run(p, opts, Some(half))?;
        eprintln!(
            "half load {half}/s {:<16} received {:>8}  p50 {} us  p99 {} us  p99.9 {} us",
            r.path, r.received, r.rtt_p50_us, r.rtt_p99_us, r.rtt_p999_us
        );
        half_load.push(r);
    }
    let p99 = |name: &str| {
        half_load
            .iter()
            .find(|r| r.path == name)
            .map_or(0, |r| r.rtt_p99_us) as i64
    };
    Ok(FastpathReport {
        ratio: if relay > 0.0 { gateway / relay } else { 0.0 },
        backends,
        nginx_median_eps: nginx,
        ratio_vs_nginx: nginx.filter(|n| *n > 0.0).map(|n| gateway / n),
        nginx_skipped,
        nginx_added_p99_us: nginx.map(|_| p99("nginx") - p99("direct")),
        relay_median_eps: relay,
        gateway_median_eps: gateway,
        half_load_rate: half,
        gateway_added_p99_us: p99("gateway") - p99("direct"),
        relay_added_p99_us: p99("bare-relay") - p99("direct"),
        saturating,
        half_load,
    })
}
