#!/usr/bin/env bash
# Captures golden frames made by the kernel's own segmentation, for the tests of
# dataplane/src/segment.rs (software TSO) and dataplane/src/coalesce.rs (GRO):
#
# 1. dataplane/testdata/gso-super.pcap: TCP super-packets built here (known bytes), and
#    dataplane/testdata/gso-kernel.pcap: the segments the kernel's software GSO cut them into.
#    Two netns joined by a veth pair; the sending end has tx checksumming off (so TSO is off and
#    GSO segments in software, computing every checksum). A packet socket with PACKET_VNET_HDR
#    sends each super-packet with a virtio_net_hdr asking for TCPv4 GSO at a given MSS (as a VM's
#    virtio-net does); tcpdump on the sending end captures the segments as they leave.
# 2. dataplane/testdata/gro-vxlan-kernel.pcap: a TCP bulk transfer between two pods over kernel
#    Flannel VXLAN (scripts/lib/topo.sh: underlay MTU 1500, flannel.1 and pod MTU 1450), captured
#    leaving the sending node's underlay, whose TSO/GSO are off so that the kernel cuts the pod's
#    super-packets into MSS-sized VXLAN frames before the capture point.
#
# Namespaces are named slg-<pid>-*; everything is removed on every exit. Traffic stays inside
# them. Run as root; needs ip, ethtool, tcpdump, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/topo.sh
. scripts/lib/topo.sh
OUT=${1:-dataplane/testdata}
PFX="slg-$$-"
TCPDUMP_PID=; SINK_PID=
cleanup() {
  [[ -n "$TCPDUMP_PID" ]] && kill "$TCPDUMP_PID" 2>/dev/null || true
  [[ -n "$SINK_PID" ]] && kill "$SINK_PID" 2>/dev/null || true
  topo_cleanup "$PFX"
}
trap cleanup EXIT INT TERM

# stop_capture: let tcpdump write what it has and end.
stop_capture() {
  sleep 1
  kill "$TCPDUMP_PID" 2>/dev/null || true
  wait "$TCPDUMP_PID" 2>/dev/null || true
  TCPDUMP_PID=
}

# ---- 1. software GSO of known super-packets ------------------------------------------------------
A="${PFX}a"; B="${PFX}b"
ip netns add "$A"; ip netns add "$B"
ip link add gso0 netns "$A" address 02:00:00:00:00:0a type veth peer name gso1 netns "$B" address 02:00:00:00:00:0b
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set gso0 up; ip -n "$B" link set gso1 up
nsx "$A" ethtool -K gso0 tx off >/dev/null
nsx "$A" ethtool -k gso0 | grep -E '^(tcp-segmentation-offload|generic-segmentation-offload|tx-checksumming):' >&2

nsx "$A" tcpdump -i gso0 -Q out -U -w "$OUT/gso-kernel.pcap" tcp 2>/dev/null &
TCPDUMP_PID=$!
sleep 1
nsx "$A" python3 - "$OUT/gso-super.pcap" <<'PY'
import socket, struct, sys

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s

SRC, DST = bytes([10, 244, 1, 2]), bytes([10, 244, 2, 3])

def super_packet(ident, df, flags, options, payload):
    thl = 20 + len(options)
    tcp = struct.pack("!HHIIBBHHH", 40000, 8080, 0xFFFFF000, 0x01020304, (thl // 4) << 4, flags, 502, 0, 0)
    tcp += options + payload
    # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum for the whole segment.
    pseudo = csum(SRC + DST + struct.pack("!BBH", 0, 6, len(tcp)))
    tcp = tcp[:16] + struct.pack("!H", pseudo) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ident, 0x4000 if df else 0, 64, 6, 0, SRC, DST)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - csum(ip)) + ip[12:]
    eth = bytes.fromhex("02000000000b" "02000000000a" "0800")
    return eth + ip + tcp, thl

def pattern(n, salt):
    return bytes(((i * 31 + salt) & 0xFF) ^ ((i >> 8) & 0xFF) for i in range(n))

TS = bytes([1, 1, 8, 10]) + struct.pack("!II", 0x11223344, 0x55667788)
ACK, PSH, FIN, ECE, CWR = 0x10, 0x08, 0x01, 0x40, 0x80
cases = [
    # (ident, DF, flags, options, payload, MSS)
    (0x1000, True, ACK | PSH | FIN | CWR | ECE, TS, pattern(20000, 1), 1448),
    (0xFFFE, False, ACK, b"", pattern(7001, 2), 1000),
    (0x2000, True, ACK | PSH, TS, pattern(65535 - 20 - 32, 3), 1398),
]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
s.bind(("gso0", 0))
frames = []
for ident, df, flags, opts, payload, mss in cases:
    f, thl = super_packet(ident, df, flags, opts, payload)
    gso = 1 | (0x80 if flags & CWR else 0)  # VIRTIO_NET_HDR_GSO_TCPV4 (| _ECN)
    # flags NEEDS_CSUM, gso_type, hdr_len, gso_size, csum_start, csum_offset (host order)
    vnet = struct.pack("<BBHHHH", 1, gso, 14 + 20 + thl, mss, 14 + 20, 16)
    s.send(vnet + f)
    frames.append(f)
with open(sys.argv[1], "wb") as out:
    out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    for f in frames:
        out.write(struct.pack("<IIII", 0, 0, len(f), len(f)) + f)
PY
stop_capture
echo "gso: $(tcpdump -nr "$OUT/gso-kernel.pcap" 2>/dev/null | wc -l) segments of 3 super-packets" >&2
tcpdump -nr "$OUT/gso-kernel.pcap" -v 2>/dev/null | sed -n "1,6p" >&2

# ---- 2. a kernel Flannel node's VXLAN frames of a bulk TCP transfer ------------------------------
topo_underlay "$PFX" 1500
topo_flannel "$PFX"
topo_pod_veth "$PFX" 1 1450 bridge
topo_pod_veth "$PFX" 2 1450 bridge
nsx "${PFX}n2" ethtool -K up0 tso off gso off tx-udp_tnl-segmentation off \
  tx-udp_tnl-csum-segmentation off >/dev/null 2>&1 || nsx "${PFX}n2" ethtool -K up0 tso off gso off >/dev/null
nsx_bg "${PFX}p1" python3 -c '
import socket
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("10.244.1.10", 9000)); l.listen(1); c, _ = l.accept()
while c.recv(65536): pass'
SINK_PID=$!
sleep 1
nsx "${PFX}n2" tcpdump -i up0 -Q out -U -c 120 -w "$OUT/gro-vxlan-kernel.pcap" 'udp dst port 8472' 2>/dev/null &
TCPDUMP_PID=$!
sleep 1
nsx "${PFX}p2" python3 -c '
import socket
s = socket.create_connection(("10.244.1.10", 9000), timeout=5)
s.sendall(bytes(i % 251 for i in range(400000))); s.close()'
stop_capture
echo "gro: $(tcpdump -nr "$OUT/gro-vxlan-kernel.pcap" 2>/dev/null | wc -l) VXLAN frames" >&2
tcpdump -nr "$OUT/gro-vxlan-kernel.pcap" 2>/dev/null | sed -n '1,3p;60,62p' >&2
