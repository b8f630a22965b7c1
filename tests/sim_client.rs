//! The client's protocol behaviour against the real gateway and echo host cores
//! (`rebindgw::sim`), including hand-made input: forged UNRECOGNIZEDs, host DATA with chosen
//! sequence numbers, a gateway whose UNRECOGNIZEDs never arrive, a late reply to an earlier
//! handshake, arbitrary bytes.

use std::net::SocketAddr;

const SLOTS: usize = 16;
const LATENCY: Duration = Duration::from_millis(10);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

use proptest::prelude::*;
use rebindgw::client::*;
use rebindgw::crypto;
use rebindgw::gateway::metrics::C;
use rebindgw::sim::{GATEWAY, SimConfig, World};
use rebindgw::verify::RejectReason;
use rebindgw::wire::{self, MsgType, Unrecognized};
use std::time::Duration;

fn world() -> World {
    world_with(ClientConfig::default())
}

fn world_with(client: ClientConfig) -> World {
    let mut w = World::new(SimConfig {
        latency: LATENCY,
        slots: SLOTS,
        core: rebindgw::gateway::core::CoreConfig::new(SLOTS),
        client,
        ..SimConfig::default()
    });
    w.add_client();
    w
}

fn connected() -> World {
    connected_with(ClientConfig::default())
}

