#!/usr/bin/env python3
"""Generates tests/data/key-delivery.json: known-answer vectors for the key delivery messages
of tests/data/PROTOCOL-EXT.md ("Key delivery"), computed here independently of the Rust code
(Python `hmac`/`hashlib` for HKDF, `cryptography` for AES-128-GCM).

    python3 scripts/key-delivery-vectors.py > tests/data/key-delivery.json
"""
import hashlib
import hmac
import json
import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def hkdf_extract(salt, ikm):
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk, info, n):
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:n]


def slot_keys(master, epoch, slots, index):
    prk = hkdf_extract(b"mesh-rebind/v1", master)
    keys = []
    for i in range(slots):
        b = (index >> (slots - 1 - i)) & 1
        keys.append(hkdf_expand(prk, b"slot" + struct.pack(">IBB", epoch, i, b), 16))
    return keys


def nonce(seq):
    return struct.pack(">IQ", 1, seq)


def keys_msg(kd_s2c, kseq, epoch, index, secret, keys):
    head = bytes([0x4B]) + struct.pack(">Q", kseq)
    body = struct.pack(">IIB", epoch, index, len(keys)) + secret + b"".join(keys)
    return head + AESGCM(kd_s2c).encrypt(nonce(kseq), body, head)


def ack_msg(kd_c2s, aseq, epoch, kseq):
    head = bytes([0x6B]) + struct.pack(">Q", aseq)
    return head + AESGCM(kd_c2s).encrypt(nonce(aseq), struct.pack(">IQ", epoch, kseq), head)


def main():
    master = bytes(range(32))
    vectors = []
    cases = [
        # (slots, epoch, index, kseq, aseq)
        (4, 2, 0b1010, 0, 0),
        (16, 0x101, 0xBEEF, 7, 3),
        (32, 0xFFFFFFFF, 0x80000001, 2**63 - 1, 2**64 - 1),
    ]
    for n, (slots, epoch, index, kseq, aseq) in enumerate(cases):
        kd_s2c = bytes([0x20 + n] * 16)
        kd_c2s = bytes([0x40 + n] * 16)
        secret = bytes([(0x80 + n + i) % 256 for i in range(32)])
        keys = slot_keys(master, epoch, slots, index)
        conn_id = 0x0102030405060708 + n
        epoch_keys_body = (
            struct.pack(">IBH", epoch, slots, 1)
            + struct.pack(">QI", conn_id, index)
            + secret
            + b"".join(keys)
        )
        delivered_body = struct.pack(">IH", epoch, 2) + struct.pack(">QQ", conn_id, conn_id + 1)
        vectors.append(
            {
                "master": master.hex(),
                "slots": slots,
                "epoch": epoch,
                "index": index,
                "conn_id": conn_id,
                "rebind_secret": secret.hex(),
                "slot_keys": [k.hex() for k in keys],
                "kd_s2c": kd_s2c.hex(),
                "kd_c2s": kd_c2s.hex(),
                "kseq": kseq,
                "aseq": aseq,
                "keys": keys_msg(kd_s2c, kseq, epoch, index, secret, keys).hex(),
                "keys_ack": ack_msg(kd_c2s, aseq, epoch, kseq).hex(),
                "epoch_keys_body": epoch_keys_body.hex(),
                "keys_delivered_body": delivered_body.hex(),
                "keys_delivered_ids": [conn_id, conn_id + 1],
            }
        )
    print(
        json.dumps(
            {
                "spec": "tests/data/PROTOCOL-EXT.md, Key delivery",
                "generator": "scripts/key-delivery-vectors.py",
                "vectors": vectors,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
