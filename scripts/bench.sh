#!/usr/bin/env bash
# Side-by-side benchmark of pod networking on one machine: the same two-node topology built several
# ways in one run, each measured with the same tools on the same cores.
#
#   setups:  host-veth (two nodes talking over the underlay, no pods: the ceiling)
#            kernel-routed (pods, kernel routing, no overlay)
#            kernel-vxlan (pods, Flannel's kernel VXLAN: vxlan device + bridge)
#            sluice (pods, Sluice's AF_XDP dataplane, VXLAN between nodes)
#   figures: iperf3 TCP 1 and 2 streams (Gbit/s), iperf3 UDP 64-byte payload (received kpps, loss),
#            sockperf ping-pong latency p50/p99 (us); medians of REPS repetitions with ranges.
#
# Usage: scripts/bench.sh [--quick] [--setups "a b c"] [--mtu 1500] [--reps 3] [--secs 5]
#   --quick  one short repetition of each figure (the smoke run scripts/test.sh uses)
# Output: a Markdown table on stdout (ratios to kernel-vxlan), raw results in bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/topo.sh

SETUPS="host-veth kernel-routed kernel-vxlan"
MTU=1500 REPS=3 SECS=5 QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; REPS=1; SECS=1 ;;
    --setups) SETUPS=$2; shift ;;
    --mtu) MTU=$2; shift ;;
    --reps) REPS=$2; shift ;;
    --secs) SECS=$2; shift ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

[ "$(id -u)" -eq 0 ] || { echo "bench.sh: needs root (network namespaces)" >&2; exit 1; }
scripts/setup.sh >/dev/null

PFX="slb-$$-"
trap 'topo_cleanup "$PFX"' EXIT INT TERM
OUT=bench/results
mkdir -p "$OUT"
RAW="$OUT/raw-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
: >"$RAW"
# Same cores for every setup: client on CPU 0, server on CPU 1.
CLIENT_CPU=0 SERVER_CPU=1

record() { # setup metric value
  printf '{"setup":"%s","mtu":%s,"metric":"%s","value":%s}\n' "$1" "$MTU" "$2" "$3" >>"$RAW"
}

# measure SETUP SRC_NS DST_NS DST_IP
measure() {
  local setup=$1 src=$2 dst=$3 ip=$4 rep j
  nsx "$dst" taskset -c $SERVER_CPU iperf3 -s -D -I "/tmp/${PFX}iperf.pid" >/dev/null
  nsx "$dst" taskset -c $SERVER_CPU sockperf sr -i "$ip" -p 11111 >/dev/null 2>&1 &
  sleep 0.5
  for rep in $(seq "$REPS"); do
    echo "   $setup: repetition $rep/$REPS" >&2
    j=$(nsx "$src" taskset -c $CLIENT_CPU iperf3 -c "$ip" -t "$SECS" -J)
    record "$setup" tcp1_gbps "$(jq '.end.sum_received.bits_per_second/1e9' <<<"$j")"
    j=$(nsx "$src" taskset -c $CLIENT_CPU iperf3 -c "$ip" -t "$SECS" -P 2 -J)
    record "$setup" tcp2_gbps "$(jq '.end.sum_received.bits_per_second/1e9' <<<"$j")"
    j=$(nsx "$src" taskset -c $CLIENT_CPU iperf3 -c "$ip" -t "$SECS" -u -l 64 -b 0 -J)
    record "$setup" udp64_kpps "$(jq '(.end.sum.packets-.end.sum.lost_packets)/.end.sum.seconds/1e3' <<<"$j")"
    record "$setup" udp64_loss_pct "$(jq '.end.sum.lost_percent' <<<"$j")"
    j=$(nsx "$src" taskset -c $CLIENT_CPU sockperf pp -i "$ip" -p 11111 -t "$SECS" -m 64 2>&1)
    record "$setup" lat_p50_us "$(awk '/percentile 50.000/ {print $NF}' <<<"$j")"
    record "$setup" lat_p99_us "$(awk '/percentile 99.000/ {print $NF}' <<<"$j")"
  done
  kill "$(cat "/tmp/${PFX}iperf.pid")" 2>/dev/null || true
  rm -f "/tmp/${PFX}iperf.pid"
  ip netns pids "$dst" | xargs -r kill 2>/dev/null || true
}

build_and_measure() {
  local setup=$1
  topo_cleanup "$PFX"
  echo "==> $setup (underlay MTU $MTU)" >&2
  topo_underlay "$PFX" "$MTU"
  case "$setup" in
    host-veth)
      measure "$setup" "${PFX}n1" "${PFX}n2" "${UNDERLAY_NET}.12" ;;
    kernel-routed)
      topo_pod_veth "$PFX" 1 "$MTU" linklocal
      topo_pod_veth "$PFX" 2 "$MTU" linklocal
      topo_routed "$PFX"
      measure "$setup" "${PFX}p1" "${PFX}p2" "${POD_NET}.2.10" ;;
    kernel-vxlan)
      topo_pod_veth "$PFX" 1 "$((MTU - 50))" bridge
      topo_pod_veth "$PFX" 2 "$((MTU - 50))" bridge
      topo_flannel "$PFX"
      measure "$setup" "${PFX}p1" "${PFX}p2" "${POD_NET}.2.10" ;;
    sluice)
      sluice_setup
      measure "$setup" "${PFX}p1" "${PFX}p2" "${POD_NET}.2.10" ;;
    *) echo "bench.sh: unknown setup $setup" >&2; exit 2 ;;
  esac
}

for s in $SETUPS; do build_and_measure "$s"; done
topo_cleanup "$PFX"

/usr/bin/python3 scripts/lib/bench_report.py "$RAW" "$OUT"
