//! The tunnel's thin io loops, one thread and `poll(2)` each:
//! - [`Connector`] (`rebindgw connect`): the client core on a socket to the gateway, a local
//!   UDP socket for the applications, the [`TunnelClient`] between them. It follows network
//!   changes by itself: a socket error or a changed local address toward the gateway makes a
//!   new socket and starts a rebind (`Client::network_changed`); UNRECOGNIZED starts one in
//!   the core; after `rebind_tries` REBINDs (or cookie requests) without an ACK, or a failed
//!   connection, it handshakes again (a rebind that runs out with the path silent makes the
//!   core itself handshake again: `ClientEvent::Reconnecting`, reported the same way). When a rebind completes, the frames it lost are sent
//!   again ([`TunnelClient::lost_in_rebind`]).
//! - [`ForwardHost`] (`rebindgw host --forward`): the host core in application mode on the
//!   host-link socket, the [`TunnelHost`] on top, and one connected UDP socket per flow
//!   toward its backend. The clients file is reloaded when it changes on disk.
//!
//! Neither loop decides anything: the cores do. A datagram too big for the path is counted
//! and logged (the first, then at powers of two), never truncated.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

use super::client::{AppDrop, TunnelClient, TunnelClientConfig, TunnelClientStats};
use super::frame::{MAX_APP_PAYLOAD, MAX_FRAME};
use super::host::{FlowKey, TunnelHost, TunnelHostConfig, TunnelHostStats};
use crate::client::{
    Client, ClientConfig, ClientEvent, ClientState, MAX_DATAGRAM_LEN, RebindReason,
};
use crate::host::clients::ClientsFile;
use crate::host::{HostConfig, HostCore, HostCounters, HostEvent, MAX_DATAGRAM};
use crate::hostlink::LinkKey;
use crate::io::poll::Poller;
use crate::time::{TickClock, Ticks};
use crate::wire::ClientCredentials;

/// Datagrams read from one socket before the loop looks at the others.
const READ_BURST: usize = 256;

/// Log the n-th occurrence of something frequent only when n is a power of two.
fn worth_logging(n: u64) -> bool {
    n.is_power_of_two()
}

fn unspecified(of: SocketAddr) -> SocketAddr {
    match of {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// A non-blocking UDP socket bound to `bind`, with buffers of `buffer` bytes (best effort),
/// connected to `peer` if given.
fn udp_socket(bind: SocketAddr, peer: Option<SocketAddr>, buffer: usize) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.bind(&bind.into())?;
    if let Some(p) = peer {
        s.connect(&p.into())?;
    }
    s.set_nonblocking(true)?;
    Ok(s.into())
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

// ---- connect --------------------------------------------------------------------------

/// `rebindgw connect`'s settings.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub gateway: SocketAddr,
    pub creds: ClientCredentials,
    /// Where local applications send their datagrams.
    pub local: SocketAddr,
    pub client: ClientConfig,
    pub tunnel: TunnelClientConfig,
    /// REBINDs or cookie requests sent in one rebind without an ACK before the client
    /// handshakes again.
    pub rebind_tries: u64,
    /// How often the local address toward the gateway is looked up (a changed one starts a
    /// rebind from a new socket).
    pub address_check: Duration,
    /// SO_RCVBUF / SO_SNDBUF request for both sockets.
    pub socket_buffer: usize,
}

impl ConnectOptions {
    pub fn new(gateway: SocketAddr, creds: ClientCredentials, local: SocketAddr) -> Self {
        ConnectOptions {
            gateway,
            creds,
            local,
            client: ClientConfig::default(),
            tunnel: TunnelClientConfig::default(),
            rebind_tries: 5,
            address_check: Duration::from_secs(1),
            socket_buffer: 4 << 20,
        }
    }
}

/// A state change of `rebindgw connect` (printed as a line, or as JSON with `--json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TunnelEvent {
    /// The handshake completed, `ms` after it started.
    Connected { conn_id: String, ms: f64 },
    /// A rebind started.
    Rebinding { reason: &'static str },
    /// The gateway acknowledged a rebind `ms` after it started; `tuple` is our public one.
    Rebound { ms: f64, tuple: SocketAddr },
    /// A rebind timed out while traffic kept arriving: the connection stays.
    RebindAbandoned { ms: f64 },
    /// The network changed under us (socket error or local address): new socket.
    NetworkChanged { reason: String },
    /// A new handshake, after `reason`.
    HandshakeAgain { reason: String },
}

impl std::fmt::Display for TunnelEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TunnelEvent::Connected { conn_id, ms } => {
                write!(f, "connected (connection {conn_id}) in {ms:.0} ms")
            }
            TunnelEvent::Rebinding { reason } => write!(f, "rebinding ({reason})"),
            TunnelEvent::Rebound { ms, tuple } => {
                write!(f, "rebound in {ms:.0} ms (public address {tuple})")
            }
            TunnelEvent::RebindAbandoned { ms } => {
                write!(
                    f,
                    "rebind abandoned after {ms:.0} ms (the path still works)"
                )
            }
            TunnelEvent::NetworkChanged { reason } => write!(f, "network changed: {reason}"),
            TunnelEvent::HandshakeAgain { reason } => write!(f, "handshake again: {reason}"),
        }
    }
}

