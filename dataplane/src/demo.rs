//! A fixed table snapshot and frame builders, shared by the unit tests, the `sluice-replay` demo,
//! the fuzz targets and the benchmarks. Node 1 of a two-node cluster, addressed like the golden
//! capture (`scripts/capture-vxlan-golden.sh`):
//!
//! | what | address |
//! |---|---|
//! | this node | underlay 192.168.50.1 (02:00:c0:a8:32:01) on port 0, pod CIDR 10.244.1.0/24, VTEP 10.244.1.0 (0e:00:00:00:01:00) |
//! | local pods | 10.244.1.2 on port 1, 10.244.1.3 on port 2 (pod MAC 02:00:0a:f4:01:0N, host veth ee:ee:00:00:01:0N) |
//! | remote node | 10.244.2.0/24 at 192.168.50.2 (02:00:c0:a8:32:02), VTEP 0e:00:00:00:02:00 |
//! | `default/web:80` | 10.96.0.10:80/TCP -> 10.244.1.3:8080, 10.244.2.3:8080; NodePort 30080 |
//! | `default/dns:53` | 10.96.0.53:53/UDP -> 10.244.2.3:5353, 10.244.2.4:5353; ClientIP affinity 10 s |
//! | `default/empty:80` | 10.96.0.99:80/TCP, no backends |

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::checksum;
use crate::flow::proto;
use crate::probe::{self, Probe, ProbeL4};
use crate::tables::{
    Backend, LocalPod, NodeConfig, RemoteNode, ServiceSpec, Tables, TablesBuilder,
};
use crate::verdict::PortId;
use crate::wire::ethernet::{self, Mac};
use crate::wire::icmp;

pub const NODE_MAC: Mac = Mac([2, 0, 0xc0, 0xa8, 0x32, 1]);
pub const PEER_MAC: Mac = Mac([2, 0, 0xc0, 0xa8, 0x32, 2]);
pub const VTEP_MAC: Mac = Mac([0x0e, 0, 0, 0, 1, 0]);
pub const PEER_VTEP_MAC: Mac = Mac([0x0e, 0, 0, 0, 2, 0]);
pub const UPLINK: PortId = PortId(0);

/// The MAC of local pod `10.244.1.n`'s eth0.
pub fn pod_mac(n: u8) -> Mac {
    Mac([2, 0, 0x0a, 0xf4, 1, n])
}

/// The MAC of local pod `10.244.1.n`'s host veth.
pub fn host_mac(n: u8) -> Mac {
    Mac([0xee, 0xee, 0, 0, 1, n])
}

fn net(a: [u8; 4], len: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(a), len).unwrap_or_default()
}

/// The demo snapshot (see the module doc).
pub fn demo_tables() -> Tables {
    demo_builder()
        .build()
        .unwrap_or_else(|e| unreachable!("demo tables: {e}"))
}

/// The demo snapshot's builder, to add to it.
pub fn demo_builder() -> TablesBuilder {
    let node = NodeConfig::new(
        Ipv4Addr::new(192, 168, 50, 1),
        NODE_MAC,
        UPLINK,
        net([10, 244, 1, 0], 24),
        VTEP_MAC,
    );
    let b = |a: [u8; 4], port| Backend {
        ip: Ipv4Addr::from(a),
        port,
        weight: 1,
    };
    TablesBuilder::new(node)
        .pod(
            Ipv4Addr::new(10, 244, 1, 2),
            LocalPod {
                port: PortId(1),
                pod_mac: pod_mac(2),
                host_mac: host_mac(2),
            },
        )
        .pod(
            Ipv4Addr::new(10, 244, 1, 3),
            LocalPod {
                port: PortId(2),
                pod_mac: pod_mac(3),
                host_mac: host_mac(3),
            },
        )
        .remote_node(RemoteNode {
            pod_cidr: net([10, 244, 2, 0], 24),
            underlay_ip: Ipv4Addr::new(192, 168, 50, 2),
            next_hop_mac: PEER_MAC,
            vtep_mac: PEER_VTEP_MAC,
        })
        .service(ServiceSpec {
            name: "default/web:80".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: proto::TCP,
            node_port: Some(30080),
            backends: vec![b([10, 244, 1, 3], 8080), b([10, 244, 2, 3], 8080)],
            affinity_timeout_s: None,
        })
        .service(ServiceSpec {
            name: "default/dns:53".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 53),
            port: 53,
            proto: proto::UDP,
            node_port: None,
            backends: vec![b([10, 244, 2, 3], 5353), b([10, 244, 2, 4], 5353)],
            affinity_timeout_s: Some(10),
        })
        .service(ServiceSpec {
            name: "default/empty:80".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 99),
            port: 80,
            proto: proto::TCP,
            node_port: None,
            backends: vec![],
            affinity_timeout_s: None,
        })
}