fn connected_with(client: ClientConfig) -> World {
    let mut w = world_with(client);
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

/// Sends into a path that drops everything toward the gateway until a rebind starts.
fn go_silent(w: &mut World) {
    w.drop_if(|d| d.to == GATEWAY);
    for _ in 0..3 {
        w.send(0, b"into the void");
        w.run_for(ms(500));
    }
    assert_eq!(w.client(0).core.state(), ClientState::Rebinding);
}

/// With `rehandshake_after_failed_rebind: false`: a rebind that runs out with the path
/// silent fails the client, as before the setting existed.
#[test]
fn rebind_fails_when_path_stays_silent() {
    let mut w = connected_with(ClientConfig {
        rehandshake_after_failed_rebind: false,
        ..ClientConfig::default()
    });
    go_silent(&mut w);
    w.run_for(Duration::from_secs(31));
    let e = ClientError::RebindTimeout;
    let c = w.client(0);
    assert_eq!(c.core.state(), ClientState::Failed(e));
    assert_eq!(c.events.last(), Some(&ClientEvent::Failed(e)));
    assert_eq!(c.core.poll_timeout(), None);
    assert_eq!(c.core.stats().rehandshakes, 0);
    assert_eq!(sent_of(&w, MsgType::Handshake).len(), 1);
    // Cookie requests at 200 ms doubling to 2 s over 30 s: about 17.
    let n = c.core.stats().cookie_requests_sent;
    assert!((14..=20).contains(&n), "{n} cookie requests");
}

/// By default a rebind that runs out with the path silent makes the client handshake again
/// by itself: `Reconnecting`, then (once the path works) `Connected` with a new connection.
#[test]
fn rebind_that_runs_out_handshakes_again() {
    let mut w = connected();
    let old_conn = w.client(0).core.conn_id().unwrap();
    go_silent(&mut w);
    // Queued for the dead connection: dropped when it is given up.
    w.send(0, b"queued for the dead connection");
    w.run_for(Duration::from_secs(31));
    let c = w.client(0);
    assert_eq!(c.core.state(), ClientState::Handshaking);
    assert_eq!(c.core.conn_id(), None);
    assert_eq!(c.core.public_tuple(), None);
    assert_eq!(
        c.events,
        vec![
            ClientEvent::Rebinding {
                reason: RebindReason::Unanswered
            },
            ClientEvent::Reconnecting {
                reason: ClientError::RebindTimeout
            },
        ]
    );
    assert_eq!(c.core.stats().rehandshakes, 1);
    // The initial HANDSHAKE, and at least the re-handshake's first (it keeps retrying).
    let hs = c.core.stats().handshakes_sent;
    assert!(hs >= 2, "{hs} handshakes");
    assert!(c.core.poll_timeout().is_some());
    assert_eq!(
        w.clients[0].core.send(b"too early"),
        Err(SendError::NotConnected)
    );
    let data_before = w.client(0).core.stats().data_sent;

    // The path works again: the retry completes the handshake.
    w.clear_drop();
    assert!(
        w.drive_until(Duration::from_secs(5), |w| w.client(0).core.state()
            == ClientState::Connected)
    );
    let c = w.client(0);
    let conn_id = c.core.conn_id().unwrap();
    assert_ne!(conn_id, old_conn, "a new connection");
    assert_eq!(
        c.events[1..],
        [
            ClientEvent::Reconnecting {
                reason: ClientError::RebindTimeout
            },
            ClientEvent::Connected { conn_id },
        ]
    );
    assert_eq!(c.core.stats().rehandshakes, 1);
    assert_eq!(c.core.stats().data_sent, data_before, "dead queue dropped");
    assert_eq!(routed(&w, conn_id), Some(w.client(0).tuple));
    echo_roundtrip(&mut w, b"on the new connection");
    assert_eq!(
        w.client(0).received,
        vec![b"on the new connection".to_vec()]
    );
}

/// A re-handshake that itself gets no reply fails the client as a first handshake does.
#[test]
fn rehandshake_that_times_out_fails() {
    let mut w = connected_with(ClientConfig {
        rehandshake_deadline: Some(Duration::from_secs(20)),
        rehandshake_backoff_max: Duration::from_secs(4),
        ..ClientConfig::default()
    });
    go_silent(&mut w);
    w.run_for(Duration::from_secs(31));
    assert_eq!(w.client(0).core.state(), ClientState::Handshaking);
    let hs_before = sent_of(&w, MsgType::Handshake).len();
    w.run_for(Duration::from_secs(21));
    let e = ClientError::HandshakeTimeout;
    let c = w.client(0);
    assert_eq!(c.core.state(), ClientState::Failed(e));
    assert_eq!(
        c.events[1..],
        [
            ClientEvent::Reconnecting {
                reason: ClientError::RebindTimeout
            },
            ClientEvent::Failed(e),
        ]
    );
    assert_eq!(c.core.stats().rehandshakes, 1);
    assert_eq!(c.core.poll_timeout(), None);
    // Retried with the configured backoff (0, .25, .75, 1.75, 3.75, then every 4 s) until
    // the 20 s deadline: 9 in all, as for a first handshake.
    assert_eq!(sent_of(&w, MsgType::Handshake).len() - 1, 9, "{hs_before}");
    // Failed is final: nothing more goes out.
    w.run_for(Duration::from_secs(60));
    assert_eq!(w.client(0).core.stats().rehandshakes, 1);
    assert_eq!(sent_of(&w, MsgType::Handshake).len(), 10);
}

/// By default the fresh handshake has no deadline: a client offline for minutes keeps
/// trying, its HANDSHAKEs backing off to one per 30 s, and connects once the path returns.
#[test]
fn rehandshake_keeps_trying_until_the_path_returns() {
    let mut w = connected();
    go_silent(&mut w);
    w.run_for(Duration::from_secs(31));
    assert_eq!(w.client(0).core.state(), ClientState::Handshaking);
    let at_reconnect = sent_of(&w, MsgType::Handshake).len();
    w.run_for(Duration::from_secs(300));
    assert_eq!(w.client(0).core.state(), ClientState::Handshaking);
    let sent = sent_of(&w, MsgType::Handshake).len() - at_reconnect;
    // 0, .25, .75, 1.75, 3.75, 7.75, 15.75, 31.75, then every 30 s up to 300 s: about 16.
    assert!((12..=20).contains(&sent), "{sent} HANDSHAKEs in 300 s");
    w.clear_drop();
    assert!(
        w.drive_until(Duration::from_secs(35), |w| w.client(0).core.state()
            == ClientState::Connected)
    );
    assert_eq!(w.client(0).core.stats().rehandshakes, 1);
    assert!(matches!(
        w.client(0).events.last(),
        Some(ClientEvent::Connected { .. })
    ));
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

#[test]
fn late_reply_to_an_earlier_attempt_is_accepted() {
    let mut w = world();
    // Both attempts reach the host; both replies are held back.
    w.hold_if(|d| d.from == GATEWAY && d.data[0] == MsgType::HandshakeReply as u8);
    w.run_for(ms(300));
    assert_eq!(
        sent_of(&w, MsgType::Handshake).len(),
        2,
        "one retry at 250 ms"
    );
    let held = w.take_held();
    assert_eq!(held.len(), 2);
    assert_ne!(held[0].data, held[1].data);
    w.clear_hold();
    // The reply to the first attempt completes the handshake ...
    w.deliver(0, &held[0].data);
    assert_eq!(w.client(0).core.state(), ClientState::Connected);
    // ... and the reply to the other attempt is dropped, not fatal.
    w.deliver(0, &held[1].data);
    assert_eq!(w.client(0).core.stats().dropped_unexpected, 1);
    assert_eq!(w.client(0).core.state(), ClientState::Connected);
    // The gateway bound the client's tuple to the newest registration (the second
    // attempt's). The host opens the first DATA under the client's other connection, takes it
    // as the one in use and closes the other, which frees the tuple at the gateway; the next
    // DATA draws an UNRECOGNIZED and the REBIND binds the tuple to the first connection.
    let start = w.now;
    let mut recovered = false;
    for _ in 0..100 {
        w.send(0, b"on the first connection");
        if w.drive_until(ms(100), |w| !w.client(0).received.is_empty()) {
            recovered = true;
            break;
        }
    }
    assert!(recovered, "traffic never recovered");
    assert_eq!(w.host.counters().data_sibling, 1);
    assert_eq!(w.host.counters().data_bad_aead, 0);
    let tuple = w.client(0).tuple;
    assert_eq!(rebound(&w), vec![(None, tuple)]);
    let reasons: Vec<RebindReason> = w
        .client(0)
        .events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Rebinding { reason } => Some(*reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        vec![RebindReason::Unrecognized],
        "no silent-path probe needed"
    );
    let took = w.now.since(start);
    assert!(took <= ms(300), "recovered after {took:?}");
    echo_roundtrip(&mut w, b"on the first connection");
}

// ---- 2. DATA: replays, reordering, tampering ----

#[test]
fn replayed_data_dropped_reordered_accepted() {
    let mut w = connected();
    echo_roundtrip(&mut w, b"first payload");
    let echo = w.client(0).delivered.last().unwrap().clone();
    w.deliver(0, &echo);
    assert_eq!(w.client(0).core.stats().dropped_replay, 1);
    assert_eq!(w.client(0).received.len(), 1);

    let data = |w: &World, seq: u64, p: &[u8]| w.host_data(0, seq, p).expect("connected");
    let (d5, d3, d4) = (
        data(&w, 5, b"five"),
        data(&w, 3, b"three"),
        data(&w, 4, b"four"),
    );
    w.clients[0].received.clear();
    for d in [&d5, &d3, &d4] {
        w.deliver(0, d);
    }
    assert_eq!(
        w.client(0).received,
        vec![b"five".to_vec(), b"three".to_vec(), b"four".to_vec()]
    );
    w.deliver(0, &d3);
    assert_eq!(w.client(0).core.stats().dropped_replay, 2);
    // Far behind the window.
    let jump = data(&w, 5000, b"jump");
    w.deliver(0, &jump);
    let stale = data(&w, 6, b"stale");
    w.deliver(0, &stale);
    assert_eq!(w.client(0).core.stats().dropped_replay, 3);
    // Tampered: dropped as an auth failure, and the window does not move.
    let mut bad = data(&w, 9000, b"forged");
    bad[12] ^= 1;
    w.deliver(0, &bad);
    assert_eq!(w.client(0).core.stats().dropped_auth, 1);
    let ok = data(&w, 5001, b"ok");
    w.deliver(0, &ok);
    assert_eq!(w.client(0).received.last().unwrap(), b"ok");
}

// ---- 5. forged UNRECOGNIZED ----

/// An UNRECOGNIZED of the gateway's epoch and time naming `observed`, with a random cookie.
fn forged_unrecognized(w: &World, observed: SocketAddr) -> Vec<u8> {
    let u = Unrecognized {
        epoch_byte: w.epoch_keys(w.cfg.epoch).epoch_byte(),
        t: w.now,
        observed,
        cookie: crypto::random_array(),
    };
    let mut out = vec![0u8; u.len()];
    u.emit(&mut out);
    out
}

/// The gateway's REBIND rejections so far, by reason.
fn rejects(w: &World) -> Vec<(RejectReason, u64)> {
    RejectReason::ALL
        .into_iter()
        .map(|r| (r, w.gateway.count(C::reject(r))))
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[test]
fn forged_unrecognized_does_not_tear_down() {
    let mut w = connected();
    let conn_id = w.client(0).core.conn_id();
    let tuple = w.client(0).tuple;
    let forged = forged_unrecognized(&w, addr("192.0.2.66:666"));
    w.deliver(0, &forged);
    assert_eq!(w.client(0).core.state(), ClientState::Rebinding);
    // DATA still flows while rebinding.
    w.send(0, b"still here");
    w.run_for(ms(100));
    assert_eq!(w.client(0).received, vec![b"still here".to_vec()]);
    // The forged cookie fails check 3; the gateway's real UNRECOGNIZED drives a rebind to
    // the tuple the client actually has.
    w.run_for(ms(500));
    assert_eq!(rejects(&w), vec![(RejectReason::Cookie, 1)]);
    assert_eq!(rebound(&w), vec![(None, tuple)]);
    assert_eq!(w.client(0).core.state(), ClientState::Connected);
    assert_eq!(w.client(0).core.conn_id(), conn_id);
    echo_roundtrip(&mut w, b"and after");

    // Wrong epoch byte: not used; the client asks for an UNRECOGNIZED of its own epoch (a
    // cookie request naming it, §6 1.1) and stays on its connection.
    let mut other = forged_unrecognized(&w, tuple);
    other[1] ^= 1;
    let requests = w.client(0).core.stats().cookie_requests_sent;
    w.deliver(0, &other);
    assert_eq!(w.client(0).core.stats().dropped_unrecognized, 1);
    assert_eq!(w.client(0).core.stats().cookie_requests_sent, requests + 1);
    w.run_for(ms(500));
    assert_eq!(w.client(0).core.state(), ClientState::Connected);
    assert_eq!(w.client(0).core.conn_id(), conn_id);
}

/// `n` forged UNRECOGNIZEDs, each naming another tuple, one every `gap`.
fn forged_flood(w: &mut World, n: u16, gap: Duration) {
    for i in 0..n {
        let observed = SocketAddr::new([192, 0, 2, (i % 250) as u8].into(), 1000 + i);
        let forged = forged_unrecognized(w, observed);
        w.deliver(0, &forged);
        w.run_for(gap);
    }
}

fn drop_rebinds(w: &mut World) {
    w.drop_if(|d| d.to == GATEWAY && d.data[0] == MsgType::Rebind as u8);
}

#[test]
fn forged_unrecognized_flood_cannot_drive_one_rebind_per_packet() {
    // Security item 10: each 33-byte forged UNRECOGNIZED with a new tuple used to draw a
    // REBIND at once (9x the attacker's bytes). REBINDs are paced.
    let mut w = connected();
    drop_rebinds(&mut w);
    forged_flood(&mut w, 1000, ms(1));
    let sent = sent_of(&w, MsgType::Rebind).len();
    let (pace, burst) = (
        ClientConfig::default().rebind_pace,
        ClientConfig::default().rebind_burst,
    );
    let bound = burst as usize + 1000 / pace.as_millis() as usize;
    // ... and still about one per `pace`: a paced client keeps trying the newest one.
    assert!(
        (bound - 2..=bound).contains(&sent),
        "{sent} REBINDs for 1000 forged UNRECOGNIZEDs in 1 s (bound {bound})"
    );
    let stats = w.client(0).core.stats();
    assert!(stats.rebinds_paced > 900);
    assert_eq!(stats.unrecognized_received, 1000);
    // A postponed REBIND goes out with the newest UNRECOGNIZED: its epoch, t and cookie.
    w.run_for(pace);
    let newest = forged_unrecognized(&w, addr("192.0.2.1:1"));
    w.deliver(0, &newest);
    w.run_for(pace);
    let last = sent_of(&w, MsgType::Rebind).last().unwrap().to_vec();
    assert_eq!(last[1..10], newest[1..10], "epoch byte and t");
    assert_eq!(last[10..26], newest[17..33], "cookie");
}

#[test]
fn real_rebind_completes_right_after_a_forged_flood() {
    let pace = ClientConfig::default().rebind_pace;
    let mut w = connected();
    drop_rebinds(&mut w);
    forged_flood(&mut w, 50, ms(1));
    assert_eq!(w.client(0).core.state(), ClientState::Rebinding);
    // Now the NAT really moves us, while the flood's last REBIND is under `pace` old.
    w.clear_drop();
    let t1 = addr("198.51.100.99:50000");
    w.move_client_to(0, t1);
    let moved_at = w.now;
    w.send(0, b"draws a real UNRECOGNIZED");
    let done = w.drive_until(ms(500), |w| w.client(0).core.rebinds() > 0);
    let took = w.now.since(moved_at);
    assert!(done, "no rebind within 500 ms");
    assert_eq!(rebound(&w), vec![(None, t1)]);
    let conn_id = w.client(0).core.conn_id().unwrap();
    assert_eq!(routed(&w, conn_id), Some(t1));
    // DATA, UNRECOGNIZED, REBIND and ACK each take one LATENCY; pacing adds at most `pace`.
    assert!(took <= pace + 4 * LATENCY + ms(2), "took {took:?}");
    echo_roundtrip(&mut w, b"moved");
}

#[test]
fn unanswerable_rebind_is_abandoned_while_data_flows() {
    let mut w = connected();
    // The gateway's UNRECOGNIZEDs never arrive (rate-limited, or lost on this path).
    w.drop_if(|d| d.from == GATEWAY && d.data[0] == MsgType::Unrecognized as u8);
    let forged = forged_unrecognized(&w, w.client(0).tuple);
    w.deliver(0, &forged);
    for _ in 0..31 {
        w.send(0, b"periodic traffic");
        w.run_for(Duration::from_secs(1));
        // The path works: never given up, so no re-handshake (nor failure).
        assert!(matches!(
            w.client(0).core.state(),
            ClientState::Connected | ClientState::Rebinding
        ));
    }
    assert_eq!(w.client(0).core.stats().rehandshakes, 0);
    assert_eq!(w.client(0).core.state(), ClientState::Connected);
    assert!(matches!(
        w.client(0).events.last(),
        Some(ClientEvent::RebindAbandoned { .. })
    ));
    assert_eq!(w.client(0).received.len(), 31);
    assert!(
        sent_of(&w, MsgType::Rebind).len() > 10,
        "retried with backoff"
    );
    w.clear_drop();
    echo_roundtrip(&mut w, b"still usable");
}

// ---- 7. arbitrary input never panics ----

fn interesting() -> impl Strategy<Value = Vec<u8>> {
    let ty = prop::sample::select(vec![0x48u8, 0x68, 0x44, 0x55, 0x52, 0x72, 0x00, 0xff]);
    let len = prop_oneof![
        0usize..64,
        prop::sample::select(vec![17, 25, 33, 45, 49, 127, 306, 383, 639, 640, 1225]),
        0usize..1500,
    ];
    (ty, len, any::<u64>()).prop_map(|(ty, len, seed)| {
        let mut v: Vec<u8> = (0..len)
            .map(|i| (seed.rotate_left(i as u32 % 64) >> (i % 8)) as u8)
            .collect();
        if let Some(b) = v.first_mut() {
            *b = ty;
        }
        // Plausible tuples inside UNRECOGNIZED-looking bytes.
        if ty == 0x55 && v.len() > 10 {
            v[10] = if len == 45 { 6 } else { 4 };
        }
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn handle_never_panics(
        phase in 0u8..3,
        inputs in prop::collection::vec(interesting(), 1..24),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
    ) {
        let mut w = world();
        if phase >= 1 {
            w.run_for(ms(100));
            prop_assert_eq!(w.client(0).core.state(), ClientState::Connected);
        }
        if phase == 2 {
            w.move_client_to(0, addr("198.51.100.1:1"));
            w.send(0, b"drawing an UNRECOGNIZED");
            w.run_for(ms(15));
        }
        // Mutations of real datagrams, then arbitrary bytes.
        let real = w.client(0).delivered.clone();
        for (i, x) in flips {
            if real.is_empty() { break; }
            let mut d = real[i % real.len()].clone();
            let at = i % d.len().max(1);
            if let Some(b) = d.get_mut(at) { *b ^= x.max(1); }
            w.deliver(0, &d);
        }
        for d in &inputs {
            w.deliver(0, d);
            w.run_for(ms(7));
        }
        w.run_for(Duration::from_secs(1));
        prop_assert!(!matches!(w.client(0).core.state(), ClientState::Failed(_)) || phase == 0);
    }
}

// ---- key delivery (tests/data/PROTOCOL-EXT.md "Key delivery"): the client's half ----

/// KEYS sealed under the connection's `kd_s2c` (as a host delivers them) is installed and
/// acknowledged under `kd_c2s` in the delivery nonce space; a retransmission is acknowledged
/// again, an older or forged one dropped; an UNRECOGNIZED of the delivered epoch switches the
/// client to those keys and its REBIND names that epoch.
#[test]
fn delivered_keys_are_acknowledged_and_used_for_their_epoch() {
    let mut w = connected();
    let conn_id = w.client(0).core.conn_id().unwrap();
    let epoch = w.cfg.epoch;
    let next = w.epoch_keys(epoch + 1);
    let keys = wire::NewKeys {
        epoch: epoch + 1,
        index: 5,
        rebind_secret: [7; 32],
        slot_keys: next.client_keys(5).to_vec(),
    };
    let seal = |w: &World, kseq: u64| {
        let (_, s2c) = w.host.data_keys_for(conn_id).unwrap();
        let mut k = vec![0u8; wire::keys_len(SLOTS)];
        wire::seal_keys(s2c, kseq, &keys, &mut k);
        k
    };
    // The KEYS_ACKs the client sent since `from` (it sends them at its next step).
    let acks = |w: &mut World, from: usize| {
        w.step();
        w.client(0).sent[from..]
            .iter()
            .filter(|d| d[0] == wire::KEYS_ACK_TYPE)
            .cloned()
            .collect::<Vec<_>>()
    };
    let open = |w: &World, a: &[u8]| {
        let (c2s, _) = w.host.data_keys_for(conn_id).unwrap();
        wire::open_keys_ack(c2s, a)
    };
    let k1 = seal(&w, 1);
    let mark = w.client(0).sent.len();
    w.deliver(0, &k1);
    let a = acks(&mut w, mark);
    assert_eq!(a.len(), 1);
    assert_eq!(open(&w, &a[0]), Ok((0, epoch + 1, 1)));
    // A retransmission: acknowledged again (next aseq), nothing installed twice.
    let mark = w.client(0).sent.len();
    w.deliver(0, &k1);
    let a = acks(&mut w, mark);
    assert_eq!(open(&w, &a[0]), Ok((1, epoch + 1, 1)));
    assert_eq!(w.client(0).core.stats().keys_installed, 1);
    // Older: dropped. Forged (another key): dropped.
    let mark = w.client(0).sent.len();
    let k0 = seal(&w, 0);
    w.deliver(0, &k0);
    let mut forged = vec![0u8; wire::keys_len(SLOTS)];
    wire::seal_keys(&crypto::gcm(&[9; 16]), 2, &keys, &mut forged);
    w.deliver(0, &forged);
    assert!(acks(&mut w, mark).is_empty());
    assert_eq!(w.client(0).core.stats().dropped_replay, 1);
    assert_eq!(w.client(0).core.stats().dropped_auth, 1);
    // An UNRECOGNIZED of the new epoch: the client switches and rebinds under it.
    let tuple = w.client(0).tuple;
    let u = Unrecognized {
        epoch_byte: (epoch + 1) as u8,
        t: w.now,
        observed: tuple,
        cookie: next.cookie(&tuple, w.now),
    };
    let mut d = vec![0u8; u.len()];
    u.emit(&mut d);
    let mark = w.client(0).sent.len();
    w.deliver(0, &d);
    assert_eq!(w.client(0).core.stats().keys_switched, 1);
    w.step();
    let rebind = w.client(0).sent[mark..]
        .iter()
        .find(|d| d[0] == MsgType::Rebind as u8)
        .expect("a REBIND")
        .clone();
    assert_eq!(rebind[1], (epoch + 1) as u8);
    assert_eq!(rebind.len(), wire::rebind_len(SLOTS));
}
