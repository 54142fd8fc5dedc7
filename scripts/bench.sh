#!/usr/bin/env bash
# Side-by-side benchmark of pod networking on one machine: the same two-node topology built several
# ways in one run, each measured with the same tools on the same cores. See bench/README.md.
#
#   setups:  host-veth (two nodes talking over the underlay, no pods: the ceiling)
#            kernel-routed (pods, kernel routing, no overlay)
#            xdp-ceiling (kernel-routed with an XDP_PASS program on the pods' host veths, so TSO is
#              off in the pods as under Sluice: what any design with XDP on pod veths reaches here)
#            kernel-vxlan (pods, Flannel's kernel VXLAN: vxlan device + bridge) -- the baseline
#            sluice (pods wired by sluice-cni, sluice-agent's AF_XDP dataplane, VXLAN between nodes)
#            sluice-rt (the same with the agents' worker threads SCHED_FIFO; not in --quick)
#   figures: iperf3 TCP 1 and 2 streams (Gbit/s), iperf3 UDP 64-byte payload (received kpps, loss),
#            64-byte UDP loss at the same offered load (kernel-vxlan's sender rate in this layout),
#            sockperf UDP ping-pong latency p50/p99 (us), same-node pod-to-pod TCP (Gbit/s);
#            Sluice also through a ClusterIP Service (rows sluice-clusterip) and with 10 and 10,000
#            NetworkPolicies installed (rows sluice-pol10, sluice-pol10k);
#            CPU cost of every TCP and UDP figure: CPU seconds of all CPUs (user+nice+system+irq+
#            softirq, /proc/stat) per GB received (TCP) or per million packets received (UDP);
#            medians of REPS repetitions with ranges; the criterion summary of the pipeline.
#   layouts: every setup in each: shared (client CPU 0, server CPU 1; Sluice's node 1 worker on
#            CPU 0, node 2's on CPU 1) and dedicated (client and server CPU 0; both Sluice workers
#            alone on CPU 1; kernel setups: the same application pinning).
#
# Usage: scripts/bench.sh [--quick] [--setups "a b c"] [--layouts "shared dedicated"] [--mtu 1500]
#                         [--reps 3] [--secs 5] [--criterion run|read|off] [--profile]
#   --quick      one short repetition of each figure, layout shared only (the smoke run
#                scripts/test.sh uses); fails (non-zero) when a setup does not carry traffic
#   --criterion  run: `cargo bench -p sluice-bench --bench pipeline` then read its estimates
#                (default); read: only read target/criterion/*/*/new/estimates.json; off
#   --profile    also record `perf` (cpu-clock, all CPUs) during one TCP and one UDP run of
#                kernel-vxlan and sluice, summaries in bench/results/profile-*.txt
# Output: a Markdown table on stdout (ratios to kernel-vxlan of the same layout), raw results in
# bench/results/, the summary of this MTU in results-mtuMTU.json, all MTUs in results.{json,md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/topo.sh

SETUPS="host-veth kernel-routed xdp-ceiling kernel-vxlan sluice sluice-rt" SETUPS_SET=0
LAYOUTS="shared dedicated" LAYOUTS_SET=0
MTU=1500 REPS=3 SECS=5 QUICK=0 CRITERION=run PROFILE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; REPS=1; SECS=1; CRITERION=off ;;
    --setups) SETUPS=$2; SETUPS_SET=1; shift ;;
    --layouts) LAYOUTS=$2; LAYOUTS_SET=1; shift ;;
    --mtu) MTU=$2; shift ;;
    --reps) REPS=$2; shift ;;
    --secs) SECS=$2; shift ;;
    --criterion) CRITERION=$2; shift ;;
    --profile) PROFILE=1 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

[ $QUICK = 1 ] && [ $SETUPS_SET = 0 ] && SETUPS="host-veth kernel-routed xdp-ceiling kernel-vxlan sluice"
[ $QUICK = 1 ] && [ $LAYOUTS_SET = 0 ] && LAYOUTS=shared
for l in $LAYOUTS; do
  case $l in shared | dedicated) ;; *) echo "bench.sh: unknown layout $l (shared, dedicated)" >&2; exit 2 ;; esac
