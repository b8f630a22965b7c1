//! Scenarios over the simulated world (`rebindgw::sim`): the real client, gateway and host
//! cores on a virtual clock and an in-memory network.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use rebindgw::client::{ClientConfig, ClientError, ClientEvent, ClientState};
use rebindgw::gateway::metrics::C;
use rebindgw::hostlink::LinkType;
use rebindgw::sim::{GATEWAY, SimConfig, World};
use rebindgw::wire::{KEYS_ACK_TYPE, KEYS_TYPE, MsgType, Unrecognized};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Sends `payload` from client `i` and drives until it comes back; returns the round trip.
fn echo(w: &mut World, i: usize, payload: &[u8]) -> Duration {
    let before = w.client(i).received.len();
    let sent = w.now;
    w.send(i, payload);
    assert!(
        w.drive_until(ms(2_000), |w| w.client(i).received.len() > before),
        "client {i}: no echo of {payload:?}"
    );
    assert_eq!(w.client(i).received.last().unwrap(), payload);
    w.now.since(sent)
}

/// Keeps sending `payload` from client `i` every `every` until an echo arrives (a lossy path
/// loses DATA; the client does not retransmit it).
fn echo_eventually(w: &mut World, i: usize, payload: &[u8], every: Duration, limit: Duration) {
    let before = w.client(i).received.len();
    let end = w.now.saturating_add(limit);
    while w.client(i).received.len() == before {
        assert!(w.now < end, "client {i}: no echo within {limit:?}");
        if w.client(i).core.state() == ClientState::Connected {
            w.send(i, payload);
        }
        w.drive_until(every, |w| w.client(i).received.len() > before);
    }
    assert!(w.client(i).received[before..].iter().all(|p| p == payload));
}

fn connected(cfg: SimConfig, n: usize) -> World {
    let mut w = World::new(cfg);
    assert!(
        w.connect_clients(n, Duration::from_secs(5)),
        "clients connect"
    );
    w
}

#[test]
fn handshake_then_echo() {
    let mut w = World::new(SimConfig::default());
    let c = w.add_client();
    assert!(w.drive_until(ms(1_000), |w| w.client(c).core.state()
        == ClientState::Connected));
    // HANDSHAKE to the host and its reply back: two client-side and four host-link hops.
    let took = w.now.since(rebindgw::sim::T0);
    assert!(took >= ms(40) && took < ms(45), "handshake took {took:?}");
    assert_eq!(w.host.connections(), 1);
    assert_eq!(w.gateway.shared.connections(), 1);
    assert!(
        w.client(c)
            .events
            .iter()
            .any(|e| matches!(e, ClientEvent::Connected { .. }))
    );

    // One round trip: 2 × 20 ms plus 2 × 0.2 ms on the host link.
    assert_eq!(
        echo(&mut w, c, b"hello"),
        ms(40) + Duration::from_micros(400)
    );
    assert_eq!(
        echo(&mut w, c, b"again"),
        ms(40) + Duration::from_micros(400)
    );
    assert_eq!(w.host.counters().echoes, 2);
    assert_eq!(w.gateway.count(C::RxData), 2);
    assert_eq!(w.gateway.count(C::TxClientData), 2);
    assert_eq!(w.net.lost + w.net.no_route, 0);
}

#[test]
fn nat_move_draws_unrecognized_then_rebind_and_echo_resumes() {
    let mut w = connected(SimConfig::default(), 1);
    echo(&mut w, 0, b"before");
    let old = w.client(0).tuple;
    let new = w.move_client(0);
    assert_ne!(old, new);

    // The first DATA from the new tuple is unknown: UNRECOGNIZED, REBIND, REBIND_ACK.
    let moved_at = w.now;
    w.send(0, b"lost in the move");
    assert!(w.drive_until(ms(1_000), |w| w.client(0).core.rebinds() == 1));
    let took = w.now.since(moved_at);
    assert_eq!(
        took,
        ms(80),
        "two round trips: DATA→UNRECOGNIZED, REBIND→ACK"
    );
    assert_eq!(w.gateway.count(C::UnrecognizedSent), 1);
    assert_eq!(w.gateway.count(C::RebindAccepted), 1);
    assert_eq!(w.client(0).core.public_tuple(), Some(new));
    assert!(
        w.client(0)
            .events
            .iter()
            .any(|e| matches!(e, ClientEvent::Rebound { .. }))
    );
    // The DATA that drew the UNRECOGNIZED was not forwarded; new DATA is.
    assert_eq!(
        echo(&mut w, 0, b"after"),
        ms(40) + Duration::from_micros(400)
    );
    assert_eq!(w.host.counters().echoes, 2);
    // Nothing reached the old tuple.
    assert_eq!(w.net.no_route, 0);
    // The gateway now routes the connection's host DATA to the new tuple.
    let conn_id = w.client(0).core.conn_id().unwrap();
    assert_eq!(
        w.gateway.shared.conns.get(conn_id).and_then(|r| r.tuple),
        Some(new)
    );
}

