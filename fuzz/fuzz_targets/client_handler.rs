//! The client's sans-IO state machine (`Client::handle` / `handle_timeout` /
//! `poll_transmit`) in the simulated world (`rebindgw::sim`): real clients against the real
//! gateway core and echo host, plus datagrams the input hands straight to a client
//! (`World::deliver`): raw bytes; host DATA with any seq and payload (`World::host_data`);
//! UNRECOGNIZEDs with a valid cookie for any tuple and time, a broken cookie or another
//! epoch byte; REBIND_ACKs and HANDSHAKE_REPLYs captured on the wire, replayed late, twice or
//! bit-flipped; HANDSHAKE_REPLYs for the client's real nonces with fuzzed contents; plus sends,
//! network changes, NAT moves, loss and time.
//!
//! Invariants: nothing panics; every datagram a client sends has a known type and fits
//! `MAX_DATAGRAM_LEN`; its DATA seqs only grow on one connection; what it receives is a
//! payload it sent or one the harness sealed for it; states never go back to `Handshaking`,
//! `Failed` is final; and while every client holds only keys the gateway issued, a REBIND a
//! client builds is never rejected at trial decryption, AEAD, conn_id or length (only for
//! epoch, freshness, cookie, replay, or an index released while it was away).
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use arbitrary::{Result, Unstructured};
use common::{Track, bytes, shared_op, source, ticks_near};
use libfuzzer_sys::fuzz_target;
use rebindgw::client::ClientState;
use rebindgw::crypto;
use rebindgw::gateway::metrics::C;
use rebindgw::sim::{GATEWAY, World, creds};
use rebindgw::verify::RejectReason;
use rebindgw::wire::{
    DataView, HandshakeReply, HandshakeView, MsgType, Unrecognized, build_handshake_reply,
};

