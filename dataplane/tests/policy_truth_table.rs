//! Truth-table tests of the NetworkPolicy engine, in the style of the upstream e2e network-policy
//! suite: namespaces x, y, z with pods a, b, c in each; for each scenario the full 9x9
//! reachability matrix per port and protocol is compared with the expected one (printed as
//! matrices on mismatch). Pods reach themselves (loopback) whatever the policy.

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use sluice_dataplane::flow::proto;
use sluice_dataplane::policy::{
    ContainerPort, Direction, InvalidReason, PodInfo, PolicyBuilder, PolicyError, PolicyInputs,
    PolicyQuery, PolicyTable, PolicyVerdict, Protocol,
};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

const NS: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);

fn pod_ip(ns: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, ns as u8 + 1, pod as u8 + 10)
}

fn idx(name: &str) -> usize {
    let (ns, pod) = name.split_once('/').expect("ns/pod");
    let n = NS.iter().position(|x| *x == ns).expect("namespace");
    let p = PODS.iter().position(|x| *x == pod).expect("pod");
    n * 3 + p
}

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn namespace(name: &str, extra: &[(&str, &str)]) -> Namespace {
    let mut l = labels(&[("ns", name)]);
    l.extend(labels(extra));
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.into());
    ns.metadata.labels = Some(l);
    ns
}

/// Pod `p` of namespace `n`: ports 80 and 81 on TCP, UDP and SCTP named `serve-<port>-<proto>`,
/// and a port named `http` whose number differs per pod (a: 8080, b: 8081, c: 8082).
fn pod(n: usize, p: usize) -> PodInfo {
    let mut ports = Vec::new();
    for (proto, pname) in [
        (Protocol::Tcp, "tcp"),
        (Protocol::Udp, "udp"),
        (Protocol::Sctp, "sctp"),
    ] {
        for port in [80u16, 81] {
            ports.push(ContainerPort {
                name: Some(format!("serve-{port}-{pname}")),
                port,
                protocol: proto,
            });
        }
    }
    ports.push(ContainerPort {
        name: Some("http".into()),
        port: 8080 + p as u16,
        protocol: Protocol::Tcp,
    });
    PodInfo {
        namespace: NS[n].into(),
        name: PODS[p].into(),
        labels: labels(&[("pod", PODS[p])]),
        ip: pod_ip(n, p),
        ports,
        local: true,
    }
}

fn policies(yaml: &str) -> Vec<NetworkPolicy> {
    serde_saphyr::from_multiple(yaml).expect("policy YAML parses")
}

fn inputs(yaml: &str) -> PolicyInputs {
    PolicyInputs {
        namespaces: NS.iter().map(|n| namespace(n, &[])).collect(),
        pods: (0..3)
            .flat_map(|n| (0..3).map(move |p| pod(n, p)))
            .collect(),
        policies: if yaml.trim().is_empty() {
            Vec::new()
        } else {
            policies(yaml)
        },
        node_addrs: vec![NODE],
    }
}

fn compile(yaml: &str) -> PolicyTable {
    PolicyTable::compile(&inputs(yaml)).expect("policies compile")
}

fn query(from: usize, to: usize, proto: u8, port: u16) -> PolicyQuery {
    PolicyQuery {
        src: pod_ip(from / 3, from % 3),
        dst: pod_ip(to / 3, to % 3),
        proto,
        dst_port: port,
    }
}

fn allowed(v: PolicyVerdict) -> bool {
    matches!(v, PolicyVerdict::Allow { .. })
}

/// `PolicyTable::explain` (what `sluicectl trace` shows) agrees with `decide`.
fn explained(table: &PolicyTable, q: &PolicyQuery, v: PolicyVerdict) {
    let e = table.explain(q);
    assert_eq!(e.verdict(), v, "{q:?}: explained as {e:?}");
}

/// Expected reachability (rows: from, columns: to), as upstream's `Reachability`.
#[derive(Clone, PartialEq, Eq)]
struct Reach([[bool; 9]; 9]);

fn name(i: usize) -> String {
    format!("{}/{}", NS[i / 3], PODS[i % 3])
}

