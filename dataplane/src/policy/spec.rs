//! Validation of `networking.k8s.io/v1` NetworkPolicy manifests into a checked internal form.
//!
//! Everything the API server would reject is rejected here, with the policy's `namespace/name`
//! and the field path.

use super::Protocol;
use super::cidr::CidrSet;
use super::error::{InvalidReason, PolicyError};
use super::selector::Selector;
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Index of a direction in per-direction arrays.
pub(crate) const INGRESS: usize = 0;
pub(crate) const EGRESS: usize = 1;

#[derive(Clone, Debug)]
pub(crate) enum NsMatch {
    /// The policy's own namespace (a peer with only `podSelector`).
    Own,
    /// Namespaces whose labels match.
    Matching(Selector),
}

#[derive(Clone, Debug)]
pub(crate) enum Peer {
    Pods { ns: NsMatch, pods: Selector },
    Block(CidrSet),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PortMatch {
    /// Inclusive range (a single port is `p..=p`; a missing port is `0..=65535`).
    Range(u16, u16),
    Named(String),
}

#[derive(Clone, Debug)]
pub(crate) struct PortSpec {
    pub(crate) protocol: Protocol,
    pub(crate) port: PortMatch,
}

#[derive(Clone, Debug)]
pub(crate) struct Rule {
    /// `None`: every peer (missing or empty `from`/`to`).
    pub(crate) peers: Option<Vec<Peer>>,
    /// `None`: every port and protocol (missing or empty `ports`).
    pub(crate) ports: Option<Vec<PortSpec>>,
}

impl Rule {
    pub(crate) fn has_named_port(&self) -> bool {
        self.ports
            .iter()
            .flatten()
            .any(|p| matches!(p.port, PortMatch::Named(_)))
    }
}

/// A validated NetworkPolicy.
#[derive(Clone, Debug)]
pub(crate) struct CheckedPolicy {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) target: Selector,
    /// Whether the policy isolates selected pods for ingress / egress (after `policyTypes`
    /// defaulting).
    pub(crate) isolates: [bool; 2],
    /// Rules per direction (empty for a direction the policy does not isolate).
    pub(crate) rules: [Vec<Rule>; 2],
}

impl CheckedPolicy {
    pub(crate) fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub(crate) fn has_named_port(&self, dir: usize) -> bool {
        self.rules[dir].iter().any(Rule::has_named_port)
    }
}

/// Validates one manifest.
pub(crate) fn check(np: &NetworkPolicy) -> Result<CheckedPolicy, PolicyError> {
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let name = np.metadata.name.clone().unwrap_or_default();
    let policy = format!("{namespace}/{name}");
    let err = |field: String, reason: InvalidReason| PolicyError::Invalid {
        policy: policy.clone(),
        field,
        reason,
    };
    if name.is_empty() {
        return Err(err("metadata.name".into(), InvalidReason::Required));
    }
    let spec = np.spec.clone().unwrap_or_default();
    let target = match &spec.pod_selector {
        Some(s) => Selector::compile(s, "spec.podSelector").map_err(|(f, r)| err(f, r))?,
        None => Selector::default(),
    };

    let ingress = spec.ingress.unwrap_or_default();
    let egress = spec.egress.unwrap_or_default();
    let isolates = match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            let mut iso = [false; 2];
            if types.len() > 2 {
                return Err(err(
                    "spec.policyTypes".into(),
                    InvalidReason::TooManyPolicyTypes,
                ));
            }
            for (i, t) in types.iter().enumerate() {
                let d = match t.as_str() {
                    "Ingress" => INGRESS,
                    "Egress" => EGRESS,
                    other => {
                        return Err(err(
                            format!("spec.policyTypes[{i}]"),
                            InvalidReason::BadPolicyType(other.to_owned()),
                        ));
                    }
                };
                iso[d] = true;
            }
            iso
        }
        // Defaulting as the API server does: Ingress always, Egress when egress rules exist.
        _ => [true, !egress.is_empty()],
    };

    // Rules are validated even for a direction the policy does not isolate (the API server
    // validates them too), then dropped.
    let mut rules: [Vec<Rule>; 2] = [Vec::new(), Vec::new()];
    for (i, r) in ingress.iter().enumerate() {
        let path = format!("spec.ingress[{i}]");
        let rule = check_rule(r.from.as_deref(), r.ports.as_deref(), &path, "from")
            .map_err(|(f, r)| err(f, r))?;
        rules[INGRESS].push(rule);
    }
    for (i, r) in egress.iter().enumerate() {
        let path = format!("spec.egress[{i}]");
        let rule = check_rule(r.to.as_deref(), r.ports.as_deref(), &path, "to")
            .map_err(|(f, r)| err(f, r))?;
        rules[EGRESS].push(rule);
    }
    for d in [INGRESS, EGRESS] {
        if !isolates[d] {
            rules[d].clear();
        }
    }
    Ok(CheckedPolicy {
        namespace,
        name,
        target,
        isolates,
        rules,
    })
}

