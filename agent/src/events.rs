//! Flow events on the agent side: each worker's ring ([`WorkerRing`], created with the worker's
//! counters, its producer taken by the worker's I/O on its first round), the drain task
//! ([`run`]) that empties the rings every [`DRAIN_INTERVAL`], resolves pod, service and policy
//! names and keeps the last [`HISTORY`] events, and the `Observe` stream of the local API.
//!
//! In control-plane mode [`relay`] also pushes every drained batch to `sluice-control`
//! (`PushFlowEvents`), through a queue of [`RELAY_QUEUE`] batches: when the control plane is slow
//! or unreachable, batches that do not fit are dropped and counted, never waited for; the stream
//! is reopened with backoff.
//!
//! Names: pods are resolved from this node's registry and, in control-plane mode, from the control
//! plane's pods of every node (standalone, remote pods show as bare IPs); services and policies
//! from the current table snapshot at drain time.

use sluice_dataplane::flow::proto;
use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_control::agent_api::{FlowEvent as EventMsg, ObserveRequest};
use sluice_control::api::PushFlowEventsRequest;
use sluice_control::client::{ClientConfig, ControlClient};
use sluice_control::observe::matches;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use super::Agent;
use sluice_dataplane::events::{EventSink, FlowEvent};
use sluice_dataplane::flow::FlowKey;
use sluice_dataplane::flow::Protocol;
use sluice_dataplane::policy::{Direction, PolicyVerdict};
use sluice_dataplane::tables::Tables;

/// Events a worker's ring holds.
pub const RING_CAPACITY: usize = 8192;
/// Events the agent keeps for `Observe` without `follow`.
pub const HISTORY: usize = 10_000;
/// How often the rings are drained.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
/// Drained batches waiting to be pushed to the control plane (one per [`DRAIN_INTERVAL`] at
/// most, so about three seconds of events), and again batches waiting in the open stream.
pub const RELAY_QUEUE: usize = 64;

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One worker's event ring, as its counters carry it: a bounded lock-free single-producer
/// single-consumer ring (`rtrb`) of [`RING_CAPACITY`] events. The worker writes through
/// [`RingSink`] (the pipeline's [`EventSink`]); the drain task reads.
pub struct WorkerRing {
    producer: Mutex<Option<rtrb::Producer<FlowEvent>>>,
    consumer: Mutex<rtrb::Consumer<FlowEvent>>,
    /// Events the worker could not write because the ring was full, since start.
    lost: Arc<AtomicU64>,
    /// Unix time in ns of the worker's time zero (set when the producer is taken).
    base_unix_ns: AtomicU64,
}

impl Default for WorkerRing {
    fn default() -> Self {
        let (p, c) = rtrb::RingBuffer::new(RING_CAPACITY);
        Self {
            producer: Mutex::new(Some(p)),
            consumer: Mutex::new(c),
            lost: Arc::default(),
            base_unix_ns: AtomicU64::new(unix_now_ns()),
        }
    }
}

impl std::fmt::Debug for WorkerRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerRing").finish_non_exhaustive()
    }
}

/// The worker's end of its [`WorkerRing`]: never blocks or allocates; a full ring counts the
/// event as lost.
#[derive(Debug)]
pub struct RingSink {
    ring: rtrb::Producer<FlowEvent>,
    lost: Arc<AtomicU64>,
}

