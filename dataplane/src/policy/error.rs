//! Errors of the compile step (control path).

/// A NetworkPolicy (or the set of inputs) that cannot be compiled. Nothing of the inputs was
/// applied: compile is all-or-nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A manifest that the Kubernetes API server would reject.
    #[error("NetworkPolicy {policy}: {field}: {reason}")]
    Invalid {
        /// `namespace/name` of the policy.
        policy: String,
        /// Field path, e.g. `spec.ingress[0].from[1].ipBlock.except[0]`.
        field: String,
        reason: InvalidReason,
    },
    /// Two policies with the same namespace and name.
    #[error("NetworkPolicy {policy}: defined twice")]
    Duplicate { policy: String },
}

/// Why a field is invalid, in the API server's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReason {
    #[error("required value")]
    Required,
    #[error("unsupported selector operator {0:?} (In, NotIn, Exists, DoesNotExist)")]
    BadOperator(String),
    #[error("values must be non-empty for In and NotIn")]
    ValuesRequired,
    #[error("values must be empty for Exists and DoesNotExist")]
    ValuesForbidden,
    #[error("invalid label key or value {0:?}")]
    BadLabel(String),
    #[error("unsupported protocol {0:?} (TCP, UDP, SCTP)")]
    BadProtocol(String),
    #[error("port {0} out of range 1-65535")]
    PortOutOfRange(i64),
    #[error("invalid port name {0:?} (IANA service name: 1-15 lowercase letters, digits, '-')")]
    BadPortName(String),
    #[error("endPort requires a numeric port")]
    EndPortWithoutPort,
    #[error("endPort may not be used with a named port")]
    EndPortWithNamedPort,
    #[error("endPort {end} is below port {port}")]
    EndPortBelowPort { port: i64, end: i64 },
    #[error("invalid CIDR {0:?}")]
    BadCidr(String),
    #[error("except {except:?} is not a strict subset of cidr {cidr:?}")]
    ExceptOutsideCidr { cidr: String, except: String },
    #[error("a peer must set ipBlock, or podSelector and/or namespaceSelector")]
    EmptyPeer,
    #[error("ipBlock may not be combined with podSelector or namespaceSelector")]
    IpBlockWithSelector,
    #[error("unsupported policy type {0:?} (Ingress, Egress)")]
    BadPolicyType(String),
    #[error("at most two policy types")]
    TooManyPolicyTypes,
}
