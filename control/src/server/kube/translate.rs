//! What the API server's objects become in the store, as pure code (no I/O, no clock).
//!
//! Each followed kind has one function from the k8s-openapi object to what Sluice stores, or to
//! the reason it is left out ([`Skip`]). Stored Kubernetes objects keep only what the agents read
//! (name, namespace, labels, spec; for EndpointSlices their endpoints and ports), so that status
//! updates, `managedFields` and new `resourceVersion`s do not make new store revisions.
//!
//! The API server has validated every object already; what Sluice cannot carry (an
//! `ExternalName` Service, IPv6 or FQDN EndpointSlices, an IPv6-only ClusterIP) is skipped with a
//! reason. A NetworkPolicy is never dropped, because dropping one would open what it isolates:
//! IPv6 `ipBlock` peers are removed (a rule left with no peer is removed, it matched no IPv4
//! traffic), and a policy that still does not fit keeps its `podSelector` and `policyTypes` with
//! no rules, which denies everything to the pods it selects (fail closed).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::api::{self, object::Body};
use crate::model::K8sObject;

/// Flannel's node annotations (kube subnet manager mode), which Sluice writes for its nodes.
pub const BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub const BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
pub const KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";
pub const PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";

/// Why an API object is not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip(pub String);

/// Only what the agents read of an object's metadata.
fn slim_meta(m: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        labels: m.labels.clone().filter(|l| !l.is_empty()),
        ..Default::default()
    }
}

/// Validate as `sluicectl apply` does, except for ranges that are the cluster's to choose (any
/// ClusterIP, any NodePort), and wrap as a stored object.
fn stored(mut obj: K8sObject) -> Result<api::Object, Skip> {
    let any: Ipv4Net = Ipv4Net::default();
    obj.validate(any, (1, 65535))
        .map_err(|e| Skip(e.to_string()))?;
    Ok(api::Object {
        body: Some(Body::K8s(obj.to_proto())),
        revision: 0,
    })
}

/// A Namespace: its name and labels (what `namespaceSelector`s match).
pub fn namespace(ns: &Namespace) -> Result<api::Object, Skip> {
    stored(K8sObject::Namespace(Namespace {
        metadata: slim_meta(&ns.metadata),
        ..Default::default()
    }))
}

/// A Service: its spec as the API server allocated it (ClusterIP, NodePorts). `ExternalName`
/// Services and Services without an IPv4 ClusterIP are skipped.
pub fn service(svc: &Service) -> Result<api::Object, Skip> {
    let mut spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return Err(Skip(
            "an ExternalName Service has no ClusterIP to balance".into(),
        ));
    }
    // Dual-stack: keep the IPv4 address (clusterIP is the primary family's).
    let v4 = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .find(|ip| ip.as_str() == "None" || ip.parse::<Ipv4Addr>().is_ok())
        .cloned();
    match v4 {
        Some(ip) => {
            spec.cluster_ip = Some(ip.clone());
            spec.cluster_ips = Some(vec![ip]);
        }
        None => return Err(Skip("no IPv4 ClusterIP (yet)".into())),
    }
    spec.ip_families = None;
    spec.ip_family_policy = None;
    stored(K8sObject::Service(Service {
        metadata: slim_meta(&svc.metadata),
        spec: Some(spec),
        status: None,
    }))
}

/// An EndpointSlice: IPv4 ones only (IPv6 and FQDN slices are skipped).
pub fn endpoint_slice(slice: &EndpointSlice) -> Result<api::Object, Skip> {
    if slice.address_type != "IPv4" {
        return Err(Skip(format!(
            "addressType {} (Sluice balances IPv4)",
            slice.address_type
        )));
    }
    let mut endpoints = slice.endpoints.clone();
    for ep in endpoints.iter_mut().flatten() {
        ep.hints = None;
        ep.deprecated_topology = None;
    }
    stored(K8sObject::EndpointSlice(EndpointSlice {
        metadata: slim_meta(&slice.metadata),
        address_type: slice.address_type.clone(),
        endpoints,
        ports: slice.ports.clone(),
    }))
}

fn is_ipv6_block(p: &NetworkPolicyPeer) -> bool {
    p.ip_block
        .as_ref()
        .is_some_and(|b| b.cidr.parse::<Ipv4Net>().is_err() && b.cidr.contains(':'))
}

