//! The client library's sans-IO state machine (PROTOCOL.md §5–7), in the quinn-proto style:
//! it never touches a socket or a clock. The driver feeds received datagrams to
//! [`Client::handle`], sends whatever [`Client::poll_transmit`] writes, sleeps until
//! [`Client::poll_timeout`] and then calls [`Client::handle_timeout`], and reads
//! [`Client::poll_event`] and [`Client::poll_received`].
//!
//! Design notes:
//! - **Time.** Every call takes `now` as [`Ticks`], the crate's one time type (the gateway and
//!   host cores take it too; see docs/architecture.md, "Sans-IO cores"). It is the client's
//!   clock: timers run on it and the HANDSHAKE carries it as the client ticks (§7), so the
//!   core never reads a clock. A driver maps its monotonic clock onto ticks at the edge
//!   (wall clock at start plus elapsed time, as [`socket`] does).
//! - **UNRECOGNIZED is only a hint** (§5). It never tears the connection down: it starts (or
//!   feeds) a rebind, DATA keeps flowing in both directions meanwhile, and a rebind that
//!   times out while authenticated packets were still arriving is abandoned (back to
//!   `Connected`, [`ClientEvent::RebindAbandoned`]) instead of failing the connection. Only a
//!   rebind that times out with the path silent ends it: the gateway no longer knows us (a
//!   NAT move it never saw acknowledged, or a key rotation whose whole grace period we
//!   missed), so the client handshakes again by itself with its credentials
//!   ([`ClientEvent::Reconnecting`], `Handshaking`, then `Connected` with a new conn_id,
//!   keys and epoch; DATA queued for the dead connection is dropped). That handshake retries
//!   until the path returns (backing off to `rehandshake_backoff_max`), unless
//!   `rehandshake_deadline` bounds it: then its timing out fails the client. With `rehandshake_after_failed_rebind: false` the rebind
//!   timeout fails it instead ([`ClientError::RebindTimeout`]) and the application decides.
//! - **REBIND** (§6) uses the newest UNRECOGNIZED received, with fresh nonces on every try. The
//!   session keys of the last [`MAX_REBIND_ATTEMPTS`] tries are kept; a REBIND_ACK must open
//!   under one of them, carry that try's `t` and name our conn_id.
//! - **Pacing.** REBINDs and cookie requests draw from a token bucket (`rebind_burst`, then one
//!   per `rebind_pace`), so forged UNRECOGNIZEDs naming ever new tuples cannot make the client
//!   send one REBIND per packet; a try over the budget is postponed and then uses the newest
//!   UNRECOGNIZED.
//! - **Silent paths** (§6, cookie request): after `probe_after_unanswered` consecutive DATA
//!   sent with no authenticated packet received, and at least `probe_quiet` since the last one,
//!   the client sends a cookie request; [`Client::network_changed`] does so at once.
//! - **Keepalive** (§7) is DATA with 24 zero bytes. A received payload of exactly 24 zero bytes
//!   (the echo host's reply to a keepalive) is counted as a keepalive and not surfaced; an
//!   application should not send that payload itself.
//! - **Handshake retries** use a fresh client nonce each; the nonces of the last
//!   [`MAX_HANDSHAKE_ATTEMPTS`] tries are kept, so a late reply to any of them completes the
//!   handshake. (Each attempt that reaches the host registers a connection there; the host
//!   reaps the unused ones.)
//! - Anything that fails to parse or authenticate is dropped and counted in [`ClientStats`];
//!   nothing received can panic.
#![forbid(unsafe_code)]

pub mod socket;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use crate::crypto::Gcm;
use crate::crypto::gcm::SessionGcm;
use zeroize::Zeroizing;

use crate::crypto;
use crate::rebind::{self, RebindCredentials, RebindSecret};
use crate::replay::ReplayWindow;
use crate::time::Ticks;
use crate::wire::{
    self, ClientCredentials, DATA_OVERHEAD, DataView, MsgType, RebindAckView, Unrecognized,
};

/// Largest application payload that [`Client::send`] accepts.
pub const MAX_PAYLOAD: usize = 1200;
/// Largest datagram the client writes: a DATA with a full payload. Give
/// [`Client::poll_transmit`] a buffer at least this long.
pub const MAX_DATAGRAM_LEN: usize = MAX_PAYLOAD + DATA_OVERHEAD;
/// Keepalive payload length (§7): a 49-byte DATA.
pub const KEEPALIVE_PAYLOAD_LEN: usize = 24;
/// Handshake attempts whose nonces are remembered.
pub const MAX_HANDSHAKE_ATTEMPTS: usize = 8;
/// REBIND attempts whose session keys are remembered.
pub const MAX_REBIND_ATTEMPTS: usize = 8;
/// Application payloads queued for sending before [`SendError::QueueFull`].
pub const SEND_QUEUE_LIMIT: usize = 1024;
/// Received payloads held for [`Client::poll_received`]; newer ones are dropped beyond this.
pub const RECV_QUEUE_LIMIT: usize = 1024;

