//! Gateway counters and their Prometheus text rendering.
//!
//! Each worker owns one [`WorkerMetrics`] and bumps it with relaxed atomic adds (no sharing
//! between cores on the packet path); the admin endpoint sums the workers when scraped.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::io::IoStats;
use crate::time::Ticks;
use crate::verify::RejectReason;

macro_rules! counters {
    ($($id:ident => $name:expr, $labels:literal, $help:literal;)*) => {
        /// Every counter the gateway keeps.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(usize)]
        pub enum C { $($id),* }
        const COUNTERS: &[(C, &str, &str, &str)] = &[$((C::$id, $name, $labels, $help)),*];
    };
}

/// Receive batch sizes (datagrams per `handle_batch`), a histogram.
const BATCH_HISTOGRAM: &str = "rebindgw_worker_rx_batch_size";

counters! {
    RxData => "rebindgw_client_rx_packets_total", "type=\"data\"", "Datagrams received from clients, by type.";
    RxHandshake => "rebindgw_client_rx_packets_total", "type=\"handshake\"", "";
    RxRebind => "rebindgw_client_rx_packets_total", "type=\"rebind\"", "";
    RxWrongDirection => "rebindgw_client_rx_packets_total", "type=\"wrong_direction\"", "";
    RxUnknownType => "rebindgw_client_rx_packets_total", "type=\"unknown\"", "";
    RxKeysAck => "rebindgw_client_rx_packets_total", "type=\"keys_ack\"", "";
    RxDataBytes => "rebindgw_client_rx_bytes_total", "type=\"data\"", "Bytes received from clients, by type.";
    RxHandshakeBytes => "rebindgw_client_rx_bytes_total", "type=\"handshake\"", "";
    RxRebindBytes => "rebindgw_client_rx_bytes_total", "type=\"rebind\"", "";
    RxOtherBytes => "rebindgw_client_rx_bytes_total", "type=\"other\"", "";
    HostRxData => "rebindgw_host_rx_packets_total", "type=\"data\"", "Datagrams received on the host link, by type.";
    HostRxReply => "rebindgw_host_rx_packets_total", "type=\"handshake_reply\"", "";
    HostRxControl => "rebindgw_host_rx_packets_total", "type=\"control\"", "";
    HostRxBytes => "rebindgw_host_rx_bytes_total", "", "Bytes received on the host link.";
    TxClientData => "rebindgw_client_tx_packets_total", "type=\"data\"", "Datagrams sent to clients, by type.";
    TxClientReply => "rebindgw_client_tx_packets_total", "type=\"handshake_reply\"", "";
    TxClientUnrecognized => "rebindgw_client_tx_packets_total", "type=\"unrecognized\"", "";
    TxClientAck => "rebindgw_client_tx_packets_total", "type=\"rebind_ack\"", "";
    TxClientBytes => "rebindgw_client_tx_bytes_total", "", "Bytes sent to clients.";
    TxHostData => "rebindgw_host_tx_packets_total", "type=\"data\"", "Datagrams sent on the host link, by type.";
    TxHostHandshake => "rebindgw_host_tx_packets_total", "type=\"handshake\"", "";
    TxHostControl => "rebindgw_host_tx_packets_total", "type=\"control\"", "";
    TxHostBytes => "rebindgw_host_tx_bytes_total", "", "Bytes sent on the host link.";
    UnknownTuple => "rebindgw_unknown_tuple_total", "", "DATA from tuples bound to no connection.";
    UnrecognizedSent => "rebindgw_unrecognized_sent_total", "", "UNRECOGNIZED messages sent.";
    UnrecognizedSmall => "rebindgw_unrecognized_suppressed_total", "reason=\"trigger_too_small\"", "UNRECOGNIZED messages not sent, by reason.";
    UnrecognizedPrefixRate => "rebindgw_unrecognized_suppressed_total", "reason=\"prefix_rate\"", "";
    UnrecognizedGlobalRate => "rebindgw_unrecognized_suppressed_total", "reason=\"global_rate\"", "";
    RebindAccepted => "rebindgw_rebinds_accepted_total", "", "REBINDs accepted (connection moved).";
    KeysDelivered => "rebindgw_epoch_keys_delivered_total", "", "Connections' new-epoch keys handed to their hosts (EPOCH_KEYS entries, first sends).";
    KeysResent => "rebindgw_epoch_keys_resent_total", "", "EPOCH_KEYS entries sent again, not yet confirmed.";
    KeysAcknowledged => "rebindgw_epoch_keys_acknowledged_total", "", "New-epoch keys their clients acknowledged (KEYS_DELIVERED entries).";
    RebindDuplicate => "rebindgw_rebind_duplicates_total", "", "Duplicate REBINDs answered again.";
    CookieRequest => "rebindgw_cookie_requests_total", "", "Cookie requests (all-zero REBINDs) answered with UNRECOGNIZED.";
    RejectLength => "rebindgw_rebinds_rejected_total", "reason=\"length\"", "REBINDs rejected, by the first check that failed.";
    RejectEpoch => "rebindgw_rebinds_rejected_total", "reason=\"epoch\"", "";
    RejectStale => "rebindgw_rebinds_rejected_total", "reason=\"stale\"", "";
    RejectCookie => "rebindgw_rebinds_rejected_total", "reason=\"cookie\"", "";
    RejectTrial => "rebindgw_rebinds_rejected_total", "reason=\"trial\"", "";
    RejectUnknownIndex => "rebindgw_rebinds_rejected_total", "reason=\"unknown_index\"", "";
    RejectAead => "rebindgw_rebinds_rejected_total", "reason=\"aead\"", "";
    RejectConnId => "rebindgw_rebinds_rejected_total", "reason=\"conn_id\"", "";
    RejectReplay => "rebindgw_rebinds_rejected_total", "reason=\"replay\"", "";
    HandshakeForwarded => "rebindgw_handshakes_forwarded_total", "", "HANDSHAKEs forwarded to a host.";
    HandshakeShort => "rebindgw_handshakes_dropped_total", "reason=\"short\"", "HANDSHAKEs dropped, by reason.";
    HandshakeRate => "rebindgw_handshakes_dropped_total", "reason=\"rate\"", "";
    HandshakeLong => "rebindgw_handshakes_dropped_total", "reason=\"too_long\"", "";
    DropOversize => "rebindgw_dropped_total", "reason=\"oversize\"", "Datagrams dropped, by reason.";
    DropKeysAckUnknownTuple => "rebindgw_dropped_total", "reason=\"keys_ack_unknown_tuple\"", "";
    DropKeysDeliveredEpoch => "rebindgw_dropped_total", "reason=\"keys_delivered_epoch\"", "";
    DropKeysDeliveredUnknown => "rebindgw_dropped_total", "reason=\"keys_delivered_unknown\"", "";
    DropHostBadSource => "rebindgw_dropped_total", "reason=\"host_link_unknown_source\"", "";
    DropHostBadTag => "rebindgw_dropped_total", "reason=\"host_link_bad_tag\"", "";
    DropHostMalformed => "rebindgw_dropped_total", "reason=\"host_link_malformed\"", "";
    DropHostStale => "rebindgw_dropped_total", "reason=\"host_link_stale\"", "";
    DropHostReplay => "rebindgw_dropped_total", "reason=\"host_link_replay\"", "";
    DropHostStaleBoot => "rebindgw_dropped_total", "reason=\"host_link_stale_boot\"", "";
    DropHostNotOwner => "rebindgw_dropped_total", "reason=\"host_link_not_owner\"", "";
    DropReplyUnsolicited => "rebindgw_dropped_total", "reason=\"reply_unsolicited\"", "";
    DropReplyTooLarge => "rebindgw_dropped_total", "reason=\"reply_too_large\"", "";
    DropReplyWrongHost => "rebindgw_dropped_total", "reason=\"reply_wrong_host\"", "";
    DropNoRoute => "rebindgw_dropped_total", "reason=\"no_route\"", "";
    DropTxFull => "rebindgw_dropped_total", "reason=\"tx_queue_full\"", "";
    DropRxError => "rebindgw_dropped_total", "reason=\"rx_error\"", "";
    Registered => "rebindgw_registrations_total", "result=\"ok\"", "Host registrations, by result.";
    RegisterFull => "rebindgw_registrations_total", "result=\"full\"", "";
    RegisterDuplicate => "rebindgw_registrations_total", "result=\"duplicate\"", "";
    RegisterRepeat => "rebindgw_registrations_total", "result=\"retransmit\"", "";
    Closed => "rebindgw_closes_total", "", "Connections closed by hosts.";
    Expired => "rebindgw_connections_expired_total", "", "Connections dropped after idle_timeout_secs without client traffic.";
    HostRestarts => "rebindgw_host_restarts_total", "", "HELLOs with a new host boot id.";
    Released => "rebindgw_connections_released_total", "", "Connections released because their host restarted.";
    TupleTakenOver => "rebindgw_tuples_taken_over_total", "", "Tuples handed from one connection to another (NAT port reuse).";
    CommitProposed => "rebindgw_commits_proposed_total", "", "Registrations and accepted REBINDs proposed to the shared store (cluster mode).";
    CommitCommitted => "rebindgw_commits_total", "result=\"committed\"", "Answers of the shared store to proposed commits, by result.";
    CommitConflict => "rebindgw_commits_total", "result=\"conflict\"", "";
    CommitUnavailable => "rebindgw_commits_total", "result=\"unavailable\"", "";
    CommitUnknown => "rebindgw_commits_total", "result=\"unknown\"", "";
    CommitTimedOut => "rebindgw_commits_total", "result=\"timed_out\"", "";
    CommitLate => "rebindgw_commits_total", "result=\"late\"", "";
    CommitBacklogFull => "rebindgw_commits_total", "result=\"backlog_full\"", "";
    CommitCoalesced => "rebindgw_commits_coalesced_total", "", "REBINDs not proposed because the same client's earlier REBIND (same connection, same tuple) still waits for the store: its ACK answers them.";
    SendNoSocket => "rebindgw_send_errors_total", "reason=\"no_socket\"", "Queued datagrams not sent, by reason.";
    SendSocketFull => "rebindgw_send_errors_total", "reason=\"socket_full\"", "";
    SendRefused => "rebindgw_send_errors_total", "reason=\"refused\"", "";
    RxBuffersExhausted => "rebindgw_rx_buffers_exhausted_total", "", "Times the io_uring receive buffer ring ran dry (the kernel queued or dropped datagrams).";
    XdpRx => "rebindgw_xdp_datagrams_total", "path=\"rx\"", "io = xdp: frames received on AF_XDP sockets, datagrams sent as AF_XDP frames, and client datagrams sent through the kernel socket instead (no neighbour entry, too long, no free frame).";
    XdpTx => "rebindgw_xdp_datagrams_total", "path=\"tx\"", "";
    XdpKernelTx => "rebindgw_xdp_datagrams_total", "path=\"kernel_tx\"", "";
    // The receive batch size histogram (rendered cumulatively, see `render`).
    Batch1 => BATCH_HISTOGRAM, "le=\"1\"", "";
    Batch2 => BATCH_HISTOGRAM, "le=\"3\"", "";
    Batch4 => BATCH_HISTOGRAM, "le=\"7\"", "";
    Batch8 => BATCH_HISTOGRAM, "le=\"15\"", "";
    Batch16 => BATCH_HISTOGRAM, "le=\"31\"", "";
    Batch32 => BATCH_HISTOGRAM, "le=\"63\"", "";
    Batch64 => BATCH_HISTOGRAM, "le=\"+Inf\"", "";
    BatchDatagrams => BATCH_HISTOGRAM, "", "";
}

