//! The cluster registry against a real etcd (feature `cluster`; etcd from Debian's
//! `etcd-server`). Each test starts its own single-node etcd on free loopback ports in a
//! temporary directory. Without an `etcd` binary the tests print SKIPPED (and fail when
//! `REBINDGW_REQUIRE_TOOLS` is set, as in CI).
#![cfg(feature = "cluster")]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod etcd;
use etcd::{Etcd, start_etcd};

use rebindgw::cluster::etcd::{
    Committed, EpochRotated, EtcdRegistry, MAX_COMMITS_PER_TXN, RANGE_PAGE, Registered,
};
use rebindgw::cluster::mirror::{Applied, Change, Mirror};
use rebindgw::cluster::record::{ConnRecord, EpochRecord, GatewayId, RecordSeal, conn_key};
use rebindgw::cluster::sync::{
    ClusterHandle, ClusterSettings, Event, Refusal, Request, Response, RotateAnswer, StartError,
};
use rebindgw::keys::MasterSecret;
use rebindgw::rebind::RebindSecret;
use rebindgw::time::Ticks;

const PREFIX: &str = "/mesh/test";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn registry(etcd: &Etcd, me: GatewayId) -> EtcdRegistry {
    EtcdRegistry::connect(
        std::slice::from_ref(&etcd.endpoint),
        PREFIX,
        me,
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}

fn seal() -> RecordSeal {
    RecordSeal::new(&MasterSecret::from_bytes([5; 32]), PREFIX)
}

fn record(index: u32, owner: GatewayId, l: u64, tuple: &str) -> ConnRecord {
    let conn_id = 0xC000 + u64::from(index);
    ConnRecord {
        conn_id,
        secret: seal().seal(1, index, conn_id, &RebindSecret([index as u8; 32])),
        last_rebind: Ticks(l),
        host: 0,
        owner,
        tuple: Some(tuple.parse().unwrap()),
    }
}

/// Two gateways register 150 connections each at once, both starting their search at the
/// same hint: every index is issued exactly once, and each gateway's mirror (range read,
/// then the watch) ends with all 300.
#[test]
fn concurrent_registrations_never_share_an_index() {
    let Some(etcd) = start_etcd("registrations") else {
        return;
    };
    runtime().block_on(async {
        const EACH: u32 = 150;
        const CAPACITY: u32 = 1024;
        let register_all = |me: GatewayId| {
            let etcd = &etcd;
            async move {
                let mut reg = registry(etcd, me).await;
                let mut mirror = Mirror::new(PREFIX, me);
                reg.load(&mut mirror, Duration::from_secs(5)).await.unwrap();
                let (_w, mut stream) = reg.watch(mirror.revision()).await.unwrap();
                let mut mine = Vec::new();
                let mut taken = 0;
                let mut hint = 0;
                while mine.len() < EACH as usize {
                    // Catch up with what the other gateway wrote, without waiting for it.
                    while let Ok(Ok(Some(resp))) =
                        tokio::time::timeout(Duration::from_millis(1), stream.message()).await
                    {
                        let (changes, rev) = EtcdRegistry::changes(&resp);
                        for c in changes {
                            mirror.apply(c);
                        }
                        mirror.advance(rev);
                    }
                    let x = mirror.free_index(1, CAPACITY, hint).unwrap();
                    let rec = record(x, me, 1, "192.0.2.1:1000");
                    match reg.register(1, x, &rec).await.unwrap() {
                        Registered::Done { revision } => {
                            // What the gateway does with its own commits: apply them at
                            // once (the watch's copy of the event is then stale).
                            mirror.apply(Change::Put {
                                key: conn_key(PREFIX, 1, x).into_bytes(),
                                value: rec.encode(),
                                mod_revision: revision,
                            });
                            mine.push(x);
                        }
                        Registered::Taken => {
                            taken += 1;
                            hint = x + 1;
                        }
                    }
                }
                // Drain the watch until this mirror holds both gateways' connections.
                let deadline = Instant::now() + Duration::from_secs(10);
                while mirror.len() < 2 * EACH as usize {
                    assert!(Instant::now() < deadline, "mirror has {}", mirror.len());
                    if let Ok(Ok(Some(resp))) =
                        tokio::time::timeout(Duration::from_millis(200), stream.message()).await
                    {
                        let (changes, rev) = EtcdRegistry::changes(&resp);
                        for c in changes {
                            mirror.apply(c);
                        }
                        mirror.advance(rev);
                    }
                }
                (mine, taken, mirror)
            }
        };
        let ((a, taken_a, ma), (b, taken_b, mb)) = tokio::join!(register_all(1), register_all(2));
        let mut all: Vec<u32> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 2 * EACH as usize, "an index was issued twice");
        println!("collisions decided by etcd: gateway 1 {taken_a}, gateway 2 {taken_b}");
        for m in [&ma, &mb] {
            for x in &a {
                assert_eq!(m.get(1, *x).unwrap().record.owner, 1);
            }
            for x in &b {
                assert_eq!(m.get(1, *x).unwrap().record.owner, 2);
            }
        }
    });
}

