#!/usr/bin/env bash
# Real application traffic through the tunnel (docs/tunnel.md) while a real NAT rebinds:
# unmodified iperf (version 2, UDP) and dnsmasq behind `rebindgw host --forward`, reached by
# `rebindgw connect` from an application namespace behind nftables NAT.
#
#   app ns (rbtun-app)        NAT ns (rbtun-nat)            gateway ns (rbtun-gw)          service ns (rbtun-svc)
#   10.201.1.2/24 a0 ==veth== n0 10.201.1.1                 g0 10.201.2.2  g1 10.201.3.1 ==veth== s0 10.201.3.2/24
#   iperf -c 127.0.0.1:5001   n1 10.201.2.1,.11,.12 ==veth== rebindgw gateway :7400        iperf -s -u :5001
#   dig @127.0.0.1 -p 5353    nft: snat to ADDR:PORTS       rebindgw host --forward         dnsmasq :53
#   rebindgw connect (x2)                                    iperf=10.201.3.2:5001
#                                                            dns=10.201.3.2:53
#
# Runs, each measured by iperf itself (the server's report: throughput, loss, jitter):
#   direct   iperf from the app namespace to the service through the NAT and the gateway
#            namespace's routing, no tunnel, no rebinds;
#   tunnel   the same offered load through connect -> gateway -> host --forward;
#   rebinds  the same through the tunnel while the NAT changes the client's port every second
#            (new SNAT port range, then `conntrack -D`) and its address twice;
#   dns      N queries with dig (its usual retries: +tries=3 +time=1) through a second
#            connect (service 1) to dnsmasq, with the NAT changing every second too;
#   address  the app namespace's own source address changes: connect notices (address
#            check every second), opens a new socket and rebinds.
# The outage of each rebind is the time from `conntrack -D` returning to the `rebound` event
# of the iperf connect (its --json output). Loss per rebind = (rebinds run's lost datagrams
# - tunnel run's) / NAT changes, also given in ms of traffic at the offered rate.
#
# Pass: tunnel and rebinds throughput >= 0.8 x direct, every DNS query answered, every NAT
# change followed by a rebind, the local address change noticed and followed by a rebind. The per-rebind loss goal (<= one round trip) is reported.
#
# Usage: scripts/tunnel-test.sh [--short] [--keep] [--no-build] [--rate BW] [--time SECS]
#                               [--queries N] [--len BYTES]
#   --short     CI size: 5 s runs at 10 Mbit/s, 200 DNS queries (about 30 s in all)
#   default     20 s runs at 20 Mbit/s, 1000 DNS queries
#   --rate      iperf's offered load (-b), e.g. 200M
#   --len       iperf datagram size (-l); at most 1196, the tunnel's maximum
#   --keep      leave the namespaces and logs for debugging
#   --no-build  use the release binary as it is (built if missing)
# Needs root, iproute2, nftables, conntrack, python3, iperf (2), dnsmasq and dig.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/netns.sh
. "$ROOT/scripts/lib/netns.sh"

PREFIX=${RBTUN_PREFIX:-rbtun}
NS_APP=$PREFIX-app
NS_NAT=$PREFIX-nat
NS_GW=$PREFIX-gw
NS_SVC=$PREFIX-svc
APP_NET=10.201.1.0/24
APP_ADDR=10.201.1.2
APP_ADDR2=10.201.1.3
NAT_IN=10.201.1.1
NAT_PUBLIC=(10.201.2.1 10.201.2.11 10.201.2.12)
GW_ADDR=10.201.2.2
GW_PORT=7400
GW_SVC=10.201.3.1
SVC_ADDR=10.201.3.2
HOST_LINK=127.0.0.1:7500
IPERF_LOCAL=127.0.0.1:5001
DNS_LOCAL=127.0.0.1:5353

TIME=20
RATE=20M
LEN=1000
QUERIES=1000
KEEP=0
BUILD=1
SHORT=0

