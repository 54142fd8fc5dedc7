//! The client library the agent (and `sluicectl`) use to talk to `sluice-control`.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use sluice_control::client::{ClientConfig, ControlClient, watch_cluster};
//! let cfg = ClientConfig::new("https://10.0.0.1:7443")
//!     .with_token("node-a-token-0123456789")
//!     .with_ca_pem(std::fs::read("/etc/sluice/ca.pem")?);
//! let client = ControlClient::connect(&cfg).await?;
//! let me = client.register_node("node-a", "192.168.1.10".parse()?, [2, 0, 0, 0, 0, 1]).await?;
//! println!("pod CIDR {}", me.pod_cidr);
//! let mut cluster = watch_cluster(cfg, Some("node-a".into()));
//! loop {
//!     cluster.changed().await?;
//!     let state = cluster.state();
//!     println!("revision {}: {} services", state.revision, state.services.len());
//! }
//! # }
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::api::{self, Kind, ObjectRef, control_client, object::Body};
use crate::model::K8sObject;

/// Where the control plane is and how to prove who we are.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `https://host:port`, or `http://127.0.0.1:port` for a plaintext development server.
    pub endpoint: String,
    /// Bearer token (`control/README.md`, "Auth").
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate; `None` uses no TLS roots, so
    /// `https` endpoints need it.
    pub ca_pem: Option<Vec<u8>>,
    /// Server name to verify in its certificate (default: the endpoint's host).
    pub tls_domain: Option<String>,
    pub connect_timeout: Duration,
}

