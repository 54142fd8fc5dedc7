//! Flow events: what the pipeline tells an observer about the flows it handles, and the sink it
//! writes them into ([`EventSink`]; the agent's is a bounded lock-free ring per worker).
//!
//! A worker emits (see `pipeline`):
//! - [`EventKind::NewConnection`]: a new flow was allowed and recorded in conntrack, with the
//!   service it was balanced to and the translated tuple (the chosen backend after DNAT), the
//!   egress port and the policy verdict that allowed it;
//! - [`EventKind::PolicyVerdict`]: a new flow was denied by NetworkPolicy (the event carries the
//!   drop reason and the direction whose isolation denied it, i.e. "default deny");
//! - [`EventKind::Drop`]: any other drop, with its [`DropReason`] and the tuple when parsed;
//! - [`EventKind::ConnectionEnd`]: a TCP flow closed (FIN handshake done or RST), with packet and
//!   byte counts both ways.
//!
//! Emitting must never allocate, block or take a lock: that is the contract of every
//! [`EventSink`] (a bounded ring that counts an event as lost when it is full). Events are rare
//! (new flows, drops, ends), so the one dynamic call per event does not show on the hot path.

use crate::flow::FlowKey;
use crate::policy::PolicyVerdict;
use crate::tables::ServiceId;
use crate::verdict::{DropReason, PortId};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EventKind {
    NewConnection,
    PolicyVerdict,
    Drop,
    ConnectionEnd,
}

impl EventKind {
    /// Stable name (JSON `kind` field).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NewConnection => "new_connection",
            Self::PolicyVerdict => "policy_verdict",
            Self::Drop => "drop",
            Self::ConnectionEnd => "connection_end",
        }
    }
}

/// Packets and bytes of a flow, both ways (`[original, reply]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
}

/// One flow event. `Copy`, fixed size; written into a ring slot by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// The worker's monotonic time of the packet, in nanoseconds.
    pub ts_ns: u64,
    pub kind: EventKind,
    /// The packet's tuple as it arrived (`None` when it did not parse).
    pub tuple: Option<FlowKey>,
    /// The tuple after NAT (for a service: the chosen backend in `dst`/`dst_port`).
    pub translated: Option<FlowKey>,
    /// The service the flow was balanced to (its VIP:port is `tuple`'s destination).
    pub service: Option<ServiceId>,
    pub ingress: PortId,
    pub egress: Option<PortId>,
    /// The policy verdict for a new flow (allowed by a policy or unisolated, or denied).
    pub policy: Option<PolicyVerdict>,
    pub drop: Option<DropReason>,
    /// For [`EventKind::ConnectionEnd`].
    pub counts: FlowCounts,
}

impl FlowEvent {
    /// An event with only the kind, time and ingress port set.
    pub fn new(kind: EventKind, ts_ns: u64, ingress: PortId) -> Self {
        Self {
            ts_ns,
            kind,
            tuple: None,
            translated: None,
            service: None,
            ingress,
            egress: None,
            policy: None,
            drop: None,
            counts: FlowCounts::default(),
        }
    }

    /// Whether the packet the event is about was dropped.
    pub fn dropped(&self) -> bool {
        self.drop.is_some()
    }
}

/// Where the pipeline writes events (`WorkerState::events`). Implementations never allocate,
/// block or take a lock on `emit` (the agent's is its per-worker ring; tests record).
pub trait EventSink: Send + std::fmt::Debug {
    /// Take one event, or count it as lost.
    fn emit(&mut self, ev: FlowEvent);
}
