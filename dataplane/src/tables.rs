//! The immutable snapshot workers read: this node's configuration, local pods, remote nodes,
//! services with their Maglev tables, and the compiled NetworkPolicy.
//!
//! Built off the hot path with [`TablesBuilder`] (which allocates and may fail), then published
//! whole (the agent swaps an `Arc<Tables>` with arc-swap between batches). Lookups never allocate
//! and never panic. Maps use ahash with fixed seeds, so lookups cost the same on every run.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use ipnet::Ipv4Net;

use crate::maglev::{MaglevBackend, MaglevError, MaglevTable};
use crate::policy::PolicyTable;
use crate::verdict::PortId;
use crate::wire::ethernet::Mac;

type Map<K, V> = HashMap<K, V, ahash::RandomState>;

fn map<K, V>() -> Map<K, V> {
    HashMap::with_hasher(ahash::RandomState::with_seeds(
        0x736c_7569_6365_0001,
        0x736c_7569_6365_0002,
        0x736c_7569_6365_0003,
        0x736c_7569_6365_0004,
    ))
}

/// What the pipeline does with IPv6 frames until Sluice supports IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Ipv6Handling {
    /// Hand them to the kernel.
    #[default]
    Pass,
    /// Drop them ([`crate::verdict::DropReason::Ipv6`]).
    Drop,
}

/// This node's own configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// The uplink's address and MAC on the underlay.
    pub underlay_ip: Ipv4Addr,
    pub underlay_mac: Mac,
    /// The uplink's AF_XDP port.
    pub uplink: PortId,
    /// The underlay MTU; VXLAN routes carry inner packets of at most `underlay_mtu - 50`.
    pub underlay_mtu: u16,
    /// The VTEP's MAC and address (Flannel's `flannel.1`: `10.244.N.0`), used as inner MAC and as
    /// the NodePort SNAT address.
    pub vtep_mac: Mac,
    pub vtep_ip: Ipv4Addr,
    pub vni: u32,
    pub vxlan_port: u16,
    pub cluster_cidr: Ipv4Net,
    pub service_cidr: Ipv4Net,
    /// This node's pod CIDR.
    pub pod_cidr: Ipv4Net,
    pub node_port_range: RangeInclusive<u16>,
    /// The MTU of local pod routes (the pod veths' MTU).
    pub pod_mtu: u16,
    pub ipv6: Ipv6Handling,
}

impl NodeConfig {
    /// Defaults from DESIGN.md's conventions around the given node specifics.
    pub fn new(
        underlay_ip: Ipv4Addr,
        underlay_mac: Mac,
        uplink: PortId,
        pod_cidr: Ipv4Net,
        vtep_mac: Mac,
    ) -> Self {
        Self {
            underlay_ip,
            underlay_mac,
            uplink,
            underlay_mtu: 1500,
            vtep_mac,
            vtep_ip: pod_cidr.network(),
            vni: crate::vxlan::FLANNEL_VNI,
            vxlan_port: crate::vxlan::FLANNEL_PORT,
            cluster_cidr: Ipv4Net::new(Ipv4Addr::new(10, 244, 0, 0), 16).unwrap_or_default(),
            service_cidr: Ipv4Net::new(Ipv4Addr::new(10, 96, 0, 0), 12).unwrap_or_default(),
            pod_cidr,
            node_port_range: 30000..=32767,
            pod_mtu: 65535,
            ipv6: Ipv6Handling::Pass,
        }
    }
}

/// A pod on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalPod {
    /// The AF_XDP port of its host veth.
    pub port: PortId,
    /// The MAC of the pod's eth0.
    pub pod_mac: Mac,
    /// The MAC of its host-side veth (the pod's gateway `169.254.1.1`).
    pub host_mac: Mac,
}

/// Another node, reached over VXLAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    pub pod_cidr: Ipv4Net,
    pub underlay_ip: Ipv4Addr,
    /// The next hop's MAC on the underlay (the node itself on a flat L2 underlay).
    pub next_hop_mac: Mac,
    /// Its VTEP MAC (inner destination MAC).
    pub vtep_mac: Mac,
}

/// A service backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Maglev weight (1 for plain Kubernetes endpoints).
    pub weight: u32,
}

/// A service port as the control plane describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// `namespace/name:port` (for errors and flow events).
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    pub node_port: Option<u16>,
    pub backends: Vec<Backend>,
    /// sessionAffinity ClientIP timeout in seconds (`None`: no affinity).
    pub affinity_timeout_s: Option<u32>,
}

