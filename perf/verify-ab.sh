#!/bin/sh
# A/B of the full REBIND verify (issue 14 item 5): the bench binary of main (before the
# 16-lane KDF) and of this branch, alternated round by round under `chrt -f 50`, so both see
# the same machine load. Usage: perf/verify-ab.sh OLD_BIN NEW_BIN ROUNDS > log
# (the bench binaries are what `cargo bench --bench verify --no-run` prints).
set -eu
old=$1 new=$2 rounds=${3:-3}
args="--warm-up-time 1 --measurement-time 3"
for r in $(seq 1 "$rounds"); do
    echo "## round $r $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# old: $old"
    chrt -f 50 "$old" --bench 'full_verify/(pipeline/vaes|kdf_baseline/hkdf_crate)' $args 2>&1 |
        grep -E '^full_verify|time:' | grep -v '%'
    echo "# new: $new"
    chrt -f 50 "$new" --bench 'full_verify/(pipeline/vaes|pipeline_kdf/(pairs|lanes16)|kdf_baseline/hkdf_crate)' $args 2>&1 |
        grep -E '^full_verify|time:' | grep -v '%'
done