#[test]
fn loss_and_reordering_during_a_rebind() {
    for seed in 1..=6 {
        let mut w = connected(
            SimConfig {
                seed,
                ..SimConfig::default()
            },
            1,
        );
        echo(&mut w, 0, b"before");
        // From now on: 30 % loss each way and up to 50 ms of jitter (reordering).
        w.cfg.loss = 0.3;
        w.cfg.jitter = ms(50);
        let new = w.move_client(0);
        echo_eventually(&mut w, 0, b"after", ms(100), Duration::from_secs(20));
        let c = &w.client(0).core;
        assert_eq!(c.state(), ClientState::Connected, "seed {seed}");
        assert!(c.rebinds() >= 1, "seed {seed}");
        assert_eq!(c.public_tuple(), Some(new), "seed {seed}");
        assert!(w.gateway.count(C::RebindAccepted) >= 1, "seed {seed}");
        assert!(
            w.net.lost > 0,
            "seed {seed}: the network did lose datagrams"
        );
    }
}

#[test]
fn reordering_around_a_rebind() {
    // Jitter alone (up to 40 ms on 20 ms): datagrams overtake each other, none is lost.
    let mut w = connected(
        SimConfig {
            seed: 42,
            jitter: ms(40),
            ..SimConfig::default()
        },
        1,
    );
    w.move_client(0);
    // A burst from the new tuple: each draws an UNRECOGNIZED, and they arrive out of order;
    // the client rebinds once, from the newest.
    for i in 0..20u8 {
        w.send(0, &[i; 32]);
    }
    assert!(w.drive_until(ms(2_000), |w| w.client(0).core.rebinds() == 1));
    w.run_for(ms(200));
    assert_eq!(w.client(0).core.rebinds(), 1);
    assert_eq!(w.gateway.count(C::UnrecognizedSent), 20);
    assert!(w.gateway.count(C::RebindAccepted) >= 1);
    // A burst after the rebind: every payload echoes, in some other order.
    let sent: Vec<Vec<u8>> = (20..60u8).map(|i| vec![i; 32]).collect();
    for p in &sent {
        w.send(0, p);
    }
    assert!(w.drive_until(ms(1_000), |w| w.client(0).received.len() == sent.len()));
    let got = w.client(0).received.clone();
    assert_ne!(got, sent, "the jitter reordered the echoes");
    let (mut a, mut b) = (got, sent);
    a.sort();
    b.sort();
    assert_eq!(a, b);
    // Reordered DATA inside the replay window is accepted, not counted as replay.
    assert_eq!(w.client(0).core.stats().dropped_replay, 0);
    assert_eq!(w.host.counters().data_replay, 0);
}

#[test]
fn epoch_rotation_both_epochs_verify_during_grace() {
    let mut w = connected(SimConfig::default(), 1);
    let old_epoch_byte = (w.cfg.epoch & 0xff) as u8;
    // Client 0 gets no new keys (its host never hears of them): it keeps its old ones.
    w.drop_if(|d| d.data.first() == Some(&(LinkType::EpochKeys as u8)));
    w.rotate_epoch(w.cfg.epoch + 1);
    // A client that connects now gets the new epoch.
    assert!(w.connect_clients(1, Duration::from_secs(5)));
    echo(&mut w, 0, b"old epoch, same tuple");
    echo(&mut w, 1, b"new epoch");

    // The new-epoch client moves and rebinds as usual.
    let new1 = w.move_client(1);
    w.send(1, b"first DATA from the new tuple");
    assert!(w.drive_until(ms(1_000), |w| w.client(1).core.rebinds() == 1));
    assert_eq!(w.client(1).core.public_tuple(), Some(new1));
    echo(&mut w, 1, b"new epoch, moved");

    // The old-epoch client moves: the UNRECOGNIZED its DATA draws carries the new epoch, which
    // it holds no keys for. PROTOCOL.md §6 (1.1): it sends a cookie request naming its own
    // epoch, the gateway answers with an UNRECOGNIZED of the previous epoch (cookie under its
    // `Kc`), and the client rebinds with its old keys, by itself.
    let unrec = Rc::new(RefCell::new(Vec::new()));
    let seen = unrec.clone();
    w.drop_if(move |d| {
        if d.from == GATEWAY && MsgType::of(&d.data) == Ok(MsgType::Unrecognized) {
            seen.borrow_mut()
                .push(Unrecognized::parse(&d.data).unwrap().epoch_byte);
        }
        d.data.first() == Some(&(LinkType::EpochKeys as u8))
    });
    let new0 = w.move_client(0);
    w.send(0, b"first DATA from the new tuple");
    assert!(w.drive_until(ms(2_000), |w| w.client(0).core.rebinds() == 1));
    assert!(w.client(0).core.stats().dropped_unrecognized >= 1);
    assert!(w.client(0).core.stats().cookie_requests_sent >= 1);
    let seen = unrec.borrow().clone();
    assert_eq!(seen.first(), Some(&(old_epoch_byte + 1)));
    assert!(seen.contains(&old_epoch_byte), "{seen:?}");
    w.clear_drop();
    assert_eq!(w.client(0).core.public_tuple(), Some(new0));
    assert_eq!(w.gateway.count(C::RebindAccepted), 2);
    echo(&mut w, 0, b"old epoch, moved");
    let old_keys = w.epoch_keys(w.cfg.epoch);

    // After the grace period (the next rotation), the first epoch's REBINDs fail check 2.
    w.rotate_epoch(w.cfg.epoch + 2);
    let new0 = w.move_client(0);
    let t = w.gateway.shared.issue_ticks(w.now);
    let u = Unrecognized {
        epoch_byte: old_epoch_byte,
        t,
        observed: new0,
        cookie: old_keys.cookie(&new0, t),
    };
    let mut d = vec![0u8; u.len()];
    u.emit(&mut d);
    w.inject(GATEWAY, new0, d);
    w.run_for(ms(100));
    assert_eq!(w.client(0).core.rebinds(), 1);
    assert!(w.gateway.count(C::RejectEpoch) >= 1);
}

