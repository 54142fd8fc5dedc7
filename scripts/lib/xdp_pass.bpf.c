// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// The `xdp-ceiling` setup of scripts/bench.sh: an XDP program that passes every frame, attached to
// the pods' host-side veths (native mode). It does nothing, but its presence does what any XDP
// program on a host veth does: the kernel turns TSO/GSO off on the pod side (veth_fix_features), so
// the pod's TCP sends MTU-sized frames, as it does under Sluice. Declared `xdp.frags` (multi-buffer
// aware) so that the veth keeps an MTU above 3506, as Sluice's program does.
// Built by scripts/bench.sh with clang; attached with `ip link set dev X xdpdrv object F section xdp.frags`.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp.frags")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
