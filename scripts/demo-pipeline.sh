#!/usr/bin/env bash
# Demo of the pure pipeline on real traffic, until the cluster exists.
#
# Builds a "pod" netns (10.244.1.2, MAC 02:00:0a:f4:01:02, default route via 169.254.1.1 with a
# permanent neighbor entry for the host veth's MAC, as Sluice's CNI programs pods) whose host veth
# sits in a "node" netns, captures on the host veth with tcpdump what the pod sends: TCP to the
# ClusterIP 10.96.0.10:80, UDP to the DNS ClusterIP 10.96.0.53:53, ICMP echo and TCP to a pod of
# the remote node, TCP to a ClusterIP without backends and to an address no node owns (both
# dropped), and two malformed frames written with a raw socket (bad IPv4 checksum, truncated).
# Then runs `sluice-replay` on that capture plus the kernel-made VXLAN golden frames (replies from
# the remote node, decapsulated and delivered) and prints one verdict per frame and the counters.
#
# Run as root. Everything it creates is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
POD="slp-demo-$$-pod"; NODE="slp-demo-$$-node"
cleanup() {
  [[ -n "${TCPDUMP_PID:-}" ]] && kill "$TCPDUMP_PID" 2>/dev/null || true
  ip netns del "$POD" 2>/dev/null || true
  ip netns del "$NODE" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

cargo build -q -p sluice-dataplane --features testing --bin sluice-replay
REPLAY=target/debug/sluice-replay

ip netns add "$POD"; ip netns add "$NODE"
ip link add eth0 netns "$POD" address 02:00:0a:f4:01:02 type veth peer name slpveth netns "$NODE" address ee:ee:00:00:01:02
ip -n "$POD" link set lo up; ip -n "$POD" link set eth0 up
ip -n "$NODE" link set slpveth up
ip -n "$POD" addr add 10.244.1.2/32 dev eth0
ip -n "$POD" route add 169.254.1.1 dev eth0 scope link
ip -n "$POD" route add default via 169.254.1.1 dev eth0
ip -n "$POD" neigh replace 169.254.1.1 lladdr ee:ee:00:00:01:02 dev eth0 nud permanent

ip netns exec "$NODE" tcpdump -i slpveth -U -w "$WORK/pod.pcap" 'ip or arp' 2>/dev/null &
TCPDUMP_PID=$!
sleep 1
ip netns exec "$POD" python3 - <<'PY'
import socket, struct
def try_tcp(addr, port, sport):
    s = socket.socket(); s.settimeout(0.2); s.bind(("10.244.1.2", sport))
    try: s.connect((addr, port))
    except OSError: pass
    s.close()
try_tcp("10.96.0.10", 80, 40001)        # service VIP (web), TCP SYN
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("10.244.1.2", 5000))
u.sendto(b"dns query", ("10.96.0.53", 53))   # service VIP (dns), UDP
try_tcp("10.244.2.3", 8080, 40002)      # pod on the remote node
try_tcp("10.96.0.99", 80, 40003)        # service without backends: dropped
try_tcp("10.244.7.1", 80, 40004)        # no node owns 10.244.7.0/24: dropped
# malformed frames, raw
r = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); r.bind(("eth0", 0))
eth = bytes.fromhex("eeee00000102" "02000af40102" "0800")
ip = bytearray(bytes.fromhex("450000200001000040110000") + socket.inet_aton("10.244.1.2") + socket.inet_aton("10.244.2.3"))
ip[10:12] = b"\xde\xad"                  # wrong IPv4 header checksum
r.send(eth + bytes(ip) + struct.pack("!HHHH", 1, 2, 12, 0) + b"abcd")
r.send(eth + bytes.fromhex("4500"))     # truncated IPv4 header
PY
ip netns exec "$POD" ping -c 2 -i 0.2 -W 0.2 10.244.2.3 >/dev/null || true   # ICMP to the remote pod
sleep 0.5
kill "$TCPDUMP_PID"; wait "$TCPDUMP_PID" 2>/dev/null || true; TCPDUMP_PID=
echo "== captured $(tcpdump -nr "$WORK/pod.pcap" 2>/dev/null | wc -l) frames from the pod's host veth"
"$REPLAY" "$WORK/pod.pcap" dataplane/testdata/vxlan-kernel.pcap