const N: usize = COUNTERS.len();

impl C {
    pub fn reject(r: RejectReason) -> C {
        match r {
            RejectReason::Length => C::RejectLength,
            RejectReason::Epoch => C::RejectEpoch,
            RejectReason::Stale => C::RejectStale,
            RejectReason::Cookie => C::RejectCookie,
            RejectReason::Trial => C::RejectTrial,
            RejectReason::UnknownIndex => C::RejectUnknownIndex,
            RejectReason::Aead => C::RejectAead,
            RejectReason::ConnId => C::RejectConnId,
            RejectReason::Replay => C::RejectReplay,
        }
    }

    pub fn batch(size: usize) -> C {
        match size {
            0 | 1 => C::Batch1,
            2..=3 => C::Batch2,
            4..=7 => C::Batch4,
            8..=15 => C::Batch8,
            16..=31 => C::Batch16,
            32..=63 => C::Batch32,
            _ => C::Batch64,
        }
    }
}

/// Per-host counters of one worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum H {
    /// Datagrams received from the host.
    RxPackets,
    RxBytes,
    /// Datagrams queued to the host.
    TxPackets,
    TxBytes,
    /// Datagrams from the host dropped (malformed, bad tag, no route to the client).
    Dropped,
}

const HOST_FAMILIES: [(H, &str, &str); 5] = [
    (
        H::RxPackets,
        "rebindgw_host_peer_rx_packets_total",
        "Datagrams received from each host.",
    ),
    (
        H::RxBytes,
        "rebindgw_host_peer_rx_bytes_total",
        "Bytes received from each host.",
    ),
    (
        H::TxPackets,
        "rebindgw_host_peer_tx_packets_total",
        "Datagrams sent to each host.",
    ),
    (
        H::TxBytes,
        "rebindgw_host_peer_tx_bytes_total",
        "Bytes sent to each host.",
    ),
    (
        H::Dropped,
        "rebindgw_host_peer_dropped_total",
        "Datagrams from each host that were dropped.",
    ),
];

