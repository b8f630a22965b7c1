//! One driver thread: a shard of clients, each a [`Client`] with its own nonblocking UDP
//! socket, multiplexed by one `epoll` instance, with a binary heap of client deadlines.
//!
//! Per loop iteration the work is proportional to what happened (ready sockets, expired
//! timers, packets due), never to the number of clients:
//! - ready sockets come from `epoll` (token = slot number);
//! - deadlines sit in a min-heap with lazy deletion: a slot remembers the deadline it has in
//!   the heap, an entry that no longer matches is skipped, and a deadline that moves later
//!   is left in place (it fires early, finds nothing due, and is re-pushed);
//! - open-loop load and churn are token pacers against the measured phase's start, and pick
//!   clients with a round-robin cursor (load) or at random (churn);
//! - a storm moves every client, 64 per iteration, so the loop keeps serving sockets (the
//!   replies to the first moves are read while later moves are still being made).
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use rebindgw::client::{Client, ClientError, ClientEvent, ClientState, MAX_DATAGRAM_LEN};
use rebindgw::time::{TickClock, Ticks};
use rebindgw::wire::ClientCredentials;

use super::addrs::AddrPool;
use super::options::{KICK_EVERY, LoadMode, LoadgenOptions, MoveKind, OnMove};
use super::report::{Counters, LatencyHist, RotationStat, StormStat};
use super::stamp::{STAMP_LEN, Stamp};
use super::sys::{Epoll, Events, monotonic_ns};

/// Network-change notices this process received (SIGUSR1, see [`notice_network_change`]).
static NETWORK_NOTICES: AtomicU64 = AtomicU64::new(0);

/// Tells every shard of this process that its clients' network changed in a way they cannot
/// see (a NAT rebind): each connected client then acts as `--on-move` says at once. A test
/// driver that moves the clients itself sends SIGUSR1, as an OS would send a network-change
/// notice, so that all clients rebind at once instead of at their next datagram.
pub fn notice_network_change() {
    NETWORK_NOTICES.fetch_add(1, Relaxed);
}

pub const PHASE_CONNECT: u8 = 0;
pub const PHASE_RUN: u8 = 1;
pub const PHASE_SETTLE: u8 = 2;
pub const PHASE_DRAIN: u8 = 3;
pub const PHASE_STOP: u8 = 4;

/// Storm moves per loop iteration.
const STORM_CHUNK: usize = 64;
/// Datagrams read from one socket per wake-up.
const RECV_PER_WAKE: usize = 64;
/// Open-loop sends per loop iteration (the rest waits for the next iteration).
const SENDS_PER_ITER: u64 = 1024;
/// Handshakes started per loop iteration.
const CREATES_PER_ITER: usize = 256;
/// Longest epoll wait, so phase changes are seen promptly.
const MAX_WAIT: Duration = Duration::from_millis(5);

/// State shared by the controller, the shards and the attacker.
pub struct Shared {
    pub phase: AtomicU8,
    /// The clock all stamps are relative to.
    pub base: Instant,
    /// Nanoseconds from `base` to the start of the measured phase (set before `PHASE_RUN`).
    pub run_start_ns: AtomicU64,
    pub progress: Vec<Progress>,
    /// REBINDs captured from real clients, for the replay attack.
    pub tap: Option<Mutex<VecDeque<Vec<u8>>>>,
    pub tapped: AtomicU64,
}

impl Shared {
    pub fn new(shards: usize, tap: bool) -> Shared {
        Shared {
            phase: AtomicU8::new(PHASE_CONNECT),
            base: Instant::now(),
            run_start_ns: AtomicU64::new(0),
            progress: (0..shards).map(|_| Progress::default()).collect(),
            tap: tap.then(|| Mutex::new(VecDeque::new())),
            tapped: AtomicU64::new(0),
        }
    }

    pub fn phase(&self) -> u8 {
        self.phase.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set_phase(&self, p: u8) {
        self.phase.store(p, std::sync::atomic::Ordering::Release);
    }

    pub fn run_start(&self) -> Instant {
        self.base + Duration::from_nanos(self.run_start_ns.load(Relaxed))
    }

    /// Microseconds since `base`, wrapping at 2^32 (the stamp clock).
    pub fn now_us(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.base).as_micros() as u32
    }

    /// Sum of one progress field over all shards.
    pub fn total(&self, f: impl Fn(&Progress) -> &AtomicU64) -> u64 {
        self.progress.iter().map(|p| f(p).load(Relaxed)).sum()
    }
}

/// Live counters of one shard, published every loop iteration.
#[derive(Default)]
pub struct Progress {
    pub created: AtomicU64,
    pub connected: AtomicU64,
    pub conn_failed: AtomicU64,
    pub failed_later: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub moves: AtomicU64,
    pub rebinds_ok: AtomicU64,
    pub rebinds_failed: AtomicU64,
    /// Moved clients not yet rebound.
    pub outages: AtomicU64,
    /// Clients a storm in progress has still to move.
    pub storm_pending: AtomicU64,
    /// p99 echo RTT (µs) over the last second.
    pub p99_us: AtomicU64,
    /// The phase whose work this shard has finished publishing (all counters include it).
    pub phase_seen: AtomicU8,
}

