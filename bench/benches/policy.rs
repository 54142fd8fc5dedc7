//! NetworkPolicy stage benchmarks.
//!
//! Cases:
//! - `policy_decide/{policies}x{pods}`: one `PolicyTable::decide` per element, for 10, 1,000 and
//!   10,000 policies over 100 and 10,000 pods; queries go to pods isolated for ingress (mixed
//!   allow and deny), from pods some of which are isolated for egress. Target: < 30 ns, flat
//!   within 1.5x across sizes.
//! - `policy_decide_min/{policies}x{pods}`: the same, but each sample is reported as the
//!   fastest chunk of 4,096 decisions within it (times the iteration count): an estimate of the
//!   cost when the thread is not preempted, for runs on a shared, loaded machine.
//! - `policy_compile/10000x5000`: validate and compile 10,000 policies over 5,000 pods (< 1 s).
//! - `policy_incremental/pod_labels_10000x5000`: one pod's labels change, recompile and take the
//!   table to publish (< 10 ms).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_dataplane::flow::proto;
use sluice_dataplane::policy::k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use sluice_dataplane::policy::k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement,
};
use sluice_dataplane::policy::k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sluice_dataplane::policy::{
    ContainerPort, Namespace, NetworkPolicy, PodInfo, PolicyBuilder, PolicyInputs, PolicyQuery,
    PolicyTable, PolicyVerdict, Protocol,
};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const APPS: usize = 20;

fn labels(kv: &[(&str, String)]) -> BTreeMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn sel(kv: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(kv)),
        match_expressions: None,
    }
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

fn app_of(i: usize, n_ns: usize) -> usize {
    (i / n_ns) % APPS
}

fn pod(i: usize, n_ns: usize, app: usize) -> PodInfo {
    PodInfo {
        namespace: format!("ns{}", i % n_ns),
        name: format!("pod{i}"),
        labels: labels(&[
            ("app", format!("app{app}")),
            ("tier", format!("t{}", i % 3)),
        ]),
        ip: pod_ip(i),
        ports: vec![
            ContainerPort {
                name: Some("http".into()),
                port: 8080 + (i % 3) as u16,
                protocol: Protocol::Tcp,
            },
            ContainerPort {
                name: Some("dns".into()),
                port: 53,
                protocol: Protocol::Udp,
            },
        ],
        local: true,
    }
}

/// A synthetic cluster: 100 pods per namespace, 20 apps; policy `j` selects `app{j % 20}` in
/// namespace `j % n_ns` and allows ingress from labelled namespaces and apps on one numeric and
/// one named port; every fourth policy also restricts egress (ipBlock with except, all
/// namespaces, an endPort range).
fn cluster(n_policies: usize, n_pods: usize) -> PolicyInputs {
    let n_ns = (n_pods / 100).max(1);
    let namespaces = (0..n_ns)
        .map(|i| {
            let mut ns = Namespace::default();
            ns.metadata.name = Some(format!("ns{i}"));
            ns.metadata.labels = Some(labels(&[("team", format!("team{}", i % 10))]));
            ns
        })
        .collect();
    let pods = (0..n_pods).map(|i| pod(i, n_ns, app_of(i, n_ns))).collect();
    let policies = (0..n_policies)
        .map(|j| {
            let ingress = NetworkPolicyIngressRule {
                from: Some(vec![
                    NetworkPolicyPeer {
                        namespace_selector: Some(sel(&[("team", format!("team{}", j % 10))])),
                        pod_selector: Some(LabelSelector {
                            match_labels: None,
                            match_expressions: Some(vec![LabelSelectorRequirement {
                                key: "tier".into(),
                                operator: "In".into(),
                                values: Some(vec![
                                    format!("t{}", j % 3),
                                    format!("t{}", (j + 1) % 3),
                                ]),
                            }]),
                        }),
                        ip_block: None,
                    },
                    NetworkPolicyPeer {
                        pod_selector: Some(sel(&[("app", format!("app{}", (j + 1) % APPS))])),
                        ..Default::default()
                    },
                ]),
                ports: Some(vec![
                    NetworkPolicyPort {
                        port: Some(IntOrString::Int(80 + (j % 50) as i32)),
                        ..Default::default()
                    },
                    NetworkPolicyPort {
                        port: Some(IntOrString::String("http".into())),
                        ..Default::default()
                    },
                ]),
            };
            let egress = (j % 4 == 0).then(|| {
                vec![NetworkPolicyEgressRule {
                    to: Some(vec![
                        NetworkPolicyPeer {
                            ip_block: Some(IPBlock {
                                cidr: "10.0.0.0/8".into(),
                                except: Some(vec![format!("10.{}.0.0/16", 100 + j % 100)]),
                            }),
                            ..Default::default()
                        },
                        NetworkPolicyPeer {
                            namespace_selector: Some(LabelSelector::default()),
                            ..Default::default()
                        },
                    ]),
                    ports: Some(vec![NetworkPolicyPort {
                        port: Some(IntOrString::Int(443)),
                        end_port: Some(445),
                        ..Default::default()
                    }]),
                }]
            });
            let mut np = NetworkPolicy::default();
            np.metadata.name = Some(format!("p{j}"));
            np.metadata.namespace = Some(format!("ns{}", j % n_ns));
            np.spec = Some(NetworkPolicySpec {
                pod_selector: Some(sel(&[("app", format!("app{}", j % APPS))])),
                ingress: Some(vec![ingress]),
                egress,
                policy_types: None,
            });
            np
        })
        .collect();
    PolicyInputs {
        namespaces,
        pods,
        policies,
        node_addrs: vec![Ipv4Addr::new(192, 168, 0, 1)],
    }
}

