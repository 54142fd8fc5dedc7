//! What `sluice-cni` reads from the runtime before it touches the system: the environment and the
//! network configuration on stdin. The input is the environment (`NAME=VALUE` lines) up to the
//! first NUL byte, then stdin (no NUL: all stdin, empty environment).
//!
//! Drives the answer version (`plugin::caller_version`), `CNI_COMMAND`, `config::parse`, the
//! spec's error JSON, `CniEnv::read` for the attachment verbs, the names and paths derived from
//! them, `NodeNet::resolve` (with and without the agent's `NodeInfo`), and `prevResult` through
//! `CniResult` in every version. Checks: errors carry a spec code; the interface MTU is in range
//! and no route MTU exceeds it.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use sluice_cni::config::{self, MTU_RANGE, SUPPORTED_VERSIONS};
use sluice_cni::env::{CniEnv, Command, parse_args};
use sluice_cni::plugin::{MAX_ROUTE_MTU, NodeNet, caller_version};
use sluice_cni::result::CniResult;
use sluice_cni::{error::CniError, ipam};
use sluice_control::agent_api::NodeInfoResponse;

/// Every error leaves the plugin as the spec's JSON in the caller's version.
fn answer(e: &CniError, version: &str) {
    let j = e.to_json(version);
    assert_eq!(j["code"], e.code as u32);
    assert_eq!(j["cniVersion"], version);
}

fuzz_target!(|data: &[u8]| {
    let (env_bytes, stdin) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[][..], data),
    };
    let env: BTreeMap<String, String> = String::from_utf8_lossy(env_bytes)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let var = |k: &str| env.get(k).cloned();

    let version = caller_version(stdin);
    assert!(SUPPORTED_VERSIONS.contains(&version.as_str()));
    if let Some(c) = var("CNI_COMMAND")
        && let Err(e) = Command::parse(&c)
    {
        answer(&e, &version);
    }
    if let Err(e) = parse_args(&var("CNI_ARGS").unwrap_or_default()) {
        answer(&e, &version);
    }
    let conf = match config::parse(stdin) {
        Ok(c) => c,
        Err(e) => return answer(&e, &version),
    };
    assert_eq!(conf.cni_version, version);

    for cmd in [Command::Add, Command::Del, Command::Check] {
        match CniEnv::read(cmd, var) {
            Ok(e) => {
                let host = ipam::host_ifname(&e.container_id, &e.ifname);
                assert!(host.len() <= 15);
                let _ = ipam::delegated_key(&e.container_id, &e.ifname);
                let _ = (e.k8s_namespace(), e.k8s_name());
            }
            Err(e) => answer(&e, &version),
        }
    }
    let _ = (conf.ipam_dir(), conf.agent_socket(), conf.agent_timeout());
    if let Some(subnet) = conf.ipam.subnet {
        let _ = ipam::candidates(subnet).take(4).count();
    }

    let info = NodeInfoResponse {
        node_name: "n1".into(),
        pod_cidr: "10.244.1.0/24".into(),
        cluster_cidr: "10.244.0.0/16".into(),
        service_cidr: "10.96.0.0/12".into(),
        underlay_mtu: 1500,
        pod_mtu: 65535,
    };
    for info in [None, Some(&info)] {
        match NodeNet::resolve(&conf, info) {
            Ok(net) => {
                assert!(MTU_RANGE.contains(&net.mtu), "interface MTU {}", net.mtu);
                for r in &net.routes {
                    if let Some(m) = r.mtu {
                        assert!(
                            m <= net.mtu && m <= MAX_ROUTE_MTU,
                            "route {r:?} over {net:?}"
                        );
                    }
                }
            }
            Err(e) => answer(&e, &version),
        }
    }

    if let Some(prev) = &conf.prev_result {
        match CniResult::from_json(prev) {
            Ok(mut r) => {
                for v in SUPPORTED_VERSIONS {
                    let _ = r.to_json(v);
                }
                // ADD appends its own result (one host and one pod interface) to prevResult's.
                let own = CniResult::from_json(&serde_json::json!({
                    "interfaces": [{"name": "sl0123456789ab"}, {"name": "eth0", "sandbox": "/x"}],
                    "ips": [{"address": "10.244.1.2/32", "gateway": "169.254.1.1", "interface": 1}],
                }));
                if let Ok(own) = own {
                    r.append(own);
                }
            }
            Err(e) => answer(&e, &version),
        }
    }
});
