#!/usr/bin/env python3
"""Helpers for scripts/flood-test.sh (stdlib only, except `handshake-flood`, which needs the
`cryptography` package for AES-GCM).

  payloads DIR EPOCH          write the hping3 payload files (garbage, REBIND-, DATA- and
                              HANDSHAKE-shaped) into DIR
  sample OUT PIDDIR ADMIN IF  once a second, append one JSON line to OUT: gateway metrics,
                              nftables counters (table inet flood), per-CPU /proc/stat,
                              per-process CPU (pids in PIDDIR/NAME), gateway/host RSS,
                              UDP socket errors; run it inside the gateway's namespace
  handshake-flood CREDS DST PORT RATE SECS
                              valid HANDSHAKEs (enrolled credentials, fresh nonces) from
                              random spoofed IPv4 sources, over a raw socket
  report WORK                 the figures and checks; exit status 1 if a check fails
"""
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
import urllib.request

TICKS_UNIX_EPOCH = 621355968000000000


def ticks_now():
    return int(time.time() * 10_000_000) + TICKS_UNIX_EPOCH


# ---- payloads ---------------------------------------------------------------------------

def payloads(out_dir, epoch):
    os.makedirs(out_dir, exist_ok=True)
    rnd = os.urandom
    files = {
        # First byte is no protocol type: "unknown type" drop.
        "garbage": b"\x00" + rnd(199),
        # REBIND-shaped, S=16: 306 bytes, current epoch byte, a fresh t, a random cookie and
        # random slots and tag. From a spoofed tuple it fails the cookie (check 3), which
        # draws an UNRECOGNIZED (33 B), so this also measures reflection.
        "rebind": b"\x52" + bytes([epoch & 0xFF]) + struct.pack(">Q", ticks_now()) + rnd(296),
        # DATA-shaped, 49 B like a client probe: unknown tuple, draws UNRECOGNIZED (33 B).
        "data": b"\x44" + rnd(48),
        # HANDSHAKE-shaped, 640 B (protocol 1.1 padding): random client id; forwarded to the
        # host (rate-limited), which must reject it as an unknown client.
        "handshake": b"\x48" + rnd(639),
    }
    for name, body in files.items():
        with open(os.path.join(out_dir, name + ".bin"), "wb") as f:
            f.write(body)
        print(f"{name} {len(body)}")


# ---- sampler ----------------------------------------------------------------------------

def parse_metrics(text):
    out = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        try:
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
        except ValueError:
            pass
    return out


def nft_counters():
    try:
        j = json.loads(subprocess.run(
            ["nft", "-j", "list", "counters", "table", "inet", "flood"],
            capture_output=True, text=True, timeout=5).stdout)
    except Exception:
        return {}
    out = {}
    for item in j.get("nftables", []):
        c = item.get("counter")
        if c and "name" in c:
            out[c["name"]] = [c.get("packets", 0), c.get("bytes", 0)]
    return out


def cpu_stat():
    rows = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3] != " ":
                rows.append([int(x) for x in line.split()[1:9]])
    return rows


