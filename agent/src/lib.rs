//! The node agent behind `sluice-agent` (the `agent` feature).
//!
//! Owns: the node config ([`config`]), the cluster objects read from manifests ([`manifests`]), the
//! persisted pod registry ([`registry`]), building and publishing table snapshots ([`tables`]), the
//! worker threads ([`workers`]) and their counters ([`counters`]), the XDP attachment
//! ([`datapath`]), the kernel's standby path to other nodes ([`standby`]) and the local gRPC API
//! on the unix socket ([`api`]).
//!
//! Start-up reconciles before it re-attaches: a pod of the registry whose host veth is gone (CNI
//! DEL goes on without the agent; the end of the pod's network namespace takes its veth along) is
//! dropped from the registry, so the control plane loses it on the next sync and its address is
//! free again; the XDP program's pinned state keeps only the uplink's and the remaining pods'
//! interfaces (see [`Datapath::retain_interfaces`]).
//!
//! Threads: the tokio runtime serves the API and does all control work; each worker is a plain
//! thread pinned to its core. They meet only at the table [`tables::Publisher`] (read-copy-update),
//! the workers' command channels and the counters (relaxed atomics). No lock is taken per packet.

pub mod api;
pub mod config;
pub mod control_sync;
pub mod counters;
pub mod datapath;
pub mod drops;
pub mod events;
pub mod handoff;
pub mod manifests;
pub mod masquerade;
pub mod metrics;
pub mod punt;
pub mod registry;
pub mod standby;
pub mod tables;
pub mod trace;
pub mod workers;
pub mod xsk_io;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Mutex;

use config::NodeConfig;
use counters::CountersFile;
use datapath::{Datapath, DatapathError};
use manifests::ClusterObjects;
use registry::{PodKey, PodRecord, PodRegistry, RegistryError};
use tables::{NodeLinks, PortId, Publisher, Snapshot, SnapshotError};
use workers::{PortKind, PortSpec, Worker, WorkerError, WorkerIo, WorkerParams};

/// Starting or running the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Manifest(#[from] manifests::ManifestError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid pod: {0}")]
    InvalidPod(String),
    #[error("cannot build the tables: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("{0} (set masquerade.enabled to false to run without it)")]
    Masquerade(#[from] masquerade::MasqueradeError),
}

/// The running agent: everything the API handlers and the shutdown path need.
#[derive(Debug)]
pub struct Agent {
    pub config: NodeConfig,
    objects: std::sync::RwLock<Arc<ClusterObjects>>,
    registry: Mutex<PodRegistry>,
    publisher: Publisher,
    workers: Vec<Worker>,
    datapath: Arc<dyn Datapath>,
    /// Which worker owns the uplink socket of each uplink queue.
    uplink_queues: Vec<(u32, usize)>,
    uplink_ifindex: u32,
    links: NodeLinks,
    ports: PortSet,
    /// Control-plane mode: objects from the watch, pod reports, sync state.
    control: control_sync::ControlSlot,
    /// Recent flow events (see [`events`]).
    events: events::EventHub,
    /// The punt link (see [`punt`]), when it could be created.
    punt: Option<punt::Punt>,
    /// Whether this agent installed the masquerade table (see [`masquerade`]).
    masquerading: bool,
    /// The kernel's standby path to other nodes (see [`standby`]), with a datapath.
    standby: Option<standby::Standby>,
    /// Seconds from a change reaching the agent to the tables holding it being published.
    publish_latency: prometheus_client::metrics::histogram::Histogram,
}

/// Every port some worker has a socket on (read by workers only on the rare path of a frame for a
/// port they do not own, to count handoffs).
pub type PortSet = Arc<std::sync::RwLock<Vec<PortId>>>;

/// The worker that owns the socket of a single-queue port (a pod's host veth with fewer queues
/// than workers): the agent opens it there, and other workers hand frames for it there.
pub fn port_worker(port: PortId, workers: usize) -> usize {
    port.0 as usize % workers.max(1)
}

/// Builds the frame I/O of worker `id` (AF_XDP on sluice-xdp, or [`workers::NoIo`]).
pub type IoFactory = dyn Fn(usize) -> Result<Box<dyn WorkerIo>, WorkerError>;

