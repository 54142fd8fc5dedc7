//! [`ControlService`]: the `Control` gRPC implementation over a [`Store`].
//!
//! Each call authorizes its caller (`crate::auth`), validates its request, reads what the write
//! depends on, has `super::plan` build the transaction, and commits it; a commit that loses to
//! another writer (a compare failed) is read and planned again, up to [`MAX_ATTEMPTS`] times,
//! then answered `ABORTED`. Watches stream the store's changes as `WatchResponse`s. The service
//! also keeps, in memory only, each agent's watch count and last synced revision (for `Status`
//! and metrics) and the flow events agents push (`crate::flows`).

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::Stream;
use ipnet::Ipv4Net;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::ServerConfig;
use super::kube::KubeLink;
use super::plan::{Claims, Plan, Pool, ServiceClaims, stored_service};
use crate::agent_api;
use crate::api::control_server::{Control, ControlServer};
use crate::api::{self, Kind, ObjectRef, object::Body};
use crate::auth::{Authenticator, Role, identity, require_operator};
use crate::flows::FlowRelay;
use crate::model::{self, K8sObject, describe, object_key};
use crate::store::{Store, StoreError, WatchItem};

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
    /// Set when following a Kubernetes API server (`super::kube`).
    kube: Option<Arc<KubeLink>>,
}

impl<S: Clone> Clone for ControlService<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            cfg: self.cfg.clone(),
            agents: self.agents.clone(),
            flows: self.flows.clone(),
            kube: self.kube.clone(),
        }
    }
}

/// Commits a write tries before it gives up with `ABORTED`.
const MAX_ATTEMPTS: usize = 64;

/// The answer to a call the store failed: what failed and what to do about it. The store error
/// stays attached as the status' source.
impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        let mut status = match &e {
            StoreError::CreateDir { .. } | StoreError::Redb(_) => Status::unavailable(format!(
                "store: {e}; retry, and if it persists check the control plane's log and its \
                 --data-dir (disk space, permissions, another sluice-control holding the file)"
            )),
            StoreError::Etcd(_) | StoreError::EtcdConnect { .. } | StoreError::EtcdTls(_) => {
                Status::unavailable(format!(
                    "store: {e}; retry, and if it persists check that the control plane reaches \
                     etcd at its --etcd-endpoints"
                ))
            }
            StoreError::WatchEnded(_) => Status::unavailable(format!("store: {e}; watch again")),
            StoreError::Task(join) if !join.is_panic() => {
                Status::unavailable(format!("store: {e}; the control plane is stopping, retry"))
            }
            StoreError::Corrupt(_) | StoreError::NotUtf8 { .. } | StoreError::Task(_) => {
                Status::internal(format!(
                    "store: {e}; retrying will not help: see the control plane's log, and \
                     restore its store from a backup if the data is damaged"
                ))
            }
        };
        status.set_source(Arc::new(e));
        status
    }
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

/// One object of an `Apply`, validated.
enum ApplyItem {
    K8s(Box<K8sObject>),
    Pod(api::Pod),
}

impl ApplyItem {
    fn object_ref(&self) -> ObjectRef {
        match self {
            ApplyItem::K8s(k) => {
                let p = k.to_proto();
                ObjectRef {
                    kind: p.kind,
                    namespace: p.namespace,
                    name: p.name,
                }
            }
            ApplyItem::Pod(p) => pod_ref(&p.namespace, &p.name),
        }
    }

    fn is_service(&self) -> bool {
        matches!(self, ApplyItem::K8s(k) if matches!(**k, K8sObject::Service(_)))
    }
}

