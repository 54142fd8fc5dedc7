//! The agent's unix-socket API without the socket and the kernel: what `sluice-agent` does with a
//! prost-decoded request before it touches a veth or a worker. The input is a sequence of
//! requests, each `[method, length, bytes]` (method: byte mod 5 = NodeInfo, AddPod, DelPod,
//! Status, Observe; length: one byte), applied in order to one registry.
//!
//! AddPod goes through `api::pod_from_request`, `registry::admit` and, when admitted, into the
//! registry and a rebuilt `tables::Snapshot` (the tables the workers would get); DelPod removes
//! by key as `Agent::del_pod` does; Observe filters a fixed event history with
//! `EventHub::recent`. Checks: a bad request is `InvalidArgument`; an admitted pod is in the
//! snapshot at its address and port; two pods never share an address; Observe honours `last`
//! and its filters.
#![no_main]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sluice_agent::api::pod_from_request;
use sluice_agent::config::{Mac, NodeConfig};
use sluice_agent::events::EventHub;
use sluice_agent::manifests::ClusterObjects;
use sluice_agent::registry::{PodKey, PodRecord, admit};
use sluice_agent::tables::{NodeLinks, PortId, Snapshot};
use sluice_control::agent_api::{
    AddPodRequest, DelPodRequest, FlowEvent as EventMsg, NodeInfoRequest, ObserveRequest,
    StatusRequest,
};
use sluice_control::observe::matches;

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

struct Fixture {
    config: NodeConfig,
    objects: ClusterObjects,
    hub: EventHub,
}

fn event(i: u64, verdict: &str, src: &str, dst: &str, proto: &str, port: u32) -> EventMsg {
    EventMsg {
        time_unix_ns: 1_000 + i,
        verdict: verdict.into(),
        src_ip: format!("10.244.1.{}", 2 + i % 3),
        dst_ip: "10.96.0.10".into(),
        backend_ip: format!("10.244.2.{}", 3 + i % 2),
        src_pod: src.into(),
        dst_pod: dst.into(),
        protocol: proto.into(),
        dst_port: port,
        backend_port: 8080,
        node: if i % 2 == 0 { "a" } else { "b" }.into(),
        ..Default::default()
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let config: NodeConfig = serde_json::from_str(NODE).expect("the fixed node config parses");
        config.validate().expect("the fixed node config is valid");
        let hub = EventHub::default();
        hub.publish(
            (0..12)
                .map(|i| {
                    let (v, s, d, p, port) = match i % 4 {
                        0 => ("FORWARDED", "default/a", "default/web", "TCP", 80),
                        1 => ("DROPPED", "prod/x", "", "UDP", 53),
                        2 => ("FORWARDED", "", "kube-system/dns", "ICMP", 0),
                        _ => ("DROPPED", "default/b", "prod/db", "SCTP", 5432),
                    };
                    event(i, v, s, d, p, port)
                })
                .collect(),
        );
        Fixture {
            config,
            objects: ClusterObjects::default(),
            hub,
        }
    })
}

fn add_pod(f: &Fixture, registry: &mut BTreeMap<PodKey, PodRecord>, req: AddPodRequest) {
    let pod = match pod_from_request(req) {
        Ok(p) => p,
        Err(s) => return assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}"),
    };
    if admit(f.config.pod_cidr, registry.values(), &pod).is_err() {
        return;
    }
    let (ip, port) = (pod.ip, PortId(pod.host_ifindex));
    registry.insert((pod.container_id.clone(), pod.ifname.clone()), pod);
    let mut ips: Vec<Ipv4Addr> = registry.values().map(|p| p.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), registry.len(), "two pods share an address");
    if let Ok(s) = Snapshot::build(1, &f.config, LINKS, &f.objects, registry.values()) {
        let local = s.pods.get(&ip).expect("an admitted pod is in the snapshot");
        assert_eq!(local.port, port);
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut registry: BTreeMap<PodKey, PodRecord> = BTreeMap::new();
    let mut rest = data;
    while let [method, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (msg, next) = tail.split_at(n);
        rest = next;
        match method % 5 {
            0 => {
                let _ = NodeInfoRequest::decode(msg);
            }
            1 => {
                if let Ok(req) = AddPodRequest::decode(msg) {
                    add_pod(f, &mut registry, req);
                }
            }
            2 => {
                if let Ok(r) = DelPodRequest::decode(msg) {
                    let ifname = if r.ifname.is_empty() {
                        "eth0".to_owned()
                    } else {
                        r.ifname
                    };
                    let key = (r.container_id, ifname);
                    registry.remove(&key);
                    assert!(!registry.contains_key(&key));
                }
            }
            3 => {
                let _ = StatusRequest::decode(msg);
            }
            _ => {
                if let Ok(req) = ObserveRequest::decode(msg) {
                    let got = f.hub.recent(&req);
                    if req.last > 0 {
                        assert!(got.len() <= req.last as usize);
                    }
                    assert!(got.iter().all(|e| matches(&req, e)));
                }
            }
        }
    }
});
