#!/usr/bin/env bash
# NAT rebinding test: real clients behind a real NAT (nftables SNAT in a network namespace)
# keep their connections through a gateway while the NAT gives them new public tuples again
# and again.
#
#   client ns (rbnat-cli)          NAT ns (rbnat-nat)                    gateway ns (rbnat-gw)
#   10.200.1.2-5/24  c0 ===veth=== n0 10.200.1.1/24
#   default via .1                 n1 10.200.2.1,.11,.12,.13/24 ===veth=== g0 10.200.2.2/24
#   rebindgw loadgen               nft: udp from 10.200.1.0/24 out n1      rebindgw gateway :7400
#                                  -> snat to ADDR:PORTS                   rebindgw host 127.0.0.1:7500
#                                                                          (no route to 10.200.1/24)
#
# The gateway namespace has no route to the clients' subnet, so every reply goes through the
# NAT's conntrack entries. While the loadgen's traffic runs (its own churn is 0: the NAT does
# the moving), the script forces rebind events, alternating two kinds:
#   port: swap the SNAT port range for a disjoint one, then delete the clients' conntrack
#         entries (conntrack -D -p udp -s 10.200.1.0/24, inside the NAT namespace);
#   addr: swap the SNAT address for another of n1's addresses, then delete them likewise.
# (Plain masquerade + `conntrack -F` would hand back the same port: no rebind at all.)
# Each client's next DATA then reaches the gateway from an unknown tuple, gets UNRECOGNIZED,
# and the client REBINDs. An event recovers when the gateway has accepted one REBIND per
# client; its recovery times are read off the gateway's rebindgw_rebinds_accepted_total,
# polled every 5 ms from the moment `conntrack -D` returns, so the per-client percentiles are
# exact to the polling interval. (The loadgen times only the moves it makes itself, so its
# own recovery percentiles are empty here; its rebinds.extra counts these rebinds.)
#
# Pass: every event recovered all clients, and then no DATA from unknown tuples reached the
# gateway for a full second (no client left on a dead tuple), and the loadgen's JSON report
# says passed, all clients connected, none failed afterwards. The namespaces are deleted on
# every exit (and leftovers of an aborted run at start); logs are kept in /tmp on failure.
#
# Usage: scripts/nat-test.sh [--short] [--keep] [--no-build] [--clients N] [--events N]
#                            [--interval SECS] [--rate PPS]
#   --short     CI size: 64 clients, 4 events (about 20 s in all)
#   default     512 clients, 24 events, about 60 s of load
#   --keep      leave the namespaces, processes' logs and state for debugging
#   --no-build  use target/release/rebindgw as it is (it is still built if missing)
# Needs root, iproute2, nftables, conntrack and python3.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/netns.sh
. "$ROOT/scripts/lib/netns.sh"

PREFIX=${RBNAT_PREFIX:-rbnat}
NS_CLI=$PREFIX-cli
NS_NAT=$PREFIX-nat
NS_GW=$PREFIX-gw
CLI_NET=10.200.1.0/24
CLI_ADDRS=(10.200.1.2 10.200.1.3 10.200.1.4 10.200.1.5)
NAT_IN=10.200.1.1
NAT_PUBLIC=(10.200.2.1 10.200.2.11 10.200.2.12 10.200.2.13)
GW_ADDR=10.200.2.2
GW_PORT=7400
HOST_LINK=127.0.0.1:7500
ADMIN=127.0.0.1:7480

CLIENTS=512
EVENTS=24
INTERVAL=2.5
RATE=8000
KEEP=0
BUILD=1

die() {
  echo "nat-test: FAIL: $*" >&2
  exit 1
}

usage() {
  sed -n '/^# Usage:/,/^# Needs root/p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
  case "$1" in
  --short)
    CLIENTS=64
    EVENTS=4
    INTERVAL=2.5
    RATE=2000
    ;;
  --keep) KEEP=1 ;;
  --no-build) BUILD=0 ;;
  --clients) CLIENTS=$2; shift ;;
  --events) EVENTS=$2; shift ;;
  --interval) INTERVAL=$2; shift ;;
  --rate) RATE=$2; shift ;;
  -h | --help) usage; exit 0 ;;
  *) usage >&2; die "unknown option $1" ;;
  esac
  shift