/// Validate every object of an `Apply` before anything is written: one bad object, or one
/// object named twice, rejects the whole request.
fn parse_apply(cfg: &ServerConfig, objects: Vec<api::Object>) -> Result<Vec<ApplyItem>, Status> {
    let mut items = Vec::with_capacity(objects.len());
    let mut seen = BTreeSet::new();
    for (i, o) in objects.into_iter().enumerate() {
        let item = match o.body {
            Some(Body::K8s(k)) => {
                let kind = k.kind();
                let mut obj = K8sObject::from_json(kind, &k.json).map_err(|e| {
                    Status::invalid_argument(format!(
                        "object {i} ({}): {e}",
                        model::kind_name(kind)
                    ))
                })?;
                obj.validate(cfg.service_cidr, cfg.node_ports)
                    .map_err(|e| {
                        Status::invalid_argument(format!(
                            "object {i} ({} {}): {e}",
                            model::kind_name(kind),
                            obj.metadata().name.as_deref().unwrap_or("")
                        ))
                    })?;
                ApplyItem::K8s(Box::new(obj))
            }
            Some(Body::Pod(p)) => {
                validate_pod(&p)?;
                ApplyItem::Pod(p)
            }
            Some(Body::Node(_)) => {
                return Err(Status::invalid_argument(format!(
                    "object {i}: nodes join with RegisterNode, not Apply"
                )));
            }
            None => return Err(Status::invalid_argument(format!("object {i}: empty"))),
        };
        let r = item.object_ref();
        if !seen.insert(object_key(&r)) {
            return Err(Status::invalid_argument(format!(
                "object {i}: {} appears twice",
                describe(&r)
            )));
        }
        items.push(item);
    }
    Ok(items)
}

