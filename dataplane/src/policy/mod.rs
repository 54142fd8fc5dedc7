//! The NetworkPolicy stage of the pipeline.
//!
//! The boundary the pipeline calls: [`PolicyTable::decide`] answers, for the first packet of a new
//! flow, whether NetworkPolicy allows it. Established flows never reach it (conntrack lets their
//! packets and replies pass). The table is immutable; a new one is compiled off the hot path and
//! published whole.

#![forbid(unsafe_code)]

use std::net::Ipv4Addr;

/// IP protocol numbers the policy stage distinguishes.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// The first packet of a new flow, after service DNAT (so `dst` is the backend pod, not the VIP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyQuery {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// IP protocol number (see [`proto`]).
    pub proto: u8,
    /// Destination port (0 for protocols without ports).
    pub dst_port: u16,
}

/// Which side's policy denied a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The source pod's egress policy.
    Egress,
    /// The destination pod's ingress policy.
    Ingress,
}

/// Index of a compiled NetworkPolicy in its [`PolicyTable`] (for flow events and counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyId(pub u32);

/// What the policy stage decided for a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyVerdict {
    /// Allowed; `by` names a policy that allowed it when the pod was isolated, `None` when no policy
    /// isolates the pod in either direction concerned.
    Allow { by: Option<PolicyId> },
    /// Denied by the isolation of `direction` (no rule of any selecting policy allowed it).
    Deny { direction: Direction },
}

/// Compiled NetworkPolicy for the whole cluster, as the workers see it.
#[derive(Clone, Debug, Default)]
pub struct PolicyTable {
    _private: (),
}

impl PolicyTable {
    /// A table under which no pod is isolated: every flow is allowed, as in a cluster without
    /// NetworkPolicies.
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Decide a new flow. Constant time in the number of policies and pods.
    pub fn decide(&self, _query: &PolicyQuery) -> PolicyVerdict {
        PolicyVerdict::Allow { by: None }
    }
}
