//! The fast-path benchmark: echo throughput through the gateway, through a bare relay and
//! through nginx's `stream` UDP proxy (when nginx is installed), run in rotating order on the
//! same load generator and reflector, and the RTT each adds at half load against a direct
//! (no hop) path.
//!
//! Placement on this 2-core machine: the forwarder under test (gateway worker, bare relay or
//! nginx's one worker) is pinned to core 0; the load generator and the reflector share core 1.
//! By default everything talks over loopback. With `netns` (forced when xdp is measured:
//! AF_XDP needs a real interface) the forwarder and the reflector live in one network
//! namespace and the generator's sockets in another, joined by a veth pair, for every path
//! of the run. Each run records how busy each core was while it was measured (from
//! `/proc/stat`), so a run whose generator core was saturated says so.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::netns::{self, Veth};
use super::nginx::{Nginx, find_nginx};
use super::pin;
use super::relay::{Running, spawn_bare_relay, spawn_reflector};
use super::xdpgen::{EchoLoad, LoadShape, bind_same_port, spawn_xdp_reflector};
use rebindgw::gateway::config::{GatewayConfig, HostEntry};
use rebindgw::gateway::run::{GatewayHandle, spawn_gateway};
use rebindgw::hostlink::{Control, LinkKey};
use rebindgw::io::xdp::XdpMode;
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
    /// Run over veth pairs between network namespaces instead of loopback (root; forced
    /// when `io` has xdp).
    pub netns: bool,
    /// How the xdp backend attaches (gateway and bare relay alike).
    pub xdp_mode: XdpMode,
    /// Generator and reflector on AF_XDP (generic mode) instead of kernel sockets; needs
    /// the veth placement and at most 64 clients (one address each).
    pub xdp_generator: bool,
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
            netns: false,
            xdp_mode: XdpMode::Auto,
            xdp_generator: false,
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
    /// How busy each core was during the measured window (0..1, from `/proc/stat`: user,
    /// system, softirq and the rest but idle and iowait). Core 0 is the forwarder's, core 1
    /// the generator's and the reflector's.
    pub core_busy: Vec<f64>,
    /// Echoes per second of busy time on the forwarder's core (core 0): its cost per echo,
    /// whoever bounded the rate.
    pub echoes_per_forwarder_core_s: f64,
}

/// Medians of one I/O backend's saturating runs.
#[derive(Clone, Debug, Serialize)]
pub struct BackendMedians {
    pub io: String,
    pub relay_median_eps: f64,
    pub gateway_median_eps: f64,
    /// Gateway ÷ bare relay on this backend.
    pub ratio: f64,
    /// Medians of echoes per busy second of the forwarder's core.
    pub relay_median_per_core_s: f64,
    pub gateway_median_per_core_s: f64,
    /// Medians of how busy the generator's core (core 1) was: near 1.0 means the generator
    /// and the reflector, not the forwarder, set the rate.
    pub relay_generator_core_busy: f64,
    pub gateway_generator_core_busy: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FastpathReport {
    /// `loopback`, or `netns-veth` (forwarder, generator and reflector in three namespaces
    /// joined by veth pairs, receive steering to the receiver's core).
    pub placement: String,
    /// How xdp runs attached (`auto`: native where the driver has it, else skb).
    pub xdp_mode: String,
    pub saturating: Vec<RunResult>,
    /// Per I/O backend, in the order asked; the fields below are the first backend's.
    pub backends: Vec<BackendMedians>,
    pub relay_median_eps: f64,
    pub gateway_median_eps: f64,
    /// Gateway ÷ bare relay, medians of the saturating runs.
    pub ratio: f64,
    pub nginx_median_eps: Option<f64>,
    pub nginx_median_per_core_s: Option<f64>,
    pub nginx_generator_core_busy: Option<f64>,
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

/// Where the forwarder and the generator's sockets live.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Placement {
    Loopback,
    /// [`Veth`]: the caller runs in the forwarder's namespace.
    Veth,
}

impl Placement {
    fn forwarder_ip(self) -> IpAddr {
        match self {
            Placement::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Placement::Veth => netns::FORWARDER_IP,
        }
    }

    /// The reflector's address, and the forwarder's towards it.
    fn host_ip(self) -> IpAddr {
        match self {
            Placement::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Placement::Veth => netns::HOST_IP,
        }
    }

    fn host_link_ip(self) -> IpAddr {
        match self {
            Placement::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Placement::Veth => netns::HOST_LINK_IP,
        }
    }

