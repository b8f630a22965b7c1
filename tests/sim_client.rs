//! The client's protocol behaviour against the real gateway and echo host cores
//! (`rebindgw::sim`). What stays on the model gateway in `client::tests` needs hand-made
//! gateway output: forged UNRECOGNIZEDs, host DATA with chosen sequence numbers, a
//! rate-limited gateway that never answers, a late reply to an earlier handshake, arbitrary
//! input.

use std::net::SocketAddr;

const SLOTS: usize = 16;
const LATENCY: Duration = Duration::from_millis(10);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

use rebindgw::client::*;
use rebindgw::sim::{GATEWAY, SimConfig, World};
use rebindgw::wire::{self, MsgType};
use std::time::Duration;

fn world() -> World {
    let mut w = World::new(SimConfig {
        latency: LATENCY,
        slots: SLOTS,
        core: rebindgw::gateway::core::CoreConfig::new(SLOTS),
        ..SimConfig::default()
    });
    w.add_client();
    w
}

fn connected() -> World {
    let mut w = world();
    w.run_for(ms(100));
    assert_eq!(w.client(0).core.state(), ClientState::Connected);
    w.clients[0].events.clear();
    w
}

fn sent_of(w: &World, ty: MsgType) -> Vec<Vec<u8>> {
    let sent = &w.client(0).sent;
    sent.iter().filter(|d| d[0] == ty as u8).cloned().collect()
}

fn echo_roundtrip(w: &mut World, payload: &[u8]) {
    w.clients[0].received.clear();
    w.send(0, payload);
    w.run_for(ms(100));
    assert_eq!(w.client(0).received, vec![payload.to_vec()]);
}

fn rebound(w: &World) -> Vec<(Option<SocketAddr>, SocketAddr)> {
    let c = w.client(0);
    c.events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Rebound {
                old_tuple,
                new_tuple,
                conn_id,
                ..
            } => {
                assert_eq!(Some(*conn_id), c.core.conn_id());
                Some((*old_tuple, *new_tuple))
            }
            _ => None,
        })
        .collect()
}

/// The tuple the gateway routes `conn_id`'s host DATA to.
fn routed(w: &World, conn_id: u64) -> Option<SocketAddr> {
    w.gateway.shared.conns.get(conn_id).and_then(|r| r.tuple)
}

/// Drops the first client datagram of type `ty`.
fn drop_first(w: &mut World, ty: MsgType) {
    let mut dropped = false;
    w.drop_if(move |d| {
        let drop = d.to == GATEWAY && d.data[0] == ty as u8 && !dropped;
        dropped |= drop;
        drop
    });
}

// ---- 1. handshake ----

#[test]
fn handshake_completes() {
    let mut w = world();
    let c = &mut w.clients[0].core;
    assert_eq!(c.state(), ClientState::Handshaking);
    assert_eq!(c.send(b"early"), Err(SendError::NotConnected));
    w.run_for(ms(100));
    let c = &w.client(0).core;
    assert_eq!(c.state(), ClientState::Connected);
    let conn_id = c.conn_id().unwrap();
    assert_eq!(w.client(0).events, vec![ClientEvent::Connected { conn_id }]);
    assert_eq!(c.slots(), Some(SLOTS));
    let hs = sent_of(&w, MsgType::Handshake);
    assert_eq!(hs.len(), 1);
    assert_eq!(hs[0].len(), wire::HANDSHAKE_LEN);
    assert_eq!(routed(&w, conn_id), Some(w.client(0).tuple));
    assert_eq!(w.host.connections(), 1);
}

#[test]
fn handshake_retries_when_first_is_lost() {
    let mut w = world();
    drop_first(&mut w, MsgType::Handshake);
    w.run_for(ms(200));
    assert_eq!(w.client(0).core.state(), ClientState::Handshaking);
    w.run_for(ms(200));
    assert_eq!(w.client(0).core.state(), ClientState::Connected);
    let hs = sent_of(&w, MsgType::Handshake);
    assert_eq!(hs.len(), 2);
    assert_ne!(
        hs[0][17..33],
        hs[1][17..33],
        "fresh client nonce per attempt"
    );
    // The host registered one connection: the lost attempt never reached it.
    assert_eq!(w.host.connections(), 1);
}

