#!/usr/bin/env bash
# Cluster mode on the test bed (scripts/lib/cluster-bed.sh): three real gateways share one
# service address behind an ECMP router (fib_multipath_hash_policy=1: the UDP 4-tuple picks
# the gateway) and one registry in a three-member etcd cluster; the reference host; clients
# (rebindgw loadgen) behind a real nftables NAT. While the loadgen's traffic runs, a driver
# (python, in the host namespace, polling every gateway's /metrics every 5 ms) does:
#
#  1. storm: the NAT gives every client a new public port at once (SNAT range swapped,
#     conntrack entries deleted); the router re-hashes them, about two thirds onto another
#     gateway. When the deletion is done every loadgen process gets SIGUSR1 (a network-
#     change notice) and every client sends a datagram at once: all rebind together.
#     Every client's recovery is its first rebind acknowledgement after the move
#     (the loadgen's --rebound-log, on the driver's clock), from the moment `conntrack -D`
#     starts. Commits are counted by class: by the gateway that already owned the connection
#     (same) or taken over from another one (cross), from
#     rebindgw_cluster_transactions_total{result="rebound"} and
#     rebindgw_cluster_rebinds_taken_over_total summed over the gateways (a client that sent
#     its REBIND again with a new t commits twice). Also the stages (DATA from a new tuple,
#     UNRECOGNIZED, REBIND received) and the etcd transactions per second. Passes when every
#     client rebound.
#  2. a captured REBIND sent to all three gateways at once: 16 clients are moved by the NAT
#     onto a public address of their own; an on-path attacker in the router namespace
#     (scripts/lib/capture-fanout.py) copies each one's first REBIND, byte for byte from its
#     tuple, onto every ECMP leg. Passes when the phase commits exactly one REBIND per client
#     and every captured REBIND drew one ACK content (a §6 duplicate is answered again with
#     the identical ACK); the other copies' outcomes (lost compare-and-swap, duplicate,
#     coalesced) are reported.
#  3. key rotation under load: `rebindgw rotate` on gateway 1 starts epoch 2 for the whole
#     cluster; passes when every gateway switched, every client acknowledged its new keys
#     (delivered in-band) and no client handshook.
#  4. kill -9 of gateway 3 under load; its ECMP next hop is withdrawn at once (what a health
#     check or BGP session loss does); its clients re-hash onto the survivors, get
#     UNRECOGNIZED and rebind there. Time to the last: until the survivors own (serve the
#     tuple of) every connection again.
#  5. etcd member 2 killed: forwarding and a NAT rebind of every client go on unharmed;
#     member 2 returns.
#  6. all etcd members down for 5 s: forwarding continues (DATA forwarded in those 5 s,
#     against the 5 s before), a NAT rebind in the outage is refused (no commit, counted as
#     unavailable), and completes once etcd is back; nothing is accepted twice (every
#     gateway's accepted REBINDs equal its committed transactions).
#
# Figures go to stdout and WORK/figures.json.
#
# Usage: scripts/cluster-test.sh [--short] [--keep] [--no-build] [--clients N] [--rate PPS]
#   --short     CI size: 300 clients
#   default     3000 clients
#   --clients   any size (65536 needs a raised descriptor limit; the script raises it)
# Needs root, iproute2, nftables, conntrack, python3, etcd and etcdctl, protoc for the build.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/netns.sh
. "$ROOT/scripts/lib/netns.sh"
# shellcheck source=scripts/lib/cluster-bed.sh
. "$ROOT/scripts/lib/cluster-bed.sh"

P=${RBCL_PREFIX:-rbct}
CLIENTS=3000
RATE=6000
# New handshakes per second: each is an etcd transaction (REGISTER), and a REGISTER the host
# gives up on (2 s) makes its client handshake again.
CONNECT_RATE=1000
KEEP=0
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
  --short) CLIENTS=300; RATE=3000 ;;
  --keep) KEEP=1 ;;
  --no-build) BUILD=0 ;;
  --clients) CLIENTS=$2; shift ;;
  --rate) RATE=$2; shift ;;
  -h | --help) sed -n '/^# Usage:/,/^# Needs root/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "cluster-test: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

