//! The key delivery vectors (tests/data/key-delivery.json, generated independently by
//! scripts/key-delivery-vectors.py) against the library's layouts: KEYS, KEYS_ACK and the
//! host-link bodies EPOCH_KEYS and KEYS_DELIVERED (tests/data/PROTOCOL-EXT.md).

use rebindgw::crypto;
use rebindgw::keys::{EpochKeys, MasterSecret};
use rebindgw::wire::{
    EpochKeysEntry, KEYS_ACK_LEN, NewKeys, emit_epoch_keys, emit_keys_delivered, keys_len,
    open_keys, open_keys_ack, parse_epoch_keys, parse_keys_delivered, seal_keys, seal_keys_ack,
};
use serde_json::Value;

fn bytes<const N: usize>(v: &Value) -> [u8; N] {
    let mut out = [0u8; N];
    hex::decode_to_slice(v.as_str().unwrap(), &mut out).unwrap();
    out
}

fn hexv(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

#[test]
fn key_delivery_vectors() {
    let file: Value =
        serde_json::from_str(include_str!("data/key-delivery.json")).expect("vectors parse");
    let vectors = file["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 3);
    for (n, v) in vectors.iter().enumerate() {
        let slots = v["slots"].as_u64().unwrap() as usize;
        let epoch = v["epoch"].as_u64().unwrap() as u32;
        let index = v["index"].as_u64().unwrap() as u32;
        let master = MasterSecret::from_bytes(bytes(&v["master"]));
        let derived = EpochKeys::derive(&master, epoch, slots).unwrap();
        let slot_keys: Vec<[u8; 16]> = v["slot_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(bytes)
            .collect();
        assert_eq!(
            *derived.client_keys(index),
            slot_keys,
            "vector {n}: slot keys"
        );
        let keys = NewKeys {
            epoch,
            index,
            rebind_secret: bytes(&v["rebind_secret"]),
            slot_keys,
        };
        let s2c = crypto::gcm(&bytes(&v["kd_s2c"]));
        let c2s = crypto::gcm(&bytes(&v["kd_c2s"]));
        let kseq = v["kseq"].as_u64().unwrap();
        let aseq = v["aseq"].as_u64().unwrap();

        let mut buf = vec![0u8; keys_len(slots)];
        let len = seal_keys(&s2c, kseq, &keys, &mut buf);
        assert_eq!(buf[..len], hexv(&v["keys"])[..], "vector {n}: KEYS");
        assert_eq!(open_keys(&s2c, &buf).unwrap(), (kseq, keys.clone()));
        assert!(
            open_keys(&c2s, &buf).is_err(),
            "vector {n}: the other direction's key"
        );

        let mut ack = [0u8; KEYS_ACK_LEN];
        seal_keys_ack(&c2s, aseq, epoch, kseq, &mut ack);
        assert_eq!(ack[..], hexv(&v["keys_ack"])[..], "vector {n}: KEYS_ACK");
        assert_eq!(open_keys_ack(&c2s, &ack).unwrap(), (aseq, epoch, kseq));

        let conn_id = v["conn_id"].as_u64().unwrap();
        let entries = vec![EpochKeysEntry { conn_id, keys }];
        let body = emit_epoch_keys(epoch, slots, &entries);
        assert_eq!(body, hexv(&v["epoch_keys_body"]), "vector {n}: EPOCH_KEYS");
        assert_eq!(parse_epoch_keys(&body).unwrap(), (epoch, entries));

        let ids: Vec<u64> = v["keys_delivered_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap())
            .collect();
        let body = emit_keys_delivered(epoch, &ids);
        assert_eq!(
            body,
            hexv(&v["keys_delivered_body"]),
            "vector {n}: KEYS_DELIVERED"
        );
        assert_eq!(parse_keys_delivered(&body).unwrap(), (epoch, ids));
    }
}