impl Agent {
    /// Start the agent: read manifests and the registry, start the workers, attach the uplink,
    /// re-attach every pod found in the registry (after a restart) and publish the first tables.
    pub async fn start(
        config: NodeConfig,
        datapath: Arc<dyn Datapath>,
        io: &IoFactory,
        ports: PortSet,
    ) -> Result<Self, AgentError> {
        let objects = Arc::new(ClusterObjects::load(&config.manifests)?);
        let state = &config.paths.state_dir;
        std::fs::create_dir_all(state).map_err(|source| AgentError::Io {
            what: "create state dir",
            path: state.clone(),
            source,
        })?;
        let mut registry = PodRegistry::open(&config.registry_path())?;
        for pod in registry.remove_gone(|p| veth_gone(p).is_some())? {
            tracing::info!(
                pod = %pod.container_id,
                ip = %pod.ip,
                "pod deleted while the agent was down: {}; dropped",
                veth_gone(&pod).unwrap_or_default()
            );
        }
        let uplink = &config.underlay.interface;
        let links = NodeLinks {
            uplink: PortId(datapath::ifindex(uplink)?),
            uplink_mac: match config.underlay.mac {
                Some(m) => m,
                None => datapath::mac_of(uplink)?,
            },
        };
        // Control-plane mode: until the first revision arrives, serve what the last one said
        // (or keep the pods isolated), never tables without the control plane's policies.
        let control = control_sync::ControlSlot::default();
        if let Some((restored, what)) = control_sync::restore(&config, registry.pods()) {
            tracing::info!("serving {what} until the control plane answers");
            control.restore(restored, what);
        }
        let first = control.merged(objects.clone());
        let publisher =
            Publisher::new(Snapshot::build(1, &config, links, &first, registry.pods())?);

        // Workers: one per configured queue -> core entry, default one per uplink queue.
        let mut queues: Vec<(u32, usize)> = config
            .workers
            .queues
            .iter()
            .map(|(q, c)| (*q, *c))
            .collect();
        if queues.is_empty() {
            let n = datapath.uplink_queues(&config.underlay.interface).max(1);
            queues = (0..n).map(|q| (q, q as usize)).collect();
        }
        let mut workers = Vec::new();
        let mut uplink_queues = Vec::new();
        // Several workers: handoff rings between every pair (steering and foreign ports).
        let (mut handoffs, wakers) = if queues.len() > 1 {
            let (ends, wakers) = handoff::mesh(
                queues.len(),
                xsk_io::UmemPlan::for_pods(config.max_pods).frames as usize,
            );
            (ends.into_iter().map(Some).collect(), Some(wakers))
        } else {
            (vec![None], None)
        };
        for (id, (queue, core)) in queues.iter().enumerate() {
            let mut wio = io(id)?;
            if let Some(h) = handoffs.get_mut(id).and_then(Option::take) {
                wio.attach_handoff(h);
            }
            let w = Worker::spawn(
                WorkerParams {
                    id,
                    core: config.workers.pin.then_some(*core),
                    busy_poll: config.workers.busy_poll,
                    idle_spin: std::time::Duration::from_micros(u64::from(
                        config.workers.idle_spin_us,
                    )),
                    yield_to_pods: config.workers.yield_to_pods,
                    slice: (config.workers.slice_us > 0).then(|| {
                        std::time::Duration::from_micros(u64::from(config.workers.slice_us))
                    }),
                },
                wio,
                publisher.clone(),
            )
            .map_err(|source| AgentError::Io {
                what: "spawn worker",
                path: PathBuf::new(),
                source,
            })?;
            if let Some(slot) = wakers.as_ref().and_then(|w| w.get(id)) {
                let _ = slot.set(w.waker());
            }
            workers.push(w);
            uplink_queues.push((*queue, id));
        }

        datapath.load(&config)?;
        let ours: Vec<u32> = std::iter::once(links.uplink.0)
            .chain(registry.pods().map(|p| p.host_ifindex))
            .collect();
        if let Err(e) = datapath.retain_interfaces(&ours) {
            tracing::warn!("{e}");
        }
        let uplink_ifindex = datapath.attach(&config.underlay.interface, datapath::Role::Uplink)?;
        for (queue, worker) in &uplink_queues {
            workers[*worker]
                .open_port(PortSpec {
                    port: PortId(uplink_ifindex),
                    ifname: config.underlay.interface.clone(),
                    queue: *queue,
                    kind: PortKind::Uplink,
                })
                .await?;
        }
        let (punt, standby) = if datapath.ready().is_ok() {
            (
                open_punt(&workers, config.pod_mtu).await,
                Some(standby::Standby::spawn(standby::Device::of(&config))),
            )
        } else {
            (None, None)
        };
        let masquerading = datapath.ready().is_ok() && set_masquerade(&config)?;

        let agent = Self {
            config,
            objects: std::sync::RwLock::new(objects),
            registry: Mutex::new(registry),
            publisher,
            workers,
            datapath,
            uplink_queues,
            uplink_ifindex,
            links,
            ports,
            control,
            events: Default::default(),
            punt,
            masquerading,
            standby,
            publish_latency: metrics::publish_latency_histogram(),
        };
        if let Ok(mut p) = agent.ports.write() {
            p.push(PortId(uplink_ifindex));
        }
        // Pods wired before a restart: attach them again (their veths still exist).
        let pods: Vec<PodRecord> = agent.registry.lock().await.pods().cloned().collect();
        for pod in pods {
            if let Err(e) = agent.attach_pod(&pod).await {
                tracing::warn!(pod = %pod.container_id, "cannot re-attach pod after restart: {e}");
            }
        }
        agent.republish().await?;
        Ok(agent)
    }

