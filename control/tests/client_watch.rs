//! The agent's watch loop: converges, survives the server being SIGKILLed and restarted, and
//! resyncs from a snapshot when the history it needs is gone.

mod common;

use common::*;
use sluice_control::api::{self, Kind};
use sluice_control::client::{ClusterState, ControlClient, watch_cluster};
use sluice_control::store::{Op, RedbStore, Store, Txn};

/// The objects a fresh List returns, as (kind, namespace, name) triples, and the same from a state.
async fn listed(op: &ControlClient) -> (u64, Vec<(i32, String, String)>) {
    let resp = op.list(Kind::Unspecified, "").await.unwrap();
    let mut v: Vec<_> = resp
        .objects
        .iter()
        .map(|o| {
            let r = sluice_control::model::object_ref(o).unwrap();
            (r.kind, r.namespace, r.name)
        })
        .collect();
    v.sort();
    (resp.revision, v)
}

fn held(s: &ClusterState) -> Vec<(i32, String, String)> {
    let mut v = Vec::new();
    v.extend(
        s.nodes
            .keys()
            .map(|n| (Kind::Node as i32, String::new(), n.clone())),
    );
    v.extend(
        s.pods
            .keys()
            .map(|(ns, n)| (Kind::Pod as i32, ns.clone(), n.clone())),
    );
    v.extend(
        s.namespaces
            .keys()
            .map(|n| (Kind::Namespace as i32, String::new(), n.clone())),
    );
    v.extend(
        s.services
            .keys()
            .map(|(ns, n)| (Kind::Service as i32, ns.clone(), n.clone())),
    );
    v.extend(
        s.endpoint_slices
            .keys()
            .map(|(ns, n)| (Kind::EndpointSlice as i32, ns.clone(), n.clone())),
    );
    v.extend(
        s.network_policies
            .keys()
            .map(|(ns, n)| (Kind::NetworkPolicy as i32, ns.clone(), n.clone())),
    );
    v.sort();
    v
}

