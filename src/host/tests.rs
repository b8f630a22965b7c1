//! HostCore against a simulated gateway and clock, and the driver over real sockets.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::crypto::Gcm;
use proptest::prelude::*;

use super::*;
use crate::crypto;
use crate::host::clients::{ClientEntry, ClientsFile, enroll};
use crate::host::sansio::MAX_UNPROVEN_PER_CLIENT;
use crate::hostlink::{self, Control, LinkKey, LinkType, RegisterFailure};
use crate::keys::{EpochKeys, MasterSecret};
use crate::registry::Registry;
use crate::time::Ticks;
use crate::wire::{
    ClientCredentials, DataView, HandshakeReply, build_handshake, open_handshake_reply, seal_data,
};

const T0: Ticks = Ticks(639_028_224_000_000_000); // 2026-01-01
const EPOCH: u32 = 300;
const SLOTS: usize = 16;

fn gw() -> SocketAddr {
    "10.0.0.1:7000".parse().unwrap()
}
fn gw2() -> SocketAddr {
    "10.0.0.2:7001".parse().unwrap()
}
fn client_tuple() -> SocketAddr {
    "198.51.100.7:40000".parse().unwrap()
}

fn creds(n: u8) -> ClientCredentials {
    ClientCredentials {
        client_id: [n; 16],
        psk: [n.wrapping_add(100); 32],
    }
}

fn clients(ns: &[u8]) -> ClientsFile {
    ClientsFile::from_entries(
        ns.iter()
            .map(|&n| ClientEntry {
                name: format!("c{n}"),
                creds: creds(n),
            })
            .collect(),
    )
}

/// One datagram in, the answer (if any) out: `handle` then one `poll_transmit`.
fn handle(
    core: &mut HostCore,
    now: Ticks,
    from: SocketAddr,
    d: &[u8],
    out: &mut [u8],
) -> Option<Outgoing> {
    core.handle(now, from, d);
    core.poll_transmit(now, out)
}

/// Runs the timers and collects everything they sent.
fn timeout(core: &mut HostCore, now: Ticks) -> Vec<Transmit> {
    core.handle_timeout(now);
    drain(core, now)
}

/// Everything waiting in `poll_transmit`.
fn drain(core: &mut HostCore, now: Ticks) -> Vec<Transmit> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut sent = Vec::new();
    while let Some(o) = core.poll_transmit(now, &mut buf) {
        sent.push(Transmit {
            to: o.to,
            payload: buf[..o.len].to_vec(),
        });
    }
    sent
}

/// A gateway made from the real key schedule and registry, answering REGISTER.
struct FakeGateway {
    keys: EpochKeys,
    reg: Registry,
    link: Gcm,
    key: LinkKey,
}

impl FakeGateway {
    fn new(link: &LinkKey) -> Self {
        FakeGateway {
            keys: EpochKeys::derive(&MasterSecret::from_bytes([5; 32]), EPOCH, SLOTS).unwrap(),
            reg: Registry::new(SLOTS),
            link: link.cipher(),
            key: link.clone(),
        }
    }

    fn link_key(&self) -> &LinkKey {
        &self.key
    }

    /// Opens a REGISTER and returns `(request, conn_id, client)`.
    fn open_register(&self, now: Ticks, d: &[u8]) -> (u64, u64, SocketAddr) {
        match Control::open(d, &self.link, now).unwrap() {
            Control::Register {
                request,
                conn_id,
                client,
                ..
            } => (request, conn_id, client),
            other => panic!("expected REGISTER, got {other:?}"),
        }
    }

    /// Registers and returns the sealed REGISTERED plus what it issued `(index, R)`.
    fn answer(&mut self, now: Ticks, d: &[u8]) -> (Vec<u8>, u32, [u8; 32]) {
        let (request, conn_id, client) = self.open_register(now, d);
        let r = self.reg.register(conn_id, 0, Some(client)).unwrap();
        let msg = Control::Registered {
            request,
            conn_id,
            epoch: EPOCH,
            index: r.index,
            rebind_secret: r.secret.0,
            slot_keys: self.keys.client_keys(r.index).to_vec(),
        };
        (msg.seal(&self.link, now), r.index, r.secret.0)
    }
}

struct Sim {
    core: HostCore,
    gw: FakeGateway,
    link: LinkKey,
    out: Vec<u8>,
}

/// The gateways of the simulations: `gw()` and `gw2()`.
fn sim_config() -> HostConfig {
    HostConfig {
        gateways: vec!["10.0.0.0/24".parse().unwrap()],
        ..HostConfig::default()
    }
}

fn sim() -> Sim {
    let link = LinkKey([9; 16]);
    let mut core = HostCore::with_config(&link, clients(&[1, 2]), sim_config());
    ack_hello(&mut core, &link, T0);
    Sim {
        core,
        gw: FakeGateway::new(&link),
        link,
        out: vec![0u8; MAX_DATAGRAM],
    }
}

/// What the gateway does with the host's HELLO: acknowledge its boot id.
fn ack_hello(core: &mut HostCore, link: &LinkKey, now: Ticks) {
    let ack = Control::HelloAck {
        boot: core.boot(),
        released: 0,
    }
    .seal(&link.cipher(), now);
    assert!(handle(core, now, gw(), &ack, &mut [0u8; 64]).is_none());
    assert!(core.hello_acked());
}

/// TO_HOST_HANDSHAKE for `raw` from `tuple`, MACed under `link`.
fn frame_handshake(link: &LinkKey, tuple: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; raw.len() + 40];
    let n = hostlink::emit_handshake(&link.handshake_mac(), &tuple, raw, &mut buf);
    buf.truncate(n);
    buf
}

fn to_host_handshake(c: &ClientCredentials, nonce: [u8; 16], ticks: Ticks) -> Vec<u8> {
    frame_handshake(
        &LinkKey([9; 16]),
        client_tuple(),
        &build_handshake(c, &nonce, ticks),
    )
}

impl Sim {
    fn feed(&mut self, now: Ticks, from: SocketAddr, d: &[u8]) -> Option<(SocketAddr, Vec<u8>)> {
        let s = handle(&mut self.core, now, from, d, &mut self.out)?;
        Some((s.to, self.out[..s.len].to_vec()))
    }

    /// A whole handshake for client `n`; returns the reply and what the gateway issued.
    fn handshake(&mut self, now: Ticks, n: u8, nonce: [u8; 16]) -> (HandshakeReply, u32, [u8; 32]) {
        let (to, reg) = self
            .feed(now, gw(), &to_host_handshake(&creds(n), nonce, now))
            .expect("REGISTER");
        assert_eq!(to, gw());
        let (registered, index, r) = self.gw.answer(now, &reg);
        let (to, framed) = self.feed(now, gw(), &registered).expect("TO_CLIENT_REPLY");
        assert_eq!(to, gw());
        let (tuple, inner) = hostlink::parse_tuple_data(&framed).unwrap();
        assert_eq!(framed[0], LinkType::ToClientReply as u8);
        assert_eq!(tuple, client_tuple());
        let reply = open_handshake_reply(inner, &creds(n).psk, &nonce).unwrap();
        (reply, index, r)
    }

