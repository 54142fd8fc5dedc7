//! Following a Kubernetes API server: the objects the agents need come from it instead of
//! `sluicectl apply` (`sluice-control --kubeconfig PATH`, or `--kubernetes` in a pod).
//!
//! [`KubeSource`] runs one kube-runtime watcher per kind (Namespaces, Nodes, Pods, Services,
//! EndpointSlices, NetworkPolicies; list with `continue` pages at the most recent
//! resourceVersion, then watch with bookmarks) and writes what they say into the store the agents
//! already watch, as [`translate`] turns each object into a stored one. Agents do not change.
//!
//! What it guarantees:
//! - **Resyncs leave no ghosts.** A watcher relists when its watch fails with `410 Gone`, when a
//!   list is cut short, after the API server was away; the objects of one relist are buffered
//!   until its last page (`InitDone`), then the store is made equal to them for that kind: what
//!   the API server no longer has is deleted (objects deleted while disconnected, or while
//!   sluice-control was down), what changed is written, what did not is left alone (no new
//!   revision).
//! - **Batched writes.** Events that arrived together are written in one transaction per 100
//!   keys (etcd's limit on operations per transaction is 128), compared at the revision read, so
//!   agents see a few revisions, not one per object; a write that loses to another writer is read
//!   and planned again.
//! - **Who says what of a pod** ([`translate::pod_record`]): labels and named ports are the API
//!   server's; node, IP and container are what the node's agent reported (CNI ADD) when the node
//!   runs a Sluice agent, the API server's otherwise. A pod the API server deleted goes when its
//!   agent no longer reports it; one its agent removes (CNI DEL) keeps its labels while the API
//!   server still has it.
//! - **Nodes.** A registering agent's pod CIDR is the Node's `spec.podCIDR` when the cluster
//!   allocates them (else a lease, as in standalone mode); registration waits until Nodes were
//!   listed once (`UNAVAILABLE` until then: the agent retries). Nodes the API server no longer
//!   has are removed with their pods. Each registered node's VTEP MAC and underlay address are
//!   written back as Flannel's annotations (a JSON merge patch of `metadata.annotations`, the only
//!   write to the API server), again whenever the Node shows others.
//! - **Operators** cannot `Apply`/`Delete` the kinds followed (`FAILED_PRECONDITION`): the next
//!   resync would undo it.
//!
//! What it must not do: block the gRPC service (it runs as its own task and only shares
//! [`KubeLink`] with it), or keep whole API objects (only their translations: a Pod becomes
//! its labels, ports, node and IP).

pub mod translate;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream, StreamExt};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event, ListSemantic};
use tokio::sync::mpsc;

use super::plan::Plan;
use super::service::ControlService;
use crate::api::{self, Kind, ObjectRef, object::Body};
use crate::model;
use crate::store::{KeyValue, Store};
use translate::{NodeFacts, PodFacts};

/// Keys written per transaction.
const KEYS_PER_TXN: usize = 100;
/// Events taken before writing, at most.
const EVENTS_PER_FLUSH: usize = 5000;
/// How often failed writes and annotation patches are retried.
const RETRY: Duration = Duration::from_secs(1);

/// What the gRPC service and the source share.
#[derive(Debug)]
pub struct KubeLink {
    nodes: RwLock<HashMap<String, NodeFacts>>,
    nodes_listed: AtomicBool,
    /// Pods the API server has, as (namespace, name).
    pods: RwLock<HashSet<(String, String)>>,
    /// Nodes that registered: their annotations are to be written.
    registered: mpsc::UnboundedSender<String>,
    progress: Mutex<Progress>,
}

/// How far the source got, for logs and tests.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Kinds listed at least once.
    pub listed: BTreeSet<&'static str>,
    /// From the source's start to the first time every kind was listed and written.
    pub first_sync: Option<Duration>,
    /// Lists started per kind (the first one and every relist).
    pub lists: BTreeMap<&'static str, u64>,
    /// Store transactions committed and keys written.
    pub commits: u64,
    pub keys_written: u64,
}

