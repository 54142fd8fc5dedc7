#!/usr/bin/env bash
# Churn soak: the two-node cluster of scripts/demo.sh (sluice-control with its embedded store, TLS
# and tokens; a sluice-agent per node; pods wired by sluice-cni) under traffic and changes for N
# minutes, then an end-of-run table of everything that must not leak.
#
# Traffic, all run long:
#   - iperf3 --bidir between a pod of each node (10-second runs, 100 Mbit/s each way, back to back);
#   - a prober: short TCP connects (socat, every 0.5 s per pair, each recorded with its start and end
#     time) of pairs a NetworkPolicy allows (client -> web pod on the same node, on the other node,
#     and through a ClusterIP Service) and of pairs it denies (intruder -> web, same node and other);
#   - two flow generators, one per node (UDP datagrams from fresh source ports, SOAK_EVENT_RATE a
#     second each, default 300), so that the bounded flow-event histories of agents and control
#     plane fill early in the run.
# Changes, all the time: churn pods added and deleted through the CNI binary on both nodes (up to
# SOAK_PODS per node live, default 12, hundreds over a run); NetworkPolicies and Services with their
# EndpointSlices (the live churn pods) created, changed and deleted through `sluicectl apply/delete`.
# Disruptions, spread over the first 45 % of the run: each agent SIGKILLed and restarted (at least
# twice in all, one per 5 minutes up to 6) with churn pods deleted (CNI DEL) while it is down; the
# control plane restarted (SIGTERM, and SIGKILL if it has not stopped 10 s later, which fails a
# check; once, one per 10 minutes up to 3). The rest of the run is steady churn, over which memory
# must stay flat.
#
# At the end every churn pod, policy and Service is deleted and the table compares what is left with
# the pods still running (the fixed ones): pod IPs in the CNI's IPAM, host veths, the agents' pod
# registries, the control plane's Pods, BPF map entries (sluice_ifaces, sluice_xsk_slots,
# sluice_isolated) and link pins, UMEM frames lost (sluice_agent_umem_frames{state="lost"}), file
# descriptors of agents and control plane (start of the run vs end), resident memory of each (its
# last incarnation: flat within 10 % once its flow-event history is full, with the bytes each held
# event costs), and the prober (no denied connect got through; no allowed connect failed outside the
# seconds after an agent kill: from the SIGKILL to SOAK_GRACE seconds, default 5, after the restarted
# agent is up). Exits non-zero when any check fails.
#
# Usage: scripts/soak.sh [--minutes N] [--keep-logs]   (N: default 2, the run scripts/test.sh makes)
#   SOAK_BIN=DIR   take sluice-agent, sluice-control, sluicectl and sluice-cni from DIR instead of
#                  building the release binaries into target/release
#   SOAK_HISTORY=N revisions the control plane's store keeps (--history; default 200, see below)
# Needs root. Namespaces (prefix "sls-<pid>-"), processes, BPF pins and files are removed on every
# exit path; logs and samples are kept in the work directory when a check fails or with --keep-logs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source scripts/lib/topo.sh

MINUTES=2 KEEP_LOGS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes)
      [ $# -ge 2 ] || { echo "soak.sh: --minutes needs a value" >&2; exit 2; }
      MINUTES=$2
      shift
      ;;
    --keep-logs) KEEP_LOGS=1 ;;
    *) echo "soak.sh: unknown argument $1 (usage: scripts/soak.sh [--minutes N] [--keep-logs])" >&2; exit 2 ;;
  esac
  shift
done
[[ "$MINUTES" =~ ^[1-9][0-9]*$ ]] || { echo "soak.sh: --minutes needs a whole number of minutes (1 or more)" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "soak.sh: needs root (network namespaces, XDP, bpffs)" >&2; exit 1; }

EVENT_RATE=${SOAK_EVENT_RATE:-300}
PODS_PER_NODE=${SOAK_PODS:-12}
GRACE=${SOAK_GRACE:-5}
# Revisions the control plane's store keeps (sluice-control --history): small, so that this
# bounded history is full (and compaction runs on every commit) before the memory check starts; at
# the default (100,000) the store's file (about 200 B a revision here) and the pages redb caches
# grow for hours, which a run of minutes cannot tell from a leak.
HISTORY=${SOAK_HISTORY:-200}
# Flow events a full history holds: per node in the control plane (control/src/flows.rs
# NODE_HISTORY) and in an agent (agent/src/events.rs HISTORY).
CONTROL_HISTORY_PER_NODE=10000
AGENT_HISTORY=10000

START=$(date +%s)
say() { printf '    %s\n' "$*"; }
step() { printf '\n==> [%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() {
  printf '\nsoak.sh: %s\n' "$*" >&2
  KEEP_LOGS=1
  exit 1
}

PFX="sls-$$-"
WORK=$(mktemp -d /tmp/sluice-soak.XXXXXX)
CONTROL_IP=${UNDERLAY_NET}.254
BIN=$ROOT/target/release
BG=()           # background loops and servers started from this shell
declare -A AGENT_PID
CONTROL_PID=""

