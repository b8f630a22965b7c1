//! The tunnel end to end on real loopback sockets, no root: a gateway, `host --forward`'s
//! loop ([`ForwardHost`]) in front of a UDP echo service, and `connect`'s loop
//! ([`Connector`]) with several local applications.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rebindgw::crypto;
use rebindgw::gateway::config::{GatewayConfig, HostEntry};
use rebindgw::gateway::run::spawn_gateway;
use rebindgw::host::clients::enroll;
use rebindgw::secrets::generate_link_key;
use rebindgw::tunnel::run::{
    ConnectOptions, ConnectStats, Connector, ForwardHost, ForwardOptions, ForwardStats, TunnelEvent,
};
use rebindgw::tunnel::{MAX_APP_PAYLOAD, Service, TunnelHostConfig};

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "rebindgw-tunnel-{}-{}",
        std::process::id(),
        hex::encode(crypto::random_array::<6>())
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A UDP echo service on loopback that prefixes each answer with "echo:".
fn echo_service(stop: Arc<AtomicBool>) -> (SocketAddr, JoinHandle<()>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let addr = s.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let answer = [b"echo:", &buf[..n]].concat();
                let _ = s.send_to(&answer, from);
            }
        }
    });
    (addr, t)
}

#[test]
fn applications_reach_an_unmodified_udp_service() {
    let dir = tempdir();
    let stop = Arc::new(AtomicBool::new(false));
    let (backend, service) = echo_service(stop.clone());

    let key_file = dir.join("host.key");
    let key = generate_link_key(&key_file).unwrap();
    let clients = dir.join("clients.toml");
    let creds = enroll(&clients, "phone").unwrap().creds;

    let tunnel = TunnelHostConfig {
        services: vec![Service {
            name: "echo".into(),
            backend,
        }],
        ..TunnelHostConfig::default()
    };
    let host = ForwardHost::bind(ForwardOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        clients.clone(),
        key,
        tunnel,
    ))
    .unwrap();
    let host_addr = host.local_addr().unwrap();
    let host_thread: JoinHandle<ForwardStats> = {
        let stop = stop.clone();
        std::thread::spawn(move || host.run(&stop).unwrap())
    };

    let gateway = spawn_gateway(GatewayConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        hosts: vec![HostEntry {
            addr: host_addr,
            link_key_file: key_file,
        }],
        admin: None,
        state_dir: dir.join("state"),
        workers: 1,
        ..GatewayConfig::default()
    })
    .unwrap();

    let connector = Connector::bind(ConnectOptions::new(
        gateway.client_addrs()[0],
        creds,
        "127.0.0.1:0".parse().unwrap(),
    ))
    .unwrap();
    let local = connector.local_addr().unwrap();
    let events = Arc::new(Mutex::new(Vec::<TunnelEvent>::new()));
    let client_thread: JoinHandle<ConnectStats> = {
        let (stop, events) = (stop.clone(), events.clone());
        std::thread::spawn(move || {
            connector
                .run(&stop, |e| events.lock().unwrap().push(e.clone()))
                .unwrap()
        })
    };

    // Three applications, each with its own source port, each gets only its own answers.
    let apps: Vec<UdpSocket> = (0..3)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answered = [0usize; 3];
    let mut buf = [0u8; 2048];
    for round in 0..50 {
        for (i, a) in apps.iter().enumerate() {
            let msg = format!("app{i}:{round}");
            // The handshake may still run for the first datagrams: retry until answered.
            loop {
                a.send_to(msg.as_bytes(), local).unwrap();
                match a.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        assert_eq!(from, local);
                        assert_eq!(&buf[..n], format!("echo:{msg}").as_bytes());
                        answered[i] += 1;
                        break;
                    }
                    Err(_) => assert!(Instant::now() < deadline, "no answer to {msg}"),
                }
            }
        }
    }
    assert_eq!(answered, [50; 3]);

    // Too big for the tunnel: dropped and counted, never truncated.
    apps[0]
        .send_to(&vec![7u8; MAX_APP_PAYLOAD + 1], local)
        .unwrap();
    assert!(apps[0].recv_from(&mut buf).is_err(), "nothing comes back");
    // The largest that fits goes through whole.
    let max = vec![9u8; MAX_APP_PAYLOAD - 5];
    apps[1].send_to(&max, local).unwrap();
    let (n, _) = apps[1].recv_from(&mut buf).unwrap();
    assert_eq!(n, MAX_APP_PAYLOAD);

    // A client enrolled while the host runs: the host reloads its clients file.
    std::thread::sleep(Duration::from_millis(1100)); // a new mtime second
    let tablet = enroll(&clients, "tablet").unwrap().creds;
    std::thread::sleep(Duration::from_millis(1200));
    let second = Connector::bind(ConnectOptions::new(
        gateway.client_addrs()[0],
        tablet,
        "127.0.0.1:0".parse().unwrap(),
    ))
    .unwrap();
    let second_local = second.local_addr().unwrap();
    let second_thread = {
        let stop = stop.clone();
        std::thread::spawn(move || second.run(&stop, |_| {}).unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        apps[2].send_to(b"tablet", second_local).unwrap();
        if let Ok((n, _)) = apps[2].recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"echo:tablet");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the newly enrolled client got no answer"
        );
    }

    stop.store(true, Ordering::Relaxed);
    second_thread.join().unwrap();
    let client = client_thread.join().unwrap();
    let host = host_thread.join().unwrap();
    service.join().unwrap();
    gateway.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let ev = events.lock().unwrap();
    assert!(
        matches!(ev.first(), Some(TunnelEvent::Connected { .. })),
        "{ev:?}"
    );
    assert_eq!(client.tunnel.dropped_too_big, 1);
    assert_eq!(client.tunnel.flows_opened, 3);
    assert_eq!(host.tunnel.flows_opened, 4, "three apps, and the tablet's");
    assert!(host.tunnel.to_backend >= 152, "{host:?}");
    assert_eq!(host.reloads, 1, "{host:?}");
    assert_eq!(host.tunnel.dropped_malformed, 0);
    // The JSON form of an event, as `rebindgw connect --json` prints it.
    let json = serde_json::to_value(&ev[0]).unwrap();
    assert_eq!(json["event"], "connected");
}