die() {
  echo "tunnel-test: FAIL: $*" >&2
  exit 1
}

usage() {
  sed -n '/^# Usage:/,/^# Needs root/p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
  case "$1" in
  --short)
    SHORT=1
    TIME=5
    RATE=10M
    QUERIES=200
    ;;
  --keep) KEEP=1 ;;
  --no-build) BUILD=0 ;;
  --rate) RATE=$2; shift ;;
  --time) TIME=$2; shift ;;
  --queries) QUERIES=$2; shift ;;
  --len) LEN=$2; shift ;;
  -h | --help) usage; exit 0 ;;
  *) usage >&2; die "unknown option $1" ;;
  esac
  shift
done

# --- prerequisites ---------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, nftables, conntrack)"
missing=()
for t in ip:iproute2 nft:nftables conntrack:conntrack python3:python3 iperf:iperf \
  dnsmasq:dnsmasq-base dig:bind9-dnsutils; do
  command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
done
[ ${#missing[@]} -eq 0 ] ||
  die "missing tools; install them with: apt-get install -y ${missing[*]}"
{ iperf -v 2>&1 || true; } | grep -q "^iperf version 2" || die "iperf must be version 2 (Debian's iperf)"
DNSMASQ=$(command -v dnsmasq)

PY=$(command -v python3)
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/release/rebindgw
if [ "$BUILD" = 1 ] || [ ! -x "$BIN" ]; then
  command -v cargo >/dev/null 2>&1 || [ -x "$BIN" ] || die "no $BIN and no cargo to build it"
  if command -v cargo >/dev/null 2>&1; then
    echo "== cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet -p rebindgw-tools --bin rebindgw) ||
      die "cargo build --release failed"
  fi
fi
[ -x "$BIN" ] || die "$BIN missing after the build"

# --- cleanup (also of a previous aborted run) ------------------------------------------------
WORK=""
PIDS=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$KEEP" = 1 ]; then
    echo "tunnel-test: --keep: namespaces $NS_APP $NS_NAT $NS_GW $NS_SVC left up; files in $WORK" >&2
    exit "$rc"
  fi
  local p
  for p in "${PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  netns_delete "$NS_APP" "$NS_NAT" "$NS_GW" "$NS_SVC"
  if [ -n "$WORK" ]; then
    if [ "$rc" = 0 ]; then
      rm -rf "$WORK"
    else
      echo "tunnel-test: logs kept in $WORK" >&2
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "tunnel-test: interrupted" >&2; exit 130' INT TERM

netns_delete "$NS_APP" "$NS_NAT" "$NS_GW" "$NS_SVC"
WORK=$(mktemp -d /tmp/tunnel-test.XXXXXX)

# --- topology ---------------------------------------------------------------------------------
echo "== topology: $NS_APP -- $NS_NAT (nftables SNAT) -- $NS_GW -- $NS_SVC"
for ns in "$NS_APP" "$NS_NAT" "$NS_GW" "$NS_SVC"; do
  netns_create "$ns"
done
netns_veth "$NS_APP" a0 "$NS_NAT" n0
netns_veth "$NS_NAT" n1 "$NS_GW" g0
netns_veth "$NS_GW" g1 "$NS_SVC" s0
ip -n "$NS_APP" addr add "$APP_ADDR/24" dev a0
ip -n "$NS_APP" route add default via "$NAT_IN"
ip -n "$NS_NAT" addr add "$NAT_IN/24" dev n0
for a in "${NAT_PUBLIC[@]}"; do
  ip -n "$NS_NAT" addr add "$a/24" dev n1
done
ip -n "$NS_NAT" route add 10.201.3.0/24 via "$GW_ADDR"
ip netns exec "$NS_NAT" sysctl -qw net.ipv4.ip_forward=1
ip -n "$NS_GW" addr add "$GW_ADDR/24" dev g0
ip -n "$NS_GW" addr add "$GW_SVC/24" dev g1
ip netns exec "$NS_GW" sysctl -qw net.ipv4.ip_forward=1
ip -n "$NS_SVC" addr add "$SVC_ADDR/24" dev s0
ip -n "$NS_SVC" route add default via "$GW_SVC"

PORT_RANGES=(20000-24999 25000-29999 30000-34999 35000-39999 40000-44999 45000-49999)
snat_rule() {
  echo "add rule ip rbtun post oifname \"n1\" ip saddr $APP_NET meta l4proto udp snat to ${NAT_PUBLIC[$2]}:${PORT_RANGES[$1]}"
}
ip netns exec "$NS_NAT" nft -f - <<EOF || die "nftables setup failed"
table ip rbtun {
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
  }
}
$(snat_rule 0 0)
EOF

# --- services, gateway, host, connects ------------------------------------------------------
ip netns exec "$NS_SVC" iperf -s -u -p 5001 -y C >"$WORK/iperf-server.csv" 2>"$WORK/iperf-server.log" &
PIDS+=($!)
ip netns exec "$NS_SVC" "$DNSMASQ" --keep-in-foreground --no-resolv --no-hosts \
  --bind-interfaces --listen-address="$SVC_ADDR" --port=53 --user=root --pid-file= \
  --address=/tunnel.test/10.9.9.9 --cache-size=0 >"$WORK/dnsmasq.log" 2>&1 &
PIDS+=($!)

"$BIN" link-keygen --out "$WORK/link.key" >/dev/null
: >"$WORK/clients.toml"
chmod 600 "$WORK/clients.toml"
mkdir -m 700 "$WORK/state"
"$BIN" enroll --clients "$WORK/clients.toml" --name iperf-app >"$WORK/iperf-app.json"
"$BIN" enroll --clients "$WORK/clients.toml" --name dns-app >"$WORK/dns-app.json"
chmod 600 "$WORK"/*.json

ip netns exec "$NS_GW" "$BIN" host --listen "$HOST_LINK" --clients "$WORK/clients.toml" \
  --link-key "$WORK/link.key" --forward "iperf=$SVC_ADDR:5001" --forward "dns=$SVC_ADDR:53" \
  --flow-idle 30s >"$WORK/host.out" 2>"$WORK/host.log" &
PIDS+=($!)
ip netns exec "$NS_GW" "$BIN" gateway --listen "$GW_ADDR:$GW_PORT" \
  --host "$HOST_LINK=$WORK/link.key" --state-dir "$WORK/state" --no-admin \
  >"$WORK/gateway.out" 2>"$WORK/gateway.log" &
PIDS+=($!)
sleep 0.5
ip netns exec "$NS_APP" "$BIN" connect --gateway "$GW_ADDR:$GW_PORT" \
  --credentials "$WORK/iperf-app.json" --local "$IPERF_LOCAL" --service 0 --json \
  >"$WORK/connect-iperf.jsonl" 2>"$WORK/connect-iperf.log" &
PIDS+=($!)
ip netns exec "$NS_APP" "$BIN" connect --gateway "$GW_ADDR:$GW_PORT" \
  --credentials "$WORK/dns-app.json" --local "$DNS_LOCAL" --service 1 --json --flow-idle 10s \
  >"$WORK/connect-dns.jsonl" 2>"$WORK/connect-dns.log" &
PIDS+=($!)
for _ in $(seq 50); do
  grep -q '"connected"' "$WORK/connect-iperf.jsonl" 2>/dev/null &&
    grep -q '"connected"' "$WORK/connect-dns.jsonl" 2>/dev/null && break
  sleep 0.1
done
grep -q '"connected"' "$WORK/connect-iperf.jsonl" || die "connect (iperf) did not connect; see $WORK"
grep -q '"connected"' "$WORK/connect-dns.jsonl" || die "connect (dns) did not connect; see $WORK"
echo "== both connects connected"

# --- NAT changes ------------------------------------------------------------------------------
# nat_changes SECONDS LOG: every second a new SNAT port range (and at 1/3 and 2/3 of the run a
# new address), then conntrack -D of the app's entries; logs "t_before t_after kind snat" (the
# unix times around conntrack -D: the old mapping goes somewhere between them).
nat_changes() {
  local secs=$1 log=$2 i port=0 addr=0 kind t t0
  for i in $(seq 1 $((secs - 1))); do
    sleep 1
    if [ "$i" = $((secs / 3)) ] || [ "$i" = $((2 * secs / 3)) ]; then
      addr=$(((addr + 1) % ${#NAT_PUBLIC[@]}))
      kind=addr
    else
      port=$(((port + 1) % ${#PORT_RANGES[@]}))
      kind=port
    fi
    printf 'flush chain ip rbtun post\n%s\n' "$(snat_rule "$port" "$addr")" |
      ip netns exec "$NS_NAT" nft -f -
    t0=$(date +%s.%N)
    ip netns exec "$NS_NAT" conntrack -D -p udp -s "$APP_NET" >/dev/null 2>&1 || true
    t=$(date +%s.%N)
    echo "$t0 $t $kind ${NAT_PUBLIC[$addr]}:${PORT_RANGES[$port]}" >>"$log"
  done
}

# --- iperf runs -------------------------------------------------------------------------------
# iperf_run NAME TARGET_HOST TARGET_PORT: one iperf -u client run from the app namespace.
iperf_run() {
  local name=$1 host=$2 port=$3
  echo "== iperf $name: -u -b $RATE -l $LEN -t $TIME to $host:$port"
  ip netns exec "$NS_APP" iperf -c "$host" -p "$port" -u -b "$RATE" -l "$LEN" -t "$TIME" \
    >"$WORK/iperf-$name.out" 2>&1 || true
  sleep 1 # the server writes its report line
  wc -l <"$WORK/iperf-server.csv" >"$WORK/iperf-$name.lines"
}

iperf_run direct "$SVC_ADDR" 5001
iperf_run tunnel "${IPERF_LOCAL%:*}" "${IPERF_LOCAL#*:}"
nat_changes "$TIME" "$WORK/nat-iperf.log" &
NAT_PID=$!
iperf_run rebinds "${IPERF_LOCAL%:*}" "${IPERF_LOCAL#*:}"
wait "$NAT_PID" || true

# --- round trip through the tunnel ----------------------------------------------------------
# 200 DNS queries one at a time through the dns connect, timed by python: the application's
# round trip (app -> connect -> gateway -> host -> dnsmasq and back), median in ms.
ip netns exec "$NS_APP" "$PY" - "${DNS_LOCAL%:*}" "${DNS_LOCAL#*:}" >"$WORK/rtt.txt" <<'PYEOF' || true
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
addr = (sys.argv[1], int(sys.argv[2]))
q = b"".join(bytes([len(p)]) + p.encode() for p in "rtt.tunnel.test".split(".")) + b"\0"
rtts = []
for i in range(200):
    msg = struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0) + q + struct.pack(">HH", 1, 1)
    t = time.perf_counter()
    s.sendto(msg, addr)
    try:
        while True:
            d, _ = s.recvfrom(2048)
            if d[:2] == msg[:2]:
                rtts.append((time.perf_counter() - t) * 1e3)
                break
    except socket.timeout:
        pass
rtts.sort()
print("%.3f %d" % (rtts[len(rtts) // 2] if rtts else float("nan"), len(rtts)))
PYEOF

# --- DNS --------------------------------------------------------------------------------------
echo "== dns: $QUERIES queries with dig through the tunnel while the NAT changes every second"
for i in $(seq 1 "$QUERIES"); do
  echo "q$i.tunnel.test A"
done >"$WORK/queries.txt"
# 50 batches of QUERIES/50 queries (one dig -f each, 0.1 s apart), so the queries span
# several NAT changes.
BATCH=$(((QUERIES + 49) / 50))
split -l "$BATCH" "$WORK/queries.txt" "$WORK/batch."
nat_changes 9 "$WORK/nat-dns.log" &
NAT_PID=$!
for f in "$WORK"/batch.*; do
  ip netns exec "$NS_APP" dig @"${DNS_LOCAL%:*}" -p "${DNS_LOCAL#*:}" +tries=3 +time=1 \
    +noall +answer +comments -f "$f" >>"$WORK/dig.out" 2>&1 || true
  sleep 0.1
done
wait "$NAT_PID" || true

# --- a changed local address ----------------------------------------------------------------
# The app namespace's source address changes (a new address, the default route's src): the
# connects notice on their next address check (every second), open a new socket and rebind.
echo "== local address change: $APP_ADDR -> $APP_ADDR2 in $NS_APP"
ip -n "$NS_APP" addr add "$APP_ADDR2/24" dev a0
ip -n "$NS_APP" route replace default via "$NAT_IN" src "$APP_ADDR2"
date +%s.%N >"$WORK/addr-change.txt"
sleep 2.5

# --- report -----------------------------------------------------------------------------------
"$PY" - "$WORK" "$RATE" "$LEN" "$QUERIES" "$SHORT" <<'PYEOF'
import json, os, re, sys

work, rate, length, queries, short = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
fails = []

def bits(r):
    m = re.fullmatch(r"([\d.]+)([kKmMgG]?)", r)
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    return float(m.group(1)) * mult

rows = [l.strip().split(",") for l in open(os.path.join(work, "iperf-server.csv")) if l.count(",") >= 13]
def run(name):
    n = int(open(os.path.join(work, "iperf-%s.lines" % name)).read())
    if n == 0 or n > len(rows):
        fails.append("iperf %s: no server report" % name)
        return None
    r = rows[n - 1]
    # timestamp,src,srcport,dst,dstport,id,interval,bytes,bps,jitter_ms,lost,total,pct,ooo
    return {"mbps": float(r[8]) / 1e6, "jitter_ms": float(r[9]), "lost": int(r[10]),
            "total": int(r[11]), "loss_pct": float(r[12])}

res = {k: run(k) for k in ("direct", "tunnel", "rebinds")}
offered = bits(rate)
print()
print("iperf -u -b %s -l %d (server's report)" % (rate, length))
print("  %-8s %10s %10s %8s %12s" % ("run", "Mbit/s", "jitter ms", "loss %", "lost/total"))
for k, r in res.items():
    if r:
        print("  %-8s %10.2f %10.3f %8.3f %12s" % (k, r["mbps"], r["jitter_ms"], r["loss_pct"],
                                                 "%d/%d" % (r["lost"], r["total"])))
d = res["direct"]
for k in ("tunnel", "rebinds"):
    if d and res[k]:
        ratio = res[k]["mbps"] / d["mbps"] if d["mbps"] else 0
        print("  throughput ratio %s / direct: %.3f (goal >= 0.8)" % (k, ratio))
        if ratio < 0.8:
            fails.append("%s throughput %.3f x direct" % (k, ratio))

# Outage per rebind: NAT change -> the iperf connect's next `rebound` event.
changes = [(float(l.split()[0]), float(l.split()[1])) for l in open(os.path.join(work, "nat-iperf.log"))]
events = [json.loads(l) for l in open(os.path.join(work, "connect-iperf.jsonl")) if l.strip()]
rebounds = sorted(e["unix"] for e in events if e["event"] == "rebound")
outages = []   # conntrack -D started -> rebound: an upper bound of the outage
took = []      # rebinding -> rebound (connect's own measure)
for i, (t0, t1) in enumerate(changes):
    nxt = changes[i + 1][0] if i + 1 < len(changes) else float("inf")
    after = [r for r in rebounds if t0 <= r < nxt]
    if after:
        outages.append((after[0] - t0) * 1e3)
for e in events:
    if e["event"] == "rebound":
        took.append(e["ms"])
missed = len(changes) - len(outages)
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else float("nan")
print()
print("rebinds during the iperf run: %d NAT changes, %d followed by a rebind" % (len(changes), len(outages)))
if outages:
    print("  outage per rebind, upper bound (conntrack -D started -> rebound): p50 %.1f ms, p99 %.1f ms, max %.1f ms"
          % (pct(outages, 50), pct(outages, 99), max(outages)))
if took:
    print("  rebind (UNRECOGNIZED -> REBIND_ACK, connect's events): p50 %.2f ms, p99 %.2f ms"
          % (pct(took, 50), pct(took, 99)))
if missed:
    fails.append("%d NAT changes without a rebind" % missed)
t, rb = res["tunnel"], res["rebinds"]
if t and rb and changes:
    extra = max(0, rb["lost"] - t["lost"] * rb["total"] / max(1, t["total"]))
    pps = offered / 8 / length
    per = extra / len(changes)
    try:
        rtt = float(open(os.path.join(work, "rtt.txt")).read().split()[0])
    except (OSError, ValueError, IndexError):
        rtt = float("nan")
    print("  loss per rebind: %.1f datagrams = %.2f ms of traffic at %s; the application's round"
          " trip through the tunnel (median of 200 DNS queries) is %.3f ms: %.1f round trips"
          " (goal: <= 1)" % (per, per / pps * 1e3, rate, rtt, per / pps * 1e3 / rtt if rtt else 0))
events_all = {}
for e in events:
    events_all[e["event"]] = events_all.get(e["event"], 0) + 1
print("  connect (iperf) events: %s" % ", ".join("%s %d" % kv for kv in sorted(events_all.items())))

# The local address change: the iperf connect's network_changed, then its rebound.
t_addr = float(open(os.path.join(work, "addr-change.txt")).read())
events = [json.loads(l) for l in open(os.path.join(work, "connect-iperf.jsonl")) if l.strip()]
changed = [e for e in events if e["event"] == "network_changed" and e["unix"] >= t_addr]
if changed:
    after = [e for e in events if e["event"] == "rebound" and e["unix"] >= changed[0]["unix"]]
    print()
    print("local address change: noticed %.0f ms after it (%s); %s"
          % ((changed[0]["unix"] - t_addr) * 1e3, changed[0]["reason"],
             "rebound %.1f ms later" % ((after[0]["unix"] - changed[0]["unix"]) * 1e3)
             if after else "NO rebind after it"))
    if not after:
        fails.append("no rebind after the local address change")
else:
    fails.append("the local address change was not noticed")

# DNS.
out = open(os.path.join(work, "dig.out")).read()
answered = len(re.findall(r"^q\d+\.tunnel\.test\.\s+\d+\s+IN\s+A\s+10\.9\.9\.9", out, re.M))
timeouts = len(re.findall(r"timed out|no servers could be reached", out))
dns_changes = sum(1 for _ in open(os.path.join(work, "nat-dns.log")))
dns_events = [json.loads(l) for l in open(os.path.join(work, "connect-dns.jsonl")) if l.strip()]
print()
print("dns: %d/%d queries answered (dig +tries=3 +time=1), %d timeouts reported by dig, "
      "%d NAT changes, %d rebinds of the dns connect"
      % (answered, queries, timeouts, dns_changes, sum(1 for e in dns_events if e["event"] == "rebound")))
if answered != queries:
    fails.append("dns: %d of %d answered" % (answered, queries))
print()
if fails:
    print("tunnel-test: FAIL: " + "; ".join(fails))
    sys.exit(1)
print("tunnel-test: PASS")
PYEOF
