//! Load-generator settings: [`LoadgenOptions`] for programs and tests, [`LoadgenArgs`] for
//! the `rebindgw loadgen` command line.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rebindgw::client::{ClientConfig, MAX_PAYLOAD};

use super::addrs::AddrPool;
use super::stamp::STAMP_LEN;

/// How DATA is offered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoadMode {
    /// Open loop: `rate` DATA packets per second in total, spread round-robin over clients.
    Open { rate: f64 },
    /// Closed loop: each client keeps `window` echo requests outstanding; one that gets no
    /// echo within `echo_timeout` is written off and replaced.
    Closed { window: u32 },
}

/// Payload lengths (the stamp included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PayloadSizes {
    Fixed(usize),
    /// Each packet picks one of these at random.
    List(Vec<usize>),
    /// Uniform in `lo..=hi`.
    Range(usize, usize),
}

impl PayloadSizes {
    /// Parses `64`, `64,300,1200` or `64-1200`. Every length must be 16..=1200.
    pub fn parse(s: &str) -> Result<PayloadSizes, String> {
        let num = |x: &str| -> Result<usize, String> {
            let n: usize = x
                .trim()
                .parse()
                .map_err(|_| format!("payload length {x:?} is not a number"))?;
            if !(STAMP_LEN..=MAX_PAYLOAD).contains(&n) {
                return Err(format!(
                    "payload length {n} outside {STAMP_LEN}..={MAX_PAYLOAD} (the stamp needs \
                     {STAMP_LEN} bytes)"
                ));
            }
            Ok(n)
        };
        let s = s.trim();
        if let Some((a, b)) = s.split_once('-') {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(format!("payload range {a}-{b} is empty"));
            }
            return Ok(if a == b {
                PayloadSizes::Fixed(a)
            } else {
                PayloadSizes::Range(a, b)
            });
        }
        let v = s.split(',').map(num).collect::<Result<Vec<_>, _>>()?;
        Ok(if v.len() == 1 {
            PayloadSizes::Fixed(v[0])
        } else {
            PayloadSizes::List(v)
        })
    }

    /// A length for the next packet; `r` is a random number.
    pub fn pick(&self, r: u64) -> usize {
        match self {
            PayloadSizes::Fixed(n) => *n,
            PayloadSizes::List(v) => v[(r % v.len() as u64) as usize],
            PayloadSizes::Range(a, b) => a + (r % (b - a + 1) as u64) as usize,
        }
    }

    pub fn max(&self) -> usize {
        match self {
            PayloadSizes::Fixed(n) => *n,
            PayloadSizes::List(v) => v.iter().copied().max().unwrap_or(STAMP_LEN),
            PayloadSizes::Range(_, b) => *b,
        }
    }
}

impl std::fmt::Display for PayloadSizes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PayloadSizes::Fixed(n) => write!(f, "{n}"),
            PayloadSizes::List(v) => {
                let s: Vec<String> = v.iter().map(|n| n.to_string()).collect();
                f.write_str(&s.join(","))
            }
            PayloadSizes::Range(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

/// What a NAT move changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MoveKind {
    /// A new source port on the same address.
    Port,
    /// A new address (and so a new port too).
    Addr,
}

/// What a moved client does right after its move (the client is never told of the move
/// except with `notify`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMove {
    /// Nothing: the client notices when its load next sends from the new tuple.
    #[default]
    None,
    /// An active application: one DATA from the new tuple at once, and again every
    /// 500 ms (KICK_EVERY) until the rebind starts (an UNRECOGNIZED arrived).
    Send,
    /// The application is told its network changed (Client::network_changed): a cookie
    /// request at once, retried by the client itself.
    Notify,
}

/// `OnMove::Send`: how often a moved client that has not started rebinding sends DATA again.
pub const KICK_EVERY: Duration = Duration::from_millis(500);

/// This process's part of a multi-process run (`--processes`): set in the children only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildRole {
    /// 0-based process number, and the number of processes.
    pub index: usize,
    pub count: usize,
    /// Global number of this process's first client, and the clients in all processes.
    pub first_client: usize,
    pub total_clients: usize,
}