/// What a shard hands back when it stops.
#[derive(Clone, Debug, Default)]
pub struct ShardResult {
    pub counters: Counters,
    pub storms: Vec<StormStat>,
    pub rtt: LatencyHist,
    pub handshake: LatencyHist,
    pub recovery: LatencyHist,
    pub traffic_recovery: LatencyHist,
    /// One per `--rotate-at` time.
    pub rotations: Vec<RotationStat>,
}

/// Which clients a shard drives.
#[derive(Clone, Debug)]
pub struct ShardSpec {
    pub id: usize,
    pub shards: usize,
    /// Global number of this shard's first client (over all processes): it picks the
    /// client's source address and is stamped into its payloads.
    pub first: usize,
    pub creds: Vec<ClientCredentials>,
    /// Clients in this process (the shard's share of the rates is `creds.len()` of these).
    pub total_clients: usize,
    pub pool: AddrPool,
    /// Pool index of this shard's first moved-to address, and the step between its next
    /// ones: every shard of every process draws from its own residue class, past the
    /// addresses of all clients.
    pub move_next: u64,
    pub move_stride: u64,
}

struct Slot {
    client: Client,
    sock: UdpSocket,
    local: SocketAddr,
    gw: SocketAddr,
    /// When the current handshake started (`Client::new`, or the core's own re-handshake
    /// after a rebind ran out).
    created: Instant,
    up: bool,
    failed: bool,
    /// The core is handshaking again by itself (`ClientEvent::Reconnecting`): already
    /// counted in `failed_later`; its `Connected` counts in `reconnected`, not `connected`.
    reconnecting: bool,
    /// Moves so far (wrapping); stamped into payloads.
    gen_: u16,
    seq: u32,
    /// Payloads sent outside an outage in this generation, and their echoes received.
    gen_sent: u32,
    gen_echoed: u32,
    /// Moved and not yet rebound: since when.
    outage: Option<Instant>,
    /// Moved and no echo of a post-move packet yet: since when.
    traffic_outage: Option<Instant>,
    /// The deadline this slot has in the heap.
    timer: Option<Instant>,
    /// `OnMove::Send`: when to send DATA again if the rebind has not started by then.
    kick_at: Option<Instant>,
    /// The storm whose move began the current outage, if one did (or joined it).
    storm_no: Option<u32>,
    /// Closed loop: outstanding echo requests `(seq, sent)`, oldest first, and when the
    /// oldest is written off. A written-off request whose echo comes late is counted as
    /// received but frees no window space, so slow echoes cannot inflate the load.
    outstanding: VecDeque<(u32, Instant)>,
    app_deadline: Option<Instant>,
    /// Rotation mode: the client core's `keys_installed` and `keys_switched` when last
    /// looked at, the rotations (bit k: `--rotate-at` k) whose keys it installed and those
    /// it switched to, and the rotation of its latest installation.
    keys_seen: u64,
    switched_seen: u64,
    installed_rots: u64,
    switched_rots: u64,
    last_installed: Option<usize>,
}

/// A small, fast, non-cryptographic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        Rng(u64::from_le_bytes(rebindgw::crypto::random_array()) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

/// A nonblocking UDP socket bound to `addr`.
pub fn bind_client(addr: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
    if buffer > 0 {
        let _ = s.set_recv_buffer_size(buffer);
        let _ = s.set_send_buffer_size(buffer);
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Tokens due at `elapsed` for a pacer of `rate` per second.
fn tokens_due(rate: f64, elapsed: Duration) -> u64 {
    (rate * elapsed.as_secs_f64()) as u64
}

/// When token number `n` (0-based) falls due, as an offset.
fn token_time(rate: f64, n: u64) -> Duration {
    Duration::from_secs_f64(((n + 1) as f64 / rate).min(1e9))
}

pub struct Shard<'a> {
    spec: ShardSpec,
    opts: &'a LoadgenOptions,
    shared: &'a Shared,
    epoll: Epoll,
    slots: Vec<Slot>,
    heap: BinaryHeap<Reverse<(Instant, u32)>>,
    /// Maps `Instant`s onto the client cores' ticks.
    clock: TickClock,
    rng: Rng,
    buf: Vec<u8>,
    payload: Vec<u8>,
    c: Counters,
    rtt: LatencyHist,
    rtt_window: LatencyHist,
    handshake: LatencyHist,
    recovery: LatencyHist,
    traffic_recovery: LatencyHist,
    outages: u64,
    // pacing
    started: Instant,
    connect_rate: f64,
    load_rate: f64,
    churn_rate: f64,
    load_done: u64,
    churn_done: u64,
    cursor: usize,
    storms: Vec<Duration>,
    next_storm: usize,
    storm_cursor: Option<usize>,
    storm_stats: Vec<StormStat>,
    /// `storm_prebind`: each slot's bound, not yet watched, moved-to socket, the next slot
    /// to bind one for, and the replaced sockets waiting to be closed after the storm.
    spares: Vec<Option<(UdpSocket, SocketAddr)>>,
    prebind_cursor: usize,
    prebind_failed: bool,
    graveyard: Vec<UdpSocket>,
    next_addr: u64,
    phase: u8,
    run_start: Instant,
    last_window: Instant,
    /// Rotation mode: the `--rotate-at` offsets and what this shard saw of each.
    rotations: Vec<Duration>,
    rotation_stats: Vec<RotationStat>,
    /// `--rebound-log`: the file, the lines of this loop turn, and an `Instant` with its
    /// CLOCK_MONOTONIC reading.
    rebound_log: Option<ReboundLog>,
    /// [`NETWORK_NOTICES`] as this shard last acted on it.
    notices_seen: u64,
}

/// Every `Rebound` as `<client number> <CLOCK_MONOTONIC ns>`, written once per loop turn.
struct ReboundLog {
    file: std::fs::File,
    lines: String,
    base: Instant,
    base_ns: u64,
}

impl ReboundLog {
    fn open(path: &std::path::Path) -> io::Result<ReboundLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let base = Instant::now();
        Ok(ReboundLog {
            file,
            lines: String::new(),
            base,
            base_ns: monotonic_ns(),
        })
    }

    fn record(&mut self, client: usize, at: Instant) {
        use std::fmt::Write as _;
        let ns = self.base_ns + at.saturating_duration_since(self.base).as_nanos() as u64;
        let _ = writeln!(self.lines, "{client} {ns}");
    }

    /// One `write` per turn: with O_APPEND the processes sharing the file never split a line.
    fn flush(&mut self) -> io::Result<()> {
        if self.lines.is_empty() {
            return Ok(());
        }
        use std::io::Write as _;
        let r = self.file.write_all(self.lines.as_bytes());
        self.lines.clear();
        r
    }
}

