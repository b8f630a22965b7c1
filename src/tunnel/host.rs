//! The tunnel's host side, sans-IO: for each client flow `(connection, flow id)` one backend
//! socket that relays the flow's datagrams to its service and the service's answers back.
//!
//! The driver owns the sockets; the core says when to open and close them:
//! - [`TunnelHost::handle_client`] takes a payload an application host core surfaced
//!   ([`crate::host::HostEvent::Data`]) and returns what to send to which backend, from the
//!   flow's socket ([`ToBackend`]; `open` says a socket must be created first).
//!   [`TunnelHost::backend_done`] tells the core the bytes left (the per-client
//!   bytes-in-flight limit counts what was handed out and not yet done).
//! - [`TunnelHost::handle_backend`] frames a backend's answer for `HostCore::send`.
//! - [`TunnelHost::poll_close`] names flows whose sockets to close (idle, or their connection
//!   closed); [`TunnelHost::poll_to_client`] gives frames the core sends on its own (CLOSE
//!   for a refused flow, ACK for a one-way flow).
//!
//! Backends see ordinary UDP from one address per flow and need no change.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::frame::{Frame, Kind, MAX_APP_PAYLOAD};
use crate::time::Ticks;

/// A service behind the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Its name (logs, metrics).
    pub name: String,
    /// Where its datagrams go.
    pub backend: SocketAddr,
}

impl std::str::FromStr for Service {
    type Err = String;

    /// `ADDR` or `NAME=ADDR` (the name defaults to the address).
    fn from_str(s: &str) -> Result<Service, String> {
        let (name, addr) = match s.split_once('=') {
            Some((n, a)) => (n.trim(), a.trim()),
            None => (s.trim(), s.trim()),
        };
        let backend = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not a socket address (e.g. 127.0.0.1:53)"))?;
        if name.is_empty() {
            return Err(format!("empty service name in {s:?}"));
        }
        Ok(Service {
            name: name.to_owned(),
            backend,
        })
    }
}

/// Parses a services file (TOML): the services in order, the first is service 0.
///
/// ```toml
/// [[service]]
/// name = "dns"
/// backend = "10.0.0.53:53"
/// ```
pub fn parse_services(text: &str) -> Result<Vec<Service>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        service: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        name: String,
        backend: SocketAddr,
    }
    let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
    if f.service.len() > 256 {
        return Err(format!("{} services; at most 256", f.service.len()));
    }
    Ok(f.service
        .into_iter()
        .map(|e| Service {
            name: e.name,
            backend: e.backend,
        })
        .collect())
}

/// Host tunables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelHostConfig {
    /// The services; a client names one by its index (the frame's service byte).
    pub services: Vec<Service>,
    /// A flow unused for this long is closed (its backend socket too).
    pub flow_idle: Duration,
    /// Flows one connection may hold; a new one beyond it is refused (CLOSE frame).
    pub max_flows_per_client: usize,
    /// Bytes toward backends one connection may have in flight (handed to the driver and not
    /// yet reported by [`TunnelHost::backend_done`]); beyond it datagrams are dropped.
    pub max_bytes_in_flight: usize,
    /// When a client sent and nothing went back to it for this long, an ACK frame goes.
    pub ack_interval: Duration,
}

impl Default for TunnelHostConfig {
    fn default() -> Self {
        TunnelHostConfig {
            services: Vec::new(),
            flow_idle: Duration::from_secs(120),
            max_flows_per_client: 1024,
            max_bytes_in_flight: 1 << 20,
            ack_interval: Duration::from_millis(250),
        }
    }
}

/// A flow: one client's flow id on one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub conn_id: u64,
    pub flow: u16,
}

/// What [`TunnelHost::handle_client`] asks the driver to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToBackend<'a> {
    pub key: FlowKey,
    pub backend: SocketAddr,
    /// A new flow: create its socket (connected to `backend`) first.
    pub open: bool,
    pub payload: &'a [u8],
}