impl KubeLink {
    /// Whether Nodes were listed; until then registration waits.
    pub fn nodes_listed(&self) -> bool {
        self.nodes_listed.load(Ordering::Acquire)
    }

    /// The pod CIDR the cluster allocated to node `name` (`spec.podCIDR`).
    pub fn pod_cidr(&self, name: &str) -> Option<Ipv4Net> {
        self.nodes.read().ok()?.get(name)?.pod_cidr
    }

    /// Whether the API server has pod `namespace/name`.
    pub fn has_pod(&self, namespace: &str, name: &str) -> bool {
        self.pods
            .read()
            .is_ok_and(|p| p.contains(&(namespace.to_string(), name.to_string())))
    }

    /// Node `name` registered: write its annotations.
    pub fn node_registered(&self, name: &str) {
        let _ = self.registered.send(name.to_string());
    }

    pub fn progress(&self) -> Progress {
        self.progress.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

/// The resources the source reads, as RBAC names them: (API group, resource). The manifest's
/// ClusterRole grants get/list/watch on exactly these, and patch on nodes (the annotations).
pub fn followed_resources() -> [(&'static str, &'static str); 6] {
    fn r<K: k8s_openapi::Resource>() -> (&'static str, &'static str) {
        (K::GROUP, K::URL_PATH_SEGMENT)
    }
    [
        r::<Namespace>(),
        r::<Node>(),
        r::<Pod>(),
        r::<Service>(),
        r::<EndpointSlice>(),
        r::<NetworkPolicy>(),
    ]
}

/// The kinds followed, as the API server names them.
const FOLLOWED: [&str; 6] = [
    "Namespace",
    "Node",
    "Pod",
    "Service",
    "EndpointSlice",
    "NetworkPolicy",
];

/// One object from a watcher, translated where it arrives (whole API objects are not kept).
#[derive(Debug)]
enum Item {
    /// Store key and what to store (`None`: the API server has it, Sluice does not store it).
    Object(Kind, String, Option<api::Object>),
    Pod(String, Option<PodFacts>),
    Node(String, NodeFacts),
}

impl Item {
    fn kind(&self) -> Kind {
        match self {
            Item::Object(k, ..) => *k,
            Item::Pod(..) => Kind::Pod,
            Item::Node(..) => Kind::Node,
        }
    }

    fn key(&self) -> &str {
        match self {
            Item::Object(_, k, _) | Item::Pod(k, _) | Item::Node(k, _) => k,
        }
    }
}

/// A watcher's event, translated.
#[derive(Debug)]
enum Change {
    Init(Kind),
    InitItem(Item),
    InitDone(Kind),
    Apply(Item),
    Delete(Kind, String),
    Failed(Kind, String),
}

fn kind_label(kind: Kind) -> &'static str {
    model::kind_name(kind)
}

fn key_of(kind: Kind, namespace: Option<&str>, name: Option<&str>) -> String {
    let namespace = if model::is_namespaced(kind) {
        namespace.unwrap_or(model::DEFAULT_NAMESPACE)
    } else {
        ""
    };
    model::object_key(&ObjectRef {
        kind: kind as i32,
        namespace: namespace.to_string(),
        name: name.unwrap_or_default().to_string(),
    })
}

/// Translation of one API object into an [`Item`].
trait Followed:
    kube::Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + 'static
{
    const KIND: Kind;
    fn item(&self) -> Item;
}

fn meta_key<K: kube::Resource>(kind: Kind, o: &K) -> String {
    let m = o.meta();
    key_of(kind, m.namespace.as_deref(), m.name.as_deref())
}

fn object_item<K: kube::Resource>(
    kind: Kind,
    o: &K,
    translated: Result<api::Object, translate::Skip>,
) -> Item {
    let key = meta_key(kind, o);
    let stored = match translated {
        Ok(s) => Some(s),
        Err(why) => {
            tracing::info!(object = %key, "not stored: {}", why.0);
            None
        }
    };
    Item::Object(kind, key, stored)
}

impl Followed for Namespace {
    const KIND: Kind = Kind::Namespace;
    fn item(&self) -> Item {
        object_item(Self::KIND, self, translate::namespace(self))
    }
}

impl Followed for Service {
    const KIND: Kind = Kind::Service;
    fn item(&self) -> Item {
        object_item(Self::KIND, self, translate::service(self))
    }
}

impl Followed for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
    fn item(&self) -> Item {
        object_item(Self::KIND, self, translate::endpoint_slice(self))
    }
}