#[test]
fn handshake_gives_up_after_deadline() {
    let mut w = world();
    w.drop_if(|d| d.to == GATEWAY && d.data[0] == b'H');
    w.run_for(Duration::from_secs(19));
    assert_eq!(w.client(0).core.state(), ClientState::Handshaking);
    w.run_for(Duration::from_secs(2));
    let e = ClientError::HandshakeTimeout;
    assert_eq!(w.client(0).core.state(), ClientState::Failed(e));
    assert_eq!(w.client(0).events, vec![ClientEvent::Failed(e)]);
    // Sent at 0, .25, .75, 1.75, 3.75, then every 4 s: 7.75, 11.75, 15.75, 19.75.
    assert_eq!(sent_of(&w, MsgType::Handshake).len(), 9);
    let now = w.now;
    let c = &mut w.clients[0].core;
    assert_eq!(c.poll_timeout(), None);
    assert_eq!(c.send(b"x"), Err(SendError::NotConnected));
    let mut buf = [0u8; MAX_DATAGRAM_LEN];
    assert_eq!(c.poll_transmit(now, &mut buf), None);
}

// ---- 2. DATA ----

#[test]
fn data_roundtrip_and_keepalive() {
    let mut w = connected();
    echo_roundtrip(&mut w, b"hello, mesh");
    echo_roundtrip(&mut w, b"");
    let d = sent_of(&w, MsgType::Data);
    assert_eq!(d.len(), 2);
    assert_eq!(d[0][1..9], 0u64.to_be_bytes(), "seq starts at 0");
    assert_eq!(d[1][1..9], 1u64.to_be_bytes());
    assert_eq!(
        w.clients[0].core.send(&[0; MAX_PAYLOAD + 1]),
        Err(SendError::TooLarge {
            len: MAX_PAYLOAD + 1,
            max: MAX_PAYLOAD
        })
    );
    w.send(0, &[7; MAX_PAYLOAD]);
    w.run_for(ms(100));
    assert_eq!(w.client(0).received.last().unwrap().len(), MAX_PAYLOAD);

    // Idle: a 49-byte keepalive after 10 s; the host's echo is counted, not surfaced.
    let before = w.client(0).received.len();
    w.run_for(Duration::from_secs(11));
    let c = w.client(0);
    assert_eq!(c.sent.iter().filter(|d| d.len() == 49).count(), 1);
    assert_eq!(c.core.stats().keepalives_sent, 1);
    assert_eq!(c.core.stats().keepalives_received, 1);
    assert_eq!(c.received.len(), before);
    assert_eq!(c.core.state(), ClientState::Connected);
    assert!(c.events.is_empty());
    assert_eq!(w.host.counters().echoes, 4);
}

// ---- 3. rebind after a tuple change ----

#[test]
fn tuple_change_rebinds_and_traffic_resumes() {
    let mut w = connected();
    echo_roundtrip(&mut w, b"before the move");
    let conn_id = w.client(0).core.conn_id().unwrap();

    let t1 = addr("198.51.100.99:50000");
    w.move_client_to(0, t1);
    w.send(0, b"lost: draws UNRECOGNIZED");
    w.run_for(ms(200));
    assert!(matches!(
        w.client(0).events[0],
        ClientEvent::Rebinding {
            reason: RebindReason::Unrecognized
        }
    ));
    assert_eq!(rebound(&w), vec![(None, t1)]);
    assert_eq!(w.client(0).core.state(), ClientState::Connected);
    assert_eq!(w.client(0).core.public_tuple(), Some(t1));
    assert_eq!(routed(&w, conn_id), Some(t1));
    let r = sent_of(&w, MsgType::Rebind);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].len(), wire::rebind_len(SLOTS));
    assert_eq!(r[0][1], 7, "epoch byte");
    echo_roundtrip(&mut w, b"after the move");

    // A second move reports the first as the old tuple.
    let t2 = addr("[2001:db8::5]:6000");
    w.move_client_to(0, t2);
    w.clients[0].events.clear();
    // At least 20 bytes: a v6 UNRECOGNIZED is 45 bytes and the gateway never amplifies.
    w.send(0, b"lost again, from IPv6");
    w.run_for(ms(200));
    assert_eq!(rebound(&w), vec![(Some(t1), t2)]);
    assert_eq!(w.client(0).core.rebinds(), 2);
    echo_roundtrip(&mut w, b"over v6");
    if let Some(ClientEvent::Rebound { took, .. }) = w.client(0).events.last() {
        assert!(*took >= 2 * LATENCY && *took < ms(200), "took {took:?}");
    }
}