impl ChildRole {
    /// Parses the hidden `--shard I/N/FIRST/TOTAL`.
    pub fn parse(s: &str) -> Result<ChildRole, String> {
        let v: Vec<usize> = s
            .split('/')
            .map(|x| x.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("--shard {s:?}: expected I/N/FIRST/TOTAL"))?;
        let [index, count, first_client, total_clients] = v[..] else {
            return Err(format!("--shard {s:?}: expected I/N/FIRST/TOTAL"));
        };
        if index >= count || first_client >= total_clients {
            return Err(format!("--shard {s:?}: out of range"));
        }
        Ok(ChildRole {
            index,
            count,
            first_client,
            total_clients,
        })
    }
}

impl std::fmt::Display for ChildRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.index, self.count, self.first_client, self.total_clients
        )
    }
}

/// Attack traffic the generator can mix in. See `attack.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackMode {
    /// Random bytes (random type byte, random length) from many tuples.
    Garbage,
    /// REBINDs with real slot keys and conn_id but a random R, with valid cookies.
    WrongR,
    /// REBINDs with the real R but one corrupted slot key, with valid cookies.
    WrongSlot,
    /// Real clients' REBINDs replayed from other tuples (as captured, and re-cookied).
    Replay,
    /// 640-byte HANDSHAKEs with random client ids.
    HandshakeFlood,
}

impl AttackMode {
    pub const ALL: [AttackMode; 5] = [
        AttackMode::Garbage,
        AttackMode::WrongR,
        AttackMode::WrongSlot,
        AttackMode::Replay,
        AttackMode::HandshakeFlood,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AttackMode::Garbage => "garbage",
            AttackMode::WrongR => "wrong-r",
            AttackMode::WrongSlot => "wrong-slot",
            AttackMode::Replay => "replay",
            AttackMode::HandshakeFlood => "handshake-flood",
        }
    }
}

/// Everything a load run needs. [`LoadgenOptions::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct LoadgenOptions {
    /// Gateway client-facing addresses; client `i` uses `gateways[i % len]`.
    pub gateways: Vec<SocketAddr>,
    pub clients: usize,
    /// Driver threads; 0 = one per core (at most 8).
    pub threads: usize,
    /// Length of the measured phase.
    pub duration: Duration,
    pub load: LoadMode,
    pub payload: PayloadSizes,
    /// Closed loop: when an outstanding echo is written off.
    pub echo_timeout: Duration,
    /// NAT moves per second, in total over all clients.
    pub churn_per_sec: f64,
    pub move_kind: MoveKind,
    /// Move every client at this offset into the measured phase ...
    pub storm_at: Option<Duration>,
    /// ... and again every this long after that.
    pub storm_every: Option<Duration>,
    pub attacks: Vec<AttackMode>,
    /// Attack datagrams per second, per mode.
    pub attack_rate: f64,
    /// Source tuples per attack mode.
    pub attack_tuples: usize,
    /// The host's clients file: the generator enrolls its clients there for the run
    /// (enroll_many) and removes them when the run ends, unless `keep_clients` or
    /// `save_credentials`.
    pub clients_file: Option<PathBuf>,
    /// Leave the enrolled clients in `clients_file`.
    pub keep_clients: bool,
    /// Reuse credentials: JSON lines of `Enrolled` (as written by `save_credentials`).
    pub credentials: Option<PathBuf>,
    /// Write the credentials used to this file (JSON lines, mode 0600).
    pub save_credentials: Option<PathBuf>,
    /// Name prefix for enrolled clients (default `loadgen-<pid>-<random>-`).
    pub name_prefix: Option<String>,
    /// Client source addresses; `None` = the 127.0.0.0/8 spread (or `::1` for IPv6).
    pub source_addrs: Option<AddrPool>,
    /// New handshakes per second while connecting, in total.
    pub connect_rate: f64,
    /// Give up waiting for clients to connect after this long.
    pub connect_timeout: Duration,
    /// How long to wait for the host to pick up newly enrolled clients.
    pub enroll_wait: Duration,
    /// After the measured phase: how long load keeps running for moved clients to recover.
    pub settle: Duration,
    /// Fail the run when the steady-state loss exceeds this percentage.
    pub max_loss_pct: Option<f64>,
    /// Client timers (handshake backoff is shortened from the library default).
    pub client_config: ClientConfig,
    /// Socket buffer request for each client socket.
    pub socket_buffer: usize,
    /// What a moved client does at once.
    pub on_move: OnMove,
    /// Bind every client's moved-to socket before each storm, and close the old sockets
    /// only after it, so a storm costs a descriptor swap per client instead of socket
    /// creation and teardown (two descriptors per client).
    pub storm_prebind: bool,
    /// The clients are behind a NAT: the tuple a gateway acknowledges is the NAT's, never
    /// the client's own, so a moved client has recovered at its first `Rebound`.
    pub behind_nat: bool,
    /// Processes to spread the clients over (each has its own descriptor limit); 0 = as
    /// few as the RLIMIT_NOFILE hard limit allows. 1 runs everything in this process.
    pub processes: usize,
    /// Set in the child processes of a multi-process run.
    pub child: Option<ChildRole>,
    /// The `rebindgw` executable the children run (default: this executable).
    pub child_exe: Option<PathBuf>,
    /// Rotation mode: offsets into the measured phase at which this process (the parent of
    /// a multi-process run, never its children) asks the gateway for a key rotation; every
    /// shard measures when its clients install the new epoch's keys.
    pub rotate_at: Vec<Duration>,
    /// The gateway's admin address (HOST:PORT) the rotations are requested from.
    pub admin: Option<String>,
    /// The gateway's admin key file (its `admin_key`, mode 0600).
    pub admin_key: Option<PathBuf>,
    /// Ask for the rotations with `force` (a rotation during the previous grace period).
    pub rotate_force: bool,
    /// Every client's rebind acknowledgements (`Rebound`), appended to this file as lines
    /// `<client number> <CLOCK_MONOTONIC ns>`, for a driver that moves the clients itself
    /// (a NAT) and times each client's recovery on its own clock.
    pub rebound_log: Option<PathBuf>,
}