impl EventSink for RingSink {
    #[inline]
    fn emit(&mut self, ev: FlowEvent) {
        if self.ring.push(ev).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl WorkerRing {
    /// The sink, once (for `WorkerState::events`); `start` is the instant the worker's
    /// timestamps count from.
    pub fn take_sink(&self, start: Instant) -> Option<Box<dyn EventSink>> {
        let elapsed = u64::try_from(start.elapsed().as_nanos()).unwrap_or(0);
        self.base_unix_ns
            .store(unix_now_ns().saturating_sub(elapsed), Ordering::Relaxed);
        let ring = self.producer.lock().ok()?.take()?;
        Some(Box::new(RingSink {
            ring,
            lost: self.lost.clone(),
        }))
    }

    /// (events waiting, capacity, lost since start).
    pub fn stats(&self) -> (usize, usize, u64) {
        let lost = self.lost.load(Ordering::Relaxed);
        self.consumer
            .lock()
            .map(|c| (c.slots(), c.buffer().capacity(), lost))
            .unwrap_or_default()
    }

    fn drain_into(&self, out: &mut Vec<(u64, FlowEvent)>) {
        let base = self.base_unix_ns.load(Ordering::Relaxed);
        if let Ok(mut c) = self.consumer.lock() {
            while let Ok(e) = c.pop() {
                out.push((base.saturating_add(e.ts_ns), e));
            }
        }
    }
}

/// The agent's recent events and the live feed.
#[derive(Debug)]
pub struct EventHub {
    history: Mutex<VecDeque<Arc<EventMsg>>>,
    feed: broadcast::Sender<Arc<EventMsg>>,
    /// Control-plane mode: the queue [`relay`] pushes from.
    relay: OnceLock<mpsc::Sender<Vec<EventMsg>>>,
    /// Events handed to the control plane's stream.
    pub relayed: AtomicU64,
    /// Events dropped instead of relayed (queue full: control plane slow or unreachable).
    pub relay_dropped: AtomicU64,
}

impl Default for EventHub {
    fn default() -> Self {
        Self {
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            feed: broadcast::channel(4096).0,
            relay: OnceLock::new(),
            relayed: AtomicU64::new(0),
            relay_dropped: AtomicU64::new(0),
        }
    }
}

impl EventHub {
    /// Record events (oldest first) in the history, send them to followers and, in control-plane
    /// mode, queue them for the control plane (or count them dropped when the queue is full).
    pub fn publish(&self, evs: Vec<EventMsg>) {
        if let Some(q) = self.relay.get()
            && !evs.is_empty()
            && let Err(e) = q.try_send(evs.clone())
        {
            let n = match e {
                mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => {
                    b.len()
                }
            };
            self.relay_dropped.fetch_add(n as u64, Ordering::Relaxed);
        }
        let Ok(mut h) = self.history.lock() else {
            return;
        };
        for e in evs {
            let e = Arc::new(e);
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(e.clone());
            let _ = self.feed.send(e);
        }
    }

    /// Matching events of the history (the last `req.last` of them when non-zero).
    pub fn recent(&self, req: &ObserveRequest) -> Vec<EventMsg> {
        let Ok(h) = self.history.lock() else {
            return Vec::new();
        };
        let mut v: Vec<EventMsg> = h
            .iter()
            .filter(|e| matches(req, e))
            .map(|e| (**e).clone())
            .collect();
        if req.last > 0 && v.len() > req.last as usize {
            v.drain(..v.len() - req.last as usize);
        }
        v
    }
}

/// Stable protocol name.
pub fn protocol_name(p: u8) -> String {
    match (p, Protocol::from_number(p)) {
        (_, Some(known)) => known.k8s_name().into(),
        (proto::ICMP, None) => "ICMP".into(),
        (n, None) => n.to_string(),
    }
}

/// Turn a worker's event into its API form, naming what `names` (pod IP -> "ns/name") and the
/// tables know.
pub fn to_message(
    node: &str,
    worker: usize,
    unix_ns: u64,
    e: &FlowEvent,
    names: &HashMap<Ipv4Addr, String>,
    tables: &Tables,
) -> EventMsg {
    let name = |ip: [u8; 4]| names.get(&Ipv4Addr::from(ip)).cloned().unwrap_or_default();
    let mut m = EventMsg {
        time_unix_ns: unix_ns,
        node: node.to_owned(),
        worker: u32::try_from(worker).unwrap_or(u32::MAX),
        kind: e.kind.as_str().into(),
        verdict: if e.dropped() { "DROPPED" } else { "FORWARDED" }.into(),
        drop_reason: e.drop.map(|r| r.as_str().to_owned()).unwrap_or_default(),
        ingress_ifindex: e.ingress.0,
        egress_ifindex: e.egress.map(|p| p.0).unwrap_or(0),
        packets_out: e.counts.packets[0],
        packets_in: e.counts.packets[1],
        bytes_out: e.counts.bytes[0],
        bytes_in: e.counts.bytes[1],
        ..Default::default()
    };
    if let Some(t) = e.tuple {
        m.protocol = protocol_name(t.proto);
        m.src_ip = Ipv4Addr::from(t.src).to_string();
        m.src_port = u32::from(t.src_port);
        m.src_pod = name(t.src);
        m.dst_ip = Ipv4Addr::from(t.dst).to_string();
        m.dst_port = u32::from(t.dst_port);
        m.dst_pod = name(t.dst);
    }
    if let Some(x) = e.translated.filter(|x| Some(*x) != e.tuple) {
        let FlowKey { dst, dst_port, .. } = x;
        m.backend_ip = Ipv4Addr::from(dst).to_string();
        m.backend_port = u32::from(dst_port);
        m.backend_pod = name(dst);
    }
    if let Some(s) = e.service.and_then(|s| tables.service(s)) {
        m.service = s.spec.name.clone();
    }
    match e.policy {
        Some(PolicyVerdict::Allow { by }) => {
            m.policy_verdict = "allowed".into();
            m.policy = match by.and_then(|id| tables.policy.policy_name(id)) {
                Some(n) => n.to_owned(),
                None => "no-policy".into(),
            };
        }
        Some(PolicyVerdict::Deny { direction }) => {
            m.policy_verdict = "denied".into();
            m.policy = "default-deny".into();
            m.policy_direction = match direction {
                Direction::Ingress => "ingress",
                Direction::Egress => "egress",
            }
            .into();
        }
        None => {}
    }
    m
}

/// Drain every worker's ring once into the hub.
pub async fn drain(agent: &Agent) {
    let mut raw: Vec<(usize, u64, FlowEvent)> = Vec::new();
    let mut buf = Vec::new();
    for w in &agent.workers {
        w.counters.events.drain_into(&mut buf);
        raw.extend(buf.drain(..).map(|(t, e)| (w.id, t, e)));
    }
    if raw.is_empty() {
        return;
    }
    raw.sort_by_key(|(_, t, _)| *t);
    let mut names: HashMap<Ipv4Addr, String> = agent
        .registry
        .lock()
        .await
        .pods()
        .filter(|p| !p.name.is_empty())
        .map(|p| (p.ip, format!("{}/{}", p.namespace, p.name)))
        .collect();
    // Control-plane mode: other nodes' pods too.
    agent.control.pod_names(&mut names);
    let snapshot = agent.publisher.load();
    let node = &agent.config.node_name;
    let msgs = raw
        .iter()
        .map(|(w, t, e)| to_message(node, *w, *t, e, &names, &snapshot.tables))
        .collect();
    agent.events.publish(msgs);
}

/// The drain loop (runs until the task is dropped).
pub async fn run(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        drain(&agent).await;
    }
}

/// Push the node's events to the control plane until the task is dropped (control-plane mode):
/// one `PushFlowEvents` stream at a time, reopened with backoff (200 ms doubling to 5 s) when it
/// ends or cannot open. Never blocks [`EventHub::publish`].
pub async fn relay(agent: Arc<Agent>, cfg: ClientConfig) {
    let (tx, mut rx) = mpsc::channel::<Vec<EventMsg>>(RELAY_QUEUE);
    if agent.events.relay.set(tx).is_err() {
        return;
    }
    let hub = &agent.events;
    let node = agent.config.node_name.clone();
    let drop_queued = |rx: &mut mpsc::Receiver<Vec<EventMsg>>| {
        while let Ok(b) = rx.try_recv() {
            hub.relay_dropped
                .fetch_add(b.len() as u64, Ordering::Relaxed);
        }
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        let client = match ControlClient::connect(&cfg).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("flow event relay: {e}; retrying in {backoff:?}");
                drop_queued(&mut rx);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let (stx, srx) = mpsc::channel::<PushFlowEventsRequest>(RELAY_QUEUE);
        let opened = Instant::now();
        let mut call = Box::pin(client.push_flow_events(ReceiverStream::new(srx)));
        let end = loop {
            tokio::select! {
                r = &mut call => break r,
                b = rx.recv() => {
                    let Some(events) = b else { return };
                    let n = events.len() as u64;
                    let msg = PushFlowEventsRequest {
                        node: node.clone(),
                        events,
                        dropped: hub.relay_dropped.load(Ordering::Relaxed),
                    };
                    let counter = match stx.try_send(msg) {
                        Ok(()) => &hub.relayed,
                        Err(_) => &hub.relay_dropped,
                    };
                    counter.fetch_add(n, Ordering::Relaxed);
                }
            }
        };
        match end {
            Ok(n) => tracing::debug!("flow event relay: stream ended after {n} events"),
            Err(e) => tracing::debug!("flow event relay: stream ended: {e}"),
        }
        if opened.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(200);
        }
        drop_queued(&mut rx);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The stream type of the `Observe` RPC.
pub type ObserveStream = Pin<Box<dyn Stream<Item = Result<EventMsg, tonic::Status>> + Send>>;

/// Serve one `Observe` call: matching history, then (with `follow`) live events.
pub fn observe(agent: &Agent, req: ObserveRequest) -> ObserveStream {
    let (tx, rx) = mpsc::channel(1024);
    // Subscribe before reading the history so nothing falls between the two.
    let mut live = agent.events.feed.subscribe();
    let recent = agent.events.recent(&req);
    tokio::spawn(async move {
        let mut last_sent = 0;
        for e in recent {
            last_sent = e.time_unix_ns;
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        if !req.follow {
            return;
        }
        loop {
            match live.recv().await {
                Ok(e) => {
                    // Already sent from history.
                    if e.time_unix_ns <= last_sent || !matches(&req, &e) {
                        continue;
                    }
                    if tx.send(Ok((*e).clone())).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!("observe follower lagged, {n} events skipped");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_dataplane::events::EventKind;
    use sluice_dataplane::verdict::{DropReason, PortId};

    #[test]
    fn message_names_pods_and_verdicts() {
        let t = sluice_dataplane::demo::demo_tables();
        let names: HashMap<Ipv4Addr, String> =
            [(Ipv4Addr::new(10, 244, 1, 2), "default/client".to_owned())].into();
        let e = FlowEvent {
            tuple: Some(FlowKey {
                src: [10, 244, 1, 2],
                dst: [10, 244, 1, 3],
                src_port: 5555,
                dst_port: 80,
                proto: proto::TCP,
            }),
            policy: Some(PolicyVerdict::Deny {
                direction: Direction::Ingress,
            }),
            drop: Some(DropReason::PolicyDeniedIngress),
            ..FlowEvent::new(EventKind::PolicyVerdict, 5, PortId(7))
        };
        let m = to_message("a", 0, 1000, &e, &names, &t);
        assert_eq!(
            (
                m.verdict.as_str(),
                m.drop_reason.as_str(),
                m.src_pod.as_str(),
                m.dst_port,
                m.policy.as_str(),
                m.policy_direction.as_str(),
                m.protocol.as_str()
            ),
            (
                "DROPPED",
                "policy_denied_ingress",
                "default/client",
                80,
                "default-deny",
                "ingress",
                "TCP"
            )
        );
    }

    #[test]
    fn relay_queue_full_drops_and_counts_without_blocking() {
        let hub = EventHub::default();
        let (tx, mut rx) = mpsc::channel(1);
        hub.relay.set(tx).unwrap();
        let batch = |n: u64| {
            (0..n).map(|t| EventMsg {
                time_unix_ns: t,
                ..Default::default()
            })
        };
        hub.publish(batch(2).collect());
        hub.publish(batch(3).collect());
        hub.publish(batch(4).collect());
        assert_eq!(hub.relay_dropped.load(Ordering::Relaxed), 7);
        assert_eq!(rx.try_recv().map(|b| b.len()).ok(), Some(2));
        // The local history has them all.
        assert_eq!(hub.recent(&ObserveRequest::default()).len(), 9);
        // Gone consumer: counted too.
        drop(rx);
        hub.publish(batch(1).collect());
        assert_eq!(hub.relay_dropped.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn history_is_bounded_and_last_n_keeps_the_newest() {
        let hub = EventHub::default();
        let msgs = (0..HISTORY as u64 + 5)
            .map(|i| EventMsg {
                time_unix_ns: i,
                ..Default::default()
            })
            .collect();
        hub.publish(msgs);
        let all = hub.recent(&ObserveRequest::default());
        assert_eq!(all.len(), HISTORY);
        assert_eq!(all[0].time_unix_ns, 5);
        let last = hub.recent(&ObserveRequest {
            last: 2,
            ..Default::default()
        });
        assert_eq!(
            last.iter().map(|e| e.time_unix_ns).collect::<Vec<_>>(),
            [HISTORY as u64 + 3, HISTORY as u64 + 4]
        );
    }
}
