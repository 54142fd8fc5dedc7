//! Control-plane mode: the agent follows `sluice-control` (the node config's `control` section).
//!
//! - [`register`] (before the agent starts): RegisterNode with this node's underlay address and
//!   VTEP MAC; the answer's pod CIDR becomes the config's (and is cached in
//!   `<state>/control-lease.json`, so an agent restarted while the control plane is down keeps
//!   serving with its lease).
//! - [`spawn`] (after): a task that watches the cluster (`sluice_control::client::watch_cluster`,
//!   which reconnects with backoff), turns each revision into [`ClusterObjects`] (Services,
//!   EndpointSlices, NetworkPolicies, Namespaces, every pod's labels and ports, and the other nodes
//!   as peers whose underlay next-hop MAC is resolved through the kernel), republishes the tables
//!   and reports the revision with `ReportSync`; and that keeps the control plane's pods of this
//!   node equal to the pod registry (`ReportPod`/`RemovePod`, retried until they hold). It also
//!   runs the flow event relay (`events::relay`, `PushFlowEvents`).
//!
//! The node config's section (`pod_cidr` and `peers` may then be left out; configured peers and
//! `underlay.next_hops` still win):
//!
//! ```yaml
//! control:
//!   endpoint: https://192.168.77.254:7443   # sluice-control's TLS endpoint
//!   ca_file: /etc/sluice/ca.pem             # CA that signed the server certificate
//!   token_file: /etc/sluice/n1.token        # this node's bearer token
//!   tls_domain: sluice-control              # optional: name to verify in the certificate
//! ```
//!
//! Nothing here is on the data path's way: AddPod/DelPod only poke the task, and when the control
//! plane is unreachable the agent keeps the tables it has (its Status message says so).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use netlink_packet_route::route::{RouteAddress, RouteAttribute};
use sluice_control::api;
use sluice_control::client::{ClientConfig, ClusterState, ControlClient, watch_cluster};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::Agent;
use super::config::{ControlConfig, Mac, NodeConfig, PeerNode, UNLEASED_POD_CIDR};
use super::manifests::ClusterObjects;
use sluice_dataplane::policy::{ContainerPort, PodInfo, Protocol};

/// Control-plane mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the config's pod_cidr {config} differs from the control plane's lease {leased}")]
    LeaseMismatch { config: Ipv4Net, leased: Ipv4Net },
    #[error("the control plane leased {0:?}, which is not an IPv4 CIDR")]
    BadLease(String),
}

/// The agent's control-plane state (empty in standalone mode).
#[derive(Debug, Default)]
pub struct ControlSlot {
    /// Objects of the last revision applied (`None`: standalone, or nothing received yet).
    objects: RwLock<Option<Arc<ClusterObjects>>>,
    /// Poked on every registry change.
    pods: Notify,
    /// Why the agent is not in sync with the control plane (`None`: synced or standalone).
    note: Mutex<Option<String>>,
    /// A revision received from the control plane has been applied (not only restored ones).
    live: AtomicBool,
    /// What `objects` held at start-up (see [`restore`]), for the Status message.
    restored: Mutex<Option<String>>,
}

fn key(m: &ObjectMeta) -> (Option<&str>, Option<&str>) {
    (m.namespace.as_deref(), m.name.as_deref())
}

fn merge<T: Clone>(base: &mut Vec<T>, over: &[T], meta: impl Fn(&T) -> &ObjectMeta) {
    base.retain(|b| !over.iter().any(|o| key(meta(o)) == key(meta(b))));
    base.extend(over.iter().cloned());
}

impl ControlSlot {
    /// The manifests' objects with the control plane's on top (same namespace/name: the control
    /// plane's wins).
    pub fn merged(&self, manifests: Arc<ClusterObjects>) -> Arc<ClusterObjects> {
        let Some(c) = self.objects.read().ok().and_then(|o| o.clone()) else {
            return manifests;
        };
        let mut m = (*manifests).clone();
        merge(&mut m.services, &c.services, |o| &o.metadata);
        merge(&mut m.endpoint_slices, &c.endpoint_slices, |o| &o.metadata);
        merge(&mut m.network_policies, &c.network_policies, |o| {
            &o.metadata
        });
        merge(&mut m.namespaces, &c.namespaces, |o| &o.metadata);
        m.peers.clone_from(&c.peers);
        m.pods.clone_from(&c.pods);
        Arc::new(m)
    }