    /// Sends DATA `seq` with `payload` under `key` from `from`; returns the echo, if any.
    fn data(
        &mut self,
        now: Ticks,
        from: SocketAddr,
        conn_id: u64,
        key: &[u8; 16],
        seq: u64,
        payload: &[u8],
    ) -> Option<(SocketAddr, Vec<u8>)> {
        let mut d = vec![0u8; payload.len() + 25];
        seal_data(&crypto::gcm(key), seq, payload, &mut d);
        let mut framed = vec![0u8; d.len() + 9];
        hostlink::emit_conn_data(LinkType::ToHostData, conn_id, &d, &mut framed);
        self.feed(now, from, &framed)
    }
}

/// Opens an echoed TO_CLIENT_DATA: `(conn_id, seq, payload)`.
fn open_echo(framed: &[u8], kd_s2c: &[u8; 16]) -> (u64, u64, Vec<u8>) {
    assert_eq!(framed[0], LinkType::ToClientData as u8);
    let (conn_id, inner) = hostlink::parse_conn_data(framed).unwrap();
    let v = DataView::new_checked(inner).unwrap();
    let mut p = vec![0u8; v.payload_len()];
    v.open(&crypto::gcm(kd_s2c), &mut p).unwrap();
    (conn_id, v.seq(), p)
}

#[test]
fn full_handshake_matches_registration() {
    let mut s = sim();
    let (reply, index, r) = s.handshake(T0, 1, [7; 16]);
    assert_eq!(reply.index, index);
    assert_eq!(reply.epoch_byte, EPOCH as u8);
    assert_eq!(reply.rebind_secret, r);
    assert_eq!(reply.slot_keys, s.gw.keys.client_keys(index).to_vec());
    assert_eq!(reply.slot_keys.len(), SLOTS);
    assert_eq!(s.gw.reg.get(index).unwrap().conn_id, reply.conn_id);
    assert_ne!(reply.kd_c2s, reply.kd_s2c);
    assert_eq!(s.core.connections(), 1);
    assert_eq!(s.core.pending(), 0);
    assert_eq!(s.core.gateway_of(reply.conn_id), Some(gw()));
    let c = s.core.counters();
    assert_eq!(
        (c.handshakes_ok, c.registrations, c.register_sent),
        (1, 1, 1)
    );
    // A second client gets a different conn_id.
    let (r2, _, _) = s.handshake(T0, 2, [8; 16]);
    assert_ne!(r2.conn_id, reply.conn_id);
}

#[test]
fn unknown_client_and_bad_aead_dropped() {
    let mut s = sim();
    assert!(
        s.feed(T0, gw(), &to_host_handshake(&creds(3), [1; 16], T0))
            .is_none()
    );
    assert_eq!(s.core.counters().handshake_unknown_client, 1);
    let mut raw = build_handshake(&creds(1), &[1; 16], T0);
    raw[40] ^= 1; // inside the sealed ticks
    let hs = frame_handshake(&s.link, client_tuple(), &raw);
    assert!(s.feed(T0, gw(), &hs).is_none());
    // A wrong psk under a known id.
    let wrong = ClientCredentials {
        client_id: [1; 16],
        psk: [0; 32],
    };
    assert!(
        s.feed(T0, gw(), &to_host_handshake(&wrong, [2; 16], T0))
            .is_none()
    );
    assert_eq!(s.core.counters().handshake_bad_aead, 2);
    // Forged handshakes do not burn the nonce: the real one still works.
    s.handshake(T0, 1, [1; 16]);
    // Too short (the gateway never forwards < 640) and junk.
    let raw = build_handshake(&creds(1), &[3; 16], T0);
    let short = frame_handshake(&s.link, client_tuple(), &raw[..180]);
    assert!(s.feed(T0, gw(), &short).is_none());
    assert_eq!(s.core.counters().handshake_malformed, 1);
}

#[test]
fn stale_ticks_rejected() {
    let mut s = sim();
    let eleven = Duration::from_secs(11 * 60);
    for t in [T0.saturating_sub(eleven), T0.saturating_add(eleven)] {
        assert!(
            s.feed(T0, gw(), &to_host_handshake(&creds(1), [4; 16], t))
                .is_none()
        );
    }
    assert_eq!(s.core.counters().handshake_stale_ticks, 2);
    // Nine minutes off is fine.
    let t = T0.saturating_sub(Duration::from_secs(9 * 60));
    assert!(
        s.feed(T0, gw(), &to_host_handshake(&creds(1), [4; 16], t))
            .is_some()
    );
}

#[test]
fn replayed_nonce_rejected() {
    let mut s = sim();
    s.handshake(T0, 1, [5; 16]);
    // After the kept reply expires (30 s), the same handshake is a replay.
    let later = T0.saturating_add(Duration::from_secs(31));
    let hs = to_host_handshake(&creds(1), [5; 16], T0);
    assert!(s.feed(later, gw(), &hs).is_none());
    assert_eq!(s.core.counters().handshake_replayed_nonce, 1);
    // Within 30 s but from another client tuple: also a replay, no reply aimed elsewhere.
    let mut s = sim();
    s.handshake(T0, 1, [5; 16]);
    let other: SocketAddr = "203.0.113.9:1".parse().unwrap();
    let raw = build_handshake(&creds(1), &[5; 16], T0);
    let moved = frame_handshake(&s.link, other, &raw);
    assert!(s.feed(T0, gw(), &moved).is_none());
    assert_eq!(s.core.counters().handshake_replayed_nonce, 1);
    // Nonces are forgotten only once no copy could pass the ticks check.
    let nine = T0.saturating_add(Duration::from_secs(9 * 60));
    timeout(&mut s.core, nine);
    assert!(s.feed(nine, gw(), &hs).is_none());
    assert_eq!(s.core.counters().handshake_replayed_nonce, 2);
    let much_later = T0.saturating_add(Duration::from_secs(25 * 60));
    timeout(&mut s.core, much_later);
    assert!(s.feed(much_later, gw(), &hs).is_none());
    assert_eq!(s.core.counters().handshake_stale_ticks, 1);
}

