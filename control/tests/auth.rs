//! TLS and bearer tokens: unauthenticated or wrongly authenticated writes are refused, and a node
//! cannot write another node's records.

mod common;

use common::*;
use sluice_control::api::{self, Kind};
use sluice_control::client::{ClientError, ControlClient};
use tonic::Code;

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    match r {
        Err(ClientError::Rpc(s)) => s.code(),
        other => panic!("expected a gRPC error, got {other:?}"),
    }
}

fn pod(node: &str, name: &str, ip: &str) -> api::Pod {
    api::Pod {
        namespace: "default".into(),
        name: name.into(),
        node: node.into(),
        ip: ip.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn writes_need_the_right_token() {
    let certs = Certs::generate();
    let mode = Mode::Tls(certs.dir.path().to_path_buf());
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(
        &mode,
        "127.0.0.1:0",
        &["--data-dir".into(), data.path().display().to_string()],
    );
    let ns = || vec![k8s(Kind::Namespace, namespace_json("x"))];

    // No token, a wrong token, a node token: no operator writes.
    let anon = ControlClient::connect(&server.config(&mode, None))
        .await
        .unwrap();
    assert_eq!(code(anon.apply(ns()).await), Code::Unauthenticated);
    assert_eq!(
        code(anon.list(Kind::Unspecified, "").await),
        Code::Unauthenticated
    );
    let wrong = ControlClient::connect(&server.config(&mode, Some("not-a-token-0123456789")))
        .await
        .unwrap();
    assert_eq!(code(wrong.apply(ns()).await), Code::Unauthenticated);
    assert_eq!(
        code(
            wrong
                .register_node("node-a", "192.168.0.1".parse().unwrap(), [2, 0, 0, 0, 0, 1])
                .await
        ),
        Code::Unauthenticated
    );
    let node_a = ControlClient::connect(&server.config(&mode, Some(NODE_A_TOKEN)))
        .await
        .unwrap();
    assert_eq!(code(node_a.apply(ns()).await), Code::PermissionDenied);
    assert_eq!(
        code(node_a.remove_node("node-b").await),
        Code::PermissionDenied
    );
    let op = ControlClient::connect(&server.config(&mode, Some(OPERATOR_TOKEN)))
        .await
        .unwrap();
    assert_eq!(
        op.list(Kind::Namespace, "").await.unwrap().objects.len(),
        0,
        "refused writes left nothing"
    );
    op.apply(ns()).await.unwrap();

    // Nodes act only as themselves.
    let node_b = ControlClient::connect(&server.config(&mode, Some(NODE_B_TOKEN)))
        .await
        .unwrap();
    assert_eq!(
        code(
            node_a
                .register_node("node-b", "192.168.0.2".parse().unwrap(), [2, 0, 0, 0, 0, 2])
                .await
        ),
        Code::PermissionDenied
    );
    let a = node_a
        .register_node("node-a", "192.168.0.1".parse().unwrap(), [2, 0, 0, 0, 0, 1])
        .await
        .unwrap();
    let b = node_b
        .register_node("node-b", "192.168.0.2".parse().unwrap(), [2, 0, 0, 0, 0, 2])
        .await
        .unwrap();
    assert_ne!(a.pod_cidr, b.pod_cidr);
    let a_net: ipnet::Ipv4Net = a.pod_cidr.parse().unwrap();
    let b_net: ipnet::Ipv4Net = b.pod_cidr.parse().unwrap();
    let a_ip = a_net.hosts().nth(1).unwrap().to_string();
    let b_ip = b_net.hosts().nth(1).unwrap().to_string();
    node_b.report_pod(pod("node-b", "pb", &b_ip)).await.unwrap();
    // node-a reporting a pod as node-b's, overwriting node-b's pod, removing it, or using an IP
    // outside its own pod CIDR: all refused.
    assert_eq!(
        code(node_a.report_pod(pod("node-b", "pa", &b_ip)).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(node_a.report_pod(pod("node-a", "pb", &a_ip)).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(node_a.remove_pod("node-b", "default", "pb").await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(node_a.remove_pod("node-a", "default", "pb").await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(node_a.report_pod(pod("node-a", "pa", &b_ip)).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(node_a.report_sync("node-b", 1).await),
        Code::PermissionDenied
    );
    node_a.report_pod(pod("node-a", "pa", &a_ip)).await.unwrap();
    let pods = op.list(Kind::Pod, "").await.unwrap().objects;
    let owners: Vec<(String, String)> = pods
        .iter()
        .filter_map(|o| match &o.body {
            Some(api::object::Body::Pod(p)) => Some((p.name.clone(), p.node.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        owners,
        vec![
            ("pa".into(), "node-a".into()),
            ("pb".into(), "node-b".into())
        ]
    );
    assert!(node_b.remove_pod("node-b", "default", "pb").await.unwrap());
}

#[tokio::test]
async fn tls_is_verified() {
    let certs = Certs::generate();
    let mode = Mode::Tls(certs.dir.path().to_path_buf());
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(
        &mode,
        "127.0.0.1:0",
        &["--data-dir".into(), data.path().display().to_string()],
    );
    // A client trusting another CA cannot connect; neither can a plaintext one.
    let other = server
        .config(&mode, Some(OPERATOR_TOKEN))
        .with_ca_pem(std::fs::read(certs.path("other-ca.pem")).unwrap());
    let r = match ControlClient::connect(&other).await {
        Ok(c) => c.status().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(
        r.is_err(),
        "a client trusting another CA must not talk to the server"
    );
    let plain = sluice_control::client::ClientConfig::new(format!("http://{}", server.addr))
        .with_token(OPERATOR_TOKEN);
    let r = match ControlClient::connect(&plain).await {
        Ok(c) => c.status().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(r.is_err(), "plaintext must not reach a TLS server");
}

#[tokio::test]
async fn plaintext_is_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = sluice_control::store::RedbStore::open(dir.path()).unwrap();
    let svc = sluice_control::server::ControlService::new(store, Default::default());
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let r = sluice_control::server::serve(
        listener,
        svc,
        sluice_control::auth::Authenticator::insecure_anonymous(),
        None,
        std::future::pending(),
    )
    .await;
    assert!(
        matches!(
            r,
            Err(sluice_control::server::ServeError::PlaintextNotLoopback(_))
        ),
        "{r:?}"
    );
}