impl Reach {
    fn all(v: bool) -> Self {
        let mut r = Reach([[v; 9]; 9]);
        r.loopback();
        r
    }
    fn loopback(&mut self) {
        for i in 0..9 {
            self.0[i][i] = true;
        }
    }
    fn set(mut self, from: &str, to: &str, v: bool) -> Self {
        self.0[idx(from)][idx(to)] = v;
        self.loopback();
        self
    }
    fn ingress(mut self, to: &str, v: bool) -> Self {
        let t = idx(to);
        for f in 0..9 {
            self.0[f][t] = v;
        }
        self.loopback();
        self
    }
    fn egress(mut self, from: &str, v: bool) -> Self {
        self.0[idx(from)] = [v; 9];
        self.loopback();
        self
    }
    fn peers(mut self, from: impl Fn(&str) -> bool, to: impl Fn(&str) -> bool, v: bool) -> Self {
        for f in 0..9 {
            for t in 0..9 {
                if from(&name(f)) && to(&name(t)) {
                    self.0[f][t] = v;
                }
            }
        }
        self.loopback();
        self
    }
    fn of(table: &PolicyTable, proto: u8, port: u16) -> Self {
        let mut r = Reach([[false; 9]; 9]);
        for f in 0..9 {
            for t in 0..9 {
                let q = query(f, t, proto, port);
                let v = table.decide(&q);
                explained(table, &q, v);
                r.0[f][t] = allowed(v);
            }
        }
        r
    }
    fn render(&self, other: Option<&Reach>) -> String {
        let mut s = String::from("from\\to ");
        for t in 0..9 {
            let _ = write!(s, "{:>4}", name(t));
        }
        s.push('\n');
        for f in 0..9 {
            let _ = write!(s, "{:<8}", name(f));
            for t in 0..9 {
                let c = if self.0[f][t] { "." } else { "X" };
                let mark = other.is_some_and(|o| o.0[f][t] != self.0[f][t]);
                let _ = write!(s, "{:>4}", if mark { format!("{c}*") } else { c.into() });
            }
            s.push('\n');
        }
        s
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "TCP",
        proto::UDP => "UDP",
        proto::SCTP => "SCTP",
        _ => "other",
    }
}

/// Compares the table's 9x9 matrix on (`proto`, `port`) with `want`; panics with both matrices
/// ('.' allowed, 'X' denied, '*' wrong) on mismatch.
#[track_caller]
fn check(table: &PolicyTable, proto: u8, port: u16, want: &Reach) {
    let got = Reach::of(table, proto, port);
    if &got != want {
        panic!(
            "reachability on {}/{port} differs\nexpected:\n{}got ('*' = differs):\n{}",
            proto_name(proto),
            want.render(None),
            got.render(Some(want))
        );
    }
}

// ---- scenarios ----

#[test]
fn no_policies_allow_everything() {
    let t = compile("");
    for p in [proto::TCP, proto::UDP, proto::SCTP, proto::ICMP] {
        check(&t, p, 80, &Reach::all(true));
    }
}

#[test]
fn default_deny_ingress() {
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#,
    );
    let want = Reach::all(true)
        .ingress("x/a", false)
        .ingress("x/b", false)
        .ingress("x/c", false);
    for p in [proto::TCP, proto::UDP, proto::SCTP, proto::ICMP] {
        check(&t, p, 80, &want);
    }
    assert_eq!(
        t.decide(&query(idx("y/a"), idx("x/b"), proto::TCP, 80)),
        PolicyVerdict::Deny {
            direction: Direction::Ingress
        }
    );
}

#[test]
fn default_deny_egress() {
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
"#,
    );
    let want = Reach::all(true)
        .egress("x/a", false)
        .egress("x/b", false)
        .egress("x/c", false);
    check(&t, proto::TCP, 80, &want);
    check(&t, proto::UDP, 53, &want);
    assert_eq!(
        t.decide(&query(idx("x/a"), idx("y/a"), proto::TCP, 80)),
        PolicyVerdict::Deny {
            direction: Direction::Egress
        }
    );
    // Egress to an address outside the cluster is denied as well.
    let out = PolicyQuery {
        dst: Ipv4Addr::new(8, 8, 8, 8),
        ..query(0, 1, proto::UDP, 53)
    };
    assert_eq!(
        t.decide(&out),
        PolicyVerdict::Deny {
            direction: Direction::Egress
        }
    );
}

