//! Property tests: on random clusters and random policies, [`PolicyTable::decide`] agrees with
//! a slow reference evaluator written directly from the networking.k8s.io/v1 rules over the raw
//! Kubernetes objects; and the incremental builder agrees with it after pod changes.

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;
use sluice_dataplane::flow::proto;
use sluice_dataplane::policy::{
    ContainerPort, Direction, PodInfo, PolicyBuilder, PolicyId, PolicyInputs, PolicyQuery,
    PolicyTable, PolicyVerdict, Protocol,
};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

const NODE: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
const NS_NAMES: [&str; 3] = ["n0", "n1", "n2"];
const KEYS: [&str; 3] = ["app", "tier", "env"];
const VALUES: [&str; 3] = ["a", "b", "c"];
const PORT_NAMES: [&str; 3] = ["http", "dns", "metrics"];
const PORTS: [u16; 5] = [53, 80, 81, 8080, 9999];

// ---------------------------------------------------------------- reference evaluator

fn ref_selector(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let ml = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let me = sel.match_expressions.iter().flatten().all(|e| {
        let vals = e.values.clone().unwrap_or_default();
        let v = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => v.is_some_and(|v| vals.contains(v)),
            "NotIn" => !v.is_some_and(|v| vals.contains(v)),
            "Exists" => v.is_some(),
            "DoesNotExist" => v.is_none(),
            _ => unreachable!("generator makes valid operators"),
        }
    });
    ml && me
}

fn ns_labels(inputs: &PolicyInputs, ns: &str) -> BTreeMap<String, String> {
    let mut l = inputs
        .namespaces
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(ns))
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    l.insert("kubernetes.io/metadata.name".into(), ns.into());
    l
}

fn in_cidr(cidr: &str, ip: Ipv4Addr) -> bool {
    let net: ipnet::IpNet = cidr.parse().unwrap();
    net.contains(&std::net::IpAddr::V4(ip))
}

fn ref_peer(
    inputs: &PolicyInputs,
    peer: &NetworkPolicyPeer,
    policy_ns: &str,
    ip: Ipv4Addr,
    pod: Option<&PodInfo>,
) -> bool {
    if let Some(b) = &peer.ip_block {
        return in_cidr(&b.cidr, ip) && !b.except.iter().flatten().any(|e| in_cidr(e, ip));
    }
    let Some(pod) = pod else { return false };
    let ns_ok = match &peer.namespace_selector {
        None => pod.namespace == policy_ns,
        Some(sel) => ref_selector(sel, &ns_labels(inputs, &pod.namespace)),
    };
    let pod_ok = peer
        .pod_selector
        .as_ref()
        .is_none_or(|s| ref_selector(s, &pod.labels));
    ns_ok && pod_ok
}

fn ref_ports(
    ports: &Option<Vec<NetworkPolicyPort>>,
    q: &PolicyQuery,
    dst_pod: Option<&PodInfo>,
) -> bool {
    let Some(ports) = ports.as_ref().filter(|p| !p.is_empty()) else {
        return true;
    };
    ports.iter().any(|p| {
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => (proto::TCP, Protocol::Tcp),
            "UDP" => (proto::UDP, Protocol::Udp),
            _ => (proto::SCTP, Protocol::Sctp),
        };
        if q.proto != protocol.0 {
            return false;
        }
        match &p.port {
            None => true,
            Some(IntOrString::Int(n)) => match p.end_port {
                None => i32::from(q.dst_port) == *n,
                Some(e) => *n <= i32::from(q.dst_port) && i32::from(q.dst_port) <= e,
            },
            Some(IntOrString::String(name)) => dst_pod.is_some_and(|d| {
                d.ports.iter().any(|c| {
                    c.name.as_deref() == Some(name.as_str())
                        && c.protocol == protocol.1
                        && c.port == q.dst_port
                })
            }),
        }
    })
}

