//! The gateway's sans-IO packet handler, `WorkerCore::handle_batch`, fed batches that the
//! input describes, against a gateway with two registered connections.
//!
//! The input is a little program (read with `arbitrary::Unstructured`): a slot count, then
//! ops that add datagrams to the current batch or flush it. Datagrams are raw bytes from any
//! `Via` and source, or shaped so they reach the deep paths: REBIND-length garbage (the
//! second stage), REBINDs with a valid cookie and garbage slots, fully valid REBINDs built
//! from a connection's issued keys (optionally with one byte flipped), sealed host-link
//! control messages under the right or a wrong key, and host-link data for known conn_ids.
//!
//! After every batch the invariants are checked:
//! - every queued datagram fits its slot;
//! - an UNRECOGNIZED or REBIND_ACK goes to a source that sent, in that batch, a datagram at
//!   least as large (anti-amplification, PROTOCOL.md §5–6), and an UNRECOGNIZED names the
//!   tuple it is sent to, with a valid cookie, at the batch's one issued time (not before the
//!   wall clock, strictly after every earlier batch's);
//! - the tuple and conn_id tables agree with each other (a tuple maps to a connection whose
//!   route points back at that tuple, and vice versa), and connections stay under the cap.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rebindgw::engine::{Backend, TrialKeys};
use rebindgw::gateway::core::{CoreConfig, EpochCrypto, HostPeer, Shared, WorkerCore};
use rebindgw::hostlink::{self, Control, LinkKey, LinkType};
use rebindgw::io::batch::{Rx, SLOT_LEN, TxQueue, Via};
use rebindgw::keys::{EpochKeys, MasterSecret};
use rebindgw::rebind::{RebindCredentials, RebindSecret, build_rebind, cookie_request};
use rebindgw::time::Ticks;
use rebindgw::wire::{HANDSHAKE_LEN, MsgType, Unrecognized, canonical, rebind_len};

const T0: u64 = 639_028_224_000_000_000;
const MASTER: [u8; 32] = [5; 32];
const EPOCH: u32 = 3;
const LINK: [u8; 16] = [9; 16];
const MAX_BATCH: usize = 64;
const MAX_CONNS: usize = 64;

/// What a client learned from REGISTERED.
struct Issued {
    conn_id: u64,
    epoch: u8,
    secret: RebindSecret,
    keys: Vec<[u8; 16]>,
}

struct World {
    shared: std::sync::Arc<Shared>,
    worker: WorkerCore,
    /// The gateway's keys, derived again: for cookies the harness computes itself.
    keys: Vec<EpochKeys>,
    slots: usize,
    host: SocketAddr,
    link: LinkKey,
    now: Ticks,
    tx: TxQueue,
    issued: Vec<Issued>,
    conn_ids: Vec<u64>,
    rotated: bool,
    /// The gateway time of the last UNRECOGNIZED seen.
    last_t: std::cell::Cell<Option<Ticks>>,
}

fn pool() -> [SocketAddr; 8] {
    [
        SocketAddr::from(([10, 0, 0, 1], 4000)),
        SocketAddr::from(([10, 0, 0, 2], 4000)),
        SocketAddr::from(([10, 0, 0, 3], 5555)),
        SocketAddr::from(([10, 0, 1, 1], 1)),
        SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 4000)),
        SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2), 443)),
        SocketAddr::from(([127, 0, 0, 1], 7000)),
        SocketAddr::from((Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001), 4000)),
    ]
}

impl World {
    fn new(slots: usize) -> World {
        let keys = EpochKeys::derive(&MasterSecret::from_bytes(MASTER), EPOCH, slots).unwrap();
        let trial = TrialKeys::new(Backend::Portable, keys.slot_key_pairs()).unwrap();
        let host = SocketAddr::from(([127, 0, 0, 1], 7000));
        let link = LinkKey(LINK);
        let mut cfg = CoreConfig::new(slots);
        cfg.max_connections = MAX_CONNS.min(1 << slots);
        cfg.limiter_slots = 64;
        let shared = Shared::new(
            cfg,
            EpochCrypto { keys, trial },
            vec![HostPeer::new(host, &link)],
            None,
        );
        let worker = WorkerCore::new(0, shared.clone(), &[false, true]);
        let mut w = World {
            shared,
            worker,
            keys: vec![EpochKeys::derive(&MasterSecret::from_bytes(MASTER), EPOCH, slots).unwrap()],
            slots,
            host,
            link,
            now: Ticks(T0),
            tx: TxQueue::new(256),
            issued: Vec::new(),
            conn_ids: vec![1, 2, 3, 77],
            rotated: false,
            last_t: std::cell::Cell::new(None),
        };
        let p = pool();
        w.register(1, p[0]);
        if slots > 1 {
            w.register(2, p[4]);
        }
        w
    }

