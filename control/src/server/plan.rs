//! The transaction of one write, as pure code over what the service read.
//!
//! [`Plan`] collects the compares, puts and deletes of one store transaction; its methods add an
//! object's allocations (a node's pod CIDR, a Service's ClusterIP and NodePorts) as claims and
//! release what a changed or deleted object no longer holds.
//!
//! What a plan guarantees, given what was read:
//! - a new claim is committed only if its key is still absent (compare at revision 0), so two
//!   writers, in one process or on two replicas, never take the same value;
//! - a value another object holds is never taken or released: asking for it is an error;
//! - releases are only of values the changed or deleted object itself held;
//! - deleted objects are compared at the revision they were read at, so a delete planned on stale
//!   data fails to commit and the service reads again.
//!
//! Nothing here touches the store, the network or the clock.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use tonic::Status;

use super::ServerConfig;
use crate::api::{self, Kind, object::Body};
use crate::model::{self, K8sObject};
use crate::store::{Compare, KeyValue, Op, Txn};

/// An allocation pool; its claims live under `/sluice/a/<pool>/` (`model::alloc_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pool {
    /// Nodes' pod CIDRs, out of the cluster CIDR.
    PodCidr,
    /// Services' ClusterIPs, out of the service CIDR.
    ClusterIp,
    /// Services' NodePorts, out of the NodePort range.
    NodePort,
}

impl Pool {
    fn as_str(self) -> &'static str {
        match self {
            Pool::PodCidr => "podcidr",
            Pool::ClusterIp => "clusterip",
            Pool::NodePort => "nodeport",
        }
    }

    /// The store key of the claim on `value`.
    fn key(self, value: &str) -> String {
        model::alloc_key(self.as_str(), value)
    }

    /// The prefix of every claim in the pool.
    pub(super) fn prefix(self) -> String {
        format!("{}{}/", model::ALLOC_PREFIX, self.as_str())
    }
}

/// The claims of one pool, value → owner (an object key): as read from the store, then as changed
/// by the plan being built.
#[derive(Debug, Clone)]
pub(super) struct Claims {
    pool: Pool,
    owners: BTreeMap<String, String>,
}

impl Claims {
    /// No claims (nothing read).
    pub(super) fn new(pool: Pool) -> Self {
        Self {
            pool,
            owners: BTreeMap::new(),
        }
    }

    /// The claims stored under [`Pool::prefix`].
    pub(super) fn read(pool: Pool, kvs: Vec<KeyValue>) -> Self {
        let owners = kvs
            .into_iter()
            .map(|kv| {
                let owner = String::from_utf8_lossy(&kv.value).into_owned();
                (model::alloc_value(&kv.key), owner)
            })
            .collect();
        Self { pool, owners }
    }

    /// Who holds `value`.
    pub(super) fn owner(&self, value: &str) -> Option<&str> {
        self.owners.get(value).map(String::as_str)
    }
}

/// The claims a Service write needs.
#[derive(Debug, Clone)]
pub(super) struct ServiceClaims {
    pub(super) cluster_ips: Claims,
    pub(super) node_ports: Claims,
}

impl ServiceClaims {
    /// No claims (for a write with no Service in it).
    pub(super) fn none() -> Self {
        Self {
            cluster_ips: Claims::new(Pool::ClusterIp),
            node_ports: Claims::new(Pool::NodePort),
        }
    }
}

/// Why a write cannot be planned; each maps to the status the caller gets
/// (`From<PlanError> for Status`).
#[derive(Debug, thiserror::Error)]
pub(super) enum PlanError {
    /// Every value of a pool is claimed.
    #[error("no free {what} in {range}")]
    Exhausted { what: String, range: String },
    /// The ClusterIP asked for belongs to another object.
    #[error("spec.clusterIP: {ip} is allocated to {owner}")]
    ClusterIpTaken { ip: String, owner: String },
    /// The NodePort asked for belongs to another Service.
    #[error("spec.ports[{index}].nodePort: {port} is allocated to another Service")]
    NodePortTaken { index: usize, port: String },
    /// Two ports of one Service have the same NodePort.
    #[error("spec.ports[{index}].nodePort: {port} is used twice")]
    NodePortTwice { index: usize, port: String },
    /// The pod CIDR the cluster allocated to a node is leased to another node.
    #[error(
        "spec.podCIDR: {cidr} is leased to {owner}; remove that node or give the clusters separate CIDRs"
    )]
    PodCidrTaken { cidr: String, owner: String },
    /// A Service without a spec.
    #[error("spec: missing")]
    MissingSpec,
    /// The node prefix does not fit in the cluster CIDR (the binary checks this at startup).
    #[error("cluster CIDR: {0}")]
    ClusterCidr(#[source] ipnet::PrefixLenError),
}