/// Addresses and ports of a frame to build.
#[derive(Clone, Copy, Debug)]
pub struct FrameSpec {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
}

impl FrameSpec {
    /// A frame from local pod `10.244.1.n` (as it leaves the pod: to its host veth's MAC).
    pub fn from_pod(n: u8, dst: [u8; 4], src_port: u16, dst_port: u16) -> Self {
        Self {
            src_mac: pod_mac(n),
            dst_mac: host_mac(n),
            src: [10, 244, 1, n],
            dst,
            src_port,
            dst_port,
        }
    }
}

impl FrameSpec {
    /// The probe with these addresses (TTL 64) and transport header `l4`.
    fn probe(&self, l4: ProbeL4) -> Probe {
        Probe {
            src_mac: self.src_mac,
            dst_mac: self.dst_mac,
            src: self.src,
            dst: self.dst,
            ttl: 64,
            l4,
        }
    }
}

fn ip_frame(s: &FrameSpec, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let p = s.probe(ProbeL4::Udp {
        src_port: s.src_port,
        dst_port: s.dst_port,
    });
    probe::ip_frame(&p, protocol, l4)
}

/// A TCP segment (20-byte header) with `flags`, a correct checksum and `payload`.
pub fn tcp_frame(s: &FrameSpec, flags: u8, payload: &[u8]) -> Vec<u8> {
    s.probe(ProbeL4::Tcp {
        src_port: s.src_port,
        dst_port: s.dst_port,
        flags,
    })
    .frame(payload)
}

/// A UDP datagram with a correct checksum.
pub fn udp_frame(s: &FrameSpec, payload: &[u8]) -> Vec<u8> {
    s.probe(ProbeL4::Udp {
        src_port: s.src_port,
        dst_port: s.dst_port,
    })
    .frame(payload)
}

/// An ICMP echo request (`reply = false`) or reply with id `s.src_port`.
pub fn icmp_echo_frame(s: &FrameSpec, reply: bool, seq: u16) -> Vec<u8> {
    let payload: Vec<u8> = (0..32u8).collect();
    s.probe(ProbeL4::IcmpEcho {
        id: s.src_port,
        seq,
        reply,
    })
    .frame(&payload)
}

/// An ICMP error (`msg_type`/`code`) from `s.src` to `s.dst` about `about` (a full IPv4 frame;
/// its IP header and first 8 bytes are embedded).
pub fn icmp_error_frame(s: &FrameSpec, msg_type: u8, code: u8, about: &[u8]) -> Vec<u8> {
    let inner = about.get(ethernet::HEADER_LEN..).unwrap_or(&[]);
    let hl = inner.first().map_or(20, |b| usize::from(b & 0x0f) * 4);
    let take = inner.len().min(hl + 8);
    let mut l4 = vec![0u8; icmp::HEADER_LEN];
    let _ = icmp::Repr {
        msg_type,
        code,
        rest: [0; 4],
    }
    .emit(&mut l4);
    l4.extend_from_slice(&inner[..take]);
    let c = checksum::checksum(&l4);
    l4[2..4].copy_from_slice(&c.to_be_bytes());
    ip_frame(s, proto::ICMP, &l4)
}
