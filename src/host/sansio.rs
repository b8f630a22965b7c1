//! The sans-IO reference host: no sockets, no clock. Every entry point takes `now` and, for
//! datagrams, the source address (a gateway worker's host-link socket).
//!
//! Same convention as the client core (docs/architecture.md, "Sans-IO cores"): input goes in
//! through [`HostCore::handle`] and [`HostCore::handle_timeout`], output comes out of
//! [`HostCore::poll_transmit`] into the caller's buffer, and [`HostCore::poll_timeout`] says
//! when the timers are due. A DATA echo is sealed straight into the caller's buffer by
//! `poll_transmit` (no allocation) when it is drained after each `handle`.
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::crypto::Gcm;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::crypto;
use crate::host::clients::ClientsFile;
use crate::hostlink::{
    self, Control, DATA_HEADER_LEN as LINK_DATA_HEADER, HandshakeMac, LinkError, LinkKey, LinkType,
    ReplayGuard,
};
use crate::replay::ReplayWindow;
use crate::time::{Ticks, duration_ticks};
use crate::wire::{
    DATA_OVERHEAD, DataView, HandshakeReply, HandshakeView, KEYS_ACK_TYPE, MAX_TUPLE_LEN,
    build_handshake_reply, open_handshake, seal_data,
};

/// Largest datagram the host handles: the UDP maximum.
pub const MAX_DATAGRAM: usize = 65_536;

#[path = "delivery.rs"]
mod delivery;

/// Tunables of the core. `Default` follows PROTOCOL.md §7 and the host-link rules.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Client ticks further than this from `now` are rejected, and a nonce seen within it
    /// is a replay (§7: 10 minutes).
    pub handshake_window: Duration,
    /// Resend REGISTER after this long without an answer.
    pub register_retry: Duration,
    /// REGISTER is sent at most this many times; then the handshake is given up.
    pub register_tries: u32,
    /// How long a built HANDSHAKE_REPLY is kept to answer a retransmitted HANDSHAKE.
    pub reply_keep: Duration,
    /// Hard cap on remembered client nonces. When full, new handshakes are refused (never
    /// evicted early: that would reopen the replay window).
    pub max_nonces: usize,
    /// Remembered nonces one client (credential) may hold. Beyond it that client's new
    /// handshakes are refused (`handshake_client_quota`) until its nonces expire, so one
    /// credential cannot fill `max_nonces` and lock every other client out.
    pub max_nonces_per_client: usize,
    /// Hard cap on handshakes waiting for REGISTERED.
    pub max_pending: usize,
    /// A connection with no DATA for this long is closed (its gateway index freed).
    pub idle_timeout: Duration,
    /// Where host-link datagrams may come from: the gateways' addresses or networks, any
    /// port (a gateway's workers send from ephemeral ports). Others are dropped.
    pub gateways: Vec<GatewayNet>,
    /// `true` (the default): the reference echo host, every DATA payload is sent back.
    /// `false`: application mode, for a host that embeds the core. A received payload
    /// surfaces as [`HostEvent::Data`] from [`HostCore::poll_event`], and the application
    /// answers with [`HostCore::send`]. Keepalives (24 zero bytes, §7) are still answered by
    /// the core and not surfaced.
    pub echo: bool,
    /// Application mode: events held for [`HostCore::poll_event`]; a DATA arriving when
    /// the queue is full is dropped and counted (`app_events_dropped`).
    pub max_events: usize,
}

/// What happened, for an application host (`HostConfig { echo: false, .. }`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostEvent {
    /// A connection is live (REGISTERED accepted, HANDSHAKE_REPLY sent). `client` is the
    /// enrolled name of its client.
    Connected { conn_id: u64, client: String },
    /// An authenticated, fresh DATA payload from the client of `conn_id`.
    Data { conn_id: u64, payload: Vec<u8> },
    /// The connection is gone (closed by the host, idle, replaced, or expired by the
    /// gateway); [`HostCore::send`] refuses it from now on.
    Closed { conn_id: u64 },
}

/// Why [`HostCore::send`] refused a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostSendError {
    #[error("unknown connection {0:#x} (closed or never registered)")]
    UnknownConnection(u64),
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("output queue full ({0} datagrams); drain poll_transmit")]
    QueueFull(usize),
}

/// Largest payload [`HostCore::send`] takes: the client's [`crate::client::MAX_PAYLOAD`].
pub const MAX_SEND_PAYLOAD: usize = 1200;
/// Datagrams [`HostCore::send`] may leave waiting for `poll_transmit`.
pub const SEND_QUEUE_LIMIT: usize = 4096;
/// The keepalive payload (§7): 24 zero bytes.
const KEEPALIVE_LEN: usize = 24;

/// An IP network (`10.0.0.0/8`, `::1/128`, or a bare address for one host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatewayNet {
    addr: IpAddr,
    prefix: u8,
}

impl GatewayNet {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<GatewayNet> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(GatewayNet {
            addr: addr.to_canonical(),
            prefix,
        })
    }

    /// The loopback networks: the default, for a gateway on the same machine.
    pub fn loopback() -> Vec<GatewayNet> {
        vec![
            GatewayNet {
                addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
                prefix: 8,
            },
            GatewayNet {
                addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
                prefix: 128,
            },
        ]
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                n.to_bits() & mask == a.to_bits() & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                n.to_bits() & mask == a.to_bits() & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for GatewayNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network"))?;
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse()
                .map_err(|_| format!("bad prefix length in {s:?}"))?,
            None if ip.is_ipv4() => 32,
            None => 128,
        };
        GatewayNet::new(ip, prefix).ok_or_else(|| format!("prefix length too long in {s:?}"))
    }
}

impl std::fmt::Display for GatewayNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            handshake_window: Duration::from_secs(600),
            register_retry: Duration::from_millis(500),
            register_tries: 5,
            reply_keep: Duration::from_secs(30),
            max_nonces: 1 << 20,
            // A nonce is kept up to 2 × handshake_window (20 min). A client retries a lost
            // handshake about 9 times in its 20 s deadline, so 256 allows ~28 failed connects
            // in 20 minutes, while 4096 credentials are needed to fill the whole cache.
            max_nonces_per_client: 256,
            max_pending: 1 << 16,
            idle_timeout: Duration::from_secs(600),
            gateways: GatewayNet::loopback(),
            echo: true,
            max_events: 4096,
        }
    }
}