def proc_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        fields = s[s.rindex(")") + 2:].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def rss_kb(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        return None
    return out


def all_procs():
    """comm -> CPU ticks, summed over every process on the machine (for "who else ran")."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        i, j = s.find("("), s.rfind(")")
        comm = s[i + 1:j]
        fields = s[j + 2:].split()
        try:
            t = int(fields[11]) + int(fields[12])
        except (IndexError, ValueError):
            continue
        if t:
            out[f"{d}:{comm}"] = t
    return out


def udp_snmp():
    try:
        with open("/proc/net/snmp") as f:
            lines = [l.split() for l in f if l.startswith("Udp:")]
        return dict(zip(lines[0][1:], map(int, lines[1][1:])))
    except (OSError, IndexError):
        return {}


def softnet_drops():
    n = 0
    try:
        with open("/proc/net/softnet_stat") as f:
            for line in f:
                n += int(line.split()[1], 16)
    except OSError:
        pass
    return n


def read_pids(piddir):
    out = {}
    for name in os.listdir(piddir):
        try:
            with open(os.path.join(piddir, name)) as f:
                out[name] = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            pass
    return out


def sample(out, piddir, admin, _iface):
    url = f"http://{admin}/metrics"
    while True:
        t = time.time()
        rec = {"t": t}
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                rec["m"] = parse_metrics(r.read().decode())
        except Exception as e:  # the gateway may be down: record it
            rec["m_err"] = str(e)
        rec["nft"] = nft_counters()
        rec["cpu"] = cpu_stat()
        pids = read_pids(piddir)
        rec["proc"] = {}
        for name, ps in pids.items():
            ticks = [proc_ticks(p) for p in ps]
            ticks = [x for x in ticks if x is not None]
            if ticks:
                rec["proc"][name] = sum(ticks)
        for name in ("gateway", "host"):
            if name in pids and pids[name]:
                rec.setdefault("rss", {})[name] = rss_kb(pids[name][0])
        rec["all"] = all_procs()
        rec["udp"] = udp_snmp()
        rec["softnet_drops"] = softnet_drops()
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        time.sleep(max(0.0, 1.0 - (time.time() - t)))


# ---- valid-credential HANDSHAKE flood from spoofed sources ------------------------------

def hkdf_extract(salt, ikm):
    import hmac, hashlib
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand16(prk, info):
    import hmac, hashlib
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()[:16]


def ip_checksum(h):
    s = sum(struct.unpack("!10H", h))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return (~s) & 0xFFFF


def random_public_v4(rng):
    while True:
        a = rng.randrange(1, 224)
        if a in (10, 127, 100, 169, 172, 192):  # keep clear of private/special blocks
            continue
        return socket.inet_aton(f"{a}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}")


def handshake_flood(creds_file, dst, port, rate, secs):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    with open(creds_file) as f:
        creds = [json.loads(l) for l in f if l.strip()]
    cid = bytes.fromhex(creds[0]["client_id"])
    psk = bytes.fromhex(creds[0]["psk"])
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    dst_b = socket.inet_aton(dst)
    rng = random.Random()
    sent = 0
    t0 = time.time()
    interval = 1.0 / rate if rate > 0 else 0.0
    next_t = t0
    while time.time() - t0 < secs:
        nonce = os.urandom(16)
        k_c = hkdf_expand16(hkdf_extract(nonce, psk), b"hs c2s")
        head = b"\x48" + cid + nonce
        sealed = AESGCM(k_c).encrypt(b"\x00" * 12, struct.pack(">Q", ticks_now()), head)
        payload = (head + sealed).ljust(640, b"\x00")  # protocol 1.1: padded to 640 B
        src = random_public_v4(rng)
        sport = rng.randrange(1024, 65536)
        udp = struct.pack("!HHHH", sport, port, 8 + len(payload), 0) + payload
        iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), rng.randrange(65536), 0,
                          64, 17, 0, src, dst_b)
        iph = iph[:10] + struct.pack("!H", ip_checksum(iph)) + iph[12:]
        try:
            s.sendto(iph + udp, (dst, 0))
            sent += 1
        except OSError:
            pass
        if interval:
            next_t += interval
            d = next_t - time.time()
            if d > 0:
                time.sleep(d)
    el = time.time() - t0
    print(json.dumps({"sent": sent, "secs": round(el, 2), "pps": round(sent / el, 1)}))


# ---- report -----------------------------------------------------------------------------

def load_jsonl(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out


def load_events(path):
    ev = {}
    with open(path) as f:
        for line in f:
            parts = line.split(None, 1)
            if len(parts) == 2:
                ev[parts[1].strip()] = float(parts[0])
    return ev


def at(samples, t):
    """The first sample at or after t (or the last one)."""
    for s in samples:
        if s["t"] >= t and "m" in s:
            return s
    ok = [s for s in samples if "m" in s]
    return ok[-1] if ok else None


def before(samples, t):
    """The last sample at or before t."""
    best = None
    for s in samples:
        if s["t"] <= t and "m" in s:
            best = s
    return best


def M(s, key):
    return s["m"].get(key, 0.0) if s and "m" in s else 0.0


def N(s, name, i=1):
    return (s or {}).get("nft", {}).get(name, [0, 0])[i]


LEGIT_DATA = 'rebindgw_client_tx_packets_total{type="data"}'


def window(samples, t0, t1):
    a, b = at(samples, t0), before(samples, t1)
    if not a or not b or b["t"] <= a["t"]:
        return None
    return a, b


def rate(a, b, key):
    return (M(b, key) - M(a, key)) / (b["t"] - a["t"])


def cpu_split(a, b):
    """Per CPU: % user+nice, % system, % softirq+irq, % idle over the window."""
    out = []
    for ra, rb in zip(a["cpu"], b["cpu"]):
        d = [y - x for x, y in zip(ra, rb)]
        tot = sum(d) or 1
        user, nice, sys_, idle, iow, irq, sirq, steal = d
        out.append({"usr": 100 * (user + nice) / tot, "sys": 100 * sys_ / tot,
                    "sirq": 100 * (irq + sirq) / tot, "idle": 100 * (idle + iow) / tot,
                    "steal": 100 * steal / tot})
    return out


def proc_cpu(a, b):
    hz = os.sysconf("SC_CLK_TCK")
    dt = b["t"] - a["t"]
    out = {}
    for name, tb in b.get("proc", {}).items():
        ta = a.get("proc", {}).get(name)
        if ta is None:
            ta = 0  # started inside the window
        out[name] = 100.0 * (tb - ta) / hz / dt
    return out


def top_procs(a, b, ours, n=4):
    """The busiest processes in the window that are not ours."""
    hz = os.sysconf("SC_CLK_TCK")
    dt = b["t"] - a["t"]
    ours = set(ours)
    by = {}
    for k, tb in b.get("all", {}).items():
        pid, comm = k.split(":", 1)
        if int(pid) in ours:
            continue
        d = tb - a.get("all", {}).get(k, 0)
        if d > 0:
            by[comm] = by.get(comm, 0) + d
    tot = sum(by.values())
    top = sorted(by.items(), key=lambda kv: -kv[1])[:n]
    return 100.0 * tot / hz / dt, [(c, 100.0 * v / hz / dt) for c, v in top]


def client_rates(path, t0, t1):
    """Mean tx/s and rx/s of the legit loadgen's progress lines inside [t0, t1]."""
    def num(s):
        s = s.rstrip(",")
        mul = 1.0
        if s.endswith("k"):
            mul, s = 1e3, s[:-1]
        elif s.endswith("M"):
            mul, s = 1e6, s[:-1]
        return float(s) * mul
    tx, rx = [], []
    try:
        with open(path) as f:
            for line in f:
                p = line.split()
                if len(p) < 3 or p[1] != "run":
                    continue
                try:
                    ts = float(p[0])
                except ValueError:
                    continue
                if not (t0 <= ts <= t1):
                    continue
                try:
                    i = p.index("tx")
                    tx.append(num(p[i + 1].split("/")[0]))
                    j = p.index("rx")
                    rx.append(num(p[j + 1].split("/")[0]))
                except (ValueError, IndexError):
                    pass
    except OSError:
        pass
    if not rx:
        return None
    return sum(tx) / len(tx), sum(rx) / len(rx), len(rx)


def report(work):
    samples = load_jsonl(os.path.join(work, "samples.jsonl"))
    ev = load_events(os.path.join(work, "events"))
    cfg = json.load(open(os.path.join(work, "config.json")))
    fails, warns = [], []
    out = []
    p = out.append

    p(f"# flood test ({cfg['mode']}) {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ev.get('start', 0)))}")
    p(f"machine: {cfg['cpus']} CPUs, load average at start {cfg['loadavg_start']}, at end "
      f"{open('/proc/loadavg').read().split()[:3]}")
    p(f"legit: {cfg['clients']} clients, {cfg['legit_load']}, payload {cfg['payload']} B, "
      f"churn {cfg['churn']}/s; gateway workers {cfg['workers']}, io {cfg.get('io', '?')}")
    p("")

    phases = []
    cycles = int(cfg.get("cycles", 1))
    for c in range(1, cycles + 1):
        sfx = f":{c}"
        nxt = f"base_start:{c + 1}" if c < cycles else ("mod_start" if "mod_start" in ev else "legit_end")
        phases.append((f"baseline {c}", "base_start" + sfx, "flood_start" + sfx, 1.0))
        phases.append((f"flood {c}", "flood_start" + sfx, "hping_stop" + sfx, 2.0))
        phases.append((f"recovery {c}", "flood_stop" + sfx, nxt, 2.0))
    if "mod_start" in ev:
        phases.append((f"flood ({cfg.get('mod_label', 'moderate')})", "mod_start", "mod_hping_stop", 2.0))
        phases.append(("recovery (moderate)", "mod_stop", "legit_end", 2.0))

    rows = {}
    others_lines = []
    ours_pids = set()
    try:
        for f_ in os.listdir(os.path.join(work, "pids.all")):
            ours_pids.update(int(x) for x in open(os.path.join(work, "pids.all", f_)).read().split())
    except OSError:
        pass
    p("| phase | secs | legit rx/s (clients) | legit tx/s (clients) | DATA to clients/s (gateway) | "
      "attack pkts/s reaching gw veth | CPU0 usr/sys/sirq/idle % | CPU1 usr/sys/sirq/idle % | "
      "process CPU % |")
    p("|---|---|---|---|---|---|---|---|---|")
    for label, e0, e1, skip in phases:
        if e0 not in ev or e1 not in ev:
            continue
        t0, t1 = ev[e0] + skip, ev[e1]
        w = window(samples, t0, t1)
        if not w:
            continue
        a, b = w
        cr = client_rates(os.path.join(work, "legit.progress"), t0, t1)
        gw_rate = rate(a, b, LEGIT_DATA)
        atk = (N(b, "pre_veth", 0) - N(a, "pre_veth", 0)) / (b["t"] - a["t"])
        cpus = cpu_split(a, b)
        pc = proc_cpu(a, b)
        rows[label] = {"client": cr, "gw": gw_rate, "cpus": cpus, "proc": pc, "atk": atk}
        others, top = top_procs(a, b, ours_pids)
        others_lines.append(f"- {label}: other processes on the machine used {others:.0f}% CPU "
                            f"(of 200%): " + ", ".join(f"{c} {v:.0f}%" for c, v in top))
        cs = " | ".join("/".join(f"{c[k]:.0f}" for k in ("usr", "sys", "sirq", "idle")) for c in cpus[:2])
        pcs = ", ".join(f"{k} {v:.0f}" for k, v in sorted(pc.items(), key=lambda kv: -kv[1]) if v >= 1)
        p(f"| {label} | {b['t'] - a['t']:.0f} | {cr[1]:.0f} | {cr[0]:.0f} | {gw_rate:.0f} | {atk:.0f} | "
          f"{cs} | {pcs} |" if cr else
          f"| {label} | {b['t'] - a['t']:.0f} | n/a | n/a | {gw_rate:.0f} | {atk:.0f} | {cs} | {pcs} |")
    p("")
    p("CPU columns are whole-machine /proc/stat shares per CPU; process CPU % is ours "
      "(100 = one core; kernel softirq work is in the sirq column, not in a process).")
    p("\n".join(others_lines))
    p("")

    figures = []

    def rx(r):
        return r["client"][1] if r.get("client") else r["gw"]

    ratios = []
    for c in range(1, cycles + 1):
        bs, fl = rows.get(f"baseline {c}"), rows.get(f"flood {c}")
        if not bs or not fl or not rx(bs):
            continue
        ratio = rx(fl) / rx(bs)
        tx_ratio = (fl["client"][0] / bs["client"][0]) if (fl.get("client") and bs.get("client")) else float("nan")
        gw_ratio = fl["gw"] / bs["gw"] if bs["gw"] else 0.0
        ratios.append(ratio)
        figures.append((f"cycle {c}", ratio, tx_ratio, gw_ratio))
    if "flood (" + cfg.get("mod_label", "moderate") + ")" in rows and cycles and rows.get(f"baseline {cycles}"):
        fl, bs = rows["flood (" + cfg.get("mod_label", "moderate") + ")"], rows[f"baseline {cycles}"]
        figures.append(("moderate flood vs last baseline", rx(fl) / rx(bs), float("nan"), fl["gw"] / bs["gw"] if bs["gw"] else 0))
    median = sorted(ratios)[len(ratios) // 2] if ratios else 0.0
    if len(ratios) % 2 == 0 and ratios:
        sr = sorted(ratios)
        median = (sr[len(sr) // 2 - 1] + sr[len(sr) // 2]) / 2
    if median < 0.9:
        warns.append(f"legit throughput under the max flood is {median:.3f} of baseline (median of "
                     f"{len(ratios)} cycles; goal >= 0.9)")

    # Whole-test deltas: the flood windows, by nft and by gateway metrics.
    first = next((s for s in samples if "m" in s), None)
    # Flood figures stop where the valid-credential handshake phase begins.
    last = before(samples, ev.get("insider_start", ev.get("end", 1e18)))
    fa = at(samples, ev.get("flood_start:1", 0))
    fb = before(samples, ev.get("legit_end", ev.get("end", 1e18)) )

    def d(key):
        return M(last, key) - M(first, key)

    # Reply/request bytes for the spoofed (unknown) traffic on the attacker veth. nft counts
    # L3 bytes (20 B IP + 8 B UDP headers included); the payload-only figure subtracts them.
    req_p, req_b = N(last, "req_all", 0) - N(first, "req_all", 0), N(last, "req_all") - N(first, "req_all")
    rep_p, rep_b = N(last, "rep_all", 0) - N(first, "rep_all", 0), N(last, "rep_all") - N(first, "rep_all")
    out_p, out_b = N(last, "out_veth", 0) - N(first, "out_veth", 0), N(last, "out_veth") - N(first, "out_veth")
    ratio_l3 = rep_b / req_b if req_b else 0.0
    ratio_pl = (rep_b - 28 * rep_p) / (req_b - 28 * req_p) if req_b else 0.0
    ratio_all = out_b / req_b if req_b else 0.0

    p("## Figures")
    p("")
    p("| figure | value | requirement |")
    p("|---|---|---|")
    p(f"| **legit throughput B/A under the max flood, median of {len(ratios)} cycles** | **{median:.3f}** | >= 0.9 (goal) |")
    for label, ratio, tx_ratio, gw_ratio in figures:
        p(f"| B/A {label} (client-received echoes/s) | {ratio:.3f} "
          f"(offered tx {tx_ratio:.3f}; gateway DATA-to-clients {gw_ratio:.3f}) | |")
    accepted = cfg.get("attack_accepted")
    p(f"| forged packets accepted (loadgen attack modes, ACCEPTED sum + victim moves) | "
      f"**{accepted if accepted is not None else 'n/a'}** | 0 |")
    if accepted is None:
        fails.append("no loadgen attack report (the attack generator failed)")
    elif accepted != 0:
        fails.append(f"{accepted} forged packets accepted")
    p(f"| spoofed flood: reply bytes / request bytes (gw veth, L3) | **{ratio_l3:.4f}** "
      f"({rep_b:,} / {req_b:,} B; {rep_p:,} / {req_p:,} pkts) | <= 1 |")
    p(f"| same, UDP payload bytes only | **{ratio_pl:.4f}** | <= 1 |")
    p(f"| everything the gw namespace sent towards the attackers / request bytes | {ratio_all:.4f} "
      f"({out_p:,} pkts) | <= 1 |")
    for r in (ratio_l3, ratio_pl, ratio_all):
        if r > 1.0:
            fails.append(f"reply/request byte ratio {r:.3f} > 1")
    worst = cfg.get("attack_worst_ratio")
    if worst is not None:
        p(f"| loadgen attack modes: worst reply/request byte ratio | **{worst:.4f}** | <= 1 |")
        if worst > 1.0:
            fails.append(f"loadgen attack reply ratio {worst:.3f} > 1")
    # UNRECOGNIZED bytes sent / bytes received from unknown tuples, gateway's own view
    # (whole test: legit rebinds contribute a little to both sides).
    unrec = d("rebindgw_unrecognized_sent_total") * 33
    rx_unknown = (d('rebindgw_client_rx_bytes_total{type="rebind"}') + d('rebindgw_client_rx_bytes_total{type="other"}'))
    sup = [d('rebindgw_unrecognized_suppressed_total{reason="%s"}' % r)
           for r in ("prefix_rate", "global_rate", "trigger_too_small")]
    p(f"| gateway metrics: UNRECOGNIZED sent | {d('rebindgw_unrecognized_sent_total'):,.0f} "
      f"({unrec:,.0f} B); suppressed prefix/global/small "
      f"{sup[0]:,.0f}/{sup[1]:,.0f}/{sup[2]:,.0f}; unknown-tuple DATA "
      f"{d('rebindgw_unknown_tuple_total'):,.0f} | |")
    acc = d("rebindgw_rebinds_accepted_total")
    dup = d("rebindgw_rebind_duplicates_total")
    p(f"| rebinds accepted by the gateway (all phases before 3) / duplicates | {acc:,.0f} / {dup:,.0f} | "
      f"only legit clients' (they saw {cfg.get('legit_rebinds', 'n/a')} rebound events over "
      f"{cfg.get('legit_moves', 'n/a')} moves; a lost REBIND_ACK makes a client rebind again) |")
    acc_sp = N(last, "rep_accept", 0) - N(first, "rep_accept", 0)
    p(f"| REBIND_ACK / DATA / HANDSHAKE_REPLY sent towards spoofed sources | **{acc_sp:,}** | 0 |")
    if acc_sp:
        fails.append(f"{acc_sp} REBIND_ACK/DATA/HANDSHAKE_REPLY datagrams sent to spoofed sources")
    rej = {k.split('"')[1]: M(last, k) - M(first, k) for k in (last or {"m": {}})["m"]
           if k.startswith("rebindgw_rebinds_rejected_total{")}
    p(f"| rebinds rejected, by first failed check | "
      f"{', '.join(f'{k} {v:,.0f}' for k, v in rej.items() if v)} | |")
    hsf = d("rebindgw_handshakes_forwarded_total")
    hsr = d('rebindgw_handshakes_dropped_total{reason="rate"}')
    reg = d('rebindgw_registrations_total{result="ok"}')
    p(f"| HANDSHAKEs forwarded / dropped by rate limit / registrations ok | {hsf:,.0f} / {hsr:,.0f} / "
      f"{reg:,.0f} | registrations = legit connects ({cfg.get('legit_connects', 'n/a')}) |")
    lc = cfg.get("legit_connects")
    if lc is not None and reg > lc:
        warns.append(f"{reg:.0f} registrations for {lc} legit connects: a legit client that retries "
                     "its HANDSHAKE (fresh nonce) registers a second connection and the first is never freed")
    # Registrations inside the flood windows: only the attack loadgens' own 3 connections
    # each (and their retries) may register there.
    fl_reg, fl_allow = 0.0, 0
    for e0, e1 in [(f"flood_start:{c}", f"flood_stop:{c}") for c in range(1, cycles + 1)] + [("mod_start", "mod_stop")]:
        if e0 in ev and e1 in ev:
            a_, b_ = before(samples, ev[e0]), at(samples, ev[e1])
            fl_reg += M(b_, 'rebindgw_registrations_total{result="ok"}') - M(a_, 'rebindgw_registrations_total{result="ok"}')
            fl_allow += 3
    p(f"| registrations during the flood windows (attack loadgens connect {fl_allow}) | **{fl_reg:,.0f}** | "
      f"no flood registrations |")
    if fl_reg > 3 * fl_allow + 10:
        fails.append(f"{fl_reg:.0f} registrations during the floods (the attack generators make {fl_allow}): "
                     "a HANDSHAKE flood registered connections")
    hc = cfg.get("host_counters") or {}
    if hc:
        p(f"| host (whole run incl. phase 3): handshakes ok / unknown client / bad AEAD / busy / "
          f"over the per-client nonce quota; connections | {hc.get('handshakes_ok', 0):,} / "
          f"{hc.get('handshake_unknown_client', 0):,} / {hc.get('handshake_bad_aead', 0):,} / "
          f"{hc.get('handshake_busy', 0):,} / {hc.get('handshake_client_quota', 0):,}; "
          f"{hc.get('connections', 0):,} | |")
    lt = cfg.get("legit_traffic") or {}
    if lt:
        p(f"| legit loadgen whole run: sent / received / loss % / p99 RTT ms / pacer skipped | "
          f"{lt.get('sent', 0):,} / {lt.get('received', 0):,} / {lt.get('loss_pct', 0):.2f} / "
          f"{(lt.get('rtt') or {}).get('p99_ms', 0):.1f} / {lt.get('pacer_skipped', 0):,} | |")
    conns_before = M(fa, "rebindgw_connections")
    conns_after = M(fb, "rebindgw_connections")
    p(f"| live connections at baseline start / flood start / end of the legit run | "
      f"{M(at(samples, ev.get('base_start:1', 0)), 'rebindgw_connections'):,.0f} / {conns_before:,.0f} / "
      f"{conns_after:,.0f} | unchanged by the floods (legit: {cfg['clients']} + 1 probe) |")
    rb = cfg.get("rss_before", {})
    ra = cfg.get("rss_after", {})
    p(f"| gateway RSS before / after the floods (peak) | {rb.get('gateway', {}).get('VmRSS', 0) / 1024:.1f} / "
      f"{ra.get('gateway', {}).get('VmRSS', 0) / 1024:.1f} MiB ({ra.get('gateway', {}).get('VmHWM', 0) / 1024:.1f}) | bounded |")
    p(f"| host RSS before / after the floods (peak) | {rb.get('host', {}).get('VmRSS', 0) / 1024:.1f} / "
      f"{ra.get('host', {}).get('VmRSS', 0) / 1024:.1f} MiB ({ra.get('host', {}).get('VmHWM', 0) / 1024:.1f}) | bounded |")
    gb = rb.get("gateway", {}).get("VmRSS", 0)
    ga = ra.get("gateway", {}).get("VmRSS", 0)
    if gb and ga > 2 * gb + 64 * 1024:
        warns.append(f"gateway RSS grew from {gb} kB to {ga} kB during the floods")
    drops = {k: d(k) for k in (last or {"m": {}})["m"] if k.startswith("rebindgw_dropped_total{") and d(k)}
    udp_a, udp_b = (first or {}).get("udp", {}), (last or {}).get("udp", {})
    p(f"| gw namespace UDP RcvbufErrors / InErrors (socket-queue drops) | "
      f"{udp_b.get('RcvbufErrors', 0) - udp_a.get('RcvbufErrors', 0):,} / "
      f"{udp_b.get('InErrors', 0) - udp_a.get('InErrors', 0):,} | |")
    p(f"| softnet backlog drops (all CPUs) | {(last or {}).get('softnet_drops', 0) - (first or {}).get('softnet_drops', 0):,} | |")
    if drops:
        p(f"| gateway drops by reason | {', '.join(f'{k} {v:,.0f}' for k, v in drops.items())} | |")
    for k, v in cfg.get("hping", {}).items():
        p(f"| hping3 {k} | {v} | |")
    p("")
    if cfg.get("attack_lines"):
        p("Loadgen attack modes (its report):")
        p("```")
        p("\n".join(cfg["attack_lines"]))
        p("```")
    ins = cfg.get("insider")
    if ins:
        p("")
        p("## Handshake flood with one enrolled client's valid credentials, spoofed sources")
        p("")
        for k, v in ins.items():
            p(f"- {k}: {v}")
        if "insider_start" in ev and "insider_stop" in ev:
            a_, b_ = before(samples, ev["insider_start"]), at(samples, ev["insider_stop"])
            rq = N(b_, "req_all") - N(a_, "req_all")
            rqp = N(b_, "req_all", 0) - N(a_, "req_all", 0)
            rp = N(b_, "out_veth") - N(a_, "out_veth")
            rpp = N(b_, "out_veth", 0) - N(a_, "out_veth", 0)
            acc_ = N(b_, "rep_accept", 0) - N(a_, "rep_accept", 0)
            if rq:
                r_ = rp / rq
                r_pl = (rp - 28 * rpp) / (rq - 28 * rqp) if rq > 28 * rqp else 0.0
                p(f"- replies towards the spoofed sources / requests: {rp:,} / {rq:,} B "
                  f"({rpp:,} / {rqp:,} pkts, {acc_:,} HANDSHAKE_REPLYs): ratio {r_:.3f} (L3), {r_pl:.3f} (payload)")
                if rpp and rqp:
                    per = (rp / rpp) / (rq / rqp)
                    p(f"- per answered handshake: {rp / rpp:.0f} B reply for a {rq / rqp:.0f} B request "
                      f"(L3): {per:.2f}x")
                    # Protocol 1.1: HANDSHAKE_REPLY (127+16*S <= 639 B) never exceeds the 640 B
                    # HANDSHAKE, so any ratio above 1 is a bug, not a known limit.
                    if per > 1.0:
                        fails.append(f"each answered valid HANDSHAKE from a spoofed source reflects "
                                     f"{per:.2f}x its size towards the spoofed address (must be <= 1)")
                if r_ > 1.0:
                    fails.append(f"a valid HANDSHAKE from a spoofed source is answered with more "
                                 f"bytes than it carried (ratio {r_:.2f} > 1)")
        if ins.get("fresh_clients_connected") is not None and ins["fresh_clients_connected"] < ins.get("fresh_clients", 0):
            warns.append("WEAKNESS: after a valid-credential HANDSHAKE flood from spoofed sources, "
                         f"only {ins['fresh_clients_connected']}/{ins['fresh_clients']} fresh legit clients could connect")
        if ins.get("connections_added", 0) > ins.get("index_space", 1) * 0.5:
            warns.append(f"WEAKNESS: one enrolled client's HANDSHAKE flood added {ins['connections_added']:,} "
                         f"connections (index space {ins['index_space']:,})")
    if not ev.get("gateway_alive", 0):
        fails.append("the gateway died")
    p("")
    for w in warns:
        p(f"WARN: {w}")
    for f_ in fails:
        p(f"FAIL: {f_}")
    p("RESULT: " + ("FAIL" if fails else "PASS"))
    print("\n".join(out))
    return 1 if fails else 0


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    cmd = sys.argv[1]
    if cmd == "payloads":
        payloads(sys.argv[2], int(sys.argv[3]))
    elif cmd == "sample":
        sample(*sys.argv[2:6])
    elif cmd == "handshake-flood":
        handshake_flood(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
    elif cmd == "report":
        return report(sys.argv[2])
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