#[test]
fn gateway_restart_refuses_old_rebinds_and_clients_recover() {
    let mut w = connected(SimConfig::default(), 3);
    // Capture every REBIND on the wire.
    let rebinds = Rc::new(RefCell::new(Vec::new()));
    let tap = rebinds.clone();
    w.drop_if(move |d| {
        if d.to == GATEWAY && MsgType::of(&d.data) == Ok(MsgType::Rebind) {
            tap.borrow_mut().push(d.clone());
        }
        false
    });
    let moved = w.move_client(0);
    w.send(0, b"first DATA from the new tuple");
    assert!(w.drive_until(ms(1_000), |w| w.client(0).core.rebinds() == 1));
    echo(&mut w, 0, b"before restart");
    let captured = rebinds.borrow().clone();
    assert_eq!(captured.len(), 1);
    assert_eq!(w.gateway.persisted.len(), 3);

    w.run_for(ms(500));
    w.restart_gateway();
    assert_eq!(w.gateway.restarts, 1);
    assert_eq!(w.gateway.shared.connections(), 3, "all restored");

    // A REBIND from before the restart, replayed from its own tuple: refused, not acked.
    w.inject(moved, GATEWAY, captured[0].data.clone());
    w.run_for(ms(50));
    assert_eq!(w.gateway.count(C::RebindAccepted), 0);
    // Check 5: its t is not above the restored L.
    assert_eq!(w.gateway.count(C::RejectReplay), 1);

    // Clients on their restored tuples go on as if nothing happened.
    for i in 0..3 {
        echo(&mut w, i, format!("after restart {i}").as_bytes());
    }
    // A client that moves after the restart rebinds with a fresh UNRECOGNIZED.
    w.move_client(1);
    w.send(1, b"first DATA from the new tuple");
    assert!(w.drive_until(ms(1_000), |w| w.client(1).core.rebinds() == 1));
    assert_eq!(w.gateway.count(C::RebindAccepted), 1);
    echo(&mut w, 1, b"moved after restart");
    assert!(
        w.clients
            .iter()
            .all(|c| c.core.state() == ClientState::Connected)
    );
}

#[test]
fn storm_of_200_moves_all_recover() {
    let n = 200;
    let mut w = connected(SimConfig::default(), n);
    let started = w.now;
    for i in 0..n {
        w.move_client(i);
        w.send(i, b"first DATA from the new tuple");
    }
    assert!(
        w.drive_until(Duration::from_secs(5), |w| w
            .clients
            .iter()
            .all(|c| c.core.rebinds() == 1)),
        "all rebind"
    );
    let took = w.now.since(started);
    assert!(took < ms(500), "storm recovered in {took:?}");
    assert_eq!(w.gateway.count(C::RebindAccepted), n as u64);
    assert_eq!(w.gateway.count(C::UnrecognizedSent), n as u64);
    for i in 0..n {
        w.send(i, format!("echo {i}").as_bytes());
    }
    assert!(w.drive_until(ms(500), |w| w.clients.iter().all(|c| c.received.len() == 1)));
    for (i, c) in w.clients.iter().enumerate() {
        assert_eq!(c.received[0], format!("echo {i}").as_bytes());
        assert_eq!(c.core.public_tuple(), Some(c.tuple));
    }
    assert_eq!(w.host.counters().echoes, n as u64);
}