impl<'a> Shard<'a> {
    pub fn new(spec: ShardSpec, opts: &'a LoadgenOptions, shared: &'a Shared) -> io::Result<Self> {
        let share = spec.creds.len() as f64 / spec.total_clients.max(1) as f64;
        let rebound_log = match &opts.rebound_log {
            Some(path) => Some(ReboundLog::open(path).map_err(|e| {
                io::Error::new(e.kind(), format!("--rebound-log {}: {e}", path.display()))
            })?),
            None => None,
        };
        let now = Instant::now();
        let load_rate = match opts.load {
            LoadMode::Open { rate } => rate * share,
            LoadMode::Closed { .. } => 0.0,
        };
        Ok(Shard {
            next_addr: spec.move_next,
            storm_stats: vec![StormStat::default(); opts.storm_times().len()],
            spares: Vec::new(),
            prebind_cursor: 0,
            prebind_failed: false,
            graveyard: Vec::new(),
            connect_rate: opts.connect_rate * share,
            load_rate,
            churn_rate: opts.churn_per_sec * share,
            storms: opts.storm_times(),
            slots: Vec::with_capacity(spec.creds.len()),
            spec,
            opts,
            shared,
            epoll: Epoll::new()?,
            heap: BinaryHeap::new(),
            clock: TickClock::new(shared.base, Ticks::wall_clock()),
            rng: Rng::new(),
            buf: vec![0u8; MAX_DATAGRAM_LEN.max(2048)],
            payload: vec![0u8; rebindgw::client::MAX_PAYLOAD],
            c: Counters::default(),
            rtt: LatencyHist::default(),
            rtt_window: LatencyHist::default(),
            handshake: LatencyHist::default(),
            recovery: LatencyHist::default(),
            traffic_recovery: LatencyHist::default(),
            outages: 0,
            started: now,
            load_done: 0,
            churn_done: 0,
            cursor: 0,
            next_storm: 0,
            storm_cursor: None,
            phase: PHASE_CONNECT,
            run_start: now,
            last_window: now,
            rotations: opts.rotate_at.clone(),
            rotation_stats: vec![RotationStat::default(); opts.rotate_at.len()],
            rebound_log,
            notices_seen: NETWORK_NOTICES.load(Relaxed),
        })
    }