#[test]
fn allow_same_namespace() {
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-same-ns, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from:
    - podSelector: {}
"#,
    );
    let want = Reach::all(true).peers(|f| !f.starts_with("x/"), |t| t.starts_with("x/"), false);
    check(&t, proto::TCP, 80, &want);
    check(&t, proto::SCTP, 81, &want);
    // A rule without ports matches protocols without ports too.
    check(&t, proto::ICMP, 0, &want);
}

#[test]
fn allow_from_namespace_by_label() {
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-from-y, namespace: x}
spec:
  podSelector:
    matchLabels: {pod: a}
  ingress:
  - from:
    - namespaceSelector:
        matchLabels: {ns: y}
"#,
    );
    let want =
        Reach::all(true)
            .ingress("x/a", false)
            .peers(|f| f.starts_with("y/"), |t| t == "x/a", true);
    check(&t, proto::TCP, 80, &want);
    // By the automatic kubernetes.io/metadata.name label as well.
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-from-y, namespace: x}
spec:
  podSelector:
    matchLabels: {pod: a}
  ingress:
  - from:
    - namespaceSelector:
        matchLabels: {kubernetes.io/metadata.name: y}
"#,
    );
    check(&t, proto::TCP, 80, &want);
}

#[test]
fn pod_and_namespace_selector_in_one_peer_is_and() {
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: and, namespace: x}
spec:
  podSelector:
    matchLabels: {pod: a}
  ingress:
  - from:
    - namespaceSelector:
        matchLabels: {ns: y}
      podSelector:
        matchLabels: {pod: b}
"#,
    );
    let want = Reach::all(true)
        .ingress("x/a", false)
        .set("y/b", "x/a", true);
    check(&t, proto::TCP, 80, &want);
}

#[test]
fn pod_and_namespace_selector_in_two_peers_is_or() {
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: or, namespace: x}
spec:
  podSelector:
    matchLabels: {pod: a}
  ingress:
  - from:
    - namespaceSelector:
        matchLabels: {ns: y}
    - podSelector:
        matchLabels: {pod: b}
"#,
    );
    let want = Reach::all(true)
        .ingress("x/a", false)
        .peers(|f| f.starts_with("y/"), |t| t == "x/a", true)
        .set("x/b", "x/a", true);
    check(&t, proto::TCP, 80, &want);
}

#[test]
fn match_expressions_operators() {
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: exprs, namespace: x}
spec:
  podSelector:
    matchExpressions:
    - {key: pod, operator: In, values: [a]}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions:
        - {key: ns, operator: NotIn, values: [y]}
        - {key: ns, operator: Exists}
      podSelector:
        matchExpressions:
        - {key: pod, operator: In, values: [b, c]}
        - {key: legacy, operator: DoesNotExist}
"#,
    );
    let want = Reach::all(true).ingress("x/a", false).peers(
        |f| !f.starts_with("y/") && !f.ends_with("/a"),
        |t| t == "x/a",
        true,
    );
    check(&t, proto::TCP, 80, &want);
}

#[test]
fn ip_block_with_except() {
    // x/a may reach the cluster range except y's /24 and z/c; ipBlock matches pod IPs (Calico).
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: cidr, namespace: x}
spec:
  podSelector:
    matchLabels: {pod: a}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock:
        cidr: 10.244.0.0/16
        except: [10.244.2.0/24, 10.244.3.12/32]
"#,
    );
    let want = Reach::all(true).egress("x/a", false).peers(
        |f| f == "x/a",
        |t| !t.starts_with("y/") && t != "z/c",
        true,
    );
    check(&t, proto::TCP, 80, &want);
    let out = PolicyQuery {
        dst: Ipv4Addr::new(8, 8, 8, 8),
        ..query(0, 1, proto::TCP, 443)
    };
    assert_eq!(
        t.decide(&out),
        PolicyVerdict::Deny {
            direction: Direction::Egress
        }
    );

    // Ingress from outside the cluster goes through ipBlock only.
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-outside, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from:
    - ipBlock:
        cidr: 203.0.113.0/24
        except: [203.0.113.128/25]
"#,
    );
    let from = |a: [u8; 4]| PolicyQuery {
        src: Ipv4Addr::from(a),
        ..query(0, 0, proto::TCP, 80)
    };
    assert!(allowed(t.decide(&from([203, 0, 113, 5]))));
    assert!(!allowed(t.decide(&from([203, 0, 113, 200]))));
    assert!(!allowed(t.decide(&from([198, 51, 100, 1]))));
    check(
        &t,
        proto::TCP,
        80,
        &Reach::all(true).peers(|_| true, |t| t.starts_with("x/"), false),
    );
}