impl From<PlanError> for Status {
    fn from(e: PlanError) -> Self {
        let message = e.to_string();
        match e {
            PlanError::Exhausted { .. } => Status::resource_exhausted(message),
            PlanError::ClusterIpTaken { .. }
            | PlanError::NodePortTaken { .. }
            | PlanError::PodCidrTaken { .. } => Status::already_exists(message),
            PlanError::NodePortTwice { .. } | PlanError::MissingSpec => {
                Status::invalid_argument(message)
            }
            PlanError::ClusterCidr(_) => Status::internal(message),
        }
    }
}

/// A transaction being built, and the keys it writes.
#[derive(Debug, Default)]
pub(super) struct Plan {
    txn: Txn,
    touched: BTreeSet<String>,
}

impl Plan {
    /// Commit only if `key` is still at `rev` (0: still absent).
    pub(super) fn compare(&mut self, key: &str, rev: u64) {
        self.txn
            .compares
            .push(Compare::ModRevision(key.to_string(), rev));
    }

    pub(super) fn put(&mut self, key: String, value: Vec<u8>) {
        self.touched.insert(key.clone());
        self.txn.ops.push(Op::Put(key, value));
    }

    pub(super) fn delete(&mut self, key: String) {
        self.touched.insert(key.clone());
        self.txn.ops.push(Op::Delete(key));
    }

    /// Whether the plan already writes `key`.
    pub(super) fn touches(&self, key: &str) -> bool {
        self.touched.contains(key)
    }

    /// The transaction to commit.
    pub(super) fn into_txn(self) -> Txn {
        self.txn
    }

    /// Claim `value` for `owner`; committed only if nobody claimed it meanwhile.
    fn claim(&mut self, claims: &mut Claims, value: &str, owner: &str) {
        let key = claims.pool.key(value);
        self.compare(&key, 0);
        self.put(key, owner.as_bytes().to_vec());
        claims.owners.insert(value.to_string(), owner.to_string());
    }

    /// Hold `value` for `owner`: nothing to do if it does already, a new claim if nobody does.
    /// `Err` names the other owner.
    fn hold(&mut self, claims: &mut Claims, value: &str, owner: &str) -> Result<(), String> {
        match claims.owner(value) {
            Some(other) if other != owner => Err(other.to_string()),
            Some(_) => Ok(()),
            None => {
                self.claim(claims, value, owner);
                Ok(())
            }
        }
    }

    /// Release `value`, which the object being changed held and no longer uses.
    fn release(&mut self, claims: &mut Claims, value: &str) {
        self.free(claims.pool, value);
        claims.owners.remove(value);
    }

    /// Delete the claim on `value`, held by an object being deleted.
    fn free(&mut self, pool: Pool, value: &str) {
        self.delete(pool.key(value));
    }

    /// Lease a pod CIDR to the node at `node_key`: the first subnet of the cluster CIDR, with the
    /// node prefix, that nobody holds. Like Flannel, the first subnet (holding the cluster network
    /// address) is never leased.
    pub(super) fn lease_pod_cidr(
        &mut self,
        cfg: &ServerConfig,
        claims: &mut Claims,
        node_key: &str,
    ) -> Result<String, PlanError> {
        let cidr = cfg
            .cluster_cidr
            .subnets(cfg.node_prefix)
            .map_err(PlanError::ClusterCidr)?
            .skip(1)
            .map(|s| s.to_string())
            .find(|s| claims.owner(s).is_none())
            .ok_or_else(|| PlanError::Exhausted {
                what: format!("/{}", cfg.node_prefix),
                range: cfg.cluster_cidr.to_string(),
            })?;
        self.claim(claims, &cidr, node_key);
        Ok(cidr)
    }

