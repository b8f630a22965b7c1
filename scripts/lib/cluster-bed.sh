# shellcheck shell=bash
# The cluster test bed (sourced by scripts/cluster-bed.sh and, later, the cluster test):
# network namespaces for three gateways behind one ECMP router, a backplane with a
# three-member etcd cluster and the host, and clients behind a real nftables NAT.
#
#  client ns ($P-cli)     NAT ns ($P-nat)          router ns ($P-rt)           gateway ns ($P-gwN)
#  10.210.1.2/24 ==veth== 10.210.1.1   10.210.2.2 ==veth== 10.210.2.1
#                         snat to 10.210.2.2x    ECMP: SVC/32 nexthop         10.210.1N.2/24
#                         (PORTS)                via 10.210.1N.2 (N=1..3) ==veth== 10.210.1N.1
#                                                fib_multipath_hash_policy=1   SVC 10.210.100.1/32 on lo
#                                                                              10.211.0.1N/24 ==+
#  etcd ns ($P-etcdN): 10.211.0.2N/24, etcd member N (client :2379, peer :2380)   ==+  bridge ns
#  host ns ($P-host):  10.211.0.5/24                                              ==+  ($P-back) br0
#
# The router hashes the UDP 4-tuple (policy 1) to pick a gateway, so a NAT rebind (a new
# source port or address) usually moves a client to another gateway. Gateways reach etcd and
# the host over the backplane; the router has no route to it.

BED_SVC=10.210.100.1
BED_CLI=10.210.1.2
# Client source addresses (the loadgen uses them round-robin: 65,536 clients need more
# ephemeral ports than one address has).
BED_CLIS=(10.210.1.2 10.210.1.3 10.210.1.4 10.210.1.5)
BED_NAT_IN=10.210.1.1
BED_NAT_OUT=(10.210.2.2 10.210.2.21 10.210.2.22)
# Public address pairs, one per NAT rebind of a large run: a pair with ports 1024-65535 maps
# 129,024 clients (one address alone cannot map 65,536).
BED_NAT_POOLS=(10.210.2.30-10.210.2.31 10.210.2.32-10.210.2.33 10.210.2.34-10.210.2.35
  10.210.2.36-10.210.2.37)
BED_NAT_PORTS=1024-65535
# The public address of the clients the captured-REBIND phase moves (added to the NAT then).
BED_ATTACK_ADDR=10.210.2.38
BED_HOST=10.211.0.5

bed_namespaces() {
  local p=$1
  echo "$p-cli $p-nat $p-rt $p-gw1 $p-gw2 $p-gw3 $p-back $p-etcd1 $p-etcd2 $p-etcd3 $p-host"
}

bed_gateway_addr() { echo "10.211.0.1$1"; }
bed_etcd_addr() { echo "10.211.0.2$1"; }
bed_etcd_endpoints() { echo "http://10.211.0.21:2379,http://10.211.0.22:2379,http://10.211.0.23:2379"; }