/// 1,024 queries to pods isolated for ingress, from random pods, on ports that some rule allows
/// and ports no rule allows: half of them allowed and half denied (as far as random sampling
/// finds allowed ones), shuffled.
fn queries(table: &PolicyTable, n_policies: usize, n_pods: usize) -> Vec<PolicyQuery> {
    let n_ns = (n_pods / 100).max(1);
    let isolated: Vec<usize> = (0..n_pods)
        .filter(|&i| {
            let app = app_of(i, n_ns);
            (0..n_policies).any(|j| j % APPS == app && j % n_ns == i % n_ns)
        })
        .collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as usize
    };
    let (mut allowed, mut denied) = (Vec::new(), Vec::new());
    for k in 0..4_000_000 {
        if allowed.len() >= 512 && denied.len() >= 512 {
            break;
        }
        let dst = isolated[next() % isolated.len()];
        let src = next() % n_pods;
        let port = [80 + (next() % 50) as u16, 8080, 8081, 443, 9999][k % 5];
        let q = PolicyQuery {
            src: pod_ip(src),
            dst: pod_ip(dst),
            proto: proto::TCP,
            dst_port: port,
        };
        match table.decide(&q) {
            PolicyVerdict::Allow { .. } if allowed.len() < 512 => allowed.push(q),
            PolicyVerdict::Deny { .. } if denied.len() < 1024 - allowed.len() => denied.push(q),
            _ => {}
        }
    }
    let mut qs: Vec<PolicyQuery> = allowed.into_iter().chain(denied).collect();
    qs.truncate(1024);
    for i in (1..qs.len()).rev() {
        qs.swap(i, next() % (i + 1));
    }
    qs
}

type DecideCase = (String, PolicyTable, Vec<PolicyQuery>);

/// The decision cases, built once for both measurements.
fn decide_cases() -> &'static [DecideCase] {
    static CASES: OnceLock<Vec<DecideCase>> = OnceLock::new();
    CASES.get_or_init(|| {
        let mut cases = Vec::new();
        for n_pods in [100, 10_000] {
            for n_policies in [10, 1_000, 10_000] {
                let table = PolicyTable::compile(&cluster(n_policies, n_pods)).expect("valid");
                let qs = queries(&table, n_policies, n_pods);
                assert_eq!(qs.len(), 1024);
                let allowed = qs
                    .iter()
                    .filter(|q| matches!(table.decide(q), PolicyVerdict::Allow { .. }))
                    .count();
                eprintln!("{n_policies} policies x {n_pods} pods: {allowed}/1024 queries allowed");
                cases.push((format!("{n_policies}x{n_pods}"), table, qs));
            }
        }
        cases
    })
}

fn decide(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_decide");
    g.throughput(Throughput::Elements(1));
    for (name, table, qs) in decide_cases() {
        let mut i = 0usize;
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(table.decide(black_box(&qs[i])))
            })
        });
    }
    g.finish();
}

fn decide_min(c: &mut Criterion) {
    const CHUNK: u64 = 4096;
    let mut g = c.benchmark_group("policy_decide_min");
    g.throughput(Throughput::Elements(1));
    for (name, table, qs) in decide_cases() {
        let mut i = 0usize;
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let mut best = f64::MAX;
                let mut done = 0;
                while done < iters {
                    let n = CHUNK.min(iters - done);
                    let t = Instant::now();
                    for _ in 0..n {
                        i = (i + 1) & 1023;
                        black_box(table.decide(black_box(&qs[i])));
                    }
                    best = best.min(t.elapsed().as_secs_f64() / n as f64);
                    done += n;
                }
                Duration::from_secs_f64(best * iters as f64)
            })
        });
    }
    g.finish();
}

fn compile(c: &mut Criterion) {
    let inputs = cluster(10_000, 5_000);
    let mut g = c.benchmark_group("policy_compile");
    g.sample_size(10);
    g.bench_function("10000x5000", |b| {
        b.iter(|| PolicyTable::compile(black_box(&inputs)).expect("valid"))
    });
    g.finish();
}

fn incremental(c: &mut Criterion) {
    let inputs = cluster(10_000, 5_000);
    let n_ns = 50;
    let mut builder = PolicyBuilder::new(&inputs).expect("valid");
    let mut g = c.benchmark_group("policy_incremental");
    g.sample_size(20);
    let i = 1234;
    let mut flip = false;
    g.bench_function("pod_labels_10000x5000", |b| {
        b.iter(|| {
            flip = !flip;
            let app = app_of(i, n_ns) + usize::from(flip);
            builder.set_pod(pod(i, n_ns, app));
            black_box(builder.table())
        })
    });
    g.finish();
}

criterion_group!(benches, decide, decide_min, compile, incremental);
criterion_main!(benches);