/// Against the real gateway (`rebindgw::sim`): a client whose first HANDSHAKE_REPLY is lost
/// completes on its retry, and once it uses that connection the host closes the first
/// attempt, which the gateway then releases.
#[test]
fn lost_reply_leaves_an_attempt_that_the_host_closes_through_the_gateway() {
    let mut w = World::new(SimConfig::default());
    let mut dropped = false;
    w.drop_if(move |d| {
        let drop = d.from == GATEWAY && d.data[0] == MsgType::HandshakeReply as u8 && !dropped;
        dropped |= drop;
        drop
    });
    w.add_client();
    assert!(w.drive_until(Duration::from_secs(2), |w| {
        w.client(0).core.state() == ClientState::Connected
    }));
    assert_eq!(w.host.connections(), 2, "both attempts registered");
    assert_eq!(w.gateway.shared.connections(), 2);
    w.send(0, b"the client picks its connection");
    assert!(w.drive_until(Duration::from_secs(1), |w| w.client(0).received.len() == 1));
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.host.counters().connections_replaced, 1);
    assert_eq!(w.host.counters().closed_acks, 1);
    assert_eq!(w.host.connections(), 1);
    assert_eq!(
        w.gateway.shared.connections(),
        1,
        "the gateway released the index"
    );
    let conn_id = w.client(0).core.conn_id().unwrap();
    assert_eq!(
        w.host.gateway_of(conn_id),
        Some(rebindgw::sim::GATEWAY_LINK)
    );
}

// ---- Deferred commits (cluster mode's core): a shared store decides every REBIND ----

fn deferred(latency: Duration) -> SimConfig {
    SimConfig {
        commit_latency: Some(latency),
        ..SimConfig::default()
    }
}

#[test]
fn deferred_commits_add_one_store_round_trip_to_a_rebind() {
    let store = ms(3);
    let mut w = connected(deferred(store), 1);
    echo(&mut w, 0, b"before");
    w.move_client(0);
    let moved_at = w.now;
    w.send(0, b"lost in the move");
    assert!(w.drive_until(ms(1_000), |w| w.client(0).core.rebinds() == 1));
    // Two client round trips (DATA→UNRECOGNIZED, REBIND→ACK) plus the store's answer.
    assert_eq!(w.now.since(moved_at), ms(80) + store);
    // One registration (at the handshake) and one rebind, each decided by the store.
    assert_eq!(w.gateway.count(C::CommitProposed), 2);
    assert_eq!(w.gateway.count(C::CommitCommitted), 2);
    assert_eq!(w.gateway.count(C::RebindAccepted), 1);
    echo(&mut w, 0, b"after");
}

#[test]
fn deferred_storm_of_200_moves_all_recover_with_one_commit_each() {
    let n = 200;
    let mut w = connected(deferred(ms(5)), n);
    for i in 0..n {
        w.move_client(i);
        w.send(i, b"first DATA from the new tuple");
    }
    assert!(
        w.drive_until(Duration::from_secs(5), |w| w
            .clients
            .iter()
            .all(|c| c.core.rebinds() == 1)),
        "all rebind"
    );
    // n registrations and n rebinds.
    assert_eq!(w.gateway.count(C::CommitCommitted), 2 * n as u64);
    assert_eq!(w.gateway.count(C::RebindAccepted), n as u64);
    assert_eq!(w.gateway.pending_commits_of_worker(), 0);
    for i in 0..n {
        echo(&mut w, i, format!("echo {i}").as_bytes());
    }
}

#[test]
fn store_down_refuses_rebinds_known_tuples_keep_forwarding_and_service_resumes() {
    let mut w = connected(deferred(ms(2)), 2);
    w.gateway.store_down = true;
    // Client 0 stays put: its DATA needs no commit.
    echo(&mut w, 0, b"known tuple");
    // Client 1 moves: its REBINDs are verified but every commit is refused; no ACK.
    w.move_client(1);
    w.send(1, b"from the new tuple");
    w.run_for(Duration::from_secs(2));
    assert_eq!(w.client(1).core.rebinds(), 0);
    assert!(w.gateway.count(C::CommitUnavailable) >= 1);
    assert_eq!(w.gateway.count(C::RebindAccepted), 0);
    echo(&mut w, 0, b"still forwarding");
    // The store returns: the client's next retry commits.
    w.gateway.store_down = false;
    assert!(
        w.drive_until(Duration::from_secs(30), |w| w.client(1).core.rebinds() == 1),
        "rebinds once the store is back"
    );
    echo_eventually(&mut w, 1, b"back", ms(200), Duration::from_secs(5));
}

