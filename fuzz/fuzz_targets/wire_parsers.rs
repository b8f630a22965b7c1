//! Every datagram parser of `rebindgw::wire` on arbitrary bytes: none may panic, and what
//! parses must be self-consistent (lengths, re-emission).
//!
//! Input: byte 0 picks the slot count S = 1 + (b % 32) for `RebindView`; the rest is the
//! datagram (all parsers see the same bytes, so a REBIND of the right length for S is
//! reachable by mutating one length).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rebindgw::crypto;
use rebindgw::wire::{
    DataView, HandshakeView, MAX_SLOTS, MsgType, REBIND_ACK_LEN, RebindAckView, RebindView,
    Unrecognized, emit_tuple, open_handshake, open_handshake_reply, parse_tuple, rebind_len,
    slots_for_rebind_len,
};

/// The credentials of the `handshake` vector in tests/data/v1.json, so the seed
/// HANDSHAKE_REPLY opens and mutations of it reach the decoder behind the AEAD.
const PSK: [u8; 32] = [
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
];
const NONCE: [u8; 16] = [
    0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x5b, 0x5c, 0x5d, 0x5e, 0x5f,
];

fuzz_target!(|input: &[u8]| {
    let Some((&sel, d)) = input.split_first() else {
        return;
    };
    let slots = 1 + usize::from(sel) % MAX_SLOTS;

    if let Ok(t) = MsgType::of(d) {
        assert_eq!(t as u8, d[0]);
        assert_eq!(MsgType::from_byte(d[0]), Some(t));
        let _ = t.name();
    }

    if let Ok(u) = Unrecognized::parse(d) {
        // Parse is exact: re-emitting gives the same bytes.
        assert_eq!(u.len(), d.len());
        let mut out = [0u8; 64];
        let n = u.emit(&mut out);
        assert_eq!(&out[..n], d);
    }

    match RebindView::new_checked(d, slots) {
        Ok(v) => {
            assert_eq!(d.len(), rebind_len(slots));
            assert_eq!(slots_for_rebind_len(d.len()), Some(slots));
            assert_eq!(v.slots(), slots);
            assert_eq!(v.slot_bytes().len(), 16 * slots);
            assert_eq!(v.head().len() + v.sealed().len(), d.len());
            assert_eq!(v.sealed().len(), 24);
            let _ = (v.epoch_byte(), v.t(), v.cookie(), v.is_cookie_request());
            assert_eq!(v.as_bytes(), d);
        }
        Err(_) => {
            if d.first() == Some(&b'R') {
                assert_ne!(d.len(), rebind_len(slots));
            }
        }
    }
    // The other slot counts of the same bytes, and out-of-range ones.
    for s in [0, slots.wrapping_sub(1), slots + 1, 33, usize::MAX] {
        let _ = RebindView::new_checked(d, s);
    }
    if let Some(s) = slots_for_rebind_len(d.len()) {
        assert_eq!(rebind_len(s), d.len());
    }

    if let Ok(v) = RebindAckView::new_checked(d) {
        assert_eq!(d.len(), REBIND_ACK_LEN);
        let _ = v.t();
        let _ = v.open(&rebindgw::crypto::gcm::SessionGcm::new(&[7; 16]));
    }

    if let Ok(v) = HandshakeView::new_checked(d) {
        let _ = (v.client_id(), v.client_nonce());
        // Only a HANDSHAKE sealed under PSK opens; whatever the bytes, it never panics.
        let _ = open_handshake(&v, &PSK);
    }

    if let Ok(v) = DataView::new_checked(d) {
        let _ = v.seq();
        let n = v.payload_len();
        let mut out = vec![0u8; n];
        let _ = v.open(&crypto::gcm(&[0x11; 16]), &mut out);
        // A too-small output buffer is an error, not a panic.
        if n > 0 {
            let _ = v.open(&crypto::gcm(&[0x11; 16]), &mut out[..n - 1]);
        }
    }

    if let Ok(r) = open_handshake_reply(d, &PSK, &NONCE) {
        assert!((1..=MAX_SLOTS).contains(&r.slot_keys.len()));
    }
    // The nonce the datagram itself carries gets past the nonce check to the AEAD.
    if d.len() >= 17 {
        let mut n = [0u8; 16];
        n.copy_from_slice(&d[1..17]);
        let _ = open_handshake_reply(d, &PSK, &n);
    }

    if let Ok((addr, n)) = parse_tuple(d) {
        assert!(n <= d.len());
        let mut out = [0u8; 19];
        assert_eq!(emit_tuple(&addr, &mut out), n);
        assert_eq!(&out[..n], &d[..n]);
    }
});