#[test]
fn named_ports_differ_per_pod() {
    // Ingress: `http` resolves against each destination pod (a: 8080, b: 8081, c: 8082).
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: http, namespace: x}
spec:
  podSelector: {}
  ingress:
  - ports:
    - port: http
"#,
    );
    let deny_x = Reach::all(true).peers(|_| true, |t| t.starts_with("x/"), false);
    check(&t, proto::TCP, 8080, &deny_x.clone().ingress("x/a", true));
    check(&t, proto::TCP, 8081, &deny_x.clone().ingress("x/b", true));
    check(&t, proto::TCP, 8082, &deny_x.clone().ingress("x/c", true));
    check(&t, proto::UDP, 8080, &deny_x);
    check(&t, proto::TCP, 80, &deny_x);

    // Egress: `http` resolves against each destination (peer) pod.
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: http-out, namespace: x}
spec:
  podSelector:
    matchLabels: {pod: a}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {}
    ports:
    - port: http
    - port: serve-81-udp
      protocol: UDP
"#,
    );
    let base = Reach::all(true).egress("x/a", false);
    check(
        &t,
        proto::TCP,
        8080,
        &base
            .clone()
            .peers(|f| f == "x/a", |t| t.ends_with("/a"), true),
    );
    check(
        &t,
        proto::TCP,
        8081,
        &base
            .clone()
            .peers(|f| f == "x/a", |t| t.ends_with("/b"), true),
    );
    check(&t, proto::UDP, 81, &Reach::all(true));
    check(&t, proto::UDP, 80, &base);
    check(&t, proto::TCP, 81, &base);
}

#[test]
fn end_port_ranges() {
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: range, namespace: x}
spec:
  podSelector:
    matchLabels: {pod: a}
  ingress:
  - ports:
    - {protocol: TCP, port: 80, endPort: 81}
    - {protocol: UDP, port: 1000, endPort: 2000}
"#,
    );
    let deny = Reach::all(true).ingress("x/a", false);
    check(&t, proto::TCP, 79, &deny);
    check(&t, proto::TCP, 80, &Reach::all(true));
    check(&t, proto::TCP, 81, &Reach::all(true));
    check(&t, proto::TCP, 82, &deny);
    check(&t, proto::UDP, 999, &deny);
    check(&t, proto::UDP, 1500, &Reach::all(true));
    check(&t, proto::UDP, 2000, &Reach::all(true));
    check(&t, proto::UDP, 2001, &deny);
    check(&t, proto::SCTP, 80, &deny);
}

#[test]
fn udp_and_sctp() {
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: udp-sctp, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
    ports:
    - {protocol: UDP, port: 80}
  - ports:
    - {protocol: SCTP, port: serve-81-sctp}
"#,
    );
    let deny_x = Reach::all(true).peers(|_| true, |t| t.starts_with("x/"), false);
    check(&t, proto::TCP, 80, &deny_x);
    check(
        &t,
        proto::UDP,
        80,
        &deny_x
            .clone()
            .peers(|f| f.starts_with("y/"), |t| t.starts_with("x/"), true),
    );
    check(&t, proto::UDP, 81, &deny_x);
    check(&t, proto::SCTP, 80, &deny_x);
    check(&t, proto::SCTP, 81, &Reach::all(true));
    // Protocols without ports only match rules without ports.
    check(&t, proto::ICMP, 0, &deny_x);
}

#[test]
fn multiple_policies_are_unioned() {
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-zc-on-81, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: z}}
      podSelector: {matchLabels: {pod: c}}
    ports: [{port: 81}]
"#,
    );
    let y_only =
        Reach::all(true)
            .ingress("x/a", false)
            .peers(|f| f.starts_with("y/"), |t| t == "x/a", true);
    check(&t, proto::TCP, 80, &y_only);
    check(&t, proto::TCP, 81, &y_only.clone().set("z/c", "x/a", true));
    // Allow names the policy that allowed it.
    let v = t.decide(&query(idx("z/c"), idx("x/a"), proto::TCP, 81));
    let PolicyVerdict::Allow { by: Some(id) } = v else {
        panic!("{v:?}")
    };
    assert_eq!(t.policy_name(id), Some("x/from-zc-on-81"));
    let v = t.decide(&query(idx("y/c"), idx("x/a"), proto::TCP, 81));
    let PolicyVerdict::Allow { by: Some(id) } = v else {
        panic!("{v:?}")
    };
    assert_eq!(t.policy_name(id), Some("x/from-y"));
}

