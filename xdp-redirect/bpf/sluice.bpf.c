// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Sluice XDP classifier: decides per frame whether it belongs to the
 * userspace dataplane (redirect into the AF_XDP socket of the ingress
 * interface and rx queue) or to the kernel (XDP_PASS).
 *
 * Redirected: IPv4 destination in the cluster or service CIDR (any
 * configured interface); from a pod marked redirect-all (egress policy
 * selects it) any IPv4; on the uplink also VXLAN (UDP to the configured
 * port) and TCP/UDP NodePorts addressed to this node's underlay address.
 * Everything else passes. A missing socket (the agent is gone) falls back to
 * XDP_PASS (fail-open) unless the interface is marked fail-closed or the
 * destination is a pod isolated for ingress by NetworkPolicy
 * (`sluice_isolated`; for VXLAN the inner destination), then XDP_DROP: the
 * kernel would deliver the frame without the policy the agent enforces.
 *
 * Frags-aware (xdp.frags): headers are read with bpf_xdp_load_bytes, which
 * works whether or not they sit in the linear part.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "sluice.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sluice_config);
} sluice_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLUICE_MAX_IFACES);
	__type(key, __u32);
	__type(value, struct sluice_iface);
} sluice_ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLUICE_XSK_SLOTS);
	__type(key, struct sluice_xsk_key);
	__type(value, __u32);
} sluice_xsk_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, SLUICE_XSK_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLUICE_MAX_ISOLATED);
	__type(key, __u32);
	__type(value, enum sluice_isolated_flags);
} sluice_isolated SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sluice_counters);
} sluice_counters SEC(".maps");

#define COUNT(c, field)                                                        \
	do {                                                                   \
		if (c)                                                         \
			(c)->field++;                                          \
	} while (0)

struct l3l4 {
	__u8 ihl_version;
	__u8 tos;
	__u16 tot_len;
	__u16 id;
	__u16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__u16 check;
	__u32 saddr;
	__u32 daddr;
};

static __always_inline int in_net(__u32 addr, __u32 net, __u32 mask)
{
	return mask != 0 && (addr & mask) == net;
}

/* Whether `daddr` (network byte order; 0 for non-IPv4) is a local pod that
 * policy isolates for ingress. */
static __always_inline int isolated_dst(__u32 daddr)
{
	enum sluice_isolated_flags *flags;

	if (daddr == 0)
		return 0;
	flags = bpf_map_lookup_elem(&sluice_isolated, &daddr);
	return flags && (*flags & SLUICE_ISOLATED_INGRESS);
}

/* The inner IPv4 destination (network byte order) of a VXLAN frame whose UDP
 * header starts at `l4off`, 0 when the inner frame is not IPv4. Without a
 * worker, the kernel's standby VXLAN device would decapsulate the frame and
 * route it to the pod, so its isolation is what decides fail-closed. */
static __always_inline __u32 vxlan_inner_daddr(struct xdp_md *ctx, __u32 l4off)
{
	__u32 inner = l4off + 8 + 8; /* UDP and VXLAN headers */
	__u16 proto;
	__u32 daddr;

	if (bpf_xdp_load_bytes(ctx, inner + 12, &proto, sizeof(proto)) < 0 ||
	    proto != bpf_htons(ETH_P_IP) ||
	    bpf_xdp_load_bytes(ctx, inner + sizeof(struct ethhdr) + 16, &daddr, sizeof(daddr)) < 0)
		return 0;
	return daddr;
}

static __always_inline int to_socket(struct xdp_md *ctx, const struct sluice_iface *iface,
				     struct sluice_counters *c, __u32 daddr)
{
	struct sluice_xsk_key key = {
		.ifindex = ctx->ingress_ifindex,
		.queue = ctx->rx_queue_index,
	};
	int fail_closed = (iface->flags & SLUICE_IF_FAIL_CLOSED) || isolated_dst(daddr);
	__u32 *slot = bpf_map_lookup_elem(&sluice_xsk_slots, &key);
	long ret;

