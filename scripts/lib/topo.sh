# Shared shell helpers for scripts that build two-node topologies in network namespaces
# (scripts/bench.sh, scripts/demo.sh). Source it; it defines functions only.
#
# Layout (PFX is a unique prefix, e.g. "slb-$$-"):
#   ${PFX}sw      underlay switch: a bridge "br0"
#   ${PFX}n1/n2   nodes: uplink "up0" (veth to the switch), underlay 192.168.77.1x/24
#   ${PFX}p1/p2   one pod per node: "eth0", 10.244.N.10
#   ${PFX}p3      a second pod on node 1 (same-node figures): 10.244.1.11
#   vp<POD>       the host end of pod POD's veth, in its node
# Addresses live only inside these namespaces.

UNDERLAY_NET=192.168.77
POD_NET=10.244

topo_log() { printf '   %s\n' "$*" >&2; }

# nsx NS CMD...: run CMD inside network namespace NS.
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# nsx_bg NS CMD...: start CMD inside NS as a background job of this shell. The subshell and
# `ip netns exec` both exec, so `$!` afterwards is CMD's own pid: signals sent to it reach the
# daemon (its clean shutdown path runs) and `wait $!` gives its exit status.
nsx_bg() { local ns=$1; shift; (exec ip netns exec "$ns" "$@") & }

# stop_daemon NAME PID LOG: SIGTERM a daemon started with nsx_bg, wait up to 10 s for it to exit,
# and say how it ended with the last line of its log; SIGKILL (and say so) if it does not.
stop_daemon() {
  local name=$1 pid=$2 log=$3 i rc
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; printf '    %-14s had already exited (status %s)\n' "$name" "$?"; return 0; }
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    printf '    %-14s did not stop within 10 s of SIGTERM: killed\n' "$name"
    return 1
  fi
  wait "$pid" 2>/dev/null
  rc=$?
  printf '    %-14s exited with status %s after SIGTERM: %s\n' "$name" "$rc" \
    "$(tail -n 1 "$log" 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-140)"
  [ "$rc" -eq 0 ]
}