cleanup() {
  local rc=$? p n
  set +e
  trap - EXIT INT TERM
  touch "$WORK/stop"
  for p in "${BG[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${BG[@]}"; do wait "$p" 2>/dev/null; done
  for n in 1 2; do
    [ -n "${AGENT_PID[$n]:-}" ] && { stop_daemon "sluice-agent/n$n" "${AGENT_PID[$n]}" "$WORK/n$n/agent.log" >/dev/null || true; }
  done
  [ -n "$CONTROL_PID" ] && { stop_daemon sluice-control "$CONTROL_PID" "$WORK/control.log" >/dev/null || true; }
  topo_cleanup "$PFX"
  for m in "$WORK"/n*/bpf; do mountpoint -q "$m" 2>/dev/null && umount -l "$m"; done
  if [ "$KEEP_LOGS" = 1 ] || [ "$rc" -ne 0 ]; then
    echo "soak.sh: logs, samples and probe results kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo; echo "soak.sh: interrupted"; exit 130' INT TERM

now() { date +%s.%N | cut -c1-14; }
event() { echo "$(now) $*" >>"$WORK/events.log"; }

step "release binaries"
scripts/setup.sh >/dev/null
if [ -n "${SOAK_BIN:-}" ]; then
  BIN=$SOAK_BIN
  say "binaries from $BIN (SOAK_BIN), not built"
else
  cargo build --release --locked -q -p sluice-agent -p sluice-control -p sluice-cni --bins
fi
for b in sluice-agent sluice-control sluicectl sluice-cni; do
  [ -x "$BIN/$b" ] || die "$BIN/$b was not built"
done
PY=$(command -v /usr/bin/python3 || command -v python3)

step "cluster: control plane and two agents in network namespaces (prefix $PFX, work dir $WORK)"
topo_underlay "$PFX" 1500
nsx "${PFX}sw" ip addr add "$CONTROL_IP/24" dev br0
nsx "${PFX}sw" ip link set lo up
mkdir -p "$WORK/pki" "$WORK/control"
(
  cd "$WORK/pki"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj "/CN=sluice soak CA" -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=sluice-control" \
    -keyout server.key -out server.csr 2>/dev/null
  printf 'subjectAltName=DNS:sluice-control,IP:%s\n' "$CONTROL_IP" >san.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
    -extfile san.ext -out server.pem 2>/dev/null
)
tok() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
OPERATOR_TOKEN=$(tok)
{
  echo "operator soak-admin $OPERATOR_TOKEN"
  for n in 1 2; do t=$(tok); echo "$t" >"$WORK/pki/n$n.token"; echo "node n$n $t"; done
} >"$WORK/pki/tokens"
chmod 600 "$WORK/pki/tokens" "$WORK/pki"/*.token "$WORK/pki"/*.key
export SLUICE_SERVER="https://$CONTROL_IP:7443" SLUICE_CA="$WORK/pki/ca.pem" SLUICE_TOKEN="$OPERATOR_TOKEN"
ctl() { nsx "${PFX}n1" "$BIN/sluicectl" "$@"; }

start_control() {
  nsx_bg "${PFX}sw" "$BIN/sluice-control" --listen "$CONTROL_IP:7443" --data-dir "$WORK/control" \
    --tls-cert "$WORK/pki/server.pem" --tls-key "$WORK/pki/server.key" --tokens "$WORK/pki/tokens" \
    --metrics-listen "$CONTROL_IP:9479" --history "$HISTORY" >>"$WORK/control.log" 2>&1
  CONTROL_PID=$!
  echo "$CONTROL_PID" >"$WORK/pid.control"
  local i
  for i in $(seq 100); do ctl status >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "sluice-control did not answer (see $WORK/control.log)"
}

# start_agent N: start node N's agent and wait until its datapath is up (a fresh counters file
# saying so; the one a killed agent left is removed first).
start_agent() {
  local n=$1 d=$WORK/n$1 i
  rm -f "$d/state/counters.json"
  NO_COLOR=1 nsx_bg "${PFX}n$n" "$BIN/sluice-agent" --config "$d/node.yaml" >>"$d/agent.log" 2>&1
  AGENT_PID[$n]=$!
  echo "${AGENT_PID[$n]}" >"$WORK/pid.agent$n"
  for i in $(seq 150); do
    grep -qs '"datapath": *true' "$d/state/counters.json" && [ -S "$d/agent.sock" ] && return 0
    kill -0 "${AGENT_PID[$n]}" 2>/dev/null || break
    sleep 0.2
  done
  tail -20 "$d/agent.log" >&2
  die "sluice-agent of n$n did not come up"
}

start_control
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
metrics_listen: 127.0.0.1:9090
paths:
  socket: $d/agent.sock
  state_dir: $d/state
  bpffs: $d/bpf
EOF
  start_agent "$n"
done
for _ in $(seq 50); do [ "$(ctl nodes 2>/dev/null | grep -c '^n[12] ')" = 2 ] && break; sleep 0.2; done
[ "$(ctl nodes 2>/dev/null | grep -c '^n[12] ')" = 2 ] || die "the agents did not register with the control plane"
say "sluice-control pid $CONTROL_PID, agents n1 pid ${AGENT_PID[1]}, n2 pid ${AGENT_PID[2]}"

# ---- pods ----------------------------------------------------------------------------------------
declare -A POD_IP POD_NODE   # live pods: name -> address, node
cni() { # NODE COMMAND POD NAMESPACE LABELS-JSON
  local n=$1 cmd=$2 pod=$3 ns=$4 labels=$5
  nsx "${PFX}n$n" env CNI_COMMAND="$cmd" CNI_CONTAINERID="soak-$pod" CNI_NETNS="/var/run/netns/${PFX}$pod" \
    CNI_IFNAME=eth0 CNI_PATH="$BIN" CNI_ARGS="K8S_POD_NAMESPACE=$ns;K8S_POD_NAME=$pod" \
    "$BIN/sluice-cni" <<EOF
{"cniVersion": "1.0.0", "name": "sluice", "type": "sluice-cni",
 "agentSocket": "$WORK/n$n/agent.sock", "ipam": {"dataDir": "$WORK/n$n/ipam"},
 "runtimeConfig": {"labels": $labels}}
EOF
}
# add_pod NODE POD NAMESPACE LABELS-JSON: 0 and the pod is live, or 1 with the CNI's answer in
# $WORK/last-add-error.
add_pod() {
  local n=$1 pod=$2 out
  ip netns add "${PFX}$pod"
  nsx "${PFX}$pod" ip link set lo up
  if out=$(cni "$n" ADD "$pod" "$3" "$4" 2>&1); then
    POD_IP[$pod]=$(jq -r '.ips[0].address' <<<"$out" | cut -d/ -f1)
    POD_NODE[$pod]=$n
    return 0
  fi
  echo "$out" >"$WORK/last-add-error"
  cni "$n" DEL "$pod" "$3" "$4" >/dev/null 2>&1 || true
  ip netns del "${PFX}$pod" 2>/dev/null || true
  return 1
}
del_pod() { # POD NAMESPACE: CNI DEL, then the namespace goes (as a runtime does)
  local pod=$1 n=${POD_NODE[$1]} out rc=0
  out=$(cni "$n" DEL "$pod" "$2" '{}' 2>&1) || { rc=1; echo "$(now) DEL $pod on n$n: $out" >>"$WORK/del-errors.log"; }
  ip netns del "${PFX}$pod" 2>/dev/null || true
  unset "POD_IP[$pod]" "POD_NODE[$pod]"
  return $rc
}

step "fixed pods, their Service and NetworkPolicy"
ctl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: soak}
---
apiVersion: v1
kind: Namespace
metadata: {name: churn}
EOF
add_pod 1 client soak '{"role": "client"}' || die "CNI ADD client: $(cat "$WORK/last-add-error")"
add_pod 1 web-a soak '{"app": "web"}' || die "CNI ADD web-a: $(cat "$WORK/last-add-error")"
add_pod 2 web-b soak '{"app": "web"}' || die "CNI ADD web-b: $(cat "$WORK/last-add-error")"
add_pod 2 intruder soak '{"role": "intruder"}' || die "CNI ADD intruder: $(cat "$WORK/last-add-error")"
add_pod 1 ipf-1 soak '{"role": "iperf"}' || die "CNI ADD ipf-1: $(cat "$WORK/last-add-error")"
add_pod 2 ipf-2 soak '{"role": "iperf"}' || die "CNI ADD ipf-2: $(cat "$WORK/last-add-error")"
add_pod 1 evgen soak '{"role": "evgen"}' || die "CNI ADD evgen: $(cat "$WORK/last-add-error")"
FIXED_PODS=(client web-a web-b intruder ipf-1 ipf-2 evgen)
for p in "${FIXED_PODS[@]}"; do say "$(printf '%-9s n%s  %s' "$p" "${POD_NODE[$p]}" "${POD_IP[$p]}")"; done
for w in web-a web-b; do
  nsx_bg "${PFX}$w" socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:"echo $w" >/dev/null 2>&1
  BG+=($!)
done
ctl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: web, namespace: soak}
spec:
  selector: {app: web}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: soak
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
- {addresses: ["${POD_IP[web-a]}"], nodeName: n1, conditions: {ready: true, serving: true, terminating: false}}
- {addresses: ["${POD_IP[web-b]}"], nodeName: n2, conditions: {ready: true, serving: true, terminating: false}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-clients, namespace: soak}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{protocol: TCP, port: 8080}]
EOF
VIP=$(ctl get svc web -n soak -o json | jq -r '.spec.clusterIP')
[[ "$VIP" =~ ^[0-9.]+$ ]] || die "the Service soak/web got no ClusterIP ($VIP)"
say "Service soak/web $VIP:80 -> web-a, web-b :8080; policy: only role=client reaches app=web on 8080"
for _ in $(seq 50); do
  got=$(nsx "${PFX}client" socat -T 2 - "TCP:${POD_IP[web-b]}:8080,connect-timeout=2" </dev/null 2>/dev/null) || true
  [ "$got" = web-b ] && break
  sleep 0.2
done
[ "$got" = web-b ] || die "client cannot reach web-b:8080 before the soak starts"

# From here on a failing command does not end the run: every outcome is recorded and checked.
set +e

# ---- traffic -------------------------------------------------------------------------------------
step "traffic: iperf3 --bidir ipf-1 (n1) <-> ipf-2 (n2), prober, flow generators (2 x $EVENT_RATE flows/s)"
# probe NAME allow|deny SRC DST PORT EXPECT: one connect every 0.5 s, "start end name kind ok|fail
# [socat's error]". ok: the server's answer (its name) came back. -t 3: with stdin at EOF at once,
# socat waits up to 3 s (not its default 0.5 s) for that answer.
probe() {
  local name=$1 kind=$2 src=$3 dst=$4 port=$5 expect=$6 t0 got r err=$WORK/probe-${1//\//_}.err
  set +e
  while [ ! -e "$WORK/stop" ]; do
    t0=$(now)
    got=$(ip netns exec "${PFX}$src" socat -T 3 -t 3 - "TCP:$dst:$port,connect-timeout=3" </dev/null 2>"$err")
    case "$got" in $expect) r=ok ;; *) r=fail ;; esac
    echo "$t0 $(now) $name $kind $r $(tail -c 100 "$err" | tr -s ' \n' _)" >>"$WORK/probe.log"
    sleep 0.5
  done
}
probe client-web-a/same-node allow client "${POD_IP[web-a]}" 8080 web-a & BG+=($!)
probe client-web-b/cross-node allow client "${POD_IP[web-b]}" 8080 web-b & BG+=($!)
probe client-vip/service allow client "$VIP" 80 'web-[ab]' & BG+=($!)
probe intruder-web-b/same-node deny intruder "${POD_IP[web-b]}" 8080 web-b & BG+=($!)
probe intruder-web-a/cross-node deny intruder "${POD_IP[web-a]}" 8080 web-a & BG+=($!)
(
  set +e
  while [ ! -e "$WORK/stop" ]; do ip netns exec "${PFX}ipf-2" iperf3 -s -1 --idle-timeout 20 >/dev/null 2>&1; done
) & BG+=($!)
(
  set +e
  sleep 1
  while [ ! -e "$WORK/stop" ]; do
    t0=$(now)
    j=$(ip netns exec "${PFX}ipf-1" timeout 30 iperf3 -c "${POD_IP[ipf-2]}" -t 10 -b 100M --bidir --connect-timeout 3000 -J 2>/dev/null)
    b=$(jq -r '(.end.sum_received.bytes // 0) + (.end.sum_received_bidir_reverse.bytes // 0)' <<<"$j" 2>/dev/null)
    e=$(jq -r '.error // ""' <<<"$j" 2>/dev/null | tr ' ' _)
    echo "$t0 $(now) ${b:-0} ${e:-none}" >>"$WORK/iperf.log"
    [ "${b:-0}" = 0 ] && sleep 1
  done
) & BG+=($!)
cat >"$WORK/evgen.py" <<'EOF'
# Fresh UDP flows at a steady rate: every datagram from a new socket (a new source port), so each
# is a new connection for the dataplane and a flow event on both nodes.
import socket, sys, time
dst, rate = sys.argv[1], float(sys.argv[2])
i, t = 0, time.monotonic()
while True:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"soak", (dst, 20000 + i % 1000))
    except OSError:
        pass
    s.close()
    i += 1
    t += 1.0 / rate
    time.sleep(max(0.0, t - time.monotonic()))
EOF
nsx_bg "${PFX}evgen" "$PY" "$WORK/evgen.py" "${POD_IP[ipf-2]}" "$EVENT_RATE" >/dev/null 2>&1
BG+=($!)
nsx_bg "${PFX}ipf-2" "$PY" "$WORK/evgen.py" "${POD_IP[evgen]}" "$EVENT_RATE" >/dev/null 2>&1
BG+=($!)

# Samples every 2 s: "time role pid rss_kb fds events" (events: flow events held by the control
# plane, both nodes; for an agent, events drained since it started, of which it holds the last
# AGENT_HISTORY), and the agents' UMEM "lost" gauges.
metric_sum() { awk -v m="$1" -v s="$2" 'index($0, m) == 1 && (s == "" || index($0, s)) {v += $NF; f = 1} END {if (f) printf "%d", v; else print ""}'; }
sampler() {
  set +e
  local role pid rss fds ev m a b
  while [ ! -e "$WORK/stop" ]; do
    for role in control agent1 agent2; do
      pid=$(cat "$WORK/pid.$role" 2>/dev/null)
      rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
      [ -n "$rss" ] || continue
      fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
      if [ "$role" = control ]; then
        m=$(ip netns exec "${PFX}sw" curl -s -m 2 "http://$CONTROL_IP:9479/metrics" | tee "$WORK/metrics.$role")
        ev=$(metric_sum sluice_control_flow_events_held '' <<<"$m")
      else
        m=$(ip netns exec "${PFX}n${role#agent}" curl -s -m 2 http://127.0.0.1:9090/metrics | tee "$WORK/metrics.$role")
        a=$(metric_sum sluice_agent_events_relayed_total '' <<<"$m")
        b=$(metric_sum sluice_agent_events_relay_dropped_total '' <<<"$m")
        ev=$(( ${a:-0} + ${b:-0} ))
      fi
      echo "$(now) $role $pid $rss $fds ${ev:--}" >>"$WORK/samples.log"
    done
    sleep 2
  done
}
sampler & BG+=($!)
sleep 3
FD0_CONTROL=$(ls "/proc/$CONTROL_PID/fd" | wc -l)
FD0_AGENT1=$(ls "/proc/${AGENT_PID[1]}/fd" | wc -l)
FD0_AGENT2=$(ls "/proc/${AGENT_PID[2]}/fd" | wc -l)
for r in control agent1 agent2; do ls -l "/proc/$(cat "$WORK/pid.$r")/fd" >"$WORK/fds-start.$r" 2>&1; done
say "file descriptors at the start: control $FD0_CONTROL, agent n1 $FD0_AGENT1, agent n2 $FD0_AGENT2"

# ---- churn and disruptions -----------------------------------------------------------------------
DURATION=$((MINUTES * 60))
T0=$(date +%s)
T_END=$((T0 + DURATION))
event start
KILLS=$(( MINUTES / 5 > 2 ? (MINUTES / 5 > 6 ? 6 : MINUTES / 5) : 2 ))
RESTARTS=$(( MINUTES / 10 > 1 ? (MINUTES / 10 > 3 ? 3 : MINUTES / 10) : 1 ))
# Disruptions at even steps over [5 %, 45 %] of the run: agent kills (alternating nodes), with the
# control-plane restarts in between.
SCHEDULE=()
total=$((KILLS + RESTARTS))
k=0 r=0
for i in $(seq 0 $((total - 1))); do
  t=$((T0 + DURATION * 5 / 100 + DURATION * 40 / 100 * i / (total > 1 ? total - 1 : 1)))
  # spread the restarts: restart number r goes after kill number (r+1)*KILLS/(RESTARTS+1)
  if [ $r -lt $RESTARTS ] && [ $k -ge $(((r + 1) * KILLS / (RESTARTS + 1))) ]; then
    SCHEDULE+=("$t control"); r=$((r + 1))
  else
    SCHEDULE+=("$t agent$((k % 2 + 1))"); k=$((k + 1))
  fi
done
T_STEADY=$((T0 + DURATION * 45 / 100))
step "churn for $MINUTES min: $KILLS agent kills and $RESTARTS control-plane restarts by $((T_STEADY - T0)) s, then steady churn"

SEQ=0 CTL_KILLED=0 ADDS=0 DELS=0 DELS_DOWN=0 ADD_FAILS=0 DEL_FAILS=0 APPLIES=0 DELETES=0 CTL_FAILS=0
declare -A CHURN_NS   # the live churn pods (keys)
churn_pods_on() { local p; for p in "${!CHURN_NS[@]}"; do [ "${POD_NODE[$p]}" != "$1" ] || echo "$p"; done; }

churn_pod() {
  local n=$((RANDOM % 2 + 1)) live pod
  live=$(churn_pods_on "$n" | wc -l)
  if [ "$live" -lt "$PODS_PER_NODE" ] && { [ "$live" -lt $((PODS_PER_NODE / 2)) ] || [ $((RANDOM % 2)) = 0 ]; }; then
    SEQ=$((SEQ + 1))
    pod=c$SEQ
    if add_pod "$n" "$pod" churn "{\"app\": \"churn-$((SEQ % 5))\"}"; then
      CHURN_NS[$pod]=1
      ADDS=$((ADDS + 1))
    else
      ADD_FAILS=$((ADD_FAILS + 1))
      echo "$(now) ADD $pod on n$n: $(cat "$WORK/last-add-error")" >>"$WORK/add-errors.log"
    fi
  elif [ "$live" -gt 0 ]; then
    pod=$(churn_pods_on "$n" | shuf -n 1)
    del_pod "$pod" churn || DEL_FAILS=$((DEL_FAILS + 1))
    unset "CHURN_NS[$pod]"
    DELS=$((DELS + 1))
  fi
}

# churn_object: create, change or delete one of 5 churn NetworkPolicies or Services (with its
# EndpointSlice: the live churn pods labelled app=churn-<i>).
churn_object() {
  local i=$((RANDOM % 5)) what=$((RANDOM % 2)) op=$((RANDOM % 3)) p eps=""
  if [ "$op" = 0 ]; then
    if [ "$what" = 0 ]; then
      ctl delete netpol "churn-$i" -n churn >/dev/null 2>&1 || true
    else
      ctl delete svc "churn-$i" -n churn >/dev/null 2>&1 || true
      ctl delete eps "churn-$i" -n churn >/dev/null 2>&1 || true
    fi
    DELETES=$((DELETES + 1))
    return
  fi
  if [ "$what" = 0 ]; then
    ctl apply -f - >/dev/null 2>>"$WORK/ctl-errors.log" <<EOF || { CTL_FAILS=$((CTL_FAILS + 1)); return; }
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: churn-$i, namespace: churn}
spec:
  podSelector: {matchLabels: {app: churn-$i}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: churn-$(((i + 1) % 5))}}}]
    ports: [{protocol: TCP, port: $((8000 + RANDOM % 100))}]
EOF
  else
    for p in "${!CHURN_NS[@]}"; do
      [ "$((${p#c} % 5))" = "$i" ] || continue
      eps+="- {addresses: [\"${POD_IP[$p]}\"], nodeName: n${POD_NODE[$p]}, conditions: {ready: true, serving: true, terminating: false}}"$'\n'
    done
    [ -n "$eps" ] || eps=" []"
    ctl apply -f - >/dev/null 2>>"$WORK/ctl-errors.log" <<EOF || { CTL_FAILS=$((CTL_FAILS + 1)); return; }
apiVersion: v1
kind: Service
metadata: {name: churn-$i, namespace: churn}
spec:
  selector: {app: churn-$i}
  ports: [{name: http, protocol: TCP, port: $((80 + RANDOM % 3)), targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: churn-$i
  namespace: churn
  labels: {kubernetes.io/service-name: churn-$i}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
$eps
EOF
  fi
  APPLIES=$((APPLIES + 1))
}

# kill_agent N: SIGKILL node N's agent, delete up to 3 of its churn pods while it is down, restart.
kill_agent() {
  local n=$1 pod k=0
  event "kill n$n pid ${AGENT_PID[$n]}"
  kill -KILL "${AGENT_PID[$n]}"
  wait "${AGENT_PID[$n]}" 2>/dev/null || true
  for pod in $(churn_pods_on "$n" | shuf -n 3); do
    del_pod "$pod" churn || DEL_FAILS=$((DEL_FAILS + 1))
    unset "CHURN_NS[$pod]"
    DELS=$((DELS + 1)) DELS_DOWN=$((DELS_DOWN + 1)) k=$((k + 1))
  done
  sleep 1
  start_agent "$n"
  event "up n$n pid ${AGENT_PID[$n]}"
  say "$(printf '[%4ss] agent n%s SIGKILLed, %s pods deleted while it was down, restarted (pid %s)' \
    "$(( $(date +%s) - T0 ))" "$n" "$k" "${AGENT_PID[$n]}")"
}

restart_control() {
  local killed_before=$CTL_KILLED
  event "control-stop pid $CONTROL_PID"
  # stop_daemon: SIGTERM, then SIGKILL (and status 1) after 10 s
  stop_daemon sluice-control "$CONTROL_PID" "$WORK/control.log" >/dev/null || {
    CTL_KILLED=$((CTL_KILLED + 1))
    event "control-sigkilled (still running 10 s after SIGTERM)"
  }
  start_control
  event "control-up pid $CONTROL_PID"
  say "$(printf '[%4ss] control plane restarted (SIGTERM%s, pid %s)' "$(( $(date +%s) - T0 ))" \
    "$([ "$CTL_KILLED" -gt "$killed_before" ] && echo ', SIGKILL after 10 s: it had not stopped')" "$CONTROL_PID")"
}

next=0 it=0
while [ "$(date +%s)" -lt "$T_END" ]; do
  if [ $next -lt ${#SCHEDULE[@]} ]; then
    read -r at what <<<"${SCHEDULE[$next]}"
    if [ "$(date +%s)" -ge "$at" ]; then
      case $what in
        control) restart_control ;;
        agent*) kill_agent "${what#agent}" ;;
      esac
      next=$((next + 1))
    fi
  fi
  churn_pod
  it=$((it + 1))
  [ $((it % 3)) = 0 ] && churn_object
  if [ $((it % 100)) = 0 ]; then
    say "$(printf '[%4ss] pods added %d, deleted %d; policy/service applies %d, deletes %d' \
      "$(( $(date +%s) - T0 ))" "$ADDS" "$DELS" "$APPLIES" "$DELETES")"
  fi
  sleep 0.1
done
[ $next -eq ${#SCHEDULE[@]} ] || die "only $next of ${#SCHEDULE[@]} disruptions ran (the churn loop was too slow)"

step "wind-down: every churn pod, policy and Service deleted; traffic stopped"
touch "$WORK/stop"
for pod in "${!CHURN_NS[@]}"; do
  del_pod "$pod" churn || DEL_FAILS=$((DEL_FAILS + 1))
  DELS=$((DELS + 1))
done
CHURN_NS=()
for i in 0 1 2 3 4; do
  ctl delete netpol "churn-$i" -n churn >/dev/null 2>&1 || true
  ctl delete svc "churn-$i" -n churn >/dev/null 2>&1 || true
  ctl delete eps "churn-$i" -n churn >/dev/null 2>&1 || true
done
for p in "${BG[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${BG[@]}"; do wait "$p" 2>/dev/null || true; done
BG=()
sleep 5

# ---- the end-of-run table ------------------------------------------------------------------------
FAILED=0
ROWS=()
row() { # CHECK N1 N2 OK(0/1) [NOTE]
  local res=ok
  [ "$4" = 1 ] || { res=FAIL; FAILED=$((FAILED + 1)); }
  ROWS+=("$(printf '%-44s %-16s %-16s %-4s %s' "$1" "$2" "$3" "$res" "${5:-}")")
}
# diffsets EXPECTED ACTUAL: "leaked/missing" counts of two newline-separated sets.
diffsets() {
  local l m
  l=$(comm -13 <(sort -u <<<"$1" | sed '/^$/d') <(sort -u <<<"$2" | sed '/^$/d') | wc -l)
  m=$(comm -23 <(sort -u <<<"$1" | sed '/^$/d') <(sort -u <<<"$2" | sed '/^$/d') | wc -l)
  echo "$l/$m"
}
zero() { [ "$1" = 0/0 ] || [ "$1" = 0 ] && echo 1 || echo 0; }
declare -A V
for n in 1 2; do
  live_ips=$(for p in "${!POD_IP[@]}"; do [ "${POD_NODE[$p]}" = "$n" ] && echo "${POD_IP[$p]}"; done)
  live_names=$(for p in "${!POD_IP[@]}"; do [ "${POD_NODE[$p]}" = "$n" ] && echo "$p"; done)
  links=$(nsx "${PFX}n$n" ip -o link show)
  ifindexes=$(awk -F': ' '{print $1}' <<<"$links")
  # host veth ifindexes of the live pods (as the registry holds them)
  pod_ifindexes=$(jq -r --arg ips "$live_ips" '($ips | split("\n")) as $l
    | [.. | objects | select(has("host_ifindex") and has("ip")) | select(.ip as $i | $l | index($i)) | .host_ifindex] | .[]' \
    "$WORK/n$n/state/pods.json" 2>/dev/null)
  V[ipam$n]=$(diffsets "$live_ips" "$(ls "$WORK/n$n/ipam/sluice" 2>/dev/null | grep -E '^[0-9]+(\.[0-9]+){3}$')")
  host_veths=$(nsx "${PFX}n$n" ip -o link show type veth | awk -F': ' '{sub(/@.*/, "", $2); print $2}' | grep -vxE 'up0|sluice-punt|sluice-host')
  d=$(( $(sed '/^$/d' <<<"$host_veths" | wc -l) - $(sed '/^$/d' <<<"$live_ips" | wc -l) ))
  if [ "$d" -ge 0 ]; then V[veth$n]="$d/0"; else V[veth$n]="0/$((-d))"; fi
  V[reg$n]=$(diffsets "$live_ips" "$(jq -r '[.. | objects | select(has("container_id") and has("ip")) | .ip] | .[]' "$WORK/n$n/state/pods.json" 2>/dev/null)")
  V[cp$n]=$(diffsets "$(while read -r p; do echo "$p ${POD_IP[$p]}"; done <<<"$live_names")" \
    "$(ctl get pods -A -o json | jq -r --arg n "n$n" '.items[] | select(.spec.nodeName == $n) | "\(.metadata.name) \(.status.podIP)"')")
  maps=$WORK/n$n/bpf/sluice/n$n/maps
  dump_keys() { bpftool -j map dump pinned "$1" 2>/dev/null | jq -r '.[] | .key | join(" ")'; }
  le32() { while read -r a b c d _; do echo $((a + b * 256 + c * 65536 + d * 16777216)); done; }
  ip4() { while read -r a b c d _; do echo "$((a)).$((b)).$((c)).$((d))"; done; }
  [ -e "$maps/sluice_ifaces" ] || die "no pinned map $maps/sluice_ifaces"
  ifaces=$(dump_keys "$maps/sluice_ifaces" | le32)
  V[ifaces$n]="$(comm -13 <(sort -u <<<"$ifindexes") <(sort -u <<<"$ifaces" | sed '/^$/d') | wc -l)/$(comm -23 <(sort -u <<<"$pod_ifindexes" | sed '/^$/d') <(sort -u <<<"$ifaces") | wc -l)"
  V[ifaces_n$n]=$(sed '/^$/d' <<<"$ifaces" | wc -l)
  slots=$(dump_keys "$maps/sluice_xsk_slots" | le32)
  V[slots$n]="$(comm -13 <(sort -u <<<"$ifindexes") <(sort -u <<<"$slots" | sed '/^$/d') | wc -l)/$(comm -23 <(sort -u <<<"$pod_ifindexes" | sed '/^$/d') <(sort -u <<<"$slots") | wc -l)"
  V[slots_n$n]=$(sed '/^$/d' <<<"$slots" | wc -l)
  iso=$(dump_keys "$maps/sluice_isolated" | ip4)
  # isolated now: the web pods (their policy is the only one left)
  iso_want=$(for p in web-a web-b; do [ "${POD_NODE[$p]}" = "$n" ] && echo "${POD_IP[$p]}"; done)
  V[iso$n]=$(diffsets "$iso_want" "$iso")
  pins=$(ls "$WORK/n$n/bpf/sluice/n$n/links" 2>/dev/null)
  V[pins$n]="$(comm -13 <(sort -u <<<"$ifindexes") <(sort -u <<<"$pins" | sed '/^$/d') | wc -l)/$(comm -23 <(sort -u <<<"$pod_ifindexes" | sed '/^$/d') <(sort -u <<<"$pins") | wc -l)"
  m=$(nsx "${PFX}n$n" curl -s -m 3 http://127.0.0.1:9090/metrics)
  V[umem$n]=$(metric_sum sluice_agent_umem_frames 'state="lost"' <<<"$m")
  V[umemtot$n]=$(grep -E '^sluice_agent_umem_frames' <<<"$m" | sed -E 's/.*state="([a-z]+)".* ([0-9]+)$/\1=\2/' | tr '\n' ' ')
  fds=()
  # the fewest of 5 counts over 4 s (a reconnect in flight holds one more for a moment)
  for _ in 1 2 3 4 5; do fds+=("$(ls "/proc/${AGENT_PID[$n]}/fd" | wc -l)"); sleep 1; done
  V[fd$n]=$(printf '%s\n' "${fds[@]}" | sort -n | head -1)
done
V[fdc]=$(ls "/proc/$CONTROL_PID/fd" | wc -l)
for r in control agent1 agent2; do ls -l "/proc/$(cat "$WORK/pid.$r")/fd" >"$WORK/fds-end.$r" 2>&1; done

row "pod IPs: IPAM records vs live (leak/miss)" "${V[ipam1]}" "${V[ipam2]}" "$(( $(zero "${V[ipam1]}") & $(zero "${V[ipam2]}") ))"
row "host veths vs live pods (extra/missing)" "${V[veth1]}" "${V[veth2]}" "$(( $(zero "${V[veth1]}") & $(zero "${V[veth2]}") ))"
row "agent registry (pods.json) vs live" "${V[reg1]}" "${V[reg2]}" "$(( $(zero "${V[reg1]}") & $(zero "${V[reg2]}") ))"
row "control-plane Pods vs live" "${V[cp1]}" "${V[cp2]}" "$(( $(zero "${V[cp1]}") & $(zero "${V[cp2]}") ))"
row "BPF sluice_ifaces (stale/missing)" "${V[ifaces1]} of ${V[ifaces_n1]}" "${V[ifaces2]} of ${V[ifaces_n2]}" "$(( $(zero "${V[ifaces1]}") & $(zero "${V[ifaces2]}") ))"
row "BPF sluice_xsk_slots (stale/missing)" "${V[slots1]} of ${V[slots_n1]}" "${V[slots2]} of ${V[slots_n2]}" "$(( $(zero "${V[slots1]}") & $(zero "${V[slots2]}") ))"
row "BPF sluice_isolated (stale/missing)" "${V[iso1]}" "${V[iso2]}" "$(( $(zero "${V[iso1]}") & $(zero "${V[iso2]}") ))"
row "BPF link pins (stale/missing)" "${V[pins1]}" "${V[pins2]}" "$(( $(zero "${V[pins1]}") & $(zero "${V[pins2]}") ))"
row "UMEM frames lost (metric)" "${V[umem1]:-?}" "${V[umem2]:-?}" "$([ "${V[umem1]:-x}" = 0 ] && [ "${V[umem2]:-x}" = 0 ] && echo 1 || echo 0)"
row "agent fds: start -> end" "$FD0_AGENT1 -> ${V[fd1]}" "$FD0_AGENT2 -> ${V[fd2]}" "$([ "${V[fd1]}" -le "$FD0_AGENT1" ] && [ "${V[fd2]}" -le "$FD0_AGENT2" ] && echo 1 || echo 0)"
row "control-plane fds: start -> end" "$FD0_CONTROL -> ${V[fdc]}" "" "$([ "${V[fdc]}" -le "$FD0_CONTROL" ] && echo 1 || echo 0)"

# Memory of each process's last incarnation: the RSS when its history first held a full history,
# the largest after that, the last; and what a held event costs (control plane: RSS growth from
# its first sample to the full history, per event held).
rss_row() { # ROLE FULL-AT
  awk -v role="$1" -v pid="$3" -v full="$2" '
    $2 == role && $3 == pid {
      if (first == "") first = $4
      # the cost of a held event: RSS growth from a fifth of a full history to a full one (the
      # start-up allocations, UMEM and maps, are behind us by then)
      if (ev0 == "" && $6 != "-" && $6 + 0 >= full / 5) { rss0 = $4; ev0 = $6 }
      if (!isfull && $6 != "-" && $6 + 0 >= full) { isfull = 1; atfull = $4; evfull = $6; tfull = $1 }
      if (isfull && $4 > max) max = $4
      last = $4; n++
    }
    END {
      if (!isfull) { printf "never-full 0 %s %s - -\n", first, last; exit }
      printf "%s %.1f %s %s %d %d %d\n", atfull, (max - atfull) * 100 / atfull, first, last, ev0, evfull, rss0
    }' "$WORK/samples.log"
}
for role in control agent1 agent2; do
  pid=$(cat "$WORK/pid.$role")
  full=$AGENT_HISTORY
  [ "$role" = control ] && full=$((2 * CONTROL_HISTORY_PER_NODE))
  read -r atfull growth first last ev0 evfull rss0 <<<"$(rss_row "$role" "$full" "$pid")"
  if [ "$atfull" = never-full ]; then
    row "RSS $role (pid $pid): history never full" "first ${first} kB" "last ${last} kB" 0 "(SOAK_EVENT_RATE too low for the run?)"
  else
    ok=$(awk -v g="$growth" 'BEGIN { print (g <= 10) ? 1 : 0 }')
    per=$(awk -v a="$rss0" -v b="$atfull" -v e0="$ev0" -v e1="$evfull" 'BEGIN { if (e1 > e0) printf "%.0f", (b - a) * 1024 / (e1 - e0); else print "?" }')
    row "RSS $role kB: at full -> max growth %" "$atfull" "+$growth %" "$ok" "(first $first kB, $rss0 at $ev0 events, last $last; ~$per B/held event)"
  fi
done

# Prober: denied pairs must never connect; allowed pairs may fail only in an agent-kill window.
awk -v grace="$GRACE" '
  FNR == NR { if ($2 == "kill") k[$3] = $1; if ($2 == "up") { w0[++nw] = k[$3]; w1[nw] = $1 + grace }; next }
  {
    tot[$3]++
    if ($4 == "deny" && $5 == "ok") through[$3]++
    if ($4 == "allow" && $5 == "fail") {
      excused = 0
      for (i = 1; i <= nw; i++) if ($1 <= w1[i] && $2 >= w0[i]) excused = 1
      if (excused) inwin[$3]++; else bad[$3]++
    }
    kind[$3] = $4
  }
  END { for (p in tot) printf "%s %s %d %d %d %d\n", p, kind[p], tot[p], through[p] + 0, inwin[p] + 0, bad[p] + 0 }
' <(cat "$WORK/events.log" 2>/dev/null || true) "$WORK/probe.log" | sort >"$WORK/probe-summary"
while read -r pair kind total through inwin bad; do
  if [ "$kind" = deny ]; then
    row "prober deny $pair" "$total connects" "$through got through" "$([ "$through" = 0 ] && echo 1 || echo 0)"
  else
    row "prober allow $pair" "$total connects" "$bad failed" "$([ "$bad" = 0 ] && [ "$total" -gt 0 ] && echo 1 || echo 0)" "($inwin failed in agent-kill windows)"
  fi
done <"$WORK/probe-summary"
[ "$(wc -l <"$WORK/probe-summary")" = 5 ] || row "prober: all 5 pairs probed" "$(wc -l <"$WORK/probe-summary") pairs" "" 0
iperf_runs=$(wc -l <"$WORK/iperf.log" 2>/dev/null || echo 0)
iperf_ok=$(awk '$3 > 0' "$WORK/iperf.log" 2>/dev/null | wc -l)
iperf_gb=$(awk '{s += $3} END {printf "%.2f", s / 1e9}' "$WORK/iperf.log" 2>/dev/null)
row "iperf3 --bidir runs carrying traffic" "$iperf_ok of $iperf_runs" "$iperf_gb GB" "$([ "$iperf_ok" -gt 0 ] && echo 1 || echo 0)"
row "CNI ADD refused / DEL failed" "$ADD_FAILS" "$DEL_FAILS" "$([ "$ADD_FAILS" = 0 ] && [ "$DEL_FAILS" = 0 ] && echo 1 || echo 0)"
row "control plane stopped within 10 s of SIGTERM" "$((RESTARTS - CTL_KILLED)) of $RESTARTS" "" "$([ "$CTL_KILLED" = 0 ] && echo 1 || echo 0)"
row "sluicectl apply failures" "$CTL_FAILS" "" "$([ "$CTL_FAILS" = 0 ] && echo 1 || echo 0)"

step "end of run ($MINUTES min): churn pods added $ADDS, deleted $DELS ($DELS_DOWN while their agent was down); policy/service applies $APPLIES, deletes $DELETES; $KILLS agent SIGKILLs, $RESTARTS control-plane restarts"
say "UMEM frames at the end: n1 ${V[umemtot1]}; n2 ${V[umemtot2]}"
printf '    %-44s %-16s %-16s %-4s\n' check n1 n2 ""
printf '    %s\n' "${ROWS[@]}"
say "resident memory over the run (kB, about every $((DURATION / 12)) s; * a new process after a restart; events held or drained):"
for role in control agent1 agent2; do
  say "$(awk -v role="$role" -v t0="$T0" -v step="$((DURATION / 12 > 0 ? DURATION / 12 : 1))" '
    $2 == role { b = int(($1 - t0) / step); if (b < 0) b = 0
      if (!(b in seen)) { seen[b] = 1; out = out sprintf(" %s%s(%s)", ($3 != pid && pid != "") ? "*" : "", $4, $6); pid = $3 } }
    END { printf "  %-7s%s", role, out }' "$WORK/samples.log")"
done
if [ -s "$WORK/add-errors.log" ]; then say "CNI ADD errors (first 3):"; head -3 "$WORK/add-errors.log" | cut -c1-200 | sed 's/^/      /'; fi
if [ -s "$WORK/ctl-errors.log" ]; then say "sluicectl errors (first 3):"; head -3 "$WORK/ctl-errors.log" | cut -c1-200 | sed 's/^/      /'; fi
if [ "$FAILED" -gt 0 ]; then
  KEEP_LOGS=1
  printf '\nsoak.sh: %d check(s) failed\n' "$FAILED" >&2
  exit 1
fi
say "all checks passed"
