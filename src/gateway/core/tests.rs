use super::*;
use crate::crypto::gcm::SessionGcm;
use crate::engine::{Backend, TrialKeys};
use crate::gateway::store::{StoreOp, StoredConn};
use crate::hostlink::{self, Control as LinkMsg, LinkKey, LinkType, RegisterFailure};
use crate::keys::{EpochKeys, MasterSecret};
use crate::rebind::{RebindCredentials, RebindSecret, build_rebind, cookie_request, fresh_nonces};
use crate::registry::RegistryError;
use crate::time::TICKS_PER_SECOND;
use crate::wire::{HANDSHAKE_LEN, Unrecognized};
use crate::wire::{RebindAckView, rebind_len};
use crossbeam::channel::Sender;
use proptest::prelude::*;

const S: usize = 8;
const T0: u64 = 639_028_224_000_000_000;

struct Harness {
    shared: Arc<Shared>,
    worker: WorkerCore,
    host_addr: SocketAddr,
    link: Gcm,
    now: Ticks,
    tx: TxQueue,
}

/// What a client learned from REGISTERED.
struct Issued {
    conn_id: u64,
    secret: RebindSecret,
    keys: Vec<[u8; 16]>,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

impl Harness {
    fn new(cfg: CoreConfig) -> Harness {
        Harness::with_hosts(cfg, &[])
    }

    /// Host 0 is `host_addr` with `link`; `more` are further hosts.
    fn with_hosts(cfg: CoreConfig, more: &[(SocketAddr, LinkKey)]) -> Harness {
        Harness::build(cfg, more, None)
    }

    fn build(
        cfg: CoreConfig,
        more: &[(SocketAddr, LinkKey)],
        store: Option<Sender<StoreOp>>,
    ) -> Harness {
        let keys = EpochKeys::derive(&MasterSecret::from_bytes([5; 32]), 3, cfg.slots).unwrap();
        let trial = TrialKeys::new(Backend::Portable, keys.slot_key_pairs()).unwrap();
        let host_addr = addr("127.0.0.1:7000");
        let key = LinkKey([9; 16]);
        let mut hosts = vec![HostPeer::new(host_addr, &key)];
        for (a, k) in more {
            hosts.push(HostPeer::new(*a, k));
        }
        let shared = Shared::new(cfg, EpochCrypto { keys, trial }, hosts, store);
        let worker = WorkerCore::new(0, shared.clone(), &[false, true]);
        Harness {
            shared,
            worker,
            host_addr,
            link: key.cipher(),
            now: Ticks(T0),
            tx: TxQueue::new(256),
        }
    }

    fn default() -> Harness {
        Harness::new(CoreConfig::new(S))
    }

    /// Feeds datagrams and returns what the core queued.
    fn feed(&mut self, batch: &[(Via, SocketAddr, &[u8])]) -> Vec<(Via, SocketAddr, Vec<u8>)> {
        let rx: Vec<Rx<'_>> = batch
            .iter()
            .map(|(via, from, data)| Rx {
                via: *via,
                from: *from,
                data,
            })
            .collect();
        self.worker.handle_batch(self.now, &rx, &mut self.tx);
        let out = self
            .tx
            .iter()
            .map(|(m, b)| (m.via, m.to, b.to_vec()))
            .collect();
        self.tx.clear();
        out
    }

    /// Runs the worker's timer and returns what it queued.
    fn tick(&mut self) -> Vec<(Via, SocketAddr, Vec<u8>)> {
        self.worker.tick(self.now, &mut self.tx);
        let out = self
            .tx
            .iter()
            .map(|(m, b)| (m.via, m.to, b.to_vec()))
            .collect();
        self.tx.clear();
        out
    }

    fn client(&mut self, from: SocketAddr, data: &[u8]) -> Vec<(Via, SocketAddr, Vec<u8>)> {
        let via = Via::Client(u8::from(from.is_ipv6()));
        self.feed(&[(via, from, data)])
    }

    fn register(&mut self, conn_id: u64, client: SocketAddr) -> Issued {
        let msg = LinkMsg::Register {
            boot: 1,
            request: conn_id,
            conn_id,
            client,
        }
        .seal(&self.link, self.now);
        let mut out = self.feed(&[(Via::Host, self.host_addr, &msg)]);
        if out.is_empty()
            && let Some(req) = self.worker.poll_registration()
        {
            // Deferred: a store that gives the next index.
            let index = self.shared.connections() as u32;
            let result = RegisterResult::Registered { index };
            self.worker
                .handle_registration(self.now, req.ticket, result, &mut self.tx);
            out = self
                .tx
                .iter()
                .map(|(m, b)| (m.via, m.to, b.to_vec()))
                .collect();
            self.tx.clear();
        }
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0, out[0].1), (Via::Host, self.host_addr));
        match &LinkMsg::open(&out[0].2, &self.link, self.now).unwrap() {
            LinkMsg::Registered {
                conn_id: c,
                rebind_secret,
                slot_keys,
                ..
            } => {
                assert_eq!(*c, conn_id);
                Issued {
                    conn_id,
                    secret: RebindSecret(*rebind_secret),
                    keys: slot_keys.clone(),
                }
            }
            other => panic!("expected REGISTERED, got {other:?}"),
        }
    }

    fn count(&self, c: C) -> u64 {
        self.worker.metrics().get(c)
    }
}

fn data(n: usize) -> Vec<u8> {
    let mut d = vec![0xAB; n];
    d[0] = b'D';
    d
}

/// Builds a REBIND from an UNRECOGNIZED the core sent.
fn rebind_from(issued: &Issued, unrecognized: &[u8]) -> (Vec<u8>, SessionGcm) {
    let u = Unrecognized::parse(unrecognized).unwrap();
    let creds = RebindCredentials {
        conn_id: issued.conn_id,
        secret: &issued.secret,
        slot_keys: &issued.keys,
    };
    build_rebind(&creds, u.epoch_byte, u.t, &u.cookie, &fresh_nonces(S))
}

#[test]
fn fast_path_both_directions() {
    let mut h = Harness::default();
    let a = addr("10.0.0.1:4000");
    h.register(77, a);
    let out = h.client(a, &data(60));
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].0, out[0].1), (Via::Host, h.host_addr));
    assert_eq!(
        hostlink::parse_conn_data(&out[0].2).unwrap(),
        (77, &data(60)[..])
    );

    let mut back = [0u8; 100];
    let n = hostlink::emit_conn_data(LinkType::ToClientData, 77, &data(40), &mut back);
    let host = h.host_addr;
    let out = h.feed(&[(Via::Host, host, &back[..n])]);
    assert_eq!(out, vec![(Via::Client(0), a, data(40))]);

    // Unknown conn_id from the host: no route.
    let n = hostlink::emit_conn_data(LinkType::ToClientData, 78, &data(40), &mut back);
    assert!(h.feed(&[(Via::Host, host, &back[..n])]).is_empty());
    assert_eq!(h.count(C::DropNoRoute), 1);
}

#[test]
fn unknown_tuple_gets_unrecognized_never_larger_than_trigger() {
    let mut h = Harness::default();
    let v4 = addr("10.0.0.1:4000");
    let v6 = addr("[2001:db8::1]:4000");
    assert!(h.client(v4, &data(32)).is_empty(), "32 < 33 bytes");
    let out = h.client(v4, &data(33));
    assert_eq!(out.len(), 1);
    let u = Unrecognized::parse(&out[0].2).unwrap();
    assert_eq!((u.observed, u.t, u.epoch_byte), (v4, h.now, 3));
    assert!(h.client(v6, &data(44)).is_empty(), "44 < 45 bytes");
    let out = h.client(v6, &data(45));
    assert_eq!(out[0].2.len(), 45);
    assert_eq!(out[0].0, Via::Client(1));
    assert_eq!(h.count(C::UnrecognizedSmall), 2);
    for (_, _, reply) in h.client(v4, &data(49)) {
        assert!(reply.len() <= 49);
    }
}