    /// Uplink rx queue -> index of the worker owning its socket.
    pub fn uplink_queues(&self) -> &[(u32, usize)] {
        &self.uplink_queues
    }

    /// The (worker, queue) pairs that get a socket on a pod's host veth: with at least as many
    /// queues as workers, worker `q` takes queue `q` (every worker can then transmit to the pod
    /// from its own UMEM, no handoff); otherwise queue 0 goes to one worker chosen by ifindex.
    fn pod_sockets(&self, port: PortId, ifname: &str) -> Vec<(usize, u32)> {
        let n = self.workers.len();
        if datapath::rx_queue_count(ifname) as usize >= n {
            (0..n).map(|w| (w, w as u32)).collect()
        } else {
            vec![(port_worker(port, n), 0)]
        }
    }

    async fn attach_pod(&self, pod: &PodRecord) -> Result<(), AgentError> {
        let ifindex = self
            .datapath
            .attach(&pod.host_ifname, datapath::Role::Pod)?;
        if ifindex != pod.host_ifindex {
            return Err(AgentError::InvalidPod(format!(
                "host veth {} has ifindex {ifindex}, the request said {}",
                pod.host_ifname, pod.host_ifindex
            )));
        }
        for (worker, queue) in self.pod_sockets(PortId(ifindex), &pod.host_ifname) {
            self.workers[worker]
                .open_port(PortSpec {
                    port: PortId(ifindex),
                    ifname: pod.host_ifname.clone(),
                    queue,
                    kind: PortKind::Pod,
                })
                .await?;
        }
        if let Ok(mut p) = self.ports.write() {
            p.push(PortId(ifindex));
        }
        Ok(())
    }

    /// Wire a pod: attach XDP to its host veth, open its socket on the owning worker, persist it
    /// and publish tables holding it. Re-adding the same pod replaces it.
    pub async fn add_pod(&self, pod: PodRecord) -> Result<(), AgentError> {
        let arrived = std::time::Instant::now();
        if !self.config.pod_cidr.contains(&pod.ip) || pod.ip == self.config.pod_cidr.network() {
            return Err(AgentError::InvalidPod(format!(
                "ip {} is not a pod address of this node's pod CIDR {}",
                pod.ip, self.config.pod_cidr
            )));
        }
        let mut registry = self.registry.lock().await;
        if let Some(other) = registry.by_ip(pod.ip)
            && (other.container_id != pod.container_id || other.ifname != pod.ifname)
        {
            // A holder whose veth is gone was deleted without telling the agent: it lets go.
            let Some(why) = veth_gone(other) else {
                return Err(AgentError::InvalidPod(format!(
                    "ip {} already belongs to container {}",
                    pod.ip, other.container_id
                )));
            };
            let other = other.clone();
            tracing::info!(pod = %other.container_id, ip = %other.ip, "{why}; dropped for the new holder of its address");
            registry.remove(&(other.container_id.clone(), other.ifname.clone()))?;
            self.detach_pod(&other).await;
        }
        let key = (pod.container_id.clone(), pod.ifname.clone());
        if let Some(old) = registry.get(&key).cloned() {
            self.detach_pod(&old).await;
        }
        self.attach_pod(&pod).await?;
        registry.insert(pod)?;
        drop(registry);
        self.control.pods_changed();
        self.republish().await?;
        self.published_since(arrived);
        Ok(())
    }