/// Every client has acknowledged its keys of the current epoch and the gateway holds no
/// pending key.
fn keys_all_delivered(w: &World, n: usize, acked_before: u64) -> bool {
    w.host.counters().keys_acked >= acked_before + n as u64 && w.gateway.shared.keys_pending() == 0
}

/// Moves clients `from..n` to new tuples, has each send, and waits until all rebound.
fn move_and_rebind(w: &mut World, from: usize, n: usize, rebinds: u64, what: &str) {
    for i in from..n {
        w.move_client(i);
        w.send(i, b"after the move");
    }
    assert!(
        w.drive_until(Duration::from_secs(10), |w| (from..n).all(|i| w
            .client(i)
            .core
            .rebinds()
            == rebinds)),
        "{what}: every client rebinds"
    );
    for i in from..n {
        echo(w, i, b"new tuple");
    }
}

fn move_all_and_rebind(w: &mut World, n: usize, rebinds: u64, what: &str) {
    move_and_rebind(w, 0, n, rebinds, what);
}

/// The epoch byte of the registration that routes client `i`'s tuple.
fn routed_epoch(w: &World, i: usize) -> Option<u8> {
    w.gateway
        .shared
        .tuples
        .get(&w.client(i).tuple)
        .map(|r| r.epoch_byte)
}

/// Key delivery (PROTOCOL-EXT.md "Key delivery"): a rotation registers every live
/// connection in the new epoch and its host hands each client its new keys inside the
/// connection. Clients then rebind under the new epoch (NAT churn) during grace, across a
/// gateway restart during grace, and after grace, when the old epoch is wiped: no
/// connection is released and no client handshakes again.
#[test]
fn rotation_delivers_keys_and_clients_rebind_under_the_new_epoch_without_handshakes() {
    const N: usize = 12;
    let mut w = connected(SimConfig::default(), N);
    let handshakes = w.host.counters().handshakes_ok;
    let old = w.cfg.epoch;
    let new = old + 1;
    let r = w.rotate_epoch_with_grace(new, Duration::from_secs(120));
    assert_eq!((r.epoch, r.dropped, r.registered), (new, None, N));
    assert_eq!(w.gateway.shared.keys_pending(), N);
    // Stored with the rotation: both registrations of every connection.
    assert_eq!(
        w.gateway
            .persisted
            .keys()
            .filter(|(e, _)| *e == new)
            .count(),
        N
    );
    assert!(
        w.drive_until(Duration::from_secs(2), |w| keys_all_delivered(w, N, 0)),
        "keys delivered and confirmed"
    );
    assert_eq!(w.gateway.count(C::KeysAcknowledged), N as u64);
    assert_eq!(w.host.counters().keys_sent, N as u64);
    // Still routed by the old registrations until the clients move.
    assert!((0..N).all(|i| routed_epoch(&w, i) == Some(old as u8)));
    move_all_and_rebind(&mut w, N, 1, "during grace");
    assert!((0..N).all(|i| routed_epoch(&w, i) == Some(new as u8)));
    assert_eq!(w.gateway.count(C::RebindAccepted), N as u64);

    // A restart during grace keeps both registries; the clients move again.
    w.restart_gateway();
    assert!(
        w.gateway.shared.epochs().previous.is_some(),
        "grace survives"
    );
    assert_eq!(w.gateway.shared.connections(), N);
    move_all_and_rebind(&mut w, N, 2, "after the restart");

    // The end of grace wipes the old epoch and releases nobody.
    w.run_for(Duration::from_secs(121));
    assert!(
        w.gateway.shared.epochs().previous.is_none(),
        "old epoch wiped"
    );
    assert_eq!(w.gateway.shared.connections_per_epoch(), vec![(new, N)]);
    assert_eq!(w.gateway.count(C::Expired), 0);
    assert!(w.gateway.persisted.keys().all(|(e, _)| *e == new));
    move_all_and_rebind(&mut w, N, 3, "after grace");
    assert_eq!(
        w.host.counters().handshakes_ok,
        handshakes,
        "no new handshake"
    );
    assert_eq!(w.host.counters().expired_by_gateway, 0);
}