#[test]
fn tuple_change_then_rebind_then_replay_and_duplicate() {
    let mut h = Harness::default();
    let old = addr("10.0.0.1:4000");
    let new = addr("10.0.0.9:5555");
    let issued = h.register(42, old);
    h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
    let u = h.client(new, &data(49));
    let (rebind, session) = rebind_from(&issued, &u[0].2);
    let out = h.client(new, &rebind);
    // REBIND_ACK to the client and REBOUND to the host.
    let ack = out.iter().find(|(v, _, _)| *v == Via::Client(0)).unwrap();
    assert_eq!(ack.1, new);
    assert_eq!(
        RebindAckView::new_checked(&ack.2).unwrap().open(&session),
        Ok(42)
    );
    let rebound = out.iter().find(|(v, _, _)| *v == Via::Host).unwrap();
    match LinkMsg::open(&rebound.2, &h.link, h.now).unwrap() {
        LinkMsg::Rebound {
            conn_id,
            old: o,
            new: n,
            ..
        } => {
            assert_eq!((conn_id, o, n), (42, Some(old), new));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.shared.tuples.get(&new).unwrap().conn_id, 42);
    assert!(h.shared.tuples.get(&old).is_none());
    assert_eq!(h.shared.conns.get(42).unwrap().tuple, Some(new));

    // The same REBIND again from the same tuple: a duplicate, the same ACK.
    let again = h.client(new, &rebind);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].2, ack.2);
    assert_eq!(h.count(C::RebindDuplicate), 1);

    // Replayed from another tuple: the cookie binds the tuple.
    let thief = addr("10.6.6.6:6666");
    let out = h.client(thief, &rebind);
    assert!(
        out.iter()
            .all(|(_, _, b)| b[0] == MsgType::Unrecognized as u8)
    );
    assert_eq!(h.count(C::RejectCookie), 1);
    assert!(h.shared.tuples.get(&thief).is_none());

    // Replayed from the old tuple after moving back is stale by L.
    h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
    let u = h.client(old, &data(49));
    let (back, _) = rebind_from(&issued, &u[0].2);
    assert!(
        h.client(old, &back)
            .iter()
            .any(|(v, _, _)| *v == Via::Client(0))
    );
    assert!(
        h.client(new, &rebind).is_empty(),
        "t == L from another tuple"
    );
    assert_eq!(h.count(C::RejectReplay), 1);
    assert_eq!(h.count(C::RebindAccepted), 2);
}

#[test]
fn tuple_handed_on_by_nat_moves_to_rebinding_connection() {
    let mut h = Harness::default();
    let a = addr("10.0.0.1:4000");
    let b = addr("10.0.0.2:4000");
    let first = h.register(1, a);
    h.register(2, b);
    // The NAT gives connection 1's client the tuple b; its DATA would reach host as conn 2,
    // so it sends a cookie request.
    let u = h.client(b, &cookie_request(S));
    assert_eq!(u.len(), 1, "cookie request draws an UNRECOGNIZED");
    assert_eq!(h.count(C::CookieRequest), 1);
    assert_eq!(h.count(C::RejectEpoch), 0);
    let (rebind, _) = rebind_from(&first, &u[0].2);
    assert!(!h.client(b, &rebind).is_empty());
    assert_eq!(h.shared.tuples.get(&b).unwrap().conn_id, 1);
    assert!(h.shared.tuples.get(&a).is_none());
    assert_eq!(
        h.shared.conns.get(2).unwrap().tuple,
        None,
        "connection 2 lost its tuple"
    );
    assert_eq!(h.count(C::TupleTakenOver), 1);
}

#[test]
fn batch_of_rebinds_with_garbage_and_forgeries() {
    let mut h = Harness::default();
    let mut issued = Vec::new();
    for i in 0..20u64 {
        issued.push(h.register(100 + i, SocketAddr::from(([10, 0, 1, i as u8], 1000))));
    }
    h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
    let mut good = Vec::new();
    let mut batch_bytes = Vec::new();
    for (i, iss) in issued.iter().enumerate() {
        let from = SocketAddr::from(([10, 0, 2, i as u8], 2000));
        let u = h.client(from, &data(49));
        let (mut r, _) = rebind_from(iss, &u[0].2);
        if i % 3 == 1 {
            let last = r.len() - 1;
            r[last] ^= 1; // AEAD fails
        } else if i % 3 == 2 {
            r[40] ^= 0x80; // a slot breaks
        } else {
            good.push(from);
        }
        batch_bytes.push((from, r));
    }
    let mut garbage = vec![0x5Au8; rebind_len(S)];
    garbage[0] = b'R';
    let gfrom = addr("10.9.9.9:9");
    let mut feed: Vec<(Via, SocketAddr, &[u8])> = batch_bytes
        .iter()
        .map(|(f, r)| (Via::Client(0), *f, &r[..]))
        .collect();
    feed.push((Via::Client(0), gfrom, &garbage));
    let out = h.feed(&feed);
    let acks = out
        .iter()
        .filter(|(_, _, b)| b[0] == MsgType::RebindAck as u8)
        .count();
    assert_eq!(acks, good.len());
    assert_eq!(h.count(C::RebindAccepted), good.len() as u64);
    assert_eq!(h.count(C::RejectAead), 7);
    assert_eq!(h.count(C::RejectTrial), 6);
    assert_eq!(
        h.count(C::RejectEpoch) + h.count(C::RejectStale) + h.count(C::RejectCookie),
        1
    );
    for g in good {
        assert!(h.shared.tuples.get(&g).is_some());
    }
}

#[test]
fn unrecognized_rate_limits_hold() {
    // Per prefix: one /24, so no hash collision can blur the count.
    let mut cfg = CoreConfig::new(S);
    cfg.unrecognized_prefix = Rate::new(1.0, 10.0);
    let mut h = Harness::new(cfg);
    let sent = (0..50u16)
        .filter(|p| {
            !h.client(SocketAddr::from(([10, 0, 0, 1], *p)), &data(49))
                .is_empty()
        })
        .count();
    assert_eq!(sent, 10, "per-/24 burst");
    assert_eq!(h.count(C::UnrecognizedPrefixRate), 40);
    assert!(
        !h.client(SocketAddr::from(([10, 0, 1, 1], 1)), &data(49))
            .is_empty()
            || h.count(C::UnrecognizedPrefixRate) == 41,
        "another /24 has its own bucket unless it shares the slot"
    );

    // Globally: every source in its own /24.
    let mut cfg = CoreConfig::new(S);
    cfg.unrecognized_global = Rate::new(1.0, 25.0);
    let mut h = Harness::new(cfg);
    let sent = (0..50u8)
        .filter(|i| {
            !h.client(SocketAddr::from(([10, *i, 7, 1], 1)), &data(49))
                .is_empty()
        })
        .count();
    assert_eq!(sent, 25, "the global burst");
    assert_eq!(h.count(C::UnrecognizedGlobalRate), 25);
}

#[test]
fn a_reload_takes_effect_at_the_next_batch() {
    let mut cfg = CoreConfig::new(S);
    cfg.handshake_prefix = Rate::new(1.0, 1.0);
    let mut h = Harness::new(cfg);
    let a = addr("10.0.0.1:4000");
    let mut hs = vec![0u8; HANDSHAKE_LEN];
    hs[0] = b'H';
    let host2 = addr("127.0.0.1:7001");
    let mut buf = [0u8; 64];
    let n = hostlink::emit_conn_data(LinkType::ToClientData, 77, b"x", &mut buf);
    h.feed(&[(Via::Host, host2, &buf[..n])]);
    assert_eq!(h.count(C::DropHostBadSource), 1, "host2 is not a host yet");

    let old = h.shared.live();
    let mut rates = old.rates;
    rates.handshake_prefix = Rate::new(50.0, 100.0);
    h.shared.set_live(Live {
        hosts: vec![
            HostPeer::new(h.host_addr, &LinkKey([9; 16])),
            HostPeer::new(host2, &LinkKey([10; 16])),
        ],
        rates,
    });
    h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
    let forwarded = (0..10).filter(|_| !h.client(a, &hs).is_empty()).count();
    assert_eq!(forwarded, 10, "1/s would have allowed 1");
    h.feed(&[(Via::Host, host2, &buf[..n])]);
    assert_eq!(h.count(C::DropHostBadSource), 1, "host2 is a host now");
    assert_eq!(h.count(C::DropNoRoute), 1);
}

#[test]
fn handshakes_forwarded_when_padded_and_rate_limited() {
    let mut cfg = CoreConfig::new(S);
    cfg.handshake_prefix = Rate::new(1.0, 3.0);
    let mut h = Harness::new(cfg);
    let a = addr("10.0.0.1:4000");
    // Protocol 1.1 pads to 640 bytes: one byte less, or a 1.0-sized 256, is dropped.
    let mut hs = vec![0u8; 640];
    hs[0] = b'H';
    assert!(h.client(a, &hs[..639]).is_empty());
    assert!(h.client(a, &hs[..256]).is_empty());
    let out = h.client(a, &hs);
    let framed = hostlink::verify_handshake(&LinkKey([9; 16]).handshake_mac(), &out[0].2);
    assert_eq!(
        hostlink::parse_tuple_data(framed.unwrap()).unwrap(),
        (a, &hs[..])
    );
    h.client(a, &hs);
    h.client(a, &hs);
    assert!(h.client(a, &hs).is_empty());
    assert_eq!(h.count(C::HandshakeForwarded), 3);
    assert_eq!(
        (h.count(C::HandshakeShort), h.count(C::HandshakeRate)),
        (2, 1)
    );
    // The host's reply is relayed to the tuple, but only if it is a HANDSHAKE_REPLY.
    let mut buf = [0u8; 400];
    let n = hostlink::emit_tuple_data(LinkType::ToClientReply, &a, b"hreply", &mut buf);
    let host = h.host_addr;
    assert_eq!(
        h.feed(&[(Via::Host, host, &buf[..n])]),
        vec![(Via::Client(0), a, b"hreply".to_vec())]
    );
    let n = hostlink::emit_tuple_data(LinkType::ToClientReply, &a, b"Dsneaky", &mut buf);
    assert!(h.feed(&[(Via::Host, host, &buf[..n])]).is_empty());
}

