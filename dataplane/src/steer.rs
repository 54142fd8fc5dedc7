//! Steering: which worker of a node processes a frame, so that both directions of a connection
//! meet the same worker (conntrack, affinity and SNAT ports are per worker).
//!
//! [`owner_of`] is a pure function of the packet's tuple as parsed, the read-only tables and the
//! number of workers. The pipeline computes it on receive (`process_batch`, right after parse): a
//! frame another worker owns gets `Verdict::Steer` and goes, raw and with its ingress port, to the
//! owner (the agent's `handoff`), which processes it without steering again. [`owner`] reads the
//! headers itself (tests and tools).
//!
//! The rule, on the connection's tuple (the inner packet for VXLAN to this node on the uplink; the
//! embedded datagram, reversed, for an ICMP error):
//! 1. A destination that is this node's VTEP address is a reply to SNATed NodePort traffic: its
//!    destination port names the owner ([`port_owner`]), because the worker that made the
//!    translation took that port from its own share of the port space ([`Steer::snat_port`]), as
//!    VPP's NAT partitions ports per thread.
//! 2. Service traffic is steered by its client endpoint alone. A packet to a ClusterIP, or to a
//!    backend endpoint of some service (`Tables::is_backend`: address, port, protocol), from an
//!    endpoint that is not one, hashes its source endpoint; a packet from a backend endpoint to
//!    one that is not hashes its destination. So a client's packets to the VIP, the DNATed
//!    packets on the backend's node and the backend's replies all name the client endpoint, and
//!    the choice does not depend on which backend Maglev picks: established flows keep their
//!    worker when the backend set changes, and sessionAffinity needs nothing special.
//! 3. Otherwise (pod to pod, or both ends backend endpoints): a symmetric hash of the two
//!    (address, port) endpoints, sorted, and the protocol. A client that is itself a backend
//!    endpoint (its source port is one it serves) talking to a ClusterIP is the one case where
//!    the VIP is first resolved to the backend Maglev picks ([`service::maglev_choice`]), so that
//!    the pair hashes like its replies (both ends backends, rule 3).
//!
//! Frames that are not IPv4 with a readable L4 header (ARP, IPv6, fragments, truncated headers)
//! have no owner (`None`): whoever received them processes them, as the pipeline only passes or
//! drops those.
//!
//! Limits: a connection to a backend that has just been removed from its service loses rule 2
//! for its replies (they hash by rule 3) while it lasts; so does, in the rule-3 corner case, a
//! connection whose Maglev slot moved, or a sessionAffinity client whose remembered backend is no
//! longer Maglev's choice.

use crate::flow::FlowKey;
use crate::flow::proto;
use crate::service;
use crate::tables::Tables;
use crate::verdict::PortId;
use crate::wire::{ethernet, icmp, ipv4, udp, vxlan};

/// A worker's place among the node's workers, as the pipeline needs it (SNAT port choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Steer {
    /// This worker's index.
    pub worker: u16,
    /// Workers on the node (at least 1).
    pub workers: u16,
}

impl Default for Steer {
    fn default() -> Self {
        Self {
            worker: 0,
            workers: 1,
        }
    }
}

impl Steer {
    /// The port of this worker's share nearest to `port`: `port` with its residue modulo the
    /// worker count replaced by this worker's index (so [`port_owner`] of the result is this
    /// worker). With one worker, `port` itself.
    pub fn snat_port(&self, port: u16) -> u16 {
        let n = u32::from(self.workers.max(1));
        let w = u32::from(self.worker) % n;
        let p = u32::from(port);
        let aligned = p - p % n + w;
        let aligned = if aligned > u32::from(u16::MAX) {
            aligned - n
        } else {
            aligned
        };
        u16::try_from(aligned).unwrap_or(port)
    }
}

/// The worker whose share of the SNAT port space `port` is in.
pub fn port_owner(port: u16, workers: usize) -> usize {
    usize::from(port) % workers.max(1)
}