fn validate_pod(p: &api::Pod) -> Result<(), Status> {
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

impl<S: Store> ControlService<S> {
    pub fn new(store: S, cfg: ServerConfig) -> Self {
        Self {
            store,
            cfg: Arc::new(cfg),
            agents: Arc::default(),
            flows: Arc::default(),
            kube: None,
        }
    }

    /// Follow a Kubernetes API server (`super::kube::KubeSource` on the other end of `link`):
    /// registration takes the Node's pod CIDR and waits for Nodes to be listed, pods' labels and
    /// ports come from the API server only, and operators may not `Apply` or `Delete`.
    pub fn following(mut self, link: Arc<KubeLink>) -> Self {
        self.kube = Some(link);
        self
    }

    /// The store (for the API-server source, which writes the objects it follows).
    pub(super) fn store(&self) -> &S {
        &self.store
    }

    /// Refuse an operator's write of objects the API server owns.
    fn refuse_when_following(&self) -> Result<(), Status> {
        match self.kube {
            Some(_) => Err(Status::failed_precondition(
                "sluice-control follows the Kubernetes API server: change objects there \
                 (kubectl apply/delete); it would undo changes made here",
            )),
            None => Ok(()),
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
        match self.store.get(&object_key(r)).await? {
            Some(kv) => {
                let o = model::decode_object(&kv.value, kv.mod_revision).map_err(|e| {
                    Status::internal(format!("stored {} is corrupt: {e}", describe(r)))
                })?;
                Ok(Some((o, kv.mod_revision)))
            }
            None => Ok(None),
        }
    }

    /// The object at `r`, if any, and the revision its key is at (0: absent) to compare at commit.
    async fn read_object(&self, r: &ObjectRef) -> Result<(Option<api::Object>, u64), Status> {
        Ok(match self.get_object(r).await? {
            Some((o, rev)) => (Some(o), rev),
            None => (None, 0),
        })
    }

    async fn claims(&self, pool: Pool) -> Result<Claims, Status> {
        let (_, kvs) = self.store.list(&pool.prefix()).await?;
        Ok(Claims::read(pool, kvs))
    }

    async fn commit(&self, plan: Plan) -> Result<Option<u64>, Status> {
        Ok(self.store.commit(plan.into_txn()).await?)
    }

    async fn pods_of_node(&self, node: &str) -> Result<Vec<(String, u64)>, Status> {
        let (_, kvs) = self.store.list(&model::kind_prefix(Kind::Pod)).await?;
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

    /// Plan the removal of a node: its record, its pods, its pod CIDR claim. `false` when there
    /// is no such node.
    pub(super) async fn plan_remove_node(
        &self,
        plan: &mut Plan,
        name: &str,
    ) -> Result<bool, Status> {
        let r = node_ref(name);
        let Some((o, rev)) = self.get_object(&r).await? else {
            return Ok(false);
        };
        let pods = self.pods_of_node(name).await?;
        plan.remove_node(object_key(&r), &o, rev, pods);
        Ok(true)
    }

    /// Plan deleting an object and releasing what it holds; a namespace takes its objects with
    /// it. `false` when there is nothing to delete.
    async fn plan_delete(&self, plan: &mut Plan, r: &ObjectRef) -> Result<bool, Status> {
        if r.kind() == Kind::Node {
            return self.plan_remove_node(plan, &r.name).await;
        }
        let key = object_key(r);
        if plan.touches(&key) {
            return Ok(false);
        }
        let Some((o, rev)) = self.get_object(r).await? else {
            return Ok(false);
        };
        plan.delete_object(key, &o, rev);
        if r.kind() == Kind::Namespace {
            let (_, kvs) = self.store.list(model::OBJECT_PREFIX).await?;
            plan.delete_namespace_contents(&r.name, kvs);
        }
        Ok(true)
    }

    /// Plan writing one `Apply` object; returns it as it will be stored.
    async fn plan_apply_item(
        &self,
        plan: &mut Plan,
        item: &ApplyItem,
        claims: &mut ServiceClaims,
    ) -> Result<api::Object, Status> {
        let r = item.object_ref();
        let key = object_key(&r);
        let (existing, rev) = self.read_object(&r).await?;
        plan.compare(&key, rev);
        let body = match item {
            // A Pod manifest gives labels and ports; where the pod runs is its node's to say.
            ApplyItem::K8s(k) => match &**k {
                K8sObject::Pod(kp) => {
                    let (labels, ports) = k8s_labels_ports(kp);
                    let mut pod = api::Pod {
                        namespace: r.namespace,
                        name: r.name,
                        labels,
                        ports,
                        ..Default::default()
                    };
                    if let Some(api::Object {
                        body: Some(Body::Pod(old)),
                        ..
                    }) = existing
                    {
                        pod.node = old.node;
                        pod.ip = old.ip;
                        pod.container_id = old.container_id;
                    }
                    Body::Pod(pod)
                }
                obj => {
                    let mut obj = obj.clone();
                    if let K8sObject::Service(svc) = &mut obj {
                        let old = existing.as_ref().and_then(stored_service);
                        plan.allocate_service(&self.cfg, &key, svc, old.as_ref(), claims)?;
                    }
                    Body::K8s(obj.to_proto())
                }
            },
            ApplyItem::Pod(p) => Body::Pod(p.clone()),
        };
        let object = api::Object {
            body: Some(body),
            revision: 0,
        };
        plan.put(key, model::encode_object(&object));
        Ok(object)
    }
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
        // The cluster's allocation, when it allocates pod CIDRs.
        let allocated = match &self.kube {
            Some(k) if !k.nodes_listed() => {
                return Err(Status::unavailable(
                    "waiting for the first list of Nodes from the Kubernetes API server; retry",
                ));
            }
            Some(k) => k.pod_cidr(&node.name),
            None => None,
        };
        let r = node_ref(&node.name);
        let key = object_key(&r);
        for _ in 0..MAX_ATTEMPTS {
            let mut plan = Plan::default();
            let existing = self.get_object(&r).await?;
            let mut n = node.clone();
            match &existing {
                _ if let Some(cidr) = allocated => {
                    plan.compare(&key, existing.as_ref().map_or(0, |(_, rev)| *rev));
                    let old = match &existing {
                        Some((
                            api::Object {
                                body: Some(Body::Node(old)),
                                ..
                            },
                            _,
                        )) => Some(old.pod_cidr.as_str()),
                        _ => None,
                    };
                    let mut claims = self.claims(Pool::PodCidr).await?;
                    plan.hold_pod_cidr(&mut claims, &cidr.to_string(), old, &key)?;
                    n.pod_cidr = cidr.to_string();
                }
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
                    let mut claims = self.claims(Pool::PodCidr).await?;
                    n.pod_cidr = plan.lease_pod_cidr(&self.cfg, &mut claims, &key)?;
                }
            }
            let object = api::Object {
                body: Some(Body::Node(n.clone())),
                revision: 0,
            };
            plan.put(key.clone(), model::encode_object(&object));
            if let Some(revision) = self.commit(plan).await? {
                if let Some(k) = &self.kube {
                    k.node_registered(&n.name);
                }
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
        validate_pod(&pod)?;
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
                        if p.labels.is_empty() || self.kube.is_some() {
                            p.labels = old.labels;
                        }
                        if p.ports.is_empty() || self.kube.is_some() {
                            p.ports = old.ports;
                        }
                    }
                    plan.compare(&key, rev);
                }
                None => {
                    plan.compare(&key, 0);
                    // Labels and ports are the API server's (they come with its Pod).
                    if self.kube.is_some() {
                        p.labels.clear();
                        p.ports.clear();
                    }
                }
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
            match (&self.kube, o.body) {
                // The API server still has the pod: keep its labels and ports, forget where it
                // ran (the source deletes the record with the Pod).
                (Some(k), Some(Body::Pod(old))) if k.has_pod(&req.namespace, &req.name) => {
                    let kept = api::Pod {
                        namespace: old.namespace,
                        name: old.name,
                        labels: old.labels,
                        ports: old.ports,
                        ..Default::default()
                    };
                    let object = api::Object {
                        body: Some(Body::Pod(kept)),
                        revision: 0,
                    };
                    plan.put(key.clone(), model::encode_object(&object));
                }
                _ => plan.delete(key.clone()),
            }
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
        self.refuse_when_following()?;
        let items = parse_apply(&self.cfg, req.into_inner().objects)?;
        let needs_claims = items.iter().any(ApplyItem::is_service);
        for _ in 0..MAX_ATTEMPTS {
            let mut plan = Plan::default();
            let mut claims = if needs_claims {
                ServiceClaims {
                    cluster_ips: self.claims(Pool::ClusterIp).await?,
                    node_ports: self.claims(Pool::NodePort).await?,
                }
            } else {
                ServiceClaims::none()
            };
            let mut stored = Vec::with_capacity(items.len());
            for item in &items {
                stored.push(self.plan_apply_item(&mut plan, item, &mut claims).await?);
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
        self.refuse_when_following()?;
        let refs = req.into_inner().refs;
        for _ in 0..MAX_ATTEMPTS {
            let mut plan = Plan::default();
            let mut deleted = 0;
            for r in &refs {
                if plan.touches(&object_key(r)) {
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
        let (revision, kvs) = self.store.list(&model::kind_prefix(req.kind())).await?;
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
            .await?;
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
                    Some(Err(e)) => Err(Status::from(e)),
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
        let (revision, kvs) = self.store.list(model::OBJECT_PREFIX).await?;
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

#[cfg(test)]
mod tests {
    //! The service over a real embedded store: what `plan` decides, committed, read back and
    //! retried, as callers see it.

    use tonic::Code;

    use super::*;
    use crate::auth::Identity;
    use crate::server::with_identity;
    use crate::store::RedbStore;

    struct Fixture {
        svc: ControlService<RedbStore>,
        _dir: tempfile::TempDir,
    }

    /// A server with tiny pools (`ServerConfig::tiny`) on a fresh store.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        Fixture {
            svc: ControlService::new(store, ServerConfig::tiny()),
            _dir: dir,
        }
    }

    fn as_operator<T>(msg: T) -> Request<T> {
        with_identity(
            Request::new(msg),
            Identity {
                role: Role::Operator,
                name: "op".into(),
            },
        )
    }

    fn as_node<T>(node: &str, msg: T) -> Request<T> {
        with_identity(
            Request::new(msg),
            Identity {
                role: Role::Node,
                name: node.into(),
            },
        )
    }

    async fn register(svc: &ControlService<RedbStore>, name: &str) -> Result<String, Status> {
        let node = api::Node {
            name: name.into(),
            underlay_ip: "192.168.1.10".into(),
            vtep_mac: vec![2, 0, 0, 0, 0, 1],
            pod_cidr: String::new(),
        };
        let req = api::RegisterNodeRequest { node: Some(node) };
        let resp = svc.register_node(as_node(name, req)).await?.into_inner();
        Ok(resp.node.unwrap().pod_cidr)
    }

    fn k8s(kind: Kind, json: &str) -> api::Object {
        let obj = K8sObject::from_json(kind, json).unwrap();
        api::Object {
            body: Some(Body::K8s(obj.to_proto())),
            revision: 0,
        }
    }

    fn service(ns: &str, name: &str, cluster_ip: Option<&str>) -> api::Object {
        let ip = cluster_ip.map_or(String::new(), |ip| format!(r#","clusterIP":"{ip}""#));
        k8s(
            Kind::Service,
            &format!(
                r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{ns}"}},"spec":{{"type":"NodePort","ports":[{{"port":80}}]{ip}}}}}"#
            ),
        )
    }

    fn namespace(name: &str) -> api::Object {
        k8s(
            Kind::Namespace,
            &format!(r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{name}"}}}}"#),
        )
    }

    async fn apply(
        svc: &ControlService<RedbStore>,
        objects: Vec<api::Object>,
    ) -> Result<api::ApplyResponse, Status> {
        let req = as_operator(api::ApplyRequest { objects });
        Ok(svc.apply(req).await?.into_inner())
    }

    /// The ClusterIP and first NodePort of the stored Service.
    fn allocations(o: &api::Object) -> (String, i32) {
        let spec = stored_service(o).unwrap().spec.unwrap();
        let port = spec.ports.unwrap()[0].node_port.unwrap();
        (spec.cluster_ip.unwrap(), port)
    }

    async fn names(svc: &ControlService<RedbStore>, kind: Kind) -> Vec<String> {
        let req = as_operator(api::ListRequest {
            kind: kind as i32,
            namespace: String::new(),
        });
        let resp = svc.list(req).await.unwrap().into_inner();
        let refs = resp.objects.iter().filter_map(model::object_ref);
        refs.map(|r| format!("{}/{}", r.namespace, r.name))
            .collect()
    }

    #[test]
    fn store_errors_become_statuses_that_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        let Err(e) = RedbStore::open(&file.join("sub")) else {
            panic!("a store under a regular file opened");
        };
        let status = Status::from(e);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status
                .message()
                .starts_with("store: embedded store: cannot create ")
        );
        assert!(status.message().contains("--data-dir"), "{status:?}");
        let source = std::error::Error::source(&status).expect("the store error is kept");
        assert!(source.downcast_ref::<StoreError>().is_some(), "{source:?}");

        let status = Status::from(StoreError::Corrupt("truncated log entry"));
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().contains("retrying will not help"));
    }

    #[tokio::test]
    async fn registering_is_idempotent_and_a_removed_node_frees_its_cidr() {
        let f = fixture();
        assert_eq!(register(&f.svc, "a").await.unwrap(), "10.244.1.0/24");
        assert_eq!(register(&f.svc, "a").await.unwrap(), "10.244.1.0/24");
        assert_eq!(register(&f.svc, "b").await.unwrap(), "10.244.2.0/24");
        assert_eq!(register(&f.svc, "c").await.unwrap(), "10.244.3.0/24");
        let err = register(&f.svc, "d").await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(names(&f.svc, Kind::Node).await.len() == 3);

        let req = as_operator(api::RemoveNodeRequest { name: "b".into() });
        assert!(f.svc.remove_node(req).await.unwrap().into_inner().existed);
        assert_eq!(register(&f.svc, "d").await.unwrap(), "10.244.2.0/24");
    }

    #[tokio::test]
    async fn a_node_reports_pods_only_in_its_cidr_and_never_takes_another_nodes_pod() {
        let f = fixture();
        register(&f.svc, "a").await.unwrap();
        register(&f.svc, "b").await.unwrap();
        let pod = |node: &str, ip: &str| api::ReportPodRequest {
            pod: Some(api::Pod {
                namespace: "default".into(),
                name: "p".into(),
                node: node.into(),
                ip: ip.into(),
                ..Default::default()
            }),
        };
        let outside = f.svc.report_pod(as_node("a", pod("a", "10.244.2.5"))).await;
        assert_eq!(outside.unwrap_err().code(), Code::PermissionDenied);
        f.svc
            .report_pod(as_node("a", pod("a", "10.244.1.5")))
            .await
            .unwrap();
        let stolen = f.svc.report_pod(as_node("b", pod("b", "10.244.2.5"))).await;
        let err = stolen.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("belongs to node \"a\""), "{err:?}");
    }

    #[tokio::test]
    async fn reapplying_a_service_keeps_its_allocations_and_deleting_frees_them() {
        let f = fixture();
        let first = apply(&f.svc, vec![service("default", "web", None)])
            .await
            .unwrap();
        let web = allocations(&first.objects[0]);
        assert_eq!(web, ("10.96.0.1".into(), 30000));
        let again = apply(&f.svc, vec![service("default", "web", None)])
            .await
            .unwrap();
        assert_eq!(allocations(&again.objects[0]), web);
        assert!(again.revision > first.revision);

        // Another Service asking for web's address is refused, and nothing of it is written.
        let err = apply(
            &f.svc,
            vec![namespace("shop"), service("shop", "db", Some("10.96.0.1"))],
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists);
        assert_eq!(
            err.message(),
            "spec.clusterIP: 10.96.0.1 is allocated to Service default/web"
        );
        assert!(names(&f.svc, Kind::Namespace).await.is_empty());

        let req = as_operator(api::DeleteRequest {
            refs: vec![ObjectRef {
                kind: Kind::Service as i32,
                namespace: "default".into(),
                name: "web".into(),
            }],
        });
        assert_eq!(f.svc.delete(req).await.unwrap().into_inner().deleted, 1);
        let db = apply(&f.svc, vec![service("shop", "db", None)])
            .await
            .unwrap();
        assert_eq!(allocations(&db.objects[0]), web, "freed, then reused");
    }

    #[tokio::test]
    async fn an_apply_is_refused_whole_when_one_object_is_bad() {
        let f = fixture();
        let twice = apply(
            &f.svc,
            vec![
                namespace("shop"),
                service("default", "web", None),
                namespace("shop"),
            ],
        )
        .await
        .unwrap_err();
        assert_eq!(twice.code(), Code::InvalidArgument);
        assert_eq!(twice.message(), "object 2: Namespace shop appears twice");
        let node = api::Object {
            body: Some(Body::Node(api::Node::default())),
            revision: 0,
        };
        let err = apply(&f.svc, vec![namespace("shop"), node])
            .await
            .unwrap_err();
        assert_eq!(
            err.message(),
            "object 1: nodes join with RegisterNode, not Apply"
        );
        assert!(names(&f.svc, Kind::Unspecified).await.is_empty());
    }

    #[tokio::test]
    async fn deleting_a_namespace_leaves_pods_that_still_run() {
        let f = fixture();
        register(&f.svc, "a").await.unwrap();
        apply(
            &f.svc,
            vec![namespace("shop"), service("shop", "web", None)],
        )
        .await
        .unwrap();
        let running = api::Pod {
            namespace: "shop".into(),
            name: "running".into(),
            node: "a".into(),
            ip: "10.244.1.7".into(),
            ..Default::default()
        };
        let req = api::ReportPodRequest { pod: Some(running) };
        f.svc.report_pod(as_node("a", req)).await.unwrap();
        let labels_only = api::Pod {
            namespace: "shop".into(),
            name: "planned".into(),
            ..Default::default()
        };
        let planned = api::Object {
            body: Some(Body::Pod(labels_only)),
            revision: 0,
        };
        apply(&f.svc, vec![planned]).await.unwrap();

        let req = as_operator(api::DeleteRequest {
            refs: vec![ObjectRef {
                kind: Kind::Namespace as i32,
                namespace: String::new(),
                name: "shop".into(),
            }],
        });
        assert_eq!(f.svc.delete(req).await.unwrap().into_inner().deleted, 1);
        assert_eq!(names(&f.svc, Kind::Pod).await, vec!["shop/running"]);
        assert!(names(&f.svc, Kind::Service).await.is_empty());
        // The Service's claims went with it: a new Service gets the same address.
        let again = apply(&f.svc, vec![service("default", "web", None)])
            .await
            .unwrap();
        assert_eq!(allocations(&again.objects[0]).0, "10.96.0.1");
    }
}