#[test]
fn host_link_checks_source_tag_and_duplicates() {
    let mut h = Harness::default();
    let a = addr("10.0.0.1:4000");
    let msg = LinkMsg::Register {
        boot: 1,
        request: 1,
        conn_id: 5,
        client: a,
    };
    let good = msg.seal(&h.link, h.now);
    let forged = msg.seal(&LinkKey([1; 16]).cipher(), h.now);
    assert!(
        h.feed(&[(Via::Host, addr("127.0.0.1:7001"), &good)])
            .is_empty()
    );
    assert_eq!(h.count(C::DropHostBadSource), 1);
    let host = h.host_addr;
    assert!(h.feed(&[(Via::Host, host, &forged)]).is_empty());
    assert_eq!(h.count(C::DropHostBadTag), 1);
    let first = h.feed(&[(Via::Host, host, &good)]);
    // A copy of the same datagram is a replay; a host retransmits by sealing afresh.
    assert!(h.feed(&[(Via::Host, host, &good)]).is_empty());
    assert_eq!(h.count(C::DropHostReplay), 1);
    let retransmit = h.feed(&[(Via::Host, host, &msg.seal(&h.link, h.now))]);
    let open =
        |out: &[(Via, SocketAddr, Vec<u8>)]| LinkMsg::open(&out[0].2, &h.link, h.now).unwrap();
    assert_eq!(
        open(&first),
        open(&retransmit),
        "a retransmitted REGISTER gets the same answer"
    );
    assert!(matches!(open(&first), LinkMsg::Registered { .. }));
    assert_eq!(h.count(C::RegisterRepeat), 1);
    assert_eq!(h.shared.connections(), 1);
    let dup = LinkMsg::Register {
        boot: 1,
        request: 2,
        conn_id: 5,
        client: a,
    }
    .seal(&h.link, h.now);
    let out = h.feed(&[(Via::Host, host, &dup)]);
    assert!(matches!(
        LinkMsg::open(&out[0].2, &h.link, h.now).unwrap(),
        LinkMsg::RegisterFailed { reason: 2, .. }
    ));
    // Close frees the tuple and the route.
    let close = LinkMsg::Close {
        boot: 1,
        request: 3,
        conn_id: 5,
    }
    .seal(&h.link, h.now);
    let out = h.feed(&[(Via::Host, host, &close)]);
    assert!(matches!(
        LinkMsg::open(&out[0].2, &h.link, h.now).unwrap(),
        LinkMsg::Closed { found: true, .. }
    ));
    assert!(h.shared.tuples.get(&a).is_none());
    assert!(h.shared.conns.get(5).is_none());
    assert_eq!(h.shared.connections(), 0);
}

#[test]
fn replayed_close_cannot_close_a_later_connection() {
    let mut h = Harness::default();
    let a = addr("10.0.0.1:4000");
    let host = h.host_addr;
    h.register(5, a);
    let close = LinkMsg::Close {
        boot: 1,
        request: 9,
        conn_id: 5,
    }
    .seal(&h.link, h.now);
    h.feed(&[(Via::Host, host, &close)]);
    assert!(h.shared.conns.get(5).is_none());
    let again = LinkMsg::Register {
        boot: 1,
        request: 10,
        conn_id: 5,
        client: a,
    }
    .seal(&h.link, h.now);
    h.feed(&[(Via::Host, host, &again)]);
    assert!(h.shared.conns.get(5).is_some());
    // A captured CLOSE sent again, within its validity: nothing happens.
    assert!(h.feed(&[(Via::Host, host, &close)]).is_empty());
    assert!(
        h.shared.conns.get(5).is_some(),
        "a replayed CLOSE closes nothing"
    );
}

#[test]
fn handshake_replies_go_only_to_recent_handshakes_and_are_no_larger() {
    let mut h = Harness::default();
    let a = addr("10.0.0.1:4000");
    let host = h.host_addr;
    let mut reply = vec![0xEE; 200];
    reply[0] = MsgType::HandshakeReply as u8;
    let framed = |r: &[u8]| {
        let mut buf = vec![0u8; r.len() + 40];
        let n = hostlink::emit_tuple_data(LinkType::ToClientReply, &a, r, &mut buf);
        buf.truncate(n);
        buf
    };
    // No HANDSHAKE came from `a`: a host cannot aim a reply at it.
    assert!(h.feed(&[(Via::Host, host, &framed(&reply))]).is_empty());
    let mut hs = vec![0u8; HANDSHAKE_LEN];
    hs[0] = b'H';
    assert_eq!(h.client(a, &hs).len(), 1);
    // Larger than the HANDSHAKE that drew it: refused.
    let mut big = vec![0xEE; HANDSHAKE_LEN + 1];
    big[0] = MsgType::HandshakeReply as u8;
    assert!(h.feed(&[(Via::Host, host, &framed(&big))]).is_empty());
    assert_eq!(
        h.feed(&[(Via::Host, host, &framed(&reply))]),
        vec![(Via::Client(0), a, reply.clone())]
    );
    assert!(
        h.feed(&[(Via::Host, host, &framed(&reply))]).is_empty(),
        "one reply per HANDSHAKE"
    );
    // A HANDSHAKE's permission expires.
    h.client(a, &hs);
    h.now = Ticks(h.now.0 + 11 * TICKS_PER_SECOND);
    assert!(h.feed(&[(Via::Host, host, &framed(&reply))]).is_empty());
}

#[test]
fn data_and_close_only_from_the_owning_host() {
    let other = addr("127.0.0.2:7000");
    let other_key = LinkKey([8; 16]);
    let mut h = Harness::with_hosts(CoreConfig::new(S), &[(other, other_key.clone())]);
    let a = addr("10.0.0.1:4000");
    h.register(77, a);
    let mut back = [0u8; 100];
    let n = hostlink::emit_conn_data(LinkType::ToClientData, 77, &data(40), &mut back);
    assert!(h.feed(&[(Via::Host, other, &back[..n])]).is_empty());
    let close = LinkMsg::Close {
        boot: 1,
        request: 1,
        conn_id: 77,
    }
    .seal(&other_key.cipher(), h.now);
    let out = h.feed(&[(Via::Host, other, &close)]);
    assert!(out.iter().all(|(_, _, b)| !matches!(
        LinkMsg::open(b, &other_key.cipher(), h.now),
        Ok(LinkMsg::Closed { found: true, .. })
    )));
    assert!(h.shared.conns.get(77).is_some(), "another host's CLOSE");
    // The owner still reaches its client.
    let host = h.host_addr;
    assert_eq!(h.feed(&[(Via::Host, host, &back[..n])]).len(), 1);
}

#[test]
fn idle_connections_expire_are_unstored_and_their_host_is_told() {
    let mut cfg = CoreConfig::new(S);
    cfg.idle_timeout = Duration::from_secs(60);
    let (store, stored) = crossbeam::channel::unbounded();
    let mut h = Harness::build(cfg, &[], Some(store));
    let (a, b) = (addr("10.0.0.1:4000"), addr("10.0.0.2:4000"));
    h.register(1, a);
    h.register(2, b);
    assert!(h.tick().is_empty(), "nothing idle yet");
    // b's client keeps talking; a's goes quiet.
    h.now = Ticks(h.now.0 + 40 * TICKS_PER_SECOND);
    assert_eq!(h.client(b, &data(60)).len(), 1);
    h.now = Ticks(h.now.0 + 30 * TICKS_PER_SECOND);
    let out = h.tick();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].0, out[0].1), (Via::Host, h.host_addr));
    assert_eq!(
        LinkMsg::open(&out[0].2, &h.link, h.now),
        Ok(LinkMsg::Expired { conn_id: 1 })
    );
    assert!(h.shared.conns.get(1).is_none());
    assert!(h.shared.tuples.get(&a).is_none());
    assert!(h.shared.conns.get(2).is_some());
    assert_eq!(h.shared.connections(), 1);
    assert_eq!(h.count(C::Expired), 1);
    let removed: Vec<_> = stored
        .try_iter()
        .filter(|op| matches!(op, StoreOp::Remove { .. }))
        .collect();
    assert_eq!(removed.len(), 1, "the removal is persisted");
    // The next sweep is not due yet; when it is, b (active 30 s ago) stays.
    assert!(h.tick().is_empty());
    h.now = Ticks(h.now.0 + 15 * TICKS_PER_SECOND);
    assert!(h.tick().is_empty());
    assert!(h.shared.conns.get(2).is_some());
}

#[test]
fn idle_sweep_that_fills_tx_goes_on_at_the_next_tick() {
    let mut cfg = CoreConfig::new(S);
    cfg.idle_timeout = Duration::from_secs(60);
    let mut h = Harness::new(cfg);
    for i in 0..5u64 {
        h.register(i, SocketAddr::from(([10, 0, 0, i as u8], 1)));
    }
    h.now = Ticks(h.now.0 + 61 * TICKS_PER_SECOND);
    h.tx = TxQueue::new(2);
    assert_eq!(h.tick().len(), 2);
    assert_eq!(h.tick().len(), 2);
    assert_eq!(h.tick().len(), 1);
    assert_eq!(h.shared.connections(), 0);
}

