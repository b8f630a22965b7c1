//! The gateway's sans-IO core (`WorkerCore::handle_batch` and `tick`) in the simulated world
//! (`rebindgw::sim`): real clients and the real echo host around it, and datagrams the input
//! describes, injected at the same instant so they arrive as one receive batch. Datagrams are
//! raw bytes from any source; shaped to reach the deep paths: REBIND-length garbage (the
//! second stage), REBINDs with a valid cookie and garbage slots, the clients' own REBINDs
//! captured on the wire and replayed (from their source or another, optionally with one byte
//! flipped), cookie requests, sealed host-link control messages under the right or a wrong
//! key, host-link data for known conn_ids; plus NAT moves, loss, epoch rotation and restart.
//!
//! After every call of the core (`World::watch_gateway`):
//! - every queued datagram fits its slot;
//! - an UNRECOGNIZED or REBIND_ACK goes to a source that sent, in that batch, a datagram at
//!   least as large (anti-amplification, PROTOCOL.md §5–6), and an UNRECOGNIZED names the
//!   tuple it is sent to, with a valid cookie of a held epoch, at the batch's one issued time
//!   (not before the clock, strictly after every earlier batch's, across restarts too);
//! - the tuple and conn_id tables agree with each other, and connections stay under the cap.
//!
//! And the clients' invariants (`common::Track`).
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use arbitrary::{Result, Unstructured};
use common::{Track, bytes, shared_op, source, ticks_near};
use libfuzzer_sys::fuzz_target;
use rebindgw::hostlink::{self, Control, LinkKey, LinkType};
use rebindgw::io::batch::SLOT_LEN;
use rebindgw::keys::EpochKeys;
use rebindgw::rebind::cookie_request;
use rebindgw::sim::{Datagram, GATEWAY, GATEWAY_LINK, GatewayCall, HOST};
use rebindgw::time::Ticks;
use rebindgw::wire::{HANDSHAKE_LEN, MsgType, Unrecognized, rebind_len};

/// What the watcher keeps between calls.
struct Seen {
    /// The epochs' keys the gateway may use.
    keys: Vec<EpochKeys>,
    /// The last UNRECOGNIZED time issued.
    last_t: Option<Ticks>,
    /// conn_ids seen on the host link.
    conn_ids: Vec<u64>,
}

fn check(call: &GatewayCall<'_>, seen: &mut Seen) {
    for d in call.rx {
        common::trace(format_args!("  gw rx {} -> {} {:02x?}", d.from, d.to, &d.data[..d.data.len().min(12)]));
    }
    for d in call.tx {
        common::trace(format_args!("  gw tx {} -> {} {:02x?}", d.from, d.to, &d.data[..d.data.len().min(12)]));
    }
    let mut batch_t: Option<Ticks> = None;
    for d in call.tx {
        assert!(d.data.len() <= SLOT_LEN, "{} bytes queued", d.data.len());
        if d.from != GATEWAY {
            if let Ok((conn_id, _)) = hostlink::parse_conn_data(&d.data) {
                seen.conn_ids.push(conn_id);
            }
            continue;
        }
        let ty = d.data.first().copied();
        if ty == Some(MsgType::Unrecognized as u8) || ty == Some(MsgType::RebindAck as u8) {
            let biggest = call
                .rx
                .iter()
                .filter(|r| r.to == GATEWAY && r.from == d.to)
                .map(|r| r.data.len())
                .max();
            assert!(
                biggest.is_some_and(|n| n >= d.data.len()),
                "{} bytes to {} larger than anything it sent ({biggest:?})",
                d.data.len(),
                d.to
            );
        }
        if ty == Some(MsgType::Unrecognized as u8) && call.rx.iter().any(|r| r.from == d.to) {
            let u = Unrecognized::parse(&d.data).expect("the gateway's UNRECOGNIZED parses");
            assert_eq!(u.observed, d.to);
            assert!(u.t >= call.now, "t {} before the clock {}", u.t.0, call.now.0);
            match batch_t {
                Some(t) => assert_eq!(u.t, t, "two times in one batch"),
                None => {
                    assert!(seen.last_t.is_none_or(|l| u.t > l), "t went back");
                    batch_t = Some(u.t);
                }
            }
            let k = seen
                .keys
                .iter()
                .find(|k| k.epoch_byte() == u.epoch_byte)
                .expect("an epoch the gateway holds");
            assert!(k.cookie_matches(&d.to, u.t, &u.cookie));
        }
    }
    if batch_t.is_some() {
        seen.last_t = batch_t;
    }
    // The fast-path tables agree with each other.
    let shared = call.shared;
    for r in call.rx.iter().chain(call.tx) {
        for a in [r.from, r.to] {
            if let Some(e) = shared.tuples.get(&a) {
                let route = shared.conns.get(e.conn_id);
                assert_eq!(
                    route.and_then(|r| r.tuple),
                    Some(a),
                    "tuple {a} -> conn {} whose route is {route:?}",
                    e.conn_id
                );
            }
        }
    }
    for id in &seen.conn_ids {
        if let Some(tuple) = shared.conns.get(*id).and_then(|r| r.tuple) {
            let back = shared.tuples.get(&tuple);
            assert_eq!(
                back.map(|r| r.conn_id),
                Some(*id),
                "conn {id} -> {tuple} which maps to {back:?}"
            );
        }
    }
    assert!(shared.connections() <= shared.cfg.max_connections);
}