done
[ "$(id -u)" -eq 0 ] || { echo "bench.sh: needs root (network namespaces)" >&2; exit 1; }
scripts/setup.sh >/dev/null

PFX="slb-$$-"
SLDIR=$(mktemp -d "/tmp/${PFX}sluice.XXXXXX")
teardown() {
  topo_sluice_stop
  topo_cleanup "$PFX"
}
# On failure, show what the Sluice agents saw (log tail, drops by reason) before removing it all.
diag() {
  local n
  for n in 1 2; do
    [ -e "$SLDIR/n$n/agent.log" ] || continue
    echo "--- sluice-agent n$n: last log lines, worker counters" >&2
    tail -5 "$SLDIR/n$n/agent.log" >&2
    jq -c '.workers[] | {rx, tx, batches, ring_full, drops}' "$SLDIR/n$n/state/counters.json" >&2 || true
  done
}
trap 'rc=$?; [ $rc -eq 0 ] || diag; teardown; rm -rf "$SLDIR" "/tmp/${PFX}iperf.pid"' EXIT
trap 'exit 130' INT TERM
OUT=bench/results
# The smoke run must not overwrite the committed results of a real run.
[ "$QUICK" = 1 ] && OUT=bench/results/quick
mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW="$OUT/raw-$STAMP-mtu$MTU.jsonl"
: >"$RAW"
# layout_cores LAYOUT: the cores of the applications and of Sluice's workers (one per node) in that
# layout, the same for every setup.
#   shared:    client CPU 0, server CPU 1; node 1's worker on CPU 0 (its pod's core), node 2's on 1.
#   dedicated: client and server CPU 0; both workers alone on CPU 1. The kernel setups' softirq
#              work runs where the kernel puts it (mostly on the sending application's core).
layout_cores() {
  LAYOUT=$1
  case $1 in
    shared) CLIENT_CPU=0 SERVER_CPU=1 WORKER_CPUS=(0 1) ;;
    dedicated) CLIENT_CPU=0 SERVER_CPU=0 WORKER_CPUS=(1 1) ;;
  esac
}

record() { # setup metric value
  printf '{"setup":"%s","layout":"%s","mtu":%s,"metric":"%s","value":%s}\n' \
    "$1" "$LAYOUT" "$MTU" "$2" "$3" >>"$RAW"
}

# CPU cost. cpu_ticks: busy time of all CPUs so far (user + nice + system + irq + softirq, in
# clock ticks, from /proc/stat's "cpu" line); idle, iowait and steal are not counted.
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8; exit}' /proc/stat; }
# record_cpu SETUP METRIC TICKS_BEFORE TICKS_AFTER UNITS: CPU seconds spent per unit moved (UNITS:
# GB or million packets received) during one measured run.
record_cpu() {
  record "$1" "$2" "$(awk -v a="$3" -v b="$4" -v hz="$CLK_TCK" -v u="$5" \
    'BEGIN { if (u > 0) printf "%.4f", (b - a) / hz / u; else print "null" }')"
}

# need SETUP WHAT VALUE [MIN]: fail the run unless VALUE is a number above MIN (default 0).
need() {
  if ! awk -v v="$3" -v m="${4:-0}" 'BEGIN { exit !(v ~ /^[0-9.eE+-]+$/ && v + 0 > m) }'; then
    echo "bench.sh: $1 carried no traffic ($2 = '${3}')" >&2
    return 1
  fi
}

cli() { # SRC_NS CMD...: a client command on the client core, bounded in time
  local ns=$1; shift
  nsx "$ns" timeout $((SECS + 20)) taskset -c $CLIENT_CPU "$@"
}

servers_start() { # DST_NS BIND_IP
  nsx "$1" taskset -c $SERVER_CPU iperf3 -s -D -I "/tmp/${PFX}iperf.pid" >/dev/null
  nsx "$1" taskset -c $SERVER_CPU sockperf sr -i "$2" -p 11111 >/dev/null 2>&1 &
  sleep 0.5
}