/// What the host has done, by outcome. Serializes as a flat JSON object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostCounters {
    /// Handshakes accepted (REGISTER sent for them).
    pub handshakes_ok: u64,
    pub handshake_malformed: u64,
    pub handshake_unknown_client: u64,
    pub handshake_bad_aead: u64,
    pub handshake_stale_ticks: u64,
    pub handshake_replayed_nonce: u64,
    /// Nonce cache or pending table at its cap.
    pub handshake_busy: u64,
    /// The client already holds `max_nonces_per_client` remembered nonces.
    pub handshake_client_quota: u64,
    /// Retransmitted HANDSHAKE answered with the kept reply.
    pub handshake_reply_resent: u64,
    /// Retransmitted HANDSHAKE while REGISTER is still outstanding.
    pub handshake_dup_pending: u64,

    pub register_sent: u64,
    pub register_retransmits: u64,
    pub register_timeouts: u64,
    pub register_failed: u64,
    /// REGISTERED accepted: connection live, HANDSHAKE_REPLY sent.
    pub registrations: u64,
    /// A client's new connection replaced (and closed) its previous one.
    pub connections_replaced: u64,
    /// Connections closed after `idle_timeout` without DATA.
    pub idle_closed: u64,
    /// REGISTERED / REGISTER_FAILED / CLOSED for no outstanding request (e.g. late duplicates).
    pub control_unknown_request: u64,

    pub echoes: u64,
    pub echo_bytes: u64,
    pub data_malformed: u64,
    pub data_unknown_conn: u64,
    pub data_bad_aead: u64,
    pub data_replay: u64,
    /// DATA for a connection its client never used that opened under another connection of
    /// the same client: the handshake completed on an earlier attempt's reply while the
    /// gateway bound the tuple to the newest registration.
    pub data_sibling: u64,

    pub rebounds: u64,
    pub rebound_unknown_conn: u64,
    pub closes_sent: u64,
    pub closed_acks: u64,

    pub control_bad_tag: u64,
    pub control_stale: u64,
    pub control_malformed: u64,
    /// A host-bound control type (REGISTER, CLOSE) sent to the host.
    pub control_unexpected: u64,
    /// Empty datagram, unknown type, or a gateway-bound type (TO_CLIENT_*).
    pub link_malformed: u64,
    /// A host-link datagram from an address outside `gateways`.
    pub link_unknown_source: u64,
    /// TO_HOST_HANDSHAKE whose MAC does not verify under the link key.
    pub handshake_bad_mac: u64,
    /// A control message accepted before (or sent before this host started).
    pub control_replay: u64,
    /// REBOUND no newer than the last one taken for its connection (reordered).
    pub rebound_stale: u64,
    /// Connections the gateway released for idleness (EXPIRED).
    pub expired_by_gateway: u64,
    pub expired_unknown_conn: u64,
    /// HELLOs sent (until one is acknowledged) and acknowledged.
    pub hello_sent: u64,
    pub hello_acked: u64,
    /// HELLO_ACK for another boot id.
    pub hello_ack_wrong_boot: u64,
    /// The caller's output buffer could not hold the answer.
    pub out_too_small: u64,

    /// Application mode: payloads surfaced as [`HostEvent::Data`], and their bytes.
    pub app_received: u64,
    pub app_received_bytes: u64,
    /// Application mode: DATA dropped because the event queue was full.
    pub app_events_dropped: u64,
    /// Application mode: keepalives answered by the core.
    pub keepalives_answered: u64,
    /// Payloads sent with [`HostCore::send`], and their bytes.
    pub app_sent: u64,
    pub app_sent_bytes: u64,
    /// [`HostCore::send`] refusals (unknown connection, too large, queue full).
    pub app_send_refused: u64,

    /// Key delivery: KEYS sealed for new keys, and resent unacknowledged.
    pub keys_sent: u64,
    pub keys_resent: u64,
    /// KEYS_ACK accepted (first for their KEYS), and re-acknowledgements.
    pub keys_acked: u64,
    pub keys_ack_repeated: u64,
    /// KEYS_ACK that did not open, with an `aseq` not above the last, or naming other keys.
    pub keys_ack_bad: u64,
    pub keys_ack_replay: u64,
    pub keys_ack_unexpected: u64,
    /// Connections reported in KEYS_DELIVERED (repeats included).
    pub keys_delivered_reported: u64,
    /// EPOCH_KEYS entries for unknown connections, for keys under way already, or for an
    /// epoch older than the one being delivered.
    pub epoch_keys_unknown_conn: u64,
    pub epoch_keys_duplicate: u64,
    pub epoch_keys_stale: u64,
}

/// A datagram [`HostCore::poll_transmit`] wrote into the caller's buffer: `buf[..len]` goes
/// to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub to: SocketAddr,
    pub len: usize,
}

/// An owned datagram, queued inside the core until `poll_transmit` (handshake, control and
/// timer paths only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub payload: Vec<u8>,
}

struct Conn {
    rx: Gcm,
    tx: Gcm,
    window: ReplayWindow,
    next_seq: u64,
    gateway: SocketAddr,
    client_id: [u8; 16],
    last_active: Ticks,
    /// Has DATA arrived on it?
    used: bool,
    /// `t` of the last REBOUND taken: an older one (reordered between workers) is ignored.
    rebound_t: Ticks,
    /// Its client's keys for a new epoch, on their way (PROTOCOL-EXT.md "Key delivery").
    keys: delivery::ConnKeys,
}

/// Connections one client may hold before the oldest is closed.
pub const MAX_UNPROVEN_PER_CLIENT: usize = 4;

struct Pending {
    client_id: [u8; 16],
    nonce: [u8; 16],
    /// The client's PSK: `k_s` depends on the server nonce drawn when the reply is built.
    psk: Zeroizing<[u8; 32]>,
    client: SocketAddr,
    gateway: SocketAddr,
    conn_id: u64,
    sent: u32,
    retry_at: Ticks,
}

