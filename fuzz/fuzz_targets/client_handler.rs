//! The client's sans-IO state machine, `Client::handle` / `handle_timeout` /
//! `poll_transmit`, driven by an input-described sequence of events against a model gateway
//! built from the public protocol core (`EpochKeys`, `verify_one`, a `Registry`).
//!
//! The client is brought to `Connected` through the public API (its own HANDSHAKE is opened
//! with the PSK and answered with a HANDSHAKE_REPLY), or left in `Handshaking` when the input
//! asks. Ops then feed it raw bytes, valid DATA (any seq, any payload), UNRECOGNIZED with a
//! valid or broken cookie, the REBIND_ACKs the model gateway computes for the REBINDs the
//! client sends (on time, late, twice, or bit-flipped), fuzzed HANDSHAKE_REPLYs for its real
//! handshake nonces, sends, network changes and time steps.
//!
//! Invariants: nothing panics; every datagram the client sends has a known type and fits
//! `MAX_DATAGRAM_LEN`; its DATA opens under `kd_c2s` with increasing seqs; a REBIND it builds
//! from a valid UNRECOGNIZED is rejected by the gateway only for freshness or cookie reasons
//! (never at trial decryption, AEAD or conn_id); states never go back to `Handshaking` and
//! `Failed` is final; what `poll_received` yields is a payload the gateway sent.
#![no_main]

use std::collections::HashSet;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rebindgw::client::{Client, ClientConfig, ClientEvent, ClientState, MAX_DATAGRAM_LEN};
use rebindgw::crypto;
use rebindgw::engine::{Backend, TrialKeys};
use rebindgw::keys::{EpochKeys, MasterSecret};
use rebindgw::registry::Registry;
use rebindgw::time::Ticks;
use rebindgw::verify::{EpochCrypto, RejectReason, verify_one};
use rebindgw::wire::{
    ClientCredentials, DataView, HANDSHAKE_LEN, HandshakeReply, HandshakeView, MAX_SLOTS, MsgType,
    RebindView, Unrecognized, build_handshake_reply, open_handshake, seal_data,
};

const T0: u64 = 639_028_224_000_000_000;
const EPOCH: u32 = 0x107;
const CONN_ID: u64 = 0x0123_4567_89ab_cdef;
const KD_C2S: [u8; 16] = [0x11; 16];
const KD_S2C: [u8; 16] = [0x22; 16];
const WINDOW_TICKS: u64 = 300_000_000;

fn creds() -> ClientCredentials {
    ClientCredentials {
        client_id: [0xc1; 16],
        psk: [0x5a; 32],
    }
}

fn pool() -> [SocketAddr; 4] {
    [
        SocketAddr::from(([198, 51, 100, 7], 40001)),
        SocketAddr::from(([198, 51, 100, 8], 40002)),
        SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 443)),
        SocketAddr::from(([10, 0, 0, 1], 1)),
    ]
}

struct World {
    client: Client,
    gw: EpochCrypto,
    registry: Registry,
    slots: usize,
    index: u32,
    now: Ticks,
    /// Nonces of the HANDSHAKEs the client sent.
    hs_nonces: Vec<[u8; 16]>,
    /// REBIND_ACKs the model gateway produced, not yet (or already) delivered.
    acks: Vec<Vec<u8>>,
    /// Datagrams delivered that authenticated, for replays.
    delivered: Vec<Vec<u8>>,
    /// Payloads the gateway side sent in DATA.
    sent_payloads: HashSet<Vec<u8>>,
    c2s_next: Option<u64>,
    /// UNRECOGNIZED cookies that the gateway really issued (for the REBIND check).
    good_cookies: HashSet<[u8; 16]>,
    handled: u64,
    /// Connected with the keys the model gateway issued (not a fuzzed reply).
    honest: bool,
    was_connected: bool,
    failed: bool,
}

impl World {
    fn gw_now(&self) -> Ticks {
        self.now
    }

    fn handle(&mut self, d: &[u8]) {
        self.client.handle(self.now, d);
        self.handled += 1;
        self.after();
    }