    fn client_ip(self, i: usize) -> IpAddr {
        match self {
            Placement::Loopback => IpAddr::V4(Ipv4Addr::new(127, 0, 2, 1 + (i % 200) as u8)),
            Placement::Veth => netns::CLIENT_IP,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Placement::Loopback => "loopback",
            Placement::Veth => "netns-veth",
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

fn setup(
    path: Path,
    clients: &[SocketAddr],
    placement: Placement,
    opts: &FastpathOptions,
) -> anyhow::Result<Setup> {
    let xdp_mode = opts.xdp_mode;
    let dir = std::env::temp_dir().join(format!(
        "rebindgw-fastpath-{}-{}",
        std::process::id(),
        hex::encode(rebindgw::crypto::random_array::<6>())
    ));
    std::fs::create_dir_all(&dir)?;
    let at = SocketAddr::new(placement.forwarder_ip(), 0);
    let host_link = SocketAddr::new(placement.host_link_ip(), 0);
    let host_sock = in_namespace(placement, netns::HOST_NS, move || {
        Ok(rebindgw::io::bind_udp(
            SocketAddr::new(placement.host_ip(), 0),
            false,
            4 << 20,
        )?)
    })?;
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
            let relay = spawn_bare_relay(at, host_link, host_addr, io, xdp_mode)?;
            s.target = relay.addr;
            s.relay = Some(relay);
        }
        Path::Gateway(io) => {
            let key_file = s.dir.join("link.key");
            let key = rebindgw::secrets::generate_link_key(&key_file)?;
            let cfg = GatewayConfig {
                listen: vec![at],
                hosts: vec![HostEntry {
                    addr: host_addr,
                    link_key_file: key_file,
                }],
                host_link,
                admin: None,
                state_dir: s.dir.join("state"),
                workers: 1,
                io,
                xdp_mode,
                ..GatewayConfig::default()
            };
            let g = spawn_gateway(cfg)?;
            if g.io_backend() != io {
                let got = g.io_backend().name();
                let _ = g.stop();
                bail!(
                    "the gateway asked for io = {} runs {got} (the log says why it fell back)",
                    io.name()
                );
            }
            register(&host_sock, &key, g.host_link_addrs()[0], clients)?;
            s.target = g.client_addrs()[0];
            s.gateway = Some(g);
        }
        Path::Nginx => {}
    }
    s.reflector = Some(if opts.xdp_generator {
        spawn_xdp_reflector(host_sock, netns::HOST_NS, "rbfp-h0")?
    } else {
        spawn_reflector(host_sock)?
    });
    if path == Path::Nginx {
        // nginx's probe needs the reflector running.
        let binary = find_nginx().map_err(anyhow::Error::msg)?;
        let n = Nginx::start(
            &binary,
            &s.dir.join("nginx"),
            placement.forwarder_ip(),
            host_addr,
        )?;
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
        // A lost datagram or a signal costs a retry, not the run.
        let mut tries = 0;
        let n = loop {
            tries += 1;
            sock.send_to(&msg.seal(&cipher, Ticks::wall_clock()), gateway)?;
            match sock.recv_from(&mut buf) {
                Ok((n, _)) => break n,
                Err(e) if tries < 5 && e.kind() != std::io::ErrorKind::ConnectionRefused => {
                    eprintln!("REGISTER {i}: {e}; sending it again");
                }
                Err(e) => return Err(e).context("no answer to REGISTER"),
            }
        };
        match Control::open(&buf[..n], &cipher, Ticks::wall_clock())? {
            Control::Registered { .. } => {}
            other => bail!("registration refused: {other:?}"),
        }
    }
    sock.set_read_timeout(None)?;
    Ok(())
}

/// Busy and total jiffies of every core (`cpuN` lines of `/proc/stat`), in core order.
fn core_times() -> Vec<(u64, u64)> {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal (guest time is inside user).
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total.saturating_sub(idle), total)
        })
        .collect()
}

/// Each core's busy share between two [`core_times`] samples.
fn busy_between(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(&(busy0, total0), &(busy1, total1))| {
            let total = total1.saturating_sub(total0);
            if total == 0 {
                0.0
            } else {
                busy1.saturating_sub(busy0) as f64 / total as f64
            }
        })
        .collect()
}

/// Timestamped DATA datagrams, built once and restamped in place before each send.
struct Stamper {
    epoch: Instant,
    bufs: Vec<Vec<u8>>,
}