/// The same REBIND accepted by three gateways at once: exactly one compare-and-swap
/// succeeds; the others learn the winner's record. The first owner's mirror reports the loss.
#[test]
fn one_rebind_sent_to_three_gateways_commits_once() {
    let Some(etcd) = start_etcd("cas") else {
        return;
    };
    runtime().block_on(async {
        let mut regs = [
            registry(&etcd, 1).await,
            registry(&etcd, 2).await,
            registry(&etcd, 3).await,
        ];
        let first = record(7, 1, 100, "192.0.2.1:1000");
        assert!(matches!(
            regs[0].register(1, 7, &first).await.unwrap(),
            Registered::Done { .. }
        ));
        let mut mirrors: Vec<Mirror> = (1..=3).map(|me| Mirror::new(PREFIX, me)).collect();
        for (reg, m) in regs.iter_mut().zip(mirrors.iter_mut()) {
            reg.load(m, Duration::from_secs(5)).await.unwrap();
        }
        let (_w, mut stream) = regs[0].watch(mirrors[0].revision()).await.unwrap();
        let expected = mirrors[1].get(1, 7).unwrap().mod_revision;
        let [r1, r2, r3] = &mut regs[..] else {
            unreachable!()
        };
        let moved = |owner| {
            let mut r = first.clone();
            r.last_rebind = Ticks(200);
            r.owner = owner;
            r.tuple = Some("198.51.100.9:5000".parse().unwrap());
            r
        };
        let (a, b, c) = (moved(1), moved(2), moved(3));
        let (o1, o2, o3) = tokio::join!(
            r1.commit(1, 7, expected, &a),
            r2.commit(1, 7, expected, &b),
            r3.commit(1, 7, expected, &c),
        );
        let outcomes = [o1.unwrap(), o2.unwrap(), o3.unwrap()];
        let winners: Vec<usize> = (0..3)
            .filter(|&i| matches!(outcomes[i], Committed::Done { .. }))
            .collect();
        assert_eq!(winners.len(), 1, "{outcomes:?}");
        let winner = winners[0] as GatewayId + 1;
        for o in &outcomes {
            if let Committed::Conflict { current } = o {
                let current = current.as_ref().expect("the record is still there");
                assert_eq!(current.record.owner, winner);
                assert_eq!(current.record.last_rebind, Ticks(200));
            }
        }
        // Gateway 1's watch shows the new owner; unless it won, it lost the connection.
        let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let (changes, _) = EtcdRegistry::changes(&resp);
        let applied: Vec<Applied> = changes.into_iter().map(|c| mirrors[0].apply(c)).collect();
        assert_eq!(
            applied,
            vec![Applied::Updated {
                epoch: 1,
                index: 7,
                owner_changed: winner != 1,
                lost: winner != 1,
            }]
        );
        // The sealed secret survived the rewrite and still opens at its key only.
        let stored = &mirrors[0].get(1, 7).unwrap().record;
        assert_eq!(seal().open(1, 7, stored).unwrap(), RebindSecret([7; 32]));
        // A commit against the old revision now fails even for the winner.
        assert!(matches!(
            regs[winner as usize - 1]
                .commit(1, 7, expected, &moved(winner))
                .await
                .unwrap(),
            Committed::Conflict { .. }
        ));
    });
}