fn policy_types(np: &NetworkPolicy) -> (bool, bool) {
    let spec = np.spec.as_ref().unwrap();
    match spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
        Some(t) => (
            t.iter().any(|x| x == "Ingress"),
            t.iter().any(|x| x == "Egress"),
        ),
        None => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

fn selects(np: &NetworkPolicy, pod: &PodInfo) -> bool {
    np.metadata.namespace.as_deref() == Some(pod.namespace.as_str())
        && np
            .spec
            .as_ref()
            .unwrap()
            .pod_selector
            .as_ref()
            .is_none_or(|s| ref_selector(s, &pod.labels))
}

/// The verdict; `by` is the index (in `inputs.policies`) of the lowest-numbered policy that
/// allows the flow: on the ingress side when the destination is isolated for ingress, else on
/// the egress side.
fn reference(inputs: &PolicyInputs, q: &PolicyQuery) -> PolicyVerdict {
    let src_pod = inputs.pods.iter().find(|p| p.ip == q.src);
    let dst_pod = inputs.pods.iter().find(|p| p.ip == q.dst);
    if src_pod.is_some() && src_pod == dst_pod {
        return PolicyVerdict::Allow { by: None };
    }
    let mut by = None;
    if let Some(src) = src_pod {
        let selecting: Vec<(usize, &NetworkPolicy)> = inputs
            .policies
            .iter()
            .enumerate()
            .filter(|(_, np)| policy_types(np).1 && selects(np, src))
            .collect();
        if !selecting.is_empty() {
            let allowing = selecting.iter().find(|(_, np)| {
                let ns = np.metadata.namespace.as_deref().unwrap();
                np.spec.as_ref().unwrap().egress.iter().flatten().any(|r| {
                    let peers_ok = match r.to.as_ref().filter(|t| !t.is_empty()) {
                        None => true,
                        Some(peers) => peers
                            .iter()
                            .any(|p| ref_peer(inputs, p, ns, q.dst, dst_pod)),
                    };
                    peers_ok && ref_ports(&r.ports, q, dst_pod)
                })
            });
            match allowing {
                Some((i, _)) => by = Some(PolicyId(*i as u32)),
                None => {
                    return PolicyVerdict::Deny {
                        direction: Direction::Egress,
                    };
                }
            }
        }
    }
    if let Some(dst) = dst_pod
        && !(dst.local && q.src == NODE)
    {
        let selecting: Vec<(usize, &NetworkPolicy)> = inputs
            .policies
            .iter()
            .enumerate()
            .filter(|(_, np)| policy_types(np).0 && selects(np, dst))
            .collect();
        if !selecting.is_empty() {
            let allowing = selecting.iter().find(|(_, np)| {
                let ns = np.metadata.namespace.as_deref().unwrap();
                np.spec.as_ref().unwrap().ingress.iter().flatten().any(|r| {
                    let peers_ok = match r.from.as_ref().filter(|t| !t.is_empty()) {
                        None => true,
                        Some(peers) => peers
                            .iter()
                            .any(|p| ref_peer(inputs, p, ns, q.src, src_pod)),
                    };
                    peers_ok && ref_ports(&r.ports, q, dst_pod)
                })
            });
            match allowing {
                Some((i, _)) => by = Some(PolicyId(*i as u32)),
                None => {
                    return PolicyVerdict::Deny {
                        direction: Direction::Ingress,
                    };
                }
            }
        }
    }
    PolicyVerdict::Allow { by }
}

// ---------------------------------------------------------------- generators

fn labels_strategy() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(&KEYS[..]),
        prop::sample::select(&VALUES[..]),
        0..3,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

fn selector_strategy() -> impl Strategy<Value = LabelSelector> {
    let expr = (
        prop::sample::select(&KEYS[..]),
        0..4usize,
        prop::collection::vec(prop::sample::select(&VALUES[..]), 1..3),
    )
        .prop_map(|(k, op, vals)| {
            let ops = ["In", "NotIn", "Exists", "DoesNotExist"];
            LabelSelectorRequirement {
                key: k.into(),
                operator: ops[op].into(),
                values: (op < 2).then(|| vals.iter().map(|v| v.to_string()).collect()),
            }
        });
    (
        prop::option::of(prop::collection::btree_map(
            prop::sample::select(&KEYS[..]),
            prop::sample::select(&VALUES[..]),
            0..2,
        )),
        prop::option::of(prop::collection::vec(expr, 0..3)),
    )
        .prop_map(|(ml, me)| LabelSelector {
            match_labels: ml.map(|m| {
                m.into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            match_expressions: me,
        })
}

fn block_strategy() -> impl Strategy<Value = IPBlock> {
    prop::sample::select(vec![
        ("10.1.0.0/16", vec![]),
        ("10.1.0.0/24", vec!["10.1.0.0/29"]),
        ("10.1.0.0/28", vec!["10.1.0.4/30", "10.1.0.9/32"]),
        ("0.0.0.0/0", vec!["10.1.0.0/25"]),
        ("192.168.0.0/16", vec!["192.168.1.0/24"]),
        ("172.16.0.0/12", vec![]),
        ("fd00::/8", vec![]),
    ])
    .prop_map(|(c, e)| IPBlock {
        cidr: c.into(),
        except: (!e.is_empty()).then(|| e.iter().map(|s| s.to_string()).collect()),
    })
}

fn peer_strategy() -> impl Strategy<Value = NetworkPolicyPeer> {
    prop_oneof![
        selector_strategy().prop_map(|s| NetworkPolicyPeer {
            pod_selector: Some(s),
            ..Default::default()
        }),
        selector_strategy().prop_map(|s| NetworkPolicyPeer {
            namespace_selector: Some(s),
            ..Default::default()
        }),
        (selector_strategy(), selector_strategy()).prop_map(|(p, n)| NetworkPolicyPeer {
            pod_selector: Some(p),
            namespace_selector: Some(n),
            ..Default::default()
        }),
        block_strategy().prop_map(|b| NetworkPolicyPeer {
            ip_block: Some(b),
            ..Default::default()
        }),
    ]
}

fn port_strategy() -> impl Strategy<Value = NetworkPolicyPort> {
    let protocol = prop::option::of(prop::sample::select(vec!["TCP", "UDP", "SCTP"]));
    let port = prop_oneof![
        Just((None, None)),
        prop::sample::select(&PORTS[..]).prop_map(|p| (Some(IntOrString::Int(i32::from(p))), None)),
        prop::sample::select(&PORT_NAMES[..])
            .prop_map(|n| (Some(IntOrString::String(n.into())), None)),
        prop::sample::select(vec![(80, 81), (50, 90), (81, 8080), (53, 53)])
            .prop_map(|(a, b)| (Some(IntOrString::Int(a)), Some(b))),
    ];
    (protocol, port).prop_map(|(protocol, (port, end_port))| NetworkPolicyPort {
        protocol: protocol.map(str::to_owned),
        port,
        end_port,
    })
}

type RuleParts = (
    Option<Vec<NetworkPolicyPeer>>,
    Option<Vec<NetworkPolicyPort>>,
);

fn rule_strategy() -> impl Strategy<Value = RuleParts> {
    (
        prop::option::of(prop::collection::vec(peer_strategy(), 0..3)),
        prop::option::of(prop::collection::vec(port_strategy(), 0..3)),
    )
}

fn policy_strategy() -> impl Strategy<Value = (usize, NetworkPolicySpec)> {
    (
        0..NS_NAMES.len(),
        prop::option::of(selector_strategy()),
        prop::option::of(prop::collection::vec(rule_strategy(), 0..3)),
        prop::option::of(prop::collection::vec(rule_strategy(), 0..3)),
        prop::sample::select(vec![
            None,
            Some(vec!["Ingress"]),
            Some(vec!["Egress"]),
            Some(vec!["Ingress", "Egress"]),
        ]),
    )
        .prop_map(|(ns, sel, ing, eg, types)| {
            (
                ns,
                NetworkPolicySpec {
                    pod_selector: sel,
                    ingress: ing.map(|rs| {
                        rs.into_iter()
                            .map(|(from, ports)| NetworkPolicyIngressRule { from, ports })
                            .collect()
                    }),
                    egress: eg.map(|rs| {
                        rs.into_iter()
                            .map(|(to, ports)| NetworkPolicyEgressRule { to, ports })
                            .collect()
                    }),
                    policy_types: types.map(|t| t.into_iter().map(str::to_owned).collect()),
                },
            )
        })
}

fn ports_strategy() -> impl Strategy<Value = Vec<ContainerPort>> {
    prop::collection::vec(
        (
            prop::sample::select(&PORTS[..]),
            prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp]),
        ),
        0..4,
    )
    .prop_map(|v| {
        // Port names are unique within a pod.
        v.into_iter()
            .enumerate()
            .map(|(i, (port, protocol))| ContainerPort {
                name: PORT_NAMES.get(i).map(|s| s.to_string()),
                port,
                protocol,
            })
            .collect()
    })
}

fn pod_strategy()
-> impl Strategy<Value = (usize, BTreeMap<String, String>, Vec<ContainerPort>, bool)> {
    (
        0..NS_NAMES.len(),
        labels_strategy(),
        ports_strategy(),
        any::<bool>(),
    )
}

fn cluster_strategy() -> impl Strategy<Value = PolicyInputs> {
    (
        prop::collection::vec(labels_strategy(), NS_NAMES.len()),
        prop::collection::vec(pod_strategy(), 1..10),
        prop::collection::vec(policy_strategy(), 0..6),
    )
        .prop_map(|(nsl, pods, pols)| PolicyInputs {
            namespaces: NS_NAMES
                .iter()
                .zip(nsl)
                .map(|(n, l)| {
                    let mut ns = Namespace::default();
                    ns.metadata.name = Some(n.to_string());
                    ns.metadata.labels = Some(l);
                    ns
                })
                .collect(),
            pods: pods
                .into_iter()
                .enumerate()
                .map(|(i, (ns, labels, ports, local))| PodInfo {
                    namespace: NS_NAMES[ns].into(),
                    name: format!("pod{i}"),
                    labels,
                    ip: Ipv4Addr::new(10, 1, 0, i as u8 + 1),
                    ports,
                    local,
                })
                .collect(),
            policies: pols
                .into_iter()
                .enumerate()
                .map(|(i, (ns, spec))| {
                    let mut np = NetworkPolicy::default();
                    np.metadata.name = Some(format!("p{i}"));
                    np.metadata.namespace = Some(NS_NAMES[ns].into());
                    np.spec = Some(spec);
                    np
                })
                .collect(),
            node_addrs: vec![NODE],
        })
}

#[derive(Debug, Clone)]
enum Change {
    Pod(
        prop::sample::Index,
        BTreeMap<String, String>,
        Vec<ContainerPort>,
    ),
    RemovePod(prop::sample::Index),
    PodIp(prop::sample::Index, u8),
    Namespace(prop::sample::Index, BTreeMap<String, String>),
    Policy(prop::sample::Index, usize, NetworkPolicySpec),
    RemovePolicy(prop::sample::Index),
}

fn change_strategy() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (any::<prop::sample::Index>(), labels_strategy(), ports_strategy())
            .prop_map(|(i, l, p)| Change::Pod(i, l, p)),
        1 => any::<prop::sample::Index>().prop_map(Change::RemovePod),
        1 => (any::<prop::sample::Index>(), 1..40u8).prop_map(|(i, o)| Change::PodIp(i, o)),
        1 => (any::<prop::sample::Index>(), labels_strategy()).prop_map(|(i, l)| Change::Namespace(i, l)),
        1 => (any::<prop::sample::Index>(), policy_strategy()).prop_map(|(i, (ns, s))| Change::Policy(i, ns, s)),
        1 => any::<prop::sample::Index>().prop_map(Change::RemovePolicy),
    ]
}

