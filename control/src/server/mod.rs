//! The control plane server: the `Control` gRPC service over a [`Store`](crate::store::Store).
//!
//! Every write is an optimistic transaction: read what the change depends on, then commit with
//! `mod_revision` compares on those keys and "absent" compares on new allocation claims; when
//! another writer (another replica, or a concurrent call) got there first, read again and retry.
//! So replicas sharing one etcd never hand out the same pod CIDR, ClusterIP or NodePort.
//!
//! - `service`: [`ControlService`], the `Control` implementation: authorization, validation,
//!   store reads, the retry loop around each commit, watches, agent sync state, flow events.
//! - `plan`: the transaction of one write as pure code over what was read: compares, puts,
//!   deletes, and the allocation of pod CIDRs, ClusterIPs and NodePorts with their claims. No store
//!   access, so allocation and release are unit-tested there.
//! - `kube`: [`kube::KubeSource`], following a Kubernetes API server into the store (the objects
//!   `sluicectl apply` writes otherwise), and the link it shares with the service.
//! - `serve`: TLS and the listener ([`serve`], [`serve_counted`]), and [`with_identity`] for
//!   callers that authenticate outside a request.

pub mod kube;
mod plan;
mod serve;
mod service;

use ipnet::Ipv4Net;

pub use serve::{ServeError, ServerTls, serve, serve_counted, with_identity};
pub use service::{ControlMetrics, ControlService};

/// Address pools and ranges.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub cluster_cidr: Ipv4Net,
    /// Prefix length of each node's pod CIDR.
    pub node_prefix: u8,
    pub service_cidr: Ipv4Net,
    pub node_ports: (u16, u16),
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            cluster_cidr: "10.244.0.0/16".parse().unwrap_or_default(),
            node_prefix: 24,
            service_cidr: "10.96.0.0/12".parse().unwrap_or_default(),
            node_ports: (30000, 32767),
        }
    }
}

#[cfg(test)]
impl ServerConfig {
    /// Pools small enough to use up in a test: four /24s (three leasable), six ClusterIPs, three
    /// NodePorts.
    fn tiny() -> Self {
        Self {
            cluster_cidr: "10.244.0.0/22".parse().unwrap_or_default(),
            node_prefix: 24,
            service_cidr: "10.96.0.0/29".parse().unwrap_or_default(),
            node_ports: (30000, 30002),
        }
    }
}
