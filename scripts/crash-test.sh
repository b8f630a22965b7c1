#!/usr/bin/env bash
# Crash-and-restart test: `kill -9` the gateway under load, restart it on the same state
# directory and ports, and check that every connection recovers and that a REBIND captured
# before the crash is refused when replayed after it.
#
#   scripts/crash-test.sh [--short] [--no-build] [--keep]
#
#   --short     1,000 clients instead of 10,000 (same timeline)
#   --no-build  use the existing target/release/rebindgw (or $REBINDGW_BIN)
#   --keep      keep the temporary directory (logs, report, metrics trace)
#
# Needs root (the REBIND capture and replay use AF_PACKET and raw IP sockets on lo) and
# python3 (stdlib only). Ports: $CT_GW_PORT (7400+10000), $CT_ADMIN_PORT, $CT_HOST_PORT.
#
# Timeline, in seconds of the loadgen's measured phase (churn $CHURN moves/s all along):
#   1-5   capture: sniff lo for REBINDs to the gateway and their REBIND_ACKs (scripts/lib/
#         crashtool.py capture); keep REBINDs the gateway acknowledged.
#   6     kill -9 the gateway; every client keeps its tuple, moves keep happening.
#   ~7.5  restart it (same state dir, master key, ports). Clients whose DATA went unanswered
#         for 1 s sent cookie requests; they rebind from the same tuple, the others' DATA is
#         forwarded at once because the registry restored their tuples.
#   11    storm: every client moves to a new tuple at once and must rebind.
#   ~18   replay: send the captured REBINDs again, each from its own source tuple (raw socket,
#         so it works whether or not a client still holds the tuple); pass if no REBIND_ACK
#         with that t comes back and rebindgw_rebinds_rejected_total{reason="replay"} rises by
#         at least the number replayed (its background over the second before is printed).
#   24    load stops; the loadgen settles until every outage ended (at most 30 s).
#
# Downtime = kill -9 -> /healthz answers again. Traffic gap = kill -9 -> the gateway's echo
# rate (client_tx DATA, polled every 50 ms) is back to 90% of its rate before the crash.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=10000
# Total DATA rate. 10,000 clients at 0.5 pps each keeps this 2-core VM (gateway, host and
# loadgen share it) out of overload; at 20,000 pps the echo RTT alone reaches seconds here.
RATE=${CT_RATE:-5000}
BUILD=1
KEEP=0
for a in "$@"; do
  case "$a" in
    --short) CLIENTS=1000 ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a" >&2; exit 2 ;;
  esac
done
CHURN=${CT_CHURN:-50}
GW_PORT=${CT_GW_PORT:-17400}
ADMIN_PORT=${CT_ADMIN_PORT:-17480}
HOST_PORT=${CT_HOST_PORT:-17500}
GW=127.0.0.1:$GW_PORT
ADMIN=127.0.0.1:$ADMIN_PORT
HOST=127.0.0.1:$HOST_PORT
CRASH_AT=6       # run-phase second of the kill -9
DOWN=1.5         # seconds the gateway stays down
STORM_AT=${CT_STORM_AT:-11}   # run-phase second of the storm
REPLAY_AT=${CT_REPLAY_AT:-18}
DURATION=${CT_DURATION:-24}
PY=scripts/lib/crashtool.py

[ "$(id -u)" = 0 ] || { echo "crash-test: needs root (AF_PACKET capture, raw-socket replay)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "crash-test: needs python3" >&2; exit 2; }
if [ $BUILD = 1 ]; then cargo build --release --quiet; fi
BIN=${REBINDGW_BIN:-target/release/rebindgw}
[ -x "$BIN" ] || { echo "crash-test: $BIN missing (cargo build --release)" >&2; exit 2; }
for p in $GW_PORT $ADMIN_PORT $HOST_PORT; do
  if ss -Hlnu | awk '{ print $4 }' | grep -q ":$p\$"; then echo "crash-test: port $p is in use" >&2; exit 2; fi
done

T=$(mktemp -d /tmp/rebindgw-crash.XXXXXX)
PIDS=()
cleanup() {
  local rc=$?
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ $KEEP = 1 ] || [ $rc != 0 ]; then echo "crash-test: logs kept in $T" >&2; else rm -rf "$T"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
log() { printf '[%6.2fs] %s\n' "$(echo "$(now) - $T0" | bc)" "$*"; }
metric() { curl -sf --max-time 2 "http://$ADMIN/metrics" | awk -v k="$1" '$1 == k { print $2 + 0; f = 1 } END { if (!f) print "NA" }'; }
wait_healthy() { # -> prints the time it first answered
  local deadline=$(( $(date +%s) + ${1:-20} ))
  until curl -sf --max-time 0.2 "http://$ADMIN/healthz" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt $deadline ] || return 1
    sleep 0.01
  done
  now
}
start_gateway() {
  "$BIN" gateway --listen "$GW" --host "$HOST=$T/host.key" --admin "$ADMIN" \
    --state-dir "$T/state" >>"$T/gateway.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
}
run_seconds() { # seconds since the loadgen's measured phase began
  echo "$(now) - $RUN0" | bc
}
wait_run() { # wait until the measured phase reaches second $1
  while [ "$(echo "$(run_seconds) < $1" | bc)" = 1 ]; do
    kill -0 "$LG_PID" 2>/dev/null || { echo "crash-test: loadgen exited early" >&2; tail -5 "$T/loadgen.err" >&2; exit 1; }
    sleep 0.02
  done
}

