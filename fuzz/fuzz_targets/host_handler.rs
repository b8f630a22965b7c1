//! The reference host's sans-IO core, `HostCore::handle` (plus `handle_timeout` and
//! `close`), with arbitrary sources and bytes and with the messages a gateway and a client
//! would send: real HANDSHAKEs (fresh, retransmitted, stale), REGISTERED / REGISTER_FAILED /
//! REBOUND / CLOSED for the REGISTERs the host sent (or for made-up requests), and DATA that
//! authenticates under the keys the host handed out.
//!
//! Invariants: nothing panics; an answer fits the buffer; a HANDSHAKE_REPLY the host relays
//! opens under the client's PSK and nonce; an echo carries the same payload back, sealed
//! under `kd_s2c`, for the same conn_id.
#![no_main]

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rebindgw::crypto;
use rebindgw::host::clients::{ClientEntry, ClientsFile};
use rebindgw::host::{HostConfig, HostCore, MAX_DATAGRAM};
use rebindgw::hostlink::{self, Control, LinkKey, LinkType};
use rebindgw::time::Ticks;
use rebindgw::wire::{
    ClientCredentials, DataView, build_handshake, open_handshake_reply, seal_data,
};

const T0: u64 = 639_028_224_000_000_000;
const LINK: [u8; 16] = [9; 16];

fn creds(i: u8) -> ClientCredentials {
    ClientCredentials {
        client_id: [0xc0 + i; 16],
        psk: [0x50 + i; 32],
    }
}

fn gateways() -> [SocketAddr; 3] {
    [
        SocketAddr::from(([127, 0, 0, 1], 7001)),
        SocketAddr::from(([127, 0, 0, 1], 7002)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, 7003)),
    ]
}

fn addr(u: &mut Unstructured<'_>) -> Result<SocketAddr> {
    Ok(match u.int_in_range(0..=4u8)? {
        0..=2 => gateways()[usize::from(u.int_in_range(0..=2u8)?)],
        3 => SocketAddr::from((Ipv4Addr::from(u.arbitrary::<u32>()?), u.arbitrary()?)),
        _ => SocketAddr::from((Ipv6Addr::from(u.arbitrary::<u128>()?), u.arbitrary()?)),
    })
}

/// A connection as the client sees it after the reply.
struct Live {
    conn_id: u64,
    c2s: [u8; 16],
    s2c: [u8; 16],
    seq: u64,
}

struct World {
    host: HostCore,
    link: LinkKey,
    now: Ticks,
    out: Vec<u8>,
    /// REGISTERs seen: request -> conn_id.
    registers: HashMap<u64, u64>,
    /// The clients (bit per client) that sent a HANDSHAKE with this nonce.
    nonces: HashMap<[u8; 16], u8>,
    live: Vec<Live>,
}

impl World {
    fn handle(&mut self, from: SocketAddr, d: &[u8], out_len: usize) {
        self.host.handle(self.now, from, d);
        self.drain(out_len, Some(d));
    }

    /// Takes everything the host has to send, into buffers of `out_len` bytes.
    fn drain(&mut self, out_len: usize, trigger: Option<&[u8]>) {
        let out_len = out_len.min(self.out.len());
        let mut n = 0;
        while let Some(o) = self.host.poll_transmit(self.now, &mut self.out[..out_len]) {
            n += 1;
            assert!(n < 4096, "poll_transmit never runs dry");
            assert!(o.len <= out_len);
            let a = self.out[..o.len].to_vec();
            self.answer(o.to, &a, trigger);
        }
    }