impl Followed for NetworkPolicy {
    const KIND: Kind = Kind::NetworkPolicy;
    fn item(&self) -> Item {
        let (o, why) = translate::network_policy(self);
        if let Some(why) = why {
            tracing::warn!(
                policy = %meta_key(Self::KIND, self),
                "stored as deny-all for the pods it selects: {}", why.0
            );
        }
        Item::Object(Self::KIND, meta_key(Self::KIND, self), Some(o))
    }
}

impl Followed for Pod {
    const KIND: Kind = Kind::Pod;
    fn item(&self) -> Item {
        Item::Pod(meta_key(Self::KIND, self), translate::pod(self).ok())
    }
}

impl Followed for Node {
    const KIND: Kind = Kind::Node;
    fn item(&self) -> Item {
        Item::Node(
            self.metadata.name.clone().unwrap_or_default(),
            translate::node(self),
        )
    }
}

/// Watcher retries: 100 ms doubling to 5 s, back to 100 ms after any success.
#[derive(Debug, Clone)]
struct Retry(Duration);

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        Some(d)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
}

type Changes = Pin<Box<dyn Stream<Item = Change> + Send>>;

fn follow<K: Followed>(client: &kube::Client) -> Changes {
    let api: Api<K> = Api::all(client.clone());
    // The most recent list (a quorum read), not "any": a relist must never go back in time.
    let cfg = watcher::Config::default().list_semantic(ListSemantic::MostRecent);
    watcher(api, cfg)
        .backoff(Retry(Duration::from_millis(100)))
        .map(|r| match r {
            Ok(Event::Init) => Change::Init(K::KIND),
            Ok(Event::InitApply(o)) => Change::InitItem(o.item()),
            Ok(Event::InitDone) => Change::InitDone(K::KIND),
            Ok(Event::Apply(o)) => Change::Apply(o.item()),
            Ok(Event::Delete(o)) => Change::Delete(K::KIND, o.item().key().to_string()),
            Err(e) => Change::Failed(K::KIND, e.to_string()),
        })
        .boxed()
}

use kube::runtime::watcher::watcher;

/// What the source holds: the translation of everything the API server has, per kind.
#[derive(Debug, Default)]
struct View {
    /// Namespaces, Services, EndpointSlices, NetworkPolicies: key -> what to store.
    objects: HashMap<Kind, HashMap<String, Option<api::Object>>>,
    pods: HashMap<String, Option<PodFacts>>,
    /// Kinds being relisted, with what the relist gave so far.
    relisting: HashMap<Kind, Vec<Item>>,
    /// Kinds listed at least once.
    listed: HashSet<Kind>,
    /// Keys to make right in the store.
    dirty: BTreeSet<String>,
    /// Kinds whose stored keys must all be checked against the view (after a relist).
    full: BTreeSet<i32>,
    /// Nodes deleted from the API server (removed with their pods).
    nodes_gone: BTreeSet<String>,
    /// Nodes whose annotations to check.
    annotate: BTreeSet<String>,
}

/// The API-server source. [`KubeSource::new`] gives the [`KubeLink`] to hand the service
/// ([`ControlService::following`]); [`KubeSource::run`] follows until the process ends.
pub struct KubeSource {
    client: kube::Client,
    link: Arc<KubeLink>,
    registered: mpsc::UnboundedReceiver<String>,
    view: View,
    started: Instant,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource").finish_non_exhaustive()
    }
}

