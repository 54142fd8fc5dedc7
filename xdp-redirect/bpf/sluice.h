/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map keys, values and constants shared by the XDP program and its loader.
 * Defined once here; the Rust side gets these types from the libbpf-cargo
 * skeleton (`sluice_xdp::bpf::types`), never by re-typing them.
 *
 * Byte order: addresses and masks are stored in network byte order (as they
 * appear in the packet); ports and port ranges in host byte order.
 */
#ifndef SLUICE_H
#define SLUICE_H

#include <linux/types.h>

/* Capacity of the XSKMAP (sockets the node can register) and of the maps
 * describing interfaces and (interface, queue) slots. */
#define SLUICE_XSK_SLOTS 4096
#define SLUICE_MAX_IFACES 1024

/* sluice_config.flags (bits) */
enum sluice_cfg_flags {
	SLUICE_CFG_REDIRECT_IPV6 = 1 << 0, /* redirect IPv6 (except ICMPv6) from pods */
};

/* sluice_iface.role */
enum sluice_role {
	SLUICE_ROLE_POD = 1,
	SLUICE_ROLE_UPLINK = 2,
};

/* sluice_iface.flags (bits) */
enum sluice_iface_flags {
	SLUICE_IF_FAIL_CLOSED = 1 << 0, /* redirect-or-drop instead of redirect-or-pass */
	SLUICE_IF_REDIRECT_ALL = 1 << 1, /* pod: redirect all IPv4, not only cluster
					  * traffic (egress policy covers outside
					  * addresses; the worker hands allowed
					  * frames back to the kernel) */
};

/* Node-wide configuration: one entry (key 0) of the array map `sluice_config`. */
struct sluice_config {
	__u32 cluster_net;  /* cluster CIDR network, network byte order */
	__u32 cluster_mask; /* cluster CIDR mask, network byte order */
	__u32 service_net;  /* service CIDR network, network byte order */
	__u32 service_mask; /* service CIDR mask, network byte order */
	__u32 underlay_addr; /* this node's underlay IPv4 address, network byte order */
	__u16 vxlan_port;    /* VXLAN UDP destination port, host byte order */
	__u16 nodeport_min;  /* NodePort range, inclusive, host byte order */
	__u16 nodeport_max;
	__u16 pad;
	enum sluice_cfg_flags flags; /* bit set of SLUICE_CFG_* */
};

/* Capacity of `sluice_isolated` (local pods isolated by NetworkPolicy). */
#define SLUICE_MAX_ISOLATED 4096

/* Value of the hash map `sluice_isolated`, keyed by a local pod's IPv4
 * address (__u32, network byte order): in which directions a policy
 * isolates it. Only consulted when no socket takes a frame (the agent is
 * gone): frames to an ingress-isolated pod are then dropped, never handed to
 * the kernel, whichever interface they arrive on. */
enum sluice_isolated_flags {
	SLUICE_ISOLATED_INGRESS = 1 << 0,
	SLUICE_ISOLATED_EGRESS = 1 << 1,
};

/* Value of the hash map `sluice_ifaces`, keyed by ifindex (__u32). */
struct sluice_iface {
	enum sluice_role role;
	enum sluice_iface_flags flags; /* bit set of SLUICE_IF_* */
};

/* Key of the hash map `sluice_xsk_slots`; the value is the XSKMAP index (__u32). */
struct sluice_xsk_key {
	__u32 ifindex;
	__u32 queue;
};

/* Value of the per-CPU array `sluice_counters` (one entry, key 0): frames per
 * classification result. Every frame increments exactly one `match_*` or
 * `pass_*` field, and each matched frame then exactly one outcome field. */
struct sluice_counters {
	/* matched rules */
	__u64 match_cluster;  /* destination in the cluster CIDR */
	__u64 match_service;  /* destination in the service CIDR */
	__u64 match_vxlan;    /* VXLAN to this node's underlay address (uplink) */
	__u64 match_nodeport; /* TCP/UDP NodePort to this node's underlay address (uplink) */
	__u64 match_ipv6;     /* IPv6 from a pod, when SLUICE_CFG_REDIRECT_IPV6 */
	__u64 match_all;      /* other IPv4 from a pod marked SLUICE_IF_REDIRECT_ALL */
	/* outcomes of a match */
	__u64 redirected;          /* handed to the AF_XDP socket */
	__u64 pass_no_socket;      /* no socket registered: fail-open to the kernel */
	__u64 drop_no_socket;      /* no socket registered, and the interface is
				    * fail-closed or the destination an
				    * ingress-isolated pod (`sluice_isolated`) */
	/* not matched: passed to the kernel */
	__u64 pass_unknown_iface; /* interface not configured */
	__u64 pass_non_ip;        /* ARP and other ethertypes */
	__u64 pass_ipv6;          /* IPv6 not redirected */
	__u64 pass_other;         /* host-bound or outside traffic */
	__u64 pass_malformed;     /* too short to classify: the kernel decides */
};

#endif /* SLUICE_H */