#[tokio::test]
async fn converges_across_server_restarts_and_resyncs() {
    let certs = Certs::generate();
    let mode = Mode::Tls(certs.dir.path().to_path_buf());
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        &mode,
        "127.0.0.1:0",
        &[
            "--data-dir".into(),
            data.path().display().to_string(),
            "--history".into(),
            "4".into(),
        ],
    );
    let node_cfg = server.config(&mode, Some(NODE_A_TOKEN));
    let node = ControlClient::connect(&node_cfg).await.unwrap();
    let me = node
        .register_node("node-a", "192.168.0.1".parse().unwrap(), [2, 0, 0, 0, 0, 1])
        .await
        .unwrap();
    let mut watch = watch_cluster(node_cfg.clone(), Some("node-a".into()));
    let op = ControlClient::connect(&server.config(&mode, Some(OPERATOR_TOKEN)))
        .await
        .unwrap();
    let docs = sluice_control::manifest::read_path(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/manifests"
    ))
    .unwrap();
    let objects: Vec<_> = docs.into_iter().map(|d| d.object).collect();
    let applied = op.apply_k8s(&objects).await.unwrap();
    watch
        .wait_for(|s| s.revision >= applied.revision)
        .await
        .unwrap();
    {
        let s = watch.state();
        assert_eq!(s.nodes["node-a"].pod_cidr, me.pod_cidr);
        let web = &s.services[&("demo".to_string(), "web".to_string())];
        assert!(
            web.spec
                .as_ref()
                .unwrap()
                .cluster_ip
                .as_deref()
                .unwrap()
                .starts_with("10.96.")
        );
        assert_eq!(s.endpoint_slices_of("demo", "web").count(), 1);
        assert_eq!(s.network_policies.len(), 1);
        assert_eq!(s.snapshots, 1);
    }
    let ip = me
        .pod_cidr
        .parse::<ipnet::Ipv4Net>()
        .unwrap()
        .hosts()
        .nth(1)
        .unwrap();
    node.report_pod(api::Pod {
        namespace: "demo".into(),
        name: "web-0".into(),
        node: "node-a".into(),
        ip: ip.to_string(),
        labels: [("app".to_string(), "web".to_string())].into(),
        ..Default::default()
    })
    .await
    .unwrap();
    node.report_sync("node-a", applied.revision).await.unwrap();

    // SIGKILL the server under the running client; restart it; change things; the client catches up
    // from its revision (deltas).
    server.restart();
    let op = ControlClient::connect(&server.config(&mode, Some(OPERATOR_TOKEN)))
        .await
        .unwrap();
    op.delete(vec![api::ObjectRef {
        kind: Kind::NetworkPolicy as i32,
        namespace: "demo".into(),
        name: "web-allow-clients".into(),
    }])
    .await
    .unwrap();
    let (rev, want) = listed(&op).await;
    watch.wait_for(|s| s.revision >= rev).await.unwrap();
    assert_eq!(held(&watch.state()), want);
    assert_eq!(
        watch.state().snapshots,
        1,
        "a restart within history resumes with deltas"
    );
    assert_eq!(
        watch.state().pods[&("demo".to_string(), "web-0".to_string())].ip,
        ip.to_string()
    );

    // Kill it again and, while it is down, make more changes than the history holds (writing the
    // store directly): the client must get a snapshot and converge.
    server.kill();
    {
        let store = RedbStore::open_with_history(data.path(), 4).unwrap();
        for i in 0..10 {
            let ns = sluice_control::model::K8sObject::from_json(
                Kind::Namespace,
                &namespace_json(&format!("offline-{i}")),
            )
            .unwrap();
            let o = api::Object {
                body: Some(api::object::Body::K8s(ns.to_proto())),
                revision: 0,
            };
            let key =
                sluice_control::model::object_key(&sluice_control::model::object_ref(&o).unwrap());
            store
                .commit(Txn {
                    compares: vec![],
                    ops: vec![Op::Put(key, sluice_control::model::encode_object(&o))],
                })
                .await
                .unwrap()
                .unwrap();
        }
    }
    server.restart();
    let op = ControlClient::connect(&server.config(&mode, Some(OPERATOR_TOKEN)))
        .await
        .unwrap();
    let (rev, want) = listed(&op).await;
    watch.wait_for(|s| s.revision >= rev).await.unwrap();
    assert_eq!(held(&watch.state()), want);
    assert!(
        watch.state().snapshots >= 2,
        "a client behind compacted history resyncs from a snapshot"
    );
    assert!(watch.state().namespaces.contains_key("offline-9"));

    // The status shows the agent connected, with the revision it reported.
    node.report_sync("node-a", rev).await.unwrap_or(());
    let status = eventually("node-a connected", || {
        let op = op.clone();
        async move {
            let s = op.status().await.ok()?;
            s.agents
                .iter()
                .find(|a| a.node == "node-a" && a.connected)
                .cloned()
        }
    })
    .await;
    assert_eq!(status.node, "node-a");
}

/// SIGTERM stops the server while an agent's Watch stream is open (graceful shutdown alone would
/// wait for the stream forever): it exits with success within its grace period, and the watcher
/// sees the stream end.
#[tokio::test]
async fn sigterm_stops_the_server_with_a_watch_open() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        &Mode::Plaintext,
        "127.0.0.1:0",
        &["--data-dir".into(), data.path().display().to_string()],
    );
    let op = ControlClient::connect(&server.config(&Mode::Plaintext, None))
        .await
        .unwrap();
    let mut stream = op.watch(0, "").await.unwrap();
    let pid = server.child.id().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(term.success());
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(15),
            "sluice-control still runs 15 s after SIGTERM with a watch open"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    println!("exited {status} {:?} after SIGTERM", t.elapsed());
    assert!(status.success(), "{status}");
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => break other.map(|_| ()),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch stream did not end");
}