# bed_up P: builds every namespace and link (idempotent after bed_down).
bed_up() {
  local p=$1 n ns
  for ns in $(bed_namespaces "$p"); do netns_create "$ns"; done

  # Client -> NAT -> router.
  netns_veth "$p-cli" c0 "$p-nat" n0
  for a in "${BED_CLIS[@]}"; do ip -n "$p-cli" addr add "$a/24" dev c0; done
  ip -n "$p-cli" route add default via "$BED_NAT_IN"
  ip -n "$p-nat" addr add "$BED_NAT_IN/24" dev n0
  netns_veth "$p-nat" n1 "$p-rt" r0
  for a in "${BED_NAT_OUT[@]}"; do ip -n "$p-nat" addr add "$a/24" dev n1; done
  for a in $(seq 30 37); do ip -n "$p-nat" addr add "10.210.2.$a/24" dev n1; done
  ip -n "$p-nat" route add default via 10.210.2.1
  ip netns exec "$p-nat" sysctl -qw net.ipv4.ip_forward=1
  ip -n "$p-rt" addr add 10.210.2.1/24 dev r0
  ip netns exec "$p-rt" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$p-rt" sysctl -qw net.ipv4.fib_multipath_hash_policy=1

  # Router -> three gateways, one ECMP route to the service address.
  local hops=()
  for n in 1 2 3; do
    netns_veth "$p-rt" "r$n" "$p-gw$n" g0
    ip -n "$p-rt" addr add "10.210.1$n.1/24" dev "r$n"
    ip -n "$p-gw$n" addr add "10.210.1$n.2/24" dev g0
    ip -n "$p-gw$n" addr add "$BED_SVC/32" dev lo
    ip -n "$p-gw$n" route add default via "10.210.1$n.1"
    hops+=(nexthop via "10.210.1$n.2" dev "r$n" weight 1)
  done
  ip -n "$p-rt" route add "$BED_SVC/32" "${hops[@]}"

  # Backplane: a bridge joining the gateways, the etcd members and the host.
  ip -n "$p-back" link add br0 type bridge
  ip -n "$p-back" link set br0 up
  for n in 1 2 3; do
    netns_veth "$p-gw$n" b0 "$p-back" "bg$n"
    ip -n "$p-back" link set "bg$n" master br0
    ip -n "$p-gw$n" addr add "$(bed_gateway_addr "$n")/24" dev b0
    netns_veth "$p-etcd$n" b0 "$p-back" "be$n"
    ip -n "$p-back" link set "be$n" master br0
    ip -n "$p-etcd$n" addr add "$(bed_etcd_addr "$n")/24" dev b0
  done
  netns_veth "$p-host" b0 "$p-back" bh
  ip -n "$p-back" link set bh master br0
  ip -n "$p-host" addr add "$BED_HOST/24" dev b0
}

bed_down() {
  # shellcheck disable=SC2046
  netns_delete $(bed_namespaces "$1")
}

# bed_nat P PORTS ADDR: the NAT maps the client to ADDR:PORTS (e.g. 20000-29999; ADDR may be a
# range such as 10.210.2.30-10.210.2.31), then drops
# its conntrack entries so the next datagram gets the new mapping (a rebind).
bed_nat() {
  local p=$1 ports=$2 addr=$3
  ip netns exec "$p-nat" nft -f - <<EOF
table ip bednat
delete table ip bednat
table ip bednat {
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "n1" meta l4proto udp snat to $addr:$ports
    oifname "n1" snat to $addr
  }
}
EOF
  # Only client flows cross the NAT namespace.
  ip netns exec "$p-nat" conntrack -D -p udp >/dev/null 2>&1 || true
}

# bed_etcd_start P N DIR: starts etcd member N (1..3) of the bed's cluster, data in DIR/etcdN,
# log in DIR/etcdN.log. A restarted member rejoins with its data.
bed_etcd_start() {
  local p=$1 n=$2 dir=$3 a cluster=""
  a=$(bed_etcd_addr "$n")
  for m in 1 2 3; do cluster+="e$m=http://$(bed_etcd_addr "$m"):2380,"; done
  local state=new
  [ -d "$dir/etcd$n" ] && state=existing
  ip netns exec "$p-etcd$n" etcd --name "e$n" --data-dir "$dir/etcd$n" \
    --listen-client-urls "http://$a:2379" --advertise-client-urls "http://$a:2379" \
    --listen-peer-urls "http://$a:2380" --initial-advertise-peer-urls "http://$a:2380" \
    --initial-cluster "${cluster%,}" --initial-cluster-state "$state" \
    --initial-cluster-token "$p" >>"$dir/etcd$n.log" 2>&1 &
}

bed_etcd_stop() {
  netns_kill_all "$1-etcd$2"
}

# bed_etcdctl P ARGS...: etcdctl against every member, from gateway 1's namespace.
bed_etcdctl() {
  local p=$1
  shift
  ETCDCTL_API=3 ip netns exec "$p-gw1" etcdctl --endpoints "$(bed_etcd_endpoints)" \
    --dial-timeout 2s --command-timeout 3s "$@"
}
