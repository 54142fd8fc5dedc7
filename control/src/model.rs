//! The control plane's objects: kinds, store keys, and validation of Kubernetes objects.
//!
//! Store layout (one key space, shared by both backends and by every replica):
//! - `/sluice/o/<kind>/<namespace>/<name>`: objects, each a prost-encoded [`api::Object`]
//!   (namespace empty for nodes and namespaces). Watches cover this prefix only.
//! - `/sluice/a/<pool>/<value>`: allocation claims (pod CIDRs, ClusterIPs, NodePorts), the value
//!   being the owner's object key. Claims are created with an "absent" compare, so two replicas
//!   never hand out the same address.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace, Pod as K8sPod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use prost::Message;

use crate::api::{self, Kind, ObjectRef, object::Body};

pub const OBJECT_PREFIX: &str = "/sluice/o/";
pub const ALLOC_PREFIX: &str = "/sluice/a/";

/// The namespace of namespaced objects that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Every kind the control plane stores, in apply order (namespaces before what lives in them).
pub const KINDS: [Kind; 6] = [
    Kind::Namespace,
    Kind::Node,
    Kind::Pod,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::NetworkPolicy,
];

/// The Kubernetes name of a kind ("EndpointSlice").
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Unspecified => "",
        Kind::Node => "Node",
        Kind::Pod => "Pod",
        Kind::Namespace => "Namespace",
        Kind::Service => "Service",
        Kind::EndpointSlice => "EndpointSlice",
        Kind::NetworkPolicy => "NetworkPolicy",
    }
}

/// A kind from its Kubernetes name, plural, or short name, any case ("svc", "netpol", "Services").
pub fn parse_kind(s: &str) -> Option<Kind> {
    Some(match s.to_ascii_lowercase().as_str() {
        "node" | "nodes" | "no" => Kind::Node,
        "pod" | "pods" | "po" => Kind::Pod,
        "namespace" | "namespaces" | "ns" => Kind::Namespace,
        "service" | "services" | "svc" => Kind::Service,
        "endpointslice" | "endpointslices" | "eps" => Kind::EndpointSlice,
        "networkpolicy" | "networkpolicies" | "netpol" => Kind::NetworkPolicy,
        _ => return None,
    })
}

pub fn is_namespaced(kind: Kind) -> bool {
    !matches!(kind, Kind::Node | Kind::Namespace | Kind::Unspecified)
}

fn kind_segment(kind: Kind) -> &'static str {
    match kind {
        Kind::Unspecified => "",
        Kind::Node => "node",
        Kind::Pod => "pod",
        Kind::Namespace => "namespace",
        Kind::Service => "service",
        Kind::EndpointSlice => "endpointslice",
        Kind::NetworkPolicy => "networkpolicy",
    }
}

/// The prefix of one kind's keys, or of all objects for `Kind::Unspecified`.
pub fn kind_prefix(kind: Kind) -> String {
    match kind {
        Kind::Unspecified => OBJECT_PREFIX.to_string(),
        k => format!("{OBJECT_PREFIX}{}/", kind_segment(k)),
    }
}

pub fn object_key(r: &ObjectRef) -> String {
    format!("{}{}/{}", kind_prefix(r.kind()), r.namespace, r.name)
}

pub fn parse_object_key(key: &str) -> Option<ObjectRef> {
    let rest = key.strip_prefix(OBJECT_PREFIX)?;
    let mut it = rest.splitn(3, '/');
    let segment = it.next()?;
    let kind = KINDS.into_iter().find(|k| kind_segment(*k) == segment)?;
    let namespace = it.next()?.to_string();
    let name = it.next()?.to_string();
    Some(ObjectRef {
        kind: kind as i32,
        namespace,
        name,
    })
}

/// The key of the claim on `value` in allocation pool `pool` (`/` in the value becomes `_`).
pub fn alloc_key(pool: &str, value: &str) -> String {
    format!("{ALLOC_PREFIX}{pool}/{}", value.replace('/', "_"))
}

/// The claimed value of an allocation key: [`alloc_key`] undone.
pub fn alloc_value(key: &str) -> String {
    key.rsplit('/').next().unwrap_or_default().replace('_', "/")
}

/// An object's identity for people: "Service default/web", "Node node-a".
pub fn describe(r: &ObjectRef) -> String {
    if r.namespace.is_empty() {
        format!("{} {}", kind_name(r.kind()), r.name)
    } else {
        format!("{} {}/{}", kind_name(r.kind()), r.namespace, r.name)
    }
}