	if (slot) {
		ret = bpf_redirect_map(&xsks, *slot, fail_closed ? XDP_DROP : XDP_PASS);
		if (ret == XDP_REDIRECT) {
			COUNT(c, redirected);
			return XDP_REDIRECT;
		}
	}
	if (fail_closed) {
		COUNT(c, drop_no_socket);
		return XDP_DROP;
	}
	COUNT(c, pass_no_socket);
	return XDP_PASS;
}

SEC("xdp.frags")
int sluice_xdp(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct sluice_counters *c = bpf_map_lookup_elem(&sluice_counters, &zero);
	struct sluice_config *cfg = bpf_map_lookup_elem(&sluice_config, &zero);
	__u32 ifindex = ctx->ingress_ifindex;
	struct sluice_iface *iface = bpf_map_lookup_elem(&sluice_ifaces, &ifindex);
	struct ethhdr eth;
	struct l3l4 ip;
	__u16 ports[2];
	__u32 l4off;

	if (!cfg || !iface) {
		COUNT(c, pass_unknown_iface);
		return XDP_PASS;
	}
	if (bpf_xdp_load_bytes(ctx, 0, &eth, sizeof(eth)) < 0) {
		COUNT(c, pass_malformed);
		return XDP_PASS;
	}
	if (eth.h_proto == bpf_htons(ETH_P_IPV6)) {
		__u8 nexthdr;

		if ((cfg->flags & SLUICE_CFG_REDIRECT_IPV6) && iface->role == SLUICE_ROLE_POD &&
		    bpf_xdp_load_bytes(ctx, sizeof(eth) + 6, &nexthdr, 1) == 0 &&
		    nexthdr != IPPROTO_ICMPV6) {
			COUNT(c, match_ipv6);
			return to_socket(ctx, iface, c, 0);
		}
		COUNT(c, pass_ipv6);
		return XDP_PASS;
	}
	if (eth.h_proto != bpf_htons(ETH_P_IP)) {
		COUNT(c, pass_non_ip);
		return XDP_PASS;
	}
	if (bpf_xdp_load_bytes(ctx, sizeof(eth), &ip, sizeof(ip)) < 0 ||
	    (ip.ihl_version >> 4) != 4 || (ip.ihl_version & 0x0f) < 5) {
		COUNT(c, pass_malformed);
		return XDP_PASS;
	}
	if (in_net(ip.daddr, cfg->cluster_net, cfg->cluster_mask)) {
		COUNT(c, match_cluster);
		return to_socket(ctx, iface, c, ip.daddr);
	}
	if (in_net(ip.daddr, cfg->service_net, cfg->service_mask)) {
		COUNT(c, match_service);
		return to_socket(ctx, iface, c, ip.daddr);
	}
	if (iface->role == SLUICE_ROLE_POD && (iface->flags & SLUICE_IF_REDIRECT_ALL)) {
		COUNT(c, match_all);
		return to_socket(ctx, iface, c, ip.daddr);
	}
	if (iface->role != SLUICE_ROLE_UPLINK || cfg->underlay_addr == 0 ||
	    ip.daddr != cfg->underlay_addr ||
	    (ip.protocol != IPPROTO_UDP && ip.protocol != IPPROTO_TCP) ||
	    (ip.frag_off & bpf_htons(0x1fff)) != 0) {
		COUNT(c, pass_other);
		return XDP_PASS;
	}
	l4off = sizeof(eth) + (ip.ihl_version & 0x0f) * 4;
	if (bpf_xdp_load_bytes(ctx, l4off, ports, sizeof(ports)) < 0) {
		COUNT(c, pass_malformed);
		return XDP_PASS;
	}
	__u16 dport = bpf_ntohs(ports[1]);
	if (ip.protocol == IPPROTO_UDP && cfg->vxlan_port != 0 && dport == cfg->vxlan_port) {
		COUNT(c, match_vxlan);
		return to_socket(ctx, iface, c, vxlan_inner_daddr(ctx, l4off));
	}
	if (cfg->nodeport_min != 0 && dport >= cfg->nodeport_min && dport <= cfg->nodeport_max) {
		COUNT(c, match_nodeport);
		return to_socket(ctx, iface, c, ip.daddr);
	}
	COUNT(c, pass_other);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