servers_stop() { # DST_NS
  kill "$(cat "/tmp/${PFX}iperf.pid")" 2>/dev/null || true
  rm -f "/tmp/${PFX}iperf.pid"
  ip netns pids "$1" | xargs -r kill 2>/dev/null || true
  sleep 0.2
}

tcp() { # SETUP METRIC SRC IP STREAMS  (METRIC ends in _gbps; its CPU cost is METRIC_cpu_s_per_gb)
  local j v c0 c1
  c0=$(cpu_ticks)
  j=$(cli "$3" iperf3 -c "$4" -t "$SECS" -P "$5" --connect-timeout 3000 -J) ||
    { echo "bench.sh: $1: iperf3 TCP to $4 failed: $(jq -r .error <<<"$j" 2>/dev/null)" >&2; exit 1; }
  c1=$(cpu_ticks)
  v=$(jq '(.end.sum_received.bits_per_second // 0)/1e9' <<<"$j")
  need "$1" "$2" "$v" || { echo "bench.sh: iperf3 said: $(jq -c '.error // .end' <<<"$j")" >&2; exit 1; }
  record "$1" "$2" "$v"
  record_cpu "$1" "${2%_gbps}_cpu_s_per_gb" "$c0" "$c1" "$(jq '(.end.sum_received.bytes // 0)/1e9' <<<"$j")"
}

# The rate (packets/s) kernel-vxlan's sender offered in its unthrottled 64 B UDP runs of this
# layout (the lowest repetition): udp64_same_load offers every later setup exactly that.
declare -A KVX_UDP_PPS=()

udp64() { # SETUP SRC IP
  local j v rx c0 c1 sent
  c0=$(cpu_ticks)
  j=$(cli "$2" iperf3 -c "$3" -t "$SECS" -u -l 64 -b 0 --connect-timeout 3000 -J) ||
    { echo "bench.sh: $1: iperf3 UDP to $3 failed: $(jq -r .error <<<"$j" 2>/dev/null)" >&2; exit 1; }
  c1=$(cpu_ticks)
  rx=$(jq '(.end.sum.packets // 0)-(.end.sum.lost_packets // 0)' <<<"$j")
  v=$(jq --argjson rx "$rx" '$rx/(.end.sum.seconds // 1)/1e3' <<<"$j")
  need "$1" udp64_kpps "$v" || { echo "bench.sh: iperf3 said: $(jq -c '.error // .end.sum' <<<"$j")" >&2; exit 1; }
  record "$1" udp64_kpps "$v"
  record "$1" udp64_loss_pct "$(jq '.end.sum.lost_percent' <<<"$j")"
  record_cpu "$1" udp64_cpu_s_per_mpkt "$c0" "$c1" "$(jq -n --argjson rx "$rx" '$rx/1e6')"
  if [ "$1" = kernel-vxlan ]; then
    sent=$(jq '((.end.sum.packets // 0)/(.end.sum.seconds // 1)) | floor' <<<"$j")
    if [ -z "${KVX_UDP_PPS[$LAYOUT]:-}" ] || [ "$sent" -lt "${KVX_UDP_PPS[$LAYOUT]}" ]; then
      KVX_UDP_PPS[$LAYOUT]=$sent
    fi
  fi
}

# udp64_same_load SETUP SRC IP: 64 B UDP at the rate kernel-vxlan's sender reached in this layout
# (iperf3 -b: payload bits/s), so that loss is compared at the same offered load; skipped for
# setups measured before kernel-vxlan.
udp64_same_load() {
  local pps=${KVX_UDP_PPS[$LAYOUT]:-} j
  [ -n "$pps" ] || return 0
  j=$(cli "$2" iperf3 -c "$3" -t "$SECS" -u -l 64 -b "$((pps * 64 * 8))" --connect-timeout 3000 -J) ||
    { echo "bench.sh: $1: iperf3 UDP at $pps pps to $3 failed: $(jq -r .error <<<"$j" 2>/dev/null)" >&2; exit 1; }
  record "$1" udp64_same_load_kpps_offered "$(jq '(.end.sum.packets // 0)/(.end.sum.seconds // 1)/1e3' <<<"$j")"
  record "$1" udp64_same_load_loss_pct "$(jq '.end.sum.lost_percent' <<<"$j")"
}