impl ClientConfig {
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            token: None,
            ca_pem: None,
            tls_domain: None,
            connect_timeout: Duration::from_secs(5),
        }
    }
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }
    pub fn with_ca_pem(mut self, pem: Vec<u8>) -> Self {
        self.ca_pem = Some(pem);
        self
    }
    pub fn with_tls_domain(mut self, domain: impl Into<String>) -> Self {
        self.tls_domain = Some(domain.into());
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint {endpoint:?}: {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{0}")]
    Rpc(#[from] Status),
    #[error("the token is not valid in a header")]
    BadToken,
}

/// A connected client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ControlClient {
    inner: control_client::ControlClient<Channel>,
    auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

fn endpoint(cfg: &ClientConfig) -> Result<Endpoint, ClientError> {
    let e = |source| ClientError::Endpoint {
        endpoint: cfg.endpoint.clone(),
        source,
    };
    // HTTP/2 pings notice a silently dead server or path (no RST) within about 15 s.
    let mut ep = Endpoint::from_shared(cfg.endpoint.clone())
        .map_err(e)?
        .connect_timeout(cfg.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if cfg.endpoint.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &cfg.ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some(d) = &cfg.tls_domain {
            tls = tls.domain_name(d.clone());
        }
        ep = ep.tls_config(tls).map_err(e)?;
    }
    Ok(ep)
}

impl ControlClient {
    /// Connect now (fails if the server is unreachable).
    pub async fn connect(cfg: &ClientConfig) -> Result<Self, ClientError> {
        let ep = endpoint(cfg)?;
        let channel = ep.connect().await.map_err(|source| ClientError::Connect {
            endpoint: cfg.endpoint.clone(),
            source,
        })?;
        Self::with_channel(channel, cfg)
    }

    /// Use an existing channel.
    pub fn with_channel(channel: Channel, cfg: &ClientConfig) -> Result<Self, ClientError> {
        let auth = match &cfg.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::BadToken)?,
            ),
            None => None,
        };
        Ok(Self {
            inner: control_client::ControlClient::new(channel).max_decoding_message_size(256 << 20),
            auth,
        })
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(a) = &self.auth {
            r.metadata_mut().insert("authorization", a.clone());
        }
        r
    }

    /// The raw generated client, for RPCs without a wrapper here.
    pub fn raw(&self) -> control_client::ControlClient<Channel> {
        self.inner.clone()
    }

    /// Register this node (idempotent); the answer carries its leased pod CIDR.
    pub async fn register_node(
        &self,
        name: &str,
        underlay_ip: Ipv4Addr,
        vtep_mac: [u8; 6],
    ) -> Result<api::Node, ClientError> {
        let node = api::Node {
            name: name.to_string(),
            underlay_ip: underlay_ip.to_string(),
            vtep_mac: vtep_mac.to_vec(),
            pod_cidr: String::new(),
        };
        let resp = self
            .inner
            .clone()
            .register_node(self.req(api::RegisterNodeRequest { node: Some(node) }))
            .await?;
        resp.into_inner()
            .node
            .ok_or_else(|| ClientError::Rpc(Status::internal("server answered without a node")))
    }

    /// Report a pod wired on this node (CNI ADD). Returns the revision.
    pub async fn report_pod(&self, pod: api::Pod) -> Result<u64, ClientError> {
        Ok(self
            .inner
            .clone()
            .report_pod(self.req(api::ReportPodRequest { pod: Some(pod) }))
            .await?
            .into_inner()
            .revision)
    }

    /// Report a pod gone (CNI DEL). Returns whether the server knew it.
    pub async fn remove_pod(
        &self,
        node: &str,
        namespace: &str,
        name: &str,
    ) -> Result<bool, ClientError> {
        let r = api::RemovePodRequest {
            node: node.into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        Ok(self
            .inner
            .clone()
            .remove_pod(self.req(r))
            .await?
            .into_inner()
            .existed)
    }

    /// Tell the control plane which revision this node's data path runs.
    pub async fn report_sync(&self, node: &str, revision: u64) -> Result<(), ClientError> {
        self.inner
            .clone()
            .report_sync(self.req(api::ReportSyncRequest {
                node: node.into(),
                revision,
            }))
            .await?;
        Ok(())
    }

    /// Operator: create or replace objects in one transaction.
    pub async fn apply(
        &self,
        objects: Vec<api::Object>,
    ) -> Result<api::ApplyResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .apply(self.req(api::ApplyRequest { objects }))
            .await?
            .into_inner())
    }

    /// Operator: apply Kubernetes objects.
    pub async fn apply_k8s(
        &self,
        objects: &[K8sObject],
    ) -> Result<api::ApplyResponse, ClientError> {
        let objects = objects
            .iter()
            .map(|o| api::Object {
                body: Some(Body::K8s(o.to_proto())),
                revision: 0,
            })
            .collect();
        self.apply(objects).await
    }

    /// Operator: delete objects; returns how many existed.
    pub async fn delete(&self, refs: Vec<ObjectRef>) -> Result<u32, ClientError> {
        Ok(self
            .inner
            .clone()
            .delete(self.req(api::DeleteRequest { refs }))
            .await?
            .into_inner()
            .deleted)
    }

    /// Operator: remove a node, its pods and its pod CIDR lease.
    pub async fn remove_node(&self, name: &str) -> Result<bool, ClientError> {
        Ok(self
            .inner
            .clone()
            .remove_node(self.req(api::RemoveNodeRequest { name: name.into() }))
            .await?
            .into_inner()
            .existed)
    }

    /// Objects of one kind (`Kind::Unspecified`: all), in one namespace (empty: all).
    pub async fn list(
        &self,
        kind: Kind,
        namespace: &str,
    ) -> Result<api::ListResponse, ClientError> {
        let r = api::ListRequest {
            kind: kind as i32,
            namespace: namespace.into(),
        };
        Ok(self.inner.clone().list(self.req(r)).await?.into_inner())
    }

    pub async fn status(&self) -> Result<api::StatusResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .status(self.req(api::StatusRequest {}))
            .await?
            .into_inner())
    }

    /// The raw watch stream from `from_revision`.
    pub async fn watch(
        &self,
        from_revision: u64,
        node: &str,
    ) -> Result<tonic::Streaming<api::WatchResponse>, ClientError> {
        let r = api::WatchRequest {
            from_revision,
            node: node.into(),
        };
        Ok(self.inner.clone().watch(self.req(r)).await?.into_inner())
    }

    /// Flow events of the cluster (every node, or `req.node`): the history, then with
    /// `req.follow` live events.
    pub async fn observe(
        &self,
        req: crate::agent_api::ObserveRequest,
    ) -> Result<tonic::Streaming<crate::agent_api::FlowEvent>, ClientError> {
        Ok(self
            .inner
            .clone()
            .observe(self.req(req))
            .await?
            .into_inner())
    }

    /// Push this node's flow events for as long as `batches` yields; returns the events the
    /// server took when `batches` ends.
    pub async fn push_flow_events(
        &self,
        batches: impl futures::Stream<Item = api::PushFlowEventsRequest> + Send + 'static,
    ) -> Result<u64, ClientError> {
        Ok(self
            .inner
            .clone()
            .push_flow_events(self.req(batches))
            .await?
            .into_inner()
            .received)
    }
}