# topo_cleanup PFX: remove every namespace with that prefix (and so their veths).
topo_cleanup() {
  local pfx=$1 ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${pfx}" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}

# topo_underlay PFX MTU: switch and two nodes wired to it, forwarding on.
topo_underlay() {
  local pfx=$1 mtu=$2 n
  ip netns add "${pfx}sw"
  nsx "${pfx}sw" ip link add br0 type bridge
  nsx "${pfx}sw" ip link set br0 up
  for n in 1 2; do
    ip netns add "${pfx}n$n"
    ip link add "${pfx}u$n" netns "${pfx}sw" mtu "$mtu" type veth peer name up0 netns "${pfx}n$n" mtu "$mtu"
    nsx "${pfx}sw" ip link set "${pfx}u$n" master br0 up
    nsx "${pfx}n$n" ip link set lo up
    nsx "${pfx}n$n" ip link set up0 up
    nsx "${pfx}n$n" ip addr add "${UNDERLAY_NET}.1$n/24" dev up0
    nsx "${pfx}n$n" sysctl -qw net.ipv4.ip_forward=1
  done
}

# topo_pod_veth PFX N MTU GWMODE [POD [IP]]: pod ${PFX}p<POD> (default POD=N) in node nN with a veth
# "vp<POD>" -> "eth0", address IP (default 10.244.N.10).
#   GWMODE=linklocal: Sluice/Calico style (/32, default via 169.254.1.1 onlink, static neighbor)
#   GWMODE=bridge:    Flannel style (host end in bridge cni0 with 10.244.N.1/24, made by the first pod)
topo_pod_veth() {
  local pfx=$1 n=$2 mtu=$3 mode=$4 j=${5:-$2} ip=${6:-"${POD_NET}.$2.10"}
  ip netns add "${pfx}p$j"
  nsx "${pfx}p$j" ip link set lo up
  ip link add "vp$j" netns "${pfx}n$n" mtu "$mtu" type veth peer name eth0 netns "${pfx}p$j" mtu "$mtu"
  nsx "${pfx}p$j" ip link set eth0 up
  nsx "${pfx}n$n" ip link set "vp$j" up
  if [ "$mode" = bridge ]; then
    if ! nsx "${pfx}n$n" ip link show cni0 >/dev/null 2>&1; then
      nsx "${pfx}n$n" ip link add cni0 mtu "$mtu" type bridge
      nsx "${pfx}n$n" ip addr add "${POD_NET}.$n.1/24" dev cni0
      nsx "${pfx}n$n" ip link set cni0 up
    fi
    nsx "${pfx}n$n" ip link set "vp$j" master cni0
    nsx "${pfx}p$j" ip addr add "$ip/24" dev eth0
    nsx "${pfx}p$j" ip route add default via "${POD_NET}.$n.1"
  else
    local hmac
    hmac=$(nsx "${pfx}n$n" cat "/sys/class/net/vp$j/address")
    nsx "${pfx}p$j" ip addr add "$ip/32" dev eth0
    nsx "${pfx}p$j" ip route add 169.254.1.1 dev eth0 scope link
    nsx "${pfx}p$j" ip route add default via 169.254.1.1 dev eth0 onlink
    nsx "${pfx}p$j" ip neigh replace 169.254.1.1 lladdr "$hmac" dev eth0 nud permanent
    nsx "${pfx}n$n" ip route add "$ip/32" dev "vp$j"
    nsx "${pfx}n$n" sysctl -qw "net.ipv4.conf.vp$j.proxy_arp=1"
  fi
}

# topo_pod_route_mtus PFX N POD LOCAL_MTU REMOTE_MTU: per-route MTUs in a linklocal pod (as sluice-cni's
# "routes" mode sets them): its own node's CIDR at LOCAL_MTU (the kernel keeps at most 65520 on a
# route), everything else (the default route) at REMOTE_MTU.
topo_pod_route_mtus() {
  local pfx=$1 n=$2 j=$3 local_mtu=$(( $4 < 65520 ? $4 : 65520 )) remote_mtu=$5
  nsx "${pfx}p$j" ip route replace default via 169.254.1.1 dev eth0 onlink mtu "$remote_mtu"
  nsx "${pfx}p$j" ip route replace "${POD_NET}.$n.0/24" via 169.254.1.1 dev eth0 onlink mtu "$local_mtu"
}

# topo_xdp_pass PFX N POD OBJ: attach OBJ's `xdp.frags` program (native mode) to pod POD's host
# veth vp<POD> in node nN with iproute2's loader, and check what it is there for: TSO off on the pod's
# eth0 (the kernel's veth_fix_features). Fails, saying why, if either does not happen.
topo_xdp_pass() {
  local pfx=$1 n=$2 j=$3 obj=$4 tso
  nsx "${pfx}n$n" ip link set dev "vp$j" xdpdrv object "$obj" section xdp.frags ||
    { echo "topo_xdp_pass: could not attach $obj (section xdp.frags) to vp$j in ${pfx}n$n" >&2; return 1; }
  tso=$(nsx "${pfx}p$j" ethtool -k eth0 | awk '$1 == "tcp-segmentation-offload:" {print $2}')
  topo_log "vp$j: $(nsx "${pfx}n$n" ip -d link show dev "vp$j" | grep -o 'prog/xdp id [0-9]* name [a-z_]*'); pod p$j eth0: tcp-segmentation-offload: $tso"
  [ "$tso" = off ] || { echo "topo_xdp_pass: TSO still '$tso' on p$j's eth0 with XDP on vp$j" >&2; return 1; }
}

# topo_flannel PFX: Flannel's kernel VXLAN between n1 and n2 (DESIGN: how a kernel Flannel node is
# programmed): flannel.1 VNI 1 dstport 8472 nolearning noudpcsum, MTU underlay-50, routes onlink via
# 10.244.M.0 with permanent neighbors and fdb entries.
topo_flannel() {
  local pfx=$1 n m mac
  for n in 1 2; do
    nsx "${pfx}n$n" ip link add flannel.1 type vxlan id 1 local "${UNDERLAY_NET}.1$n" dev up0 \
      dstport 8472 nolearning noudpcsum
    nsx "${pfx}n$n" ip link set flannel.1 mtu "$(( $(nsx "${pfx}n$n" cat /sys/class/net/up0/mtu) - 50 ))" up
    nsx "${pfx}n$n" ip addr add "${POD_NET}.$n.0/32" dev flannel.1
  done
  for n in 1 2; do
    m=$(( 3 - n ))
    mac=$(nsx "${pfx}n$m" cat /sys/class/net/flannel.1/address)
    nsx "${pfx}n$n" ip route add "${POD_NET}.$m.0/24" via "${POD_NET}.$m.0" dev flannel.1 onlink
    nsx "${pfx}n$n" ip neigh replace "${POD_NET}.$m.0" lladdr "$mac" dev flannel.1 nud permanent
    nsx "${pfx}n$n" bridge fdb append "$mac" dev flannel.1 dst "${UNDERLAY_NET}.1$m"
  done
}

# topo_routed PFX: plain kernel routing of pod CIDRs over the underlay (no overlay).
topo_routed() {
  local pfx=$1 n m
  for n in 1 2; do
    m=$(( 3 - n ))
    nsx "${pfx}n$n" ip route add "${POD_NET}.$m.0/24" via "${UNDERLAY_NET}.1$m" dev up0
  done
}

# ---- Sluice nodes ---------------------------------------------------------------------------------
# A Sluice node is a node namespace (topo_underlay) running `sluice-agent` in standalone mode from a
# JSON node config, with its own bpffs instance mounted at DIR/nN/bpf (outside /sys, which
# `ip netns exec` remounts, so the agent's pins live there), its socket and state in DIR/nN. Pods are
# wired by the real CNI binary, run inside the node namespace the way a runtime runs it (CNI_* env,
# network config on stdin). Peer underlay MACs, VTEP MACs 0e:5c:02:00:00:0N.
#
#   SLUICE_AGENT_BIN / SLUICE_CNI_BIN   binaries (default target/release/sluice-agent, sluice-cni)
#   SLUICE_POD_MTU                      pod interface MTU (default 65535, as the CNI plugin's default:
#                                       same-node frames up to 64 KiB travel as multi-buffer chains)
SLUICE_AGENT_BIN=${SLUICE_AGENT_BIN:-target/release/sluice-agent}
SLUICE_CNI_BIN=${SLUICE_CNI_BIN:-target/release/sluice-cni}
SLUICE_POD_MTU=${SLUICE_POD_MTU:-65535}
SLUICE_AGENT_PIDS=()
SLUICE_MOUNTS=()

# topo_sluice_config PFX N MTU DIR CPU SERVICES SLICES POLICIES: write DIR/nN/node.json.
# CPU: the core the node's single worker (uplink queue 0) is pinned to. Manifest args are files
# (POLICIES: several, separated by spaces).
topo_sluice_config() {
  local pfx=$1 n=$2 mtu=$3 dir=$4 cpu=$5 svc=$6 eps=$7 pol=$8 m=$(( 3 - $2 )) mac pmac
  pol=$(printf '"%s",' $pol); pol=${pol%,}
  mac=$(nsx "${pfx}n$n" cat /sys/class/net/up0/address)
  pmac=$(nsx "${pfx}n$m" cat /sys/class/net/up0/address)
  mkdir -p "$dir/n$n/state" "$dir/n$n/bpf" "$dir/n$n/ipam"
  cat >"$dir/n$n/node.json" <<JSON
{
  "node_name": "n$n",
  "underlay": {"interface": "up0", "address": "${UNDERLAY_NET}.1$n", "mtu": $mtu, "mac": "$mac"},
  "pod_cidr": "${POD_NET}.$n.0/24",
  "pod_mtu": $SLUICE_POD_MTU,
  "vtep": {"mac": "0e:5c:02:00:00:0$n"},
  "peers": [{"name": "n$m", "underlay_ip": "${UNDERLAY_NET}.1$m", "underlay_mac": "$pmac",
             "pod_cidr": "${POD_NET}.$m.0/24", "vtep_mac": "0e:5c:02:00:00:0$m"}],
  "manifests": {"services": ["$svc"], "endpoint_slices": ["$eps"], "network_policies": [$pol]},
  "workers": {"queues": {"0": $cpu}, "pin": true, "batch_size": ${SLUICE_BATCH:-64}, "busy_poll": ${SLUICE_BUSY_POLL:-false}, "idle_spin_us": ${SLUICE_IDLE_SPIN_US:-0}, "yield_to_pods": ${SLUICE_YIELD_TO_PODS:-false}, "slice_us": ${SLUICE_SLICE_US:-100}},
  "paths": {"socket": "$dir/n$n/agent.sock", "state_dir": "$dir/n$n/state", "bpffs": "$dir/n$n/bpf"}
}
JSON
}

# topo_sluice_agent PFX N DIR: mount the node's bpffs and start its agent (log DIR/nN/agent.log);
# waits until the agent exports counters with its datapath up.
topo_sluice_agent() {
  local pfx=$1 n=$2 dir=$3 i
  mount -t bpf bpf "$dir/n$n/bpf"
  SLUICE_MOUNTS+=("$dir/n$n/bpf")
  NO_COLOR=1 ip netns exec "${pfx}n$n" "$SLUICE_AGENT_BIN" --config "$dir/n$n/node.json" \
    </dev/null >"$dir/n$n/agent.log" 2>&1 &
  SLUICE_AGENT_PIDS+=("$!")
  for i in $(seq 100); do
    if grep -qs '"datapath": *true' "$dir/n$n/state/counters.json"; then
      [ -n "${SLUICE_WORKER_RT:-}" ] && topo_sluice_rt "$!" "$SLUICE_WORKER_RT"
      return 0
    fi
    if ! kill -0 "$!" 2>/dev/null; then break; fi
    sleep 0.2
  done
  echo "sluice-agent of node n$n did not come up; its log:" >&2
  cat "$dir/n$n/agent.log" >&2
  return 1
}

# topo_sluice_rt PID PRIO: run the agent's worker threads SCHED_FIFO at PRIO (an experiment knob:
# SLUICE_WORKER_RT=N; a worker sharing a core with a busy pod otherwise waits for its time slice).
topo_sluice_rt() {
  local t
  for t in /proc/"$1"/task/*; do
    case "$(cat "$t/comm")" in sluice-worker*) chrt -f -p "$2" "${t##*/}" ;; esac
  done
}