#[test]
fn a_restarted_host_releases_its_old_connections() {
    let other = addr("127.0.0.2:7000");
    let other_key = LinkKey([8; 16]);
    let mut h = Harness::with_hosts(CoreConfig::new(S), &[(other, other_key.clone())]);
    let host = h.host_addr;
    let (a, b, c) = (addr("10.0.0.1:1"), addr("10.0.0.2:1"), addr("10.0.0.3:1"));
    h.register(1, a);
    h.register(2, b);
    let theirs = LinkMsg::Register {
        boot: 7,
        request: 1,
        conn_id: 3,
        client: c,
    }
    .seal(&other_key.cipher(), h.now);
    assert_eq!(h.feed(&[(Via::Host, other, &theirs)]).len(), 1);
    // Host 0 restarts with boot 2: nothing of its new run is taken before its HELLO.
    let register = |request: u64, conn_id: u64, h: &Harness| {
        LinkMsg::Register {
            boot: 2,
            request,
            conn_id,
            client: addr("10.0.0.9:1"),
        }
        .seal(&h.link, h.now)
    };
    let early = register(5, 9, &h);
    assert!(h.feed(&[(Via::Host, host, &early)]).is_empty());
    assert_eq!(h.count(C::DropHostStaleBoot), 1);
    let hello = LinkMsg::Hello { boot: 2 }.seal(&h.link, h.now);
    let out = h.feed(&[(Via::Host, host, &hello)]);
    assert_eq!(
        LinkMsg::open(&out[0].2, &h.link, h.now),
        Ok(LinkMsg::HelloAck {
            boot: 2,
            released: 2
        })
    );
    assert!(h.shared.conns.get(1).is_none() && h.shared.conns.get(2).is_none());
    assert!(h.shared.tuples.get(&a).is_none() && h.shared.tuples.get(&b).is_none());
    assert!(
        h.shared.conns.get(3).is_some(),
        "another host's connection stays"
    );
    assert_eq!((h.count(C::HostRestarts), h.count(C::Released)), (1, 2));
    // A retransmitted HELLO of the same boot releases nothing more.
    let again = LinkMsg::Hello { boot: 2 }.seal(&h.link, h.now);
    let out = h.feed(&[(Via::Host, host, &again)]);
    assert!(matches!(
        LinkMsg::open(&out[0].2, &h.link, h.now),
        Ok(LinkMsg::HelloAck { released: 0, .. })
    ));
    // A delayed HELLO of the old run (sent before the new one) is refused.
    let old = LinkMsg::Hello { boot: 1 }.seal(&h.link, Ticks(h.now.0 - TICKS_PER_SECOND));
    assert!(h.feed(&[(Via::Host, host, &old)]).is_empty());
    assert_eq!(h.count(C::DropHostStaleBoot), 2);
    // The new run registers.
    let out = h.feed(&[(Via::Host, host, &register(6, 9, &h))]);
    assert!(matches!(
        LinkMsg::open(&out[0].2, &h.link, h.now),
        Ok(LinkMsg::Registered { conn_id: 9, .. })
    ));
}

#[test]
fn registry_full_is_reported() {
    let mut cfg = CoreConfig::new(2);
    cfg.max_connections = 4;
    let mut h = Harness::new(cfg);
    for i in 0..4u64 {
        let msg = LinkMsg::Register {
            boot: 1,
            request: i,
            conn_id: i,
            client: SocketAddr::from(([10, 0, 0, i as u8], 1)),
        }
        .seal(&h.link, h.now);
        let host = h.host_addr;
        h.feed(&[(Via::Host, host, &msg)]);
    }
    let msg = LinkMsg::Register {
        boot: 1,
        request: 9,
        conn_id: 9,
        client: addr("10.0.0.9:1"),
    }
    .seal(&h.link, h.now);
    let host = h.host_addr;
    let out = h.feed(&[(Via::Host, host, &msg)]);
    assert!(matches!(
        LinkMsg::open(&out[0].2, &h.link, h.now).unwrap(),
        LinkMsg::RegisterFailed { reason: 1, .. }
    ));
}

#[test]
fn ticks_never_run_backwards_and_respect_the_cap() {
    let h = Harness::default();
    assert_eq!(h.shared.issue_ticks(Ticks(100)), Ticks(100));
    assert_eq!(
        h.shared.issue_ticks(Ticks(50)),
        Ticks(101),
        "strictly later, even when the clock steps back"
    );
    assert_eq!(h.shared.issue_ticks(Ticks(100)), Ticks(102));
    h.shared.set_issue_cap(Ticks(150));
    assert_eq!(h.shared.issue_ticks(Ticks(200)), Ticks(150));
    assert_eq!(
        h.shared.issue_ticks(Ticks(200)),
        Ticks(150),
        "never past the reservation"
    );
    h.shared.set_issue_cap(Ticks(300));
    assert_eq!(h.shared.issue_ticks(Ticks(200)), Ticks(200));
}

#[test]
fn restored_connections_refuse_pre_restart_rebinds() {
    let mut h = Harness::default();
    let old = addr("10.0.0.1:4000");
    let new = addr("10.0.0.2:4000");
    let issued = h.register(42, old);
    h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
    let u = h.client(new, &data(49));
    let (rebind, _) = rebind_from(&issued, &u[0].2);
    // The gateway "crashes" before this REBIND is seen; a new one restores connection 42
    // with the floor at the last time it could have issued.
    let mut fresh = Harness::default();
    fresh.now = h.now;
    let stored = StoredConn {
        epoch: 3,
        index: 0,
        conn_id: 42,
        secret: issued.secret.clone(),
        last_rebind: Ticks(0),
        tuple: Some(old),
        host: 0,
    };
    // A connection of an epoch the gateway does not hold is refused as such.
    let other_epoch = StoredConn {
        epoch: 9,
        ..stored.clone()
    };
    let err = fresh.shared.restore(&other_epoch, h.now).unwrap_err();
    assert_eq!(err, RegistryError::UnknownEpoch(9));
    assert_eq!(err.to_string(), "no registry for key epoch 9");
    fresh.shared.restore(&stored, h.now).unwrap();
    assert!(fresh.client(new, &rebind).is_empty());
    assert_eq!(fresh.count(C::RejectReplay), 1);
    // DATA from the restored tuple still flows at once.
    assert_eq!(fresh.client(old, &data(60))[0].0, Via::Host);
}

/// A rotation that stops accepting an epoch (forced during grace) first moves the
/// connections registered anew at the last rotation to that registration: same tuple, new
/// index, in the store before the old records go; nobody is released or told EXPIRED.
#[test]
fn an_epoch_rotated_out_moves_its_connections_to_their_next_registration() {
    let (store, stored) = crossbeam::channel::unbounded();
    let mut h = Harness::build(CoreConfig::new(S), &[], Some(store));
    let (a, b) = (addr("10.0.0.1:4000"), addr("10.0.0.2:4000"));
    h.register(1, a);
    let r = h.shared.rotate(epoch_crypto(4));
    assert_eq!(r.registered, 1);
    h.register(2, b);
    let _ = stored.try_iter().count();
    // Epoch 3 still routes connection 1.
    assert_eq!(h.shared.conns.get(1).map(|r| r.epoch_byte), Some(3));
    assert_eq!(
        h.shared.connections(),
        2,
        "one registered twice counts once"
    );
    let r = h.shared.rotate(epoch_crypto(5));
    assert_eq!((r.dropped, r.released, r.registered), (Some(3), 0, 2));
    let route = h.shared.conns.get(1).unwrap();
    assert_eq!((route.epoch_byte, route.tuple), (4, Some(a)));
    assert_eq!(
        h.shared.tuples.get(&a).map(|r| (r.conn_id, r.epoch_byte)),
        Some((1, 4))
    );
    assert_eq!(h.shared.tuples.get(&b).map(|r| r.conn_id), Some(2));
    assert_eq!(h.shared.connections(), 2);
    let ops: Vec<StoreOp> = stored.try_iter().collect();
    let rebind = ops
        .iter()
        .position(|op| matches!(op, StoreOp::Rebind { epoch: 4, tuple, .. } if *tuple == a))
        .expect("the move is stored");
    let rotate = ops
        .iter()
        .position(|op| {
            matches!(op, StoreOp::Rotate { epoch: 5, drop: Some(3), register, .. }
                if register.len() == 2)
        })
        .expect("one op: the drop and the new registrations");
    assert!(rebind < rotate);
    // No EXPIRED: only EPOCH_KEYS for the new epoch go to the host.
    for (_, _, m) in h.tick() {
        assert!(matches!(
            LinkMsg::open(&m, &h.link, h.now),
            Ok(LinkMsg::EpochKeys { epoch: 5, .. })
        ));
    }
    assert_eq!(h.count(C::Expired), 0);
    // DATA from the moved tuple still reaches the host.
    assert_eq!(h.client(a, &data(60))[0].0, Via::Host);
}

