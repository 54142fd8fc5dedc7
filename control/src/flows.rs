//! Flow events of the whole cluster: what the agents push (`PushFlowEvents`) and what `Observe`
//! serves (`sluicectl observe` without `--agent-socket`).
//!
//! The control plane keeps, per node, the last [`NODE_HISTORY`] events it received (oldest
//! dropped first) and a live feed for followers. Nothing is stored: a restarted control plane
//! starts empty. Memory is bounded by the history per node times the nodes that pushed.
//!
//! History and feed are updated under one lock, and a follower subscribes under the same lock it
//! reads the history with, so a follower sees every event exactly once (unless it lags behind the
//! feed by more than [`FEED_CAPACITY`] events, which skips and logs).

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::agent_api::{FlowEvent, ObserveRequest};
use crate::observe::matches;

/// Events kept per node.
pub const NODE_HISTORY: usize = 10_000;
/// Events a follower may fall behind the live feed before it skips.
pub const FEED_CAPACITY: usize = 8192;

/// What the control plane knows of one node's events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeFlowStats {
    /// Events received from the node since the control plane started.
    pub received: u64,
    /// Events the node's agent reported it dropped instead of sending (its last report).
    pub agent_dropped: u64,
    /// Events held in the node's history.
    pub held: usize,
    /// Open push streams of the node.
    pub streams: u32,
}

#[derive(Debug, Default)]
struct NodeFlows {
    history: VecDeque<Arc<FlowEvent>>,
    stats: NodeFlowStats,
}

/// The relay: per-node histories and the live feed.
#[derive(Debug)]
pub struct FlowRelay {
    per_node: usize,
    nodes: Mutex<BTreeMap<String, NodeFlows>>,
    feed: broadcast::Sender<Arc<FlowEvent>>,
}

impl Default for FlowRelay {
    fn default() -> Self {
        Self::new(NODE_HISTORY)
    }
}

impl FlowRelay {
    /// A relay keeping `per_node` events per node (at least 1).
    pub fn new(per_node: usize) -> Self {
        Self {
            per_node: per_node.max(1),
            nodes: Mutex::default(),
            feed: broadcast::channel(FEED_CAPACITY).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NodeFlows>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a batch of `node`'s events (oldest first; their `node` field is set to `node`), and
    /// the agent's count of events it dropped so far.
    pub fn publish(&self, node: &str, events: Vec<FlowEvent>, agent_dropped: u64) {
        let mut nodes = self.lock();
        let n = nodes.entry(node.to_owned()).or_default();
        n.stats.received += events.len() as u64;
        n.stats.agent_dropped = agent_dropped;
        for mut e in events {
            node.clone_into(&mut e.node);
            let e = Arc::new(e);
            if n.history.len() >= self.per_node {
                n.history.pop_front();
            }
            n.history.push_back(e.clone());
            // No followers is not an error.
            let _ = self.feed.send(e);
        }
        n.stats.held = n.history.len();
    }

    /// A push stream of `node` opened (`+1`) or closed (`-1`).
    pub fn stream_opened(&self, node: &str, open: bool) {
        let mut nodes = self.lock();
        let s = &mut nodes.entry(node.to_owned()).or_default().stats;
        s.streams = if open {
            s.streams.saturating_add(1)
        } else {
            s.streams.saturating_sub(1)
        };
    }

    /// Per node: what was received, dropped, held.
    pub fn stats(&self) -> Vec<(String, NodeFlowStats)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.stats.clone()))
            .collect()
    }

    /// The matching events of every node's history merged by time (the newest `req.last` when
    /// non-zero), and a receiver of the events published after them.
    pub fn recent_and_subscribe(
        &self,
        req: &ObserveRequest,
    ) -> (Vec<FlowEvent>, broadcast::Receiver<Arc<FlowEvent>>) {
        let nodes = self.lock();
        let rx = self.feed.subscribe();
        let mut v: Vec<FlowEvent> = nodes
            .iter()
            .filter(|(name, _)| req.node.is_empty() || **name == req.node)
            .flat_map(|(_, n)| n.history.iter())
            .filter(|e| matches(req, e))
            .map(|e| (**e).clone())
            .collect();
        drop(nodes);
        // Stable: each node's own order stands among equal times.
        v.sort_by_key(|e| e.time_unix_ns);
        if req.last > 0 && v.len() > req.last as usize {
            v.drain(..v.len() - req.last as usize);
        }
        (v, rx)
    }
}

/// The stream type of the control plane's `Observe`.
pub type ObserveStream = Pin<Box<dyn Stream<Item = Result<FlowEvent, tonic::Status>> + Send>>;

/// Serve one `Observe` call: the matching history, then (with `follow`) live events.
pub fn observe(relay: &FlowRelay, req: ObserveRequest) -> ObserveStream {
    let (tx, rx) = mpsc::channel(1024);
    let (recent, mut live) = relay.recent_and_subscribe(&req);
    tokio::spawn(async move {
        for e in recent {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        if !req.follow {
            return;
        }
        loop {
            let e = tokio::select! {
                e = live.recv() => e,
                () = tx.closed() => return,
            };
            match e {
                Ok(e) => {
                    if matches(&req, &e) && tx.send(Ok((*e).clone())).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("an observe follower lagged, {n} flow events skipped");
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
    use futures::StreamExt;

    fn ev(t: u64, verdict: &str) -> FlowEvent {
        FlowEvent {
            time_unix_ns: t,
            verdict: verdict.into(),
            node: "spoofed".into(),
            ..Default::default()
        }
    }

    #[test]
    fn history_is_bounded_per_node_and_merged_by_time() {
        let r = FlowRelay::new(3);
        r.publish("a", (0..5).map(|t| ev(t * 10, "DROPPED")).collect(), 0);
        r.publish("b", vec![ev(15, "FORWARDED"), ev(25, "DROPPED")], 7);
        let (all, _) = r.recent_and_subscribe(&ObserveRequest::default());
        let got: Vec<(u64, &str)> = all
            .iter()
            .map(|e| (e.time_unix_ns, e.node.as_str()))
            .collect();
        assert_eq!(got, [(15, "b"), (20, "a"), (25, "b"), (30, "a"), (40, "a")]);
        let (last, _) = r.recent_and_subscribe(&ObserveRequest {
            verdict: "DROPPED".into(),
            node: "b".into(),
            ..Default::default()
        });
        assert_eq!(last.len(), 1);
        let (two, _) = r.recent_and_subscribe(&ObserveRequest {
            last: 2,
            ..Default::default()
        });
        assert_eq!(two[0].time_unix_ns, 30);
        let stats = r.stats();
        assert_eq!(stats[0].1.received, 5);
        assert_eq!(stats[0].1.held, 3);
        assert_eq!(stats[1].1.agent_dropped, 7);
    }

    #[tokio::test]
    async fn followers_get_history_then_live_events_once() {
        let r = Arc::new(FlowRelay::default());
        r.publish("a", vec![ev(1, "DROPPED")], 0);
        let mut s = observe(
            &r,
            ObserveRequest {
                follow: true,
                verdict: "DROPPED".into(),
                ..Default::default()
            },
        );
        r.publish("b", vec![ev(0, "FORWARDED"), ev(0, "DROPPED")], 0);
        let first = s.next().await.unwrap().unwrap();
        let second = s.next().await.unwrap().unwrap();
        assert_eq!(
            (first.node.as_str(), second.node.as_str()),
            ("a", "b"),
            "live events from another node are not skipped for their earlier time"
        );
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), s.next())
                .await
                .is_err(),
            "the forwarded event was filtered out and nothing else is pending"
        );
    }
}