impl KubeSource {
    pub fn new(client: kube::Client) -> (Self, Arc<KubeLink>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(KubeLink {
            nodes: RwLock::default(),
            nodes_listed: AtomicBool::new(false),
            pods: RwLock::default(),
            registered: tx,
            progress: Mutex::default(),
        });
        let source = Self {
            client,
            link: link.clone(),
            registered: rx,
            view: View::default(),
            started: Instant::now(),
        };
        (source, link)
    }

    /// Follow the API server, writing through `svc`'s store, until the process ends.
    pub async fn run<S: Store>(mut self, svc: ControlService<S>) {
        let c = &self.client;
        let mut changes = futures::stream::select_all([
            follow::<Namespace>(c),
            follow::<Node>(c),
            follow::<Pod>(c),
            follow::<Service>(c),
            follow::<EndpointSlice>(c),
            follow::<NetworkPolicy>(c),
        ]);
        let mut tick = tokio::time::interval(RETRY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                c = changes.next() => {
                    let Some(c) = c else { return };
                    self.take(c);
                    // Take what else is ready, so that it is written together.
                    for _ in 0..EVENTS_PER_FLUSH {
                        match changes.next().now_or_never() {
                            Some(Some(c)) => self.take(c),
                            _ => break,
                        }
                    }
                }
                name = self.registered.recv() => {
                    if let Some(n) = name {
                        self.view.annotate.insert(n);
                    }
                }
                _ = tick.tick() => {}
            }
            if let Err(e) = self.flush(&svc).await {
                tracing::warn!(
                    "writing the API server's objects into the store failed, will retry: {e}"
                );
            }
            self.annotate(&svc).await;
        }
    }

    fn take(&mut self, c: Change) {
        let v = &mut self.view;
        match c {
            Change::Init(kind) => {
                v.relisting.insert(kind, Vec::new());
                if let Ok(mut p) = self.link.progress.lock() {
                    *p.lists.entry(kind_label(kind)).or_default() += 1;
                }
            }
            Change::InitItem(item) => {
                v.relisting.entry(item.kind()).or_default().push(item);
            }
            Change::InitDone(kind) => {
                let items = v.relisting.remove(&kind).unwrap_or_default();
                self.replace(kind, items);
            }
            Change::Apply(item) => self.apply(item),
            Change::Delete(kind, key) => self.delete(kind, key),
            Change::Failed(kind, e) => {
                // 410 Gone and ended watches are routine (the watcher relists or resumes).
                tracing::info!(kind = kind_label(kind), "API server: {e}; retrying");
            }
        }
    }

    /// A relist of `kind` completed with `items`: it replaces what the view held.
    fn replace(&mut self, kind: Kind, items: Vec<Item>) {
        let v = &mut self.view;
        match kind {
            Kind::Pod => v.pods.clear(),
            Kind::Node => {
                let listed: HashSet<String> = items.iter().map(|i| i.key().to_string()).collect();
                let old: Vec<String> = self
                    .link
                    .nodes
                    .read()
                    .map(|n| n.keys().cloned().collect())
                    .unwrap_or_default();
                v.nodes_gone
                    .extend(old.into_iter().filter(|n| !listed.contains(n)));
                if let Ok(mut n) = self.link.nodes.write() {
                    n.clear();
                }
            }
            k => {
                v.objects.entry(k).or_default().clear();
            }
        }
        v.full.insert(kind as i32);
        v.listed.insert(kind);
        for item in items {
            self.apply(item);
        }
        if kind == Kind::Node {
            self.link.nodes_listed.store(true, Ordering::Release);
        }
        if let Ok(mut p) = self.link.progress.lock() {
            p.listed.insert(kind_label(kind));
        }
    }

    fn apply(&mut self, item: Item) {
        let v = &mut self.view;
        match item {
            Item::Object(kind, key, stored) => {
                v.dirty.insert(key.clone());
                v.objects.entry(kind).or_default().insert(key, stored);
            }
            Item::Pod(key, facts) => {
                if let Some(r) = model::parse_object_key(&key)
                    && let Ok(mut pods) = self.link.pods.write()
                {
                    pods.insert((r.namespace, r.name));
                }
                v.dirty.insert(key.clone());
                v.pods.insert(key, facts);
            }
            Item::Node(name, facts) => {
                v.nodes_gone.remove(&name);
                v.annotate.insert(name.clone());
                if let Ok(mut n) = self.link.nodes.write() {
                    n.insert(name, facts);
                }
            }
        }
    }

    fn delete(&mut self, kind: Kind, key: String) {
        let v = &mut self.view;
        match kind {
            Kind::Node => {
                if let Ok(mut n) = self.link.nodes.write() {
                    n.remove(&key);
                }
                v.nodes_gone.insert(key);
            }
            Kind::Pod => {
                if let Some(r) = model::parse_object_key(&key)
                    && let Ok(mut pods) = self.link.pods.write()
                {
                    pods.remove(&(r.namespace, r.name));
                }
                v.pods.remove(&key);
                v.dirty.insert(key);
            }
            k => {
                if let Some(m) = v.objects.get_mut(&k) {
                    m.remove(&key);
                }
                v.dirty.insert(key);
            }
        }
    }

    /// What the store should hold at `key` given what it holds; `None` to delete. `Err(())`:
    /// leave it alone.
    fn desired(
        &self,
        key: &str,
        stored: Option<&api::Object>,
        agent_nodes: &HashSet<String>,
    ) -> Result<Option<api::Object>, ()> {
        let kind = model::parse_object_key(key).ok_or(())?.kind();
        let stored_pod = match stored.and_then(|o| o.body.as_ref()) {
            Some(Body::Pod(p)) => Some(p),
            _ => None,
        };
        Ok(match kind {
            Kind::Pod => match self.view.pods.get(key) {
                Some(Some(facts)) => Some(api::Object {
                    body: Some(Body::Pod(translate::pod_record(
                        facts,
                        stored_pod,
                        agent_nodes.contains(&facts.node),
                    ))),
                    revision: 0,
                }),
                // The agent that reported it removes it (CNI DEL); until then it still runs.
                _ if stored_pod.is_some_and(|p| !p.container_id.is_empty()) => return Err(()),
                _ => None,
            },
            Kind::Node => return Err(()),
            k => self
                .view
                .objects
                .get(&k)
                .and_then(|m| m.get(key))
                .cloned()
                .flatten(),
        })
    }

    /// Write what changed into the store.
    async fn flush<S: Store>(&mut self, svc: &ControlService<S>) -> Result<(), tonic::Status> {
        let store = svc.store();
        for name in std::mem::take(&mut self.view.nodes_gone) {
            let mut done = false;
            for _ in 0..8 {
                let mut plan = Plan::default();
                if !svc.plan_remove_node(&mut plan, &name).await? {
                    done = true;
                    break;
                }
                if store.commit(plan.into_txn()).await?.is_some() {
                    tracing::info!(node = %name, "node removed: the API server no longer has it");
                    done = true;
                    break;
                }
            }
            if !done {
                self.view.nodes_gone.insert(name);
            }
        }
        let full: Vec<Kind> = std::mem::take(&mut self.view.full)
            .into_iter()
            .filter_map(|k| Kind::try_from(k).ok())
            .filter(|k| *k != Kind::Node)
            .collect();
        // Keys of the kinds listed again: every stored one and every one the API server has.
        let mut stored: BTreeMap<String, KeyValue> = BTreeMap::new();
        let mut keys: BTreeSet<String> = std::mem::take(&mut self.view.dirty);
        for &kind in &full {
            let (_, kvs) = store.list(&model::kind_prefix(kind)).await?;
            for kv in kvs {
                keys.insert(kv.key.clone());
                stored.insert(kv.key.clone(), kv);
            }
            match kind {
                Kind::Pod => keys.extend(self.view.pods.keys().cloned()),
                k => keys.extend(
                    self.view
                        .objects
                        .get(&k)
                        .into_iter()
                        .flat_map(|m| m.keys().cloned()),
                ),
            }
        }
        if keys.is_empty() {
            self.note_synced();
            return Ok(());
        }
        let (_, nodes) = store.list(&model::kind_prefix(Kind::Node)).await?;
        let agent_nodes: HashSet<String> = nodes
            .iter()
            .filter_map(|kv| model::parse_object_key(&kv.key).map(|r| r.name))
            .collect();
        let keys: Vec<String> = keys.into_iter().collect();
        let mut retry = Vec::new();
        for chunk in keys.chunks(KEYS_PER_TXN) {
            let mut plan = Plan::default();
            let mut written = 0;
            for key in chunk {
                let listed = model::parse_object_key(key).is_some_and(|r| full.contains(&r.kind()));
                let kv = match stored.get(key) {
                    Some(kv) => Some(kv.clone()),
                    None if listed => None,
                    None => store.get(key).await?,
                };
                let current = kv
                    .as_ref()
                    .and_then(|kv| model::decode_object(&kv.value, 0).ok());
                let Ok(want) = self.desired(key, current.as_ref(), &agent_nodes) else {
                    continue;
                };
                let rev = kv.as_ref().map_or(0, |kv| kv.mod_revision);
                match (want, &current) {
                    (Some(w), Some(c)) if w.body == c.body => {}
                    (Some(w), _) => {
                        plan.compare(key, rev);
                        plan.put(key.clone(), model::encode_object(&w));
                        written += 1;
                    }
                    (None, Some(_)) => {
                        plan.compare(key, rev);
                        plan.delete(key.clone());
                        written += 1;
                    }
                    (None, None) => {}
                }
            }
            if written == 0 {
                continue;
            }
            match store.commit(plan.into_txn()).await? {
                Some(_) => {
                    if let Ok(mut p) = self.link.progress.lock() {
                        p.commits += 1;
                        p.keys_written += written;
                    }
                }
                // Another writer (an agent reporting a pod) got there first: read again.
                None => retry.extend(chunk.iter().cloned()),
            }
        }
        if !retry.is_empty() {
            self.view.dirty.extend(retry);
        }
        self.note_synced();
        Ok(())
    }

    fn note_synced(&mut self) {
        if self.view.listed.len() == FOLLOWED.len()
            && self.view.dirty.is_empty()
            && self.view.full.is_empty()
            && let Ok(mut p) = self.link.progress.lock()
            && p.first_sync.is_none()
        {
            let t = self.started.elapsed();
            p.first_sync = Some(t);
            tracing::info!(
                seconds = t.as_secs_f64(),
                pods = self.view.pods.len(),
                "first sync with the Kubernetes API server done"
            );
        }
    }

    /// Write Flannel's annotations on registered nodes whose Node says otherwise.
    async fn annotate<S: Store>(&mut self, svc: &ControlService<S>) {
        if self.view.annotate.is_empty() || !self.link.nodes_listed() {
            return;
        }
        let api: Api<Node> = Api::all(self.client.clone());
        for name in std::mem::take(&mut self.view.annotate) {
            let facts = self
                .link
                .nodes
                .read()
                .ok()
                .and_then(|n| n.get(&name).cloned());
            let Some(facts) = facts else { continue };
            let key = key_of(Kind::Node, None, Some(&name));
            let record = match svc.store().get(&key).await {
                Ok(Some(kv)) => match model::decode_object(&kv.value, kv.mod_revision) {
                    Ok(api::Object {
                        body: Some(Body::Node(n)),
                        ..
                    }) => n,
                    _ => continue,
                },
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(node = %name, "cannot read the node record: {e}");
                    self.view.annotate.insert(name);
                    continue;
                }
            };
            let want = translate::flannel_annotations(&record);
            if translate::annotations_hold(&facts.flannel, &want) {
                continue;
            }
            let patch = serde_json::json!({"metadata": {"annotations": want}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(n) => {
                    tracing::info!(node = %name, "wrote the VTEP MAC and underlay address as Flannel annotations");
                    if let Ok(mut nodes) = self.link.nodes.write() {
                        nodes.insert(name, translate::node(&n));
                    }
                }
                Err(e) => {
                    tracing::warn!(node = %name, "annotating the Node failed, will retry: {e}");
                    self.view.annotate.insert(name);
                }
            }
        }
    }
}
