//! Building and publishing the table snapshot the workers read.
//!
//! The agent thread builds a whole new [`Snapshot`] from the config, the manifests and the pod
//! registry whenever one of them changes, and publishes it with one atomic pointer swap
//! ([`Publisher::publish`]). Workers call [`Publisher::load`] between batches and never lock.
//! Nothing here runs on the hot path.
//!
//! Port ids: a port is an interface the agent owns a socket on, named by its ifindex (the uplink's
//! ifindex for the uplink, the host veth's ifindex for a pod).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::config::{Mac, NodeConfig};
use super::manifests::ClusterObjects;
use super::registry::PodRecord;
use sluice_dataplane::policy::{
    ContainerPort, PodInfo, PolicyError, PolicyInputs, PolicyTable, Protocol,
};
use sluice_dataplane::tables::{self, Backend, ServiceSpec, Tables, TablesBuilder, TablesError};

/// The label an EndpointSlice carries to name its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An interface the agent owns sockets on, by ifindex: the pipeline's port id.
pub use sluice_dataplane::verdict::PortId;

/// A pod on this node, as the route stage needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub ip: Ipv4Addr,
    pub port: PortId,
    pub pod_mac: Mac,
    pub host_mac: Mac,
}

/// Another node's pod CIDR and how to reach it over VXLAN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    pub name: String,
    pub pod_cidr: Ipv4Net,
    pub underlay_ip: Ipv4Addr,
    pub underlay_mac: Mac,
    pub vtep_mac: Mac,
    pub vtep_ip: Ipv4Addr,
}

/// One port of one Service with its ready backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name:port-name`.
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: Option<u16>,
    /// Ready backends, sorted (the order Maglev tables are built from).
    pub backends: Vec<SocketAddrV4>,
}

/// This node's identity as the pipeline needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNode {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    pub cluster_cidr: Ipv4Net,
    pub service_cidr: Ipv4Net,
    pub vtep_ip: Ipv4Addr,
    pub vtep_mac: Mac,
    pub vni: u32,
    pub vxlan_port: u16,
    pub overlay_mtu: u32,
}

/// One immutable snapshot of everything the workers look up: the pipeline's [`Tables`] plus the
/// agent's own view it was built from (for export and tests).
#[derive(Debug)]
pub struct Snapshot {
    /// Increases by one with every publication.
    pub generation: u64,
    pub node: LocalNode,
    pub pods: BTreeMap<Ipv4Addr, LocalPod>,
    pub remotes: Vec<RemoteNode>,
    pub services: Vec<ServicePort>,
    /// What the pipeline reads.
    pub tables: Tables,
    /// Where workers send frames the pipeline passes to the kernel (`None`: counted and dropped).
    pub punt: Option<super::punt::Punt>,
}

/// A snapshot could not be built from the inputs.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Tables(#[from] TablesError),
    #[error("NetworkPolicy: {0}")]
    Policy(#[from] PolicyError),
}

/// What the snapshot is built from besides the config and the cluster objects.
#[derive(Debug, Clone, Copy)]
pub struct NodeLinks {
    /// The uplink's port (its ifindex).
    pub uplink: PortId,
    /// The uplink's MAC (outer source MAC).
    pub uplink_mac: Mac,
}