#[test]
fn register_retransmitted_then_given_up() {
    let mut s = sim();
    let (_, reg) = s
        .feed(T0, gw(), &to_host_handshake(&creds(1), [6; 16], T0))
        .unwrap();
    let (req, conn_id, _) = s.gw.open_register(T0, &reg);
    let step = Duration::from_millis(500);
    assert_eq!(s.core.poll_timeout(), Some(T0.saturating_add(step)));
    assert!(timeout(&mut s.core, T0.saturating_add(Duration::from_millis(499))).is_empty());
    let mut now = T0;
    for _ in 0..4 {
        now = now.saturating_add(step);
        let t = timeout(&mut s.core, now);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].to, gw());
        let (r2, c2, _) = s.gw.open_register(now, &t[0].payload);
        assert_eq!((r2, c2), (req, conn_id));
    }
    now = now.saturating_add(step);
    assert!(timeout(&mut s.core, now).is_empty());
    let c = s.core.counters();
    assert_eq!(
        (c.register_sent, c.register_retransmits, c.register_timeouts),
        (1, 4, 1)
    );
    assert_eq!(s.core.pending(), 0);
    assert_eq!(s.core.poll_timeout(), None);
    // A late REGISTERED is ignored; the handshake must be redone with a new nonce.
    let (late, _, _) = s.gw.answer(now, &reg);
    assert!(s.feed(now, gw(), &late).is_none());
    assert_eq!(s.core.counters().control_unknown_request, 1);
    assert_eq!(s.core.connections(), 0);
    assert!(
        s.feed(now, gw(), &to_host_handshake(&creds(1), [6; 16], T0))
            .is_none()
    );
    assert_eq!(s.core.counters().handshake_replayed_nonce, 1);
}

#[test]
fn register_failed_drops_pending() {
    let mut s = sim();
    let (_, reg) = s
        .feed(T0, gw(), &to_host_handshake(&creds(1), [6; 16], T0))
        .unwrap();
    let (request, conn_id, _) = s.gw.open_register(T0, &reg);
    let failed = Control::RegisterFailed {
        request,
        conn_id,
        reason: RegisterFailure::Full as u8,
    }
    .seal(&s.link.cipher(), T0);
    assert!(s.feed(T0, gw(), &failed).is_none());
    assert_eq!(s.core.counters().register_failed, 1);
    assert_eq!(s.core.pending(), 0);
    assert!(timeout(&mut s.core, T0.saturating_add(Duration::from_secs(1))).is_empty());
}

#[test]
fn duplicate_handshake_gets_same_reply_without_second_register() {
    let mut s = sim();
    let hs = to_host_handshake(&creds(1), [9; 16], T0);
    let (_, reg) = s.feed(T0, gw(), &hs).unwrap();
    // While REGISTER is outstanding: ignored.
    assert!(s.feed(T0, gw(), &hs).is_none());
    assert_eq!(s.core.counters().handshake_dup_pending, 1);
    let (registered, _, _) = s.gw.answer(T0, &reg);
    let (_, first) = s.feed(T0, gw(), &registered).unwrap();
    // After: the very same reply, from whichever worker forwarded the retransmission.
    let t = T0.saturating_add(Duration::from_secs(2));
    let (to, again) = s.feed(t, gw2(), &hs).unwrap();
    assert_eq!(to, gw2());
    assert_eq!(again, first);
    let c = s.core.counters();
    assert_eq!(
        (c.register_sent, c.handshake_reply_resent, c.registrations),
        (1, 1, 1)
    );
    assert_eq!(s.core.connections(), 1);
}

#[test]
fn every_reply_has_a_fresh_server_nonce_and_resends_are_identical() {
    let mut s = sim();
    // The inner HANDSHAKE_REPLY of a TO_CLIENT_REPLY, and its server nonce.
    let server_nonce = |framed: &[u8]| -> [u8; 16] {
        let (_, inner) = hostlink::parse_tuple_data(framed).unwrap();
        assert_eq!(inner.len(), 127 + 16 * SLOTS);
        inner[17..33].try_into().unwrap()
    };
    let mut replies = Vec::new();
    for nonce in [[1; 16], [2; 16]] {
        let hs = to_host_handshake(&creds(1), nonce, T0);
        let (_, reg) = s.feed(T0, gw(), &hs).unwrap();
        let (registered, _, _) = s.gw.answer(T0, &reg);
        let (_, framed) = s.feed(T0, gw(), &registered).unwrap();
        let (_, inner) = hostlink::parse_tuple_data(&framed).unwrap();
        open_handshake_reply(inner, &creds(1).psk, &nonce).unwrap();
        // A byte-identical retransmission gets the very bytes sent before, not a new seal.
        let (_, again) = s.feed(T0, gw(), &hs).unwrap();
        assert_eq!(again, framed);
        replies.push(framed);
    }
    assert_ne!(server_nonce(&replies[0]), server_nonce(&replies[1]));
    assert_ne!(server_nonce(&replies[0]), [0; 16]);
    // Another HANDSHAKE under a used client nonce (other ticks) is not a retransmission: no
    // reply at all, so nothing is ever sealed twice for one client nonce.
    let other = to_host_handshake(
        &creds(1),
        [1; 16],
        T0.saturating_add(Duration::from_secs(1)),
    );
    assert!(s.feed(T0, gw(), &other).is_none());
    let c = s.core.counters();
    assert_eq!(
        (c.handshake_reply_resent, c.handshake_replayed_nonce),
        (2, 1)
    );
    assert_eq!(c.registrations, 2);
}

#[test]
fn data_echo_roundtrip_replay_and_wrong_key() {
    let mut s = sim();
    let (reply, _, _) = s.handshake(T0, 1, [3; 16]);
    let id = reply.conn_id;
    let (to, e) = s.data(T0, gw(), id, &reply.kd_c2s, 0, b"hello").unwrap();
    assert_eq!(to, gw());
    assert_eq!(open_echo(&e, &reply.kd_s2c), (id, 0, b"hello".to_vec()));
    // Empty payload, echoed with the next send seq.
    let (_, e) = s.data(T0, gw(), id, &reply.kd_c2s, 1, b"").unwrap();
    assert_eq!(open_echo(&e, &reply.kd_s2c), (id, 1, vec![]));
    // Out of order is fine; replays are not.
    let (_, e) = s.data(T0, gw(), id, &reply.kd_c2s, 5, &[0; 24]).unwrap();
    assert_eq!(open_echo(&e, &reply.kd_s2c), (id, 2, vec![0; 24]));
    assert!(s.data(T0, gw(), id, &reply.kd_c2s, 0, b"hello").is_none());
    assert_eq!(s.core.counters().data_replay, 1);
    // Wrong key (the s2c one), unknown conn_id, garbage.
    assert!(s.data(T0, gw(), id, &reply.kd_s2c, 9, b"x").is_none());
    assert_eq!(s.core.counters().data_bad_aead, 1);
    assert!(s.data(T0, gw(), id ^ 1, &reply.kd_c2s, 9, b"x").is_none());
    assert_eq!(s.core.counters().data_unknown_conn, 1);
    assert!(
        s.feed(T0, gw(), &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0x44])
            .is_none()
    );
    assert_eq!(s.core.counters().data_malformed, 1);
    // The window still accepts seq 9 after the failed attempts (failures never move it).
    assert!(s.data(T0, gw(), id, &reply.kd_c2s, 9, b"x").is_some());
    let c = s.core.counters();
    assert_eq!((c.echoes, c.echo_bytes), (4, 5 + 24 + 1));
    // Output too small: counted, nothing written.
    let mut d = vec![0u8; 30];
    seal_data(&crypto::gcm(&reply.kd_c2s), 10, b"hello", &mut d);
    let mut framed = vec![0u8; 39];
    hostlink::emit_conn_data(LinkType::ToHostData, id, &d, &mut framed);
    assert!(handle(&mut s.core, T0, gw(), &framed, &mut [0u8; 20]).is_none());
    assert_eq!(s.core.counters().out_too_small, 1);
}