/// Lost KEYS and lost KEYS_ACKs are repaired by the host's retransmissions (0.5 s, doubling):
/// each client installs its keys once and acknowledges every copy; the host reports each
/// connection once it has an acknowledgement.
#[test]
fn lost_keys_and_keys_acks_are_retransmitted() {
    const N: usize = 8;
    let mut w = connected(SimConfig::default(), N);
    // Half the clients lose their first two KEYS, the other half their first KEYS_ACK.
    let lost = Rc::new(RefCell::new(std::collections::HashMap::<_, u32>::new()));
    let l = lost.clone();
    let tuples: Vec<_> = (0..N).map(|i| w.client(i).tuple).collect();
    w.drop_if(move |d| {
        let keys = d.from == GATEWAY && d.data.first() == Some(&KEYS_TYPE);
        let ack = d.to == GATEWAY && d.data.first() == Some(&KEYS_ACK_TYPE);
        let who = if keys { d.to } else { d.from };
        let Some(i) = tuples.iter().position(|t| *t == who) else {
            return false;
        };
        let mut l = l.borrow_mut();
        let n = l.entry((i, keys)).or_default();
        let drop = (keys && i % 2 == 0 && *n < 2) || (ack && i % 2 == 1 && *n < 1);
        *n += 1;
        drop
    });
    let new = w.cfg.epoch + 1;
    w.rotate_epoch_with_grace(new, Duration::from_secs(120));
    assert!(
        w.drive_until(Duration::from_secs(10), |w| keys_all_delivered(w, N, 0)),
        "every key delivered in spite of the losses"
    );
    w.clear_drop();
    let c = w.host.counters().clone();
    assert!(c.keys_resent >= (N / 2 * 2 + N / 2) as u64, "{c:?}");
    assert_eq!(c.keys_acked, N as u64);
    assert_eq!(w.gateway.count(C::KeysAcknowledged), N as u64);
    move_all_and_rebind(&mut w, N, 1, "after lossy delivery");
    assert!((0..N).all(|i| routed_epoch(&w, i) == Some(new as u8)));
}

/// A gateway restart (kill -9: only what reached the store survives) in the middle of key
/// delivery: the rotation's registrations come back from the store, the gateway sends
/// every key again, the host answers for the clients that acknowledged already without
/// delivering again, and nobody is lost or handshakes again.
#[test]
fn gateway_restart_during_key_delivery_loses_nobody() {
    const N: usize = 10;
    let mut w = connected(SimConfig::default(), N);
    let handshakes = w.host.counters().handshakes_ok;
    // The clients' acknowledgements of half of them are held back until after the restart.
    let tuples: Vec<_> = (0..N / 2).map(|i| w.client(i).tuple).collect();
    w.hold_if(move |d| {
        d.to == GATEWAY && d.data.first() == Some(&KEYS_ACK_TYPE) && tuples.contains(&d.from)
    });
    let new = w.cfg.epoch + 1;
    w.rotate_epoch_with_grace(new, Duration::from_secs(60));
    w.run_for(ms(300));
    assert_eq!(w.host.counters().keys_acked, (N / 2) as u64);
    w.restart_gateway();
    w.clear_hold();
    let _ = w.take_held();
    assert_eq!(
        w.gateway.shared.keys_pending(),
        N,
        "all sent again after the restart"
    );
    assert!(
        w.drive_until(Duration::from_secs(20), |w| keys_all_delivered(
            w,
            N / 2,
            N as u64 / 2
        )),
        "delivery completes"
    );
    // Each client got one delivery (the host did not restart it for the repeated entries).
    assert_eq!(w.host.counters().keys_sent, N as u64);
    assert!(w.host.counters().epoch_keys_duplicate >= N as u64);
    move_all_and_rebind(&mut w, N, 1, "after the restart");
    w.run_for(Duration::from_secs(61));
    assert_eq!(w.gateway.shared.connections_per_epoch(), vec![(new, N)]);
    move_all_and_rebind(&mut w, N, 2, "after grace");
    assert_eq!(w.host.counters().handshakes_ok, handshakes);
}

/// A client offline (asleep: it sends nothing) across two rotations misses both
/// deliveries: its connection outlives the rotations (its registrations move on), but when
/// it comes back from a new tuple it holds no key the gateway still accepts, so its rebind
/// runs out and its core handshakes again by itself (`rehandshake_after_failed_rebind`, on
/// by default): no application reconnects it. The others, which got their keys, rebind
/// with none.
#[test]
fn a_client_offline_across_two_rotations_handshakes_again() {
    const N: usize = 3;
    let mut w = connected(asleep(ClientConfig::default()), N);
    let newest = w.cfg.epoch + 2;
    let (old_conn, events_before, handshakes) = offline_across_two_rotations_then_move(&mut w, N);
    assert!(
        w.drive_until(Duration::from_secs(60), |w| w.client(0).core.state()
            == ClientState::Connected
            && w.client(0).core.conn_id() != Some(old_conn)),
        "handshakes again by itself: {:?} {:?} {:?}",
        &w.client(0).events[events_before..],
        w.client(0).core.state(),
        w.client(0).core.stats()
    );
    // The rebind ran out, then the new handshake: Reconnecting, then Connected with a new
    // connection, and nothing in between but the rebind's own events.
    let events = &w.client(0).events[events_before..];
    let at = events
        .iter()
        .position(|e| {
            *e == ClientEvent::Reconnecting {
                reason: ClientError::RebindTimeout,
            }
        })
        .expect("Reconnecting");
    let new_conn = w.client(0).core.conn_id().unwrap();
    assert_eq!(
        &events[at..],
        &[
            ClientEvent::Reconnecting {
                reason: ClientError::RebindTimeout
            },
            ClientEvent::Connected { conn_id: new_conn }
        ]
    );
    assert!(
        events[..at]
            .iter()
            .all(|e| matches!(e, ClientEvent::Rebinding { .. })),
        "{events:?}"
    );
    assert_eq!(w.client(0).core.stats().rehandshakes, 1);
    echo(&mut w, 0, b"newest epoch");
    // The new connection is registered under the newest epoch, like everyone else's.
    assert!(
        w.gateway
            .shared
            .connections_per_epoch()
            .iter()
            .all(|(e, _)| *e == newest),
        "{:?}",
        w.gateway.shared.connections_per_epoch()
    );
    assert_eq!(w.host.counters().handshakes_ok, handshakes + 1);
}