/// Batched commits (one etcd transaction, a nested compare per REBIND): a stale compare
/// fails alone and learns the stored record, the others are written at the transaction's one
/// revision; a batch racing a single commit of one of its connections loses only that one.
#[test]
fn batched_commits_fail_alone() {
    let Some(etcd) = start_etcd("batch") else {
        return;
    };
    runtime().block_on(async {
        let mut r1 = registry(&etcd, 1).await;
        let mut r2 = registry(&etcd, 2).await;
        let n = MAX_COMMITS_PER_TXN as u32;
        for i in 0..n {
            let rec = record(i, 1, 100, "192.0.2.1:1000");
            assert!(matches!(
                r1.register(1, i, &rec).await.unwrap(),
                Registered::Done { .. }
            ));
        }
        let mut m = Mirror::new(PREFIX, 2);
        r2.load(&mut m, Duration::from_secs(5)).await.unwrap();
        // Gateway 1 moves connection 5 first: gateway 2's compare for it is now stale.
        let mut won = m.get(1, 5).unwrap().record.clone();
        won.last_rebind = Ticks(150);
        won.tuple = Some("203.0.113.5:5".parse().unwrap());
        let expected5 = m.get(1, 5).unwrap().mod_revision;
        assert!(matches!(
            r1.commit(1, 5, expected5, &won).await.unwrap(),
            Committed::Done { .. }
        ));
        let moved: Vec<ConnRecord> = (0..n)
            .map(|i| {
                let mut r = m.get(1, i).unwrap().record.clone();
                r.last_rebind = Ticks(200);
                r.owner = 2;
                r.tuple = Some(format!("198.51.100.{}:6000", i % 250).parse().unwrap());
                r
            })
            .collect();
        let commits: Vec<(u32, u32, i64, &ConnRecord)> = (0..n)
            .map(|i| (1, i, m.get(1, i).unwrap().mod_revision, &moved[i as usize]))
            .collect();
        let answers = r2.commit_many(&commits).await.unwrap();
        assert_eq!(answers.len(), n as usize);
        let mut revisions = std::collections::HashSet::new();
        for (i, a) in answers.iter().enumerate() {
            match a {
                Committed::Done { revision } if i != 5 => {
                    revisions.insert(*revision);
                }
                Committed::Conflict { current: Some(cur) } if i == 5 => {
                    assert_eq!(cur.record.owner, 1);
                    assert_eq!(cur.record.last_rebind, Ticks(150));
                }
                other => panic!("connection {i}: {other:?}"),
            }
        }
        assert_eq!(revisions.len(), 1, "one transaction, one revision");
        // What etcd holds: gateway 2's records, and gateway 1's for connection 5.
        let mut after = Mirror::new(PREFIX, 1);
        r1.load(&mut after, Duration::from_secs(5)).await.unwrap();
        for i in 0..n {
            let rec = &after.get(1, i).unwrap().record;
            let (owner, l) = if i == 5 { (1, 150) } else { (2, 200) };
            assert_eq!(
                (rec.owner, rec.last_rebind),
                (owner, Ticks(l)),
                "connection {i}"
            );
        }
    });
}