/// Index of a service in [`Tables`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceId(pub u32);

/// A service as workers see it.
#[derive(Clone, Debug)]
pub struct Service {
    pub spec: ServiceSpec,
    pub maglev: MaglevTable,
    /// Affinity timeout in nanoseconds, 0 without affinity.
    pub affinity_timeout_ns: u64,
}

/// Why a snapshot could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    #[error("service {name}: Maglev table: {source}")]
    Maglev {
        name: String,
        #[source]
        source: MaglevError,
    },
    #[error("service {name}: NodePort {port} is outside the range {min}-{max}")]
    NodePortOutOfRange {
        name: String,
        port: u16,
        min: u16,
        max: u16,
    },
    #[error("service {name}: {what} is already taken by service {other}")]
    Duplicate {
        name: String,
        what: String,
        other: String,
    },
    #[error("remote node {underlay}: pod CIDR {cidr} overlaps this node's or another node's")]
    OverlappingCidr { underlay: Ipv4Addr, cidr: Ipv4Net },
}

/// The snapshot.
#[derive(Debug)]
pub struct Tables {
    pub node: NodeConfig,
    /// Pods outside this node's pod CIDR (unusual), by address.
    pods: Map<u32, LocalPod>,
    /// Pods inside this node's pod CIDR, indexed by `address - network` (a /16 or longer CIDR).
    local_slots: Vec<Option<LocalPod>>,
    /// Remote nodes by (masked pod CIDR network, prefix length).
    nodes: Map<(u32, u8), RemoteNode>,
    /// The distinct prefix lengths of remote pod CIDRs, longest first.
    node_prefixes: Vec<u8>,
    cluster_ips: Map<(u32, u16, u8), ServiceId>,
    node_ports: Map<(u16, u8), ServiceId>,
    /// Every (address, port, protocol) some service balances to.
    backends: Map<(u32, u16, u8), ()>,
    services: Vec<Service>,
    pub policy: PolicyTable,
    /// `node.underlay_mtu - 50`, precomputed.
    pub vxlan_mtu: u16,
    /// (network, mask) of the cluster CIDR and of this node's pod CIDR, host order.
    cluster: (u32, u32),
    local: (u32, u32),
}

fn net_mask(n: &Ipv4Net) -> (u32, u32) {
    let mask = u32::from(n.netmask());
    (u32::from(n.network()) & mask, mask)
}

impl Tables {
    /// The local pod with this address.
    #[inline]
    pub fn local_pod(&self, ip: [u8; 4]) -> Option<&LocalPod> {
        let a = u32::from_be_bytes(ip);
        if a & self.local.1 == self.local.0 && !self.local_slots.is_empty() {
            return self
                .local_slots
                .get((a - self.local.0) as usize)
                .and_then(Option::as_ref);
        }
        self.pods.get(&a)
    }

    /// The remote node whose pod CIDR holds this address (longest prefix).
    #[inline]
    pub fn remote_node(&self, ip: [u8; 4]) -> Option<&RemoteNode> {
        let a = u32::from_be_bytes(ip);
        self.node_prefixes.iter().find_map(|&len| {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            self.nodes.get(&(a & mask, len))
        })
    }

    /// The service behind ClusterIP `ip:port/proto`.
    #[inline]
    pub fn cluster_ip(&self, ip: [u8; 4], port: u16, proto: u8) -> Option<ServiceId> {
        self.cluster_ips
            .get(&(u32::from_be_bytes(ip), port, proto))
            .copied()
    }

    /// The service behind NodePort `port/proto`.
    #[inline]
    pub fn node_port(&self, port: u16, proto: u8) -> Option<ServiceId> {
        self.node_ports.get(&(port, proto)).copied()
    }

    /// Whether `ip:port/proto` is a backend endpoint of some service.
    #[inline]
    pub fn is_backend(&self, ip: [u8; 4], port: u16, proto: u8) -> bool {
        self.backends
            .contains_key(&(u32::from_be_bytes(ip), port, proto))
    }

    /// A service by id.
    #[inline]
    pub fn service(&self, id: ServiceId) -> Option<&Service> {
        self.services.get(id.0 as usize)
    }

    /// Number of services.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Whether an address is in the cluster CIDR.
    #[inline]
    pub fn in_cluster(&self, ip: [u8; 4]) -> bool {
        u32::from_be_bytes(ip) & self.cluster.1 == self.cluster.0
    }