/// Counters; every datagram not relayed lands in one `dropped_*` counter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TunnelHostStats {
    pub to_backend: u64,
    pub to_backend_bytes: u64,
    pub to_client: u64,
    pub to_client_bytes: u64,
    pub flows_opened: u64,
    pub flows_idle_closed: u64,
    /// Flows closed because their connection closed.
    pub flows_conn_closed: u64,
    /// Flows closed on the driver's word (socket error).
    pub flows_failed: u64,
    pub acks_sent: u64,
    pub closes_sent: u64,
    /// A client payload that is not a frame, or a frame kind clients do not send.
    pub dropped_malformed: u64,
    /// A frame naming a service the host does not have.
    pub dropped_unknown_service: u64,
    /// A new flow beyond `max_flows_per_client`.
    pub dropped_flow_limit: u64,
    /// Beyond `max_bytes_in_flight`.
    pub dropped_in_flight_limit: u64,
    /// A backend answer for a flow already closed.
    pub dropped_unknown_flow: u64,
    /// A backend answer longer than [`MAX_APP_PAYLOAD`] (never truncated).
    pub dropped_too_big: u64,
}

struct FlowState {
    service: u8,
    last_active: Ticks,
}

#[derive(Default)]
struct Conn {
    flows: usize,
    in_flight: usize,
    /// Last frame of any kind sent to this client, and last payload received from it.
    last_to_client: Option<Ticks>,
}

/// The sans-IO tunnel forwarder. See the module docs.
pub struct TunnelHost {
    cfg: TunnelHostConfig,
    flows: HashMap<FlowKey, FlowState>,
    conns: HashMap<u64, Conn>,
    closes: VecDeque<FlowKey>,
    to_client: VecDeque<(u64, Vec<u8>)>,
    stats: TunnelHostStats,
}

impl std::fmt::Debug for TunnelHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelHost")
            .field("services", &self.cfg.services.len())
            .field("flows", &self.flows.len())
            .finish_non_exhaustive()
    }
}

impl TunnelHost {
    pub fn new(cfg: TunnelHostConfig) -> TunnelHost {
        TunnelHost {
            cfg,
            flows: HashMap::new(),
            conns: HashMap::new(),
            closes: VecDeque::new(),
            to_client: VecDeque::new(),
            stats: TunnelHostStats::default(),
        }
    }

    pub fn config(&self) -> &TunnelHostConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &TunnelHostStats {
        &self.stats
    }