    /// Add "namespace/name" of the control plane's pods (every node's) to `names`, keeping the
    /// entries it holds.
    pub fn pod_names(&self, names: &mut HashMap<Ipv4Addr, String>) {
        let Some(c) = self.objects.read().ok().and_then(|o| o.clone()) else {
            return;
        };
        for p in &c.pods {
            names
                .entry(p.ip)
                .or_insert_with(|| format!("{}/{}", p.namespace, p.name));
        }
    }

    /// Whether a revision received from the control plane has been applied (its peers are then
    /// the whole list); objects restored at start-up do not count.
    pub fn has_revision(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Serve `objects` until the first revision arrives (see [`restore`]).
    pub fn restore(&self, objects: ClusterObjects, what: String) {
        if let Ok(mut o) = self.objects.write() {
            *o = Some(Arc::new(objects));
        }
        if let Ok(mut r) = self.restored.lock() {
            *r = Some(what);
        }
    }

    /// The pod registry changed: report it.
    pub fn pods_changed(&self) {
        self.pods.notify_one();
    }

    fn set_note(&self, note: Option<String>) {
        if let Ok(mut n) = self.note.lock()
            && *n != note
        {
            if let Some(why) = &note {
                tracing::info!("control plane: {why}");
            }
            *n = note;
        }
    }
}

impl Agent {
    /// Why the agent is not in sync with the control plane, for its Status message.
    pub fn control_note(&self) -> Option<String> {
        self.control.note.lock().ok().and_then(|n| n.clone())
    }
}

/// The client config from the node config's `control` section.
pub fn client_config(c: &ControlConfig) -> Result<ClientConfig, ControlError> {
    let read = |what, path: &PathBuf| {
        std::fs::read(path).map_err(|source| ControlError::Read {
            what,
            path: path.clone(),
            source,
        })
    };
    let mut cfg = ClientConfig::new(c.endpoint.clone());
    if let Some(p) = &c.token_file {
        let t = read("token file", p)?;
        cfg = cfg.with_token(String::from_utf8_lossy(&t).trim().to_owned());
    }
    if let Some(p) = &c.ca_file {
        cfg = cfg.with_ca_pem(read("CA file", p)?);
    }
    if let Some(d) = &c.tls_domain {
        cfg = cfg.with_tls_domain(d.clone());
    }
    Ok(cfg)
}

fn objects_path(config: &NodeConfig) -> PathBuf {
    config.paths.state_dir.join("control-objects.json")
}

/// The control plane's objects of one applied revision, as kept in the state directory (written
/// from a borrow, read into an owned value).
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved<O> {
    node: String,
    revision: u64,
    objects: O,
}

/// Write `bytes` to `path` through a temporary file and a rename: a kill leaves the old file or
/// the new one, never half of one.
fn write_whole(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Keep the objects of an applied revision for the next start.
fn save_objects(config: &NodeConfig, revision: u64, objects: &ClusterObjects) {
    let path = objects_path(config);
    let r = serde_json::to_vec(&Saved {
        node: config.node_name.clone(),
        revision,
        objects,
    })
    .map_err(std::io::Error::other)
    .and_then(|bytes| write_whole(&path, &bytes));
    if let Err(e) = r {
        tracing::warn!("cannot keep revision {revision} in {}: {e}", path.display());
    }
}

/// The name of the NetworkPolicy that isolates every local pod while an agent that lost its saved
/// objects waits for its first revision.
pub const AWAITING_POLICY: &str = "sluice-awaiting-control-plane";

/// What a control-plane agent serves from start-up until its first revision arrives, so that a
/// restart never opens what the control plane's policies close:
/// - the objects of the last revision it applied, saved in `<state>/control-objects.json`
///   (the policies, Services and peers the data path had before the restart);
/// - without them (first start, or the file lost) and with pods in the registry: every local pod
///   isolated for ingress and egress, one deny-all NetworkPolicy per namespace (fail-closed, as
///   when no worker runs); the first revision replaces it.
///
/// Returns `None` in standalone mode and on a first start with no pods.
pub fn restore<'a>(
    config: &NodeConfig,
    pods: impl Iterator<Item = &'a super::registry::PodRecord>,
) -> Option<(ClusterObjects, String)> {
    config.control.as_ref()?;
    let path = objects_path(config);
    match std::fs::read(&path).map(|b| serde_json::from_slice::<Saved<ClusterObjects>>(&b)) {
        Ok(Ok(saved)) if saved.node == config.node_name => {
            let what = format!("revision {} kept before the restart", saved.revision);
            return Some((saved.objects, what));
        }
        Ok(Ok(saved)) => tracing::warn!(
            "{} holds node {}'s objects, not this node's; ignored",
            path.display(),
            saved.node
        ),
        Ok(Err(e)) => tracing::warn!("{} does not parse ({e}); ignored", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot read {}: {e}", path.display()),
    }
    let namespaces: std::collections::BTreeSet<&str> = pods
        .map(super::registry::PodRecord::namespace_or_default)
        .collect();
    if namespaces.is_empty() {
        return None;
    }
    let network_policies = namespaces
        .into_iter()
        .map(|ns| NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(AWAITING_POLICY.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
                ..Default::default()
            }),
        })
        .collect();
    tracing::warn!(
        "no saved control-plane objects: the local pods stay isolated until the first revision"
    );
    Some((
        ClusterObjects {
            network_policies,
            ..Default::default()
        },
        "no objects kept: local pods isolated until the first revision".into(),
    ))
}

