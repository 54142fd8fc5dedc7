//! etcd over TLS with client certificates, against a real etcd started here with
//! `--client-cert-auth` and certificates made by openssl: the store passes the conformance checks
//! over TLS; a client without a certificate, with one of another CA, or with a plaintext
//! endpoint is refused at connect with a message naming what to fix; `sluice-control --store
//! etcd --etcd-cacert --etcd-cert --etcd-key` serves from it, and without a client certificate
//! exits with that message.

mod common;

use std::process::{Command, Stdio};

use common::*;
use sluice_control::api::Kind;
use sluice_control::client::ControlClient;
use sluice_control::store::{EtcdStore, EtcdTls, Store, StoreError, conformance};

fn certs() -> Certs {
    let c = Certs::generate();
    c.client("client", "ca").client("stranger", "other");
    c
}

#[tokio::test]
async fn store_over_tls_with_a_client_certificate() {
    let certs = certs();
    let Some(etcd) = Etcd::start_with(Some(&certs)).await else {
        return;
    };
    assert!(etcd.endpoint.starts_with("https://"));
    let store = EtcdStore::connect(
        std::slice::from_ref(&etcd.endpoint),
        &certs.etcd_tls("client"),
    )
    .await
    .unwrap();
    assert_eq!(store.backend(), "etcd");
    conformance::basic(&store).await;
}

async fn refusal(endpoint: &str, tls: &EtcdTls) -> String {
    match EtcdStore::connect(&[endpoint.to_string()], tls).await {
        Ok(_) => panic!("etcd accepted {tls:?}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn clients_without_a_good_certificate_are_refused_clearly() {
    let certs = certs();
    let Some(etcd) = Etcd::start_with(Some(&certs)).await else {
        return;
    };

    // The CA only: etcd wants a client certificate.
    let m = refusal(&etcd.endpoint, &certs.etcd_tls("")).await;
    eprintln!("no client certificate: {m}");
    assert!(m.contains(&etcd.endpoint), "{m}");
    assert!(
        m.contains("give --etcd-cert and --etcd-key"),
        "the message should say what to give: {m}"
    );

    // A certificate another CA signed.
    let m = refusal(&etcd.endpoint, &certs.etcd_tls("stranger")).await;
    eprintln!("certificate of another CA: {m}");
    assert!(m.contains("--etcd-cert"), "{m}");

    // The wrong CA for etcd's own certificate.
    let wrong_ca = EtcdTls {
        ca: Some(certs.path("other-ca.pem")),
        ..certs.etcd_tls("client")
    };
    let m = refusal(&etcd.endpoint, &wrong_ca).await;
    eprintln!("wrong CA: {m}");
    assert!(m.contains("--etcd-cacert"), "{m}");

    // Plaintext to a TLS etcd: refused before any request is made.
    let plain = etcd.endpoint.replacen("https://", "http://", 1);
    let m = refusal(&plain, &certs.etcd_tls("client")).await;
    assert!(m.contains("not an https:// endpoint"), "{m}");
    // And without TLS settings it does not get an answer either.
    let e = EtcdStore::connect(&[plain], &EtcdTls::default())
        .await
        .err()
        .expect("a plaintext client got an answer from a TLS etcd");
    assert!(matches!(e, StoreError::EtcdConnect { .. }), "{e}");
}

#[tokio::test]
async fn control_plane_serves_from_etcd_over_tls() {
    let certs = certs();
    let Some(etcd) = Etcd::start_with(Some(&certs)).await else {
        return;
    };
    let path = |f: &str| certs.path(f).display().to_string();
    let mut args: Vec<String> = ["--store", "etcd", "--etcd-endpoints", &etcd.endpoint]
        .map(String::from)
        .to_vec();
    args.extend(
        [
            ("--etcd-cacert", "ca.pem"),
            ("--etcd-cert", "client.pem"),
            ("--etcd-key", "client.key"),
        ]
        .iter()
        .flat_map(|(flag, f)| [flag.to_string(), path(f)]),
    );
    let server = Server::start(&Mode::Plaintext, "127.0.0.1:0", &args);
    let client = ControlClient::connect(&server.config(&Mode::Plaintext, None))
        .await
        .unwrap();
    let applied = client
        .apply(vec![k8s(Kind::Namespace, namespace_json("over-tls"))])
        .await
        .unwrap();
    assert!(applied.revision > 0);
    // It went to etcd: the key is there for a second client with the certificate.
    let store = EtcdStore::connect(
        std::slice::from_ref(&etcd.endpoint),
        &certs.etcd_tls("client"),
    )
    .await
    .unwrap();
    let (_, kvs) = store.list("/").await.unwrap();
    assert!(
        kvs.iter().any(|kv| kv.key.contains("over-tls")),
        "no key names the namespace: {:?}",
        kvs.iter().map(|kv| &kv.key).collect::<Vec<_>>()
    );

    // Without the client certificate the control plane does not start, and says why.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-control"))
        .args(["--listen", "127.0.0.1:0", "--insecure-plaintext"])
        .args(["--store", "etcd", "--etcd-endpoints", &etcd.endpoint])
        .args(["--etcd-cacert", &path("ca.pem")])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("sluice-control without a client certificate: {stderr}");
    assert!(
        stderr.contains("give --etcd-cert and --etcd-key"),
        "{stderr}"
    );
}
