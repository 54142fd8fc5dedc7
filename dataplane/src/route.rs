//! Stage `route`: where a packet goes after NAT, and the rewrite that takes it there.
//!
//! A local pod: MACs rewritten (host veth -> pod), TTL decremented, forwarded on its host veth
//! port. A pod of a remote node: TTL decremented, inner MACs set to the VTEPs' (as Flannel's
//! `flannel.1` does), VXLAN encap towards the node's underlay address, forwarded on the uplink.
//! Addresses in the cluster CIDR that no pod or node owns get [`DropReason::NoRoute`]; this node's
//! VTEP and underlay addresses and addresses outside the cluster go to the kernel.
//!
//! MTU (DESIGN, MTU strategy): pods send up to the large pod MTU on every cluster route. A packet
//! for another node that is larger than VXLAN carries (underlay MTU - 50) is rewritten for its
//! route but not encapsulated, and gets [`Verdict::Segment`]: the transmitter cuts it (software TSO
//! for TCP, IPv4 fragments otherwise; `segment`) and encapsulates each piece with
//! [`tunnel_to`]. One that may not be fragmented (DF, not TCP) is answered before NAT with ICMP
//! "fragmentation needed" ([`Verdict::FragNeeded`], see [`needs_frag_answer`]). A packet larger
//! than a local pod's MTU, or than the underlay towards an outside client, is dropped with
//! [`DropReason::FrameTooBig`]: pods carry per-route MTUs, so those only come from
//! misconfiguration, and a drop counter shows it.

use crate::frame::Frame;
use crate::parse::{L3_OFFSET, Parsed};
use crate::tables::{LocalPod, RemoteNode, Tables};
use crate::verdict::{DropReason, Verdict};
use crate::vxlan;
use crate::wire::{ethernet, ipv4};

/// Where a destination address is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// A pod on this node.
    Local(LocalPod),
    /// A pod of another node.
    Remote(RemoteNode),
    /// This node itself, or outside the cluster: the kernel's business.
    Kernel,
    /// In the cluster CIDR, but nobody's.
    NoRoute,
}

/// Look up the route to `dst`.
#[inline]
pub fn lookup(tables: &Tables, dst: [u8; 4]) -> Route {
    if tables.in_local_cidr(dst) {
        return match tables.local_pod(dst) {
            Some(p) => Route::Local(*p),
            None if dst == tables.node.vtep_ip.octets() => Route::Kernel,
            None => Route::NoRoute,
        };
    }
    if let Some(n) = tables.remote_node(dst) {
        return Route::Remote(*n);
    }
    if tables.in_cluster(dst) {
        return Route::NoRoute;
    }
    Route::Kernel
}

/// Send the packet along `route`: rewrite and return the verdict. `ip_id` is the outer IPv4
/// identification to use if the route encapsulates.
pub fn forward(
    tables: &Tables,
    frame: &mut Frame<'_>,
    p: &Parsed,
    route: Route,
    ip_id: u16,
) -> Verdict {
    let (mtu, port) = match route {
        Route::Local(pod) => (tables.node.pod_mtu, pod.port),
        Route::Remote(_) => (tables.node.pod_mtu, tables.node.uplink),
        Route::Kernel => return Verdict::PassToKernel,
        Route::NoRoute => return Verdict::Drop(DropReason::NoRoute),
    };
    if p.ip_len > mtu {
        return Verdict::Drop(DropReason::FrameTooBig);
    }
    if p.ttl <= 1 {
        return Verdict::Drop(DropReason::TtlExceeded);
    }
    let (src_mac, dst_mac) = match route {
        Route::Local(pod) => (pod.host_mac, pod.pod_mac),
        Route::Remote(node) => (tables.node.vtep_mac, node.vtep_mac),
        _ => return Verdict::PassToKernel,
    };
    {
        let head = frame.head_mut();
        if let Ok(mut eth) = ethernet::Packet::new_checked(&mut *head) {
            eth.set_src(src_mac);
            eth.set_dst(dst_mac);
        }
        if let Some(l3) = head.get_mut(L3_OFFSET..)
            && let Ok(mut ip) = ipv4::Packet::new_checked(l3)
        {
            ip.decrement_ttl();
        }
    }
    if let Route::Remote(node) = route {
        // Ethernet padding of short frames must not travel inside the tunnel.
        if !frame.is_chained() {
            frame.truncate_head(L3_OFFSET + usize::from(p.ip_len));
        }
        if p.ip_len > tables.vxlan_mtu {
            return Verdict::Segment(port);
        }
        let t = tunnel(tables, &node);
        let h = p.key().hash64();
        match vxlan::encap(frame, &t, vxlan::src_port(h), ip_id) {
            Ok(()) => {}
            Err(vxlan::VxlanError::NoHeadroom) => return Verdict::Drop(DropReason::NoHeadroom),
            Err(_) => return Verdict::Drop(DropReason::FrameTooBig),
        }
    }
    Verdict::Forward(port)
}