lat() { # SETUP SRC IP
  local j p50 p99
  j=$(cli "$2" sockperf pp -i "$3" -p 11111 -t "$SECS" -m 64 2>&1) || true
  p50=$(awk '/percentile 50.000/ {print $NF}' <<<"$j")
  p99=$(awk '/percentile 99.000/ {print $NF}' <<<"$j")
  need "$1" "latency (sockperf to $3)" "$p50" || { echo "bench.sh: sockperf said: $(tail -3 <<<"$j")" >&2; exit 1; }
  record "$1" lat_p50_us "$p50"
  record "$1" lat_p99_us "$p99"
}

# measure SETUP SRC_NS DST_NS DST_IP [FIGURES] [SERVER_IP]: FIGURES from "tcp1 tcp2 udp udpload
# lat" (default all); SERVER_IP is the address the servers bind (default DST_IP; differs for a VIP).
measure() {
  local setup=$1 src=$2 dst=$3 ip=$4 figs=${5:-"tcp1 tcp2 udp udpload lat"} rep f
  servers_start "$dst" "${6:-$ip}"
  for rep in $(seq "$REPS"); do
    echo "   $setup ($LAYOUT): repetition $rep/$REPS ($figs)" >&2
    for f in $figs; do
      case $f in
        tcp1) tcp "$setup" tcp1_gbps "$src" "$ip" 1 ;;
        tcp2) tcp "$setup" tcp2_gbps "$src" "$ip" 2 ;;
        udp) udp64 "$setup" "$src" "$ip" ;;
        udpload) udp64_same_load "$setup" "$src" "$ip" ;;
        lat) lat "$setup" "$src" "$ip" ;;
      esac
    done
  done
  servers_stop "$dst"
}

# same_node SETUP SRC_NS DST_NS DST_IP: same-node pod-to-pod TCP, one stream.
same_node() {
  local rep
  servers_start "$3" "$4"
  for rep in $(seq "$REPS"); do
    echo "   $1 ($LAYOUT): same-node repetition $rep/$REPS" >&2
    tcp "$1" same_tcp1_gbps "$2" "$4" 1
  done
  servers_stop "$3"
}

# profile NAME SRC_NS DST_NS IP: perf (cpu-clock on all CPUs, call graphs) during one TCP and one
# 64 B UDP run; the top of each report goes to $OUT/profile-NAME[-dedicated]-{tcp,udp}-mtuMTU.txt.
profile() {
  local name=$1 src=$2 dst=$3 ip=$4 kind data
  [ "$LAYOUT" = shared ] || name+="-$LAYOUT"
  command -v perf >/dev/null || { echo "   (no perf: profile of $name skipped)" >&2; return 0; }
  servers_start "$dst" "$ip"
  for kind in tcp udp; do
    data="$SLDIR/perf-$name-$kind.data"
    perf record -q -e cpu-clock -a -g -o "$data" -- sleep "$SECS" >/dev/null 2>&1 &
    if [ $kind = tcp ]; then
      cli "$src" iperf3 -c "$ip" -t "$SECS" >/dev/null
    else
      cli "$src" iperf3 -c "$ip" -t "$SECS" -u -l 64 -b 0 >/dev/null
    fi
    wait $! || true
    {
      echo "# perf record -e cpu-clock -a -g during iperf3 $kind ($name, MTU $MTU, layout $LAYOUT); client CPU $CLIENT_CPU, server CPU $SERVER_CPU"
      echo "# share of all samples (both CPUs) by CPU and command:"
      perf report -i "$data" --stdio --no-children -g none --sort cpu,comm 2>/dev/null | grep -E '^ +[0-9]' | head -16 || true
      echo "# hottest symbols of the data path (iperf3, sluice workers, softirq threads), share of all samples:"
      perf report -i "$data" --stdio --no-children -g none --comms "$(perf report -i "$data" --stdio --no-children --sort comm 2>/dev/null |
        awk '/^ +[0-9]/ && $2 ~ /^(iperf3|sluice-worker|ksoftirqd)/ {printf "%s%s", s, $2; s=","}')" \
        --sort comm,dso,sym 2>/dev/null | grep -E '^ +[0-9]' | head -45 || true
    } >"$OUT/profile-$name-$kind-mtu$MTU.txt"
    echo "   profile: $OUT/profile-$name-$kind-mtu$MTU.txt" >&2
  done
  servers_stop "$dst"
}