#[test]
fn policy_types_defaulting() {
    // Egress rules without policyTypes: isolated both ways; only egress to y allowed.
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: both, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]
"#,
    );
    let want = Reach::all(true)
        .ingress("x/a", false)
        .egress("x/a", false)
        .peers(|f| f == "x/a", |t| t.starts_with("y/"), true);
    check(&t, proto::TCP, 80, &want);
    // policyTypes [Egress] with ingress rules: ingress is not isolated, the rules are ignored.
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-only, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
  egress:
  - {}
"#,
    );
    check(&t, proto::TCP, 80, &Reach::all(true));
    // An empty egress list denies all egress.
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: no-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress: [{}]
  egress: []
"#,
    );
    check(&t, proto::UDP, 53, &Reach::all(true).egress("x/a", false));
}

#[test]
fn label_changes_move_pods_in_and_out() {
    let mut b = PolicyBuilder::new(&inputs(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-b-in-prod, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {env: prod}}
      podSelector: {matchLabels: {pod: b}}
"#,
    ))
    .unwrap();
    let closed = Reach::all(true).ingress("x/a", false);
    check(&b.table(), proto::TCP, 80, &closed);

    // Namespace y gains env=prod: y/b gets in.
    b.set_namespace(&namespace("y", &[("env", "prod")]));
    check(
        &b.table(),
        proto::TCP,
        80,
        &closed.clone().set("y/b", "x/a", true),
    );

    // y/c relabelled pod=b: gets in; y/b relabelled away: out.
    let mut yc = pod(1, 2);
    yc.labels = labels(&[("pod", "b")]);
    b.set_pod(yc);
    let mut yb = pod(1, 1);
    yb.labels = labels(&[("pod", "other")]);
    b.set_pod(yb);
    check(
        &b.table(),
        proto::TCP,
        80,
        &closed.clone().set("y/c", "x/a", true),
    );

    // x/a loses its label: no longer selected, so no longer isolated; x/b gains it: isolated.
    let mut xa = pod(0, 0);
    xa.labels = labels(&[("pod", "none")]);
    b.set_pod(xa);
    let mut xb = pod(0, 1);
    xb.labels = labels(&[("pod", "a")]);
    b.set_pod(xb);
    check(
        &b.table(),
        proto::TCP,
        80,
        &Reach::all(true)
            .ingress("x/b", false)
            .set("y/c", "x/b", true),
    );

    // Removing and re-adding a pod, and removing the policy.
    assert!(b.remove_pod("y", "c"));
    let t = b.table();
    assert_eq!(
        t.decide(&query(idx("y/c"), idx("x/b"), proto::TCP, 80)),
        PolicyVerdict::Deny {
            direction: Direction::Ingress
        }
    );
    b.set_pod(pod(1, 2));
    check(
        &b.table(),
        proto::TCP,
        80,
        &Reach::all(true).ingress("x/b", false),
    );
    assert!(b.remove_policy("x", "from-b-in-prod"));
    check(&b.table(), proto::TCP, 80, &Reach::all(true));
}

#[test]
fn incremental_equals_full_compile() {
    let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p1, namespace: x}
spec:
  podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}]
    ports: [{port: http}]
  egress:
  - to: [{podSelector: {matchLabels: {role: db}}, namespaceSelector: {}}]
    ports: [{port: http}]
"#;
    let mut b = PolicyBuilder::new(&inputs(yaml)).unwrap();
    let mut full = inputs(yaml);
    let changes = [
        (1, 0, "client"),
        (2, 1, "db"),
        (0, 2, "client"),
        (2, 1, "client"),
        (0, 1, "db"),
    ];
    for (n, p, role) in changes {
        let mut pd = pod(n, p);
        pd.labels.insert("role".into(), role.into());
        b.set_pod(pd.clone());
        full.pods[n * 3 + p] = pd;
        let want = PolicyTable::compile(&full).unwrap();
        for port in [80, 8080, 8081, 8082] {
            check(
                &b.table(),
                proto::TCP,
                port,
                &Reach::of(&want, proto::TCP, port),
            );
        }
    }
}