/// The identity of an object.
pub fn object_ref(o: &api::Object) -> Option<ObjectRef> {
    Some(match o.body.as_ref()? {
        Body::Node(n) => ObjectRef {
            kind: Kind::Node as i32,
            namespace: String::new(),
            name: n.name.clone(),
        },
        Body::Pod(p) => ObjectRef {
            kind: Kind::Pod as i32,
            namespace: p.namespace.clone(),
            name: p.name.clone(),
        },
        Body::K8s(k) => ObjectRef {
            kind: k.kind,
            namespace: k.namespace.clone(),
            name: k.name.clone(),
        },
    })
}

pub fn encode_object(o: &api::Object) -> Vec<u8> {
    o.encode_to_vec()
}

/// Decode a stored object, stamping its revision.
pub fn decode_object(bytes: &[u8], revision: u64) -> Result<api::Object, prost::DecodeError> {
    let mut o = api::Object::decode(bytes)?;
    o.revision = revision;
    Ok(o)
}

/// A Kubernetes object of a kind Sluice understands, parsed with the k8s-openapi types.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "control path; a Service is the common case and the Pod is boxed"
)]
pub enum K8sObject {
    Namespace(Namespace),
    Pod(Box<K8sPod>),
    Service(Service),
    EndpointSlice(EndpointSlice),
    NetworkPolicy(NetworkPolicy),
}

/// What is wrong with an object: the field path and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn fe(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

impl K8sObject {
    /// Parse the JSON of an object of `kind`.
    pub fn from_json(kind: Kind, json: &str) -> Result<Self, FieldError> {
        fn p<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, FieldError> {
            serde_json::from_str(json).map_err(|e| fe("(document)", e.to_string()))
        }
        Ok(match kind {
            Kind::Namespace => K8sObject::Namespace(p(json)?),
            Kind::Pod => K8sObject::Pod(Box::new(p(json)?)),
            Kind::Service => K8sObject::Service(p(json)?),
            Kind::EndpointSlice => K8sObject::EndpointSlice(p(json)?),
            Kind::NetworkPolicy => K8sObject::NetworkPolicy(p(json)?),
            other => {
                return Err(fe(
                    "kind",
                    format!(
                        "{} is not a Kubernetes object Sluice accepts",
                        kind_name(other)
                    ),
                ));
            }
        })
    }

