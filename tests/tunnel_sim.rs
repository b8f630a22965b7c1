//! The tunnel's sans-IO cores over the simulated world: a `TunnelClient` on a real client
//! core, a `TunnelHost` on the real host core in application mode with simulated backends,
//! the real gateway between them, while the NAT moves the client and the path loses packets.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use rebindgw::client::ClientEvent;
use rebindgw::host::{HostCore, HostEvent};
use rebindgw::sim::{SimConfig, World};
use rebindgw::time::Ticks;
use rebindgw::tunnel::{
    FlowKey, Service, TunnelClient, TunnelClientConfig, TunnelHost, TunnelHostConfig,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn app(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The host side: a tunnel host whose backends answer each datagram with its bytes prefixed
/// by the service name, at once. Records the flows each backend saw.
struct HostSide {
    tunnel: TunnelHost,
    /// Backend "sockets": the flows opened, in order.
    opened: Vec<FlowKey>,
    closed: Vec<FlowKey>,
}

impl HostSide {
    fn run(&mut self, now: Ticks, host: &mut HostCore) {
        let mut buf = [0u8; 1300];
        while let Some(e) = host.poll_event() {
            match e {
                HostEvent::Data { conn_id, payload } => {
                    let Some(b) = self.tunnel.handle_client(now, conn_id, &payload) else {
                        continue;
                    };
                    let (key, backend, len) = (b.key, b.backend, b.payload.len());
                    if b.open {
                        self.opened.push(key);
                    }
                    let name = if backend.port() == 53 { "dns" } else { "echo" };
                    let answer = [name.as_bytes(), b":", b.payload].concat();
                    self.tunnel.backend_done(key, len);
                    if let Some(n) = self.tunnel.handle_backend(now, key, &answer, &mut buf) {
                        host.send(conn_id, &buf[..n]).expect("host send");
                    }
                }
                HostEvent::Closed { conn_id } => self.tunnel.connection_closed(conn_id),
                HostEvent::Connected { .. } => {}
            }
        }
        self.tunnel.handle_timeout(now);
        while let Some(k) = self.tunnel.poll_close() {
            self.closed.push(k);
        }
        while let Some((conn, frame)) = self.tunnel.poll_to_client() {
            let _ = host.send(conn, &frame);
        }
    }
}

fn host_side() -> Rc<RefCell<HostSide>> {
    Rc::new(RefCell::new(HostSide {
        tunnel: TunnelHost::new(TunnelHostConfig {
            services: vec![
                Service {
                    name: "echo".into(),
                    backend: "10.9.0.1:7".parse().unwrap(),
                },
                Service {
                    name: "dns".into(),
                    backend: "10.9.0.2:53".parse().unwrap(),
                },
            ],
            flow_idle: Duration::from_secs(30),
            ..TunnelHostConfig::default()
        }),
        opened: Vec::new(),
        closed: Vec::new(),
    }))
}

/// Each of `apps` sends one datagram every `every` for `duration` through client `i`'s
/// tunnel; the NAT moves the client every `move_every`. After each rebind the frames it lost
/// are sent again (`TunnelClient::lost_in_rebind`, as `rebindgw connect` does) if `resend`.
/// Returns, per app, how many of its datagrams were answered (each counted once; checked to
/// be its own).
#[allow(clippy::too_many_arguments)]
fn traffic(
    w: &mut World,
    tunnel: &mut TunnelClient,
    i: usize,
    apps: &[SocketAddr],
    every: Duration,
    duration: Duration,
    move_every: Option<Duration>,
    resend: bool,
) -> HashMap<SocketAddr, usize> {
    let mut answered: HashMap<SocketAddr, HashSet<u32>> = HashMap::new();
    let mut seen_events = w.clients[i].events.len();
    let mut buf = [0u8; 1300];
    let end = w.now.saturating_add(duration);
    let mut next_move = move_every.map(|d| w.now.saturating_add(d));
    let mut seq = 0u32;
    while w.now < end {
        if next_move.is_some_and(|t| w.now >= t) {
            w.move_client(i);
            next_move = move_every.map(|d| w.now.saturating_add(d));
        }
        for a in apps {
            let payload = format!("{}:{seq}", a.port());
            let n = tunnel
                .handle_app(w.now, *a, payload.as_bytes(), &mut buf)
                .expect("framed");
            // While the client rebinds its DATA still goes (and feeds the rebind).
            let _ = w.clients[i].core.send(&buf[..n]);
        }
        seq += 1;
        w.run_for(every);
        let events: Vec<ClientEvent> = w.clients[i].events[seen_events..].to_vec();
        seen_events = w.clients[i].events.len();
        for e in events {
            if let ClientEvent::Rebound { took, .. } = e
                && resend
            {
                // The event happened within the last `every`: start the window early enough.
                let started = w.now.saturating_sub(took + every);
                for f in tunnel.lost_in_rebind(w.now, started, took) {
                    let _ = w.clients[i].core.send(&f);
                }
            }
        }
        let received: Vec<Vec<u8>> = w.clients[i].received.drain(..).collect();
        for p in received {
            if let Some((to, d)) = tunnel.handle_tunnel(w.now, &p) {
                let text = String::from_utf8_lossy(d).to_string();
                let (_, rest) = text.split_once(':').expect("service prefix");
                let (port, n) = rest.split_once(':').expect("port:seq");
                assert_eq!(
                    port,
                    to.port().to_string(),
                    "app {to} got another app's answer"
                );
                answered.entry(to).or_default().insert(n.parse().unwrap());
            }
        }
        tunnel.handle_timeout(w.now);
    }
    answered.into_iter().map(|(a, s)| (a, s.len())).collect()
}

/// The world of `flows_survive_nat_moves_and_loss`: 1% loss, 5 ms jitter, a host app.
fn lossy_world(seed: u64) -> (World, Rc<RefCell<HostSide>>) {
    let mut w = World::new(SimConfig {
        host_echo: false,
        loss: 0.01,
        jitter: ms(5),
        seed,
        ..SimConfig::default()
    });
    let hs = host_side();
    {
        let hs = hs.clone();
        w.set_host_app(move |now, host| hs.borrow_mut().run(now, host));
    }
    assert!(w.connect_clients(1, Duration::from_secs(5)));
    (w, hs)
}

#[test]
fn flows_survive_nat_moves_and_loss() {
    let apps = [app(5001), app(5002), app(5003)];
    let sent = 1000;
    let mut lost = Vec::new();
    for resend in [false, true] {
        let (mut w, hs) = lossy_world(13);
        let mut tunnel = TunnelClient::new(TunnelClientConfig::default());
        // 20 s at 50 datagrams/s per app, the NAT moving the client every second.
        let got = traffic(
            &mut w,
            &mut tunnel,
            0,
            &apps,
            ms(20),
            ms(20_000),
            Some(ms(1_000)),
            resend,
        );
        let mut total = 0;
        for a in apps {
            let n = got.get(&a).copied().unwrap_or(0);
            // 1% loss on each of the four client-side crossings (about 4%), plus what each
            // move costs without the resend: DATA sent from the new tuple until the REBIND
            // lands (about 1.5 round trips of 45 ms) and answers in flight to the old tuple
            // (half a round trip): about 4 of the 50 per second, 8%.
            assert!(n * 100 >= sent * 85, "app {a}: {n} of {sent} answered");
            total += n;
        }
        lost.push(3 * sent - total);
        let c = w.client(0).core.stats().clone();
        assert!(c.rebinds_completed >= 15, "rebinds: {c:?}");
        let h = hs.borrow();
        // One backend flow per application, however often the client moved.
        assert_eq!(h.opened.len(), 3, "{:?}", h.opened);
        assert_eq!(tunnel.flows(), 3);
        assert_eq!(tunnel.stats().dropped_unknown_flow, 0);
        assert_eq!(h.tunnel.stats().dropped_malformed, 0);
        assert_eq!(tunnel.stats().resent_after_rebind > 0, resend);
    }
    eprintln!(
        "lost without the resend {}, with it {} (of {})",
        lost[0],
        lost[1],
        3 * sent
    );
    // The resend gives back the client-to-host DATA a move loses; what stays is random loss
    // and the answers in flight to the old tuple.
    assert!(lost[1] * 10 < lost[0] * 7, "lost {lost:?}");
}

#[test]
fn one_way_flow_gets_acks_not_probes() {
    // iperf-like: the service never answers. The host's ACK frames keep the client's
    // silent-path probe (cookie requests) quiet.
    let mut w = World::new(SimConfig {
        host_echo: false,
        ..SimConfig::default()
    });
    let hs = Rc::new(RefCell::new(TunnelHost::new(TunnelHostConfig {
        services: vec![Service {
            name: "sink".into(),
            backend: "10.9.0.3:5001".parse().unwrap(),
        }],
        ..TunnelHostConfig::default()
    })));
    {
        let hs = hs.clone();
        w.set_host_app(move |now, host| {
            let mut t = hs.borrow_mut();
            while let Some(e) = host.poll_event() {
                if let HostEvent::Data { conn_id, payload } = e
                    && let Some(b) = t.handle_client(now, conn_id, &payload)
                {
                    let (k, n) = (b.key, b.payload.len());
                    t.backend_done(k, n);
                }
            }
            while let Some((conn, frame)) = t.poll_to_client() {
                let _ = host.send(conn, &frame);
            }
        });
    }
    assert!(w.connect_clients(1, Duration::from_secs(5)));
    let mut tunnel = TunnelClient::new(TunnelClientConfig::default());
    let got = traffic(
        &mut w,
        &mut tunnel,
        0,
        &[app(6000)],
        ms(10),
        ms(10_000),
        None,
        true,
    );
    assert!(got.is_empty());
    let c = w.client(0).core.stats();
    assert_eq!(c.cookie_requests_sent, 0, "{c:?}");
    assert!(tunnel.stats().acks_received >= 30, "{:?}", tunnel.stats());
    assert!(hs.borrow().stats().to_backend >= 990);
}

#[test]
fn second_service_and_host_close_of_unknown_service() {
    let mut w = World::new(SimConfig {
        host_echo: false,
        ..SimConfig::default()
    });
    let hs = host_side();
    {
        let hs = hs.clone();
        w.set_host_app(move |now, host| hs.borrow_mut().run(now, host));
    }
    assert!(w.connect_clients(1, Duration::from_secs(5)));
    let mut dns = TunnelClient::new(TunnelClientConfig {
        service: 1,
        ..TunnelClientConfig::default()
    });
    let got = traffic(
        &mut w,
        &mut dns,
        0,
        &[app(7000)],
        ms(50),
        ms(1_000),
        None,
        true,
    );
    assert_eq!(got[&app(7000)], 20);
    assert_eq!(hs.borrow().opened.len(), 1);
    // Service 9 does not exist: the host answers CLOSE and the client forgets the flow.
    let mut nowhere = TunnelClient::new(TunnelClientConfig {
        service: 9,
        ..TunnelClientConfig::default()
    });
    let got = traffic(
        &mut w,
        &mut nowhere,
        0,
        &[app(7001)],
        ms(50),
        ms(200),
        None,
        true,
    );
    assert!(got.is_empty());
    assert!(nowhere.stats().flows_closed_by_host >= 1);
    assert!(hs.borrow().tunnel.stats().dropped_unknown_service >= 1);
}
