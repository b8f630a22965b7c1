#!/usr/bin/env bash
# Rebind storm benchmark: N clients connected, then all of them change tuple at once.
#
#   scripts/storm.sh [--clients 65536] [--out DIR] [--on-move send|notify|none]
#                    [--rate PPS] [--connect-rate N] [--storm-at SECS] [--no-perf]
#                    [--no-prebind]
#
# Builds release, starts `rebindgw host` and `rebindgw gateway` as separate processes on
# loopback (temporary state, generated link key, rate limits raised for a storm from 127/8),
# runs the multi-process load generator (`--processes` auto: RLIMIT_NOFILE caps one process at
# ~20k sockets), which connects every client first, then moves all of them at once at
# --storm-at into the measured phase and measures each one's recovery. With --storm-prebind
# (default here) the moved-to sockets are bound before the storm and the old ones closed
# after it, so the generator's storm is a descriptor swap plus one DATA per client (two
# descriptors per client: more processes). A system-wide
# `perf record -e cpu-clock -g` covers the storm; the gateway's top symbols, CPU per thread,
# and the whole-system top symbols are saved next to the reports.
#
# Outputs in DIR: report.txt (human), report.json, loadgen.log (progress), gateway.log,
# host.log, stats-before.txt/stats-after.txt, perf.data, perf-*.txt, summary.txt.
set -euo pipefail

CLIENTS=65536
OUT=""
ON_MOVE=send
RATE=2000
CONNECT_RATE=2000
STORM_AT=5
PERF=1
PREBIND=--storm-prebind
while [[ $# -gt 0 ]]; do
    case "$1" in
        --clients) CLIENTS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --on-move) ON_MOVE="$2"; shift 2 ;;
        --rate) RATE="$2"; shift 2 ;;
        --connect-rate) CONNECT_RATE="$2"; shift 2 ;;
        --storm-at) STORM_AT="$2"; shift 2 ;;
        --no-perf) PERF=0; shift ;;
        --no-prebind) PREBIND=""; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/target/storm-$CLIENTS-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
T="$(mktemp -d /tmp/rebindgw-storm.XXXXXX)"
chmod 700 "$T"

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$T"
}
trap cleanup EXIT

echo "== $(date -Is) storm: $CLIENTS clients, on-move $ON_MOVE, out $OUT" | tee "$OUT/summary.txt"
echo "== load: $(uptime)" | tee -a "$OUT/summary.txt"

(cd "$ROOT" && cargo build --release --bin rebindgw 2>&1 | tail -n 2)
# A private copy: others may rebuild target/release while this runs.
BIN="$T/rebindgw"
cp "$ROOT/target/release/rebindgw" "$BIN"

if [[ $PERF -eq 1 ]] && ! command -v perf >/dev/null; then
    echo "perf missing; installing linux-perf" >&2
    apt-get install -y linux-perf >/dev/null 2>&1 || { echo "no perf; continuing without" >&2; PERF=0; }
fi

# Free loopback ports (ask the kernel for ephemeral ones).
port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GW_PORT=$(port); HOST_PORT=$(port); ADMIN_PORT=$(tport)

"$BIN" link-keygen --out "$T/link.key" >/dev/null
"$BIN" enroll --clients "$T/clients.toml" --name storm-seed >/dev/null

"$BIN" host --listen "127.0.0.1:$HOST_PORT" --clients "$T/clients.toml" \
    --link-key "$T/link.key" >"$OUT/host.log" 2>&1 &
PIDS+=($!)

# S=17: 65,536 clients plus the children's probe connections exceed 2^16. Rate limits:
# the loadgen puts 254 clients in each /24 of 127.1/16 upwards; a storm moves all of them at
# once to fresh /24s, so every /24 sees a burst of 254 UNRECOGNIZED (and, while connecting,
# 254 handshakes within ~0.1 s), and the gateway as a whole N of each.
"$BIN" gateway --listen "127.0.0.1:$GW_PORT" --host "127.0.0.1:$HOST_PORT=$T/link.key" \
    --admin "127.0.0.1:$ADMIN_PORT" --state-dir "$T/state" --slots 17 \
    --unrecognized-per-prefix 20000/20000 --unrecognized-global 2000000/1000000 \
    --handshake-per-prefix 20000/20000 --handshake-global 200000/200000 \
    >"$OUT/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=($GW_PID)