impl Stamper {
    fn new(len: usize, batch: usize) -> Stamper {
        let mut p = vec![0u8; len.max(9)];
        p[0] = b'D';
        Stamper {
            epoch: Instant::now(),
            bufs: vec![p; batch.max(1)],
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Sends `n` datagrams (at most the batch size) to `target`; returns how many went out.
    fn send(&mut self, sock: &mut BatchSocket, target: SocketAddr, n: usize) -> usize {
        let n = n.min(self.bufs.len());
        let t = self.now_ns().to_be_bytes();
        for b in &mut self.bufs[..n] {
            b[1..9].copy_from_slice(&t);
        }
        sock.send_batch(self.bufs[..n].iter().map(|p| (target, &p[..])))
            .unwrap_or(0)
    }
}

/// What [`drive`] measured.
struct Driven {
    sent: u64,
    received: u64,
    hist: Histogram<u64>,
    core_busy: Vec<f64>,
}

/// Drives one run: closed loop with `window` per client, or open loop at `rate`.
fn drive(
    socks: &mut [BatchSocket],
    target: SocketAddr,
    opts: &FastpathOptions,
    rate: Option<u64>,
) -> Driven {
    let mut stamper = Stamper::new(opts.payload, opts.window.max(64));
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("bounds");
    let n = socks.len();
    let mut outstanding = vec![0usize; n];
    let mut last_rx = vec![Instant::now(); n];
    let end = Instant::now() + WARMUP + opts.duration;
    let measure_from = Instant::now() + WARMUP;
    let mut cpu_from: Option<Vec<(u64, u64)>> = None;
    let (mut m_sent, mut m_received) = (0u64, 0u64);
    let mut next_tick = Instant::now();
    let mut rr = 0usize;
    while Instant::now() < end {
        let now = Instant::now();
        let measuring = now >= measure_from;
        if measuring && cpu_from.is_none() {
            cpu_from = Some(core_times());
        }
        match rate {
            None => {
                for i in 0..n {
                    // Top up windows that lost datagrams.
                    if outstanding[i] < opts.window
                        && (outstanding[i] == 0
                            || now.duration_since(last_rx[i]) > Duration::from_millis(20))
                    {
                        let s = stamper.send(&mut socks[i], target, opts.window - outstanding[i]);
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
                        let s = stamper.send(&mut socks[rr % n], target, 1);
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
            let now_ns = stamper.now_ns();
            let _ = socks[i].recv_batch(Some(Duration::ZERO), |_, d| {
                if d.len() >= 9 {
                    let t = u64::from_be_bytes(d[1..9].try_into().expect("8 bytes"));
                    let rtt_us = now_ns.saturating_sub(t) / 1000;
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
                    let s = stamper.send(&mut socks[i], target, echoes);
                    outstanding[i] += s;
                    if measuring {
                        m_sent += s as u64;
                    }
                }
            }
        }
    }
    let core_busy = match cpu_from {
        Some(from) => busy_between(&from, &core_times()),
        None => Vec::new(),
    };
    Driven {
        sent: m_sent,
        received: m_received,
        hist,
        core_busy,
    }
}

/// Runs `f` in namespace `ns` with [`Placement::Veth`] (on a thread of its own that enters
/// it), else here. Sockets stay in the namespace they were made in, so only their creation
/// needs a thread there.
fn in_namespace<T: Send>(
    placement: Placement,
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    match placement {
        Placement::Loopback => f(),
        Placement::Veth => std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    rebindgw::io::xdp::enter_netns(&Veth::path(ns))
                        .with_context(|| format!("entering namespace {ns}"))?;
                    f()
                })
                .join()
                .map_err(|_| anyhow::anyhow!("a thread in namespace {ns} panicked"))?
        }),
    }
}

/// The generator's sockets, one per client tuple.
fn bind_clients(
    n: usize,
    placement: Placement,
) -> anyhow::Result<(Vec<BatchSocket>, Vec<SocketAddr>)> {
    in_namespace(placement, netns::CLIENT_NS, move || {
        let (mut socks, mut addrs) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let s =
                rebindgw::io::bind_udp(SocketAddr::new(placement.client_ip(i), 0), false, 1 << 20)?;
            addrs.push(s.local_addr()?);
            socks.push(BatchSocket::new(s)?);
        }
        Ok((socks, addrs))
    })
}

fn one_run(
    path: Path,
    opts: &FastpathOptions,
    placement: Placement,
    rate: Option<u64>,
) -> anyhow::Result<RunResult> {
    if opts.xdp_generator {
        return one_run_xdp(path, opts, placement, rate);
    }
    let (mut socks, addrs) = bind_clients(opts.clients, placement)?;
    let setup = setup(path, &addrs, placement, opts)?;
    let d = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                pin(1);
                drive(&mut socks, setup.target, opts, rate)
            })
            .join()
            .expect("load thread")
    });
    drop(setup);
    Ok(run_result(path, opts, d))
}