fn lease_path(config: &NodeConfig) -> PathBuf {
    config.paths.state_dir.join("control-lease.json")
}

fn cached_lease(config: &NodeConfig) -> Option<Ipv4Net> {
    let bytes = std::fs::read(lease_path(config)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    (v["node"] == config.node_name.as_str())
        .then(|| v["pod_cidr"].as_str()?.parse().ok())
        .flatten()
}

fn save_lease(config: &NodeConfig, cidr: Ipv4Net) {
    let v = serde_json::json!({"node": config.node_name, "pod_cidr": cidr.to_string()});
    let path = lease_path(config);
    let r = std::fs::create_dir_all(&config.paths.state_dir)
        .and_then(|()| write_whole(&path, v.to_string().as_bytes()));
    if let Err(e) = r {
        tracing::warn!("cannot cache the pod CIDR lease in {}: {e}", path.display());
    }
}

/// Register this node and take the leased pod CIDR into `config`. Returns whether the
/// registration went through: when the control plane is unreachable and a pod CIDR is known (the
/// config's or the cached lease) the agent starts with it and [`spawn`]'s task registers later;
/// with none known this waits, retrying, until the control plane answers.
pub async fn register(config: &mut NodeConfig) -> Result<bool, ControlError> {
    let Some(control) = config.control.clone() else {
        return Ok(false);
    };
    let cfg = client_config(&control)?;
    let mut backoff = Duration::from_millis(200);
    loop {
        match try_register(&cfg, config).await {
            Ok(leased) => {
                if config.pod_cidr != UNLEASED_POD_CIDR && config.pod_cidr != leased {
                    return Err(ControlError::LeaseMismatch {
                        config: config.pod_cidr,
                        leased,
                    });
                }
                tracing::info!(pod_cidr = %leased, "registered with the control plane");
                config.pod_cidr = leased;
                save_lease(config, leased);
                return Ok(true);
            }
            Err(e) => {
                if config.pod_cidr == UNLEASED_POD_CIDR
                    && let Some(c) = cached_lease(config)
                {
                    config.pod_cidr = c;
                }
                if config.pod_cidr != UNLEASED_POD_CIDR {
                    tracing::warn!(
                        pod_cidr = %config.pod_cidr,
                        "control plane unreachable ({e}); starting with the pod CIDR known"
                    );
                    return Ok(false);
                }
                tracing::warn!(
                    "cannot register with the control plane ({e}); retrying in {backoff:?}"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn try_register(cfg: &ClientConfig, config: &NodeConfig) -> Result<Ipv4Net, String> {
    let client = ControlClient::connect(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let node = tokio::time::timeout(
        Duration::from_secs(5),
        client.register_node(
            &config.node_name,
            config.underlay.address,
            config.vtep.mac.0,
        ),
    )
    .await
    .map_err(|_| "RegisterNode timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    node.pod_cidr
        .parse()
        .map_err(|_| ControlError::BadLease(node.pod_cidr).to_string())
}

/// What this node last did to one of its pods on the control plane, and the revision after
/// which the watched state must show it.
#[derive(Debug, Clone, PartialEq)]
enum Done {
    Reported { container_id: String, ip: String },
    Removed,
}

/// Start following the control plane (the config has a `control` section). `registered`:
/// what [`register`] returned.
pub fn spawn(agent: Arc<Agent>, registered: bool) -> Option<JoinHandle<()>> {
    let control = agent.config.control.clone()?;
    let cfg = match client_config(&control) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("control plane mode cannot start: {e}");
            return None;
        }
    };
    agent
        .control
        .set_note(Some("not synced with the control plane yet".into()));
    Some(tokio::spawn(run(agent, cfg, registered)))
}

/// Aborts the task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run(agent: Arc<Agent>, cfg: ClientConfig, mut registered: bool) {
    let me = agent.config.node_name.clone();
    let _relay = AbortOnDrop(tokio::spawn(super::events::relay(
        agent.clone(),
        cfg.clone(),
    )));
    let watch = watch_cluster(cfg.clone(), Some(me.clone()));
    let mut rx = watch.subscribe();
    let mut resolver = Resolver::new(&agent.config);
    let mut client: Option<ControlClient> = None;
    let mut applied: Option<(u64, Vec<PeerNode>)> = None;
    let mut programmed: Option<u64> = None; // revision the tables were last built from
    let mut synced: Option<u64> = None; // revision ReportSync last succeeded for
    let mut was_connected = false;
    let mut done: HashMap<(String, String), (Done, u64)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = ClusterState::default();
    loop {
        let mut changed = false;
        tokio::select! {
            r = rx.changed() => match r {
                Ok(()) => changed = true,
                Err(_) => return,
            },
            () = agent.control.pods.notified() => {},
            _ = tick.tick() => {},
        }
        let arrived = std::time::Instant::now();
        // Copy the state only when it changed (it holds every object of the cluster).
        if changed {
            state = rx.borrow_and_update().clone();
        }
        let connected = watch.is_connected();
        if client.is_none() {
            client = ControlClient::connect(&cfg).await.ok();
        }
        if !registered && let Some(c) = &client {
            match c
                .register_node(&me, agent.config.underlay.address, agent.config.vtep.mac.0)
                .await
            {
                Ok(n) if n.pod_cidr == agent.config.pod_cidr.to_string() => registered = true,
                Ok(n) => tracing::error!(
                    "the control plane leased pod CIDR {} but this agent serves {}; restart it",
                    n.pod_cidr,
                    agent.config.pod_cidr
                ),
                Err(e) => tracing::warn!("RegisterNode: {e}"),
            }
        }

        if state.revision > 0 {
            let peers = resolver.peers(&state, &agent.config).await;
            let fresh = applied
                .as_ref()
                .is_none_or(|(rev, p)| *rev != state.revision || *p != peers);
            if fresh {
                let objects = Arc::new(objects_of(&state, peers.clone(), &me));
                let old = agent
                    .control
                    .objects
                    .write()
                    .ok()
                    .map(|mut o| o.replace(objects.clone()));
                match agent.republish().await {
                    Ok(()) => {
                        agent.published_since(arrived);
                        agent.control.live.store(true, Ordering::Release);
                        tracing::debug!(revision = state.revision, "tables published");
                        let (a, rev) = (agent.clone(), state.revision);
                        let _ = tokio::task::spawn_blocking(move || {
                            save_objects(&a.config, rev, &objects);
                        })
                        .await;
                        applied = Some((state.revision, peers));
                        programmed = Some(state.revision);
                    }
                    Err(e) => {
                        tracing::warn!(
                            revision = state.revision,
                            "tables not rebuilt, keeping the current ones: {e}"
                        );
                        if let (Some(old), Ok(mut o)) = (old, agent.control.objects.write()) {
                            *o = old;
                        }
                        // Do not retry this revision until something changes.
                        applied = Some((state.revision, peers));
                    }
                }
            }
            // Report the revision the data path runs (again after a reconnect: a restarted
            // control plane forgets).
            if let (Some(c), Some(rev)) = (&client, programmed)
                && (synced != Some(rev) || (connected && !was_connected))
            {
                match c.report_sync(&me, rev).await {
                    Ok(()) => synced = Some(rev),
                    Err(e) => tracing::debug!("ReportSync: {e}"),
                }
            }
            if let Some(c) = &client {
                sync_pods(&agent, c, &state, &me, &mut done).await;
            }
        }
        was_connected = connected;
        let serving = || {
            programmed.map_or_else(
                || {
                    let restored = agent.control.restored.lock().ok().and_then(|r| r.clone());
                    format!(
                        "the cached lease and pods, {}",
                        restored
                            .as_deref()
                            .unwrap_or("no control-plane objects yet")
                    )
                },
                |r| format!("revision {r}"),
            )
        };
        agent.control.set_note(match (connected, synced) {
            (true, Some(r)) if Some(r) == applied.as_ref().map(|a| a.0) => None,
            (true, Some(_)) if applied.is_some() && programmed != applied.as_ref().map(|a| a.0) => {
                Some("not synced: the control plane's latest objects do not build".into())
            }
            (true, _) => Some(format!(
                "not synced with the control plane yet; serving {}",
                serving()
            )),
            (false, _) => Some(format!(
                "not synced: the control plane at {} is unreachable; serving {}",
                cfg.endpoint,
                serving()
            )),
        });
    }
}

/// The pods of this node's registry as the control plane should hold them.
async fn desired_pods(agent: &Agent, me: &str) -> BTreeMap<(String, String), api::Pod> {
    let registry = agent.registry.lock().await;
    registry
        .pods()
        .map(|p| {
            let ns = p.namespace_or_default().to_owned();
            let name = if p.name.is_empty() {
                p.container_id.clone()
            } else {
                p.name.clone()
            };
            let pod = api::Pod {
                namespace: ns.clone(),
                name: name.clone(),
                node: me.to_owned(),
                ip: p.ip.to_string(),
                labels: p.labels.clone().into_iter().collect(),
                ports: p
                    .ports
                    .iter()
                    .map(|cp| api::ContainerPort {
                        name: cp.name.clone(),
                        port: u32::from(cp.port),
                        protocol: cp.protocol.clone(),
                    })
                    .collect(),
                container_id: p.container_id.clone(),
            };
            ((ns, name), pod)
        })
        .collect()
}

/// Make the control plane's pods of node `me` match the registry: report what it lacks (or holds
/// with another IP or container), remove what the registry no longer has. Labels and ports on the
/// control plane are left alone once reported (a Pod manifest may have changed them). Failures
/// are logged and retried on the next round.
async fn sync_pods(
    agent: &Agent,
    client: &ControlClient,
    state: &ClusterState,
    me: &str,
    done: &mut HashMap<(String, String), (Done, u64)>,
) {
    let desired = desired_pods(agent, me).await;
    let waiting = |done: &HashMap<_, (Done, u64)>, k: &(String, String), d: &Done| {
        done.get(k)
            .is_some_and(|(x, rev)| x == d && *rev > state.revision)
    };
    for (k, pod) in &desired {
        let held = state.pods.get(k);
        if held.is_some_and(|h| {
            h.node == pod.node && h.ip == pod.ip && h.container_id == pod.container_id
        }) {
            done.remove(k);
            continue;
        }
        let d = Done::Reported {
            container_id: pod.container_id.clone(),
            ip: pod.ip.clone(),
        };
        if waiting(done, k, &d) {
            continue;
        }
        match client.report_pod(pod.clone()).await {
            Ok(rev) => {
                done.insert(k.clone(), (d, rev));
            }
            Err(e) => {
                tracing::warn!(pod = %format!("{}/{}", k.0, k.1), "ReportPod failed, will retry: {e}")
            }
        }
    }
    for (k, held) in &state.pods {
        if held.node != me || desired.contains_key(k) {
            continue;
        }
        if waiting(done, k, &Done::Removed) {
            continue;
        }
        match client.remove_pod(me, &k.0, &k.1).await {
            Ok(_) => {
                done.insert(k.clone(), (Done::Removed, state.revision + 1));
            }
            Err(e) => {
                tracing::warn!(pod = %format!("{}/{}", k.0, k.1), "RemovePod failed, will retry: {e}")
            }
        }
    }
    done.retain(|k, _| desired.contains_key(k) || state.pods.contains_key(k));
}

/// The cluster objects of one watched revision, with the peers resolved.
pub fn objects_of(state: &ClusterState, peers: Vec<PeerNode>, me: &str) -> ClusterObjects {
    let pods = state
        .pods
        .values()
        .filter_map(|p| {
            Some(PodInfo {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                labels: p.labels.clone().into_iter().collect(),
                ip: p.ip.parse().ok()?,
                ports: p
                    .ports
                    .iter()
                    .filter_map(|cp| {
                        Some(ContainerPort {
                            name: (!cp.name.is_empty()).then(|| cp.name.clone()),
                            port: u16::try_from(cp.port).ok()?,
                            protocol: Protocol::from_k8s(Some(&cp.protocol))?,
                        })
                    })
                    .collect(),
                local: p.node == me,
            })
        })
        .collect();
    ClusterObjects {
        services: state.services.values().cloned().collect(),
        endpoint_slices: state.endpoint_slices.values().cloned().collect(),
        network_policies: state.network_policies.values().cloned().collect(),
        namespaces: state.namespaces.values().cloned().collect(),
        peers,
        pods,
    }
}

/// A node of the control plane as a peer, without its underlay MAC yet; `None` for this node and
/// for records that do not parse.
fn peer_of(n: &api::Node, me: &str) -> Option<(String, Ipv4Addr, Ipv4Net, Mac)> {
    if n.name == me {
        return None;
    }
    Some((
        n.name.clone(),
        n.underlay_ip.parse().ok()?,
        n.pod_cidr.parse().ok()?,
        Mac::try_from(&n.vtep_mac[..]).ok()?,
    ))
}

/// Resolves peers' underlay next-hop MACs through the kernel (route lookup, then the neighbor
/// table; a UDP datagram to the peer's discard port makes the kernel resolve a missing entry).
/// Resolved MACs are cached and looked up again every [`REFRESH`] (a failed refresh keeps the
/// old MAC); unresolved peers are left out and tried again next round.
struct Resolver {
    handle: Option<rtnetlink::Handle>,
    cache: HashMap<Ipv4Addr, Mac>,
    /// The cache before the last refresh: the fallback when a refresh cannot resolve.
    previous: HashMap<Ipv4Addr, Mac>,
    refreshed: std::time::Instant,
    uplink: String,
}

/// How often cached next-hop MACs are looked up again (a peer's MAC may change).
const REFRESH: Duration = Duration::from_secs(30);

impl Resolver {
    fn new(config: &NodeConfig) -> Self {
        let handle = match rtnetlink::new_connection() {
            Ok((conn, handle, _)) => {
                tokio::spawn(conn);
                Some(handle)
            }
            Err(e) => {
                tracing::error!("cannot open netlink, peers need underlay.next_hops: {e}");
                None
            }
        };
        Self {
            handle,
            cache: HashMap::new(),
            previous: HashMap::new(),
            refreshed: std::time::Instant::now(),
            uplink: config.underlay.interface.clone(),
        }
    }

    async fn peers(&mut self, state: &ClusterState, config: &NodeConfig) -> Vec<PeerNode> {
        if self.refreshed.elapsed() > REFRESH {
            self.previous = std::mem::take(&mut self.cache);
            self.refreshed = std::time::Instant::now();
        }
        let mut out = Vec::new();
        for n in state.nodes.values() {
            let Some((name, underlay_ip, pod_cidr, vtep_mac)) = peer_of(n, &config.node_name)
            else {
                continue;
            };
            let Some(mac) = self.mac_for(underlay_ip, config).await else {
                tracing::warn!(peer = %name, underlay = %underlay_ip, "underlay MAC not resolved yet");
                continue;
            };
            out.push(PeerNode {
                name,
                underlay_ip,
                underlay_mac: mac,
                pod_cidr,
                vtep_mac,
            });
        }
        out
    }

    async fn mac_for(&mut self, dst: Ipv4Addr, config: &NodeConfig) -> Option<Mac> {
        if let Some(m) = self.cache.get(&dst) {
            return Some(*m);
        }
        let mac = self
            .resolve(dst, config)
            .await
            .or_else(|| self.previous.get(&dst).copied())?;
        self.cache.insert(dst, mac);
        Some(mac)
    }

    async fn resolve(&self, dst: Ipv4Addr, config: &NodeConfig) -> Option<Mac> {
        let handle = self.handle.clone();
        let hop = match &handle {
            Some(h) => gateway(h, dst).await.unwrap_or(dst),
            None => dst,
        };
        match config.underlay.next_hops.iter().find(|n| n.address == hop) {
            Some(n) => Some(n.mac),
            None => {
                let h = handle?;
                let ifindex = super::datapath::ifindex(&self.uplink).ok()?;
                let mut found = neighbor(&h, ifindex, hop).await;
                if found.is_none() {
                    // Make the kernel resolve it: one datagram to the peer's discard port.
                    if let Ok(s) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
                        let _ = s.connect((dst, 9)).and_then(|()| s.send(b"sluice"));
                    }
                    for _ in 0..20 {
                        tokio::time::sleep(Duration::from_millis(25)).await;
                        found = neighbor(&h, ifindex, hop).await;
                        if found.is_some() {
                            break;
                        }
                    }
                }
                found
            }
        }
    }
}

/// The gateway the kernel routes `dst` through (`None`: on link, or no route).
async fn gateway(h: &rtnetlink::Handle, dst: Ipv4Addr) -> Option<Ipv4Addr> {
    let msg = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, 32)
        .build();
    let mut routes = h.route().get(msg).execute();
    let r = routes.try_next().await.ok()??;
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
        _ => None,
    })
}

/// The MAC of neighbor `ip` on `ifindex`, if the kernel has a usable entry.
async fn neighbor(h: &rtnetlink::Handle, ifindex: u32, ip: Ipv4Addr) -> Option<Mac> {
    let mut neighs = h.neighbours().get().execute();
    while let Ok(Some(m)) = neighs.try_next().await {
        if m.header.ifindex != ifindex
            || matches!(
                m.header.state,
                NeighbourState::Incomplete | NeighbourState::Failed
            )
        {
            continue;
        }
        let is_dst = m.attributes.iter().any(
            |a| matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(x)) if *x == ip),
        );
        if !is_dst {
            continue;
        }
        if let Some(mac) = m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(b) => Mac::try_from(&b[..]).ok(),
            _ => None,
        }) {
            return Some(mac);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_control::model::K8sObject;

    fn node(name: &str, ip: &str, cidr: &str) -> api::Node {
        api::Node {
            name: name.into(),
            underlay_ip: ip.into(),
            vtep_mac: vec![0x0e, 0, 0, 0, 0, 2],
            pod_cidr: cidr.into(),
        }
    }

    #[test]
    fn peers_skip_self_and_garbage() {
        assert!(peer_of(&node("a", "192.168.1.1", "10.244.1.0/24"), "a").is_none());
        assert!(peer_of(&node("b", "not-an-ip", "10.244.2.0/24"), "a").is_none());
        assert!(peer_of(&node("b", "192.168.1.2", ""), "a").is_none());
        let mut bad_mac = node("b", "192.168.1.2", "10.244.2.0/24");
        bad_mac.vtep_mac = vec![1, 2];
        assert!(peer_of(&bad_mac, "a").is_none());
        let (name, ip, cidr, _) = peer_of(&node("b", "192.168.1.2", "10.244.2.0/24"), "a").unwrap();
        assert_eq!((name.as_str(), ip), ("b", Ipv4Addr::new(192, 168, 1, 2)));
        assert_eq!(cidr.to_string(), "10.244.2.0/24");
    }

    fn state() -> ClusterState {
        let mut s = ClusterState {
            revision: 7,
            ..Default::default()
        };
        s.pods.insert(
            ("default".into(), "db".into()),
            api::Pod {
                namespace: "default".into(),
                name: "db".into(),
                node: "b".into(),
                ip: "10.244.2.5".into(),
                labels: [("app".to_string(), "db".to_string())].into(),
                ports: vec![api::ContainerPort {
                    name: "pg".into(),
                    port: 5432,
                    protocol: "TCP".into(),
                }],
                container_id: "c".into(),
            },
        );
        // A pod only known from a manifest (no IP yet) is left out.
        s.pods.insert(
            ("default".into(), "later".into()),
            api::Pod {
                namespace: "default".into(),
                name: "later".into(),
                ..Default::default()
            },
        );
        let svc = K8sObject::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
        }))
        .unwrap();
        if let K8sObject::Service(svc) = svc {
            s.services.insert(("default".into(), "web".into()), svc);
        }
        s
    }

    #[test]
    fn objects_carry_services_and_pods_with_ips() {
        let o = objects_of(&state(), vec![], "a");
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.pods.len(), 1);
        let db = &o.pods[0];
        assert!(!db.local);
        assert_eq!(db.ports[0].name.as_deref(), Some("pg"));
        assert_eq!(db.labels.get("app").map(String::as_str), Some("db"));
    }

    #[test]
    fn control_objects_replace_manifest_objects_of_the_same_name() {
        let slot = ControlSlot::default();
        let mut manifests = ClusterObjects::default();
        let mut svc = objects_of(&state(), vec![], "a").services[0].clone();
        svc.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.99".into());
        manifests.services.push(svc.clone());
        svc.metadata.name = Some("other".into());
        manifests.services.push(svc);
        let manifests = Arc::new(manifests);
        // Standalone: the manifests as they are.
        assert!(Arc::ptr_eq(&slot.merged(manifests.clone()), &manifests));
        *slot.objects.write().unwrap() = Some(Arc::new(objects_of(&state(), vec![], "a")));
        let m = slot.merged(manifests);
        assert_eq!(m.services.len(), 2);
        let web = m
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("web"))
            .unwrap();
        assert_eq!(
            web.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.10")
        );
        assert_eq!(m.pods.len(), 1);
    }

    #[test]
    fn pod_cidr_is_optional_only_with_a_control_section() {
        let base = "node_name: a\nunderlay: {interface: up0, address: 192.168.1.1}\nvtep: {mac: \"0e:00:00:00:01:00\"}\n";
        let c: NodeConfig = serde_saphyr::from_str(base).unwrap();
        assert_eq!(c.pod_cidr, UNLEASED_POD_CIDR);
        assert!(c.validate().is_err(), "standalone needs a pod_cidr");
        let with = format!(
            "{base}control:\n  endpoint: https://192.168.77.254:7443\n  ca_file: /x/ca.pem\n  token_file: /x/n1.token\n  tls_domain: sluice-control\n"
        );
        let c: NodeConfig = serde_saphyr::from_str(&with).unwrap();
        c.validate().unwrap();
        let control = c.control.as_ref().unwrap();
        assert_eq!(control.tls_domain.as_deref(), Some("sluice-control"));
        // JSON round trip (the harness writes JSON) keeps it unleased.
        let back: NodeConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        // A missing token file is an error naming it, not a panic.
        let err = client_config(control).unwrap_err().to_string();
        assert!(err.contains("/x/n1.token"), "{err}");
    }
}