#[test]
fn restoring_two_connections_with_one_tuple_keeps_the_first_bound() {
    let (store, stored) = crossbeam::channel::unbounded();
    let h = Harness::build(CoreConfig::new(S), &[], Some(store));
    let t = addr("10.0.0.1:4000");
    let first = StoredConn {
        epoch: 3,
        index: 0,
        conn_id: 41,
        secret: crate::rebind::RebindSecret([1; 32]),
        last_rebind: Ticks(0),
        tuple: Some(t),
        host: 0,
    };
    let second = StoredConn {
        index: 1,
        conn_id: 42,
        ..first.clone()
    };
    h.shared.restore(&first, Ticks(T0)).unwrap();
    h.shared.restore(&second, Ticks(T0)).unwrap();
    assert_eq!(h.shared.tuples.get(&t).map(|r| r.conn_id), Some(41));
    assert_eq!(h.shared.conns.get(41).and_then(|r| r.tuple), Some(t));
    assert_eq!(h.shared.conns.get(42).and_then(|r| r.tuple), None);
    assert!(
        stored
            .try_iter()
            .any(|op| matches!(op, StoreOp::Unbind { epoch: 3, index: 1 }))
    );
}

#[test]
fn deferred_commit_answers_only_after_the_store_agrees() {
    let mut cfg = CoreConfig::new(S);
    cfg.commit = CommitMode::Deferred;
    let mut h = Harness::new(cfg);
    let old = addr("10.0.0.1:4000");
    let new = addr("10.0.0.9:5555");
    let issued = h.register(42, old);
    h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
    let u = h.client(new, &data(49));
    let (rebind, session) = rebind_from(&issued, &u[0].2);

    // Verified, but nothing is sent and nothing moves until the store answers.
    assert!(h.client(new, &rebind).is_empty());
    let req = h.worker.poll_commit().expect("a commit request");
    assert_eq!((req.conn_id, req.index, req.to), (42, 0, new));
    assert!(h.worker.poll_commit().is_none());
    assert_eq!(h.shared.tuples.get(&old).unwrap().conn_id, 42);
    assert!(h.shared.tuples.get(&new).is_none());
    assert_eq!(h.worker.pending_commits(), 1);

    // The same REBIND again while the first is undecided: not proposed again (the first's
    // ACK answers it; a storm's retries would each be one more store write).
    assert!(h.client(new, &rebind).is_empty());
    assert!(h.worker.poll_commit().is_none());
    assert_eq!(h.count(C::CommitCoalesced), 1);

    // Committed: REBOUND to the host and the ACK to the client; the tables follow.
    h.worker.handle_commit(
        req.ticket,
        CommitResult::Committed { old: Some(old) },
        &mut h.tx,
    );
    let out: Vec<_> =
        h.tx.iter()
            .map(|(m, b)| (m.via, m.to, b.to_vec()))
            .collect();
    h.tx.clear();
    assert_eq!(out.len(), 2);
    let ack = out.iter().find(|(v, _, _)| *v == Via::Client(0)).unwrap();
    assert_eq!(ack.1, new);
    assert_eq!(
        RebindAckView::new_checked(&ack.2).unwrap().open(&session),
        Ok(42)
    );
    let rebound = out.iter().find(|(v, _, _)| *v == Via::Host).unwrap();
    assert!(matches!(
        LinkMsg::open(&rebound.2, &h.link, h.now),
        Ok(LinkMsg::Rebound { conn_id: 42, .. })
    ));
    assert_eq!(h.shared.tuples.get(&new).unwrap().conn_id, 42);
    assert!(h.shared.tuples.get(&old).is_none());

    // Now L = t locally: the REBIND again is a local duplicate, answered at once.
    assert_eq!(h.client(new, &rebind).len(), 1);
    assert!(h.worker.poll_commit().is_none());
    // The registration and one rebind proposed and committed.
    assert_eq!(h.count(C::CommitProposed), 2);
    assert_eq!(h.count(C::CommitCommitted), 2);
    assert_eq!(h.count(C::RebindAccepted), 1);
    assert_eq!(h.count(C::RebindDuplicate), 1);
}

#[test]
fn deferred_commit_whose_watch_event_came_first_still_binds_the_new_tuple() {
    let mut cfg = CoreConfig::new(S);
    cfg.commit = CommitMode::Deferred;
    let mut h = Harness::new(cfg);
    let old = addr("10.0.0.1:4000");
    let new = addr("10.0.0.9:5555");
    let issued = h.register(42, old);
    h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
    let u = h.client(new, &data(49));
    let (rebind, _) = rebind_from(&issued, &u[0].2);
    assert!(h.client(new, &rebind).is_empty());
    let req = h.worker.poll_commit().expect("a commit request");
    // etcd's watch reports this gateway's own commit before the transaction's answer does.
    let mine = StoredConn {
        epoch: 3,
        index: req.index,
        conn_id: 42,
        secret: issued.secret.clone(),
        last_rebind: req.t,
        tuple: Some(new),
        host: 0,
    };
    assert_eq!(
        h.shared.apply_remote(RemoteChange::Stored {
            conn: mine,
            ours: true
        }),
        RemoteApplied::Updated
    );
    h.worker.handle_commit(
        req.ticket,
        CommitResult::Committed { old: Some(old) },
        &mut h.tx,
    );
    h.tx.clear();
    assert_eq!(h.shared.tuples.get(&new).unwrap().conn_id, 42);
    assert!(h.shared.tuples.get(&old).is_none());
    assert_eq!(h.shared.conns.get(42).unwrap().tuple, Some(new));
    // DATA from the new tuple takes the fast path.
    let out = h.client(new, &data(50));
    assert!(out.iter().all(|(v, _, _)| *v == Via::Host), "{out:?}");
}

/// A client's retry while its first REBIND's commit is in flight proposes nothing (no second
/// store write); the first commit's ACK answers it. From another tuple, or once the first
/// is answered, a REBIND is proposed again.
#[test]
fn deferred_retry_from_the_same_tuple_waits_for_the_commit_in_flight() {
    let mut cfg = CoreConfig::new(S);
    cfg.commit = CommitMode::Deferred;
    let mut h = Harness::new(cfg);
    let old = addr("10.0.0.1:4000");
    let new = addr("10.0.0.9:5555");
    let issued = h.register(42, old);
    h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
    let u = h.client(new, &data(49));
    let (first, session) = rebind_from(&issued, &u[0].2);
    assert!(h.client(new, &first).is_empty());
    let req = h.worker.poll_commit().expect("a commit request");
    // The client's retry (fresh nonces) before the store answers: no second store write.
    let (retry, _) = rebind_from(&issued, &u[0].2);
    assert!(h.client(new, &retry).is_empty());
    assert!(h.worker.poll_commit().is_none(), "no second store write");
    assert_eq!(h.count(C::CommitCoalesced), 1);
    // The same connection seen from another tuple meanwhile is a proposal of its own.
    let other = addr("10.0.0.10:6000");
    let u2 = h.client(other, &data(51));
    let (elsewhere, _) = rebind_from(&issued, &u2[0].2);
    assert!(h.client(other, &elsewhere).is_empty());
    let second = h
        .worker
        .poll_commit()
        .expect("a proposal from another tuple");
    assert_eq!(second.to, other);
    // The first commit's answer: its ACK goes to the client, which opens it.
    h.worker.handle_commit(
        req.ticket,
        CommitResult::Committed { old: Some(old) },
        &mut h.tx,
    );
    let out: Vec<_> =
        h.tx.iter()
            .map(|(m, b)| (m.via, m.to, b.to_vec()))
            .collect();
    h.tx.clear();
    let ack = out.iter().find(|(v, _, _)| *v == Via::Client(0)).unwrap();
    assert_eq!(ack.1, new);
    assert_eq!(
        RebindAckView::new_checked(&ack.2).unwrap().open(&session),
        Ok(42)
    );
    // Answered: nothing of it is in flight any more (a resend is a local duplicate).
    assert_eq!(h.client(new, &first).len(), 1);
    assert!(h.worker.poll_commit().is_none());
    assert_eq!(h.count(C::CommitCoalesced), 1);
}

#[test]
fn deferred_commit_refused_or_unanswered_sends_nothing() {
    let mut cfg = CoreConfig::new(S);
    cfg.commit = CommitMode::Deferred;
    let mut h = Harness::new(cfg);
    let old = addr("10.0.0.1:4000");
    let issued = h.register(42, old);
    for (i, refusal) in [CommitRefusal::Conflict, CommitRefusal::Unavailable]
        .into_iter()
        .enumerate()
    {
        h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
        let from = SocketAddr::from(([10, 0, 1, i as u8], 4000));
        let u = h.client(from, &data(49));
        let (rebind, _) = rebind_from(&issued, &u[0].2);
        assert!(h.client(from, &rebind).is_empty());
        let req = h.worker.poll_commit().unwrap();
        h.worker
            .handle_commit(req.ticket, CommitResult::Refused(refusal), &mut h.tx);
        assert!(h.tx.is_empty(), "a refused commit sends nothing");
        assert!(h.shared.tuples.get(&from).is_none());
    }
    assert_eq!(h.count(C::CommitConflict), 1);
    assert_eq!(h.count(C::CommitUnavailable), 1);
    assert_eq!(h.shared.tuples.get(&old).unwrap().conn_id, 42);

    // Unanswered: dropped at a tick after COMMIT_TIMEOUT; a late answer does nothing.
    h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
    let from = addr("10.0.2.1:4000");
    let u = h.client(from, &data(49));
    let (rebind, _) = rebind_from(&issued, &u[0].2);
    assert!(h.client(from, &rebind).is_empty());
    let req = h.worker.poll_commit().unwrap();
    h.now = h
        .now
        .saturating_add(COMMIT_TIMEOUT + Duration::from_millis(1));
    h.tick();
    assert_eq!(h.worker.pending_commits(), 0);
    assert_eq!(h.count(C::CommitTimedOut), 1);
    h.worker.handle_commit(
        req.ticket,
        CommitResult::Committed { old: Some(old) },
        &mut h.tx,
    );
    assert!(h.tx.is_empty());
    assert_eq!(h.count(C::CommitLate), 1);
    assert!(h.shared.tuples.get(&from).is_none());
}