type FieldError = (String, InvalidReason);

fn check_rule(
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    path: &str,
    peers_field: &str,
) -> Result<Rule, FieldError> {
    let peers = match peers {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| check_peer(p, &format!("{path}.{peers_field}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let ports = match ports {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| check_port(p, &format!("{path}.ports[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(Rule { peers, ports })
}

fn check_peer(p: &NetworkPolicyPeer, path: &str) -> Result<Peer, FieldError> {
    match (&p.ip_block, &p.pod_selector, &p.namespace_selector) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            Err((path.to_owned(), InvalidReason::IpBlockWithSelector))
        }
        (Some(b), None, None) => Ok(Peer::Block(check_block(b, &format!("{path}.ipBlock"))?)),
        (None, None, None) => Err((path.to_owned(), InvalidReason::EmptyPeer)),
        (None, pods, ns) => {
            let pods = match pods {
                Some(s) => Selector::compile(s, &format!("{path}.podSelector"))?,
                None => Selector::default(),
            };
            let ns = match ns {
                Some(s) => {
                    NsMatch::Matching(Selector::compile(s, &format!("{path}.namespaceSelector"))?)
                }
                None => NsMatch::Own,
            };
            Ok(Peer::Pods { ns, pods })
        }
    }
}

fn check_block(b: &IPBlock, path: &str) -> Result<CidrSet, FieldError> {
    let cidr: IpNet = b.cidr.parse().map_err(|_| {
        (
            format!("{path}.cidr"),
            InvalidReason::BadCidr(b.cidr.clone()),
        )
    })?;
    let mut except = Vec::new();
    for (i, e) in b.except.iter().flatten().enumerate() {
        let field = format!("{path}.except[{i}]");
        let ex: IpNet = e
            .parse()
            .map_err(|_| (field.clone(), InvalidReason::BadCidr(e.clone())))?;
        let inside = match (cidr, ex) {
            (IpNet::V4(c), IpNet::V4(x)) => {
                c.contains(&x.network()) && x.prefix_len() > c.prefix_len()
            }
            (IpNet::V6(c), IpNet::V6(x)) => {
                c.contains(&x.network()) && x.prefix_len() > c.prefix_len()
            }
            _ => false,
        };
        if !inside {
            return Err((
                field,
                InvalidReason::ExceptOutsideCidr {
                    cidr: b.cidr.clone(),
                    except: e.clone(),
                },
            ));
        }
        if let IpNet::V4(x) = ex {
            except.push((u32::from(x.network()), x.prefix_len()));
        }
    }
    Ok(match cidr {
        IpNet::V4(c) => CidrSet::block(u32::from(c.network()), c.prefix_len(), &except),
        // IPv6 blocks are valid but match no IPv4 address.
        IpNet::V6(_) => CidrSet::default(),
    })
}

fn check_port(p: &NetworkPolicyPort, path: &str) -> Result<PortSpec, FieldError> {
    let protocol = Protocol::from_k8s(p.protocol.as_deref()).ok_or_else(|| {
        (
            format!("{path}.protocol"),
            InvalidReason::BadProtocol(p.protocol.clone().unwrap_or_default()),
        )
    })?;
    let in_range = |n: i32, field: &str| -> Result<u16, FieldError> {
        u16::try_from(n).ok().filter(|n| *n >= 1).ok_or((
            format!("{path}.{field}"),
            InvalidReason::PortOutOfRange(i64::from(n)),
        ))
    };
    let port = match (&p.port, p.end_port) {
        (None, None) => PortMatch::Range(0, u16::MAX),
        (None, Some(_)) => {
            return Err((format!("{path}.endPort"), InvalidReason::EndPortWithoutPort));
        }
        (Some(IntOrString::String(_)), Some(_)) => {
            return Err((
                format!("{path}.endPort"),
                InvalidReason::EndPortWithNamedPort,
            ));
        }
        (Some(IntOrString::String(name)), None) => {
            if !is_iana_svc_name(name) {
                return Err((
                    format!("{path}.port"),
                    InvalidReason::BadPortName(name.clone()),
                ));
            }
            PortMatch::Named(name.clone())
        }
        (Some(IntOrString::Int(n)), end) => {
            let lo = in_range(*n, "port")?;
            let hi = match end {
                None => lo,
                Some(e) => {
                    let hi = in_range(e, "endPort")?;
                    if hi < lo {
                        return Err((
                            format!("{path}.endPort"),
                            InvalidReason::EndPortBelowPort {
                                port: i64::from(*n),
                                end: i64::from(e),
                            },
                        ));
                    }
                    hi
                }
            };
            PortMatch::Range(lo, hi)
        }
    };
    Ok(PortSpec { protocol, port })
}

/// IANA service name, as Kubernetes validates named ports: 1-15 characters of `[a-z0-9-]`, at
/// least one letter, no leading, trailing or doubled hyphen.
pub(crate) fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}