T0=$(now)
log "clients $CLIENTS, rate $RATE pps, churn $CHURN/s, state in $T"
"$BIN" link-keygen --out "$T/host.key" >/dev/null
install -m 600 /dev/null "$T/clients.toml"
"$BIN" host --listen "$HOST" --clients "$T/clients.toml" --link-key "$T/host.key" >"$T/host.log" 2>&1 &
PIDS+=("$!")
start_gateway
wait_healthy 20 >/dev/null || { echo "gateway did not start" >&2; cat "$T/gateway.log" >&2; exit 1; }
python3 "$PY" watch --admin "$ADMIN" --out "$T/metrics.trace" --interval 0.05 &
PIDS+=("$!")

"$BIN" loadgen --gateway "$GW" --clients-file "$T/clients.toml" --clients "$CLIENTS" \
  --rate "$RATE" --duration "${DURATION}s" --churn-per-sec "$CHURN" --storm-at "${STORM_AT}s" \
  --settle 30s --connect-rate "${CT_CONNECT_RATE:-2000}" --connect-timeout 60s --json >"$T/report.json" 2>"$T/loadgen.err" &
LG_PID=$!
PIDS+=("$LG_PID")

# The measured phase starts when every client is up: the first " run t=" progress line
# comes ~1 s later.
deadline=$(( $(date +%s) + 120 ))
until grep -q ' run t=' "$T/loadgen.err" 2>/dev/null; do
  kill -0 "$LG_PID" 2>/dev/null || { echo "loadgen exited while connecting" >&2; cat "$T/loadgen.err" >&2; exit 1; }
  [ "$(date +%s)" -lt $deadline ] || { echo "clients did not connect within 120 s" >&2; exit 1; }
  sleep 0.02
done
RUN0=$(echo "$(now) - 1" | bc)
log "all clients connected: $(grep -m1 ' run t=' "$T/loadgen.err" | sed 's/^ *//')"

python3 "$PY" capture --port "$GW_PORT" --seconds 4 --max 16 --out "$T/captured.jsonl" >"$T/capture.json" &
CAP_PID=$!
PIDS+=("$CAP_PID")

wait_run $CRASH_AT
wait "$CAP_PID" || { echo "crash-test: captured no acknowledged REBIND" >&2; cat "$T/capture.json" >&2; exit 1; }
log "captured: $(cat "$T/capture.json")"
CONN_BEFORE=$(metric rebindgw_connections)
T_KILL=$(now)
kill -9 "$GW_PID"
wait "$GW_PID" 2>/dev/null || true
log "kill -9 gateway (pid $GW_PID) with $CONN_BEFORE connections"
sleep "$DOWN"
T_START=$(now)
start_gateway
T_READY=$(wait_healthy 30) || { echo "gateway did not restart" >&2; tail -5 "$T/gateway.log" >&2; exit 1; }
CONN_RESTORED=$(metric rebindgw_connections)
RESTORED_LOG=$(grep 'gateway running' "$T/gateway.log" | tail -1 | grep -o 'restored=[0-9]*' || true)
log "restarted (pid $GW_PID): $RESTORED_LOG, rebindgw_connections $CONN_RESTORED"

wait_run $REPLAY_AT
log "replaying captured REBINDs from their own tuples"
REPLAY_OK=no
if python3 "$PY" replay --port "$GW_PORT" --in "$T/captured.jsonl" --admin "$ADMIN" \
  --count 4 --out "$T/replay.json" >/dev/null; then
  REPLAY_OK=yes
fi
log "replay: $(cat "$T/replay.json" 2>/dev/null || echo failed)"