enum NonceState {
    /// REGISTER outstanding under this request id.
    Pending,
    /// Reply built; kept until `keep_until` for byte-identical retransmissions from
    /// `client`. It is re-sent as is, never re-sealed (§7: one reply per server nonce).
    Replied {
        client: SocketAddr,
        framed: Vec<u8>,
        keep_until: Ticks,
    },
    /// Registration failed, timed out, or the kept reply expired.
    Spent,
}

struct NonceEntry {
    expires: Ticks,
    /// Whose nonce it is, for the per-client quota.
    client_id: [u8; 16],
    /// The HANDSHAKE's authenticated bytes (all but the padding): only a copy of exactly
    /// this handshake gets the kept reply.
    handshake: [u8; HANDSHAKE_AUTH_LEN],
    state: NonceState,
}

/// type, client_id, client_nonce, sealed ticks and tag (§7).
const HANDSHAKE_AUTH_LEN: usize = 1 + 16 + 16 + 8 + crypto::TAG_LEN;

/// The reference echo host (PROTOCOL.md §7 over the host link of `hostlink`).
pub struct HostCore {
    cfg: HostConfig,
    link: Gcm,
    mac: HandshakeMac,
    /// Control messages from the gateway already accepted.
    guard: ReplayGuard,
    /// Random per run: a gateway that sees a new one releases the connections of the old.
    boot: u64,
    /// The HELLO exchange per gateway IP (sources are limited to `cfg.gateways`).
    hellos: HashMap<IpAddr, Hello>,
    clients: ClientsFile,
    conns: HashMap<u64, Conn>,
    /// Each client's connections, oldest first. A client uses one: the first DATA on a
    /// connection closes the client's others, and a client may hold at most
    /// [`MAX_UNPROVEN_PER_CLIENT`] at once (older ones are closed), so handshake retries and
    /// a misbehaving client cannot pile up gateway indexes. A retried handshake may complete
    /// on a late reply to an earlier attempt, so the newest connection is not always the one
    /// in use.
    by_client: HashMap<[u8; 16], Vec<u64>>,
    /// CLOSEs to send at the next `handle_timeout`.
    deferred: Vec<Transmit>,
    /// Datagrams waiting for `poll_transmit`, oldest first (not the echo).
    queue: VecDeque<Transmit>,
    /// The DATA echo waiting for `poll_transmit`: its plaintext is in `scratch`.
    echo: Option<PendingEcho>,
    last_idle_scan: Ticks,
    /// Outstanding REGISTERs by request id.
    pending: HashMap<u64, Pending>,
    /// conn_ids of `pending`, so a new conn_id is unique among live and pending ones.
    pending_ids: HashSet<u64>,
    nonces: HashMap<[u8; 16], NonceEntry>,
    /// Entries of `nonces` per client_id (absent when zero).
    nonces_per_client: HashMap<[u8; 16], usize>,
    /// `(expires, nonce)` in insertion order; `expires` grows with `now`.
    nonce_queue: VecDeque<(Ticks, [u8; 16])>,
    /// `(keep_until, nonce)` of kept replies, in insertion order.
    reply_queue: VecDeque<(Ticks, [u8; 16])>,
    next_request: u64,
    counters: HostCounters,
    /// Plaintext of the DATA being echoed; allocated once.
    scratch: Vec<u8>,
    /// Application mode: events for [`HostCore::poll_event`].
    events: VecDeque<HostEvent>,
    /// KEYS resend times `(due, conn_id)`; stale ones are skipped when popped.
    keys_due: BinaryHeap<Reverse<(Ticks, u64)>>,
    /// Acknowledged deliveries not yet reported: `(gateway, epoch, conn_id)`.
    keys_report: Vec<(SocketAddr, u32, u64)>,
}

/// A DATA echo owed: `scratch[..len]` sealed under `conn_id`'s key with `seq`, to `to`.
#[derive(Clone, Copy, Debug)]
struct PendingEcho {
    conn_id: u64,
    seq: u64,
    len: usize,
    to: SocketAddr,
}

/// The HELLO exchange with one gateway: no REGISTER goes to it before it acknowledged this
/// run's boot id, so none can be taken for the previous run's. A host keeps one per gateway
/// (by IP address: a gateway's workers share one boot table), so several gateways behind
/// ECMP each learn the boot id (cluster mode, docs/cluster.md).
#[derive(Debug)]
struct Hello {
    acked: bool,
    /// The address to send it to: the first of that gateway's sockets heard from.
    to: SocketAddr,
    next: Ticks,
}

impl std::fmt::Debug for HostCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCore")
            .field("clients", &self.clients.len())
            .field("connections", &self.conns.len())
            .field("pending", &self.pending.len())
            .field("nonces", &self.nonces.len())
            .finish_non_exhaustive()
    }
}

impl HostCore {
    pub fn new(link_key: &LinkKey, clients: ClientsFile) -> Self {
        Self::with_config(link_key, clients, HostConfig::default())
    }

    pub fn with_config(link_key: &LinkKey, clients: ClientsFile, cfg: HostConfig) -> Self {
        HostCore {
            cfg,
            link: link_key.cipher(),
            mac: link_key.handshake_mac(),
            guard: ReplayGuard::default(),
            boot: u64::from_be_bytes(crypto::random_array()),
            hellos: HashMap::new(),
            clients,
            conns: HashMap::new(),
            by_client: HashMap::new(),
            deferred: Vec::new(),
            queue: VecDeque::new(),
            echo: None,
            last_idle_scan: Ticks(0),
            pending: HashMap::new(),
            pending_ids: HashSet::new(),
            nonces: HashMap::new(),
            nonces_per_client: HashMap::new(),
            nonce_queue: VecDeque::new(),
            reply_queue: VecDeque::new(),
            next_request: u64::from_be_bytes(crypto::random_array()),
            counters: HostCounters::default(),
            scratch: vec![0u8; MAX_DATAGRAM],
            events: VecDeque::new(),
            keys_due: BinaryHeap::new(),
            keys_report: Vec::new(),
        }
    }