# topo_sluice_reload DIR: SIGHUP every agent (re-read manifests) and wait until each exported a
# newer table generation.
topo_sluice_reload() {
  local dir=$1 n i before
  for n in 1 2; do
    before=$(jq -r .generation "$dir/n$n/state/counters.json")
    kill -HUP "${SLUICE_AGENT_PIDS[$((n - 1))]}"
    for i in $(seq 300); do
      [ "$(jq -r .generation "$dir/n$n/state/counters.json" 2>/dev/null || echo "$before")" -gt "$before" ] && break
      sleep 0.1
    done
    [ "$(jq -r .generation "$dir/n$n/state/counters.json")" -gt "$before" ] || {
      echo "sluice-agent of node n$n did not publish new tables after SIGHUP:" >&2
      tail -5 "$dir/n$n/agent.log" >&2
      return 1
    }
  done
}

# topo_sluice_pod PFX N POD DIR MTU LABELS_JSON: create namespace ${PFX}p<POD> and wire it with
# `sluice-cni ADD` run in node nN; prints the pod's address. The CNI's MTU mode is "routes": pod
# interface and every cluster route (the node's CIDR, the cluster and service CIDRs the agent
# reports) at SLUICE_POD_MTU, the way out of the cluster at min(MTU, POD_MTU + 50) - 50.
topo_sluice_pod() {
  local pfx=$1 n=$2 j=$3 dir=$4 mtu=$5 labels=$6 out i uml
  uml=$(( mtu < SLUICE_POD_MTU + 50 ? mtu : SLUICE_POD_MTU + 50 ))
  ip netns add "${pfx}p$j"
  nsx "${pfx}p$j" ip link set lo up
  for i in 1 2 3 4 5; do
    if out=$(printf '%s' "{\"cniVersion\":\"1.0.0\",\"name\":\"sluice\",\"type\":\"sluice-cni\",
        \"agentSocket\":\"$dir/n$n/agent.sock\",\"dataDir\":\"$dir/n$n/ipam\",
        \"ipam\":{\"dataDir\":\"$dir/n$n/ipam\"},
        \"sluiceMtu\":{\"mode\":\"routes\",\"podMtu\":$SLUICE_POD_MTU,\"underlayMtu\":$uml},
        \"runtimeConfig\":{\"labels\":$labels}}" |
      CNI_COMMAND=ADD CNI_CONTAINERID="${pfx}p$j" CNI_NETNS="/var/run/netns/${pfx}p$j" \
      CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni CNI_ARGS="K8S_POD_NAMESPACE=default;K8S_POD_NAME=p$j" \
      ip netns exec "${pfx}n$n" "$SLUICE_CNI_BIN"); then
      jq -r '.ips[0].address' <<<"$out" | cut -d/ -f1
      return 0
    fi
    # Code 11 is "try again later" (agent not ready yet); anything else is final.
    [ "$(jq -r .code <<<"$out" 2>/dev/null)" = 11 ] || break
    sleep 1
  done
  echo "sluice-cni ADD for pod p$j on node n$n failed: $out" >&2
  return 1
}

# topo_sluice_stop: SIGTERM every agent (it detaches XDP, removes pins and socket), wait, then
# SIGKILL stragglers and unmount the bpffs instances (dropping any pin left).
topo_sluice_stop() {
  local pid i
  for pid in "${SLUICE_AGENT_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${SLUICE_AGENT_PIDS[@]}"; do
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  for i in "${SLUICE_MOUNTS[@]}"; do umount -l "$i" 2>/dev/null || true; done
  SLUICE_AGENT_PIDS=() SLUICE_MOUNTS=()
}