// ---- 4. lost REBIND ----

#[test]
fn lost_rebind_is_retried_with_fresh_nonces() {
    let mut w = connected();
    drop_first(&mut w, MsgType::Rebind);
    let t1 = addr("198.51.100.99:50000");
    w.move_client_to(0, t1);
    w.send(0, b"draws UNRECOGNIZED");
    w.run_for(ms(100));
    assert_eq!(w.client(0).core.state(), ClientState::Rebinding);
    w.run_for(ms(300));
    assert_eq!(w.client(0).core.state(), ClientState::Connected);
    let r = sent_of(&w, MsgType::Rebind);
    assert_eq!(r.len(), 2);
    // Same UNRECOGNIZED (epoch, t, cookie), fresh slots and seal.
    assert_eq!(r[0][..26], r[1][..26]);
    assert_ne!(r[0][26..], r[1][26..]);
    assert_eq!(rebound(&w), vec![(None, t1)]);
    echo_roundtrip(&mut w, b"recovered");
}

#[test]
fn rebind_fails_when_path_stays_silent() {
    let mut w = connected();
    w.drop_if(|d| d.to == GATEWAY);
    for _ in 0..3 {
        w.send(0, b"into the void");
        w.run_for(ms(500));
    }
    assert_eq!(w.client(0).core.state(), ClientState::Rebinding);
    w.run_for(Duration::from_secs(31));
    let e = ClientError::RebindTimeout;
    let c = w.client(0);
    assert_eq!(c.core.state(), ClientState::Failed(e));
    assert_eq!(c.events.last(), Some(&ClientEvent::Failed(e)));
    assert_eq!(c.core.poll_timeout(), None);
    // Cookie requests at 200 ms doubling to 2 s over 30 s: about 17.
    let n = c.core.stats().cookie_requests_sent;
    assert!((14..=20).contains(&n), "{n} cookie requests");
}

// ---- 6. silent path: the NAT handed our new tuple down from another connection ----

#[test]
fn silent_path_sends_cookie_request_and_recovers() {
    let mut w = connected();
    // Another device's connection holds t2; its NAT mapping then goes to us.
    w.add_client();
    w.run_for(ms(100));
    let other = w.client(1).core.conn_id().unwrap();
    let t2 = w.client(1).tuple;
    w.move_client(1);
    w.move_client_to(0, t2);
    // Our DATA now goes to the other connection's host, which cannot open it.
    for i in 0..3 {
        w.send(0, format!("unanswered {i}").as_bytes());
        w.run_for(ms(400));
    }
    assert_eq!(
        w.client(0).events[0],
        ClientEvent::Rebinding {
            reason: RebindReason::Unanswered
        }
    );
    assert!(w.host.counters().data_bad_aead >= 3);
    let req = &sent_of(&w, MsgType::Rebind)[0];
    assert_eq!(req.len(), 50 + 16 * SLOTS);
    assert_eq!(req[0], 0x52);
    // §6 (1.1): type, the client's epoch byte, then zeros.
    assert_eq!(req[1], w.cfg.epoch as u8);
    assert!(req[2..].iter().all(|b| *b == 0));
    w.run_for(ms(300));
    assert_eq!(rebound(&w), vec![(None, t2)]);
    let conn_id = w.client(0).core.conn_id().unwrap();
    assert_eq!(routed(&w, conn_id), Some(t2));
    assert_eq!(routed(&w, other), None);
    echo_roundtrip(&mut w, b"back on track");
}

#[test]
fn network_changed_requests_a_cookie_at_once() {
    let mut w = connected();
    let t3 = addr("203.0.113.3:3333");
    w.move_client_to(0, t3);
    let now = w.now;
    w.clients[0].core.network_changed(now);
    w.step();
    let r = sent_of(&w, MsgType::Rebind);
    assert_eq!(r.len(), 1, "sent at once");
    assert_eq!(r[0].len(), wire::rebind_len(SLOTS));
    assert_eq!(r[0][1], w.cfg.epoch as u8);
    assert!(r[0][2..].iter().all(|b| *b == 0));
    w.run_for(ms(100));
    assert_eq!(
        w.client(0).events[0],
        ClientEvent::Rebinding {
            reason: RebindReason::NetworkChanged
        }
    );
    assert_eq!(rebound(&w), vec![(None, t3)]);
    echo_roundtrip(&mut w, b"new network");
}