    /// Application mode (`HostConfig { echo: false, .. }`): the next event. Always `None` in
    /// echo mode.
    pub fn poll_event(&mut self) -> Option<HostEvent> {
        self.events.pop_front()
    }

    /// Application mode: seals `payload` as DATA to the client of `conn_id`; the datagram
    /// waits for [`HostCore::poll_transmit`]. Works in echo mode too (a server push).
    pub fn send(&mut self, conn_id: u64, payload: &[u8]) -> Result<(), HostSendError> {
        let r = self.send_inner(conn_id, payload);
        if r.is_err() {
            self.counters.app_send_refused += 1;
        } else {
            self.counters.app_sent += 1;
            self.counters.app_sent_bytes += payload.len() as u64;
        }
        r
    }

    fn send_inner(&mut self, conn_id: u64, payload: &[u8]) -> Result<(), HostSendError> {
        if payload.len() > MAX_SEND_PAYLOAD {
            return Err(HostSendError::TooLarge {
                len: payload.len(),
                max: MAX_SEND_PAYLOAD,
            });
        }
        if self.queue.len() >= SEND_QUEUE_LIMIT {
            return Err(HostSendError::QueueFull(SEND_QUEUE_LIMIT));
        }
        let conn = self
            .conns
            .get_mut(&conn_id)
            .ok_or(HostSendError::UnknownConnection(conn_id))?;
        let seq = conn.next_seq;
        conn.next_seq += 1;
        let mut out = vec![0u8; LINK_DATA_HEADER + payload.len() + DATA_OVERHEAD];
        out[0] = LinkType::ToClientData as u8;
        out[1..LINK_DATA_HEADER].copy_from_slice(&conn_id.to_be_bytes());
        seal_data(&conn.tx, seq, payload, &mut out[LINK_DATA_HEADER..]);
        self.queue.push_back(Transmit {
            to: conn.gateway,
            payload: out,
        });
        Ok(())
    }

    /// The enrolled name of the client of `conn_id`.
    pub fn client_name(&self, conn_id: u64) -> Option<&str> {
        let c = self.conns.get(&conn_id)?;
        self.clients.get(&c.client_id).map(|e| e.name.as_str())
    }

    /// Application mode: queues an event (Data may be dropped when full; the others are
    /// always kept, they are bounded by the connections).
    fn push_event(&mut self, e: HostEvent) {
        if self.cfg.echo {
            return;
        }
        if matches!(e, HostEvent::Data { .. }) && self.events.len() >= self.cfg.max_events {
            self.counters.app_events_dropped += 1;
            return;
        }
        self.events.push_back(e);
    }

    /// Swaps in a reloaded clients file. Live connections and handshakes in progress are kept;
    /// only new handshakes see the change.
    pub fn replace_clients(&mut self, clients: ClientsFile) {
        self.clients = clients;
    }

    /// From now on, refuse control messages sent before `start` (this run's start): an
    /// earlier run may have accepted them. The driver calls this once at start.
    pub fn set_start(&mut self, start: Ticks) {
        self.guard.set_start(start);
    }

    /// This run's boot id.
    pub fn boot(&self) -> u64 {
        self.boot
    }

    /// Has the gateway acknowledged this run's HELLO?
    pub fn hello_acked(&self) -> bool {
        !self.hellos.is_empty() && self.hellos.values().all(|h| h.acked)
    }

    pub fn clients(&self) -> &ClientsFile {
        &self.clients
    }

    pub fn counters(&self) -> &HostCounters {
        &self.counters
    }

    /// Live connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Handshakes waiting for REGISTERED.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The gateway address a connection's traffic goes to.
    pub fn gateway_of(&self, conn_id: u64) -> Option<SocketAddr> {
        self.conns.get(&conn_id).map(|c| c.gateway)
    }

    /// Handles one host-link datagram from `from`. An answer, if any, waits for
    /// [`HostCore::poll_transmit`]. The DATA echo path does not allocate as long as the caller
    /// drains `poll_transmit` before the next `handle` (an echo still waiting then is moved to
    /// the owned queue).
    pub fn handle(&mut self, now: Ticks, from: SocketAddr, datagram: &[u8]) {
        self.park_echo();
        if let Some(t) = self.handle_inner(now, from, datagram) {
            self.queue.push_back(t);
        }
    }

    /// Writes the next datagram to send into `buf` (an echo needs the received DATA's length,
    /// a handshake answer under 700 bytes, [`MAX_DATAGRAM`] always suffices). Queued control
    /// and timer output goes first, then the echo. A datagram longer than `buf` is dropped and
    /// counted (`out_too_small`).
    pub fn poll_transmit(&mut self, _now: Ticks, buf: &mut [u8]) -> Option<Outgoing> {
        while let Some(t) = self.queue.pop_front() {
            let Some(dst) = buf.get_mut(..t.payload.len()) else {
                self.counters.out_too_small += 1;
                continue;
            };
            dst.copy_from_slice(&t.payload);
            return Some(Outgoing {
                to: t.to,
                len: t.payload.len(),
            });
        }
        let e = self.echo.take()?;
        self.write_echo(e, buf)
    }

    /// The connection's data keys `(c2s, s2c)`, e.g. to seal a KEYS message for its client
    /// or open its KEYS_ACK (tests).
    #[cfg(any(test, feature = "testing"))]
    pub fn data_keys_for(&self, conn_id: u64) -> Option<(&Gcm, &Gcm)> {
        self.conns.get(&conn_id).map(|c| (&c.rx, &c.tx))
    }

    /// DATA for `conn_id`'s client as the host would send it, with a chosen `seq` (tests:
    /// replays, reordering, jumps). `None` if the connection is unknown.
    #[cfg(any(test, feature = "testing"))]
    pub fn seal_data_for(&self, conn_id: u64, seq: u64, payload: &[u8]) -> Option<Vec<u8>> {
        let conn = self.conns.get(&conn_id)?;
        let mut out = vec![0u8; payload.len() + DATA_OVERHEAD];
        seal_data(&conn.tx, seq, payload, &mut out);
        Some(out)
    }