#[test]
fn rebound_moves_gateway_and_bad_key_control_dropped() {
    let mut s = sim();
    let (reply, _, _) = s.handshake(T0, 1, [3; 16]);
    let id = reply.conn_id;
    let rebound = Control::Rebound {
        conn_id: id,
        t: T0,
        old: Some(client_tuple()),
        new: "198.51.100.7:40001".parse().unwrap(),
    };
    // Under another key: dropped.
    let forged = rebound.seal(&LinkKey([1; 16]).cipher(), T0);
    assert!(s.feed(T0, gw2(), &forged).is_none());
    assert_eq!(s.core.counters().control_bad_tag, 1);
    assert_eq!(s.core.gateway_of(id), Some(gw()));
    // Under the link key: the connection now answers via the worker that sent it.
    assert!(
        s.feed(T0, gw2(), &rebound.seal(&s.link.cipher(), T0))
            .is_none()
    );
    assert_eq!(s.core.counters().rebounds, 1);
    assert_eq!(s.core.gateway_of(id), Some(gw2()));
    let (to, _) = s.data(T0, gw2(), id, &reply.kd_c2s, 0, b"hi").unwrap();
    assert_eq!(to, gw2());
    // DATA forwarded by yet another worker moves it again.
    let (to, _) = s.data(T0, gw(), id, &reply.kd_c2s, 1, b"hi").unwrap();
    assert_eq!(to, gw());
    // Unknown conn_id in REBOUND is counted.
    let stray = Control::Rebound {
        conn_id: id ^ 1,
        t: T0,
        old: None,
        new: client_tuple(),
    };
    assert!(
        s.feed(T0, gw(), &stray.seal(&s.link.cipher(), T0))
            .is_none()
    );
    assert_eq!(s.core.counters().rebound_unknown_conn, 1);
}

#[test]
fn replayed_rebound_cannot_move_the_gateway() {
    let mut s = sim();
    let (reply, _, _) = s.handshake(T0, 1, [3; 16]);
    let id = reply.conn_id;
    let rebound = Control::Rebound {
        conn_id: id,
        t: T0,
        old: None,
        new: client_tuple(),
    }
    .seal(&s.link.cipher(), T0);
    assert!(s.feed(T0, gw2(), &rebound).is_none());
    assert_eq!(s.core.gateway_of(id), Some(gw2()));
    s.data(T0, gw(), id, &reply.kd_c2s, 0, b"x").unwrap();
    assert_eq!(s.core.gateway_of(id), Some(gw()));
    // The captured REBOUND again, well within its validity.
    assert!(s.feed(T0, gw2(), &rebound).is_none());
    assert_eq!(s.core.gateway_of(id), Some(gw()));
    assert_eq!(s.core.counters().control_replay, 1);
    // A fresh REBOUND older than the one taken (reordered between workers) is ignored.
    let older = Control::Rebound {
        conn_id: id,
        t: Ticks(T0.0 - 1),
        old: None,
        new: client_tuple(),
    };
    assert!(
        s.feed(T0, gw2(), &older.seal(&s.link.cipher(), T0))
            .is_none()
    );
    assert_eq!(s.core.gateway_of(id), Some(gw()));
    assert_eq!(s.core.counters().rebound_stale, 1);
}

#[test]
fn datagrams_from_unconfigured_sources_are_dropped() {
    let mut s = sim();
    let stranger: SocketAddr = "203.0.113.9:7000".parse().unwrap();
    assert!(
        s.feed(T0, stranger, &to_host_handshake(&creds(1), [3; 16], T0))
            .is_none()
    );
    assert_eq!(s.core.pending(), 0);
    assert_eq!(s.core.counters().link_unknown_source, 1);
    // Networks, any port; IPv4 seen through a dual-stack socket is IPv4.
    let net: GatewayNet = "10.0.0.0/24".parse().unwrap();
    assert!(net.contains("10.0.0.200".parse().unwrap()));
    assert!(net.contains("::ffff:10.0.0.1".parse().unwrap()));
    assert!(!net.contains("10.0.1.1".parse().unwrap()));
    let one: GatewayNet = "fd00::7".parse().unwrap();
    assert!(one.contains("fd00::7".parse().unwrap()) && !one.contains("fd00::8".parse().unwrap()));
    assert!(
        "0.0.0.0/0"
            .parse::<GatewayNet>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap())
    );
    assert!("10.0.0.0/33".parse::<GatewayNet>().is_err());
    assert!("nope".parse::<GatewayNet>().is_err());
    assert!(
        GatewayNet::loopback()
            .iter()
            .any(|n| n.contains("127.0.0.1".parse().unwrap()))
    );
}

#[test]
fn unauthenticated_to_host_handshake_is_refused() {
    let mut s = sim();
    let hs = build_handshake(&creds(1), &[3; 16], T0);
    let mut plain = vec![0u8; hs.len() + 40];
    let n = hostlink::emit_tuple_data(LinkType::ToHostHandshake, &client_tuple(), &hs, &mut plain);
    assert!(s.feed(T0, gw(), &plain[..n]).is_none());
    assert_eq!(s.core.pending(), 0);
    // MACed, then moved to another tuple on the way: refused too.
    let mut moved = to_host_handshake(&creds(1), [3; 16], T0);
    moved[2] ^= 1;
    assert!(s.feed(T0, gw(), &moved).is_none());
    // Under another link key.
    let other = frame_handshake(&LinkKey([1; 16]), client_tuple(), &hs);
    assert!(s.feed(T0, gw(), &other).is_none());
    assert_eq!(s.core.counters().handshake_bad_mac, 3);
    assert_eq!(s.core.counters().handshakes_ok, 0);
    // The genuine one is taken.
    s.handshake(T0, 1, [3; 16]);
}

#[test]
fn first_register_waits_for_the_hello_ack() {
    let link = LinkKey([9; 16]);
    let mut core = HostCore::with_config(&link, clients(&[1]), sim_config());
    let mut out = vec![0u8; 2048];
    let hs = to_host_handshake(&creds(1), [1; 16], T0);
    let o = handle(&mut core, T0, gw(), &hs, &mut out).expect("HELLO");
    assert_eq!(o.to, gw());
    assert_eq!(
        Control::open(&out[..o.len], &link.cipher(), T0),
        Ok(Control::Hello { boot: core.boot() })
    );
    assert_eq!(core.pending(), 1);
    // Retransmitted until acknowledged; the REGISTER is held.
    let later = T0.saturating_add(Duration::from_secs(1));
    let sent = timeout(&mut core, later);
    assert_eq!(sent.len(), 1);
    assert!(matches!(
        Control::open(&sent[0].payload, &link.cipher(), later),
        Ok(Control::Hello { .. })
    ));
    // An ack for another run's boot does nothing.
    let wrong = Control::HelloAck {
        boot: core.boot() ^ 1,
        released: 0,
    };
    handle(
        &mut core,
        later,
        gw(),
        &wrong.seal(&link.cipher(), later),
        &mut out,
    );
    assert!(!core.hello_acked());
    assert_eq!(core.counters().hello_ack_wrong_boot, 1);
    ack_hello(&mut core, &link, later);
    assert_eq!(core.poll_timeout(), Some(Ticks(0)));
    let sent = timeout(&mut core, later);
    assert_eq!(sent.len(), 1, "the held REGISTER, and no more HELLO");
    assert!(matches!(
        Control::open(&sent[0].payload, &link.cipher(), later),
        Ok(Control::Register { boot, .. }) if boot == core.boot()
    ));
    assert_eq!(core.counters().hello_sent, 2);
}