    /// Drains what the client wants to send and answers REBINDs like a gateway would.
    fn drain(&mut self) {
        let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
        let mut n = 0;
        while let Some(len) = self.client.poll_transmit(self.now, &mut buf) {
            n += 1;
            assert!(n < 4096, "poll_transmit never runs dry");
            assert!(len <= MAX_DATAGRAM_LEN);
            let d = &buf[..len];
            match MsgType::of(d) {
                Ok(MsgType::Handshake) => {
                    let v = HandshakeView::new_checked(d).expect("a whole HANDSHAKE");
                    assert_eq!(len, HANDSHAKE_LEN);
                    assert!(open_handshake(&v, &creds().psk).is_ok());
                    self.hs_nonces.push(v.client_nonce());
                }
                Ok(MsgType::Data) => {
                    let v = DataView::new_checked(d).expect("a whole DATA");
                    let mut out = vec![0u8; v.payload_len()];
                    assert!(v.open(&crypto::gcm(&KD_C2S), &mut out).is_ok());
                    if let Some(next) = self.c2s_next {
                        assert!(v.seq() >= next, "DATA seq went back");
                    }
                    self.c2s_next = Some(v.seq() + 1);
                }
                Ok(MsgType::Rebind) => {
                    let s = self.client.slots().expect("REBIND only when connected");
                    let v = RebindView::new_checked(d, s).expect("REBIND of our S");
                    if !self.honest {
                        continue;
                    }
                    if v.is_cookie_request() {
                        continue;
                    }
                    let t = v.t();
                    let cookie = v.cookie();
                    let from = pool()
                        .into_iter()
                        .find(|a| self.gw.keys.cookie_matches(a, t, &cookie))
                        .unwrap_or(pool()[0]);
                    let now = self.gw_now();
                    let outcome = verify_one(
                        d,
                        &from,
                        now,
                        WINDOW_TICKS,
                        self.slots,
                        &[&self.gw],
                        &mut self.registry,
                    );
                    match outcome.into_result() {
                        Ok(ver) => {
                            assert_eq!((ver.index, ver.conn_id), (self.index, CONN_ID));
                            self.acks.push(ver.ack.to_vec());
                        }
                        Err(r) => {
                            if self.good_cookies.contains(&cookie) {
                                assert!(
                                    matches!(
                                        r,
                                        RejectReason::Stale
                                            | RejectReason::Replay
                                            | RejectReason::Cookie
                                    ),
                                    "the client built a REBIND the gateway rejects at `{r}`"
                                );
                            }
                        }
                    }
                }
                other => panic!("client sent a datagram of type {other:?}"),
            }
        }
    }

    fn after(&mut self) {
        let st = self.client.state();
        if self.failed {
            assert!(matches!(st, ClientState::Failed(_)), "Failed is final");
        }
        match st {
            ClientState::Handshaking => assert!(!self.was_connected, "back to Handshaking"),
            ClientState::Connected | ClientState::Rebinding => {
                self.was_connected = true;
                if self.honest {
                    assert_eq!(self.client.conn_id(), Some(CONN_ID));
                    assert_eq!(self.client.slots(), Some(self.slots));
                }
            }
            ClientState::Failed(_) => self.failed = true,
        }
        assert_eq!(self.client.stats().datagrams_received, self.handled);
        while let Some(p) = self.client.poll_received() {
            assert!(self.sent_payloads.contains(&p), "received a payload nobody sent");
        }
        while let Some(e) = self.client.poll_event() {
            if let ClientEvent::Rebound {
                conn_id, new_tuple, ..
            } = e
            {
                assert!(!self.honest || conn_id == CONN_ID);
                assert!(pool().contains(&new_tuple));
            }
        }
        if !self.failed {
            assert!(self.client.poll_timeout().is_some());
        }
    }

    fn reply(&self, nonce: &[u8; 16], r: &HandshakeReply) -> Vec<u8> {
        // A fresh server nonce per reply, as the host draws one (§7, 1.1).
        build_handshake_reply(&creds().psk, nonce, &crypto::random_array(), r)
    }

    fn issued_reply(&self) -> HandshakeReply {
        HandshakeReply {
            conn_id: CONN_ID,
            epoch_byte: self.gw.keys.epoch_byte(),
            index: self.index,
            rebind_secret: [0x40; 32],
            kd_c2s: KD_C2S,
            kd_s2c: KD_S2C,
            slot_keys: self.gw.keys.client_keys(self.index).to_vec(),
        }
    }
}