    /// Seals `e` into `buf`: `None` if its connection is gone or `buf` is too short.
    fn write_echo(&mut self, e: PendingEcho, buf: &mut [u8]) -> Option<Outgoing> {
        let conn = self.conns.get(&e.conn_id)?;
        let len = LINK_DATA_HEADER + e.len + DATA_OVERHEAD;
        let Some(out) = buf.get_mut(..len) else {
            self.counters.out_too_small += 1;
            return None;
        };
        out[0] = LinkType::ToClientData as u8;
        out[1..LINK_DATA_HEADER].copy_from_slice(&e.conn_id.to_be_bytes());
        seal_data(
            &conn.tx,
            e.seq,
            &self.scratch[..e.len],
            &mut out[LINK_DATA_HEADER..],
        );
        Some(Outgoing { to: e.to, len })
    }

    /// Moves an undrained echo to the owned queue, so the next DATA can use `scratch`.
    fn park_echo(&mut self) {
        let Some(e) = self.echo.take() else {
            return;
        };
        let mut buf = vec![0u8; LINK_DATA_HEADER + e.len + DATA_OVERHEAD];
        if let Some(o) = self.write_echo(e, &mut buf) {
            buf.truncate(o.len);
            self.queue.push_back(Transmit {
                to: o.to,
                payload: buf,
            });
        }
    }

    fn handle_inner(&mut self, now: Ticks, from: SocketAddr, datagram: &[u8]) -> Option<Transmit> {
        if !self.cfg.gateways.iter().any(|n| n.contains(from.ip())) {
            self.counters.link_unknown_source += 1;
            return None;
        }
        let ty = match hostlink::link_type(datagram) {
            Ok(t) => t,
            Err(_) => {
                self.counters.link_malformed += 1;
                return None;
            }
        };
        // Each gateway heard from is told this run's boot id (at the next timer).
        self.hellos.entry(from.ip()).or_insert(Hello {
            acked: false,
            to: from,
            next: now,
        });
        match ty {
            LinkType::ToHostData => {
                self.on_data(now, from, datagram);
                None
            }
            LinkType::ToHostHandshake => {
                // The gateway vouches for the client tuple; a forged one could register a
                // connection for (and aim the reply at) any tuple.
                let Ok(framed) = hostlink::verify_handshake(&self.mac, datagram) else {
                    self.counters.handshake_bad_mac += 1;
                    return None;
                };
                let t = self.on_handshake(now, from, framed)?;
                if t.payload.first() == Some(&(LinkType::Register as u8))
                    && !self.hello_acked_by(from.ip())
                {
                    // Held until this gateway acknowledges the HELLO (then resent at once);
                    // the HELLO goes in its place.
                    let h = self.hellos.get_mut(&from.ip())?;
                    h.to = from;
                    h.next = now;
                    return self.hello_msg(now, from.ip());
                }
                Some(t)
            }
            LinkType::ToClientData | LinkType::ToClientReply => {
                self.counters.link_malformed += 1;
                None
            }
            _ => self.on_control(now, from, datagram),
        }
    }

    // --- DATA (§7) -------------------------------------------------------------------------

    /// Opens a DATA into `scratch` and owes its echo (`self.echo`).
    fn on_data(&mut self, now: Ticks, from: SocketAddr, datagram: &[u8]) -> Option<()> {
        let Ok((conn_id, inner)) = hostlink::parse_conn_data(datagram) else {
            self.counters.data_malformed += 1;
            return None;
        };
        if inner.first() == Some(&KEYS_ACK_TYPE) {
            self.on_keys_ack(conn_id, inner);
            return None;
        }
        let Ok(view) = DataView::new_checked(inner) else {
            self.counters.data_malformed += 1;
            return None;
        };
        let Some(conn) = self.conns.get(&conn_id) else {
            self.counters.data_unknown_conn += 1;
            return None;
        };
        let n = view.payload_len();
        if self.scratch.len() < n {
            self.counters.out_too_small += 1;
            return None;
        }
        //= PROTOCOL.md §7: "The receiver keeps a replay window"; the window moves only after
        //= the AEAD has verified the packet.
        let mut conn_id = conn_id;
        if view.open(&conn.rx, &mut self.scratch).is_err() {
            // Only for a connection never used, so at most MAX_UNPROVEN_PER_CLIENT - 1 more
            // opens, and only until its client's first DATA settles which one it uses.
            let sibling = if conn.used {
                None
            } else {
                self.sibling_that_opens(conn_id, &view)
            };
            let Some(sibling) = sibling else {
                self.counters.data_bad_aead += 1;
                return None;
            };
            // The client uses `sibling`; the first-use rule below closes the one the gateway
            // routed to, which releases the tuple there, so the client's next DATA draws an
            // UNRECOGNIZED and its REBIND binds the tuple to `sibling` (one round trip,
            // instead of waiting for the silent-path probe).
            self.counters.data_sibling += 1;
            conn_id = sibling;
        }
        let conn = self.conns.get_mut(&conn_id)?;
        if !conn.window.accept(view.seq()) {
            self.counters.data_replay += 1;
            return None;
        }
        // The worker that last forwarded this connection's traffic answers for it.
        conn.gateway = from;
        conn.last_active = now;
        let first_use = !conn.used;
        conn.used = true;
        let keepalive = n == KEEPALIVE_LEN && self.scratch[..n].iter().all(|b| *b == 0);
        let echo = self.cfg.echo || keepalive;
        // Only an echo takes a send seq here; application answers take theirs in `send`.
        let seq = conn.next_seq;
        if echo {
            conn.next_seq += 1;
        }
        let (to, client_id) = (conn.gateway, conn.client_id);
        if self.cfg.echo {
            self.counters.echoes += 1;
            self.counters.echo_bytes += n as u64;
        } else if keepalive {
            self.counters.keepalives_answered += 1;
        }
        if first_use {
            // The client chose this connection: its others (earlier handshake attempts) go.
            let others: Vec<u64> = self
                .by_client
                .get(&client_id)
                .map(|held| held.iter().copied().filter(|c| *c != conn_id).collect())
                .unwrap_or_default();
            for other in others {
                self.replace(now, other);
            }
        }
        if echo {
            self.echo = Some(PendingEcho {
                conn_id,
                seq,
                len: n,
                to,
            });
        } else if self.events.len() >= self.cfg.max_events {
            self.counters.app_events_dropped += 1;
        } else {
            self.counters.app_received += 1;
            self.counters.app_received_bytes += n as u64;
            let payload = self.scratch[..n].to_vec();
            self.push_event(HostEvent::Data { conn_id, payload });
        }
        Some(())
    }