/// Rotations one run may ask for (each client remembers which it installed in a `u64`).
pub const MAX_ROTATIONS: usize = 64;

impl LoadgenOptions {
    pub fn new(gateways: Vec<SocketAddr>) -> LoadgenOptions {
        LoadgenOptions {
            gateways,
            clients: 1024,
            threads: 0,
            duration: Duration::from_secs(10),
            load: LoadMode::Open { rate: 10_000.0 },
            payload: PayloadSizes::Fixed(64),
            echo_timeout: Duration::from_millis(500),
            churn_per_sec: 0.0,
            move_kind: MoveKind::Addr,
            storm_at: None,
            storm_every: None,
            attacks: Vec::new(),
            attack_rate: 200.0,
            attack_tuples: 32,
            clients_file: None,
            keep_clients: false,
            credentials: None,
            save_credentials: None,
            name_prefix: None,
            source_addrs: None,
            connect_rate: 5_000.0,
            connect_timeout: Duration::from_secs(30),
            enroll_wait: Duration::from_secs(15),
            settle: Duration::from_secs(10),
            max_loss_pct: None,
            client_config: ClientConfig {
                handshake_backoff: Duration::from_millis(200),
                handshake_backoff_max: Duration::from_secs(2),
                ..ClientConfig::default()
            },
            socket_buffer: 256 << 10,
            on_move: OnMove::None,
            storm_prebind: false,
            behind_nat: false,
            processes: 0,
            child: None,
            child_exe: None,
            rotate_at: Vec::new(),
            admin: None,
            admin_key: None,
            rotate_force: false,
            rebound_log: None,
        }
    }