/// The same with the client's re-handshake turned off: the rebind runs out and the client
/// fails (`Failed(RebindTimeout)`, as before the setting existed); the application
/// reconnects it.
#[test]
fn a_client_offline_across_two_rotations_fails_without_rehandshake() {
    const N: usize = 3;
    let mut w = connected(
        asleep(ClientConfig {
            rehandshake_after_failed_rebind: false,
            ..ClientConfig::default()
        }),
        N,
    );
    let (_, events_before, handshakes) = offline_across_two_rotations_then_move(&mut w, N);
    assert!(w.drive_until(Duration::from_secs(60), |w| matches!(
        w.client(0).core.state(),
        ClientState::Failed(_)
    )));
    assert_eq!(
        w.client(0).core.state(),
        ClientState::Failed(ClientError::RebindTimeout)
    );
    assert_eq!(
        w.client(0).events.last(),
        Some(&ClientEvent::Failed(ClientError::RebindTimeout))
    );
    assert!(
        !w.client(0).events[events_before..].iter().any(|e| matches!(
            e,
            ClientEvent::Reconnecting { .. } | ClientEvent::Connected { .. }
        ))
    );
    assert_eq!(w.client(0).core.stats().rehandshakes, 0);
    // Nothing more happens by itself.
    w.run_for(Duration::from_secs(30));
    assert_eq!(w.host.counters().handshakes_ok, handshakes);
    w.reconnect_client(0);
    assert!(
        w.drive_until(Duration::from_secs(5), |w| w.client(0).core.state()
            == ClientState::Connected)
    );
    echo(&mut w, 0, b"newest epoch");
    assert_eq!(w.host.counters().handshakes_ok, handshakes + 1);
}

/// Clients whose keepalive (200 s) outlasts the two rotations below: one offline sends
/// nothing, so it notices nothing until it comes back. (With the default 10 s keepalive
/// an offline client probes, its rebind runs out while it is still offline, and the
/// handshake that follows runs out too: `Failed(HandshakeTimeout)`.)
fn asleep(client: ClientConfig) -> SimConfig {
    SimConfig {
        client: ClientConfig {
            keepalive: Duration::from_secs(200),
            ..client
        },
        ..SimConfig::default()
    }
}

/// Client 0 of `n` goes offline across two rotations (60 s grace each), the others rebind
/// with their delivered keys, then client 0 comes back from a new tuple. Returns its
/// conn_id, how many events it had before coming back, and the host's handshake count
/// before.
fn offline_across_two_rotations_then_move(w: &mut World, n: usize) -> (u64, usize, u64) {
    let handshakes = w.host.counters().handshakes_ok;
    let old_conn = w.client(0).core.conn_id().unwrap();
    let away = w.client(0).tuple;
    w.drop_if(move |d| d.to == away || d.from == away);
    for k in 1..=2 {
        w.rotate_epoch_with_grace(w.cfg.epoch + k, Duration::from_secs(60));
        w.run_for(Duration::from_secs(61));
        assert!(w.gateway.shared.epochs().previous.is_none());
    }
    w.clear_drop();
    assert_eq!(w.host.counters().keys_acked, 2 * (n as u64 - 1));
    move_and_rebind(w, 1, n, 1, "clients that got their keys");
    let events_before = w.client(0).events.len();
    // Asleep, it never probed: it comes back with DATA (long enough to be answered with
    // an UNRECOGNIZED: the gateway never amplifies).
    assert_eq!(w.client(0).core.state(), ClientState::Connected);
    w.move_client(0);
    w.send(0, b"back from a long sleep");
    (old_conn, events_before, handshakes)
}