/// Client timers and thresholds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// Send a keepalive when nothing was sent for this long.
    pub keepalive: Duration,
    /// First HANDSHAKE retry delay; doubles up to `handshake_backoff_max`.
    pub handshake_backoff: Duration,
    pub handshake_backoff_max: Duration,
    /// Give up the handshake this long after it started.
    pub handshake_deadline: Duration,
    /// First REBIND (or cookie request) retry delay; doubles up to `rebind_backoff_max`.
    pub rebind_backoff: Duration,
    pub rebind_backoff_max: Duration,
    /// Give up a rebind this long after it started.
    pub rebind_deadline: Duration,
    /// REBINDs and cookie requests are paced by a token bucket: `rebind_burst` at once, then
    /// one per `rebind_pace`, however many UNRECOGNIZEDs arrive (a forged UNRECOGNIZED is 33
    /// bytes, a REBIND 50 + 16·S). One over the budget is postponed, and then built from the
    /// newest UNRECOGNIZED.
    pub rebind_pace: Duration,
    /// Tokens the bucket holds: enough for a cookie request, its REBIND and one more for a
    /// tuple that moves again, so a real rebind is never delayed.
    pub rebind_burst: u32,
    /// Consecutive DATA sent without an authenticated answer before a cookie request.
    pub probe_after_unanswered: u32,
    /// ... and at least this long since the last authenticated packet.
    pub probe_quiet: Duration,
    /// When a rebind runs out with the path silent (the gateway no longer knows us, e.g.
    /// the client missed a key rotation's whole grace period), start a fresh handshake with
    /// our credentials ([`ClientEvent::Reconnecting`], then `Connected` with a new
    /// connection) instead of failing with [`ClientError::RebindTimeout`]. Only a
    /// handshake that itself times out then fails the client. `false`: the client fails,
    /// and the application decides.
    pub rehandshake_after_failed_rebind: bool,
    /// How long that fresh handshake may try. `None` (the default): until it connects, its
    /// retries backing off to `rehandshake_backoff_max`: a client that is offline for a long
    /// time comes back by itself once its network does (a HANDSHAKE is 640 bytes).
    pub rehandshake_deadline: Option<Duration>,
    pub rehandshake_backoff_max: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            keepalive: Duration::from_secs(10),
            handshake_backoff: Duration::from_millis(250),
            handshake_backoff_max: Duration::from_secs(4),
            handshake_deadline: Duration::from_secs(20),
            rebind_backoff: Duration::from_millis(200),
            rebind_backoff_max: Duration::from_secs(2),
            rebind_deadline: Duration::from_secs(30),
            // About one round trip; at most 10 REBINDs/s (3 KB/s at S = 16) after the burst.
            rebind_pace: Duration::from_millis(100),
            rebind_burst: 3,
            probe_after_unanswered: 3,
            probe_quiet: Duration::from_secs(1),
            rehandshake_after_failed_rebind: true,
            rehandshake_deadline: None,
            rehandshake_backoff_max: Duration::from_secs(30),
        }
    }
}

/// Where the connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientState {
    Handshaking,
    Connected,
    /// Connected, and a rebind is in progress; DATA still flows.
    Rebinding,
    Failed(ClientError),
}

/// Why the connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("no valid HANDSHAKE_REPLY within the handshake deadline")]
    HandshakeTimeout,
    #[error("no REBIND_ACK within the rebind deadline, and the path stayed silent")]
    RebindTimeout,
}

/// Why [`Client::send`] refused a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("not connected (handshake pending or connection failed)")]
    NotConnected,
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("send queue full ({0} payloads); poll_transmit to drain it")]
    QueueFull(usize),
}

/// What started a rebind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebindReason {
    /// The gateway answered UNRECOGNIZED.
    Unrecognized,
    /// Sent packets went unanswered; a cookie request went out.
    Unanswered,
    /// The application reported a network change; a cookie request went out.
    NetworkChanged,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    Connected {
        conn_id: u64,
    },
    Rebinding {
        reason: RebindReason,
    },
    /// A REBIND_ACK arrived. `old_tuple` is the public tuple of the previous completed rebind
    /// (`None` before the first: the handshake does not reveal it); `new_tuple` is the tuple
    /// the gateway observed in the UNRECOGNIZED that the acknowledged REBIND answered.
    Rebound {
        conn_id: u64,
        old_tuple: Option<SocketAddr>,
        new_tuple: SocketAddr,
        took: Duration,
    },
    /// The rebind deadline passed without an ACK, but authenticated packets kept arriving,
    /// so the path works: the connection stays up.
    RebindAbandoned {
        took: Duration,
    },
    /// The connection is dead (`reason`, so far only [`ClientError::RebindTimeout`]) and the
    /// client handshakes again by itself (`rehandshake_after_failed_rebind`): the state is
    /// `Handshaking` until `Connected` names the new connection, or `Failed` if the
    /// handshake times out. Payloads queued for the dead connection are dropped; payloads
    /// already received stay readable.
    Reconnecting {
        reason: ClientError,
    },
    Failed(ClientError),
}

