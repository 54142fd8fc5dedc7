//! The API-server source (`server::kube::KubeSource`) against the mock API server behind a
//! `kube::Client` (tower-test, no sockets), writing into a real embedded store: what it stores
//! after lists, watches, bookmarks, a refusing server, objects deleted while it was away, `410
//! Gone` on watches and on list continuations.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use sluice_control::api::{Kind, object::Body};
use sluice_control::kube_mock::MockApi;
use sluice_control::model;
use sluice_control::server::kube::{KubeLink, KubeSource};
use sluice_control::server::{ControlService, ServerConfig};
use sluice_control::store::{RedbStore, Store};

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("a valid API object")
}

fn pod(name: &str, node: &str, ip: &str, labels: serde_json::Value) -> Pod {
    obj(
        json!({"metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c",
            "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}),
    )
}

fn service(name: &str, ip: &str) -> Service {
    obj(json!({"metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80,
            "targetPort": 8080, "protocol": "TCP"}]}}))
}

fn slice(service: &str, ips: &[&str]) -> EndpointSlice {
    obj(
        json!({"metadata": {"name": format!("{service}-1"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip]})).collect::<Vec<_>>()}),
    )
}

fn deny(name: &str) -> NetworkPolicy {
    obj(json!({"metadata": {"name": name, "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}}))
}

fn node(name: &str, cidr: &str) -> Node {
    obj(json!({"metadata": {"name": name}, "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}))
}

struct Running {
    store: RedbStore,
    link: Arc<KubeLink>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start(api: &MockApi) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let (source, link) = KubeSource::new(api.client());
    let svc = ControlService::new(store.clone(), ServerConfig::default()).following(link.clone());
    let task = tokio::spawn(source.run(svc));
    Running {
        store,
        link,
        _dir: dir,
        task,
    }
}

/// Every stored object of the followed kinds except nodes: key -> a short description.
async fn stored(store: &RedbStore) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for kind in [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::NetworkPolicy,
    ] {
        let (_, kvs) = store.list(&model::kind_prefix(kind)).await.unwrap();
        for kv in kvs {
            let o = model::decode_object(&kv.value, kv.mod_revision).unwrap();
            let what = match o.body {
                Some(Body::Pod(p)) => {
                    let mut labels: Vec<_> = p.labels.into_iter().collect();
                    labels.sort();
                    format!("{} {} {:?} ports {}", p.node, p.ip, labels, p.ports.len())
                }
                _ => String::new(),
            };
            out.insert(kv.key, what);
        }
    }
    out
}

/// Poll the store until `f` holds (10 s at most).
async fn until(
    store: &RedbStore,
    what: &str,
    f: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stored(store).await;
        if f(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "never: {what}; store holds {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn has(s: &BTreeMap<String, String>, kind: Kind, name: &str) -> bool {
    let ns = if model::is_namespaced(kind) {
        "default"
    } else {
        ""
    };
    s.contains_key(&model::object_key(&sluice_control::api::ObjectRef {
        kind: kind as i32,
        namespace: ns.into(),
        name: name.into(),
    }))
}

fn pod_entry<'a>(s: &'a BTreeMap<String, String>, name: &str) -> Option<&'a String> {
    s.iter()
        .find(|(k, _)| **k == format!("{}default/{name}", model::kind_prefix(Kind::Pod)))
        .map(|(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_watches_and_relists_leave_no_ghosts() {
    let api = MockApi::new();
    api.put(&obj::<Namespace>(
        json!({"metadata": {"name": "default", "labels": {"team": "a"}}}),
    ));
    api.put(&node("n0", "10.244.7.0/24"));
    api.put(&service("web", "10.96.0.10"));
    api.put(&slice("web", &["10.244.7.5"]));
    api.put(&deny("web-deny"));
    api.put(&pod("a", "n0", "10.244.7.5", json!({"app": "web"})));
    api.put(&pod("b", "n0", "10.244.7.6", json!({"role": "client"})));
    let r = start(&api);

    // First list: everything, pods with the API's labels, ports, node and IP (n0 runs no agent).
    let s = until(&r.store, "the first list is stored", |s| s.len() == 6).await;
    assert!(has(&s, Kind::Namespace, "default"));
    assert!(has(&s, Kind::Service, "web"));
    assert!(has(&s, Kind::EndpointSlice, "web-1"));
    assert!(has(&s, Kind::NetworkPolicy, "web-deny"));
    assert_eq!(
        pod_entry(&s, "a").map(String::as_str),
        Some(r#"n0 10.244.7.5 [("app", "web")] ports 1"#)
    );
    assert!(r.link.nodes_listed());
    assert_eq!(
        r.link.pod_cidr("n0"),
        Some("10.244.7.0/24".parse().unwrap())
    );
    let p = r.link.progress();
    assert!(p.first_sync.is_some(), "{p:?}");
    assert_eq!(p.listed.len(), 6, "{p:?}");
    let reqs = api.requests();
    assert!(
        reqs.iter().any(|q| q.contains("/api/v1/pods?")
            && q.contains("watch=true")
            && q.contains("allowWatchBookmarks=true")),
        "{reqs:#?}"
    );

    // Watch events: a label change, a deletion, a new object.
    api.put(&pod("b", "n0", "10.244.7.6", json!({"app": "web"})));
    api.delete::<Service>(Some("default"), "web");
    api.put(&service("api", "10.96.0.11"));
    until(&r.store, "watch events are stored", |s| {
        pod_entry(s, "b").is_some_and(|p| p.contains(r#"("app", "web")"#))
            && !has(s, Kind::Service, "web")
            && has(s, Kind::Service, "api")
    })
    .await;

    // A bookmark changes nothing in the store.
    let (rev_before, _) = r
        .store
        .list(&model::kind_prefix(Kind::Unspecified))
        .await
        .unwrap();
    api.bookmark();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rev_after, _) = r
        .store
        .list(&model::kind_prefix(Kind::Unspecified))
        .await
        .unwrap();
    assert_eq!(rev_before, rev_after, "a bookmark wrote to the store");

    // The server goes away; objects change and are deleted meanwhile, and its history is
    // compacted: resuming the watches answers 410, the source relists, and what was deleted
    // while it was away is gone (no ghosts), what was added is there.
    let lists_before = r.link.progress().lists.get("Pod").copied().unwrap_or(0);
    api.set_refusing(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.delete::<NetworkPolicy>(Some("default"), "web-deny");
    api.delete::<Pod>(Some("default"), "a");
    api.put(&deny("other-deny"));
    api.compact();
    api.set_refusing(false);
    let s = until(&r.store, "the relist after the outage is stored", |s| {
        !has(s, Kind::NetworkPolicy, "web-deny")
            && has(s, Kind::NetworkPolicy, "other-deny")
            && pod_entry(s, "a").is_none()
    })
    .await;
    assert_eq!(s.len(), 5, "{s:#?}");
    let lists_after = r.link.progress().lists.get("Pod").copied().unwrap_or(0);
    assert!(
        lists_after > lists_before,
        "no relist of pods: {lists_before} -> {lists_after}"
    );

    // 410 Gone as an ERROR event on the open watches: every kind relists; a delete that only a
    // relist can see (made after the 410, while the watches are being reopened) is applied.
    let before = r.link.progress().lists.clone();
    api.gone();
    api.delete::<Pod>(Some("default"), "b");
    until(&r.store, "pod b deleted after the 410", |s| {
        pod_entry(s, "b").is_none()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = r.link.progress().lists;
        if before
            .iter()
            .all(|(k, n)| after.get(k).copied().unwrap_or(0) > *n)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every kind relisted: {before:?} -> {after:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Node deletion: the node leaves Sluice's view (no pod CIDR any more).
    api.delete::<Node>(None, "n0");
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.link.pod_cidr("n0").is_some() {
        assert!(
            Instant::now() < deadline,
            "the deleted node kept its pod CIDR"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A paginated list whose continuation expires (410 on `continue`) is started again; nothing of
/// the cut list is written until a whole list arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_list_continuation_relists_whole() {
    let api = MockApi::new();
    api.put(&obj::<Namespace>(json!({"metadata": {"name": "default"}})));
    // More than one page (the watcher's pages are 500 objects).
    for i in 0..1200 {
        api.put(&pod(
            &format!("p{i}"),
            "elsewhere",
            &format!("10.245.{}.{}", i / 250, i % 250 + 1),
            json!({"app": "x"}),
        ));
    }
    api.expire_continue(1);
    let r = start(&api);
    let s = until(&r.store, "all 1200 pods are stored", |s| s.len() == 1201).await;
    assert!(pod_entry(&s, "p1199").is_some());
    let reqs = api.requests();
    let continues = reqs
        .iter()
        .filter(|q| q.contains("/api/v1/pods?") && q.contains("continue="))
        .count();
    assert!(continues >= 3, "pages were not continued: {reqs:#?}");
    assert!(
        r.link.progress().lists.get("Pod").copied().unwrap_or(0) >= 2,
        "the cut list was not started again: {:?}",
        r.link.progress()
    );
}