/// What `rebindgw connect` did (printed as JSON when it stops).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnectStats {
    #[serde(flatten)]
    pub tunnel: TunnelClientStats,
    pub handshakes: u64,
    pub rebinds_completed: u64,
    pub rebinds_abandoned: u64,
    pub network_changes: u64,
    /// Application datagrams dropped while no connection was up (handshake in progress).
    pub dropped_not_connected: u64,
    /// Application datagrams the client core refused (send queue full).
    pub dropped_send_queue: u64,
    /// Datagrams for applications that the local socket could not send.
    pub app_send_errors: u64,
    /// Received DATA the client core dropped (auth, replay, malformed, ...).
    pub client_dropped: u64,
}

/// `rebindgw connect`: see the module docs.
pub struct Connector {
    opts: ConnectOptions,
    clock: TickClock,
    client: Client,
    tunnel: TunnelClient,
    app: UdpSocket,
    gw: UdpSocket,
    handshake_started: Ticks,
    /// Rebind tries sent when the current rebind started.
    rebind_tries_at_start: Option<u64>,
    next_address_check: Ticks,
    stats: ConnectStats,
    /// Client-core drop counters of earlier connections.
    dropped_before: u64,
    /// When the current rebind started.
    rebind_started: Option<Ticks>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("gateway", &self.opts.gateway)
            .field("local", &self.opts.local)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Binds the local application socket and the gateway socket; the handshake starts.
    pub fn bind(opts: ConnectOptions) -> anyhow::Result<Connector> {
        let app = udp_socket(opts.local, None, opts.socket_buffer)
            .with_context(|| format!("binding the local address {}", opts.local))?;
        let gw = udp_socket(
            unspecified(opts.gateway),
            Some(opts.gateway),
            opts.socket_buffer,
        )
        .with_context(|| format!("opening a socket toward the gateway {}", opts.gateway))?;
        let clock = TickClock::start();
        let now = clock.now();
        Ok(Connector {
            client: Client::new(opts.client.clone(), opts.creds.clone(), now),
            tunnel: TunnelClient::new(opts.tunnel.clone()),
            next_address_check: now.saturating_add(opts.address_check),
            opts,
            clock,
            app,
            gw,
            handshake_started: now,
            rebind_tries_at_start: None,
            stats: ConnectStats::default(),
            dropped_before: 0,
            rebind_started: None,
        })
    }