/// The endpoints of a frame's connection as seen on receive.
fn tuple_of(tables: &Tables, head: &[u8], ingress: PortId) -> Option<FlowKey> {
    let mut l2 = head;
    if ingress == tables.node.uplink
        && crate::vxlan::is_vxlan_to(l2, tables.node.underlay_ip.octets(), tables.node.vxlan_port)
    {
        let ip = ipv4::Packet::new_checked(l2.get(ethernet::HEADER_LEN..)?).ok()?;
        let skip = ethernet::HEADER_LEN + ip.header_len() + udp::HEADER_LEN + vxlan::HEADER_LEN;
        l2 = l2.get(skip..)?;
    }
    let eth = ethernet::Packet::new_checked(l2).ok()?;
    if eth.ethertype() != ethernet::ethertype::IPV4 {
        return None;
    }
    let t = ip_tuple(eth.payload())?;
    if t.proto == proto::ICMP {
        let ip = ipv4::Packet::new_checked(eth.payload()).ok()?;
        let m = icmp::Packet::new_checked(eth.payload().get(ip.header_len()..)?).ok()?;
        if m.is_error() {
            // The datagram the error is about went the other way.
            let inner = eth.payload().get(ip.header_len() + icmp::HEADER_LEN..)?;
            return ip_tuple(inner).map(|e| e.reversed());
        }
    }
    Some(t)
}

/// Addresses, ports (the echo identifier in both for ICMP echo) and protocol of an IPv4 header
/// and the first bytes of its payload; `None` for fragments and short headers.
fn ip_tuple(l3: &[u8]) -> Option<FlowKey> {
    let ip = ipv4::Packet::new_checked(l3).ok()?;
    if ip.is_fragment() {
        return None;
    }
    let l4 = l3.get(ip.header_len()..)?;
    let (src_port, dst_port) = match ip.protocol() {
        proto::TCP | proto::UDP => {
            let p = l4.get(..4)?;
            (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )
        }
        proto::ICMP => {
            let m = icmp::Packet::new_checked(l4).ok()?;
            if m.is_echo() {
                (m.echo_id(), m.echo_id())
            } else {
                (0, 0)
            }
        }
        _ => (0, 0),
    };
    Some(FlowKey {
        src: ip.src(),
        dst: ip.dst(),
        src_port,
        dst_port,
        proto: ip.protocol(),
    })
}

/// A hash of the connection that is the same for both directions.
fn symmetric_hash(t: &FlowKey) -> u64 {
    let a = (t.src, t.src_port);
    let b = (t.dst, t.dst_port);
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    FlowKey {
        src: lo.0,
        dst: hi.0,
        src_port: lo.1,
        dst_port: hi.1,
        proto: t.proto,
    }
    .hash64()
}

/// A hash of one endpoint (a service's client).
fn endpoint_hash(ip: [u8; 4], port: u16, proto: u8) -> u64 {
    FlowKey {
        src: ip,
        src_port: port,
        proto,
        ..FlowKey::default()
    }
    .hash64()
}

/// The steering hash of a connection tuple (rules 2 and 3 of the module doc).
fn flow_hash(tables: &Tables, t: &FlowKey) -> u64 {
    let src_backend = tables.is_backend(t.src, t.src_port, t.proto);
    if let Some(svc) = tables.cluster_ip(t.dst, t.dst_port, t.proto) {
        if !src_backend {
            return endpoint_hash(t.src, t.src_port, t.proto);
        }
        let mut r = *t;
        if let Some((ip, port)) = service::maglev_choice(tables, svc, t) {
            r.dst = ip;
            r.dst_port = port;
        }
        return symmetric_hash(&r);
    }
    let dst_backend = tables.is_backend(t.dst, t.dst_port, t.proto);
    match (src_backend, dst_backend) {
        (false, true) => endpoint_hash(t.src, t.src_port, t.proto),
        (true, false) => endpoint_hash(t.dst, t.dst_port, t.proto),
        _ => symmetric_hash(t),
    }
}

/// The worker (of `workers`) that processes this frame: see the module doc. `head` is the frame's
/// first buffer (all headers are there), `ingress` the port it arrived on. `None`: any worker (not
/// a connection the pipeline tracks). With one worker, always `Some(0)` without reading the frame.
/// The pipeline steers from the headers it parsed ([`owner_of`]); this reads them itself, for
/// tests and tools.
pub fn owner(tables: &Tables, head: &[u8], ingress: PortId, workers: usize) -> Option<usize> {
    if workers <= 1 {
        return Some(0);
    }
    let t = tuple_of(tables, head, ingress)?;
    Some(owner_of(tables, &t, workers))
}

/// The worker (of `workers`, at least 1) that owns the connection of `key`, the tuple of a packet
/// as it arrived (the inner packet for VXLAN to this node; for an ICMP error, the reversed tuple
/// of the datagram it carries). See the module doc.
pub fn owner_of(tables: &Tables, key: &FlowKey, workers: usize) -> usize {
    if workers <= 1 {
        return 0;
    }
    if key.dst == tables.node.vtep_ip.octets() {
        return port_owner(key.dst_port, workers);
    }
    let h = flow_hash(tables, key);
    ((u128::from(h) * workers as u128) >> 64) as usize
}

#[cfg(test)]
mod tests;