done

# --- prerequisites ---------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, nftables, conntrack)"
missing=()
for t in ip:iproute2 nft:nftables conntrack:conntrack python3:python3; do
  command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
done
[ ${#missing[@]} -eq 0 ] ||
  die "missing tools; install them with: apt-get install -y ${missing[*]}"

# A system python3 starts faster than a version-manager shim.
PY=$(command -v python3)
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3

BIN=$ROOT/target/release/rebindgw
if [ "$BUILD" = 1 ] || [ ! -x "$BIN" ]; then
  command -v cargo >/dev/null 2>&1 || [ -x "$BIN" ] || die "no $BIN and no cargo to build it"
  if command -v cargo >/dev/null 2>&1; then
    echo "== cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
  fi
fi
[ -x "$BIN" ] || die "$BIN missing after the build"

# --- cleanup (also of a previous aborted run) ------------------------------------------------
WORK=""
PIDS=()
STATUS=1
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$STATUS" != 0 ] && [ "$rc" = 0 ]; then rc=1; fi
  if [ "$KEEP" = 1 ]; then
    echo "nat-test: --keep: namespaces $NS_CLI $NS_NAT $NS_GW left up (processes still" \
      "running there: ${PIDS[*]:-none}); files in $WORK" >&2
    echo "nat-test: clean up with: ip netns del $NS_CLI; ip netns del $NS_NAT; ip netns del $NS_GW" >&2
    exit "$rc"
  fi
  local p
  for p in "${PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 30); do
      kill -0 "$p" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$p" 2>/dev/null || true
  done
  netns_delete "$NS_CLI" "$NS_NAT" "$NS_GW"
  if [ -n "$WORK" ]; then
    if [ "$rc" = 0 ]; then
      rm -rf "$WORK"
    else
      echo "nat-test: logs kept in $WORK" >&2
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "nat-test: interrupted" >&2; exit 130' INT TERM

netns_delete "$NS_CLI" "$NS_NAT" "$NS_GW"
WORK=$(mktemp -d /tmp/nat-test.XXXXXX)

# --- topology ---------------------------------------------------------------------------------
echo "== topology: $NS_CLI -- $NS_NAT (nftables SNAT) -- $NS_GW"
netns_create "$NS_CLI"
netns_create "$NS_NAT"
netns_create "$NS_GW"
netns_veth "$NS_CLI" c0 "$NS_NAT" n0
netns_veth "$NS_NAT" n1 "$NS_GW" g0
for a in "${CLI_ADDRS[@]}"; do
  ip -n "$NS_CLI" addr add "$a/24" dev c0
done
ip -n "$NS_CLI" route add default via "$NAT_IN"
ip -n "$NS_NAT" addr add "$NAT_IN/24" dev n0
for a in "${NAT_PUBLIC[@]}"; do
  ip -n "$NS_NAT" addr add "$a/24" dev n1
done
ip netns exec "$NS_NAT" sysctl -qw net.ipv4.ip_forward=1
ip -n "$NS_GW" addr add "$GW_ADDR/24" dev g0
# The gateway namespace only knows 10.200.2.0/24: replies to the clients can only reach them
# through the NAT's translation.

# SNAT rule for port range index $1 and public address index $2. nftables wants the
# `meta l4proto udp` match for a port range.
PORT_RANGES=(20000-24999 25000-29999 30000-34999 35000-39999 40000-44999 45000-49999)
snat_rule() {
  echo "add rule ip rbnat post oifname \"n1\" ip saddr $CLI_NET meta l4proto udp snat to ${NAT_PUBLIC[$2]}:${PORT_RANGES[$1]}"
}
ip netns exec "$NS_NAT" nft -f - <<EOF || die "nftables setup failed"
table ip rbnat {
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
  }
}
$(snat_rule 0 0)
EOF

# --- gateway and host -------------------------------------------------------------------------
"$BIN" link-keygen --out "$WORK/link.key" >/dev/null
: >"$WORK/clients.toml"
chmod 600 "$WORK/clients.toml"
mkdir -m 700 "$WORK/state"

ip netns exec "$NS_GW" "$BIN" host --listen "$HOST_LINK" --clients "$WORK/clients.toml" \
  --link-key "$WORK/link.key" >"$WORK/host.out" 2>"$WORK/host.log" &
PIDS+=($!)
# Every client sits behind the NAT, so the gateway sees all of them (and all their
# UNRECOGNIZED-triggering packets after a rebind event) from one to four public addresses in
# one /24. The default per-/24 limits (UNRECOGNIZED 2000/s burst 4000, handshakes 200/s burst
# 400, split over the workers) are meant for many prefixes; here they are raised so that a
# whole NAT's worth of clients can rebind at once and connect quickly.
ip netns exec "$NS_GW" "$BIN" gateway --listen "$GW_ADDR:$GW_PORT" \
  --host "$HOST_LINK=$WORK/link.key" --state-dir "$WORK/state" --admin "$ADMIN" \
  --unrecognized-per-prefix 1000000/1000000 --handshake-per-prefix 100000/100000 \
  >"$WORK/gateway.out" 2>"$WORK/gateway.log" &
GW_PID=$!
PIDS+=("$GW_PID")

# --- the event driver (runs in the gateway namespace, for the admin endpoint) ----------------
cat >"$WORK/driver.py" <<'PYEOF'
import json, math, os, re, socket, subprocess, sys, time

cfg = json.loads(sys.argv[1])
admin_host, admin_port = cfg["admin"].rsplit(":", 1)
clients = cfg["clients"]
out = open(cfg["events_out"], "w")
POLL = 0.005


def scrape():
    s = socket.create_connection((admin_host, int(admin_port)), timeout=2)
    s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200" not in head.split(b"\r\n")[0]:
        raise RuntimeError("admin endpoint: " + head.split(b"\r\n")[0].decode())
    vals = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, v = line.rpartition(" ")
        name = key.split("{", 1)[0]
        vals[name] = vals.get(name, 0.0) + float(v)
        if "{" in key:
            vals[key] = float(v)
    return vals


# Gateway counters whose change over an event is kept in events.jsonl (for diagnosis).
WATCH = ("rebindgw_unrecognized_sent_total", "rebindgw_unrecognized_suppressed_total",
         "rebindgw_rebind_duplicates_total", "rebindgw_rebinds_rejected_total",
         "rebindgw_unknown_tuple_total", "rebindgw_dropped_total")


def watched(m):
    return {k: v for k, v in m.items() if k.split("{", 1)[0] in WATCH}


def delta(a, b):
    return {k: int(b.get(k, 0) - a.get(k, 0)) for k in sorted(set(a) | set(b))
            if b.get(k, 0) != a.get(k, 0)}


def metric(name):
    return int(scrape().get(name, 0))


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def fail(msg):
    print("driver: " + msg, file=sys.stderr)
    out.write(json.dumps({"error": msg}) + "\n")
    out.close()
    sys.exit(1)


def nat(args, stdin=None):
    return subprocess.run(["ip", "netns", "exec", cfg["ns_nat"]] + args, input=stdin,
                          capture_output=True, text=True)


# 1. Wait for every client to connect (the loadgen's connect phase).
t_end = time.monotonic() + cfg["connect_wait"]
while metric("rebindgw_connections") < clients:
    if time.monotonic() > t_end:
        fail("only %d of %d clients connected within %ds" %
             (metric("rebindgw_connections"), clients, cfg["connect_wait"]))
    if not alive(cfg["lg_pid"]):
        fail("the loadgen exited before all clients connected (see loadgen.log)")
    time.sleep(0.05)
t_run = time.monotonic()
print("connected: %d clients up; the loadgen's measured phase starts" % clients, flush=True)
time.sleep(cfg["lead"])

# 2. Rebind events.
port_idx, addr_idx = 0, 0
deadline = t_run + cfg["last_event_by"]
failed = False
for k in range(cfg["events"]):
    slot_start = t_run + cfg["lead"] + k * cfg["interval"]
    now = time.monotonic()
    if now < slot_start:
        time.sleep(slot_start - now)
    if time.monotonic() > deadline:
        fail("event %d would start after the loadgen's measured phase; only %d of %d events ran"
             % (k + 1, k, cfg["events"]))
    if not alive(cfg["lg_pid"]):
        fail("the loadgen exited during the run (see loadgen.log)")
    if not alive(cfg["gw_pid"]):
        fail("the gateway exited during the run (see gateway.log)")
    kind = "port" if k % 2 == 0 else "addr"
    if kind == "port":
        port_idx = (port_idx + 1) % len(cfg["port_ranges"])
    else:
        addr_idx = (addr_idx + 1) % len(cfg["nat_public"])
    snat = "%s:%s" % (cfg["nat_public"][addr_idx], cfg["port_ranges"][port_idx])
    rule = ('flush chain ip rbnat post\n'
            'add rule ip rbnat post oifname "n1" ip saddr %s meta l4proto udp snat to %s\n'
            % (cfg["cli_net"], snat))
    m0 = scrape()
    base = int(m0.get("rebindgw_rebinds_accepted_total", 0))
    base_unrec = m0.get("rebindgw_unrecognized_sent_total", 0)
    r = nat(["nft", "-f", "-"], stdin=rule)
    if r.returncode != 0:
        fail("nft failed: " + r.stderr.strip())
    # t0: when the clients' old mappings are gone, i.e. when `conntrack -D` returns (most of
    # its 15-40 ms is spawning `ip netns exec conntrack`; the entries go at the end).
    t_ct = time.monotonic()
    r = nat(["conntrack", "-D", "-p", "udp", "-s", cfg["cli_net"]])
    t0 = time.monotonic()
    m = re.search(r"(\d+) flow entries have been deleted", r.stderr)
    deleted = int(m.group(1)) if m else 0
    if r.returncode != 0 or deleted == 0:
        fail("conntrack -D deleted nothing (rc %d): %s" % (r.returncode, r.stderr.strip()))
    # Poll the accepted-REBIND counter: the first time it reaches j rebinds is the j-th
    # client's recovery time.
    ct_ms = (t0 - t_ct) * 1000
    firsts = []  # (seconds since t0, count)
    got = 0
    first_unrec = None
    t_stop = t0 + cfg["recover_timeout"]
    while got < clients and time.monotonic() < t_stop:
        m = scrape()
        now = time.monotonic()
        c = int(m.get("rebindgw_rebinds_accepted_total", 0)) - base
        if first_unrec is None and m.get("rebindgw_unrecognized_sent_total", 0) > base_unrec:
            first_unrec = round((now - t0) * 1000, 1)
        if c > got:
            firsts.append((now - t0, c))
            got = c
        time.sleep(POLL)

    def at(q):
        need = max(1, math.ceil(q * clients))
        for t, c in firsts:
            if c >= need:
                return round(t * 1000, 1)
        return None

    counters = delta(watched(m0), watched(scrape()))
    # Quiet check: once every client has rebound, no DATA may reach the gateway from an
    # unknown tuple (a client still on a dead tuple would keep drawing UNRECOGNIZED). Wait
    # for a full second without one (the counter above could in principle count one client
    # twice and miss another; this cannot be fooled that way).
    quiet_ms = None
    if got >= clients:
        q_start = time.monotonic()
        last_u, last_change = metric("rebindgw_unknown_tuple_total"), q_start
        while time.monotonic() - q_start < cfg["recover_timeout"]:
            time.sleep(0.1)
            u = metric("rebindgw_unknown_tuple_total")
            now = time.monotonic()
            if u != last_u:
                last_u, last_change = u, now
            elif now - last_change >= 1.0:
                quiet_ms = round((last_change - t0) * 1000, 1)
                break
    ev = {"event": k + 1, "type": kind, "at_s": round(t0 - t_run, 2), "snat": snat,
          "deleted": deleted, "recovered": min(got, clients), "clients": clients,
          "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0), "firsts": firsts,
          "conntrack_ms": round(ct_ms, 1), "first_unrecognized_ms": first_unrec,
          "gateway_counters": counters, "unknown_tuples_stop_ms": quiet_ms}
    out.write(json.dumps(ev) + "\n")
    out.flush()
    print("event %2d %-4s snat %-24s conntrack deleted %4d in %.0f ms, first UNRECOGNIZED at "
          "%s ms, recovered %d/%d, p50 %s p99 %s max %s ms"
          % (k + 1, kind, snat, deleted, ct_ms, first_unrec, ev["recovered"], clients,
             ev["p50_ms"], ev["p99_ms"], ev["max_ms"]), flush=True)
    if got < clients:
        failed = True
        print("driver: event %d: only %d of %d clients rebound within %.0fs"
              % (k + 1, got, clients, cfg["recover_timeout"]), file=sys.stderr)
    elif quiet_ms is None:
        failed = True
        print("driver: event %d: DATA from unknown tuples kept reaching the gateway %.0fs after "
              "the event: some client did not rebind" % (k + 1, cfg["recover_timeout"]),
              file=sys.stderr)
out.close()
sys.exit(1 if failed else 0)
PYEOF

LEAD=1.5
TAIL=4
# (awk, not python: each python3 start costs up to a second on a busy machine)
DURATION=$(awk -v l=$LEAD -v e="$EVENTS" -v i="$INTERVAL" -v t=$TAIL \
  'BEGIN { d = l + e * i + t; printf "%d", (d == int(d)) ? d : int(d) + 1 }')
LAST_EVENT_BY=$(awk -v l=$LEAD -v e="$EVENTS" -v i="$INTERVAL" 'BEGIN { print l + e * i + 1 }')
# Per event: how long to wait for every client to rebind (the client retries a REBIND for 30 s).
RECOVER_TIMEOUT=10

echo "== $CLIENTS clients, $EVENTS rebind events every ${INTERVAL}s, loadgen --duration ${DURATION}s --rate $RATE"
admin_up() {
  ip netns exec "$NS_GW" bash -c "exec 3<>/dev/tcp/${ADMIN%:*}/${ADMIN##*:}" 2>/dev/null
}
for _ in $(seq 200); do
  admin_up && break
  kill -0 "$GW_PID" 2>/dev/null || die "the gateway exited at start-up (see $WORK/gateway.log)"
  sleep 0.1
done
admin_up || die "the gateway's admin endpoint did not come up (see $WORK/gateway.log)"

# The loadgen: clients behind the NAT, bound to the client namespace's addresses (one socket
# and port each, round-robin over the addresses), enrolled into the host's clients file. No
# churn of its own (--churn-per-sec 0): the NAT does the moving, and a client notices its dead
# tuple through the gateway's UNRECOGNIZED, the normal path.
SRC_ADDRS=$(
  IFS=,
  echo "${CLI_ADDRS[*]}"
)
ip netns exec "$NS_CLI" "$BIN" loadgen --gateway "$GW_ADDR:$GW_PORT" --clients "$CLIENTS" \
  --clients-file "$WORK/clients.toml" --source-addrs "$SRC_ADDRS" --churn-per-sec 0 \
  --rate "$RATE" --duration "${DURATION}s" --settle 5s --json -q \
  >"$WORK/loadgen.json" 2>"$WORK/loadgen.log" &
LG_PID=$!
PIDS+=("$LG_PID")

json_list() {
  local out="" x
  for x in "$@"; do out+="${out:+,}\"$x\""; done
  echo "[$out]"
}
DRIVER_CFG=$(
  printf '{"clients": %d, "events": %d, "interval": %s, "lead": %s, "last_event_by": %s, ' \
    "$CLIENTS" "$EVENTS" "$INTERVAL" "$LEAD" "$LAST_EVENT_BY"
  printf '"recover_timeout": %s, "connect_wait": 90, "gw_pid": %d, "lg_pid": %d, ' \
    "$RECOVER_TIMEOUT" "$GW_PID" "$LG_PID"
  printf '"events_out": "%s", "admin": "%s", "ns_nat": "%s", "cli_net": "%s", ' \
    "$WORK/events.jsonl" "$ADMIN" "$NS_NAT" "$CLI_NET"
  printf '"port_ranges": %s, "nat_public": %s}' \
    "$(json_list "${PORT_RANGES[@]}")" "$(json_list "${NAT_PUBLIC[@]}")"
)
DRIVER_OK=1
# In the background with `wait`, so that a signal to this script is handled at once.
ip netns exec "$NS_GW" "$PY" -u "$WORK/driver.py" "$DRIVER_CFG" 2>"$WORK/driver.log" &
DRIVER_PID=$!
PIDS+=("$DRIVER_PID")
wait "$DRIVER_PID" || DRIVER_OK=0
if [ "$DRIVER_OK" = 0 ]; then
  sed 's/^/  /' "$WORK/driver.log" >&2
fi

# Wait for the loadgen's report (settle and drain follow the measured phase).
LG_RC=0
for _ in $(seq $((10 * (DURATION + 90)))); do
  kill -0 "$LG_PID" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$LG_PID" 2>/dev/null; then
  die "the loadgen did not finish (see $WORK/loadgen.log)"
fi
wait "$LG_PID" || LG_RC=$?
kill -0 "$GW_PID" 2>/dev/null || die "the gateway died during the run (see $WORK/gateway.log)"
if [ ! -s "$WORK/loadgen.json" ]; then
  tail -n 20 "$WORK/loadgen.log" >&2 || true
  die "the loadgen (exit $LG_RC) wrote no JSON report"
fi

# --- verdict and summary ------------------------------------------------------------------
VERDICT=0
"$PY" - "$WORK/loadgen.json" "$WORK/events.jsonl" "$CLIENTS" "$EVENTS" "$LG_RC" "$DRIVER_OK" <<'EOF' || VERDICT=1
import json, math, sys
lg_path, ev_path, clients, events, lg_rc, driver_ok = sys.argv[1:]
clients, events, lg_rc, driver_ok = int(clients), int(events), int(lg_rc), driver_ok == "1"
rep = json.load(open(lg_path))
evs = []
for line in open(ev_path):
    line = line.strip()
    if line:
        evs.append(json.loads(line))
errs = [e["error"] for e in evs if "error" in e]
evs = [e for e in evs if "error" not in e]

def ms(v):
    return "-" if v is None else ("%.1f ms" % v if v < 1000 else "%.2f s" % (v / 1000))

print()
print("NAT rebind events (recovery: old conntrack entries deleted -> gateway accepted the client's REBIND)")
print("%3s  %-4s  %6s  %-24s  %6s  %10s  %9s  %9s  %9s" %
      ("#", "type", "at", "new SNAT", "ct del", "recovered", "p50", "p99", "max"))
for e in evs:
    print("%3d  %-4s  %5.1fs  %-24s  %6d  %4d/%-5d  %9s  %9s  %9s" %
          (e["event"], e["type"], e["at_s"], e["snat"], e["deleted"], e["recovered"],
           e["clients"], ms(e["p50_ms"]), ms(e["p99_ms"]), ms(e["max_ms"])))
# Anything but one unknown tuple and one UNRECOGNIZED per client over an event is worth a look
# (cookie requests show up as rejects with reason "epoch", retried REBINDs as duplicates).
clean = {"rebindgw_unknown_tuple_total": clients, "rebindgw_unrecognized_sent_total": clients}
for e in evs:
    if e.get("gateway_counters") not in (None, clean):
        print("  note: event %d gateway counters during recovery: %s" %
              (e["event"], json.dumps(e["gateway_counters"])))
# All events together: each counter step is a batch of clients recovered at that time.
samples = []
for e in evs:
    prev = 0
    for t, c in e["firsts"]:
        c = min(c, clients)
        samples += [t * 1000] * (c - prev)
        prev = c
samples.sort()
def q(p):
    if not samples:
        return None
    return samples[max(0, math.ceil(p * len(samples)) - 1)]
print()
for kind in ("port", "addr"):
    k = [e for e in evs if e["type"] == kind]
    if k:
        print("%-4s events: %3d, clients recovered %d/%d" %
              (kind, len(k), sum(e["recovered"] for e in k), clients * len(k)))
print("all  events: %3d, clients recovered %d/%d, recovery p50 %s p99 %s max %s" %
      (len(evs), len(samples), clients * len(evs), ms(q(0.5)), ms(q(0.99)),
       ms(samples[-1] if samples else None)))

c, r, t = rep["clients"], rep["rebinds"], rep["traffic"]
lr = r["recovery"]
print("loadgen: passed=%s, connected %d/%d, failed after connect %d; rebinds completed by "
      "clients %d (extra=%d, of its own moves ok=%d failed=%d unrecovered=%d), abandoned %d" %
      (rep["passed"], c["connected"], c["requested"], c["failed_after_connect"],
       r["extra"] + r["succeeded"], r["extra"], r["succeeded"], r["failed"], r["unrecovered"],
       r["abandoned"]))
print("loadgen: recovery percentiles (it times only its own moves): n=%d p50 %s p99 %s max %s" %
      (lr["count"], ms(lr["p50_ms"] if lr["count"] else None),
       ms(lr["p99_ms"] if lr["count"] else None), ms(lr["max_ms"] if lr["count"] else None)))
print("loadgen: sent %d, received %d, loss %.3f%%, rtt p50 %s p99 %s, tx %.0f pps" %
      (t["sent"], t["received"], t["loss_pct"], ms(t["rtt"]["p50_ms"]), ms(t["rtt"]["p99_ms"]),
       t["tx_pps"]))

fail = list(errs)
if not driver_ok and not errs:
    fail.append("the event driver failed (see driver.log)")
if len(evs) < events:
    fail.append("only %d of %d rebind events ran" % (len(evs), events))
for e in evs:
    if e["recovered"] >= clients and e.get("unknown_tuples_stop_ms") is None:
        fail.append("event %d (%s): DATA from unknown tuples never stopped (a client did not "
                    "rebind)" % (e["event"], e["type"]))
    if e["recovered"] < clients:
        fail.append("event %d (%s): only %d of %d clients rebound" %
                    (e["event"], e["type"], e["recovered"], clients))
if not rep["passed"]:
    fail += ["loadgen: " + f for f in rep["failures"]] or ["loadgen: not passed"]
if c["connected"] != clients:
    fail.append("loadgen: %d of %d clients connected" % (c["connected"], clients))
if c["failed_after_connect"] or r["failed"] or r["unrecovered"]:
    fail.append("loadgen: %d clients failed after connecting, %d failed and %d unrecovered "
                "rebinds" % (c["failed_after_connect"], r["failed"], r["unrecovered"]))
if lg_rc != 0 and rep["passed"]:
    fail.append("loadgen exited %d" % lg_rc)
if fail:
    print()
    for f in fail:
        print("nat-test: FAIL: " + f, file=sys.stderr)
    sys.exit(1)
EOF

if [ "$VERDICT" != 0 ]; then
  echo "nat-test: FAIL (logs: $WORK/{gateway,host,loadgen,driver}.log)" >&2
  exit 1
fi
STATUS=0
echo "nat-test: PASS: $EVENTS NAT rebind events, every connection of $CLIENTS clients survived every one"
