//! Cluster mode end to end on loopback (feature `cluster`): real gateways sharing a real
//! etcd, the reference host, and a client behind a small user-space "NAT + ECMP router" that
//! gives each client source its own outside port and picks a gateway from the client's source
//! address, as a router hashing the 4-tuple would. Without an `etcd` binary the tests print
//! SKIPPED (and fail when `REBINDGW_REQUIRE_TOOLS` is set, as in CI).
#![cfg(feature = "cluster")]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rebindgw::client::socket::UdpClient;
use rebindgw::client::{ClientConfig, ClientEvent};
use rebindgw::crypto;
use rebindgw::gateway::config::{ClusterConfig, GatewayConfig, HostEntry};
use rebindgw::gateway::metrics::{C, ClusterFacts, total};
use rebindgw::gateway::run::{GatewayHandle, spawn_gateway};
use rebindgw::host::clients::enroll;
use rebindgw::host::{HostHandle, HostOptions, spawn_host};
use rebindgw::secrets::{generate_link_key, generate_master};
use rebindgw::wire::ClientCredentials;

mod etcd;
use etcd::{Etcd, start_etcd};

/// Client source IP → gateway: the last octet modulo the number of gateways (a stand-in for
/// the router's hash, chosen so a test decides where a move lands).
struct Router {
    outside: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Router {
    fn start(gateways: Arc<Mutex<Vec<SocketAddr>>>) -> Router {
        let service = UdpSocket::bind("127.0.0.1:0").unwrap();
        service
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let outside = service.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                // Per client source: its own outside socket (a NAT mapping) and a thread
                // carrying the gateway's replies back.
                let mut flows: HashMap<SocketAddr, (UdpSocket, usize)> = HashMap::new();
                let mut repliers = Vec::new();
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = service.recv_from(&mut buf) else {
                        continue;
                    };
                    let gws = gateways.lock().unwrap().clone();
                    let (sock, g) = flows.entry(from).or_insert_with(|| {
                        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                        let back = s.try_clone().unwrap();
                        let reply_to = service.try_clone().unwrap();
                        let stop = stop.clone();
                        repliers.push(std::thread::spawn(move || {
                            let mut b = [0u8; 2048];
                            while !stop.load(Ordering::Relaxed) {
                                if let Ok((n, _)) = back.recv_from(&mut b) {
                                    let _ = reply_to.send_to(&b[..n], from);
                                }
                            }
                        }));
                        let octet = match from.ip() {
                            IpAddr::V4(v4) => usize::from(v4.octets()[3]),
                            IpAddr::V6(_) => 0,
                        };
                        (s, octet % gws.len())
                    });
                    let _ = sock.send_to(&buf[..n], gws[*g]);
                }
                for r in repliers {
                    let _ = r.join();
                }
            }
        });
        Router {
            outside,
            stop,
            threads: vec![thread],
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Cluster {
    dir: PathBuf,
    etcd: Etcd,
    host: Option<HostHandle>,
    gateways: Vec<Option<GatewayHandle>>,
    /// What the router sends to (a stopped gateway's address stays: its clients' packets
    /// are lost until the router re-hashes, as ECMP does when the next hop goes).
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    key_file: PathBuf,
    master_file: PathBuf,
    clients_file: PathBuf,
    tweak: fn(&mut GatewayConfig),
}

impl Cluster {
    fn new(etcd: Etcd, n: usize) -> Cluster {
        Cluster::with(etcd, n, |_| {})
    }

    fn with(etcd: Etcd, n: usize, tweak: fn(&mut GatewayConfig)) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "rebindgw-cluster-{}-{}",
            std::process::id(),
            hex::encode(crypto::random_array::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let key_file = dir.join("host.key");
        let key = generate_link_key(&key_file).unwrap();
        let master_file = dir.join("master.key");
        generate_master(&master_file).unwrap();
        let clients_file = dir.join("clients.toml");
        enroll(&clients_file, "seed").unwrap();
        let host = spawn_host(HostOptions::new(
            "127.0.0.1:0".parse().unwrap(),
            clients_file.clone(),
            key,
        ))
        .unwrap();
        let mut c = Cluster {
            dir,
            etcd,
            host: Some(host),
            gateways: Vec::new(),
            addrs: Arc::new(Mutex::new(Vec::new())),
            key_file,
            master_file,
            clients_file,
            tweak,
        };
        for id in 1..=n as u16 {
            let g = c.spawn(id);
            c.addrs.lock().unwrap().push(g.client_addrs()[0]);
            c.gateways.push(Some(g));
        }
        c
    }

    fn config(&self, id: u16) -> GatewayConfig {
        let mut cfg = GatewayConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            // One host-link address per gateway: the host tells gateways apart by address.
            host_link: format!("127.0.0.{}:0", 10 + id).parse().unwrap(),
            hosts: vec![HostEntry {
                addr: self.host.as_ref().unwrap().local_addr(),
                link_key_file: self.key_file.clone(),
            }],
            admin: None,
            state_dir: self.dir.join(format!("gw{id}")),
            master_key: Some(self.master_file.clone()),
            slots: 12,
            workers: 2,
            cluster: ClusterConfig {
                endpoints: vec![self.etcd.endpoint.clone()],
                name: "e2e".into(),
                gateway_id: Some(id),
                lease_ttl_secs: 2,
                timeout_ms: 1000,
            },
            ..GatewayConfig::default()
        };
        (self.tweak)(&mut cfg);
        cfg
    }

    fn spawn(&self, id: u16) -> GatewayHandle {
        spawn_gateway(self.config(id)).unwrap()
    }

    fn gw(&self, i: usize) -> &GatewayHandle {
        self.gateways[i].as_ref().unwrap()
    }

    fn facts(&self, i: usize) -> ClusterFacts {
        self.gw(i).cluster_facts().expect("cluster mode")
    }

    /// Every gateway's non-zero counters and the host's, for a failing test's output.
    fn dump(&self) {
        for (i, g) in self.gateways.iter().enumerate() {
            let Some(g) = g else { continue };
            let text = rebindgw::gateway::metrics::render(
                &g.shared().metrics,
                &rebindgw::gateway::metrics::GatewayFacts::default(),
            );
            for line in text.lines() {
                if !line.starts_with('#') && !line.ends_with(" 0") {
                    eprintln!("gateway {i}: {line}");
                }
            }
            eprintln!("gateway {i}: {:?}", g.cluster_facts());
        }
        eprintln!("host: {:?}", self.host.as_ref().unwrap().stats());
    }

    fn enroll(&self, name: &str) -> ClientCredentials {
        enroll(&self.clients_file, name).unwrap().creds.clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for g in self.gateways.iter_mut().filter_map(Option::take) {
            let _ = g.stop();
        }
        if let Some(h) = self.host.take() {
            let _ = h.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn connect(router: &Router, creds: ClientCredentials, ip: &str) -> UdpClient {
    let cfg = ClientConfig {
        keepalive: Duration::from_millis(200),
        ..ClientConfig::default()
    };
    UdpClient::connect(
        router.outside,
        format!("{ip}:0").parse().unwrap(),
        creds,
        cfg,
        Duration::from_secs(8),
    )
    .expect("connects")
}

fn echo(cluster: &Cluster, c: &mut UdpClient, payload: &[u8]) -> Vec<u8> {
    c.send(payload).unwrap();
    let r = c.recv(Duration::from_secs(3)).unwrap();
    if r.is_none() {
        cluster.dump();
    }
    r.expect("echo")
}

/// Moves the client to source `ip` and waits until it rebinds; returns how long it took.
fn move_and_rebind(c: &mut UdpClient, ip: &str) -> Duration {
    let started = Instant::now();
    c.move_socket(format!("{ip}:0").parse().unwrap()).unwrap();
    c.send(b"after the move").unwrap();
    c.wait_event(Duration::from_secs(8), |e| {
        matches!(e, ClientEvent::Rebound { .. })
    })
    .unwrap()
    .expect("rebound");
    started.elapsed()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_rebind_onto_another_gateway_recovers_and_the_old_owner_lets_go() {
    let Some(etcd) = start_etcd("cross_gateway") else {
        return;
    };
    let cluster = Cluster::new(etcd, 2);
    let router = Router::start(cluster.addrs.clone());
    // 127.0.0.1 → gateway 1 (index 1), 127.0.0.2 → gateway 0.
    let mut c = connect(&router, cluster.enroll("alice"), "127.0.0.1");
    for i in 0..100u8 {
        let p = vec![i; 64];
        assert_eq!(echo(&cluster, &mut c, &p), p);
    }
    // (A handshake retried before the host saw the enrollment may register twice.)
    let registered = cluster.facts(1).registered;
    assert!(registered >= 1, "registered in etcd by gateway 1");
    // Gateway 0 holds the connection too, from the watch, but no tuple for it.
    wait_until("gateway 0 to learn the connection", || {
        cluster.facts(0).remote_added == registered
    });
    assert_eq!(
        cluster.gw(0).shared().connections(),
        cluster.gw(1).shared().connections()
    );
    assert!(cluster.gw(0).shared().tuples.is_empty());
    // The packet path never read etcd: one range read each, at start.
    let forwarded = total(&cluster.gw(1).shared().metrics, C::TxHostData);
    assert!(forwarded >= 100, "forwarded {forwarded}");
    for i in 0..2 {
        assert_eq!(cluster.facts(i).range_reads, 1, "gateway {i}");
    }

    let took = move_and_rebind(&mut c, "127.0.0.2");
    assert_eq!(
        echo(&cluster, &mut c, b"through gateway 0"),
        b"through gateway 0"
    );
    assert_eq!(cluster.facts(0).rebinds_committed, 1);
    assert_eq!(total(&cluster.gw(0).shared().metrics, C::RebindAccepted), 1);
    // The old owner saw the new owner in its watch and dropped the old tuple.
    wait_until("gateway 1 to let go", || {
        cluster.facts(1).remote_updated >= 1 && cluster.gw(1).shared().tuples.is_empty()
    });
    println!("cross-gateway rebind recovered in {took:?}");

    // Back onto gateway 1 (it has the newer L from the watch): a second cross move.
    move_and_rebind(&mut c, "127.0.0.3");
    assert_eq!(
        echo(&cluster, &mut c, b"gateway 1 again"),
        b"gateway 1 again"
    );
    assert_eq!(cluster.facts(1).rebinds_committed, 1);
    for i in 0..2 {
        assert_eq!(cluster.facts(i).range_reads, 1, "gateway {i}");
        assert_eq!(cluster.facts(i).conflicts, 0);
    }
}

#[test]
fn a_dead_gateway_s_clients_recover_on_the_survivor_and_a_restart_reloads_from_etcd() {
    let Some(etcd) = start_etcd("dead_gateway") else {
        return;
    };
    let mut cluster = Cluster::new(etcd, 2);
    let router = Router::start(cluster.addrs.clone());
    let mut c = connect(&router, cluster.enroll("bob"), "127.0.0.1");
    assert_eq!(echo(&cluster, &mut c, b"via gateway 1"), b"via gateway 1");

    // Gateway 1 dies; the router's next hop for it goes, so its flows re-hash to gateway 0.
    cluster.gateways[1].take().unwrap().stop().unwrap();
    let survivor = cluster.addrs.lock().unwrap()[0];
    cluster.addrs.lock().unwrap()[1] = survivor;
    move_and_rebind(&mut c, "127.0.0.5");
    assert_eq!(echo(&cluster, &mut c, b"via gateway 0"), b"via gateway 0");
    assert_eq!(cluster.facts(0).rebinds_committed, 1);

    // Gateway 1 comes back (same id, its lease ended with the clean stop): it rebuilds its
    // copy from etcd, and the connection it no longer owns has no tuple there.
    let back = cluster.spawn(2);
    assert!(back.shared().connections() >= 1);
    assert_eq!(
        back.shared().connections(),
        cluster.gw(0).shared().connections()
    );
    assert!(back.shared().tuples.is_empty());
    assert_eq!(back.cluster_facts().unwrap().range_reads, 1);
    cluster.gateways[1] = Some(back);
}

#[test]
fn a_second_gateway_with_a_live_id_refuses_to_start() {
    let Some(etcd) = start_etcd("live_id") else {
        return;
    };
    let cluster = Cluster::new(etcd, 1);
    let mut cfg = cluster.config(1);
    cfg.state_dir = cluster.dir.join("other");
    let err = spawn_gateway(cfg).err().expect("refused");
    let text = format!("{err:#}");
    assert!(text.contains("held by a live gateway"), "{text}");
}

/// One captured REBIND sent from its tuple to all three gateways at the same instant: etcd
/// commits it once (one REBOUND reaches the host); a gateway that sees the commit before its
/// own answers the §6 duplicate with the identical ACK, the others send nothing.
#[test]
fn one_rebind_sent_to_three_gateways_at_once_is_accepted_once() {
    use rebindgw::rebind::{RebindCredentials, RebindSecret, build_rebind, fresh_nonces};
    use rebindgw::time::Ticks;
    use rebindgw::wire::{MsgType, Unrecognized, build_handshake, open_handshake_reply, seal_data};
    let Some(etcd) = start_etcd("rebind_to_all") else {
        return;
    };
    let cluster = Cluster::new(etcd, 3);
    let gws: Vec<SocketAddr> = cluster.addrs.lock().unwrap().clone();
    let creds = cluster.enroll("carol");
    // Handshake straight to gateway 0 (the host picks up the enrollment within a second).
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let nonce: [u8; 16] = crypto::random_array();
    let hs = build_handshake(&creds, &nonce, Ticks::wall_clock());
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(8);
    let reply = loop {
        assert!(Instant::now() < deadline, "handshake timed out");
        sock.send_to(&hs, gws[0]).unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && let Ok(r) = open_handshake_reply(&buf[..n], &creds.psk, &nonce)
        {
            break r;
        }
    };
    // Every gateway knows the connection before the REBIND is sent.
    wait_until("the watch to reach every gateway", || {
        (1..3).all(|i| cluster.gw(i).shared().connections() >= 1)
    });

    // The client moves; gateway 0 answers its DATA with UNRECOGNIZED; it builds a REBIND.
    let moved = UdpSocket::bind("127.0.0.1:0").unwrap();
    moved
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut probe = vec![0u8; 24 + 25];
    seal_data(&crypto::gcm(&reply.kd_c2s), 0, &[0u8; 24], &mut probe);
    moved.send_to(&probe, gws[0]).unwrap();
    let (n, _) = moved.recv_from(&mut buf).expect("UNRECOGNIZED");
    let u = Unrecognized::parse(&buf[..n]).expect("an UNRECOGNIZED");
    let secret = RebindSecret(reply.rebind_secret);
    let rc = RebindCredentials {
        conn_id: reply.conn_id,
        secret: &secret,
        slot_keys: &reply.slot_keys,
    };
    let (rebind, _) = build_rebind(
        &rc,
        u.epoch_byte,
        u.t,
        &u.cookie,
        &fresh_nonces(reply.slot_keys.len()),
    );
    for gw in &gws {
        moved.send_to(&rebind, *gw).unwrap();
    }
    let mut acks = Vec::new();
    while let Ok((n, from)) = moved.recv_from(&mut buf) {
        assert_eq!(buf[0], MsgType::RebindAck as u8, "only ACKs, from {from}");
        acks.push(buf[..n].to_vec());
    }
    let committed: u64 = (0..3).map(|i| cluster.facts(i).rebinds_committed).sum();
    let refused: u64 = (0..3)
        .map(|i| {
            let f = cluster.facts(i);
            f.conflicts + f.stale + f.duplicates
        })
        .sum();
    println!(
        "one REBIND to 3 gateways: {} committed, {} refused or duplicate, {} ACKs",
        committed,
        refused,
        acks.len()
    );
    assert_eq!(committed, 1, "committed exactly once");
    // The others lost the compare-and-swap, or saw the commit first (a §6 duplicate,
    // answered with the same ACK, here or by the link).
    let local_duplicates: u64 = (0..3)
        .map(|i| total(&cluster.gw(i).shared().metrics, C::RebindDuplicate))
        .sum();
    assert!(
        refused + local_duplicates >= 2,
        "refused {refused}, local duplicates {local_duplicates}"
    );
    assert!(!acks.is_empty() && acks.len() <= 3);
    assert!(acks.iter().all(|a| *a == acks[0]), "every ACK is the same");
    wait_until("the host's REBOUND", || {
        cluster.host.as_ref().unwrap().stats().counters.rebounds >= 1
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        cluster.host.as_ref().unwrap().stats().counters.rebounds,
        1,
        "one REBOUND"
    );
}

/// An idle connection expires at the gateway that owns it; the removal goes through etcd and
/// the other gateways drop their copy.
#[test]
fn an_idle_connection_expires_at_its_owner_and_leaves_every_copy() {
    let Some(etcd) = start_etcd("idle_removal") else {
        return;
    };
    let cluster = Cluster::with(etcd, 2, |cfg| cfg.idle_timeout_secs = 2);
    let router = Router::start(cluster.addrs.clone());
    let mut c = connect(&router, cluster.enroll("dave"), "127.0.0.1");
    assert_eq!(echo(&cluster, &mut c, b"hello"), b"hello");
    wait_until("gateway 0 to learn the connection", || {
        cluster.gw(0).shared().connections() >= 1
    });
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(15);
    while (0..2).any(|i| cluster.gw(i).shared().connections() != 0) {
        if Instant::now() > deadline {
            cluster.dump();
            panic!("an idle connection was not removed everywhere");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let owner = cluster.facts(1);
    assert!(owner.removals_sent >= 1 && owner.removed >= 1, "{owner:?}");
    assert!(cluster.facts(0).remote_removed >= 1);
    assert_eq!(
        cluster.facts(0).removals_sent,
        0,
        "only the owner expires it"
    );
}

/// A client written with the wire functions alone: it never takes the keys a rotation
/// delivers (it drops every KEYS), so it only holds its handshake's epoch.
struct OldKeysClient {
    sock: UdpSocket,
    to: SocketAddr,
    reply: rebindgw::wire::HandshakeReply,
    seq: u64,
}

impl OldKeysClient {
    fn bind(ip: &str) -> UdpSocket {
        let s = UdpSocket::bind(format!("{ip}:0")).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s
    }

    fn connect(router: &Router, creds: &ClientCredentials, ip: &str) -> OldKeysClient {
        use rebindgw::time::Ticks;
        use rebindgw::wire::{build_handshake, open_handshake_reply};
        let sock = OldKeysClient::bind(ip);
        let nonce: [u8; 16] = crypto::random_array();
        let hs = build_handshake(creds, &nonce, Ticks::wall_clock());
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            sock.send_to(&hs, router.outside).unwrap();
            if let Ok((n, _)) = sock.recv_from(&mut buf)
                && let Ok(reply) = open_handshake_reply(&buf[..n], &creds.psk, &nonce)
            {
                return OldKeysClient {
                    sock,
                    to: router.outside,
                    reply,
                    seq: 0,
                };
            }
        }
        panic!("raw handshake timed out");
    }

    /// Sends `datagram`; the first answer that is not a KEYS (those are dropped).
    fn exchange(&self, datagram: &[u8]) -> Option<Vec<u8>> {
        self.sock.send_to(datagram, self.to).unwrap();
        let mut buf = [0u8; 2048];
        loop {
            let (n, _) = self.sock.recv_from(&mut buf).ok()?;
            if buf[0] != rebindgw::wire::KEYS_TYPE {
                return Some(buf[..n].to_vec());
            }
        }
    }

    fn echo_ok(&mut self, payload: &[u8]) -> bool {
        use rebindgw::wire::{DataView, seal_data};
        let mut d = vec![0u8; payload.len() + 25];
        seal_data(&crypto::gcm(&self.reply.kd_c2s), self.seq, payload, &mut d);
        self.seq += 1;
        // A few tries: the host's KEYS retransmissions share the socket.
        for _ in 0..3 {
            let Some(back) = self.exchange(&d) else {
                continue;
            };
            let Ok(v) = DataView::new_checked(&back) else {
                continue;
            };
            let mut out = vec![0u8; back.len()];
            if v.open(&crypto::gcm(&self.reply.kd_s2c), &mut out)
                .is_ok_and(|n| &out[..n] == payload)
            {
                return true;
            }
        }
        false
    }

    /// Moves to source `ip`, asks for an UNRECOGNIZED of its own epoch (a cookie request
    /// naming it, §6 1.1) and rebinds with its handshake's keys; the answer's type.
    fn move_and_rebind_in_own_epoch(&mut self, ip: &str) -> Option<u8> {
        use rebindgw::rebind::{
            RebindCredentials, RebindSecret, build_rebind, cookie_request_for, fresh_nonces,
        };
        use rebindgw::wire::{MsgType, Unrecognized};
        self.sock = OldKeysClient::bind(ip);
        let slots = self.reply.slot_keys.len();
        let req = cookie_request_for(slots, self.reply.epoch_byte);
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

/// The records etcd holds per epoch.
fn records_per_epoch(cluster: &Cluster) -> HashMap<u32, usize> {
    let mut per = HashMap::new();
    for (epoch, _) in records(cluster) {
        *per.entry(epoch).or_insert(0) += 1;
    }
    per
}

/// Every record etcd holds, with its epoch.
fn records(cluster: &Cluster) -> Vec<(u32, rebindgw::cluster::record::ConnRecord)> {
    use rebindgw::cluster::etcd::EtcdRegistry;
    use rebindgw::cluster::mirror::Mirror;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut reg = EtcdRegistry::connect(
            std::slice::from_ref(&cluster.etcd.endpoint),
            "/rebindgw/e2e",
            900,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let (changes, revision) = reg.read_all(Duration::from_secs(5)).await.unwrap();
        let mut mirror = Mirror::new("/rebindgw/e2e", 900);
        mirror.reload(changes, revision);
        mirror
            .iter()
            .map(|((epoch, _), e)| (epoch, e.record.clone()))
            .collect()
    })
}

fn with_admin_and_grace(cfg: &mut GatewayConfig) {
    cfg.admin = Some("127.0.0.1:0".parse().unwrap());
    cfg.window_secs = 1;
    cfg.grace_secs = Some(6);
}

/// Key rotation across the cluster: `POST /rotate` on one gateway; every gateway switches
/// to the new epoch; every client (on three gateways) installs its new-epoch keys with no
/// new handshake; one rebinds with them onto another gateway; a client that only holds its
/// old keys rebinds onto another gateway during grace; after grace etcd holds no record of
/// the old epoch and every connection still echoes.
#[test]
fn a_rotation_on_one_gateway_moves_the_whole_cluster_to_the_new_epoch() {
    use rebindgw::gateway::rotate::request_rotation;
    use rebindgw::wire::MsgType;
    let Some(etcd) = start_etcd("rotation") else {
        return;
    };
    let cluster = Cluster::with(etcd, 3, with_admin_and_grace);
    let router = Router::start(cluster.addrs.clone());
    // Source .1 → gateway 1, .2 → gateway 2, .3 → gateway 0 (last octet modulo 3).
    let mut clients: Vec<UdpClient> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        .iter()
        .enumerate()
        .map(|(i, ip)| connect(&router, cluster.enroll(&format!("rot{i}")), ip))
        .collect();
    let mut old = OldKeysClient::connect(&router, &cluster.enroll("old-keys"), "127.0.0.4");
    for c in clients.iter_mut() {
        assert_eq!(echo(&cluster, c, b"epoch 1"), b"epoch 1");
    }
    assert!(old.echo_ok(b"epoch 1"));
    let n = cluster.gw(0).shared().connections();
    assert!(n >= 4, "{n}");
    wait_until("every gateway to hold every connection", || {
        (0..3).all(|i| cluster.gw(i).shared().connections() == n)
    });
    let handshakes: Vec<u64> = clients
        .iter()
        .map(|c| c.client().stats().handshakes_sent)
        .collect();
    assert_eq!(records_per_epoch(&cluster).get(&1), Some(&n));

    // Rotate through gateway 0's admin endpoint.
    let admin = cluster.gw(0).admin_addr().unwrap();
    let key = cluster.dir.join("gw1/admin.key");
    let out = request_rotation(admin, &key, false, Duration::from_secs(15)).unwrap();
    assert!(out.starts_with("rotated: epoch 2"), "{out}");
    wait_until("every gateway to switch to epoch 2", || {
        (0..3).all(|i| {
            let e = cluster.gw(i).shared().epochs();
            e.current.keys.epoch() == 2 && e.previous.as_ref().map(|p| p.keys.epoch()) == Some(1)
        })
    });
    for i in 0..3 {
        assert_eq!(cluster.gw(i).shared().rotations(), 1, "gateway {i}");
    }
    // A second command during grace is refused, and changes nothing.
    let e = request_rotation(admin, &key, false, Duration::from_secs(15)).unwrap_err();
    assert!(e.to_string().contains("409"), "{e}");
    // Each owner registered its connections in epoch 2 through etcd: one record each.
    wait_until("the new epoch's registrations", || {
        records_per_epoch(&cluster).get(&2) == Some(&n)
    });
    // Every copy holds them in both epochs, and counts each connection once.
    wait_until("every copy to hold both epochs", || {
        (0..3).all(|i| cluster.gw(i).shared().connections_per_epoch() == vec![(2, n), (1, n)])
    });
    for i in 0..3 {
        assert_eq!(cluster.gw(i).shared().connections(), n, "gateway {i}");
    }

    // Every client installs its new keys (through the gateway that owns it), with no new
    // handshake; the owners see every acknowledgement but the old-keys client's.
    let deadline = Instant::now() + Duration::from_secs(10);
    while clients
        .iter()
        .any(|c| c.client().stats().keys_installed == 0)
    {
        assert!(Instant::now() < deadline, "keys not installed");
        for c in clients.iter_mut() {
            c.drive(Duration::from_millis(20)).unwrap();
        }
    }
    for (c, before) in clients.iter().zip(&handshakes) {
        assert_eq!(c.client().stats().keys_installed, 1);
        assert_eq!(
            c.client().stats().handshakes_sent,
            *before,
            "no new handshake"
        );
    }
    wait_until("the keys' acknowledgements", || {
        (0..3)
            .map(|i| total(&cluster.gw(i).shared().metrics, C::KeysAcknowledged))
            .sum::<u64>()
            == 3
    });
    let pending: usize = (0..3).map(|i| cluster.gw(i).shared().keys_pending()).sum();
    assert_eq!(
        pending,
        n - 3,
        "only the old-keys client's keys stay pending"
    );

    // Client 0 (on gateway 1) moves to .5 (gateway 2) and rebinds with its epoch-2 keys.
    move_and_rebind(&mut clients[0], "127.0.0.5");
    assert_eq!(clients[0].client().stats().keys_switched, 1);
    assert_eq!(
        echo(&cluster, &mut clients[0], b"epoch 2 keys, gateway 2"),
        b"epoch 2 keys, gateway 2"
    );
    assert_eq!(cluster.facts(2).rebinds_committed, 1);

    // During grace the old-keys client (on gateway 1) moves to .6 (gateway 0) and rebinds
    // with its epoch-1 keys.
    assert_eq!(
        old.move_and_rebind_in_own_epoch("127.0.0.6"),
        Some(MsgType::RebindAck as u8)
    );
    assert!(old.echo_ok(b"old keys, gateway 0"));
    assert_eq!(cluster.facts(0).rebinds_committed, 1);

    // Grace ends on every gateway; the owners delete the old epoch's records.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let per = records_per_epoch(&cluster);
        let done = (0..3).all(|i| cluster.gw(i).shared().epochs().previous.is_none())
            && !per.contains_key(&1);
        if done {
            assert_eq!(per.get(&2), Some(&n));
            break;
        }
        if Instant::now() > deadline {
            cluster.dump();
            panic!("the old epoch's records stay: {per:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for i in 0..3 {
        assert_eq!(
            cluster.gw(i).shared().connections_per_epoch(),
            vec![(2, n)],
            "gateway {i}"
        );
    }
    // In etcd too, each connection's new record names the gateway that forwards it, and its
    // tuple (moved there with the old record's deletion).
    let owned: HashMap<u16, usize> = records(&cluster)
        .iter()
        .filter(|(_, r)| r.tuple.is_some())
        .fold(HashMap::new(), |mut m, (_, r)| {
            *m.entry(r.owner).or_insert(0) += 1;
            m
        });
    for i in 0..3 {
        assert_eq!(
            owned.get(&(i as u16 + 1)).copied().unwrap_or(0),
            cluster.gw(i).shared().tuples.len(),
            "gateway {i}: {owned:?}"
        );
    }
    assert_eq!(owned.values().sum::<usize>(), 4);
    // Every connection still works, on the registration the rotation gave it.
    for (i, c) in clients.iter_mut().enumerate() {
        let p = format!("after grace {i}");
        assert_eq!(echo(&cluster, c, p.as_bytes()), p.as_bytes());
    }
    assert!(old.echo_ok(b"after grace, old client"));
    for (c, before) in clients.iter().zip(&handshakes) {
        assert_eq!(
            c.client().stats().handshakes_sent,
            *before,
            "no new handshake"
        );
    }
}

/// A gateway restarted during a rotation's grace period loads the epoch record and both
/// epochs' records from etcd: it accepts both epochs until the cluster's deadline, keeps
/// forwarding its client, and at the deadline moves it to its new registration and deletes
/// its old record.
#[test]
fn a_gateway_restarted_during_grace_loads_both_epochs() {
    use rebindgw::gateway::rotate::request_rotation;
    let Some(etcd) = start_etcd("rotation_restart") else {
        return;
    };
    let mut cluster = Cluster::with(etcd, 2, |cfg| {
        cfg.admin = Some("127.0.0.1:0".parse().unwrap());
        cfg.window_secs = 1;
        cfg.grace_secs = Some(8);
    });
    let router = Router::start(cluster.addrs.clone());
    // Source .1 → gateway index 1 (id 2).
    let mut c = connect(&router, cluster.enroll("restart"), "127.0.0.1");
    assert_eq!(echo(&cluster, &mut c, b"epoch 1"), b"epoch 1");
    wait_until("gateway 0 to learn the connection", || {
        cluster.gw(0).shared().connections() >= 1
    });
    let n = cluster.gw(1).shared().connections();
    let out = request_rotation(
        cluster.gw(0).admin_addr().unwrap(),
        &cluster.dir.join("gw1/admin.key"),
        false,
        Duration::from_secs(15),
    )
    .unwrap();
    assert!(out.starts_with("rotated: epoch 2"), "{out}");
    wait_until("the owner's registration in epoch 2", || {
        records_per_epoch(&cluster).get(&2) == Some(&n)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.client().stats().keys_installed == 0 {
        assert!(Instant::now() < deadline, "keys not installed");
        c.drive(Duration::from_millis(20)).unwrap();
    }

    // The owner restarts mid-grace (the router's next hop follows its new port).
    cluster.gateways[1].take().unwrap().stop().unwrap();
    let back = cluster.spawn(2);
    cluster.addrs.lock().unwrap()[1] = back.client_addrs()[0];
    let e = back.shared().epochs();
    assert_eq!(e.current.keys.epoch(), 2);
    assert_eq!(e.previous.as_ref().map(|p| p.keys.epoch()), Some(1));
    drop(e);
    assert!(back.shared().grace_until().is_some());
    assert_eq!(
        back.shared().connections_per_epoch(),
        vec![(2, n), (1, n)],
        "both epochs' records loaded"
    );
    assert_eq!(back.shared().rotations(), 0, "no rotation of its own");
    cluster.gateways[1] = Some(back);
    assert_eq!(
        echo(&cluster, &mut c, b"through the restarted owner"),
        b"through the restarted owner"
    );

    // At the deadline it moves the connection to its epoch-2 registration and deletes its
    // epoch-1 record.
    let deadline = Instant::now() + Duration::from_secs(15);
    while records_per_epoch(&cluster).contains_key(&1)
        || (0..2).any(|i| cluster.gw(i).shared().epochs().previous.is_some())
    {
        if Instant::now() > deadline {
            cluster.dump();
            panic!("grace did not end: {:?}", records_per_epoch(&cluster));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cluster.gw(1).shared().connections_per_epoch(), vec![(2, n)]);
    assert_eq!(echo(&cluster, &mut c, b"after grace"), b"after grace");
    // Its epoch-2 record now holds the tuple: a restart after grace forwards at once.
    assert!(
        records(&cluster)
            .iter()
            .any(|(e, r)| *e == 2 && r.owner == 2 && r.tuple.is_some()),
        "{:?}",
        records(&cluster)
    );
    cluster.gateways[1].take().unwrap().stop().unwrap();
    let back = cluster.spawn(2);
    cluster.addrs.lock().unwrap()[1] = back.client_addrs()[0];
    assert_eq!(back.shared().tuples.len(), 1, "bound from its record");
    cluster.gateways[1] = Some(back);
    let rebinds = c.client().stats().rebinds_started;
    assert_eq!(
        echo(&cluster, &mut c, b"restarted after grace"),
        b"restarted after grace"
    );
    assert_eq!(
        c.client().stats().rebinds_started,
        rebinds,
        "no rebind needed"
    );
    // And the client rebinds with its epoch-2 keys (onto gateway 0).
    move_and_rebind(&mut c, "127.0.0.2");
    assert_eq!(c.client().stats().keys_switched, 1);
    assert_eq!(echo(&cluster, &mut c, b"epoch 2 keys"), b"epoch 2 keys");
}

/// `rotate_every_secs` in a cluster: every gateway's timer fires, but each period sees one
/// rotation (the transaction on the epoch record's revision), and all follow it.
#[test]
fn the_schedule_rotates_once_per_period_across_the_cluster() {
    let Some(etcd) = start_etcd("rotation_schedule") else {
        return;
    };
    let cluster = Cluster::with(etcd, 3, |cfg| {
        cfg.window_secs = 1;
        cfg.grace_secs = Some(2);
        cfg.rotate_every_secs = 4;
    });
    let router = Router::start(cluster.addrs.clone());
    let mut c = connect(&router, cluster.enroll("sched"), "127.0.0.1");
    assert_eq!(echo(&cluster, &mut c, b"epoch 1"), b"epoch 1");
    let epoch = |i: usize| cluster.gw(i).shared().epochs().current.keys.epoch();
    // Watch gateway 0's epoch: when each rotation came.
    let started = Instant::now();
    let mut changes: Vec<(u32, Duration)> = Vec::new();
    let mut last = epoch(0);
    while last < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "epochs seen: {changes:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
        let e = epoch(0);
        if e != last {
            changes.push((e, started.elapsed()));
            last = e;
        }
    }
    assert_eq!(
        changes.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
        vec![2, 3],
        "one epoch at a time: {changes:?}"
    );
    let period = changes[1].1 - changes[0].1;
    assert!(
        period >= Duration::from_millis(3500),
        "two rotations within one period: {changes:?}"
    );
    wait_until("every gateway at epoch 3", || (0..3).all(|i| epoch(i) == 3));
    for i in 0..3 {
        assert_eq!(cluster.gw(i).shared().rotations(), 2, "gateway {i}");
    }
    // The client never moved: its connection lives on its new registrations.
    assert_eq!(echo(&cluster, &mut c, b"epoch 3"), b"epoch 3");
    println!("rotations at {changes:?}");
}

/// A connection whose gateway is gone at the rotation gets no registration in the new epoch
/// (no live gateway owns it); after grace its old record is deleted all the same (its owner
/// is no live gateway) and the survivors release it: its client handshakes again.
#[test]
fn a_connection_no_live_gateway_owns_is_not_carried_into_the_new_epoch() {
    use rebindgw::gateway::rotate::request_rotation;
    let Some(etcd) = start_etcd("rotation_orphan") else {
        return;
    };
    let mut cluster = Cluster::with(etcd, 2, |cfg| {
        cfg.admin = Some("127.0.0.1:0".parse().unwrap());
        cfg.window_secs = 1;
        cfg.grace_secs = Some(3);
    });
    let router = Router::start(cluster.addrs.clone());
    // .1 → gateway index 1 (id 2), .2 → gateway index 0 (id 1).
    let mut orphan = connect(&router, cluster.enroll("orphan"), "127.0.0.1");
    let mut kept = connect(&router, cluster.enroll("kept"), "127.0.0.2");
    assert_eq!(echo(&cluster, &mut orphan, b"hi"), b"hi");
    assert_eq!(echo(&cluster, &mut kept, b"hi"), b"hi");
    wait_until("gateway 0 to hold both", || {
        cluster.gw(0).shared().connections() == cluster.gw(1).shared().connections()
    });
    let n = cluster.gw(0).shared().connections();
    let owned_by_0 = cluster.gw(0).shared().tuples.len();
    assert!(owned_by_0 >= 1 && owned_by_0 < n, "{owned_by_0} of {n}");
    cluster.gateways[1].take().unwrap().stop().unwrap();

    let out = request_rotation(
        cluster.gw(0).admin_addr().unwrap(),
        &cluster.dir.join("gw1/admin.key"),
        false,
        Duration::from_secs(15),
    )
    .unwrap();
    assert!(
        out.starts_with(&format!(
            "rotated: epoch 2, grace 3 s, {owned_by_0} connections of this gateway being registered"
        )),
        "{out}"
    );
    wait_until("the survivor's registrations", || {
        records_per_epoch(&cluster).get(&2) == Some(&owned_by_0)
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while records_per_epoch(&cluster).contains_key(&1)
        || cluster.gw(0).shared().epochs().previous.is_some()
    {
        if Instant::now() > deadline {
            cluster.dump();
            panic!("grace did not end: {:?}", records_per_epoch(&cluster));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(records_per_epoch(&cluster).get(&2), Some(&owned_by_0));
    assert_eq!(
        cluster.gw(0).shared().connections_per_epoch(),
        vec![(2, owned_by_0)],
        "the orphan was released"
    );
    assert_eq!(echo(&cluster, &mut kept, b"still here"), b"still here");
    drop(orphan);
}

/// With etcd down a rotation is refused (503) and changes nothing; once etcd and the links
/// are back, the same command rotates the cluster.
#[test]
fn a_rotation_while_etcd_is_down_changes_nothing_and_works_once_it_returns() {
    use rebindgw::gateway::rotate::request_rotation;
    let Some(etcd) = start_etcd("rotation_etcd_down") else {
        return;
    };
    let mut cluster = Cluster::with(etcd, 2, with_admin_and_grace);
    let router = Router::start(cluster.addrs.clone());
    let mut c = connect(&router, cluster.enroll("down"), "127.0.0.1");
    assert_eq!(echo(&cluster, &mut c, b"hi"), b"hi");
    let admin = cluster.gw(0).admin_addr().unwrap();
    let key = cluster.dir.join("gw1/admin.key");
    cluster.etcd.stop();
    wait_until("the links to go down", || {
        (0..2).all(|i| !cluster.facts(i).link_up)
    });
    let e = request_rotation(admin, &key, false, Duration::from_secs(15)).unwrap_err();
    assert!(e.to_string().contains("503"), "{e}");
    for i in 0..2 {
        assert_eq!(cluster.gw(i).shared().epochs().current.keys.epoch(), 1);
        assert_eq!(cluster.gw(i).shared().rotations(), 0);
    }
    // Known tuples keep forwarding meanwhile.
    assert_eq!(echo(&cluster, &mut c, b"etcd down"), b"etcd down");
    cluster.etcd.start();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(0..2).all(|i| cluster.facts(i).link_up) {
        assert!(Instant::now() < deadline, "links did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = request_rotation(admin, &key, false, Duration::from_secs(15)).unwrap();
    assert!(out.starts_with("rotated: epoch 2"), "{out}");
    wait_until("both gateways at epoch 2", || {
        (0..2).all(|i| cluster.gw(i).shared().epochs().current.keys.epoch() == 2)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.client().stats().keys_installed == 0 {
        assert!(Instant::now() < deadline, "keys not installed");
        c.drive(Duration::from_millis(20)).unwrap();
    }
}

/// A forced rotation during grace: the epoch before the previous one goes at once on every
/// gateway (its records leave etcd, each connection moving its tuple onto its record of the
/// previous epoch), and the connections are registered in the newest epoch.
#[test]
fn a_forced_rotation_during_grace_drops_the_oldest_epoch_everywhere() {
    use rebindgw::gateway::rotate::request_rotation;
    let Some(etcd) = start_etcd("rotation_forced") else {
        return;
    };
    let cluster = Cluster::with(etcd, 2, |cfg| {
        cfg.admin = Some("127.0.0.1:0".parse().unwrap());
        cfg.window_secs = 1;
        cfg.grace_secs = Some(60);
    });
    let router = Router::start(cluster.addrs.clone());
    // .1 → gateway index 1, .2 → gateway index 0.
    let mut clients: Vec<UdpClient> = ["127.0.0.1", "127.0.0.2"]
        .iter()
        .enumerate()
        .map(|(i, ip)| connect(&router, cluster.enroll(&format!("forced{i}")), ip))
        .collect();
    for c in clients.iter_mut() {
        assert_eq!(echo(&cluster, c, b"epoch 1"), b"epoch 1");
    }
    let n = cluster.gw(0).shared().connections();
    wait_until("both copies", || cluster.gw(1).shared().connections() == n);
    let key = cluster.dir.join("gw2/admin.key");
    let admin = cluster.gw(1).admin_addr().unwrap();
    let t = Duration::from_secs(15);
    assert!(
        request_rotation(admin, &key, false, t)
            .unwrap()
            .starts_with("rotated: epoch 2")
    );
    wait_until("epoch 2's registrations", || {
        records_per_epoch(&cluster).get(&2) == Some(&n)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while clients
        .iter()
        .any(|c| c.client().stats().keys_installed < 1)
    {
        assert!(Instant::now() < deadline, "epoch-2 keys not installed");
        for c in clients.iter_mut() {
            c.drive(Duration::from_millis(20)).unwrap();
        }
    }
    let out = request_rotation(admin, &key, true, t).unwrap();
    assert!(out.starts_with("rotated: epoch 3"), "{out}");
    assert!(out.contains("epoch 1 dropped early"), "{out}");
    wait_until("every gateway at epoch 3 with epoch 2 in grace", || {
        (0..2).all(|i| {
            let e = cluster.gw(i).shared().epochs();
            e.current.keys.epoch() == 3 && e.previous.as_ref().map(|p| p.keys.epoch()) == Some(2)
        })
    });
    wait_until("epoch 1's records to go and epoch 3's to come", || {
        let per = records_per_epoch(&cluster);
        !per.contains_key(&1) && per.get(&2) == Some(&n) && per.get(&3) == Some(&n)
    });
    // The connections moved onto their epoch-2 records, in etcd as in every copy.
    let bound = records(&cluster)
        .iter()
        .filter(|(e, r)| *e == 2 && r.tuple.is_some())
        .count();
    assert_eq!(bound, n);
    for i in 0..2 {
        assert_eq!(
            cluster.gw(i).shared().connections_per_epoch(),
            vec![(3, n), (2, n)],
            "gateway {i}"
        );
        assert_eq!(cluster.gw(i).shared().connections(), n);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let p = format!("epoch 3, client {i}");
        assert_eq!(echo(&cluster, c, p.as_bytes()), p.as_bytes());
    }
    // Each client got the newest keys (the epoch-3 KEYS replaced the epoch-2 ones).
    let deadline = Instant::now() + Duration::from_secs(10);
    while clients
        .iter()
        .any(|c| c.client().stats().keys_installed < 2)
    {
        assert!(Instant::now() < deadline, "epoch-3 keys not installed");
        for c in clients.iter_mut() {
            c.drive(Duration::from_millis(20)).unwrap();
        }
    }
}