    /// Runs until the controller sets `PHASE_STOP`.
    pub fn run(mut self) -> io::Result<ShardResult> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let phase = self.shared.phase();
            if phase != self.phase {
                self.enter_phase(phase, now);
            }
            if phase == PHASE_STOP {
                break;
            }
            self.create_clients(now)?;
            let notices = NETWORK_NOTICES.load(Relaxed);
            if notices != self.notices_seen {
                self.notices_seen = notices;
                self.network_changed(now);
            }
            self.fire_timers(now);
            if matches!(phase, PHASE_RUN | PHASE_SETTLE) {
                self.pace_load(now);
            }
            if phase == PHASE_RUN {
                self.pace_churn(now);
            }
            // A storm that started in the measured phase finishes its moves in settle.
            if matches!(phase, PHASE_RUN | PHASE_SETTLE) {
                self.storm(now, phase == PHASE_RUN);
            }
            if self.opts.storm_prebind {
                self.prebind_and_reap(phase);
            }
            self.publish(now);
            let wait = self
                .next_wake(now)
                .map_or(MAX_WAIT, |t| t.saturating_duration_since(now).min(MAX_WAIT));
            self.epoll.wait(&mut events, Some(wait))?;
            let now = Instant::now();
            for token in events.tokens() {
                self.on_readable(token as usize, now);
            }
            if let Some(log) = &mut self.rebound_log
                && let Err(e) = log.flush()
            {
                tracing::warn!("--rebound-log: {e}; no more lines are written");
                self.rebound_log = None;
            }
        }
        Ok(self.finish())
    }

    fn enter_phase(&mut self, phase: u8, now: Instant) {
        let before = std::mem::replace(&mut self.phase, phase);
        if before < PHASE_RUN && phase >= PHASE_RUN {
            self.run_start = self.shared.run_start();
            self.last_window = now;
            if let LoadMode::Closed { .. } = self.opts.load {
                for i in 0..self.slots.len() {
                    self.refill(i, now);
                    self.reschedule(i);
                }
            }
        }
    }

    fn finish(mut self) -> ShardResult {
        for s in &self.slots {
            if s.outage.is_some() {
                self.c.unrecovered += 1;
            }
            if s.up && !s.failed {
                for (k, st) in self.rotation_stats.iter_mut().enumerate() {
                    st.installed_live += (s.installed_rots >> k) & 1;
                }
            }
        }
        self.publish(Instant::now());
        ShardResult {
            counters: self.c,
            storms: self.storm_stats,
            rtt: self.rtt,
            handshake: self.handshake,
            recovery: self.recovery,
            traffic_recovery: self.traffic_recovery,
            rotations: self.rotation_stats,
        }
    }

    fn publish(&mut self, now: Instant) {
        let p = &self.shared.progress[self.spec.id];
        p.created.store(self.slots.len() as u64, Relaxed);
        p.connected.store(self.c.connected, Relaxed);
        p.conn_failed.store(self.c.conn_failed, Relaxed);
        p.failed_later.store(self.c.failed_later, Relaxed);
        p.sent.store(self.c.sent, Relaxed);
        p.received.store(self.c.received, Relaxed);
        p.sent_bytes.store(self.c.sent_bytes, Relaxed);
        p.moves.store(self.c.moves, Relaxed);
        p.rebinds_ok.store(self.c.rebinds_ok, Relaxed);
        p.rebinds_failed.store(self.c.rebinds_failed, Relaxed);
        p.outages.store(self.outages, Relaxed);
        p.storm_pending.store(
            self.storm_cursor
                .map_or(0, |c| self.slots.len().saturating_sub(c) as u64),
            Relaxed,
        );
        p.phase_seen
            .store(self.phase, std::sync::atomic::Ordering::Release);
        if now.saturating_duration_since(self.last_window) >= Duration::from_secs(1) {
            self.last_window = now;
            p.p99_us.store(self.rtt_window.quantile_us(0.99), Relaxed);
            self.rtt_window.reset();
        }
    }

    /// The earliest instant something is due (timers, pacers, client creation).
    fn next_wake(&self, now: Instant) -> Option<Instant> {
        let mut t = self.heap.peek().map(|Reverse((t, _))| *t);
        if self.slots.len() < self.spec.creds.len() {
            let n = self.slots.len() as u64;
            t = earliest(t, Some(self.started + token_time(self.connect_rate, n)));
        }
        if matches!(self.phase, PHASE_RUN | PHASE_SETTLE) && self.load_rate > 0.0 {
            t = earliest(
                t,
                Some(self.run_start + token_time(self.load_rate, self.load_done)),
            );
        }
        if self.phase == PHASE_RUN {
            if self.churn_rate > 0.0 {
                t = earliest(
                    t,
                    Some(self.run_start + token_time(self.churn_rate, self.churn_done)),
                );
            }
            if self.prebind_due(self.phase) {
                t = Some(now);
            } else if let Some(s) = self.storms.get(self.next_storm) {
                t = earliest(t, Some(self.run_start + *s));
            }
        }
        if self.storm_cursor.is_some() {
            t = Some(now);
        }
        t
    }

    // ---- clients ----

    fn create_clients(&mut self, now: Instant) -> io::Result<()> {
        let total = self.spec.creds.len();
        if self.slots.len() >= total {
            return Ok(());
        }
        let due = (tokens_due(self.connect_rate, now - self.started) + 1).min(total as u64);
        let mut made = 0;
        while (self.slots.len() as u64) < due && made < CREATES_PER_ITER {
            let i = self.slots.len();
            let g = self.spec.first + i;
            let ip = self.spec.pool.get(g as u64);
            let sock =
                bind_client(SocketAddr::new(ip, 0), self.opts.socket_buffer).map_err(|e| {
                    io::Error::new(e.kind(), format!("binding a client socket on {ip}: {e}"))
                })?;
            let local = sock.local_addr()?;
            self.epoll.add(&sock, i as u64)?;
            let client = Client::new(
                self.opts.client_config.clone(),
                self.spec.creds[i].clone(),
                self.clock.ticks(now),
            );
            self.slots.push(Slot {
                client,
                sock,
                local,
                gw: self.opts.gateways[g % self.opts.gateways.len()],
                created: now,
                up: false,
                failed: false,
                reconnecting: false,
                gen_: 0,
                seq: 0,
                gen_sent: 0,
                gen_echoed: 0,
                outage: None,
                traffic_outage: None,
                timer: None,
                kick_at: None,
                storm_no: None,
                outstanding: VecDeque::new(),
                app_deadline: None,
                keys_seen: 0,
                switched_seen: 0,
                installed_rots: 0,
                switched_rots: 0,
                last_installed: None,
            });
            self.flush(i, now);
            self.reschedule(i);
            made += 1;
        }
        Ok(())
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((t, i))) = self.heap.peek() {
            if t > now {
                break;
            }
            self.heap.pop();
            let i = i as usize;
            if self.slots[i].timer != Some(t) {
                continue; // superseded by an earlier entry
            }
            self.slots[i].timer = None;
            let s = &mut self.slots[i];
            let ticks = self.clock.ticks(now);
            if s.client.poll_timeout().is_some_and(|d| d <= ticks) {
                s.client.handle_timeout(ticks);
            }
            if s.app_deadline.is_some_and(|d| d <= now) {
                s.app_deadline = None;
                let timeout = self.opts.echo_timeout;
                while s
                    .outstanding
                    .front()
                    .is_some_and(|(_, t)| *t + timeout <= now)
                {
                    s.outstanding.pop_front();
                    self.c.echo_timeouts += 1;
                }
                self.refill(i, now);
            }
            let s = &mut self.slots[i];
            if s.kick_at.is_some_and(|d| d <= now) {
                s.kick_at = None;
                if s.outage.is_some() && s.client.state() == ClientState::Connected {
                    s.kick_at = Some(now + KICK_EVERY);
                    self.queue_payload(i, now);
                }
            }
            self.after_io(i, now);
        }
    }

    fn reschedule(&mut self, i: usize) {
        let s = &mut self.slots[i];
        let client_t = s.client.poll_timeout().map(|t| self.clock.instant(t));
        let t = earliest(client_t, s.app_deadline);
        let Some(t) = earliest(t, s.kick_at) else {
            return;
        };
        if s.timer.is_none_or(|cur| t < cur) {
            s.timer = Some(t);
            self.heap.push(Reverse((t, i as u32)));
        }
    }

    /// After anything touched slot `i`: events, received payloads, transmits, timer.
    fn after_io(&mut self, i: usize, now: Instant) {
        if !self.rotations.is_empty() {
            self.track_keys(i, now);
        }
        self.drain_events(i, now);
        self.drain_received(i, now);
        self.flush(i, now);
        self.reschedule(i);
    }

    fn on_readable(&mut self, i: usize, now: Instant) {
        let Some(s) = self.slots.get_mut(i) else {
            return;
        };
        for _ in 0..RECV_PER_WAKE {
            match s.sock.recv_from(&mut self.buf) {
                Ok((n, from)) => {
                    if from != s.gw {
                        self.c.stray += 1;
                        continue;
                    }
                    s.client.handle(self.clock.ticks(now), &self.buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP errors reported on the socket (e.g. refused): nothing to read.
                Err(_) => break,
            }
        }
        self.after_io(i, now);
    }

    /// The rotation in force at `now`: the last `--rotate-at` instant passed, in the
    /// measured phase or after it.
    fn rotation_at(&self, now: Instant) -> Option<usize> {
        if self.phase < PHASE_RUN {
            return None;
        }
        self.rotations
            .iter()
            .rposition(|t| self.run_start + *t <= now)
    }

    /// Rotation mode: notes a new installation of delivered keys (timed from the rotation
    /// in force) and a switch to them, from the client core's counters. Installations are
    /// attributed by time: keys that arrive only after the next rotation's instant count
    /// for that one (the client core does not say which epoch it installed).
    fn track_keys(&mut self, i: usize, now: Instant) {
        let st = self.slots[i].client.stats();
        let (installed, switched) = (st.keys_installed, st.keys_switched);
        if installed != self.slots[i].keys_seen {
            let k = self.rotation_at(now);
            let s = &mut self.slots[i];
            s.keys_seen = installed;
            // Keys installed before the first rotation (a scheduled one of the gateway's)
            // belong to none of ours; a client counts once per rotation.
            if let Some(k) = k
                && s.installed_rots & (1 << k) == 0
            {
                s.installed_rots |= 1 << k;
                s.last_installed = Some(k);
                let r = &mut self.rotation_stats[k];
                r.installed += 1;
                r.delivery
                    .record(now.saturating_duration_since(self.run_start + self.rotations[k]));
            }
        }
        let s = &mut self.slots[i];
        if switched != s.switched_seen {
            s.switched_seen = switched;
            // A switch is to the keys installed last.
            if let Some(k) = s.last_installed
                && s.switched_rots & (1 << k) == 0
            {
                s.switched_rots |= 1 << k;
                self.rotation_stats[k].switched += 1;
            }
        }
    }

    fn drain_events(&mut self, i: usize, now: Instant) {
        while let Some(ev) = self.slots[i].client.poll_event() {
            let s = &mut self.slots[i];
            match ev {
                ClientEvent::Connected { .. } => {
                    s.up = true;
                    if std::mem::take(&mut s.reconnecting) {
                        self.c.reconnected += 1;
                    } else {
                        self.c.connected += 1;
                    }
                    self.handshake.record(now - s.created);
                    if let Some(k) = self.rotation_at(now) {
                        self.rotation_stats[k].handshakes += 1;
                    }
                    if matches!(self.phase, PHASE_RUN | PHASE_SETTLE) {
                        self.refill(i, now);
                    }
                }
                ClientEvent::Rebinding { .. } => s.kick_at = None,
                ClientEvent::Rebound { new_tuple, .. } => {
                    if let Some(log) = &mut self.rebound_log {
                        log.record(self.spec.first + i, now);
                    }
                    if (new_tuple == s.local || self.opts.behind_nat)
                        && let Some(t0) = s.outage.take()
                    {
                        s.kick_at = None;
                        self.outages -= 1;
                        self.c.rebinds_ok += 1;
                        self.recovery.record(now - t0);
                        if let Some(k) = s.storm_no.take() {
                            let k = k as usize;
                            let at = self.run_start + self.storms[k];
                            let st = &mut self.storm_stats[k];
                            st.recovered += 1;
                            st.last_recovery_s = st
                                .last_recovery_s
                                .max(now.saturating_duration_since(at).as_secs_f64());
                        }
                    } else {
                        self.c.extra += 1;
                    }
                }
                ClientEvent::RebindAbandoned { .. } => self.c.abandoned += 1,
                // A rebind ran out: a failed rebind and a lost connection as with
                // `Failed(RebindTimeout)`, but the core handshakes again by itself; the client
                // sends again once `Connected`. What was outstanding went with the old
                // connection (the core drops its queued DATA): written off now, counted as
                // echo timeouts.
                ClientEvent::Reconnecting { .. } => {
                    rebind_ran_out(&mut self.c, &mut self.outages, s);
                    s.up = false;
                    s.reconnecting = true;
                    s.created = now;
                    self.c.echo_timeouts += s.outstanding.len() as u64;
                    s.outstanding.clear();
                    s.app_deadline = None;
                }
                ClientEvent::Failed(e) => {
                    s.failed = true;
                    match e {
                        // A re-handshake that timed out: its connection loss is counted.
                        ClientError::HandshakeTimeout if s.reconnecting => {}
                        ClientError::HandshakeTimeout => self.c.conn_failed += 1,
                        ClientError::RebindTimeout => {
                            rebind_ran_out(&mut self.c, &mut self.outages, s);
                        }
                    }
                }
            }
        }
    }

    fn drain_received(&mut self, i: usize, now: Instant) {
        let g = (self.spec.first + i) as u32;
        let now_us = self.shared.now_us(now);
        let mut freed = false;
        while let Some(p) = self.slots[i].client.poll_received() {
            let Some(st) = Stamp::parse(&p) else {
                self.c.foreign += 1;
                continue;
            };
            if st.client != g {
                self.c.misdelivered += 1;
                continue;
            }
            let s = &mut self.slots[i];
            self.c.received += 1;
            if let Some(k) = s.outstanding.iter().position(|(q, _)| *q == st.seq) {
                s.outstanding.remove(k);
                freed = true;
            }
            let rtt = u64::from(st.rtt_us(now_us));
            self.rtt.record_us(rtt);
            self.rtt_window.record_us(rtt);
            if st.gen_ != s.gen_ {
                self.c.late_echoes += 1;
            } else {
                s.gen_echoed = s.gen_echoed.wrapping_add(1);
                if let Some(t0) = s.traffic_outage.take() {
                    self.traffic_recovery.record(now - t0);
                }
            }
        }
        if freed {
            self.refill(i, now);
        }
    }

    /// Closed loop: tops slot `i` up to the window (in the run and settle phases).
    fn refill(&mut self, i: usize, now: Instant) {
        let LoadMode::Closed { window } = self.opts.load else {
            return;
        };
        if !matches!(self.phase, PHASE_RUN | PHASE_SETTLE) {
            return;
        }
        let s = &self.slots[i];
        if !s.up || s.failed {
            return;
        }
        while self.slots[i].outstanding.len() < window as usize {
            let Some(seq) = self.queue_payload(i, now) else {
                break;
            };
            self.slots[i].outstanding.push_back((seq, now));
        }
        let s = &mut self.slots[i];
        s.app_deadline = s
            .outstanding
            .front()
            .map(|(_, t)| *t + self.opts.echo_timeout);
    }

    /// Queues one stamped payload on slot `i`'s client (sent by the next flush); returns
    /// its sequence number.
    fn queue_payload(&mut self, i: usize, now: Instant) -> Option<u32> {
        let len = self.opts.payload.pick(self.rng.next_u64()).max(STAMP_LEN);
        let g = (self.spec.first + i) as u32;
        let now_us = self.shared.now_us(now);
        let s = &mut self.slots[i];
        Stamp {
            gen_: s.gen_,
            client: g,
            seq: s.seq,
            sent_us: now_us,
        }
        .emit(&mut self.payload[..len]);
        if s.client.send(&self.payload[..len]).is_err() {
            return None;
        }
        let seq = s.seq;
        s.seq = s.seq.wrapping_add(1);
        self.c.sent += 1;
        self.c.sent_bytes += len as u64;
        if s.outage.is_some() {
            self.c.sent_during_outage += 1;
        } else {
            s.gen_sent = s.gen_sent.wrapping_add(1);
        }
        Some(seq)
    }

    /// Sends everything slot `i`'s client has to send.
    fn flush(&mut self, i: usize, now: Instant) {
        let s = &mut self.slots[i];
        while let Some(n) = s.client.poll_transmit(self.clock.ticks(now), &mut self.buf) {
            let d = &self.buf[..n];
            if let Some(tap) = &self.shared.tap
                && d[0] == rebindgw::wire::MsgType::Rebind as u8
                && d[1..].iter().any(|b| *b != 0)
                && let Ok(mut q) = tap.try_lock()
            {
                if q.len() >= 256 {
                    q.pop_front();
                }
                q.push_back(d.to_vec());
                self.shared.tapped.fetch_add(1, Relaxed);
            }
            if s.sock.send_to(d, s.gw).is_err() {
                self.c.send_errors += 1;
            }
        }
    }

    // ---- load ----

    fn pace_load(&mut self, now: Instant) {
        if self.load_rate <= 0.0 || self.slots.is_empty() {
            return;
        }
        let due = tokens_due(
            self.load_rate,
            now.saturating_duration_since(self.run_start),
        );
        // Never burst more than 50 ms worth (plus a little) after a stall.
        let backlog = (self.load_rate * 0.05) as u64 + 64;
        if due > self.load_done + backlog {
            self.c.pacer_skipped += due - self.load_done - backlog;
            self.load_done = due - backlog;
        }
        let mut budget = SENDS_PER_ITER;
        while self.load_done < due && budget > 0 {
            budget -= 1;
            self.load_done += 1;
            let n = self.slots.len();
            let mut found = None;
            for _ in 0..n {
                let i = self.cursor;
                self.cursor = (self.cursor + 1) % n;
                let s = &self.slots[i];
                if s.up && !s.failed {
                    found = Some(i);
                    break;
                }
            }
            let Some(i) = found else {
                self.load_done = due; // nobody to send from
                break;
            };
            if self.queue_payload(i, now).is_some() {
                self.flush(i, now);
                self.reschedule(i);
            }
        }
    }

    // ---- NAT moves ----

    fn pace_churn(&mut self, now: Instant) {
        if self.churn_rate <= 0.0 || self.slots.is_empty() {
            return;
        }
        let due = tokens_due(
            self.churn_rate,
            now.saturating_duration_since(self.run_start),
        );
        while self.churn_done < due {
            self.churn_done += 1;
            for _ in 0..16 {
                let i = self.rng.below(self.slots.len());
                let s = &self.slots[i];
                if s.up && !s.failed && s.outage.is_none() {
                    self.move_slot(i, now, None);
                    break;
                }
            }
        }
    }

    /// Whether there are spare sockets to bind for the next storm (or old ones to close).
    fn prebind_due(&self, phase: u8) -> bool {
        if !self.opts.storm_prebind || self.storm_cursor.is_some() {
            return false;
        }
        if !self.graveyard.is_empty() {
            return self.outages == 0 || phase >= PHASE_SETTLE;
        }
        // In the measured phase only: binding sockets while clients connect would slow the
        // handshakes down.
        phase == PHASE_RUN
            && !self.prebind_failed
            && self.next_storm < self.storms.len()
            && self.slots.len() == self.spec.creds.len()
            && self.prebind_cursor < self.slots.len()
    }

    /// `storm_prebind`, between storms: closes the sockets the last storm replaced (once its
    /// clients recovered), then binds the next storm's moved-to sockets, a chunk at a time.
    fn prebind_and_reap(&mut self, phase: u8) {
        if !self.prebind_due(phase) {
            return;
        }
        if !self.graveyard.is_empty() {
            let keep = self.graveyard.len().saturating_sub(STORM_CHUNK);
            self.graveyard.truncate(keep);
            return;
        }
        if self.spares.len() < self.slots.len() {
            self.spares.resize_with(self.slots.len(), || None);
        }
        let end = (self.prebind_cursor + STORM_CHUNK).min(self.slots.len());
        for i in self.prebind_cursor..end {
            if self.spares[i].is_some() || self.slots[i].failed {
                continue;
            }
            let ip = self.move_target(i);
            match bind_client(SocketAddr::new(ip, 0), self.opts.socket_buffer)
                .and_then(|s| s.local_addr().map(|a| (s, a)))
            {
                Ok(pair) => self.spares[i] = Some(pair),
                Err(e) => {
                    tracing::warn!(error = %e, "binding spare sockets for the storm failed; \
                        the rest bind at the storm");
                    self.prebind_failed = true;
                    return;
                }
            }
        }
        self.prebind_cursor = end;
    }

    /// The address slot `i`'s next move goes to.
    fn move_target(&mut self, i: usize) -> std::net::IpAddr {
        match self.opts.move_kind {
            MoveKind::Port => self.slots[i].local.ip(),
            MoveKind::Addr => {
                let ip = self.spec.pool.get(self.next_addr);
                self.next_addr += self.spec.move_stride;
                ip
            }
        }
    }

    fn storm(&mut self, now: Instant, may_start: bool) {
        if may_start
            && self.storm_cursor.is_none()
            && let Some(t) = self.storms.get(self.next_storm)
            && now >= self.run_start + *t
        {
            self.next_storm += 1;
            self.c.storms += 1;
            self.storm_cursor = Some(0);
        }
        let Some(start) = self.storm_cursor else {
            return;
        };
        let k = self.next_storm - 1;
        let end = (start + STORM_CHUNK).min(self.slots.len());
        for i in start..end {
            if !self.slots[i].failed {
                self.move_slot(i, Instant::now(), Some(k));
            }
        }
        let at = self.run_start + self.storms[k];
        self.storm_stats[k].last_move_s =
            Instant::now().saturating_duration_since(at).as_secs_f64();
        self.storm_cursor = (end < self.slots.len()).then_some(end);
        if self.storm_cursor.is_none() {
            // The next storm binds fresh spares (after this one's old sockets are closed).
            self.prebind_cursor = 0;
        }
    }

    /// Moves slot `i` to a new source tuple: bind the new socket first (so the port
    /// differs), then close the old one. The client is not told.
    /// A network-change notice: every connected client does what `--on-move` says, on its
    /// current socket (the move happened outside, at a NAT).
    fn network_changed(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if !s.up || s.failed {
                continue;
            }
            self.c.notified += 1;
            match self.opts.on_move {
                OnMove::None => continue,
                OnMove::Send => {
                    self.queue_payload(i, now);
                }
                OnMove::Notify => s.client.network_changed(self.clock.ticks(now)),
            }
            self.flush(i, now);
            self.reschedule(i);
        }
    }

    fn move_slot(&mut self, i: usize, now: Instant, storm: Option<usize>) {
        let old_ip = self.slots[i].local.ip();
        // A prebound spare, unless a churn move since changed the address a port move keeps.
        let spare = self
            .spares
            .get_mut(i)
            .and_then(Option::take)
            .filter(|(_, a)| self.opts.move_kind == MoveKind::Addr || a.ip() == old_ip);
        let (sock, local) = match spare {
            Some(pair) => pair,
            None => {
                let ip = self.move_target(i);
                match bind_client(SocketAddr::new(ip, 0), self.opts.socket_buffer)
                    .and_then(|s| s.local_addr().map(|a| (s, a)))
                {
                    Ok(pair) => pair,
                    Err(_) => {
                        self.c.move_errors += 1;
                        return;
                    }
                }
            }
        };
        if self.epoll.add(&sock, i as u64).is_err() {
            self.c.move_errors += 1;
            return;
        }
        let s = &mut self.slots[i];
        let old = std::mem::replace(&mut s.sock, sock);
        if self.opts.storm_prebind && storm.is_some() && self.epoll.delete(&old).is_ok() {
            // Closed after the storm, so closing costs nothing during it. Nothing reads it:
            // the tuple is gone, like a NAT mapping that expired.
            self.graveyard.push(old);
        } else {
            // Closing removes it from the epoll set.
            drop(old);
        }
        s.local = local;
        s.gen_ = s.gen_.wrapping_add(1);
        // Echoes still owed to the closed socket are lost with it.
        self.c.in_flight_at_move += u64::from(s.gen_sent.saturating_sub(s.gen_echoed));
        s.gen_sent = 0;
        s.gen_echoed = 0;
        if s.up && !s.failed {
            self.c.moves += 1;
            if s.outage.is_none() {
                s.outage = Some(now);
                self.outages += 1;
                self.c.outages += 1;
            }
            if s.traffic_outage.is_none() {
                s.traffic_outage = Some(now);
            }
            if let Some(k) = storm {
                s.storm_no = Some(k as u32);
                self.storm_stats[k].moved += 1;
            }
            match self.opts.on_move {
                OnMove::None => {}
                OnMove::Send => {
                    s.kick_at = Some(now + KICK_EVERY);
                    self.queue_payload(i, now);
                }
                OnMove::Notify => s.client.network_changed(self.clock.ticks(now)),
            }
            self.flush(i, now);
            self.reschedule(i);
        }
    }
}

