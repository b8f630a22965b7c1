#!/usr/bin/env python3
"""Helpers for scripts/crash-test.sh (Python 3 stdlib only; capture and replay need root).

  watch   --admin HOST:PORT --out FILE [--interval S]
          Polls the gateway's /metrics until killed; one line per poll:
          "wall_time ok tx_data rx_data connections replay_rejects accepted" (ok=0: no answer).
  capture --port P --seconds S --out FILE [--max N]
          Sniffs loopback with an AF_PACKET socket and a classic-BPF filter that passes only
          REBINDs to the gateway port (UDP payload 0x52, 306 bytes, S = 16) and REBIND_ACKs from
          it (0x72, 33 bytes). Writes the REBINDs that the gateway acknowledged (same tuple,
          same t) as JSON lines {src, t, hex}. Cookie requests (all zero after the type) are
          skipped.
  replay  --port P --in FILE --admin HOST:PORT [--count K] [--out FILE]
          Sends K captured REBINDs again, each from its own source tuple (a raw IPv4 socket with
          IP_HDRINCL, so it works whether or not the tuple is still bound by a client), sniffs
          for a REBIND_ACK to that tuple carrying the same t, and reads the replay-reject counter
          before, in a quiet second before, and after. Prints a JSON verdict.
"""

import argparse
import ctypes
import json
import os
import select
import socket
import struct
import sys
import time
import urllib.request

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
PACKET_HOST = 0
REBIND_LEN = 306  # 50 + 16 * S with S = 16
ACK_LEN = 33
IP_HDR = 20
UDP_HDR = 8
ETH_HDR = 14  # lo carries a (zeroed) Ethernet header for AF_PACKET


# ---- metrics -------------------------------------------------------------------------------

def scrape(admin, timeout=0.5):
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    m = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        k, _, v = line.rpartition(" ")
        try:
            m[k] = float(v)
        except ValueError:
            pass
    return m


def sample(m):
    return (
        int(m.get('rebindgw_client_tx_packets_total{type="data"}', 0)),
        int(m.get('rebindgw_client_rx_packets_total{type="data"}', 0)),
        int(m.get("rebindgw_connections", 0)),
        int(m.get('rebindgw_rebinds_rejected_total{reason="replay"}', 0)),
        int(m.get("rebindgw_rebinds_accepted_total", 0)),
    )


def cmd_watch(a):
    with open(a.out, "w", buffering=1) as f:
        while True:
            t = time.time()
            try:
                s = sample(scrape(a.admin, timeout=a.interval * 4))
                f.write(f"{t:.4f} 1 " + " ".join(map(str, s)) + "\n")
            except Exception:
                f.write(f"{t:.4f} 0 0 0 0 0 0\n")
            time.sleep(max(0.0, a.interval - (time.time() - t)))


# ---- sniffing ------------------------------------------------------------------------------

def bpf(port):
    """ip && udp && ((dport == port && iplen == REBIND && payload[0] == 'R') ||
                     (sport == port && iplen == ACK && payload[0] == 'r')); IHL 5 assumed."""
    reb_len = IP_HDR + UDP_HDR + REBIND_LEN
    ack_len = IP_HDR + UDP_HDR + ACK_LEN
    p0 = ETH_HDR + IP_HDR + UDP_HDR
    # (code, jt, jf, k); jumps are relative to the next instruction.
    LDH, LDB, JEQ, RET = 0x28, 0x30, 0x15, 0x06
    prog = [
        (LDH, 0, 0, 12),              # 0
        (JEQ, 0, 14, 0x0800),         # 1 -> 16 drop
        (LDB, 0, 0, 23),              # 2
        (JEQ, 0, 12, 17),             # 3 -> 16
        (LDH, 0, 0, 16),              # 4
        (JEQ, 0, 4, reb_len),         # 5 -> 10 (not a REBIND length)
        (LDH, 0, 0, 36),              # 6 dport
        (JEQ, 0, 8, port),            # 7 -> 16
        (LDB, 0, 0, p0),              # 8
        (JEQ, 5, 6, 0x52),            # 9 -> 15 accept / 16 drop
        (JEQ, 0, 5, ack_len),         # 10 (A still = ip length) -> 16
        (LDH, 0, 0, 34),              # 11 sport
        (JEQ, 0, 3, port),            # 12 -> 16
        (LDB, 0, 0, p0),              # 13
        (JEQ, 0, 1, 0x72),            # 14 -> 15 accept / 16 drop
        (RET, 0, 0, 0xFFFF),          # 15 accept
        (RET, 0, 0, 0),               # 16 drop
    ]
    return prog


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def sniffer(port):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    prog = bpf(port)
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw)
    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("lo", 0))
    # Packets queued between socket() and the filter attach may be anything: drain them.
    s.setblocking(False)
    try:
        while True:
            s.recv(65535)
    except BlockingIOError:
        pass
    return s


