//! The `Control` gRPC service over a [`Store`].
//!
//! Every write is an optimistic transaction: read what the change depends on, then commit with
//! `mod_revision` compares on those keys and "absent" compares on new allocation claims; when
//! another writer (another replica, or a concurrent call) got there first, read again and retry.
//! So replicas sharing one etcd never hand out the same pod CIDR, ClusterIP or NodePort.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::Stream;
use ipnet::Ipv4Net;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agent_api;
use crate::api::control_server::{Control, ControlServer};
use crate::api::{self, Kind, ObjectRef, object::Body};
use crate::auth::{Authenticator, Identity, Role, identity, require_operator};
use crate::flows::FlowRelay;
use crate::model::{self, K8sObject, alloc_key, object_key};
use crate::store::{Compare, KeyValue, Op, Store, StoreError, Txn, WatchItem};

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

#[derive(Debug, Clone, Default)]
struct AgentRecord {
    watches: u32,
    synced_revision: u64,
    last_sync_unix_ms: i64,
}

/// The service implementation.
pub struct ControlService<S> {
    store: S,
    cfg: Arc<ServerConfig>,
    agents: Arc<Mutex<HashMap<String, AgentRecord>>>,
    /// Flow events the agents push, served by `Observe`.
    flows: Arc<FlowRelay>,
}

impl<S: Clone> Clone for ControlService<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            cfg: self.cfg.clone(),
            agents: self.agents.clone(),
            flows: self.flows.clone(),
        }
    }
}

const MAX_ATTEMPTS: usize = 64;

fn store_err(e: StoreError) -> Status {
    Status::unavailable(format!("store: {e}"))
}