/// When the gateway goes away, `connect`'s rebind tries go unanswered; after
/// `rebind_tries` of them it handshakes again (and keeps trying), printing why.
#[test]
fn unanswered_rebinds_lead_to_a_new_handshake() {
    handshake_again_when_the_gateway_stops(3, None, "3 rebind tries");
}

/// With more rebind tries allowed than the rebind deadline leaves room for, the client
/// core's own re-handshake comes first (`ClientEvent::Reconnecting`): `connect` reports it
/// and counts it as a handshake the same way.
#[test]
fn a_rebind_that_runs_out_makes_the_core_handshake_again() {
    handshake_again_when_the_gateway_stops(
        u64::MAX,
        Some(Duration::from_millis(300)),
        "no REBIND_ACK within the rebind deadline, and the path stayed silent (by the client core)",
    );
}

fn handshake_again_when_the_gateway_stops(
    rebind_tries: u64,
    rebind_deadline: Option<Duration>,
    expect: &str,
) {
    let dir = tempdir();
    let stop = Arc::new(AtomicBool::new(false));
    let (backend, service) = echo_service(stop.clone());
    let key_file = dir.join("host.key");
    let key = generate_link_key(&key_file).unwrap();
    let clients = dir.join("clients.toml");
    let creds = enroll(&clients, "phone").unwrap().creds;
    let host = ForwardHost::bind(ForwardOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        clients,
        key,
        TunnelHostConfig {
            services: vec![Service {
                name: "echo".into(),
                backend,
            }],
            ..TunnelHostConfig::default()
        },
    ))
    .unwrap();
    let host_addr = host.local_addr().unwrap();
    let host_thread = {
        let stop = stop.clone();
        std::thread::spawn(move || host.run(&stop).unwrap())
    };
    let gateway = spawn_gateway(GatewayConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        hosts: vec![HostEntry {
            addr: host_addr,
            link_key_file: key_file,
        }],
        admin: None,
        state_dir: dir.join("state"),
        workers: 1,
        ..GatewayConfig::default()
    })
    .unwrap();
    let mut opts = ConnectOptions::new(
        gateway.client_addrs()[0],
        creds,
        "127.0.0.1:0".parse().unwrap(),
    );
    // Fast probes and retries, so the test takes about a second.
    opts.client.probe_quiet = Duration::from_millis(100);
    opts.client.rebind_backoff = Duration::from_millis(20);
    opts.client.rebind_backoff_max = Duration::from_millis(40);
    opts.client.rebind_pace = Duration::from_millis(10);
    opts.rebind_tries = rebind_tries;
    if let Some(d) = rebind_deadline {
        opts.client.rebind_deadline = d;
    }
    let connector = Connector::bind(opts).unwrap();
    let local = connector.local_addr().unwrap();
    let events = Arc::new(Mutex::new(Vec::<TunnelEvent>::new()));
    let client_thread = {
        let (stop, events) = (stop.clone(), events.clone());
        std::thread::spawn(move || {
            connector
                .run(&stop, |e| events.lock().unwrap().push(e.clone()))
                .unwrap()
        })
    };
    let app = UdpSocket::bind("127.0.0.1:0").unwrap();
    app.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        app.send_to(b"ping", local).unwrap();
        if app.recv_from(&mut buf).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no answer before the gateway stops"
        );
    }
    gateway.stop().unwrap();
    // The application keeps sending into the void: unanswered DATA, then cookie requests.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, TunnelEvent::HandshakeAgain { .. }))
    {
        assert!(Instant::now() < deadline, "{:?}", events.lock().unwrap());
        let _ = app.send_to(b"ping", local);
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let stats = client_thread.join().unwrap();
    host_thread.join().unwrap();
    service.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let ev = events.lock().unwrap();
    let again = ev
        .iter()
        .find_map(|e| match e {
            TunnelEvent::HandshakeAgain { reason } => Some(reason.clone()),
            _ => None,
        })
        .unwrap();
    assert!(again.contains(expect), "{again}");
    assert!(
        ev.iter()
            .any(|e| matches!(e, TunnelEvent::Rebinding { .. })),
        "{ev:?}"
    );
    assert!(stats.handshakes >= 2, "{stats:?}");
    assert!(stats.dropped_not_connected > 0, "{stats:?}");
}