    /// Whether an address is in this node's pod CIDR.
    #[inline]
    pub fn in_local_cidr(&self, ip: [u8; 4]) -> bool {
        u32::from_be_bytes(ip) & self.local.1 == self.local.0
    }
}

/// Builds a [`Tables`] snapshot (off the hot path).
#[derive(Debug)]
pub struct TablesBuilder {
    node: NodeConfig,
    pods: Vec<(Ipv4Addr, LocalPod)>,
    nodes: Vec<RemoteNode>,
    services: Vec<ServiceSpec>,
    policy: PolicyTable,
    maglev_size: usize,
}

impl TablesBuilder {
    pub fn new(node: NodeConfig) -> Self {
        Self {
            node,
            pods: Vec::new(),
            nodes: Vec::new(),
            services: Vec::new(),
            policy: PolicyTable::allow_all(),
            maglev_size: MaglevTable::DEFAULT_SIZE,
        }
    }
    /// Add (or replace) a local pod.
    pub fn pod(mut self, ip: Ipv4Addr, pod: LocalPod) -> Self {
        self.pods.push((ip, pod));
        self
    }
    /// Add a remote node.
    pub fn remote_node(mut self, node: RemoteNode) -> Self {
        self.nodes.push(node);
        self
    }
    /// Add a service port.
    pub fn service(mut self, spec: ServiceSpec) -> Self {
        self.services.push(spec);
        self
    }
    /// Use this compiled policy (default: allow all).
    pub fn policy(mut self, policy: PolicyTable) -> Self {
        self.policy = policy;
        self
    }
    /// Maglev table size (prime; default 65537).
    pub fn maglev_size(mut self, size: usize) -> Self {
        self.maglev_size = size;
        self
    }