/// DATA seqs only grow on one connection.
fn check_data_seqs(w: &World, last: &mut Vec<(Option<u64>, usize, u64)>) {
    for (i, c) in w.clients.iter().enumerate() {
        if last.len() <= i {
            last.push((None, 0, 0));
        }
        let (conn, seen, next) = &mut last[i];
        if *conn != c.core.conn_id() {
            // A new connection (handshake again) starts its own sequence.
            *conn = c.core.conn_id();
            *next = 0;
            *seen = c.sent.len();
            continue;
        }
        for d in &c.sent[*seen..] {
            if d.first() == Some(&(MsgType::Data as u8)) {
                let v = DataView::new_checked(d).expect("the client's DATA parses");
                assert!(v.seq() >= *next, "DATA seq went back");
                *next = v.seq() + 1;
            }
        }
        *seen = c.sent.len();
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut w = common::world(u)?;
    let mut track = Track::default();
    let mut seqs = Vec::new();
    // False once a client accepted a reply with keys the gateway never issued.
    let mut honest = true;
    while !u.is_empty() {
        let op = u.int_in_range(0..=13u8)?;
        common::trace(format_args!("{:?} op {op}", w.now));
        if !shared_op(op, u, &mut w, &mut track)? {
            let n = w.clients.len();
            if n == 0 {
                continue;
            }
            let i = u.choose_index(n)?;
            match op {
                5 => {
                    let d = bytes(u, 1300)?;
                    w.deliver(i, &d);
                }
                // Host DATA with a chosen seq.
                6 | 7 => {
                    let seq = if u.ratio(1, 2)? {
                        u.int_in_range(0..=70u64)?
                    } else {
                        u.arbitrary()?
                    };
                    let payload = bytes(u, 1200)?;
                    if let Some(d) = w.host_data(i, seq, &payload) {
                        track.extra[i].insert(payload);
                        w.deliver(i, &d);
                    }
                }
                // UNRECOGNIZED, valid cookie for any tuple and time, or broken.
                8 | 9 => {
                    let observed = if u.ratio(1, 2)? {
                        w.clients[i].tuple
                    } else {
                        source(u, &w)?
                    };
                    let t = if u.ratio(1, 2)? { w.now } else { ticks_near(u, w.now)? };
                    let keys = w.epoch_keys(w.cfg.epoch);
                    let mut un = Unrecognized {
                        epoch_byte: keys.epoch_byte(),
                        t,
                        observed,
                        cookie: keys.cookie(&observed, t),
                    };
                    if u.ratio(1, 8)? {
                        un.cookie = u.arbitrary()?;
                    }
                    if u.ratio(1, 8)? {
                        un.epoch_byte = u.arbitrary()?;
                    }
                    let mut d = [0u8; 64];
                    let len = un.emit(&mut d);
                    w.deliver(i, &d[..len]);
                }
                // What the gateway sent a client (ACKs, replies, UNRECOGNIZEDs, DATA),
                // replayed late, twice, to another client, or flipped.
                10 | 11 => {
                    let from_gw: Vec<&Vec<u8>> = w
                        .wire_log
                        .iter()
                        .filter(|d| d.from == GATEWAY)
                        .map(|d| &d.data)
                        .collect();
                    if from_gw.is_empty() {
                        continue;
                    }
                    let acks: Vec<&&Vec<u8>> = from_gw
                        .iter()
                        .filter(|d| d.first() == Some(&(MsgType::RebindAck as u8)))
                        .collect();
                    let mut d = if !acks.is_empty() && u.ratio(1, 2)? {
                        (*acks[u.choose_index(acks.len())?]).clone()
                    } else {
                        from_gw[u.choose_index(from_gw.len())?].clone()
                    };
                    if u.ratio(1, 4)? && !d.is_empty() {
                        let j = u.choose_index(d.len())?;
                        d[j] ^= 1 << u.int_in_range(0..=7u8)?;
                    }
                    w.deliver(i, &d);
                }
                // A HANDSHAKE_REPLY for one of the client's real nonces, fuzzed contents.
                12 => {
                    let nonces: Vec<[u8; 16]> = w.clients[i]
                        .sent
                        .iter()
                        .filter_map(|d| HandshakeView::new_checked(d).ok())
                        .map(|v| v.client_nonce())
                        .collect();
                    if nonces.is_empty() {
                        continue;
                    }
                    let nonce = nonces[u.choose_index(nonces.len())?];
                    let slots = 1 + usize::from(u.int_in_range(0..=31u8)?);
                    let reply = HandshakeReply {
                        conn_id: u.arbitrary()?,
                        epoch_byte: u.arbitrary()?,
                        index: u.arbitrary()?,
                        rebind_secret: u.arbitrary()?,
                        kd_c2s: u.arbitrary()?,
                        kd_s2c: u.arbitrary()?,
                        slot_keys: (0..slots).map(|_| u.arbitrary()).collect::<Result<_>>()?,
                    };
                    let mut d = build_handshake_reply(
                        &creds(i).psk,
                        &nonce,
                        &crypto::random_array(),
                        &reply,
                    );
                    if u.ratio(1, 4)? {
                        let j = u.choose_index(d.len())?;
                        d[j] ^= 1 << u.int_in_range(0..=7u8)?;
                    }
                    let before = w.clients[i].core.state();
                    w.deliver(i, &d);
                    if before == ClientState::Handshaking
                        && w.clients[i].core.state() == ClientState::Connected
                    {
                        // Connected with keys the gateway never issued.
                        honest = false;
                    }
                }
                _ => {
                    let now = w.now;
                    w.clients[i].core.network_changed(now);
                }
            }
        }
        track.check(&w);
        check_data_seqs(&w, &mut seqs);
        if honest {
            for r in [
                RejectReason::Length,
                RejectReason::Trial,
                RejectReason::Aead,
                RejectReason::ConnId,
            ] {
                assert_eq!(w.gateway.count(C::reject(r)), 0, "an honest REBIND rejected: {r:?}");
            }
        }
    }
    w.run_for(Duration::from_secs(2));
    track.check(&w);
    check_data_seqs(&w, &mut seqs);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