# ---- Sluice ---------------------------------------------------------------------------------------
SVC_VIP=10.96.0.10

# write_service FILE_SVC FILE_EPS BACKEND_IP: a ClusterIP Service for iperf3 (TCP+UDP 5201) and
# sockperf (UDP 11111), its EndpointSlice backed by BACKEND_IP.
write_service() {
  cat >"$1" <<YAML
apiVersion: v1
kind: Service
metadata: {name: bench, namespace: default}
spec:
  clusterIP: $SVC_VIP
  ports:
    - {name: iperf-tcp, port: 5201, targetPort: 5201, protocol: TCP}
    - {name: iperf-udp, port: 5201, targetPort: 5201, protocol: UDP}
    - {name: sockperf, port: 11111, targetPort: 11111, protocol: UDP}
YAML
  cat >"$2" <<YAML
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-1
  namespace: default
  labels: {kubernetes.io/service-name: bench}
addressType: IPv4
ports:
  - {name: iperf-tcp, port: 5201, protocol: TCP}
  - {name: iperf-udp, port: 5201, protocol: UDP}
  - {name: sockperf, port: 11111, protocol: UDP}
endpoints:
  - addresses: [$3]
YAML
}

# write_policies COUNT: COUNT NetworkPolicies in $SLDIR/policies-{0..9}.yaml (at most 1,000 YAML
# documents a file: the agent's YAML reader stops at 1,024 documents per file). "allow-client"
# isolates the server pods (app=bench) for ingress and allows everything from node 1's pod CIDR (an
# ipBlock: a standalone agent knows the labels of its own pods only, so a podSelector cannot match
# the remote client); the other COUNT-1 are generated: odd ones also select app=bench (so the
# server's ingress rule set grows with COUNT), even ones select pods that do not exist
# (app=other-i); each allows one /32 ipBlock on one TCP port. COUNT=0: no policy at all.
POLICY_FILES=$(printf "$SLDIR/policies-%d.yaml " 0 1 2 3 4 5 6 7 8 9)
write_policies() {
  local f
  for f in $POLICY_FILES; do echo "# generated by scripts/bench.sh" >"$f"; done
  awk -v n="$1" -v dir="$SLDIR" 'BEGIN {
    if (n == 0) exit
    f = dir "/policies-0.yaml"
    print "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-client, namespace: default}" >> f
    print "spec:\n  podSelector: {matchLabels: {app: bench}}\n  policyTypes: [Ingress]" >> f
    print "  ingress:\n    - from: [{ipBlock: {cidr: 10.244.1.0/24}}]" >> f
    for (i = 1; i < n; i++) {
      f = dir "/policies-" int(i / 1000) ".yaml"
      sel = (i % 2) ? "bench" : "other-" i
      printf "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: gen-%d, namespace: default}\n", i >> f
      printf "spec:\n  podSelector: {matchLabels: {app: %s}}\n  policyTypes: [Ingress]\n", sel >> f
      printf "  ingress:\n    - from: [{ipBlock: {cidr: 172.16.%d.%d/32}}]\n", int(i / 256), i % 256 >> f
      printf "      ports: [{port: %d, protocol: TCP}]\n", 20000 + i % 10000 >> f
    }
  }'
}

sluice_counters() { # SETUP PHASE: keep both nodes' worker counters after this phase
  sleep 1.2 # the agent rewrites counters.json every second
  local n
  for n in 1 2; do
    jq -c --arg s "$1" --arg lay "$LAYOUT" --arg l "$2" --arg n "n$n" --argjson mtu "$MTU" \
      '{setup: $s, layout: $lay, mtu: $mtu, phase: $l, node: $n, counters: .workers}' \
      "$SLDIR/n$n/state/counters.json" >>"$RAW"
  done
}