/// Remove IPv6 `ipBlock` peers; a rule whose peers were all IPv6 matched no IPv4 traffic and is
/// removed with them (an empty peer list would allow everything instead).
fn ipv4_only(spec: &mut NetworkPolicySpec) {
    if let Some(rules) = &mut spec.ingress {
        rules.retain_mut(|r| match &mut r.from {
            Some(peers) if !peers.is_empty() => {
                peers.retain(|p| !is_ipv6_block(p));
                !peers.is_empty()
            }
            _ => true,
        });
    }
    if let Some(rules) = &mut spec.egress {
        rules.retain_mut(|r| match &mut r.to {
            Some(peers) if !peers.is_empty() => {
                peers.retain(|p| !is_ipv6_block(p));
                !peers.is_empty()
            }
            _ => true,
        });
    }
}

/// A NetworkPolicy, IPv4 peers only; one that still does not fit Sluice is stored as a deny-all
/// for the pods it selects, with the reason (to log).
pub fn network_policy(np: &NetworkPolicy) -> (api::Object, Option<Skip>) {
    let mut spec = np.spec.clone().unwrap_or_default();
    ipv4_only(&mut spec);
    let meta = slim_meta(&np.metadata);
    let full = K8sObject::NetworkPolicy(NetworkPolicy {
        metadata: meta.clone(),
        spec: Some(spec.clone()),
    });
    match stored(full) {
        Ok(o) => (o, None),
        Err(why) => {
            let types = spec.policy_types.clone().unwrap_or_else(|| {
                let mut t = vec!["Ingress".to_string()];
                if spec.egress.is_some() {
                    t.push("Egress".into());
                }
                t
            });
            let deny = NetworkPolicySpec {
                pod_selector: spec.pod_selector.clone(),
                policy_types: Some(types),
                ..Default::default()
            };
            let o = api::Object {
                body: Some(Body::K8s(
                    K8sObject::NetworkPolicy(NetworkPolicy {
                        metadata: meta,
                        spec: Some(deny),
                    })
                    .to_proto(),
                )),
                revision: 0,
            };
            (o, Some(why))
        }
    }
}

/// What the API server says of a Pod that Sluice stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<api::ContainerPort>,
    /// `spec.nodeName` ("" while unscheduled).
    pub node: String,
    /// `status.podIP` if IPv4 ("" while none).
    pub ip: String,
}

/// A Pod's labels, named container ports, node and IP; `Err` for pods outside the pod network
/// (`hostNetwork`) and pods that finished (`Succeeded`, `Failed`: their IP may be reused).
pub fn pod(p: &Pod) -> Result<PodFacts, Skip> {
    let spec = p.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Err(Skip("hostNetwork pod".into()));
    }
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Err(Skip(format!("pod phase {}", phase.unwrap_or_default())));
    }
    let ports = spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|cp| (1..=65535).contains(&cp.container_port))
        .map(|cp| api::ContainerPort {
            name: cp.name.clone().unwrap_or_default(),
            port: cp.container_port as u32,
            protocol: cp.protocol.clone().unwrap_or_else(|| "TCP".into()),
        })
        .collect();
    let ip = p
        .status
        .as_ref()
        .and_then(|s| {
            s.pod_ips
                .iter()
                .flatten()
                .map(|i| i.ip.as_str())
                .chain(s.pod_ip.as_deref())
                .find(|ip| ip.parse::<Ipv4Addr>().is_ok())
        })
        .unwrap_or_default()
        .to_string();
    Ok(PodFacts {
        namespace: p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: p.metadata.name.clone().unwrap_or_default(),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        ports,
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        ip,
    })
}

/// The stored record of a pod the API server has, given the stored record (if any) and whether
/// the pod's node runs a Sluice agent. Labels and ports are the API server's; node, IP and
/// container id are the agent's once it reported the pod (its CNI ADD knows them first and it
/// removes them at CNI DEL), and the API server's for pods of nodes without a Sluice agent.
pub fn pod_record(api_pod: &PodFacts, stored: Option<&api::Pod>, node_has_agent: bool) -> api::Pod {
    let mut p = api::Pod {
        namespace: api_pod.namespace.clone(),
        name: api_pod.name.clone(),
        labels: api_pod.labels.clone().into_iter().collect(),
        ports: api_pod.ports.clone(),
        ..Default::default()
    };
    match stored {
        Some(s) if !s.container_id.is_empty() => {
            p.node.clone_from(&s.node);
            p.ip.clone_from(&s.ip);
            p.container_id.clone_from(&s.container_id);
        }
        _ if !node_has_agent => {
            p.node.clone_from(&api_pod.node);
            p.ip.clone_from(&api_pod.ip);
        }
        _ => {}
    }
    p
}

