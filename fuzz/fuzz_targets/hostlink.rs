//! Host-link parsers: `Control::open` under a fixed link key, `parse_conn_data`,
//! `parse_tuple_data`, `verify_handshake`, `link_type`. None may panic.
//!
//! Input: byte 0 selects a mode. Mode bit 0 set: the rest is a control message *body*,
//! sealed here under the fixed key with the type from byte 1, so the decoder behind the AEAD
//! is reached (a fuzzer cannot forge the tag); the body starts with the sender's u64 clock.
//! Otherwise the rest is a raw datagram.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rebindgw::crypto;
use rebindgw::hostlink::{
    Control, LinkKey, LinkType, ReplayGuard, emit_conn_data, emit_tuple_data, link_type,
    parse_conn_data, parse_tuple_data, verify_handshake,
};
use rebindgw::time::Ticks;

const KEY: [u8; 16] = [0x09; 16];
/// The receiver's clock; seeds use ticks near it.
const NOW: Ticks = Ticks(639_028_224_000_000_000);

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let key = LinkKey(KEY).cipher();
    let sealed;
    let d: &[u8] = if mode & 1 == 1 {
        let Some((&ty, body)) = rest.split_first() else {
            return;
        };
        // type || nonce(12) || GCM-Seal(key, nonce, aad = type, sent || body)
        let mut out = vec![0u8; 1 + 12 + body.len() + crypto::TAG_LEN];
        out[0] = ty;
        out[1..13].copy_from_slice(&[mode; 12]);
        out[13..13 + body.len()].copy_from_slice(body);
        let nonce: [u8; 12] = out[1..13].try_into().unwrap();
        let (head, tail) = out.split_at_mut(13);
        crypto::seal_in_place(&key, &nonce, &head[..1], tail);
        sealed = out;
        &sealed
    } else {
        rest
    };

    let _ = link_type(d);
    match Control::open_with_nonce(d, &key, NOW) {
        Ok(opened) => {
            let msg = opened.msg.clone();
            // What opens re-seals and opens to the same message.
            let again = msg.seal(&key, opened.sent);
            assert_eq!(again.len(), d.len());
            assert_eq!(Control::open(&again, &key, NOW), Ok(msg.clone()));
            assert_eq!(msg.link_type() as u8, d[0]);
            let _ = format!("{msg:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    // Another clock: the staleness check on both sides of the window.
    let _ = Control::open(d, &key, Ticks(0));
    // The replay guard: a second copy of anything is refused.
    let mut guard = ReplayGuard::default();
    if Control::open_fresh(d, &key, NOW, &mut guard).is_ok() {
        assert!(Control::open_fresh(d, &key, NOW, &mut guard).is_err());
    }
    let _ = verify_handshake(&LinkKey(KEY).handshake_mac(), d);
    let _ = Control::open(d, &key, Ticks(u64::MAX));

    if let Ok((conn_id, inner)) = parse_conn_data(d) {
        assert!(!inner.is_empty());
        let mut out = vec![0u8; d.len()];
        let ty = LinkType::from_byte(d[0]).unwrap();
        assert_eq!(emit_conn_data(ty, conn_id, inner, &mut out), d.len());
        assert_eq!(out, d);
    }
    if let Ok((client, inner)) = parse_tuple_data(d) {
        assert!(!inner.is_empty());
        let mut out = vec![0u8; 1 + 19 + inner.len()];
        let ty = LinkType::from_byte(d[0]).unwrap();
        let n = emit_tuple_data(ty, &client, inner, &mut out);
        assert_eq!(&out[..n], d);
    }
});