# sluice_setup: two Sluice nodes (node N's worker pinned to WORKER_CPUS[N - 1], see layout_cores),
# pods p1 (client, node 1), p2 (server, node 2), p3 (same-node server, node 1) wired by sluice-cni.
sluice_setup() {
  local n ip1 ip2 ip3 f
  for f in "$SLUICE_AGENT_BIN" "$SLUICE_CNI_BIN"; do
    [ -x "$f" ] || { echo "bench.sh: $f missing: cargo build --release -p sluice-agent --bin sluice-agent -p sluice-cni --bin sluice-cni" >&2; exit 1; }
  done
  # A fresh state (pod registry, IPAM records) for each Sluice setup of the run.
  rm -rf "$SLDIR/n1" "$SLDIR/n2"
  # The server's address is the CNI's first allocation on node 2 (.2; .0 and .1 are reserved).
  write_service "$SLDIR/services.yaml" "$SLDIR/endpointslices.yaml" "${POD_NET}.2.2"
  write_policies 0
  for n in 1 2; do
    topo_sluice_config "$PFX" "$n" "$MTU" "$SLDIR" "${WORKER_CPUS[$((n - 1))]}" \
      "$SLDIR/services.yaml" "$SLDIR/endpointslices.yaml" "$POLICY_FILES"
    topo_sluice_agent "$PFX" "$n" "$SLDIR"
  done
  ip1=$(topo_sluice_pod "$PFX" 1 1 "$SLDIR" "$MTU" '{"role":"client"}')
  ip2=$(topo_sluice_pod "$PFX" 2 2 "$SLDIR" "$MTU" '{"app":"bench"}')
  ip3=$(topo_sluice_pod "$PFX" 1 3 "$SLDIR" "$MTU" '{"app":"bench"}')
  [ "$ip2" = "${POD_NET}.2.2" ] || { echo "bench.sh: server pod got $ip2, the Service expects ${POD_NET}.2.2" >&2; exit 1; }
  SL_IP1=$ip1 SL_IP2=$ip2 SL_IP3=$ip3
  topo_log "sluice pods: client $ip1 (n1), server $ip2 (n2), same-node server $ip3 (n1)"
}

sluice_measure() {
  local pol_n t0
  measure sluice "${PFX}p1" "${PFX}p2" "$SL_IP2"
  sluice_counters sluice cross-node
  same_node sluice "${PFX}p1" "${PFX}p3" "$SL_IP3"
  sluice_counters sluice same-node
  measure sluice-clusterip "${PFX}p1" "${PFX}p2" "$SVC_VIP" "tcp1 lat" "$SL_IP2"
  sluice_counters sluice clusterip
  for pol_n in 10 10000; do
    echo "   installing $pol_n NetworkPolicies" >&2
    write_policies "$pol_n"
    t0=$(date +%s.%N)
    topo_sluice_reload "$SLDIR"
    t0=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
    echo "   $pol_n NetworkPolicies published by both agents in $t0 s" >&2
    record "sluice-pol$([ $pol_n = 10 ] && echo 10 || echo 10k)" policy_publish_s "$t0"
    measure "sluice-pol$([ $pol_n = 10 ] && echo 10 || echo 10k)" "${PFX}p1" "${PFX}p2" "$SL_IP2" "tcp1 lat"
    sluice_counters sluice "pol$pol_n"
  done
  write_policies 0
  topo_sluice_reload "$SLDIR"
  if [ "$PROFILE" = 1 ]; then profile sluice "${PFX}p1" "${PFX}p2" "$SL_IP2"; fi
}

# xdp_ceiling_pods: make kernel-routed's pods look like Sluice's: an XDP program on each host veth
# (XDP_PASS, so TSO is off in the pod, as under Sluice) and Sluice's MTUs (veth at SLUICE_POD_MTU,
# own node's CIDR at that, everything else at the underlay MTU: no overlay here).
XDP_PASS_OBJ=$SLDIR/xdp_pass.o
xdp_ceiling_pods() {
  local pod node
  [ -e "$XDP_PASS_OBJ" ] ||
    clang -O2 -g -target bpf -I"/usr/include/$(gcc -print-multiarch)" -c scripts/lib/xdp_pass.bpf.c -o "$XDP_PASS_OBJ"
  for pod in 1 2 3; do
    node=$(( pod == 2 ? 2 : 1 ))
    topo_xdp_pass "$PFX" "$node" "$pod" "$XDP_PASS_OBJ"
    topo_pod_route_mtus "$PFX" "$node" "$pod" "$SLUICE_POD_MTU" "$MTU"
  done
}