fn conflict() -> Status {
    Status::aborted("too many concurrent changes to the same objects; try again")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn describe(r: &ObjectRef) -> String {
    if r.namespace.is_empty() {
        format!("{} {}", model::kind_name(r.kind()), r.name)
    } else {
        format!("{} {}/{}", model::kind_name(r.kind()), r.namespace, r.name)
    }
}

fn node_ref(name: &str) -> ObjectRef {
    ObjectRef {
        kind: Kind::Node as i32,
        namespace: String::new(),
        name: name.to_string(),
    }
}

fn pod_ref(ns: &str, name: &str) -> ObjectRef {
    ObjectRef {
        kind: Kind::Pod as i32,
        namespace: ns.to_string(),
        name: name.to_string(),
    }
}

/// Claims of one pool: value → owner key.
type Claims = BTreeMap<String, String>;

/// A transaction being built, with the objects it read.
#[derive(Default)]
struct Plan {
    txn: Txn,
    touched: BTreeSet<String>,
}

impl Plan {
    fn compare(&mut self, key: &str, rev: u64) {
        self.txn
            .compares
            .push(Compare::ModRevision(key.to_string(), rev));
    }
    fn put(&mut self, key: String, value: Vec<u8>) {
        self.touched.insert(key.clone());
        self.txn.ops.push(Op::Put(key, value));
    }
    fn delete(&mut self, key: String) {
        self.touched.insert(key.clone());
        self.txn.ops.push(Op::Delete(key));
    }
}

impl<S: Store> ControlService<S> {
    pub fn new(store: S, cfg: ServerConfig) -> Self {
        Self {
            store,
            cfg: Arc::new(cfg),
            agents: Arc::default(),
            flows: Arc::default(),
        }
    }

    /// The flow events relayed so far.
    pub fn flows(&self) -> &Arc<FlowRelay> {
        &self.flows
    }

    /// The tonic service, authenticating every call.
    pub fn into_server(
        self,
        auth: Authenticator,
    ) -> tonic::service::interceptor::InterceptedService<ControlServer<Self>, Authenticator> {
        ControlServer::with_interceptor(self, auth)
    }

    async fn get_object(&self, r: &ObjectRef) -> Result<Option<(api::Object, u64)>, Status> {
        match self.store.get(&object_key(r)).await.map_err(store_err)? {
            Some(kv) => {
                let o = model::decode_object(&kv.value, kv.mod_revision).map_err(|e| {
                    Status::internal(format!("stored {} is corrupt: {e}", describe(r)))
                })?;
                Ok(Some((o, kv.mod_revision)))
            }
            None => Ok(None),
        }
    }

    async fn claims(&self, pool: &str) -> Result<(Claims, BTreeMap<String, u64>), Status> {
        let (_, kvs) = self
            .store
            .list(&format!("{}{pool}/", model::ALLOC_PREFIX))
            .await
            .map_err(store_err)?;
        let mut claims = Claims::new();
        let mut revs = BTreeMap::new();
        for KeyValue {
            key,
            value,
            mod_revision,
        } in kvs
        {
            let v = key.rsplit('/').next().unwrap_or_default().replace('_', "/");
            claims.insert(v.clone(), String::from_utf8_lossy(&value).into_owned());
            revs.insert(v, mod_revision);
        }
        Ok((claims, revs))
    }

    async fn commit(&self, plan: Plan) -> Result<Option<u64>, Status> {
        self.store.commit(plan.txn).await.map_err(store_err)
    }

    async fn pods_of_node(&self, node: &str) -> Result<Vec<(String, u64)>, Status> {
        let (_, kvs) = self
            .store
            .list(&model::kind_prefix(Kind::Pod))
            .await
            .map_err(store_err)?;
        let mut out = Vec::new();
        for kv in kvs {
            if let Ok(o) = model::decode_object(&kv.value, kv.mod_revision)
                && let Some(Body::Pod(p)) = o.body
                && p.node == node
            {
                out.push((kv.key, kv.mod_revision));
            }
        }
        Ok(out)
    }

    /// Plan the removal of a node: its record, its pods, its pod CIDR claim.
    async fn plan_remove_node(&self, plan: &mut Plan, name: &str) -> Result<bool, Status> {
        let r = node_ref(name);
        let Some((o, rev)) = self.get_object(&r).await? else {
            return Ok(false);
        };
        plan.compare(&object_key(&r), rev);
        plan.delete(object_key(&r));
        for (key, rev) in self.pods_of_node(name).await? {
            plan.compare(&key, rev);
            plan.delete(key);
        }
        if let Some(Body::Node(n)) = o.body
            && !n.pod_cidr.is_empty()
        {
            plan.delete(alloc_key("podcidr", &n.pod_cidr));
        }
        Ok(true)
    }

    /// Plan a Service write: keep or allocate its ClusterIP and NodePorts, release what it no
    /// longer uses.
    fn plan_service(
        &self,
        plan: &mut Plan,
        key: &str,
        svc: &mut k8s_openapi::api::core::v1::Service,
        old: Option<&k8s_openapi::api::core::v1::Service>,
        ips: &mut Claims,
        ports: &mut Claims,
    ) -> Result<(), Status> {
        let (old_ip, old_ports) = old.map(service_allocations).unwrap_or_default();
        let Some(spec) = svc.spec.as_mut() else {
            return Err(Status::invalid_argument("spec: missing"));
        };
        let wanted = spec.cluster_ip.clone().filter(|s| !s.is_empty());
        let ip = match wanted.as_deref() {
            Some("None") => None,
            Some(ip) => Some(ip.to_string()),
            None => old_ip.clone(),
        };
        let ip = match ip {
            Some(ip) => {
                match ips.get(&ip) {
                    Some(owner) if owner != key => {
                        return Err(Status::already_exists(format!(
                            "spec.clusterIP: {ip} is allocated to {}",
                            model::parse_object_key(owner)
                                .map(|r| describe(&r))
                                .unwrap_or_else(|| owner.clone())
                        )));
                    }
                    Some(_) => {}
                    None => {
                        plan.compare(&alloc_key("clusterip", &ip), 0);
                        plan.put(alloc_key("clusterip", &ip), key.as_bytes().to_vec());
                        ips.insert(ip.clone(), key.to_string());
                    }
                }
                Some(ip)
            }
            None if wanted.as_deref() == Some("None") => None,
            None => {
                let ip = free_address(self.cfg.service_cidr, ips).ok_or_else(|| {
                    Status::resource_exhausted(format!(
                        "no free ClusterIP in {}",
                        self.cfg.service_cidr
                    ))
                })?;
                plan.compare(&alloc_key("clusterip", &ip), 0);
                plan.put(alloc_key("clusterip", &ip), key.as_bytes().to_vec());
                ips.insert(ip.clone(), key.to_string());
                Some(ip)
            }
        };
        if let Some(old_ip) = &old_ip
            && ip.as_ref() != Some(old_ip)
        {
            plan.delete(alloc_key("clusterip", old_ip));
            ips.remove(old_ip);
        }
        match &ip {
            Some(ip) => {
                spec.cluster_ip = Some(ip.clone());
                spec.cluster_ips = Some(vec![ip.clone()]);
            }
            None => {
                spec.cluster_ip = Some("None".into());
                spec.cluster_ips = Some(vec!["None".into()]);
            }
        }
        let wants_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        let mut kept = BTreeSet::new();
        for (i, p) in spec.ports.iter_mut().flatten().enumerate() {
            if !wants_node_ports {
                p.node_port = None;
                continue;
            }
            let np = match p.node_port.filter(|n| *n != 0) {
                Some(n) => n.to_string(),
                None => match old_ports.get(i).filter(|n| !kept.contains(*n)) {
                    Some(n) => n.clone(),
                    None => {
                        let (lo, hi) = self.cfg.node_ports;
                        (lo..=hi)
                            .map(|n| n.to_string())
                            .find(|n| !ports.contains_key(n))
                            .ok_or_else(|| {
                                Status::resource_exhausted(format!("no free NodePort in {lo}-{hi}"))
                            })?
                    }
                },
            };
            if kept.contains(&np) {
                return Err(Status::invalid_argument(format!(
                    "spec.ports[{i}].nodePort: {np} is used twice"
                )));
            }
            match ports.get(&np) {
                Some(owner) if owner != key => {
                    return Err(Status::already_exists(format!(
                        "spec.ports[{i}].nodePort: {np} is allocated to another Service"
                    )));
                }
                Some(_) => {}
                None => {
                    plan.compare(&alloc_key("nodeport", &np), 0);
                    plan.put(alloc_key("nodeport", &np), key.as_bytes().to_vec());
                    ports.insert(np.clone(), key.to_string());
                }
            }
            p.node_port = np.parse().ok();
            kept.insert(np);
        }
        for np in old_ports {
            if !kept.contains(&np) {
                plan.delete(alloc_key("nodeport", &np));
                ports.remove(&np);
            }
        }
        Ok(())
    }

    /// Plan deleting an object and releasing what it holds.
    async fn plan_delete(&self, plan: &mut Plan, r: &ObjectRef) -> Result<bool, Status> {
        if r.kind() == Kind::Node {
            return self.plan_remove_node(plan, &r.name).await;
        }
        let key = object_key(r);
        if plan.touched.contains(&key) {
            return Ok(false);
        }
        let Some((o, rev)) = self.get_object(r).await? else {
            return Ok(false);
        };
        plan_delete_object(plan, key, &o, rev);
        if r.kind() == Kind::Namespace {
            // Like Kubernetes, a namespace takes its objects with it. Pods an agent reported stay
            // until their node removes them (they still run there).
            let (_, kvs) = self
                .store
                .list(model::OBJECT_PREFIX)
                .await
                .map_err(store_err)?;
            for kv in kvs {
                let Some(inner) = model::parse_object_key(&kv.key) else {
                    continue;
                };
                if inner.namespace != r.name
                    || !model::is_namespaced(inner.kind())
                    || plan.touched.contains(&kv.key)
                {
                    continue;
                }
                let Ok(o) = model::decode_object(&kv.value, kv.mod_revision) else {
                    continue;
                };
                if matches!(&o.body, Some(Body::Pod(p)) if !p.node.is_empty()) {
                    continue;
                }
                plan_delete_object(plan, kv.key, &o, kv.mod_revision);
            }
        }
        Ok(true)
    }

    fn validate_pod(&self, p: &api::Pod) -> Result<(), Status> {
        let bad = |f: &str, m: String| {
            Status::invalid_argument(format!("Pod {}/{}: {f}: {m}", p.namespace, p.name))
        };
        for (f, v) in [("namespace", &p.namespace), ("name", &p.name)] {
            if v.is_empty() || v.len() > 253 || v.contains('/') {
                return Err(bad(f, format!("{v:?} is not a valid name")));
            }
        }
        if !p.ip.is_empty() && p.ip.parse::<Ipv4Addr>().is_err() {
            return Err(bad("ip", format!("{:?} is not an IPv4 address", p.ip)));
        }
        for (i, port) in p.ports.iter().enumerate() {
            if port.port == 0 || port.port > 65535 {
                return Err(bad(
                    &format!("ports[{i}].port"),
                    format!("{} is not a port", port.port),
                ));
            }
        }
        Ok(())
    }
}

/// Delete one stored object (read at `rev`) and release what it holds.
fn plan_delete_object(plan: &mut Plan, key: String, o: &api::Object, rev: u64) {
    plan.compare(&key, rev);
    plan.delete(key);
    if let Some(Body::K8s(k)) = &o.body
        && k.kind() == Kind::Service
        && let Ok(K8sObject::Service(s)) = K8sObject::from_json(Kind::Service, &k.json)
    {
        let (ip, ports) = service_allocations(&s);
        if let Some(ip) = ip {
            plan.delete(alloc_key("clusterip", &ip));
        }
        for p in ports {
            plan.delete(alloc_key("nodeport", &p));
        }
    }
}

/// A Service's ClusterIP (if any) and NodePorts, in port order.
fn service_allocations(s: &k8s_openapi::api::core::v1::Service) -> (Option<String>, Vec<String>) {
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

/// The first free host address of `net` (skipping the network address), not in `used`.
fn free_address(net: Ipv4Net, used: &Claims) -> Option<String> {
    net.hosts()
        .map(|a| a.to_string())
        .find(|a| !used.contains_key(a))
}

fn k8s_labels_ports(
    p: &k8s_openapi::api::core::v1::Pod,
) -> (HashMap<String, String>, Vec<api::ContainerPort>) {
    let labels = p
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let ports = p
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .map(|cp| api::ContainerPort {
            name: cp.name.clone().unwrap_or_default(),
            port: cp.container_port.max(0) as u32,
            protocol: cp.protocol.clone().unwrap_or_else(|| "TCP".into()),
        })
        .collect();
    (labels, ports)
}

fn watch_response(item: WatchItem) -> api::WatchResponse {
    use api::watch_response::Body as W;
    match item {
        WatchItem::Snapshot { revision, kvs } => {
            let objects = kvs
                .into_iter()
                .filter_map(|kv| model::decode_object(&kv.value, kv.mod_revision).ok())
                .collect();
            api::WatchResponse {
                body: Some(W::Snapshot(api::Snapshot { revision, objects })),
            }
        }
        WatchItem::Changes { revision, events } => {
            let events = events
                .into_iter()
                .filter_map(|ev| {
                    let r = model::parse_object_key(&ev.key)?;
                    Some(match ev.value {
                        Some(v) => api::Event {
                            r#type: api::EventType::Put as i32,
                            r#ref: Some(r),
                            object: model::decode_object(&v, revision).ok(),
                        },
                        None => api::Event {
                            r#type: api::EventType::Delete as i32,
                            r#ref: Some(r),
                            object: None,
                        },
                    })
                })
                .collect();
            api::WatchResponse {
                body: Some(W::Changes(api::Changes { revision, events })),
            }
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<api::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> Control for ControlService<S> {
    async fn register_node(
        &self,
        req: Request<api::RegisterNodeRequest>,
    ) -> Result<Response<api::RegisterNodeResponse>, Status> {
        let id = identity(&req)?;
        let node = req
            .into_inner()
            .node
            .ok_or_else(|| Status::invalid_argument("node: missing"))?;
        if !id.may_act_for_node(&node.name) {
            return Err(Status::permission_denied(format!(
                "node {:?} may not register node {:?}",
                id.name, node.name
            )));
        }
        if node.name.is_empty() || node.name.contains('/') {
            return Err(Status::invalid_argument(format!(
                "node.name: {:?} is not a valid name",
                node.name
            )));
        }
        node.underlay_ip.parse::<Ipv4Addr>().map_err(|_| {
            Status::invalid_argument(format!(
                "node.underlay_ip: {:?} is not an IPv4 address",
                node.underlay_ip
            ))
        })?;
        if node.vtep_mac.len() != 6 {
            return Err(Status::invalid_argument("node.vtep_mac: must be 6 bytes"));
        }
        let r = node_ref(&node.name);
        let key = object_key(&r);
        for _ in 0..MAX_ATTEMPTS {
            let mut plan = Plan::default();
            let existing = self.get_object(&r).await?;
            let mut n = node.clone();
            match &existing {
                Some((
                    api::Object {
                        body: Some(Body::Node(old)),
                        ..
                    },
                    rev,
                )) if !old.pod_cidr.is_empty() => {
                    plan.compare(&key, *rev);
                    n.pod_cidr = old.pod_cidr.clone();
                }
                other => {
                    plan.compare(&key, other.as_ref().map_or(0, |(_, rev)| *rev));
                    let (claims, _) = self.claims("podcidr").await?;
                    let subnets = self
                        .cfg
                        .cluster_cidr
                        .subnets(self.cfg.node_prefix)
                        .map_err(|e| Status::internal(format!("cluster CIDR: {e}")))?;
                    // Like Flannel, the first subnet (holding the cluster network address) is not leased.
                    let cidr = subnets
                        .skip(1)
                        .map(|s| s.to_string())
                        .find(|s| !claims.contains_key(s))
                        .ok_or_else(|| {
                            Status::resource_exhausted(format!(
                                "no free /{} in {}",
                                self.cfg.node_prefix, self.cfg.cluster_cidr
                            ))
                        })?;
                    plan.compare(&alloc_key("podcidr", &cidr), 0);
                    plan.put(alloc_key("podcidr", &cidr), key.as_bytes().to_vec());
                    n.pod_cidr = cidr;
                }
            }
            let object = api::Object {
                body: Some(Body::Node(n.clone())),
                revision: 0,
            };
            plan.put(key.clone(), model::encode_object(&object));
            if let Some(revision) = self.commit(plan).await? {
                return Ok(Response::new(api::RegisterNodeResponse {
                    node: Some(n),
                    cluster_cidr: self.cfg.cluster_cidr.to_string(),
                    service_cidr: self.cfg.service_cidr.to_string(),
                    revision,
                }));
            }
        }
        Err(conflict())
    }

    async fn remove_node(
        &self,
        req: Request<api::RemoveNodeRequest>,
    ) -> Result<Response<api::RemoveNodeResponse>, Status> {
        require_operator(&identity(&req)?)?;
        let name = req.into_inner().name;
        for _ in 0..MAX_ATTEMPTS {
            let mut plan = Plan::default();
            if !self.plan_remove_node(&mut plan, &name).await? {
                return Ok(Response::new(api::RemoveNodeResponse {
                    existed: false,
                    revision: 0,
                }));
            }
            if let Some(revision) = self.commit(plan).await? {
                return Ok(Response::new(api::RemoveNodeResponse {
                    existed: true,
                    revision,
                }));
            }
        }
        Err(conflict())
    }

    async fn report_pod(
        &self,
        req: Request<api::ReportPodRequest>,
    ) -> Result<Response<api::ReportPodResponse>, Status> {
        let id = identity(&req)?;
        let pod = req
            .into_inner()
            .pod
            .ok_or_else(|| Status::invalid_argument("pod: missing"))?;
        if !id.may_act_for_node(&pod.node) || pod.node.is_empty() {
            return Err(Status::permission_denied(format!(
                "node {:?} may not report pods of node {:?}",
                id.name, pod.node
            )));
        }
        self.validate_pod(&pod)?;
        let Some((node_obj, _)) = self.get_object(&node_ref(&pod.node)).await? else {
            return Err(Status::failed_precondition(format!(
                "node {:?} is not registered",
                pod.node
            )));
        };
        if let Some(Body::Node(n)) = node_obj.body
            && let (Ok(cidr), Ok(ip)) = (n.pod_cidr.parse::<Ipv4Net>(), pod.ip.parse::<Ipv4Addr>())
            && !cidr.contains(&ip)
        {
            return Err(Status::permission_denied(format!(
                "pod IP {ip} is outside node {}'s pod CIDR {cidr}",
                n.name
            )));
        }
        let r = pod_ref(&pod.namespace, &pod.name);
        let key = object_key(&r);
        for _ in 0..MAX_ATTEMPTS {
            let mut plan = Plan::default();
            let mut p = pod.clone();
            match self.get_object(&r).await? {
                Some((o, rev)) => {
                    if let Some(Body::Pod(old)) = o.body {
                        if !old.node.is_empty() && old.node != pod.node {
                            return Err(Status::permission_denied(format!(
                                "pod {}/{} belongs to node {:?}",
                                pod.namespace, pod.name, old.node
                            )));
                        }
                        if p.labels.is_empty() {
                            p.labels = old.labels;
                        }
                        if p.ports.is_empty() {
                            p.ports = old.ports;
                        }
                    }
                    plan.compare(&key, rev);
                }
                None => plan.compare(&key, 0),
            }
            plan.put(
                key.clone(),
                model::encode_object(&api::Object {
                    body: Some(Body::Pod(p)),
                    revision: 0,
                }),
            );
            if let Some(revision) = self.commit(plan).await? {
                return Ok(Response::new(api::ReportPodResponse { revision }));
            }
        }
        Err(conflict())
    }

    async fn remove_pod(
        &self,
        req: Request<api::RemovePodRequest>,
    ) -> Result<Response<api::RemovePodResponse>, Status> {
        let id = identity(&req)?;
        let req = req.into_inner();
        if !id.may_act_for_node(&req.node) {
            return Err(Status::permission_denied(format!(
                "node {:?} may not remove pods of node {:?}",
                id.name, req.node
            )));
        }
        let r = pod_ref(&req.namespace, &req.name);
        let key = object_key(&r);
        for _ in 0..MAX_ATTEMPTS {
            let Some((o, rev)) = self.get_object(&r).await? else {
                return Ok(Response::new(api::RemovePodResponse {
                    existed: false,
                    revision: 0,
                }));
            };
            if let Some(Body::Pod(old)) = &o.body
                && old.node != req.node
                && id.role == Role::Node
            {
                return Err(Status::permission_denied(format!(
                    "pod {}/{} belongs to node {:?}",
                    req.namespace, req.name, old.node
                )));
            }
            let mut plan = Plan::default();
            plan.compare(&key, rev);
            plan.delete(key.clone());
            if let Some(revision) = self.commit(plan).await? {
                return Ok(Response::new(api::RemovePodResponse {
                    existed: true,
                    revision,
                }));
            }
        }
        Err(conflict())
    }

    async fn apply(
        &self,
        req: Request<api::ApplyRequest>,
    ) -> Result<Response<api::ApplyResponse>, Status> {
        require_operator(&identity(&req)?)?;
        // Validate everything first: one bad object rejects the whole request.
        enum Item {
            K8s(Box<K8sObject>),
            Pod(api::Pod),
        }
        let mut items = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, o) in req.into_inner().objects.into_iter().enumerate() {
            let item = match o.body {
                Some(Body::K8s(k)) => {
                    let kind = k.kind();
                    let mut obj = K8sObject::from_json(kind, &k.json).map_err(|e| {
                        Status::invalid_argument(format!(
                            "object {i} ({}): {e}",
                            model::kind_name(kind)
                        ))
                    })?;
                    obj.validate(self.cfg.service_cidr, self.cfg.node_ports)
                        .map_err(|e| {
                            Status::invalid_argument(format!(
                                "object {i} ({} {}): {e}",
                                model::kind_name(kind),
                                obj.metadata().name.as_deref().unwrap_or("")
                            ))
                        })?;
                    Item::K8s(Box::new(obj))
                }
                Some(Body::Pod(p)) => {
                    self.validate_pod(&p)?;
                    Item::Pod(p)
                }
                Some(Body::Node(_)) => {
                    return Err(Status::invalid_argument(format!(
                        "object {i}: nodes join with RegisterNode, not Apply"
                    )));
                }
                None => return Err(Status::invalid_argument(format!("object {i}: empty"))),
            };
            let r = match &item {
                Item::K8s(k) => {
                    let p = k.to_proto();
                    ObjectRef {
                        kind: p.kind,
                        namespace: p.namespace,
                        name: p.name,
                    }
                }
                Item::Pod(p) => pod_ref(&p.namespace, &p.name),
            };
            if !seen.insert(object_key(&r)) {
                return Err(Status::invalid_argument(format!(
                    "object {i}: {} appears twice",
                    describe(&r)
                )));
            }
            items.push(item);
        }
        let needs_claims = items
            .iter()
            .any(|i| matches!(i, Item::K8s(k) if matches!(**k, K8sObject::Service(_))));
        for _ in 0..MAX_ATTEMPTS {
            let mut plan = Plan::default();
            let (mut ips, mut ports) = if needs_claims {
                (
                    self.claims("clusterip").await?.0,
                    self.claims("nodeport").await?.0,
                )
            } else {
                Default::default()
            };
            let mut stored = Vec::with_capacity(items.len());
            for item in &items {
                let object = match item {
                    Item::K8s(k) if matches!(**k, K8sObject::Pod(_)) => {
                        let K8sObject::Pod(kp) = &**k else { continue };
                        let ns = kp.metadata.namespace.clone().unwrap_or_default();
                        let name = kp.metadata.name.clone().unwrap_or_default();
                        let r = pod_ref(&ns, &name);
                        let (labels, cports) = k8s_labels_ports(kp);
                        let mut pod = api::Pod {
                            namespace: ns,
                            name,
                            labels,
                            ports: cports,
                            ..Default::default()
                        };
                        let existing = self.get_object(&r).await?;
                        plan.compare(
                            &object_key(&r),
                            existing.as_ref().map_or(0, |(_, rev)| *rev),
                        );
                        if let Some((
                            api::Object {
                                body: Some(Body::Pod(old)),
                                ..
                            },
                            _,
                        )) = existing
                        {
                            pod.node = old.node;
                            pod.ip = old.ip;
                            pod.container_id = old.container_id;
                        }
                        api::Object {
                            body: Some(Body::Pod(pod)),
                            revision: 0,
                        }
                    }
                    Item::K8s(obj) => {
                        let mut obj = (**obj).clone();
                        let p = obj.to_proto();
                        let r = ObjectRef {
                            kind: p.kind,
                            namespace: p.namespace,
                            name: p.name,
                        };
                        let key = object_key(&r);
                        let existing = self.get_object(&r).await?;
                        plan.compare(&key, existing.as_ref().map_or(0, |(_, rev)| *rev));
                        if let K8sObject::Service(svc) = &mut obj {
                            let old = existing.and_then(|(o, _)| match o.body {
                                Some(Body::K8s(k)) => {
                                    match K8sObject::from_json(Kind::Service, &k.json) {
                                        Ok(K8sObject::Service(s)) => Some(s),
                                        _ => None,
                                    }
                                }
                                _ => None,
                            });
                            self.plan_service(
                                &mut plan,
                                &key,
                                svc,
                                old.as_ref(),
                                &mut ips,
                                &mut ports,
                            )?;
                        }
                        api::Object {
                            body: Some(Body::K8s(obj.to_proto())),
                            revision: 0,
                        }
                    }
                    Item::Pod(p) => {
                        let r = pod_ref(&p.namespace, &p.name);
                        let existing = self.get_object(&r).await?;
                        plan.compare(
                            &object_key(&r),
                            existing.as_ref().map_or(0, |(_, rev)| *rev),
                        );
                        api::Object {
                            body: Some(Body::Pod(p.clone())),
                            revision: 0,
                        }
                    }
                };
                let r = model::object_ref(&object).unwrap_or_default();
                plan.put(object_key(&r), model::encode_object(&object));
                stored.push(object);
            }
            if let Some(revision) = self.commit(plan).await? {
                for o in &mut stored {
                    o.revision = revision;
                }
                return Ok(Response::new(api::ApplyResponse {
                    objects: stored,
                    revision,
                }));
            }
        }
        Err(conflict())
    }

    async fn delete(
        &self,
        req: Request<api::DeleteRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        require_operator(&identity(&req)?)?;
        let refs = req.into_inner().refs;
        for _ in 0..MAX_ATTEMPTS {
            let mut plan = Plan::default();
            let mut deleted = 0;
            for r in &refs {
                if plan.touched.contains(&object_key(r)) {
                    continue;
                }
                if self.plan_delete(&mut plan, r).await? {
                    deleted += 1;
                }
            }
            if deleted == 0 {
                return Ok(Response::new(api::DeleteResponse {
                    deleted: 0,
                    revision: 0,
                }));
            }
            if let Some(revision) = self.commit(plan).await? {
                return Ok(Response::new(api::DeleteResponse { deleted, revision }));
            }
        }
        Err(conflict())
    }

    async fn list(
        &self,
        req: Request<api::ListRequest>,
    ) -> Result<Response<api::ListResponse>, Status> {
        identity(&req)?;
        let req = req.into_inner();
        let (revision, kvs) = self
            .store
            .list(&model::kind_prefix(req.kind()))
            .await
            .map_err(store_err)?;
        let objects = kvs
            .into_iter()
            .filter(|kv| {
                req.namespace.is_empty()
                    || model::parse_object_key(&kv.key)
                        .is_some_and(|r| r.namespace == req.namespace)
            })
            .filter_map(|kv| model::decode_object(&kv.value, kv.mod_revision).ok())
            .collect();
        Ok(Response::new(api::ListResponse { objects, revision }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<api::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let id = identity(&req)?;
        let req = req.into_inner();
        let node = match id.role {
            Role::Node => Some(id.name.clone()),
            Role::Operator => Some(req.node.clone()).filter(|n| !n.is_empty()),
        };
        let mut rx = self
            .store
            .watch(model::OBJECT_PREFIX, req.from_revision)
            .await
            .map_err(store_err)?;
        let (tx, out) = mpsc::channel(256);
        let agents = self.agents.clone();
        if let Some(n) = &node {
            agents
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(n.clone())
                .or_default()
                .watches += 1;
        }
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    i = rx.recv() => i,
                    _ = tx.closed() => break,
                };
                let msg = match item {
                    Some(Ok(item)) => Ok(watch_response(item)),
                    Some(Err(e)) => Err(store_err(e)),
                    None => Err(Status::unavailable("watch ended")),
                };
                let end = msg.is_err();
                if tx.send(msg).await.is_err() || end {
                    break;
                }
            }
            if let Some(n) = node
                && let Some(a) = agents.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&n)
            {
                a.watches = a.watches.saturating_sub(1);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn report_sync(
        &self,
        req: Request<api::ReportSyncRequest>,
    ) -> Result<Response<api::ReportSyncResponse>, Status> {
        let id = identity(&req)?;
        let req = req.into_inner();
        if !id.may_act_for_node(&req.node) {
            return Err(Status::permission_denied(format!(
                "node {:?} may not report for node {:?}",
                id.name, req.node
            )));
        }
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let a = agents.entry(req.node).or_default();
        a.synced_revision = req.revision;
        a.last_sync_unix_ms = now_ms();
        Ok(Response::new(api::ReportSyncResponse {}))
    }

    async fn status(
        &self,
        req: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusResponse>, Status> {
        identity(&req)?;
        let (revision, kvs) = self
            .store
            .list(model::OBJECT_PREFIX)
            .await
            .map_err(store_err)?;
        let nodes: Vec<String> = kvs
            .iter()
            .filter_map(|kv| model::parse_object_key(&kv.key))
            .filter(|r| r.kind() == Kind::Node)
            .map(|r| r.name)
            .collect();
        let agents_map = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut names: BTreeSet<String> = nodes.into_iter().collect();
        names.extend(agents_map.keys().cloned());
        let agents = names
            .into_iter()
            .map(|node| {
                let a = agents_map.get(&node).cloned().unwrap_or_default();
                api::AgentStatus {
                    node,
                    connected: a.watches > 0,
                    synced_revision: a.synced_revision,
                    last_sync_unix_ms: a.last_sync_unix_ms,
                }
            })
            .collect();
        Ok(Response::new(api::StatusResponse {
            revision,
            store: self.store.backend().to_string(),
            cluster_cidr: self.cfg.cluster_cidr.to_string(),
            service_cidr: self.cfg.service_cidr.to_string(),
            agents,
            objects: kvs.len() as u32,
        }))
    }

    async fn push_flow_events(
        &self,
        req: Request<tonic::Streaming<api::PushFlowEventsRequest>>,
    ) -> Result<Response<api::PushFlowEventsResponse>, Status> {
        let id = identity(&req)?;
        let mut stream = req.into_inner();
        let mut received = 0u64;
        let mut opened: Option<String> = None;
        let result = loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let node = match id.role {
                Role::Node if msg.node.is_empty() || msg.node == id.name => id.name.clone(),
                Role::Node => {
                    break Err(Status::permission_denied(format!(
                        "node {:?} may not push flow events of node {:?}",
                        id.name, msg.node
                    )));
                }
                Role::Operator if msg.node.is_empty() || msg.node.contains('/') => {
                    break Err(Status::invalid_argument(format!(
                        "node: {:?} is not a valid name",
                        msg.node
                    )));
                }
                Role::Operator => msg.node,
            };
            if opened.as_deref() != Some(node.as_str()) {
                if let Some(old) = opened.take() {
                    self.flows.stream_opened(&old, false);
                }
                self.flows.stream_opened(&node, true);
                opened = Some(node.clone());
            }
            received += msg.events.len() as u64;
            self.flows.publish(&node, msg.events, msg.dropped);
        };
        if let Some(n) = opened {
            self.flows.stream_opened(&n, false);
        }
        result.map(|()| Response::new(api::PushFlowEventsResponse { received }))
    }

    type ObserveStream = crate::flows::ObserveStream;

    async fn observe(
        &self,
        req: Request<agent_api::ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        require_operator(&identity(&req)?)?;
        Ok(Response::new(crate::flows::observe(
            &self.flows,
            req.into_inner(),
        )))
    }
}

/// TLS material for the server (PEM).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("plaintext is only allowed on loopback addresses, not {0}")]
    PlaintextNotLoopback(SocketAddr),
    #[error("TLS setup: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("serving: {0}")]
    Transport(#[source] tonic::transport::Error),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Serve the control API on `listener` until `shutdown` completes. `tls: None` means plaintext,
/// refused unless the listener is on a loopback address.
pub async fn serve<S: Store>(
    listener: tokio::net::TcpListener,
    service: ControlService<S>,
    auth: Authenticator,
    tls: Option<ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_counted(listener, service, auth, tls, shutdown, Arc::default()).await
}

/// [`serve`], counting every request by method and gRPC status in `counts` (for metrics).
pub async fn serve_counted<S: Store>(
    listener: tokio::net::TcpListener,
    service: ControlService<S>,
    auth: Authenticator,
    tls: Option<ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
    counts: Arc<crate::metrics::RequestCounts>,
) -> Result<(), ServeError> {
    let local = listener.local_addr()?;
    let mut builder = tonic::transport::Server::builder();
    match tls {
        Some(t) => {
            let cfg = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(t.cert_pem, t.key_pem));
            builder = builder.tls_config(cfg).map_err(ServeError::Tls)?;
        }
        None if local.ip().is_loopback() => {}
        None => return Err(ServeError::PlaintextNotLoopback(local)),
    }
    // Without TCP_NODELAY, small watch messages wait for delayed ACKs (40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(30)));
    builder
        .layer(crate::metrics::CountLayer(counts))
        .add_service(service.into_server(auth))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(ServeError::Transport)
}

/// For callers that hold an [`Identity`] outside a request (tests).
pub fn with_identity<T>(mut req: Request<T>, id: Identity) -> Request<T> {
    req.extensions_mut().insert(id);
    req
}

/// What the control plane's metrics report, read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct ControlMetrics {
    pub revision: u64,
    pub objects: usize,
    /// Per node: open watches, last revision the agent reported synced.
    pub agents: Vec<(String, u32, u64)>,
    /// Per node: flow events received, dropped by the agent, held.
    pub flows: Vec<(String, crate::flows::NodeFlowStats)>,
}

impl<S: Store> ControlService<S> {
    /// The current revision, object count and agents' watch state.
    pub async fn metrics_snapshot(&self) -> Result<ControlMetrics, StoreError> {
        let (revision, kvs) = self.store.list(model::OBJECT_PREFIX).await?;
        let agents = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, a)| (n.clone(), a.watches, a.synced_revision))
            .collect();
        Ok(ControlMetrics {
            revision,
            objects: kvs.len(),
            agents,
            flows: self.flows.stats(),
        })
    }
}
