//! What `sluicectl apply` does with a manifest before it dials the control plane, and the
//! translation into the tables an agent would build from the objects. The input is the manifest
//! text (YAML documents or JSON values, as `manifest::parse_text` tells them apart).
//!
//! Drives `manifest::parse_text`, `manifest::validate_all` with the default service CIDR and
//! NodePort range, `K8sObject::to_proto` and the JSON the server stores, then the agent's
//! `tables::Snapshot::build` over the Services, EndpointSlices, NetworkPolicies and Namespaces.
//! Checks: an error names a 1-based document and line; a validated object has a name and its
//! JSON reads back as the same object.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_agent::config::{Mac, NodeConfig};
use sluice_agent::manifests::ClusterObjects;
use sluice_agent::tables::{NodeLinks, PortId, Snapshot};
use sluice_control::manifest::{parse_text, validate_all};
use sluice_control::model::{K8sObject, is_namespaced};

const NODE: &str = r#"{
  "node_name": "a",
  "underlay": {"interface": "up0", "address": "192.168.1.1"},
  "pod_cidr": "10.244.1.0/24",
  "vtep": {"mac": "0e:00:00:00:01:00"},
  "peers": [{"name": "b", "underlay_ip": "192.168.1.2", "underlay_mac": "0e:00:00:00:02:01",
             "pod_cidr": "10.244.2.0/24", "vtep_mac": "0e:00:00:00:02:00"}]
}"#;

const LINKS: NodeLinks = NodeLinks {
    uplink: PortId(2),
    uplink_mac: Mac([0x0e, 0, 0, 0, 1, 1]),
};

fn node() -> &'static NodeConfig {
    static N: OnceLock<NodeConfig> = OnceLock::new();
    N.get_or_init(|| {
        let c: NodeConfig = serde_json::from_str(NODE).expect("the fixed node config parses");
        c.validate().expect("the fixed node config is valid");
        c
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let node = node();
    let mut docs = match parse_text("-", text) {
        Ok(d) => d,
        Err(e) => {
            assert!(e.index >= 1 && e.line >= 1, "{e}");
            return;
        }
    };
    for d in &docs {
        assert!(d.index >= 1 && d.line >= 1);
    }
    if let Err(e) = validate_all(&mut docs, node.service_cidr, node.node_port_range) {
        assert!(e.index >= 1 && e.line >= 1, "{e}");
        return;
    }
    let mut objects = ClusterObjects::default();
    for d in &docs {
        let p = d.object.to_proto();
        assert!(!p.name.is_empty());
        assert_eq!(is_namespaced(d.object.kind()), !p.namespace.is_empty());
        let back = K8sObject::from_json(d.object.kind(), &p.json)
            .unwrap_or_else(|e| panic!("stored JSON does not read back: {e}: {}", p.json));
        assert_eq!(back.to_json(), p.json);
        match d.object.clone() {
            K8sObject::Service(s) => objects.services.push(s),
            K8sObject::EndpointSlice(e) => objects.endpoint_slices.push(e),
            K8sObject::NetworkPolicy(n) => objects.network_policies.push(n),
            K8sObject::Namespace(n) => objects.namespaces.push(n),
            K8sObject::Pod(_) => {}
        }
    }
    let _ = Snapshot::build(1, node, LINKS, &objects, []);
});
