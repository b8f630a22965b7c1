//! The admin endpoint (`GET /metrics`, Prometheus text; `GET /healthz`) and the client side
//! used by `rebindgw stats`.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::metrics::parse_text;

/// Serves `render()` at `/metrics` until `shutdown` is set. Returns the bound address.
pub fn spawn_admin(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + 'static,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("cannot serve admin on {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| anyhow::anyhow!("admin server has no IP address"))?;
    let handle = std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            while !shutdown.load(Ordering::Relaxed) {
                let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(200)) else {
                    continue;
                };
                let path = req.url().split('?').next().unwrap_or("");
                let response = match path {
                    "/metrics" => tiny_http::Response::from_string(render()).with_header(
                        tiny_http::Header::from_bytes(
                            &b"Content-Type"[..],
                            &b"text/plain; version=0.0.4"[..],
                        )
                        .expect("static header"),
                    ),
                    "/healthz" => tiny_http::Response::from_string("ok\n"),
                    _ => tiny_http::Response::from_string("not found\n").with_status_code(404),
                };
                let _ = req.respond(response);
            }
        })?;
    Ok((bound, handle))
}

/// Fetches `/metrics` from an admin address.
pub fn fetch_metrics(addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| anyhow::anyhow!("cannot reach the gateway admin at {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let (head, text) = body
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response from {addr}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        anyhow::bail!(
            "admin at {addr} answered {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(text.to_string())
}

/// A readable summary of the metrics for `rebindgw stats`.
pub fn summarize(text: &str) -> String {
    let series = parse_text(text);
    let sum = |prefix: &str| -> f64 {
        series
            .iter()
            .filter(|(k, _)| k == prefix || k.starts_with(&format!("{prefix}{{")))
            .map(|(_, v)| v)
            .fold(0.0, |a, b| a + b)
    };
    let labelled = |name: &str| -> Vec<(String, f64)> {
        series
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(name)?.strip_prefix('{')?;
                let label = rest
                    .trim_end_matches('}')
                    .split_once('=')?
                    .1
                    .trim_matches('"');
                Some((label.to_string(), *v))
            })
            .filter(|(_, v)| *v > 0.0)
            .collect()
    };
    let backend = series
        .iter()
        .find(|(k, _)| k.starts_with("rebindgw_backend_info"))
        .map(|(k, _)| k.trim_start_matches("rebindgw_backend_info").to_string())
        .unwrap_or_default();
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "connections      {:>12} / {}   epoch {}  S={}  workers {}  backends {}",
        sum("rebindgw_connections"),
        sum("rebindgw_connections_max"),
        sum("rebindgw_epoch"),
        sum("rebindgw_slots"),
        sum("rebindgw_workers"),
        backend
    ));
    line(format!(
        "client rx        {:>12} pkts {:>14} bytes",
        sum("rebindgw_client_rx_packets_total"),
        sum("rebindgw_client_rx_bytes_total")
    ));
    line(format!(
        "client tx        {:>12} pkts {:>14} bytes",
        sum("rebindgw_client_tx_packets_total"),
        sum("rebindgw_client_tx_bytes_total")
    ));
    line(format!(
        "host link rx/tx  {:>12} / {} pkts",
        sum("rebindgw_host_rx_packets_total"),
        sum("rebindgw_host_tx_packets_total")
    ));
    line(format!(
        "unknown tuples   {:>12}   unrecognized sent {}  suppressed {:?}",
        sum("rebindgw_unknown_tuple_total"),
        sum("rebindgw_unrecognized_sent_total"),
        labelled("rebindgw_unrecognized_suppressed_total")
    ));
    line(format!(
        "rebinds          {:>12} accepted, {} duplicates, rejected {:?}",
        sum("rebindgw_rebinds_accepted_total"),
        sum("rebindgw_rebind_duplicates_total"),
        labelled("rebindgw_rebinds_rejected_total")
    ));
    line(format!(
        "handshakes       {:>12} forwarded, dropped {:?}",
        sum("rebindgw_handshakes_forwarded_total"),
        labelled("rebindgw_handshakes_dropped_total")
    ));
    line(format!(
        "registrations    {:?}   closes {}",
        labelled("rebindgw_registrations_total"),
        sum("rebindgw_closes_total")
    ));
    line(format!(
        "dropped          {:?}",
        labelled("rebindgw_dropped_total")
    ));
    line(format!(
        "store            {} commits, {} errors, queue {}, commit latency p50/p99 {}/{} us",
        sum("rebindgw_store_commits_total"),
        sum("rebindgw_store_errors_total"),
        sum("rebindgw_store_queue"),
        sum("rebindgw_store_commit_latency_microseconds{quantile=\"0.5\"}"),
        sum("rebindgw_store_commit_latency_microseconds{quantile=\"0.99\"}"),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::metrics::{C, GatewayFacts, WorkerMetrics, render};

    #[test]
    fn serves_metrics_and_summarizes() {
        let w = vec![Arc::new(WorkerMetrics::default())];
        w[0].add(C::RebindAccepted, 5);
        w[0].add(C::RejectReplay, 2);
        let facts = GatewayFacts {
            connections: 7,
            ..Default::default()
        };
        let shutdown = Arc::new(AtomicBool::new(false));
        let w2 = w.clone();
        let (addr, handle) = spawn_admin(
            "127.0.0.1:0".parse().unwrap(),
            move || render(&w2, &facts),
            shutdown.clone(),
        )
        .unwrap();
        let text = fetch_metrics(addr, Duration::from_secs(2)).unwrap();
        assert!(text.contains("rebindgw_rebinds_accepted_total 5"));
        let summary = summarize(&text);
        assert!(
            summary.contains("connections                 7"),
            "{summary}"
        );
        assert!(summary.contains("(\"replay\", 2.0)"), "{summary}");
        shutdown.store(true, Ordering::Relaxed);
        handle.join().unwrap();
    }
}