#[test]
fn service_vip_after_dnat_uses_backend_pod() {
    // x/a may only talk to pods labelled pod=b. The pipeline calls decide() after DNAT, with the
    // chosen backend as destination; the VIP itself is not a pod and matches no pod selector.
    let t = compile(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: to-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: b}}}]
"#,
    );
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let before_dnat = PolicyQuery {
        dst: vip,
        ..query(idx("x/a"), 0, proto::TCP, 80)
    };
    assert_eq!(
        t.decide(&before_dnat),
        PolicyVerdict::Deny {
            direction: Direction::Egress
        }
    );
    for (backend, ok) in [("y/b", true), ("z/b", true), ("y/c", false)] {
        let after = query(idx("x/a"), idx(backend), proto::TCP, 80);
        assert_eq!(allowed(t.decide(&after)), ok, "backend {backend}");
    }
}

#[test]
fn node_to_own_pod_is_always_allowed() {
    let mut inp = inputs(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"#,
    );
    inp.pods[idx("x/b")].local = false;
    let t = PolicyTable::compile(&inp).unwrap();
    let probe = |to: &str| PolicyQuery {
        src: NODE,
        ..query(0, idx(to), proto::TCP, 8080)
    };
    assert_eq!(t.decide(&probe("x/a")), PolicyVerdict::Allow { by: None });
    // A pod on another node is not this node's to bypass.
    assert_eq!(
        t.decide(&probe("x/b")),
        PolicyVerdict::Deny {
            direction: Direction::Ingress
        }
    );
    let other = PolicyQuery {
        src: Ipv4Addr::new(192, 168, 0, 2),
        ..probe("x/a")
    };
    assert_eq!(
        t.decide(&other),
        PolicyVerdict::Deny {
            direction: Direction::Ingress
        }
    );
    // Pod to the node is egress like any other (denied here).
    let to_node = PolicyQuery {
        dst: NODE,
        ..query(0, 0, proto::TCP, 10250)
    };
    assert_eq!(
        t.decide(&to_node),
        PolicyVerdict::Deny {
            direction: Direction::Egress
        }
    );
}

// ---- bad input ----

fn compile_err(yaml: &str) -> (String, String, InvalidReason) {
    match PolicyTable::compile(&inputs(yaml)) {
        Err(PolicyError::Invalid {
            policy,
            field,
            reason,
        }) => (policy, field, reason),
        other => panic!("expected an invalid-policy error, got {other:?}"),
    }
}

fn bad(spec: &str) -> (String, InvalidReason) {
    let yaml = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: y}}\nspec:\n{spec}"
    );
    let (policy, field, reason) = compile_err(&yaml);
    assert_eq!(policy, "y/bad");
    (field, reason)
}

/// (spec body, expected field path, expected reason)
type BadCase = (&'static str, &'static str, fn(&InvalidReason) -> bool);