    /// The local address applications send to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.app.local_addr()
    }

    /// The client core's state.
    pub fn state(&self) -> ClientState {
        self.client.state()
    }

    /// Runs until `shutdown` is set; `on_event` sees every state change.
    pub fn run(
        mut self,
        shutdown: &AtomicBool,
        mut on_event: impl FnMut(&TunnelEvent),
    ) -> anyhow::Result<ConnectStats> {
        let mut poller = Poller::new();
        let mut buf = vec![0u8; 65_536];
        let mut frame = vec![0u8; MAX_FRAME];
        let mut out = vec![0u8; MAX_DATAGRAM_LEN];
        self.stats.handshakes = 1;
        while !shutdown.load(Ordering::Relaxed) {
            let now = self.clock.now();
            if self.client.poll_timeout().is_some_and(|t| t <= now) {
                self.client.handle_timeout(now);
            }
            if self.tunnel.poll_timeout().is_some_and(|t| t <= now) {
                self.tunnel.handle_timeout(now);
            }
            if now >= self.next_address_check {
                self.next_address_check = now.saturating_add(self.opts.address_check);
                self.check_address(now, &mut on_event);
            }
            self.flush(now, &mut out, &mut on_event);
            self.events(now, &mut on_event);

            let wake = [self.client.poll_timeout(), self.tunnel.poll_timeout()]
                .into_iter()
                .flatten()
                .chain([self.next_address_check])
                .min()
                .map_or(Duration::from_millis(100), |t| {
                    self.clock
                        .instant(t)
                        .saturating_duration_since(Instant::now())
                })
                .min(Duration::from_millis(100));
            poller.clear();
            let (ig, ia) = (poller.add(&self.gw), poller.add(&self.app));
            poller.wait(Some(wake)).context("poll")?;
            let now = self.clock.now();
            if poller.readable(ig) {
                self.read_gateway(now, &mut buf, &mut on_event);
            }
            if poller.readable(ia) {
                self.read_apps(now, &mut buf, &mut frame, &mut out, &mut on_event);
            }
            self.flush(now, &mut out, &mut on_event);
            self.events(now, &mut on_event);
        }
        Ok(self.stats())
    }

    /// The counters so far.
    pub fn stats(&self) -> ConnectStats {
        let c = self.client.stats();
        ConnectStats {
            tunnel: self.tunnel.stats().clone(),
            client_dropped: self.dropped_before + client_drops(c),
            ..self.stats.clone()
        }
    }

    fn read_gateway(
        &mut self,
        now: Ticks,
        buf: &mut [u8],
        on_event: &mut impl FnMut(&TunnelEvent),
    ) {
        for _ in 0..READ_BURST {
            match self.gw.recv(buf) {
                Ok(n) => self.client.handle(now, &buf[..n]),
                Err(e) if is_transient(&e) => break,
                // ICMP port unreachable for an earlier send: the gateway may be restarting.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    self.network_changed(now, format!("receive error: {e}"), on_event);
                    break;
                }
            }
            self.deliver(now);
        }
        self.deliver(now);
    }

    /// Hands what the connection received to the applications.
    fn deliver(&mut self, now: Ticks) {
        while let Some(p) = self.client.poll_received() {
            if let Some((to, d)) = self.tunnel.handle_tunnel(now, &p)
                && self.app.send_to(d, to).is_err()
            {
                self.stats.app_send_errors += 1;
            }
        }
    }

    fn read_apps(
        &mut self,
        now: Ticks,
        buf: &mut [u8],
        frame: &mut [u8],
        out: &mut [u8],
        on_event: &mut impl FnMut(&TunnelEvent),
    ) {
        for _ in 0..READ_BURST {
            let (n, from) = match self.app.recv_from(buf) {
                Ok(r) => r,
                Err(e) if is_transient(&e) => break,
                // An application's port closed (ICMP for an earlier answer): not our problem.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "local socket receive error");
                    break;
                }
            };
            if !matches!(
                self.client.state(),
                ClientState::Connected | ClientState::Rebinding
            ) {
                self.stats.dropped_not_connected += 1;
                continue;
            }
            match self.tunnel.handle_app(now, from, &buf[..n], frame) {
                Ok(len) => {
                    if self.client.send(&frame[..len]).is_err() {
                        self.stats.dropped_send_queue += 1;
                    }
                }
                Err(e @ AppDrop::TooBig { .. }) => {
                    let count = self.tunnel.stats().dropped_too_big;
                    if worth_logging(count) {
                        tracing::warn!(from = %from, count, "dropped: {e}");
                    }
                }
                Err(e) => {
                    let count = self.tunnel.stats().dropped_flow_limit;
                    if worth_logging(count) {
                        tracing::warn!(from = %from, count, "dropped: {e}");
                    }
                }
            }
            self.flush(now, out, on_event);
        }
    }

    fn flush(&mut self, now: Ticks, out: &mut [u8], on_event: &mut impl FnMut(&TunnelEvent)) {
        while let Some(n) = self.client.poll_transmit(now, out) {
            match self.gw.send(&out[..n]) {
                Ok(_) => {}
                // Buffers full, or the gateway restarting: the protocol retries.
                Err(e) if is_transient(&e) || e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    self.network_changed(now, format!("send error: {e}"), on_event);
                    return;
                }
            }
        }
    }

    /// A new socket toward the gateway, and a rebind from it.
    fn network_changed(
        &mut self,
        now: Ticks,
        reason: String,
        on_event: &mut impl FnMut(&TunnelEvent),
    ) {
        self.stats.network_changes += 1;
        on_event(&TunnelEvent::NetworkChanged { reason });
        match udp_socket(
            unspecified(self.opts.gateway),
            Some(self.opts.gateway),
            self.opts.socket_buffer,
        ) {
            Ok(s) => self.gw = s,
            // No route yet: the address check tries again.
            Err(e) => tracing::warn!(error = %e, "no socket toward the gateway yet"),
        }
        self.client.network_changed(now);
    }

    /// Has the local address toward the gateway changed?
    fn check_address(&mut self, now: Ticks, on_event: &mut impl FnMut(&TunnelEvent)) {
        let probe = udp_socket(unspecified(self.opts.gateway), Some(self.opts.gateway), 0)
            .and_then(|s| s.local_addr());
        let ours = self.gw.local_addr();
        match (probe, ours) {
            (Ok(p), Ok(o)) if p.ip() == o.ip() => {}
            (Ok(p), Ok(o)) => self.network_changed(
                now,
                format!("local address {} is now {}", o.ip(), p.ip()),
                on_event,
            ),
            (Err(e), _) | (_, Err(e)) => {
                self.network_changed(now, format!("no local address: {e}"), on_event)
            }
        }
    }

    /// A rebind completed: send again what it lost ([`TunnelClient::lost_in_rebind`]).
    fn resend_lost(&mut self, now: Ticks, took: Duration) {
        let Some(started) = self.rebind_started.take() else {
            return;
        };
        for f in self.tunnel.lost_in_rebind(now, started, took) {
            if self.client.send(&f).is_err() {
                self.stats.dropped_send_queue += 1;
            }
        }
    }

    fn tries(&self) -> u64 {
        let c = self.client.stats();
        c.rebinds_sent + c.cookie_requests_sent
    }

    fn events(&mut self, now: Ticks, on_event: &mut impl FnMut(&TunnelEvent)) {
        while let Some(e) = self.client.poll_event() {
            match e {
                ClientEvent::Connected { conn_id } => {
                    on_event(&TunnelEvent::Connected {
                        conn_id: format!("{conn_id:016x}"),
                        ms: ms(now.since(self.handshake_started)),
                    });
                }
                ClientEvent::Rebinding { reason } => {
                    self.rebind_tries_at_start = Some(self.tries());
                    self.rebind_started = Some(now);
                    on_event(&TunnelEvent::Rebinding {
                        reason: match reason {
                            RebindReason::Unrecognized => "UNRECOGNIZED from the gateway",
                            RebindReason::Unanswered => "sent packets went unanswered",
                            RebindReason::NetworkChanged => "network changed",
                        },
                    });
                }
                ClientEvent::Rebound {
                    took, new_tuple, ..
                } => {
                    self.rebind_tries_at_start = None;
                    self.stats.rebinds_completed += 1;
                    self.resend_lost(now, took);
                    on_event(&TunnelEvent::Rebound {
                        ms: ms(took),
                        tuple: new_tuple,
                    });
                }
                ClientEvent::RebindAbandoned { took } => {
                    self.rebind_tries_at_start = None;
                    self.stats.rebinds_abandoned += 1;
                    on_event(&TunnelEvent::RebindAbandoned { ms: ms(took) });
                }
                ClientEvent::Reconnecting { reason } => {
                    // The core handshakes again by itself (a rebind ran out): same client,
                    // same counting as a new one.
                    on_event(&TunnelEvent::HandshakeAgain {
                        reason: format!("{reason} (by the client core)"),
                    });
                    self.handshake_started = now;
                    self.rebind_tries_at_start = None;
                    self.rebind_started = None;
                    self.stats.handshakes += 1;
                }
                ClientEvent::Failed(err) => {
                    self.handshake_again(now, err.to_string(), on_event);
                    return;
                }
            }
        }
        if let Some(start) = self.rebind_tries_at_start
            && self.client.state() == ClientState::Rebinding
            && self.tries().saturating_sub(start) > self.opts.rebind_tries
        {
            let reason = format!("{} rebind tries without an ACK", self.opts.rebind_tries);
            self.handshake_again(now, reason, on_event);
        }
    }

    fn handshake_again(
        &mut self,
        now: Ticks,
        reason: String,
        on_event: &mut impl FnMut(&TunnelEvent),
    ) {
        on_event(&TunnelEvent::HandshakeAgain { reason });
        self.dropped_before += client_drops(self.client.stats());
        self.client = Client::new(self.opts.client.clone(), self.opts.creds.clone(), now);
        self.handshake_started = now;
        self.rebind_tries_at_start = None;
        self.stats.handshakes += 1;
    }
}

