#!/usr/bin/env bash
# Key rotation under load: two rotations while clients churn through NAT moves, with
# in-band key delivery (tests/data/PROTOCOL-EXT.md "Key delivery"), kill -9 of the gateway
# during the first grace period and during the second rotation's key delivery, restarts on
# the same state, and a storm after the second grace: every client must keep its connection
# (rebinding under the new epochs with its delivered keys) with no new handshake.
#
#   scripts/rotate-test.sh [--short] [--no-build] [--keep]
#
#   --short     1,000 clients instead of 10,000 (same timeline)
#   --no-build  use the existing target/release/rebindgw (or $REBINDGW_BIN)
#   --keep      keep the temporary directory (logs, report)
#
# $RT_CLIENTS overrides the client count, $RT_SLOTS the gateway's S (16; 2^S must exceed
# the clients: the loadgen holds one more connection, its probe). No root needed. Ports: $RT_GW_PORT (17410), $RT_ADMIN_PORT (17490), $RT_HOST_PORT (17510).
#
# The loadgen's rotation mode drives both rotations (`--rotate-at 2,16 --admin --admin-key`)
# and times every client's installation of the delivered keys (client-side p50/p90/p99/max);
# the script follows its `rotation K at` lines on stderr for the kills.
#
# Timeline, in seconds of the loadgen's measured phase (churn $CHURN moves/s all along;
# W = 2 s, grace 12 s):
#   2    rotate 1 (epoch 1 -> 2): every connection registered in epoch 2, keys delivered
#        (the gateway's pending-keys gauge is also sampled: when every KEYS was acknowledged)
#   5    kill -9 the gateway during the first grace period; 1.5 s later restart it
#   14   grace 1 ends: epoch 1 wiped, connections move to their epoch-2 registrations
#   16   rotate 2 (epoch 2 -> 3); 0.3 s after its answer kill -9 during its key delivery; restart
#   30   grace 2 over: storm, every client moves at once and rebinds with its epoch-3 keys
#   36   load stops; the loadgen settles until every outage ended
# Pass: both rotations answered and every live client installed both rotations' keys (and the
# gateway saw every KEYS acknowledged); after each restart the epochs and
# registrations are intact; at the end epoch 3 holds every connection, every client is still
# connected, no rebind failed, and the gateway registered no new connection (handshake)
# after the connect phase.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=10000
RATE=${RT_RATE:-5000}
BUILD=1
KEEP=0
for a in "$@"; do
  case "$a" in
    --short) CLIENTS=1000 ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a" >&2; exit 2 ;;
  esac
done
CLIENTS=${RT_CLIENTS:-$CLIENTS}
SLOTS=${RT_SLOTS:-16}
CHURN=${RT_CHURN:-50}
GW_PORT=${RT_GW_PORT:-17410}
ADMIN_PORT=${RT_ADMIN_PORT:-17490}
HOST_PORT=${RT_HOST_PORT:-17510}
GW=127.0.0.1:$GW_PORT
ADMIN=127.0.0.1:$ADMIN_PORT
HOST=127.0.0.1:$HOST_PORT
# $RT_GRACE (default 12 s) stretches the timeline: rotate 2 comes 2 s after grace 1 ends,
# the storm 2 s after grace 2 ends (a larger registry needs longer to deliver every key).
GRACE=${RT_GRACE:-12}
ROTATE1_AT=2
CRASH1_AT=5
ROTATE2_AT=$((ROTATE1_AT + GRACE + 2))
DOWN=1.5
STORM_AT=$((ROTATE2_AT + GRACE + 2))
DURATION=$((STORM_AT + 6))
WINDOW=2

command -v python3 >/dev/null || { echo "rotate-test: needs python3" >&2; exit 2; }
command -v curl >/dev/null || { echo "rotate-test: needs curl" >&2; exit 2; }
if [ $BUILD = 1 ]; then cargo build --release --quiet; fi
BIN=${REBINDGW_BIN:-target/release/rebindgw}
[ -x "$BIN" ] || { echo "rotate-test: $BIN missing (cargo build --release)" >&2; exit 2; }
for p in $GW_PORT $ADMIN_PORT $HOST_PORT; do
  if ss -Hlnu | awk '{ print $4 }' | grep -q ":$p\$"; then echo "rotate-test: port $p is in use" >&2; exit 2; fi
done