#[test]
fn expired_connection_is_forgotten_without_a_close() {
    let mut s = sim();
    let (reply, _, _) = s.handshake(T0, 1, [3; 16]);
    let expired = Control::Expired {
        conn_id: reply.conn_id,
    }
    .seal(&s.link.cipher(), T0);
    assert!(s.feed(T0, gw(), &expired).is_none());
    assert_eq!(s.core.connections(), 0);
    assert!(timeout(&mut s.core, T0).is_empty(), "no CLOSE for it");
    assert_eq!(s.core.counters().expired_by_gateway, 1);
    let again = Control::Expired {
        conn_id: reply.conn_id,
    }
    .seal(&s.link.cipher(), T0);
    assert!(s.feed(T0, gw(), &again).is_none());
    assert_eq!(s.core.counters().expired_unknown_conn, 1);
}

#[test]
fn close_sends_close_and_forgets() {
    let mut s = sim();
    let (reply, _, _) = s.handshake(T0, 1, [3; 16]);
    assert!(s.core.close(T0, reply.conn_id));
    let t = drain(&mut s.core, T0).pop().unwrap();
    assert_eq!(t.to, gw());
    match Control::open(&t.payload, &s.link.cipher(), T0).unwrap() {
        Control::Close { conn_id, .. } => assert_eq!(conn_id, reply.conn_id),
        other => panic!("{other:?}"),
    }
    assert!(!s.core.close(T0, reply.conn_id));
    assert_eq!(s.core.connections(), 0);
    assert!(
        s.data(T0, gw(), reply.conn_id, &reply.kd_c2s, 0, b"x")
            .is_none()
    );
    let closed = Control::Closed {
        request: 1,
        conn_id: reply.conn_id,
        found: true,
    };
    s.feed(T0, gw(), &closed.seal(&s.link.cipher(), T0));
    let c = s.core.counters();
    assert_eq!((c.closes_sent, c.closed_acks), (1, 1));
}

#[test]
fn replace_clients_takes_effect_for_new_handshakes() {
    let mut s = sim();
    assert!(
        s.feed(T0, gw(), &to_host_handshake(&creds(7), [1; 16], T0))
            .is_none()
    );
    s.core.replace_clients(clients(&[7]));
    s.handshake(T0, 7, [2; 16]);
    assert!(
        s.feed(T0, gw(), &to_host_handshake(&creds(1), [3; 16], T0))
            .is_none()
    );
    assert_eq!(s.core.counters().handshake_unknown_client, 2);
}

#[test]
fn caps_refuse_instead_of_evicting() {
    let link = LinkKey([9; 16]);
    let cfg = HostConfig {
        max_nonces: 2,
        ..sim_config()
    };
    let mut core = HostCore::with_config(&link, clients(&[1]), cfg);
    ack_hello(&mut core, &link, T0);
    let mut out = vec![0u8; 2048];
    for i in 0..3u8 {
        let r = handle(
            &mut core,
            T0,
            gw(),
            &to_host_handshake(&creds(1), [i; 16], T0),
            &mut out,
        );
        assert_eq!(r.is_some(), i < 2);
    }
    assert_eq!(core.counters().handshake_busy, 1);
}

#[test]
fn one_client_flooding_nonces_cannot_lock_out_another() {
    // Security item 4: the nonce cache is shared; one credential holder sending fresh nonces
    // must not fill it and make every other client's handshake `busy`.
    let link = LinkKey([9; 16]);
    let cfg = HostConfig {
        max_nonces: 600,
        ..sim_config()
    };
    let mut core = HostCore::with_config(&link, clients(&[1, 2]), cfg);
    ack_hello(&mut core, &link, T0);
    let mut out = vec![0u8; 2048];
    let mut answered = 0;
    for i in 0..1000u32 {
        let mut nonce = [0xf0; 16];
        nonce[..4].copy_from_slice(&i.to_be_bytes());
        let hs = to_host_handshake(&creds(1), nonce, T0);
        answered += usize::from(handle(&mut core, T0, gw(), &hs, &mut out).is_some());
    }
    let quota = HostConfig::default().max_nonces_per_client;
    assert_eq!(answered, quota, "the flooder gets its quota of REGISTERs");
    assert_eq!(core.counters().handshake_client_quota, 1000 - quota as u64);
    let hs = to_host_handshake(&creds(2), [0x22; 16], T0);
    assert!(
        handle(&mut core, T0, gw(), &hs, &mut out).is_some(),
        "client 2 must still get a REGISTER"
    );
    assert_eq!(core.counters().handshake_busy, 0);

    // The quota frees up as the flooder's nonces expire (REGISTERs given up, then 2 windows).
    let mut now = T0;
    for _ in 0..8 {
        now = now.saturating_add(Duration::from_millis(500));
        timeout(&mut core, now);
    }
    let later = T0.saturating_add(Duration::from_secs(21 * 60));
    timeout(&mut core, later);
    let hs = to_host_handshake(&creds(1), [0x11; 16], later);
    assert!(handle(&mut core, later, gw(), &hs, &mut out).is_some());
    assert_eq!(core.counters().handshake_client_quota, 1000 - quota as u64);
}

fn link_type_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(0x01u8),
        Just(0x02),
        Just(0x03),
        Just(0x04),
        0x10u8..=0x15,
        any::<u8>()
    ]
}

proptest! {
    #[test]
    fn core_never_panics(
        msgs in proptest::collection::vec(
            (link_type_byte(), proptest::collection::vec(any::<u8>(), 0..400), any::<bool>(),
             any::<u16>(), 0u64..2_000_000_000),
            1..24),
    ) {
        let mut s = sim();
        let (reply, _, _) = s.handshake(T0, 1, [3; 16]);
        let id = reply.conn_id.to_be_bytes();
        let mut now = T0;
        for (ty, mut body, v6, port, dt) in msgs {
            now = Ticks(now.0 + dt);
            // Half the time, aim at the live connection so the DATA path is exercised.
            if ty == 0x01 && body.len() >= 8 && port % 2 == 0 {
                body[..8].copy_from_slice(&id);
            }
            let mut d = vec![ty];
            d.extend_from_slice(&body);
            let from: SocketAddr = if v6 {
                SocketAddr::new("2001:db8::1".parse().unwrap(), port)
            } else {
                SocketAddr::new([10, 0, 0, (port % 256) as u8].into(), port)
            };
            let _ = handle(&mut s.core, now, from, &d, &mut s.out);
            let _ = handle(&mut s.core, now, from, &d, &mut [0u8; 16]);
            let _ = timeout(&mut s.core, now);
        }
    }
}