    /// Looks at what the host sent.
    fn answer(&mut self, _to: SocketAddr, a: &[u8], trigger: Option<&[u8]>) {
        match hostlink::link_type(a) {
            Ok(LinkType::Register) => {
                if let Ok(Control::Register {
                    request, conn_id, ..
                }) = Control::open(a, &self.link.cipher(), self.now)
                {
                    self.registers.insert(request, conn_id);
                }
            }
            Ok(LinkType::ToClientReply) => {
                let (_, inner) = hostlink::parse_tuple_data(a).expect("framed reply");
                let nonce: [u8; 16] = inner[1..17].try_into().unwrap();
                let senders = *self.nonces.get(&nonce).expect("a reply for a nonce we sent");
                // Several clients may have sent this nonce (the host may have refused the
                // first while busy, or forgotten it once expired): the reply opens for one.
                let r = (0..2u8)
                    .filter(|who| senders & (1 << who) != 0)
                    .find_map(|who| open_handshake_reply(inner, &creds(who).psk, &nonce).ok())
                    .expect("the host's reply opens for a client that sent the nonce");
                self.live.push(Live {
                    conn_id: r.conn_id,
                    c2s: r.kd_c2s,
                    s2c: r.kd_s2c,
                    seq: 0,
                });
            }
            Ok(LinkType::ToClientData) => {
                let (conn_id, inner) = hostlink::parse_conn_data(a).expect("framed DATA");
                let live = self
                    .live
                    .iter()
                    .rev()
                    .find(|l| l.conn_id == conn_id)
                    .expect("an echo for a live connection");
                let v = DataView::new_checked(inner).expect("echo is DATA");
                let mut p = vec![0u8; v.payload_len()];
                v.open(&crypto::gcm(&live.s2c), &mut p).expect("echo opens under kd_s2c");
                if let Some(t) = trigger {
                    let (_, tin) = hostlink::parse_conn_data(t).unwrap();
                    let tv = DataView::new_checked(tin).unwrap();
                    let mut tp = vec![0u8; tv.payload_len()];
                    tv.open(&crypto::gcm(&live.c2s), &mut tp).unwrap();
                    assert_eq!(p, tp, "echo carries the payload back");
                }
            }
            Ok(LinkType::Close) => {}
            // A gateway acknowledges the host's boot id, so its REGISTERs go out.
            Ok(LinkType::Hello) => {
                if let Ok(Control::Hello { boot }) = Control::open(a, &self.link.cipher(), self.now) {
                    let ack = Control::HelloAck { boot, released: 0 }.seal(&self.link.cipher(), self.now);
                    self.handle(_to, &ack, MAX_DATAGRAM);
                }
            }
            other => panic!("host sent {other:?}"),
        }
    }
}

