#!/usr/bin/env bash
# Installs every system package Sluice needs to build, test, demo and benchmark.
# Idempotent: installs only what is missing, runs `apt-get update` at most once.
set -euo pipefail

PACKAGES=(
  # build: BPF programs (clang/llvm; libbpf-dev for bpf/bpf_helpers.h in scripts/lib/xdp_pass.bpf.c),
  # libbpf-sys and libxdp-sys from source, gRPC
  clang llvm libbpf-dev libelf-dev zlib1g-dev pkg-config make m4 protobuf-compiler libprotobuf-dev libclang-dev libpcap-dev openssl
  # the agent's masquerade (nftables over netlink through libnftnl and libmnl)
  libnftnl-dev libmnl-dev
  # netns clusters, XDP and traffic
  iproute2 iptables nftables ethtool iputils-ping tcpdump iperf3 netsniff-ng sockperf socat netcat-openbsd
  # control plane storage backend at scale
  etcd-server
  # CNI: upstream plugins for chaining, a real container runtime, a local rootfs
  containernetworking-plugins podman runc busybox-static
  # metrics validation (promtool)
  prometheus
  # inspection
  bpftool jq
  # benchmark report: table and PNG chart (Debian python, not a virtualenv)
  python3 python3-matplotlib
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} system packages present"
else
  echo "setup: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root to install packages" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# bpffs for pinned BPF objects (the agent also mounts it where needed).
if [ "$(id -u)" -eq 0 ] && ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf || echo "setup: could not mount bpffs at /sys/fs/bpf" >&2
fi