fn client_side(from: SocketAddr, data: Vec<u8>) -> Datagram {
    Datagram {
        from,
        to: GATEWAY,
        data,
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut w = common::world(u)?;
    let mut track = Track::default();
    let seen = Rc::new(RefCell::new(Seen {
        keys: vec![w.epoch_keys(w.cfg.epoch)],
        last_t: None,
        conn_ids: Vec::new(),
    }));
    let watcher = seen.clone();
    w.watch_gateway(move |call| check(call, &mut watcher.borrow_mut()));
    let mut epoch = w.cfg.epoch;
    // The epochs the gateway holds keys for, oldest first.
    let mut held = vec![epoch];
    let slots = w.cfg.slots;
    while !u.is_empty() {
        let op = u.int_in_range(0..=15u8)?;
        common::trace(format_args!("{:?} op {op}", w.now));
        if shared_op(op, u, &mut w, &mut track)? {
            track.check(&w);
            continue;
        }
        let d = match op {
            // Raw bytes from anywhere.
            5 => {
                let from = source(u, &w)?;
                let data = bytes(u, 2100)?;
                if u.ratio(1, 4)? {
                    Datagram {
                        from,
                        to: GATEWAY_LINK,
                        data,
                    }
                } else {
                    client_side(from, data)
                }
            }
            // The second stage: a REBIND of the gateway's length (or another), garbage inside.
            6 => {
                let from = source(u, &w)?;
                let s = if u.ratio(1, 8)? { 1 + usize::from(u.int_in_range(0..=31u8)?) } else { slots };
                let mut d = vec![0u8; rebind_len(s)];
                let fill = u.bytes(d.len().min(u.len()))?;
                d[..fill.len()].copy_from_slice(fill);
                d[0] = MsgType::Rebind as u8;
                client_side(from, d)
            }
            // Past checks 1–3: a held epoch's byte, a time near now and a valid cookie.
            7 => {
                let from = source(u, &w)?;
                let t = ticks_near(u, w.now)?;
                let k = w.epoch_keys(held[u.choose_index(held.len())?]);
                let mut d = vec![0u8; rebind_len(slots)];
                d[0] = MsgType::Rebind as u8;
                d[1] = k.epoch_byte();
                d[2..10].copy_from_slice(&t.0.to_be_bytes());
                d[10..26].copy_from_slice(&k.cookie(&from, t));
                let fill = u.bytes((d.len() - 26).min(u.len()))?;
                d[26..26 + fill.len()].copy_from_slice(fill);
                client_side(from, d)
            }
            // A client's own REBIND (or any datagram a client sent), replayed, maybe flipped,
            // from its source or another.
            8 | 9 => {
                let sent: Vec<&Datagram> = w.wire_log.iter().filter(|d| d.to == GATEWAY).collect();
                if sent.is_empty() {
                    continue;
                }
                let rebinds: Vec<&&Datagram> =
                    sent.iter().filter(|d| d.data.first() == Some(&(MsgType::Rebind as u8))).collect();
                let pick = if !rebinds.is_empty() && u.ratio(3, 4)? {
                    (*rebinds[u.choose_index(rebinds.len())?]).clone()
                } else {
                    sent[u.choose_index(sent.len())?].clone()
                };
                let mut d = pick;
                if u.ratio(1, 4)? {
                    let i = u.choose_index(d.data.len())?;
                    d.data[i] ^= 1 << u.int_in_range(0..=7u8)?;
                }
                if u.ratio(1, 3)? {
                    d.from = source(u, &w)?;
                }
                d
            }
            // A cookie request.
            10 => client_side(source(u, &w)?, cookie_request(slots)),
            // DATA- or HANDSHAKE-typed, any length.
            11 => {
                let from = source(u, &w)?;
                let mut d = bytes(u, 1300)?;
                if d.is_empty() {
                    d.push(0);
                }
                d[0] = if u.ratio(1, 4)? { MsgType::Handshake as u8 } else { MsgType::Data as u8 };
                if d[0] == MsgType::Handshake as u8 && d.len() < HANDSHAKE_LEN && u.arbitrary()? {
                    d.resize(HANDSHAKE_LEN, 0);
                }
                client_side(from, d)
            }
            // A sealed control message from the host (or from elsewhere, or a wrong key).
            12 => {
                let conn_id = {
                    let s = seen.borrow();
                    if !s.conn_ids.is_empty() && u.ratio(3, 4)? {
                        s.conn_ids[u.choose_index(s.conn_ids.len())?]
                    } else {
                        u.arbitrary()?
                    }
                };
                let ticks = if u.ratio(3, 4)? { w.now } else { ticks_near(u, w.now)? };
                let request: u64 = u.int_in_range(0..=4)?;
                let boot = if u.ratio(7, 8)? { w.host.boot() } else { u.arbitrary()? };
                let msg = match u.int_in_range(0..=4u8)? {
                    0 | 1 => Control::Register {
                        boot,
                        request,
                        conn_id,
                        client: source(u, &w)?,
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
                        new: source(u, &w)?,
                    },
                };
                let key = if u.ratio(7, 8)? {
                    w.link_key().cipher()
                } else {
                    LinkKey([u.arbitrary()?; 16]).cipher()
                };
                let from = if u.ratio(7, 8)? { HOST } else { source(u, &w)? };
                Datagram {
                    from,
                    to: GATEWAY_LINK,
                    data: msg.seal(&key, ticks),
                }
            }
            // Host-link data for a conn_id, or a handshake reply for a tuple.
            13 => {
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
                    let conn_id = {
                        let s = seen.borrow();
                        if !s.conn_ids.is_empty() && u.ratio(3, 4)? {
                            s.conn_ids[u.choose_index(s.conn_ids.len())?]
                        } else {
                            u.arbitrary()?
                        }
                    };
                    hostlink::emit_conn_data(LinkType::ToClientData, conn_id, &inner, &mut d)
                } else {
                    let to = source(u, &w)?;
                    hostlink::emit_tuple_data(LinkType::ToClientReply, &to, &inner, &mut d)
                };
                d.truncate(n);
                Datagram {
                    from: HOST,
                    to: GATEWAY_LINK,
                    data: d,
                }
            }
            // Rotate to a new epoch (the previous one stays accepted for the grace period).
            14 if u.ratio(1, 4)? => {
                epoch += 1;
                w.rotate_epoch(epoch);
                seen.borrow_mut().keys.push(w.epoch_keys(epoch));
                held.push(epoch);
                if held.len() > 2 {
                    held.remove(0);
                }
                continue;
            }
            15 if u.ratio(1, 4)? => {
                for c in w.gateway.persisted.values() {
                    common::trace(format_args!("  persisted {} e{} x{} {:?}", c.conn_id, c.epoch, c.index, c.tuple));
                }
                w.restart_gateway();
                // A restart during grace keeps the previous epoch (its keys stay in `seen`).
                continue;
            }
            _ => continue,
        };
        // Datagrams injected at one instant arrive together: one receive batch.
        common::trace(format_args!("  inject {} -> {} {:02x?}", d.from, d.to, &d.data[..d.data.len().min(12)]));
        w.inject(d.from, d.to, d.data);
    }
    w.run_for(std::time::Duration::from_secs(2));
    track.check(&w);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