T=$(mktemp -d /tmp/rebindgw-rotate.XXXXXX)
PIDS=()
cleanup() {
  local rc=$?
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ $KEEP = 1 ] || [ $rc != 0 ]; then echo "rotate-test: logs kept in $T" >&2; else rm -rf "$T"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
log() { printf '[%6.2fs] %s\n' "$(echo "$(now) - $T0" | bc)" "$*"; }
metric() { curl -sf --max-time 2 "http://$ADMIN/metrics" | awk -v k="$1" '$1 == k { print $2 + 0; f = 1 } END { if (!f) print "NA" }'; }
wait_healthy() {
  local deadline=$(( $(date +%s) + ${1:-20} ))
  until curl -sf --max-time 0.2 "http://$ADMIN/healthz" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt $deadline ] || return 1
    sleep 0.01
  done
}
start_gateway() {
  "$BIN" gateway --listen "$GW" --host "$HOST=$T/host.key" --admin "$ADMIN" \
    --state-dir "$T/state" --window-secs $WINDOW --grace-secs $GRACE --slots "$SLOTS" >>"$T/gateway.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
}
run_seconds() { echo "$(now) - $RUN0" | bc; }
# Samples the gateway's pending keys from $1 (a `now` stamp) for at most $2 s, and prints
# "p99_s all_s": when at most 1% of the $3 clients still waited for their keys, and when all
# did (NA: not within $2 s). $4 connections never acknowledge (the loadgen's probe is a
# bare socket), so they stay pending.
delivery() {
  local from=$1 limit=$2 clients=$3 extra=$4 p99=NA done=NA pend t
  local allowed=$(( clients / 100 + extra ))
  while :; do
    t=$(echo "$(now) - $from" | bc)
    pend=$(metric rebindgw_epoch_keys_pending) || pend=NA  # the gateway may be down
    if [ "$pend" != NA ]; then
      if [ "$p99" = NA ] && [ "$pend" -le "$allowed" ]; then p99=$t; fi
      if [ "$pend" -le "$extra" ]; then done=$t; break; fi
    fi
    [ "$(echo "$t > $limit" | bc)" = 1 ] && break
    sleep 0.02
  done
  echo "$p99 $done"
}
wait_run() {
  while [ "$(echo "$(run_seconds) < $1" | bc)" = 1 ]; do
    kill -0 "$LG_PID" 2>/dev/null || { echo "rotate-test: loadgen exited early" >&2; tail -5 "$T/loadgen.err" >&2; exit 1; }
    sleep 0.02
  done
}
# Waits (at most $2 s) for the loadgen's `rotation $1 at S s: answered in X ms: ANSWER` line
# and prints it.
wait_rotation() {
  local deadline line
  deadline=$(echo "$(now) + $2" | bc)
  until line=$(grep -m1 "^rotation $1 at " "$T/loadgen.err" 2>/dev/null); do
    kill -0 "$LG_PID" 2>/dev/null || { echo "rotate-test: loadgen exited early" >&2; tail -5 "$T/loadgen.err" >&2; exit 1; }
    [ "$(echo "$(now) < $deadline" | bc)" = 1 ] || { echo "rotate-test: no rotation $1 from the loadgen within $2 s" >&2; exit 1; }
    sleep 0.005
  done
  echo "$line"
}

T0=$(now)
log "clients $CLIENTS, rate $RATE pps, churn $CHURN/s, grace $GRACE s, state in $T"
"$BIN" link-keygen --out "$T/host.key" >/dev/null
install -m 600 /dev/null "$T/clients.toml"
"$BIN" host --listen "$HOST" --clients "$T/clients.toml" --link-key "$T/host.key" >"$T/host.log" 2>&1 &
PIDS+=("$!")
start_gateway
wait_healthy 20 || { echo "gateway did not start" >&2; cat "$T/gateway.log" >&2; exit 1; }

"$BIN" loadgen --gateway "$GW" --clients-file "$T/clients.toml" --clients "$CLIENTS" \
  --rate "$RATE" --duration "${DURATION}s" --churn-per-sec "$CHURN" --storm-at "${STORM_AT}s" \
  --settle 30s --connect-rate "${RT_CONNECT_RATE:-2000}" --connect-timeout "${RT_CONNECT_TIMEOUT:-60}s" \
  --rotate-at "$ROTATE1_AT,$ROTATE2_AT" --admin "$ADMIN" --admin-key "$T/state/admin.key" \
  --json >"$T/report.json" 2>"$T/loadgen.err" &
LG_PID=$!
PIDS+=("$LG_PID")