/// A registry larger than one gRPC message (4 MiB: 40,000 records of about 130 bytes) loads
/// whole, in pages, with no record lost or doubled at a page boundary.
#[test]
fn a_registry_larger_than_one_message_loads_in_pages() {
    let Some(etcd) = start_etcd("pages") else {
        return;
    };
    runtime().block_on(async {
        let mut r = registry(&etcd, 1).await;
        let n: u32 = 40_000;
        let records: Vec<ConnRecord> = (0..n)
            .map(|i| record(i, 1, 100, "192.0.2.1:1000"))
            .collect();
        for chunk in (0..n).collect::<Vec<_>>().chunks(MAX_COMMITS_PER_TXN) {
            let creates: Vec<(u32, u32, &ConnRecord)> = chunk
                .iter()
                .map(|&i| (1, i, &records[i as usize]))
                .collect();
            let answers = r.register_many(&creates).await.unwrap();
            assert!(answers.iter().all(|a| matches!(a, Registered::Done { .. })));
        }
        let (changes, revision) = r.read_all(Duration::from_secs(5)).await.unwrap();
        assert!(revision > 0);
        assert_eq!(changes.len(), n as usize);
        let mut m = Mirror::new(PREFIX, 2);
        r.load(&mut m, Duration::from_secs(5)).await.unwrap();
        assert_eq!(m.len(), n as usize);
        for i in [0, RANGE_PAGE as u32 - 1, RANGE_PAGE as u32, n - 1] {
            assert_eq!(m.get(1, i).unwrap().record.conn_id, 0xC000 + u64::from(i));
        }
    });
}

/// Batched registrations: an index another gateway created first is refused alone; the
/// rest are created at the transaction's one revision.
#[test]
fn batched_registrations_fail_alone() {
    let Some(etcd) = start_etcd("regbatch") else {
        return;
    };
    runtime().block_on(async {
        let mut r1 = registry(&etcd, 1).await;
        let mut r2 = registry(&etcd, 2).await;
        let taken = record(3, 1, 100, "192.0.2.1:1000");
        assert!(matches!(
            r1.register(1, 3, &taken).await.unwrap(),
            Registered::Done { .. }
        ));
        let mine: Vec<ConnRecord> = (0..8)
            .map(|i| record(i, 2, 100, "192.0.2.2:2000"))
            .collect();
        let creates: Vec<(u32, u32, &ConnRecord)> =
            (0..8u32).map(|i| (1, i, &mine[i as usize])).collect();
        let answers = r2.register_many(&creates).await.unwrap();
        let mut revisions = std::collections::HashSet::new();
        for (i, a) in answers.iter().enumerate() {
            match a {
                Registered::Taken => assert_eq!(i, 3),
                Registered::Done { revision } => {
                    assert_ne!(i, 3);
                    revisions.insert(*revision);
                }
            }
        }
        assert_eq!(revisions.len(), 1);
        let mut m = Mirror::new(PREFIX, 1);
        r1.load(&mut m, Duration::from_secs(5)).await.unwrap();
        for i in 0..8 {
            let owner = if i == 3 { 1 } else { 2 };
            assert_eq!(m.get(1, i).unwrap().record.owner, owner, "index {i}");
        }
    });
}

/// A gateway's announcement lives with its lease: a second gateway cannot take the id while
/// it lives, and the id is free again once the lease ends.
#[test]
fn gateway_ids_are_leased() {
    let Some(etcd) = start_etcd("lease") else {
        return;
    };
    runtime().block_on(async {
        let mut a = registry(&etcd, 4).await;
        let mut again = registry(&etcd, 4).await;
        let lease = a.announce(Duration::from_secs(5)).await.unwrap().unwrap();
        a.keep_alive(lease).await.unwrap();
        assert_eq!(a.gateways().await.unwrap(), vec![4]);
        assert_eq!(again.announce(Duration::from_secs(5)).await.unwrap(), None);
        a.leave(lease).await.unwrap();
        assert_eq!(a.gateways().await.unwrap(), Vec::<GatewayId>::new());
        assert!(
            again
                .announce(Duration::from_secs(5))
                .await
                .unwrap()
                .is_some()
        );
    });
}

// ---- the gateway's link (cluster::sync) ----

