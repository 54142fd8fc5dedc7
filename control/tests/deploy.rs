//! deploy/sluice.yaml: every document parses as its k8s-openapi type, and the RBAC rules grant
//! exactly what the API-server source reads (get/list/watch on each followed resource) plus
//! patch on nodes, to the service account sluice-control runs as.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use sluice_control::server::kube::followed_resources;

#[derive(Default)]
struct Manifest {
    accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    services: Vec<Service>,
    config_maps: Vec<ConfigMap>,
    deployments: Vec<Deployment>,
    daemon_sets: Vec<DaemonSet>,
}

fn manifest() -> Manifest {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/sluice.yaml");
    let text = std::fs::read_to_string(path).expect("deploy/sluice.yaml");
    let mut m = Manifest::default();
    let mut docs = 0;
    for (i, doc) in text.split("\n---\n").enumerate() {
        let v: serde_json::Value =
            serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("document {i} is not YAML: {e}"));
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        fn typed<T: serde::de::DeserializeOwned>(i: usize, doc: &str) -> T {
            serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("document {i}: {e}"))
        }
        match kind.as_str() {
            "ServiceAccount" => m.accounts.push(typed(i, doc)),
            "ClusterRole" => m.roles.push(typed(i, doc)),
            "ClusterRoleBinding" => m.bindings.push(typed(i, doc)),
            "Service" => m.services.push(typed(i, doc)),
            "ConfigMap" => m.config_maps.push(typed(i, doc)),
            "Deployment" => m.deployments.push(typed(i, doc)),
            "DaemonSet" => m.daemon_sets.push(typed(i, doc)),
            other => panic!("document {i}: unexpected kind {other:?}"),
        }
        docs += 1;
    }
    assert_eq!(docs, 7, "documents in deploy/sluice.yaml");
    m
}

#[test]
fn rbac_grants_exactly_the_followed_resources() {
    let m = manifest();
    let [role] = &m.roles[..] else {
        panic!("one ClusterRole expected")
    };
    let mut read = BTreeSet::new();
    let mut patch = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        assert!(
            !groups.contains(&"*".into()) && !resources.contains(&"*".into()),
            "wildcards: {rule:?}"
        );
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        for g in &groups {
            for r in &resources {
                let key = (g.clone(), r.clone());
                for v in &verbs {
                    match *v {
                        "get" | "list" | "watch" => {}
                        "patch" => {
                            patch.insert(key.clone());
                        }
                        other => panic!("verb {other} granted on {key:?}"),
                    }
                }
                if ["get", "list", "watch"].iter().all(|v| verbs.contains(v)) {
                    read.insert(key);
                } else {
                    panic!("{key:?} lacks one of get/list/watch: {verbs:?}");
                }
            }
        }
    }
    let followed: BTreeSet<(String, String)> = followed_resources()
        .iter()
        .map(|(g, r)| (g.to_string(), r.to_string()))
        .collect();
    assert_eq!(
        read, followed,
        "get/list/watch must be exactly the followed resources"
    );
    assert_eq!(
        patch,
        BTreeSet::from([(String::new(), "nodes".to_string())]),
        "patch only on nodes"
    );

    // Bound to the service account the Deployment runs as.
    let [binding] = &m.bindings[..] else {
        panic!("one ClusterRoleBinding expected")
    };
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let [deployment] = &m.deployments[..] else {
        panic!("one Deployment expected")
    };
    let pod = deployment.spec.template.spec.as_ref().unwrap();
    let sa = pod.service_account_name.clone().unwrap_or_default();
    let ns = deployment.metadata.namespace.clone().unwrap_or_default();
    assert!(
        binding
            .subjects
            .iter()
            .flatten()
            .any(|s| s.kind == "ServiceAccount"
                && s.name == sa
                && s.namespace.as_deref() == Some(&ns)),
        "the binding does not name {ns}/{sa}"
    );
    assert!(
        m.accounts
            .iter()
            .any(|a| a.metadata.name.as_deref() == Some(&sa)
                && a.metadata.namespace.as_deref() == Some(&ns))
    );
    let c = &pod.containers[0];
    assert!(
        c.args.iter().flatten().any(|a| a == "--kubernetes"),
        "{c:?}"
    );
    assert_eq!(pod.host_network, Some(true));
}

#[test]
fn agent_daemon_set_has_what_the_agent_needs() {
    let m = manifest();
    let [ds] = &m.daemon_sets[..] else {
        panic!("one DaemonSet expected")
    };
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    let agent = &pod.containers[0];
    let caps: BTreeSet<String> = agent
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    for cap in ["NET_ADMIN", "NET_RAW", "BPF", "IPC_LOCK", "SYS_ADMIN"] {
        assert!(caps.contains(cap), "{cap} missing: {caps:?}");
    }
    let host_path = |volume: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == volume)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    let mounts = |c: &k8s_openapi::api::core::v1::Container| -> BTreeSet<String> {
        c.volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| host_path(&m.name))
            .collect()
    };
    let agent_mounts = mounts(agent);
    for p in ["/sys/fs/bpf", "/run/sluice", "/var/lib/sluice"] {
        assert!(
            agent_mounts.contains(p),
            "agent lacks {p}: {agent_mounts:?}"
        );
    }
    let [init] = pod.init_containers.as_deref().unwrap_or_default() else {
        panic!("one init container expected")
    };
    assert_eq!(
        init.command.as_deref(),
        Some(
            &[
                "/usr/bin/sluice-control".to_string(),
                "install-node".to_string()
            ][..]
        )
    );
    let init_mounts = mounts(init);
    for p in ["/opt/cni/bin", "/etc/cni/net.d", "/run/sluice"] {
        assert!(
            init_mounts.contains(p),
            "init container lacks {p}: {init_mounts:?}"
        );
    }
    let env: BTreeSet<&str> = init.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert!(
        env.contains("NODE_NAME") && env.contains("NODE_IP"),
        "{env:?}"
    );

    // The conflist is JSON naming the plugin, and the agent config names the fixed ClusterIP of
    // the sluice-control Service.
    let [cm] = &m.config_maps[..] else {
        panic!("one ConfigMap expected")
    };
    let data = cm.data.clone().unwrap_or_default();
    let conflist: serde_json::Value =
        serde_json::from_str(&data["10-sluice.conflist"]).expect("the conflist is JSON");
    assert_eq!(conflist["plugins"][0]["type"], "sluice-cni");
    let [svc] = &m.services[..] else {
        panic!("one Service expected")
    };
    let ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .unwrap_or_default();
    assert!(
        data["agent.yaml"].contains(&format!("endpoint: https://{ip}:7443")),
        "the agent config does not point at the Service {ip}"
    );
}