def parse(frame):
    """-> (kind, src, dst, payload) for a frame the filter passed, else None."""
    ip = frame[ETH_HDR:]
    if len(ip) < IP_HDR + UDP_HDR or ip[0] != 0x45:
        return None
    src_ip = socket.inet_ntoa(ip[12:16])
    dst_ip = socket.inet_ntoa(ip[16:20])
    sport, dport = struct.unpack("!HH", ip[20:24])
    payload = ip[28:]
    kind = payload[0:1]
    return kind, (src_ip, sport), (dst_ip, dport), payload


def cmd_capture(a):
    s = sniffer(a.port)
    rebinds = {}  # (src, t) -> hex
    acked = []
    deadline = time.time() + a.seconds
    seen_r = seen_a = 0
    while time.time() < deadline and len(acked) < a.max:
        r, _, _ = select.select([s], [], [], 0.1)
        if not r:
            continue
        while True:
            try:
                frame, addr = s.recvfrom(65535)
            except BlockingIOError:
                break
            if addr[2] != PACKET_HOST:  # lo shows each packet twice: keep the received copy
                continue
            p = parse(frame)
            if p is None:
                continue
            kind, src, dst, payload = p
            if kind == b"R" and len(payload) == REBIND_LEN:
                if not any(payload[1:]):
                    continue  # cookie request
                seen_r += 1
                t = struct.unpack("!Q", payload[2:10])[0]
                rebinds[(src, t)] = payload.hex()
            elif kind == b"r" and len(payload) == ACK_LEN:
                seen_a += 1
                t = struct.unpack("!Q", payload[1:9])[0]
                h = rebinds.pop((dst, t), None)
                if h is not None:
                    acked.append({"src": list(dst), "t": t, "hex": h})
    with open(a.out, "w") as f:
        for e in acked:
            f.write(json.dumps(e) + "\n")
    print(json.dumps({"rebinds_seen": seen_r, "acks_seen": seen_a, "acked_rebinds": len(acked)}))
    return 0 if acked else 1


# ---- replay --------------------------------------------------------------------------------

def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def udp_packet(src, dst, payload):
    sip, dip = socket.inet_aton(src[0]), socket.inet_aton(dst[0])
    ulen = UDP_HDR + len(payload)
    pseudo = sip + dip + struct.pack("!BBH", 0, 17, ulen)
    udp = struct.pack("!HHHH", src[1], dst[1], ulen, 0) + payload
    c = csum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    total = IP_HDR + ulen
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 17, 0, sip, dip)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return ip + udp


def replay_counter(admin):
    return sample(scrape(admin))[3]


def cmd_replay(a):
    caps = [json.loads(line) for line in open(a.inp) if line.strip()]
    # Prefer distinct source tuples, oldest capture first.
    picked, tuples = [], set()
    for c in caps:
        if tuple(c["src"]) not in tuples:
            tuples.add(tuple(c["src"]))
            picked.append(c)
        if len(picked) == a.count:
            break
    if not picked:
        print(json.dumps({"error": "no captured REBINDs"}))
        return 2
    dst = ("127.0.0.1", a.port)
    c0 = replay_counter(a.admin)
    time.sleep(1.0)
    c1 = replay_counter(a.admin)
    sn = sniffer(a.port)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    want = {}
    for c in picked:
        src = (c["src"][0], int(c["src"][1]))
        want[(src, int(c["t"]))] = 0
        raw.sendto(udp_packet(src, dst, bytes.fromhex(c["hex"])), (dst[0], 0))
    sent_at = time.time()
    while time.time() < sent_at + a.wait:
        r, _, _ = select.select([sn], [], [], 0.05)
        if not r:
            continue
        while True:
            try:
                frame, addr = sn.recvfrom(65535)
            except BlockingIOError:
                break
            if addr[2] != PACKET_HOST:
                continue
            p = parse(frame)
            if p is None or p[0] != b"r" or len(p[3]) != ACK_LEN:
                continue
            t = struct.unpack("!Q", p[3][1:9])[0]
            if (p[2], t) in want:
                want[(p[2], t)] += 1
    c2 = replay_counter(a.admin)
    acks = sum(want.values())
    out = {
        "replayed": len(picked),
        "tuples": [f"{s[0]}:{s[1]}" for (s, _) in want],
        "acks_for_replayed_t": acks,
        "replay_rejects_background_1s": c1 - c0,
        "replay_rejects_delta": c2 - c1,
        "refused": acks == 0 and (c2 - c1) >= len(picked),
    }
    print(json.dumps(out))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f)
    return 0 if out["refused"] else 1


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch")
    w.add_argument("--admin", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--interval", type=float, default=0.05)
    c = sub.add_parser("capture")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--seconds", type=float, default=3.0)
    c.add_argument("--max", type=int, default=16)
    c.add_argument("--out", required=True)
    r = sub.add_parser("replay")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--in", dest="inp", required=True)
    r.add_argument("--admin", required=True)
    r.add_argument("--count", type=int, default=4)
    r.add_argument("--wait", type=float, default=1.5)
    r.add_argument("--out")
    a = ap.parse_args()
    return {"watch": cmd_watch, "capture": cmd_capture, "replay": cmd_replay}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