deadline=$(( $(date +%s) + ${RT_CONNECT_TIMEOUT:-60} + 60 ))
until grep -q ' run t=' "$T/loadgen.err" 2>/dev/null; do
  kill -0 "$LG_PID" 2>/dev/null || { echo "loadgen exited while connecting" >&2; cat "$T/loadgen.err" >&2; exit 1; }
  [ "$(date +%s)" -lt $deadline ] || { echo "clients did not connect within 120 s" >&2; exit 1; }
  sleep 0.02
done
RUN0=$(echo "$(now) - 1" | bc)
REG_CONNECTED=$(metric 'rebindgw_registrations_total{result="ok"}')
log "all clients connected ($REG_CONNECTED registrations)"

# The loadgen sends rotation 1 at $ROTATE1_AT s and prints its answer.
ROTATE1_LINE=$(wait_rotation 1 30)
R0=$(now)
log "loadgen: $ROTATE1_LINE"
# The loadgen holds one connection per client plus its probe(s); extra registrations of the
# connect phase are retried handshakes whose connections the host closes.
# One probe per loadgen process (a multi-process run prints "[N procs]" in its progress).
PROCS=$(grep -m1 -o '\[[0-9]* procs' "$T/loadgen.err" | tr -dc 0-9 || true)
PROBES=${RT_PROBES:-${PROCS:-1}}
LIVE=$(( CLIENTS + PROBES ))
# Sampled in the background: the timeline goes on (kill -9 included).
delivery "$R0" "$((GRACE - 2))" "$CLIENTS" "$PROBES" >"$T/delivery1" &
D1_PID=$!
PIDS+=("$D1_PID")
E2_REG=$(metric 'rebindgw_epoch_connections{epoch="2"}')

wait_run $CRASH1_AT
E1_BEFORE=$(metric 'rebindgw_epoch_connections{epoch="1"}')
REG_BEFORE_KILL1=$(metric 'rebindgw_registrations_total{result="ok"}')
kill -9 "$GW_PID"
wait "$GW_PID" 2>/dev/null || true
log "kill -9 gateway in grace 1: epoch 1 held $E1_BEFORE, epoch 2 $E2_REG registrations"
sleep "$DOWN"
start_gateway
wait_healthy 30 || { echo "gateway did not restart" >&2; tail -5 "$T/gateway.log" >&2; exit 1; }
EPOCH_AFTER1=$(metric rebindgw_epoch)
E1_RESTORED=$(metric 'rebindgw_epoch_connections{epoch="1"}')
E2_RESTORED=$(metric 'rebindgw_epoch_connections{epoch="2"}')
log "restarted: epoch $EPOCH_AFTER1, epoch 1 $E1_RESTORED, epoch 2 $E2_RESTORED connections"

wait_run "$(echo "$ROTATE2_AT - 0.2" | bc)"
E2_BEFORE2=$(metric 'rebindgw_epoch_connections{epoch="2"}')
E1_GONE=$(metric 'rebindgw_epoch_connections{epoch="1"}')
# The loadgen sends rotation 2 at $ROTATE2_AT s; the kill -9 comes 0.3 s after its answer.
ROTATE2_LINE=$(wait_rotation 2 30)
R0=$(now)
log "loadgen: $ROTATE2_LINE (epoch 2 held $E2_BEFORE2, epoch 1 $E1_GONE)"
delivery "$R0" "$GRACE" "$CLIENTS" "$PROBES" >"$T/delivery2" &
D2_PID=$!
PIDS+=("$D2_PID")
sleep 0.3
PENDING_AT_KILL=$(metric rebindgw_epoch_keys_pending)
# Registrations the gateway counted since its first restart are handshakes.
REG_AFTER1=$(metric 'rebindgw_registrations_total{result="ok"}')
kill -9 "$GW_PID"
wait "$GW_PID" 2>/dev/null || true
log "kill -9 gateway during key delivery: $PENDING_AT_KILL keys pending"
sleep "$DOWN"
start_gateway
wait_healthy 30 || { echo "gateway did not restart" >&2; tail -5 "$T/gateway.log" >&2; exit 1; }
EPOCH_AFTER2=$(metric rebindgw_epoch)
E3_RESTORED=$(metric 'rebindgw_epoch_connections{epoch="3"}')
log "restarted: epoch $EPOCH_AFTER2, epoch 3 $E3_RESTORED registrations"
wait "$D1_PID" || true
wait "$D2_PID" || true
read -r D1_P99 D1_DONE <"$T/delivery1"
read -r D2_P99 D2_DONE <"$T/delivery2"
log "gateway's pending-keys gauge: rotation 1 p99 ${D1_P99}s, all ${D1_DONE}s; rotation 2 p99 ${D2_P99}s, all ${D2_DONE}s after the answer (kill -9 and restart included)"
[ "$(echo "$(run_seconds) < $STORM_AT" | bc)" = 1 ] || { echo "rotate-test: the timeline slipped (restarts took too long)" >&2; exit 1; }