/// Counters; every dropped datagram lands in exactly one `dropped_*` counter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    pub handshakes_sent: u64,
    pub data_sent: u64,
    pub keepalives_sent: u64,
    pub data_received: u64,
    pub keepalives_received: u64,
    pub rebinds_sent: u64,
    pub cookie_requests_sent: u64,
    pub unrecognized_received: u64,
    pub rebinds_started: u64,
    pub rebinds_completed: u64,
    pub rebinds_abandoned: u64,
    /// Fresh handshakes started by the client itself after a rebind ran out
    /// ([`ClientEvent::Reconnecting`]); `handshakes_sent` counts their HANDSHAKEs too.
    pub rehandshakes: u64,
    /// REBINDs (or cookie requests) postponed by the pacing budget (`rebind_pace`); the
    /// UNRECOGNIZED that asked for one is kept as the newest and used when the budget allows.
    pub rebinds_paced: u64,
    /// Wrong type byte, bad length or bad layout.
    pub dropped_malformed: u64,
    /// AEAD failures and REBIND_ACKs that match no outstanding try.
    pub dropped_auth: u64,
    /// Authenticated DATA refused by the replay window.
    pub dropped_replay: u64,
    /// Valid but not expected now (a reply after connecting, an ACK with no rebind running,
    /// anything after failure, a type the gateway never sends to clients).
    pub dropped_unexpected: u64,
    /// UNRECOGNIZED naming another epoch byte than ours, or older than our last rebind.
    pub dropped_unrecognized: u64,
    /// Received payloads dropped because the receive queue was full.
    pub dropped_recv_queue_full: u64,
    /// Datagrams dropped because the `poll_transmit` buffer was too small.
    pub dropped_small_buffer: u64,
    /// KEYS (PROTOCOL-EXT.md "Key delivery") installed as the next epoch's keys.
    pub keys_installed: u64,
    /// KEYS_ACKs sent (re-acknowledgements of a retransmitted KEYS included).
    pub keys_acks_sent: u64,
    /// Switches to delivered keys, when an UNRECOGNIZED named their epoch.
    pub keys_switched: u64,
}

struct Handshake {
    /// Nonces of recent attempts, oldest first.
    nonces: VecDeque<[u8; 16]>,
    deadline: Ticks,
    next_retry: Ticks,
    backoff: Duration,
    backoff_max: Duration,
}

struct Session {
    conn_id: u64,
    epoch_byte: u8,
    index: u32,
    secret: RebindSecret,
    slot_keys: Zeroizing<Vec<[u8; 16]>>,
    c2s: Gcm,
    s2c: Gcm,
    send_seq: u64,
    window: ReplayWindow,
    /// Keys delivered in-band for the next epoch (PROTOCOL-EXT.md "Key delivery").
    next: Option<wire::NewKeys>,
    /// The highest KEYS `kseq` installed.
    keys_kseq: Option<u64>,
    /// The next KEYS_ACK `aseq`.
    ack_seq: u64,
}

struct RebindAttempt {
    t: Ticks,
    session: SessionGcm,
    observed: SocketAddr,
}

struct Rebind {
    started: Ticks,
    deadline: Ticks,
    next_retry: Ticks,
    backoff: Duration,
    newest: Option<Unrecognized>,
    attempts: VecDeque<RebindAttempt>,
    /// An authenticated packet arrived since the rebind started.
    path_alive: bool,
    /// A REBIND is owed as soon as the pacing budget allows.
    deferred: bool,
}

enum Phase {
    Handshaking(Handshake),
    Connected {
        session: Box<Session>,
        rebind: Option<Rebind>,
    },
    Failed(ClientError),
}

/// The client state machine. See the module docs.
pub struct Client {
    config: ClientConfig,
    creds: ClientCredentials,
    phase: Phase,
    /// Control datagrams (HANDSHAKE, REBIND, cookie request), sent before DATA.
    control: VecDeque<Vec<u8>>,
    send_queue: VecDeque<Vec<u8>>,
    keepalive_due: bool,
    recv_queue: VecDeque<Vec<u8>>,
    events: VecDeque<ClientEvent>,
    last_sent: Ticks,
    last_recv: Ticks,
    /// DATA sent since the last authenticated packet received.
    unanswered: u32,
    public_tuple: Option<SocketAddr>,
    /// `t` of the last acknowledged rebind.
    last_acked_t: Option<Ticks>,
    /// Paces REBINDs and cookie requests across rebinds.
    rebind_pacer: Pacer,
    stats: ClientStats,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("state", &self.state())
            .field("conn_id", &self.conn_id())
            .field("public_tuple", &self.public_tuple)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client that starts its handshake at `now` (client ticks: the HANDSHAKE carries them).
    pub fn new(config: ClientConfig, creds: ClientCredentials, now: Ticks) -> Client {
        let hs = Handshake {
            nonces: VecDeque::with_capacity(MAX_HANDSHAKE_ATTEMPTS),
            deadline: now + config.handshake_deadline,
            next_retry: now,
            backoff: config.handshake_backoff,
            backoff_max: config.handshake_backoff_max,
        };
        let rebind_pacer = Pacer::new(now, config.rebind_burst);
        let mut c = Client {
            config,
            creds,
            phase: Phase::Handshaking(hs),
            control: VecDeque::new(),
            send_queue: VecDeque::new(),
            keepalive_due: false,
            recv_queue: VecDeque::new(),
            events: VecDeque::new(),
            last_sent: now,
            last_recv: now,
            unanswered: 0,
            public_tuple: None,
            last_acked_t: None,
            rebind_pacer,
            stats: ClientStats::default(),
        };
        c.queue_handshake(now);
        c
    }