#[test]
fn deferred_registration_whose_watch_event_came_first_is_still_registered() {
    let mut cfg = CoreConfig::new(S);
    cfg.commit = CommitMode::Deferred;
    let mut h = Harness::new(cfg);
    let client = addr("10.0.0.1:4000");
    let msg = LinkMsg::Register {
        boot: 1,
        request: 7,
        conn_id: 42,
        client,
    }
    .seal(&h.link, h.now);
    let host = h.host_addr;
    assert!(h.feed(&[(Via::Host, host, &msg)]).is_empty());
    let req = h.worker.poll_registration().unwrap();
    // etcd's watch reports this gateway's own record before the transaction's answer does.
    let mine = StoredConn {
        epoch: 3,
        index: 5,
        conn_id: 42,
        secret: req.secret.clone(),
        last_rebind: Ticks(0),
        tuple: Some(client),
        host: 0,
    };
    assert_eq!(
        h.shared.apply_remote(RemoteChange::Stored {
            conn: mine,
            ours: true
        }),
        RemoteApplied::Added
    );
    h.worker.handle_registration(
        h.now,
        req.ticket,
        RegisterResult::Registered { index: 5 },
        &mut h.tx,
    );
    let out: Vec<_> = h.tx.iter().map(|(_, b)| b.to_vec()).collect();
    h.tx.clear();
    assert!(
        matches!(
            LinkMsg::open(&out[0], &h.link, h.now),
            Ok(LinkMsg::Registered {
                conn_id: 42,
                index: 5,
                ..
            })
        ),
        "REGISTERED, not REGISTER_FAILED"
    );
    assert_eq!(h.shared.tuples.get(&client).unwrap().conn_id, 42);
    assert_eq!(h.shared.connections(), 1);
}