    /// Hold `cidr`, which the cluster allocated to the node at `node_key` (`spec.podCIDR`), in
    /// the pod CIDR pool, so that no lease hands it to another node; release the node's old
    /// CIDR (`old`) if it held another. Fails when another node holds it.
    pub(super) fn hold_pod_cidr(
        &mut self,
        claims: &mut Claims,
        cidr: &str,
        old: Option<&str>,
        node_key: &str,
    ) -> Result<(), PlanError> {
        self.hold(claims, cidr, node_key)
            .map_err(|owner| PlanError::PodCidrTaken {
                cidr: cidr.to_string(),
                owner: model::parse_object_key(&owner)
                    .map(|r| model::describe(&r))
                    .unwrap_or(owner),
            })?;
        if let Some(old) = old.filter(|o| !o.is_empty() && *o != cidr)
            && claims.owner(old) == Some(node_key)
        {
            self.release(claims, old);
        }
        Ok(())
    }

    /// A Service write at `key`: keep or allocate its ClusterIP and NodePorts (filling them into
    /// `svc`), release what it no longer uses. `old` is the stored version, if any.
    pub(super) fn allocate_service(
        &mut self,
        cfg: &ServerConfig,
        key: &str,
        svc: &mut Service,
        old: Option<&Service>,
        claims: &mut ServiceClaims,
    ) -> Result<(), PlanError> {
        let (old_ip, old_ports) = old.map(service_allocations).unwrap_or_default();
        let Some(spec) = svc.spec.as_mut() else {
            return Err(PlanError::MissingSpec);
        };
        let ip = self.cluster_ip(
            cfg,
            key,
            spec.cluster_ip.as_deref(),
            old_ip,
            &mut claims.cluster_ips,
        )?;
        let ip = ip.unwrap_or_else(|| "None".into());
        spec.cluster_ip = Some(ip.clone());
        spec.cluster_ips = Some(vec![ip]);
        let wants_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        let mut kept = BTreeSet::new();
        for (i, p) in spec.ports.iter_mut().flatten().enumerate() {
            if !wants_node_ports {
                p.node_port = None;
                continue;
            }
            let wanted = p.node_port.filter(|n| *n != 0).map(|n| n.to_string());
            let reused = || old_ports.get(i).filter(|n| !kept.contains(*n)).cloned();
            let np = match wanted.or_else(reused) {
                Some(np) => np,
                None => free_node_port(cfg.node_ports, &claims.node_ports)?,
            };
            if kept.contains(&np) {
                return Err(PlanError::NodePortTwice { index: i, port: np });
            }
            if self.hold(&mut claims.node_ports, &np, key).is_err() {
                return Err(PlanError::NodePortTaken { index: i, port: np });
            }
            p.node_port = np.parse().ok();
            kept.insert(np);
        }
        for np in old_ports {
            if !kept.contains(&np) {
                self.release(&mut claims.node_ports, &np);
            }
        }
        Ok(())
    }

    /// The ClusterIP of the Service at `key` given `spec.clusterIP` (`wanted`) and the one it held:
    /// `"None"` is headless (no address), an address is held (claimed unless the Service holds it
    /// already), no address keeps the old one or allocates the first free one. The old one is
    /// released when it changes.
    fn cluster_ip(
        &mut self,
        cfg: &ServerConfig,
        key: &str,
        wanted: Option<&str>,
        old_ip: Option<String>,
        ips: &mut Claims,
    ) -> Result<Option<String>, PlanError> {
        let wanted = wanted.filter(|s| !s.is_empty());
        let ip = match wanted {
            Some("None") => None,
            Some(ip) => Some(ip.to_string()),
            None => old_ip.clone(),
        };
        let ip = match ip {
            Some(ip) => {
                self.hold(ips, &ip, key)
                    .map_err(|owner| PlanError::ClusterIpTaken {
                        ip: ip.clone(),
                        owner: model::parse_object_key(&owner)
                            .map(|r| model::describe(&r))
                            .unwrap_or(owner),
                    })?;
                Some(ip)
            }
            None if wanted == Some("None") => None,
            None => {
                let ip =
                    free_address(cfg.service_cidr, ips).ok_or_else(|| PlanError::Exhausted {
                        what: "ClusterIP".into(),
                        range: cfg.service_cidr.to_string(),
                    })?;
                self.claim(ips, &ip, key);
                Some(ip)
            }
        };
        if let Some(old_ip) = &old_ip
            && ip.as_ref() != Some(old_ip)
        {
            self.release(ips, old_ip);
        }
        Ok(ip)
    }

