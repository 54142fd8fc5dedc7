#!/usr/bin/env bash
# Sluice's main job, end to end, on one machine:
#   a control plane (sluice-control, embedded store, TLS + tokens) on an underlay switch,
#   two nodes in network namespaces each running sluice-agent (XDP + AF_XDP workers),
#   pods wired by the real CNI binary (sluice-cni), a Service and a NetworkPolicy applied with
#   `sluicectl apply -f examples/demo/`, then: pod to pod across nodes, the Service spreading
#   connections over its backends, a denied connection with its drop reason, a short iperf3 run,
#   and the counters.
#
# Usage: scripts/demo.sh [--quick] [--keep]
#   --quick  fewer connections and a 1-second iperf3 (the smoke run scripts/test.sh uses)
#   --keep   leave the cluster running at the end (Ctrl-C removes it)
# Needs root. Everything it creates (namespaces, veths, BPF pins, processes, files) is removed on
# exit, also on Ctrl-C or a failed step.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source scripts/lib/topo.sh

QUICK=0 KEEP=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    --keep) KEEP=1 ;;
    *) echo "demo.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

BOLD=$'\e[1m' DIM=$'\e[2m' RED=$'\e[31m' GREEN=$'\e[32m' OFF=$'\e[0m'
[ -t 1 ] || { BOLD='' DIM='' RED='' GREEN='' OFF=''; }
STEP=""
step() { STEP=$*; printf '\n%s==> %s%s\n' "$BOLD" "$*" "$OFF"; }
say() { printf '    %s\n' "$*"; }
ok() { printf '    %s%s%s\n' "$GREEN" "$*" "$OFF"; }
fail() {
  printf '\n%sFAILED at step "%s": %s%s\n' "$RED" "$STEP" "$*" "$OFF" >&2
  printf '    look at: %s (agent logs n1/agent.log n2/agent.log, control.log)\n' "$WORK" >&2
  KEEP_LOGS=1
  exit 1
}

[ "$(id -u)" -eq 0 ] || { echo "demo.sh: needs root (network namespaces, XDP)" >&2; exit 1; }

PFX="sld-$$-"
WORK=$(mktemp -d /tmp/sluice-demo.XXXXXX)
KEEP_LOGS=0
CONTROL_IP=${UNDERLAY_NET}.254
# Daemons to stop on exit, in this order (agents before the control plane): "name pid log".
DAEMONS=()
SERVERS=()

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  for p in "${SERVERS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  if [ ${#DAEMONS[@]} -gt 0 ]; then
    printf '\n%s==> stopping the daemons with SIGTERM (their clean shutdown path)%s\n' "$BOLD" "$OFF"
    local i d
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
      read -r -a d <<<"${DAEMONS[$i]}"
      stop_daemon "${d[0]}" "${d[1]}" "${d[2]}" || { [ "$rc" -eq 0 ] && rc=1; }
    done
  fi
  topo_cleanup "$PFX"
  for m in "$WORK"/n*/bpf; do mountpoint -q "$m" 2>/dev/null && umount "$m"; done
  if [ "$KEEP_LOGS" = 1 ]; then
    echo "    logs kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo; echo "interrupted"; exit 130' INT TERM

step "1/10 system packages and release build"
scripts/setup.sh
cargo build --release --locked -q -p sluice-agent -p sluice-control -p sluice-cni --bins
BIN=$ROOT/target/release
for b in sluice-agent sluice-control sluicectl sluice-cni; do
  [ -x "$BIN/$b" ] || fail "$BIN/$b was not built"
done
ok "built sluice-agent, sluice-control, sluicectl, sluice-cni"

step "2/10 underlay: a switch and two nodes in network namespaces"
topo_underlay "$PFX" 1500
nsx "${PFX}sw" ip addr add "$CONTROL_IP/24" dev br0
say "switch ${PFX}sw (bridge br0, control plane at $CONTROL_IP)"
say "nodes ${PFX}n1 (${UNDERLAY_NET}.11) and ${PFX}n2 (${UNDERLAY_NET}.12), uplink up0, MTU 1500"

