//! Traces: what every stage of the pipeline decided for one frame, and why.
//!
//! [`crate::pipeline::trace`] runs a frame through the same stage code as
//! [`crate::pipeline::process`] (one code path; the stages are generic over the state they read),
//! with a recorder: each stage hands a [`TraceStep`] to the caller's [`TraceSink`]. The worker's
//! state is borrowed shared, so a trace cannot change it: conntrack is read through a
//! [`crate::conntrack::CtView`] (a lookup that removes nothing; what the packet would change is
//! kept in the view), the affinity table is read, not written, and no counter, event or NAT port
//! is taken. When not tracing, recording compiles to nothing (the worker's state implements the
//! recorder as a no-op), so the per-packet cost of the real path is unchanged.
//!
//! Steps are `Copy` values with indices into the tables (a [`ServiceId`], a
//! [`crate::policy::PolicyQuery`] to explain with [`crate::policy::PolicyTable::explain`]); the
//! caller names them (the agent renders them for `sluicectl trace`). [`TraceStage`] names the
//! stages, stably, as [`DropReason`] names drops.

use crate::conntrack::{CtEntry, CtError, CtState, FlowDir};
use crate::flow::FlowKey;
use crate::parse::IcmpKind;
use crate::pipeline::FlowNat;
use crate::policy::{PolicyQuery, PolicyVerdict};
use crate::route::Route;
use crate::service::{Choice, ServiceOutcome};
use crate::tables::ServiceId;
use crate::verdict::{DropReason, Verdict};

macro_rules! trace_stages {
    ($( $(#[doc = $doc:literal])* $name:ident = $label:literal, )*) => {
        /// A stage of the pipeline as a trace names it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum TraceStage {
            $( $(#[doc = $doc])* $name, )*
        }
        impl TraceStage {
            /// Every stage, in pipeline order.
            pub const ALL: &'static [TraceStage] = &[$(TraceStage::$name,)*];
            /// A short stable name (`sluicectl trace` output, JSON `stage`).
            pub fn as_str(self) -> &'static str {
                match self { $(TraceStage::$name => $label,)* }
            }
        }
    };
}

trace_stages! {
    /// VXLAN from another node: outer headers checked and removed.
    Decap = "decap",
    /// Headers validated once; the tuple later stages read.
    Parse = "parse",
    /// The source check: a pod's frames must carry its address; what came on the uplink.
    Source = "source",
    /// Connection tracking: an existing flow (hit) or a new one (miss), and its state.
    Conntrack = "conntrack",
    /// ClusterIP or NodePort, Maglev backend choice, session affinity.
    Service = "service",
    /// NetworkPolicy: egress of the source, ingress of the destination.
    Policy = "policy",
    /// Address and port rewrites (DNAT to the backend, reverse NAT of replies, NodePort SNAT).
    Nat = "nat",
    /// Where the destination is: a local pod, another node over VXLAN, the kernel.
    Route = "route",
    /// The final verdict.
    Verdict = "verdict",
}

/// What the conntrack stage found or would do.
#[derive(Clone, Copy, Debug)]
pub enum CtStep {
    /// No live entry holds the packet's tuple: a new flow.
    Miss,
    /// A live entry holds it, in direction `dir`; `entry` as it was before this packet, `after`
    /// the state the packet moves it to ([`CtState::Invalid`]: the packet does not fit).
    Hit {
        dir: FlowDir,
        entry: CtEntry<FlowNat>,
        after: CtState,
    },
    /// A SYN over a closed connection (TIME_WAIT or CLOSE): the old entry ends and the packet is
    /// decided as a new flow.
    Reopened { entry: CtEntry<FlowNat> },
    /// A new flow would be recorded under its original and reply keys (a trace records nothing).
    Insert {
        orig: FlowKey,
        reply: FlowKey,
        result: Result<(), CtError>,
    },
    /// An ICMP error about the flow of `entry` (its quoted datagram went in `dir.flip()`).
    Related {
        dir: FlowDir,
        entry: CtEntry<FlowNat>,
    },
    /// An ICMP error quoting `quoted`, which no tracked flow sent.
    Unrelated { quoted: Option<FlowKey> },
}

/// One stage's decision.
#[derive(Clone, Copy, Debug)]
pub enum TraceStep {
    /// VXLAN to this node from underlay address `from`: decapsulated, or dropped.
    Decap {
        from: [u8; 4],
        result: Result<(), DropReason>,
    },
    /// The frame parsed: its tuple, TCP flags, IPv4 length and TTL, ICMP kind.
    Parsed {
        key: FlowKey,
        tcp_flags: u8,
        ip_len: u16,
        ttl: u8,
        icmp: IcmpKind,
    },
    /// Parse ended the frame's way (not IPv4, or invalid): the verdict.
    NotParsed(Verdict),
    /// The source check: `pod` when it came from a pod's port (`spoofed` when the address is not
    /// that pod's); `external` when it came on the uplink from outside the cluster (not VXLAN);
    /// `partial` when its L4 checksum is partial (completed or offloaded later).
    Source {
        pod: bool,
        spoofed: bool,
        external: bool,
        partial: bool,
    },
    Conntrack(CtStep),
    /// The service stage: the service the destination is (even without a backend), its outcome
    /// and how the backend was chosen.
    Service {
        svc: Option<ServiceId>,
        outcome: ServiceOutcome,
        how: Choice,
    },
    /// The policy stage's query (after DNAT) and verdict.
    Policy {
        query: PolicyQuery,
        verdict: PolicyVerdict,
    },
    /// The tuple rewritten from `from` to `to`; `snat` for NodePort source NAT.
    Nat {
        from: FlowKey,
        to: FlowKey,
        snat: bool,
    },
    /// The route to `dst`.
    Route {
        dst: [u8; 4],
        route: Route,
    },
    /// The pipeline's verdict.
    Verdict(Verdict),
}

impl TraceStep {
    /// The stage this step belongs to.
    pub fn stage(&self) -> TraceStage {
        match self {
            Self::Decap { .. } => TraceStage::Decap,
            Self::Parsed { .. } | Self::NotParsed(_) => TraceStage::Parse,
            Self::Source { .. } => TraceStage::Source,
            Self::Conntrack(_) => TraceStage::Conntrack,
            Self::Service { .. } => TraceStage::Service,
            Self::Policy { .. } => TraceStage::Policy,
            Self::Nat { .. } => TraceStage::Nat,
            Self::Route { .. } => TraceStage::Route,
            Self::Verdict(_) => TraceStage::Verdict,
        }
    }
}

/// Where a trace's steps go.
pub trait TraceSink {
    fn step(&mut self, step: TraceStep);
}

impl TraceSink for Vec<TraceStep> {
    fn step(&mut self, step: TraceStep) {
        self.push(step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_have_stable_distinct_names() {
        let names: std::collections::BTreeSet<&str> =
            TraceStage::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names.len(), TraceStage::ALL.len());
        assert_eq!(TraceStage::Conntrack.as_str(), "conntrack");
        for (i, s) in TraceStage::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
    }
}