    /// Driver threads actually used.
    pub fn thread_count(&self) -> usize {
        let t = if self.threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get().min(8))
        } else {
            self.threads
        };
        t.clamp(1, self.clients.max(1))
    }

    /// Descriptors each client may need at once.
    pub fn fds_per_client(&self) -> usize {
        if self.storm_prebind && self.storm_at.is_some() {
            2
        } else {
            1
        }
    }

    /// Storm instants (offsets into the measured phase).
    pub fn storm_times(&self) -> Vec<Duration> {
        let Some(first) = self.storm_at else {
            return Vec::new();
        };
        let mut v = Vec::new();
        let mut t = first;
        while t < self.duration && v.len() < 10_000 {
            v.push(t);
            match self.storm_every {
                Some(e) if !e.is_zero() => t += e,
                _ => break,
            }
        }
        v
    }

    /// Checks the settings; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.gateways.is_empty() {
            return Err("--gateway: at least one gateway address is needed".into());
        }
        let v4 = self.gateways[0].is_ipv4();
        if self.gateways.iter().any(|g| g.is_ipv4() != v4) {
            return Err("--gateway: mix of IPv4 and IPv6 gateways".into());
        }
        if let Some(p) = &self.source_addrs
            && p.is_ipv4() != v4
        {
            return Err("--source-addrs: address family differs from the gateway's".into());
        }
        if self.clients == 0 || self.clients > 1 << 20 {
            return Err(format!(
                "--clients: must be 1..=1048576, got {}",
                self.clients
            ));
        }
        if self.processes > 256 {
            return Err(format!("--processes: at most 256, got {}", self.processes));
        }
        if self.threads > 256 {
            return Err(format!("--threads: at most 256, got {}", self.threads));
        }
        match self.load {
            LoadMode::Open { rate } if !(rate >= 0.0 && rate.is_finite()) => {
                return Err(format!("--rate: must be >= 0, got {rate}"));
            }
            LoadMode::Closed { window: 0 } => return Err("--window: must be >= 1".into()),
            LoadMode::Closed { window } if window > 512 => {
                return Err(format!("--window: at most 512, got {window}"));
            }
            _ => {}
        }
        if !(self.churn_per_sec >= 0.0 && self.churn_per_sec.is_finite()) {
            return Err(format!(
                "--churn-per-sec: must be >= 0, got {}",
                self.churn_per_sec
            ));
        }
        if !(self.attack_rate >= 0.0 && self.attack_rate.is_finite()) {
            return Err(format!(
                "--attack-rate: must be >= 0, got {}",
                self.attack_rate
            ));
        }
        if !(self.connect_rate > 0.0 && self.connect_rate.is_finite()) {
            return Err(format!(
                "--connect-rate: must be > 0, got {}",
                self.connect_rate
            ));
        }
        if self.attack_tuples == 0 || self.attack_tuples > 4096 {
            return Err(format!(
                "--attack-tuples: must be 1..=4096, got {}",
                self.attack_tuples
            ));
        }
        if self.clients_file.is_none() && self.credentials.is_none() {
            return Err(
                "give --clients-file (the host's file, to enroll clients into) or \
                 --credentials (previously saved credentials)"
                    .into(),
            );
        }
        if self.duration.is_zero() {
            return Err("--duration: must be > 0".into());
        }
        if let Some(m) = self.max_loss_pct
            && !(0.0..=100.0).contains(&m)
        {
            return Err(format!("--max-loss: must be 0..=100, got {m}"));
        }
        self.validate_rotations()
    }

    fn validate_rotations(&self) -> Result<(), String> {
        if self.rotate_at.is_empty() {
            if self.admin.is_some() || self.admin_key.is_some() || self.rotate_force {
                return Err(
                    "--admin, --admin-key and --rotate-force only go with --rotate-at".into(),
                );
            }
            return Ok(());
        }
        if self.rotate_at.len() > MAX_ROTATIONS {
            return Err(format!(
                "--rotate-at: at most {MAX_ROTATIONS} rotations, got {}",
                self.rotate_at.len()
            ));
        }
        if self.rotate_at.windows(2).any(|w| w[0] >= w[1]) {
            return Err("--rotate-at: the times must be increasing".into());
        }
        if let Some(t) = self.rotate_at.iter().find(|t| **t >= self.duration) {
            return Err(format!(
                "--rotate-at: {:.3} s is not within the measured phase (--duration {:.3} s)",
                t.as_secs_f64(),
                self.duration.as_secs_f64()
            ));
        }
        // The children of a multi-process run only measure; the parent rotates.
        if self.child.is_none() {
            if self.admin.as_deref().is_none_or(|a| a.trim().is_empty()) {
                return Err(
                    "--rotate-at needs --admin HOST:PORT (the gateway's admin endpoint)".into(),
                );
            }
            if self.admin_key.is_none() {
                return Err("--rotate-at needs --admin-key PATH (the gateway's admin.key)".into());
            }
        }
        Ok(())
    }
}

pub use rebindgw::time::parse_duration;

