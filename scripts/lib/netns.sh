# shellcheck shell=bash
# Small helpers for test scripts that build network namespaces (sourced, not run).
# Everything here acts only on the namespaces named by the caller.

# netns_exists NS: true if the named namespace exists.
netns_exists() {
  [ -e "/run/netns/$1" ]
}

# netns_kill_all NS...: SIGTERM, then SIGKILL after 2 s, every process still inside the named
# namespaces (processes that the test itself started there). Missing namespaces are skipped.
netns_kill_all() {
  local ns pids
  for ns in "$@"; do
    netns_exists "$ns" || continue
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$pids" ] || continue
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 20); do
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      [ -n "$pids" ] || break
      sleep 0.1
    done
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  done
}

# netns_delete NS...: kill what runs inside, then delete the namespaces (their veth ends go
# with them). Idempotent: missing namespaces are fine.
netns_delete() {
  local ns
  netns_kill_all "$@"
  for ns in "$@"; do
    netns_exists "$ns" || continue
    ip netns del "$ns" 2>/dev/null || true
  done
}

# netns_create NS: a fresh namespace with lo up.
netns_create() {
  ip netns add "$1"
  ip -n "$1" link set lo up
}

# netns_veth NS_A IF_A NS_B IF_B: a veth pair with one end in each namespace (it is created
# inside NS_A, so no interface ever appears in the root namespace), both ends up.
netns_veth() {
  ip -n "$1" link add "$2" type veth peer name "$4" netns "$3"
  ip -n "$1" link set "$2" up
  ip -n "$3" link set "$4" up
}
