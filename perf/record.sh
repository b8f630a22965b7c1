#!/usr/bin/env bash
# Profiles the gateway under loadgen and renders a flamegraph. See perf/README.md.
#
#   perf/record.sh [data|storm] [--seconds N] [--out DIR] [--call-graph dwarf|fp] [--no-build]
#
#   data   steady echo load: 2,000 clients, closed loop with $PR_WINDOW (default 2) echoes
#          outstanding per client, so the rate is whatever the machine sustains; with
#          $PR_RATE set, open loop at that many DATA packets per second in total instead
#   storm  4,000 clients at 8,000 pps, every client moves to a new tuple every 2 s, so the
#          profile is dominated by UNRECOGNIZED, REBIND verification and the registry
#   --seconds N    length of the recording (default 10)
#   --out DIR      where flame-MODE.svg, top-MODE.txt and loadgen-MODE.json go (default
#                  perf/out, git-ignored; the committed graphs are in perf/flamegraphs);
#                  the raw perf data goes to target/perf/perf-MODE.data
#   --call-graph   dwarf (default) or fp. The release profile has no frame pointers, so fp
#                  stacks stop at the first Rust frame; fp rebuilds with
#                  -C force-frame-pointers=yes into target/perf-fp (a separate target dir).
#   --no-build     use the existing binary
#
# Needs root (or perf_event_paranoid <= 1). Installs perf (apt: linux-perf) and inferno
# (cargo install inferno --locked) when missing. The VM has no hardware counters, so the event
# is the software clock: -e cpu-clock -F 999.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=data
SECS=10
OUT=perf/out
CG=dwarf
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    data|storm) MODE=$1 ;;
    --seconds) SECS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --call-graph) CG=$2; shift ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
case "$CG" in dwarf|fp) ;; *) echo "--call-graph: dwarf or fp" >&2; exit 2 ;; esac

GW_PORT=${PR_GW_PORT:-27400}
ADMIN=127.0.0.1:${PR_ADMIN_PORT:-27480}
HOST=127.0.0.1:${PR_HOST_PORT:-27500}
GW=127.0.0.1:$GW_PORT

# ---- tools -----------------------------------------------------------------------------------
if ! command -v perf >/dev/null 2>&1; then
  echo "record: installing perf (linux-perf)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v inferno-flamegraph >/dev/null 2>&1 || ! command -v inferno-collapse-perf >/dev/null 2>&1; then
  echo "record: installing inferno (cargo install inferno --locked)" >&2
  cargo install inferno --locked --quiet
fi

if [ "$CG" = fp ]; then
  TARGET_DIR=target/perf-fp
  [ $BUILD = 1 ] && RUSTFLAGS="${RUSTFLAGS:-} -C force-frame-pointers=yes" \
    cargo build --release --quiet --target-dir "$TARGET_DIR"
  CALLGRAPH=(--call-graph fp)
else
  TARGET_DIR=target
  [ $BUILD = 1 ] && cargo build --release --quiet
  # 16 KiB of stack per sample: deep enough for io loop -> handle_batch -> engine/HKDF frames.
  CALLGRAPH=(--call-graph dwarf,16384)
fi
BIN=${REBINDGW_BIN:-$TARGET_DIR/release/rebindgw}
[ -x "$BIN" ] || { echo "record: $BIN missing" >&2; exit 2; }
mkdir -p "$OUT"

# ---- gateway, host, load ---------------------------------------------------------------------
T=$(mktemp -d /tmp/rebindgw-perf.XXXXXX)
PIDS=()
cleanup() {
  local rc=$?
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$T"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$BIN" link-keygen --out "$T/host.key" >/dev/null
install -m 600 /dev/null "$T/clients.toml"
"$BIN" host --listen "$HOST" --clients "$T/clients.toml" --link-key "$T/host.key" >"$T/host.log" 2>&1 &
PIDS+=("$!")
"$BIN" gateway --listen "$GW" --host "$HOST=$T/host.key" --admin "$ADMIN" \
  --state-dir "$T/state" >"$T/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
for _ in $(seq 200); do curl -sf --max-time 0.2 "http://$ADMIN/healthz" >/dev/null 2>&1 && break; sleep 0.05; done
curl -sf "http://$ADMIN/healthz" >/dev/null || { cat "$T/gateway.log" >&2; exit 1; }

RUN=$((SECS + 4))
case "$MODE" in
  data)
    if [ -n "${PR_RATE:-}" ]; then
      LOAD=(--clients 2000 --rate "$PR_RATE")
    else
      LOAD=(--clients 2000 --window "${PR_WINDOW:-2}")
    fi ;;
  storm) LOAD=(--clients 4000 --rate 8000 --storm-at 1s --storm-every 2s) ;;
esac
"$BIN" loadgen --gateway "$GW" --clients-file "$T/clients.toml" "${LOAD[@]}" \
  --duration "${RUN}s" --settle 5s --json >"$OUT/loadgen-$MODE.json" 2>"$T/loadgen.err" &
LG_PID=$!
PIDS+=("$LG_PID")
until grep -q ' run t=' "$T/loadgen.err" 2>/dev/null; do
  kill -0 "$LG_PID" 2>/dev/null || { cat "$T/loadgen.err" >&2; exit 1; }
  sleep 0.05
done

# ---- record ----------------------------------------------------------------------------------
mkdir -p target/perf
DATA=target/perf/perf-$MODE.data   # big; target/ is git-ignored
echo "record: $MODE, ${SECS}s, call graph $CG, gateway pid $GW_PID" >&2
perf record -e cpu-clock -F 999 -g "${CALLGRAPH[@]}" -p "$GW_PID" -o "$DATA" -- sleep "$SECS" \
  2> >(grep -v '^\[ perf record: Woken' >&2)
wait "$LG_PID" || echo "record: loadgen reported a failure (see $OUT/loadgen-$MODE.json)" >&2
grep -E '^ +(run|settle|done) ' "$T/loadgen.err" | awk '{ l[NR % 3] = $0 } END { for (i = NR - 2; i <= NR; i++) if (i > 0) print l[i % 3] }' >&2 || true

# --no-inline: resolving inlined frames through addr2line makes perf script take minutes.
perf script -i "$DATA" --no-inline 2>/dev/null | inferno-collapse-perf >"$T/folded"
inferno-flamegraph --title "rebindgw gateway, $MODE load, cpu-clock, $CG" <"$T/folded" >"$OUT/flame-$MODE.svg"
{
  echo "# perf report --no-children --sort symbol  ($MODE load, ${SECS}s, cpu-clock 999 Hz, $CG)"
  perf report -i "$DATA" --no-children --stdio --sort symbol -g none 2>/dev/null |
    grep -v '^#' | grep -v '^$' | sed -E 's/ +- +- *$//' | awk 'NR <= 25'
} >"$OUT/top-$MODE.txt"
echo "record: wrote $OUT/flame-$MODE.svg ($(du -h "$OUT/flame-$MODE.svg" | cut -f1)), $OUT/top-$MODE.txt, $DATA" >&2
cat "$OUT/top-$MODE.txt"