/// What the API server says of a Node that Sluice uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// `spec.podCIDR`, when the cluster allocates CIDRs and it is IPv4.
    pub pod_cidr: Option<Ipv4Net>,
    /// The node's Flannel annotations as they are.
    pub flannel: BTreeMap<String, String>,
}

pub fn node(n: &Node) -> NodeFacts {
    let spec = n.spec.as_ref();
    let pod_cidr = spec.and_then(|s| {
        s.pod_cidrs
            .iter()
            .flatten()
            .chain(s.pod_cidr.iter())
            .find_map(|c| c.parse().ok())
    });
    let flannel = n
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("flannel.alpha.coreos.com/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    NodeFacts { pod_cidr, flannel }
}

/// MAC as Flannel writes it: lowercase, colon separated.
fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The annotations a node registered with Sluice carries, in Flannel's form (VXLAN, VNI 1), so
/// that Flannel nodes find its VTEP.
pub fn flannel_annotations(n: &api::Node) -> BTreeMap<String, String> {
    let data = serde_json::json!({"VNI": 1, "VtepMAC": mac_text(&n.vtep_mac)});
    BTreeMap::from([
        (BACKEND_DATA.to_string(), data.to_string()),
        (BACKEND_TYPE.to_string(), "vxlan".to_string()),
        (KUBE_SUBNET_MANAGER.to_string(), "true".to_string()),
        (PUBLIC_IP.to_string(), n.underlay_ip.clone()),
    ])
}

/// Whether `have` (a Node's Flannel annotations) already says what `want` says. backend-data is
/// compared as JSON (Flannel adds fields such as `VtepMACv6`).
pub fn annotations_hold(have: &BTreeMap<String, String>, want: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| match have.get(k) {
        Some(h) if k == BACKEND_DATA => {
            let (Ok(h), Ok(w)) = (
                serde_json::from_str::<serde_json::Value>(h),
                serde_json::from_str::<serde_json::Value>(v),
            ) else {
                return false;
            };
            h["VNI"] == w["VNI"]
                && h["VtepMAC"].as_str().map(str::to_ascii_lowercase)
                    == w["VtepMAC"].as_str().map(str::to_ascii_lowercase)
        }
        Some(h) => h == v,
        None => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Kind;

    fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    fn k8s_json(o: &api::Object) -> serde_json::Value {
        let Some(Body::K8s(k)) = &o.body else {
            panic!("not a K8s object: {o:?}")
        };
        serde_json::from_str(&k.json).unwrap()
    }

    #[test]
    fn namespace_keeps_name_and_labels_only() {
        let ns: Namespace = from(serde_json::json!({"metadata": {"name": "shop",
            "labels": {"team": "a"}, "resourceVersion": "7", "uid": "u",
            "managedFields": [{"manager": "kubectl"}]}, "status": {"phase": "Active"}}));
        let o = namespace(&ns).unwrap();
        assert_eq!(
            k8s_json(&o),
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "shop", "labels": {"team": "a"}}})
        );
        let Some(Body::K8s(k)) = &o.body else {
            panic!()
        };
        assert_eq!(
            (k.kind(), k.namespace.as_str(), k.name.as_str()),
            (Kind::Namespace, "", "shop")
        );
        // A new resourceVersion alone changes nothing stored.
        let mut again = ns.clone();
        again.metadata.resource_version = Some("8".into());
        assert_eq!(namespace(&again).unwrap(), o);
    }

    #[test]
    fn service_keeps_the_api_servers_allocations_and_skips_what_has_no_clusterip() {
        let svc: Service = from(
            serde_json::json!({"metadata": {"name": "web", "namespace": "shop",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"type": "NodePort", "clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "172.20.0.10"],
                "ipFamilies": ["IPv6", "IPv4"], "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 8080}]},
            "status": {"loadBalancer": {}}}),
        );
        let j = k8s_json(&service(&svc).unwrap());
        assert_eq!(j["spec"]["clusterIP"], "172.20.0.10", "{j}");
        assert_eq!(j["spec"]["clusterIPs"], serde_json::json!(["172.20.0.10"]));
        assert_eq!(
            j["spec"]["ports"][0]["nodePort"], 8080,
            "the cluster's NodePort range"
        );
        assert!(j["metadata"].get("annotations").is_none() && j.get("status").is_none());

        let ext: Service = from(
            serde_json::json!({"metadata": {"name": "x", "namespace": "a"},
            "spec": {"type": "ExternalName", "externalName": "example.org"}}),
        );
        assert!(service(&ext).is_err());
        let v6: Service = from(
            serde_json::json!({"metadata": {"name": "x", "namespace": "a"},
            "spec": {"clusterIP": "fd00::1", "ports": [{"port": 80}]}}),
        );
        assert!(service(&v6).unwrap_err().0.contains("IPv4"));
        let headless: Service = from(
            serde_json::json!({"metadata": {"name": "h", "namespace": "a"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
        );
        assert_eq!(
            k8s_json(&service(&headless).unwrap())["spec"]["clusterIP"],
            "None"
        );
    }

    #[test]
    fn endpoint_slices_ipv4_only() {
        let slice = |t: &str, addr: &str| -> EndpointSlice {
            from(
                serde_json::json!({"metadata": {"name": "web-x", "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "web"}, "generation": 3},
                "addressType": t, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": [addr], "conditions": {"ready": true},
                    "nodeName": "n1", "targetRef": {"kind": "Pod", "name": "p"},
                    "hints": {"forZones": [{"name": "z"}]}}]}),
            )
        };
        let j = k8s_json(&endpoint_slice(&slice("IPv4", "10.244.1.5")).unwrap());
        assert_eq!(j["endpoints"][0]["addresses"][0], "10.244.1.5");
        assert_eq!(j["endpoints"][0]["conditions"]["ready"], true);
        assert!(j["endpoints"][0].get("hints").is_none());
        assert_eq!(j["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        assert!(endpoint_slice(&slice("IPv6", "fd00::5")).is_err());
        assert!(endpoint_slice(&slice("FQDN", "example.org")).is_err());
    }

    #[test]
    fn network_policies_drop_ipv6_peers_and_fail_closed() {
        let np: NetworkPolicy = from(
            serde_json::json!({"metadata": {"name": "p", "namespace": "a"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {"from": [{"ipBlock": {"cidr": "fd00::/8"}}]},
                    {"from": [{"ipBlock": {"cidr": "fd00::/8"}}, {"podSelector": {"matchLabels": {"role": "api"}}}],
                     "ports": [{"port": "pg", "protocol": "TCP"}]}],
                "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}]}}),
        );
        let (o, why) = network_policy(&np);
        assert_eq!(why, None);
        let j = k8s_json(&o);
        let ingress = j["spec"]["ingress"].as_array().unwrap();
        assert_eq!(
            ingress.len(),
            1,
            "the IPv6-only rule is gone, not widened: {j}"
        );
        assert_eq!(ingress[0]["from"].as_array().unwrap().len(), 1);
        assert_eq!(
            ingress[0]["ports"][0]["port"], "pg",
            "named ports pass through"
        );
        assert_eq!(
            j["spec"]["egress"][0]["to"][0]["ipBlock"]["except"][0],
            "10.1.0.0/16"
        );

        // A policy Sluice cannot carry still isolates its pods.
        let odd: NetworkPolicy = from(
            serde_json::json!({"metadata": {"name": "q", "namespace": "a"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"ports": [{"port": 5432, "protocol": "ICMP"}]}]}}),
        );
        let (o, why) = network_policy(&odd);
        assert!(why.unwrap().0.contains("protocol"));
        let j = k8s_json(&o);
        assert_eq!(j["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
        assert!(j["spec"].get("ingress").is_none(), "{j}");
        assert_eq!(j["spec"]["podSelector"]["matchLabels"]["app"], "db");
    }

    fn pod_json(extra: serde_json::Value) -> Pod {
        let mut v = serde_json::json!({"metadata": {"name": "web-0", "namespace": "shop",
            "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080},
                {"containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "podIP": "10.244.1.5",
                "podIPs": [{"ip": "fd00::5"}, {"ip": "10.244.1.5"}]}});
        if let (Some(a), Some(b)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in b {
                if let (Some(av), Some(bx)) =
                    (a.get_mut(k).and_then(|v| v.as_object_mut()), x.as_object())
                {
                    av.extend(bx.clone());
                } else {
                    a.insert(k.clone(), x.clone());
                }
            }
        }
        from(v)
    }

    #[test]
    fn pods_carry_labels_named_ports_node_and_ipv4() {
        let f = pod(&pod_json(serde_json::json!({}))).unwrap();
        assert_eq!(f.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!((f.node.as_str(), f.ip.as_str()), ("n1", "10.244.1.5"));
        assert_eq!(f.ports.len(), 2);
        assert_eq!(
            (
                f.ports[0].name.as_str(),
                f.ports[0].port,
                f.ports[0].protocol.as_str()
            ),
            ("http", 8080, "TCP")
        );
        assert_eq!(f.ports[1].protocol, "UDP");

        let host = pod_json(serde_json::json!({"spec": {"hostNetwork": true}}));
        assert!(pod(&host).is_err());
        let done = pod_json(serde_json::json!({"status": {"phase": "Succeeded"}}));
        assert!(pod(&done).is_err());
        let pending: Pod = from(
            serde_json::json!({"metadata": {"name": "p", "namespace": "a"},
            "spec": {"containers": [{"name": "c"}]}}),
        );
        let f = pod(&pending).unwrap();
        assert_eq!((f.node.as_str(), f.ip.as_str()), ("", ""));
    }

    #[test]
    fn pod_records_take_labels_from_the_api_and_addresses_from_the_agent() {
        let f = pod(&pod_json(serde_json::json!({}))).unwrap();
        // Not reported yet, on a Sluice node: labels only, the agent says where it runs.
        let r = pod_record(&f, None, true);
        assert_eq!((r.node.as_str(), r.ip.as_str()), ("", ""));
        assert_eq!(r.labels.get("app").map(String::as_str), Some("web"));
        // A node without a Sluice agent (a Flannel node): the API server's node and IP.
        let r = pod_record(&f, None, false);
        assert_eq!((r.node.as_str(), r.ip.as_str()), ("n1", "10.244.1.5"));
        // Reported by the agent: its node, IP and container stay; labels follow the API.
        let reported = api::Pod {
            namespace: "shop".into(),
            name: "web-0".into(),
            node: "n1".into(),
            ip: "10.244.1.9".into(),
            container_id: "abc".into(),
            labels: [("app".to_string(), "old".to_string())].into(),
            ..Default::default()
        };
        let r = pod_record(&f, Some(&reported), true);
        assert_eq!(
            (r.ip.as_str(), r.container_id.as_str()),
            ("10.244.1.9", "abc")
        );
        assert_eq!(r.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(r.ports.len(), 2);
    }

    #[test]
    fn nodes_give_their_pod_cidr_and_flannel_annotations() {
        let n: Node = from(
            serde_json::json!({"metadata": {"name": "n1", "annotations": {
                BACKEND_TYPE: "vxlan", "other": "x"}},
            "spec": {"podCIDR": "fd00:1::/64", "podCIDRs": ["fd00:1::/64", "10.244.7.0/24"]}}),
        );
        let f = node(&n);
        assert_eq!(f.pod_cidr, Some("10.244.7.0/24".parse().unwrap()));
        assert_eq!(f.flannel.len(), 1);
        assert_eq!(node(&Node::default()).pod_cidr, None);

        let me = api::Node {
            name: "n1".into(),
            underlay_ip: "192.168.77.1".into(),
            vtep_mac: vec![0x0e, 0x5c, 0x02, 0, 0, 0xa1],
            pod_cidr: "10.244.7.0/24".into(),
        };
        let want = flannel_annotations(&me);
        assert_eq!(
            want[BACKEND_DATA],
            r#"{"VNI":1,"VtepMAC":"0e:5c:02:00:00:a1"}"#
        );
        assert_eq!(want[PUBLIC_IP], "192.168.77.1");
        assert_eq!(want[KUBE_SUBNET_MANAGER], "true");
        assert!(!annotations_hold(&f.flannel, &want));
        // What Flannel itself writes (more fields, other case) counts as the same.
        let mut flannel = want.clone();
        flannel.insert(
            BACKEND_DATA.into(),
            r#"{"VNI":1,"VtepMAC":"0E:5C:02:00:00:A1","VtepMACv6":""}"#.into(),
        );
        assert!(annotations_hold(&flannel, &want));
    }
}