/// `(namespace, name)`.
pub type NamespacedName = (String, String);

/// Everything an agent needs, as of `revision`.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub revision: u64,
    /// By node name; each with its pod CIDR, underlay address and VTEP MAC.
    pub nodes: BTreeMap<String, api::Node>,
    pub pods: BTreeMap<NamespacedName, api::Pod>,
    pub namespaces: BTreeMap<String, Namespace>,
    pub services: BTreeMap<NamespacedName, Service>,
    pub endpoint_slices: BTreeMap<NamespacedName, EndpointSlice>,
    pub network_policies: BTreeMap<NamespacedName, NetworkPolicy>,
    /// Snapshots received (1 after the first sync; more after resyncs).
    pub snapshots: u64,
}

impl ClusterState {
    /// The EndpointSlices of Service `namespace/name` (by the `kubernetes.io/service-name` label).
    pub fn endpoint_slices_of<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.endpoint_slices
            .iter()
            .filter(move |((ns, _), s)| {
                ns == namespace
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        .is_some_and(|n| n == name)
            })
            .map(|(_, s)| s)
    }

    /// The node whose pod CIDR holds `ip`.
    pub fn node_of_ip(&self, ip: Ipv4Addr) -> Option<&api::Node> {
        self.nodes.values().find(|n| {
            n.pod_cidr
                .parse::<ipnet::Ipv4Net>()
                .is_ok_and(|c| c.contains(&ip))
        })
    }

    fn put(&mut self, o: api::Object) {
        match o.body {
            Some(Body::Node(n)) => {
                self.nodes.insert(n.name.clone(), n);
            }
            Some(Body::Pod(p)) => {
                self.pods.insert((p.namespace.clone(), p.name.clone()), p);
            }
            Some(Body::K8s(k)) => {
                let key = (k.namespace.clone(), k.name.clone());
                match K8sObject::from_json(k.kind(), &k.json) {
                    Ok(K8sObject::Namespace(n)) => {
                        self.namespaces.insert(k.name, n);
                    }
                    Ok(K8sObject::Service(s)) => {
                        self.services.insert(key, s);
                    }
                    Ok(K8sObject::EndpointSlice(s)) => {
                        self.endpoint_slices.insert(key, s);
                    }
                    Ok(K8sObject::NetworkPolicy(p)) => {
                        self.network_policies.insert(key, p);
                    }
                    Ok(K8sObject::Pod(_)) | Err(_) => {
                        tracing::warn!(kind = ?k.kind(), ns = %k.namespace, name = %k.name, "ignoring an object this client cannot read");
                    }
                }
            }
            None => {}
        }
    }

    fn remove(&mut self, r: &ObjectRef) {
        let key = (r.namespace.clone(), r.name.clone());
        match r.kind() {
            Kind::Node => {
                self.nodes.remove(&r.name);
            }
            Kind::Namespace => {
                self.namespaces.remove(&r.name);
            }
            Kind::Pod => {
                self.pods.remove(&key);
            }
            Kind::Service => {
                self.services.remove(&key);
            }
            Kind::EndpointSlice => {
                self.endpoint_slices.remove(&key);
            }
            Kind::NetworkPolicy => {
                self.network_policies.remove(&key);
            }
            Kind::Unspecified => {}
        }
    }

    /// Apply one watch message.
    pub fn apply(&mut self, msg: api::WatchResponse) {
        use api::watch_response::Body as W;
        match msg.body {
            Some(W::Snapshot(s)) => {
                let snapshots = self.snapshots + 1;
                *self = ClusterState {
                    revision: s.revision,
                    snapshots,
                    ..Default::default()
                };
                for o in s.objects {
                    self.put(o);
                }
            }
            Some(W::Changes(c)) => {
                for ev in c.events {
                    match (ev.r#type(), ev.object, ev.r#ref) {
                        (api::EventType::Put, Some(o), _) => self.put(o),
                        (api::EventType::Delete, _, Some(r)) => self.remove(&r),
                        _ => {}
                    }
                }
                self.revision = c.revision;
            }
            None => {}
        }
    }

    /// Number of objects held.
    pub fn len(&self) -> usize {
        self.nodes.len()
            + self.pods.len()
            + self.namespaces.len()
            + self.services.len()
            + self.endpoint_slices.len()
            + self.network_policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A running watch loop; dropping it stops the loop.
#[derive(Debug)]
pub struct ClusterWatch {
    rx: watch::Receiver<ClusterState>,
    connected: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl ClusterWatch {
    /// The state now. Holds a read lock: drop the guard soon.
    pub fn state(&self) -> watch::Ref<'_, ClusterState> {
        self.rx.borrow()
    }

    /// Wait until the state changes.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.rx.changed().await
    }

    /// A receiver of the state, for other tasks.
    pub fn subscribe(&self) -> watch::Receiver<ClusterState> {
        self.rx.clone()
    }

    /// Whether the watch stream is up now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Wait until `pred` holds for the state.
    pub async fn wait_for(
        &mut self,
        pred: impl FnMut(&ClusterState) -> bool,
    ) -> Result<(), watch::error::RecvError> {
        self.rx.wait_for(pred).await.map(|_| ())
    }
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Backoff between reconnects: 100 ms doubling to 5 s, reset after a successful stream.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Keep a [`ClusterState`] in sync with the control plane: watch from the revision held,
/// apply snapshots and changes, and on any error reconnect with backoff and resume.
pub fn watch_cluster(cfg: ClientConfig, node: Option<String>) -> ClusterWatch {
    let (tx, rx) = watch::channel(ClusterState::default());
    let (ctx, connected) = watch::channel(false);
    let task = tokio::spawn(async move {
        let node = node.unwrap_or_default();
        let mut backoff = BACKOFF_MIN;
        let ep = match endpoint(&cfg) {
            Ok(ep) => ep,
            Err(e) => {
                tracing::error!("control plane watch cannot start: {e}");
                return;
            }
        };
        loop {
            let from = tx.borrow().revision;
            let result = async {
                let channel = ep.connect().await.map_err(|source| ClientError::Connect {
                    endpoint: cfg.endpoint.clone(),
                    source,
                })?;
                let client = ControlClient::with_channel(channel, &cfg)?;
                let mut stream = client.watch(from, &node).await?;
                let _ = ctx.send(true);
                while let Some(msg) = stream.message().await? {
                    backoff = BACKOFF_MIN;
                    tx.send_modify(|s| s.apply(msg));
                }
                Ok::<(), ClientError>(())
            }
            .await;
            let _ = ctx.send(false);
            match result {
                Ok(()) => tracing::info!("control plane closed the watch; reconnecting"),
                Err(e) => tracing::warn!("control plane watch: {e}; retrying in {backoff:?}"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    });
    ClusterWatch {
        rx,
        connected,
        task,
    }
}

/// Describe an object's identity for people ("Service default/web").
pub use crate::model::describe;