fn queries(inputs: &PolicyInputs) -> Vec<PolicyQuery> {
    let mut addrs: Vec<Ipv4Addr> = inputs.pods.iter().map(|p| p.ip).collect();
    addrs.extend([
        NODE,
        Ipv4Addr::new(10, 1, 0, 200),
        Ipv4Addr::new(192, 168, 7, 7),
        Ipv4Addr::new(192, 168, 1, 7),
    ]);
    let mut out = Vec::new();
    for &src in &addrs {
        for &dst in &addrs {
            for p in [proto::TCP, proto::UDP, proto::SCTP, proto::ICMP] {
                let ports: &[u16] = if p == proto::ICMP { &[0] } else { &PORTS };
                for &dst_port in ports {
                    out.push(PolicyQuery {
                        src,
                        dst,
                        proto: p,
                        dst_port,
                    });
                }
            }
        }
    }
    out
}

fn same(a: PolicyVerdict, b: PolicyVerdict) -> bool {
    match (a, b) {
        (PolicyVerdict::Allow { .. }, PolicyVerdict::Allow { .. }) => true,
        (PolicyVerdict::Deny { direction: x }, PolicyVerdict::Deny { direction: y }) => x == y,
        _ => false,
    }
}

/// Checks every query; with `exact`, the attributed policy too (policy ids are the input
/// order only for a table compiled in one go).
fn assert_agrees(
    table: &PolicyTable,
    inputs: &PolicyInputs,
    exact: bool,
) -> Result<(), TestCaseError> {
    for q in queries(inputs) {
        let want = reference(inputs, &q);
        let got = table.decide(&q);
        let explained = table.explain(&q);
        prop_assert_eq!(explained.verdict(), got, "query {:?}: {:?}", q, explained);
        if exact {
            prop_assert_eq!(got, want, "query {:?}", q);
        } else {
            prop_assert!(
                same(got, want),
                "query {q:?}: got {got:?}, reference {want:?}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn compiled_table_matches_reference(inputs in cluster_strategy()) {
        let table = PolicyTable::compile(&inputs).expect("generated policies are valid");
        assert_agrees(&table, &inputs, true)?;
    }

    #[test]
    fn incremental_updates_match_reference(
        inputs in cluster_strategy(),
        changes in prop::collection::vec(change_strategy(), 1..5),
    ) {
        let mut inputs = inputs;
        let mut b = PolicyBuilder::new(&inputs).expect("generated policies are valid");
        for (step, change) in changes.into_iter().enumerate() {
            match change {
                Change::Pod(which, labels, ports) => {
                    let i = which.index(inputs.pods.len());
                    inputs.pods[i].labels = labels;
                    inputs.pods[i].ports = ports;
                    b.set_pod(inputs.pods[i].clone());
                }
                Change::RemovePod(which) => {
                    if inputs.pods.len() > 1 {
                        let p = inputs.pods.remove(which.index(inputs.pods.len()));
                        prop_assert!(b.remove_pod(&p.namespace, &p.name));
                    }
                }
                Change::PodIp(which, octet) => {
                    let ip = Ipv4Addr::new(10, 1, 0, octet);
                    if !inputs.pods.iter().any(|p| p.ip == ip) {
                        let i = which.index(inputs.pods.len());
                        inputs.pods[i].ip = ip;
                        b.set_pod(inputs.pods[i].clone());
                    }
                }
                Change::Namespace(which, labels) => {
                    let ns = &mut inputs.namespaces[which.index(NS_NAMES.len())];
                    ns.metadata.labels = Some(labels);
                    b.set_namespace(ns);
                }
                Change::Policy(which, ns, spec) => {
                    let n = inputs.policies.len();
                    let i = which.index(n + 1);
                    if i == n {
                        let mut np = NetworkPolicy::default();
                        np.metadata.name = Some(format!("new{step}"));
                        np.metadata.namespace = Some(NS_NAMES[ns].into());
                        inputs.policies.push(np);
                    }
                    inputs.policies[i].spec = Some(spec);
                    b.set_policy(&inputs.policies[i]).expect("generated policies are valid");
                }
                Change::RemovePolicy(which) => {
                    if !inputs.policies.is_empty() {
                        let np = inputs.policies.remove(which.index(inputs.policies.len()));
                        let m = &np.metadata;
                        prop_assert!(b.remove_policy(m.namespace.as_deref().unwrap(), m.name.as_deref().unwrap()));
                    }
                }
            }
            assert_agrees(&b.table(), &inputs, false)?;
        }
    }
}
