#!/usr/bin/env bash
# Flood test: garbage, forged and replayed REBINDs, DATA and HANDSHAKE floods against a
# gateway while legitimate clients keep running.
#
#   scripts/flood-test.sh [--short] [options]        (root; needs ip, nft, hping3, python3)
#
# Layout (every namespace is created here and removed on exit):
#
#   netns flood-atk-PID                       netns flood-gw-PID
#   hping3 --rand-source x4  ──veth──────►  10.77.0.1:7400  rebindgw gateway (2 workers)
#   (garbage, REBIND-, DATA-,                                 rebindgw host (127.0.0.1:7500)
#    HANDSHAKE-shaped; --flood)            loopback: legit loadgen (127.1.x.y clients)
#   raw-socket valid-credential                        attack loadgen (--attack all,
#    HANDSHAKE flood (phase 3)                         127.200.x.y tuples)
#
# The gateway namespace routes everything (default route) back over the veth, so replies to
# spoofed sources leave towards the attacker namespace, where they are dropped; nftables
# counters in the gateway namespace count request and reply bytes on the veth.
#
# Phases, with one legit loadgen run spanning all of them:
#   1. baseline (legit only) -> throughput A
#   2. flood at the highest rate: 4 hping3 --flood + loadgen --attack all at --attack-rate
#      -> throughput B; then recovery
#   (full) 2b. a moderate flood (hping3 -i uN, loadgen attacks at a lower rate); recovery
#   3. (unless --no-insider) HANDSHAKE flood with one enrolled client's real credentials from
#      spoofed sources; then a fresh loadgen checks that new clients can still connect.
#
# Exit status: 0 pass; 1 a forged packet was accepted, a reply/request byte ratio > 1 (phase 3
# included: under protocol 1.1 a HANDSHAKE_REPLY is never larger than its 640-byte HANDSHAKE),
# a handshake flood registered connections (unknown client ids), or the gateway died; 2 setup.
# B/A below 0.9 and the other phase-3 findings are reported (WARN), not failed: on this 2-core
# box the flood generators compete with the gateway for the same CPUs.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
TOOL="$HERE/lib/flood-tool.py"

SHORT=0
BIN="${REBINDGW_BIN:-$ROOT/target/release/rebindgw}"
CLIENTS=1024
RATE=10000          # legit open-loop DATA/s
WINDOW=""           # closed loop instead (outstanding per client)
PAYLOAD=64
CHURN=20            # legit NAT moves/s, so legit rebinds happen under the flood too
ATTACK_RATE=20000   # loadgen attack datagrams/s per mode (5 modes)
ATTACK_TUPLES=64
HPING_INTERVAL=flood   # "flood" or an hping3 interval like u10
MOD_INTERVAL=u200
MOD_ATTACK_RATE=2000
WORKERS=2
INSIDER=1
INSIDER_RATE=30000
KEEP=0
GW_NICE=0           # e.g. -10: gateway and host ahead of the generators for the CPU
OUT=""
CYCLES=3 BASE=30 FLOOD=30 REC=10 MOD=0 INSIDER_SECS=10

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; cat <<EOF
Options:
  --short               CI size (~30 s of phases; no moderate phase)
  --cycles N (${CYCLES})  baseline/flood/recovery cycles (B/A is the median over cycles)
  --base S --flood S --recovery S --moderate S (0 = skip)   phase lengths
  --clients N (${CLIENTS})   --rate PPS (${RATE}) | --window N   --payload B (${PAYLOAD})   --churn N/s (${CHURN})
  --attack-rate PPS (${ATTACK_RATE}, per loadgen mode)   --hping-interval flood|uN (${HPING_INTERVAL})
  --workers N (${WORKERS})   --no-insider   --insider-rate PPS (${INSIDER_RATE})   --insider-secs S
  --bin PATH            rebindgw binary (copied first, so a concurrent rebuild can't swap it)
  --out FILE            also write the report there
  --keep                keep the work directory
  --gw-nice N           run gateway and host at this nice level (default 0, as the generators)
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --short) SHORT=1; CYCLES=1 BASE=10 FLOOD=12 REC=5 MOD=0 INSIDER_SECS=4; CLIENTS=512 ;;
    --cycles) CYCLES=$2; shift ;;
    --base) BASE=$2; shift ;;
    --flood) FLOOD=$2; shift ;;
    --recovery) REC=$2; shift ;;
    --moderate) MOD=$2; shift ;;
    --clients) CLIENTS=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --window) WINDOW=$2; shift ;;
    --payload) PAYLOAD=$2; shift ;;
    --churn) CHURN=$2; shift ;;
    --attack-rate) ATTACK_RATE=$2; shift ;;
    --hping-interval) HPING_INTERVAL=$2; shift ;;
    --workers) WORKERS=$2; shift ;;
    --no-insider) INSIDER=0 ;;
    --insider-rate) INSIDER_RATE=$2; shift ;;
    --insider-secs) INSIDER_SECS=$2; shift ;;
    --bin) BIN=$2; shift ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    --gw-nice) GW_NICE=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