/// One worker's counters for one host, on their own cache lines.
#[repr(align(128))]
#[derive(Default)]
struct HostCounters {
    counters: [AtomicU64; 5],
    /// When this worker forwarded the oldest HANDSHAKE the host has not answered since
    /// (ticks; 0: none outstanding).
    unanswered_since: AtomicU64,
}

/// One worker's counters, on their own cache lines.
#[repr(align(128))]
pub struct WorkerMetrics {
    counters: [AtomicU64; N],
    /// Wall clock (ticks) of the worker loop's last timer tick: the liveness signal.
    heartbeat: AtomicU64,
    hosts: Box<[HostCounters]>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics::with_hosts(0)
    }
}

impl WorkerMetrics {
    /// Counters for a gateway with `hosts` configured hosts.
    pub fn with_hosts(hosts: usize) -> Self {
        WorkerMetrics {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            heartbeat: AtomicU64::new(0),
            hosts: (0..hosts).map(|_| HostCounters::default()).collect(),
        }
    }

    #[inline]
    pub fn add(&self, c: C, n: u64) {
        self.counters[c as usize].fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub fn inc(&self, c: C) {
        self.add(c, 1);
    }

    pub fn get(&self, c: C) -> u64 {
        self.counters[c as usize].load(Ordering::Relaxed)
    }

    /// Adds `n` to host `host`'s counter `c` (ignored for a host index out of range).
    #[inline]
    pub fn host_add(&self, host: usize, c: H, n: u64) {
        if let Some(h) = self.hosts.get(host) {
            h.counters[c as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn host_get(&self, host: usize, c: H) -> u64 {
        self.hosts
            .get(host)
            .map_or(0, |h| h.counters[c as usize].load(Ordering::Relaxed))
    }

    /// A HANDSHAKE went to `host` at `now`; starts the wait for its answer unless one runs.
    #[inline]
    pub fn handshake_sent(&self, host: usize, now: Ticks) {
        if let Some(h) = self.hosts.get(host)
            && h.unanswered_since.load(Ordering::Relaxed) == 0
        {
            h.unanswered_since.store(now.0.max(1), Ordering::Relaxed);
        }
    }

    /// `host` answered (a handshake reply or a valid control message).
    #[inline]
    pub fn host_answered(&self, host: usize) {
        if let Some(h) = self.hosts.get(host)
            && h.unanswered_since.load(Ordering::Relaxed) != 0
        {
            h.unanswered_since.store(0, Ordering::Relaxed);
        }
    }

    /// Since when `host` has left a HANDSHAKE from this worker unanswered.
    pub fn unanswered_since(&self, host: usize) -> Option<Ticks> {
        let t = self
            .hosts
            .get(host)?
            .unanswered_since
            .load(Ordering::Relaxed);
        (t != 0).then_some(Ticks(t))
    }

    /// The worker loop is alive at `now`.
    #[inline]
    pub fn beat(&self, now: Ticks) {
        self.heartbeat.store(now.0, Ordering::Relaxed);
    }

    /// The last heartbeat (`None` before the loop ran).
    pub fn heartbeat(&self) -> Option<Ticks> {
        let t = self.heartbeat.load(Ordering::Relaxed);
        (t != 0).then_some(Ticks(t))
    }

    /// Adds what the I/O loop counted between `prev` and `now` (two of its snapshots).
    pub fn record_io(&self, prev: &IoStats, now: &IoStats) {
        let d = |a: u64, b: u64| b.saturating_sub(a);
        let (p, n) = (&prev.send_error_reasons, &now.send_error_reasons);
        for (c, v) in [
            (C::DropOversize, d(prev.truncated, now.truncated)),
            (C::DropRxError, d(prev.rx_errors, now.rx_errors)),
            (C::RxBuffersExhausted, d(prev.no_buffers, now.no_buffers)),
            (C::XdpRx, d(prev.xdp_received, now.xdp_received)),
            (C::XdpTx, d(prev.xdp_sent, now.xdp_sent)),
            (C::XdpKernelTx, d(prev.xdp_kernel_sent, now.xdp_kernel_sent)),
            (C::SendNoSocket, d(p.no_socket, n.no_socket)),
            (C::SendSocketFull, d(p.socket_full, n.socket_full)),
            (C::SendRefused, d(p.refused, n.refused)),
        ] {
            if v > 0 {
                self.add(c, v);
            }
        }
    }
}

/// Sum of `c` over workers.
pub fn total(workers: &[std::sync::Arc<WorkerMetrics>], c: C) -> u64 {
    workers.iter().map(|w| w.get(c)).sum()
}

/// Sum of host `host`'s counter `c` over workers.
pub fn host_total(workers: &[std::sync::Arc<WorkerMetrics>], host: usize, c: H) -> u64 {
    workers.iter().map(|w| w.host_get(host, c)).sum()
}

/// What the gateway knows about one configured host.
#[derive(Debug, Default, Clone)]
pub struct HostFacts {
    /// The host's link address (the `host` label).
    pub addr: String,
    /// Live connections the host owns.
    pub connections: u64,
}

/// Gauges and facts that are not per-worker counters.
#[derive(Debug, Default, Clone)]
pub struct GatewayFacts {
    pub connections: u64,
    pub max_connections: u64,
    pub epoch: u32,
    pub slots: usize,
    pub workers: usize,
    pub engine_backend: String,
    pub io_backend: String,
    pub store_commits: u64,
    pub store_errors: u64,
    pub store_queue: u64,
    /// Registry commit duration histogram: (upper bound in seconds, commits at most that
    /// long), ascending, without the +Inf bucket (that is `store_latency_count`).
    pub store_latency_buckets: Vec<(f64, u64)>,
    pub store_latency_sum_seconds: f64,
    pub store_latency_count: u64,
    pub table_bytes: u64,
    /// Configured hosts, in configuration order (the index the counters use).
    pub hosts: Vec<HostFacts>,
    /// Key epoch rotations since the start.
    pub rotations: u64,
    /// Seconds left of the previous epoch's grace period (0: none kept).
    pub grace_seconds_left: u64,
    /// Live connections per accepted epoch.
    pub connections_per_epoch: Vec<(u32, u64)>,
    /// Refused `POST /rotate` requests.
    pub admin_auth_failures: u64,
    /// Keys of the current epoch not yet acknowledged by their clients (key delivery).
    pub keys_pending: u64,
    /// Cluster mode's link to etcd (`None`: single node).
    pub cluster: Option<ClusterFacts>,
}

/// Cluster mode's counters (docs/cluster.md, "Metrics").
#[derive(Clone, Debug, Default)]
pub struct ClusterFacts {
    pub gateway_id: u16,
    pub link_up: bool,
    /// Connections whose tuple this gateway serves (the others are held for their REBINDs).
    pub owned: u64,
    /// Committed rebinds that took a connection over from another gateway.
    pub rebinds_taken_over: u64,
    /// etcd transactions that carried REBIND commits (several per transaction in a storm).
    pub commit_batches: u64,
    pub commit_retries: u64,
    pub link_downs: u64,
    /// Range reads of etcd (start and reloads); the packet path makes none.
    pub range_reads: u64,
    pub watch_events: u64,
    pub watch_resumes: u64,
    pub reloads: u64,
    pub registered: u64,
    pub register_collisions: u64,
    pub rebinds_committed: u64,
    pub duplicates: u64,
    pub conflicts: u64,
    pub stale: u64,
    pub unavailable: u64,
    pub removed: u64,
    pub removals_sent: u64,
    pub malformed_records: u64,
    pub remote_added: u64,
    pub remote_updated: u64,
    pub remote_removed: u64,
    pub remote_unchanged: u64,
    pub remote_unknown_epoch: u64,
    pub remote_unopened: u64,
}

fn render_cluster(out: &mut String, c: &ClusterFacts) {
    let gauges = [
        (
            "rebindgw_cluster_gateway_id",
            "This gateway's id in the cluster.",
            u64::from(c.gateway_id),
        ),
        (
            "rebindgw_cluster_link_up",
            "1 while the etcd link (watch) is up; 0: REBINDs and REGISTERs are refused.",
            u64::from(c.link_up),
        ),
        (
            "rebindgw_cluster_owned_connections",
            "Connections whose tuple this gateway serves; the rest of the registry copy is \
             held so that their REBINDs verify here.",
            c.owned,
        ),
    ];
    for (name, help, v) in gauges {
        family(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }
    let counters = [
        (
            "rebindgw_cluster_link_downs_total",
            "Times the etcd link went down.",
            c.link_downs,
        ),
        (
            "rebindgw_cluster_etcd_range_reads_total",
            "Range reads of the registry in etcd (the start's load, reloads after the watch \
             broke). The packet path reads only the local copy: forwarding never moves this.",
            c.range_reads,
        ),
        (
            "rebindgw_cluster_watch_events_total",
            "Registry changes received from the etcd watch.",
            c.watch_events,
        ),
        (
            "rebindgw_cluster_watch_resumes_total",
            "Broken etcd watch streams resumed on another member from the copy's revision \
             (no reload; requests go on).",
            c.watch_resumes,
        ),
        (
            "rebindgw_cluster_reloads_total",
            "Whole-registry reloads after the etcd link came back.",
            c.reloads,
        ),
        (
            "rebindgw_cluster_rebinds_taken_over_total",
            "Committed rebinds of connections another gateway owned (the client's new tuple \
             hashed here).",
            c.rebinds_taken_over,
        ),
        (
            "rebindgw_cluster_commit_transactions_total",
            "etcd transactions that carried REBIND commits: REBINDs that queue up together \
             share one (each with its own compare), up to 64.",
            c.commit_batches,
        ),
        (
            "rebindgw_cluster_commit_retries_total",
            "REBIND commit transactions tried again after a failure or timeout (an etcd \
             leader election), within three operation timeouts of the first.",
            c.commit_retries,
        ),
        (
            "rebindgw_cluster_register_collisions_total",
            "REGISTER index allocations that another gateway won first (retried).",
            c.register_collisions,
        ),
        (
            "rebindgw_cluster_removals_sent_total",
            "Connection removals (expiry, CLOSE, host restart) sent to etcd.",
            c.removals_sent,
        ),
        (
            "rebindgw_cluster_removals_total",
            "Connection removals committed in etcd.",
            c.removed,
        ),
        (
            "rebindgw_cluster_malformed_records_total",
            "Records in etcd that do not parse (ignored, never trusted).",
            c.malformed_records,
        ),
    ];
    for (name, help, v) in counters {
        family(out, name, "counter", help);
        let _ = writeln!(out, "{name} {v}");
    }
    let name = "rebindgw_cluster_transactions_total";
    family(
        out,
        name,
        "counter",
        "etcd transactions of this gateway by outcome.",
    );
    for (result, v) in [
        ("registered", c.registered),
        ("rebound", c.rebinds_committed),
        ("duplicate", c.duplicates),
        ("conflict", c.conflicts),
        ("stale", c.stale),
        ("unavailable", c.unavailable),
    ] {
        let _ = writeln!(out, "{name}{{result=\"{result}\"}} {v}");
    }
    let name = "rebindgw_cluster_remote_changes_total";
    family(
        out,
        name,
        "counter",
        "Other gateways' registry changes applied to this gateway's copy, by effect.",
    );
    for (effect, v) in [
        ("added", c.remote_added),
        ("updated", c.remote_updated),
        ("removed", c.remote_removed),
        ("unchanged", c.remote_unchanged),
        ("unknown_epoch", c.remote_unknown_epoch),
        ("unopened", c.remote_unopened),
    ] {
        let _ = writeln!(out, "{name}{{effect=\"{effect}\"}} {v}");
    }
}

/// Bucket upper bounds (seconds) of the store commit duration histogram.
pub const STORE_LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value (backslash, quote, newline).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition format 0.0.4.
pub fn render(workers: &[std::sync::Arc<WorkerMetrics>], facts: &GatewayFacts) -> String {
    let mut out = String::with_capacity(8192);
    let mut last_name = "";
    for (c, name, labels, help) in COUNTERS {
        if *name == BATCH_HISTOGRAM {
            continue;
        }
        if *name != last_name {
            family(&mut out, name, "counter", help);
            last_name = name;
        }
        let v = total(workers, *c);
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
    // Receive batch sizes: the counters hold one bucket each; Prometheus buckets are
    // cumulative.
    family(
        &mut out,
        BATCH_HISTOGRAM,
        "histogram",
        "Datagrams per receive batch handed to a worker.",
    );
    let mut cumulative = 0;
    for (c, name, labels, _) in COUNTERS {
        if *name == BATCH_HISTOGRAM && !labels.is_empty() {
            cumulative += total(workers, *c);
            let _ = writeln!(out, "{name}_bucket{{{labels}}} {cumulative}");
        }
    }
    let _ = writeln!(
        out,
        "{BATCH_HISTOGRAM}_sum {}\n{BATCH_HISTOGRAM}_count {cumulative}",
        total(workers, C::BatchDatagrams)
    );
    family(
        &mut out,
        "rebindgw_worker_rx_packets_total",
        "counter",
        "Client datagrams received, per worker.",
    );
    for (i, w) in workers.iter().enumerate() {
        let rx = w.get(C::RxData)
            + w.get(C::RxHandshake)
            + w.get(C::RxRebind)
            + w.get(C::RxWrongDirection)
            + w.get(C::RxUnknownType)
            + w.get(C::RxKeysAck);
        let _ = writeln!(
            out,
            "rebindgw_worker_rx_packets_total{{worker=\"{i}\"}} {rx}"
        );
    }
    let gauges: [(&str, &str, u64); 6] = [
        (
            "rebindgw_connections",
            "Live registered connections.",
            facts.connections,
        ),
        (
            "rebindgw_connections_max",
            "Connection capacity.",
            facts.max_connections,
        ),
        (
            "rebindgw_epoch",
            "Current key epoch.",
            u64::from(facts.epoch),
        ),
        (
            "rebindgw_slots",
            "Slots per key set (S).",
            facts.slots as u64,
        ),
        (
            "rebindgw_workers",
            "Data-plane workers.",
            facts.workers as u64,
        ),
        (
            "rebindgw_table_bytes",
            "Bytes held by the fast-path tables.",
            facts.table_bytes,
        ),
    ];
    for (name, help, v) in gauges {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }
    family(
        &mut out,
        "rebindgw_epoch_rotations_total",
        "counter",
        "Key epoch rotations since the start (schedule and rebindgw rotate).",
    );
    let _ = writeln!(out, "rebindgw_epoch_rotations_total {}", facts.rotations);
    family(
        &mut out,
        "rebindgw_epoch_grace_seconds",
        "gauge",
        "Seconds left of the previous key epoch's grace period (0: none accepted).",
    );
    let _ = writeln!(
        out,
        "rebindgw_epoch_grace_seconds {}",
        facts.grace_seconds_left
    );
    family(
        &mut out,
        "rebindgw_epoch_connections",
        "gauge",
        "Live connections per accepted key epoch.",
    );
    for (e, n) in &facts.connections_per_epoch {
        let _ = writeln!(out, "rebindgw_epoch_connections{{epoch=\"{e}\"}} {n}");
    }
    family(
        &mut out,
        "rebindgw_epoch_keys_pending",
        "gauge",
        "Connections registered at the last rotation whose clients have not acknowledged their new keys.",
    );
    let _ = writeln!(out, "rebindgw_epoch_keys_pending {}", facts.keys_pending);
    family(
        &mut out,
        "rebindgw_admin_auth_failures_total",
        "counter",
        "Refused (unauthenticated, stale or replayed) admin requests to rotate.",
    );
    let _ = writeln!(
        out,
        "rebindgw_admin_auth_failures_total {}",
        facts.admin_auth_failures
    );
    if let Some(c) = &facts.cluster {
        render_cluster(&mut out, c);
    }
    family(
        &mut out,
        "rebindgw_build_info",
        "gauge",
        "Version and backends of the running gateway (always 1).",
    );
    let _ = writeln!(
        out,
        "rebindgw_build_info{{version=\"{}\",io_backend=\"{}\",aes_backend=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        label_value(&facts.io_backend),
        label_value(&facts.engine_backend)
    );
    family(
        &mut out,
        "rebindgw_store_commits_total",
        "counter",
        "Registry store commits.",
    );
    let _ = writeln!(out, "rebindgw_store_commits_total {}", facts.store_commits);
    family(
        &mut out,
        "rebindgw_store_errors_total",
        "counter",
        "Registry store commit failures.",
    );
    let _ = writeln!(out, "rebindgw_store_errors_total {}", facts.store_errors);
    family(
        &mut out,
        "rebindgw_store_queue",
        "gauge",
        "Registry writes waiting.",
    );
    let _ = writeln!(out, "rebindgw_store_queue {}", facts.store_queue);
    let name = "rebindgw_store_commit_duration_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Registry store commit duration.",
    );
    for (le, n) in &facts.store_latency_buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {}\n{name}_count {count}",
        facts.store_latency_sum_seconds,
        count = facts.store_latency_count
    );
    if !facts.hosts.is_empty() {
        family(
            &mut out,
            "rebindgw_host_peer_connections",
            "gauge",
            "Live connections owned by each host.",
        );
        for h in &facts.hosts {
            let _ = writeln!(
                out,
                "rebindgw_host_peer_connections{{host=\"{}\"}} {}",
                label_value(&h.addr),
                h.connections
            );
        }
        for (c, name, help) in HOST_FAMILIES {
            family(&mut out, name, "counter", help);
            for (i, h) in facts.hosts.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}{{host=\"{}\"}} {}",
                    label_value(&h.addr),
                    host_total(workers, i, c)
                );
            }
        }
    }
    out
}

/// Parses Prometheus text into (series, value) pairs, for `rebindgw stats` and tests.
pub fn parse_text(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn render_sums_workers_and_parses_back() {
        let w = vec![
            Arc::new(WorkerMetrics::default()),
            Arc::new(WorkerMetrics::default()),
        ];
        w[0].add(C::RejectTrial, 3);
        w[1].inc(C::RejectTrial);
        w[1].inc(C::RxData);
        let text = render(&w, &GatewayFacts::default());
        let parsed = parse_text(&text);
        let get = |s: &str| parsed.iter().find(|(k, _)| k == s).map(|(_, v)| *v);
        assert_eq!(
            get("rebindgw_rebinds_rejected_total{reason=\"trial\"}"),
            Some(4.0)
        );
        assert_eq!(
            get("rebindgw_worker_rx_packets_total{worker=\"1\"}"),
            Some(1.0)
        );
        assert_eq!(
            text.matches("# TYPE rebindgw_rebinds_rejected_total")
                .count(),
            1
        );
        for r in RejectReason::ALL {
            let label = r.name().replace('-', "_");
            assert!(text.contains(&format!("reason=\"{label}\"")), "{r}");
        }
    }

    /// Checks Prometheus text exposition rules that scrapers and promtool rely on; returns
    /// every violation found.
    pub(crate) fn exposition_problems(text: &str) -> Vec<String> {
        use std::collections::{HashMap, HashSet};
        let valid_name = |n: &str| {
            let mut c = n.chars();
            c.next()
                .is_some_and(|f| f.is_ascii_lowercase() || f == '_' || f == ':')
                && c.all(|ch| {
                    ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == ':'
                })
        };
        let mut problems = Vec::new();
        let mut help: HashSet<String> = HashSet::new();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut series: HashSet<String> = HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, h) = rest.split_once(' ').unwrap_or((rest, ""));
                if h.trim().is_empty() {
                    problems.push(format!("empty HELP for {name}"));
                }
                if !help.insert(name.to_string()) {
                    problems.push(format!("second HELP for {name}"));
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, t) = rest.split_once(' ').unwrap_or((rest, ""));
                if types.insert(name.to_string(), t.to_string()).is_some() {
                    problems.push(format!("second TYPE for {name}"));
                }
                if !valid_name(name) {
                    problems.push(format!("bad metric name {name}"));
                }
                if t == "counter" && !name.ends_with("_total") {
                    problems.push(format!("counter {name} does not end in _total"));
                }
                for unit in [
                    "microseconds",
                    "milliseconds",
                    "nanoseconds",
                    "kilobytes",
                    "megabytes",
                ] {
                    if name.contains(unit) {
                        problems.push(format!("{name} is not in base units"));
                    }
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((s, value)) = line.rsplit_once(' ') else {
                problems.push(format!("no value: {line}"));
                continue;
            };
            if value.parse::<f64>().is_err() {
                problems.push(format!("bad value: {line}"));
            }
            if !series.insert(s.to_string()) {
                problems.push(format!("duplicate series {s}"));
            }
            let (name, labels) = match s.split_once('{') {
                Some((n, l)) => (n, l.strip_suffix('}').unwrap_or("")),
                None => (s, ""),
            };
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| {
                    let base = name.strip_suffix(suf)?;
                    matches!(
                        types.get(base).map(String::as_str),
                        Some("histogram" | "summary")
                    )
                    .then_some(base)
                })
                .unwrap_or(name);
            if !types.contains_key(family) || !help.contains(family) {
                problems.push(format!("{name} has no HELP/TYPE before it"));
            }
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let Some((k, v)) = pair.split_once('=') else {
                    problems.push(format!("bad label {pair} in {s}"));
                    continue;
                };
                let v = v.trim_matches('"');
                let numeric = v.parse::<f64>().is_ok() || v == "+Inf";
                let snake = v
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                // Free-form values (versions, addresses) are exempt; enumerations are snake_case.
                if !matches!(k, "host" | "version" | "le" | "quantile" | "worker")
                    && !numeric
                    && !snake
                {
                    problems.push(format!("label value {v:?} of {k} in {s} is not snake_case"));
                }
            }
        }
        problems
    }