step "3/10 control plane: sluice-control (embedded store, TLS, a token per node and for the operator)"
mkdir -p "$WORK/pki" "$WORK/control"
(
  cd "$WORK/pki"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj "/CN=sluice demo CA" -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=sluice-control" \
    -keyout server.key -out server.csr 2>/dev/null
  printf 'subjectAltName=DNS:sluice-control,IP:%s\n' "$CONTROL_IP" >san.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
    -extfile san.ext -out server.pem 2>/dev/null
)
tok() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
OPERATOR_TOKEN=$(tok)
{
  echo "operator demo-admin $OPERATOR_TOKEN"
  for n in 1 2; do t=$(tok); echo "$t" >"$WORK/pki/n$n.token"; echo "node n$n $t"; done
} >"$WORK/pki/tokens"
chmod 600 "$WORK/pki/tokens" "$WORK/pki"/*.token "$WORK/pki"/*.key
nsx_bg "${PFX}sw" "$BIN/sluice-control" --listen "$CONTROL_IP:7443" --data-dir "$WORK/control" \
  --tls-cert "$WORK/pki/server.pem" --tls-key "$WORK/pki/server.key" --tokens "$WORK/pki/tokens" \
  >"$WORK/control.log" 2>&1
DAEMONS+=("sluice-control $! $WORK/control.log")
export SLUICE_SERVER="https://$CONTROL_IP:7443" SLUICE_CA="$WORK/pki/ca.pem" SLUICE_TOKEN="$OPERATOR_TOKEN"
ctl() { nsx "${PFX}n1" env SLUICE_SERVER="$SLUICE_SERVER" SLUICE_CA="$SLUICE_CA" SLUICE_TOKEN="$SLUICE_TOKEN" "$BIN/sluicectl" "$@"; }
for _ in $(seq 50); do ctl status >/dev/null 2>&1 && break; sleep 0.2; done
ctl status >/dev/null 2>&1 || fail "sluice-control did not answer (see $WORK/control.log)"
ok "sluice-control up at $SLUICE_SERVER"

step "4/10 agents: sluice-agent on each node (XDP on the uplink, AF_XDP workers)"
for n in 1 2; do
  d=$WORK/n$n
  mkdir -p "$d/state" "$d/bpf" "$d/ipam"
  mount -t bpf bpf "$d/bpf"
  cat >"$d/node.yaml" <<EOF
node_name: n$n
underlay:
  interface: up0
  address: ${UNDERLAY_NET}.1$n
  mtu: 1500
vtep:
  mac: "0e:5c:02:00:00:0$n"
control:
  endpoint: $SLUICE_SERVER
  ca_file: $WORK/pki/ca.pem
  token_file: $WORK/pki/n$n.token
  tls_domain: sluice-control
workers:
  pin: true
  queues: {0: $((n - 1))}
paths:
  socket: $d/agent.sock
  state_dir: $d/state
  bpffs: $d/bpf
EOF
  NO_COLOR=1 nsx_bg "${PFX}n$n" "$BIN/sluice-agent" --config "$d/node.yaml" >"$d/agent.log" 2>&1
  DAEMONS+=("sluice-agent/n$n $! $d/agent.log")
done
for n in 1 2; do
  for _ in $(seq 100); do [ -S "$WORK/n$n/agent.sock" ] && break; sleep 0.2; done
  [ -S "$WORK/n$n/agent.sock" ] || fail "agent n$n did not open its socket (see $WORK/n$n/agent.log)"
done
for _ in $(seq 50); do [ "$(ctl nodes 2>/dev/null | grep -c '^n[12] ')" = 2 ] && break; sleep 0.2; done
ctl nodes | sed 's/^/    /'
ok "both agents registered; each leased a pod CIDR from 10.244.0.0/16"

step "5/10 pods: wired by the CNI binary (veth, /32 address, routes, registration with the agent)"
declare -A POD_IP POD_NS
cni() { # node command pod [labels-json]
  local n=$1 cmd=$2 pod=$3 labels=${4:-"{}"}
  nsx "${PFX}n$n" env CNI_COMMAND="$cmd" CNI_CONTAINERID="demo-$pod" CNI_NETNS="/var/run/netns/${PFX}$pod" \
    CNI_IFNAME=eth0 CNI_PATH="$BIN" CNI_ARGS="K8S_POD_NAMESPACE=demo;K8S_POD_NAME=$pod" \
    "$BIN/sluice-cni" <<EOF
{"cniVersion": "1.0.0", "name": "sluice", "type": "sluice-cni",
 "agentSocket": "$WORK/n$n/agent.sock", "ipam": {"dataDir": "$WORK/n$n/ipam"},
 "runtimeConfig": {"labels": $labels}}
EOF
}
add_pod() { # node pod labels-json
  local n=$1 pod=$2 out
  ip netns add "${PFX}$pod"
  nsx "${PFX}$pod" ip link set lo up
  out=$(cni "$n" ADD "$pod" "$3") || fail "CNI ADD of $pod: $out"
  POD_IP[$pod]=$(jq -r '.ips[0].address' <<<"$out" | cut -d/ -f1)
  POD_NS[$pod]="${PFX}$pod"
  say "$(printf '%-8s on n%s  %-12s labels %s' "$pod" "$n" "${POD_IP[$pod]}" "$3")"
}
add_pod 1 client '{"role": "client"}'
add_pod 1 web-1 '{"app": "web"}'
add_pod 2 web-2 '{"app": "web"}'
add_pod 2 web-3 '{"app": "web"}'
add_pod 2 intruder '{"role": "intruder"}'
for w in web-1 web-2 web-3; do
  nsx_bg "${POD_NS[$w]}" socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:"echo $w" >/dev/null 2>&1
  SERVERS+=($!)
done
nsx "${POD_NS[web-2]}" iperf3 -s -D -I "$WORK/iperf3.pid" >/dev/null
ok "5 pods; web-1..3 answer their name on :8080, web-2 runs an iperf3 server"

step "6/10 sluicectl apply -f examples/demo/ (Namespace, Service) and the web EndpointSlice"
cat >"$WORK/endpoints.yaml" <<EOF
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
- {addresses: ["${POD_IP[web-1]}"], nodeName: n1, conditions: {ready: true, serving: true, terminating: false}}
- {addresses: ["${POD_IP[web-2]}"], nodeName: n2, conditions: {ready: true, serving: true, terminating: false}}
- {addresses: ["${POD_IP[web-3]}"], nodeName: n2, conditions: {ready: true, serving: true, terminating: false}}
EOF
ctl apply -f examples/demo/00-namespace.yaml -f examples/demo/10-service.yaml -f "$WORK/endpoints.yaml" | sed 's/^/    /'
VIP=$(ctl get svc web -n demo -o json | jq -r '.spec.clusterIP')
[ -n "$VIP" ] && [ "$VIP" != null ] || fail "the Service got no ClusterIP"
ok "Service demo/web has ClusterIP $VIP (port 80 -> 8080 on 3 backends)"

step "7/10 pod to pod across nodes (client on n1 -> web-2 on n2, VXLAN between the nodes)"
nsx "${POD_NS[client]}" ping -c 3 -i 0.2 -W 2 "${POD_IP[web-2]}" | sed 's/^/    /' \
  || fail "ping client -> web-2 failed"
got=$(nsx "${POD_NS[client]}" socat -T 3 - "TCP:${POD_IP[web-2]}:8080" </dev/null) || true
[ "$got" = web-2 ] || fail "TCP client -> web-2:8080 answered '$got'"
ok "ping and TCP across nodes work"

step "8/10 the Service spreads connections over its backends (Maglev)"
N=$([ "$QUICK" = 1 ] && echo 12 || echo 60)
declare -A HITS=([web-1]=0 [web-2]=0 [web-3]=0)
for i in $(seq "$N"); do
  got=$(nsx "${POD_NS[client]}" socat -T 3 - "TCP:$VIP:80" </dev/null 2>/dev/null) || true
  case "$got" in web-[123]) HITS[$got]=$((HITS[$got] + 1)) ;; *) fail "connection $i to $VIP:80 answered '$got'" ;; esac
done
for w in web-1 web-2 web-3; do say "$(printf '%-6s %3d connections' "$w" "${HITS[$w]}")"; done
say "the flow events of n1 show each connection's backend after DNAT (sluicectl observe):"
ctl observe --agent-socket "$WORK/n1/agent.sock" --to "$VIP" --last 3 | sed 's/^/      /'
ok "$N connections to $VIP:80 spread over the backends, each answered by the one Maglev chose"

step "9/10 NetworkPolicy: only role=client may reach app=web"
ctl apply -f examples/demo/20-policy.yaml | sed 's/^/    /'
sleep 1
if got=$(nsx "${POD_NS[intruder]}" socat -T 2 - "TCP:${POD_IP[web-3]}:8080,connect-timeout=2" </dev/null 2>&1) && [ -n "$got" ]; then
  fail "intruder reached web-3 despite the policy (answer: $got)"
fi
say "intruder (n2) -> web-3:8080: no answer (dropped)"
got=$(nsx "${POD_NS[client]}" socat -T 3 - "TCP:${POD_IP[web-3]}:8080" </dev/null) || true
[ "$got" = web-3 ] || fail "client -> web-3 should be allowed, answered '$got'"
say "client   (n1) -> web-3:8080: answered '$got' (allowed)"
sleep 1.2
say "drop counters on n2 (from $WORK/n2/state/counters.json):"
jq -r '[.workers[].drops | to_entries[]] | group_by(.key)[] | "      \(.[0].key): \(map(.value) | add)"' \
  "$WORK/n2/state/counters.json"
say "why was the intruder's packet dropped? sluicectl observe --verdict DROPPED on n2:"
ctl observe --agent-socket "$WORK/n2/agent.sock" --verdict DROPPED --pod demo/intruder --last 2 | sed 's/^/      /'
ok "denied with the reason the pipeline counted and the policy that decided"

step "10/10 iperf3 client (n1) -> web-2 (n2), through the Sluice dataplane"
SECS=$([ "$QUICK" = 1 ] && echo 1 || echo 5)
j=$(nsx "${POD_NS[client]}" iperf3 -c "${POD_IP[web-2]}" -t "$SECS" -J) || fail "iperf3 failed"
say "$(jq -r '"TCP \(.end.sum_received.bits_per_second/1e9*100|round/100) Gbit/s, \(.end.sum_received.bytes) bytes received, \(.end.sum_sent.retransmits) retransmits"' <<<"$j")"
sleep 1.2
for n in 1 2; do
  say "counters n$n: $(jq -c '{pods, rx: ([.workers[].rx]|add), tx: ([.workers[].tx]|add), batches: ([.workers[].batches]|add), to_kernel: ([.workers[].to_kernel]|add)}' "$WORK/n$n/state/counters.json")"
done
ctl status | sed 's/^/    /'
ok "demo complete"

if [ "$KEEP" = 1 ]; then
  say "cluster kept; pods: ${!POD_NS[*]} (netns ${PFX}<pod>); Ctrl-C removes everything"
  sleep infinity
fi