    /// Another connection of `conn_id`'s client under whose key `view` opens (into
    /// `scratch`), if any.
    fn sibling_that_opens(&mut self, conn_id: u64, view: &DataView<'_>) -> Option<u64> {
        let client_id = self.conns.get(&conn_id)?.client_id;
        let held = self.by_client.get(&client_id)?;
        held.iter().copied().filter(|c| *c != conn_id).find(|c| {
            self.conns
                .get(c)
                .is_some_and(|other| view.open(&other.rx, &mut self.scratch).is_ok())
        })
    }

    // --- HANDSHAKE (§7) --------------------------------------------------------------------

    fn on_handshake(&mut self, now: Ticks, from: SocketAddr, datagram: &[u8]) -> Option<Transmit> {
        let Ok((client, inner)) = hostlink::parse_tuple_data(datagram) else {
            self.counters.handshake_malformed += 1;
            return None;
        };
        let Ok(view) = HandshakeView::new_checked(inner) else {
            self.counters.handshake_malformed += 1;
            return None;
        };
        let Some(entry) = self.clients.get(&view.client_id()) else {
            self.counters.handshake_unknown_client += 1;
            return None;
        };
        let Ok(client_ticks) = open_handshake(&view, &entry.creds.psk) else {
            self.counters.handshake_bad_aead += 1;
            return None;
        };
        let psk = Zeroizing::new(entry.creds.psk);
        let window = duration_ticks(self.cfg.handshake_window);
        if client_ticks.abs_diff(now) > window {
            self.counters.handshake_stale_ticks += 1;
            return None;
        }
        self.expire(now);
        let nonce = view.client_nonce();
        let mut auth = [0u8; HANDSHAKE_AUTH_LEN];
        auth.copy_from_slice(&inner[..HANDSHAKE_AUTH_LEN]);
        if let Some(e) = self.nonces.get(&nonce) {
            return match &e.state {
                NonceState::Replied {
                    client: c,
                    framed,
                    keep_until,
                } if *c == client && now <= *keep_until && crypto::ct_eq(&e.handshake, &auth) => {
                    // A retransmission: same answer, no second registration. Only to the same
                    // client tuple, so a replay from elsewhere cannot aim the reply at a victim.
                    self.counters.handshake_reply_resent += 1;
                    Some(Transmit {
                        to: from,
                        payload: framed.clone(),
                    })
                }
                NonceState::Pending => {
                    self.counters.handshake_dup_pending += 1;
                    None
                }
                _ => {
                    self.counters.handshake_replayed_nonce += 1;
                    None
                }
            };
        }
        // The per-client quota first: a client over it is refused on its own account and
        // never counts as (or causes) the global `busy`.
        let client_id = view.client_id();
        let held = self.nonces_per_client.get(&client_id).copied().unwrap_or(0);
        if held >= self.cfg.max_nonces_per_client {
            self.counters.handshake_client_quota += 1;
            return None;
        }
        if self.nonces.len() >= self.cfg.max_nonces || self.pending.len() >= self.cfg.max_pending {
            self.counters.handshake_busy += 1;
            return None;
        }
        // Keep the nonce until no copy of this handshake can pass the ticks check any more:
        // client ticks may lead `now` by up to the window, so that is up to two windows away.
        let expires = Ticks(now.0.max(client_ticks.0).saturating_add(window));
        self.nonces.insert(
            nonce,
            NonceEntry {
                expires,
                client_id,
                handshake: auth,
                state: NonceState::Pending,
            },
        );
        *self.nonces_per_client.entry(client_id).or_insert(0) += 1;
        self.nonce_queue
            .push_back((Ticks(now.0.saturating_add(2 * window)), nonce));

        let conn_id = self.fresh_conn_id();
        let request = self.next_request;
        self.next_request = self.next_request.wrapping_add(1);
        self.pending_ids.insert(conn_id);
        self.pending.insert(
            request,
            Pending {
                client_id: view.client_id(),
                nonce,
                psk,
                client,
                gateway: from,
                conn_id,
                sent: 1,
                retry_at: now.saturating_add(self.cfg.register_retry),
            },
        );
        self.counters.handshakes_ok += 1;
        self.counters.register_sent += 1;
        Some(self.register_msg(now, request))
    }

    fn fresh_conn_id(&self) -> u64 {
        loop {
            let id = u64::from_be_bytes(crypto::random_array());
            if !self.conns.contains_key(&id) && !self.pending_ids.contains(&id) {
                return id;
            }
        }
    }

    fn register_msg(&self, now: Ticks, request: u64) -> Transmit {
        let p = &self.pending[&request];
        Transmit {
            to: p.gateway,
            payload: Control::Register {
                boot: self.boot,
                request,
                conn_id: p.conn_id,
                client: p.client,
            }
            .seal(&self.link, now),
        }
    }

    fn hello_acked_by(&self, gateway: IpAddr) -> bool {
        self.hellos.get(&gateway).is_some_and(|h| h.acked)
    }

    /// The HELLO to send `gateway` now, if one is due; schedules the next.
    fn hello_msg(&mut self, now: Ticks, gateway: IpAddr) -> Option<Transmit> {
        let h = self.hellos.get_mut(&gateway)?;
        if h.acked || now < h.next {
            return None;
        }
        h.next = now.saturating_add(self.cfg.register_retry);
        let to = h.to;
        self.counters.hello_sent += 1;
        Some(Transmit {
            to,
            payload: Control::Hello { boot: self.boot }.seal(&self.link, now),
        })
    }

