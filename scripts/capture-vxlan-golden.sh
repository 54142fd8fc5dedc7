#!/usr/bin/env bash
# Captures golden VXLAN frames made by the kernel's own vxlan device, programmed as a kernel
# Flannel node is (DESIGN.md, "How a kernel Flannel node is programmed"), into
# dataplane/testdata/vxlan-kernel.pcap. The dataplane's vxlan tests decap these frames and
# re-encap their inner frames byte for byte.
#
# Two netns ("nodes") A and B joined by a veth underlay (192.168.50.1 / .2, fixed MACs), each with
# flannel.1 (VNI 1, dstport 8472, nolearning, noudpcsum, MTU 1450, fixed VTEP MACs) and a
# "pod" address on lo (10.244.1.2 on A, 10.244.2.3 on B). Traffic: 2 pings, a UDP datagram, a TCP
# handshake, captured on A's underlay. Run as root; removes everything it made on every exit.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-dataplane/testdata/vxlan-kernel.pcap}
A="slp-golden-$$-a"; B="slp-golden-$$-b"
cleanup() {
  [[ -n "${TCPDUMP_PID:-}" ]] && kill "$TCPDUMP_PID" 2>/dev/null || true
  [[ -n "${SOCAT_PID:-}" ]] && kill "$SOCAT_PID" 2>/dev/null || true
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

UL_A_MAC=02:00:c0:a8:32:01; UL_B_MAC=02:00:c0:a8:32:02
VT_A_MAC=0e:00:00:00:01:00; VT_B_MAC=0e:00:00:00:02:00
ip netns add "$A"; ip netns add "$B"
ip link add slpg0 netns "$A" address $UL_A_MAC type veth peer name slpg1 netns "$B" address $UL_B_MAC
node() { # ns ul_ip vtep_mac node_n peer_ul_ip peer_vtep_mac peer_n pod_ip peer_ul_mac dev
  local ns=$1 ul=$2 vmac=$3 n=$4 pul=$5 pvmac=$6 pn=$7 pod=$8 pulmac=$9 dev=${10}
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$ul/24" dev "$dev"; ip -n "$ns" link set "$dev" up
  ip -n "$ns" neigh replace "$pul" lladdr "$pulmac" dev "$dev" nud permanent
  ip -n "$ns" link add flannel.1 address "$vmac" type vxlan id 1 local "$ul" dev "$dev" \
    dstport 8472 nolearning noudpcsum
  ip -n "$ns" link set flannel.1 mtu 1450 up
  ip -n "$ns" addr add "10.244.$n.0/32" dev flannel.1
  ip -n "$ns" route add "10.244.$pn.0/24" via "10.244.$pn.0" dev flannel.1 onlink
  ip -n "$ns" neigh replace "10.244.$pn.0" lladdr "$pvmac" dev flannel.1 nud permanent
  ip netns exec "$ns" bridge fdb append "$pvmac" dev flannel.1 dst "$pul"
  ip -n "$ns" addr add "$pod/32" dev lo
}
node "$A" 192.168.50.1 $VT_A_MAC 1 192.168.50.2 $VT_B_MAC 2 10.244.1.2 $UL_B_MAC slpg0
node "$B" 192.168.50.2 $VT_B_MAC 2 192.168.50.1 $VT_A_MAC 1 10.244.2.3 $UL_A_MAC slpg1

ip netns exec "$B" socat TCP-LISTEN:8080,bind=10.244.2.3,reuseaddr - >/dev/null </dev/null &
SOCAT_PID=$!
ip netns exec "$A" tcpdump -i slpg0 -U -w "$OUT" 'udp port 8472' 2>/dev/null &
TCPDUMP_PID=$!
sleep 1
ip netns exec "$A" ping -c 2 -i 0.2 -I 10.244.1.2 10.244.2.3 >/dev/null
ip netns exec "$A" python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.244.1.2", 5000)); s.sendto(b"sluice golden udp", ("10.244.2.3", 6000))
t = socket.create_connection(("10.244.2.3", 8080), timeout=2, source_address=("10.244.1.2", 40000))
t.close()'
sleep 1
kill "$TCPDUMP_PID"; wait "$TCPDUMP_PID" 2>/dev/null || true; TCPDUMP_PID=
echo "captured $(tcpdump -nr "$OUT" 2>/dev/null | grep -c OTV) frames into $OUT"
tcpdump -nr "$OUT" -e -vv 2>/dev/null | head -40
