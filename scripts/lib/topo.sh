# Shared shell helpers for scripts that build two-node topologies in network namespaces
# (scripts/bench.sh, scripts/demo.sh). Source it; it defines functions only.
#
# Layout (PFX is a unique prefix, e.g. "slb-$$-"):
#   ${PFX}sw      underlay switch: a bridge "br0"
#   ${PFX}n1/n2   nodes: uplink "up0" (veth to the switch), underlay 192.168.77.1x/24
#   ${PFX}p1/p2   one pod per node: "eth0", 10.244.N.10
# Addresses live only inside these namespaces.

UNDERLAY_NET=192.168.77
POD_NET=10.244

topo_log() { printf '   %s\n' "$*" >&2; }

# nsx NS CMD...: run CMD inside network namespace NS.
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

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

# topo_pod_veth PFX N MTU GWMODE: pod pN in node nN with a veth "v" -> "eth0".
#   GWMODE=linklocal: Sluice/Calico style (/32, default via 169.254.1.1 onlink, static neighbor)
#   GWMODE=bridge:    Flannel style (host end in bridge cni0 with 10.244.N.1/24)
topo_pod_veth() {
  local pfx=$1 n=$2 mtu=$3 mode=$4 ip="${POD_NET}.$2.10"
  ip netns add "${pfx}p$n"
  nsx "${pfx}p$n" ip link set lo up
  ip link add "vp$n" netns "${pfx}n$n" mtu "$mtu" type veth peer name eth0 netns "${pfx}p$n" mtu "$mtu"
  nsx "${pfx}p$n" ip link set eth0 up
  nsx "${pfx}n$n" ip link set "vp$n" up
  if [ "$mode" = bridge ]; then
    nsx "${pfx}n$n" ip link add cni0 mtu "$mtu" type bridge
    nsx "${pfx}n$n" ip addr add "${POD_NET}.$n.1/24" dev cni0
    nsx "${pfx}n$n" ip link set cni0 up
    nsx "${pfx}n$n" ip link set "vp$n" master cni0
    nsx "${pfx}p$n" ip addr add "$ip/24" dev eth0
    nsx "${pfx}p$n" ip route add default via "${POD_NET}.$n.1"
  else
    local hmac
    hmac=$(nsx "${pfx}n$n" cat "/sys/class/net/vp$n/address")
    nsx "${pfx}p$n" ip addr add "$ip/32" dev eth0
    nsx "${pfx}p$n" ip route add 169.254.1.1 dev eth0 scope link
    nsx "${pfx}p$n" ip route add default via 169.254.1.1 dev eth0 onlink
    nsx "${pfx}p$n" ip neigh replace 169.254.1.1 lladdr "$hmac" dev eth0 nud permanent
    nsx "${pfx}n$n" ip route add "$ip/32" dev "vp$n"
    nsx "${pfx}n$n" sysctl -qw "net.ipv4.conf.vp$n.proxy_arp=1"
  fi
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
