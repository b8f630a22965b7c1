//! Gateway counters and their Prometheus text rendering.
//!
//! Each worker owns one [`WorkerMetrics`] and bumps it with relaxed atomic adds (no sharing
//! between cores on the packet path); the admin endpoint sums the workers when scraped.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::verify::RejectReason;

macro_rules! counters {
    ($($id:ident => $name:literal, $labels:literal, $help:literal;)*) => {
        /// Every counter the gateway keeps.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(usize)]
        pub enum C { $($id),* }
        const COUNTERS: &[(C, &str, &str, &str)] = &[$((C::$id, $name, $labels, $help)),*];
    };
}

counters! {
    RxData => "rebindgw_client_rx_packets_total", "type=\"data\"", "Datagrams received from clients, by type.";
    RxHandshake => "rebindgw_client_rx_packets_total", "type=\"handshake\"", "";
    RxRebind => "rebindgw_client_rx_packets_total", "type=\"rebind\"", "";
    RxWrongDirection => "rebindgw_client_rx_packets_total", "type=\"wrong_direction\"", "";
    RxUnknownType => "rebindgw_client_rx_packets_total", "type=\"unknown\"", "";
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
    RebindDuplicate => "rebindgw_rebind_duplicates_total", "", "Duplicate REBINDs answered again.";
    CookieRequest => "rebindgw_cookie_requests_total", "", "Cookie requests (all-zero REBINDs) answered with UNRECOGNIZED.";
    RejectLength => "rebindgw_rebinds_rejected_total", "reason=\"length\"", "REBINDs rejected, by the first check that failed.";
    RejectEpoch => "rebindgw_rebinds_rejected_total", "reason=\"epoch\"", "";
    RejectStale => "rebindgw_rebinds_rejected_total", "reason=\"stale\"", "";
    RejectCookie => "rebindgw_rebinds_rejected_total", "reason=\"cookie\"", "";
    RejectTrial => "rebindgw_rebinds_rejected_total", "reason=\"trial\"", "";
    RejectUnknownIndex => "rebindgw_rebinds_rejected_total", "reason=\"unknown-index\"", "";
    RejectAead => "rebindgw_rebinds_rejected_total", "reason=\"aead\"", "";
    RejectConnId => "rebindgw_rebinds_rejected_total", "reason=\"conn-id\"", "";
    RejectReplay => "rebindgw_rebinds_rejected_total", "reason=\"replay\"", "";
    HandshakeForwarded => "rebindgw_handshakes_forwarded_total", "", "HANDSHAKEs forwarded to a host.";
    HandshakeShort => "rebindgw_handshakes_dropped_total", "reason=\"short\"", "HANDSHAKEs dropped, by reason.";
    HandshakeRate => "rebindgw_handshakes_dropped_total", "reason=\"rate\"", "";
    HandshakeLong => "rebindgw_handshakes_dropped_total", "reason=\"too_long\"", "";
    DropOversize => "rebindgw_dropped_total", "reason=\"oversize\"", "Datagrams dropped, by reason.";
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
    Registered => "rebindgw_registrations_total", "result=\"ok\"", "Host registrations, by result.";
    RegisterFull => "rebindgw_registrations_total", "result=\"full\"", "";
    RegisterDuplicate => "rebindgw_registrations_total", "result=\"duplicate\"", "";
    RegisterRepeat => "rebindgw_registrations_total", "result=\"retransmit\"", "";
    Closed => "rebindgw_closes_total", "", "Connections closed by hosts.";
    Expired => "rebindgw_connections_expired_total", "", "Connections dropped after idle_timeout_secs without client traffic.";
    HostRestarts => "rebindgw_host_restarts_total", "", "HELLOs with a new host boot id.";
    Released => "rebindgw_connections_released_total", "", "Connections released because their host restarted.";
    TupleTakenOver => "rebindgw_tuples_taken_over_total", "", "Tuples handed from one connection to another (NAT port reuse).";
    Batch1 => "rebindgw_worker_batches_total", "size=\"1\"", "Receive batches handled, by size.";
    Batch2 => "rebindgw_worker_batches_total", "size=\"2-3\"", "";
    Batch4 => "rebindgw_worker_batches_total", "size=\"4-7\"", "";
    Batch8 => "rebindgw_worker_batches_total", "size=\"8-15\"", "";
    Batch16 => "rebindgw_worker_batches_total", "size=\"16-31\"", "";
    Batch32 => "rebindgw_worker_batches_total", "size=\"32-63\"", "";
    Batch64 => "rebindgw_worker_batches_total", "size=\"64+\"", "";
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

/// One worker's counters, on their own cache lines.
#[repr(align(128))]
pub struct WorkerMetrics {
    counters: [AtomicU64; N],
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl WorkerMetrics {
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
}

/// Sum of `c` over workers.
pub fn total(workers: &[std::sync::Arc<WorkerMetrics>], c: C) -> u64 {
    workers.iter().map(|w| w.get(c)).sum()
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
    /// Registry commit latency quantiles in microseconds: (quantile, value).
    pub store_latency_us: Vec<(f64, u64)>,
    pub store_latency_count: u64,
    pub table_bytes: u64,
}

/// Prometheus text exposition format 0.0.4.
pub fn render(workers: &[std::sync::Arc<WorkerMetrics>], facts: &GatewayFacts) -> String {
    let mut out = String::with_capacity(8192);
    let mut last_name = "";
    for (c, name, labels, help) in COUNTERS {
        if *name != last_name {
            let help = if help.is_empty() { "" } else { help };
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            last_name = name;
        }
        let v = total(workers, *c);
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
    for (i, w) in workers.iter().enumerate() {
        if i == 0 {
            out.push_str(
                "# HELP rebindgw_worker_rx_packets_total Client datagrams received, per worker.\n",
            );
            out.push_str("# TYPE rebindgw_worker_rx_packets_total counter\n");
        }
        let rx = w.get(C::RxData)
            + w.get(C::RxHandshake)
            + w.get(C::RxRebind)
            + w.get(C::RxWrongDirection)
            + w.get(C::RxUnknownType);
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
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP rebindgw_backend_info Engine and I/O backends in use.\n# TYPE rebindgw_backend_info gauge\nrebindgw_backend_info{{engine=\"{}\",io=\"{}\"}} 1",
        facts.engine_backend, facts.io_backend
    );
    let _ = writeln!(
        out,
        "# HELP rebindgw_store_commits_total Registry store commits.\n# TYPE rebindgw_store_commits_total counter\nrebindgw_store_commits_total {}\n# HELP rebindgw_store_errors_total Registry store commit failures.\n# TYPE rebindgw_store_errors_total counter\nrebindgw_store_errors_total {}\n# HELP rebindgw_store_queue Registry writes waiting.\n# TYPE rebindgw_store_queue gauge\nrebindgw_store_queue {}",
        facts.store_commits, facts.store_errors, facts.store_queue
    );
    let _ = writeln!(
        out,
        "# HELP rebindgw_store_commit_latency_microseconds Registry store commit latency.\n# TYPE rebindgw_store_commit_latency_microseconds summary"
    );
    for (q, v) in &facts.store_latency_us {
        let _ = writeln!(
            out,
            "rebindgw_store_commit_latency_microseconds{{quantile=\"{q}\"}} {v}"
        );
    }
    let _ = writeln!(
        out,
        "rebindgw_store_commit_latency_microseconds_count {}",
        facts.store_latency_count
    );
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
            assert!(text.contains(&format!("reason=\"{}\"", r.name())), "{r}");
        }
    }
}