    // --- Control plane ---------------------------------------------------------------------

    fn on_control(&mut self, now: Ticks, from: SocketAddr, datagram: &[u8]) -> Option<Transmit> {
        let msg = match Control::open_fresh(datagram, &self.link, now, &mut self.guard) {
            Ok(m) => m,
            Err(LinkError::BadTag) => {
                self.counters.control_bad_tag += 1;
                return None;
            }
            Err(LinkError::Stale(_)) => {
                self.counters.control_stale += 1;
                return None;
            }
            Err(LinkError::Replay | LinkError::GuardFull) => {
                self.counters.control_replay += 1;
                return None;
            }
            Err(_) => {
                self.counters.control_malformed += 1;
                return None;
            }
        };
        match msg {
            Control::Registered {
                request,
                conn_id,
                epoch,
                index,
                rebind_secret,
                ref slot_keys,
            } => {
                if !self.is_pending(request, conn_id) {
                    self.counters.control_unknown_request += 1;
                    return None;
                }
                let p = self.pending.remove(&request)?;
                self.pending_ids.remove(&p.conn_id);
                let kd_c2s = Zeroizing::new(crypto::random_array::<16>());
                let kd_s2c = Zeroizing::new(crypto::random_array::<16>());
                let reply = HandshakeReply {
                    conn_id,
                    epoch_byte: epoch as u8,
                    index,
                    rebind_secret,
                    kd_c2s: *kd_c2s,
                    kd_s2c: *kd_s2c,
                    slot_keys: slot_keys.clone(),
                };
                // A fresh server nonce for every reply sealed: k_s is then never reused, even
                // for a HANDSHAKE replayed after a restart or to another host (§7, 1.1).
                let server_nonce: [u8; 16] = crypto::random_array();
                let inner = Zeroizing::new(build_handshake_reply(
                    &p.psk,
                    &p.nonce,
                    &server_nonce,
                    &reply,
                ));
                let mut framed = vec![0u8; 1 + MAX_TUPLE_LEN + inner.len()];
                let n = hostlink::emit_tuple_data(
                    LinkType::ToClientReply,
                    &p.client,
                    &inner,
                    &mut framed,
                );
                framed.truncate(n);
                self.conns.insert(
                    conn_id,
                    Conn {
                        rx: crypto::gcm(&kd_c2s),
                        tx: crypto::gcm(&kd_s2c),
                        window: ReplayWindow::new(),
                        next_seq: 0,
                        gateway: p.gateway,
                        client_id: p.client_id,
                        last_active: now,
                        used: false,
                        rebound_t: Ticks(0),
                        keys: delivery::ConnKeys::default(),
                    },
                );
                let held = self.by_client.entry(p.client_id).or_default();
                held.push(conn_id);
                if held.len() > MAX_UNPROVEN_PER_CLIENT {
                    let oldest = held[0];
                    self.replace(now, oldest);
                }
                let keep_until = now.saturating_add(self.cfg.reply_keep);
                if let Some(e) = self.nonces.get_mut(&p.nonce) {
                    e.state = NonceState::Replied {
                        client: p.client,
                        framed: framed.clone(),
                        keep_until,
                    };
                    self.reply_queue.push_back((keep_until, p.nonce));
                }
                self.counters.registrations += 1;
                let client = self
                    .clients
                    .get(&p.client_id)
                    .map(|e| e.name.clone())
                    .unwrap_or_default();
                self.push_event(HostEvent::Connected { conn_id, client });
                Some(Transmit {
                    to: p.gateway,
                    payload: framed,
                })
            }
            Control::RegisterFailed {
                request, conn_id, ..
            } => {
                if !self.is_pending(request, conn_id) {
                    self.counters.control_unknown_request += 1;
                    return None;
                }
                self.give_up(request);
                self.counters.register_failed += 1;
                None
            }
            Control::Rebound { conn_id, t, .. } => {
                match self.conns.get_mut(&conn_id) {
                    Some(c) if t > c.rebound_t => {
                        c.rebound_t = t;
                        c.gateway = from;
                        self.counters.rebounds += 1;
                        // KEYS sent before the move went to the old tuple: the same KEYS
                        // once more, to the new one (the backoff goes on as it was).
                        if let Some(o) = c.keys.out.as_ref().filter(|o| !o.acked) {
                            self.queue.push_back(Transmit {
                                to: from,
                                payload: o.framed.clone(),
                            });
                            self.counters.keys_resent += 1;
                        }
                    }
                    Some(_) => self.counters.rebound_stale += 1,
                    None => self.counters.rebound_unknown_conn += 1,
                }
                None
            }
            Control::Closed { .. } => {
                self.counters.closed_acks += 1;
                None
            }
            Control::Expired { conn_id } => {
                // The gateway freed the index already: forget it without a CLOSE.
                if self.forget(conn_id).is_some() {
                    self.counters.expired_by_gateway += 1;
                } else {
                    self.counters.expired_unknown_conn += 1;
                }
                None
            }
            Control::HelloAck { boot, .. } => {
                if boot != self.boot {
                    self.counters.hello_ack_wrong_boot += 1;
                    return None;
                }
                let h = self.hellos.get_mut(&from.ip())?;
                if !h.acked {
                    h.acked = true;
                    self.counters.hello_acked += 1;
                    // REGISTERs held for this gateway's HELLO go out at the next timer.
                    let held: Vec<u64> = self
                        .pending
                        .iter()
                        .filter(|(_, p)| p.gateway.ip() == from.ip())
                        .map(|(r, _)| *r)
                        .collect();
                    for request in held {
                        let t = self.register_msg(now, request);
                        self.deferred.push(t);
                    }
                }
                None
            }
            Control::EpochKeys {
                epoch, ref entries, ..
            } => {
                self.on_epoch_keys(now, from, epoch, entries);
                None
            }
            Control::Register { .. }
            | Control::Close { .. }
            | Control::Hello { .. }
            | Control::KeysDelivered { .. } => {
                self.counters.control_unexpected += 1;
                None
            }
        }
    }