    pub fn state(&self) -> ClientState {
        match &self.phase {
            Phase::Handshaking(_) => ClientState::Handshaking,
            Phase::Connected { rebind: None, .. } => ClientState::Connected,
            Phase::Connected {
                rebind: Some(_), ..
            } => ClientState::Rebinding,
            Phase::Failed(e) => ClientState::Failed(*e),
        }
    }

    pub fn conn_id(&self) -> Option<u64> {
        self.session().map(|s| s.conn_id)
    }

    /// The connection index `x` issued by the gateway.
    pub fn index(&self) -> Option<u32> {
        self.session().map(|s| s.index)
    }

    /// S, the number of slot keys we hold.
    pub fn slots(&self) -> Option<usize> {
        self.session().map(|s| s.slot_keys.len())
    }

    /// Our public tuple as of the last completed rebind.
    pub fn public_tuple(&self) -> Option<SocketAddr> {
        self.public_tuple
    }

    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// Completed rebinds.
    pub fn rebinds(&self) -> u64 {
        self.stats.rebinds_completed
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// The next application payload received (authenticated, not replayed), in arrival order.
    pub fn poll_received(&mut self) -> Option<Vec<u8>> {
        self.recv_queue.pop_front()
    }

    /// Queues `payload` as DATA. Allowed while connected, rebinding included: the gateway
    /// forwards it if it still knows our tuple, and answers UNRECOGNIZED otherwise, which
    /// feeds the rebind.
    pub fn send(&mut self, payload: &[u8]) -> Result<(), SendError> {
        if self.session().is_none() {
            return Err(SendError::NotConnected);
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(SendError::TooLarge {
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        if self.send_queue.len() >= SEND_QUEUE_LIMIT {
            return Err(SendError::QueueFull(SEND_QUEUE_LIMIT));
        }
        self.send_queue.push_back(payload.to_vec());
        Ok(())
    }

    /// The application knows its network changed: send a cookie request now (§6).
    pub fn network_changed(&mut self, now: Ticks) {
        if self.session().is_some() {
            self.start_rebind(now, RebindReason::NetworkChanged, None);
        }
    }

    /// Feeds one datagram received from the gateway.
    pub fn handle(&mut self, now: Ticks, datagram: &[u8]) {
        self.stats.datagrams_received += 1;
        if matches!(self.phase, Phase::Failed(_)) {
            self.stats.dropped_unexpected += 1;
            return;
        }
        if datagram.first() == Some(&wire::KEYS_TYPE) {
            return self.on_keys(datagram);
        }
        match MsgType::of(datagram) {
            Ok(MsgType::HandshakeReply) => self.on_handshake_reply(now, datagram),
            Ok(MsgType::Data) => self.on_data(now, datagram),
            Ok(MsgType::Unrecognized) => self.on_unrecognized(now, datagram),
            Ok(MsgType::RebindAck) => self.on_rebind_ack(now, datagram),
            Ok(MsgType::Handshake | MsgType::Rebind) => self.stats.dropped_unexpected += 1,
            Err(_) => self.stats.dropped_malformed += 1,
        }
    }

    /// Writes the next datagram to send into `buf` (at least [`MAX_DATAGRAM_LEN`] bytes) and
    /// returns its length. Control datagrams go first, then queued DATA, then a keepalive.
    pub fn poll_transmit(&mut self, now: Ticks, buf: &mut [u8]) -> Option<usize> {
        loop {
            if let Some(d) = self.control.pop_front() {
                let Some(out) = buf.get_mut(..d.len()) else {
                    self.stats.dropped_small_buffer += 1;
                    continue;
                };
                out.copy_from_slice(&d);
                self.sent(now);
                return Some(d.len());
            }
            let Phase::Connected { session, .. } = &mut self.phase else {
                return None;
            };
            let (payload, keepalive) = if let Some(p) = self.send_queue.pop_front() {
                (p, false)
            } else if self.keepalive_due {
                self.keepalive_due = false;
                (vec![0u8; KEEPALIVE_PAYLOAD_LEN], true)
            } else {
                return None;
            };
            if buf.len() < payload.len() + DATA_OVERHEAD {
                self.stats.dropped_small_buffer += 1;
                continue;
            }
            let n = wire::seal_data(&session.c2s, session.send_seq, &payload, buf);
            session.send_seq += 1;
            if keepalive {
                self.stats.keepalives_sent += 1;
            } else {
                self.stats.data_sent += 1;
            }
            self.unanswered = self.unanswered.saturating_add(1);
            self.sent(now);
            self.maybe_probe(now);
            return Some(n);
        }
    }

    /// The next instant at which [`Client::handle_timeout`] must run.
    pub fn poll_timeout(&self) -> Option<Ticks> {
        match &self.phase {
            Phase::Failed(_) => None,
            Phase::Handshaking(hs) => Some(hs.next_retry.min(hs.deadline)),
            Phase::Connected { rebind, .. } => {
                let mut t = self.last_sent + self.config.keepalive;
                if let Some(r) = rebind {
                    t = t.min(r.next_retry).min(r.deadline);
                    if r.deferred {
                        t = t.min(self.rebind_pacer.ready_at(self.config.rebind_pace));
                    }
                } else if self.unanswered >= self.config.probe_after_unanswered {
                    t = t.min(self.last_recv + self.config.probe_quiet);
                }
                Some(t)
            }
        }
    }

    /// Runs the timers that expired at `now`.
    pub fn handle_timeout(&mut self, now: Ticks) {
        match &mut self.phase {
            Phase::Failed(_) => {}
            Phase::Handshaking(hs) => {
                if now >= hs.deadline {
                    self.fail(ClientError::HandshakeTimeout);
                } else if now >= hs.next_retry {
                    self.queue_handshake(now);
                }
            }
            Phase::Connected { rebind, .. } => {
                if let Some(r) = rebind {
                    if now >= r.deadline {
                        if r.path_alive {
                            let took = now.since(r.started);
                            *rebind = None;
                            self.stats.rebinds_abandoned += 1;
                            self.events.push_back(ClientEvent::RebindAbandoned { took });
                        } else if self.config.rehandshake_after_failed_rebind {
                            self.rehandshake(now, ClientError::RebindTimeout);
                            return;
                        } else {
                            self.fail(ClientError::RebindTimeout);
                            return;
                        }
                    } else if now >= r.next_retry {
                        r.next_retry = now + r.backoff;
                        r.backoff = (r.backoff * 2).min(self.config.rebind_backoff_max);
                        self.paced_rebind_try(now);
                    } else if r.deferred
                        && now >= self.rebind_pacer.ready_at(self.config.rebind_pace)
                    {
                        self.paced_rebind_try(now);
                    }
                }
                if now >= self.last_sent + self.config.keepalive
                    && self.send_queue.is_empty()
                    && self.control.is_empty()
                {
                    self.keepalive_due = true;
                }
                self.maybe_probe(now);
            }
        }
    }

    // ---- internals ----

    fn session(&self) -> Option<&Session> {
        match &self.phase {
            Phase::Connected { session, .. } => Some(session),
            _ => None,
        }
    }

    fn sent(&mut self, now: Ticks) {
        self.stats.datagrams_sent += 1;
        self.last_sent = now;
    }

    /// An authenticated packet arrived: the path works.
    fn answered(&mut self, now: Ticks) {
        self.unanswered = 0;
        self.last_recv = now;
        if let Phase::Connected {
            rebind: Some(r), ..
        } = &mut self.phase
        {
            r.path_alive = true;
        }
    }

    fn fail(&mut self, e: ClientError) {
        self.phase = Phase::Failed(e);
        self.control.clear();
        self.send_queue.clear();
        self.keepalive_due = false;
        self.events.push_back(ClientEvent::Failed(e));
    }

    /// The connection is dead: forget its session (keys, delivered next-epoch keys, rebind
    /// state, queued DATA) and handshake again with our credentials, as [`Client::new`] does.
    fn rehandshake(&mut self, now: Ticks, reason: ClientError) {
        self.phase = Phase::Handshaking(Handshake {
            nonces: VecDeque::with_capacity(MAX_HANDSHAKE_ATTEMPTS),
            deadline: self
                .config
                .rehandshake_deadline
                .map_or(Ticks(u64::MAX), |d| now + d),
            next_retry: now,
            backoff: self.config.handshake_backoff,
            backoff_max: self.config.rehandshake_backoff_max,
        });
        // Rebind tries and KEYS_ACKs of the old session, and DATA queued for it (sealed
        // under its keys once sent, so the host could not even read it): dropped.
        self.control.clear();
        self.send_queue.clear();
        self.keepalive_due = false;
        self.unanswered = 0;
        self.last_recv = now;
        // A new connection: no rebind of it has completed yet.
        self.public_tuple = None;
        self.last_acked_t = None;
        self.stats.rehandshakes += 1;
        self.events.push_back(ClientEvent::Reconnecting { reason });
        self.queue_handshake(now);
    }

    fn queue_handshake(&mut self, now: Ticks) {
        let ticks = now;
        let Phase::Handshaking(hs) = &mut self.phase else {
            return;
        };
        let nonce: [u8; 16] = crypto::random_array();
        if hs.nonces.len() == MAX_HANDSHAKE_ATTEMPTS {
            hs.nonces.pop_front();
        }
        hs.nonces.push_back(nonce);
        hs.next_retry = now + hs.backoff;
        hs.backoff = (hs.backoff * 2).min(hs.backoff_max);
        let d = wire::build_handshake(&self.creds, &nonce, ticks);
        self.control.push_back(d.to_vec());
        self.stats.handshakes_sent += 1;
    }

    fn on_handshake_reply(&mut self, now: Ticks, datagram: &[u8]) {
        let Phase::Handshaking(hs) = &self.phase else {
            self.stats.dropped_unexpected += 1;
            return;
        };
        // The nonce is compared before any crypto, so trying every kept nonce is cheap.
        let reply = hs
            .nonces
            .iter()
            .rev()
            .map(|n| wire::open_handshake_reply(datagram, &self.creds.psk, n))
            .find(|r| !matches!(r, Err(wire::ReplyError::OtherNonce)));
        let reply = match reply {
            Some(Ok(r)) => r,
            Some(Err(wire::ReplyError::Auth)) | None => {
                self.stats.dropped_auth += 1;
                return;
            }
            Some(Err(_)) => {
                self.stats.dropped_malformed += 1;
                return;
            }
        };
        let session = Session {
            conn_id: reply.conn_id,
            epoch_byte: reply.epoch_byte,
            index: reply.index,
            secret: RebindSecret(reply.rebind_secret),
            slot_keys: Zeroizing::new(reply.slot_keys.clone()),
            c2s: crypto::gcm(&reply.kd_c2s),
            s2c: crypto::gcm(&reply.kd_s2c),
            send_seq: 0,
            window: ReplayWindow::new(),
            next: None,
            keys_kseq: None,
            ack_seq: 0,
        };
        // Stale handshake retries must not go out after the reply.
        self.control.clear();
        self.phase = Phase::Connected {
            session: Box::new(session),
            rebind: None,
        };
        self.answered(now);
        self.events.push_back(ClientEvent::Connected {
            conn_id: reply.conn_id,
        });
    }

    fn on_data(&mut self, now: Ticks, datagram: &[u8]) {
        let Phase::Connected { session, .. } = &mut self.phase else {
            self.stats.dropped_unexpected += 1;
            return;
        };
        let Ok(view) = DataView::new_checked(datagram) else {
            self.stats.dropped_malformed += 1;
            return;
        };
        let mut payload = vec![0u8; view.payload_len()];
        if view.open(&session.s2c, &mut payload).is_err() {
            self.stats.dropped_auth += 1;
            return;
        }
        // Only after the AEAD: a forged seq must not move the window.
        if !session.window.accept(view.seq()) {
            self.stats.dropped_replay += 1;
            return;
        }
        self.answered(now);
        if payload.len() == KEEPALIVE_PAYLOAD_LEN && payload.iter().all(|b| *b == 0) {
            self.stats.keepalives_received += 1;
            return;
        }
        self.stats.data_received += 1;
        if self.recv_queue.len() >= RECV_QUEUE_LIMIT {
            self.stats.dropped_recv_queue_full += 1;
        } else {
            self.recv_queue.push_back(payload);
        }
    }

    fn on_unrecognized(&mut self, now: Ticks, datagram: &[u8]) {
        let Ok(u) = Unrecognized::parse(datagram) else {
            self.stats.dropped_malformed += 1;
            return;
        };
        self.stats.unrecognized_received += 1;
        let Some(epoch_byte) = self.session().map(|s| s.epoch_byte) else {
            // The gateway forwards handshakes whatever the tuple; nothing to do.
            self.stats.dropped_unexpected += 1;
            return;
        };
        // Our slot keys belong to our epoch: a REBIND under another epoch byte cannot verify.
        // An UNRECOGNIZED older than our last acknowledged rebind predates our binding.
        if u.epoch_byte != epoch_byte && self.switch_to_delivered_keys(u.epoch_byte) {
            self.start_rebind(now, RebindReason::Unrecognized, Some(u));
            return;
        }
        if u.epoch_byte != epoch_byte {
            self.stats.dropped_unrecognized += 1;
            // Delivered keys of an epoch between ours and the gateway's (it rotated again
            // before we used them): ours may be wiped, theirs is still accepted while the
            // newest epoch's grace lasts, so the cookie request names theirs.
            if let Some(next) = self
                .session()
                .and_then(|s| s.next.as_ref())
                .map(|n| n.epoch as u8)
            {
                self.switch_to_delivered_keys(next);
            }
            // The gateway moved to a new epoch (§6, 1.1): a cookie request naming ours draws
            // an UNRECOGNIZED of our epoch while its grace period lasts. After it, the rebind
            // runs out and the client fails over to a new handshake.
            if matches!(self.phase, Phase::Connected { rebind: None, .. }) {
                self.start_rebind(now, RebindReason::Unrecognized, None);
            }
            return;
        }
        if self.last_acked_t.is_some_and(|l| u.t <= l) {
            self.stats.dropped_unrecognized += 1;
            return;
        }
        self.start_rebind(now, RebindReason::Unrecognized, Some(u));
    }

    /// A KEYS from the host (PROTOCOL-EXT.md "Key delivery"): installs a newer one as the
    /// next epoch's keys and acknowledges it; a retransmission is acknowledged again; an
    /// older or forged one is dropped.
    fn on_keys(&mut self, datagram: &[u8]) {
        let Phase::Connected { session, .. } = &mut self.phase else {
            self.stats.dropped_unexpected += 1;
            return;
        };
        let (kseq, keys) = match wire::open_keys(&session.s2c, datagram) {
            Ok(k) => k,
            Err(wire::DeliveryError::Auth) => {
                self.stats.dropped_auth += 1;
                return;
            }
            Err(wire::DeliveryError::Malformed(_)) => {
                self.stats.dropped_malformed += 1;
                return;
            }
        };
        match session.keys_kseq {
            Some(k) if kseq < k => {
                self.stats.dropped_replay += 1;
                return;
            }
            Some(k) if kseq == k => {}
            _ => {
                if keys.slot_keys.len() != session.slot_keys.len()
                    || keys.epoch as u8 == session.epoch_byte
                {
                    // S never changes, and keys for our own epoch make no sense.
                    self.stats.dropped_malformed += 1;
                    return;
                }
                session.keys_kseq = Some(kseq);
                session.next = Some(keys.clone());
                self.stats.keys_installed += 1;
            }
        }
        let mut ack = vec![0u8; wire::KEYS_ACK_LEN];
        wire::seal_keys_ack(&session.c2s, session.ack_seq, keys.epoch, kseq, &mut ack);
        session.ack_seq += 1;
        self.control.push_back(ack);
        self.stats.keys_acks_sent += 1;
    }

    /// Makes the delivered keys of the epoch named by `epoch_byte` ours, if we hold them.
    fn switch_to_delivered_keys(&mut self, epoch_byte: u8) -> bool {
        let Phase::Connected { session, rebind } = &mut self.phase else {
            return false;
        };
        let Some(n) = session.next.take_if(|n| n.epoch as u8 == epoch_byte) else {
            return false;
        };
        session.epoch_byte = epoch_byte;
        session.index = n.index;
        session.secret = RebindSecret(n.rebind_secret);
        session.slot_keys = Zeroizing::new(n.slot_keys.clone());
        // Tries built with the old keys cannot be acknowledged any more.
        *rebind = None;
        self.stats.keys_switched += 1;
        true
    }

    /// Starts a rebind, or feeds the one in progress. With an UNRECOGNIZED it sends a REBIND
    /// at once if none went out yet in this rebind, or if the observed tuple moved since the
    /// last try; otherwise the retry timer uses it. Without one it sends a cookie request.
    fn start_rebind(&mut self, now: Ticks, reason: RebindReason, unrec: Option<Unrecognized>) {
        let Phase::Connected { rebind, .. } = &mut self.phase else {
            return;
        };
        let fresh = Rebind {
            started: now,
            deadline: now + self.config.rebind_deadline,
            next_retry: now + self.config.rebind_backoff,
            backoff: (self.config.rebind_backoff * 2).min(self.config.rebind_backoff_max),
            newest: None,
            attempts: VecDeque::with_capacity(MAX_REBIND_ATTEMPTS),
            path_alive: false,
            deferred: false,
        };
        let send_now = match (rebind.as_mut(), reason) {
            (Some(r), RebindReason::Unrecognized) => {
                let moved = r.attempts.back().map(|a| a.observed) != unrec.map(|u| u.observed);
                r.newest = unrec;
                r.attempts.is_empty() || moved
            }
            (Some(_), RebindReason::Unanswered) => false,
            _ => {
                // A new rebind, or a network change that makes earlier UNRECOGNIZEDs stale.
                let mut fresh = fresh;
                fresh.newest = unrec;
                *rebind = Some(fresh);
                self.stats.rebinds_started += 1;
                self.events.push_back(ClientEvent::Rebinding { reason });
                true
            }
        };
        if send_now {
            self.paced_rebind_try(now);
        }
    }

    /// Sends a rebind try now if the pacing budget allows, and otherwise owes one
    /// (`deferred`) for [`Client::handle_timeout`]. However many UNRECOGNIZEDs arrive, the
    /// client sends at most `rebind_burst` plus one REBIND per `rebind_pace`.
    fn paced_rebind_try(&mut self, now: Ticks) {
        let Phase::Connected {
            rebind: Some(r), ..
        } = &mut self.phase
        else {
            return;
        };
        let (pace, burst) = (self.config.rebind_pace, self.config.rebind_burst);
        if !self.rebind_pacer.take(now, pace, burst) {
            r.deferred = true;
            self.stats.rebinds_paced += 1;
            return;
        }
        r.deferred = false;
        self.queue_rebind_try();
    }

    /// Queues a REBIND from the newest UNRECOGNIZED with fresh nonces, or a cookie request if
    /// none has arrived yet.
    fn queue_rebind_try(&mut self) {
        let Phase::Connected {
            session,
            rebind: Some(r),
        } = &mut self.phase
        else {
            return;
        };
        let slots = session.slot_keys.len();
        let Some(u) = r.newest else {
            self.control
                .push_back(rebind::cookie_request_for(slots, session.epoch_byte));
            self.stats.cookie_requests_sent += 1;
            return;
        };
        let creds = RebindCredentials {
            conn_id: session.conn_id,
            secret: &session.secret,
            slot_keys: &session.slot_keys,
        };
        let nonces = Zeroizing::new(rebind::fresh_nonces(slots));
        let (datagram, key) = rebind::build_rebind(&creds, u.epoch_byte, u.t, &u.cookie, &nonces);
        if r.attempts.len() == MAX_REBIND_ATTEMPTS {
            r.attempts.pop_front();
        }
        r.attempts.push_back(RebindAttempt {
            t: u.t,
            session: key,
            observed: u.observed,
        });
        self.control.push_back(datagram);
        self.stats.rebinds_sent += 1;
    }

    fn on_rebind_ack(&mut self, now: Ticks, datagram: &[u8]) {
        let Ok(view) = RebindAckView::new_checked(datagram) else {
            self.stats.dropped_malformed += 1;
            return;
        };
        let Phase::Connected { session, rebind } = &mut self.phase else {
            self.stats.dropped_unexpected += 1;
            return;
        };
        let Some(r) = rebind.as_ref() else {
            // A duplicate ACK after the rebind completed, or one nobody asked for.
            self.stats.dropped_unexpected += 1;
            return;
        };
        let t = view.t();
        let conn_id = session.conn_id;
        let hit = r
            .attempts
            .iter()
            .rev()
            .filter(|a| a.t == t)
            .find(|a| view.open(&a.session) == Ok(conn_id));
        let Some(a) = hit else {
            self.stats.dropped_auth += 1;
            return;
        };
        let new_tuple = a.observed;
        let took = now.since(r.started);
        *rebind = None;
        let old_tuple = self.public_tuple.replace(new_tuple);
        self.last_acked_t = Some(t);
        self.stats.rebinds_completed += 1;
        // Pending retries of this rebind are moot.
        self.control
            .retain(|d| d.first() != Some(&(MsgType::Rebind as u8)));
        self.answered(now);
        self.events.push_back(ClientEvent::Rebound {
            conn_id,
            old_tuple,
            new_tuple,
            took,
        });
    }

    /// Sends a cookie request when enough DATA went unanswered for long enough (§6).
    fn maybe_probe(&mut self, now: Ticks) {
        let Phase::Connected { rebind: None, .. } = self.phase else {
            return;
        };
        if self.unanswered >= self.config.probe_after_unanswered
            && now.since(self.last_recv) >= self.config.probe_quiet
        {
            self.start_rebind(now, RebindReason::Unanswered, None);
        }
    }
}

/// A token bucket over [`Ticks`]: up to `burst` tokens, one more every `pace`.
#[derive(Clone, Copy, Debug)]
struct Pacer {
    tokens: u32,
    /// Tokens are counted as refilled up to this instant.
    refilled_at: Ticks,
}

impl Pacer {
    fn new(now: Ticks, burst: u32) -> Pacer {
        Pacer {
            tokens: burst,
            refilled_at: now,
        }
    }

    fn refill(&mut self, now: Ticks, pace: Duration, burst: u32) {
        if self.tokens >= burst || pace.is_zero() {
            self.tokens = burst;
            self.refilled_at = now;
            return;
        }
        let elapsed = now.since(self.refilled_at);
        let earned = elapsed.as_nanos() / pace.as_nanos();
        if earned == 0 {
            return;
        }
        let earned = u32::try_from(earned).unwrap_or(u32::MAX);
        self.tokens = self.tokens.saturating_add(earned).min(burst);
        // Keep the fraction of a token already earned, unless the bucket is full.
        self.refilled_at = if self.tokens >= burst {
            now
        } else {
            self.refilled_at + pace * earned
        };
    }

    /// Takes a token if one is available at `now`.
    fn take(&mut self, now: Ticks, pace: Duration, burst: u32) -> bool {
        self.refill(now, pace, burst);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// When the next token is available (now or in the past if one already is).
    fn ready_at(&self, pace: Duration) -> Ticks {
        if self.tokens > 0 {
            self.refilled_at
        } else {
            self.refilled_at + pace
        }
    }
}

#[cfg(test)]
mod tests {
    //! The pacer alone; the client's protocol behaviour is tested against the real gateway
    //! and host cores in `tests/sim_client.rs`.

    use super::*;

    const BASE_TICKS: Ticks = Ticks(639_028_224_000_000_000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn pacer_allows_a_burst_then_one_per_pace() {
        let t0 = BASE_TICKS;
        let pace = ms(100);
        let mut p = Pacer::new(t0, 3);
        assert!((0..3).all(|_| p.take(t0, pace, 3)));
        assert!(!p.take(t0, pace, 3));
        assert_eq!(p.ready_at(pace), t0 + pace);
        assert!(!p.take(t0 + ms(99), pace, 3));
        assert!(p.take(t0 + ms(150), pace, 3));
        // The 50 ms already earned towards the next token are kept.
        assert!(!p.take(t0 + ms(199), pace, 3));
        assert!(p.take(t0 + ms(200), pace, 3));
        // A long quiet spell refills to the burst, no more.
        let later = t0 + Duration::from_secs(10);
        assert!((0..3).all(|_| p.take(later, pace, 3)));
        assert!(!p.take(later, pace, 3));
    }
}