    /// Registers over the host link and keeps what REGISTERED issued.
    fn register(&mut self, conn_id: u64, client: SocketAddr) {
        let msg = Control::Register {
            boot: 1,
            request: 1000 + conn_id,
            conn_id,
            client,
        }
        .seal(&self.link.cipher(), self.now);
        let out = self.feed(&[(Via::Host, self.host, msg)]);
        self.learn(&out);
    }

    /// Keeps the keys of any REGISTERED the gateway sent.
    fn learn(&mut self, out: &[(Via, SocketAddr, Vec<u8>)]) {
        for (via, _, d) in out {
            if *via != Via::Host {
                continue;
            }
            if let Ok(Control::Registered {
                conn_id,
                epoch,
                rebind_secret,
                ref slot_keys,
                ..
            }) = Control::open(d, &self.link.cipher(), self.now)
            {
                self.issued.push(Issued {
                    conn_id,
                    epoch: epoch as u8,
                    secret: RebindSecret(rebind_secret),
                    keys: slot_keys.clone(),
                });
            }
        }
    }

    fn feed(&mut self, batch: &[(Via, SocketAddr, Vec<u8>)]) -> Vec<(Via, SocketAddr, Vec<u8>)> {
        let rx: Vec<Rx<'_>> = batch
            .iter()
            .map(|(via, from, data)| Rx {
                via: *via,
                from: *from,
                data,
            })
            .collect();
        self.worker.handle_batch(self.now, &rx, &mut self.tx);
        let out: Vec<_> = self
            .tx
            .iter()
            .map(|(m, b)| {
                assert!(b.len() <= SLOT_LEN && m.len == b.len());
                (m.via, m.to, b.to_vec())
            })
            .collect();
        self.tx.clear();
        self.check(batch, &out);
        out
    }

    fn check(&self, batch: &[(Via, SocketAddr, Vec<u8>)], out: &[(Via, SocketAddr, Vec<u8>)]) {
        let mut batch_t: Option<Ticks> = None;
        for (via, to, d) in out {
            let Via::Client(_) = via else { continue };
            let ty = d.first().copied();
            if ty == Some(MsgType::Unrecognized as u8) || ty == Some(MsgType::RebindAck as u8) {
                let biggest = batch
                    .iter()
                    .filter(|(v, f, _)| matches!(v, Via::Client(_)) && f == to)
                    .map(|(_, _, b)| b.len())
                    .max();
                assert!(
                    biggest.is_some_and(|n| n >= d.len()),
                    "{} bytes to {to} larger than anything it sent ({biggest:?})",
                    d.len()
                );
            }
            if ty == Some(MsgType::Unrecognized as u8) && batch.iter().any(|(_, f, _)| f == to) {
                let u = Unrecognized::parse(d).expect("the gateway's UNRECOGNIZED parses");
                assert_eq!(u.observed, *to);
                // One issued time per batch: at least the wall clock, above every earlier one.
                assert!(u.t >= self.now, "t {} before the wall clock {}", u.t.0, self.now.0);
                match batch_t {
                    Some(t) => assert_eq!(u.t, t, "two times in one batch"),
                    None => {
                        assert!(self.last_t.get().is_none_or(|l| u.t > l), "t went back");
                        batch_t = Some(u.t);
                    }
                }
                let k = self.keys.last().unwrap();
                assert_eq!(u.epoch_byte, k.epoch_byte());
                assert!(k.cookie_matches(to, u.t, &u.cookie));
            }
        }
        // The fast-path tables agree with each other.
        let mut addrs: Vec<SocketAddr> = pool().into_iter().map(canonical).collect();
        addrs.extend(batch.iter().map(|(_, f, _)| *f));
        for a in &addrs {
            if let Some(r) = self.shared.tuples.get(a) {
                let route = self.shared.conns.get(r.conn_id);
                assert_eq!(
                    route.and_then(|r| r.tuple),
                    Some(*a),
                    "tuple {a} -> conn {} whose route is {route:?}",
                    r.conn_id
                );
            }
        }
        for id in self.conn_ids.iter().chain(self.issued.iter().map(|i| &i.conn_id)) {
            if let Some(tuple) = self.shared.conns.get(*id).and_then(|r| r.tuple) {
                let back = self.shared.tuples.get(&tuple);
                assert_eq!(
                    back.map(|r| r.conn_id),
                    Some(*id),
                    "conn {id} -> {tuple} which maps to {back:?}"
                );
            }
        }
        assert!(self.shared.connections() <= self.shared.cfg.max_connections);
        if batch_t.is_some() {
            self.last_t.set(batch_t);
        }
    }
}