    /// Is `request` outstanding, for this `conn_id`?
    fn is_pending(&self, request: u64, conn_id: u64) -> bool {
        self.pending
            .get(&request)
            .is_some_and(|p| p.conn_id == conn_id)
    }

    fn give_up(&mut self, request: u64) {
        if let Some(p) = self.pending.remove(&request) {
            self.pending_ids.remove(&p.conn_id);
            if let Some(e) = self.nonces.get_mut(&p.nonce) {
                e.state = NonceState::Spent;
            }
        }
    }

    /// Forgets a connection and tells its gateway: the CLOSE waits for `poll_transmit`.
    /// False if the connection is unknown.
    pub fn close(&mut self, now: Ticks, conn_id: u64) -> bool {
        let Some(t) = self.close_msg(now, conn_id) else {
            return false;
        };
        self.queue.push_back(t);
        true
    }

    /// Forgets a connection and returns its CLOSE. `None` if it is unknown.
    fn close_msg(&mut self, now: Ticks, conn_id: u64) -> Option<Transmit> {
        let conn = self.forget(conn_id)?;
        let request = self.next_request;
        self.next_request = self.next_request.wrapping_add(1);
        self.counters.closes_sent += 1;
        Some(Transmit {
            to: conn.gateway,
            payload: Control::Close {
                boot: self.boot,
                request,
                conn_id,
            }
            .seal(&self.link, now),
        })
    }

    /// Drops a connection from the core's maps.
    fn forget(&mut self, conn_id: u64) -> Option<Conn> {
        let conn = self.conns.remove(&conn_id)?;
        self.push_event(HostEvent::Closed { conn_id });
        if let Some(held) = self.by_client.get_mut(&conn.client_id) {
            held.retain(|c| *c != conn_id);
            if held.is_empty() {
                self.by_client.remove(&conn.client_id);
            }
        }
        Some(conn)
    }

    // --- Timers ----------------------------------------------------------------------------

    /// The earliest time [`HostCore::handle_timeout`] has work (a REGISTER retry or give-up).
    /// Output already waiting is not a timer: drain [`HostCore::poll_transmit`].
    pub fn poll_timeout(&self) -> Option<Ticks> {
        if !self.deferred.is_empty() {
            return Some(Ticks(0));
        }
        let hellos = self.hellos.values().filter(|h| !h.acked).map(|h| h.next);
        self.pending
            .values()
            .map(|p| p.retry_at)
            .chain(hellos)
            .chain(self.keys_timeout())
            .min()
    }

    /// Resends overdue REGISTERs, gives up on those sent `register_tries` times, and expires
    /// old nonces and kept replies. Call at [`HostCore::poll_timeout`] or periodically; the
    /// output waits for [`HostCore::poll_transmit`].
    pub fn handle_timeout(&mut self, now: Ticks) {
        self.park_echo();
        self.expire(now);
        let mut out = std::mem::take(&mut self.deferred);
        let gateways: Vec<IpAddr> = self.hellos.keys().copied().collect();
        for g in gateways {
            out.extend(self.hello_msg(now, g));
        }
        self.close_idle(now, &mut out);
        self.resend_keys(now);
        self.flush_keys_report(now);
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.retry_at <= now)
            .map(|(r, _)| *r)
            .collect();
        for request in due {
            let p = self.pending.get_mut(&request).expect("due request");
            if p.sent >= self.cfg.register_tries {
                self.give_up(request);
                self.counters.register_timeouts += 1;
                continue;
            }
            p.sent += 1;
            p.retry_at = now.saturating_add(self.cfg.register_retry);
            let gateway = p.gateway.ip();
            if self.hello_acked_by(gateway) {
                self.counters.register_retransmits += 1;
                out.push(self.register_msg(now, request));
            }
        }
        self.queue.extend(out);
    }

    /// Closes a connection its client no longer uses, at the next `handle_timeout`.
    fn replace(&mut self, now: Ticks, conn_id: u64) {
        if let Some(close) = self.close_msg(now, conn_id) {
            self.counters.connections_replaced += 1;
            self.deferred.push(close);
        }
    }

    /// Closes connections without DATA for `idle_timeout`; scans at most every 10 s.
    fn close_idle(&mut self, now: Ticks, out: &mut Vec<Transmit>) {
        if now.0
            < self
                .last_idle_scan
                .0
                .saturating_add(duration_ticks(Duration::from_secs(10)))
        {
            return;
        }
        self.last_idle_scan = now;
        let idle = duration_ticks(self.cfg.idle_timeout);
        let stale: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| now.0.saturating_sub(c.last_active.0) > idle)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(t) = self.close_msg(now, id) {
                self.counters.idle_closed += 1;
                out.push(t);
            }
        }
    }

    /// One fewer remembered nonce for `client_id`.
    fn release_nonce(&mut self, client_id: [u8; 16]) {
        if let Some(n) = self.nonces_per_client.get_mut(&client_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.nonces_per_client.remove(&client_id);
            }
        }
    }

    fn expire(&mut self, now: Ticks) {
        while let Some(&(until, nonce)) = self.reply_queue.front() {
            if until > now {
                break;
            }
            self.reply_queue.pop_front();
            if let Some(e) = self.nonces.get_mut(&nonce)
                && matches!(&e.state, NonceState::Replied { keep_until, .. } if *keep_until <= now)
            {
                e.state = NonceState::Spent;
            }
        }
        while let Some(&(until, nonce)) = self.nonce_queue.front() {
            if until > now {
                break;
            }
            self.nonce_queue.pop_front();
            let done = self
                .nonces
                .get(&nonce)
                .is_some_and(|e| e.expires <= now && !matches!(e.state, NonceState::Pending));
            if done {
                if let Some(e) = self.nonces.remove(&nonce) {
                    self.release_nonce(e.client_id);
                }
            } else if self.nonces.contains_key(&nonce) {
                // Still pending or not yet expired (clock moved back): look again later.
                self.nonce_queue.push_back((
                    Ticks(
                        now.0
                            .saturating_add(duration_ticks(self.cfg.handshake_window)),
                    ),
                    nonce,
                ));
                break;
            }
        }
    }
}