build_and_measure() {
  local setup=$1 pod_mtu=$MTU
  teardown
  echo "==> $setup (underlay MTU $MTU, layout $LAYOUT)" >&2
  topo_underlay "$PFX" "$MTU"
  case "$setup" in
    host-veth)
      measure "$setup" "${PFX}n1" "${PFX}n2" "${UNDERLAY_NET}.12" ;;
    kernel-routed | xdp-ceiling)
      [ "$setup" = xdp-ceiling ] && pod_mtu=$SLUICE_POD_MTU
      topo_pod_veth "$PFX" 1 "$pod_mtu" linklocal
      topo_pod_veth "$PFX" 2 "$pod_mtu" linklocal
      topo_pod_veth "$PFX" 1 "$pod_mtu" linklocal 3 "${POD_NET}.1.11"
      [ "$setup" = xdp-ceiling ] && xdp_ceiling_pods
      topo_routed "$PFX"
      measure "$setup" "${PFX}p1" "${PFX}p2" "${POD_NET}.2.10"
      same_node "$setup" "${PFX}p1" "${PFX}p3" "${POD_NET}.1.11" ;;
    kernel-vxlan)
      topo_pod_veth "$PFX" 1 "$((MTU - 50))" bridge
      topo_pod_veth "$PFX" 2 "$((MTU - 50))" bridge
      topo_pod_veth "$PFX" 1 "$((MTU - 50))" bridge 3 "${POD_NET}.1.11"
      topo_flannel "$PFX"
      measure "$setup" "${PFX}p1" "${PFX}p2" "${POD_NET}.2.10"
      same_node "$setup" "${PFX}p1" "${PFX}p3" "${POD_NET}.1.11"
      if [ "$PROFILE" = 1 ]; then profile kernel-vxlan "${PFX}p1" "${PFX}p2" "${POD_NET}.2.10"; fi ;;
    sluice)
      sluice_setup
      sluice_measure ;;
    sluice-rt)
      # The same, with the workers SCHED_FIFO: a worker sharing its core with a busy pod gets the
      # CPU as soon as a frame arrives instead of waiting for its time slice.
      SLUICE_WORKER_RT=50 sluice_setup
      measure "$setup" "${PFX}p1" "${PFX}p2" "$SL_IP2"
      sluice_counters sluice-rt cross-node
      same_node "$setup" "${PFX}p1" "${PFX}p3" "$SL_IP3"
      sluice_counters sluice-rt same-node ;;
    *) echo "bench.sh: unknown setup $setup" >&2; exit 2 ;;
  esac
}

for l in $LAYOUTS; do
  layout_cores "$l"
  for s in $SETUPS; do build_and_measure "$s"; done
done
teardown

# The criterion summary of the pipeline (per-packet cost of the pure code, no I/O).
if [ "$CRITERION" = run ]; then
  echo "==> criterion: cargo bench -p sluice-bench --bench pipeline" >&2
  cargo bench -p sluice-bench --bench pipeline -- --warm-up-time 1 --measurement-time 2 >&2
fi
if [ "$CRITERION" != off ]; then
  for f in target/criterion/{established,new_flow}/*/new/estimates.json; do
    [ -e "$f" ] || continue
    b=${f#target/criterion/}; b=${b%/new/estimates.json}
    bj="$(dirname "$f")/benchmark.json"
    printf '{"criterion":"%s","mean_ns":%s,"ci_ns":[%s,%s],"elements":%s}\n' "$b" \
      "$(jq .mean.point_estimate "$f")" "$(jq .mean.confidence_interval.lower_bound "$f")" \
      "$(jq .mean.confidence_interval.upper_bound "$f")" \
      "$(jq '.throughput.Elements // 1' "$bj" 2>/dev/null || echo 1)" >>"$RAW"
  done
fi

/usr/bin/python3 scripts/lib/bench_report.py "$OUT" "$RAW"
