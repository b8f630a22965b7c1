//! Embedding the host core in an application (the "host library API"): a Mesh host that
//! answers each client's payload with its upper-case form instead of running the echo.
//!
//! `HostCore` is sans-IO: the application owns the socket and the clock. With
//! `HostConfig { echo: false, .. }` each authenticated DATA payload comes out of
//! `poll_event` as `HostEvent::Data`, and `send(conn_id, payload)` answers it; the
//! handshake, registration with the gateway, rebinds (REBOUND), keepalives and idle expiry
//! stay inside the core.
//!
//! ```sh
//! rebindgw link-keygen --out /tmp/host.key
//! rebindgw enroll --clients /tmp/clients.toml --name alice > /tmp/alice.json
//! cargo run --example embed_host -- 127.0.0.1:7500 /tmp/clients.toml /tmp/host.key
//! rebindgw gateway --listen 127.0.0.1:7400 --host 127.0.0.1:7500=/tmp/host.key --state-dir /tmp/gw
//! ```
//!
//! Any Mesh client (`rebindgw::client::Client`) connected through the gateway then gets its
//! payloads back in upper case.

use std::net::UdpSocket;
use std::time::Duration;

use rebindgw::host::clients::ClientsFile;
use rebindgw::host::{HostConfig, HostCore, HostEvent, MAX_DATAGRAM};
use rebindgw::secrets::load_link_key;
use rebindgw::time::Ticks;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(clients), Some(key)) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: embed_host LISTEN_ADDR CLIENTS_FILE LINK_KEY_FILE");
    };
    let sock = UdpSocket::bind(&listen)?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let cfg = HostConfig {
        echo: false,
        ..HostConfig::default()
    };
    let mut core = HostCore::with_config(
        &load_link_key(key.as_ref())?,
        ClientsFile::load(clients.as_ref())?,
        cfg,
    );
    core.set_start(Ticks::wall_clock());
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = vec![0u8; MAX_DATAGRAM];
    println!("host on {listen}: answering in upper case");
    loop {
        let now = Ticks::wall_clock();
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => core.handle(now, from, &buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
        // Timers (REGISTER retries, HELLO, idle connections): cheap to run every round.
        core.handle_timeout(now);
        while let Some(event) = core.poll_event() {
            match event {
                HostEvent::Connected { conn_id, client } => {
                    println!("{client} connected ({conn_id:016x})")
                }
                HostEvent::Data { conn_id, payload } => {
                    // Refused only for a closed connection, an oversized payload or a full
                    // queue; a real application would count these.
                    let _ = core.send(conn_id, &payload.to_ascii_uppercase());
                }
                HostEvent::Closed { conn_id } => println!("{conn_id:016x} closed"),
            }
        }
        while let Some(o) = core.poll_transmit(now, &mut out) {
            sock.send_to(&out[..o.len], o.to)?;
        }
    }
}