/// How long a run warms up before it is measured.
const WARMUP: Duration = Duration::from_millis(300);

/// [`one_run`] with the generator on AF_XDP ([`EchoLoad`] on the project's own XDP loop in
/// the generator's namespace, generic mode on `rbfp-c0`).
fn one_run_xdp(
    path: Path,
    opts: &FastpathOptions,
    placement: Placement,
    rate: Option<u64>,
) -> anyhow::Result<RunResult> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let n = opts.clients;
    let stop = AtomicBool::new(false);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<anyhow::Result<Vec<SocketAddr>>>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<Option<(SocketAddr, Instant)>>();
    std::thread::scope(|scope| {
        let stop = &stop;
        let generator = scope.spawn(move || -> anyhow::Result<Option<EchoLoad>> {
            let prepared = (|| {
                rebindgw::io::xdp::enter_netns(&Veth::path(netns::CLIENT_NS))?;
                let ips: Vec<IpAddr> = (0..n).map(netns::xdp_tuple_ip).collect();
                let clients = bind_same_port(&ips)?;
                let addrs = clients
                    .iter()
                    .map(|s| s.local_addr())
                    .collect::<Result<Vec<_>, _>>()?;
                let host = rebindgw::io::bind_udp(SocketAddr::new(netns::CLIENT_IP, 0), false, 0)?;
                let sockets = rebindgw::io::WorkerSockets { clients, host };
                let (xdp, worker) = super::xdpgen::attach("rbfp-c0", &sockets)?;
                anyhow::Ok((sockets, xdp, worker, addrs))
            })();
            let (sockets, xdp, worker, addrs) = match prepared {
                Ok(p) => p,
                Err(e) => {
                    let _ = addr_tx.send(Err(e));
                    return Ok(None);
                }
            };
            let _ = addr_tx.send(Ok(addrs));
            let Ok(Some((target, start))) = go_rx.recv() else {
                return Ok(None);
            };
            pin(1);
            let mut load = EchoLoad::new(
                target,
                n,
                LoadShape {
                    window: opts.window,
                    payload: opts.payload,
                    rate,
                },
                start,
                WARMUP,
                opts.duration,
            );
            rebindgw::io::run_worker(
                IoBackend::Xdp,
                Some(worker),
                &sockets,
                &mut load,
                stop,
                &super::xdpgen::loop_options(),
            )?;
            drop(xdp);
            Ok(Some(load))
        });
        let addrs = addr_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the AF_XDP generator thread died"))??;
        let setup = match setup(path, &addrs, placement, opts) {
            Ok(s) => s,
            Err(e) => {
                let _ = go_tx.send(None);
                let _ = generator.join();
                return Err(e);
            }
        };
        let start = Instant::now();
        let _ = go_tx.send(Some((setup.target, start)));
        std::thread::sleep((start + WARMUP).saturating_duration_since(Instant::now()));
        let from = core_times();
        std::thread::sleep(
            (start + WARMUP + opts.duration).saturating_duration_since(Instant::now()),
        );
        let core_busy = busy_between(&from, &core_times());
        // Echoes in flight at the end are not counted; let them land before the teardown.
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        let load = generator
            .join()
            .map_err(|_| anyhow::anyhow!("the AF_XDP generator panicked"))??
            .ok_or_else(|| anyhow::anyhow!("the AF_XDP generator did not run"))?;
        drop(setup);
        Ok(run_result(
            path,
            opts,
            Driven {
                sent: load.sent,
                received: load.received,
                hist: load.hist,
                core_busy,
            },
        ))
    })
}