// --- The driver over real sockets ----------------------------------------------------------

#[test]
fn spawned_host_over_udp() {
    let start = Instant::now();
    let dir = crate::host::clients::tests::TempDir::new("host");
    let path = dir.0.join("clients.toml");
    let alice = enroll(&path, "alice").unwrap();
    let link = LinkKey::generate();
    let mut opts = HostOptions::new("127.0.0.1:0".parse().unwrap(), path.clone(), link.clone());
    opts.reload_on_sighup = false;
    opts.reload_check = Duration::from_millis(100);
    let host = spawn_host(opts).unwrap();
    let to = host.local_addr();

    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut gw = FakeGateway::new(&link);
    let mut buf = vec![0u8; 4096];
    let mut recv = |sock: &UdpSocket| {
        let (n, from) = sock.recv_from(&mut buf).expect("answer from host");
        assert_eq!(from, to);
        buf[..n].to_vec()
    };

    let handshake = |sock: &UdpSocket,
                     gw: &mut FakeGateway,
                     recv: &mut dyn FnMut(&UdpSocket) -> Vec<u8>,
                     c: &ClientCredentials,
                     nonce: [u8; 16]| {
        let now = Ticks::wall_clock();
        let hs = frame_handshake(
            gw.link_key(),
            client_tuple(),
            &build_handshake(c, &nonce, now),
        );
        sock.send_to(&hs, to).unwrap();
        let mut reg = recv(sock);
        if let Ok(Control::Hello { boot }) = Control::open(&reg, &gw.link, Ticks::wall_clock()) {
            // A new host's first REGISTER waits for its HELLO to be acknowledged.
            let ack = Control::HelloAck { boot, released: 0 };
            sock.send_to(&ack.seal(&gw.link, Ticks::wall_clock()), to)
                .unwrap();
            reg = recv(sock);
        }
        let (registered, index, _) = gw.answer(Ticks::wall_clock(), &reg);
        sock.send_to(&registered, to).unwrap();
        let framed = recv(sock);
        let (tuple, inner) = hostlink::parse_tuple_data(&framed).unwrap();
        assert_eq!(tuple, client_tuple());
        let reply = open_handshake_reply(inner, &c.psk, &nonce).unwrap();
        assert_eq!(reply.index, index);
        reply
    };

    let reply = handshake(&sock, &mut gw, &mut recv, &alice.creds, [1; 16]);
    for seq in 0..3u64 {
        let payload = vec![seq as u8; seq as usize * 10];
        let mut d = vec![0u8; payload.len() + 25];
        seal_data(&crypto::gcm(&reply.kd_c2s), seq, &payload, &mut d);
        let mut framed = vec![0u8; d.len() + 9];
        hostlink::emit_conn_data(LinkType::ToHostData, reply.conn_id, &d, &mut framed);
        sock.send_to(&framed, to).unwrap();
        let e = recv(&sock);
        assert_eq!(open_echo(&e, &reply.kd_s2c), (reply.conn_id, seq, payload));
    }

    // The clients file is re-read when it changes.
    let bob = enroll(&path, "bob").unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    while host.stats().reloads == 0 {
        assert!(Instant::now() < deadline, "no reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    handshake(&sock, &mut gw, &mut recv, &bob.creds, [2; 16]);

    let stats = host.stop().unwrap();
    assert_eq!(stats.counters.echoes, 3);
    assert_eq!(stats.counters.registrations, 2);
    assert_eq!(stats.connections, 2);
    assert_eq!(stats.clients, 2);
    assert_eq!(stats.send_errors, 0);
    let json = serde_json::to_value(&stats).unwrap();
    assert_eq!(json["echoes"], 3);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn spawn_refuses_exposed_clients_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = crate::host::clients::tests::TempDir::new("host-perm");
    let path = dir.0.join("clients.toml");
    enroll(&path, "alice").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut opts = HostOptions::new("127.0.0.1:0".parse().unwrap(), path, LinkKey([1; 16]));
    opts.reload_on_sighup = false;
    let e = spawn_host(opts).unwrap_err().to_string();
    assert!(e.contains("chmod 600"), "{e}");
}

fn closes_in(s: &mut Sim, now: Ticks) -> Vec<u64> {
    timeout(&mut s.core, now)
        .iter()
        .filter_map(|t| match Control::open(&t.payload, &s.link.cipher(), now) {
            Ok(Control::Close { conn_id, .. }) => Some(conn_id),
            _ => None,
        })
        .collect()
}

#[test]
fn the_connection_a_client_uses_closes_its_other_attempts() {
    let mut s = sim();
    let (first, _, _) = s.handshake(T0, 1, [3; 16]);
    let (other, _, _) = s.handshake(T0, 2, [4; 16]);
    let (second, _, _) = s.handshake(T0, 1, [5; 16]);
    assert_eq!(
        s.core.connections(),
        3,
        "both attempts live until one is used"
    );
    assert!(closes_in(&mut s, T0).is_empty());
    // The client completed on the late reply to its first attempt: that one stays.
    assert!(
        s.data(T0, gw(), first.conn_id, &first.kd_c2s, 0, b"x")
            .is_some()
    );
    assert_eq!(s.core.poll_timeout(), Some(Ticks(0)), "a CLOSE is due");
    assert_eq!(closes_in(&mut s, T0), vec![second.conn_id]);
    assert!(
        s.data(T0, gw(), second.conn_id, &second.kd_c2s, 0, b"x")
            .is_none()
    );
    assert!(
        s.data(T0, gw(), first.conn_id, &first.kd_c2s, 1, b"y")
            .is_some()
    );
    assert!(
        s.data(T0, gw(), other.conn_id, &other.kd_c2s, 0, b"x")
            .is_some()
    );
    assert_eq!(s.core.counters().connections_replaced, 1);
}

#[test]
fn a_client_cannot_pile_up_connections() {
    let mut s = sim();
    let mut ids = Vec::new();
    for n in 0..(MAX_UNPROVEN_PER_CLIENT as u8 + 3) {
        let (r, _, _) = s.handshake(T0, 1, [10 + n; 16]);
        ids.push(r.conn_id);
    }
    assert_eq!(s.core.connections(), MAX_UNPROVEN_PER_CLIENT);
    assert_eq!(
        closes_in(&mut s, T0),
        ids[..3].to_vec(),
        "the oldest go first"
    );
}

#[test]
fn idle_connections_are_closed() {
    let mut s = sim();
    let (busy, _, _) = s.handshake(T0, 1, [3; 16]);
    let (idle, _, _) = s.handshake(T0, 2, [4; 16]);
    let later = T0.saturating_add(HostConfig::default().idle_timeout / 2);
    assert!(
        s.data(later, gw(), busy.conn_id, &busy.kd_c2s, 0, b"x")
            .is_some()
    );
    let after = T0.saturating_add(HostConfig::default().idle_timeout + Duration::from_secs(11));
    let out = timeout(&mut s.core, after);
    let closed: Vec<u64> = out
        .iter()
        .filter_map(
            |t| match Control::open(&t.payload, &s.link.cipher(), after) {
                Ok(Control::Close { conn_id, .. }) => Some(conn_id),
                _ => None,
            },
        )
        .collect();
    assert_eq!(closed, vec![idle.conn_id]);
    assert_eq!(s.core.connections(), 1);
    assert_eq!(s.core.counters().idle_closed, 1);
}

#[test]
fn undrained_echo_is_queued_not_lost() {
    let mut s = sim();
    let (reply, _, _) = s.handshake(T0, 1, [3; 16]);
    let (other, _, _) = s.handshake(T0, 2, [4; 16]);
    // A CLOSE waiting, then two DATA handled before the driver polls: the first echo moves
    // to the owned queue behind the CLOSE.
    assert!(s.core.close(T0, other.conn_id));
    for (seq, p) in [(0u64, &b"one"[..]), (1, &b"two"[..])] {
        let mut d = vec![0u8; p.len() + 25];
        seal_data(&crypto::gcm(&reply.kd_c2s), seq, p, &mut d);
        let mut framed = vec![0u8; d.len() + 9];
        hostlink::emit_conn_data(LinkType::ToHostData, reply.conn_id, &d, &mut framed);
        s.core.handle(T0, gw(), &framed);
    }
    let out = drain(&mut s.core, T0);
    assert_eq!(out.len(), 3);
    assert!(matches!(
        Control::open(&out[0].payload, &s.link.cipher(), T0),
        Ok(Control::Close { conn_id, .. }) if conn_id == other.conn_id
    ));
    let echoes: Vec<_> = out[1..]
        .iter()
        .map(|t| open_echo(&t.payload, &reply.kd_s2c))
        .collect();
    assert_eq!(
        echoes,
        vec![
            (reply.conn_id, 0, b"one".to_vec()),
            (reply.conn_id, 1, b"two".to_vec())
        ]
    );
    // A buffer too small for the echo: dropped and counted, not written past.
    let mut d = vec![0u8; 3 + 25];
    seal_data(&crypto::gcm(&reply.kd_c2s), 2, b"abc", &mut d);
    let mut framed = vec![0u8; d.len() + 9];
    hostlink::emit_conn_data(LinkType::ToHostData, reply.conn_id, &d, &mut framed);
    s.core.handle(T0, gw(), &framed);
    assert_eq!(s.core.poll_transmit(T0, &mut [0u8; 20]), None);
    assert_eq!(s.core.counters().out_too_small, 1);
}

/// Application mode: DATA surfaces as events, `send` answers, keepalives are still echoed,
/// and a closed connection is reported and refused.
#[test]
fn application_mode_surfaces_data_and_sends() {
    let link = LinkKey([9; 16]);
    let cfg = HostConfig {
        echo: false,
        ..sim_config()
    };
    let mut core = HostCore::with_config(&link, clients(&[1, 2]), cfg);
    ack_hello(&mut core, &link, T0);
    let mut s = Sim {
        core,
        gw: FakeGateway::new(&link),
        link,
        out: vec![0u8; MAX_DATAGRAM],
    };
    let (reply, _, _) = s.handshake(T0, 1, [3; 16]);
    let id = reply.conn_id;
    assert!(matches!(
        s.core.poll_event(),
        Some(HostEvent::Connected { conn_id, .. }) if conn_id == id
    ));
    assert!(s.data(T0, gw(), id, &reply.kd_c2s, 0, b"hello").is_none());
    assert_eq!(
        s.core.poll_event(),
        Some(HostEvent::Data {
            conn_id: id,
            payload: b"hello".to_vec()
        })
    );
    s.core.send(id, b"answer").unwrap();
    let o = s.core.poll_transmit(T0, &mut s.out).unwrap();
    assert_eq!(o.to, gw());
    assert_eq!(
        open_echo(&s.out[..o.len], &reply.kd_s2c),
        (id, 0, b"answer".to_vec())
    );
    // A keepalive is answered by the core itself, with the next seq.
    let (_, e) = s.data(T0, gw(), id, &reply.kd_c2s, 1, &[0; 24]).unwrap();
    assert_eq!(open_echo(&e, &reply.kd_s2c), (id, 1, vec![0; 24]));
    assert_eq!(s.core.poll_event(), None);
    assert_eq!(
        s.core.send(id, &[0; MAX_SEND_PAYLOAD + 1]),
        Err(HostSendError::TooLarge {
            len: MAX_SEND_PAYLOAD + 1,
            max: MAX_SEND_PAYLOAD
        })
    );
    assert!(s.core.close(T0, id));
    assert_eq!(s.core.poll_event(), Some(HostEvent::Closed { conn_id: id }));
    assert_eq!(
        s.core.send(id, b"late"),
        Err(HostSendError::UnknownConnection(id))
    );
    let c = s.core.counters();
    assert_eq!((c.app_received, c.app_received_bytes), (1, 5));
    assert_eq!((c.app_sent, c.app_send_refused), (1, 2));
    assert_eq!((c.echoes, c.keepalives_answered), (0, 1));
}

#[test]
fn each_gateway_gets_its_own_hello_and_holds_its_own_registers() {
    let link = LinkKey([9; 16]);
    let mut core = HostCore::with_config(&link, clients(&[1, 2]), sim_config());
    let mut out = vec![0u8; 2048];
    // Gateway 1 learns the boot id; its handshake's REGISTER goes out once it acknowledges.
    let hs1 = to_host_handshake(&creds(1), [1; 16], T0);
    let o = handle(&mut core, T0, gw(), &hs1, &mut out).expect("HELLO to gateway 1");
    assert_eq!(o.to, gw());
    ack_hello(&mut core, &link, T0);
    let sent = timeout(&mut core, T0);
    assert!(matches!(
        Control::open(&sent[0].payload, &link.cipher(), T0),
        Ok(Control::Register { .. })
    ));
    // A second gateway (another address) forwards a handshake: it gets its own HELLO, and
    // its REGISTER waits for its own acknowledgement, not gateway 1's.
    let hs2 = to_host_handshake(&creds(2), [2; 16], T0);
    let o = handle(&mut core, T0, gw2(), &hs2, &mut out).expect("HELLO to gateway 2");
    assert_eq!(o.to, gw2());
    assert_eq!(
        Control::open(&out[..o.len], &link.cipher(), T0),
        Ok(Control::Hello { boot: core.boot() })
    );
    assert!(!core.hello_acked(), "gateway 2 has not acknowledged");
    let later = T0.saturating_add(Duration::from_secs(1));
    let sent = timeout(&mut core, later);
    // Gateway 1's REGISTER is retransmitted (unanswered); gateway 2 gets only its HELLO.
    let to_gw2: Vec<_> = sent.iter().filter(|t| t.to == gw2()).collect();
    assert_eq!(to_gw2.len(), 1);
    assert!(matches!(
        Control::open(&to_gw2[0].payload, &link.cipher(), later),
        Ok(Control::Hello { .. })
    ));
    assert!(sent.iter().filter(|t| t.to == gw()).all(|t| matches!(
        Control::open(&t.payload, &link.cipher(), later),
        Ok(Control::Register { .. })
    )));
    let ack = Control::HelloAck {
        boot: core.boot(),
        released: 0,
    }
    .seal(&link.cipher(), later);
    assert!(handle(&mut core, later, gw2(), &ack, &mut out).is_none());
    assert!(core.hello_acked());
    let sent: Vec<_> = timeout(&mut core, later)
        .into_iter()
        .filter(|t| t.to == gw2())
        .collect();
    assert_eq!(sent.len(), 1);
    assert!(matches!(
        Control::open(&sent[0].payload, &link.cipher(), later),
        Ok(Control::Register { boot, .. }) if boot == core.boot()
    ));
    assert_eq!(core.counters().hello_acked, 2);
}

/// Key delivery, host side (PROTOCOL-EXT.md "Key delivery"): an EPOCH_KEYS entry becomes a
/// KEYS for the client, resent byte for byte (0.5 s, doubling) until its KEYS_ACK; then a
/// KEYS_DELIVERED goes to the gateway. A duplicate entry does not restart the delivery and,
/// once acknowledged, is reported again; forged, replayed or mismatched KEYS_ACKs and
/// entries of an older epoch are dropped and counted.
#[test]
fn epoch_keys_become_keys_resent_until_acknowledged_then_reported() {
    use crate::wire::{EpochKeysEntry, KEYS_ACK_LEN, KEYS_TYPE, NewKeys, open_keys, seal_keys_ack};
    let mut s = sim();
    let (reply, _, _) = s.handshake(T0, 1, [1; 16]);
    let id = reply.conn_id;
    let link = s.link.cipher();
    let next = EpochKeys::derive(&MasterSecret::from_bytes([5; 32]), EPOCH + 1, SLOTS).unwrap();
    let entry = |epoch: u32| EpochKeysEntry {
        conn_id: id,
        keys: NewKeys {
            epoch,
            index: 7,
            rebind_secret: [3; 32],
            slot_keys: next.client_keys(7).to_vec(),
        },
    };
    let epoch_keys = |now: Ticks, epoch: u32, ids: &[u64]| {
        let mut entries: Vec<EpochKeysEntry> = ids.iter().map(|_| entry(epoch)).collect();
        for (e, c) in entries.iter_mut().zip(ids) {
            e.conn_id = *c;
        }
        Control::EpochKeys {
            epoch,
            slots: SLOTS as u8,
            entries,
        }
        .seal(&link, now)
    };
    // The entry for an unknown connection is counted; the client's KEYS goes out at once.
    s.core
        .handle(T0, gw(), &epoch_keys(T0, EPOCH + 1, &[id, 999]));
    let sent = drain(&mut s.core, T0);
    assert_eq!(sent.len(), 1);
    let (conn, keys) = hostlink::parse_conn_data(&sent[0].payload).unwrap();
    assert_eq!((conn, keys[0]), (id, KEYS_TYPE));
    let (kseq, got) = open_keys(&crypto::gcm(&reply.kd_s2c), keys).unwrap();
    assert_eq!((kseq, &got), (0, &entry(EPOCH + 1).keys));
    assert_eq!(s.core.counters().epoch_keys_unknown_conn, 1);
    // Resent unchanged after 0.5 s, then after 1 s more; a duplicate entry changes nothing.
    assert!(timeout(&mut s.core, T0.saturating_add(Duration::from_millis(499))).is_empty());
    let t1 = T0.saturating_add(Duration::from_millis(500));
    assert_eq!(timeout(&mut s.core, t1)[0].payload, sent[0].payload);
    // A duplicate entry (the gateway resent it, from another worker) draws the same KEYS
    // through its sender.
    let worker = SocketAddr::new(gw().ip(), gw().port() + 1);
    s.core.handle(t1, worker, &epoch_keys(t1, EPOCH + 1, &[id]));
    let again = drain(&mut s.core, t1);
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].to, &again[0].payload), (worker, &sent[0].payload));
    assert_eq!(s.core.counters().epoch_keys_duplicate, 1);
    assert!(timeout(&mut s.core, t1.saturating_add(Duration::from_millis(999))).is_empty());
    let t2 = t1.saturating_add(Duration::from_secs(1));
    assert_eq!(timeout(&mut s.core, t2).len(), 1);
    assert_eq!(s.core.counters().keys_resent, 3);
    // KEYS_ACKs: forged, naming other keys, then the right one, then a replay.
    let ack = |aseq: u64, epoch: u32, kseq: u64, key: &[u8; 16]| {
        let mut a = [0u8; KEYS_ACK_LEN];
        seal_keys_ack(&crypto::gcm(key), aseq, epoch, kseq, &mut a);
        let mut framed = vec![0u8; KEYS_ACK_LEN + 9];
        hostlink::emit_conn_data(LinkType::ToHostData, id, &a, &mut framed);
        framed
    };
    s.core
        .handle(t2, gw(), &ack(0, EPOCH + 1, 0, &reply.kd_s2c));
    s.core
        .handle(t2, gw(), &ack(0, EPOCH + 1, 1, &reply.kd_c2s));
    s.core
        .handle(t2, gw(), &ack(1, EPOCH + 1, 0, &reply.kd_c2s));
    s.core
        .handle(t2, gw(), &ack(1, EPOCH + 1, 0, &reply.kd_c2s));
    let c = s.core.counters().clone();
    assert_eq!(
        (
            c.keys_ack_bad,
            c.keys_ack_unexpected,
            c.keys_acked,
            c.keys_ack_replay
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(c.data_malformed, 0);
    // The acknowledgement is reported at the next timer, and nothing is resent any more.
    let out = timeout(&mut s.core, t2);
    assert_eq!(out.len(), 1);
    assert_eq!(
        Control::open(&out[0].payload, &link, t2),
        Ok(Control::KeysDelivered {
            epoch: EPOCH + 1,
            conn_ids: vec![id]
        })
    );
    assert!(timeout(&mut s.core, t2.saturating_add(Duration::from_secs(60))).is_empty());
    // A repeated entry (the gateway restarted) is answered again without a new KEYS; an
    // entry of an older epoch is dropped.
    let t3 = t2.saturating_add(Duration::from_secs(61));
    s.core.handle(t3, gw(), &epoch_keys(t3, EPOCH + 1, &[id]));
    s.core.handle(t3, gw(), &epoch_keys(t3, EPOCH, &[id]));
    let out = timeout(&mut s.core, t3);
    assert_eq!(out.len(), 1);
    assert!(matches!(
        Control::open(&out[0].payload, &link, t3),
        Ok(Control::KeysDelivered { .. })
    ));
    assert_eq!(s.core.counters().keys_sent, 1);
    assert_eq!(s.core.counters().epoch_keys_stale, 1);
}