/// `rebindgw loadgen`: drive a gateway with many clients, NAT churn and attack traffic, and
/// report throughput, loss, echo RTT and rebind-recovery percentiles.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// Gateway client-facing address (repeat for several; clients are spread over them).
    #[arg(
        long = "gateway",
        required = true,
        env = "REBINDGW_GATEWAY",
        value_delimiter = ','
    )]
    pub gateways: Vec<SocketAddr>,
    /// Number of clients, each with its own socket and source tuple.
    #[arg(long, default_value_t = 1024)]
    pub clients: usize,
    /// Driver threads (0 = one per core, at most 8).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Length of the measured phase (e.g. 10s, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Open loop: total DATA packets per second (default 10000 unless --window is given).
    #[arg(long, conflicts_with = "window")]
    pub rate: Option<f64>,
    /// Closed loop: outstanding echo requests per client [default: none, open loop].
    #[arg(long)]
    pub window: Option<u32>,
    /// Payload length(s): 64, a list 64,300,1200 or a range 64-1200 (16..=1200).
    #[arg(long, default_value = "64", value_parser = PayloadSizes::parse)]
    pub payload: PayloadSizes,
    /// Closed loop: write off an echo not back within this long.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub echo_timeout: Duration,
    /// NAT moves per second, in total (each moves one random client to a new tuple).
    #[arg(long, default_value_t = 0.0)]
    pub churn_per_sec: f64,
    /// What a move changes: a new address (and port), or only the port.
    #[arg(long, value_enum, default_value_t = MoveKind::Addr)]
    pub move_kind: MoveKind,
    /// Move every client at once this far into the measured phase (e.g. 5s) [default: no
    /// storm].
    #[arg(long, value_parser = parse_duration)]
    pub storm_at: Option<Duration>,
    /// Repeat the storm this often after --storm-at [default: once].
    #[arg(long, value_parser = parse_duration, requires = "storm_at")]
    pub storm_every: Option<Duration>,
    /// Attack traffic to mix in (repeatable or comma-separated; "all" for every mode)
    /// [default: none].
    #[arg(
        long = "attack",
        value_delimiter = ',',
        value_parser = clap::builder::TypedValueParser::try_map(attack_values(), |s: String| parse_attack(&s))
    )]
    pub attacks: Vec<Vec<AttackMode>>,
    /// Attack datagrams per second, per mode.
    #[arg(long, default_value_t = 200.0)]
    pub attack_rate: f64,
    /// Source tuples per attack mode.
    #[arg(long, default_value_t = 32)]
    pub attack_tuples: usize,
    /// The host's clients file: the generator enrolls its clients there for the run and
    /// removes them again when it ends, unless --keep-clients or --save-credentials
    /// [default: none; then --credentials must hold enough clients].
    #[arg(long)]
    pub clients_file: Option<PathBuf>,
    /// Leave the clients enrolled into --clients-file there after the run.
    #[arg(long)]
    pub keep_clients: bool,
    /// Reuse saved credentials (JSON lines of {name, client_id, psk}) instead of enrolling
    /// [default: none, enroll every client].
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// Save the credentials used (JSON lines, mode 0600) for a later --credentials run; the
    /// enrolled clients then stay in --clients-file [default: not saved].
    #[arg(long)]
    pub save_credentials: Option<PathBuf>,
    /// Name prefix for enrolled clients [default: loadgen-PID-RANDOM-].
    #[arg(long)]
    pub name_prefix: Option<String>,
    /// Client source addresses: comma-separated IPs and IPv4 CIDR blocks
    /// (default: spread over 127.1.0.0 - 127.199.255.255, at most 254 per /24).
    #[arg(long)]
    pub source_addrs: Option<String>,
    /// New handshakes per second while connecting.
    #[arg(long, default_value_t = 5000.0)]
    pub connect_rate: f64,
    /// Give up on clients not connected after this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Wait up to this long for the host to pick up newly enrolled clients.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub enroll_wait: Duration,
    /// After the measured phase, keep load running up to this long for moved clients to recover.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub settle: Duration,
    /// Fail when the steady-state loss (packets not sent during a client's outage) exceeds
    /// this percentage [default: no limit].
    #[arg(long)]
    pub max_loss: Option<f64>,
    /// What a moved client does at once: nothing (it notices when its load next sends),
    /// send DATA (again every 500 ms until its rebind starts), or notify (the app is told its
    /// network changed and sends a cookie request).
    #[arg(long, value_enum, default_value_t = OnMove::None)]
    pub on_move: OnMove,
    /// Bind the sockets storm moves go to before each storm (and close the old ones after),
    /// so the storm itself only swaps descriptors; needs two descriptors per client.
    #[arg(long)]
    pub storm_prebind: bool,
    /// The clients are behind a NAT: a moved client has recovered at its first rebind
    /// acknowledgement (which names the NAT's tuple, not the client's own).
    #[arg(long)]
    pub behind_nat: bool,
    /// Processes to spread the clients over; each has its own RLIMIT_NOFILE, and a client
    /// needs a socket (0 = auto: as few as the hard limit allows; 1 = this process only).
    #[arg(long, default_value_t = 0)]
    pub processes: usize,
    /// Internal: this process is child I of N, with clients FIRST.. of TOTAL.
    #[arg(long, hide = true, value_parser = ChildRole::parse)]
    pub shard: Option<ChildRole>,
    /// Rotation mode: ask the gateway for a key rotation this far into the measured phase
    /// (seconds, or e.g. 2s, 1500ms; comma-separated or repeated for several, increasing).
    /// Each rotation's command latency and answer are reported, and every client's
    /// installation of the new epoch's keys (delivered in-band) is timed from the rotation:
    /// p50/p90/p99/max, how many live clients got them, how many switched to them. The run
    /// fails if a rotation command fails or a live client never installed the last
    /// rotation's keys. Needs --admin and --admin-key [default: no rotation].
    #[arg(long, value_delimiter = ',', value_parser = parse_duration)]
    pub rotate_at: Vec<Duration>,
    /// With --rotate-at: the gateway's admin address, HOST:PORT [default: none; required
    /// with --rotate-at].
    #[arg(long)]
    pub admin: Option<String>,
    /// With --rotate-at: the gateway's admin key file (its admin_key, e.g.
    /// STATE_DIR/admin.key; mode 0600) [default: none; required with --rotate-at].
    #[arg(long)]
    pub admin_key: Option<PathBuf>,
    /// With --rotate-at: rotate even during the previous rotation's grace period (the
    /// gateway drops the clients still on the epoch before; they handshake again).
    #[arg(long)]
    pub rotate_force: bool,
    /// Append a line "CLIENT_NUMBER CLOCK_MONOTONIC_NS" to FILE for every rebind
    /// acknowledgement a client receives (written once per event-loop turn, one write per
    /// turn, so the processes of a multi-process run may share the file). For a driver that
    /// moves the clients itself (a NAT) and times each client's recovery on its own clock
    /// [default: none].
    #[arg(long, value_name = "FILE")]
    pub rebound_log: Option<PathBuf>,
    /// Print the report as JSON on stdout (the human report is not printed).
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file (whatever is printed) [default: none].
    #[arg(long)]
    pub report_json: Option<PathBuf>,
    /// No live progress line on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Every attack mode, with its help, and "all".