#[test]
fn deferred_registration_takes_the_index_the_store_gives() {
    let mut cfg = CoreConfig::new(S);
    cfg.commit = CommitMode::Deferred;
    let mut h = Harness::new(cfg);
    let client = addr("10.0.0.1:4000");
    let register = |h: &Harness, request: u64, conn_id: u64| {
        LinkMsg::Register {
            boot: 1,
            request,
            conn_id,
            client,
        }
        .seal(&h.link, h.now)
    };
    let host = h.host_addr;
    let msg = register(&h, 7, 42);
    assert!(
        h.feed(&[(Via::Host, host, &msg)]).is_empty(),
        "nothing before the store"
    );
    let req = h
        .worker
        .poll_registration()
        .expect("a registration request");
    assert_eq!((req.conn_id, req.tuple), (42, client));
    // A retransmitted REGISTER while undecided is not proposed again.
    let again = register(&h, 7, 42);
    assert!(h.feed(&[(Via::Host, host, &again)]).is_empty());
    assert!(h.worker.poll_registration().is_none());
    assert!(h.shared.tuples.get(&client).is_none());

    // The store gives index 5: REGISTERED carries it and the secret the request named.
    h.worker.handle_registration(
        h.now,
        req.ticket,
        RegisterResult::Registered { index: 5 },
        &mut h.tx,
    );
    let out: Vec<_> = h.tx.iter().map(|(m, b)| (m.to, b.to_vec())).collect();
    h.tx.clear();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, host);
    match LinkMsg::open(&out[0].1, &h.link, h.now).unwrap() {
        LinkMsg::Registered {
            request,
            conn_id,
            index,
            rebind_secret,
            ..
        } => {
            assert_eq!((request, conn_id, index), (7, 42, 5));
            assert_eq!(rebind_secret, req.secret.0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.shared.tuples.get(&client).unwrap().conn_id, 42);
    assert_eq!(h.shared.conns.get(42).unwrap().index, 5);

    // Refused (store down) and full: REGISTER_FAILED with the reason.
    for (n, (result, want)) in [
        (
            RegisterResult::Refused(CommitRefusal::Unavailable),
            RegisterFailure::Refused,
        ),
        (RegisterResult::Full, RegisterFailure::Full),
    ]
    .into_iter()
    .enumerate()
    {
        let msg = register(&h, 8 + n as u64, 43 + n as u64);
        assert!(h.feed(&[(Via::Host, host, &msg)]).is_empty());
        let req = h.worker.poll_registration().unwrap();
        h.worker
            .handle_registration(h.now, req.ticket, result, &mut h.tx);
        let out: Vec<_> = h.tx.iter().map(|(_, b)| b.to_vec()).collect();
        h.tx.clear();
        assert!(matches!(
            LinkMsg::open(&out[0], &h.link, h.now),
            Ok(LinkMsg::RegisterFailed { reason, .. }) if reason == want as u8
        ));
        assert!(h.shared.conns.get(43 + n as u64).is_none());
    }
    assert_eq!(h.count(C::CommitUnavailable), 1);
}

#[test]
fn remote_changes_add_connections_move_owners_and_remove() {
    let mut h = Harness::default();
    let old = addr("10.0.0.1:4000");
    let issued = h.register(42, old);
    let stored = |index: u32, conn_id: u64, last: Ticks, tuple: &str| StoredConn {
        epoch: 3,
        index,
        conn_id,
        secret: RebindSecret([index as u8; 32]),
        last_rebind: last,
        tuple: Some(addr(tuple)),
        host: 0,
    };
    // Another gateway registered a connection: held here (its REBINDs verify here), but its
    // tuple is not this gateway's to serve.
    let theirs = stored(3, 50, Ticks(0), "10.0.0.50:5000");
    assert_eq!(
        h.shared.apply_remote(RemoteChange::Stored {
            conn: theirs.clone(),
            ours: false
        }),
        RemoteApplied::Added
    );
    assert!(h.shared.conns.get(50).is_some_and(|r| r.tuple.is_none()));
    assert!(h.shared.tuples.get(&addr("10.0.0.50:5000")).is_none());
    assert_eq!(h.shared.connections(), 2);

    // Connection 42 was rebound on another gateway at t1: this one keeps L = t1 and lets go.
    h.now = Ticks(h.now.0 + TICKS_PER_SECOND);
    let u = h.client(addr("10.0.0.9:5555"), &data(49));
    let (stale, _) = rebind_from(&issued, &u[0].2);
    let t1 = Ticks(h.now.0 + 10);
    let moved = StoredConn {
        secret: issued.secret.clone(),
        ..stored(0, 42, t1, "10.0.0.77:7777")
    };
    assert_eq!(
        h.shared.apply_remote(RemoteChange::Stored {
            conn: moved.clone(),
            ours: false
        }),
        RemoteApplied::Updated
    );
    assert!(h.shared.tuples.get(&old).is_none(), "the old owner lets go");
    assert!(h.shared.conns.get(42).is_some_and(|r| r.tuple.is_none()));
    // DATA from the old tuple is unknown here now; a REBIND older than t1 is a replay.
    let out = h.client(old, &data(60));
    assert_eq!(out[0].2[0], MsgType::Unrecognized as u8);
    assert!(h.client(addr("10.0.0.9:5555"), &stale).is_empty());
    assert_eq!(h.count(C::RejectReplay), 1);
    // The same change again (or an older one) changes nothing.
    assert_eq!(
        h.shared.apply_remote(RemoteChange::Stored {
            conn: moved,
            ours: false
        }),
        RemoteApplied::Unchanged
    );

    // Removed by its owner; an epoch this gateway does not hold is reported as such.
    assert_eq!(
        h.shared.apply_remote(RemoteChange::Removed {
            epoch: 3,
            index: 3,
            conn_id: 50
        }),
        RemoteApplied::Removed
    );
    assert!(h.shared.conns.get(50).is_none());
    assert_eq!(
        h.shared.apply_remote(RemoteChange::Stored {
            conn: StoredConn { epoch: 9, ..theirs },
            ours: false
        }),
        RemoteApplied::UnknownEpoch
    );
    assert_eq!(h.shared.connections(), 1);
}

#[test]
fn in_a_cluster_a_host_s_first_hello_releases_nothing() {
    for (mode, released) in [(CommitMode::Deferred, 0), (CommitMode::Local, 1)] {
        let mut cfg = CoreConfig::new(S);
        cfg.commit = mode;
        let mut h = Harness::new(cfg);
        // A connection of host 0 registered on another gateway, known here from the watch.
        let conn = StoredConn {
            epoch: 3,
            index: 0,
            conn_id: 77,
            secret: RebindSecret([1; 32]),
            last_rebind: Ticks(0),
            tuple: Some(addr("10.0.0.1:4000")),
            host: 0,
        };
        h.shared
            .apply_remote(RemoteChange::Stored { conn, ours: false });
        // The host greets this gateway the first time it hears from it.
        let hello = LinkMsg::Hello { boot: 5 }.seal(&h.link, h.now);
        let host = h.host_addr;
        let out = h.feed(&[(Via::Host, host, &hello)]);
        assert_eq!(
            LinkMsg::open(&out[0].2, &h.link, h.now),
            Ok(LinkMsg::HelloAck { boot: 5, released }),
            "{mode:?}"
        );
        assert_eq!(h.shared.conns.get(77).is_some(), released == 0, "{mode:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn handler_never_panics(
        datagrams in proptest::collection::vec(
            (any::<bool>(), 0u8..4, proptest::collection::vec(any::<u8>(), 0..400)),
            1..20,
        ),
        first_bytes in proptest::collection::vec(
            proptest::sample::select(vec![b'D', b'H', b'R', b'h', b'U', b'r', 1, 2, 3, 4, 0x10, 0x13, 0]),
            20,
        ),
    ) {
        let mut h = Harness::default();
        h.register(1, addr("10.0.0.1:1"));
        let host = h.host_addr;
        let owned: Vec<(Via, SocketAddr, Vec<u8>)> = datagrams
            .into_iter()
            .zip(first_bytes)
            .map(|((from_host, src, mut bytes), first)| {
                if let Some(b) = bytes.first_mut() { *b = first; }
                if from_host {
                    (Via::Host, host, bytes)
                } else {
                    (Via::Client(0), SocketAddr::from(([10, 0, 0, src], 1)), bytes)
                }
            })
            .collect();
        let feed: Vec<(Via, SocketAddr, &[u8])> =
            owned.iter().map(|(v, a, b)| (*v, *a, &b[..])).collect();
        for (_, _, reply) in h.feed(&feed) {
            prop_assert!(reply.len() <= crate::io::batch::SLOT_LEN);
        }
    }
}

fn epoch_crypto(epoch: u32) -> EpochCrypto {
    let keys = EpochKeys::derive(&MasterSecret::from_bytes([5; 32]), epoch, S).unwrap();
    let trial = TrialKeys::new(Backend::Portable, keys.slot_key_pairs()).unwrap();
    EpochCrypto { keys, trial }
}

/// The grace period ends at its deadline, not before: then the previous epoch's keys and
/// registrations go, in one store op, after the connections registered at the rotation
/// moved to their new registrations; a connection that had none (the new epoch was full)
/// is released and its host told.
#[test]
fn grace_ends_at_its_deadline() {
    let (store, stored) = crossbeam::channel::unbounded();
    let mut h = Harness::build(CoreConfig::new(S), &[], Some(store));
    let a = addr("10.0.0.1:4000");
    h.register(1, a);
    let until = Ticks(h.now.0 + 60 * TICKS_PER_SECOND);
    h.shared.rotate_with_grace(epoch_crypto(4), h.now, until);
    // A connection of epoch 3 only (as if epoch 4 had had no room for it).
    h.shared
        .restore(
            &StoredConn {
                epoch: 3,
                index: 200,
                conn_id: 9,
                secret: RebindSecret([2; 32]),
                last_rebind: Ticks(0),
                tuple: Some(addr("10.0.0.9:4000")),
                host: 0,
            },
            Ticks(0),
        )
        .unwrap();
    assert_eq!(h.shared.grace_until(), Some(until));
    assert!(h.shared.end_grace(Ticks(until.0 - 1)).is_none());
    assert!(h.shared.epochs().previous.is_some());
    let r = h.shared.end_grace(until).expect("grace over");
    assert_eq!((r.dropped, r.released), (Some(3), 1));
    assert!(h.shared.epochs().previous.is_none());
    assert_eq!(h.shared.grace_until(), None);
    assert!(h.shared.end_grace(until).is_none());
    assert!(
        stored
            .try_iter()
            .any(|op| matches!(op, StoreOp::EndGrace { epoch: 3 }))
    );
    let now = h.now;
    let expired: Vec<u64> = h
        .tick()
        .into_iter()
        .filter_map(|(_, _, m)| match LinkMsg::open(&m, &h.link, now) {
            Ok(LinkMsg::Expired { conn_id }) => Some(conn_id),
            _ => None,
        })
        .collect();
    assert_eq!(expired, vec![9], "only the one left behind is expired");
    assert_eq!(h.shared.connections(), 1);
    assert_eq!(h.shared.conns.get(1).map(|r| r.epoch_byte), Some(4));
    assert_eq!(h.shared.connections_per_epoch(), vec![(4, 1)]);
}

/// Key delivery, gateway side: a rotation registers every live connection in the new epoch
/// (stored with the rotation) and sends its index, `R'` and slot keys to its host in
/// EPOCH_KEYS, again with backoff until the host's KEYS_DELIVERED; a KEYS_DELIVERED for
/// another epoch or an unknown connection is dropped and counted.
#[test]
fn rotation_registers_live_connections_and_sends_their_keys_until_delivered() {
    let (store, stored) = crossbeam::channel::unbounded();
    let mut h = Harness::build(CoreConfig::new(S), &[], Some(store));
    for c in 1..=3 {
        h.register(c, addr(&format!("10.0.0.{c}:4000")));
    }
    let _ = stored.try_iter().count();
    let grace = Ticks(h.now.0 + 600 * TICKS_PER_SECOND);
    let r = h.shared.rotate_with_grace(epoch_crypto(4), h.now, grace);
    assert_eq!(r.registered, 3);
    // Nothing goes out before the rotation is committed.
    assert!(h.tick().is_empty());
    h.shared.mark_durable(1 << 40);
    let register = stored
        .try_iter()
        .find_map(|op| match op {
            StoreOp::Rotate { register, .. } => Some(register),
            _ => None,
        })
        .unwrap();
    assert_eq!(register.len(), 3);
    assert!(register.iter().all(|c| c.epoch == 4 && c.tuple.is_none()));
    assert_eq!(h.shared.keys_pending(), 3);
    let sent = |h: &mut Harness| -> Vec<(u64, crate::wire::NewKeys)> {
        let now = h.now;
        let (host, link) = (h.host_addr, h.link.clone());
        h.tick()
            .into_iter()
            .flat_map(|(via, to, m)| {
                assert_eq!((via, to), (Via::Host, host));
                match LinkMsg::open(&m, &link, now).unwrap() {
                    LinkMsg::EpochKeys {
                        epoch,
                        slots,
                        ref entries,
                    } => {
                        assert_eq!((epoch, usize::from(slots)), (4, S));
                        entries
                            .iter()
                            .map(|e| (e.conn_id, e.keys.clone()))
                            .collect::<Vec<_>>()
                    }
                    other => panic!("expected EPOCH_KEYS, got {other:?}"),
                }
            })
            .collect()
    };
    let first = sent(&mut h);
    assert_eq!(first.len(), 3);
    let keys4 = epoch_crypto(4).keys;
    for (conn_id, k) in &first {
        let stored = register.iter().find(|c| c.conn_id == *conn_id).unwrap();
        assert_eq!((k.epoch, k.index), (4, stored.index));
        assert_eq!(k.rebind_secret, stored.secret.0);
        assert_eq!(k.slot_keys, keys4.client_keys(stored.index).to_vec());
    }
    assert_eq!(h.count(C::KeysDelivered), 3);
    assert!(sent(&mut h).is_empty(), "not due again yet");
    // The host confirms 1 and 2; a confirmation of another epoch or of an unknown
    // connection changes nothing.
    let confirm = |h: &mut Harness, epoch, conn_ids: Vec<u64>| {
        let m = LinkMsg::KeysDelivered { epoch, conn_ids }.seal(&h.link, h.now);
        let host = h.host_addr;
        assert!(h.feed(&[(Via::Host, host, &m)]).is_empty());
    };
    confirm(&mut h, 4, vec![1, 2]);
    confirm(&mut h, 3, vec![3]);
    confirm(&mut h, 4, vec![77]);
    assert_eq!(h.count(C::KeysAcknowledged), 2);
    assert_eq!(h.count(C::DropKeysDeliveredEpoch), 1);
    assert_eq!(h.count(C::DropKeysDeliveredUnknown), 1);
    assert_eq!(h.shared.keys_pending(), 1);
    h.now = Ticks(h.now.0 + 2 * TICKS_PER_SECOND);
    let again = sent(&mut h);
    assert_eq!(again.iter().map(|(c, _)| *c).collect::<Vec<_>>(), vec![3]);
    assert_eq!(h.count(C::KeysResent), 1);
    confirm(&mut h, 4, vec![3, 3]);
    assert_eq!(h.shared.keys_pending(), 0);
    h.now = Ticks(h.now.0 + 60 * TICKS_PER_SECOND);
    assert!(sent(&mut h).is_empty());
    // Closing a connection removes both of its registrations.
    assert_eq!(h.shared.connections_per_epoch(), vec![(4, 3), (3, 3)]);
    let close = LinkMsg::Close {
        boot: 1,
        request: 99,
        conn_id: 2,
    }
    .seal(&h.link, h.now);
    let host = h.host_addr;
    h.feed(&[(Via::Host, host, &close)]);
    assert_eq!(h.shared.connections_per_epoch(), vec![(4, 2), (3, 2)]);
    assert_eq!(h.shared.connections(), 2);
}

/// Cluster mode: a rotation the store decided registers only the connections this gateway
/// owns, and through the store (which picks the indices); a connection's keys go out only
/// once its registration is committed, a refused one is dropped from delivery, and late or
/// unknown answers change nothing.
#[test]
fn clustered_rotation_sends_keys_only_after_the_store_placed_them() {
    let mut h = Harness::default();
    for c in 1..=3 {
        h.register(c, addr(&format!("10.0.0.{c}:4000")));
    }
    // A connection another gateway owns: held here, not registered anew by this gateway.
    h.shared.apply_remote(RemoteChange::Stored {
        conn: StoredConn {
            epoch: 3,
            index: 100,
            conn_id: 50,
            secret: RebindSecret([5; 32]),
            last_rebind: Ticks(0),
            tuple: Some(addr("10.0.0.50:5000")),
            host: 0,
        },
        ours: false,
    });
    let grace = Ticks(h.now.0 + 600 * TICKS_PER_SECOND);
    let (r, regs) = h.shared.rotate_clustered(epoch_crypto(4), h.now, grace);
    assert_eq!((r.epoch, r.registered, r.dropped), (4, 3, None));
    let mut owned: Vec<u64> = regs.iter().map(|g| g.conn_id).collect();
    owned.sort_unstable();
    assert_eq!(owned, vec![1, 2, 3]);
    let mut tickets: Vec<u64> = regs.iter().map(|g| g.ticket).collect();
    tickets.dedup();
    assert_eq!(tickets.len(), 3);
    assert_eq!(h.shared.rotation_registrations_pending(), 3);
    assert_eq!(h.shared.keys_pending(), 3);
    // Nothing is registered in epoch 4 here, and nothing goes out, before the store placed it.
    assert_eq!(h.shared.connections_per_epoch(), vec![(4, 0), (3, 4)]);
    assert!(h.tick().is_empty());

    // The store placed connection regs[0] at index 7: its keys go out, with its `R`.
    let first = &regs[0];
    assert!(
        h.shared
            .rotation_registered(4, first.ticket, Some(7), h.now)
            .is_none()
    );
    let out = h.tick();
    assert_eq!(out.len(), 1);
    let (_, to, m) = &out[0];
    assert_eq!(*to, h.host_addr);
    match LinkMsg::open(m, &h.link, h.now).unwrap() {
        LinkMsg::EpochKeys {
            epoch, ref entries, ..
        } => {
            assert_eq!(epoch, 4);
            assert_eq!(entries.len(), 1);
            assert_eq!(entries[0].conn_id, first.conn_id);
            assert_eq!((entries[0].keys.epoch, entries[0].keys.index), (4, 7));
            assert_eq!(entries[0].keys.rebind_secret, first.secret.0);
        }
        other => panic!("expected EPOCH_KEYS, got {other:?}"),
    }
    assert_eq!(h.shared.connections_per_epoch(), vec![(4, 1), (3, 4)]);
    // The second was refused (etcd unavailable): no new registration, no keys.
    assert!(
        h.shared
            .rotation_registered(4, regs[1].ticket, None, h.now)
            .is_none()
    );
    assert_eq!(h.shared.keys_pending(), 2);
    // A repeated answer, an unknown ticket, another epoch's: nothing.
    assert!(
        h.shared
            .rotation_registered(4, first.ticket, Some(8), h.now)
            .is_none()
    );
    assert!(
        h.shared
            .rotation_registered(4, 9_999, Some(9), h.now)
            .is_none()
    );
    assert!(
        h.shared
            .rotation_registered(5, regs[2].ticket, Some(9), h.now)
            .is_none()
    );
    assert_eq!(h.shared.rotation_registrations_pending(), 1);
    // The third connection closes before its answer: its new record is to be removed.
    let close = LinkMsg::Close {
        boot: 1,
        request: 99,
        conn_id: regs[2].conn_id,
    }
    .seal(&h.link, h.now);
    let host = h.host_addr;
    h.feed(&[(Via::Host, host, &close)]);
    let closed = regs[2].conn_id;
    assert!(matches!(
        h.shared.rotation_registered(4, regs[2].ticket, Some(9), h.now),
        Some(StoreOp::Remove { epoch: 4, index: 9, conn_id }) if conn_id == closed
    ));
    assert_eq!(h.shared.rotation_registrations_pending(), 0);
    assert_eq!(h.shared.keys_pending(), 1);
    assert_eq!(h.shared.connections_per_epoch(), vec![(4, 1), (3, 3)]);
}

/// Cluster mode: a rotation's registration that met an unavailable store is sent again with
/// a new ticket a few times at once, then waits (its keys still pending) until the link is
/// back, and is placed then.
#[test]
fn clustered_rotation_registrations_refused_as_unavailable_are_sent_again() {
    let mut h = Harness::default();
    h.register(1, addr("10.0.0.1:4000"));
    let grace = Ticks(h.now.0 + 600 * TICKS_PER_SECOND);
    let (_, regs) = h.shared.rotate_clustered(epoch_crypto(4), h.now, grace);
    assert_eq!(regs.len(), 1);
    let mut ticket = regs[0].ticket;
    for _ in 0..RETRIES_AT_ONCE {
        let again = h
            .shared
            .rotation_refused(4, ticket, true)
            .expect("sent again at once");
        assert_ne!(again.ticket, ticket);
        assert_eq!((again.conn_id, again.secret.0), (1, regs[0].secret.0));
        ticket = again.ticket;
    }
    // Enough at once: it waits, still pending, with nothing sent.
    assert!(h.shared.rotation_refused(4, ticket, true).is_none());
    assert_eq!(h.shared.rotation_registrations_pending(), 0);
    assert_eq!(h.shared.keys_pending(), 1);
    assert!(h.tick().is_empty());
    // The link is back: sent again, and placed.
    let back = h.shared.rotation_unplaced();
    assert_eq!(back.len(), 1);
    assert!(h.shared.rotation_unplaced().is_empty(), "once");
    assert!(
        h.shared
            .rotation_registered(4, back[0].ticket, Some(3), h.now)
            .is_none()
    );
    assert_eq!(h.tick().len(), 1, "its EPOCH_KEYS");
    assert!(h.shared.rotation_unplaced().is_empty());
    // An old ticket's late refusal changes nothing.
    assert!(h.shared.rotation_refused(4, ticket, true).is_none());
}

/// KEYS and KEYS_ACK (PROTOCOL-EXT.md "Key delivery") cross the gateway like DATA: a KEYS
/// from the owning host goes to the client's tuple, a KEYS_ACK from a bound tuple to the
/// host; a KEYS_ACK from an unknown tuple is dropped, counted, and draws no UNRECOGNIZED.
#[test]
fn keys_and_keys_ack_are_forwarded_like_data() {
    use crate::wire::{KEYS_ACK_LEN, NewKeys, keys_len, seal_keys, seal_keys_ack};
    let mut h = Harness::default();
    let a = addr("10.0.0.1:4000");
    let issued = h.register(77, a);
    let kd = crypto_key();
    let keys = NewKeys {
        epoch: 4,
        index: 1,
        rebind_secret: issued.secret.0,
        slot_keys: issued.keys.clone(),
    };
    let mut k = vec![0u8; keys_len(S)];
    let n = seal_keys(&kd, 0, &keys, &mut k);
    let mut back = [0u8; 1024];
    let m = hostlink::emit_conn_data(LinkType::ToClientData, 77, &k[..n], &mut back);
    let host = h.host_addr;
    let out = h.feed(&[(Via::Host, host, &back[..m])]);
    assert_eq!(out, vec![(Via::Client(0), a, k[..n].to_vec())]);

    let mut ack = [0u8; KEYS_ACK_LEN];
    seal_keys_ack(&kd, 0, 4, 0, &mut ack);
    let out = h.client(a, &ack);
    assert_eq!(out.len(), 1);
    assert_eq!(
        hostlink::parse_conn_data(&out[0].2).unwrap(),
        (77, &ack[..])
    );
    assert_eq!(h.count(C::RxKeysAck), 1);
    assert!(h.client(addr("10.0.0.9:1"), &ack).is_empty());
    assert_eq!(h.count(C::DropKeysAckUnknownTuple), 1);
    assert_eq!(h.count(C::UnrecognizedSent), 0);
}

fn crypto_key() -> Gcm {
    crate::crypto::gcm(&[0x33; 16])
}