fn settings(etcd: &Etcd, gateway: GatewayId) -> ClusterSettings {
    ClusterSettings {
        endpoints: vec![etcd.endpoint.clone()],
        name: "test".into(),
        gateway,
        lease_ttl: Duration::from_secs(3),
        timeout: Duration::from_secs(1),
        epoch: 1,
    }
}

fn link(etcd: &Etcd, gateway: GatewayId) -> ClusterHandle {
    ClusterHandle::start(settings(etcd, gateway), &MasterSecret::from_bytes([5; 32])).unwrap()
}

fn response(h: &ClusterHandle) -> Response {
    h.responses
        .recv_timeout(Duration::from_secs(10))
        .expect("a response within 10 s")
}

/// Events until `until` says stop (or 10 s pass).
fn events_until(h: &ClusterHandle, mut until: impl FnMut(&Event) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(ev) = h.events.recv_timeout(Duration::from_millis(100)) {
            let done = until(&ev);
            seen.push(ev);
            if done {
                return seen;
            }
        }
    }
    panic!("events so far: {seen:?}");
}

fn register(h: &ClusterHandle, ticket: u64, tuple: &str) -> u32 {
    h.submit(Request::Register {
        ticket,
        epoch: 1,
        capacity: 4096,
        conn_id: 0xA000 + ticket,
        secret: RebindSecret([ticket as u8; 32]),
        host: 0,
        tuple: Some(tuple.parse().unwrap()),
        now: Ticks(1_000),
    });
    match response(h) {
        Response::Registered {
            ticket: t, index, ..
        } if t == ticket => index,
        r => panic!("{r:?}"),
    }
}

/// Two links register bursts at once (batched) into a small index space that they nearly
/// fill: every registration ends with an index of its own (one that collides searches again
/// alone), and none is issued twice.
#[test]
fn burst_registrations_of_two_links_stay_unique() {
    let Some(etcd) = start_etcd("burst") else {
        return;
    };
    let a = link(&etcd, 1);
    let b = link(&etcd, 2);
    events_until(&a, |e| matches!(e, Event::Up { .. }));
    events_until(&b, |e| matches!(e, Event::Up { .. }));
    for ticket in 0..30u64 {
        for (h, t) in [(&a, ticket), (&b, 1000 + ticket)] {
            h.submit(Request::Register {
                ticket: t,
                epoch: 1,
                capacity: 64,
                conn_id: 0xB000 + t,
                secret: RebindSecret([t as u8; 32]),
                host: 0,
                tuple: Some("192.0.2.9:9".parse().unwrap()),
                now: Ticks(1_000),
            });
        }
    }
    let mut indices = Vec::new();
    for h in [&a, &b] {
        for _ in 0..30 {
            match response(h) {
                Response::Registered { index, .. } => indices.push(index),
                r => panic!("{r:?}"),
            }
        }
    }
    let all = indices.len();
    indices.sort_unstable();
    indices.dedup();
    assert_eq!((all, indices.len()), (60, 60), "an index issued twice");
    let collisions = a.counters.register_collisions.load(Ordering::Relaxed)
        + b.counters.register_collisions.load(Ordering::Relaxed);
    println!("burst registrations: {collisions} collisions decided by etcd");
}