for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$ADMIN_PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
"$BIN" stats --admin "127.0.0.1:$ADMIN_PORT" >"$OUT/stats-before.txt" 2>&1 || true

DURATION=$((STORM_AT + 5))
"$BIN" loadgen --gateway "127.0.0.1:$GW_PORT" --clients-file "$T/clients.toml" \
    --clients "$CLIENTS" --rate "$RATE" --connect-rate "$CONNECT_RATE" \
    --connect-timeout 180s --enroll-wait 30s --duration "${DURATION}s" \
    --storm-at "${STORM_AT}s" --on-move "$ON_MOVE" --settle 20s $PREBIND \
    --report-json "$OUT/report.json" >"$OUT/report.txt" 2>"$OUT/loadgen.log" &
LG_PID=$!
PIDS+=($LG_PID)

if [[ $PERF -eq 1 ]]; then
    # The first "run" progress line appears 1 s into the measured phase; record from ~1 s
    # before the storm to ~4 s after it, system-wide (gateway, host, loadgen and kernel share
    # the two cores).
    until grep -q '^ *run ' "$OUT/loadgen.log" 2>/dev/null; do
        kill -0 $LG_PID 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 $LG_PID 2>/dev/null; then
        sleep $((STORM_AT > 2 ? STORM_AT - 2 : 0))
        echo "== perf from $(date -Is) for 5 s; load: $(uptime)" | tee -a "$OUT/summary.txt"
        perf record -e cpu-clock -g -a -o "$OUT/perf.data" -- sleep 5 >"$OUT/perf-record.log" 2>&1 || true
    fi
fi

set +e
wait $LG_PID
LG_RC=$?
set -e
"$BIN" stats --admin "127.0.0.1:$ADMIN_PORT" >"$OUT/stats-after.txt" 2>&1 || true
curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" >"$OUT/metrics-after.txt" 2>/dev/null || true

if [[ $PERF -eq 1 && -f "$OUT/perf.data" ]]; then
    # CPU by thread (comm) and process; then the gateway's and everyone's top symbols.
    perf report -i "$OUT/perf.data" --no-children --sort comm --stdio -g none 2>/dev/null \
        | grep -v '^$' | head -n 40 >"$OUT/perf-threads.txt" || true
    perf report -i "$OUT/perf.data" --no-children --pid "$GW_PID" --percentage relative --sort sym --stdio -g none 2>/dev/null \
        | grep -v '^$' | head -n 60 >"$OUT/perf-gateway-top.txt" || true
    perf report -i "$OUT/perf.data" --children --pid "$GW_PID" --percentage relative --sort sym --stdio -g none --percent-limit 2 2>/dev/null \
        | head -n 200 >"$OUT/perf-gateway-inclusive.txt" || true
    perf report -i "$OUT/perf.data" --no-children --sort comm,dso,sym --stdio -g none 2>/dev/null \
        | grep -v '^$' | head -n 60 >"$OUT/perf-all-top.txt" || true
fi

{
    echo "== loadgen exit $LG_RC; load after: $(uptime)"
    cat "$OUT/report.txt"
    echo "== gateway stats after"
    cat "$OUT/stats-after.txt"
    if [[ -f "$OUT/perf-threads.txt" ]]; then
        echo "== perf: CPU by thread during the storm window"
        sed -n '1,30p' "$OUT/perf-threads.txt"
        echo "== perf: gateway top symbols"
        sed -n '1,40p' "$OUT/perf-gateway-top.txt"
    fi
} | tee -a "$OUT/summary.txt"
exit $LG_RC