    /// Delete one stored object (read at `rev`) and free the claims it holds.
    pub(super) fn delete_object(&mut self, key: String, o: &api::Object, rev: u64) {
        self.compare(&key, rev);
        self.delete(key);
        if let Some(s) = stored_service(o) {
            let (ip, ports) = service_allocations(&s);
            if let Some(ip) = ip {
                self.free(Pool::ClusterIp, &ip);
            }
            for p in ports {
                self.free(Pool::NodePort, &p);
            }
        }
    }

    /// Remove the node stored at `node_key` (`node`, read at `rev`): its record, its pods (key and
    /// revision read), its pod CIDR claim.
    pub(super) fn remove_node(
        &mut self,
        node_key: String,
        node: &api::Object,
        rev: u64,
        pods: Vec<(String, u64)>,
    ) {
        self.compare(&node_key, rev);
        self.delete(node_key);
        for (key, rev) in pods {
            self.compare(&key, rev);
            self.delete(key);
        }
        if let Some(Body::Node(n)) = &node.body
            && !n.pod_cidr.is_empty()
        {
            self.free(Pool::PodCidr, &n.pod_cidr);
        }
    }

    /// Delete what lives in namespace `namespace`, out of every stored object (`objects`), as
    /// Kubernetes does when a namespace goes. Pods an agent reported stay until their node
    /// removes them (they still run there); keys the plan already writes are left to it.
    pub(super) fn delete_namespace_contents(&mut self, namespace: &str, objects: Vec<KeyValue>) {
        for kv in objects {
            let Some(inner) = model::parse_object_key(&kv.key) else {
                continue;
            };
            if inner.namespace != namespace
                || !model::is_namespaced(inner.kind())
                || self.touches(&kv.key)
            {
                continue;
            }
            let Ok(o) = model::decode_object(&kv.value, kv.mod_revision) else {
                continue;
            };
            if matches!(&o.body, Some(Body::Pod(p)) if !p.node.is_empty()) {
                continue;
            }
            self.delete_object(kv.key, &o, kv.mod_revision);
        }
    }
}

