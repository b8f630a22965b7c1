#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/ from tests/data/v1.json.

Run from anywhere: `python3 fuzz/gen_seeds.py`. Seeds are committed; rerun only when the
vectors or a target's input format change. The sealed host-link seeds need the
`cryptography` package; without it they are skipped (the hostlink target also seals bodies
itself, mode byte odd, so those seeds need no crypto).

The targets over the simulated world (gateway_handler, client_handler, host_handler,
sim_world) get their seeds from their own minimized runs instead (see below).
"""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
V1 = os.path.join(HERE, "..", "tests", "data", "v1.json")
CORPUS = os.path.join(HERE, "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(data))


def as_list(x):
    return x if isinstance(x, list) else [x]


v1 = json.load(open(V1))
hx = bytes.fromhex

# --- wire_parsers: byte 0 picks S = 1 + b % 32, then the datagram -------------------------
def sel(slots):
    return [slots - 1]

slots16 = 16
for i, u in enumerate(as_list(v1["unrecognized"])):
    write("wire_parsers", f"unrecognized_{i}", sel(16) + list(hx(u["datagram"])))
for i, r in enumerate(as_list(v1["rebind"])):
    write("wire_parsers", f"rebind_{i}", sel(r["slots"]) + list(hx(r["rebind"])))
    write("wire_parsers", f"rebind_ack_{i}", sel(r["slots"]) + list(hx(r["rebind_ack"])))
for i, r in enumerate(as_list(v1["rebind_rejects"])[:4]):
    write("wire_parsers", f"rebind_reject_{i}", sel(r["slots"]) + list(hx(r["rebind"])))
h = as_list(v1["handshake"])[0]
write("wire_parsers", "handshake", sel(16) + list(hx(h["handshake"])))
write("wire_parsers", "handshake_reply", sel(16) + list(hx(h["handshake_reply"])))
for i, d in enumerate(as_list(v1["data"])):
    write("wire_parsers", f"data_{i}", sel(16) + list(hx(d["datagram"])))
write("wire_parsers", "tuple_v4", sel(1) + list(hx("049c41c6336407")))
write("wire_parsers", "cookie_request_s8", sel(8) + [0x52] + [0] * (50 + 16 * 8 - 1))

# --- hostlink: byte 0 = mode; odd = seal (type, body) here; even = raw datagram ------------
def tuple4(ip, port):
    return [4] + list(struct.pack(">H", port)) + list(ip)

def tuple6(ip16, port):
    return [6] + list(struct.pack(">H", port)) + list(ip16)

u64 = lambda n: list(struct.pack(">Q", n))
u32 = lambda n: list(struct.pack(">I", n))
T0 = 639028224000000000
client = tuple4([198, 51, 100, 7], 40001)
bodies = {
    "register": (0x10, u64(1) + u64(T0) + u64(42) + client),
    "register_v6": (0x10, u64(2) + u64(T0) + u64(43) + tuple6(hx("20010db8000000000000000000000001"), 443)),
    "registered": (0x11, u64(1) + u64(42) + u32(7) + [4] + u32(9) + [0x40] * 32 + [0x53] * 64),
    "register_failed": (0x12, u64(1) + u64(42) + [1]),
    "close": (0x13, u64(3) + u64(T0) + u64(42)),
    "closed": (0x14, u64(3) + u64(42) + [1]),
    "rebound_old": (0x15, u64(42) + u64(T0) + [1] + client + tuple4([10, 0, 0, 9], 5555)),
    "rebound_new": (0x15, u64(42) + u64(T0) + [0] + tuple4([10, 0, 0, 9], 5555)),
}
for name, (ty, body) in bodies.items():
    write("hostlink", "body_" + name, [1, ty] + body)
data0 = list(hx(as_list(v1["data"])[1]["datagram"]))
write("hostlink", "to_host_data", [0, 0x01] + u64(42) + data0)
write("hostlink", "to_client_data", [0, 0x02] + u64(42) + data0)
write("hostlink", "to_host_handshake", [0, 0x03] + client + list(hx(h["handshake"])))
write("hostlink", "to_client_reply", [0, 0x04] + client + list(hx(h["handshake_reply"])))
try:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = AESGCM(bytes([9] * 16))
    for name in ("register", "registered", "close", "rebound_old"):
        ty, body = bodies[name]
        nonce = bytes([0x42] * 12)
        sealed = key.encrypt(nonce, bytes(body), bytes([ty]))
        write("hostlink", "sealed_" + name, [0, ty] + list(nonce) + list(sealed))
except ImportError:
    pass

# gateway_handler, client_handler, host_handler and sim_world drive `rebindgw::sim::World`
# with programs read by `arbitrary::Unstructured`; their seeds in corpus/ are a minimized
# corpus from runs of the targets themselves (`cargo fuzz cmin`), not written here.

# --- conformance_json: the vectors file, whole and trimmed -------------------------------
text = open(V1).read()
write("conformance_json", "v1", text.encode())
small = {k: v1[k] for k in ("about", "ticks_2026_01_01")}
for k in ("unrecognized", "data", "rebind_rejects", "rebind", "client_keys"):
    small[k] = as_list(v1[k])[:1]
small["key_schedule"] = dict(v1["key_schedule"])
small["key_schedule"]["slots"] = 4
small["key_schedule"]["slot_keys"] = v1["key_schedule"]["slot_keys"][:4]
write("conformance_json", "v1_trimmed", json.dumps(small).encode())
for k in ("handshake", "rebind_rejects", "data"):
    write("conformance_json", "only_" + k, json.dumps({k: v1[k]}).encode())

# --- text_configs: byte 0 picks the parser ----------------------------------------------
write("text_configs", "clients", b"\x00" + b'''[[client]]
name = "alice"
client_id = "303132333435363738393a3b3c3d3e3f"
psk = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafa0a1a2a3a4a5a6a7a8a9aaabacadaeaf"
''')
write("text_configs", "gateway", b"\x01" + b'''listen = ["127.0.0.1:9000", "[::1]:9000"]
slots = 12
window_secs = 10
io = "mmsg"
max_connections = 4096
[[hosts]]
addr = "127.0.0.1:7500"
link_key_file = "/etc/rebindgw/host1.key"
[rate_limits]
handshake_per_prefix = { per_second = 5.0, burst = 10.0 }
''')
write("text_configs", "rate", b"\x022000/4000")
write("text_configs", "host", b"\x03127.0.0.1:7500=/etc/rebindgw/host1.key")
write("text_configs", "metrics", b'\x04# HELP rebindgw_rx_total x\n# TYPE rebindgw_rx_total counter\nrebindgw_rx_total{kind="data"} 12\nrebindgw_up 1\n')
# --- tunnel_frames: records len(u8) || frame --------------------------------------------------
write("tunnel_frames", "data-ack", b"\x06\x01\x00\x00\x00hi\x04\x03\x00\x00\x00\x07\x01\x00\x00\x00abc")
print("seeds written to", CORPUS)
