//! The reference host's sans-IO core (`HostCore::handle`, `handle_timeout`, `close`) in the
//! simulated world (`rebindgw::sim`): real clients and the real gateway core around it, plus
//! datagrams the input sends the host from the gateway's link address or from elsewhere:
//! raw bytes; real HANDSHAKEs framed by a gateway (fresh, retransmitted from the same or
//! another tuple, stale, of an unknown client, with bytes appended); REGISTERED /
//! REGISTER_FAILED / REBOUND / EXPIRED / CLOSED for the REGISTERs the host sent (or made up),
//! under the link key or another; DATA that authenticates under the keys the host handed
//! out (any seq, maybe for another conn_id); captured link datagrams replayed or flipped;
//! `close`; output buffers shorter than a datagram.
//!
//! Invariants: nothing panics; an answer fits the buffer it was given (checked by the
//! world); the host sends only the link messages a host sends; a HANDSHAKE_REPLY it relays
//! opens under the PSK of a client that sent that nonce; DATA it sends a client opens under
//! the `kd_s2c` its reply handed out; and the clients' invariants (`common::Track`).
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::Duration;

use arbitrary::{Result, Unstructured};
use common::{MAX_CLIENTS, Track, bytes, shared_op, source};
use libfuzzer_sys::fuzz_target;
use rebindgw::crypto;
use rebindgw::hostlink::{self, Control, LinkKey, LinkType};
use rebindgw::host::MAX_DATAGRAM;
use rebindgw::sim::{Datagram, GATEWAY_LINK, HOST, World, creds};
use rebindgw::time::Ticks;
use rebindgw::wire::{
    DataView, HandshakeView, build_handshake, open_handshake_reply, seal_data,
};

/// A connection as its client sees it after the host's reply.
struct Live {
    /// The enrolled client whose PSK opened the reply.
    who: usize,
    conn_id: u64,
    c2s: [u8; 16],
    s2c: [u8; 16],
    seq: u64,
}

/// What the harness learned from the wire.
#[derive(Default)]
struct Learned {
    /// Host datagrams of `wire_log` already looked at.
    scanned: usize,
    /// Handshake nonce -> the credentials (by enrolled index) that sent it.
    nonces: HashMap<[u8; 16], Vec<usize>>,
    live: Vec<Live>,
    /// REGISTERs the host sent: (request, conn_id).
    registers: Vec<(u64, u64)>,
}