impl Snapshot {
    /// Build a snapshot from the config, the cluster objects and the pods on this node.
    pub fn build<'a>(
        generation: u64,
        config: &NodeConfig,
        links: NodeLinks,
        objects: &ClusterObjects,
        pods: impl IntoIterator<Item = &'a PodRecord>,
    ) -> Result<Self, SnapshotError> {
        let node = LocalNode {
            name: config.node_name.clone(),
            underlay_ip: config.underlay.address,
            pod_cidr: config.pod_cidr,
            cluster_cidr: config.cluster_cidr,
            service_cidr: config.service_cidr,
            vtep_ip: config.vtep_address(),
            vtep_mac: config.vtep.mac,
            vni: config.vtep.vni,
            vxlan_port: config.vtep.port,
            overlay_mtu: config.overlay_mtu(),
        };
        let records: Vec<&PodRecord> = pods.into_iter().collect();
        let pods: BTreeMap<Ipv4Addr, LocalPod> = records
            .iter()
            .map(|p| {
                (
                    p.ip,
                    LocalPod {
                        ip: p.ip,
                        port: PortId(p.host_ifindex),
                        pod_mac: p.pod_mac,
                        host_mac: p.host_mac,
                    },
                )
            })
            .collect();
        let remotes: Vec<RemoteNode> = config
            .peers
            .iter()
            .chain(
                objects
                    .peers
                    .iter()
                    .filter(|p| !config.peers.iter().any(|c| c.name == p.name)),
            )
            .map(|p| RemoteNode {
                name: p.name.clone(),
                pod_cidr: p.pod_cidr,
                underlay_ip: p.underlay_ip,
                underlay_mac: p.underlay_mac,
                vtep_mac: p.vtep_mac,
                vtep_ip: p.pod_cidr.network(),
            })
            .collect();
        let services = service_ports(&objects.services, &objects.endpoint_slices);

        let mut pnode = tables::NodeConfig::new(
            config.underlay.address,
            links.uplink_mac,
            links.uplink,
            config.pod_cidr,
            config.vtep.mac,
        );
        pnode.underlay_mtu = u16::try_from(config.underlay.mtu).unwrap_or(u16::MAX);
        pnode.vtep_ip = node.vtep_ip;
        pnode.vni = config.vtep.vni;
        pnode.vxlan_port = config.vtep.port;
        pnode.cluster_cidr = config.cluster_cidr;
        pnode.service_cidr = config.service_cidr;
        pnode.node_port_range = config.node_port_range.0..=config.node_port_range.1;
        pnode.pod_mtu = u16::try_from(config.pod_mtu).unwrap_or(u16::MAX);
        let mut b = TablesBuilder::new(pnode);
        for p in pods.values() {
            b = b.pod(
                p.ip,
                tables::LocalPod {
                    port: p.port,
                    pod_mac: p.pod_mac,
                    host_mac: p.host_mac,
                },
            );
        }
        for r in &remotes {
            b = b.remote_node(tables::RemoteNode {
                pod_cidr: r.pod_cidr,
                underlay_ip: r.underlay_ip,
                next_hop_mac: r.underlay_mac,
                vtep_mac: r.vtep_mac,
            });
        }
        for s in &services {
            b = b.service(ServiceSpec {
                name: s.name.clone(),
                cluster_ip: s.cluster_ip,
                port: s.port,
                proto: s.protocol.number(),
                node_port: s.node_port,
                backends: s
                    .backends
                    .iter()
                    .map(|a| Backend {
                        ip: *a.ip(),
                        port: a.port(),
                        weight: 1,
                    })
                    .collect(),
                affinity_timeout_s: None,
            });
        }
        let policy = PolicyTable::compile(&PolicyInputs {
            namespaces: objects.namespaces.clone(),
            pods: records
                .iter()
                .map(|p| PodInfo {
                    namespace: p.namespace_or_default().to_owned(),
                    name: p.name.clone(),
                    labels: p.labels.clone(),
                    ip: p.ip,
                    ports: p
                        .ports
                        .iter()
                        .filter_map(|cp| {
                            Some(ContainerPort {
                                name: (!cp.name.is_empty()).then(|| cp.name.clone()),
                                port: cp.port,
                                protocol: Protocol::from_k8s(Some(&cp.protocol))?,
                            })
                        })
                        .collect(),
                    local: true,
                })
                .map(
                    |local| match objects.pods.iter().find(|o| o.ip == local.ip) {
                        Some(o) => PodInfo {
                            local: true,
                            ..o.clone()
                        },
                        None => local,
                    },
                )
                .chain(
                    objects
                        .pods
                        .iter()
                        .filter(|o| !records.iter().any(|r| r.ip == o.ip))
                        .map(|o| PodInfo {
                            local: false,
                            ..o.clone()
                        }),
                )
                .collect(),
            policies: objects.network_policies.clone(),
            node_addrs: vec![config.underlay.address, node.vtep_ip],
        })?;
        let tables = b.policy(policy).build()?;
        Ok(Self {
            generation,
            node,
            pods,
            remotes,
            services,
            tables,
            punt: None,
        })
    }

    /// The remote node whose pod CIDR holds `ip`.
    pub fn remote_for(&self, ip: Ipv4Addr) -> Option<&RemoteNode> {
        self.remotes.iter().find(|r| r.pod_cidr.contains(&ip))
    }
}

/// Resolve every Service port to its ready backends through the EndpointSlices naming it.
/// Services without a ClusterIP (headless, ExternalName) and unknown protocols are skipped.
pub fn service_ports(services: &[Service], slices: &[EndpointSlice]) -> Vec<ServicePort> {
    let mut out = Vec::new();
    for svc in services {
        let (Some(name), Some(spec)) = (svc.metadata.name.as_deref(), svc.spec.as_ref()) else {
            continue;
        };
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let Some(cluster_ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        for sp in spec.ports.iter().flatten() {
            let Some(protocol) = Protocol::from_k8s(sp.protocol.as_deref()) else {
                continue;
            };
            let Ok(port) = u16::try_from(sp.port) else {
                continue;
            };
            let mut backends = Vec::new();
            for slice in slices.iter().filter(|s| {
                s.metadata.namespace.as_deref().unwrap_or("default") == ns
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        .is_some_and(|n| n == name)
                    && s.address_type == "IPv4"
            }) {
                // The slice port with the same name (both unnamed for single-port services).
                let Some(target) = slice.ports.iter().flatten().find_map(|p| {
                    (p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or("")
                        && Protocol::from_k8s(p.protocol.as_deref()) == Some(protocol))
                    .then_some(p.port)
                    .flatten()
                }) else {
                    continue;
                };
                let Ok(target) = u16::try_from(target) else {
                    continue;
                };
                for ep in slice.endpoints.iter().flatten() {
                    if ep
                        .conditions
                        .as_ref()
                        .and_then(|c| c.ready)
                        .is_some_and(|r| !r)
                    {
                        continue;
                    }
                    backends.extend(
                        ep.addresses
                            .iter()
                            .filter_map(|a| a.parse::<Ipv4Addr>().ok())
                            .map(|a| SocketAddrV4::new(a, target)),
                    );
                }
            }
            backends.sort();
            backends.dedup();
            out.push(ServicePort {
                name: format!("{ns}/{name}:{}", sp.name.as_deref().unwrap_or("")),
                cluster_ip,
                port,
                protocol,
                node_port: sp.node_port.and_then(|p| u16::try_from(p).ok()),
                backends,
            });
        }
    }
    out.sort_by_key(|s| (s.cluster_ip, s.port, s.protocol));
    out
}

/// One worker's view of the published snapshot: it keeps its own `Arc` and only checks, with one
/// atomic load, whether a newer one was published (`arc_swap::Cache`), so workers reading every
/// round do not contend on the snapshot's reference count.
pub struct SnapshotReader(arc_swap::Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>);

impl std::fmt::Debug for SnapshotReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader").finish_non_exhaustive()
    }
}