    /// Parse a generic JSON value whose `kind` says what it is.
    pub fn from_value(v: serde_json::Value) -> Result<Self, FieldError> {
        fn p<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, FieldError> {
            serde_json::from_value(v).map_err(|e| fe("(document)", e.to_string()))
        }
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| fe("kind", "missing"))?
            .to_string();
        let api_version = v
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .ok_or_else(|| fe("apiVersion", "missing"))?;
        let want = match kind.as_str() {
            "Namespace" | "Pod" | "Service" => "v1",
            "EndpointSlice" => "discovery.k8s.io/v1",
            "NetworkPolicy" => "networking.k8s.io/v1",
            other => {
                return Err(fe(
                    "kind",
                    format!(
                        "{other:?} is not supported (Namespace, Pod, Service, EndpointSlice, NetworkPolicy are)"
                    ),
                ));
            }
        };
        if api_version != want {
            return Err(fe(
                "apiVersion",
                format!("{kind} needs {want:?}, not {api_version:?}"),
            ));
        }
        Ok(match kind.as_str() {
            "Namespace" => K8sObject::Namespace(p(v)?),
            "Pod" => K8sObject::Pod(Box::new(p(v)?)),
            "Service" => K8sObject::Service(p(v)?),
            "EndpointSlice" => K8sObject::EndpointSlice(p(v)?),
            _ => K8sObject::NetworkPolicy(p(v)?),
        })
    }

    pub fn kind(&self) -> Kind {
        match self {
            K8sObject::Namespace(_) => Kind::Namespace,
            K8sObject::Pod(_) => Kind::Pod,
            K8sObject::Service(_) => Kind::Service,
            K8sObject::EndpointSlice(_) => Kind::EndpointSlice,
            K8sObject::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            K8sObject::Namespace(o) => &o.metadata,
            K8sObject::Pod(o) => &o.metadata,
            K8sObject::Service(o) => &o.metadata,
            K8sObject::EndpointSlice(o) => &o.metadata,
            K8sObject::NetworkPolicy(o) => &o.metadata,
        }
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            K8sObject::Namespace(o) => &mut o.metadata,
            K8sObject::Pod(o) => &mut o.metadata,
            K8sObject::Service(o) => &mut o.metadata,
            K8sObject::EndpointSlice(o) => &mut o.metadata,
            K8sObject::NetworkPolicy(o) => &mut o.metadata,
        }
    }

    pub fn to_json(&self) -> String {
        let r = match self {
            K8sObject::Namespace(o) => serde_json::to_string(o),
            K8sObject::Pod(o) => serde_json::to_string(o),
            K8sObject::Service(o) => serde_json::to_string(o),
            K8sObject::EndpointSlice(o) => serde_json::to_string(o),
            K8sObject::NetworkPolicy(o) => serde_json::to_string(o),
        };
        // Serializing a k8s-openapi value to JSON cannot fail (string keys, no non-finite floats).
        r.unwrap_or_default()
    }

    /// Fill defaults (namespace "default") and check what Sluice relies on. `service_cidr` bounds
    /// a given ClusterIP; `node_ports` bounds given NodePorts.
    pub fn validate(
        &mut self,
        service_cidr: Ipv4Net,
        node_ports: (u16, u16),
    ) -> Result<(), FieldError> {
        let kind = self.kind();
        let meta = self.metadata_mut();
        let name = meta.name.clone().unwrap_or_default();
        check_name("metadata.name", &name)?;
        if is_namespaced(kind) {
            let ns = meta
                .namespace
                .get_or_insert_with(|| DEFAULT_NAMESPACE.to_string());
            check_name("metadata.namespace", ns)?;
        } else if meta.namespace.as_deref().is_some_and(|n| !n.is_empty()) {
            return Err(fe(
                "metadata.namespace",
                format!("{} is not namespaced", kind_name(kind)),
            ));
        }
        match self {
            K8sObject::Namespace(_) => Ok(()),
            K8sObject::Pod(p) => {
                for (ci, c) in p.spec.iter().flat_map(|s| s.containers.iter()).enumerate() {
                    for (pi, port) in c.ports.iter().flatten().enumerate() {
                        let f = format!("spec.containers[{ci}].ports[{pi}]");
                        check_port(&format!("{f}.containerPort"), port.container_port)?;
                        check_protocol(&format!("{f}.protocol"), port.protocol.as_deref())?;
                    }
                }
                Ok(())
            }
            K8sObject::Service(s) => validate_service(s, service_cidr, node_ports),
            K8sObject::EndpointSlice(e) => validate_slice(e),
            K8sObject::NetworkPolicy(n) => validate_policy(n),
        }
    }

    /// The `K8sObject` message carrying this object.
    pub fn to_proto(&self) -> api::K8sObject {
        let meta = self.metadata();
        api::K8sObject {
            kind: self.kind() as i32,
            namespace: if is_namespaced(self.kind()) {
                meta.namespace.clone().unwrap_or_default()
            } else {
                String::new()
            },
            name: meta.name.clone().unwrap_or_default(),
            json: self.to_json(),
        }
    }
}

fn check_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(fe(
            field,
            format!(
                "{name:?} is not a valid name (lowercase letters, digits, '-' and '.', at most 253)"
            ),
        ))
    }
}

fn check_port(field: &str, port: i32) -> Result<(), FieldError> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(fe(field, format!("{port} is not a port (1-65535)")))
    }
}

fn check_protocol(field: &str, p: Option<&str>) -> Result<(), FieldError> {
    match p {
        None | Some("TCP" | "UDP" | "SCTP") => Ok(()),
        Some(other) => Err(fe(field, format!("{other:?} is not TCP, UDP or SCTP"))),
    }
}