#[test]
fn deferred_registration_waits_for_the_store_and_handshakes_resume_when_it_returns() {
    let mut w = World::new(deferred(ms(2)));
    w.gateway.store_down = true;
    w.add_client();
    w.run_for(Duration::from_secs(2));
    // Every REGISTER is refused while the store is down: no connection, no index issued.
    assert_eq!(w.client(0).core.state(), ClientState::Handshaking);
    assert!(w.gateway.count(C::CommitUnavailable) >= 1);
    assert_eq!(w.gateway.shared.connections(), 0);
    w.gateway.store_down = false;
    assert!(
        w.drive_until(Duration::from_secs(30), |w| w.client(0).core.state()
            == ClientState::Connected),
        "connects once the store is back"
    );
    echo(&mut w, 0, b"registered through the store");
}

/// A gateway down across the end of its grace period, before it could send any key: it
/// comes back with the previous epoch (the store still says grace), ends the grace at its
/// first step (the deadline has passed) by moving every connection to the registration the
/// rotation made for it, releases nobody, and delivers the keys after grace; the clients
/// then rebind under the new epoch.
#[test]
fn restart_after_the_grace_deadline_ends_grace_at_once() {
    const N: usize = 3;
    let mut w = connected(SimConfig::default(), N);
    let old = w.cfg.epoch;
    w.rotate_epoch_with_grace(old + 1, Duration::from_secs(60));
    w.now = w.now.saturating_add(Duration::from_secs(61));
    w.restart_gateway();
    assert!(
        w.gateway.shared.epochs().previous.is_some(),
        "restored from the store"
    );
    w.run_for(ms(10));
    assert!(w.gateway.shared.epochs().previous.is_none());
    assert_eq!(w.gateway.shared.connections_per_epoch(), vec![(old + 1, N)]);
    assert_eq!(w.gateway.count(C::Expired), 0);
    assert!(w.gateway.persisted.keys().all(|(e, _)| *e == old + 1));
    assert_eq!(w.gateway.persisted_grace.0, 0);
    assert!(
        w.drive_until(Duration::from_secs(5), |w| keys_all_delivered(w, N, 0)),
        "keys delivered after grace"
    );
    move_all_and_rebind(&mut w, N, 1, "after grace");
}

/// Two rotations with a gateway restart between them (after the first grace): the second
/// delivery reaches every client too (each host numbers its KEYS on, each client takes the
/// higher `kseq`), and the clients rebind under the newest epoch.
#[test]
fn two_rotations_with_a_restart_between_deliver_both() {
    const N: usize = 4;
    let mut w = connected(SimConfig::default(), N);
    let e = w.cfg.epoch;
    w.rotate_epoch_with_grace(e + 1, Duration::from_secs(6));
    assert!(w.drive_until(Duration::from_secs(5), |w| keys_all_delivered(w, N, 0)));
    w.run_for(Duration::from_secs(7));
    w.restart_gateway();
    w.run_for(ms(100));
    w.rotate_epoch_with_grace(e + 2, Duration::from_secs(6));
    assert!(
        w.drive_until(Duration::from_secs(5), |w| keys_all_delivered(
            w, N, N as u64
        ))
    );
    w.run_for(Duration::from_secs(7));
    move_all_and_rebind(&mut w, N, 1, "after both rotations");
    assert!((0..N).all(|i| routed_epoch(&w, i) == Some((e + 2) as u8)));
}

/// A client that got the first rotation's keys but never used them (it did not move) and
/// misses the second rotation's: when it moves during the second grace period, the gateway
/// names the newest epoch, its own is gone, and it rebinds with the keys it was delivered
/// (the previous epoch's, still accepted), by itself.
#[test]
fn a_client_that_missed_the_second_delivery_rebinds_with_the_first_during_grace() {
    const N: usize = 2;
    let mut w = connected(SimConfig::default(), N);
    let handshakes = w.host.counters().handshakes_ok;
    let e = w.cfg.epoch;
    w.rotate_epoch_with_grace(e + 1, Duration::from_secs(6));
    assert!(w.drive_until(Duration::from_secs(5), |w| keys_all_delivered(w, N, 0)));
    w.run_for(Duration::from_secs(7));
    assert!(w.gateway.shared.epochs().previous.is_none());
    // Client 0 gets none of the second rotation's KEYS.
    let t0 = w.client(0).tuple;
    w.drop_if(move |d| d.to == t0 && d.data.first() == Some(&KEYS_TYPE));
    w.rotate_epoch_with_grace(e + 2, Duration::from_secs(6));
    w.run_for(Duration::from_secs(1));
    w.clear_drop();
    assert_eq!(w.client(0).core.stats().keys_installed, 1);
    move_all_and_rebind(&mut w, N, 1, "during the second grace");
    assert_eq!(routed_epoch(&w, 0), Some((e + 1) as u8));
    assert_eq!(routed_epoch(&w, 1), Some((e + 2) as u8));
    assert_eq!(w.host.counters().handshakes_ok, handshakes);
}