[ "$(id -u)" = 0 ] || { echo "flood-test: needs root (network namespaces)" >&2; exit 2; }
for c in ip nft python3; do
  command -v "$c" >/dev/null || { echo "flood-test: needs $c" >&2; exit 2; }
done
if ! command -v hping3 >/dev/null; then
  echo "flood-test: installing hping3" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hping3 >/dev/null 2>&1 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hping3 >/dev/null; } ||
    { echo "flood-test: hping3 missing and apt-get failed" >&2; exit 2; }
fi
if [ "$INSIDER" = 1 ] && ! python3 -c 'import cryptography' 2>/dev/null; then
  echo "flood-test: python3 'cryptography' missing; skipping the valid-credential handshake flood" >&2
  INSIDER=0
fi
[ -x "$BIN" ] || { echo "flood-test: no binary at $BIN (cargo build --release)" >&2; exit 2; }

WORK="$(mktemp -d /tmp/flood-test.XXXXXX)"
chmod 700 "$WORK"
cp "$BIN" "$WORK/rebindgw"
GW="$WORK/rebindgw"
mkdir -p "$WORK/pids" "$WORK/pids.all" "$WORK/payloads"
NSG="flood-gw-$$"
NSA="flood-atk-$$"
VG="flg$$"
VA="fla$$"
GW_IP=10.77.0.1
ATK_IP=10.77.0.2
ADMIN=127.0.0.1:7480
EVENTS="$WORK/events"
: >"$EVENTS"
ev() { echo "$(date +%s.%N) $1" >>"$EVENTS"; }
log() { echo "[flood-test $(date +%T)] $*" >&2; }
ING() { ip netns exec "$NSG" "$@"; }
INA() { ip netns exec "$NSA" "$@"; }