impl Learned {
    /// Looks at everything new on the wire: the clients' nonces, and what the host sent.
    fn scan(&mut self, w: &World) {
        for (i, c) in w.clients.iter().enumerate() {
            for d in &c.sent {
                if let Ok(v) = HandshakeView::new_checked(d) {
                    let who = self.nonces.entry(v.client_nonce()).or_default();
                    if !who.contains(&i) {
                        who.push(i);
                    }
                }
            }
        }
        let link = w.link_key().cipher();
        for d in &w.wire_log[self.scanned..] {
            if d.from != HOST {
                continue;
            }
            match hostlink::link_type(&d.data) {
                Ok(LinkType::Register) => {
                    if let Ok(Control::Register {
                        request, conn_id, ..
                    }) = Control::open(&d.data, &link, w.now)
                    {
                        self.registers.push((request, conn_id));
                    }
                }
                Ok(LinkType::ToClientReply) => {
                    let (_, inner) = hostlink::parse_tuple_data(&d.data).expect("framed reply");
                    let nonce: [u8; 16] = inner[1..17].try_into().unwrap();
                    let senders = self
                        .nonces
                        .get(&nonce)
                        .expect("a reply for a nonce a client sent");
                    let (who, r) = senders
                        .iter()
                        .find_map(|who| {
                            open_handshake_reply(inner, &creds(*who).psk, &nonce)
                                .ok()
                                .map(|r| (*who, r))
                        })
                        .expect("the reply opens for a client that sent the nonce");
                    self.live.push(Live {
                        who,
                        conn_id: r.conn_id,
                        c2s: r.kd_c2s,
                        s2c: r.kd_s2c,
                        seq: 1 << 40,
                    });
                }
                Ok(LinkType::ToClientData) => {
                    let (conn_id, inner) = hostlink::parse_conn_data(&d.data).expect("framed DATA");
                    let live = self
                        .live
                        .iter()
                        .rev()
                        .find(|l| l.conn_id == conn_id)
                        .expect("DATA for a connection the host replied to");
                    let v = DataView::new_checked(inner).expect("the host's DATA parses");
                    let mut p = vec![0u8; v.payload_len()];
                    v.open(&crypto::gcm(&live.s2c), &mut p)
                        .expect("the host's DATA opens under kd_s2c");
                }
                Ok(LinkType::Close | LinkType::Hello) => {}
                other => panic!("the host sent {other:?}"),
            }
        }
        self.scanned = w.wire_log.len();
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut w = common::world(u)?;
    let mut track = Track::default();
    let mut seen = Learned::default();
    let mut last_hs: Option<Datagram> = None;
    while !u.is_empty() {
        let op = u.int_in_range(0..=13u8)?;
        common::trace(format_args!("{:?} op {op}", w.now));
        if !shared_op(op, u, &mut w, &mut track)? {
            let from_gateway = |u: &mut Unstructured<'_>, w: &World| -> Result<_> {
                Ok(if u.ratio(7, 8)? { GATEWAY_LINK } else { source(u, w)? })
            };
            let d = match op {
                5 => Datagram {
                    from: from_gateway(u, &w)?,
                    to: HOST,
                    data: bytes(u, 1500)?,
                },
                // A real HANDSHAKE (an enrolled client's or a stranger's), framed by a gateway.
                6 | 7 => {
                    let who = u.int_in_range(0..=MAX_CLIENTS)?;
                    let nonce: [u8; 16] = u.arbitrary()?;
                    let ticks = if u.ratio(3, 4)? {
                        w.now
                    } else {
                        Ticks(w.now.0.wrapping_add_signed(u.arbitrary::<i64>()? >> u.int_in_range(0..=63u8)?))
                    };
                    let c = if who < MAX_CLIENTS {
                        creds(who)
                    } else {
                        creds(1000)
                    };
                    let mut hs = build_handshake(&c, &nonce, ticks).to_vec();
                    if u.ratio(1, 8)? {
                        hs.extend_from_slice(&bytes(u, 64)?);
                    }
                    if who < MAX_CLIENTS {
                        seen.nonces.entry(nonce).or_default().push(who);
                    }
                    let client = source(u, &w)?;
                    let mut d = vec![0u8; 64 + hs.len()];
                    let n = hostlink::emit_handshake(&w.link_key().handshake_mac(), &client, &hs, &mut d);
                    d.truncate(n);
                    let d = Datagram {
                        from: from_gateway(u, &w)?,
                        to: HOST,
                        data: d,
                    };
                    last_hs = Some(d.clone());
                    d
                }
                // The last HANDSHAKE again, from the same or another client tuple.
                8 => {
                    let Some(mut d) = last_hs.clone() else { continue };
                    if u.arbitrary()? {
                        let other = source(u, &w)?;
                        let mac = w.link_key().handshake_mac();
                        let framed = hostlink::verify_handshake(&mac, &d.data).unwrap();
                        let (_, inner) = hostlink::parse_tuple_data(framed).unwrap();
                        let mut f = vec![0u8; d.data.len() + 64];
                        let n = hostlink::emit_handshake(&mac, &other, inner, &mut f);
                        f.truncate(n);
                        d.data = f;
                    }
                    d
                }
                // A control message from a gateway, for a REGISTER the host sent or made up.
                9 | 10 => {
                    let (request, conn_id) = if !seen.registers.is_empty() && u.ratio(3, 4)? {
                        seen.registers[u.choose_index(seen.registers.len())?]
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
                            conn_id: seen.live.last().map_or(conn_id, |l| l.conn_id),
                            t: w.now,
                            old: None,
                            new: source(u, &w)?,
                        },
                        5 => Control::Expired { conn_id },
                        _ => Control::Closed {
                            request,
                            conn_id,
                            found: u.arbitrary()?,
                        },
                    };
                    let key = if u.ratio(7, 8)? {
                        w.link_key().cipher()
                    } else {
                        LinkKey(u.arbitrary()?).cipher()
                    };
                    Datagram {
                        from: from_gateway(u, &w)?,
                        to: HOST,
                        data: msg.seal(&key, w.now),
                    }
                }
                // DATA for a live connection (valid, replayed, or for another conn_id).
                11 => {
                    if seen.live.is_empty() {
                        continue;
                    }
                    let i = u.choose_index(seen.live.len())?;
                    let payload = bytes(u, 1300)?;
                    let l = &mut seen.live[i];
                    // The echo goes to the client of that connection.
                    if let Some(extra) = track.extra.get_mut(l.who) {
                        extra.insert(payload.clone());
                    }
                    let seq = if u.ratio(3, 4)? {
                        l.seq += 1;
                        l.seq
                    } else {
                        u.arbitrary()?
                    };
                    let mut data = vec![0u8; payload.len() + 25];
                    seal_data(&crypto::gcm(&l.c2s), seq, &payload, &mut data);
                    let conn_id = if u.ratio(7, 8)? { l.conn_id } else { u.arbitrary()? };
                    let mut d = vec![0u8; data.len() + 9];
                    let n = hostlink::emit_conn_data(LinkType::ToHostData, conn_id, &data, &mut d);
                    d.truncate(n);
                    Datagram {
                        from: from_gateway(u, &w)?,
                        to: HOST,
                        data: d,
                    }
                }
                // A link datagram the gateway sent the host, again, maybe flipped.
                12 => {
                    let to_host: Vec<&Datagram> = w.wire_log.iter().filter(|d| d.to == HOST).collect();
                    if to_host.is_empty() {
                        continue;
                    }
                    let mut d = to_host[u.choose_index(to_host.len())?].clone();
                    if u.ratio(1, 3)? && !d.data.is_empty() {
                        let j = u.choose_index(d.data.len())?;
                        d.data[j] ^= 1 << u.int_in_range(0..=7u8)?;
                    }
                    d
                }
                _ => {
                    if u.ratio(1, 2)? {
                        w.host_out_len = if u.ratio(1, 2)? { MAX_DATAGRAM } else { u.int_in_range(0..=800)? };
                    } else {
                        let conn_id = match seen.live.last() {
                            Some(l) if u.arbitrary()? => l.conn_id,
                            _ => u.arbitrary()?,
                        };
                        let now = w.now;
                        w.host.close(now, conn_id);
                    }
                    continue;
                }
            };
            w.inject(d.from, d.to, d.data);
        }
        seen.scan(&w);
        track.check(&w);
    }
    w.host_out_len = MAX_DATAGRAM;
    w.run_for(Duration::from_secs(2));
    seen.scan(&w);
    track.check(&w);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