/// The VXLAN tunnel towards another node.
fn tunnel(tables: &Tables, node: &RemoteNode) -> vxlan::Tunnel {
    vxlan::Tunnel {
        src_mac: tables.node.underlay_mac,
        dst_mac: node.next_hop_mac,
        src_ip: tables.node.underlay_ip.octets(),
        dst_ip: node.underlay_ip.octets(),
        vni: tables.node.vni,
        dst_port: tables.node.vxlan_port,
    }
}

/// The tunnel towards the node that owns `dst` (a pod of another node), for the pieces of a
/// [`Verdict::Segment`] frame; `None` if no node does.
pub fn tunnel_to(tables: &Tables, dst: [u8; 4]) -> Option<vxlan::Tunnel> {
    tables.remote_node(dst).map(|n| tunnel(tables, n))
}

/// Whether a packet on `route` must be answered with ICMP "fragmentation needed" instead of being
/// sent: it is larger than VXLAN carries towards another node, has DF set and is not TCP (TCP is
/// segmented whatever its DF). Checked before NAT, so the answer quotes what the sender sent.
pub fn needs_frag_answer(tables: &Tables, p: &Parsed, route: &Route) -> bool {
    matches!(route, Route::Remote(_))
        && p.ip_len > tables.vxlan_mtu
        && p.dont_frag
        && p.proto != crate::flow::proto::TCP
}

/// Send a reply to a client outside the cluster (a NodePort client) back out of the uplink to
/// the MAC its request came from.
pub fn forward_external(
    tables: &Tables,
    frame: &mut Frame<'_>,
    p: &Parsed,
    peer_mac: ethernet::Mac,
) -> Verdict {
    if p.ip_len > tables.node.underlay_mtu {
        return Verdict::Drop(DropReason::FrameTooBig);
    }
    if p.ttl <= 1 {
        return Verdict::Drop(DropReason::TtlExceeded);
    }
    let head = frame.head_mut();
    if let Ok(mut eth) = ethernet::Packet::new_checked(&mut *head) {
        eth.set_src(tables.node.underlay_mac);
        eth.set_dst(peer_mac);
    }
    if let Some(l3) = head.get_mut(L3_OFFSET..)
        && let Ok(mut ip) = ipv4::Packet::new_checked(l3)
    {
        ip.decrement_ttl();
    }
    Verdict::Forward(tables.node.uplink)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        let t = crate::tables::tests::demo_tables();
        assert!(matches!(lookup(&t, [10, 244, 1, 2]), Route::Local(_)));
        assert!(matches!(lookup(&t, [10, 244, 2, 3]), Route::Remote(_)));
        assert_eq!(lookup(&t, [10, 244, 7, 1]), Route::NoRoute);
        assert_eq!(lookup(&t, [10, 244, 1, 0]), Route::Kernel);
        assert_eq!(lookup(&t, [10, 244, 1, 99]), Route::NoRoute);
        assert_eq!(lookup(&t, [8, 8, 8, 8]), Route::Kernel);
    }
}
