#!/usr/bin/env bash
# Static checks of the packaging and the profiling script (run by tests/packaging.rs):
#   - perf/record.sh parses (bash -n), perf/README.md and the script name the same PR_*
#     variables, neither cites an absolute path of a particular machine, and new recordings
#     go to the git-ignored perf/out/ instead of over the committed perf/flamegraphs/;
#   - LICENSE-MIT and LICENSE-APACHE match Cargo.toml's license;
#   - dist/rebindgw.service has the hardening it promises, and passes `systemd-analyze
#     verify` (skipped, with the reason, when systemd-analyze is absent).
# REBINDGW_BIN: the binary to put in ExecStart for the verify (default target/debug/rebindgw).
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "check-packaging: $*" >&2; exit 1; }

bash -n perf/record.sh || fail "perf/record.sh does not parse"
readme_vars=$(grep -o 'PR_[A-Z_]*' perf/README.md | sort -u)
script_vars=$(grep -o 'PR_[A-Z_]*' perf/record.sh | sort -u)
[ "$readme_vars" = "$script_vars" ] ||
  fail "PR_* variables differ: README [$(echo $readme_vars)] vs record.sh [$(echo $script_vars)]"
if grep -nE '(^|[ (`])/(work|root|home)/' perf/README.md perf/record.sh; then
  fail "absolute machine paths in perf/"
fi
grep -q '^OUT=perf/out$' perf/record.sh || fail "record.sh must default to perf/out"
grep -qx '/perf/out/' .gitignore || fail "/perf/out/ is not git-ignored"

grep -q '^license = "MIT OR Apache-2.0"$' Cargo.toml || fail "Cargo.toml license changed"
grep -q '^MIT License$' LICENSE-MIT || fail "LICENSE-MIT"
grep -q 'Apache License' LICENSE-APACHE && grep -q 'Version 2.0, January 2004' LICENSE-APACHE ||
  fail "LICENSE-APACHE"

U=dist/rebindgw.service
for want in 'DynamicUser=yes' 'StateDirectory=rebindgw' 'StateDirectoryMode=0700' \
  'NoNewPrivileges=yes' 'ProtectSystem=strict' 'ProtectHome=yes' 'PrivateTmp=yes' \
  'PrivateDevices=yes' 'RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK' \
  'CapabilityBoundingSet=' 'ExecReload=/bin/kill -HUP $MAINPID' 'LimitMEMLOCK='; do
  grep -qF -- "$want" "$U" || fail "$U lacks $want"
done
grep -q '^ExecStartPre=.* gateway --check' "$U" || fail "$U lacks ExecStartPre with --check"
filter=$(grep '^SystemCallFilter=' "$U")
for sc in io_uring_setup io_uring_enter io_uring_register; do
  [[ "$filter" == *"$sc"* ]] || fail "SystemCallFilter lacks $sc"
  [[ "$filter" == *"~"* ]] && fail "SystemCallFilter is a deny list"
  if grep -q "^SystemCallFilter=~.*$sc" "$U"; then fail "$sc is excluded"; fi
done

if ! command -v systemd-analyze >/dev/null 2>&1; then
  [ -z "${REBINDGW_REQUIRE_TOOLS:-}" ] || fail "systemd-analyze missing but REBINDGW_REQUIRE_TOOLS is set"
  echo "check-packaging: SKIP systemd-analyze verify: systemd-analyze not installed (apt package systemd)" >&2
  echo "check-packaging: ok (without systemd-analyze)"
  exit 0
fi
BIN=$(realpath "${REBINDGW_BIN:-target/debug/rebindgw}" 2>/dev/null || true)
[ -x "$BIN" ] || fail "REBINDGW_BIN ($BIN) is not an executable; build first"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
sed "s#/usr/local/bin/rebindgw#$BIN#g" "$U" >"$T/rebindgw.service"
out=$(systemd-analyze verify "$T/rebindgw.service" 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify warned: $out"
echo "check-packaging: ok"