/// Two gateways' links: registrations are unique and seen by the other; a REBIND committed by
/// one is reported to the first owner as lost; the §6 duplicate and stale REBINDs are told
/// apart; two gateways racing on one connection commit once.
#[test]
fn links_commit_once_and_tell_each_other() {
    let Some(etcd) = start_etcd("link") else {
        return;
    };
    let a = link(&etcd, 1);
    let b = link(&etcd, 2);
    events_until(&a, |e| matches!(e, Event::Up { .. }));
    events_until(&b, |e| matches!(e, Event::Up { .. }));
    let mut indices: Vec<u32> = (0..20).map(|t| register(&a, t, "192.0.2.1:1000")).collect();
    indices.sort_unstable();
    indices.dedup();
    assert_eq!(indices.len(), 20);
    let mut added = 0;
    events_until(&b, |e| {
        if let Event::Changed {
            applied: Applied::Added { .. },
            entry: Some(entry),
        } = e
        {
            assert_eq!(entry.record.owner, 1);
            added += 1;
        }
        added == 20
    });

    // Gateway 2 commits a REBIND of one of gateway 1's connections.
    let x = indices[0];
    let moved: SocketAddr = "198.51.100.2:2000".parse().unwrap();
    let rebind = |ticket, t, tuple| Request::Rebind {
        ticket,
        epoch: 1,
        index: x,
        t: Ticks(t),
        tuple,
    };
    b.submit(rebind(100, 2_000, moved));
    assert!(matches!(
        response(&b),
        Response::Rebound { ticket: 100, old: Some(old), .. } if old == "192.0.2.1:1000".parse().unwrap()
    ));
    events_until(
        &a,
        |e| matches!(e, Event::Changed { applied: Applied::Updated { index, lost: true, .. }, .. } if *index == x),
    );
    b.submit(rebind(101, 2_000, moved));
    assert_eq!(response(&b), Response::Duplicate { ticket: 101 });
    a.submit(rebind(102, 1_500, "203.0.113.1:1".parse().unwrap()));
    assert_eq!(
        response(&a),
        Response::Refused {
            ticket: 102,
            why: Refusal::Stale
        }
    );

    // Both accept a REBIND of another connection at once: one commit.
    let y = indices[1];
    for (h, ticket, tuple) in [(&a, 200, "203.0.113.7:7"), (&b, 201, "203.0.113.8:8")] {
        h.submit(Request::Rebind {
            ticket,
            epoch: 1,
            index: y,
            t: Ticks(3_000),
            tuple: tuple.parse().unwrap(),
        });
    }
    let outcomes = [response(&a), response(&b)];
    let won = outcomes
        .iter()
        .filter(|r| matches!(r, Response::Rebound { .. }))
        .count();
    assert_eq!(won, 1, "{outcomes:?}");
    for r in &outcomes {
        assert!(
            matches!(
                r,
                Response::Rebound { .. }
                    | Response::Refused {
                        why: Refusal::Conflict | Refusal::Stale,
                        ..
                    }
            ),
            "{r:?}"
        );
    }
    a.shutdown();
    b.shutdown();
}