fn client_drops(c: &crate::client::ClientStats) -> u64 {
    c.dropped_malformed
        + c.dropped_auth
        + c.dropped_replay
        + c.dropped_unexpected
        + c.dropped_unrecognized
        + c.dropped_recv_queue_full
        + c.dropped_small_buffer
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

// ---- host --forward -------------------------------------------------------------------

/// Reads a services file (see [`super::host::parse_services`]).
pub fn load_services(path: &std::path::Path) -> anyhow::Result<Vec<super::host::Service>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the services file {}", path.display()))?;
    super::host::parse_services(&text)
        .map_err(|e| anyhow::anyhow!("services file {}: {e}", path.display()))
}

/// Reads the credentials `rebindgw enroll` printed (JSON).
pub fn load_credentials(path: &std::path::Path) -> anyhow::Result<ClientCredentials> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the credentials file {}", path.display()))?;
    let e: crate::host::clients::Enrolled = serde_json::from_str(&text).with_context(|| {
        format!(
            "credentials file {}: expected the JSON that rebindgw enroll prints",
            path.display()
        )
    })?;
    Ok(e.creds)
}

/// `rebindgw host --forward`'s settings.
#[derive(Clone, Debug)]
pub struct ForwardOptions {
    /// Host-link address the gateway sends to.
    pub listen: SocketAddr,
    /// The enrolled-clients file.
    pub clients: PathBuf,
    pub link_key: LinkKey,
    /// The host core's settings (`echo` is forced off).
    pub host: HostConfig,
    pub tunnel: TunnelHostConfig,
    /// SO_RCVBUF / SO_SNDBUF request for every socket.
    pub socket_buffer: usize,
}