BG_PIDS=()
cleanup() {
  local rc=$?
  set +e
  local all=("${BG_PIDS[@]}")
  for f in "$WORK"/pids/*; do [ -f "$f" ] && all+=($(cat "$f")); done
  for p in "${all[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.3
  for p in "${all[@]}"; do kill -9 "$p" 2>/dev/null; done
  ip netns del "$NSG" 2>/dev/null
  ip netns del "$NSA" 2>/dev/null
  if [ "$KEEP" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bg() { # bg NAME CMD... : start in background, remember the pid
  local name=$1; shift
  "$@" &
  local p=$!
  BG_PIDS+=("$p")
  echo "$p" >>"$WORK/pids/$name"
  echo "$p" >>"$WORK/pids.all/$name"
}
stop_pids() { # stop_pids NAME : SIGINT (hping3 prints its totals), then TERM
  local f="$WORK/pids/$1"
  [ -f "$f" ] || return 0
  for p in $(cat "$f"); do kill -INT "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in $(cat "$f"); do kill -TERM "$p" 2>/dev/null || true; done
  for p in $(cat "$f"); do wait "$p" 2>/dev/null || true; done
  rm -f "$f"
}

# ---- namespaces ------------------------------------------------------------------------
log "namespaces $NSG / $NSA; work $WORK; load $(cut -d' ' -f1-3 /proc/loadavg)"
ip netns add "$NSG"
ip netns add "$NSA"
ip link add "$VG" type veth peer name "$VA"
ip link set "$VG" netns "$NSG"
ip link set "$VA" netns "$NSA"
ING ip link set lo up
INA ip link set lo up
ING ip addr add "$GW_IP/30" dev "$VG"
INA ip addr add "$ATK_IP/30" dev "$VA"
ING ip link set "$VG" up
INA ip link set "$VA" up
# Replies to spoofed sources go back over the veth (and die in the attacker namespace,
# which does not forward).
ING ip route add default via "$ATK_IP"
ING sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 "net.ipv4.conf.$VG.rp_filter=0"
INA sysctl -qw net.ipv4.ip_forward=0
# Counters only (no conntrack: a random-source flood would fill its table).
ING nft -f - <<EOF
table inet flood {
  counter pre_veth {}
  counter req_all {}
  counter req_rebind {}
  counter req_data {}
  counter req_handshake {}
  counter rep_all {}
  counter rep_unrecognized {}
  counter out_veth {}
  counter rep_accept {}
  chain pre { type filter hook prerouting priority -300; policy accept;
    iifname "$VG" counter name pre_veth
  }
  chain in { type filter hook input priority 0; policy accept;
    iifname "$VG" udp dport 7400 counter name req_all
    iifname "$VG" udp dport 7400 @th,64,8 0x52 counter name req_rebind
    iifname "$VG" udp dport 7400 @th,64,8 0x44 counter name req_data
    iifname "$VG" udp dport 7400 @th,64,8 0x48 counter name req_handshake
  }
  chain out { type filter hook output priority 0; policy accept;
    oifname "$VG" counter name out_veth
    oifname "$VG" udp sport 7400 counter name rep_all
    oifname "$VG" udp sport 7400 @th,64,8 0x55 counter name rep_unrecognized
    oifname "$VG" udp sport 7400 @th,64,8 { 0x72, 0x44, 0x68 } counter name rep_accept
  }
}
EOF

# ---- gateway and host ------------------------------------------------------------------
"$GW" link-keygen --out "$WORK/host.key" >/dev/null
: >"$WORK/clients.toml"
chmod 600 "$WORK/clients.toml"
bg host ip netns exec "$NSG" env RUST_LOG=info nice -n "$GW_NICE" "$GW" host --listen 127.0.0.1:7500 \
  --clients "$WORK/clients.toml" --link-key "$WORK/host.key" >"$WORK/host.log" 2>&1
bg gateway ip netns exec "$NSG" env RUST_LOG=info nice -n "$GW_NICE" "$GW" gateway --listen 0.0.0.0:7400 \
  --host "127.0.0.1:7500=$WORK/host.key" --admin "$ADMIN" --state-dir "$WORK/state" \
  --workers "$WORKERS" >"$WORK/gateway.log" 2>&1
GW_PID=$(cat "$WORK/pids/gateway")
for _ in $(seq 100); do
  ING python3 -c "import urllib.request as u; u.urlopen('http://$ADMIN/healthz', timeout=1)" 2>/dev/null && break
  sleep 0.1
done
kill -0 "$GW_PID" 2>/dev/null || { cat "$WORK/gateway.log" >&2; exit 2; }
metric() { # metric NAME_WITH_LABELS
  ING python3 - "$1" <<'EOF'
import sys, urllib.request
t = urllib.request.urlopen("http://127.0.0.1:7480/metrics", timeout=3).read().decode()
for l in t.splitlines():
    if l.startswith(sys.argv[1] + " "):
        print(int(float(l.split()[-1]))); break
else:
    print(0)
EOF
}
EPOCH=$(metric rebindgw_epoch)
IO=$(ING python3 -c "
import urllib.request as u,re
t=u.urlopen('http://$ADMIN/metrics').read().decode()
m=re.search(r'rebindgw_build_info\{[^}]*io_backend=\"([^\"]*)\",aes_backend=\"([^\"]*)\"',t); print(m.group(2)+'/'+m.group(1) if m else '?')")
log "gateway up (pid $GW_PID, epoch $EPOCH, engine/io $IO)"
python3 "$TOOL" payloads "$WORK/payloads" "$EPOCH" >"$WORK/payloads.txt"

bg sampler ip netns exec "$NSG" python3 "$TOOL" sample "$WORK/samples.jsonl" "$WORK/pids" "$ADMIN" "$VG" >/dev/null 2>&1
for _ in $(seq 100); do [ -s "$WORK/samples.jsonl" ] && break; sleep 0.1; done

rss() { # rss PID -> {"VmRSS": kB, "VmHWM": kB}
  awk '/^VmRSS|^VmHWM/ {gsub(":","",$1); printf "%s\"%s\": %s", (n++ ? ", " : ""), $1, $2} END {print ""}' "/proc/$1/status" 2>/dev/null | sed 's/^/{/; s/$/}/'
}
HOST_PID=$(cat "$WORK/pids/host")

# ---- phase plan ------------------------------------------------------------------------
WARM=3
TOTAL=$((WARM + CYCLES * (BASE + FLOOD + REC + 4)))
[ "$MOD" -gt 0 ] && TOTAL=$((TOTAL + MOD + REC))
if [ -n "$WINDOW" ]; then LOAD=(--window "$WINDOW"); LEGIT_LOAD="closed loop, window $WINDOW"
else LOAD=(--rate "$RATE"); LEGIT_LOAD="open loop, $RATE DATA/s"; fi

ev start
log "legit loadgen: $CLIENTS clients, $LEGIT_LOAD, churn $CHURN/s, ${TOTAL}s"
# Timestamp its once-a-second progress lines (client-side tx/rx rates per second).
(
  ip netns exec "$NSG" "$GW" loadgen --gateway 127.0.0.1:7400 --clients "$CLIENTS" "${LOAD[@]}" \
    --payload "$PAYLOAD" --churn-per-sec "$CHURN" --duration "$((TOTAL + 15))s" \
    --clients-file "$WORK/clients.toml" --name-prefix legit- --json \
    >"$WORK/legit.json" 2> >(while IFS= read -r l; do echo "$(date +%s.%N) $l"; done >"$WORK/legit.progress")
) &
LEGIT=$!
BG_PIDS+=("$LEGIT")
# Wait for the measured phase (its first "run" line), then let it warm up.
for _ in $(seq 600); do
  grep -q ' run t=' "$WORK/legit.progress" 2>/dev/null && break
  kill -0 "$LEGIT" 2>/dev/null || { cat "$WORK/legit.progress" >&2; exit 2; }
  sleep 0.1
done
pgrep -n -f -- "name-prefix legit-" >"$WORK/pids/loadgen" 2>/dev/null || true
cp "$WORK/pids/loadgen" "$WORK/pids.all/loadgen" 2>/dev/null || true
sleep "$WARM"

start_floods() { # start_floods INTERVAL ATTACK_RATE SECS TAG
  local iv=$1 arate=$2 secs=$3 tag=$4 flag
  if [ "$iv" = flood ]; then flag=(--flood); else flag=(-i "$iv"); fi
  # Fresh payloads (the REBIND-shaped one carries t = now, so it reaches the cookie check
  # for the first W seconds; later it fails as stale, check 2: both draw UNRECOGNIZED).
  python3 "$TOOL" payloads "$WORK/payloads" "$EPOCH" >"$WORK/payloads.txt"
  for kind in garbage rebind data handshake; do
    local len
    len=$(awk -v k="$kind" '$1==k {print $2}' "$WORK/payloads.txt")
    bg hping ip netns exec "$NSA" hping3 --udp --rand-source -p 7400 -d "$len" \
      -E "$WORK/payloads/$kind.bin" "${flag[@]}" "$GW_IP" \
      >"$WORK/hping-$tag-$kind.log" 2>&1
  done
  bg attackgen ip netns exec "$NSG" "$GW" loadgen --gateway 127.0.0.1:7400 --clients 2 --rate 20 \
    --duration "$((secs > 6 ? secs - 3 : secs))s" --attack all --attack-rate "$arate" --attack-tuples "$ATTACK_TUPLES" \
    --clients-file "$WORK/clients.toml" --name-prefix "atk-$tag-" --settle 1s --json -q \
    >"$WORK/attack-$tag.json" 2>"$WORK/attack-$tag.log"
}

wait_attackgen() {
  local p
  p=$(tail -1 "$WORK/pids/attackgen" 2>/dev/null) || return 0
  wait "$p" 2>/dev/null || true
  rm -f "$WORK/pids/attackgen"
}

# Each cycle: baseline (A), flood at the highest rate (B), recovery. Several cycles and the
# median of B/A per cycle, because other work on the machine drifts over minutes.
for c in $(seq "$CYCLES"); do
  ev "base_start:$c"
  log "cycle $c/$CYCLES: baseline ${BASE}s"
  sleep "$BASE"
  [ "$c" = 1 ] && { RSS_GW_BEFORE=$(rss "$GW_PID"); RSS_HOST_BEFORE=$(rss "$HOST_PID"); }
  ev "flood_start:$c"
  log "cycle $c/$CYCLES: flood at the highest rate: hping3 x4 ($HPING_INTERVAL), loadgen --attack all at $ATTACK_RATE/s/mode, ${FLOOD}s"
  start_floods "$HPING_INTERVAL" "$ATTACK_RATE" "$FLOOD" "max$c"
  sleep "$FLOOD"
  ev "hping_stop:$c"
  stop_pids hping
  # The attack loadgen enrolls (host reload), attacks and reports; wait for it.
  wait_attackgen
  ev "flood_stop:$c"
  log "cycle $c/$CYCLES: floods stopped; recovery ${REC}s"
  sleep "$REC"
done
RSS_GW_AFTER=$(rss "$GW_PID"); RSS_HOST_AFTER=$(rss "$HOST_PID")

if [ "$MOD" -gt 0 ]; then
  ev mod_start
  log "moderate flood: hping3 x4 -i $MOD_INTERVAL, loadgen attacks $MOD_ATTACK_RATE/s/mode, ${MOD}s"
  start_floods "$MOD_INTERVAL" "$MOD_ATTACK_RATE" "$MOD" mod
  sleep "$MOD"
  ev mod_hping_stop
  stop_pids hping
  wait_attackgen
  ev mod_stop
  sleep "$REC"
  RSS_GW_AFTER=$(rss "$GW_PID"); RSS_HOST_AFTER=$(rss "$HOST_PID")
fi
ev legit_end
log "waiting for the legit loadgen's report"
wait "$LEGIT" || log "legit loadgen exited non-zero (see its report)"
rm -f "$WORK/pids/loadgen"

# ---- phase 3: valid-credential HANDSHAKE flood from spoofed sources --------------------
INSIDER_JSON=null
if [ "$INSIDER" = 1 ]; then
  "$GW" enroll --clients "$WORK/clients.toml" --name mallory >"$WORK/mallory.json"
  sleep 2  # the host picks up the clients file about once a second
  c0=$(metric rebindgw_connections); r0=$(metric 'rebindgw_registrations_total{result="ok"}')
  f0=$(metric 'rebindgw_registrations_total{result="full"}')
  cmax=$(metric rebindgw_connections_max)
  hrss0=$(rss "$HOST_PID"); grss0=$(rss "$GW_PID")
  ev insider_start
  log "valid-credential HANDSHAKE flood from spoofed sources: ${INSIDER_RATE}/s for ${INSIDER_SECS}s"
  INA python3 "$TOOL" handshake-flood "$WORK/mallory.json" "$GW_IP" 7400 "$INSIDER_RATE" "$INSIDER_SECS" \
    >"$WORK/insider.out" 2>&1 || true
  sleep 3
  ev insider_stop
  c1=$(metric rebindgw_connections); r1=$(metric 'rebindgw_registrations_total{result="ok"}')
  f1=$(metric 'rebindgw_registrations_total{result="full"}')
  hrss1=$(rss "$HOST_PID"); grss1=$(rss "$GW_PID")
  log "fresh legit clients after it: 32 clients, 3 s"
  ip netns exec "$NSG" "$GW" loadgen --gateway 127.0.0.1:7400 --clients 32 --rate 500 --duration 3s \
    --clients-file "$WORK/clients.toml" --name-prefix fresh- --connect-timeout 8s --settle 1s --json -q \
    >"$WORK/fresh.json" 2>"$WORK/fresh.log" || true
  INSIDER_JSON=$(python3 - "$WORK" "$c0" "$c1" "$r0" "$r1" "$f0" "$f1" "$cmax" "$hrss0" "$hrss1" "$grss0" "$grss1" <<'EOF'
import json, sys
w, c0, c1, r0, r1, f0, f1, cmax = sys.argv[1], *map(int, sys.argv[2:9])
hr0, hr1, gr0, gr1 = (json.loads(x or "{}") for x in sys.argv[9:13])
try:
    sent = json.loads(open(w + "/insider.out").read().strip().splitlines()[-1])
except Exception as e:
    sent = {"error": str(e)}
try:
    fr = json.load(open(w + "/fresh.json"))
    fresh = fr["clients"]["connected"]
except Exception:
    fresh = 0
print(json.dumps({
    "handshakes sent (spoofed sources)": sent,
    "registrations ok during it": r1 - r0,
    "registrations refused (index space full)": f1 - f0,
    "connections before / after / max": f"{c0:,} / {c1:,} / {cmax:,}",
    "connections_added": c1 - c0,
    "index_space": cmax,
    "host RSS before / after (MiB)": f"{hr0.get('VmRSS', 0)/1024:.1f} / {hr1.get('VmRSS', 0)/1024:.1f}",
    "gateway RSS before / after (MiB)": f"{gr0.get('VmRSS', 0)/1024:.1f} / {gr1.get('VmRSS', 0)/1024:.1f}",
    "fresh_clients": 32,
    "fresh_clients_connected": fresh,
}))
EOF
)
fi

sleep 1.2
if kill -0 "$GW_PID" 2>/dev/null && ING python3 -c "import urllib.request as u; u.urlopen('http://$ADMIN/healthz', timeout=2)" 2>/dev/null; then
  ev gateway_alive
fi
ev end
sleep 1.1
ING "$GW" stats --admin "$ADMIN" >"$WORK/stats.txt" 2>&1 || true
stop_pids sampler
stop_pids gateway
stop_pids host

# ---- report ----------------------------------------------------------------------------
python3 - "$WORK" <<EOF
import json, sys, glob, os
w = sys.argv[1]
def j(p):
    try: return json.load(open(p))
    except Exception: return None
legit = j(w + "/legit.json") or {}
attacks, lines, accepted, worst = [], [], None, None
for f in sorted(glob.glob(w + "/attack-*.json")):
    r = j(f)
    if not r:
        continue
    tag = os.path.basename(f)[7:-5]
    accepted = (accepted or 0) + sum(a["accepted"] for a in r.get("attacks", []))
    v = r.get("victim") or {}
    accepted += v.get("unrecognized", 0)
    for a in r.get("attacks", []):
        worst = max(worst or 0.0, a["reply_ratio"])
        lines.append(f"[{tag}] {a['mode']:<16} sent {a['sent']:>9,} ({a['sent_bytes']:>12,} B) replies "
                     f"{a['replies']:>7,} ({a['reply_bytes']:>10,} B, ratio {a['reply_ratio']:.3f}) "
                     f"past-cookie {a['past_cookie']:>6,} captured {a['captured']:>5,} ACCEPTED {a['accepted']}")
    lines.append(f"[{tag}] victim probes {v.get('probes')} echoes {v.get('echoes')} UNRECOGNIZED-at-victim {v.get('unrecognized')}")
reb = legit.get("rebinds", {})
host_counters = {}
for l in open(w + "/host.log", errors="replace"):
    if l.startswith("{"):
        try: host_counters = json.loads(l)
        except Exception: pass
# Every loadgen connects its clients plus one probe (the victim) connection.
legit_connects = None
if legit:
    legit_connects = legit["clients"]["connected"] + 1
    for f in glob.glob(w + "/attack-*.json"):
        r = j(f)
        legit_connects += (r["clients"]["connected"] + 1) if r else 0
hping = {}
for f in sorted(glob.glob(w + "/hping-*.log")):
    t = open(f, errors="replace").read()
    s = [l for l in t.splitlines() if "packets transmitted" in l]
    hping[os.path.basename(f)[6:-4]] = s[-1].strip() if s else t.strip().splitlines()[-1:] 
cfg = {
    "mode": "short" if $SHORT else "full", "cpus": os.cpu_count(),
    "loadavg_start": "$(cut -d' ' -f1-3 /proc/loadavg)",
    "clients": $CLIENTS, "legit_load": "$LEGIT_LOAD", "payload": "$PAYLOAD", "churn": $CHURN,
    "cycles": $CYCLES, "workers": $WORKERS, "gw_nice": $GW_NICE, "io": "$IO", "mod_label": "hping3 -i $MOD_INTERVAL x4, loadgen $MOD_ATTACK_RATE/s/mode",
    "attack_accepted": accepted, "attack_worst_ratio": worst, "attack_lines": lines,
    "legit_rebinds": (reb.get("succeeded", 0) + reb.get("extra", 0)) if reb else None,
    "legit_moves": reb.get("moves"), "legit_traffic": legit.get("traffic", {}),
    "host_counters": host_counters,
    "legit_connects": legit_connects,
    "legit_report": {k: legit.get(k) for k in ("passed", "failures")},
    "rss_before": {"gateway": json.loads('$RSS_GW_BEFORE' or "{}"), "host": json.loads('$RSS_HOST_BEFORE' or "{}")},
    "rss_after": {"gateway": json.loads('$RSS_GW_AFTER' or "{}"), "host": json.loads('$RSS_HOST_AFTER' or "{}")},
    "hping": hping, "insider": json.loads('''$INSIDER_JSON'''),
}
json.dump(cfg, open(w + "/config.json", "w"), indent=1)
EOF
set +e
python3 "$TOOL" report "$WORK" | tee "$WORK/report.md"
rc=${PIPESTATUS[0]}
set -e
[ -n "$OUT" ] && cp "$WORK/report.md" "$OUT"
if [ "$rc" != 0 ] || [ "$KEEP" = 1 ]; then KEEP=1; fi
exit "$rc"
