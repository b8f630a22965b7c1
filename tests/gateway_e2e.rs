//! End-to-end tests on real loopback sockets: a reference host, a gateway and clients, in
//! one process. Each test starts its own host and gateway on ephemeral ports.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rebindgw::client::socket::UdpClient;
use rebindgw::client::{ClientConfig, ClientEvent};
use rebindgw::crypto;
use rebindgw::gateway::config::{GatewayConfig, HostEntry};
use rebindgw::gateway::metrics::{C, total};
use rebindgw::gateway::ratelimit::Rate;
use rebindgw::gateway::run::{GatewayHandle, spawn_gateway};
use rebindgw::host::clients::enroll;
use rebindgw::host::{HostHandle, HostOptions, spawn_host};
use rebindgw::rebind::{RebindCredentials, RebindSecret, build_rebind, fresh_nonces};
use rebindgw::secrets::generate_link_key;
use rebindgw::time::Ticks;
use rebindgw::wire::{
    ClientCredentials, DataView, HandshakeReply, KEYS_ACK_LEN, KEYS_TYPE, MsgType, NewKeys,
    RebindAckView, Unrecognized, build_handshake, open_handshake_reply, open_keys, seal_data,
    seal_keys_ack,
};

struct World {
    dir: PathBuf,
    host: Option<HostHandle>,
    gateway: Option<GatewayHandle>,
    key_file: PathBuf,
    clients_file: PathBuf,
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "rebindgw-e2e-{}-{}",
        std::process::id(),
        hex::encode(crypto::random_array::<6>())
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl World {
    fn new(listen: &str, tweak: impl FnOnce(&mut GatewayConfig)) -> World {
        let dir = tempdir();
        let key_file = dir.join("host.key");
        let key = generate_link_key(&key_file).unwrap();
        let clients_file = dir.join("clients.toml");
        enroll(&clients_file, "seed").unwrap();
        let host = spawn_host(HostOptions::new(
            "127.0.0.1:0".parse().unwrap(),
            clients_file.clone(),
            key,
        ))
        .unwrap();
        let mut w = World {
            dir,
            host: Some(host),
            gateway: None,
            key_file,
            clients_file,
        };
        w.start_gateway(listen, tweak);
        w
    }

    fn config(&self, listen: &str) -> GatewayConfig {
        GatewayConfig {
            listen: vec![listen.parse().unwrap()],
            hosts: vec![HostEntry {
                addr: self.host.as_ref().unwrap().local_addr(),
                link_key_file: self.key_file.clone(),
            }],
            admin: None,
            state_dir: self.dir.join("state"),
            slots: 12,
            workers: 2,
            ..GatewayConfig::default()
        }
    }

    fn start_gateway(&mut self, listen: &str, tweak: impl FnOnce(&mut GatewayConfig)) {
        let mut cfg = self.config(listen);
        tweak(&mut cfg);
        self.gateway = Some(spawn_gateway(cfg).unwrap());
    }

    fn gw(&self) -> &GatewayHandle {
        self.gateway.as_ref().unwrap()
    }

    fn addr(&self) -> SocketAddr {
        self.gw().client_addrs()[0]
    }

    fn count(&self, c: C) -> u64 {
        total(&self.gw().shared().metrics, c)
    }

    fn enroll(&self, name: &str) -> ClientCredentials {
        enroll(&self.clients_file, name).unwrap().creds.clone()
    }

    fn stop_gateway(&mut self) {
        self.gateway.take().unwrap().stop().unwrap();
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(g) = self.gateway.take() {
            let _ = g.stop();
        }
        if let Some(h) = self.host.take() {
            let _ = h.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn local(ip: &str) -> SocketAddr {
    format!("{ip}:0").parse().unwrap()
}

fn connect(w: &World, creds: ClientCredentials, ip: &str) -> UdpClient {
    let cfg = ClientConfig {
        keepalive: Duration::from_millis(200),
        ..ClientConfig::default()
    };
    // The host reloads its clients file within a second of an enrollment.
    UdpClient::connect(w.addr(), local(ip), creds, cfg, Duration::from_secs(8)).expect("connects")
}

fn echo(c: &mut UdpClient, payload: &[u8]) -> Vec<u8> {
    c.send(payload).unwrap();
    c.recv(Duration::from_secs(3)).unwrap().expect("echo")
}

/// A client written with the wire functions alone, to capture and replay raw datagrams.
struct RawClient {
    sock: UdpSocket,
    gw: SocketAddr,
    reply: HandshakeReply,
    seq: u64,
    /// KEYS received (key delivery), oldest first, and the next KEYS_ACK's `aseq`.
    keys: Vec<Vec<u8>>,
    aseq: u64,
}

impl RawClient {
    fn connect(w: &World, creds: &ClientCredentials) -> RawClient {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(8);
        let nonce: [u8; 16] = crypto::random_array();
        let hs = build_handshake(creds, &nonce, Ticks::wall_clock());
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            sock.send_to(&hs, w.addr()).unwrap();
            if let Ok((n, _)) = sock.recv_from(&mut buf)
                && let Ok(reply) = open_handshake_reply(&buf[..n], &creds.psk, &nonce)
            {
                return RawClient {
                    sock,
                    gw: w.addr(),
                    reply,
                    seq: 0,
                    keys: Vec::new(),
                    aseq: 0,
                };
            }
        }
        panic!("raw handshake timed out");
    }

    fn data(&mut self, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; payload.len() + 25];
        seal_data(
            &crypto::gcm(&self.reply.kd_c2s),
            self.seq,
            payload,
            &mut out,
        );
        self.seq += 1;
        out
    }

    /// Sends `datagram` and returns the first answer that is not a KEYS (those are kept).
    fn exchange(&mut self, datagram: &[u8]) -> Option<Vec<u8>> {
        self.sock.send_to(datagram, self.gw).unwrap();
        let mut buf = [0u8; 2048];
        loop {
            let (n, _) = self.sock.recv_from(&mut buf).ok()?;
            if buf[0] != KEYS_TYPE {
                return Some(buf[..n].to_vec());
            }
            self.keys.push(buf[..n].to_vec());
        }
    }

    /// Waits for a KEYS (key delivery), opens it and acknowledges it (KEYS_ACK).
    fn take_keys(&mut self, within: Duration) -> NewKeys {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 2048];
        while self.keys.is_empty() && Instant::now() < deadline {
            if let Ok((n, _)) = self.sock.recv_from(&mut buf)
                && buf[0] == KEYS_TYPE
            {
                self.keys.push(buf[..n].to_vec());
            }
        }
        let k = self.keys.first().expect("a KEYS arrives").clone();
        let (kseq, keys) = open_keys(&crypto::gcm(&self.reply.kd_s2c), &k).expect("KEYS opens");
        let mut ack = [0u8; KEYS_ACK_LEN];
        seal_keys_ack(
            &crypto::gcm(&self.reply.kd_c2s),
            self.aseq,
            keys.epoch,
            kseq,
            &mut ack,
        );
        self.aseq += 1;
        self.sock.send_to(&ack, self.gw).unwrap();
        keys
    }

    /// From now on rebinds with `keys` (its index, `R` and slot keys of their epoch).
    fn adopt(&mut self, keys: &NewKeys) {
        self.reply.epoch_byte = keys.epoch as u8;
        self.reply.rebind_secret = keys.rebind_secret;
        self.reply.slot_keys = keys.slot_keys.clone();
    }

    fn echo_ok(&mut self, payload: &[u8]) -> bool {
        let d = self.data(payload);
        let Some(back) = self.exchange(&d) else {
            return false;
        };
        let Ok(v) = DataView::new_checked(&back) else {
            return false;
        };
        let mut out = vec![0u8; back.len()];
        v.open(&crypto::gcm(&self.reply.kd_s2c), &mut out)
            .is_ok_and(|n| &out[..n] == payload)
    }

    /// Moves to a new socket, draws an UNRECOGNIZED and builds a REBIND from it.
    fn move_and_build_rebind(&mut self) -> (Vec<u8>, rebindgw::crypto::gcm::SessionGcm) {
        self.sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        self.sock
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let probe = self.data(&[0u8; 24]);
        let u = self.exchange(&probe).expect("UNRECOGNIZED");
        let u = Unrecognized::parse(&u).expect("an UNRECOGNIZED");
        assert_eq!(u.observed, self.sock.local_addr().unwrap());
        let secret = RebindSecret(self.reply.rebind_secret);
        let creds = RebindCredentials {
            conn_id: self.reply.conn_id,
            secret: &secret,
            slot_keys: &self.reply.slot_keys,
        };
        build_rebind(
            &creds,
            u.epoch_byte,
            u.t,
            &u.cookie,
            &fresh_nonces(self.reply.slot_keys.len()),
        )
    }
}

impl RawClient {
    /// Moves, asks for an UNRECOGNIZED of its own epoch with a cookie request naming it
    /// (§6 1.1), and rebinds from it; returns the answer's type, if any.
    fn move_and_rebind_in_own_epoch(&mut self) -> Option<u8> {
        self.sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        self.sock
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let slots = self.reply.slot_keys.len();
        let req = rebindgw::rebind::cookie_request_for(slots, self.reply.epoch_byte);
        let u = Unrecognized::parse(&self.exchange(&req)?).ok()?;
        if u.epoch_byte != self.reply.epoch_byte {
            return Some(MsgType::Unrecognized as u8);
        }
        let secret = RebindSecret(self.reply.rebind_secret);
        let creds = RebindCredentials {
            conn_id: self.reply.conn_id,
            secret: &secret,
            slot_keys: &self.reply.slot_keys,
        };
        let (rebind, _) = build_rebind(&creds, u.epoch_byte, u.t, &u.cookie, &fresh_nonces(slots));
        self.exchange(&rebind).map(|r| r[0])
    }
}

/// `rebindgw rotate` against a running gateway: refused without the admin key, refused
/// during grace unless forced; the old epoch's clients keep working (also across a restart
/// during grace) and rebind with their old keys; a client that takes its delivered keys
/// rebinds with them after grace, one that ignored them can no longer rebind.
#[test]
fn authenticated_rotation_with_grace_and_restart() {
    use rebindgw::gateway::rotate::{AdminKey, request_rotation};
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let tweak = |c: &mut GatewayConfig| {
        c.admin = Some("127.0.0.1:0".parse().unwrap());
        c.window_secs = 1;
        c.grace_secs = Some(4);
    };
    let mut w = World::new(&listen, tweak);
    let admin = w.gw().admin_addr().unwrap();
    let key = w.dir.join("state/admin.key");
    let t = Duration::from_secs(3);
    let mut c = RawClient::connect(&w, &w.enroll("rot"));
    assert!(c.echo_ok(b"epoch 1"));
    // A client that takes its new keys (key delivery) and one (`c`) that ignores them.
    let mut d = RawClient::connect(&w, &w.enroll("rot-keys"));
    assert!(d.echo_ok(b"epoch 1"));

    // Another key is refused, and counted.
    let wrong = w.dir.join("wrong.key");
    AdminKey::generate(&wrong).unwrap();
    let e = request_rotation(admin, &wrong, false, t).unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
    assert_eq!(scraped(&w, "rebindgw_admin_auth_failures_total"), 1.0);
    assert_eq!(scraped(&w, "rebindgw_epoch"), 1.0);

    let out = request_rotation(admin, &key, false, t).unwrap();
    assert!(out.starts_with("rotated: epoch 2"), "{out}");
    assert_eq!(scraped(&w, "rebindgw_epoch"), 2.0);
    assert_eq!(scraped(&w, "rebindgw_epoch_rotations_total"), 1.0);
    assert_eq!(scraped(&w, "rebindgw_epoch_connections{epoch=\"1\"}"), 2.0);
    // During grace, a second rotation needs --force.
    let e = request_rotation(admin, &key, false, t).unwrap_err();
    assert!(e.to_string().contains("409"), "{e}");
    // Both connections were registered in epoch 2; `d` gets its keys through its host.
    assert_eq!(scraped(&w, "rebindgw_epoch_connections{epoch=\"2\"}"), 2.0);
    let new_keys = d.take_keys(Duration::from_secs(3));
    assert_eq!(new_keys.epoch, 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while scraped(&w, "rebindgw_epoch_keys_acknowledged_total") < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(scraped(&w, "rebindgw_epoch_keys_acknowledged_total"), 1.0);
    assert_eq!(
        scraped(&w, "rebindgw_epoch_keys_pending"),
        1.0,
        "c never acknowledges"
    );

    // The old-epoch client keeps working, and rebinds with its old keys.
    assert!(c.echo_ok(b"grace"));
    assert_eq!(
        c.move_and_rebind_in_own_epoch(),
        Some(MsgType::RebindAck as u8)
    );
    assert!(c.echo_ok(b"moved in grace"));

    // A restart during grace keeps the previous epoch.
    w.stop_gateway();
    w.start_gateway(&listen, tweak);
    assert!(w.gw().shared().epochs().previous.is_some());
    assert!(c.echo_ok(b"after restart"));
    assert_eq!(
        c.move_and_rebind_in_own_epoch(),
        Some(MsgType::RebindAck as u8)
    );
    assert!(c.echo_ok(b"moved after restart"));

    // After grace the old epoch is gone: its connection is released and a cookie request
    // naming it gets an UNRECOGNIZED of the current epoch.
    let deadline = Instant::now() + Duration::from_secs(8);
    while w.gw().shared().epochs().previous.is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(w.gw().shared().epochs().previous.is_none(), "grace ended");
    // Both connections live on in their epoch-2 registrations: `c`'s old keys no longer
    // rebind (a cookie request naming epoch 1 gets an UNRECOGNIZED of epoch 2), `d`
    // rebinds with its delivered keys, with no handshake.
    assert_eq!(w.gw().shared().connections(), 2);
    assert_eq!(
        c.move_and_rebind_in_own_epoch(),
        Some(MsgType::Unrecognized as u8)
    );
    d.adopt(&new_keys);
    assert_eq!(
        d.move_and_rebind_in_own_epoch(),
        Some(MsgType::RebindAck as u8)
    );
    assert!(d.echo_ok(b"epoch 2 keys, moved"));
    // A new handshake lands in the new epoch.
    let mut c2 = RawClient::connect(&w, &w.enroll("rot2"));
    assert_eq!(c2.reply.epoch_byte, 2);
    assert!(c2.echo_ok(b"epoch 2"));
}

#[test]
fn fast_path_both_directions_and_rebind_after_tuple_change() {
    let w = World::new("127.0.0.1:0", |_| {});
    let mut c = connect(&w, w.enroll("alice"), "127.0.0.1");
    for i in 0..50u8 {
        let p = vec![i; 100];
        assert_eq!(echo(&mut c, &p), p);
    }
    assert!(w.count(C::TxHostData) >= 50 && w.count(C::TxClientData) >= 50);

    // The NAT moves the client; the application is not told.
    let old = c.local_addr().unwrap();
    c.move_socket(local("127.0.0.2")).unwrap();
    let new = c.local_addr().unwrap();
    c.send(b"after the move").unwrap();
    let ev = c
        .wait_event(Duration::from_secs(5), |e| {
            matches!(e, ClientEvent::Rebound { .. })
        })
        .unwrap()
        .expect("rebound");
    let ClientEvent::Rebound { new_tuple, .. } = ev else {
        unreachable!()
    };
    assert_eq!(new_tuple, new);
    assert_ne!(old, new);
    assert_eq!(echo(&mut c, b"hello again"), b"hello again");
    assert_eq!(w.count(C::RebindAccepted), 1);
    assert!(w.gw().shared().tuples.get(&old).is_none());
}

#[test]
fn replay_from_another_tuple_refused_and_duplicate_gets_same_ack() {
    let w = World::new("127.0.0.1:0", |_| {});
    let creds = w.enroll("bob");
    let mut c = RawClient::connect(&w, &creds);
    assert!(c.echo_ok(b"first"));
    let (rebind, session) = c.move_and_build_rebind();
    let ack1 = c.exchange(&rebind).expect("REBIND_ACK");
    assert_eq!(
        RebindAckView::new_checked(&ack1).unwrap().open(&session),
        Ok(c.reply.conn_id)
    );
    // Duplicate from the bound tuple: the same ACK again.
    let ack2 = c.exchange(&rebind).expect("second REBIND_ACK");
    assert_eq!(ack1, ack2);
    assert_eq!(w.count(C::RebindDuplicate), 1);

    // Replay from an attacker's tuple: refused (the cookie binds the tuple); it gets at most a
    // fresh UNRECOGNIZED, and the connection stays where it is.
    let thief = UdpSocket::bind("127.0.0.3:0").unwrap();
    thief
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    thief.send_to(&rebind, w.addr()).unwrap();
    let mut buf = [0u8; 2048];
    if let Ok((n, _)) = thief.recv_from(&mut buf) {
        assert_eq!(
            buf[0],
            MsgType::Unrecognized as u8,
            "only a fresh UNRECOGNIZED"
        );
        assert!(n <= rebind.len());
    }
    assert_eq!(w.count(C::RejectCookie), 1);
    assert_eq!(w.count(C::RebindAccepted), 1);
    assert!(c.echo_ok(b"still mine"));
}

#[test]
fn unrecognized_is_never_larger_than_its_trigger() {
    let w = World::new("127.0.0.1:0", |_| {});
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    let mut buf = [0u8; 2048];
    for len in [1usize, 10, 32, 33, 34, 49, 300] {
        let mut d = vec![0u8; len];
        d[0] = MsgType::Data as u8;
        s.send_to(&d, w.addr()).unwrap();
        match s.recv_from(&mut buf) {
            Ok((n, _)) => {
                assert!(n <= len, "{n}-byte reply to a {len}-byte trigger");
                assert_eq!(n, 33);
            }
            Err(_) => assert!(len < 33, "no reply to a {len}-byte trigger"),
        }
    }
    assert_eq!(w.count(C::UnrecognizedSmall), 3);
    assert_eq!(w.count(C::UnrecognizedSent), 4);
}

#[test]
fn unrecognized_rate_limit_holds_on_real_sockets() {
    let w = World::new("127.0.0.1:0", |c| {
        c.rate_limits.unrecognized_per_prefix = Rate::new(10.0, 20.0);
    });
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let start = Instant::now();
    let mut d = vec![0u8; 49];
    d[0] = MsgType::Data as u8;
    for _ in 0..300 {
        s.send_to(&d, w.addr()).unwrap();
    }
    let mut replies = 0;
    let mut buf = [0u8; 2048];
    while s.recv_from(&mut buf).is_ok() {
        replies += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Two workers share the limit; each gets half the burst and rate.
    let bound = 20.0 + 10.0 * elapsed + 2.0;
    assert!(
        f64::from(replies) <= bound,
        "{replies} replies, bound {bound}"
    );
    assert!(replies >= 10, "some replies ({replies})");
    assert!(w.count(C::UnrecognizedPrefixRate) >= 250);
}

#[test]
fn restart_keeps_connections_and_refuses_pre_restart_rebinds() {
    // A fixed port, so clients keep talking to the same address across the restart.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut w = World::new(&listen, |_| {});
    let creds = w.enroll("carol");
    let mut c = RawClient::connect(&w, &creds);
    assert!(c.echo_ok(b"before"));
    let (captured, _) = c.move_and_build_rebind();
    assert!(
        c.exchange(&captured).is_some(),
        "accepted before the restart"
    );
    assert!(c.echo_ok(b"moved"));
    w.stop_gateway();
    w.start_gateway(&listen, |_| {});
    assert_eq!(w.gw().shared().connections(), 1, "registry restored");
    // The restored tuple works at once.
    assert!(c.echo_ok(b"after restart"));
    // The REBIND captured before the restart is refused, even from its own tuple.
    assert!(
        c.exchange(&captured)
            .is_none_or(|r| r[0] != MsgType::RebindAck as u8),
        "replayed REBIND accepted after restart"
    );
    assert_eq!(w.count(C::RejectReplay), 1);
    // A fresh rebind still works.
    let (rebind, _) = c.move_and_build_rebind();
    assert_eq!(c.exchange(&rebind).unwrap()[0], MsgType::RebindAck as u8);
    assert!(c.echo_ok(b"rebound after restart"));
}

#[test]
fn ipv6_clients() {
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: ipv6_clients: no IPv6 loopback on this machine");
        return;
    }
    let w = World::new("[::1]:0", |_| {});
    let mut c = connect(&w, w.enroll("dave"), "[::1]");
    assert_eq!(echo(&mut c, b"over v6"), b"over v6");
    c.move_socket(local("[::1]")).unwrap();
    c.send(&[7u8; 40]).unwrap();
    assert!(
        c.wait_event(Duration::from_secs(5), |e| matches!(
            e,
            ClientEvent::Rebound { .. }
        ))
        .unwrap()
        .is_some()
    );
    assert_eq!(echo(&mut c, b"v6 again"), b"v6 again");
}

/// Value of one series in an admin scrape.
fn scraped(w: &World, series: &str) -> f64 {
    let admin = w.gw().admin_addr().expect("admin endpoint");
    let text = rebindgw::gateway::admin::fetch_metrics(admin, Duration::from_secs(2)).unwrap();
    rebindgw::gateway::metrics::parse_text(&text)
        .into_iter()
        .find(|(k, _)| k == series)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

#[test]
fn oversized_datagrams_are_counted_in_metrics() {
    let w = World::new("127.0.0.1:0", |c| {
        c.admin = Some("127.0.0.1:0".parse().unwrap())
    });
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Longer than the I/O loop's receive buffer: the kernel truncates it, the loop drops it.
    s.send_to(&[0x42u8; 3000], w.addr()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let series = "rebindgw_dropped_total{reason=\"oversize\"}";
    while scraped(&w, series) < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(scraped(&w, series), 1.0);
}

#[test]
fn running_gateway_is_ready_and_exports_per_host_series() {
    let w = World::new("127.0.0.1:0", |c| {
        c.admin = Some("127.0.0.1:0".parse().unwrap())
    });
    let admin = w.gw().admin_addr().unwrap();
    let mut c = connect(&w, w.enroll("alice"), "127.0.0.1");
    assert_eq!(echo(&mut c, b"hello"), b"hello");
    let host = w.host.as_ref().unwrap().local_addr();
    assert_eq!(
        scraped(
            &w,
            &format!("rebindgw_host_peer_connections{{host=\"{host}\"}}")
        ),
        1.0
    );
    assert!(
        scraped(
            &w,
            &format!("rebindgw_host_peer_tx_packets_total{{host=\"{host}\"}}")
        ) >= 2.0
    );
    assert!(
        scraped(
            &w,
            &format!("rebindgw_host_peer_rx_packets_total{{host=\"{host}\"}}")
        ) >= 2.0
    );
    let (code, body) =
        rebindgw::gateway::admin::fetch(admin, "/readyz", Duration::from_secs(2)).unwrap();
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (code, body) =
        rebindgw::gateway::admin::fetch(admin, "/healthz", Duration::from_secs(2)).unwrap();
    assert_eq!(code, 200);
    assert!(body.starts_with("ok\nversion="), "{body}");
}

#[test]
fn idle_connection_expires_at_gateway_and_host() {
    let w = World::new("127.0.0.1:0", |c| c.idle_timeout_secs = 2);
    let mut c = RawClient::connect(&w, &w.enroll("idle"));
    assert!(c.echo_ok(b"once"));
    let host = w.host.as_ref().unwrap();
    assert_eq!(w.gw().shared().connections(), 1);
    // Silent for longer than idle_timeout_secs plus a sweep interval.
    let deadline = Instant::now() + Duration::from_secs(8);
    while w.gw().shared().connections() > 0 || host.stats().connections > 0 {
        assert!(Instant::now() < deadline, "not expired");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(w.count(C::Expired), 1);
    assert_eq!(host.stats().counters.expired_by_gateway, 1);
    assert_eq!(
        host.stats().counters.closes_sent,
        0,
        "the host sent no CLOSE"
    );
    // Its DATA now meets an unknown tuple.
    assert!(!c.echo_ok(b"again"));
}

/// `rotate_every_secs` on a running gateway: epochs follow each other on schedule, each
/// grace period ends on time, a connection made in one epoch moves to the registration the
/// rotation gave it when its grace ends, and a new handshake lands in the current epoch.
#[test]
fn scheduled_rotation_and_grace_end() {
    let w = World::new("127.0.0.1:0", |c| {
        c.admin = Some("127.0.0.1:0".parse().unwrap());
        c.window_secs = 1;
        c.grace_secs = Some(2);
        c.rotate_every_secs = 6;
    });
    let later = w.enroll("sched2");
    let mut c = RawClient::connect(&w, &w.enroll("sched"));
    assert_eq!(c.reply.epoch_byte, 1);
    assert!(c.echo_ok(b"epoch 1"));
    let shared = w.gw().shared().clone();
    let epoch = || shared.epochs().current.keys.epoch();
    let deadline = Instant::now() + Duration::from_secs(8);
    while epoch() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(epoch(), 2, "rotated on schedule");
    assert!(
        c.echo_ok(b"grace"),
        "the old epoch's connection works during grace"
    );
    let deadline = Instant::now() + Duration::from_secs(4);
    while shared.epochs().previous.is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(shared.epochs().previous.is_none(), "grace ended");
    assert_eq!(epoch(), 2, "not yet the next rotation");
    // Registered in epoch 2 at the rotation, the connection moved there: not released.
    assert_eq!(shared.connections(), 1);
    assert_eq!(shared.connections_per_epoch(), vec![(2, 1)]);
    assert!(c.echo_ok(b"after grace, same tuple"));
    let mut c2 = RawClient::connect(&w, &later);
    assert_eq!(c2.reply.epoch_byte, 2);
    assert!(c2.echo_ok(b"epoch 2"));
    assert_eq!(scraped(&w, "rebindgw_epoch_rotations_total"), 1.0);
}

/// A client offline (asleep, sending nothing, its old tuple gone) across two rotations on
/// real sockets: it missed both key deliveries and both grace periods, so when it comes back
/// from a new tuple no key it holds is accepted; its rebind runs out and the client core
/// handshakes again by itself (no application reconnect), into the newest epoch.
#[test]
fn a_client_offline_across_two_rotations_comes_back_through_a_handshake() {
    use rebindgw::gateway::rotate::request_rotation;
    let tweak = |c: &mut GatewayConfig| {
        c.admin = Some("127.0.0.1:0".parse().unwrap());
        c.window_secs = 1;
        c.grace_secs = Some(2);
    };
    let w = World::new("127.0.0.1:0", tweak);
    let admin = w.gw().admin_addr().unwrap();
    let key = w.dir.join("state/admin.key");
    let cfg = ClientConfig {
        // Asleep: no keepalive while away; a short rebind deadline keeps the test short.
        keepalive: Duration::from_secs(300),
        rebind_deadline: Duration::from_secs(2),
        ..ClientConfig::default()
    };
    let creds = w.enroll("sleeper");
    let mut c = UdpClient::connect(
        w.addr(),
        local("127.0.0.1"),
        creds,
        cfg,
        Duration::from_secs(8),
    )
    .expect("connects");
    assert_eq!(echo(&mut c, b"epoch 1"), b"epoch 1");
    let first_conn = c.client().conn_id().unwrap();
    while c.poll_event().is_some() {}
    let handshakes = w.host.as_ref().unwrap().stats().counters.handshakes_ok;
    // Offline: its tuple is gone (what the host sends it is lost) and it sends nothing.
    c.move_socket(local("127.0.0.2")).unwrap();
    for epoch in [2.0, 3.0] {
        let out = request_rotation(admin, &key, false, Duration::from_secs(5)).unwrap();
        assert!(out.starts_with("rotated: epoch"), "{out}");
        assert_eq!(scraped(&w, "rebindgw_epoch"), epoch);
        let deadline = Instant::now() + Duration::from_secs(8);
        while w.gw().shared().epochs().previous.is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            w.gw().shared().epochs().previous.is_none(),
            "grace {epoch} ended"
        );
    }
    // Back, from a new tuple: the application just sends (a datagram at least as long as
    // an UNRECOGNIZED, which the gateway answers with one of epoch 3).
    c.send(b"back from sleep").unwrap();
    let ev = c
        .wait_event(Duration::from_secs(10), |e| {
            matches!(e, ClientEvent::Reconnecting { .. })
        })
        .unwrap();
    assert!(
        matches!(ev, Some(ClientEvent::Reconnecting { .. })),
        "{ev:?}"
    );
    let ev = c
        .wait_event(Duration::from_secs(10), |e| {
            matches!(e, ClientEvent::Connected { .. })
        })
        .unwrap();
    assert!(matches!(ev, Some(ClientEvent::Connected { .. })), "{ev:?}");
    assert_ne!(c.client().conn_id(), Some(first_conn));
    assert_eq!(echo(&mut c, b"epoch 3"), b"epoch 3");
    assert_eq!(
        w.host.as_ref().unwrap().stats().counters.handshakes_ok,
        handshakes + 1,
        "exactly one new handshake"
    );
    assert_eq!(scraped(&w, "rebindgw_epoch"), 3.0);
}
