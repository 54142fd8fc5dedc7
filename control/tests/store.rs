//! Both storage backends: the embedded store survives SIGKILL mid-writes; etcd (a real server
//! started here) passes the same conformance checks, resyncs after compaction, and two
//! `sluice-control` replicas on it stay consistent without colliding allocations.

mod common;

use std::collections::BTreeSet;

use common::*;
use sluice_control::api::{self, Kind, object::Body};
use sluice_control::client::{ControlClient, watch_cluster};
use sluice_control::store::{EtcdStore, EtcdTls, Op, Store, Txn, WatchItem, conformance};

fn service_ip(o: &api::Object) -> Option<String> {
    match &o.body {
        Some(Body::K8s(k)) => {
            let v: serde_json::Value = serde_json::from_str(&k.json).ok()?;
            v["spec"]["clusterIP"].as_str().map(str::to_string)
        }
        _ => None,
    }
}

#[tokio::test]
async fn redb_survives_sigkill_mid_writes() {
    let data = tempfile::tempdir().unwrap();
    let store_args = vec!["--data-dir".to_string(), data.path().display().to_string()];
    let mut server = Server::start(&Mode::Plaintext, "127.0.0.1:0", &store_args);
    let mut acked: Vec<String> = Vec::new();
    for round in 0..4 {
        let cfg = server.config(&Mode::Plaintext, None);
        let client = ControlClient::connect(&cfg).await.unwrap();
        // Writers keep applying Services (object + ClusterIP + NodePort claims in one transaction)
        // while the server is SIGKILLed under them.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut writers = Vec::new();
        for w in 0..4 {
            let client = client.clone();
            let tx = tx.clone();
            writers.push(tokio::spawn(async move {
                for i in 0.. {
                    let name = format!("s-{round}-{w}-{i}");
                    match client
                        .apply(vec![k8s(Kind::Service, service_json("default", &name))])
                        .await
                    {
                        Ok(_) => {
                            let _ = tx.send(name);
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        drop(tx);
        let mut this_round = 0;
        while this_round < 20 {
            acked.push(rx.recv().await.unwrap());
            this_round += 1;
        }
        server.kill();
        for w in writers {
            w.await.unwrap();
        }
        while let Ok(n) = rx.try_recv() {
            acked.push(n);
        }
        server.restart();
    }
    let client = ControlClient::connect(&server.config(&Mode::Plaintext, None))
        .await
        .unwrap();
    let services = client.list(Kind::Service, "default").await.unwrap().objects;
    let names: BTreeSet<String> = services
        .iter()
        .map(|o| sluice_control::model::object_ref(o).unwrap().name)
        .collect();
    for n in &acked {
        assert!(names.contains(n), "acknowledged {n} lost after SIGKILL");
    }
    let ips: BTreeSet<String> = services.iter().filter_map(service_ip).collect();
    assert_eq!(
        ips.len(),
        services.len(),
        "every Service has its own ClusterIP after the crashes"
    );
    // The allocation claims agree with the objects: a new Service gets an unused address.
    let fresh = client
        .apply(vec![k8s(
            Kind::Service,
            service_json("default", "after-crash"),
        )])
        .await
        .unwrap();
    let ip = service_ip(&fresh.objects[0]).unwrap();
    assert!(!ips.contains(&ip), "{ip} handed out twice");
    // Revisions continue from where they were.
    let status = client.status().await.unwrap();
    assert!(status.revision as usize > acked.len());
}

#[tokio::test]
async fn etcd_conformance_and_compaction() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), &EtcdTls::default())
        .await
        .unwrap();
    conformance::basic(&store).await;

    // A watcher from a compacted revision gets a snapshot, then changes.
    let mut revs = Vec::new();
    for i in 0..5u8 {
        revs.push(
            store
                .commit(Txn {
                    compares: vec![],
                    ops: vec![Op::Put(format!("/c/{i}"), vec![i])],
                })
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let mut raw = etcd_client::Client::connect([etcd.endpoint.as_str()], None)
        .await
        .unwrap();
    raw.compact(revs[3] as i64, None).await.unwrap();
    let mut rx = store.watch("/c/", revs[0]).await.unwrap();
    match rx.recv().await.unwrap().unwrap() {
        WatchItem::Snapshot { revision, kvs } => {
            assert!(revision >= revs[4]);
            assert_eq!(kvs.len(), 5);
        }
        other => panic!("expected a snapshot after compaction, got {other:?}"),
    }
    let r = store
        .commit(Txn {
            compares: vec![],
            ops: vec![Op::Delete("/c/0".into())],
        })
        .await
        .unwrap()
        .unwrap();
    match rx.recv().await.unwrap().unwrap() {
        WatchItem::Changes { revision, events } => {
            assert_eq!(revision, r);
            assert_eq!(events[0].value, None);
        }
        other => panic!("expected changes, got {other:?}"),
    }
}

#[tokio::test]
async fn two_replicas_on_one_etcd() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let args = vec![
        "--store".to_string(),
        "etcd".to_string(),
        "--etcd-endpoints".to_string(),
        etcd.endpoint.clone(),
    ];
    let one = Server::start(&Mode::Plaintext, "127.0.0.1:0", &args);
    let two = Server::start(&Mode::Plaintext, "127.0.0.1:0", &args);
    let c1 = ControlClient::connect(&one.config(&Mode::Plaintext, None))
        .await
        .unwrap();
    let c2 = ControlClient::connect(&two.config(&Mode::Plaintext, None))
        .await
        .unwrap();

    // Write through one, watch through the other.
    let mut watch = watch_cluster(two.config(&Mode::Plaintext, None), None);
    let applied = c1
        .apply(vec![k8s(Kind::Namespace, namespace_json("via-one"))])
        .await
        .unwrap();
    watch
        .wait_for(|s| s.revision >= applied.revision)
        .await
        .unwrap();
    assert!(watch.state().namespaces.contains_key("via-one"));

    // Concurrent allocations through both replicas never collide.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let c = if i % 2 == 0 { c1.clone() } else { c2.clone() };
        tasks.push(tokio::spawn(async move {
            let svc = c
                .apply(vec![k8s(
                    Kind::Service,
                    service_json("default", &format!("svc-{i}")),
                )])
                .await
                .unwrap();
            let node = c
                .register_node(
                    &format!("node-{i}"),
                    format!("192.168.0.{}", i + 1).parse().unwrap(),
                    [2, 0, 0, 0, 0, i as u8],
                )
                .await
                .unwrap();
            (service_ip(&svc.objects[0]).unwrap(), node.pod_cidr)
        }));
    }
    let mut ips = BTreeSet::new();
    let mut cidrs = BTreeSet::new();
    for t in tasks {
        let (ip, cidr) = t.await.unwrap();
        assert!(ips.insert(ip.clone()), "ClusterIP {ip} allocated twice");
        assert!(cidrs.insert(cidr.clone()), "pod CIDR {cidr} leased twice");
    }
    let ports: Vec<i64> = c2
        .list(Kind::Service, "default")
        .await
        .unwrap()
        .objects
        .iter()
        .filter_map(|o| match &o.body {
            Some(Body::K8s(k)) => serde_json::from_str::<serde_json::Value>(&k.json).ok()?["spec"]
                ["ports"][0]["nodePort"]
                .as_i64(),
            _ => None,
        })
        .collect();
    assert_eq!(ports.len(), 24);
    assert_eq!(
        ports.iter().collect::<BTreeSet<_>>().len(),
        24,
        "NodePorts collide: {ports:?}"
    );

    // Both replicas see the same state at the same revision.
    let (l1, l2) = (
        c1.list(Kind::Unspecified, "").await.unwrap(),
        c2.list(Kind::Unspecified, "").await.unwrap(),
    );
    let rev = l1.revision.max(l2.revision);
    watch.wait_for(|s| s.revision >= rev).await.unwrap();
    let l1 = c1.list(Kind::Unspecified, "").await.unwrap();
    let l2 = c2.list(Kind::Unspecified, "").await.unwrap();
    assert_eq!(l1.objects, l2.objects);
    assert_eq!(watch.state().len(), l1.objects.len());
    // Removing a node through one replica frees its CIDR for a node registering through the other.
    let freed = cidrs.iter().next().unwrap().clone();
    let owner = c1
        .list(Kind::Node, "")
        .await
        .unwrap()
        .objects
        .into_iter()
        .find_map(|o| match o.body {
            Some(Body::Node(n)) if n.pod_cidr == freed => Some(n.name),
            _ => None,
        })
        .unwrap();
    assert!(c1.remove_node(&owner).await.unwrap());
    let n = c2
        .register_node("late", "192.168.1.1".parse().unwrap(), [2, 0, 0, 0, 1, 1])
        .await
        .unwrap();
    assert_eq!(n.pod_cidr, freed);
}