fn source(u: &mut Unstructured<'_>) -> Result<SocketAddr> {
    let p = pool();
    Ok(match u.int_in_range(0..=10u8)? {
        i @ 0..=7 => p[usize::from(i)],
        8 => SocketAddr::from((Ipv4Addr::from(u.arbitrary::<u32>()?), u.arbitrary()?)),
        9 => SocketAddr::from((Ipv6Addr::from(u.arbitrary::<u128>()?), u.arbitrary()?)),
        _ => SocketAddr::from(([10, 0, 0, u.arbitrary()?], u.arbitrary()?)),
    })
}

fn via(u: &mut Unstructured<'_>, from: &SocketAddr) -> Result<Via> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => Via::Host,
        1 => Via::Client(u.arbitrary()?),
        _ => Via::Client(u8::from(from.is_ipv6())),
    })
}

/// Up to `max` bytes (fewer when the input runs out, so the last batch still runs).
fn bytes(u: &mut Unstructured<'_>, max: usize) -> Result<Vec<u8>> {
    let n = u.int_in_range(0..=max)?.min(u.len());
    Ok(u.bytes(n)?.to_vec())
}

fn ticks_near(u: &mut Unstructured<'_>, now: Ticks) -> Result<Ticks> {
    let off: i32 = u.arbitrary()?;
    let scale = [1u64, 1_000, 10_000_000, 1 << 32][usize::from(u.int_in_range(0..=3u8)?)];
    Ok(Ticks(now.0.wrapping_add_signed(i64::from(off).wrapping_mul(scale as i64))))
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let slots = 1 + usize::from(u.int_in_range(0..=31u8)?);
    let mut w = World::new(slots);
    let mut batch: Vec<(Via, SocketAddr, Vec<u8>)> = Vec::new();
    while !u.is_empty() {
        let op = u.int_in_range(0..=12u8)?;
        match op {
            // Raw bytes from anywhere.
            0 | 1 => {
                let from = canonical(source(u)?);
                let v = via(u, &from)?;
                let data = bytes(u, 2100)?;
                batch.push((v, from, data));
            }
            // The second stage: a REBIND of exactly the gateway's length, garbage inside.
            2 => {
                let from = canonical(source(u)?);
                let s = if u.ratio(1, 8)? { 1 + usize::from(u.int_in_range(0..=31u8)?) } else { w.slots };
                let mut d = vec![0u8; rebind_len(s)];
                let fill = u.bytes(d.len().min(u.len()))?;
                d[..fill.len()].copy_from_slice(fill);
                d[0] = MsgType::Rebind as u8;
                batch.push((via(u, &from)?, from, d));
            }
            // Past checks 1–3: right epoch byte, fresh t and a valid cookie for the source.
            3 => {
                let from = canonical(source(u)?);
                let t = ticks_near(u, w.now)?;
                let k = &w.keys[u.choose_index(w.keys.len())?];
                let mut d = vec![0u8; rebind_len(w.slots)];
                d[0] = MsgType::Rebind as u8;
                d[1] = k.epoch_byte();
                d[2..10].copy_from_slice(&t.0.to_be_bytes());
                d[10..26].copy_from_slice(&k.cookie(&from, t));
                let fill = u.bytes((d.len() - 26).min(u.len()))?;
                d[26..26 + fill.len()].copy_from_slice(fill);
                batch.push((Via::Client(u8::from(from.is_ipv6())), from, d));
            }
            // A fully valid REBIND of an issued connection, maybe with one byte flipped.
            4 | 5 => {
                if w.issued.is_empty() {
                    continue;
                }
                let iss = &w.issued[u.choose_index(w.issued.len())?];
                let from = canonical(source(u)?);
                let t = if u.ratio(3, 4)? { Ticks(w.now.0 - u64::from(u.int_in_range(0..=3u8)?)) } else { ticks_near(u, w.now)? };
                let k = w.keys.iter().find(|k| k.epoch_byte() == iss.epoch).unwrap_or(&w.keys[0]);
                let cookie = k.cookie(&from, t);
                let nonces: Vec<[u8; 8]> = (0..iss.keys.len())
                    .map(|_| u.arbitrary())
                    .collect::<Result<_>>()?;
                let creds = RebindCredentials {
                    conn_id: iss.conn_id,
                    secret: &iss.secret,
                    slot_keys: &iss.keys,
                };
                let (mut d, _) = build_rebind(&creds, iss.epoch, t, &cookie, &nonces);
                if u.ratio(1, 4)? {
                    let i = u.choose_index(d.len())?;
                    d[i] ^= 1 << u.int_in_range(0..=7u8)?;
                }
                batch.push((Via::Client(u8::from(from.is_ipv6())), from, d));
            }
            // A cookie request.
            6 => {
                let from = canonical(source(u)?);
                batch.push((Via::Client(u8::from(from.is_ipv6())), from, cookie_request(w.slots)));
            }
            // DATA-typed, any length.
            7 => {
                let from = canonical(source(u)?);
                let mut d = bytes(u, 1300)?;
                if d.is_empty() {
                    d.push(0);
                }
                d[0] = if u.ratio(1, 4)? { MsgType::Handshake as u8 } else { MsgType::Data as u8 };
                if d[0] == MsgType::Handshake as u8 && d.len() < HANDSHAKE_LEN && u.arbitrary()? {
                    d.resize(HANDSHAKE_LEN, 0);
                }
                batch.push((Via::Client(u8::from(from.is_ipv6())), from, d));
            }
            // A sealed control message from the host (or from elsewhere, or under a wrong key).
            8 => {
                let conn_id = if u.ratio(3, 4)? { w.conn_ids[u.choose_index(w.conn_ids.len())?] } else { u.arbitrary()? };
                let ticks = if u.ratio(3, 4)? { w.now } else { ticks_near(u, w.now)? };
                let request: u64 = u.int_in_range(0..=4)?;
                let boot = if u.ratio(7, 8)? { 1 } else { u.int_in_range(0..=2u64)? };
                let msg = match u.int_in_range(0..=4u8)? {
                    0 | 1 => Control::Register {
                        boot,
                        request,
                        conn_id,
                        client: canonical(source(u)?),
                    },
                    2 => Control::Close {
                        boot,
                        request,
                        conn_id,
                    },
                    3 => Control::Hello { boot },
                    _ => Control::Rebound {
                        conn_id,
                        t: ticks,
                        old: None,
                        new: canonical(source(u)?),
                    },
                };
                let key = if u.ratio(7, 8)? { w.link.cipher() } else { LinkKey([u.arbitrary()?; 16]).cipher() };
                let from = if u.ratio(7, 8)? { w.host } else { canonical(source(u)?) };
                batch.push((Via::Host, from, msg.seal(&key, ticks)));
            }
            // Host-link data for a conn_id, or a handshake reply for a tuple.
            9 => {
                let mut inner = bytes(u, 1500)?;
                // The host is trusted to relay what it likes; keep relayed bytes out of the
                // anti-amplification check, which is about what the gateway itself answers.
                if let Some(b) = inner.first_mut()
                    && (*b == MsgType::Unrecognized as u8 || *b == MsgType::RebindAck as u8)
                {
                    *b = MsgType::Data as u8;
                }
                let mut d = vec![0u8; 20 + inner.len()];
                let n = if u.arbitrary()? {
                    let conn_id = if u.ratio(3, 4)? { w.conn_ids[u.choose_index(w.conn_ids.len())?] } else { u.arbitrary()? };
                    hostlink::emit_conn_data(LinkType::ToClientData, conn_id, &inner, &mut d)
                } else {
                    let to = canonical(source(u)?);
                    hostlink::emit_tuple_data(LinkType::ToClientReply, &to, &inner, &mut d)
                };
                d.truncate(n);
                batch.push((Via::Host, w.host, d));
            }
            // Rotate to a new epoch once; the old one stays accepted.
            10 => {
                if w.rotated {
                    continue;
                }
                w.rotated = true;
                let next = EpochKeys::derive(&MasterSecret::from_bytes(MASTER), EPOCH + 1, w.slots).unwrap();
                let trial = TrialKeys::new(Backend::Portable, next.slot_key_pairs()).unwrap();
                w.shared.rotate(EpochCrypto { keys: next, trial });
                w.keys.push(EpochKeys::derive(&MasterSecret::from_bytes(MASTER), EPOCH + 1, w.slots).unwrap());
            }
            // Flush, then let time pass.
            _ => {
                let out = w.feed(&batch);
                w.learn(&out);
                batch.clear();
                let step = u64::from(u.arbitrary::<u16>()?) * [1, 1_000, 100_000][usize::from(u.int_in_range(0..=2u8)?)];
                w.now = Ticks(w.now.0 + step);
            }
        }
        if batch.len() >= MAX_BATCH {
            let out = w.feed(&batch);
            w.learn(&out);
            batch.clear();
        }
    }
    if !batch.is_empty() {
        let out = w.feed(&batch);
        w.learn(&out);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