/// A rebind that ran out (the client failed, or its core handshakes again): a connection
/// lost after connecting, and a failed rebind if a move's outage was running.
fn rebind_ran_out(c: &mut Counters, outages: &mut u64, s: &mut Slot) {
    c.failed_later += 1;
    s.kick_at = None;
    s.storm_no = None;
    if s.outage.take().is_some() {
        *outages -= 1;
        c.rebinds_failed += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_tokens() {
        assert_eq!(tokens_due(1000.0, Duration::from_millis(0)), 0);
        assert_eq!(tokens_due(1000.0, Duration::from_millis(5)), 5);
        assert_eq!(tokens_due(2.5, Duration::from_secs(2)), 5);
        assert_eq!(token_time(1000.0, 0), Duration::from_millis(1));
        assert_eq!(token_time(4.0, 3), Duration::from_secs(1));
        // A zero rate never falls due within any sane horizon.
        assert!(token_time(0.0, 0) > Duration::from_secs(1 << 20));
    }

    #[test]
    fn rng_spreads() {
        let mut r = Rng::new();
        let mut hits = [0u32; 8];
        for _ in 0..8000 {
            hits[r.below(8)] += 1;
        }
        assert!(hits.iter().all(|h| (800..1200).contains(h)), "{hits:?}");
    }

    #[test]
    fn counters_merge() {
        let mut a = Counters {
            sent: 1,
            moves: 2,
            ..Counters::default()
        };
        a.merge(&Counters {
            sent: 10,
            misdelivered: 1,
            ..Counters::default()
        });
        assert_eq!((a.sent, a.moves, a.misdelivered), (11, 2, 1));
    }
}