    /// Record in the publish latency histogram that a change that arrived at `arrived` is now
    /// published.
    fn published_since(&self, arrived: std::time::Instant) {
        self.publish_latency
            .observe(arrived.elapsed().as_secs_f64());
    }

    async fn detach_pod(&self, pod: &PodRecord) {
        let port = PortId(pod.host_ifindex);
        if let Ok(mut p) = self.ports.write() {
            p.retain(|x| *x != port);
        }
        for w in &self.workers {
            if let Err(e) = w.close_port(port).await {
                tracing::warn!("closing socket of {}: {e}", pod.host_ifname);
            }
        }
        if let Err(e) = self.datapath.detach(&pod.host_ifname, pod.host_ifindex) {
            tracing::warn!("detaching XDP from {}: {e}", pod.host_ifname);
        }
    }

    /// Unwire a pod. Returns whether it was known.
    pub async fn del_pod(&self, key: &PodKey) -> Result<bool, AgentError> {
        let arrived = std::time::Instant::now();
        let mut registry = self.registry.lock().await;
        let Some(pod) = registry.get(key).cloned() else {
            return Ok(false);
        };
        // Withdraw from the tables first so no worker routes to a socket being closed.
        registry.remove(key)?;
        self.control.pods_changed();
        let snapshot = self.next_snapshot(&registry);
        drop(registry);
        self.publish(snapshot?);
        self.published_since(arrived);
        self.detach_pod(&pod).await;
        Ok(true)
    }

    fn next_snapshot(&self, registry: &PodRegistry) -> Result<Snapshot, SnapshotError> {
        let objects = self.objects.read().map(|o| o.clone()).unwrap_or_default();
        let objects = self.control.merged(objects);
        let mut s = Snapshot::build(
            self.publisher.generation() + 1,
            &self.config,
            self.links,
            &objects,
            registry.pods(),
        )?;
        s.punt = self.punt;
        Ok(s)
    }

    /// Re-read the manifests (SIGHUP in standalone mode) and publish tables built from them. On
    /// any error the current objects and tables stay.
    pub async fn reload_manifests(&self) -> Result<(), AgentError> {
        let arrived = std::time::Instant::now();
        let fresh = Arc::new(ClusterObjects::load(&self.config.manifests)?);
        let registry = self.registry.lock().await;
        let old = match self.objects.write() {
            Ok(mut o) => std::mem::replace(&mut *o, fresh),
            Err(_) => return Ok(()),
        };
        let s = self.next_snapshot(&registry);
        drop(registry);
        match s {
            Ok(s) => {
                self.publish(s);
                self.published_since(arrived);
                Ok(())
            }
            Err(e) => {
                if let Ok(mut o) = self.objects.write() {
                    *o = old;
                }
                Err(e.into())
            }
        }
    }

    /// Build and publish a snapshot of the current state; on error the old one stays.
    async fn republish(&self) -> Result<(), SnapshotError> {
        let registry = self.registry.lock().await;
        let s = self.next_snapshot(&registry);
        drop(registry);
        self.publish(s?);
        Ok(())
    }

    /// Hand `s` to the workers, then mirror its policy isolation into the XDP program (see
    /// [`Datapath::sync_isolation`]; a failure there is logged: the workers enforce policy
    /// either way, only the agent-gone fallback is affected).
    fn publish(&self, s: Snapshot) {
        let isolation: Vec<datapath::PodIsolation> = s
            .pods
            .values()
            .map(|p| datapath::PodIsolation {
                ifindex: p.port.0,
                ip: p.ip,
                isolation: s.tables.policy.isolation(p.ip),
            })
            .collect();
        if let Some(standby) = &self.standby {
            standby.set_peers(standby::Peers {
                peers: standby::peers_of(&s.remotes),
                complete: self.config.control.is_none() || self.control.has_revision(),
            });
        }
        self.publisher.publish(s);
        if let Err(e) = self.datapath.sync_isolation(&isolation) {
            tracing::warn!("cannot mirror policy isolation into the XDP program: {e}");
        }
    }

    /// Ready when the XDP program is loaded and every worker runs; otherwise why not.
    pub fn status(&self) -> Result<(), String> {
        self.datapath.ready()?;
        if let Some(w) = self.workers.iter().find(|w| !w.is_running()) {
            return Err(format!("worker {} has stopped", w.id));
        }
        Ok(())
    }