impl ForwardOptions {
    pub fn new(
        listen: SocketAddr,
        clients: PathBuf,
        link_key: LinkKey,
        tunnel: TunnelHostConfig,
    ) -> Self {
        ForwardOptions {
            listen,
            clients,
            link_key,
            host: HostConfig::default(),
            tunnel,
            socket_buffer: 4 << 20,
        }
    }
}

/// What `rebindgw host --forward` did (printed as JSON when it stops).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ForwardStats {
    pub host: HostCounters,
    pub tunnel: TunnelHostStats,
    pub connections: usize,
    pub flows: usize,
    /// Backend sends that failed (buffer full, or the service refused: ICMP).
    pub backend_send_errors: u64,
    /// Host-link sends that failed.
    pub link_send_errors: u64,
    /// Backend sockets that could not be opened.
    pub backend_open_errors: u64,
    /// Clients file reloads (it changed on disk), and failed ones (the old list stays).
    pub reloads: u64,
    pub reload_errors: u64,
}

/// What identifies a version of the clients file: mtime, size, inode.
type FileId = Option<(std::time::SystemTime, u64, u64)>;

fn file_id(path: &std::path::Path) -> FileId {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// `rebindgw host --forward`: see the module docs.
pub struct ForwardHost {
    opts: ForwardOptions,
    core: HostCore,
    tunnel: TunnelHost,
    link: UdpSocket,
    /// Backend sockets, one per flow, and where each key sits in it.
    sockets: Vec<(FlowKey, UdpSocket)>,
    index: HashMap<FlowKey, usize>,
    stats: ForwardStats,
    /// The clients file as last loaded, checked every second.
    clients_file: FileId,
    next_reload_check: Ticks,
}

impl std::fmt::Debug for ForwardHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardHost")
            .field("listen", &self.opts.listen)
            .field("flows", &self.sockets.len())
            .finish_non_exhaustive()
    }
}