fn run_result(path: Path, opts: &FastpathOptions, d: Driven) -> RunResult {
    let forwarder_busy_s =
        d.core_busy.first().copied().unwrap_or(0.0) * opts.duration.as_secs_f64();
    RunResult {
        path: path.name(opts.io[0]),
        sent: d.sent,
        received: d.received,
        echoes_per_sec: d.received as f64 / opts.duration.as_secs_f64(),
        rtt_p50_us: d.hist.value_at_quantile(0.5),
        rtt_p99_us: d.hist.value_at_quantile(0.99),
        rtt_p999_us: d.hist.value_at_quantile(0.999),
        echoes_per_forwarder_core_s: if forwarder_busy_s > 0.0 {
            d.received as f64 / forwarder_busy_s
        } else {
            0.0
        },
        core_busy: d.core_busy,
    }
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
    if opts.io.is_empty() {
        bail!("--io names no backend");
    }
    if opts.xdp_generator && !(1..=netns::MAX_XDP_TUPLES).contains(&opts.clients) {
        bail!(
            "--xdp-generator serves 1 to {} clients (one address each)",
            netns::MAX_XDP_TUPLES
        );
    }
    if !(opts.netns || opts.xdp_generator || opts.io.contains(&IoBackend::Xdp)) {
        return run_placed(opts, Placement::Loopback);
    }
    let veth = Veth::create().context("the veth placement (--netns, or --io with xdp)")?;
    let report = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                rebindgw::io::xdp::enter_netns(&Veth::path(netns::FORWARDER_NS))
                    .context("entering the forwarder's namespace")?;
                run_placed(opts, Placement::Veth)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))?
    });
    drop(veth);
    report
}

fn run_placed(opts: &FastpathOptions, placement: Placement) -> anyhow::Result<FastpathReport> {
    let first = opts.io[0];
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
            let r = one_run(p, opts, placement, None)?;
            eprintln!(
                "round {round} {:<16} {:>9.0} echoes/s  p50 {} us  p99 {} us  cores busy {}  {:.0} echoes per forwarder-core s",
                r.path,
                r.echoes_per_sec,
                r.rtt_p50_us,
                r.rtt_p99_us,
                r.core_busy
                    .iter()
                    .map(|b| format!("{:.0}%", b * 100.0))
                    .collect::<Vec<_>>()
                    .join("/"),
                r.echoes_per_forwarder_core_s
            );
            saturating.push(r);
        }
    }
    let med = |name: &str, f: &dyn Fn(&RunResult) -> f64| {
        median(
            saturating
                .iter()
                .filter(|r| r.path == name)
                .map(f)
                .collect(),
        )
    };
    let eps = |r: &RunResult| r.echoes_per_sec;
    let per_core = |r: &RunResult| r.echoes_per_forwarder_core_s;
    let generator_busy = |r: &RunResult| r.core_busy.get(1).copied().unwrap_or(0.0);
    let backends: Vec<BackendMedians> = opts
        .io
        .iter()
        .map(|&io| {
            let (relay_name, gateway_name) =
                (Path::Relay(io).name(first), Path::Gateway(io).name(first));
            let relay = med(&relay_name, &eps);
            let gateway = med(&gateway_name, &eps);
            BackendMedians {
                io: io.name().into(),
                relay_median_eps: relay,
                gateway_median_eps: gateway,
                ratio: if relay > 0.0 { gateway / relay } else { 0.0 },
                relay_median_per_core_s: med(&relay_name, &per_core),
                gateway_median_per_core_s: med(&gateway_name, &per_core),
                relay_generator_core_busy: med(&relay_name, &generator_busy),
                gateway_generator_core_busy: med(&gateway_name, &generator_busy),
            }
        })
        .collect();
    let relay = backends[0].relay_median_eps;
    let gateway = backends[0].gateway_median_eps;
    let nginx = nginx_skipped.is_none().then(|| med("nginx", &eps));
    let half = (relay / 2.0) as u64;
    let mut half_load = Vec::new();
    let mut half_paths = vec![Path::Direct, Path::Relay(first), Path::Gateway(first)];
    if nginx.is_some() {
        half_paths.push(Path::Nginx);
    }
    for p in half_paths {
        let r = one_run(p, opts, placement, Some(half))?;
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
        placement: placement.name().into(),
        xdp_mode: opts.xdp_mode.to_string(),
        ratio: if relay > 0.0 { gateway / relay } else { 0.0 },
        backends,
        nginx_median_eps: nginx,
        nginx_median_per_core_s: nginx.map(|_| med("nginx", &per_core)),
        nginx_generator_core_busy: nginx.map(|_| med("nginx", &generator_busy)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_busy_shares_come_from_the_jiffy_deltas() {
        let a = [(100, 1000), (500, 1000)];
        let b = [(150, 1100), (600, 1100)];
        assert_eq!(busy_between(&a, &b), vec![0.5, 1.0]);
        // A counter that did not move (or went back) counts as idle, not as a panic.
        assert_eq!(busy_between(&b, &a), vec![0.0, 0.0]);
    }

    #[test]
    fn this_machine_reports_every_core() {
        let t = core_times();
        assert!(!t.is_empty(), "/proc/stat has cpuN lines");
        assert!(t.iter().all(|&(busy, total)| busy <= total));
    }
}
