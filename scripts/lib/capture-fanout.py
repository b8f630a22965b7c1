#!/usr/bin/env python3
"""An on-path attacker for the cluster test bed, run in the router namespace.

It watches the router's client side (r0) for REBINDs from the public address ADDR, and sends
each tuple's first REBIND, byte for byte and from the same source tuple, to every gateway at
once: one raw copy per ECMP leg (the raw socket bound to r1, r2, r3 picks that leg's next hop,
whatever the multipath hash says). The original still goes to the gateway the hash picks, so
each captured REBIND reaches that gateway twice and the other two once.

It also notes every other REBIND from those tuples (the clients' retries and later REBINDs,
not copied) and counts the REBIND_ACKs the gateways send back, per REBIND (tuple and t) and
per leg. It prints one JSON object when it ends (at the deadline, or on SIGTERM):
  {"captured": n, "tuples": {"ip:port": {"captured_t": hex, "sent_to": ["r1", ...],
   "rebinds": {t_hex: {"acks": {"r2": k}, "distinct_acks": d}}}}}

Usage: capture-fanout.py ADDR SVC PORT SECONDS
"""
import ctypes
import json
import select
import signal
import socket
import struct
import sys
import time

REBIND, REBIND_ACK = 0x52, 0x72
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
LEGS = ("r1", "r2", "r3")


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def only_addr(sock, addr):
    """Classic BPF: keep IPv4 packets from or to addr (offsets from the IP header, as a
    SOCK_DGRAM packet socket sees them), so the forwarding load never reaches python."""
    a = struct.unpack("!I", socket.inet_aton(addr))[0]
    prog = (SockFilter * 6)(
        SockFilter(0x20, 0, 0, 12),  # ld [12]: source address
        SockFilter(0x15, 2, 0, a),   # == addr: keep
        SockFilter(0x20, 0, 0, 16),  # ld [16]: destination address
        SockFilter(0x15, 0, 1, a),   # == addr: keep, else drop
        SockFilter(0x06, 0, 0, 0xFFFF),
        SockFilter(0x06, 0, 0, 0),
    )
    fprog = SockFprog(len(prog), prog)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(ctypes.string_at(
        ctypes.addressof(fprog), ctypes.sizeof(fprog))))


def with_udp_checksum(pkt, ihl):
    """The packet with its UDP checksum computed: a sender with checksum offload (veth) leaves
    only the pseudo-header sum in it, which the kernel completes on the original's way out but
    not on a raw copy's."""
    udp = bytearray(pkt[ihl:])
    udp[6:8] = b"\0\0"
    data = pkt[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_UDP, len(udp)) + bytes(udp)
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    udp[6:8] = struct.pack("!H", (~s & 0xFFFF) or 0xFFFF)
    return bytes(pkt[:ihl]) + bytes(udp)


def main():
    addr, svc, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    only_addr(sniff, addr)
    legs = {}
    for leg in LEGS:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, leg.encode())
        legs[leg] = s
    tuples = {}
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    print("ready", file=sys.stderr, flush=True)
    end = time.monotonic() + seconds
    while not stop[0] and time.monotonic() < end:
        if not select.select([sniff], [], [], 0.1)[0]:
            continue
        pkt, (ifname, _, pkttype, _, _) = sniff.recvfrom(65535)
        if len(pkt) < 20 or pkt[9] != socket.IPPROTO_UDP or pkttype == PACKET_OUTGOING:
            continue
        ihl = (pkt[0] & 0x0F) * 4
        if len(pkt) < ihl + 9:
            continue
        src, dst = socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20])
        sport, dport = struct.unpack("!HH", pkt[ihl:ihl + 4])
        kind = pkt[ihl + 8]
        if ifname == "r0" and src == addr and dst == svc and dport == port and kind == REBIND:
            key, t = "%s:%d" % (src, sport), pkt[ihl + 10:ihl + 18].hex()
            if key in tuples:
                # The client's own retries (same t) and later REBINDs (a new t) are seen,
                # not copied.
                tuples[key]["rebinds"].setdefault(t, {"acks": {}, "ack_payloads": set()})
                continue
            copy = with_udp_checksum(pkt, ihl)
            for leg, s in legs.items():
                s.sendto(copy, (svc, 0))
            tuples[key] = {"captured_t": t, "sent_to": list(legs),
                           "rebinds": {t: {"acks": {}, "ack_payloads": set()}}}
        elif ifname in legs and src == svc and sport == port and dst == addr and kind == REBIND_ACK:
            tup = tuples.get("%s:%d" % (dst, dport))
            r = tup and tup["rebinds"].get(pkt[ihl + 9:ihl + 17].hex())
            if r:
                r["acks"][ifname] = r["acks"].get(ifname, 0) + 1
                r["ack_payloads"].add(bytes(pkt[ihl + 8:]))
    for tup in tuples.values():
        for r in tup["rebinds"].values():
            r["distinct_acks"] = len(r.pop("ack_payloads"))
    json.dump({"captured": len(tuples), "tuples": tuples}, sys.stdout)
    print(flush=True)


if __name__ == "__main__":
    main()