log "waiting for the loadgen (storm at $STORM_AT s, settle up to 30 s)"
LG_RC=0
wait "$LG_PID" || LG_RC=$?
REG_AFTER2=$(metric 'rebindgw_registrations_total{result="ok"}')
E3_END=$(metric 'rebindgw_epoch_connections{epoch="3"}')
E2_END=$(metric 'rebindgw_epoch_connections{epoch="2"}')
REJ_EPOCH=$(metric 'rebindgw_rebinds_rejected_total{reason="epoch"}')
ACCEPTED=$(metric rebindgw_rebinds_accepted_total)
EXPIRED=$(metric rebindgw_connections_expired_total)
"$BIN" stats --admin "$ADMIN" >"$T/stats.txt" 2>&1 || true
curl -sf --max-time 2 "http://$ADMIN/metrics" >"$T/metrics.txt" || true

python3 - "$T" "$CLIENTS" "$LG_RC" "$REG_CONNECTED" "$REG_BEFORE_KILL1" "$LIVE" \
  "$ROTATE1_LINE" "$D1_P99" "$D1_DONE" "$E2_REG" "$E1_BEFORE" "$EPOCH_AFTER1" "$E1_RESTORED" "$E2_RESTORED" \
  "$E1_GONE" "$E2_BEFORE2" "$REG_AFTER1" \
  "$ROTATE2_LINE" "$PENDING_AT_KILL" "$EPOCH_AFTER2" "$E3_RESTORED" "$D2_P99" "$D2_DONE" \
  "$REG_AFTER2" "$E3_END" "$E2_END" "$REJ_EPOCH" "$ACCEPTED" "$EXPIRED" <<'EOF'
import json, sys
(T, clients, lg_rc, reg_connected, reg_before_kill1, reg_live,
 rot1_line, d1_p99, d1_done, e2_reg, e1_before, epoch_after1, e1_restored, e2_restored,
 e1_gone, e2_before2, reg_after1,
 rot2_line, pending_at_kill, epoch_after2, e3_restored, d2_p99, d2_done,
 reg_after2, e3_end, e2_end, rej_epoch, accepted, expired) = sys.argv[1:30]
rep = json.load(open(f"{T}/report.json"))
rb, c = rep["rebinds"], rep["clients"]
p = lambda d: f"p50 {d['p50_ms']:.0f} ms, p99 {d['p99_ms']:.0f} ms, max {d['max_ms']:.0f} ms (n={d['count']})"
num = lambda s: None if s == "NA" else int(float(s))
sec = lambda s: "never" if s == "NA" else f"{float(s):.2f} s"
fail = list(rep["failures"])
conns = num(reg_connected)
if lg_rc != "0":
    fail.append(f"loadgen exited {lg_rc}")
# The loadgen's rotation mode: its commands and the client-side key delivery.
rots = rep.get("rotations", [])
def cmd(k):
    c = (rots[k].get("command") or {}) if k < len(rots) else {}
    return c.get("answer", "not reported"), c.get("took_ms", 0.0), c.get("sent_s", 0.0), c.get("ok", False)
for k, epoch in ((0, 2), (1, 3)):
    answer, _, _, ok = cmd(k)
    if not ok or not answer.startswith(f"rotated: epoch {epoch}"):
        fail.append(f"rotation {k + 1}: {answer}")
    elif rots[k]["installed_live"] < rots[k]["live_clients"]:
        fail.append(f"rotation {k + 1}: {rots[k]['installed_live']} of {rots[k]['live_clients']} "
                    f"live clients installed its keys")
if c["connected"] != int(clients) or c["failed_after_connect"]:
    fail.append(f"{c['connected']} of {clients} connected, {c['failed_after_connect']} failed later")
# The verdict on delivery is the clients' own (every live client installed the keys, above).
# The gateway's gauge must fall to 1% of the clients; it need not reach the probes' count:
# a connection that never acknowledges (a probe, or a registration a retried handshake left
# behind until the host drops it) keeps it above that.
if d1_p99 == "NA" or d2_p99 == "NA":
    fail.append(f"the gateway's pending-keys gauge never fell to 1% of the clients: rotation 1 "
                f"{d1_p99}, rotation 2 {d2_p99}")