die() {
  echo "cluster-test: FAIL: $*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
for tool in ip nft conntrack python3 etcd etcdctl; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
PY=$(command -v python3)
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3

BIN=$ROOT/target/release/rebindgw
if [ "$BUILD" = 1 ] || ! "$BIN" gateway --help 2>/dev/null | grep -q -- --etcd-endpoint; then
  echo "== cargo build --release --features cluster"
  (cd "$ROOT" && cargo build --release --quiet -p rebindgw-tools --features cluster) ||
    die "cargo build --release --features cluster failed"
fi
"$BIN" gateway --help | grep -q -- --etcd-endpoint || die "$BIN has no cluster mode"

WORK=$(mktemp -d /tmp/rebindgw-cluster-test.XXXXXX)
PIDS=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$KEEP" = 1 ]; then
    echo "cluster-test: --keep: namespaces $P-* left up; files in $WORK" >&2
    exit "$rc"
  fi
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  bed_down "$P"
  if [ "$rc" = 0 ]; then rm -rf "$WORK"; else echo "cluster-test: logs in $WORK" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bed_down "$P"
bed_up "$P"
bed_nat "$P" "$BED_NAT_PORTS" "${BED_NAT_POOLS[0]}"
for n in 1 2 3; do bed_etcd_start "$P" "$n" "$WORK"; done
for _ in $(seq 150); do bed_etcdctl "$P" endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
bed_etcdctl "$P" endpoint health >/dev/null 2>&1 || die "etcd not healthy (see $WORK/etcd*.log)"
echo "== bed up, etcd: 3 members healthy"

# Keys: one link key for the host, one master key every gateway shares.
"$BIN" link-keygen --out "$WORK/link.key" >/dev/null
"$BIN" keygen --out "$WORK/master.key" >/dev/null
: >"$WORK/clients.toml"
chmod 600 "$WORK/clients.toml"
ip netns exec "$P-host" "$BIN" host --listen "$BED_HOST:7500" --clients "$WORK/clients.toml" \
  --link-key "$WORK/link.key" --gateway 10.211.0.0/24 >"$WORK/host.out" 2>"$WORK/host.log" &
PIDS+=($!)

endpoints=()
IFS=, read -r -a eps <<<"$(bed_etcd_endpoints)"
for e in "${eps[@]}"; do endpoints+=(--etcd-endpoint "$e"); done
GW_PIDS=()
# 2^S indices per epoch: at least twice the clients (and the loadgen's probes), so an index
# search never walks a nearly full space.
SLOTS=16
while [ $((1 << SLOTS)) -lt $((CLIENTS * 2 + 64)) ]; do SLOTS=$((SLOTS + 1)); done
for n in 1 2 3; do
  mkdir -m 700 "$WORK/gw$n"
  a=$(bed_gateway_addr "$n")
  # All clients come through one NAT address: the per-prefix limits are raised so that a
  # whole NAT's worth of clients can rebind at once.
  ip netns exec "$P-gw$n" "$BIN" gateway --listen "$BED_SVC:7400" \
    --host "$BED_HOST:7500=$WORK/link.key" --host-link "$a:0" --state-dir "$WORK/gw$n" \
    --master-key "$WORK/master.key" --admin "$a:7480" --workers 1 --slots "$SLOTS" \
    --unrecognized-per-prefix 1000000/1000000 --handshake-per-prefix 100000/100000 \
    "${endpoints[@]}" --cluster-name bed --gateway-id "$n" \
    >"$WORK/gw$n.out" 2>"$WORK/gw$n.log" &
  GW_PIDS+=($!)
  PIDS+=($!)
done

ulimit -n $((CLIENTS * 2 + 4096)) 2>/dev/null || ulimit -n 1048576 2>/dev/null || true
# Where the descriptor limit cannot be raised (a hard limit of 20,000 here), larger runs
# spread their clients over several loadgen processes.
LG_PROCS=$(( (CLIENTS + 15999) / 16000 ))
# Long enough for the four phases; the driver ends the run.
DURATION=$((120 + CLIENTS / 500))
ip netns exec "$P-cli" "$BIN" loadgen --gateway "$BED_SVC:7400" --clients "$CLIENTS" \
  --source-addrs "$(IFS=,; echo "${BED_CLIS[*]}")" --clients-file "$WORK/clients.toml" --rate "$RATE" \
  --duration "${DURATION}s" --settle 1s --connect-rate "$CONNECT_RATE" --connect-timeout "$((60 + CLIENTS / 200))s" \
  --processes "$LG_PROCS" --on-move send --behind-nat --rebound-log "$WORK/rebound.log" -q --json \
  >"$WORK/loadgen.json" 2>"$WORK/loadgen.log" &
LG_PID=$!
PIDS+=("$LG_PID")

cat >"$WORK/driver.py" <<'PYEOF'
import json, math, os, re, socket, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor

cfg = json.loads(sys.argv[1])
P, clients = cfg["prefix"], cfg["clients"]
gws = {n: cfg["gateways"][str(n)] for n in (1, 2, 3)}
alive_gws = [1, 2, 3]
figures = {"clients": clients}
POLL = 0.005


def scrape(n):
    s = socket.create_connection((gws[n], 7480), timeout=2)
    s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    vals = {}
    for line in data.partition(b"\r\n\r\n")[2].decode().splitlines():
        # Only the families the driver reads: parsing all of them slows the polling.
        if not line.startswith(WANTED):
            continue
        key, _, v = line.rpartition(" ")
        vals[key] = float(v)
        name = key.split("{", 1)[0]
        if "{" in key:
            vals[name] = vals.get(name, 0.0) + float(v)
    return vals


POOL = ThreadPoolExecutor(3)
WANTED = ("rebindgw_cluster_", "rebindgw_host_tx_packets_total", "rebindgw_rebinds_accepted",
          "rebindgw_commits_", "rebindgw_rebind_duplicates_total", "rebindgw_unrecognized_sent",
          "rebindgw_rebinds_rejected_total", "rebindgw_epoch", "rebindgw_handshakes_forwarded",
          'rebindgw_client_rx_packets_total{type="rebind"}', "rebindgw_unknown_tuple")


def snapshot():
    """Every live gateway's metrics, scraped at once."""
    return list(POOL.map(scrape, alive_gws))


def total(key, snap=None):
    return int(sum(m.get(key, 0) for m in (snap or snapshot())))


REBOUND = 'rebindgw_cluster_transactions_total{result="rebound"}'
TAKEN = "rebindgw_cluster_rebinds_taken_over_total"
OWNED = "rebindgw_cluster_owned_connections"
FORWARDED = "rebindgw_host_tx_packets_total"


def fail(msg):
    print("driver: FAIL: " + msg, file=sys.stderr, flush=True)
    figures["error"] = msg
    json.dump(figures, open(cfg["figures"], "w"), indent=1)
    sys.exit(1)


def run(*args, stdin=None):
    return subprocess.run(list(args), input=stdin, capture_output=True, text=True)


def nat_rebind(ports, addr):
    rule = ("flush chain ip bednat post\n"
            'add rule ip bednat post oifname "n1" meta l4proto udp snat to %s:%s\n'
            'add rule ip bednat post oifname "n1" snat to %s\n' % (addr, ports, addr))
    r = run("ip", "netns", "exec", P + "-nat", "nft", "-f", "-", stdin=rule)
    if r.returncode != 0:
        fail("nft: " + r.stderr)
    # Only client flows cross the NAT namespace. The move starts with the deletion: a client
    # whose entry goes first sends from its new tuple before the last entry is gone.
    t_start = time.monotonic()
    r = run("ip", "netns", "exec", P + "-nat", "conntrack", "-D", "-p", "udp")
    m = re.search(r"(\d+) flow entries have been deleted", r.stderr)
    figures.setdefault("conntrack_delete_ms", []).append(
        round((time.monotonic() - t_start) * 1000, 1))
    return t_start, int(m.group(1)) if m else 0


def pct(series, n, q):
    """series: [(seconds, cumulative count)]; the time the count reached ceil(q * n)."""
    need = max(1, math.ceil(q * n))
    for t, c in series:
        if c >= need:
            return round(t * 1000, 1)
    return None


# The stages of a rebind, as the gateways count them: the moved client's DATA from its new
# tuple, the UNRECOGNIZED it draws, the REBIND that answers it, and the etcd transactions that
# carry the commits (up to 64 REBINDs each).
STAGES = {"unknown_tuple": "rebindgw_unknown_tuple_total",
          "unrecognized_sent": "rebindgw_unrecognized_sent_total",
          "rebinds_received": 'rebindgw_client_rx_packets_total{type="rebind"}',
          "commit_transactions": "rebindgw_cluster_commit_transactions_total"}


class Rebounds:
    """The loadgen's --rebound-log (`<client> <CLOCK_MONOTONIC ns>` per rebind
    acknowledgement, the clock of time.monotonic()), read as it grows: when each client
    first rebound after a moment."""

    def __init__(self, path):
        self.path, self.offset, self.partial = path, 0, b""

    def new_lines(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data, self.partial = (self.partial + data).rpartition(b"\n")[::2]
        return [line.split() for line in data.split(b"\n") if line]


REBOUNDS = Rebounds(cfg["rebound_log"])


def recover(label, t0, base, timeout, stages=None):
    """Waits until every client rebound after t0 (the loadgen's log: each client's first
    acknowledgement is its recovery); meanwhile polls the commit counters (per class: a
    commit by the gateway that owned the connection, or taken over from another) and, with
    stages (their counters' values at t0), each stage's counter."""
    t0_ns = int(t0 * 1e9)
    first = {}
    series = {"cross": [], "same": []}
    last = {"cross": 0, "same": 0}
    for k in stages or {}:
        series[k], last[k] = [], 0
    polls = 0
    while time.monotonic() - t0 < timeout:
        polls += 1
        for client, ns in REBOUNDS.new_lines():
            if int(ns) >= t0_ns:
                first.setdefault(client, int(ns) - t0_ns)
        snap = snapshot()
        reb = total(REBOUND, snap) - base[0]
        taken = total(TAKEN, snap) - base[1]
        now = time.monotonic() - t0
        cur = {"cross": taken, "same": reb - taken}
        for k in stages or {}:
            cur[k] = total(STAGES[k], snap) - stages[k]
        for k in cur:
            if cur[k] > last[k]:
                series[k].append((now, cur[k]))
                last[k] = cur[k]
        if len(first) >= clients:
            break
        time.sleep(POLL)
    if len(first) < clients:
        fail("%s: only %d of %d clients rebound within %d s" % (label, len(first), clients, timeout))
    times = sorted(first.values())
    at = lambda q: round(times[max(0, math.ceil(q * len(times)) - 1)] / 1e6, 1)
    out = {"all": {"n": len(times), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0)},
           "commits": last["cross"] + last["same"],
           # Commit series are polled: their precision is the mean time between two polls.
           "poll_ms": round((time.monotonic() - t0) * 1000 / max(polls, 1), 1)}
    for k in stages or {}:
        # When the stage had happened once per client (retries count too), and its total.
        out[k] = {"total": last[k], "p50_ms": pct(series[k], clients, 0.5),
                  "p99_ms": pct(series[k], clients, 0.99), "all_ms": pct(series[k], clients, 1.0)}
    for k in ("cross", "same"):
        n = last[k]
        out[k] = {"n": n, "p50_ms": pct(series[k], n, 0.5), "p99_ms": pct(series[k], n, 0.99),
                  "max_ms": pct(series[k], n, 1.0)}
    return out


# 0. Every client connected (registered in etcd by whichever gateway its tuple hashes to).
t_end = time.monotonic() + cfg["connect_wait"]
while True:
    owned = total(OWNED)
    if owned >= clients:
        break
    if time.monotonic() > t_end:
        fail("only %d of %d clients connected" % (owned, clients))
    time.sleep(0.1)
per_gw = {n: int(scrape(n).get(OWNED, 0)) for n in alive_gws}
reads0 = {n: int(scrape(n).get("rebindgw_cluster_etcd_range_reads_total", 0)) for n in alive_gws}
print("connected: %d clients, owned per gateway %s" % (clients, per_gw), flush=True)
figures["owned_per_gateway"] = per_gw
time.sleep(2)

# 1. The storm: every client gets a new public port at once.
snap = snapshot()
base = (total(REBOUND, snap), total(TAKEN, snap))
stage_base = {k: total(c, snap) for k, c in STAGES.items()}
t0, deleted = nat_rebind(cfg["nat_ports"], cfg["nat_out"][0])
# All at once: the loadgen's processes get a network-change notice (SIGUSR1) as soon as the
# NAT's entries are gone, and every client sends a datagram from its new tuple at once
# (otherwise a client finds out at its next datagram of the load, on average half its
# interval, clients/rate, later).
run("pkill", "-USR1", "-f", "rebindgw loadgen")
figures["storm_notice_after_ms"] = round((time.monotonic() - t0) * 1000, 1)
storm = recover("storm", t0, base, cfg["recover_timeout"], stage_base)
storm_s = storm["all"]["max_ms"] / 1000
txns = storm["commit_transactions"]["total"]
storm["etcd_commit_transactions_per_s"] = round(txns / storm_s, 1)
storm["rebinds_per_transaction"] = round(storm["commits"] / max(txns, 1), 1)
figures["storm"] = storm
print("1. storm: %d clients moved by the NAT (%d conntrack entries deleted in %s ms); every "
      "client rebound (its first acknowledgement, from the start of the deletion) p50 %s p99 %s "
      "max %s ms; %d commits "
      "(%d more than clients: REBINDs sent again with a new t): taken over from another gateway "
      "(cross) n=%d p50 %s p99 %s max %s ms, by the owner (same) n=%d p50 %s p99 %s max %s ms "
      "(polled every %s ms)"
      % (clients, deleted, figures["conntrack_delete_ms"][-1], storm["all"]["p50_ms"], storm["all"]["p99_ms"], storm["all"]["max_ms"],
         storm["commits"], storm["commits"] - clients, storm["cross"]["n"],
         storm["cross"]["p50_ms"], storm["cross"]["p99_ms"], storm["cross"]["max_ms"],
         storm["same"]["n"], storm["same"]["p50_ms"], storm["same"]["p99_ms"],
         storm["same"]["max_ms"], storm["poll_ms"]),
      flush=True)
print("   where the time went (ms from the move until the stage had happened once per "
      "client, p50 / p99 / all): DATA from a new tuple %s; UNRECOGNIZED sent %s; REBIND received "
      "%s; committed %s / %s / %s. %d etcd commit transactions, %.1f/s, %.1f REBINDs each"
      % tuple(["/".join(str(storm[k][q]) for q in ("p50_ms", "p99_ms", "all_ms"))
               for k in ("unknown_tuple", "unrecognized_sent", "rebinds_received")]
              + [storm["all"]["p50_ms"], storm["all"]["p99_ms"], storm["all"]["max_ms"], txns,
                 storm["etcd_commit_transactions_per_s"], storm["rebinds_per_transaction"]]),
      flush=True)
fwd0 = total(FORWARDED)
reads = {n: int(scrape(n).get("rebindgw_cluster_etcd_range_reads_total", 0)) for n in alive_gws}
figures["etcd_range_reads_during_traffic"] = {n: reads[n] - reads0[n] for n in alive_gws}
if any(reads[n] != reads0[n] for n in alive_gws):
    fail("etcd range reads while forwarding: %s -> %s" % (reads0, reads))
print("   store reads on the packet path: 0 range reads during the phase, %d datagrams "
      "forwarded to the host in all" % fwd0, flush=True)
time.sleep(2)

# 2. A captured REBIND sent to all three gateways at once. A few clients are moved by the
# NAT (one SNAT rule each, onto a public address of their own); an attacker in the router
# namespace (scripts/lib/capture-fanout.py) copies each one's first REBIND, byte for byte and
# from its tuple, onto every ECMP leg. The rest of the load stays put, so every commit in the
# phase is one of theirs: exactly one per captured REBIND.
def conntrack_clients(k):
    out = run("ip", "netns", "exec", P + "-nat", "conntrack", "-L", "-p", "udp").stdout
    picked = []
    for line in out.splitlines():
        m = re.search(r"src=(\S+) dst=%s sport=(\d+) dport=7400" % re.escape(cfg["svc"]), line)
        if m and m.group(1) in cfg["clis"] and (m.group(1), m.group(2)) not in picked:
            picked.append((m.group(1), m.group(2)))
        if len(picked) == k:
            break
    return picked


# Quiet first (no commit for 5 s): the storm's last stragglers (a client that drew another
# UNRECOGNIZED after its rebind sends a REBIND with a new t) must not count here.
quiet_since, last_reb, t_q = time.monotonic(), total(REBOUND), time.monotonic()
while time.monotonic() - quiet_since < 5 and time.monotonic() - t_q < 90:
    time.sleep(0.2)
    reb = total(REBOUND)
    if reb != last_reb:
        quiet_since, last_reb = time.monotonic(), reb
ATTACK_ADDR = cfg["attack_addr"]
run("ip", "-n", P + "-nat", "addr", "add", ATTACK_ADDR + "/24", "dev", "n1")
victims = conntrack_clients(min(16, clients))
attacker = subprocess.Popen(["ip", "netns", "exec", P + "-rt", sys.executable, cfg["fanout"],
                             ATTACK_ADDR, cfg["svc"], "7400", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
if attacker.stderr.readline().strip() != "ready":
    fail("the capture-fanout attacker did not start: " + attacker.stderr.read())
OUTCOMES = ('rebindgw_cluster_transactions_total{result="conflict"}',
            'rebindgw_cluster_transactions_total{result="stale"}',
            'rebindgw_cluster_transactions_total{result="duplicate"}',
            "rebindgw_rebind_duplicates_total", "rebindgw_commits_coalesced_total",
            'rebindgw_client_rx_packets_total{type="rebind"}')
snap = snapshot()
base_reb = total(REBOUND, snap)
base_out = {k: total(k, snap) for k in OUTCOMES}
rules = "".join('insert rule ip bednat post oifname "n1" ip saddr %s udp sport %s snat to %s\n'
                % (a, sp, ATTACK_ADDR) for a, sp in victims)
r = run("ip", "netns", "exec", P + "-nat", "nft", "-f", "-", stdin=rules)
if r.returncode != 0:
    fail("nft: " + r.stderr)
for a, sp in victims:
    run("ip", "netns", "exec", P + "-nat", "conntrack", "-D", "-p", "udp", "-s", a, "--sport", sp)
t_att = time.monotonic()
while total(REBOUND) - base_reb < len(victims) and time.monotonic() - t_att < 15:
    time.sleep(0.05)
time.sleep(2)  # late copies and re-ACKs
attacker.terminate()
out, err = attacker.communicate(timeout=10)
try:
    fan = json.loads(out)
except ValueError:
    fail("capture-fanout printed no report: %r %r" % (out, err))
snap = snapshot()
commits = total(REBOUND, snap) - base_reb
outcomes = {k.split("{")[0].replace("rebindgw_", "") + ("/" + k.split('"')[1] if '"' in k else ""):
            total(k, snap) - base_out[k] for k in OUTCOMES}
captured = [t["rebinds"][t["captured_t"]] for t in fan["tuples"].values()]
acked = sum(1 for t in fan["tuples"].values() for r in t["rebinds"].values() if r["acks"])
later = sum(len(t["rebinds"]) - 1 for t in fan["tuples"].values())
acks = sum(sum(r["acks"].values()) for r in captured)
acking_legs = sorted({len(r["acks"]) for r in captured})
distinct = sorted({r["distinct_acks"] for r in captured})
figures["captured_rebind_to_all"] = {"moved": len(victims), "captured": fan["captured"],
                                     "copies_sent": 3 * fan["captured"], "commits": commits,
                                     "rebinds_acked": acked, "later_rebinds": later,
                                     "other_outcomes": outcomes, "acks_to_captured": acks,
                                     "gateways_acking_per_rebind": acking_legs,
                                     "distinct_acks_per_rebind": distinct}
print("2. %d captured REBINDs, each sent to all 3 gateways at once besides the original: "
      "%d commits for %d acknowledged REBINDs (%d of them later REBINDs with a new t: the "
      "copy had won at a gateway the router does not send that tuple to, whose next datagram "
      "then drew UNRECOGNIZED); the other copies: %s; %d ACKs to the captured REBINDs, from %s "
      "gateway(s) each, %s distinct ACK(s) each"
      % (fan["captured"], commits, acked, later, outcomes, acks, acking_legs, distinct),
      flush=True)
if fan["captured"] != len(victims):
    fail("the attacker captured %d of %d moved clients' REBINDs" % (fan["captured"], len(victims)))
if any(not r["acks"] for r in captured):
    fail("a captured REBIND was never acknowledged")
# Every commit sends an ACK and every ACK follows a commit: one commit per acknowledged
# REBIND means none was accepted twice.
if commits != acked:
    figures["captured_rebind_to_all"]["tuples"] = fan["tuples"]
    fail("%d commits for %d acknowledged REBINDs (a REBIND committed twice, or another "
         "client's late commit in the phase: see figures.json)" % (commits, acked))
if distinct != [1]:
    fail("a captured REBIND drew differing ACKs: %s" % distinct)
time.sleep(1)

# 3. Key rotation under load: one gateway's `rebindgw rotate` starts epoch 2 for the whole
# cluster (one etcd transaction on the epoch record); every gateway's watch switches; each
# registers the connections it carries in epoch 2 and hands their keys to the host, which
# delivers them in-band. Every client acknowledges its keys with no new handshake.
acked0 = total("rebindgw_epoch_keys_acknowledged_total")
hs0 = total("rebindgw_handshakes_forwarded_total")
t_rot = time.monotonic()
r = run(cfg["bin"], "rotate", "--admin", gws[1] + ":7480", "--admin-key", cfg["admin_key"])
rot_ms = round((time.monotonic() - t_rot) * 1000, 1)
if r.returncode != 0 or "epoch 2" not in r.stdout + r.stderr:
    fail("rebindgw rotate: %s %s" % (r.stdout, r.stderr))
switched = None
acked_series = []
while time.monotonic() - t_rot < cfg["recover_timeout"] + 30:
    snap = snapshot()
    now = time.monotonic() - t_rot
    if switched is None and all(m.get("rebindgw_epoch", 0) == 2 for m in snap):
        switched = round(now * 1000, 1)
    acked = total("rebindgw_epoch_keys_acknowledged_total", snap) - acked0
    if not acked_series or acked > acked_series[-1][1]:
        acked_series.append((now, acked))
    if switched is not None and acked >= clients:
        break
    time.sleep(0.05)
acked = acked_series[-1][1] if acked_series else 0
handshakes = total("rebindgw_handshakes_forwarded_total") - hs0
pending = total("rebindgw_epoch_keys_pending")
figures["rotation"] = {"command_ms": rot_ms, "all_gateways_at_epoch_2_ms": switched,
                       "keys_acknowledged": acked, "keys_pending_after": pending,
                       "acknowledged_p50_ms": pct(acked_series, clients, 0.5),
                       "acknowledged_p99_ms": pct(acked_series, clients, 0.99),
                       "acknowledged_all_ms": pct(acked_series, clients, 1.0),
                       "handshakes": handshakes}
print("3. rotation under load (rebindgw rotate on gateway 1): answered in %s ms (%s); every "
      "gateway at epoch 2 %s ms after the command; keys acknowledged by %d of %d clients: p50 "
      "%s p99 %s all %s ms; %d keys still pending (connections that never acknowledge: the "
      "loadgen's probes); %d handshakes"
      % (rot_ms, (r.stdout + r.stderr).strip().splitlines()[-1], switched, acked, clients,
         figures["rotation"]["acknowledged_p50_ms"], figures["rotation"]["acknowledged_p99_ms"],
         figures["rotation"]["acknowledged_all_ms"], pending, handshakes), flush=True)
if switched is None:
    fail("not every gateway switched to epoch 2")
if acked < clients:
    fail("only %d of %d clients acknowledged their epoch-2 keys" % (acked, clients))
if handshakes:
    fail("%d handshakes during the rotation" % handshakes)
time.sleep(1)

# 4. kill -9 gateway 3; its next hop is withdrawn at once.
victim = int(scrape(3).get(OWNED, 0))
os.kill(cfg["gw_pids"][2], 9)
t_kill = time.monotonic()
r = run("ip", "-n", P + "-rt", "route", "replace", cfg["svc"] + "/32",
        "nexthop", "via", "10.210.11.2", "dev", "r1", "weight", "1",
        "nexthop", "via", "10.210.12.2", "dev", "r2", "weight", "1")
if r.returncode != 0:
    fail("route replace: " + r.stderr)
alive_gws = [1, 2]
while True:
    owned = total(OWNED)
    if owned >= clients:
        break
    if time.monotonic() - t_kill > cfg["recover_timeout"]:
        fail("kill -9: survivors own %d of %d connections after %d s"
             % (owned, clients, cfg["recover_timeout"]))
    time.sleep(POLL)
t_last = round((time.monotonic() - t_kill) * 1000, 1)
figures["kill"] = {"victim_owned": victim, "all_owned_by_survivors_ms": t_last}
print("4. kill -9 of gateway 3 (owned %d): the survivors serve all %d connections %s ms later"
      % (victim, clients, t_last), flush=True)
time.sleep(2)


def forwarded_in(seconds):
    a = total(FORWARDED)
    time.sleep(seconds)
    return total(FORWARDED) - a


# 5. One etcd member down: forwarding and a rebind of everyone go on.
before = forwarded_in(2)
snap = snapshot()
links0 = {k: total("rebindgw_cluster_" + k, snap)
          for k in ("link_downs_total", "watch_resumes_total", "reloads_total")}
for pid in run("ip", "netns", "pids", P + "-etcd2").stdout.split():
    os.kill(int(pid), 9)
base = (total(REBOUND), total(TAKEN))
t0, _ = nat_rebind(cfg["nat_ports"], cfg["nat_out"][1])
one_down = recover("etcd member down", t0, base, cfg["recover_timeout"])
during = forwarded_in(2)
snap = snapshot()
link_events = {k: total("rebindgw_cluster_" + k, snap) - links0[k] for k in links0}
figures["etcd_member_down"] = {"forwarded_2s_before": before, "forwarded_2s_during": during,
                               "rebind": one_down["all"], "link": link_events}
print("5. etcd member 2 killed: a rebind of all %d clients p50 %s p99 %s max %s ms; forwarded in "
      "2 s: %d before, %d during; gateways' etcd links: %s"
      % (clients, one_down["all"]["p50_ms"], one_down["all"]["p99_ms"], one_down["all"]["max_ms"],
         before, during, link_events), flush=True)
subprocess.run(["bash", "-c", cfg["etcd_start"] % 2])
time.sleep(3)

# 6. All etcd members down for 5 s, with a NAT rebind of everyone inside the outage.
before = forwarded_in(5)
unavail0 = total('rebindgw_cluster_transactions_total{result="unavailable"}')
reb0 = total(REBOUND)
for m in (1, 2, 3):
    for pid in run("ip", "netns", "pids", "%s-etcd%d" % (P, m)).stdout.split():
        os.kill(int(pid), 9)
t_down = time.monotonic()
during = forwarded_in(2.5)
base = (total(REBOUND), total(TAKEN))
t0, _ = nat_rebind(cfg["nat_ports"], cfg["nat_out"][2])
time.sleep(max(0, 5 - (time.monotonic() - t_down)))
committed_in_outage = total(REBOUND) - reb0
unavail = total('rebindgw_cluster_transactions_total{result="unavailable"}') - unavail0
for m in (1, 2, 3):
    subprocess.run(["bash", "-c", cfg["etcd_start"] % m])
t_up = time.monotonic()
# Where the time goes after the outage: etcd's members back and a leader elected, then
# every gateway's link reconnected (backoff up to 2 s) and its registry reloaded.
while True:
    r = run("bash", "-c", cfg["etcd_health"])
    if r.returncode == 0:
        break
    if time.monotonic() - t_up > 60:
        fail("etcd did not become healthy again")
    time.sleep(0.05)
t_healthy = time.monotonic()
while total("rebindgw_cluster_link_up") < len(alive_gws):
    if time.monotonic() - t_up > 60:
        fail("a gateway's etcd link did not come back")
    time.sleep(POLL)
t_links = time.monotonic()
after = recover("after the etcd outage", t0, base, cfg["recover_timeout"] + 10)
accepted = total("rebindgw_rebinds_accepted_total")
committed = total("rebindgw_commits_total")
figures["etcd_outage"] = {
    "forwarded_5s_before": before, "forwarded_first_2_5s_of_outage": during,
    "commits_during_outage": committed_in_outage, "refused_unavailable": unavail,
    "rebind_recovered_from_nat_move": after["all"],
    "etcd_restarted_after_nat_move_ms": round((t_up - t0) * 1000, 1),
    "etcd_healthy_after_restart_ms": round((t_healthy - t_up) * 1000, 1),
    "links_up_after_healthy_ms": round((t_links - t_healthy) * 1000, 1)}
print("6. all etcd down 5 s: forwarded %d in the 5 s before, %d in the first 2.5 s of the outage; "
      "a NAT rebind of all clients inside it: %d commits during the outage, %d transactions "
      "refused as unavailable; etcd restarted %.0f ms after the move, healthy %.0f ms later, every "
      "gateway's link up %.0f ms after that; all %d recovered %s ms after the move (p50 %s)"
      % (before, during, committed_in_outage, unavail, (t_up - t0) * 1000,
         (t_healthy - t_up) * 1000, (t_links - t_healthy) * 1000, clients,
         after["all"]["max_ms"], after["all"]["p50_ms"]), flush=True)
if committed_in_outage != 0:
    fail("%d rebinds committed while etcd was down" % committed_in_outage)
if during < before / 4:
    fail("forwarding collapsed while etcd was down (%d vs %d)" % (during, before))
# Nothing accepted twice: a REBIND is accepted only with its commit. A commit whose answer
# came after the core gave up on it (5 s, counted as late) is not accepted: the client
# retries and the watch event binds its tuple.
per = {}
for n in alive_gws:
    m = scrape(n)
    per[n] = (int(m.get("rebindgw_rebinds_accepted_total", 0)), int(m.get(REBOUND, 0)),
              int(m.get('rebindgw_commits_total{result="late"}', 0)))
figures["accepted_committed_late"] = per
if any(not (a <= c <= a + late) for a, c, late in per.values()):
    fail("accepted REBINDs do not match committed ones (accepted, committed, late): %s" % per)
json.dump(figures, open(cfg["figures"], "w"), indent=1)
print("passed", flush=True)
PYEOF

cfg=$(
  cat <<EOF
{"prefix": "$P", "clients": $CLIENTS, "cli": "$BED_CLI",
 "clis": [$(printf '"%s",' "${BED_CLIS[@]}" | sed 's/,$//')], "svc": "$BED_SVC",
 "gateways": {"1": "$(bed_gateway_addr 1)", "2": "$(bed_gateway_addr 2)", "3": "$(bed_gateway_addr 3)"},
 "gw_pids": [${GW_PIDS[0]}, ${GW_PIDS[1]}, ${GW_PIDS[2]}],
 "nat_out": ["${BED_NAT_POOLS[1]}", "${BED_NAT_POOLS[2]}", "${BED_NAT_POOLS[3]}"],
 "nat_ports": "$BED_NAT_PORTS", "attack_addr": "$BED_ATTACK_ADDR",
 "fanout": "$ROOT/scripts/lib/capture-fanout.py",
 "connect_wait": $((60 + CLIENTS / 200)), "recover_timeout": $((20 + CLIENTS / 1000)),
 "etcd_start": ". $ROOT/scripts/lib/netns.sh; . $ROOT/scripts/lib/cluster-bed.sh; bed_etcd_start $P %d $WORK",
 "etcd_health": ". $ROOT/scripts/lib/netns.sh; . $ROOT/scripts/lib/cluster-bed.sh; bed_etcdctl $P endpoint health >/dev/null 2>&1",
 "rebound_log": "$WORK/rebound.log", "figures": "$WORK/figures.json",
 "bin": "$BIN", "admin_key": "$WORK/gw1/admin.key"}
EOF
)
echo "== $CLIENTS clients, $RATE datagrams/s; driver in $P-host"
set +e
ip netns exec "$P-host" "$PY" "$WORK/driver.py" "$cfg" 2>&1 | tee "$WORK/driver.log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 0 ] || die "driver failed (see $WORK/driver.log, gw*.log, loadgen.log)"
cp "$WORK/figures.json" "${FIGURES_OUT:-/dev/null}" 2>/dev/null || true
echo "== cluster test passed"
