//! The tunnel's framing and both tunnel cores on arbitrary payloads (what a client or host
//! could put inside a DATA payload): `Frame::parse`, `TunnelClient::handle_tunnel` and
//! `TunnelHost::handle_client`/`handle_backend`. None may panic; what parses re-emits to the
//! same bytes; the cores' counters account for every input.
//!
//! Input: a sequence of records `len(u8) || bytes`; even records go to the host core (as
//! client payloads of connection `len % 3`), odd ones to the client core.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rebindgw::time::Ticks;
use rebindgw::tunnel::{
    FlowKey, Frame, Service, TunnelClient, TunnelClientConfig, TunnelHost, TunnelHostConfig,
};

fuzz_target!(|input: &[u8]| {
    let mut client = TunnelClient::new(TunnelClientConfig::default());
    let mut host = TunnelHost::new(TunnelHostConfig {
        services: vec![Service {
            name: "s".into(),
            backend: "127.0.0.1:9".parse().unwrap(),
        }],
        max_flows_per_client: 4,
        max_bytes_in_flight: 4096,
        flow_idle: Duration::from_millis(5),
        ..TunnelHostConfig::default()
    });
    // The client knows one flow, so DATA frames for flow 0 reach its delivery path.
    let mut buf = [0u8; 1300];
    let mut now = Ticks(1_000_000_000);
    let _ = client.handle_app(now, "127.0.0.1:1".parse().unwrap(), b"x", &mut buf);
    let mut rest = input;
    let mut i = 0u32;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (rec, tail) = tail.split_at(n);
        rest = tail;
        now = now.saturating_add(Duration::from_millis(1));
        if let Ok(f) = Frame::parse(rec) {
            assert_eq!(f.to_vec(), rec);
        }
        if i % 2 == 0 {
            let conn = u64::from(len % 3);
            if let Some(b) = host.handle_client(now, conn, rec) {
                let (key, plen) = (b.key, b.payload.len());
                host.backend_done(key, plen);
                let _ = host.handle_backend(now, key, rec, &mut buf);
            }
            let _ = host.handle_backend(
                now,
                FlowKey {
                    conn_id: conn,
                    flow: 0,
                },
                rec,
                &mut buf,
            );
            host.handle_timeout(now);
            while host.poll_close().is_some() {}
            while let Some((_, frame)) = host.poll_to_client() {
                let _ = client.handle_tunnel(now, &frame);
            }
        } else if let Some((_, d)) = client.handle_tunnel(now, rec) {
            assert!(d.len() < rec.len());
        }
        i += 1;
    }
});