impl SnapshotReader {
    /// The current snapshot; the same `Arc` as last time unless a new one was published.
    pub fn current(&mut self) -> &Arc<Snapshot> {
        self.0.load()
    }
}

/// The read-copy-update cell holding the current snapshot.
#[derive(Debug, Clone)]
pub struct Publisher {
    current: Arc<ArcSwap<Snapshot>>,
}

impl Publisher {
    pub fn new(first: Snapshot) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(first)),
        }
    }

    /// Replace the snapshot; workers see it from their next batch.
    pub fn publish(&self, next: Snapshot) {
        self.current.store(Arc::new(next));
    }

    /// The current snapshot (lock-free; one shared reference count update).
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A worker's reader: [`SnapshotReader::current`] touches no shared reference count while the
    /// snapshot is unchanged.
    pub fn reader(&self) -> SnapshotReader {
        SnapshotReader(arc_swap::Cache::new(self.current.clone()))
    }

    /// The generation of the current snapshot.
    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::manifests::parse_documents;

    const SVC: &str = r#"
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  type: NodePort
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
    - {name: udp, port: 81, protocol: UDP}
"#;
    const SLICES: &str = r#"
metadata: {name: web-a, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.244.2.2]
  - addresses: [10.244.1.2]
  - addresses: [10.244.1.9]
    conditions: {ready: false}
---
metadata: {name: web-b, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - addresses: [10.244.1.3]
---
metadata: {name: other, namespace: other, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 9999}]
endpoints:
  - addresses: [10.244.9.9]
"#;

    #[test]
    fn services_resolve_ready_backends_by_port_name() {
        let svcs: Vec<Service> = parse_documents(SVC).unwrap();
        let slices: Vec<EndpointSlice> = parse_documents(SLICES).unwrap();
        let ports = service_ports(&svcs, &slices);
        assert_eq!(ports.len(), 2);
        let http = &ports[0];
        assert_eq!(http.port, 80);
        assert_eq!(http.node_port, Some(30080));
        assert_eq!(
            http.backends,
            vec![
                "10.244.1.2:8080".parse().unwrap(),
                "10.244.1.3:8080".parse().unwrap(),
                "10.244.2.2:8080".parse().unwrap(),
            ]
        );
        // No slice carries the UDP port.
        assert!(ports[1].backends.is_empty());
        assert_eq!(ports[1].protocol, Protocol::Udp);
    }

    pub(crate) const LINKS: NodeLinks = NodeLinks {
        uplink: PortId(2),
        uplink_mac: Mac([0x0e, 0, 0, 0, 1, 1]),
    };

    #[test]
    fn publish_is_seen_by_readers() {
        let config: NodeConfig = serde_saphyr::from_str(
            r#"
node_name: a
underlay: {interface: up0, address: 192.168.1.1}
pod_cidr: 10.244.1.0/24
vtep: {mac: "0e:00:00:00:01:00"}
peers:
  - {name: b, underlay_ip: 192.168.1.2, underlay_mac: "0e:00:00:00:02:01", pod_cidr: 10.244.2.0/24, vtep_mac: "0e:00:00:00:02:00"}
"#,
        )
        .unwrap();
        let objects = ClusterObjects::default();
        let p = Publisher::new(Snapshot::build(1, &config, LINKS, &objects, []).unwrap());
        let reader = p.clone();
        assert_eq!(reader.generation(), 1);
        let snap = reader.load();
        assert_eq!(
            snap.remote_for(Ipv4Addr::new(10, 244, 2, 7))
                .unwrap()
                .vtep_ip,
            Ipv4Addr::new(10, 244, 2, 0)
        );
        assert!(snap.remote_for(Ipv4Addr::new(10, 244, 1, 7)).is_none());
        p.publish(Snapshot::build(2, &config, LINKS, &objects, []).unwrap());
        assert_eq!(reader.generation(), 2);
        // The old snapshot stays valid for whoever still holds it.
        assert_eq!(snap.generation, 1);
        assert!(snap.tables.remote_node([10, 244, 2, 7]).is_some());
    }
}