/// Up to `max` bytes (fewer when the input runs out).
fn take(u: &mut Unstructured<'_>, max: usize) -> Result<Vec<u8>> {
    let n = u.int_in_range(0..=max)?.min(u.len());
    Ok(u.bytes(n)?.to_vec())
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let clients = ClientsFile::from_entries(
        (0..2)
            .map(|i| ClientEntry {
                name: format!("c{i}"),
                creds: creds(i),
            })
            .collect(),
    );
    let mut cfg = HostConfig::default();
    if u.ratio(1, 4)? {
        cfg.max_nonces = u.int_in_range(0..=4)?;
        cfg.max_pending = u.int_in_range(0..=4)?;
        cfg.max_nonces_per_client = u.int_in_range(0..=4)?;
    }
    let link = LinkKey(LINK);
    let mut w = World {
        host: HostCore::with_config(&link, clients, cfg),
        link,
        now: Ticks(T0),
        out: vec![0u8; MAX_DATAGRAM],
        registers: HashMap::new(),
        nonces: HashMap::new(),
        live: Vec::new(),
    };
    let mut last_hs: Option<(SocketAddr, SocketAddr, Vec<u8>)> = None;
    while !u.is_empty() {
        let out_len = if u.ratio(1, 16)? { u.int_in_range(0..=800)? } else { MAX_DATAGRAM };
        match u.int_in_range(0..=10u8)? {
            0 | 1 => {
                let from = addr(u)?;
                let d = take(u, 1500)?;
                w.handle(from, &d, out_len);
            }
            // A real HANDSHAKE, framed by a gateway, maybe with bytes appended.
            2 | 3 => {
                let who = u.int_in_range(0..=2u8)?;
                let nonce: [u8; 16] = u.arbitrary()?;
                let ticks = if u.ratio(3, 4)? {
                    w.now
                } else {
                    Ticks(w.now.0.wrapping_add_signed(u.arbitrary::<i64>()? >> u.int_in_range(0..=63u8)?))
                };
                let mut hs = build_handshake(&creds(who), &nonce, ticks).to_vec();
                if u.ratio(1, 8)? {
                    hs.extend_from_slice(&take(u, 64)?);
                }
                if who < 2 {
                    *w.nonces.entry(nonce).or_insert(0) |= 1 << who;
                }
                let client = addr(u)?;
                let gw = gateways()[usize::from(u.int_in_range(0..=2u8)?)];
                let mut d = vec![0u8; 36 + hs.len()];
                let n = hostlink::emit_handshake(&w.link.handshake_mac(), &client, &hs, &mut d);
                d.truncate(n);
                last_hs = Some((gw, client, d.clone()));
                w.handle(gw, &d, out_len);
            }
            // The last HANDSHAKE again, from the same or another client tuple.
            4 => {
                if let Some((gw, _, d)) = last_hs.clone() {
                    let mut d = d;
                    if u.arbitrary()? {
                        let other = addr(u)?;
                        let mut f = vec![0u8; d.len() + 36];
                        let mac = w.link.handshake_mac();
                        let framed = hostlink::verify_handshake(&mac, &d).unwrap();
                        let (_, inner) = hostlink::parse_tuple_data(framed).unwrap();
                        let n = hostlink::emit_handshake(&mac, &other, inner, &mut f);
                        f.truncate(n);
                        d = f;
                    }
                    w.handle(gw, &d, out_len);
                }
            }
            // A control message from a gateway.
            5 | 6 => {
                let known: Vec<(u64, u64)> = w.registers.iter().map(|(r, c)| (*r, *c)).collect();
                let (request, conn_id) = if !known.is_empty() && u.ratio(3, 4)? {
                    known[u.choose_index(known.len())?]
                } else {
                    (u.arbitrary()?, u.arbitrary()?)
                };
                let msg = match u.int_in_range(0..=6u8)? {
                    0..=2 => {
                        let s = 1 + usize::from(u.int_in_range(0..=31u8)?);
                        Control::Registered {
                            request,
                            conn_id,
                            epoch: u.arbitrary()?,
                            index: u.arbitrary()?,
                            rebind_secret: u.arbitrary()?,
                            slot_keys: (0..s).map(|_| u.arbitrary()).collect::<Result<_>>()?,
                        }
                    }
                    3 => Control::RegisterFailed {
                        request,
                        conn_id,
                        reason: u.arbitrary()?,
                    },
                    4 => Control::Rebound {
                        conn_id: w.live.last().map_or(conn_id, |l| l.conn_id),
                        t: w.now,
                        old: None,
                        new: addr(u)?,
                    },
                    5 => Control::Expired { conn_id },
                    _ => Control::Closed {
                        request,
                        conn_id,
                        found: u.arbitrary()?,
                    },
                };
                let key = if u.ratio(7, 8)? { w.link.cipher() } else { LinkKey(u.arbitrary()?).cipher() };
                let from = addr(u)?;
                w.handle(from, &msg.seal(&key, w.now), out_len);
            }
            // DATA for a live connection (valid, replayed, or for another conn_id).
            7 | 8 => {
                if w.live.is_empty() {
                    continue;
                }
                let i = u.choose_index(w.live.len())?;
                let payload = take(u, 1300)?;
                let l = &mut w.live[i];
                let seq = if u.ratio(3, 4)? { l.seq += 1; l.seq } else { u.arbitrary()? };
                let mut data = vec![0u8; payload.len() + 25];
                seal_data(&crypto::gcm(&l.c2s), seq, &payload, &mut data);
                let conn_id = if u.ratio(7, 8)? { l.conn_id } else { u.arbitrary()? };
                let mut d = vec![0u8; data.len() + 9];
                let n = hostlink::emit_conn_data(LinkType::ToHostData, conn_id, &data, &mut d);
                let from = addr(u)?;
                w.handle(from, &d[..n], out_len);
            }
            9 => {
                let step = u64::from(u.arbitrary::<u32>()?) << u.int_in_range(0..=16u8)?;
                w.now = Ticks(w.now.0.saturating_add(step));
                if u.ratio(3, 4)? || w.host.poll_timeout().is_some_and(|t| t <= w.now) {
                    w.host.handle_timeout(w.now);
                    w.drain(MAX_DATAGRAM, None);
                }
            }
            _ => {
                let conn_id = match w.live.last() {
                    Some(l) if u.arbitrary()? => l.conn_id,
                    _ => u.arbitrary()?,
                };
                if w.host.close(w.now, conn_id) {
                    w.drain(MAX_DATAGRAM, None);
                }
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