# The connect phase may leave a few extra registrations (a retried handshake's connection,
# closed by the host once the client uses another): every client's connection (and the
# probe's) must be there, nothing more is required.
need = num(reg_live)
if (num(e2_reg) or 0) < need:
    fail.append(f"epoch 2 registrations {e2_reg}, live connections {need}")
if num(epoch_after1) != 2 or num(e1_restored) != num(e1_before) or (num(e2_restored) or 0) < need:
    fail.append(f"after kill -9 in grace 1: epoch {epoch_after1}, epoch 1 {e1_restored} (held {e1_before}), epoch 2 {e2_restored}")
if e1_gone != "NA" or (num(e2_before2) or 0) < need:
    fail.append(f"after grace 1: epoch 1 {e1_gone}, epoch 2 {e2_before2}")
if num(epoch_after2) != 3 or (num(e3_restored) or 0) < need:
    fail.append(f"after kill -9 in delivery: epoch {epoch_after2}, epoch 3 {e3_restored}")
if (num(e3_end) or 0) < need or e2_end != "NA":
    fail.append(f"at the end: epoch 3 {e3_end}, epoch 2 {e2_end}, live connections {need}")
new_before = (num(reg_before_kill1) or 0) - (conns or 0)
handshakes = new_before + (num(reg_after1) or 0) + (num(reg_after2) or 0)
if handshakes:
    fail.append(f"new registrations (handshakes): {new_before} before the first kill, {reg_after1} "
                f"after the first restart, {reg_after2} after the second")
if rb["failed"] or rb["unrecovered"]:
    fail.append(f"rebinds failed {rb['failed']}, unrecovered {rb['unrecovered']}")
print()
print("== rotate-test summary")
print(f"clients            {c['connected']}/{c['requested']} connected, {c['failed_after_connect']} failed later")
def keys(k):
    if k >= len(rots):
        return "not reported"
    r, d = rots[k], rots[k]["delivery"]
    return (f"installed by {r['installed_live']}/{r['live_clients']} live clients: p50 {d['p50_ms'] / 1000:.2f} s, "
            f"p90 {d['p90_ms'] / 1000:.2f} s, p99 {d['p99_ms'] / 1000:.2f} s, max {d['max_ms'] / 1000:.2f} s after "
            f"{r['at_s']:.0f} s; {r['switched']} switched, {r['handshakes']} handshakes after it (client-side, loadgen)")
a1, t1, s1, _ = cmd(0)
print(f"rotation 1         '{a1}' in {t1:.0f} ms, sent at {s1:.3f} s ({need} live connections; {e2_reg} registered in epoch 2)")
print(f"key delivery 1     {keys(0)}")
print(f"  gateway          KEYS_ACK/KEYS_DELIVERED pending-keys gauge: p99 {sec(d1_p99)}, all {sec(d1_done)} after the answer")
print(f"kill -9 in grace 1 epoch 1 held {e1_before}; after restart epoch {epoch_after1}, epoch 1 {e1_restored}, epoch 2 {e2_restored}; after grace epoch 2 {e2_before2}")
a2, t2, s2, _ = cmd(1)
print(f"rotation 2         '{a2}' in {t2:.0f} ms, sent at {s2:.3f} s; kill -9 0.3 s after the answer with {pending_at_kill} keys pending")
print(f"key delivery 2     {keys(1)}")
print(f"  gateway          pending-keys gauge: p99 {sec(d2_p99)}, all {sec(d2_done)} after the answer (kill -9 and restart included); epoch 3 restored {e3_restored}")
print(f"handshakes         {handshakes} ({new_before} before the first kill, {reg_after1} after the first restart, "
      f"{reg_after2} after the second); expired {expired}")
print(f"rebinds            {rb['moves']} moves ({rb['storms']} storm), {rb['succeeded']} recovered, {rb['failed']} failed, "
      f"{rb['unrecovered']} unrecovered; gateway since the last restart: {accepted} accepted, {rej_epoch} rejected for epoch")
print(f"recovery           {p(rb['recovery'])}")
print(f"at the end         epoch 3 holds {e3_end} ({need} live connections after the connect phase)")
print("result             " + ("PASS" if not fail else "FAIL"))
for f in fail:
    print(f"  - {f}")
sys.exit(1 if fail else 0)
EOF
