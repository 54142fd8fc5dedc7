//! Start-up against a big cluster: the API-server source lists 10,000 Pods, 1,000 Services and
//! 1,000 EndpointSlices (100 Nodes) from the mock API server (pages of 500) into a real embedded
//! store. Prints the time to first sync and the process's resident memory (this test is alone in
//! its binary, so the figures are the mock's objects plus the source's and the store's work).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use sluice_control::api::Kind;
use sluice_control::kube_mock::MockApi;
use sluice_control::model;
use sluice_control::server::kube::KubeSource;
use sluice_control::server::{ControlService, ServerConfig};
use sluice_control::store::{RedbStore, Store};

const PODS: usize = 10_000;
const SERVICES: usize = 1_000;
const NODES: usize = 100;

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("a valid API object")
}

/// (VmRSS, VmHWM) in MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn pod_ip(i: usize) -> String {
    format!("10.244.{}.{}", i / 100, i % 100 + 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_pods_first_sync() {
    let api = MockApi::new();
    for ns in 0..10 {
        api.put(&obj::<Namespace>(
            json!({"metadata": {"name": format!("ns{ns}")}}),
        ));
    }
    for n in 0..NODES {
        api.put(&obj::<Node>(
            json!({"metadata": {"name": format!("node{n}")},
            "spec": {"podCIDR": format!("10.244.{n}.0/24")}}),
        ));
    }
    for i in 0..PODS {
        api.put(&obj::<Pod>(json!({
            "metadata": {"name": format!("pod{i}"), "namespace": format!("ns{}", i % 10),
                "labels": {"app": format!("app{}", i % SERVICES), "tier": "web"}},
            "spec": {"nodeName": format!("node{}", i / 100), "containers": [{"name": "c",
                "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}]}})));
    }
    for s in 0..SERVICES {
        let ns = format!("ns{}", s % 10);
        let ip = format!("10.96.{}.{}", s / 200, s % 200 + 1);
        api.put(&obj::<Service>(
            json!({"metadata": {"name": format!("svc{s}"), "namespace": ns},
            "spec": {"clusterIP": ip, "clusterIPs": [ip],
                "selector": {"app": format!("app{s}")},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
        ));
        let eps: Vec<_> = (0..PODS / SERVICES)
            .map(|k| json!({"addresses": [pod_ip(s + k * SERVICES)]}))
            .collect();
        api.put(&obj::<EndpointSlice>(json!({
            "metadata": {"name": format!("svc{s}-1"), "namespace": ns,
                "labels": {"kubernetes.io/service-name": format!("svc{s}")}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps})));
    }
    let (rss_mock, _) = rss_mib();

    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let t0 = Instant::now();
    let (source, link) = KubeSource::new(api.client());
    let svc = ControlService::new(store.clone(), ServerConfig::default()).following(link.clone());
    let task = tokio::spawn(source.run(svc));
    let first_sync = loop {
        if let Some(t) = link.progress().first_sync {
            break t;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no first sync in 300 s: {:?}",
            link.progress()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (rss_after, hwm) = rss_mib();
    task.abort();

    let count = |kind| {
        let store = store.clone();
        async move { store.list(&model::kind_prefix(kind)).await.unwrap().1.len() }
    };
    let pods = count(Kind::Pod).await;
    let services = count(Kind::Service).await;
    let slices = count(Kind::EndpointSlice).await;
    let p = link.progress();
    println!(
        "first sync of {PODS} pods, {SERVICES} services, {SERVICES} endpoint slices, {NODES} nodes: \
         {:.2} s; {} store transactions, {} keys; RSS {:.0} MiB with the mock's objects, \
         {:.0} MiB after the first sync, peak {:.0} MiB ({} build)",
        first_sync.as_secs_f64(),
        p.commits,
        p.keys_written,
        rss_mock,
        rss_after,
        hwm,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    );
    assert_eq!((pods, services, slices), (PODS, SERVICES, SERVICES));
    // Written in batches, not one transaction per object.
    assert!(p.commits < (PODS + 2 * SERVICES) as u64 / 50, "{p:?}");
    let reqs = api.requests();
    assert!(
        reqs.iter()
            .any(|q| q.contains("/api/v1/pods?") && q.contains("continue=")),
        "the pod list was not paginated"
    );
}