fn attack_values() -> clap::builder::PossibleValuesParser {
    use clap::ValueEnum as _;
    let mut v: Vec<clap::builder::PossibleValue> = AttackMode::value_variants()
        .iter()
        .filter_map(|m| m.to_possible_value())
        .collect();
    v.push(clap::builder::PossibleValue::new("all").help("Every mode above"));
    clap::builder::PossibleValuesParser::new(v)
}

fn parse_attack(s: &str) -> Result<Vec<AttackMode>, String> {
    use clap::ValueEnum as _;
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(AttackMode::ALL.to_vec());
    }
    AttackMode::from_str(s.trim(), true)
        .map(|m| vec![m])
        .map_err(|_| {
            format!(
                "unknown attack {s:?} (expected garbage, wrong-r, wrong-slot, replay, \
                 handshake-flood or all)"
            )
        })
}

impl LoadgenArgs {
    pub fn into_options(self) -> anyhow::Result<LoadgenOptions> {
        let mut o = LoadgenOptions::new(self.gateways);
        o.clients = self.clients;
        o.threads = self.threads;
        o.duration = self.duration;
        o.load = match (self.window, self.rate) {
            (Some(window), _) => LoadMode::Closed { window },
            (None, Some(rate)) => LoadMode::Open { rate },
            (None, None) => LoadMode::Open { rate: 10_000.0 },
        };
        o.payload = self.payload;
        o.echo_timeout = self.echo_timeout;
        o.churn_per_sec = self.churn_per_sec;
        o.move_kind = self.move_kind;
        o.storm_at = self.storm_at;
        o.storm_every = self.storm_every;
        let mut attacks: Vec<AttackMode> = Vec::new();
        for m in self.attacks.into_iter().flatten() {
            if !attacks.contains(&m) {
                attacks.push(m);
            }
        }
        o.attacks = attacks;
        o.attack_rate = self.attack_rate;
        o.attack_tuples = self.attack_tuples;
        o.clients_file = self.clients_file;
        o.keep_clients = self.keep_clients;
        o.credentials = self.credentials;
        o.save_credentials = self.save_credentials;
        o.name_prefix = self.name_prefix;
        o.source_addrs = self
            .source_addrs
            .as_deref()
            .map(AddrPool::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        o.connect_rate = self.connect_rate;
        o.connect_timeout = self.connect_timeout;
        o.enroll_wait = self.enroll_wait;
        o.settle = self.settle;
        o.max_loss_pct = self.max_loss;
        o.on_move = self.on_move;
        o.storm_prebind = self.storm_prebind;
        o.behind_nat = self.behind_nat;
        o.processes = self.processes;
        o.child = self.shard;
        o.rotate_at = self.rotate_at;
        o.admin = self.admin;
        o.admin_key = self.admin_key;
        o.rotate_force = self.rotate_force;
        o.rebound_log = self.rebound_log;
        o.validate().map_err(anyhow::Error::msg)?;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    fn parse(args: &[&str]) -> anyhow::Result<LoadgenOptions> {
        let mut v = vec!["loadgen"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)?.args.into_options()
    }

    #[test]
    fn payload_specs() {
        assert_eq!(PayloadSizes::parse("64"), Ok(PayloadSizes::Fixed(64)));
        assert_eq!(
            PayloadSizes::parse("64,300, 1200"),
            Ok(PayloadSizes::List(vec![64, 300, 1200]))
        );
        assert_eq!(
            PayloadSizes::parse("64-1200"),
            Ok(PayloadSizes::Range(64, 1200))
        );
        assert_eq!(PayloadSizes::parse("100-100"), Ok(PayloadSizes::Fixed(100)));
        for bad in ["8", "1201", "300-64", "x", "64,", ""] {
            assert!(PayloadSizes::parse(bad).is_err(), "{bad:?}");
        }
        let r = PayloadSizes::Range(64, 66);
        let picks: std::collections::BTreeSet<usize> = (0..30).map(|i| r.pick(i)).collect();
        assert_eq!(picks.into_iter().collect::<Vec<_>>(), vec![64, 65, 66]);
        assert_eq!(PayloadSizes::parse("64,300").unwrap().to_string(), "64,300");
    }

    #[test]
    fn full_command_line() {
        let o = parse(&[
            "--gateway=127.0.0.1:7400",
            "--gateway",
            "127.0.0.1:7401",
            "--clients=4096",
            "--threads=2",
            "--duration=3s",
            "--window=4",
            "--payload=64-300",
            "--churn-per-sec=50",
            "--storm-at=1s",
            "--storm-every=500ms",
            "--attack=garbage,replay",
            "--attack",
            "wrong-r",
            "--attack=garbage",
            "--clients-file=/tmp/x.toml",
            "--source-addrs=127.8.0.0/16",
            "--max-loss=1.5",
        ])
        .unwrap();
        assert_eq!(o.gateways.len(), 2);
        assert_eq!(o.clients, 4096);
        assert_eq!(o.load, LoadMode::Closed { window: 4 });
        assert_eq!(o.payload, PayloadSizes::Range(64, 300));
        assert_eq!(
            o.attacks,
            vec![AttackMode::Garbage, AttackMode::Replay, AttackMode::WrongR]
        );
        assert_eq!(
            o.storm_times(),
            vec![
                Duration::from_millis(1000),
                Duration::from_millis(1500),
                Duration::from_millis(2000),
                Duration::from_millis(2500)
            ]
        );
        assert_eq!(o.max_loss_pct, Some(1.5));
        assert_eq!(o.source_addrs.unwrap().len(), 256 * 254);

        let all = parse(&[
            "--gateway=127.0.0.1:1",
            "--credentials=c.jsonl",
            "--attack=all",
        ])
        .unwrap();
        assert_eq!(all.attacks, AttackMode::ALL.to_vec());
        assert_eq!(all.load, LoadMode::Open { rate: 10_000.0 });
        assert_eq!(all.storm_times(), vec![]);
    }

    #[test]
    fn bad_command_lines_name_the_flag() {
        let err = |a: &[&str]| parse(a).unwrap_err().to_string();
        assert!(err(&["--gateway=127.0.0.1:1"]).contains("--clients-file"));
        assert!(
            err(&["--gateway=127.0.0.1:1", "--clients-file=f", "--window=0"]).contains("--window")
        );
        assert!(
            err(&[
                "--gateway=127.0.0.1:1",
                "--clients-file=f",
                "--rate=1",
                "--window=2"
            ])
            .contains("cannot be used")
        );
        let e = err(&["--gateway=127.0.0.1:1", "--clients-file=f", "--attack=nope"]);
        assert!(e.contains("--attack") && e.contains("wrong-slot"), "{e}");
        assert!(
            err(&[
                "--gateway=127.0.0.1:1",
                "--clients-file=f",
                "--source-addrs=::1"
            ])
            .contains("family")
        );
        assert!(
            err(&["--gateway=127.0.0.1:1", "--clients-file=f", "--payload=8"]).contains("outside")
        );
    }

    #[test]
    fn rotation_mode_options() {
        let base = [
            "--gateway=127.0.0.1:1",
            "--clients-file=f",
            "--duration=36s",
        ];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v)
        };
        let o = with(&[
            "--rotate-at=2,16.5",
            "--rotate-at",
            "20s",
            "--admin=localhost:7480",
            "--admin-key=/var/lib/rebindgw/admin.key",
        ])
        .unwrap();
        assert_eq!(
            o.rotate_at,
            vec![
                Duration::from_secs(2),
                Duration::from_millis(16_500),
                Duration::from_secs(20)
            ]
        );
        assert_eq!(o.admin.as_deref(), Some("localhost:7480"));
        assert_eq!(
            o.admin_key.as_deref(),
            Some(std::path::Path::new("/var/lib/rebindgw/admin.key"))
        );
        assert!(!o.rotate_force);
        let o = with(&[
            "--rotate-at=1",
            "--admin=a:1",
            "--admin-key=k",
            "--rotate-force",
        ])
        .unwrap();
        assert!(o.rotate_force);
        // No rotation: nothing set.
        let o = with(&[]).unwrap();
        assert!(o.rotate_at.is_empty() && o.admin.is_none() && o.admin_key.is_none());

        let err = |a: &[&str]| with(a).unwrap_err().to_string();
        assert!(err(&["--rotate-at=2"]).contains("--admin HOST:PORT"));
        assert!(err(&["--rotate-at=2", "--admin=a:1"]).contains("--admin-key"));
        assert!(err(&["--rotate-at=2", "--admin-key=k"]).contains("--admin HOST:PORT"));
        assert!(err(&["--admin=a:1"]).contains("only go with --rotate-at"));
        assert!(err(&["--admin-key=k"]).contains("only go with --rotate-at"));
        assert!(err(&["--rotate-force"]).contains("only go with --rotate-at"));
        let e = err(&["--rotate-at=16,2", "--admin=a:1", "--admin-key=k"]);
        assert!(e.contains("--rotate-at") && e.contains("increasing"), "{e}");
        let e = err(&["--rotate-at=2,2", "--admin=a:1", "--admin-key=k"]);
        assert!(e.contains("increasing"), "{e}");
        let e = err(&["--rotate-at=36", "--admin=a:1", "--admin-key=k"]);
        assert!(e.contains("measured phase"), "{e}");
        let e = err(&["--rotate-at=soon", "--admin=a:1", "--admin-key=k"]);
        assert!(e.contains("--rotate-at"), "{e}");
        let many: Vec<String> = (0..=MAX_ROTATIONS)
            .map(|i| format!("{}ms", i + 1))
            .collect();
        let arg = format!("--rotate-at={}", many.join(","));
        let e = err(&[&arg, "--admin=a:1", "--admin-key=k"]);
        assert!(e.contains("at most 64"), "{e}");
        // A child of a multi-process run measures only: it needs no admin endpoint.
        let o = with(&["--rotate-at=2", "--shard=1/2/5/10"]).unwrap();
        assert_eq!(o.rotate_at, vec![Duration::from_secs(2)]);
    }
}