/// With etcd down, requests are refused (never accepted without a commit); when it returns,
/// the link reloads and commits again.
#[test]
fn link_refuses_while_etcd_is_down_and_resumes() {
    let Some(mut etcd) = start_etcd("down") else {
        return;
    };
    let a = link(&etcd, 1);
    events_until(&a, |e| matches!(e, Event::Up { .. }));
    let x = register(&a, 1, "192.0.2.1:1000");
    etcd.stop();
    events_until(&a, |e| matches!(e, Event::Down { .. }));
    let started = Instant::now();
    a.submit(Request::Rebind {
        ticket: 2,
        epoch: 1,
        index: x,
        t: Ticks(5_000),
        tuple: "198.51.100.1:1".parse().unwrap(),
    });
    assert!(matches!(
        response(&a),
        Response::Refused {
            ticket: 2,
            why: Refusal::Unavailable(_)
        }
    ));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    etcd.start();
    let seen = events_until(&a, |e| matches!(e, Event::Up { .. }));
    assert!(matches!(seen.last(), Some(Event::Up { records: 1 })));
    a.submit(Request::Rebind {
        ticket: 3,
        epoch: 1,
        index: x,
        t: Ticks(6_000),
        tuple: "198.51.100.1:1".parse().unwrap(),
    });
    assert!(matches!(response(&a), Response::Rebound { ticket: 3, .. }));
    assert!(
        a.counters
            .unavailable
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert!(
        a.counters
            .reloads
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    a.shutdown();
}

/// A REBIND commit that etcd does not answer in time (frozen for 1.5 s, longer than the
/// 1 s operation timeout: what a leader election does) is tried again and commits; one that
/// stays unanswered past its budget (three timeouts) is refused as unavailable.
#[test]
fn a_commit_outlasts_a_short_etcd_stall() {
    let Some(etcd) = start_etcd("stall") else {
        return;
    };
    let a = link(&etcd, 1);
    events_until(&a, |e| matches!(e, Event::Up { .. }));
    let x = register(&a, 1, "192.0.2.1:1000");
    let rebind = |ticket, t| Request::Rebind {
        ticket,
        epoch: 1,
        index: x,
        t: Ticks(t),
        tuple: "198.51.100.1:1".parse().unwrap(),
    };
    etcd.freeze(true);
    let started = Instant::now();
    a.submit(rebind(2, 5_000));
    std::thread::sleep(Duration::from_millis(1500));
    etcd.freeze(false);
    let r = response(&a);
    assert!(matches!(r, Response::Rebound { ticket: 2, .. }), "{r:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    let retries = a
        .counters
        .commit_retries
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(retries >= 1, "retried {retries} times");
    assert_eq!(
        a.counters
            .unavailable
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    etcd.freeze(true);
    let started = Instant::now();
    a.submit(rebind(3, 6_000));
    let r = a
        .responses
        .recv_timeout(Duration::from_secs(6))
        .expect("an answer within the budget");
    etcd.freeze(false);
    assert!(
        matches!(
            r,
            Response::Refused {
                ticket: 3,
                why: Refusal::Unavailable(_)
            }
        ),
        "{r:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_millis(4500),
        "refused after {took:?}"
    );
    a.shutdown();
}

/// A second gateway with a live gateway's id is refused with a clear error; after a clean
/// shutdown the id is free at once.
#[test]
fn a_gateway_id_in_use_is_refused() {
    let Some(etcd) = start_etcd("ids") else {
        return;
    };
    let a = link(&etcd, 9);
    let err = ClusterHandle::start(settings(&etcd, 9), &MasterSecret::from_bytes([5; 32]))
        .err()
        .expect("id in use");
    assert!(matches!(err, StartError::IdInUse(9)), "{err}");
    assert!(err.to_string().contains("gateway id 9"), "{err}");
    a.shutdown();
    ClusterHandle::start(settings(&etcd, 9), &MasterSecret::from_bytes([5; 32])).unwrap();
}

/// Two gateways rotate the same epoch at the same instant, through their links and then
/// straight on the registry: each time exactly one transaction wins and the loser gets the
/// winner's record back; the stored record reads back as written; both links' watches report
/// it; a rotation during its grace period needs force; and both gateways registering their
/// connections in the new epoch at once never share an index.
#[test]
fn racing_rotations_of_one_epoch_commit_once() {
    let Some(etcd) = start_etcd("rotate_race") else {
        return;
    };
    let a = link(&etcd, 1);
    let b = link(&etcd, 2);
    events_until(&a, |e| matches!(e, Event::Up { .. }));
    events_until(&b, |e| matches!(e, Event::Up { .. }));
    assert_eq!(a.epoch_record, EpochRecord::first(1));
    assert_eq!(b.epoch_record, EpochRecord::first(1));

    // Both links propose rotating epoch 1 at once.
    let now_ms = Ticks::wall_clock().unix_ms();
    let (ta, ra) = std::sync::mpsc::channel();
    let (tb, rb) = std::sync::mpsc::channel();
    for (h, answer) in [(&a, ta), (&b, tb)] {
        h.submit(Request::Rotate {
            from: 1,
            force: false,
            now_ms,
            grace_ms: 60_000,
            answer,
        });
    }
    let answers = [
        ra.recv_timeout(Duration::from_secs(10)).unwrap(),
        rb.recv_timeout(Duration::from_secs(10)).unwrap(),
    ];
    let won: Vec<&EpochRecord> = answers
        .iter()
        .filter_map(|x| match x {
            RotateAnswer::Rotated(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(won.len(), 1, "exactly one rotation wins: {answers:?}");
    let winner = *won[0];
    assert_eq!(
        winner,
        EpochRecord {
            current: 2,
            previous: Some(1),
            grace_until_ms: now_ms + 60_000,
            rotated_at_ms: now_ms,
        }
    );
    assert!(
        answers.contains(&RotateAnswer::Lost(winner)),
        "the loser reports the winner's record: {answers:?}"
    );
    // Both watches report the new record, once.
    for h in [&a, &b] {
        let seen = events_until(h, |e| matches!(e, Event::Epoch { .. }));
        assert!(matches!(seen.last(), Some(Event::Epoch { record }) if *record == winner));
    }
    // A second rotation of epoch 1 (a late timer) is refused: the epoch moved on.
    let (t, r) = std::sync::mpsc::channel();
    a.submit(Request::Rotate {
        from: 1,
        force: true,
        now_ms,
        grace_ms: 60_000,
        answer: t,
    });
    assert_eq!(
        r.recv_timeout(Duration::from_secs(10)).unwrap(),
        RotateAnswer::Lost(winner)
    );
    // Rotating epoch 2 during epoch 1's grace needs force.
    let (t, r) = std::sync::mpsc::channel();
    b.submit(Request::Rotate {
        from: 2,
        force: false,
        now_ms: now_ms + 1_000,
        grace_ms: 60_000,
        answer: t,
    });
    assert_eq!(
        r.recv_timeout(Duration::from_secs(10)).unwrap(),
        RotateAnswer::InGrace {
            previous: 1,
            left_ms: 59_000
        }
    );

    // The connections each gateway owned, registered in epoch 2 by both at once (batched,
    // create-if-absent): every index issued once.
    const EACH: u64 = 40;
    for (h, base) in [(&a, 0u64), (&b, 1_000)] {
        for i in 0..EACH {
            h.submit(Request::Register {
                ticket: base + i,
                epoch: 2,
                capacity: 4096,
                conn_id: 0xE000 + base + i,
                secret: RebindSecret([i as u8; 32]),
                host: 0,
                tuple: None,
                now: Ticks(0),
            });
        }
    }
    let mut indices = Vec::new();
    for h in [&a, &b] {
        for _ in 0..EACH {
            match response(h) {
                Response::Registered { index, .. } => indices.push(index),
                r => panic!("{r:?}"),
            }
        }
    }
    let mut unique = indices.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 2 * EACH as usize, "no index issued twice");

    runtime().block_on(async {
        let links = |me| {
            EtcdRegistry::connect(
                std::slice::from_ref(&etcd.endpoint),
                "/rebindgw/test",
                me,
                Duration::from_secs(5),
            )
        };
        let mut reg = links(3).await.unwrap();
        // The stored record reads back as written.
        let (stored, rev) = reg.read_epoch().await.unwrap();
        assert_eq!(stored, winner);
        // Straight on the registry: two rotations on the same read revision, one wins.
        let next = stored.next(now_ms + 2_000, 1_000);
        let mut other = links(4).await.unwrap();
        let (x, y) = tokio::join!(reg.rotate_epoch(rev, &next), other.rotate_epoch(rev, &next));
        let outcomes = [x.unwrap(), y.unwrap()];
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| matches!(o, EpochRotated::Won { .. }))
                .count(),
            1,
            "{outcomes:?}"
        );
        assert!(
            outcomes
                .iter()
                .any(|o| matches!(o, EpochRotated::Lost { current, .. } if *current == next))
        );
        assert_eq!(reg.read_epoch().await.unwrap().0, next);
        // Epoch 2's records: 80, at distinct keys.
        let (changes, _) = reg.read_all(Duration::from_secs(5)).await.unwrap();
        let mut mirror = Mirror::new("/rebindgw/test", 3);
        mirror.reload(changes, 0);
        assert_eq!(mirror.iter().filter(|((e, _), _)| *e == 2).count(), 80);
    });
    a.shutdown();
    b.shutdown();
}
