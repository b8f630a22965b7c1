#!/usr/bin/env bash
# Builds every cargo-fuzz target in fuzz/ and runs each for SECONDS_PER_TARGET (default 10),
# one after another, on the stable toolchain. Prints the exec count of each run and exits
# non-zero if any target crashed (or a saved regression input fails again).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Environment:
#   FUZZ_TARGETS    space-separated subset of targets (default: all of `cargo fuzz list`)
#   FUZZ_SANITIZER  address (default) or none; `none` builds without ASan (faster, finds
#                   only panics, aborts and timeouts)
#   FUZZ_JOBS       cargo build jobs (default: cargo's own)
#
# How this works on stable (see fuzz/README.md): cargo-fuzz passes nightly-only flags
# (-Zsanitizer=address, -Cpasses=sancov-module ...); RUSTC_BOOTSTRAP=1 lets the stable
# compiler accept them. The ASan runtime ships with the stable rust-std component.
set -euo pipefail

SECS="${1:-10}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ="$ROOT/fuzz"
SAN="${FUZZ_SANITIZER:-address}"

if ! [[ "$SECS" =~ ^[0-9]+$ ]] || [ "$SECS" -lt 1 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi
if ! command -v c++ >/dev/null 2>&1; then
    echo "fuzz.sh: libfuzzer-sys needs a C++ compiler (apt-get install g++)" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
cd "$FUZZ"
host="$(rustc -vV | sed -n 's/^host: //p')"
bin="$FUZZ/target/$host/release"
targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"

build=(cargo fuzz build --sanitizer "$SAN")
[ -n "${FUZZ_JOBS:-}" ] && build+=(--jobs "$FUZZ_JOBS")
echo "fuzz.sh: ${build[*]}"
"${build[@]}"

work="$(mktemp -d "${TMPDIR:-/tmp}/rebindgw-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
failed=()
rows=()

for t in $targets; do
    # Saved reproducers must stay fixed.
    if [ -d "$FUZZ/regressions/$t" ] && [ -n "$(ls -A "$FUZZ/regressions/$t")" ]; then
        if ! "$bin/$t" -runs=1 "$FUZZ/regressions/$t"/* >"$work/$t.regress.log" 2>&1; then
            echo "fuzz.sh: $t: a saved regression input fails again:" >&2
            tail -n 40 "$work/$t.regress.log" >&2
            failed+=("$t(regression)")
        fi
    fi
    # New units go to a scratch corpus; the committed seeds in corpus/ are read, not grown.
    mkdir -p "$work/$t/corpus" "$work/$t/artifacts" "$work/$t/run"
    seeds=()
    [ -d "$FUZZ/corpus/$t" ] && seeds+=("$FUZZ/corpus/$t")
    echo "fuzz.sh: $t for ${SECS}s"
    # With -jobs=1 libFuzzer runs one child process that logs to fuzz-0.log in the
    # current directory; the parent's exit status says whether it failed.
    set +e
    (cd "$work/$t/run" && "$bin/$t" "$work/$t/corpus" "${seeds[@]}" \
        -max_total_time="$SECS" -workers=1 -jobs=1 -print_final_stats=1 \
        -rss_limit_mb=2048 -timeout=10 -artifact_prefix="$work/$t/artifacts/" \
        >"$work/$t/parent.log" 2>&1)
    rc=$?
    set -e
    log="$work/$t/run/fuzz-0.log"
    [ -f "$log" ] || log="$work/$t/parent.log"
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    [ -z "$execs" ] && execs="$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)"
    secs="$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
    # (no "cov:" line when a seed crashes before the run starts: not an error of this script)
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2 || true)"
    crash=0
    if [ "$rc" -ne 0 ]; then
        crash=1
        failed+=("$t")
        mkdir -p "$FUZZ/artifacts/$t"
        cp "$work/$t/artifacts/"* "$FUZZ/artifacts/$t/" 2>/dev/null || true
        echo "fuzz.sh: $t FAILED (exit $rc); input saved in fuzz/artifacts/$t/:" >&2
        grep -E -A 30 'panicked|ERROR: (AddressSanitizer|libFuzzer)' "$log" | head -n 60 >&2 || tail -n 40 "$log" >&2
    fi
    rows+=("$(printf '%-18s %6s %12s %8s %6s %7s' "$t" "${secs:-?}" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$crash")")
done

echo
printf '%-18s %6s %12s %8s %6s %7s\n' target secs execs exec/s cov crashes
for r in "${rows[@]}"; do echo "$r"; done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: failures: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: no crashes"