#[test]
fn rejects_what_kubernetes_rejects() {
    let cases: Vec<BadCase> = vec![
        (
            "  podSelector: {matchExpressions: [{key: a, operator: Equals, values: [b]}]}\n",
            "spec.podSelector.matchExpressions[0].operator",
            |r| matches!(r, InvalidReason::BadOperator(_)),
        ),
        (
            "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {matchExpressions: [{key: a, operator: In}]}}]\n",
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].values",
            |r| *r == InvalidReason::ValuesRequired,
        ),
        (
            "  podSelector: {}\n  ingress:\n  - ports: [{port: 0}]\n",
            "spec.ingress[0].ports[0].port",
            |r| *r == InvalidReason::PortOutOfRange(0),
        ),
        (
            "  podSelector: {}\n  egress:\n  - ports: [{port: 65536}]\n",
            "spec.egress[0].ports[0].port",
            |r| *r == InvalidReason::PortOutOfRange(65536),
        ),
        (
            "  podSelector: {}\n  ingress:\n  - ports: [{endPort: 90}]\n",
            "spec.ingress[0].ports[0].endPort",
            |r| *r == InvalidReason::EndPortWithoutPort,
        ),
        (
            "  podSelector: {}\n  ingress:\n  - ports: [{port: 90, endPort: 80}]\n",
            "spec.ingress[0].ports[0].endPort",
            |r| matches!(r, InvalidReason::EndPortBelowPort { port: 90, end: 80 }),
        ),
        (
            "  podSelector: {}\n  ingress:\n  - ports: [{port: http, endPort: 80}]\n",
            "spec.ingress[0].ports[0].endPort",
            |r| *r == InvalidReason::EndPortWithNamedPort,
        ),
        (
            "  podSelector: {}\n  ingress:\n  - ports: [{port: Not_A_Name}]\n",
            "spec.ingress[0].ports[0].port",
            |r| matches!(r, InvalidReason::BadPortName(_)),
        ),
        (
            "  podSelector: {}\n  ingress:\n  - ports: [{port: 80, protocol: ICMP}]\n",
            "spec.ingress[0].ports[0].protocol",
            |r| matches!(r, InvalidReason::BadProtocol(_)),
        ),
        (
            "  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/33}}]\n",
            "spec.ingress[0].from[0].ipBlock.cidr",
            |r| matches!(r, InvalidReason::BadCidr(_)),
        ),
        (
            "  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.1}}]\n",
            "spec.ingress[0].from[0].ipBlock.cidr",
            |r| matches!(r, InvalidReason::BadCidr(_)),
        ),
        (
            "  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/16, 11.0.0.0/16]}}]\n",
            "spec.egress[0].to[0].ipBlock.except[1]",
            |r| matches!(r, InvalidReason::ExceptOutsideCidr { .. }),
        ),
        (
            "  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]\n",
            "spec.egress[0].to[0].ipBlock.except[0]",
            |r| matches!(r, InvalidReason::ExceptOutsideCidr { .. }),
        ),
        (
            "  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]\n",
            "spec.egress[0].to[0]",
            |r| *r == InvalidReason::IpBlockWithSelector,
        ),
        (
            "  podSelector: {}\n  egress:\n  - to: [{}]\n",
            "spec.egress[0].to[0]",
            |r| *r == InvalidReason::EmptyPeer,
        ),
        (
            "  podSelector: {}\n  policyTypes: [Ingress, Sideways]\n",
            "spec.policyTypes[1]",
            |r| matches!(r, InvalidReason::BadPolicyType(_)),
        ),
        (
            "  podSelector: {matchLabels: {\"bad key!\": x}}\n",
            "spec.podSelector.matchLabels[\"bad key!\"]",
            |r| matches!(r, InvalidReason::BadLabel(_)),
        ),
    ];
    for (spec, field, reason_ok) in cases {
        let (got_field, reason) = bad(spec);
        assert_eq!(got_field, field, "spec:\n{spec}");
        assert!(
            reason_ok(&reason),
            "unexpected reason {reason:?} for\n{spec}"
        );
        // The message names the policy and the field.
        let msg = PolicyError::Invalid {
            policy: "y/bad".into(),
            field: got_field,
            reason,
        }
        .to_string();
        assert!(msg.contains("y/bad") && msg.contains(field), "{msg}");
    }
}

#[test]
fn invalid_policy_applies_nothing() {
    let good = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
"#;
    // One bad policy among good ones: the whole compile fails.
    let both = format!(
        "{good}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: x}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - ports: [{{port: 70000}}]\n"
    );
    let (policy, field, _) = compile_err(&both);
    assert_eq!(
        (policy.as_str(), field.as_str()),
        ("x/bad", "spec.ingress[0].ports[0].port")
    );

    // A bad update leaves the builder's table unchanged.
    let mut b = PolicyBuilder::new(&inputs(good)).unwrap();
    let before = Reach::of(&b.table(), proto::TCP, 80);
    let mut update = policies(good).remove(0);
    let spec = update.spec.as_mut().unwrap();
    spec.policy_types = Some(vec!["Ingress".into(), "Ingress".into(), "Egress".into()]);
    assert!(matches!(
        b.set_policy(&update),
        Err(PolicyError::Invalid { .. })
    ));
    check(&b.table(), proto::TCP, 80, &before);
    // Duplicate names are rejected too.
    let dup = format!("{good}---{good}");
    assert!(matches!(
        PolicyTable::compile(&inputs(&dup)),
        Err(PolicyError::Duplicate { .. })
    ));
}