    /// Metrics with every counter non-zero, as a scrape of a busy gateway would show.
    fn busy_render() -> String {
        let w = vec![
            Arc::new(WorkerMetrics::with_hosts(2)),
            Arc::new(WorkerMetrics::with_hosts(2)),
        ];
        for (c, ..) in COUNTERS {
            w[0].add(*c, 3);
            w[1].add(*c, 1);
        }
        for (h, ..) in HOST_FAMILIES {
            w[0].host_add(0, h, 2);
            w[1].host_add(1, h, 5);
        }
        let facts = GatewayFacts {
            connections: 5,
            max_connections: 100,
            epoch: 2,
            slots: 12,
            workers: 2,
            engine_backend: "vaes".into(),
            io_backend: "uring".into(),
            store_commits: 9,
            rotations: 1,
            cluster: Some(ClusterFacts {
                link_up: true,
                registered: 3,
                ..ClusterFacts::default()
            }),
            grace_seconds_left: 30,
            connections_per_epoch: vec![(2, 4), (1, 1)],
            store_latency_buckets: STORE_LATENCY_BUCKETS.iter().map(|le| (*le, 9)).collect(),
            store_latency_sum_seconds: 0.0042,
            store_latency_count: 9,
            hosts: vec![
                HostFacts {
                    addr: "127.0.0.1:7000".into(),
                    connections: 3,
                },
                HostFacts {
                    addr: "[2001:db8::1]:7000".into(),
                    connections: 0,
                },
            ],
            ..Default::default()
        };
        render(&w, &facts)
    }

    #[test]
    fn exposition_format_is_valid() {
        let text = busy_render();
        let problems = exposition_problems(&text);
        assert!(problems.is_empty(), "{problems:#?}\n{text}");
        assert!(text.contains("rebindgw_cluster_transactions_total{result=\"registered\"} 3"));
        assert!(text.contains("rebindgw_cluster_link_up 1"));
    }

    #[test]
    fn promtool_accepts_metrics() {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let text = busy_render();
        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                // CI installs promtool and sets this, so the check cannot silently skip there.
                assert!(
                    std::env::var_os("REBINDGW_REQUIRE_TOOLS").is_none(),
                    "promtool not runnable ({e}) but REBINDGW_REQUIRE_TOOLS is set"
                );
                println!(
                    "SKIPPED promtool_accepts_metrics: promtool not runnable ({e}); install Debian package `prometheus`"
                );
                return;
            }
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && report.trim().is_empty(),
            "promtool: {report}\n{text}"
        );
    }
}