    /// The current counters, as exported.
    pub async fn counters(&self) -> CountersFile {
        let pods = self.registry.lock().await.len();
        CountersFile {
            node: self.config.node_name.clone(),
            generation: self.publisher.generation(),
            pods,
            datapath: self.datapath.ready().is_ok(),
            workers: self
                .workers
                .iter()
                .map(|w| {
                    w.counters
                        .snapshot(w.id, w.core, datapath::drop_reason_name)
                })
                .collect(),
            xdp: self.datapath.classifier_counters(),
        }
    }

    /// Write the counters file.
    pub async fn export_counters(&self) {
        let c = self.counters().await;
        if let Err(e) = c.write(&self.config.counters_path()) {
            tracing::warn!("cannot write counters: {e}");
        }
    }

    /// Clean shutdown: stop workers (closing their sockets), detach XDP from every interface,
    /// remove the pinned objects. The pod registry stays so a new agent re-attaches the pods.
    pub async fn shutdown(&self) {
        self.export_counters().await;
        for w in &self.workers {
            w.stop();
        }
        let pods: Vec<PodRecord> = self.registry.lock().await.pods().cloned().collect();
        for pod in &pods {
            if let Err(e) = self.datapath.detach(&pod.host_ifname, pod.host_ifindex) {
                tracing::warn!("detaching XDP from {}: {e}", pod.host_ifname);
            }
        }
        if let Err(e) = self
            .datapath
            .detach(&self.config.underlay.interface, self.uplink_ifindex)
        {
            tracing::warn!("detaching XDP from the uplink: {e}");
        }
        self.datapath.unload(&self.config);
        if self.punt.is_some()
            && let Err(e) = punt::remove().await
        {
            tracing::warn!("removing the punt link: {e}");
        }
        if self.masquerading
            && let Err(e) = masquerade::remove()
        {
            tracing::warn!("{e}");
        }
        if let Some(standby) = &self.standby
            && let Err(e) = standby.remove().await
        {
            tracing::warn!("removing the standby VXLAN device: {e}");
        }
    }
}

/// Why a registered pod is gone, if it is: its host veth no longer exists under its name and
/// ifindex. The veth is the proof of a pod's wiring: CNI DEL removes it (with or without the
/// agent), and it ends with the pod's network namespace. The netns path itself is not asked: a
/// namespace can outlive its path, and the path may not be visible where the agent runs. IPAM
/// records are the CNI's: DEL removes them with the veth.
fn veth_gone(pod: &PodRecord) -> Option<String> {
    match datapath::ifindex(&pod.host_ifname) {
        Ok(i) if i == pod.host_ifindex => None,
        Ok(i) => Some(format!(
            "its host veth {} has ifindex {i}, not {}",
            pod.host_ifname, pod.host_ifindex
        )),
        Err(_) => Some(format!("its host veth {} is gone", pod.host_ifname)),
    }
}

/// Install the masquerade table the config asks for, or remove a leftover one when it asks for
/// none. Returns whether the table is in place.
fn set_masquerade(config: &NodeConfig) -> Result<bool, AgentError> {
    let m = &config.masquerade;
    if !m.enabled {
        masquerade::remove()?;
        return Ok(false);
    }
    let rules = masquerade::Rules::new(config.cluster_cidr, config.service_cidr, &m.exclude);
    masquerade::install(&rules)?;
    tracing::info!(
        "masquerading traffic from {} to anything but {:?}",
        rules.cluster,
        rules.keep
    );
    Ok(true)
}

/// Create the punt link and give every worker a socket on its own queue of it. Without it the
/// agent still runs; frames the pipeline passes to the kernel are then counted and dropped.
async fn open_punt(workers: &[Worker], mtu: u32) -> Option<punt::Punt> {
    let p = match punt::create(workers.len() as u32, mtu).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("no punt link, frames for the kernel will be dropped: {e}");
            return None;
        }
    };
    for (queue, w) in workers.iter().enumerate() {
        let spec = PortSpec {
            port: p.port,
            ifname: punt::PUNT_IFNAME.to_owned(),
            queue: queue as u32,
            kind: PortKind::Punt,
        };
        if let Err(e) = w.open_port(spec).await {
            tracing::warn!("no punt socket on worker {}: {e}", w.id);
        }
    }
    Some(p)
}