    /// Open flows.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// A payload from the client of `conn_id`: what to send to a backend, if anything.
    pub fn handle_client<'a>(
        &mut self,
        now: Ticks,
        conn_id: u64,
        payload: &'a [u8],
    ) -> Option<ToBackend<'a>> {
        let frame = match Frame::parse(payload) {
            Ok(f) if f.kind == Kind::Data => f,
            _ => {
                self.stats.dropped_malformed += 1;
                return None;
            }
        };
        let Some(service) = self.cfg.services.get(usize::from(frame.service)) else {
            self.stats.dropped_unknown_service += 1;
            self.refuse(conn_id, frame.service, frame.flow);
            return None;
        };
        let backend = service.backend;
        let key = FlowKey {
            conn_id,
            flow: frame.flow,
        };
        let conn = self.conns.entry(conn_id).or_default();
        if conn.in_flight + frame.payload.len() > self.cfg.max_bytes_in_flight {
            self.stats.dropped_in_flight_limit += 1;
            return None;
        }
        let open = match self.flows.get_mut(&key) {
            Some(f) if f.service == frame.service => {
                f.last_active = now;
                false
            }
            Some(_) => {
                // The client reused a flow id for another service: that is a protocol error.
                self.stats.dropped_malformed += 1;
                return None;
            }
            None => {
                if conn.flows >= self.cfg.max_flows_per_client {
                    self.stats.dropped_flow_limit += 1;
                    self.refuse(conn_id, frame.service, frame.flow);
                    return None;
                }
                conn.flows += 1;
                self.flows.insert(
                    key,
                    FlowState {
                        service: frame.service,
                        last_active: now,
                    },
                );
                self.stats.flows_opened += 1;
                true
            }
        };
        let conn = self.conns.entry(conn_id).or_default();
        conn.in_flight += frame.payload.len();
        if conn
            .last_to_client
            .is_none_or(|t| now.since(t) >= self.cfg.ack_interval)
        {
            conn.last_to_client = Some(now);
            self.to_client.push_back((
                conn_id,
                Frame::control(Kind::Ack, frame.service, frame.flow).to_vec(),
            ));
            self.stats.acks_sent += 1;
        }
        self.stats.to_backend += 1;
        self.stats.to_backend_bytes += frame.payload.len() as u64;
        Some(ToBackend {
            key,
            backend,
            open,
            payload: frame.payload,
        })
    }

    /// The driver finished with `len` bytes handed out for `key` (sent or dropped).
    pub fn backend_done(&mut self, key: FlowKey, len: usize) {
        if let Some(c) = self.conns.get_mut(&key.conn_id) {
            c.in_flight = c.in_flight.saturating_sub(len);
        }
    }

    /// A datagram the backend of `key` sent: writes the frame for `HostCore::send(conn_id)`
    /// into `out` and returns its length.
    pub fn handle_backend(
        &mut self,
        now: Ticks,
        key: FlowKey,
        payload: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        let Some(f) = self.flows.get_mut(&key) else {
            self.stats.dropped_unknown_flow += 1;
            return None;
        };
        if payload.len() > MAX_APP_PAYLOAD {
            self.stats.dropped_too_big += 1;
            return None;
        }
        f.last_active = now;
        let n = Frame::data(f.service, key.flow, payload).emit(out)?;
        if let Some(c) = self.conns.get_mut(&key.conn_id) {
            c.last_to_client = Some(now);
        }
        self.stats.to_client += 1;
        self.stats.to_client_bytes += payload.len() as u64;
        Some(n)
    }

    /// The connection is gone: its flows close.
    pub fn connection_closed(&mut self, conn_id: u64) {
        if self.conns.remove(&conn_id).is_none() {
            return;
        }
        let gone: Vec<FlowKey> = self
            .flows
            .keys()
            .filter(|k| k.conn_id == conn_id)
            .copied()
            .collect();
        for k in gone {
            self.flows.remove(&k);
            self.stats.flows_conn_closed += 1;
            self.closes.push_back(k);
        }
    }

    /// The driver could not keep the flow (its socket failed): close it and tell the client.
    pub fn flow_failed(&mut self, key: FlowKey) {
        if let Some(f) = self.flows.remove(&key) {
            self.stats.flows_failed += 1;
            self.forget_flow(key);
            self.refuse(key.conn_id, f.service, key.flow);
        }
    }

    /// The next flow whose socket to close.
    pub fn poll_close(&mut self) -> Option<FlowKey> {
        self.closes.pop_front()
    }

    /// The next frame the core sends on its own: `(conn_id, frame)` for `HostCore::send`.
    pub fn poll_to_client(&mut self) -> Option<(u64, Vec<u8>)> {
        self.to_client.pop_front()
    }

    /// When [`TunnelHost::handle_timeout`] has flows to expire.
    pub fn poll_timeout(&self) -> Option<Ticks> {
        self.flows
            .values()
            .map(|f| f.last_active.saturating_add(self.cfg.flow_idle))
            .min()
    }

    /// Closes flows idle for `flow_idle`.
    pub fn handle_timeout(&mut self, now: Ticks) {
        let idle = self.cfg.flow_idle;
        let stale: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, f)| now.since(f.last_active) >= idle)
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.flows.remove(&k);
            self.forget_flow(k);
            self.stats.flows_idle_closed += 1;
            self.closes.push_back(k);
        }
    }

    fn forget_flow(&mut self, key: FlowKey) {
        if let Some(c) = self.conns.get_mut(&key.conn_id) {
            c.flows = c.flows.saturating_sub(1);
            if c.flows == 0 && c.in_flight == 0 {
                self.conns.remove(&key.conn_id);
            }
        }
    }

    fn refuse(&mut self, conn_id: u64, service: u8, flow: u16) {
        self.stats.closes_sent += 1;
        self.to_client
            .push_back((conn_id, Frame::control(Kind::Close, service, flow).to_vec()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> TunnelHost {
        TunnelHost::new(TunnelHostConfig {
            services: vec![Service {
                name: "echo".into(),
                backend: "127.0.0.1:9".parse().unwrap(),
            }],
            max_flows_per_client: 2,
            max_bytes_in_flight: 10,
            flow_idle: Duration::from_secs(5),
            ..TunnelHostConfig::default()
        })
    }

    #[test]
    fn relays_limits_and_expiry() {
        let mut h = host();
        let t = Ticks(1_000_000_000);
        let d = Frame::data(0, 7, b"abc").to_vec();
        let b = h.handle_client(t, 1, &d).unwrap();
        assert!(b.open);
        assert_eq!((b.key.flow, b.payload), (7, &b"abc"[..]));
        assert_eq!(
            h.poll_to_client().map(|(c, f)| (c, f[0])),
            Some((1, Kind::Ack as u8))
        );
        let key = b.key;
        // In flight: 3 of 10; 8 more is over.
        let big = Frame::data(0, 7, b"12345678").to_vec();
        assert!(h.handle_client(t, 1, &big).is_none());
        h.backend_done(key, 3);
        assert!(!h.handle_client(t, 1, &big).unwrap().open);
        h.backend_done(key, 8);
        // The answer is framed for the client.
        let mut out = [0u8; 64];
        let n = h.handle_backend(t, key, b"reply", &mut out).unwrap();
        assert_eq!(
            Frame::parse(&out[..n]).unwrap(),
            Frame::data(0, 7, b"reply")
        );
        // Flow limit (2), unknown service, malformed.
        h.handle_client(t, 1, &Frame::data(0, 8, b"x").to_vec())
            .unwrap();
        h.backend_done(
            FlowKey {
                conn_id: 1,
                flow: 8,
            },
            1,
        );
        assert!(
            h.handle_client(t, 1, &Frame::data(0, 9, b"x").to_vec())
                .is_none()
        );
        assert!(
            h.handle_client(t, 1, &Frame::data(3, 9, b"x").to_vec())
                .is_none()
        );
        assert!(h.handle_client(t, 1, &[0; 24]).is_none());
        let closes: Vec<u8> = std::iter::from_fn(|| h.poll_to_client())
            .map(|(_, f)| f[0])
            .collect();
        assert_eq!(closes, [Kind::Close as u8, Kind::Close as u8]);
        // Idle expiry closes both sockets.
        h.handle_timeout(t.saturating_add(Duration::from_secs(6)));
        let mut gone: Vec<u16> = std::iter::from_fn(|| h.poll_close())
            .map(|k| k.flow)
            .collect();
        gone.sort();
        assert_eq!(gone, [7, 8]);
        assert!(h.handle_backend(t, key, b"late", &mut out).is_none());
        let s = h.stats();
        assert_eq!((s.to_backend, s.to_client, s.flows_opened), (3, 1, 2));
        assert_eq!((s.dropped_in_flight_limit, s.dropped_flow_limit), (1, 1));
        assert_eq!((s.dropped_unknown_service, s.dropped_malformed), (1, 1));
        assert_eq!((s.flows_idle_closed, s.dropped_unknown_flow), (2, 1));
    }

    #[test]
    fn services_from_flags_and_file() {
        let s: Service = "dns=127.0.0.1:53".parse().unwrap();
        assert_eq!((s.name.as_str(), s.backend.port()), ("dns", 53));
        let s: Service = "127.0.0.1:9".parse().unwrap();
        assert_eq!(s.name, "127.0.0.1:9");
        assert!("dns=nowhere".parse::<Service>().is_err());
        let v = parse_services(
            "[[service]]\nname = \"dns\"\nbackend = \"10.0.0.53:53\"\n\
             [[service]]\nname = \"iperf\"\nbackend = \"[::1]:5001\"\n",
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].backend, "[::1]:5001".parse().unwrap());
        assert!(parse_services("[[service]]\nname = \"x\"\n").is_err());
    }

    #[test]
    fn connection_close_closes_its_flows() {
        let mut h = host();
        let t = Ticks(1);
        h.handle_client(t, 1, &Frame::data(0, 1, b"a").to_vec())
            .unwrap();
        h.handle_client(t, 2, &Frame::data(0, 1, b"b").to_vec())
            .unwrap();
        h.connection_closed(1);
        assert_eq!(
            h.poll_close(),
            Some(FlowKey {
                conn_id: 1,
                flow: 1
            })
        );
        assert_eq!(h.poll_close(), None);
        assert_eq!(h.flows(), 1);
    }
}
