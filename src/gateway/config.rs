//! Gateway configuration: a TOML file, every key also a command-line flag, flags win.
//! Errors name the key and the problem.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::core::CoreConfig;
use super::ratelimit::Rate;
use crate::io::IoBackend;
use crate::io::xdp::XdpMode;
use crate::logging::LogFormat;

/// The largest `max_connections` accepted: its memory is reserved at start-up.
pub const MAX_CONNECTIONS_LIMIT: usize = 1 << 22;

/// Where the registry and the generated master key live unless `state_dir` says otherwise:
/// an absolute path, so the state does not depend on the working directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/rebindgw";

/// One host on the host link.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    /// The host's host-link address.
    pub addr: SocketAddr,
    /// File holding the 16-byte link key as 32 hex digits (mode 0600).
    pub link_key_file: PathBuf,
}

/// Declares a group of settings once: each row gives the config key (a field of the config
/// struct, read from TOML by serde), its type, its default, the type of its command-line flag
/// and the flag's help text (the row's doc comment, with the default rendered from the same
/// default value). It generates
///
/// * the config struct (serde `default` and `deny_unknown_fields`) and its `Default`,
/// * the flags struct (`clap::Args`; a flag not given is `None`, empty or `false`) with
///   `apply_to`, which puts every given flag over a config (flags win over the file),
/// * `KEYS`: every key with whether a SIGHUP reload applies it (`live`) or not (`restart`),
/// * `shown_defaults`: each flag's id and the default its help shows.
///
/// The flag type decides how a given flag lands on the key (see [`Overlay`]): `Option<T>` over
/// `T` or `Option<T>` sets it, `Vec<T>` over `Vec<T>` replaces it when given at least once,
/// `bool` over `bool` turns it on. `tables` are nested TOML tables declared by their own
/// `settings!`, whose flags are flattened in; `file_only` keys have no flag.
macro_rules! settings {
    (@live live) => { true };
    (@live restart) => { false };
    (
        $(#[doc = $sdoc:literal])*
        pub struct $Config:ident, flags $Flags:ident {
            $(
                $(#[doc = $doc:literal])*
                $(#[arg($($arg:tt)*)])*
                $mode:ident $name:ident: $ty:ty = $default:expr, flag $fty:ty $(, none = $none:literal)?;
            )*
        }
        tables {
            $(
                $(#[doc = $tdoc:literal])*
                $tmode:ident $tname:ident: $tty:ident, flags $tflags:ident;
            )*
        }
        file_only {
            $(
                $(#[doc = $fdoc:literal])*
                $fmode:ident $fname:ident: $fty_:ty = $fdefault:expr;
            )*
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $Config {
            $($(#[doc = $doc])* pub $name: $ty,)*
            $($(#[doc = $tdoc])* pub $tname: $tty,)*
            $($(#[doc = $fdoc])* pub $fname: $fty_,)*
        }

        impl Default for $Config {
            fn default() -> Self {
                $Config {
                    $($name: $default,)*
                    $($tname: $tty::default(),)*
                    $($fname: $fdefault,)*
                }
            }
        }

        impl $Config {
            /// Every key, and whether a reload puts a change in force.
            pub const KEYS: &'static [Key] = &[
                $(Key { name: stringify!($name), live: settings!(@live $mode) },)*
                $(Key { name: stringify!($tname), live: settings!(@live $tmode) },)*
                $(Key { name: stringify!($fname), live: settings!(@live $fmode) },)*
            ];
        }

        #[doc = concat!("The command-line flags of [`", stringify!($Config), "`]'s keys.")]
        #[derive(Clone, Debug, Default, clap::Args)]
        pub struct $Flags {
            $(
                #[arg(long, help = help_text(&[$($doc),*], shown_default(&<$fty>::default(), &{ let d: $ty = $default; d }, settings!(@none $($none)?))))]
                $(#[arg($($arg)*)])*
                pub $name: $fty,
            )*
            $(
                #[command(flatten)]
                pub $tname: $tflags,
            )*
        }

        impl $Flags {
            /// Puts every flag given over `config`.
            pub fn apply_to(&self, config: &mut $Config) {
                $(Overlay::overlay(&self.$name, &mut config.$name);)*
                $(self.$tname.apply_to(&mut config.$tname);)*
            }

            /// Each flag's id and the default its help text shows (none for switches).
            pub fn shown_defaults() -> Vec<(&'static str, Option<ShownDefault>)> {
                #[allow(unused_mut)]
                let mut all = vec![$((
                    stringify!($name),
                    shown_default(&<$fty>::default(), &{ let d: $ty = $default; d }, settings!(@none $($none)?)),
                ),)*];
                $(all.extend($tflags::shown_defaults());)*
                all
            }
        }
    };
    (@none) => { None };
    (@none $none:literal) => { Some($none) };
}

/// A config key and whether a SIGHUP reload applies a change to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    pub live: bool,
}

/// How a given flag lands on its key (the flag types of `settings!`).
pub trait Overlay<T> {
    fn overlay(&self, key: &mut T);
}

impl<T: Clone> Overlay<T> for Option<T> {
    fn overlay(&self, key: &mut T) {
        if let Some(v) = self {
            *key = v.clone();
        }
    }
}

impl<T: Clone> Overlay<Option<T>> for Option<T> {
    fn overlay(&self, key: &mut Option<T>) {
        if let Some(v) = self {
            *key = Some(v.clone());
        }
    }
}

impl<T: Clone> Overlay<Vec<T>> for Vec<T> {
    fn overlay(&self, key: &mut Vec<T>) {
        if !self.is_empty() {
            key.clone_from(self);
        }
    }
}

impl Overlay<bool> for bool {
    fn overlay(&self, key: &mut bool) {
        if *self {
            *key = true;
        }
    }
}

/// A default as its flag takes it (lists as `A and B`); `none` for an unset or empty one.
pub trait ShowDefault {
    fn show(&self) -> String;
}

macro_rules! show_by_display {
    ($($t:ty),*) => {$(
        impl ShowDefault for $t {
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
show_by_display!(
    u16, u64, usize, bool, String, SocketAddr, IoBackend, XdpMode
);

impl ShowDefault for PathBuf {
    fn show(&self) -> String {
        self.display().to_string()
    }
}

impl ShowDefault for Rate {
    fn show(&self) -> String {
        format!("{}/{}", self.per_second, self.burst)
    }
}

impl ShowDefault for HostEntry {
    fn show(&self) -> String {
        format!("{}={}", self.addr, self.link_key_file.display())
    }
}

impl<T: ShowDefault> ShowDefault for Vec<T> {
    fn show(&self) -> String {
        if self.is_empty() {
            return "none".into();
        }
        let all: Vec<String> = self.iter().map(ShowDefault::show).collect();
        all.join(" and ")
    }
}

impl<T: ShowDefault> ShowDefault for Option<T> {
    fn show(&self) -> String {
        self.as_ref()
            .map_or_else(|| "none".into(), ShowDefault::show)
    }
}

/// The default a flag's help shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShownDefault {
    pub text: String,
    /// The text is the default value as the flag takes it (not a description of an unset
    /// default).
    pub literal: bool,
}

/// What a flag's help shows as its default: nothing for a switch (a `bool` flag), `none_text`
/// for an unset or empty default that has one, else the default itself.
fn shown_default<F: 'static, T: ShowDefault>(
    _flag: &F,
    default: &T,
    none_text: Option<&str>,
) -> Option<ShownDefault> {
    if std::any::TypeId::of::<F>() == std::any::TypeId::of::<bool>() {
        return None;
    }
    let shown = default.show();
    Some(match none_text {
        Some(text) if shown == "none" => ShownDefault {
            text: text.to_string(),
            literal: false,
        },
        _ => ShownDefault {
            text: shown,
            literal: true,
        },
    })
}

/// A flag's help: its doc comment's lines joined, then `[default: ...]`.
fn help_text(doc: &[&str], default: Option<ShownDefault>) -> String {
    let lines: Vec<&str> = doc.iter().map(|l| l.trim()).collect();
    let text = lines.join(" ");
    let text = text.trim().trim_end_matches('.');
    match default {
        Some(d) => format!("{text} [default: {}]", d.text),
        None => text.to_string(),
    }
}

fn default_listen() -> Vec<SocketAddr> {
    vec![
        SocketAddr::from(([0, 0, 0, 0], 7400)),
        SocketAddr::from(([0u16; 8], 7400)),
    ]
}

settings! {
    /// The `[rate_limits]` table: per_second / burst, split evenly over the workers.
    pub struct RateLimits, flags RateLimitFlags {
        /// UNRECOGNIZED replies per source prefix (/24, /56), PER_SECOND/BURST.
        #[arg(value_parser = parse_rate)]
        live unrecognized_per_prefix: Rate = CoreConfig::new(16).unrecognized_prefix,
            flag Option<Rate>;
        /// UNRECOGNIZED replies for the whole gateway, PER_SECOND/BURST.
        #[arg(value_parser = parse_rate)]
        live unrecognized_global: Rate = CoreConfig::new(16).unrecognized_global,
            flag Option<Rate>;
        /// HANDSHAKEs forwarded per source prefix, PER_SECOND/BURST.
        #[arg(value_parser = parse_rate)]
        live handshake_per_prefix: Rate = CoreConfig::new(16).handshake_prefix,
            flag Option<Rate>;
        /// HANDSHAKEs forwarded for the whole gateway, PER_SECOND/BURST.
        #[arg(value_parser = parse_rate)]
        live handshake_global: Rate = CoreConfig::new(16).handshake_global, flag Option<Rate>;
    }
    tables {}
    file_only {}
}

settings! {
    /// The `[cluster]` table: several gateways behind ECMP share one registry in etcd
    /// (docs/cluster.md; needs a build with `--features cluster`). Without endpoints the
    /// gateway is the single-node gateway with its registry in the state directory.
    pub struct ClusterConfig, flags ClusterFlags {
        /// etcd client URL, http://HOST:PORT (repeatable; several for failover). Setting it
        /// turns cluster mode on.
        #[arg(long = "etcd-endpoint")]
        restart endpoints: Vec<String> = Vec::new(), flag Vec<String>,
            none = "none: single node";
        /// The cluster's name: its keys live under /rebindgw/NAME in etcd.
        #[arg(long = "cluster-name")]
        restart name: String = "default".to_string(), flag Option<String>;
        /// This gateway's id in the cluster, 0..=65535, unique among the live gateways.
        restart gateway_id: Option<u16> = None, flag Option<u16>,
            none = "none; needed in cluster mode";
        /// Seconds after a gateway dies until the others see its lease end.
        #[arg(long = "cluster-lease-ttl-secs")]
        restart lease_ttl_secs: u64 = 5, flag Option<u64>;
        /// Bound on each etcd operation, in milliseconds; a REBIND or REGISTER not committed
        /// in time is refused (the client retries).
        #[arg(long = "etcd-timeout-ms")]
        restart timeout_ms: u64 = 1000, flag Option<u64>;
    }
    tables {}
    file_only {}
}

impl ClusterConfig {
    /// Cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.endpoints.is_empty()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        if !cfg!(feature = "cluster") {
            return Err(invalid(
                "cluster.endpoints",
                "this rebindgw was built without cluster mode; build it with \
                 `cargo build --release --features cluster` (needs protoc)",
            ));
        }
        for e in &self.endpoints {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains('/')) {
                return Err(invalid(
                    "cluster.endpoints",
                    format!("`{e}` is not an etcd client URL like http://10.0.0.1:2379"),
                ));
            }
        }
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(invalid(
                "cluster.name",
                format!(
                    "must be 1 to 64 of A-Z a-z 0-9 - _, got `{}`",
                    self.name.escape_debug()
                ),
            ));
        }
        if self.gateway_id.is_none() {
            return Err(invalid(
                "cluster.gateway_id",
                "cluster mode needs this gateway's id (unique among the cluster's gateways)",
            ));
        }
        if !(1..=60).contains(&self.lease_ttl_secs) {
            return Err(invalid(
                "cluster.lease_ttl_secs",
                format!("must be in 1..=60, got {}", self.lease_ttl_secs),
            ));
        }
        if !(50..=30_000).contains(&self.timeout_ms) {
            return Err(invalid(
                "cluster.timeout_ms",
                format!("must be in 50..=30000, got {}", self.timeout_ms),
            ));
        }
        Ok(())
    }
}

settings! {
    /// Everything `rebindgw gateway` reads: every key but log_format is also a flag.
    pub struct GatewayConfig, flags GatewayFlags {
        /// Client-facing address (repeatable; replaces the key listen). Every worker binds
        /// each with SO_REUSEPORT.
        restart listen: Vec<SocketAddr> = default_listen(), flag Vec<SocketAddr>;
        /// Host as ADDR=LINK_KEY_FILE (repeatable; replaces the key hosts).
        #[arg(long = "host", value_parser = parse_host)]
        live hosts: Vec<HostEntry> = Vec::new(), flag Vec<HostEntry>,
            none = "none; at least one is needed";
        /// Local address of the workers' host-link sockets; must reach every host (port 0:
        /// one ephemeral port per worker).
        restart host_link: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0)),
            flag Option<SocketAddr>;
        /// Admin address: Prometheus /metrics and /healthz.
        restart admin: Option<SocketAddr> = Some(SocketAddr::from(([127, 0, 0, 1], 7480))),
            flag Option<SocketAddr>;
        /// State directory: the registry and, by default, the master key; must be the
        /// gateway user's own, mode 0700.
        restart state_dir: PathBuf = PathBuf::from(DEFAULT_STATE_DIR), flag Option<PathBuf>;
        /// Start even if the registry is damaged: move bad records (or an unreadable file)
        /// aside (docs/persistence.md).
        restart set_aside_corrupt: bool = false, flag bool;
        /// Master secret file (rebindgw keygen).
        restart master_key: Option<PathBuf> = None, flag Option<PathBuf>,
            none = "STATE_DIR/master.key, created on first start";
        /// S, slots per key set, 1..=32.
        restart slots: usize = 16, flag Option<usize>;
        /// W, the freshness window in seconds.
        restart window_secs: u64 = 30, flag Option<u64>;
        /// Workers; 0 is one per core.
        restart workers: usize = 0, flag Option<usize>;
        /// Connection capacity, reserved at start; 0 is min(2^S, 2^20).
        restart max_connections: usize = 0, flag Option<usize>;
        /// I/O backend: uring, mmsg or xdp (AF_XDP, docs/xdp.md; xdp falls back to uring
        /// and uring to mmsg if unusable).
        restart io: IoBackend = IoBackend::Uring, flag Option<IoBackend>;
        /// io = xdp: the interface to attach to.
        restart xdp_interface: Option<String> = None, flag Option<String>,
            none = "the interface that has the listen addresses";
        /// io = xdp: auto (native, else skb), native or skb.
        restart xdp_mode: XdpMode = XdpMode::Auto, flag Option<XdpMode>;
        /// Log filter, e.g. info or warn,rebindgw=debug; SIGHUP applies a changed config
        /// value.
        live log_level: Option<String> = None, flag Option<String>,
            none = "RUST_LOG, else warn,rebindgw=info";
        /// Release connections with no client datagram for this many seconds (their host is
        /// told); 0 never.
        restart idle_timeout_secs: u64 = super::core::DEFAULT_IDLE_TIMEOUT_SECS,
            flag Option<u64>;
        /// Start a new key epoch this many seconds after the last one (e.g. 86400); 0 only
        /// on command (rebindgw rotate).
        restart rotate_every_secs: u64 = 0, flag Option<u64>;
        /// Seconds the previous key epoch stays accepted after a rotation; at least
        /// 2 x window_secs.
        restart grace_secs: Option<u64> = None, flag Option<u64>,
            none = "max(600, 2 x window_secs)";
        /// Admin key file authenticating rebindgw rotate (HMAC; docs/endpoints.md).
        restart admin_key: Option<PathBuf> = None, flag Option<PathBuf>,
            none = "STATE_DIR/admin.key, created on first start";
    }
    tables {
        /// Rate limits for UNRECOGNIZED replies and HANDSHAKE forwarding.
        live rate_limits: RateLimits, flags RateLimitFlags;
        /// Cluster mode: etcd endpoints, cluster name, this gateway's id.
        restart cluster: ClusterConfig, flags ClusterFlags;
    }
    file_only {
        /// text or json (one object per line); a restart applies a change. The flag is the
        /// global --log-format.
        restart log_format: LogFormat = LogFormat::Text;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

impl GatewayConfig {
    pub fn from_file(path: &Path) -> Result<GatewayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<GatewayConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks every setting; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(invalid("listen", "needs at least one address"));
        }
        if self.listen.len() > 8 {
            return Err(invalid("listen", "at most 8 addresses"));
        }
        if !(1..=32).contains(&self.slots) {
            return Err(invalid(
                "slots",
                format!("must be in 1..=32, got {}", self.slots),
            ));
        }
        if self.window_secs == 0 || self.window_secs > 3600 {
            return Err(invalid(
                "window_secs",
                format!("must be in 1..=3600, got {}", self.window_secs),
            ));
        }
        if self.workers > 64 {
            return Err(invalid(
                "workers",
                format!("at most 64, got {}", self.workers),
            ));
        }
        if self.hosts.is_empty() {
            return Err(invalid(
                "hosts",
                "needs at least one host (addr and link_key_file)",
            ));
        }
        if self.hosts.len() > usize::from(u16::MAX) {
            return Err(invalid("hosts", "too many hosts"));
        }
        for h in &self.hosts {
            check_host_link_reaches(self.host_link, h.addr)?;
        }
        if let Some(level) = &self.log_level {
            crate::logging::filter_for(Some(level)).map_err(|e| invalid("log_level", e))?;
        }
        if self.max_connections > MAX_CONNECTIONS_LIMIT {
            return Err(invalid(
                "max_connections",
                format!(
                    "{} exceeds {MAX_CONNECTIONS_LIMIT}: the tables and registry are reserved up front \
                     (about 240 bytes per connection)",
                    self.max_connections
                ),
            ));
        }
        if self.max_connections as u64 > 1u64 << self.slots {
            return Err(invalid(
                "max_connections",
                format!(
                    "{} exceeds the index space 2^{}",
                    self.max_connections, self.slots
                ),
            ));
        }
        if self.idle_timeout_secs > 30 * 86_400 {
            return Err(invalid(
                "idle_timeout_secs",
                format!("at most 30 days, got {}", self.idle_timeout_secs),
            ));
        }
        let grace = self.grace();
        if grace.as_secs() < 2 * self.window_secs {
            return Err(invalid(
                "grace_secs",
                format!(
                    "must be at least 2 x window_secs = {} (a client that last rebound just \
                     before a rotation must get a whole window to rebind again), got {}",
                    2 * self.window_secs,
                    grace.as_secs()
                ),
            ));
        }
        if grace.as_secs() > 30 * 86_400 {
            return Err(invalid(
                "grace_secs",
                format!("at most 30 days, got {}", grace.as_secs()),
            ));
        }
        if self.rotate_every_secs != 0 && self.rotate_every_secs <= grace.as_secs() {
            return Err(invalid(
                "rotate_every_secs",
                format!(
                    "must be 0 or longer than the grace period ({} s), or each rotation would \
                     cut the previous grace short; got {}",
                    grace.as_secs(),
                    self.rotate_every_secs
                ),
            ));
        }
        self.cluster.validate()?;
        let r = &self.rate_limits;
        for (key, rate) in [
            (
                "rate_limits.unrecognized_per_prefix",
                r.unrecognized_per_prefix,
            ),
            ("rate_limits.unrecognized_global", r.unrecognized_global),
            ("rate_limits.handshake_per_prefix", r.handshake_per_prefix),
            ("rate_limits.handshake_global", r.handshake_global),
        ] {
            if !(rate.per_second >= 0.0 && rate.burst >= 1.0 && rate.per_second.is_finite()) {
                return Err(invalid(key, "per_second must be >= 0 and burst >= 1"));
            }
        }
        Ok(())
    }

    /// Asks the kernel for a route from `host_link`'s address to each host (a UDP socket
    /// bound there and connected, which sends nothing).
    pub fn probe_host_routes(&self) -> Result<(), ConfigError> {
        for h in &self.hosts {
            let probe = std::net::UdpSocket::bind(SocketAddr::new(self.host_link.ip(), 0))
                .map_err(|e| {
                    invalid(
                        "host_link",
                        format!("cannot bind {}: {e}", self.host_link.ip()),
                    )
                })?;
            probe.connect(h.addr).map_err(|e| {
                invalid(
                    "host_link",
                    format!(
                        "{} has no route to host {}: {e}",
                        self.host_link.ip(),
                        h.addr
                    ),
                )
            })?;
        }
        Ok(())
    }

    pub fn worker_count(&self) -> usize {
        if self.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.workers
        }
    }

    pub fn connection_capacity(&self) -> usize {
        if self.max_connections == 0 {
            1usize << self.slots.min(20)
        } else {
            self.max_connections
        }
    }

    /// The grace period after a rotation.
    pub fn grace(&self) -> Duration {
        Duration::from_secs(
            self.grace_secs
                .unwrap_or_else(|| (2 * self.window_secs).max(600)),
        )
    }

    pub fn admin_key_path(&self) -> PathBuf {
        self.admin_key
            .clone()
            .unwrap_or_else(|| self.state_dir.join("admin.key"))
    }

    pub fn master_key_path(&self) -> PathBuf {
        self.master_key
            .clone()
            .unwrap_or_else(|| self.state_dir.join("master.key"))
    }

    /// The core's view of these settings.
    pub fn core(&self) -> CoreConfig {
        let r = &self.rate_limits;
        CoreConfig {
            slots: self.slots,
            window: Duration::from_secs(self.window_secs),
            max_connections: self.connection_capacity(),
            workers: self.worker_count(),
            unrecognized_prefix: r.unrecognized_per_prefix,
            unrecognized_global: r.unrecognized_global,
            handshake_prefix: r.handshake_per_prefix,
            handshake_global: r.handshake_global,
            limiter_slots: 4096,
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            reply_slots: CoreConfig::new(self.slots).reply_slots,
            // The single-node gateway owns its registry; in a cluster etcd decides.
            commit: if self.cluster.enabled() {
                crate::gateway::core::CommitMode::Deferred
            } else {
                crate::gateway::core::CommitMode::Local
            },
        }
    }
}

/// Refuses a host the host-link sockets cannot send to: another address family, or a loopback
/// `host_link` with a host off this machine (every send would fail, seen only in counters).
fn check_host_link_reaches(link: SocketAddr, host: SocketAddr) -> Result<(), ConfigError> {
    if host.ip().is_unspecified() || host.port() == 0 {
        return Err(invalid(
            "hosts",
            format!("host {host} needs a concrete address and port"),
        ));
    }
    if link.is_ipv4() != host.is_ipv4() {
        return Err(invalid(
            "host_link",
            format!(
                "{link} is {} but host {host} is {}; use a host_link of the host's family",
                if link.is_ipv4() { "IPv4" } else { "IPv6" },
                if host.is_ipv4() { "IPv4" } else { "IPv6" },
            ),
        ));
    }
    if link.ip().is_loopback() && !host.ip().is_loopback() {
        return Err(invalid(
            "host_link",
            format!(
                "{link} is a loopback address and cannot reach host {host}; set host_link to \
                 an address of this machine on the host's network (or {}:0 for any)",
                if link.is_ipv4() { "0.0.0.0" } else { "[::]" }
            ),
        ));
    }
    Ok(())
}

/// Parses `RATE/BURST` (e.g. `2000/4000`) for rate flags.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let (rate, burst) = s
        .split_once('/')
        .ok_or_else(|| format!("expected PER_SECOND/BURST, got {s:?}"))?;
    let per_second = rate
        .trim()
        .parse()
        .map_err(|_| format!("bad rate {rate:?}"))?;
    let burst = burst
        .trim()
        .parse()
        .map_err(|_| format!("bad burst {burst:?}"))?;
    Ok(Rate::new(per_second, burst))
}

/// Parses `ADDR=KEYFILE` for `--host`.
pub fn parse_host(s: &str) -> Result<HostEntry, String> {
    let (addr, file) = s
        .split_once('=')
        .ok_or_else(|| format!("expected ADDR=LINK_KEY_FILE, got {s:?}"))?;
    Ok(HostEntry {
        addr: addr
            .parse()
            .map_err(|_| format!("{addr:?} is not a socket address"))?,
        link_key_file: PathBuf::from(file),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_host(mut c: GatewayConfig) -> GatewayConfig {
        c.hosts.push(HostEntry {
            addr: "127.0.0.1:7500".parse().unwrap(),
            link_key_file: "k".into(),
        });
        c
    }

    #[test]
    fn defaults_are_valid_once_a_host_is_named() {
        let c = GatewayConfig::default();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid { key: "hosts", .. })
        ));
        with_host(c).validate().unwrap();
    }

    #[test]
    fn grace_and_rotation_schedule_are_checked() {
        let mut c = with_host(GatewayConfig::default());
        assert_eq!(c.grace(), Duration::from_secs(600));
        c.window_secs = 600;
        assert_eq!(
            c.grace(),
            Duration::from_secs(1200),
            "at least 2 x W by default"
        );
        c.validate().unwrap();
        c.grace_secs = Some(1199);
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("grace_secs") && e.contains("2 x window_secs = 1200"),
            "{e}"
        );
        c.grace_secs = Some(1200);
        c.rotate_every_secs = 1200;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("rotate_every_secs"), "{e}");
        c.rotate_every_secs = 86_400;
        c.validate().unwrap();
        let t = GatewayConfig::from_toml("rotate_every_secs = 86400\ngrace_secs = 900").unwrap();
        assert_eq!((t.rotate_every_secs, t.grace_secs), (86_400, Some(900)));
    }

    #[test]
    fn toml_roundtrip_and_errors_name_keys() {
        let text = r#"
            listen = ["127.0.0.1:9000"]
            slots = 12
            window_secs = 10
            io = "mmsg"
            [[hosts]]
            addr = "127.0.0.1:7500"
            link_key_file = "/etc/rebindgw/host1.key"
            [rate_limits]
            handshake_per_prefix = { per_second = 5.0, burst = 10.0 }
        "#;
        let c = GatewayConfig::from_toml(text).unwrap();
        assert_eq!(c.slots, 12);
        assert_eq!(c.io, IoBackend::Mmsg);
        assert_eq!(c.rate_limits.handshake_per_prefix, Rate::new(5.0, 10.0));
        assert_eq!(c.connection_capacity(), 4096);
        c.validate().unwrap();

        let err = GatewayConfig::from_toml("slotz = 3").unwrap_err();
        assert!(err.contains("slotz"), "{err}");
        let err = GatewayConfig::from_toml("slots = \"many\"").unwrap_err();
        assert!(err.contains("slots"), "{err}");
        let mut bad = with_host(GatewayConfig::default());
        bad.slots = 40;
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "config key `slots`: must be in 1..=32, got 40"
        );
        let mut bad = with_host(GatewayConfig::default());
        bad.slots = 4;
        bad.max_connections = 17;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("max_connections")
        );
    }

    #[test]
    fn host_link_must_reach_every_host() {
        let mut c = with_host(GatewayConfig::default());
        c.hosts.push(HostEntry {
            addr: "10.0.0.2:7500".parse().unwrap(),
            link_key_file: "k2".into(),
        });
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("`host_link`"), "{err}");
        assert!(err.contains("10.0.0.2:7500"), "{err}");
        c.host_link = "0.0.0.0:0".parse().unwrap();
        c.validate().unwrap();
        c.host_link = "[::]:0".parse().unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("`host_link`") && err.contains("IPv4"), "{err}");
        let mut c = with_host(GatewayConfig::default());
        c.hosts[0].addr = "0.0.0.0:7500".parse().unwrap();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid { key: "hosts", .. })
        ));
    }

    #[test]
    fn host_route_probe() {
        let c = with_host(GatewayConfig::default());
        c.probe_host_routes().unwrap();
        let mut c = with_host(GatewayConfig::default());
        // 192.0.2.1 is TEST-NET-1, never an address of this machine.
        c.host_link = "192.0.2.1:0".parse().unwrap();
        let err = c.probe_host_routes().unwrap_err().to_string();
        assert!(err.contains("`host_link`"), "{err}");
    }

    #[test]
    fn log_settings() {
        let c = GatewayConfig::from_toml("log_level = \"debug\"\nlog_format = \"json\"").unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        with_host(c).validate().unwrap();
        let mut c = with_host(GatewayConfig::default());
        c.log_level = Some("rebindgw=loud".into());
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                key: "log_level",
                ..
            })
        ));
    }

    #[test]
    fn default_state_dir_is_absolute() {
        assert!(GatewayConfig::default().state_dir.is_absolute());
        let c = GatewayConfig::from_toml("set_aside_corrupt = true").unwrap();
        assert!(c.set_aside_corrupt);
    }

    #[test]
    fn a_missing_config_file_shows_the_os_error_once() {
        let err = GatewayConfig::from_file(Path::new("/nonexistent/rebindgw.toml")).unwrap_err();
        let shown = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(
            shown.matches("No such file or directory").count(),
            1,
            "{shown}"
        );
        assert!(shown.contains("/nonexistent/rebindgw.toml"), "{shown}");
    }

    #[test]
    fn flag_parsers() {
        assert_eq!(parse_rate("10/20").unwrap(), Rate::new(10.0, 20.0));
        assert!(parse_rate("10").is_err());
        let h = parse_host("127.0.0.1:1=/x/y.key").unwrap();
        assert_eq!(h.link_key_file, PathBuf::from("/x/y.key"));
        assert!(parse_host("nope").is_err());
    }
}