    /// Build the snapshot: Maglev tables, maps, validation.
    pub fn build(self) -> Result<Tables, TablesError> {
        let local = net_mask(&self.node.pod_cidr);
        let mut local_slots = if self.node.pod_cidr.prefix_len() >= 16 {
            vec![None; 1usize << (32 - self.node.pod_cidr.prefix_len())]
        } else {
            Vec::new()
        };
        let mut pods = map();
        for (ip, p) in self.pods {
            let a = u32::from(ip);
            match local_slots.get_mut(a.wrapping_sub(local.0) as usize) {
                Some(slot) if a & local.1 == local.0 => *slot = Some(p),
                _ => {
                    pods.insert(a, p);
                }
            }
        }
        let mut nodes = map();
        let mut prefixes = Vec::new();
        for n in self.nodes {
            let c = n.pod_cidr.trunc();
            if c.contains(&self.node.pod_cidr) || self.node.pod_cidr.contains(&c) {
                return Err(TablesError::OverlappingCidr {
                    underlay: n.underlay_ip,
                    cidr: n.pod_cidr,
                });
            }
            let key = (u32::from(c.network()), c.prefix_len());
            if nodes.insert(key, n).is_some() {
                return Err(TablesError::OverlappingCidr {
                    underlay: n.underlay_ip,
                    cidr: n.pod_cidr,
                });
            }
            if !prefixes.contains(&c.prefix_len()) {
                prefixes.push(c.prefix_len());
            }
        }
        prefixes.sort_unstable_by(|a, b| b.cmp(a));
        let mut cluster_ips = map();
        let mut node_ports = map();
        let mut backends = map();
        let mut services = Vec::with_capacity(self.services.len());
        for spec in self.services {
            let id = ServiceId(services.len() as u32);
            let keys: Vec<String> = spec
                .backends
                .iter()
                .map(|b| format!("{}:{}", b.ip, b.port))
                .collect();
            let mb: Vec<MaglevBackend<'_>> = keys
                .iter()
                .zip(&spec.backends)
                .map(|(k, b)| MaglevBackend {
                    key: k.as_bytes(),
                    weight: b.weight,
                })
                .collect();
            let maglev = MaglevTable::build(&mb, self.maglev_size).map_err(|source| {
                TablesError::Maglev {
                    name: spec.name.clone(),
                    source,
                }
            })?;
            let dup =
                |what: String, other: ServiceId, services: &Vec<Service>| TablesError::Duplicate {
                    name: spec.name.clone(),
                    what,
                    other: services
                        .get(other.0 as usize)
                        .map(|s: &Service| s.spec.name.clone())
                        .unwrap_or_default(),
                };
            let k = (u32::from(spec.cluster_ip), spec.port, spec.proto);
            if let Some(o) = cluster_ips.insert(k, id) {
                return Err(dup(
                    format!("{}:{}/{}", spec.cluster_ip, spec.port, spec.proto),
                    o,
                    &services,
                ));
            }
            if let Some(np) = spec.node_port {
                let r = &self.node.node_port_range;
                if !r.contains(&np) {
                    return Err(TablesError::NodePortOutOfRange {
                        name: spec.name.clone(),
                        port: np,
                        min: *r.start(),
                        max: *r.end(),
                    });
                }
                if let Some(o) = node_ports.insert((np, spec.proto), id) {
                    return Err(dup(format!("NodePort {np}/{}", spec.proto), o, &services));
                }
            }
            for b in &spec.backends {
                backends.insert((u32::from(b.ip), b.port, spec.proto), ());
            }
            let affinity_timeout_ns = spec
                .affinity_timeout_s
                .map_or(0, |s| u64::from(s) * 1_000_000_000);
            services.push(Service {
                spec,
                maglev,
                affinity_timeout_ns,
            });
        }
        let vxlan_mtu = self
            .node
            .underlay_mtu
            .saturating_sub(crate::vxlan::OVERHEAD as u16);
        Ok(Tables {
            cluster: net_mask(&self.node.cluster_cidr),
            local,
            local_slots,
            node: self.node,
            pods,
            nodes,
            node_prefixes: prefixes,
            cluster_ips,
            node_ports,
            backends,
            services,
            policy: self.policy,
            vxlan_mtu,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const POD_A_PORT: PortId = PortId(1);

    /// Node 1 (10.244.1.0/24, underlay 192.168.50.1) with pods .2 and .3, node 2 remote, a
    /// ClusterIP 10.96.0.10:80/TCP with backends 10.244.1.3:8080 and 10.244.2.3:8080 (NodePort
    /// 30080), a UDP service with affinity, and an empty service.
    pub fn demo_tables() -> Tables {
        crate::demo::demo_tables()
    }

    #[test]
    fn lookups() {
        let t = demo_tables();
        assert_eq!(t.local_pod([10, 244, 1, 2]).unwrap().port, POD_A_PORT);
        assert!(t.local_pod([10, 244, 1, 4]).is_none());
        assert!(t.local_pod([10, 244, 2, 3]).is_none());
        // A pod outside the node's CIDR still resolves (through the map).
        let odd = LocalPod {
            port: PortId(9),
            pod_mac: Mac([1; 6]),
            host_mac: Mac([2; 6]),
        };
        let t2 = crate::demo::demo_builder()
            .pod(Ipv4Addr::new(10, 244, 9, 9), odd)
            .build()
            .unwrap();
        assert_eq!(t2.local_pod([10, 244, 9, 9]), Some(&odd));
        assert_eq!(t2.local_pod([10, 244, 1, 3]).unwrap().port, PortId(2));
        assert_eq!(
            t.remote_node([10, 244, 2, 77]).unwrap().underlay_ip,
            Ipv4Addr::new(192, 168, 50, 2)
        );
        assert!(t.remote_node([10, 244, 9, 1]).is_none());
        assert!(t.cluster_ip([10, 96, 0, 10], 80, 6).is_some());
        assert!(t.cluster_ip([10, 96, 0, 10], 80, 17).is_none());
        assert!(t.node_port(30080, 6).is_some());
        assert_eq!(t.vxlan_mtu, 1450);
    }

    #[test]
    fn build_errors() {
        let n = demo_tables().node;
        let spec = ServiceSpec {
            name: "x".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 1),
            port: 1,
            proto: 6,
            node_port: Some(80),
            backends: vec![],
            affinity_timeout_s: None,
        };
        let e = TablesBuilder::new(n.clone()).service(spec.clone()).build();
        assert!(matches!(e, Err(TablesError::NodePortOutOfRange { .. })));
        let spec = ServiceSpec {
            node_port: None,
            ..spec
        };
        let e = TablesBuilder::new(n.clone())
            .service(spec.clone())
            .service(spec)
            .build();
        assert!(matches!(e, Err(TablesError::Duplicate { .. })));
        let e = TablesBuilder::new(n.clone())
            .remote_node(RemoteNode {
                pod_cidr: n.pod_cidr,
                underlay_ip: Ipv4Addr::new(1, 1, 1, 1),
                next_hop_mac: Mac([0; 6]),
                vtep_mac: Mac([0; 6]),
            })
            .build();
        assert!(matches!(e, Err(TablesError::OverlappingCidr { .. })));
    }
}