/// Up to `max` bytes (fewer when the input runs out).
fn take(u: &mut Unstructured<'_>, max: usize) -> Result<Vec<u8>> {
    let n = u.int_in_range(0..=max)?.min(u.len());
    Ok(u.bytes(n)?.to_vec())
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let slots = 1 + usize::from(u.int_in_range(0..=31u8)?) % MAX_SLOTS;
    let keys = EpochKeys::derive(&MasterSecret::from_bytes([0x33; 32]), EPOCH, slots).unwrap();
    let trial = TrialKeys::new(Backend::Portable, keys.slot_key_pairs()).unwrap();
    let gw = EpochCrypto::new(keys, trial);
    let mut registry = Registry::new(slots);
    // The registry is dense by index: keep the model's index small (its keys still vary).
    let index = (u.arbitrary::<u32>()? as u64 % gw.keys.index_space().min(1 << 12)) as u32;
    registry
        .restore(
            index,
            CONN_ID,
            &rebindgw::rebind::RebindSecret([0x40; 32]),
            Ticks(0),
            None,
            0,
        )
        .unwrap();
    let start = Ticks(T0);
    let client = Client::new(ClientConfig::default(), creds(), start);
    let mut w = World {
        client,
        gw,
        registry,
        slots,
        index,
        now: start,
        hs_nonces: Vec::new(),
        acks: Vec::new(),
        delivered: Vec::new(),
        sent_payloads: HashSet::new(),
        c2s_next: None,
        good_cookies: HashSet::new(),
        handled: 0,
        honest: true,
        was_connected: false,
        failed: false,
    };
    w.drain();
    if u.ratio(7, 8)? {
        let nonce = *w.hs_nonces.last().unwrap();
        let r = w.reply(&nonce, &w.issued_reply());
        w.handle(&r);
        assert_eq!(w.client.state(), ClientState::Connected);
    }
    let mut s2c_seq = 0u64;
    while !u.is_empty() {
        match u.int_in_range(0..=11u8)? {
            0 => {
                let d = take(u, 1300)?;
                w.handle(&d);
            }
            1 | 2 => {
                let seq = match u.int_in_range(0..=3u8)? {
                    0 => u.arbitrary()?,
                    1 => s2c_seq.saturating_sub(u64::from(u.int_in_range(0..=70u8)?)),
                    _ => {
                        s2c_seq += 1;
                        s2c_seq
                    }
                };
                let payload = if u.ratio(1, 4)? {
                    vec![0u8; 24]
                } else {
                    take(u, 1200)?
                };
                let mut d = vec![0u8; payload.len() + 25];
                seal_data(&crypto::gcm(&KD_S2C), seq, &payload, &mut d);
                w.sent_payloads.insert(payload);
                w.delivered.push(d.clone());
                w.handle(&d);
            }
            3 | 4 => {
                let observed = pool()[u.choose_index(4)?];
                let now = w.gw_now();
                let t = match u.int_in_range(0..=3u8)? {
                    0 => Ticks(u.arbitrary()?),
                    1 => Ticks(now.0.saturating_sub(u64::from(u.arbitrary::<u32>()?))),
                    _ => now,
                };
                let mut cookie = w.gw.keys.cookie(&observed, t);
                let epoch_byte = if u.ratio(7, 8)? { w.gw.keys.epoch_byte() } else { u.arbitrary()? };
                if u.ratio(1, 8)? {
                    cookie = u.arbitrary()?;
                } else {
                    w.good_cookies.insert(cookie);
                }
                let un = Unrecognized {
                    epoch_byte,
                    t,
                    observed,
                    cookie,
                };
                let mut d = [0u8; 64];
                let n = un.emit(&mut d);
                w.handle(&d[..n]);
            }
            5 => w.drain(),
            6 => {
                if w.acks.is_empty() {
                    continue;
                }
                let i = u.choose_index(w.acks.len())?;
                let mut a = w.acks[i].clone();
                if u.ratio(1, 4)? {
                    let j = u.choose_index(a.len())?;
                    a[j] ^= 1 << u.int_in_range(0..=7u8)?;
                } else {
                    w.delivered.push(a.clone());
                }
                w.handle(&a);
            }
            7 => {
                let step = Duration::from_millis(u64::from(u.arbitrary::<u16>()?))
                    * u32::from(u.int_in_range(1..=40u8)?);
                w.now = w.now + step;
                if u.ratio(3, 4)? {
                    if let Some(t) = w.client.poll_timeout() {
                        if t <= w.now {
                            w.client.handle_timeout(w.now);
                        }
                    }
                } else {
                    w.client.handle_timeout(w.now);
                }
                w.after();
            }
            8 => {
                let p = take(u, 1300)?;
                let _ = w.client.send(&p);
            }
            9 => {
                w.client.network_changed(w.now);
                w.after();
            }
            // A HANDSHAKE_REPLY for one of the client's real nonces, with fuzzed fields.
            10 => {
                if w.hs_nonces.is_empty() {
                    continue;
                }
                let nonce = w.hs_nonces[u.choose_index(w.hs_nonces.len())?];
                let mut r = w.issued_reply();
                if u.ratio(1, 2)? {
                    let s = 1 + usize::from(u.int_in_range(0..=31u8)?);
                    r.slot_keys = (0..s).map(|_| u.arbitrary()).collect::<Result<_>>()?;
                    r.epoch_byte = u.arbitrary()?;
                    r.index = u.arbitrary()?;
                }
                let mut d = w.reply(&nonce, &r);
                if u.ratio(1, 4)? {
                    let j = u.choose_index(d.len())?;
                    d[j] ^= 1 << u.int_in_range(0..=7u8)?;
                }
                let before = w.client.state();
                w.client.handle(w.now, &d);
                w.handled += 1;
                if before == ClientState::Handshaking
                    && w.client.state() == ClientState::Connected
                    && r != w.issued_reply()
                {
                    // Connected with keys the model gateway never issued.
                    w.honest = false;
                }
                w.after();
            }
            _ => {
                if w.delivered.is_empty() {
                    continue;
                }
                let d = w.delivered[u.choose_index(w.delivered.len())?].clone();
                w.handle(&d);
            }
        }
    }
    w.drain();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