log "waiting for the loadgen (settle up to 30 s)"
LG_RC=0
wait "$LG_PID" || LG_RC=$?
CONN_AFTER=$(metric rebindgw_connections)
"$BIN" stats --admin "$ADMIN" >"$T/stats.txt" 2>&1 || true
kill "$GW_PID" 2>/dev/null || true

python3 - "$T" "$T_KILL" "$T_START" "$T_READY" "$CONN_BEFORE" "$CONN_RESTORED" "$CONN_AFTER" \
  "$REPLAY_OK" "$LG_RC" "$CLIENTS" <<'EOF'
import json, sys
T, t_kill, t_start, t_ready = sys.argv[1], *map(float, sys.argv[2:5])
before, restored, after, replay_ok, lg_rc, clients = sys.argv[5:11]
rows = []
for line in open(f"{T}/metrics.trace"):
    f = line.split()
    rows.append((float(f[0]), int(f[1]), int(f[2])))  # time, ok, echoes sent to clients
pre = [r for r in rows if r[1] and t_kill - 2.0 <= r[0] < t_kill]
pre_rate = (pre[-1][2] - pre[0][2]) / (pre[-1][0] - pre[0][0]) if len(pre) > 1 else 0.0
post = [r for r in rows if r[1] and r[0] > t_start]
first_echo = next((r[0] for r in post if r[2] > 0), None)
full = None
for i, r in enumerate(post):  # rate over >= 250 ms windows
    j = next((j for j in range(i, -1, -1) if r[0] - post[j][0] >= 0.25), None)
    if j is not None and (r[2] - post[j][2]) / (r[0] - post[j][0]) >= 0.9 * pre_rate:
        full = r[0]
        break
rep = json.load(open(f"{T}/report.json"))
rb, c, tr = rep["rebinds"], rep["clients"], rep["traffic"]
try:
    replay = json.load(open(f"{T}/replay.json"))
except Exception:
    replay = {}
ms = lambda s: f"{s * 1000:.0f} ms" if s is not None else "never"
p = lambda d: (f"p50 {d['p50_ms']:.0f} ms, p99 {d['p99_ms']:.0f} ms, max {d['max_ms']:.0f} ms "
               f"(n={d['count']})")
fail = list(rep["failures"])
if lg_rc != "0":
    fail.append(f"loadgen exited {lg_rc}")
if c["connected"] != int(clients):
    fail.append(f"only {c['connected']} of {clients} clients connected")
if restored != before:
    fail.append(f"restored {restored} connections, had {before}")
if after == "NA" or int(float(after)) < c["connected"]:
    fail.append(f"connections at the end {after} < connected clients {c['connected']}")
if replay_ok != "yes":
    fail.append("replayed REBIND was not refused")
if full is None:
    fail.append("echo rate never came back to 90% of its pre-crash rate")
print()
print("== crash-test summary")
print(f"clients            {c['connected']}/{c['requested']} connected, {c['failed_to_connect']} failed "
      f"to connect, {c['failed_after_connect']} failed later")
print(f"connections        before kill {before}, restored {restored}, at end {after}")
print(f"downtime           {ms(t_ready - t_kill)} (kill -9 -> /healthz); restart -> serving "
      f"{ms(t_ready - t_start)}")
print(f"traffic gap        first echo after restart at +{ms(first_echo - t_kill) if first_echo else 'never'}, "
      f"echo rate back to 90% of {pre_rate / 1000:.1f}k/s at +{ms(full - t_kill) if full else 'never'} "
      f"(from kill -9)")
print(f"rebinds            {rb['moves']} moves ({rb['storms']} storm), {rb['outages']} outages: "
      f"{rb['succeeded']} recovered, {rb['failed']} failed, {rb['unrecovered']} unrecovered; "
      f"{rb['extra']} rebinds without a move (cookie requests after the crash)")
print(f"recovery           {p(rb['recovery'])}")
print(f"traffic-up         {p(rb['traffic_recovery'])}")
print(f"loss               {tr['loss_pct']:.2f}% total ({tr['expected_losses']} of {tr['sent']} DATA sent "
      f"during outages or in flight at a move), {tr['steady_loss_pct']:.2f}% steady-state, "
      f"misdelivered {tr['misdelivered']}")
print(f"replay refused     {replay_ok}: {replay.get('replayed', 0)} captured REBINDs replayed, "
      f"{replay.get('acks_for_replayed_t', '?')} REBIND_ACKs, replay rejects "
      f"+{replay.get('replay_rejects_delta', '?')} (background over the second before: "
      f"+{replay.get('replay_rejects_background_1s', '?')})")
print("result             " + ("PASS" if not fail else "FAIL"))
for f in fail:
    print(f"  - {f}")
sys.exit(1 if fail else 0)
EOF