/// The Service in a stored object, if it is one.
pub(super) fn stored_service(o: &api::Object) -> Option<Service> {
    match &o.body {
        Some(Body::K8s(k)) if k.kind() == Kind::Service => {
            match K8sObject::from_json(Kind::Service, &k.json) {
                Ok(K8sObject::Service(s)) => Some(s),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A Service's ClusterIP (if any) and NodePorts, in port order.
fn service_allocations(s: &Service) -> (Option<String>, Vec<String>) {
    let Some(spec) = &s.spec else {
        return (None, vec![]);
    };
    let ip = spec
        .cluster_ip
        .clone()
        .filter(|ip| !ip.is_empty() && ip != "None");
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.node_port.filter(|n| *n != 0))
        .map(|n| n.to_string())
        .collect();
    (ip, ports)
}

/// The first host address of `net` (the network address skipped) nobody holds.
fn free_address(net: Ipv4Net, ips: &Claims) -> Option<String> {
    net.hosts()
        .map(|a| a.to_string())
        .find(|a| ips.owner(a).is_none())
}

/// The lowest NodePort of `lo..=hi` nobody holds.
fn free_node_port((lo, hi): (u16, u16), ports: &Claims) -> Result<String, PlanError> {
    (lo..=hi)
        .map(|n| n.to_string())
        .find(|n| ports.owner(n).is_none())
        .ok_or_else(|| PlanError::Exhausted {
            what: "NodePort".into(),
            range: format!("{lo}-{hi}"),
        })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use tonic::Code;

    use super::*;

    const WEB: &str = "/sluice/o/service/shop/web";
    const DB: &str = "/sluice/o/service/shop/db";

    fn cfg() -> ServerConfig {
        ServerConfig::tiny()
    }

    /// Why planning `svc` (new, at `WEB`) with `held` is refused. (The service drops a refused
    /// plan, whatever it holds.)
    fn refused(svc: &mut Service, held: &mut ServiceClaims) -> Status {
        let err = Plan::default()
            .allocate_service(&cfg(), WEB, svc, None, held)
            .expect_err("the plan is refused");
        Status::from(err)
    }

    fn service(ty: &str, cluster_ip: Option<&str>, node_ports: &[Option<i32>]) -> Service {
        Service {
            spec: Some(ServiceSpec {
                type_: Some(ty.into()),
                cluster_ip: cluster_ip.map(Into::into),
                ports: Some(
                    node_ports
                        .iter()
                        .enumerate()
                        .map(|(i, np)| ServicePort {
                            port: 80 + i as i32,
                            node_port: *np,
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn claims(pool: Pool, held: &[(&str, &str)]) -> Claims {
        let kvs = held
            .iter()
            .map(|(value, owner)| KeyValue {
                key: pool.key(value),
                value: owner.as_bytes().to_vec(),
                mod_revision: 1,
            })
            .collect();
        Claims::read(pool, kvs)
    }

    fn service_claims(ips: &[(&str, &str)], ports: &[(&str, &str)]) -> ServiceClaims {
        ServiceClaims {
            cluster_ips: claims(Pool::ClusterIp, ips),
            node_ports: claims(Pool::NodePort, ports),
        }
    }

    fn ip_of(s: &Service) -> (Option<String>, Option<Vec<String>>) {
        let spec = s.spec.as_ref().unwrap();
        (spec.cluster_ip.clone(), spec.cluster_ips.clone())
    }

    fn node_ports_of(s: &Service) -> Vec<Option<i32>> {
        let spec = s.spec.as_ref().unwrap();
        spec.ports.iter().flatten().map(|p| p.node_port).collect()
    }

    fn claim_ops(pool: Pool, value: &str, owner: &str) -> (Compare, Op) {
        (
            Compare::ModRevision(pool.key(value), 0),
            Op::Put(pool.key(value), owner.as_bytes().to_vec()),
        )
    }

    fn stored(s: &Service, name: &str) -> api::Object {
        let mut s = s.clone();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("shop".into());
        api::Object {
            body: Some(Body::K8s(K8sObject::Service(s).to_proto())),
            revision: 0,
        }
    }

    #[test]
    fn pod_cidrs_skip_the_first_subnet_take_the_lowest_free_and_run_out() {
        let cfg = cfg();
        let mut held = claims(Pool::PodCidr, &[("10.244.1.0/24", "/sluice/o/node//a")]);
        let mut plan = Plan::default();
        let b = plan
            .lease_pod_cidr(&cfg, &mut held, "/sluice/o/node//b")
            .unwrap();
        assert_eq!(b, "10.244.2.0/24");
        let c = plan
            .lease_pod_cidr(&cfg, &mut held, "/sluice/o/node//c")
            .unwrap();
        assert_eq!(c, "10.244.3.0/24");
        let txn = plan.into_txn();
        let (cmp, put) = claim_ops(Pool::PodCidr, "10.244.2.0/24", "/sluice/o/node//b");
        assert_eq!(txn.compares[0], cmp);
        assert_eq!(txn.ops[0], put);
        assert_eq!(
            txn.compares[0],
            Compare::ModRevision("/sluice/a/podcidr/10.244.2.0_24".into(), 0),
            "the claim key is the value with / as _, created only if absent"
        );
        assert_eq!(txn.ops.len(), 2);

        let mut plan = Plan::default();
        let err = plan
            .lease_pod_cidr(&cfg, &mut held, "/sluice/o/node//d")
            .unwrap_err();
        assert!(matches!(err, PlanError::Exhausted { .. }), "{err:?}");
        let status = Status::from(err);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "no free /24 in 10.244.0.0/22");
        assert!(plan.into_txn().ops.is_empty());
    }

    #[test]
    fn cluster_ip_is_allocated_once_then_kept_without_writes() {
        let cfg = cfg();
        let mut held = service_claims(&[("10.96.0.1", DB)], &[]);
        let mut svc = service("ClusterIP", None, &[None]);
        let mut plan = Plan::default();
        plan.allocate_service(&cfg, WEB, &mut svc, None, &mut held)
            .unwrap();
        assert_eq!(
            ip_of(&svc),
            (Some("10.96.0.2".into()), Some(vec!["10.96.0.2".into()]))
        );
        assert_eq!(node_ports_of(&svc), vec![None]);
        let txn = plan.into_txn();
        let (cmp, put) = claim_ops(Pool::ClusterIp, "10.96.0.2", WEB);
        assert_eq!((txn.compares, txn.ops), (vec![cmp], vec![put]));

        // Applying it again (the stored version as `old`, the spec without an address) keeps the
        // address and writes no claim.
        let old = svc.clone();
        let mut again = service("ClusterIP", None, &[None]);
        let mut plan = Plan::default();
        plan.allocate_service(&cfg, WEB, &mut again, Some(&old), &mut held)
            .unwrap();
        assert_eq!(ip_of(&again), ip_of(&old));
        let txn = plan.into_txn();
        assert!(txn.compares.is_empty() && txn.ops.is_empty(), "{txn:?}");
    }

    #[test]
    fn a_cluster_ip_of_another_service_is_refused() {
        let mut held = service_claims(&[("10.96.0.1", DB)], &[]);
        let mut svc = service("ClusterIP", Some("10.96.0.1"), &[None]);
        let status = refused(&mut svc, &mut held);
        assert_eq!(status.code(), Code::AlreadyExists);
        assert_eq!(
            status.message(),
            "spec.clusterIP: 10.96.0.1 is allocated to Service shop/db"
        );
        assert_eq!(held.cluster_ips.owner("10.96.0.1"), Some(DB));
    }

    #[test]
    fn the_service_cidr_runs_out() {
        let taken: Vec<String> = (1..=6).map(|i| format!("10.96.0.{i}")).collect();
        let taken: Vec<(&str, &str)> = taken.iter().map(|ip| (ip.as_str(), DB)).collect();
        let mut held = service_claims(&taken, &[]);
        let mut svc = service("ClusterIP", None, &[None]);
        let status = refused(&mut svc, &mut held);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "no free ClusterIP in 10.96.0.0/29");
    }

    #[test]
    fn changing_or_dropping_the_cluster_ip_releases_the_old_one() {
        let cfg = cfg();
        let old = service("ClusterIP", Some("10.96.0.1"), &[None]);
        let release = Op::Delete(Pool::ClusterIp.key("10.96.0.1"));

        let mut held = service_claims(&[("10.96.0.1", WEB)], &[]);
        let mut moved = service("ClusterIP", Some("10.96.0.5"), &[None]);
        let mut plan = Plan::default();
        plan.allocate_service(&cfg, WEB, &mut moved, Some(&old), &mut held)
            .unwrap();
        let (_, put) = claim_ops(Pool::ClusterIp, "10.96.0.5", WEB);
        assert_eq!(plan.into_txn().ops, vec![put, release.clone()]);
        assert_eq!(held.cluster_ips.owner("10.96.0.1"), None);

        let mut held = service_claims(&[("10.96.0.1", WEB)], &[]);
        let mut headless = service("ClusterIP", Some("None"), &[None]);
        let mut plan = Plan::default();
        plan.allocate_service(&cfg, WEB, &mut headless, Some(&old), &mut held)
            .unwrap();
        assert_eq!(
            ip_of(&headless),
            (Some("None".into()), Some(vec!["None".into()]))
        );
        let txn = plan.into_txn();
        assert!(txn.compares.is_empty());
        assert_eq!(txn.ops, vec![release]);
    }

    #[test]
    fn node_ports_are_kept_by_position_and_released_when_no_longer_wanted() {
        let cfg = cfg();
        let mut held = service_claims(&[], &[]);
        let mut svc = service("NodePort", None, &[None, None]);
        let mut plan = Plan::default();
        plan.allocate_service(&cfg, WEB, &mut svc, None, &mut held)
            .unwrap();
        assert_eq!(node_ports_of(&svc), vec![Some(30000), Some(30001)]);
        assert_eq!(
            plan.into_txn().ops.len(),
            3,
            "a ClusterIP and two NodePorts"
        );

        // Re-applied without nodePorts: the same ports, by position, and no writes.
        let old = svc.clone();
        let mut again = service("NodePort", None, &[None, None]);
        let mut plan = Plan::default();
        plan.allocate_service(&cfg, WEB, &mut again, Some(&old), &mut held)
            .unwrap();
        assert_eq!(node_ports_of(&again), vec![Some(30000), Some(30001)]);
        assert!(plan.into_txn().ops.is_empty());

        // Turned into a ClusterIP Service: the NodePorts go, and their claims with them.
        let mut plain = service("ClusterIP", None, &[Some(30000), None]);
        let mut plan = Plan::default();
        plan.allocate_service(&cfg, WEB, &mut plain, Some(&old), &mut held)
            .unwrap();
        assert_eq!(node_ports_of(&plain), vec![None, None]);
        assert_eq!(
            plan.into_txn().ops,
            vec![
                Op::Delete(Pool::NodePort.key("30000")),
                Op::Delete(Pool::NodePort.key("30001")),
            ]
        );
        assert_eq!(held.node_ports.owner("30000"), None);
    }

    #[test]
    fn node_port_conflicts_and_exhaustion() {
        let mut held = service_claims(&[], &[("30001", DB)]);

        let mut twice = service("NodePort", None, &[Some(30000), Some(30000)]);
        let status = refused(&mut twice, &mut held.clone());
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "spec.ports[1].nodePort: 30000 is used twice"
        );

        let mut taken = service("NodePort", None, &[Some(30001)]);
        let status = refused(&mut taken, &mut held.clone());
        assert_eq!(status.code(), Code::AlreadyExists);
        assert_eq!(
            status.message(),
            "spec.ports[0].nodePort: 30001 is allocated to another Service"
        );

        // 30001 is taken: the first port gets 30000, the second 30002, the third none is left.
        let mut three = service("LoadBalancer", None, &[None, None, None]);
        let status = refused(&mut three, &mut held);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "no free NodePort in 30000-30002");
    }

    #[test]
    fn services_in_one_plan_never_share_an_address_or_port() {
        let cfg = cfg();
        let mut held = service_claims(&[], &[]);
        let mut plan = Plan::default();
        let mut web = service("NodePort", None, &[None]);
        let mut db = service("NodePort", None, &[None]);
        plan.allocate_service(&cfg, WEB, &mut web, None, &mut held)
            .unwrap();
        plan.allocate_service(&cfg, DB, &mut db, None, &mut held)
            .unwrap();
        assert_ne!(ip_of(&web), ip_of(&db));
        assert_ne!(node_ports_of(&web), node_ports_of(&db));
        assert_eq!(held.cluster_ips.owner("10.96.0.2"), Some(DB));
        assert_eq!(held.node_ports.owner("30001"), Some(DB));
    }

    #[test]
    fn a_service_without_spec_is_invalid() {
        let mut svc = Service::default();
        let status = refused(&mut svc, &mut ServiceClaims::none());
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "spec: missing");
    }

    #[test]
    fn deleting_a_service_frees_its_claims_and_nothing_else() {
        let svc = service("NodePort", Some("10.96.0.3"), &[Some(30002)]);
        let mut plan = Plan::default();
        plan.delete_object(WEB.into(), &stored(&svc, "web"), 7);
        let txn = plan.into_txn();
        assert_eq!(txn.compares, vec![Compare::ModRevision(WEB.into(), 7)]);
        assert_eq!(
            txn.ops,
            vec![
                Op::Delete(WEB.into()),
                Op::Delete(Pool::ClusterIp.key("10.96.0.3")),
                Op::Delete(Pool::NodePort.key("30002")),
            ]
        );

        let pod = api::Object {
            body: Some(Body::Pod(api::Pod {
                namespace: "shop".into(),
                name: "p".into(),
                ip: "10.244.1.5".into(),
                ..Default::default()
            })),
            revision: 0,
        };
        let mut plan = Plan::default();
        plan.delete_object("/sluice/o/pod/shop/p".into(), &pod, 3);
        assert_eq!(
            plan.into_txn().ops,
            vec![Op::Delete("/sluice/o/pod/shop/p".into())]
        );
    }

    #[test]
    fn removing_a_node_deletes_its_pods_and_frees_its_pod_cidr() {
        let node = |cidr: &str| api::Object {
            body: Some(Body::Node(api::Node {
                name: "a".into(),
                pod_cidr: cidr.into(),
                ..Default::default()
            })),
            revision: 0,
        };
        let pods = vec![("/sluice/o/pod/default/p1".to_string(), 4)];
        let mut plan = Plan::default();
        plan.remove_node("/sluice/o/node//a".into(), &node("10.244.1.0/24"), 2, pods);
        let txn = plan.into_txn();
        assert_eq!(
            txn.compares,
            vec![
                Compare::ModRevision("/sluice/o/node//a".into(), 2),
                Compare::ModRevision("/sluice/o/pod/default/p1".into(), 4),
            ]
        );
        assert_eq!(
            txn.ops,
            vec![
                Op::Delete("/sluice/o/node//a".into()),
                Op::Delete("/sluice/o/pod/default/p1".into()),
                Op::Delete("/sluice/a/podcidr/10.244.1.0_24".into()),
            ]
        );

        let mut plan = Plan::default();
        plan.remove_node("/sluice/o/node//a".into(), &node(""), 2, vec![]);
        assert_eq!(
            plan.into_txn().ops,
            vec![Op::Delete("/sluice/o/node//a".into())],
            "a node without a lease frees nothing"
        );
    }

    #[test]
    fn a_namespace_takes_its_objects_but_not_running_pods_or_other_namespaces() {
        let kv = |key: &str, o: &api::Object, rev: u64| KeyValue {
            key: key.into(),
            value: model::encode_object(o),
            mod_revision: rev,
        };
        let pod = |node: &str| api::Object {
            body: Some(Body::Pod(api::Pod {
                namespace: "shop".into(),
                name: "p".into(),
                node: node.into(),
                ..Default::default()
            })),
            revision: 0,
        };
        let web = service("ClusterIP", Some("10.96.0.4"), &[None]);
        let objects = vec![
            kv("/sluice/o/namespace//shop", &pod(""), 1),
            kv("/sluice/o/pod/shop/labels-only", &pod(""), 2),
            kv("/sluice/o/pod/shop/running", &pod("node-a"), 3),
            kv(WEB, &stored(&web, "web"), 4),
            kv("/sluice/o/service/other/web", &stored(&web, "web"), 5),
            kv(DB, &stored(&web, "db"), 6),
        ];
        let mut plan = Plan::default();
        // Already deleted by this plan (named in the same Delete): left alone.
        plan.delete(DB.into());
        plan.delete_namespace_contents("shop", objects);
        let txn = plan.into_txn();
        assert_eq!(
            txn.compares,
            vec![
                Compare::ModRevision("/sluice/o/pod/shop/labels-only".into(), 2),
                Compare::ModRevision(WEB.into(), 4),
            ]
        );
        assert_eq!(
            txn.ops,
            vec![
                Op::Delete(DB.into()),
                Op::Delete("/sluice/o/pod/shop/labels-only".into()),
                Op::Delete(WEB.into()),
                Op::Delete(Pool::ClusterIp.key("10.96.0.4")),
            ]
        );
    }
}