fn validate_service(
    s: &Service,
    service_cidr: Ipv4Net,
    node_ports: (u16, u16),
) -> Result<(), FieldError> {
    let Some(spec) = &s.spec else {
        return Err(fe("spec", "missing"));
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !matches!(ty, "ClusterIP" | "NodePort" | "LoadBalancer") {
        return Err(fe(
            "spec.type",
            format!("{ty:?} is not supported (ClusterIP, NodePort, LoadBalancer are)"),
        ));
    }
    match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => {}
        Some(ip) => {
            let addr: Ipv4Addr = ip
                .parse()
                .map_err(|_| fe("spec.clusterIP", format!("{ip:?} is not an IPv4 address")))?;
            if !service_cidr.contains(&addr) {
                return Err(fe(
                    "spec.clusterIP",
                    format!("{ip} is outside the service CIDR {service_cidr}"),
                ));
            }
        }
    }
    match spec.session_affinity.as_deref() {
        None | Some("None" | "ClientIP") => {}
        Some(other) => {
            return Err(fe(
                "spec.sessionAffinity",
                format!("{other:?} is not None or ClientIP"),
            ));
        }
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() && spec.cluster_ip.as_deref() != Some("None") {
        return Err(fe("spec.ports", "a Service needs at least one port"));
    }
    for (i, p) in ports.iter().enumerate() {
        check_port(&format!("spec.ports[{i}].port"), p.port)?;
        check_protocol(&format!("spec.ports[{i}].protocol"), p.protocol.as_deref())?;
        if let Some(np) = p.node_port.filter(|n| *n != 0) {
            if ty == "ClusterIP" {
                return Err(fe(
                    format!("spec.ports[{i}].nodePort"),
                    "only NodePort and LoadBalancer Services have node ports",
                ));
            }
            if np < i32::from(node_ports.0) || np > i32::from(node_ports.1) {
                return Err(fe(
                    format!("spec.ports[{i}].nodePort"),
                    format!(
                        "{np} is outside the NodePort range {}-{}",
                        node_ports.0, node_ports.1
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn validate_slice(e: &EndpointSlice) -> Result<(), FieldError> {
    if e.address_type != "IPv4" {
        return Err(fe(
            "addressType",
            format!("{:?} is not supported (IPv4 is)", e.address_type),
        ));
    }
    let labelled = e
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .is_some_and(|s| !s.is_empty());
    if !labelled {
        return Err(fe(
            "metadata.labels[\"kubernetes.io/service-name\"]",
            "missing: it names the Service of these endpoints",
        ));
    }
    for (i, ep) in e.endpoints.iter().flatten().enumerate() {
        if ep.addresses.is_empty() {
            return Err(fe(format!("endpoints[{i}].addresses"), "empty"));
        }
        for (j, a) in ep.addresses.iter().enumerate() {
            a.parse::<Ipv4Addr>().map_err(|_| {
                fe(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{a:?} is not an IPv4 address"),
                )
            })?;
        }
    }
    for (i, p) in e.ports.iter().flatten().enumerate() {
        if let Some(port) = p.port {
            check_port(&format!("ports[{i}].port"), port)?;
        }
        check_protocol(&format!("ports[{i}].protocol"), p.protocol.as_deref())?;
    }
    Ok(())
}

fn validate_selector(field: &str, s: &LabelSelector) -> Result<(), FieldError> {
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        let n = e.values.as_ref().map_or(0, |v| v.len());
        match e.operator.as_str() {
            "In" | "NotIn" if n == 0 => {
                return Err(fe(
                    format!("{f}.values"),
                    format!("{} needs values", e.operator),
                ));
            }
            "Exists" | "DoesNotExist" if n != 0 => {
                return Err(fe(
                    format!("{f}.values"),
                    format!("{} takes no values", e.operator),
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(fe(
                    format!("{f}.operator"),
                    format!("{other:?} is not In, NotIn, Exists or DoesNotExist"),
                ));
            }
        }
    }
    Ok(())
}

fn validate_peers(
    field: &str,
    peers: &[k8s_openapi::api::networking::v1::NetworkPolicyPeer],
) -> Result<(), FieldError> {
    for (i, p) in peers.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if let Some(s) = &p.pod_selector {
            validate_selector(&format!("{f}.podSelector"), s)?;
        }
        if let Some(s) = &p.namespace_selector {
            validate_selector(&format!("{f}.namespaceSelector"), s)?;
        }
        if let Some(b) = &p.ip_block {
            if p.pod_selector.is_some() || p.namespace_selector.is_some() {
                return Err(fe(f.clone(), "ipBlock cannot be combined with selectors"));
            }
            let cidr: Ipv4Net = b.cidr.parse().map_err(|_| {
                fe(
                    format!("{f}.ipBlock.cidr"),
                    format!("{:?} is not an IPv4 CIDR", b.cidr),
                )
            })?;
            for (j, x) in b.except.iter().flatten().enumerate() {
                let ex: Ipv4Net = x.parse().map_err(|_| {
                    fe(
                        format!("{f}.ipBlock.except[{j}]"),
                        format!("{x:?} is not an IPv4 CIDR"),
                    )
                })?;
                if !cidr.contains(&ex) {
                    return Err(fe(
                        format!("{f}.ipBlock.except[{j}]"),
                        format!("{ex} is not inside {cidr}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn validate_policy_ports(
    field: &str,
    ports: &[k8s_openapi::api::networking::v1::NetworkPolicyPort],
) -> Result<(), FieldError> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    for (i, p) in ports.iter().enumerate() {
        let f = format!("{field}[{i}]");
        check_protocol(&format!("{f}.protocol"), p.protocol.as_deref())?;
        match (&p.port, p.end_port) {
            (Some(IntOrString::Int(port)), end) => {
                check_port(&format!("{f}.port"), *port)?;
                if let Some(end) = end {
                    check_port(&format!("{f}.endPort"), end)?;
                    if end < *port {
                        return Err(fe(
                            format!("{f}.endPort"),
                            format!("{end} is below port {port}"),
                        ));
                    }
                }
            }
            (Some(IntOrString::String(_)), Some(_)) => {
                return Err(fe(format!("{f}.endPort"), "endPort needs a numeric port"));
            }
            (None, Some(_)) => return Err(fe(format!("{f}.endPort"), "endPort needs a port")),
            _ => {}
        }
    }
    Ok(())
}

fn validate_policy(n: &NetworkPolicy) -> Result<(), FieldError> {
    let Some(spec) = &n.spec else {
        return Err(fe("spec", "missing"));
    };
    if let Some(s) = &spec.pod_selector {
        validate_selector("spec.podSelector", s)?;
    }
    for (i, t) in spec.policy_types.iter().flatten().enumerate() {
        if t != "Ingress" && t != "Egress" {
            return Err(fe(
                format!("spec.policyTypes[{i}]"),
                format!("{t:?} is not Ingress or Egress"),
            ));
        }
    }
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        validate_peers(
            &format!("spec.ingress[{i}].from"),
            r.from.as_deref().unwrap_or_default(),
        )?;
        validate_policy_ports(
            &format!("spec.ingress[{i}].ports"),
            r.ports.as_deref().unwrap_or_default(),
        )?;
    }
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        validate_peers(
            &format!("spec.egress[{i}].to"),
            r.to.as_deref().unwrap_or_default(),
        )?;
        validate_policy_ports(
            &format!("spec.egress[{i}].ports"),
            r.ports.as_deref().unwrap_or_default(),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let r = ObjectRef {
            kind: Kind::Service as i32,
            namespace: "ns".into(),
            name: "web".into(),
        };
        assert_eq!(object_key(&r), "/sluice/o/service/ns/web");
        assert_eq!(parse_object_key(&object_key(&r)), Some(r));
        let n = ObjectRef {
            kind: Kind::Node as i32,
            namespace: String::new(),
            name: "a".into(),
        };
        assert_eq!(parse_object_key(&object_key(&n)), Some(n));
        assert_eq!(parse_object_key("/sluice/o/bogus/x/y"), None);
    }

    fn svc(json: serde_json::Value) -> Result<(), FieldError> {
        let mut o = K8sObject::from_value(json)?;
        o.validate("10.96.0.0/12".parse().unwrap(), (30000, 32767))
    }

    #[test]
    fn service_validation_names_fields() {
        let ok = serde_json::json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"web"},
            "spec":{"ports":[{"port":80}]}});
        assert_eq!(svc(ok), Ok(()));
        let bad = serde_json::json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"web"},
            "spec":{"ports":[{"port":80},{"port":70000}]}});
        assert_eq!(svc(bad).unwrap_err().field, "spec.ports[1].port");
        let outside = serde_json::json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"web"},
            "spec":{"clusterIP":"10.0.0.1","ports":[{"port":80}]}});
        assert_eq!(svc(outside).unwrap_err().field, "spec.clusterIP");
        let wrong_api =
            serde_json::json!({"apiVersion":"v2","kind":"Service","metadata":{"name":"web"}});
        assert_eq!(svc(wrong_api).unwrap_err().field, "apiVersion");
    }

    #[test]
    fn policy_validation() {
        let p = serde_json::json!({"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy",
            "metadata":{"name":"p","namespace":"x"},
            "spec":{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.0.0.0/8","except":["11.0.0.0/24"]}}]}]}});
        assert_eq!(
            svc(p).unwrap_err().field,
            "spec.ingress[0].from[0].ipBlock.except[0]"
        );
    }
}