impl ForwardHost {
    /// Loads the clients file and binds the host-link socket.
    pub fn bind(opts: ForwardOptions) -> anyhow::Result<ForwardHost> {
        anyhow::ensure!(
            !opts.tunnel.services.is_empty(),
            "no service to forward to (--forward ADDR or a services file)"
        );
        let clients_file = file_id(&opts.clients);
        let clients = ClientsFile::load(&opts.clients)?;
        let link = udp_socket(opts.listen, None, opts.socket_buffer)
            .with_context(|| format!("binding the host-link socket to {}", opts.listen))?;
        let cfg = HostConfig {
            echo: false,
            ..opts.host.clone()
        };
        let mut core = HostCore::with_config(&opts.link_key, clients, cfg);
        core.set_start(Ticks::wall_clock());
        for (i, s) in opts.tunnel.services.iter().enumerate() {
            tracing::info!(service = i, name = %s.name, backend = %s.backend, "forwarding");
        }
        Ok(ForwardHost {
            tunnel: TunnelHost::new(opts.tunnel.clone()),
            opts,
            core,
            link,
            sockets: Vec::new(),
            index: HashMap::new(),
            stats: ForwardStats::default(),
            clients_file,
            next_reload_check: Ticks(0),
        })
    }

    /// The bound host-link address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.link.local_addr()
    }

    /// The counters so far.
    pub fn stats(&self) -> ForwardStats {
        ForwardStats {
            host: self.core.counters().clone(),
            tunnel: self.tunnel.stats().clone(),
            connections: self.core.connections(),
            flows: self.sockets.len(),
            ..self.stats.clone()
        }
    }

    /// Runs until `shutdown` is set.
    pub fn run(mut self, shutdown: &AtomicBool) -> anyhow::Result<ForwardStats> {
        let mut poller = Poller::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut frame = vec![0u8; MAX_FRAME];
        let mut out = vec![0u8; MAX_DATAGRAM];
        let tick = Duration::from_millis(50);
        let mut next_tick = Ticks(0);
        while !shutdown.load(Ordering::Relaxed) {
            let now = Ticks::wall_clock();
            if now >= next_tick {
                next_tick = now.saturating_add(tick);
                self.core.handle_timeout(now);
                self.tunnel.handle_timeout(now);
                self.pump(now, &mut out);
                if now >= self.next_reload_check {
                    self.next_reload_check = now.saturating_add(Duration::from_secs(1));
                    self.maybe_reload();
                }
            }
            poller.clear();
            let il = poller.add(&self.link);
            for (_, s) in &self.sockets {
                poller.add(s);
            }
            poller.wait(Some(tick)).context("poll")?;
            let now = Ticks::wall_clock();
            if poller.readable(il) {
                for _ in 0..READ_BURST {
                    match self.link.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            self.core.handle(now, from, &buf[..n]);
                            self.pump(now, &mut out);
                        }
                        Err(e) if is_transient(&e) => break,
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                        Err(e) => return Err(e).context("host-link socket"),
                    }
                }
            }
            // Backend sockets by position: `pump` may remove some, so collect the keys first.
            let ready: Vec<FlowKey> = (0..self.sockets.len())
                .filter(|i| poller.readable(i + 1))
                .map(|i| self.sockets[i].0)
                .collect();
            for key in ready {
                self.read_backend(now, key, &mut buf, &mut frame);
            }
            self.pump(now, &mut out);
        }
        let stats = self.stats();
        tracing::info!(
            connections = stats.connections,
            flows = stats.flows,
            to_backend = stats.tunnel.to_backend,
            to_client = stats.tunnel.to_client,
            "forwarding host stopped"
        );
        Ok(stats)
    }

    /// Reloads the clients file when it changed on disk (enrolling a client needs no
    /// restart); live connections are kept.
    fn maybe_reload(&mut self) {
        let id = file_id(&self.opts.clients);
        if id == self.clients_file {
            return;
        }
        self.clients_file = id;
        match ClientsFile::load(&self.opts.clients) {
            Ok(f) => {
                self.stats.reloads += 1;
                tracing::info!(clients = f.len(), "clients file reloaded");
                self.core.replace_clients(f);
            }
            Err(e) => {
                self.stats.reload_errors += 1;
                tracing::warn!(error = %e, "clients file reload failed; keeping the previous list");
            }
        }
    }

    fn read_backend(&mut self, now: Ticks, key: FlowKey, buf: &mut [u8], frame: &mut [u8]) {
        for _ in 0..READ_BURST {
            let Some(&i) = self.index.get(&key) else {
                return;
            };
            let n = match self.sockets[i].1.recv(buf) {
                Ok(n) => n,
                Err(e) if is_transient(&e) => return,
                // ICMP port unreachable for an earlier send: the service is not up.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    self.stats.backend_send_errors += 1;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(flow = key.flow, error = %e, "backend socket failed");
                    self.tunnel.flow_failed(key);
                    self.drop_socket(key);
                    return;
                }
            };
            if n > MAX_APP_PAYLOAD {
                let _ = self.tunnel.handle_backend(now, key, &buf[..n], frame);
                let count = self.tunnel.stats().dropped_too_big;
                if worth_logging(count) {
                    tracing::warn!(
                        flow = key.flow,
                        len = n,
                        max = MAX_APP_PAYLOAD,
                        count,
                        "dropped a backend answer too big for the tunnel"
                    );
                }
                continue;
            }
            if let Some(len) = self.tunnel.handle_backend(now, key, &buf[..n], frame) {
                let _ = self.core.send(key.conn_id, &frame[..len]);
            }
        }
    }

    /// Runs the core's events through the tunnel and sends everything due.
    fn pump(&mut self, now: Ticks, out: &mut [u8]) {
        while let Some(e) = self.core.poll_event() {
            match e {
                HostEvent::Data { conn_id, payload } => {
                    self.forward_to_backend(now, conn_id, &payload)
                }
                HostEvent::Connected { conn_id, client } => {
                    tracing::info!(conn = %format!("{conn_id:016x}"), client = %client, "client connected");
                }
                HostEvent::Closed { conn_id } => {
                    tracing::info!(conn = %format!("{conn_id:016x}"), "connection closed");
                    self.tunnel.connection_closed(conn_id);
                }
            }
        }
        while let Some(k) = self.tunnel.poll_close() {
            self.drop_socket(k);
        }
        while let Some((conn, frame)) = self.tunnel.poll_to_client() {
            let _ = self.core.send(conn, &frame);
        }
        while let Some(o) = self.core.poll_transmit(now, out) {
            if let Err(e) = self.link.send_to(&out[..o.len], o.to)
                && !is_transient(&e)
            {
                self.stats.link_send_errors += 1;
            }
        }
    }

    fn forward_to_backend(&mut self, now: Ticks, conn_id: u64, payload: &[u8]) {
        let Some(b) = self.tunnel.handle_client(now, conn_id, payload) else {
            return;
        };
        let (key, len) = (b.key, b.payload.len());
        if b.open {
            match udp_socket(
                unspecified(b.backend),
                Some(b.backend),
                self.opts.socket_buffer,
            ) {
                Ok(s) => {
                    self.index.insert(key, self.sockets.len());
                    self.sockets.push((key, s));
                }
                Err(e) => {
                    self.stats.backend_open_errors += 1;
                    tracing::warn!(backend = %b.backend, error = %e, "cannot open a backend socket");
                    self.tunnel.backend_done(key, len);
                    self.tunnel.flow_failed(key);
                    return;
                }
            }
        }
        let sent = self
            .index
            .get(&key)
            .map(|&i| self.sockets[i].1.send(b.payload));
        match sent {
            Some(Ok(_)) => {}
            Some(Err(e)) if is_transient(&e) || e.kind() == io::ErrorKind::ConnectionRefused => {
                self.stats.backend_send_errors += 1;
            }
            Some(Err(e)) => {
                self.stats.backend_send_errors += 1;
                tracing::warn!(flow = key.flow, error = %e, "backend send failed");
            }
            None => self.stats.backend_send_errors += 1,
        }
        self.tunnel.backend_done(key, len);
    }

    fn drop_socket(&mut self, key: FlowKey) {
        let Some(i) = self.index.remove(&key) else {
            return;
        };
        self.sockets.swap_remove(i);
        if let Some((moved, _)) = self.sockets.get(i) {
            self.index.insert(*moved, i);
        }
    }
}
