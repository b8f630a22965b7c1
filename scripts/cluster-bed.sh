#!/usr/bin/env bash
# Checks the cluster test bed (scripts/lib/cluster-bed.sh) before any gateway runs on it:
#  1. a three-member etcd cluster on the backplane: healthy; keeps taking writes with one
#     member down; refuses them with two down (no quorum); takes them again once they return;
#  2. ECMP: UDP responders on the shared service address in the three gateway namespaces
#     answer with their id; 240 client sockets behind the NAT each send 3 probes: every
#     socket's probes reach one gateway (the router hashes the 4-tuple), and every gateway gets
#     at least 15% of the sockets;
#  3. a NAT rebind (new SNAT port range and address, conntrack entries dropped) moves a share
#     of the sockets to another gateway: the case the cluster must handle.
#
# Usage: scripts/cluster-bed.sh [--keep]     (needs root, iproute2, nftables, conntrack,
#                                             python3, etcd and etcdctl: etcd-server, etcd-client)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/netns.sh
. "$ROOT/scripts/lib/netns.sh"
# shellcheck source=scripts/lib/cluster-bed.sh
. "$ROOT/scripts/lib/cluster-bed.sh"

P=${RBCL_PREFIX:-rbcl}
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1
WORK=$(mktemp -d /tmp/rebindgw-cluster-bed.XXXXXX)

die() {
  echo "cluster-bed: FAIL: $*" >&2
  exit 1
}

cleanup() {
  local rc=$?
  if [ $KEEP = 0 ]; then
    bed_down "$P"
    [ $rc = 0 ] && rm -rf "$WORK"
  fi
  [ $rc = 0 ] || echo "cluster-bed: logs in $WORK" >&2
}
trap cleanup EXIT

for tool in ip nft conntrack python3 etcd etcdctl; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"

bed_down "$P"
bed_up "$P"
bed_nat "$P" 20000-29999 "${BED_NAT_OUT[0]}"
echo "== bed up: $(bed_namespaces "$P" | wc -w) namespaces"

# ---- 1. etcd ----
for n in 1 2 3; do bed_etcd_start "$P" "$n" "$WORK"; done
healthy() { bed_etcdctl "$P" endpoint health >/dev/null 2>&1; }
for _ in $(seq 100); do healthy && break; sleep 0.2; done
healthy || die "etcd cluster not healthy (see $WORK/etcd*.log)"
echo "== etcd: 3 members healthy"
bed_etcdctl "$P" put /bed/k v1 >/dev/null || die "put with 3 members"
bed_etcd_stop "$P" 2
bed_etcdctl "$P" put /bed/k v2 >/dev/null || die "put with member 2 down"
echo "== etcd: member 2 down, writes go on"
bed_etcd_stop "$P" 3
if bed_etcdctl "$P" put /bed/k v3 >/dev/null 2>&1; then
  die "a write succeeded without quorum"
fi
echo "== etcd: members 2 and 3 down, writes refused (no quorum)"
bed_etcd_start "$P" 2 "$WORK"
bed_etcd_start "$P" 3 "$WORK"
ok=0
for _ in $(seq 100); do
  if bed_etcdctl "$P" put /bed/k v4 >/dev/null 2>&1; then ok=1; break; fi
  sleep 0.2
done
[ $ok = 1 ] || die "writes did not resume after members 2 and 3 returned"
[ "$(bed_etcdctl "$P" get --print-value-only /bed/k)" = v4 ] || die "read after recovery"
echo "== etcd: members back, writes resume"

# ---- 2. ECMP ----
for n in 1 2 3; do
  ip netns exec "$P-gw$n" python3 - "$BED_SVC" "$n" >"$WORK/resp$n.log" 2>&1 <<'EOF' &
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 7400))
me = sys.argv[2].encode()
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(me + b" " + data, peer)
EOF
done
sleep 0.3

cat >"$WORK/probe.py" <<'EOF'
import json, socket, sys, time
svc, n = sys.argv[1], int(sys.argv[2])

def probe(socks):
    seen = {}
    for i, s in enumerate(socks):
        got = set()
        for k in range(3):
            s.sendto(b"probe %d %d" % (i, k), (svc, 7400))
            try:
                got.add(s.recv(2048).split()[0].decode())
            except socket.timeout:
                got.add("lost")
        seen[i] = sorted(got)
    return seen

socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    s.bind(("0.0.0.0", 0))
    socks.append(s)
before = probe(socks)
print(json.dumps({"before": before}), flush=True)
# Wait for the NAT to be changed, then probe again from the same sockets.
sys.stdin.readline()
after = probe(socks)
print(json.dumps({"after": after}), flush=True)
EOF

coproc PROBE { ip netns exec "$P-cli" python3 "$WORK/probe.py" "$BED_SVC" 240 2>"$WORK/probe.err"; }
read -r -u "${PROBE[0]}" before || die "probe gave no output (see $WORK/probe.err)"
bed_nat "$P" 40000-49999 "${BED_NAT_OUT[1]}"
echo go >&"${PROBE[1]}"
read -r -u "${PROBE[0]}" after || die "probe gave no second output"

python3 - "$before" "$after" <<'EOF'
import json, sys
before = json.loads(sys.argv[1])["before"]
after = json.loads(sys.argv[2])["after"]
n = len(before)
def check(seen, label):
    split = [i for i, g in seen.items() if len(g) != 1 or g[0] == "lost"]
    if split:
        sys.exit(f"cluster-bed: FAIL: {label}: {len(split)} sockets not answered by exactly one gateway: {split[:5]}")
    counts = {}
    for g in seen.values():
        counts[g[0]] = counts.get(g[0], 0) + 1
    shares = {g: round(c / n, 3) for g, c in sorted(counts.items())}
    print(f"== ECMP {label}: {n} sockets, each answered by one gateway; shares {shares}")
    if len(counts) != 3 or min(counts.values()) < 0.15 * n:
        sys.exit(f"cluster-bed: FAIL: {label}: uneven spread {shares}")
check(before, "before the rebind")
check(after, "after the rebind")
moved = sum(1 for i in before if before[i] != after[i])
print(f"== NAT rebind (new port range and address): {moved}/{n} sockets ({moved / n:.1%}) moved to another gateway")
if moved < 0.3 * n:
    sys.exit("cluster-bed: FAIL: the rebind moved too few sockets to test cross-gateway recovery")
EOF
echo "cluster-bed: PASS"
